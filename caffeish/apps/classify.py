"""Classify a list of images batch by batch: the library behind `caffeish classify`.

`classify_images(clf, images, writer)` runs a `Classifier` (caffeish.apps.inference)
over [(path, relative name)] in batches and hands each image's top classes to
`writer` as its batch finishes.  An image that cannot be read or run is named
through `warn` and counted; the others go on (a batch that fails is run again
image by image, `predict_each`).  An image that fails alone while none has run
yet, when a blank image fails the same way, is the net's failure, not the
image's: every image would hit it, so it is said once (NetFailure) and the run
stops.  `ResultWriter` streams the results to a text
stream as JSON Lines (one object per image) or CSV, or collects the rows of a
table for the caller to render at the end.
"""
import csv
import json
import sys

import numpy as np

from caffeish.apps import progress
from caffeish.apps.inference import NetFailure, image_error, same_failure, top_classes
from caffeish.errors import CaffeishError


def value_key_of(clf):
    """The name of the values the classifier reads: 'probability' for a Softmax's top, else 'score'."""
    softmax = any(n.type == "Softmax" and clf.blob in n.tops for n in clf.net.nodes)
    return "probability" if softmax else "score"


def _rows(path, top, values, labels, value_key):
    rows = []
    for rank, (c, v) in enumerate(zip(top, values), 1):
        row = {"image": path, "rank": rank, "class": int(c), value_key: float(v)}
        if labels is not None:
            row["label"] = labels[c] if c < len(labels) else ""
        rows.append(row)
    return rows


class ResultWriter:
    """Streams json/csv to `out` as results arrive; collects the table (`columns`, `table`) for the end."""

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


def predict_each(clf, paths, prepared, fail):
    """[(path, output row)] of a batch in one forward pass.

    When the batch fails (a CaffeishError: an input the net refuses), each
    image is run alone, so that only the images that fail themselves go to
    `fail(path, error, x, ran)` (ran: how many of the batch ran before it) and
    the others of the batch still get results; the common path stays one
    forward per batch."""
    if not prepared:
        return []
    try:
        return list(zip(paths, clf.predict(prepared)))
    except CaffeishError as e:
        if len(prepared) == 1:
            fail(paths[0], e, prepared[0], 0)
            return []
    results = []
    for path, x in zip(paths, prepared):
        try:
            results.append((path, clf.predict([x])[0]))
        except CaffeishError as e:
            fail(path, e, x, len(results))
    return results


def classify_images(clf, images, writer, batch_size=16, top_k=5, warn=None):
    """Classify `images` ([(path, relative name)]) into `writer` (its write(path, top, values)); returns
    how many failed.

    An image that cannot be read, preprocessed or run (a CaffeishError) is
    named through `warn` (default: stderr) and counted; the others go on."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    failed = done = 0

    def fail(path, error, x=None, ran=0):
        nonlocal failed
        if isinstance(error, NetFailure):
            raise error
        if x is not None and not (done or ran) and same_failure(lambda blank: clf.predict([blank]), np.zeros_like(x), error):
            raise NetFailure(f"{image_error(path, error)} (a blank image fails the same way, so every image would: "
                             f"stopped after {failed + 1} of {len(images)} images)") from None
        failed += 1
        bar.clear()
        warn(f"caffeish classify: error: {image_error(path, error)}")

    with progress.bar(total=len(images), desc="classify", unit="img") as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch, prepared = [], []
            for path, _ in chunk:
                try:
                    prepared.append(clf.prepare(path, clf.load(path)))
                except CaffeishError as e:
                    fail(path, e)
                    continue
                batch.append(path)
            results = predict_each(clf, batch, prepared, fail)
            done += len(results)
            if results:
                top, values = top_classes(np.stack([row for _, row in results]), top_k)
                for (path, _), t, v in zip(results, top, values):
                    writer.write(path, t, v)
            bar.update(len(chunk))
    return failed
