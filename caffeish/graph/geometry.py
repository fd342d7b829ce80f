"""Spatial arithmetic of Convolution, Deconvolution, Im2col, Pooling, SPP and Crop.

This is the one place that knows how Caffe sizes windows: shape inference, the
crop-offset tool and the kernels all call it.  Functions raise ShapeError with a
message that does not name the layer; a layer wraps the call in
`reported_by(self)` so that the message gains the layer's name and type.

Caffe's rules, in short (see semantics.md sections 3, 7 and 8):

* Convolution: out = (in + 2*pad - extent) / stride + 1 with C's truncating
  division (the numerator may be negative), extent = dilation*(kernel-1) + 1.
* Deconvolution: out = stride*(in - 1) + extent - 2*pad.
* Pooling: out = ceil((in + 2*pad - kernel) / stride) + 1 (round_mode CEIL, the
  default; FLOOR uses floor).  When any pad is non-zero, an output whose last
  window would start at or beyond in + pad is dropped (the clip rule).
* Crop: top[i] = data[i + offset_i] for the axes from `axis` on.

Coordinate maps (pycaffe's coord_map.py, exact with Fractions): an input
coordinate x lands at a*x + b in the output.  `layer_map` gives a layer's map
per blob axis; `receptive_field_step` the receptive field and effective stride.
"""
import math
from contextlib import contextmanager
from fractions import Fraction
from typing import NamedTuple, Tuple

from caffeish.errors import ShapeError
from caffeish.formats.schema import pb


@contextmanager
def reported_by(layer):
    """Re-raise a ShapeError from the block as `layer.error(message)` (names the layer)."""
    try:
        yield
    except ShapeError as exc:
        raise layer.error(str(exc)) from None


# -- sizes ------------------------------------------------------------------------


def effective_kernel(kernel, dilation=1):
    """The extent a dilated kernel covers: dilation*(kernel-1) + 1."""
    return dilation * (kernel - 1) + 1


def _c_div(num, den):
    """C integer division: the quotient truncated toward zero."""
    q = abs(num) // abs(den)
    return q if (num >= 0) == (den > 0) else -q


def conv_out(size, kernel, stride=1, pad=0, dilation=1):
    """Convolution (and Im2col) output size along one axis, Caffe's formula.

    (size + 2*pad - extent) / stride + 1, truncating toward zero, so in 2, k 3,
    s 2 gives 1 while in 2, k 3, s 1 gives 0.  The result can be negative; the
    caller decides whether that is an error (see `conv_output_shape`).
    """
    if stride <= 0:
        raise ShapeError(f"stride must be positive, got {stride}")
    return _c_div(size + 2 * pad - effective_kernel(kernel, dilation), stride) + 1


def deconv_out(size, kernel, stride=1, pad=0, dilation=1):
    """Deconvolution output size along one axis: stride*(size-1) + extent - 2*pad."""
    return stride * (size - 1) + effective_kernel(kernel, dilation) - 2 * pad


def pool_out(size, kernel, stride=1, pad=0, ceil=True, clip=None):
    """Pooling output size along one axis.

    ceil(size + 2*pad - kernel) / stride) + 1 for round_mode CEIL (floor for FLOOR).
    Caffe then drops the last output if its window would start at or beyond
    size + pad, but only when the layer has any non-zero pad.  `clip` says whether
    that rule applies; by default it does when this axis' pad is non-zero.  A 2-D
    layer with pad_h != 0 and pad_w == 0 applies it to both axes: pass clip=True.
    """
    if stride <= 0:
        raise ShapeError(f"stride must be positive, got {stride}")
    if clip is None:
        clip = pad != 0
    span = size + 2 * pad - kernel
    steps = -((-span) // stride) if ceil else span // stride
    out = steps + 1
    if clip and (out - 1) * stride >= size + pad:
        out -= 1
    return out


# -- ConvolutionParameter -------------------------------------------------------------


class ConvGeometry(NamedTuple):
    """Per spatial axis kernel, stride, pad and dilation of a ConvolutionParameter."""

    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    pad: Tuple[int, ...]
    dilation: Tuple[int, ...]

    def extents(self):
        return tuple(effective_kernel(k, d) for k, d in zip(self.kernel, self.dilation))


def _per_axis(values, n_axes, name, default):
    """Caffe's repeated-field rule: 0 values -> default, 1 -> every axis, n_axes -> one each."""
    values = list(values)
    if not values:
        if default is None and n_axes > 0:
            raise ShapeError(f"{name} is required (give it once, or once per spatial axis)")
        return (default,) * n_axes
    if len(values) == 1:
        return (values[0],) * n_axes
    if len(values) == n_axes:
        return tuple(values)
    raise ShapeError(
        f"{name} must be given once or once per spatial axis: given {len(values)} times "
        f"for {n_axes} spatial axes"
    )


def _h_w_pair(param, repeated, base, n_axes):
    """The (base_h, base_w) form, or None when neither is set.  An unset one reads 0."""
    h, w = f"{base}_h", f"{base}_w"
    if not (param.HasField(h) or param.HasField(w)):
        return None
    if n_axes != 2:
        raise ShapeError(
            f"{h}/{w} can only be used with 2 spatial axes, the bottom has {n_axes}; "
            f"use the repeated {repeated} field"
        )
    if len(getattr(param, repeated)):
        raise ShapeError(f"give either {repeated} or {h}/{w}, not both")
    return (getattr(param, h), getattr(param, w))


def conv_params(conv_param, num_spatial_axes):
    """Parse a ConvolutionParameter into a ConvGeometry for `num_spatial_axes` axes.

    Follows Caffe's BaseConvolutionLayer setup: kernel_size/stride/pad/dilation are
    repeated (0 values: default, 1 value: all axes, N values: one per axis);
    kernel_h/w, stride_h/w, pad_h/w only for 2 spatial axes and never with the
    repeated form; kernel 0 is an error.  Stride 0 is refused too (Caffe would
    divide by zero).  Dilation 0 is accepted, as Caffe does (extent 1).
    """
    n = num_spatial_axes
    cp = conv_param
    kernel = _h_w_pair(cp, "kernel_size", "kernel", n)
    kernel_pair = kernel is not None
    if kernel is None:
        kernel = _per_axis(cp.kernel_size, n, "kernel_size", None)
    stride = _h_w_pair(cp, "stride", "stride", n) or _per_axis(cp.stride, n, "stride", 1)
    pad = _h_w_pair(cp, "pad", "pad", n) or _per_axis(cp.pad, n, "pad", 0)
    dilation = _per_axis(cp.dilation, n, "dilation", 1)
    for i, k in enumerate(kernel):
        if k <= 0:
            hint = " (kernel_h and kernel_w must both be set)" if kernel_pair else ""
            raise ShapeError(f"kernel size must be positive, got {k} on spatial axis {i}{hint}")
    for i, s in enumerate(stride):
        if s <= 0:
            raise ShapeError(
                f"stride must be positive, got {s} on spatial axis {i} "
                "(stride_h and stride_w must both be set; Caffe would divide by zero)"
            )
    return ConvGeometry(tuple(kernel), tuple(stride), tuple(pad), tuple(dilation))


def conv_output_shape(in_sizes, geom):
    """Convolution/Im2col output sizes for the spatial input sizes; negative is an error."""
    return _output_shape(conv_out, in_sizes, geom)


def deconv_output_shape(in_sizes, geom):
    """Deconvolution output sizes for the spatial input sizes; negative is an error."""
    return _output_shape(deconv_out, in_sizes, geom)


def conv_tap_range(q, pad, stride, dil, size_in, p0, p1):
    """A convolution's output positions p in [p0, p1) whose tap q lands in the input [0, size_in):
    (lo, hi, r), r the input position of p = lo.

    r = p*stride - pad + q*dil; the range is empty (lo >= hi) when none does.
    """
    off = q * dil - pad
    lo = max(p0, -(off // stride))  # ceil(-off / stride)
    last = size_in - 1 - off
    hi = min(p1, last // stride + 1) if last >= 0 else p0
    return lo, hi, lo * stride + off


def _output_shape(size_fn, in_sizes, geom):
    out = tuple(
        size_fn(n, k, s, p, d)
        for n, k, s, p, d in zip(in_sizes, geom.kernel, geom.stride, geom.pad, geom.dilation)
    )
    _check_non_negative(out, in_sizes, geom.extents(), geom.pad)
    return out


def _check_non_negative(out, in_sizes, extents, pads):
    for i, o in enumerate(out):
        if o < 0:
            raise ShapeError(
                f"output size would be {o} on spatial axis {i} (input {in_sizes[i]}, "
                f"kernel extent {extents[i]}, pad {pads[i]})"
            )


# -- PoolingParameter -------------------------------------------------------------------


class PoolGeometry(NamedTuple):
    """(h, w) kernel, stride, pad and output size of a Pooling layer on an H x W input."""

    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    pad: Tuple[int, int]
    global_pooling: bool
    ceil: bool
    out: Tuple[int, int]


def pool_window(pool_param, in_h=None, in_w=None):
    """The (kernel, stride, pad) (h, w) pairs of a PoolingParameter, with Caffe's checks.

    kernel: kernel_size or kernel_h and kernel_w; global_pooling takes the input
    size instead (so in_h and in_w are needed then) and refuses any kernel, pad or
    stride other than 0/1.  pad: pad or pad_h and pad_w; stride: stride (default
    1) or stride_h and stride_w.  Non-zero padding requires pad < kernel and MAX
    or AVE pooling.  The window does not depend on the input size otherwise.
    """
    pp = pool_param
    has = pp.HasField
    if pp.global_pooling:
        if has("kernel_size") or has("kernel_h") or has("kernel_w"):
            raise ShapeError("global_pooling takes the kernel from the bottom; do not give a kernel size")
        if in_h is None or in_w is None:
            raise ShapeError("global_pooling's window is the whole input, whose size is not known here")
        kernel = (in_h, in_w)
    else:
        if has("kernel_size") and has("kernel_h") and has("kernel_w"):
            raise ShapeError("give the kernel as kernel_size or as kernel_h and kernel_w, not both")
        if has("kernel_size"):
            kernel = (pp.kernel_size, pp.kernel_size)
        elif has("kernel_h") and has("kernel_w"):
            kernel = (pp.kernel_h, pp.kernel_w)
        else:
            raise ShapeError("a kernel size is required: kernel_size, or both kernel_h and kernel_w")
    if kernel[0] <= 0 or kernel[1] <= 0:
        raise ShapeError(f"kernel size must be positive, got {kernel[0]}x{kernel[1]}")

    if has("pad_h") or has("pad_w"):
        if has("pad") or not (has("pad_h") and has("pad_w")):
            raise ShapeError("give the padding as pad or as both pad_h and pad_w")
        pad = (pp.pad_h, pp.pad_w)
    else:
        pad = (pp.pad, pp.pad)
    if has("stride_h") or has("stride_w"):
        if has("stride") or not (has("stride_h") and has("stride_w")):
            raise ShapeError("give the stride as stride or as both stride_h and stride_w")
        stride = (pp.stride_h, pp.stride_w)
    else:
        stride = (pp.stride, pp.stride)
    if stride[0] <= 0 or stride[1] <= 0:
        raise ShapeError(f"stride must be positive, got {stride[0]}x{stride[1]} (Caffe would divide by zero)")

    if pp.global_pooling and (pad != (0, 0) or stride != (1, 1)):
        raise ShapeError(f"global_pooling needs pad 0 and stride 1, got pad {pad} and stride {stride}")
    if pad != (0, 0):
        if pp.pool not in (pb.PoolingParameter.MAX, pb.PoolingParameter.AVE):
            method = pb.PoolingParameter.PoolMethod.Name(pp.pool)
            raise ShapeError(f"padding is implemented only for MAX and AVE pooling, not {method}")
        for axis, p, k in (("h", pad[0], kernel[0]), ("w", pad[1], kernel[1])):
            if p >= k:
                raise ShapeError(f"pad_{axis} {p} must be smaller than kernel_{axis} {k}")
    return kernel, stride, pad


def pool_params(pool_param, in_h, in_w):
    """Parse a PoolingParameter for an in_h x in_w input, with Caffe's checks.

    The window comes from `pool_window`; the output size follows round_mode (CEIL
    by default) and Caffe's clip rule, which applies when any pad is non-zero.
    """
    pp = pool_param
    kernel, stride, pad = pool_window(pp, in_h, in_w)
    padded = pad != (0, 0)
    ceil = pp.round_mode == pb.PoolingParameter.CEIL
    out = tuple(
        pool_out(n, k, s, p, ceil=ceil, clip=padded)
        for n, k, s, p in zip((in_h, in_w), kernel, stride, pad)
    )
    for axis, o, n in (("height", out[0], in_h), ("width", out[1], in_w)):
        if o < 0:
            raise ShapeError(f"pooled {axis} would be {o}: the kernel does not fit the padded input ({n})")
    return PoolGeometry(kernel, stride, pad, bool(pp.global_pooling), ceil, out)


def spp_pool_param(level, in_h, in_w, pool=pb.PoolingParameter.MAX):
    """The PoolingParameter Caffe's SPP layer uses for pyramid level `level`.

    The level has 2**level bins per axis: kernel = stride = ceil(in / bins), and
    pad = (kernel*bins - in + 1) // 2 so the windows cover the whole input.
    """
    bins = 2 ** level
    pp = pb.PoolingParameter(pool=pool)
    kernel_h = -(-in_h // bins)
    kernel_w = -(-in_w // bins)
    pp.kernel_h, pp.kernel_w = kernel_h, kernel_w
    pp.stride_h, pp.stride_w = kernel_h, kernel_w
    pp.pad_h = (kernel_h * bins - in_h + 1) // 2
    pp.pad_w = (kernel_w * bins - in_w + 1) // 2
    return pp


# -- CropParameter ------------------------------------------------------------------------


def crop_offsets(crop_param, data_shape, ref_shape):
    """Caffe's Crop: (start_axis, offsets for every axis, top shape).

    Axes before start_axis keep the data's size (the reference is not checked
    there) and have offset 0; from start_axis on the top takes the reference's
    size.  No offset means 0, one offset applies to every cropped axis, and more
    than one must give exactly one per cropped axis.
    """
    ndim = len(data_shape)
    if not -ndim <= crop_param.axis < ndim:
        raise ShapeError(f"crop axis {crop_param.axis} out of range for a {ndim}-axis data bottom")
    start, written = crop_axes(crop_param, ndim)
    if len(ref_shape) < ndim:
        raise ShapeError(
            f"the reference bottom has {len(ref_shape)} axes, fewer than the data's {ndim}"
        )
    offsets = [0] * ndim
    top = list(data_shape)
    for i in range(start, ndim):
        off = written[i]
        if data_shape[i] - off < ref_shape[i]:
            raise ShapeError(
                f"crop on axis {i} is out of bounds: data size {data_shape[i]}, offset {off}, "
                f"reference size {ref_shape[i]} (needs data - offset >= reference)"
            )
        offsets[i] = off
        top[i] = ref_shape[i]
    return start, tuple(offsets), tuple(top)


def center_crop_offsets(in_hw, out_hw):
    """(top, left) of the centre out_h x out_w window of an in_h x in_w image.

    Caffe's DataTransformer at TEST: h_off = (H - crop_h) / 2, w_off = (W - crop_w) / 2
    in integer division (rounded down).  pycaffe's Classifier and oversample
    take int(H / 2 - crop_h / 2), the same number for a crop that fits; the
    mean image is cropped with the image's window.  A window larger than the
    image is a ShapeError.
    """
    in_h, in_w = (int(d) for d in in_hw)
    out_h, out_w = (int(d) for d in out_hw)
    if out_h > in_h or out_w > in_w:
        raise ShapeError(f"cannot crop {out_h}x{out_w} out of {in_h}x{in_w}")
    return (in_h - out_h) // 2, (in_w - out_w) // 2


# -- coordinate maps (pycaffe coord_map.py, exact arithmetic) --------------------------------


class CoordMap(NamedTuple):
    """One spatial axis' map from input to output coordinates: x_out = a*x_in + b."""

    a: Fraction
    b: Fraction

    def __call__(self, x):
        return self.a * x + self.b


def _map(a, b):
    return CoordMap(Fraction(a), Fraction(b))


def identity():
    """The pass-through map (ReLU, BatchNorm, Eltwise, Dropout, ...)."""
    return _map(1, 0)


def conv_map(kernel, stride=1, pad=0, dilation=1):
    """Convolution, Pooling and Im2col: (1/s, (pad - (ext-1)/2) / s)."""
    ext = effective_kernel(kernel, dilation)
    return _map(Fraction(1, stride), (Fraction(pad) - Fraction(ext - 1, 2)) / stride)


def deconv_map(kernel, stride=1, pad=0, dilation=1):
    """Deconvolution: (s, (ext-1)/2 - pad)."""
    ext = effective_kernel(kernel, dilation)
    return _map(stride, Fraction(ext - 1, 2) - pad)


def crop_map(offset):
    """Crop: (1, -offset)."""
    return _map(1, -offset)


def compose(m1, m2):
    """m1 after m2: x -> m1(m2(x)) = (a1*a2, a1*b2 + b1)."""
    return _map(m1.a * m2.a, m1.a * m2.b + m1.b)


def inverse(m):
    """The map back: (1/a, -b/a)."""
    return _map(1 / m.a, -m.b / m.a)


def crop_offset_from_map(m):
    """The Crop offset for a map from the data's to the reference's coordinates.

    pycaffe's crop(): the scale must be 1, the offset b <= 0 and an integer;
    the crop offset is -b.
    """
    if m.a != 1:
        raise ShapeError(f"scale mismatch: the map scales coordinates by {m.a}, cannot crop")
    if m.b > 0:
        raise ShapeError(f"cannot crop a negative offset ({-m.b})")
    if m.b.denominator != 1:
        raise ShapeError(f"the crop offset {-m.b} is not an integer")
    return int(-m.b)


# -- per-layer coordinate maps (the offsets tool, `caffeish offsets`) -------------------------
#
# A layer moves the coordinates of some bottoms to some tops.  `layer_map` says
# how, per absolute blob axis: the axes it does not name are left unchanged.

# Layers that keep every spatial coordinate where it is (pycaffe's pass-through
# list, plus the other BVLC layers that act per position or per channel).
POINTWISE_TYPES = frozenset({
    "AbsVal", "BatchNorm", "Bias", "BNLL", "Clip", "Dropout", "Eltwise", "ELU", "Exp", "Log",
    "LRN", "MVN", "Power", "PReLU", "ReLU", "Scale", "Sigmoid", "Softmax", "Split", "Swish",
    "TanH", "Threshold", "BatchReindex", "Filter", "Concat", "Slice", "Tile", "ArgMax",
})

# Why some layer types have no coordinate map (anything else unknown gets a generic line).
NO_MAP_REASONS = {
    "InnerProduct": "InnerProduct flattens the axes from its axis on into one vector",
    "Reshape": "Reshape rearranges the axes",
    "Flatten": "Flatten merges the axes into one",
    "Python": "a Python layer's effect on coordinates is unknown",
    "SPP": "SPP pools to a fixed grid whatever the input size",
    "Reduction": "Reduction collapses the axes from its axis on",
    "Embed": "Embed replaces values by vectors",
}


class LayerMap(NamedTuple):
    """How a layer moves coordinates, per absolute blob axis.

    kind: "window" (Convolution, Pooling, Im2col), "deconv", "crop", "identity",
    "source" (no bottoms: Input, Data, bottomless Python, ...) or "none" (no
    defined map; `reason` says why).  links: (bottom index, top index) pairs the
    map connects.  axes: the blob axes that `maps` (one CoordMap each) act on;
    kernel/stride/pad/dilation are per axis, for windows and deconvolutions.
    """

    kind: str
    links: Tuple[Tuple[int, int], ...] = ()
    axes: Tuple[int, ...] = ()
    maps: Tuple[CoordMap, ...] = ()
    kernel: Tuple[int, ...] = ()
    stride: Tuple[int, ...] = ()
    pad: Tuple[int, ...] = ()
    dilation: Tuple[int, ...] = ()
    reason: str = ""


def _canonical(axis, ndim):
    if not -ndim <= axis < ndim:
        raise ShapeError(f"axis {axis} out of range for a {ndim}-axis blob")
    return axis % ndim


def conv_spatial_axes(conv_param):
    """The number of spatial axes a ConvolutionParameter implies when no shape is known.

    kernel_h/w (or stride_h/w, pad_h/w) mean 2; a repeated field given n > 1 times
    means n; otherwise 2 (a 4-D blob).
    """
    cp = conv_param
    if any(cp.HasField(f) for f in ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w")):
        return 2
    counts = [len(cp.kernel_size), len(cp.stride), len(cp.pad), len(cp.dilation)]
    return max([c for c in counts if c > 1], default=2)


def _window_layer_map(layer, bottom_shape, deconv):
    cp = layer.convolution_param
    if bottom_shape is not None:
        axis = _canonical(cp.axis, len(bottom_shape))
        n = len(bottom_shape) - axis - 1
    else:
        n = conv_spatial_axes(cp)
        axis = cp.axis if cp.axis >= 0 else cp.axis % (n + 2)
    geom = conv_params(cp, n)
    make = deconv_map if deconv else conv_map
    maps = tuple(make(k, s, p, d) for k, s, p, d in zip(geom.kernel, geom.stride, geom.pad, geom.dilation))
    links = tuple((j, j) for j in range(min(len(layer.bottom), len(layer.top))))
    return LayerMap("deconv" if deconv else "window", links, tuple(range(axis + 1, axis + 1 + n)), maps,
                    geom.kernel, geom.stride, geom.pad, geom.dilation)


def crop_axes(crop_param, ndim):
    """(first cropped axis, {axis: written offset}) of a Crop on an ndim-axis data blob."""
    start = _canonical(crop_param.axis, ndim)
    given = list(crop_param.offset)
    n = ndim - start
    if len(given) > 1 and len(given) != n:
        raise ShapeError(
            f"{len(given)} offsets given for {n} cropped axes (axis {start} on); "
            "give one offset, or one per cropped axis"
        )
    if not given:
        given = [0]
    if len(given) == 1:
        given = given * n
    return start, {start + i: off for i, off in enumerate(given)}


def crop_layer_map(crop_param, ndim, offsets=None):
    """The Crop's map on the spatial axes (2 on) it crops: (1, -offset) each.

    offsets: {axis: offset} to use instead of the written ones (the tool passes the
    offsets it computed).  Axes 0 and 1 (batch, channels) have no coordinate map.
    """
    start, written = crop_axes(crop_param, ndim)
    offsets = written if offsets is None else {**written, **offsets}
    axes = tuple(a for a in sorted(offsets) if a >= 2)
    return LayerMap("crop", ((0, 0),), axes, tuple(crop_map(offsets[a]) for a in axes))


def _channel_like(axis, ndim):
    """True when an axis parameter names the batch or channel axis (a spatial identity)."""
    return _canonical(axis, ndim) < 2


def layer_map(layer, bottom_shapes=None):
    """The LayerMap of a LayerParameter; bottom_shapes (optional) make axes exact.

    Without shapes, blobs are taken to be 4-D unless a ConvolutionParameter or a
    Crop's per-axis offsets say otherwise.  Raises ShapeError for bad parameters.
    """
    t = layer.type
    nb, nt = len(layer.bottom), len(layer.top)
    shapes = list(bottom_shapes) if bottom_shapes else []
    first = shapes[0] if shapes else None
    ndim = len(first) if first is not None else 4
    ident = LayerMap("identity", tuple((j, j) for j in range(min(nb, nt))))
    if nb == 0:
        return LayerMap("source")
    if t in ("Convolution", "Im2col"):
        return _window_layer_map(layer, first, deconv=False)
    if t == "Deconvolution":
        return _window_layer_map(layer, first, deconv=True)
    if t == "Pooling":
        hw = tuple(first[2:4]) if first is not None and len(first) == 4 else (None, None)
        if layer.pooling_param.global_pooling and hw[0] is None:
            return LayerMap("none", reason="global pooling's window is the whole input, whose size is "
                                           "unknown here (give the input shapes)")
        kernel, stride, pad = pool_window(layer.pooling_param, *hw)
        maps = tuple(conv_map(k, s, p) for k, s, p in zip(kernel, stride, pad))
        return LayerMap("window", ((0, 0),), (2, 3), maps, kernel, stride, pad, (1, 1))
    if t == "Crop":
        cp = layer.crop_param
        if first is None and len(cp.offset) > 1:
            ndim = _canonical(cp.axis, 4) + len(cp.offset) if cp.axis >= 0 else 4
        return crop_layer_map(cp, ndim)
    if t == "Eltwise":
        return LayerMap("identity", tuple((j, 0) for j in range(nb)))
    if t == "Concat":
        p = layer.concat_param
        axis = p.concat_dim if p.HasField("concat_dim") else p.axis
        if _channel_like(axis, ndim):
            return LayerMap("identity", tuple((j, 0) for j in range(nb)))
        return LayerMap("none", reason=f"Concat along axis {axis} joins blobs side by side in space")
    if t == "Slice":
        p = layer.slice_param
        axis = p.slice_dim if p.HasField("slice_dim") else p.axis
        if _channel_like(axis, ndim):
            return LayerMap("identity", tuple((0, j) for j in range(nt)))
        return LayerMap("none", reason=f"Slice along axis {axis} cuts space into pieces")
    if t == "Split":
        return LayerMap("identity", tuple((0, j) for j in range(nt)))
    if t == "Tile":
        if _channel_like(layer.tile_param.axis, ndim):
            return ident
        return LayerMap("none", reason=f"Tile along axis {layer.tile_param.axis} repeats space")
    if t == "ArgMax":
        p = layer.argmax_param
        if p.HasField("axis") and _channel_like(p.axis, ndim):
            return ident
        return LayerMap("none", reason="ArgMax without an axis (or along a spatial axis) flattens space")
    if t in ("Scale", "Bias", "BatchReindex"):
        return LayerMap("identity", ((0, 0),))
    if t == "Filter":
        return LayerMap("identity", tuple((j, j) for j in range(nb - 1)))
    if t in POINTWISE_TYPES:
        return ident
    reason = NO_MAP_REASONS.get(t) or f"{t} layers have no coordinate map"
    return LayerMap("none", reason=reason)


def receptive_field_step(rf, jump, kind, kernel=1, stride=1, dilation=1):
    """(receptive field, jump) after one layer along one axis, in start-blob pixels.

    `jump` is the distance between neighbouring outputs (the effective stride).
    A window adds (extent-1) neighbours: rf + (extent-1)*jump, jump*stride.  A
    deconvolution output gathers at most ceil(kernel*g/stride) inputs (g =
    gcd(dilation, stride)), spaced dilation/g apart: rf + (that-1)*(dilation/g)*jump,
    jump/stride.  Other layers leave both unchanged.
    """
    rf, jump = Fraction(rf), Fraction(jump)
    if kind == "window":
        return rf + (effective_kernel(kernel, dilation) - 1) * jump, jump * stride
    if kind == "deconv":
        g = math.gcd(dilation, stride)
        taps = -(-kernel * g // stride)
        return rf + (taps - 1) * Fraction(dilation, g) * jump, jump / stride
    return rf, jump
