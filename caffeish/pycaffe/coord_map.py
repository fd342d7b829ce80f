"""pycaffe's caffe.coord_map: where one NetSpec top's coordinates land in another's, and crop().

    from caffe.coord_map import crop        # with `caffe` = caffeish
    n.score = crop(n.upscore, n.data)       # a Crop layer with the offset that aligns them

A layer maps an input coordinate x to the output coordinate a*x + b, per spatial
axis.  The formulas are caffeish.graph.geometry's (conv_map, deconv_map, crop_map,
compose, inverse, crop_offset_from_map: the ones the offsets tool, `caffeish offsets`,
uses), in exact fractions; this module reads the layers' parameters from the NetSpec
keywords and walks the graph as pycaffe does:

* Convolution, Deconvolution, Im2col read kernel_size/stride/pad/dilation (and axis,
  default 1) from `convolution_param=dict(...)` when given, else from the flat keywords;
  Pooling from `pooling_param=dict(...)` or the flat keywords; Crop its axis (default 2)
  and offset (default 0) from `crop_param` or the keywords, and maps (axis-1, 1, -offset).
  A value given once applies to every spatial axis (numpy broadcasting, as pycaffe).
* Layers that keep coordinates where they are (ReLU, Eltwise, BatchNorm, Concat over
  channels, ...) are those geometry.layer_map calls identities; a layer with no map
  (InnerProduct, Python, Reshape, ...) ends the walk there, as in pycaffe.
* coord_map_from_to(A, B) walks back from A, then from B until it meets a blob A's
  walk reached, and returns (axis, a, b) mapping A's coordinates to B's, a and b numpy
  arrays (one value per spatial axis, or one for all).  crop(A, B) adds the Crop layer.

Where pycaffe fails with a bare AssertionError, KeyError or RuntimeError, the errors
here are CaffeishErrors saying what is wrong and are still those exception types.
"""
from collections import deque
from fractions import Fraction

import numpy as np

from caffeish.errors import CaffeishError, ShapeError
from caffeish.formats.schema import pb
from caffeish.graph import geometry
from caffeish.pycaffe.net_spec import Top, _assign
from caffeish.pycaffe.net_spec import layers as L

__all__ = ["coord_map_from_to", "crop", "coord_map", "compose", "inverse", "conv_params", "crop_params",
           "PASS_THROUGH_LAYERS", "UndefinedMapException", "AxisMismatchException", "CoordMapError"]

# Layer types that always map every coordinate to itself (geometry's list).  Concat,
# Slice, Tile and ArgMax do so only along the batch and channel axes.
PASS_THROUGH_LAYERS = sorted(geometry.POINTWISE_TYPES - {"Concat", "Slice", "Tile", "ArgMax"})

# The layers whose map _layer_map reads from the NetSpec keywords; geometry.layer_map says the others'.
SPATIAL_TYPES = ("Convolution", "Pooling", "Im2col", "Deconvolution", "Crop")
CONV_FIELDS = ("kernel_size", "stride", "pad", "dilation", "kernel_h", "kernel_w", "stride_h", "stride_w",
               "pad_h", "pad_w", "axis")
POOL_FIELDS = ("kernel_size", "stride", "pad", "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h",
               "pad_w", "global_pooling", "pool")
CROP_FIELDS = ("axis", "offset")


class CoordMapError(CaffeishError):
    """Coordinates that cannot be related as asked."""


class UndefinedMapException(CoordMapError):
    """A layer with no coordinate map (InnerProduct, Python, Reshape, ...): the walk stops there."""


class AxisMismatchException(CoordMapError):
    """Two maps on different first spatial axes (a Convolution with axis 1 after one with axis 2)."""


class _ValueError(CoordMapError, ValueError):
    pass


class _KeyError(CoordMapError, KeyError):
    def __str__(self):
        return str(self.args[0]) if self.args else ""


class _RuntimeError(CoordMapError, RuntimeError):
    pass


class _AssertionError(CoordMapError, AssertionError):
    pass


# -- maps: (axis, slots) with one geometry.CoordMap per spatial axis, () for the identity ----------

IDENTITY = (None, ())


def _describe(fn):
    return f"{fn.type_name} layer"


def _broadcast(s1, s2, what):
    if not s1 or not s2:
        return s1 or ((geometry.identity(),) * len(s2)), s2 or ((geometry.identity(),) * len(s1))
    if len(s1) == len(s2):
        return s1, s2
    if len(s1) == 1:
        return s1 * len(s2), s2
    if len(s2) == 1:
        return s1, s2 * len(s1)
    raise _ValueError(f"{what}: maps over {len(s1)} and {len(s2)} spatial axes cannot be combined")


def _compose(outer, inner, what):
    """outer after inner (pycaffe's compose(outer, inner)); an axis of None takes the other's."""
    ax1, s1 = outer
    ax2, s2 = inner
    if ax1 is None:
        ax = ax2
    elif ax2 is None or ax1 == ax2:
        ax = ax1
    else:
        raise AxisMismatchException(f"{what}: the maps start at different axes ({ax1} and {ax2})")
    if not s1 and not s2:
        return ax, ()
    s1, s2 = _broadcast(s1, s2, what)
    return ax, tuple(geometry.compose(m1, m2) for m1, m2 in zip(s1, s2))


def _inverse(m):
    ax, slots = m
    return ax, tuple(geometry.inverse(s) for s in slots)


def _same(m1, m2):
    (ax1, s1), (ax2, s2) = m1, m2
    if ax1 is not None and ax2 is not None and ax1 != ax2:
        return False
    try:
        s1, s2 = _broadcast(s1, s2, "")
    except ValueError:
        return False
    return s1 == s2


def _params(fn, message_field):
    """The keywords a spatial layer's geometry comes from: message_field's dict, else the flat ones."""
    value = fn.params.get(message_field, fn.params)
    if not isinstance(value, dict):
        raise _ValueError(f"{_describe(fn)}: {message_field} must be a dict of its fields to compute "
                          f"coordinates, got {type(value).__name__}")
    return value


def _message(fn, message, source, fields):
    """A `message` instance filled from the spatial `fields` of the keyword dict `source`."""
    for k in fields:
        if k in source:
            _assign(message, k, source[k], _describe(fn), message.DESCRIPTOR.name)
    return message


def _conv_geometry(fn):
    """(axis, ConvGeometry) of a Convolution/Deconvolution/Im2col NetSpec layer."""
    source = _params(fn, "convolution_param")
    if "kernel_size" not in source and "kernel_h" not in source:
        raise _KeyError(f"{_describe(fn)}: no kernel_size to compute coordinates from")
    cp = _message(fn, pb.ConvolutionParameter(), source, CONV_FIELDS)
    if any(cp.HasField(f) for f in ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w")):
        n = 2
    else:
        n = max(1, len(cp.kernel_size), len(cp.stride), len(cp.pad), len(cp.dilation))
    try:
        return cp.axis, geometry.conv_params(cp, n)
    except ShapeError as e:
        raise ShapeError(f"{_describe(fn)}: {e}") from None


def _pool_geometry(fn):
    """(kernel, stride, pad) per slot of a Pooling layer; None for global pooling (no fixed map)."""
    source = _params(fn, "pooling_param")
    pp = _message(fn, pb.PoolingParameter(), source, POOL_FIELDS)
    if pp.global_pooling:
        return None
    if not (pp.HasField("kernel_size") or pp.HasField("kernel_h")):
        raise _KeyError(f"{_describe(fn)}: no kernel_size to compute coordinates from")
    try:
        kernel, stride, pad = geometry.pool_window(pp)
    except ShapeError as e:
        raise ShapeError(f"{_describe(fn)}: {e}") from None
    if kernel[0] == kernel[1] and stride[0] == stride[1] and pad[0] == pad[1]:
        return kernel[:1], stride[:1], pad[:1]  # one value for every spatial axis, as pycaffe
    return kernel, stride, pad


def _crop_geometry(fn):
    """(axis, offsets) of a Crop layer: axis default 2, offset default 0."""
    source = _params(fn, "crop_param")
    cp = _message(fn, pb.CropParameter(), source, CROP_FIELDS)
    return cp.axis, tuple(cp.offset) or (0,)


def _layer_map(fn):
    """The map of a spatial layer (Convolution, Deconvolution, Im2col, Pooling, Crop) as (axis, slots).

    Raises UndefinedMapException for the other layers and for global pooling.
    """
    t = fn.type_name
    if t in ("Convolution", "Im2col", "Deconvolution"):
        axis, g = _conv_geometry(fn)
        make = geometry.deconv_map if t == "Deconvolution" else geometry.conv_map
        return axis, tuple(make(k, s, p, d) for k, s, p, d in zip(g.kernel, g.stride, g.pad, g.dilation))
    if t == "Pooling":
        window = _pool_geometry(fn)
        if window is None:
            raise UndefinedMapException(f"{_describe(fn)}: global pooling maps every input to one output")
        return 1, tuple(geometry.conv_map(k, s, p) for k, s, p in zip(*window))
    if t == "Crop":
        axis, offsets = _crop_geometry(fn)
        return axis - 1, tuple(geometry.crop_map(o) for o in offsets)
    raise UndefinedMapException(f"{_describe(fn)} has no coordinate map")


def _other_layer_map(fn):
    """geometry.layer_map of a layer other than SPATIAL_TYPES: "identity" or no map ("none")."""
    param = fn.layer_parameter()
    param.bottom.extend(f"bottom{i}" for i in range(max(len(fn.inputs), 1)))
    param.top.extend(f"top{i}" for i in range(max(fn.ntop, 1)))
    try:
        return geometry.layer_map(param)
    except ShapeError as e:
        raise ShapeError(f"{_describe(fn)}: {e}") from None


def _step(top):
    """[(bottom Top, map from the bottom's coordinates to top's)] for the walk; [] where it stops."""
    fn = top.fn
    if not fn.inputs:
        return []
    t = fn.type_name
    if t in SPATIAL_TYPES:
        try:
            m = _layer_map(fn)
        except UndefinedMapException:
            return []
        # Every bottom maps alike, except the Crop's reference (bottom 1), whose coordinates are not mapped.
        return [(b, m) for b in (fn.inputs[:1] if t == "Crop" else fn.inputs)]
    lm = _other_layer_map(fn)
    if lm.kind != "identity":
        return []
    return [(fn.inputs[b], IDENTITY) for b, t_index in lm.links if t_index == top.n]


def _fmt_map(m):
    """A map as text: 'x -> 2x + 3/2' per spatial axis (one when all agree)."""
    _, slots = m
    texts = []
    for s in slots or (geometry.identity(),):
        scale = "x" if s.a == 1 else f"{s.a}x"
        texts.append(scale if s.b == 0 else f"{scale} {'+' if s.b > 0 else '-'} {abs(s.b)}")
    texts = list(dict.fromkeys(texts))
    return "x -> " + (texts[0] if len(texts) == 1 else "(" + ", ".join(texts) + ")")


class _Walk:
    """The blobs reached walking back from `start`, with the map from each one's coordinates to start's.

    A blob that two paths reach with different maps is `conflicted` (and so is everything
    above it): the net's branches disagree there, and it cannot relate coordinates.
    """

    def __init__(self, start):
        self.maps = {start: IDENTITY}
        self.via = {}
        self.order = [start]
        self.conflicted = {}
        self.queue = deque([start])

    def expand(self):
        """Process one blob; returns it, or None when the walk is over."""
        if not self.queue:
            return None
        top = self.queue.popleft()
        for bottom, m in _step(top):
            if top in self.conflicted:
                self._conflict(bottom, self.conflicted[top])
                continue
            new = _compose(self.maps[top], m, _describe(top.fn))
            if bottom not in self.maps:
                self.maps[bottom] = new
                self.via[bottom] = top.fn
                self.order.append(bottom)
                self.queue.append(bottom)
            elif bottom not in self.conflicted and not _same(self.maps[bottom], new):
                first = self.via.get(bottom)
                self._conflict(bottom, (
                    f"the branches through the {first.type_name if first else '?'} and the {top.fn.type_name} "
                    f"layers place the pixels of the {bottom.fn.type_name} top differently "
                    f"({_fmt_map(self.maps[bottom])} vs {_fmt_map(new)}, to the first top's coordinates)"))
        return top

    def _conflict(self, blob, why):
        if blob not in self.conflicted:
            self.conflicted[blob] = why
            if blob not in self.maps:
                self.maps[blob] = IDENTITY  # never used: a conflicted blob gives no answer
                self.order.append(blob)
            self.queue.append(blob)

    def run(self):
        while self.expand() is not None:
            pass
        return self


def _check_top(what, top):
    if not isinstance(top, Top):
        raise TypeError(f"{what} must be a Top (the result of a caffe.layers call), got {type(top).__name__}")


def _exact_from_to(top_from, top_to):
    """(axis, slots): the exact map from top_from's coordinates to top_to's."""
    _check_top("top_from", top_from)
    _check_top("top_to", top_to)
    back = _Walk(top_from).run()
    ahead = _Walk(top_to)
    blocked = None
    while True:
        top = ahead.expand()
        if top is None:
            break
        if top not in back.maps:
            continue
        why = back.conflicted.get(top) or ahead.conflicted.get(top)
        if why:
            blocked = blocked or why
            continue
        return _compose(ahead.maps[top], _inverse(back.maps[top]), "coord_map_from_to")
    if blocked:
        raise _RuntimeError(f"Could not compute map between tops: {blocked}")
    raise _RuntimeError("Could not compute map between tops; are they connected by spatial layers? "
                        "(no blob upstream of both is reached through layers with coordinate maps)")


# -- the public face (pycaffe's functions) ---------------------------------------------------------------


def _as_arrays(slots):
    return (np.array([float(m.a) for m in slots]), np.array([float(m.b) for m in slots]))


def _public(m):
    ax, slots = m
    if not slots:
        return ax, 1.0, 0.0
    a, b = _as_arrays(slots)
    return ax, a, b


def _exact(value):
    """A float, int or Fraction (or a numpy scalar) as an exact Fraction."""
    if isinstance(value, (int, np.integer, Fraction)):
        return Fraction(int(value)) if not isinstance(value, Fraction) else value
    return Fraction(float(value))


def _private(m):
    """A public (axis, a, b) map as (axis, slots, scalar)."""
    ax, a, b = m
    scalar = np.ndim(a) == 0 and np.ndim(b) == 0
    a, b = np.broadcast_arrays(np.atleast_1d(a), np.atleast_1d(b))
    return ax, tuple(geometry.CoordMap(_exact(x), _exact(y)) for x, y in zip(a.ravel(), b.ravel())), scalar


def _public_like(ax, slots, scalar):
    if scalar and len(slots) == 1:
        return ax, float(slots[0].a), float(slots[0].b)
    a, b = _as_arrays(slots)
    return ax, a, b


def coord_map(fn):
    """A layer's map (axis, a, b): output coordinate = a * input coordinate + b.

    (None, 1, 0) for layers that keep coordinates; raises UndefinedMapException for
    layers that have none.  `fn` is a NetSpec layer (a Top's .fn).
    """
    if fn.type_name in SPATIAL_TYPES:
        return _public(_layer_map(fn))
    if _other_layer_map(fn).kind == "identity":
        return None, 1, 0
    raise UndefinedMapException(f"{_describe(fn)} has no coordinate map")


def compose(base_map, next_map):
    """base_map after next_map: (axis, a1*a2, a1*b2 + b1), through geometry.compose."""
    ax1, s1, scalar1 = _private(base_map)
    ax2, s2, scalar2 = _private(next_map)
    ax, slots = _compose((ax1, s1), (ax2, s2), "compose")
    return _public_like(ax, slots, scalar1 and scalar2)


def inverse(coord_map):
    """The map back: (axis, 1/a, -b/a), through geometry.inverse."""
    ax, slots, scalar = _private(coord_map)
    return _public_like(ax, _inverse((ax, slots))[1], scalar)


def conv_params(fn):
    """(axis, stride, kernel extent, pad) of a Convolution/Deconvolution/Im2col/Pooling layer, as arrays."""
    if fn.type_name == "Pooling":
        window = _pool_geometry(fn)
        if window is None:
            raise UndefinedMapException(f"{_describe(fn)}: global pooling has no fixed window")
        kernel, stride, pad = window
        return 1, np.array(stride), np.array(kernel), np.array(pad)
    axis, g = _conv_geometry(fn)
    return axis, np.array(g.stride), np.array(g.extents()), np.array(g.pad)


def crop_params(fn):
    """(axis, offset array) of a Crop layer, with Caffe's defaults (axis 2, offset 0)."""
    axis, offsets = _crop_geometry(fn)
    return axis, np.array(offsets)


def coord_map_from_to(top_from, top_to):
    """(axis, a, b) mapping top_from's coordinates to top_to's: x_to = a * x_from + b.

    a and b are numpy arrays, one value per spatial axis (one value for all when the
    layers give each parameter once).  Raises RuntimeError (a CoordMapError) when no
    blob upstream of both is reached through layers with coordinate maps.
    """
    return _public(_exact_from_to(top_from, top_to))


def crop(top_from, top_to):
    """A Crop layer that crops top_from to top_to's size where their coordinates meet.

    The map from top_from to top_to must keep the scale (a = 1) and shift by a whole,
    non-positive b; the Crop's axis is the map's axis + 1 and its offsets are -b.
    """
    ax, slots = _exact_from_to(top_from, top_to)
    what = f"crop({_describe(top_from.fn)} top, {_describe(top_to.fn)} top)"
    offsets = []
    for m in slots:
        try:
            offsets.append(geometry.crop_offset_from_map(m))
        except ShapeError as e:
            raise _AssertionError(f"{what}: {e}") from None
    if ax is None:
        ax = 1  # only layers that keep coordinates: crop the spatial axes by 0
    return L.Crop(top_from, top_to, crop_param=dict(axis=ax + 1, offset=offsets or [0]))
