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
"""
from contextlib import contextmanager
from fractions import Fraction
from typing import NamedTuple, Tuple

from caffeish.errors import ShapeError
from caffeish.schema import pb


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


def pool_params(pool_param, in_h, in_w):
    """Parse a PoolingParameter for an in_h x in_w input, with Caffe's checks.

    kernel: kernel_size or kernel_h and kernel_w; global_pooling takes the input
    size instead and refuses any kernel, pad or stride other than 0/1.  pad: pad or
    pad_h and pad_w; stride: stride (default 1) or stride_h and stride_w.  Non-zero
    padding requires pad < kernel and MAX or AVE pooling.
    """
    pp = pool_param
    has = pp.HasField
    if pp.global_pooling:
        if has("kernel_size") or has("kernel_h") or has("kernel_w"):
            raise ShapeError("global_pooling takes the kernel from the bottom; do not give a kernel size")
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
    padded = pad != (0, 0)
    if padded:
        if pp.pool not in (pb.PoolingParameter.MAX, pb.PoolingParameter.AVE):
            method = pb.PoolingParameter.PoolMethod.Name(pp.pool)
            raise ShapeError(f"padding is implemented only for MAX and AVE pooling, not {method}")
        for axis, p, k in (("h", pad[0], kernel[0]), ("w", pad[1], kernel[1])):
            if p >= k:
                raise ShapeError(f"pad_{axis} {p} must be smaller than kernel_{axis} {k}")

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
    axis = crop_param.axis
    if not -ndim <= axis < ndim:
        raise ShapeError(f"crop axis {axis} out of range for a {ndim}-axis data bottom")
    start = axis % ndim
    given = list(crop_param.offset)
    n_cropped = ndim - start
    if len(given) > 1 and len(given) != n_cropped:
        raise ShapeError(
            f"{len(given)} offsets given for {n_cropped} cropped axes (axis {start} on); "
            "give one offset, or one per cropped axis"
        )
    if len(ref_shape) < ndim:
        raise ShapeError(
            f"the reference bottom has {len(ref_shape)} axes, fewer than the data's {ndim}"
        )
    offsets = [0] * ndim
    top = list(data_shape)
    for i in range(start, ndim):
        off = given[0] if len(given) == 1 else (given[i - start] if given else 0)
        if data_shape[i] - off < ref_shape[i]:
            raise ShapeError(
                f"crop on axis {i} is out of bounds: data size {data_shape[i]}, offset {off}, "
                f"reference size {ref_shape[i]} (needs data - offset >= reference)"
            )
        offsets[i] = off
        top[i] = ref_shape[i]
    return start, tuple(offsets), tuple(top)


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
