"""Inference on images: `classify(net, images)` and `segment(net, image)`.

classify: each image goes through the preprocessing spec (caffeish.data.preprocess)
to the net input's size, images are batched along the input's batch axis, and
the probabilities are read from the last Softmax's top (or a named blob);
`oversample=True` averages pycaffe's 10 crops, as Caffe's classify.py does.

segment: a fully convolutional net takes any size, so the net is reshaped to
each image, run forward, and the argmax over the class axis of the score
blob gives the class of every pixel.  Images too large for memory are cut
into tiles whose results equal the untiled ones (see `TileGeometry`); tiles
carry the net's receptive-field margin, so tiles too small for the net are
refused (or, chosen for memory, named with their cost): `tile_work`.

Errors: a CaffeishError about one image (a bad file, a size the net refuses)
lets a folder run go on; a `NetFailure` is the net's and every image would hit
it, so a run stops at once (`same_failure` tells one from the other by running
a blank input).

Both take a caffeish.Net (or a prototxt path plus `weights=`) and return numpy
arrays; `Segmentation` also renders PIL pictures (palette PNG, overlay, legend).
The `caffeish classify` / `caffeish segment` commands are thin faces over them.
"""
import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
from fractions import Fraction
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from caffeish.apps import progress
from caffeish.runtime import backend as backends
from caffeish.runtime import fillers
from caffeish.graph import geometry
from caffeish.data import palette as palettes
from caffeish.errors import CaffeishError, GraphError, ShapeError
from caffeish.values import parse_bytes
from caffeish.data.preprocess import Preprocess

DEFAULT_MAX_MEMORY = 4 << 30  # bytes of blobs one segmentation forward may use before tiling
MAX_TILE_WORK = 2.0  # tiles may cost at most this many times the work of an untiled forward


class NetFailure(CaffeishError):
    """A failure of the net (or of the options) rather than of one image: every image would hit it,
    so a run over many images says it once and stops."""


class NetShapeError(ShapeError, NetFailure):
    pass


class NetGraphError(GraphError, NetFailure):
    pass


def same_failure(run, blank, error):
    """Whether `run(blank)` (a neutral input of the failing image's shape) fails with the same message as
    `error`: then the image's pixels are not the cause, the net is (at that shape)."""
    try:
        run(blank)
    except CaffeishError as e:
        return str(e) == str(error)
    return False


@contextlib.contextmanager
def terminated_as_exit():
    """While inside, SIGTERM raises SystemExit(143) in the main thread, as Ctrl-C raises KeyboardInterrupt,
    so that the cleanups of staging folders and temp files run; a second SIGTERM during them is ignored.
    The previous handler comes back on leaving (a no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if old is None else old)


def constant_weight_layers(net, weights_given):
    """[(layer, type, value)] of the layers whose weights were left at a constant filler (Caffe's default
    when a prototxt gives no weight_filler): every such layer when no caffemodel was given, else those
    missing from it.  Their outputs do not depend on the image (all zero for the default, 0)."""
    missing = set(net.missing_weights) if weights_given else None
    out = []
    for node in net.nodes:
        if node.type not in fillers.WEIGHT_TYPES or not node.param_shapes:
            continue
        if missing is not None and node.name not in missing:
            continue
        specs = node.layer.fillers()
        value = fillers.constant_value(specs[0] if specs else None)
        if value is not None:
            out.append((node.name, node.type, value))
    return out


def constant_weight_warning(net, weights_given):
    """The warning line for the net's constant_weight_layers (None when there are none)."""
    layers = constant_weight_layers(net, weights_given)
    if not layers:
        return None
    names = ", ".join(f"'{name}'" for name, _, _ in layers[:6]) + (f" and {len(layers) - 6} more"
                                                                    if len(layers) > 6 else "")
    values = ", ".join(sorted({f"{v:g}" for _, _, v in layers}))
    lead = "layers missing from WEIGHTS" if weights_given else "WEIGHTS is 'none' and the layers"
    return (f"{lead} {names} are left at a constant weight filler ({values}): their outputs do not depend on "
            f"the image, so every result is the same and meaningless; give a caffemodel, or weight fillers "
            f"(gaussian, xavier, msra) in the prototxt")


# ---------------------------------------------------------------------------- the net


def open_net(net, weights=None, device=None, seed=0):
    """A caffeish Net: `net` itself, or built from a prototxt path (and weights) for TEST."""
    if hasattr(net, "forward_outputs"):
        if weights is not None:
            net.copy_from(weights)
        return net
    from caffeish.runtime.net import Net
    from caffeish.formats.schema import TEST

    return Net(net, weights, TEST, device=device, seed=seed, keep=False)


def data_input(net):
    """The input blob images go to: 'data' when there is one, else the first 4-D input."""
    inputs = list(net.inputs)
    if "data" in inputs:
        return "data"
    for name in inputs:
        if len(net.blob_shape(name)) == 4:
            return name
    raise GraphError(f"net '{net.name}' has no 4-D image input (N x C x H x W); its inputs are "
                     f"{', '.join(f'{n} {_fmt_shape(net.blob_shape(n))}' for n in inputs) or 'none'}")


def _fmt_shape(shape):
    return "x".join(str(d) for d in shape)


def blob_list(net):
    """'name (shape), ...' of every blob, for error messages."""
    return ", ".join(f"{n} ({_fmt_shape(s)})" for n, s in net.graph.blob_shapes.items())


def check_blob(net, blob):
    if blob not in net.graph.blob_shapes:
        raise GraphError(f"no blob named '{blob}' in net '{net.name}'; blobs: {blob_list(net)}")
    return blob


def softmax_blob(net):
    """The top of the net's last Softmax layer (what classify reports by default)."""
    tops = [n.tops[0] for n in net.nodes if n.type == "Softmax" and n.tops]
    if not tops:
        raise GraphError(f"net '{net.name}' has no Softmax layer to read probabilities from; "
                         f"choose the output with --blob NAME (blob=...); blobs: {blob_list(net)}")
    return tops[-1]


def _outputs(net, inputs, blob):
    out = net.forward_outputs(inputs, blobs=[blob])
    return backends.to_numpy(out[blob])


# ---------------------------------------------------------------------------- classify


class Classification(NamedTuple):
    """Per image: `probs` (N x C, the output blob flattened), `top` (N x k class
    indices, best first), `top_probs` (N x k) and the class names (or None)."""

    probs: np.ndarray
    top: np.ndarray
    top_probs: np.ndarray
    labels: Optional[List[str]]

    def name(self, c):
        """The label of class c (its index as text without labels)."""
        if self.labels is not None and 0 <= c < len(self.labels):
            return self.labels[c]
        return str(c)


def top_classes(probs, k):
    """(indices, values) of the k largest per row, best first; ties keep the lower index first."""
    probs = np.asarray(probs)
    k = max(1, min(int(k), probs.shape[1]))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=1)


class _ImageRunner:
    """What classify and segment share: the net's image input, the preprocessing spec checked
    against it at once (a mean or channel swap that cannot fit fails before the first image),
    and decoding."""

    def __init__(self, net, preprocess):
        self.net = net
        self.preprocess = preprocess
        self.input = data_input(net)
        shape = net.blob_shape(self.input)
        self.channels, self.input_hw = int(shape[1]), tuple(int(d) for d in shape[2:4])
        self.preprocess.mean_for((self.channels,) + self.input_hw)
        self.preprocess.swap_for(self.channels)

    def load(self, image):
        """Decode one image for this net (H x W x K, 0..255); CaffeishError names an unreadable file.
        An LMDB record's reference (`record_ref`, from find_images) is read from its database."""
        if isinstance(image, (str, os.PathLike)) and parse_record_ref(image) is not None:
            image = read_record(image, self.__dict__.setdefault("_readers", {}))
        return self.preprocess.load(image, self.channels)


class Classifier(_ImageRunner):
    """Loads images for a net's input and runs batches (used by `classify` and the CLI)."""

    def __init__(self, net, preprocess=None, blob=None, oversample=False):
        super().__init__(net, preprocess if preprocess is not None else Preprocess())
        self.blob = check_blob(net, blob) if blob else softmax_blob(net)
        self.oversample = oversample

    def prepare(self, image, pixels=None):
        """One image -> its K x H x W input (10 x K x H x W with oversampling)."""
        if pixels is None:
            pixels = self.load(image)
        if self.oversample:
            return self.preprocess.oversampled(pixels, self.input_hw)
        return self.preprocess.apply(pixels, self.input_hw)

    def predict(self, prepared):
        """Outputs (N x C) for a list of prepared inputs, in one forward pass."""
        x = np.stack(prepared) if not self.oversample else np.concatenate(prepared)
        out = _outputs(self.net, {self.input: x}, self.blob)
        out = out.reshape(out.shape[0], -1).astype(np.float32, copy=False)
        if self.oversample:
            out = out.reshape(len(prepared), 10, -1).mean(axis=1)
        return out


def _at_least_one(value, name):
    try:
        whole = not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or value < 1:
        raise CaffeishError(f"{name} must be a whole number of at least 1, got {value!r}")
    return int(value)


def classify(net, images, weights=None, top_k=5, preprocess=None, blob=None, batch_size=16,
             oversample=False, labels=None, device=None):
    """Classify images (paths, PIL images or arrays; one or a list) -> Classification.

    net: a caffeish.Net or a prototxt path (then `weights`).  preprocess: a
    caffeish.data.preprocess.Preprocess (default: BGR, 0..255, no mean).  blob: the
    output to read (default the last Softmax's top).  labels: class names or a
    labels file.  An unreadable image raises CaffeishError naming it.
    """
    top_k, batch_size = _at_least_one(top_k, "top_k"), _at_least_one(batch_size, "batch_size")
    net = open_net(net, weights, device)
    clf = Classifier(net, preprocess, blob, oversample)
    if not isinstance(images, (list, tuple)):
        images = [images]
    rows = []
    for i in range(0, len(images), batch_size):
        rows.append(clf.predict([clf.prepare(im) for im in images[i:i + batch_size]]))
    probs = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
    if isinstance(labels, str) or hasattr(labels, "__fspath__"):
        labels = palettes.read_labels(labels)
    if probs.size:
        top, top_probs = top_classes(probs, top_k)
    else:
        top, top_probs = np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32)
    return Classification(probs, top, top_probs, labels)


# ---------------------------------------------------------------------------- tiling


class TileGeometry(NamedTuple):
    """What exact tiling needs, per spatial axis (h, w).

    stride: tile origins must be multiples of it, so that every blob's grid in
    a tile is the full image's grid shifted by a whole number of cells (the
    lcm of the denominators of every blob's scale from the input).
    reach: the farthest input pixel an output pixel depends on, measured from
    the input position the coordinate maps put it at (receptive field, padding
    and the Deconvolution's taps included).  offset: the output's map x -> x + b.
    margin: ceil(reach + |b|) rounded up to the stride: an output pixel at least
    `margin` from a tile's inner edges sees only pixels inside the tile, so it
    equals the untiled result.
    """

    stride: Tuple[int, int]
    margin: Tuple[int, int]
    reach: Tuple[Fraction, Fraction]
    offset: Tuple[Fraction, Fraction]


def _analysis_net(net):
    """The net's layers (as run) without include/exclude rules, for the offsets analysis."""
    from caffeish.formats.schema import pb

    out = pb.NetParameter()
    out.CopyFrom(net.graph.filtered)
    for layer in out.layer:
        del layer.include[:]
        del layer.exclude[:]
    return out


def tile_geometry(net, input_name, blob, input_shapes=None):
    """The TileGeometry of `blob` (an output at the input's resolution) over `input_name`.

    net: a caffeish Net, or a NetParameter / prototxt path (then `input_shapes`
    as for caffeish.graph.Graph when its inputs have no shapes).
    """
    from caffeish.apps.offsets import Conflict, analyze

    if hasattr(net, "graph"):
        input_shapes = {n: net.blob_shape(n) for n in net.inputs}
        net = _analysis_net(net)
    a = analyze(net, input_shapes=input_shapes)
    root, target = a.blob_id(input_name), a.blob_id(blob)
    maps = a.maps.get(target, {})
    why = f"cannot tile '{blob}' over '{input_name}'"
    if root not in maps:
        raise ShapeError(f"{why}: it is not computed from '{input_name}' through layers with coordinate maps "
                         f"(it comes from {a._describe_roots(target)})")
    for r, m in maps.items():
        if isinstance(m, Conflict):
            raise ShapeError(f"{why}: {m.message}")
        if r != root and a.root_reason.get(r):
            raise ShapeError(f"{why}: it also depends on {a.root_reason[r]}")
    axes = (2, 3)
    ident = geometry.identity()
    reach = {root: {ax: Fraction(0) for ax in axes}}
    for layer in a.layers:
        lm = layer.lmap
        per_axis = dict(zip(lm.axes, zip(lm.kernel, lm.stride, lm.dilation))) if lm.kernel else {}
        for b, t in lm.links:
            bid, tid = layer.bottoms[b], layer.tops[t]
            if bid not in reach or isinstance(a.maps.get(bid, {}).get(root), Conflict):
                continue
            new = {}
            for ax in axes:
                r = reach[bid][ax]
                if ax in per_axis and lm.kind in ("window", "deconv"):
                    k, s, d = per_axis[ax]
                    jump = 1 / a.maps[bid][root].get(ax, ident).a  # input pixels per bottom cell
                    ext = geometry.effective_kernel(k, d)
                    half = Fraction(ext - 1, 2) if lm.kind == "window" else Fraction(ext - 1, 2 * s)
                    r = r + half * jump
                new[ax] = r
            old = reach.get(tid)
            reach[tid] = new if old is None else {ax: max(old[ax], new[ax]) for ax in axes}
    stride = []
    for ax in axes:
        s = 1
        for bid in reach:
            m = a.maps.get(bid, {}).get(root)
            if m is not None and not isinstance(m, Conflict):
                s = math.lcm(s, m.get(ax, ident).a.denominator)
        stride.append(s)
    out_map = maps[root]
    for ax in axes:
        if out_map.get(ax, ident).a != 1:
            raise ShapeError(f"{why}: its axis {ax} is at scale {out_map[ax].a} of the input; tiling needs "
                             "the scores at the input's resolution")
    margins = []
    for ax, s in zip(axes, stride):
        need = math.ceil(reach[target][ax] + abs(out_map.get(ax, ident).b))
        margins.append(-(-need // s) * s)
    return TileGeometry(tuple(stride), tuple(margins), tuple(reach[target][ax] for ax in axes),
                        tuple(out_map.get(ax, ident).b for ax in axes))


def tile_spans(n, tile, margin, stride):
    """[(input start, input end, keep start, keep end)] covering 0..n along one axis.

    Each tile reads at most `tile` pixels: the part it keeps plus `margin` pixels of context on each
    inner side; a tile at a border of the image needs none on that side (the untiled net sees the
    same border), so it keeps more.  Kept parts start on multiples of `stride`; the fewest tiles
    are used.
    """
    if tile >= n:
        return [(0, n, 0, n)]
    edge = (tile - margin) // stride * stride  # kept by a tile at a border
    inner = (tile - 2 * margin) // stride * stride  # kept by a tile inside
    if edge <= 0 or (inner <= 0 and 2 * edge < n):
        raise NetShapeError(f"a tile of {tile} pixels is too small: this net needs {margin} pixels of context on "
                            f"each side and origins on multiples of {stride}; use at least {2 * margin + stride}")
    cuts = [0, edge]
    while n - cuts[-1] > tile - margin:
        cuts.append(cuts[-1] + inner)
    cuts.append(n)
    return [(max(0, k0 - margin), min(n, k1 + margin), k0, k1) for k0, k1 in zip(cuts, cuts[1:])]


class WorkModel(NamedTuple):
    """Multiply-accumulates of one forward at H x W input pixels: a*H*W + b*H + c*W + d (a convolutional
    net's count is this up to rounding; fitted from four shapes).  Gives the work of tiles, and the
    smallest tiles whose work stays within MAX_TILE_WORK of the untiled forward's."""

    a: float
    b: float
    c: float
    d: float

    def __call__(self, h, w):
        return max(self.a * h * w + self.b * h + self.c * w + self.d, 1.0)

    def plan_work(self, hw, spans):
        """The work of running the tiles spans = (rows, cols) over an image of size hw, as a multiple of
        running it whole."""
        rows, cols = spans
        total = sum(self(r1 - r0, c1 - c0) for r0, r1, _, _ in rows for c0, c1, _, _ in cols)
        return total / self(*hw)

    def inner_work(self, tile, margin):
        """The work of a tile inside a large image per pixel it keeps, as a multiple of an untiled
        forward's per pixel (the worst case: context on all four sides)."""
        kept = [t - 2 * m for t, m in zip(tile, margin)]
        if min(kept) <= 0:
            return math.inf
        return self(*tile) / (self.a * kept[0] * kept[1])


def tile_work(net, input_name, channels, geometry):
    """The WorkModel of a net (None when its work does not grow with the input's area)."""
    s = max(geometry.stride)
    low = -(-(2 * max(geometry.margin) + 8 * s) // s) * s
    high = 2 * low
    f = {}
    for h in (low, high):
        for w in (low, high):
            net.reshape(**{input_name: (1, channels, h, w)})
            f[h, w] = float(sum(int(n.layer.macs(n.bottom_shapes, n.top_shapes)) for n in net.nodes if n.bottoms))
    d = high - low
    a = (f[high, high] - f[low, high] - f[high, low] + f[low, low]) / (d * d)
    if a <= 0:
        return None
    b = (f[high, low] - f[low, low]) / d - a * low
    c = (f[low, high] - f[low, low]) / d - a * low
    return WorkModel(a, b, c, f[low, low] - a * low * low - b * low - c * low)


# ---------------------------------------------------------------------------- segment


class Segmentation:
    """One segmented image.

    image: the decoded picture (H x W x 3 uint8); classes: H x W class indices
    (the argmax over the score blob's channels); scores: C x H x W float32 (or
    None when not kept); colors: (C, 3) uint8; labels: class names or None.
    """

    def __init__(self, image, classes, scores, colors, labels=None):
        self.image = image
        self.classes = classes
        self.scores = scores
        self.colors = colors
        self.labels = labels

    def label_image(self):
        """PIL image of the class indices: mode P with the palette (up to 256 classes), else 16-bit gray."""
        return label_picture(self.classes, self.colors)

    def overlay_image(self, alpha=0.6, legend=False):
        """Mode RGB PIL image: the picture blended with the class colors (legend on the right)."""
        return palettes.overlay_image(self.image, self.classes, self.colors, alpha, self.labels, legend)


PALETTE_PNG_CLASSES = 256  # a mode P PNG indexes 256 colors
GRAY16_CLASSES = 1 << 16


def class_colors(spec, base, n_classes):
    """n_classes colors from the palette `spec` loaded as `base`.

    The PASCAL palette is generated for as many classes as the net scores (its
    scheme spreads the bits of the class index over R, G and B, 24 bits: every
    class below 2**24 gets its own color); a color-map file or array must list
    a color per class (ShapeError otherwise).
    """
    if palettes.is_pascal(spec):
        return palettes.pascal_palette(max(n_classes, len(base)))[:n_classes]
    source = "the palette" if isinstance(spec, np.ndarray) else str(spec)
    return palettes.colors_for(base, n_classes, source)


def label_picture(classes, colors):
    """The class-index picture: a mode P PNG with the palette for up to 256 classes (what VOC's
    ground truth looks like), else a 16-bit gray image (mode I;16) of the indices, without colors."""
    from PIL import Image

    if len(colors) <= PALETTE_PNG_CLASSES and (classes.size == 0 or classes.max() < PALETTE_PNG_CLASSES):
        return palettes.label_image(classes, colors)
    if classes.size and (classes.min() < 0 or classes.max() >= GRAY16_CLASSES):
        raise ShapeError(f"a 16-bit PNG holds class indices 0..{GRAY16_CLASSES - 1}; these run from "
                         f"{classes.min()} to {classes.max()} (write the scores with --npy instead)")
    return Image.fromarray(np.ascontiguousarray(classes, dtype=np.uint16))


def _parse_memory(value):
    """Bytes from 4G, 512M, 100K, 2.5GiB or a number (values.parse_bytes); None: the default."""
    return DEFAULT_MAX_MEMORY if value is None else parse_bytes(value, "memory size")


class Segmenter(_ImageRunner):
    """Runs a fully convolutional net on images of any size (used by `segment` and the CLI).

    tile: None (automatic: tiles only when the blobs of one forward would pass
    max_memory bytes) or (h, w) tile size in input pixels.  Tiles carry the
    net's receptive-field margin, so small ones are mostly overhead: a tile
    whose work per kept pixel passes max_work (MAX_TILE_WORK; None: no limit)
    times the untiled forward's is refused (NetShapeError naming the smallest
    sensible tile), and automatic tiles that memory makes that small are run
    with a note through `warn` (default: stderr).  Images of several tiles
    show a progress bar of their tiles.
    """

    def __init__(self, net, preprocess=None, blob=None, tile=None, max_memory=None, warn=None):
        # Fully convolutional: every image keeps its size (the caller's spec is not modified).
        super().__init__(net, dataclasses.replace(preprocess if preprocess is not None else Preprocess(),
                                                  resize="keep"))
        self.blob = check_blob(net, blob) if blob else None
        self._chosen = False  # the score blob checked (an ArgMax walked back, one channel refused)
        self.tile = tile
        self.max_memory = _parse_memory(max_memory)
        self.max_work = MAX_TILE_WORK
        self.warn = warn or (lambda message: print(f"note: {message}", file=sys.stderr))
        self._geometry = None
        self._per_pixel = None
        self._work = False  # the WorkModel, once fitted (None: none)
        self._warned = set()
        self.n_classes = None  # channels of the score blob, known after the first image

    def prepare(self, image, pixels=None):
        """(picture H x W x 3 uint8, net input K x H x W) of one image."""
        if pixels is None:
            pixels = self.load(image)
        shown = np.clip(pixels, 0, 255).astype(np.uint8)
        if shown.shape[2] == 1:
            shown = np.repeat(shown, 3, axis=2)
        return shown, self.preprocess.apply(pixels, None)

    # -- choosing the score blob -------------------------------------------------------
    def _shape_at(self, hw):
        self.net.reshape(**{self.input: (1, self.channels) + tuple(hw)})
        return {n: self.net.blob_shape(n) for n in self.net.graph.blob_shapes}

    def score_blob(self, hw):
        """The blob holding per-pixel class scores for an input of size hw.

        An ArgMax over the channels (a label map) gives way to the scores it reads, with a note; a blob
        of one channel is refused (NetGraphError): its argmax would be class 0 at every pixel."""
        if self._chosen:
            return self.blob
        shapes = self._shape_at(hw)
        if self.blob is None:
            fits = [n for n in self.net.outputs if len(shapes[n]) == 4 and tuple(shapes[n][2:]) == tuple(hw)]
            softmax = [n.tops[0] for n in self.net.nodes if n.type == "Softmax" and n.tops and n.tops[0] in fits]
            named = [n for n in fits if n == "score"]
            choice = (softmax[-1:] or named or fits[:1])
            if not choice:
                outs = ", ".join(f"{n} ({_fmt_shape(shapes[n])})" for n in self.net.outputs)
                raise NetGraphError(
                    f"net '{self.net.name}' has no Softmax or score output of the input's size {_fmt_shape(hw)} "
                    f"(outputs: {outs}); choose a blob with --blob NAME, or use a net that upsamples its "
                    f"scores to the input (Deconvolution + Crop); blobs: "
                    + ", ".join(f"{n} ({_fmt_shape(s)})" for n, s in shapes.items()))
            self.blob = choice[0]
        node = channel_argmax(self.net, self.blob)
        if node is not None:
            self.warn(f"'{self.blob}' is a label map (ArgMax '{node.name}' over the channels): taking the "
                      f"classes from the {shapes[node.bottoms[0]][1]}-channel blob '{node.bottoms[0]}' it reads")
            self.blob = node.bottoms[0]
        shape = shapes[self.blob]
        if len(shape) < 2 or shape[1] == 1:
            raise NetGraphError(f"blob '{self.blob}' has one channel ({_fmt_shape(shape)}): its argmax is class 0 "
                                f"at every pixel; choose the blob with one channel per class with --blob NAME")
        self._chosen = True
        return self.blob

    # -- memory and tiles ----------------------------------------------------------------
    def geometry(self):
        if self._geometry is None:
            self._geometry = tile_geometry(self.net, self.input, self.blob)
        return self._geometry

    def work_model(self):
        """The net's WorkModel (None when it cannot be fitted: the net refuses the sizes, or its work
        does not grow with the input)."""
        if self._work is False:
            try:
                self._work = tile_work(self.net, self.input, self.channels, self.geometry())
            except CaffeishError:
                self._work = None
        return self._work

    def smallest_tile(self):
        """(h, w): the smallest tiles whose work per kept pixel stays within max_work times the untiled
        forward's, inside a large image (None: no limit, or no WorkModel)."""
        model = self.work_model()
        if model is None or self.max_work is None:
            return None
        g = self.geometry()
        s = max(g.stride)

        def tile(k):
            return tuple(-(-(k + 2 * m) // st) * st for m, st in zip(g.margin, g.stride))

        def fits(k):
            return model.inner_work(tile(k), g.margin) <= self.max_work

        high = s
        while not fits(high):
            if high > 1 << 20:
                return None
            high *= 2
        low = high // 2
        while high - low > s:  # the smallest kept size (a multiple of s) that fits
            mid = (low + high) // 2 // s * s
            if mid <= low:
                break
            low, high = (low, mid) if fits(mid) else (mid, high)
        return tile(high)

    def check_tile(self, hw=None):
        """Refuse (NetShapeError) the explicit tile when it is smaller than smallest_tile() along an axis
        the image of size hw is cut along (every axis when hw is None)."""
        if self.tile is None:
            return
        least = self.smallest_tile()
        if least is None:
            return
        axes = [ax for ax in range(2) if hw is None or self.tile[ax] < hw[ax]]
        if any(self.tile[ax] < least[ax] for ax in axes):
            g = self.geometry()
            work = self.work_model().inner_work(self.tile, g.margin)
            cost = ("more work than they keep" if math.isinf(work)
                    else f"{work:.1f}x the work per pixel of an untiled run")
            raise NetShapeError(
                f"tiles of {self.tile[1]}x{self.tile[0]} (WxH) are too small for this net: each needs "
                f"{g.margin[1]}x{g.margin[0]} pixels of context on each side (its receptive field), so they "
                f"would cost {cost}; use tiles of at least {least[1]}x{least[0]} (at most {self.max_work:g}x "
                f"the work), or no tiles")

    def _peak_per_pixel(self, hw):
        """Bytes per input pixel of one forward: the two largest blobs plus 16 MiB of im2col
        columns, from the shapes at 256x256 (or at the image's size if the net refuses 256x256)."""
        if self._per_pixel is None:
            probe = (256, 256)
            try:
                shapes = self._shape_at(probe)
            except CaffeishError:
                probe = tuple(hw)
                shapes = self._shape_at(probe)
            sizes = sorted((int(np.prod(s)) * 4 for s in shapes.values()), reverse=True)
            self._per_pixel = (sum(sizes[:2]) + (16 << 20)) / (probe[0] * probe[1])
        return self._per_pixel

    def tile_size(self, hw):
        """The (h, w) tile for an image of size hw, or None to run it whole."""
        if self.tile is not None:
            if self.tile[0] >= hw[0] and self.tile[1] >= hw[1]:
                return None
            self.score_blob(hw)
            self.check_tile(hw)
            return tuple(self.tile)
        self.score_blob(hw)
        per_pixel = self._peak_per_pixel(hw)
        if per_pixel * hw[0] * hw[1] <= self.max_memory:
            return None
        g = self.geometry()
        side = int(math.sqrt(self.max_memory / per_pixel))
        sizes = []
        for ax in range(2):
            least = 2 * g.margin[ax] + g.stride[ax]
            sizes.append(max(least, side // g.stride[ax] * g.stride[ax]))
        self._note_small_tiles(hw, tuple(sizes), per_pixel)
        return tuple(sizes)

    def _note_small_tiles(self, hw, tile, per_pixel):
        """Say once when the tiles that fit max_memory are mostly overhead for this net."""
        if "memory" in self._warned:
            return
        least = self.smallest_tile()
        if least is None:
            return
        tiled = [ax for ax in range(2) if tile[ax] < hw[ax]]
        if all(tile[ax] >= least[ax] for ax in tiled):
            return
        self._warned.add("memory")
        g = self.geometry()
        spans = [tile_spans(n, t, m, s) for n, t, m, s in zip(hw, tile, g.margin, g.stride)]
        work = self.work_model().plan_work(hw, spans)
        need = per_pixel * least[0] * least[1]
        self.warn(f"tiles of {tile[1]}x{tile[0]} keep a {hw[1]}x{hw[0]} image under the memory limit of "
                  f"{self.max_memory / (1 << 30):.3g} GiB, but with this net's context of {g.margin[1]} pixels "
                  f"they cost {work:.1f}x the untiled work; tiles of {least[1]}x{least[0]} would stay within "
                  f"{self.max_work:g}x (about {need / (1 << 30):.3g} GiB: raise --max-memory)")

    # -- running ------------------------------------------------------------------------
    def scores(self, x):
        """C x H x W scores of one K x H x W input, tiled when needed."""
        return self._forward(x, keep_scores=True)[1]

    def _forward(self, x, keep_scores):
        """(classes or None, scores or None): untiled, the scores (classes left to the caller);
        tiled, the classes per tile and the scores only when kept (they can be large)."""
        hw = tuple(x.shape[1:])
        blob = self.score_blob(hw)
        tile = self.tile_size(hw)
        if tile is None:
            out = _outputs(self.net, {self.input: x[np.newaxis]}, blob)[0]
            if tuple(out.shape[1:]) != hw:
                raise ShapeError(f"blob '{blob}' is {_fmt_shape(out.shape)} for an input of {_fmt_shape(hw)}; "
                                 "segmentation needs scores at the input's size")
            self.n_classes = out.shape[0]
            return None, out
        g = self.geometry()
        rows = tile_spans(hw[0], tile[0], g.margin[0], g.stride[0])
        cols = tile_spans(hw[1], tile[1], g.margin[1], g.stride[1])
        classes = result = None
        with progress.bar(total=len(rows) * len(cols), desc=f"tiles of {hw[1]}x{hw[0]}", unit="tile") as bar:
            for r0, r1, k0, k1 in rows:
                for c0, c1, j0, j1 in cols:
                    part = _outputs(self.net, {self.input: x[np.newaxis, :, r0:r1, c0:c1]}, blob)[0]
                    if tuple(part.shape[1:]) != (r1 - r0, c1 - c0):
                        raise ShapeError(f"blob '{blob}' is {_fmt_shape(part.shape)} for a tile of "
                                         f"{r1 - r0}x{c1 - c0}; tiling needs scores at the input's size")
                    kept = part[:, k0 - r0:k1 - r0, j0 - c0:j1 - c0]
                    self.n_classes = part.shape[0]
                    if classes is None:
                        classes = np.empty(hw, dtype=class_map(part[:, :1, :1]).dtype)
                        if keep_scores:
                            result = np.empty((part.shape[0],) + hw, dtype=np.float32)
                    classes[k0:k1, j0:j1] = class_map(kept)
                    if keep_scores:
                        result[:, k0:k1, j0:j1] = kept
                    bar.update(1)
        return classes, result

    def run(self, x, keep_scores=True):
        """(classes H x W, scores C x H x W or None) of one prepared input.

        keep_scores=False lets a tiled image keep only its classes, not C floats per pixel.
        """
        classes, scores = self._forward(x, keep_scores)
        if classes is None:
            classes = class_map(scores)
        return classes, scores


def channel_argmax(net, blob):
    """The ArgMax layer (a node) that wrote `blob` as a label map, the argmax over the channels of an
    N x C x H x W blob (axis 1, top_k 1, no max values), or None."""
    producers = {t: n for n in net.nodes for t in n.tops}
    node = producers.get(blob)
    if node is None or node.type != "ArgMax" or not node.bottoms:
        return None
    p = node.param.argmax_param
    ndim = len(net.blob_shape(node.bottoms[0]))
    if ndim == 4 and p.HasField("axis") and p.axis in (1, 1 - ndim) and p.top_k == 1 and not p.out_max_val:
        return node
    return None


def class_map(scores):
    """The argmax over the class axis of C x H x W scores: uint8 (int32 beyond 256 classes)."""
    return scores.argmax(axis=0).astype(np.uint8 if scores.shape[0] <= 256 else np.int32)


def segment(net, image, weights=None, preprocess=None, blob=None, tile=None, max_memory=None,
            palette="pascal", labels=None, device=None):
    """Segment one image (path, PIL image or array) with a fully convolutional net -> Segmentation.

    net: a caffeish.Net or a prototxt path (then `weights`).  preprocess: a
    Preprocess (the image keeps its size).  blob: the score blob (default the
    last Softmax, else 'score', else the first output of the input's size).
    tile: (h, w) to process in tiles (exactly equal to untiled), None for
    automatic tiling above max_memory bytes.  palette: 'pascal' (generated for
    as many classes as the net scores), a DIGITS color-map file, a dataset
    folder or an (N, 3) array.  labels: names or a file.
    """
    colors, names = (np.asarray(palette, np.uint8), None) if isinstance(palette, np.ndarray) \
        else palettes.load_palette(palette)
    if isinstance(labels, str) or hasattr(labels, "__fspath__"):
        labels = palettes.read_labels(labels)
    net = open_net(net, weights, device)
    seg = Segmenter(net, preprocess, blob, tile, max_memory)
    shown, x = seg.prepare(image)
    classes, scores = seg.run(x)
    colors = class_colors(palette, colors, scores.shape[0])
    return Segmentation(shown, classes, scores, colors, labels if labels is not None else names)


# ---------------------------------------------------------------------------- folders


OUTPUT_MARKER = ".caffeish-segment"  # in every folder `caffeish segment` writes; find_images skips those


def image_error(path, error):
    """One image's error for stderr: the message, led by the image's path unless it already names it."""
    message = str(error)
    return message if message.startswith(os.fspath(path)) else f"{os.fspath(path)}: {message}"


LIST_PREFIX = "@"  # an argument "@LIST.txt": a list file of images, one path a line (find_images)
DATASET_STAGES = ("train_db", "val_db", "test_db")
RECORD_DB = "data.mdb"  # a record's reference: DATABASE/data.mdb/ESCAPED_KEY (data.mdb is a file: never a real path)


def record_name(key):
    """The escaped key that names an LMDB record's outputs: one path component, only [A-Za-z0-9_.~%-]
    ('/', '\\', '%', spaces, control and non-ASCII bytes as %XX, a leading '.' as %2E), or None for a key
    that must not name a file (empty, or a '.' or '..' component)."""
    from urllib.parse import quote

    key = bytes(key)
    if not key or any(part in (b".", b"..") for part in key.replace(b"\\", b"/").split(b"/")):
        return None
    name = quote(key, safe="")
    return "%2E" + name[1:] if name.startswith(".") else name


def record_ref(database, key):
    """The image-list path of one record of an LMDB database (a string that survives os.path.abspath, so
    that Ray workers read it as the single-machine run does), or None for a key record_name refuses."""
    name = record_name(key)
    return None if name is None else os.path.join(os.fspath(database), RECORD_DB, name)


def parse_record_ref(ref):
    """(database, key bytes) of a record_ref, else None (an ordinary path)."""
    from urllib.parse import unquote_to_bytes

    folder, name = os.path.split(os.fspath(ref))
    if os.path.basename(folder) != RECORD_DB or not name or not os.path.isfile(folder):
        return None
    return os.path.dirname(folder), unquote_to_bytes(name)


def read_record(ref, readers=None):
    """A Pillow image of one LMDB record (caffeish.formats.datum.LmdbReader, every page checked): an encoded
    Datum's image file as a file would be read, a raw Datum's BGR pixels as RGB; a CaffeishError names ref."""
    import io as _io

    from PIL import Image

    from caffeish.formats.datum import LmdbReader, datum_array

    database, key = parse_record_ref(ref)
    readers = {} if readers is None else readers
    ref = os.fspath(ref)
    try:
        if database not in readers:
            readers[database] = LmdbReader(database)
        datum = readers[database].get(key)
        if datum is None:
            raise CaffeishError(f"{ref}: no such record in {database}")
        if datum.encoded:
            img = Image.open(_io.BytesIO(bytes(datum.data)))
            img.load()
            return img
        arr = datum_array(datum, None, ref)
    except CaffeishError as e:
        raise CaffeishError(image_error(ref, e)) from None
    except Exception as e:  # Pillow: undecodable bytes
        raise CaffeishError(f"{ref}: cannot read as an image: {e}") from None
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.shape[0] not in (1, 3, 4):
        raise CaffeishError(f"{ref}: a Datum of {arr.shape[0]} channels is not an image")
    if arr.shape[0] == 1:
        return Image.fromarray(np.ascontiguousarray(arr[0]), "L")
    return Image.fromarray(np.ascontiguousarray(arr[2::-1].transpose(1, 2, 0)), "RGB")


def _databases(folder):
    """[(LMDB database, name prefix)] when `folder` is an LMDB database, a DIGITS stage folder (its
    features) or a dataset folder (each stage's), else None (an ordinary folder)."""
    def stage(path):
        if os.path.isfile(os.path.join(path, RECORD_DB)):
            return path
        features = os.path.join(path, "features")
        return features if os.path.isfile(os.path.join(features, RECORD_DB)) else None

    if stage(folder):
        return [(stage(folder), "")]
    found = [(stage(os.path.join(folder, s)), s) for s in DATASET_STAGES if stage(os.path.join(folder, s))]
    return found or None


def _dataset_images(databases):
    """[(record_ref, NAME)] of every record, in key order; keys that cannot name a file are notes."""
    from caffeish.formats.datum import LmdbReader

    images, notes = [], []
    for db, prefix in databases:
        with LmdbReader(db) as reader:
            for key in reader.keys():
                ref = record_ref(db, key)
                if ref is None:
                    notes.append(f"skipped {reader.where(key)}: its key cannot name an output file")
                    continue
                name = os.path.basename(ref)
                images.append((ref, f"{prefix}/{name}" if prefix else name))
    return images, notes


def list_file_paths(path):
    """The image paths of a list file: one a line, relative ones against the list file's folder, blank
    lines and '#' comments skipped."""
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise CaffeishError(f"{path}: no such list file") from None
    except OSError as e:
        raise CaffeishError(f"{path}: cannot read the list file: {e.strerror or e}") from None
    base = os.path.dirname(path)
    entries = [line.strip() for line in lines]
    return [e if os.path.isabs(e) else os.path.normpath(os.path.join(base, e))
            for e in entries if e and not e.startswith("#")]


def find_images(paths, exclude=()):
    """(images, notes): every image named or found (recursively, sorted) in folders.

    Besides image files and folders: "@LIST.txt" (unless a file of that very name exists) is a list
    file (`list_file_paths`), its lines taken like arguments (named by their base name; a missing one
    fails when decoded, as a missing image does); an LMDB database, a DIGITS stage folder (its features)
    or a dataset folder made by `caffeish dataset` (each of train_db, val_db, test_db, in a subfolder
    of that name) gives one image per record, in key order, named by its escaped key (`record_name`)
    and read from the database when decoded (`record_ref`).

    images: [(path, name relative to its folder argument)]; a named file is
    taken whatever its extension (a bad one fails when decoded); files in
    folders without an image extension are skipped, each with a note; hidden
    files and folders are ignored (the staging folders `segment` writes,
    `.NAME.*.tmp`, among them).  Below a folder argument, the folders in
    `exclude` (segment's OUTDIR) and the folders an earlier `segment` wrote
    (they hold OUTPUT_MARKER) are not searched, each with a note, so that
    pictures written inside an input folder are never taken for photos.
    """
    from caffeish.formats.images import is_image_name

    skip = {os.path.realpath(os.fspath(e)) for e in exclude}
    images, notes = [], []
    expanded = []
    for p in paths:
        p = os.fspath(p)
        if p.startswith(LIST_PREFIX) and len(p) > 1 and not os.path.lexists(p):
            expanded += list_file_paths(p[len(LIST_PREFIX):])
        else:
            expanded.append(p)
    for p in expanded:
        if not os.path.isdir(p):
            images.append((p, os.path.basename(p)))
            continue
        databases = _databases(p)
        if databases is not None:
            found, skipped = _dataset_images(databases)
            images += found
            notes += skipped
            continue
        for root, dirs, files in os.walk(p):
            kept = []
            for d in sorted(dirs):
                if d.startswith("."):
                    continue
                sub = os.path.join(root, d)
                if skip and os.path.realpath(sub) in skip:
                    notes.append(f"skipped {sub}: it is the output folder")
                    continue
                if os.path.exists(os.path.join(sub, OUTPUT_MARKER)):
                    notes.append(f"skipped {sub}: it holds the pictures of an earlier caffeish segment")
                    continue
                kept.append(d)
            dirs[:] = kept
            for f in sorted(files):
                if f.startswith("."):
                    continue
                full = os.path.join(root, f)
                if is_image_name(f):
                    images.append((full, os.path.relpath(full, p)))
                else:
                    notes.append(f"skipped {full}: not an image file")
    return images, notes
