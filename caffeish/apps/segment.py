"""Segment a folder of images into OUTDIR: the library behind `caffeish segment`.

`segment_images(seg, images, outdir)` runs a `Segmenter` (caffeish.apps.inference)
over [(path, relative name)] and writes, mirroring the folders given:
  NAME.png          mode P PNG of class indices, colored by the palette (beyond
                    256 classes: a 16-bit gray PNG of the indices)
  NAME_overlay.png  the image blended with the class colors (`legend` adds the
                    classes present, with their names and shares)
  NAME.npy          the raw scores, C x H x W float32 (`npy`)
Everything is written to a temporary folder first and moved into OUTDIR at the
end (`staging`), so OUTDIR never holds a half-written run; input files are never
replaced (`check_outdir`, and outputs that would replace an input are refused).
Output names never collide (`output_names`: a.png and a_overlay.png: the second
is written as a_overlay_png.png and a_overlay_png_overlay.png).  OUTDIR gets a
hidden marker file, OUTPUT_MARKER (unless it holds input images): folders holding
it are skipped by `find_images`, so pictures written inside an input folder are
never taken for photos.  An image that cannot be read or run is named through
`warn` and counted; the others go on.  A failure of the net rather than of the
images (a NetFailure, or two images in a row that fail the same way while a
blank image of their sizes fails too, before any image ran) stops the run at
once with OUTDIR as it was.  The folders created follow the umask, as the
files do.  The seconds spent in each of STAGES are returned for --timings.
"""
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from caffeish.apps import progress
from caffeish.apps.inference import (OUTPUT_MARKER, PALETTE_PNG_CLASSES, NetFailure, class_colors, class_map,
                                     image_error, label_picture, same_failure)
from caffeish.data import palette as palettes
from caffeish.errors import CaffeishError
from caffeish.formats import io

STAGES = ("decode", "preprocess", "forward", "argmax", "write")
MARKER_TEXT = "written by caffeish segment: folders holding this file are not searched for images\n"


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
    when the run is staged: io.missing_folders, the rule surgery's outputs follow)."""
    if os.path.lexists(outdir) and not os.path.isdir(outdir):
        raise CaffeishError(f"output folder {outdir} exists and is not a folder")
    if os.path.isdir(outdir):
        if not os.access(outdir, os.W_OK | os.X_OK):
            raise CaffeishError(f"output folder {outdir}: no permission to write in it")
        return
    io.missing_folders(os.path.join(outdir, OUTPUT_MARKER))  # OUTDIR itself is one of the folders to create


def _save_png(img, path):
    img.save(path, format="PNG", compress_level=1)


@contextlib.contextmanager
def staging(outdir):
    """A temporary folder beside OUTDIR; on success its files move into OUTDIR (created if needed).

    On failure the temporary folder goes, and so do the folders above OUTDIR
    that were created for it: OUTDIR and its surroundings stay as they were."""
    outdir = os.path.abspath(outdir)
    parent = os.path.dirname(outdir)
    created = io.make_folders([outdir])  # the missing folders above OUTDIR, outermost first
    try:
        stage = tempfile.mkdtemp(prefix=f".{os.path.basename(outdir)}.", suffix=".tmp", dir=parent)
        os.chmod(stage, 0o777 & ~io.current_umask())  # mkdtemp's 0700 would become OUTDIR's mode
    except OSError as e:
        io.remove_empty_folders(created)
        raise CaffeishError(f"cannot create output folder {outdir}: {e.strerror or e}") from None
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        io.remove_empty_folders(created)
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


class _Clock:
    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._t = time.perf_counter()

    def lap(self, stage):
        now = time.perf_counter()
        self.seconds[stage] += now - self._t
        self._t = now


def many_classes_note(n_classes):
    """The note for a net scoring more classes than a palette PNG holds (None when it does not)."""
    if n_classes <= PALETTE_PNG_CLASSES:
        return None
    return (f"caffeish segment: note: the net scores {n_classes} classes, more than a palette PNG's "
            f"{PALETTE_PNG_CLASSES}: NAME.png holds the class indices as 16-bit gray (mode I;16, no colors); the "
            "overlay shows them in color")


def unfinished(images, plan, outdir, warn=None):
    """(images, plan) without the images whose outputs all exist in outdir already (--resume), with a note
    through `warn` saying how many were skipped.  Each output is written whole (renamed into place), so an
    existing file is a finished one."""
    keep = [i for i, names in enumerate(plan) if not all(os.path.isfile(os.path.join(outdir, n)) for n in names)]
    if warn is not None and len(keep) < len(plan):
        warn(f"caffeish segment: note: --resume: {len(plan) - len(keep)} of {len(plan)} images already have their "
             f"outputs in {outdir}; segmenting the other {len(keep)}")
    return [images[i] for i in keep], [plan[i] for i in keep]


def segment_images(seg, images, outdir, colors_spec="pascal", labels=None, overlay=0.6, legend=False,
                   npy=False, warn=None, resume=False):
    """Segment `images` ([(path, relative name)]) into outdir; returns (rows, failed, seconds per stage).

    An image that cannot be read, preprocessed or run (a CaffeishError: a bad
    file, a size the net refuses) is named through `warn`, counted in `failed`,
    and the others go on.  Anything else (a failed write, an interrupt, a bug)
    stops the run with OUTDIR as it was.  `resume`: skip the images whose
    outputs all exist in outdir (`unfinished`)."""
    plan = output_names(images, npy, overlay > 0)
    _check_inputs(images, plan, outdir)
    check_outdir(outdir)
    base_colors, dataset_labels = palettes.load_palette(colors_spec)
    labels = labels if labels is not None else dataset_labels
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    holds_inputs = _holds_inputs(outdir, images)
    if resume:
        images, plan = unfinished(images, plan, outdir, warn)
    rows, failed, colors = [], 0, None
    clock = _Clock()
    pending = None
    blank_failure = None  # (image, message pattern) of a failure a blank image shares, while none has run
    with staging(outdir) as stage, progress.bar(total=len(images), desc="segment", unit="img") as bar, \
            ThreadPoolExecutor(max_workers=1) as writer:
        if not holds_inputs:  # an input folder written into stays an input folder
            with open(os.path.join(stage, OUTPUT_MARKER), "w") as f:
                f.write(MARKER_TEXT)
        for i, ((path, _), names) in enumerate(zip(images, plan)):
            clock.lap("write")  # the bar and bookkeeping count with writing
            x = None
            try:
                shown, x = _prepare_one(seg, path, clock)
                classes, scores = _run_one(seg, x, npy, clock)
            except NetFailure:
                raise
            except CaffeishError as e:
                if x is not None and not rows and same_failure(seg.scores, np.zeros_like(x), e):
                    pattern = re.sub(r"\d+", "#", str(e))
                    if blank_failure is not None and blank_failure[1] == pattern:
                        raise NetFailure(
                            f"{path} fails as {blank_failure[0]} did (above), and so does a blank image of their "
                            f"sizes: the net cannot run these images; stopped after {i + 1} of {len(images)} "
                            f"images, nothing written") from None
                    blank_failure = (path, pattern)
                failed += 1
                bar.clear()
                warn(f"caffeish segment: error: {image_error(path, e)}")
                bar.update(1)
                continue
            n_classes = seg.n_classes
            if colors is None:
                colors = class_colors(colors_spec, base_colors, n_classes)
                if many_classes_note(n_classes):
                    warn(many_classes_note(n_classes))
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


def _prepare_one(seg, path, clock):
    """(picture, net input) of one image: decode, preprocess."""
    pixels = seg.load(path)
    clock.lap("decode")
    shown, x = seg.prepare(path, pixels)
    clock.lap("preprocess")
    return shown, x


def _run_one(seg, x, npy, clock):
    """(classes, scores or None) of one prepared image: forward, argmax."""
    if seg.tile_size(x.shape[1:]) is None:
        scores = seg.scores(x)
        clock.lap("forward")
        classes = class_map(scores)
    else:  # tiles: classes per tile, the scores only for --npy
        classes, scores = seg.run(x, keep_scores=npy)
        clock.lap("forward")
    clock.lap("argmax")
    return classes, scores


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
