"""`caffeish classify`: the top classes of images with a trained net, as Caffe's classify.py.

    caffeish classify deploy.prototxt weights.caffemodel cat.jpg photos/ [--labels synset_words.txt]
                      [--top-k 5] [--batch-size 16] [--format table|json|csv] [--blob prob]
                      [--mean mean.binaryproto | --mean-value 104,117,123] [--scale S] [--oversample] [--gpu]

Folders are searched recursively for images (files without an image extension
are skipped with a note).  Images are preprocessed as Caffe's Data layer
would (BGR, 0..255, minus the mean, times --scale; see caffeish/preprocess.py),
resized to the net input and batched.  The probabilities come from the last
Softmax (or --blob).  `--format json` writes JSON Lines, one object per image,
as each batch finishes.  An image that cannot be read or run is named on
stderr; the others go on (a batch that fails is run again image by image),
and the exit status is 1 with a count at the end.
"""
import csv
import json
import sys

import numpy as np

from caffeish.data import palette
from caffeish.apps import progress
from caffeish.tools import report
from caffeish.errors import CaffeishError
from caffeish.apps.inference import Classifier, find_images, image_error, open_net, top_classes
from caffeish.tools.options import (add_gpu_option, add_preprocess_options, device_from_args, int_arg,
                                    preprocess_from_args)

FORMATS = ("table", "json", "csv")


def add_arguments(p):
    p.add_argument("net", metavar="NET.prototxt", help="deploy prototxt (an Input layer or input fields)")
    p.add_argument("weights", metavar="WEIGHTS", help="caffemodel, or 'none' for the layers' fillers (--seed)")
    p.add_argument("images", metavar="IMAGE|DIR", nargs="+", help="image files and folders of images")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line (synset_words.txt, labels.txt)")
    p.add_argument("--top-k", type=int_arg(1), default=5, help="classes shown per image (default 5)")
    p.add_argument("--batch-size", type=int_arg(1), default=16,
                   help="images per forward pass (default 16)")
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="table, json (JSON Lines: one object per image) or csv (default table)")
    p.add_argument("--blob", help="output blob to read (default: the last Softmax's top)")
    p.add_argument("--oversample", action="store_true",
                   help="average the 10 crops (corners, centre, mirrored) as Caffe's classify.py")
    p.add_argument("--seed", type=int_arg(0, 2**32 - 1), default=0,
                   help="filler seed when WEIGHTS is 'none'")
    add_preprocess_options(p)
    add_gpu_option(p)


def _rows(path, top, values, labels, value_key):
    rows = []
    for rank, (c, v) in enumerate(zip(top, values), 1):
        row = {"image": path, "rank": rank, "class": int(c), value_key: float(v)}
        if labels is not None:
            row["label"] = labels[c] if c < len(labels) else ""
        rows.append(row)
    return rows


class _Writer:
    """Streams json/csv as results arrive; collects the table for the end."""

    def __init__(self, fmt, labels, value_key, out=None):
        out = sys.stdout if out is None else out
        self.fmt, self.labels, self.value_key, self.out = fmt, labels, value_key, out
        self.columns = [("image", "image"), ("rank", "rank"), ("class", "class")]
        if labels is not None:
            self.columns.append(("label", "label"))
        self.columns.append((value_key, value_key))
        self.table = []
        self.csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self.csv is not None:
            self.csv.writerow([k for k, _ in self.columns])

    def write(self, path, top, values):
        rows = _rows(path, top, values, self.labels, self.value_key)
        if self.fmt == "json":
            top_list = [{k: v for k, v in r.items() if k != "image"} for r in rows]
            self.out.write(json.dumps({"image": path, "top": top_list}) + "\n")
            self.out.flush()
        elif self.fmt == "csv":
            for r in rows:
                self.csv.writerow([r.get(k, "") for k, _ in self.columns])
            self.out.flush()
        else:
            for r in rows:
                v = r[self.value_key]
                shown = dict(r, **{self.value_key: f"{v:.4f}" if abs(v) >= 1e-4 or v == 0 else f"{v:.1e}"})
                if r["rank"] > 1:
                    shown["image"] = ""
                self.table.append(shown)

    def close(self):
        if self.fmt == "table" and self.table:
            self.out.write(report.render(self.columns, self.table, "table"))


def predict_each(clf, paths, prepared, fail):
    """[(path, output row)] of a batch in one forward pass.

    When the batch fails (a CaffeishError: an input the net refuses), each
    image is run alone, so that only the images that fail themselves go to
    `fail(path, error)` and the others of the batch still get results; the
    common path stays one forward per batch."""
    if not prepared:
        return []
    try:
        return list(zip(paths, clf.predict(prepared)))
    except CaffeishError as e:
        if len(prepared) == 1:
            fail(paths[0], e)
            return []
    results = []
    for path, x in zip(paths, prepared):
        try:
            results.append((path, clf.predict([x])[0]))
        except CaffeishError as e:
            fail(path, e)
    return results


def run(args):
    images, notes = find_images(args.images)
    for note in notes:
        print(f"caffeish classify: note: {note}", file=sys.stderr)
    if not images:
        raise CaffeishError("no images to classify in " + ", ".join(args.images))
    labels = palette.read_labels(args.labels) if args.labels else None
    spec = preprocess_from_args(args)
    weights = None if args.weights.lower() == "none" else args.weights
    net = open_net(args.net, weights, device_from_args(args), seed=args.seed)
    clf = Classifier(net, spec, args.blob, args.oversample)
    softmax = any(n.type == "Softmax" and clf.blob in n.tops for n in net.nodes)
    writer = _Writer(args.format, labels, "probability" if softmax else "score")
    failed = 0

    def fail(path, error):
        nonlocal failed
        failed += 1
        bar.clear()
        print(f"caffeish classify: error: {image_error(path, error)}", file=sys.stderr)

    with progress.bar(total=len(images), desc="classify", unit="img") as bar:
        for start in range(0, len(images), args.batch_size):
            chunk = images[start:start + args.batch_size]
            batch, prepared = [], []
            for path, _ in chunk:
                try:
                    prepared.append(clf.prepare(path, clf.load(path)))
                except CaffeishError as e:
                    fail(path, e)
                    continue
                batch.append(path)
            results = predict_each(clf, batch, prepared, fail)
            if results:
                top, values = top_classes(np.stack([row for _, row in results]), args.top_k)
                for (path, _), t, v in zip(results, top, values):
                    writer.write(path, t, v)
            bar.update(len(chunk))
    writer.close()
    if failed:
        print(f"caffeish classify: {failed} of {len(images)} images could not be classified (named above)",
              file=sys.stderr)
        return 1
    return 0
