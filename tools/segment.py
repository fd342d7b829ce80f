"""`caffeish segment`: per-pixel classes of images with a fully convolutional net, as pictures.

    caffeish segment fcn.prototxt fcn.caffemodel photo.jpg photos/ -o OUTDIR
                     [--palette pascal|COLORMAP.txt|DATASET] [--labels labels.txt]
                     [--overlay 0.6] [--legend] [--npy] [--tile WxH | --max-memory 4G] [--gpu]

For each image the net is reshaped to the image's size, run forward, and the
argmax over the score blob's channels (the last Softmax, else 'score', else
the output of the input's size; or --blob) gives each pixel's class.  Written
to OUTDIR, mirroring the folders given:
  NAME.png          mode P PNG of class indices, colored by the palette (beyond
                    256 classes: a 16-bit gray PNG of the indices)
  NAME_overlay.png  the image blended with the class colors (--legend adds the
                    classes present, with their names and shares)
  NAME.npy          the raw scores, C x H x W float32 (--npy)
Palettes: PASCAL VOC's (its scheme continued past 256 classes), a DIGITS
color-map file (one 'R G B' line per class) or a dataset folder's palette.txt
(and labels.txt).  Images whose blobs would pass --max-memory are run in tiles
that give exactly the untiled classes.
Everything is written to a temporary folder first and moved into OUTDIR at the
end, so OUTDIR never holds a half-written run; input files are never replaced.
Output names never collide (a.png and a_overlay.png: the second is written as
a_overlay_png.png and a_overlay_png_overlay.png).  OUTDIR is never searched
for images, and it gets a hidden marker file, .caffeish-segment (unless it
holds input images): folders holding it are skipped when searching folders,
so pictures written inside an input folder are never taken for photos.
An image that cannot be read or run (a bad file, a size the net refuses) is
named on stderr, the others go on, and the exit status is 1 with a count at
the end.
"""
import contextlib
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from caffeish.data import palette as palettes
from caffeish.apps import progress
from caffeish.tools import report
from caffeish.errors import CaffeishError
from caffeish.apps.inference import (DEFAULT_MAX_MEMORY, OUTPUT_MARKER, PALETTE_PNG_CLASSES, Segmenter, class_colors,
                                class_map, find_images, image_error, label_picture, open_net)
from caffeish.tools.options import (add_gpu_option, add_preprocess_options, device_from_args, finite_float, int_arg,
                                    preprocess_from_args)
from caffeish.values import parse_wxh
from caffeish.tools.report import FORMATS

STAGES = ("decode", "preprocess", "forward", "argmax", "write")


def add_arguments(p):
    p.add_argument("net", metavar="NET.prototxt", help="fully convolutional deploy prototxt")
    p.add_argument("weights", metavar="WEIGHTS", help="caffemodel, or 'none' for the layers' fillers (--seed)")
    p.add_argument("images", metavar="IMAGE|DIR", nargs="+", help="image files and folders of images")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the pictures")
    p.add_argument("--palette", default="pascal", metavar="pascal|FILE|DATASET",
                   help="class colors: 'pascal' (default), a DIGITS color-map file, or a dataset folder")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line (default: the dataset's)")
    p.add_argument("--overlay", type=finite_float, default=0.6, metavar="ALPHA",
                   help="opacity of the class colors in NAME_overlay.png (default 0.6; 0: no overlay)")
    p.add_argument("--legend", action="store_true", help="add a legend of the classes present to the overlay")
    p.add_argument("--npy", action="store_true", help="also write the raw scores as NAME.npy (C x H x W)")
    p.add_argument("--blob", help="score blob (default: last Softmax, else 'score', else the output "
                                  "of the input's size)")
    p.add_argument("--tile", metavar="WxH", help="run in tiles of WxH input pixels (same result as untiled)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help=f"tile images whose blobs would pass SIZE (default {DEFAULT_MAX_MEMORY >> 30}G)")
    p.add_argument("--seed", type=int_arg(0, 2**32 - 1), default=0,
                   help="filler seed when WEIGHTS is 'none'")
    p.add_argument("--timings", action="store_true",
                   help="print the time spent in decode, preprocess, forward, argmax and write on stderr")
    p.add_argument("--format", choices=FORMATS, default="table", help="summary format (default table)")
    add_preprocess_options(p, keep_size=True)
    add_gpu_option(p)


def output_names(images, npy, overlay):
    """[relative output paths] per image (NAME.png, NAME_overlay.png, NAME.npy), no two alike.

    Each image's stem is its relative name without the extension.  When one
    of its outputs is already taken (a.jpg and a.png; a.png and a_overlay.png,
    whose overlay would be a_overlay.png too; the same name in two folder
    arguments), the extension is added to the stem (a_png), then a number
    (a_png_2, ...), until none of its outputs is taken: deterministic, in the
    order of `images`.  Names are compared case-folded, so that no output
    replaces another on a case-insensitive file system either.
    """
    used, plan = set(), []

    def names_for(stem):
        names = [stem + ".png"]
        if overlay:
            names.append(stem + "_overlay.png")
        if npy:
            names.append(stem + ".npy")
        return names

    for path, rel in images:
        for stem in _stems(*os.path.splitext(rel)):
            names = names_for(stem)
            if not any(name.casefold() in used for name in names):
                break
        used.update(name.casefold() for name in names)
        plan.append(names)
    return plan


def _stems(stem, ext):
    """a, then a_png, a_png_2, a_png_3, ... for a.png (a, a_2, ... without an extension)."""
    yield stem
    tag = ext.lstrip(".")
    base = f"{stem}_{tag}" if tag else stem
    if tag:
        yield base
    n = 2
    while True:
        yield f"{base}_{n}"
        n += 1


def _check_inputs(images, plan, outdir):
    """Refuse to run when an output would replace one of the input images."""
    inputs = {os.path.realpath(p) for p, _ in images}
    for names in plan:
        for n in names:
            target = os.path.realpath(os.path.join(outdir, n))
            if target in inputs:
                raise CaffeishError(f"{os.path.join(outdir, n)} would replace an input image; "
                                    "choose another output folder")


def _holds_inputs(outdir, images):
    """Whether one of the input images lies in OUTDIR or below it."""
    top = os.path.join(os.path.realpath(outdir), "")
    return any(os.path.realpath(p).startswith(top) for p, _ in images)


def check_outdir(outdir):
    """Refuse, before any image runs, an OUTDIR that cannot take the pictures.

    OUTDIR must be a folder we may write in, or not exist yet with its nearest
    existing ancestor a folder we may write in (the missing folders are created
    when the run is staged)."""
    if os.path.lexists(outdir) and not os.path.isdir(outdir):
        raise CaffeishError(f"output folder {outdir} exists and is not a folder")
    if os.path.isdir(outdir):
        if not os.access(outdir, os.W_OK | os.X_OK):
            raise CaffeishError(f"output folder {outdir}: no permission to write in it")
        return
    ancestor = os.path.dirname(os.path.abspath(outdir))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise CaffeishError(f"cannot create output folder {outdir}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CaffeishError(f"cannot create output folder {outdir}: no permission to write in {ancestor}")


def _save_png(img, path):
    img.save(path, format="PNG", compress_level=1)


@contextlib.contextmanager
def staging(outdir):
    """A temporary folder beside OUTDIR; on success its files move into OUTDIR (created if needed).

    On failure the temporary folder goes, and so do the folders above OUTDIR
    that were created for it: OUTDIR and its surroundings stay as they were."""
    outdir = os.path.abspath(outdir)
    parent = os.path.dirname(outdir)
    created = []  # missing ancestors, outermost first
    ancestor = parent
    while not os.path.lexists(ancestor):
        created.insert(0, ancestor)
        ancestor = os.path.dirname(ancestor)
    try:
        os.makedirs(parent, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=f".{os.path.basename(outdir)}.", suffix=".tmp", dir=parent)
    except OSError as e:
        _remove_empty(created)
        raise CaffeishError(f"cannot create output folder {outdir}: {e.strerror or e}") from None
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(created)
        raise
    if not os.path.exists(outdir):
        os.replace(stage, outdir)
        return
    if not os.path.isdir(outdir):
        shutil.rmtree(stage, ignore_errors=True)
        raise CaffeishError(f"output folder {outdir} exists and is not a folder")
    for root, _, files in os.walk(stage):
        dest = os.path.join(outdir, os.path.relpath(root, stage))
        os.makedirs(dest, exist_ok=True)
        for f in files:
            os.replace(os.path.join(root, f), os.path.join(dest, f))
    shutil.rmtree(stage, ignore_errors=True)


def _remove_empty(folders):
    """Remove the folders this run created (innermost first), where still empty."""
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            return


class _Clock:
    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._t = time.perf_counter()

    def lap(self, stage):
        now = time.perf_counter()
        self.seconds[stage] += now - self._t
        self._t = now


def segment_images(seg, images, outdir, colors_spec="pascal", labels=None, overlay=0.6, legend=False,
                   npy=False, warn=None):
    """Segment `images` ([(path, relative name)]) into outdir; returns (rows, failed, seconds per stage).

    An image that cannot be read, preprocessed or run (a CaffeishError: a bad
    file, a size the net refuses) is named through `warn`, counted in `failed`,
    and the others go on.  Anything else (a failed write, an interrupt, a bug)
    stops the run with OUTDIR as it was."""
    plan = output_names(images, npy, overlay > 0)
    _check_inputs(images, plan, outdir)
    check_outdir(outdir)
    base_colors, dataset_labels = palettes.load_palette(colors_spec)
    labels = labels if labels is not None else dataset_labels
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    rows, failed, colors = [], 0, None
    clock = _Clock()
    pending = None
    with staging(outdir) as stage, progress.bar(total=len(images), desc="segment", unit="img") as bar, \
            ThreadPoolExecutor(max_workers=1) as writer:
        if not _holds_inputs(outdir, images):  # an input folder written into stays an input folder
            with open(os.path.join(stage, OUTPUT_MARKER), "w") as f:
                f.write("written by caffeish segment: folders holding this file are not searched for images\n")
        for (path, _), names in zip(images, plan):
            clock.lap("write")  # the bar and bookkeeping count with writing
            try:
                shown, classes, scores = _segment_one(seg, path, npy, clock)
            except CaffeishError as e:
                failed += 1
                bar.clear()
                warn(f"caffeish segment: error: {image_error(path, e)}")
                bar.update(1)
                continue
            n_classes = seg.n_classes
            if colors is None:
                colors = class_colors(colors_spec, base_colors, n_classes)
                if n_classes > PALETTE_PNG_CLASSES:
                    warn(f"caffeish segment: note: the net scores {n_classes} classes, more than a palette "
                         f"PNG's {PALETTE_PNG_CLASSES}: NAME.png holds the class indices as 16-bit gray "
                         "(mode I;16, no colors); the overlay shows them in color")
            if pending is not None:
                pending.result()  # one image is written while the next one is decoded and run
            clock.lap("write")
            pending = writer.submit(_write_outputs, stage, names, classes, colors, shown,
                                    overlay, labels, legend, scores if npy else None)
            present = np.flatnonzero(np.bincount(classes.ravel(), minlength=n_classes))
            rows.append({
                "image": path, "size": f"{classes.shape[1]}x{classes.shape[0]}",
                "classes": [labels[c] if labels is not None and c < len(labels) else int(c) for c in present],
                "outputs": [os.path.join(outdir, n) for n in names],
            })
            bar.update(1)
        if pending is not None:
            pending.result()
        clock.lap("write")
    return rows, failed, clock.seconds


def _segment_one(seg, path, npy, clock):
    """(picture, classes, scores or None) of one image: decode, preprocess, forward, argmax."""
    pixels = seg.load(path)
    clock.lap("decode")
    shown, x = seg.prepare(path, pixels)
    clock.lap("preprocess")
    if seg.tile_size(x.shape[1:]) is None:
        scores = seg.scores(x)
        clock.lap("forward")
        classes = class_map(scores)
    else:  # tiles: classes per tile, the scores only for --npy
        classes, scores = seg.run(x, keep_scores=npy)
        clock.lap("forward")
    clock.lap("argmax")
    return shown, classes, scores


def _write_outputs(stage, names, classes, colors, shown, overlay, labels, legend, scores):
    """One image's files (class PNG, overlay PNG, scores .npy) into the staging folder.

    Runs in a writer thread: PNG encoding and numpy's BLAS both release the GIL,
    so writing one image overlaps with the next image's forward pass."""
    for n in names:
        os.makedirs(os.path.dirname(os.path.join(stage, n)), exist_ok=True)
    _save_png(label_picture(classes, colors), os.path.join(stage, names[0]))
    if overlay > 0:
        img = palettes.overlay_image(shown, classes, colors, overlay, labels, legend)
        _save_png(img, os.path.join(stage, names[1]))
    if scores is not None:
        np.save(os.path.join(stage, names[-1]), scores)


def run(args):
    check_outdir(args.output)
    images, notes = find_images(args.images, exclude=[args.output])
    for note in notes:
        print(f"caffeish segment: note: {note}", file=sys.stderr)
    if not images:
        raise CaffeishError("no images to segment in " + ", ".join(args.images))
    if not 0 <= args.overlay <= 1:
        raise CaffeishError(f"--overlay is an opacity between 0 and 1, got {args.overlay}")
    labels = palettes.read_labels(args.labels) if args.labels else None
    spec = preprocess_from_args(args, keep_size=True)
    tile = parse_wxh(args.tile, "--tile")[::-1] if args.tile else None  # (height, width)
    weights = None if args.weights.lower() == "none" else args.weights
    t0 = time.perf_counter()
    net = open_net(args.net, weights, device_from_args(args), seed=args.seed)
    seg = Segmenter(net, spec, args.blob, tile, args.max_memory)
    setup = time.perf_counter() - t0
    rows, failed, seconds = segment_images(seg, images, args.output, args.palette, labels, args.overlay,
                                           args.legend, args.npy)
    columns = [("image", "image"), ("size", "size"), ("classes", "classes present"), ("outputs", "outputs")]
    sys.stdout.write(report.render(columns, rows, args.format))
    if args.timings:
        total = sum(seconds.values())
        print(f"timing: setup {setup:.3f} s (net build, not counted below)", file=sys.stderr)
        for stage in STAGES:
            share = 100.0 * seconds[stage] / total if total else 0.0
            print(f"timing: {stage} {seconds[stage]:.3f} s ({share:.1f}%)", file=sys.stderr)
        done = len(rows)
        rate = done / total if total else 0.0
        print(f"timing: total {total:.3f} s for {done} images ({rate:.3f} images/s), overhead "
              f"{100.0 * (total - seconds['forward']) / total if total else 0.0:.1f}%", file=sys.stderr)
    if failed:
        print(f"caffeish segment: {failed} of {len(images)} images could not be segmented (named above)",
              file=sys.stderr)
        return 1
    return 0
