"""Neuron (pointwise) layers: one bottom, one top of exactly the bottom's shape.

Caffe's NeuronLayer reshapes its top like its bottom and allows in-place use
(top name == bottom name), with one exception: AbsVal checks in LayerSetUp that
its top is not its bottom.  PReLU is the only neuron layer that owns a blob
(the negative slopes, one per channel or one shared).

Backward (../shared/caffe/training.md 10.4) follows Caffe's formulas and, in place
(the layer's param names its top as its bottom; then the data handed to backward
is the output), Caffe's own numbers (9.3): ReLU, ELU, Sigmoid, TanH, Exp, Swish,
Dropout and PReLU are exact (Swish keeps sigmoid(beta x), PReLU its bottom, Dropout
its mask, from a forward run with `needs_backward`); BNLL reads y as x; Clip passes
every gradient; Power and Log overwrite dy with their local derivative g before
multiplying by it, so they give g * g.  Threshold does not backpropagate.
"""
import numpy as np

from caffeish.graph.registry import Layer, register
from caffeish.formats.schema import TRAIN, pb
from caffeish.runtime import parallel


def layer_phase(param, phase):
    """The phase a layer runs in: its own `phase` field if set, else the net's."""
    return param.phase if param.HasField("phase") else phase


def legacy_shape(layer, shape, what="bottom"):
    """Caffe's legacy (num, channels, height, width) accessors for a blob shape.

    They are fatal for blobs with more than 4 axes and read missing axes as 1.
    """
    shape = tuple(shape)
    if len(shape) > 4:
        raise layer.error(
            f"{what} has {len(shape)} axes {shape}, but this layer reads it through Caffe's "
            f"legacy num/channels/height/width accessors, which allow at most 4 axes"
        )
    return shape + (1,) * (4 - len(shape))


def f32(value):
    """A float32 scalar: Caffe computes its per-layer constants in Dtype (float)."""
    return np.float32(value)


def channel_view(xp, values, ndim, axis=1):
    """`values` (one per channel) shaped to broadcast along `axis` of an ndim-axis array."""
    return xp.reshape(values, (1,) * axis + (-1,) + (1,) * (ndim - axis - 1))


def constant_filler(value):
    """A FillerParameter of type constant with the given value."""
    return pb.FillerParameter(type="constant", value=value)


def copy_filler(filler):
    """A copy of a FillerParameter (the layer's param stays untouched)."""
    out = pb.FillerParameter()
    out.CopyFrom(filler)
    return out


def sigmoid(xp, x):
    """Caffe's CPU sigmoid: 0.5 * tanh(0.5 * x) + 0.5 (stable for any x, float32 in, float32 out)."""
    return xp.tanh(x * f32(0.5)) * f32(0.5) + f32(0.5)


def in_place(param):
    """Whether a one-bottom, one-top layer runs in place (its top is named as its bottom)."""
    return len(param.top) == 1 and len(param.bottom) >= 1 and param.top[0] == param.bottom[0]


def pass_through(layer, top_diff):
    """dx = dy: in place the diff is the top's own memory (Caffe shares it), else a copy."""
    return top_diff if in_place(layer.param) else top_diff.copy()


def power_gradient(power, scale, shift, x, y):
    """Caffe's PowerLayer::Backward up to its last step: d(shift + scale * x)^power / dx written
    as Caffe computes it from the bottom data x and the top data y, in float32.

    Returns (g, scalar): a fresh array g, or, when scalar is True, the constant diff_scale
    (power = 1, or power * scale = 0).  Caffe then sets dx = g * dy, except that dx = 0
    (dy ignored) when power * scale = 0."""
    diff_scale = f32(power) * f32(scale)
    if diff_scale == 0 or power == 1:
        return diff_scale, True
    if power == 2:
        # axpby(D * scale, x, 0, dx), then + D * shift
        g = x * (diff_scale * f32(scale))
        if shift != 0:
            g += diff_scale * f32(shift)
    elif shift == 0:
        # y / x * power: NaN at x = 0 (0/0), as in Caffe
        g = y / x
        g *= f32(power)
    else:
        g = x * f32(scale) if scale != 1 else x.copy()
        if shift != 0:
            g += f32(shift)
        g = y / g
        if diff_scale != 1:
            g *= diff_scale
    return g, False


def times_top_diff(xp, g, top_diff, same_memory):
    """Caffe's last step `caffe_mul(top_diff, bottom_diff, bottom_diff)` after it wrote the local
    derivative g into bottom_diff.  When the layer runs in place, top_diff IS bottom_diff: Caffe
    has overwritten dy with g by then, and computes g * g (training.md 9.3, "garbled")."""
    if same_memory:
        g *= g
    else:
        g *= top_diff
    return g


class NeuronLayer(Layer):
    """Caffe's NeuronLayer: top shape = bottom shape; in-place allowed."""

    exact_bottoms = 1
    exact_tops = 1

    def check(self, bottom_shape):
        """Per-type parameter and bottom checks (LayerSetUp/Reshape CHECKs); none by default."""

    def reshape(self, bottom_shapes):
        self.check_counts(len(bottom_shapes), len(self.param.top))
        bottom = tuple(bottom_shapes[0])
        self.check(bottom)
        return [bottom]


# Neuron types without parameter checks or blobs: the parameters are kept for forward.


@register("ReLU")
class ReLU(NeuronLayer):
    """Caffe's ReLU layer: y = max(x, 0) + negative_slope * min(x, 0)."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.negative_slope = param.relu_param.negative_slope

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        if self.negative_slope == 0:
            return [xp.maximum(x, 0)]
        return [xp.maximum(x, 0) + self.negative_slope * xp.minimum(x, 0)]

    def forward_in_place(self, xp, x, blobs):
        """The same values written into x (the runtime calls this only when x is its own).

        Leaky: x *= (negative_slope where x < 0, else 1), in float32.  x * 1 is x exactly (NaN and
        -0 too), so this equals multiplying the negatives alone; CuPy's ufuncs take no `where=`."""
        if self.negative_slope == 0:
            if xp is np and x.flags.c_contiguous:  # both cores on a big blob
                flat = x.reshape(-1)
                parallel.split(np, flat.size, lambda a, b: np.maximum(flat[a:b], 0, out=flat[a:b]))
                return [x]
            return [xp.maximum(x, 0, out=x)]
        factor = xp.where(x < 0, f32(self.negative_slope), f32(1))
        xp.multiply(x, factor, out=x)
        return [x]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = dy * (x > 0 ? 1 : negative_slope): at x = 0 the factor is negative_slope.

        In place, x is the output (what Caffe reads): the same mask for negative_slope >= 0."""
        if not propagate_down[0]:
            return [None]
        x, dy = bottoms[0], top_diffs[0]
        if self.negative_slope == 0:
            if xp is np and x.flags.c_contiguous and dy.flags.c_contiguous and dy.shape == x.shape:
                dx = np.empty(dy.shape, dtype=np.result_type(dy.dtype, np.float32))
                fx, fdy, fdx = x.reshape(-1), dy.reshape(-1), dx.reshape(-1)
                parallel.split(np, fx.size, lambda a, b: np.multiply(fdy[a:b], fx[a:b] > 0, out=fdx[a:b]))
                return [dx]
            return [dy * (x > 0)]
        return [top_diffs[0] * xp.where(x > 0, f32(1), f32(self.negative_slope))]


@register("ELU")
class ELU(NeuronLayer):
    """Caffe's ELU layer: y = max(x, 0) + alpha * (exp(min(x, 0)) - 1)."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.alpha = param.elu_param.alpha

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        return [xp.maximum(x, 0) + self.alpha * (xp.exp(xp.minimum(x, 0)) - 1)]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = dy * (x > 0 ? 1 : y + alpha)."""
        if not propagate_down[0]:
            return [None]
        x, y = bottoms[0], tops[0]
        return [top_diffs[0] * xp.where(x > 0, f32(1), y + f32(self.alpha))]


@register("Sigmoid")
class Sigmoid(NeuronLayer):
    """Caffe's Sigmoid layer: y = 1 / (1 + exp(-x)).

    Caffe's CPU code evaluates it as 0.5 * tanh(0.5 * x) + 0.5, which never
    overflows; we use the same form.
    """

    def forward(self, xp, bottoms, blobs):
        return [sigmoid(xp, bottoms[0])]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = dy * y * (1 - y)."""
        if not propagate_down[0]:
            return [None]
        y = tops[0]
        dx = top_diffs[0] * y
        dx *= f32(1) - y
        return [dx]


@register("TanH")
class TanH(NeuronLayer):
    """Caffe's TanH layer: y = tanh(x)."""

    def forward(self, xp, bottoms, blobs):
        return [xp.tanh(bottoms[0])]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = dy * (1 - y^2)."""
        if not propagate_down[0]:
            return [None]
        y = tops[0]
        factor = y * y
        factor *= f32(-1)
        factor += f32(1)
        factor *= top_diffs[0]
        return [factor]


@register("BNLL")
class BNLL(NeuronLayer):
    """Caffe's BNLL layer: y = log(1 + exp(x)).

    Caffe evaluates x > 0 ? x + log(1 + exp(-x)) : log(1 + exp(x)) so that exp
    never overflows; max(x, 0) + log1p(exp(-|x|)) is the same in one expression.
    """

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        return [xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = dy * e / (e + 1) with e = exp(min(x, 50)).  In place Caffe reads y as x (9.3)."""
        if not propagate_down[0]:
            return [None]
        e = xp.exp(xp.minimum(bottoms[0], f32(50)))
        dx = e + f32(1)
        xp.divide(e, dx, out=dx)
        dx *= top_diffs[0]
        return [dx]


@register("Threshold")
class Threshold(NeuronLayer):
    """Caffe's Threshold layer: y = 1 if x > threshold else 0."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.threshold = param.threshold_param.threshold

    def forward(self, xp, bottoms, blobs):
        return [(bottoms[0] > f32(self.threshold)).astype(xp.float32)]


@register("Clip")
class Clip(NeuronLayer):
    """Caffe's Clip layer: y = min(max(x, min), max).  Caffe does not check min <= max."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.min, self.max = param.clip_param.min, param.clip_param.max

    def forward(self, xp, bottoms, blobs):
        # max(min, min(x, max)) as Caffe writes it: with min > max every value becomes min.
        return [xp.maximum(f32(self.min), xp.minimum(bottoms[0], f32(self.max)))]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = dy where min <= x <= max (both bounds pass), else 0.  In place x is the clipped
        output, so every gradient passes (9.3)."""
        if not propagate_down[0]:
            return [None]
        x = bottoms[0]
        inside = (x >= f32(self.min)) & (x <= f32(self.max))
        return [top_diffs[0] * inside]


@register("Swish")
class Swish(NeuronLayer):
    """Caffe's Swish layer: y = x * sigmoid(beta * x)."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.beta = param.swish_param.beta

    _sigmoid = None  # sigmoid(beta * x) kept by an in-place forward for backward

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        s = sigmoid(xp, self.beta * x)
        # Caffe keeps sigmoid(beta x) from forward; in place it cannot be recomputed from x.
        self._sigmoid = s if self.needs_backward and in_place(self.param) else None
        return [x * s]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = dy * (beta y + s (1 - beta y)), s = sigmoid(beta x) (kept from forward in place)."""
        if not propagate_down[0]:
            return [None]
        if in_place(self.param):
            if self._sigmoid is None:
                raise self.error("backward needs the forward's sigmoid(beta x): run forward with "
                                 "needs_backward set first")
            s = self._sigmoid
        else:
            s = sigmoid(xp, self.beta * bottoms[0])
        by = tops[0] * f32(self.beta)
        dx = f32(1) - by
        dx *= s
        dx += by
        dx *= top_diffs[0]
        return [dx]


@register("Power")
class Power(NeuronLayer):
    """Caffe's Power layer: y = (shift + scale * x) ^ power (constant if power * scale == 0)."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = param.power_param
        self.power, self.scale, self.shift = p.power, p.scale, p.shift

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        if self.power * self.scale == 0:
            # Caffe fills the top with a constant: 1 if power == 0, else shift ^ power.
            value = f32(1) if self.power == 0 else f32(self.shift) ** f32(self.power)
            return [xp.full(x.shape, value, dtype=xp.float32)]
        y = x
        if self.scale != 1:
            y = y * f32(self.scale)
        if self.shift != 0:
            y = y + f32(self.shift)
        if self.power != 1:
            y = y ** f32(self.power)
        return [y]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """Caffe's cases (training.md 10.4): D = power * scale = 0 gives 0 whatever dy; power 1
        scale * dy; power 2 dy * D * (shift + scale x); shift 0 dy * power * y / x (NaN at x = 0);
        else dy * D * y / (shift + scale x).  In place Caffe overwrites dy with the local
        derivative g before multiplying, so it computes g * g (in-place Power(2): (2y)^2)."""
        if not propagate_down[0]:
            return [None]
        x, y, dy = bottoms[0], tops[0], top_diffs[0]
        g, scalar = power_gradient(self.power, self.scale, self.shift, x, y)
        if scalar:
            if g == 0:
                return [xp.zeros(x.shape, dtype=dy.dtype)]
            if in_place(self.param):
                return [xp.full(x.shape, g * g, dtype=dy.dtype)]
            return [dy * g]
        return [times_top_diff(xp, g, dy, in_place(self.param))]


@register("AbsVal")
class AbsVal(NeuronLayer):
    """Caffe's AbsVal layer: y = |x|.  Caffe's LayerSetUp refuses in-place use."""

    allows_in_place = False

    def forward(self, xp, bottoms, blobs):
        return [xp.abs(bottoms[0])]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = dy * sign(x), sign(0) = 0 (Caffe's (0 < x) - (x < 0), also 0 for NaN)."""
        if not propagate_down[0]:
            return [None]
        x = bottoms[0]
        dtype = top_diffs[0].dtype
        sign = (x > 0).astype(dtype)
        sign -= (x < 0).astype(dtype)
        sign *= top_diffs[0]
        return [sign]

    def check(self, bottom_shape):
        if self.param.top[0] == self.param.bottom[0]:
            raise self.error(
                f"does not allow in-place computation (top '{self.param.top[0]}' is its bottom); "
                f"give the top another name"
            )


class _BaseShiftScale(NeuronLayer):
    """Exp and Log: base -1 means e; any other base must be strictly positive."""

    field = None

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = getattr(param, self.field)
        self.base, self.scale, self.shift = p.base, p.scale, p.shift

    def check(self, bottom_shape):
        if self.base != -1 and not self.base > 0:
            raise self.error(
                f"{self.field}.base must be strictly positive (or -1 for base e), got {self.base}"
            )


@register("Exp")
class Exp(_BaseShiftScale):
    """Caffe's Exp layer: y = base ^ (shift + scale * x).

    Caffe computes it as outer * exp(inner * x) with inner = ln(base) * scale and
    outer = base ^ shift (e ^ shift for base -1), all in float.
    """

    field = "exp_param"

    def scales(self):
        """(inner, outer) as Caffe's LayerSetUp computes them, in float."""
        natural = self.base == -1
        log_base = f32(1) if natural else np.log(f32(self.base))
        inner = log_base * f32(self.scale)
        if self.shift == 0:
            outer = f32(1)
        elif natural:
            outer = np.exp(f32(self.shift))
        else:
            outer = f32(self.base) ** f32(self.shift)
        return inner, outer

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        inner, outer = self.scales()
        y = xp.exp(x if inner == 1 else x * inner)
        if outer != 1:
            y = y * outer
        return [y]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = dy * y * inner (exact in place: each value reads only its own dy and y)."""
        if not propagate_down[0]:
            return [None]
        inner, _ = self.scales()
        dx = tops[0] * top_diffs[0]
        if inner != 1:
            dx *= inner
        return [dx]


@register("Log")
class Log(_BaseShiftScale):
    """Caffe's Log layer: y = log_base(shift + scale * x).

    Caffe computes ln(shift + scale * x), then multiplies by 1 / ln(base) (base
    -1 means e, no multiplication), all in float.
    """

    field = "log_param"

    def forward(self, xp, bottoms, blobs):
        y = bottoms[0]
        if self.scale != 1:
            y = y * f32(self.scale)
        if self.shift != 0:
            y = y + f32(self.shift)
        y = xp.log(y)
        base_scale = self.base_scale()
        if base_scale != 1:
            y = y * base_scale
        return [y]

    def base_scale(self):
        """1 / ln(base) in float (1 for base -1, i.e. e)."""
        return f32(1) if self.base == -1 else f32(1) / np.log(f32(self.base))

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = dy * (scale / ln base) / (scale x + shift), in Caffe's order: g = x, *scale, +shift,
        ^-1, *backward_num_scale, then g * dy.  In place x is the output and dy has been
        overwritten by g when Caffe multiplies: it computes g * g (9.3)."""
        if not propagate_down[0]:
            return [None]
        x = bottoms[0]
        g = x * f32(self.scale) if self.scale != 1 else x.copy()
        if self.shift != 0:
            g += f32(self.shift)
        g = f32(1) / g
        log_base = f32(1) if self.base == -1 else np.log(f32(self.base))
        num_scale = f32(self.scale) / log_base  # Caffe's backward_num_scale_
        if num_scale != 1:
            g *= num_scale
        return [times_top_diff(xp, g, top_diffs[0], in_place(self.param))]


@register("Dropout")
class Dropout(NeuronLayer):
    """Caffe's Dropout layer: identity at TEST; at TRAIN y = x * mask / (1 - ratio).

    Caffe only DCHECKs 0 < ratio < 1 (debug builds); release builds accept any
    value, and at TEST the ratio is never used.  We refuse values outside [0, 1],
    which are meaningless in either phase.

    The phase is the layer's own `phase` field if set, else the net's.  At TRAIN
    the mask keeps each value with probability 1 - ratio, drawn from `self.rng`
    (a numpy Generator; set it for reproducible masks, otherwise a fresh
    unseeded one is made, as Caffe seeds from the clock by default).
    """

    rng = None
    _mask = None  # the TRAIN forward's mask (float 0/1), kept when backward will run

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.ratio = param.dropout_param.dropout_ratio
        self.train = layer_phase(param, phase) == TRAIN

    def check(self, bottom_shape):
        if not 0.0 <= self.ratio <= 1.0:
            raise self.error(f"dropout_param.dropout_ratio must be in [0, 1], got {self.ratio}")

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        if not self.train:
            return [x]  # Caffe shares the data: no scaling at test time
        if self.ratio >= 1:
            raise self.error(
                "dropout_param.dropout_ratio 1 drops everything and Caffe's scale 1/(1 - ratio) is "
                "infinite (its output would be NaN); use a ratio below 1"
            )
        if self.rng is None:
            self.rng = np.random.default_rng()
        keep = self.rng.random(x.shape, dtype=np.float32) >= f32(self.ratio)
        mask = xp.asarray(keep, dtype=xp.float32)
        self._mask = mask if self.needs_backward else None
        return [x * mask * self.scale()]

    def scale(self):
        """Caffe's scale_ = 1 / (1 - ratio), computed in double and stored as float."""
        return f32(1.0 / (1.0 - self.ratio))

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """TRAIN: dx = dy * mask * scale with the forward's mask.  TEST: dx = dy."""
        if not propagate_down[0]:
            return [None]
        dy = top_diffs[0]
        if not self.train:
            return [pass_through(self, dy)]
        if self._mask is None or tuple(self._mask.shape) != tuple(dy.shape):
            raise self.error("backward at TRAIN needs the mask of a forward run with needs_backward set")
        dx = dy * self._mask
        dx *= self.scale()
        return [dx]


@register("PReLU")
class PReLU(NeuronLayer):
    """Caffe's PReLU layer: y = max(x, 0) + a_c * min(x, 0), channel axis 1.

    The bottom needs at least 2 axes (and at most 4: Caffe reads the channel
    count through the legacy accessor).  Blob: the slopes, shape (C,), or shape
    () (one value) if prelu_param.channel_shared.
    """

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.channel_shared = param.prelu_param.channel_shared

    def check(self, bottom_shape):
        if len(bottom_shape) < 2:
            raise self.error(
                f"the bottom must have at least 2 axes (num, channels, ...), got shape {bottom_shape}"
            )
        legacy_shape(self, bottom_shape)

    def param_shapes(self, bottom_shapes):
        if self.channel_shared:
            return [()]
        return [(bottom_shapes[0][1],)]

    def fillers(self):
        p = self.param.prelu_param
        return [copy_filler(p.filler) if p.HasField("filler") else constant_filler(0.25)]

    _x = None  # the bottom of an in-place forward, kept for backward (Caffe's bottom_memory_)

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        # The forward writes a new array, so x itself is Caffe's copy of the in-place bottom.
        self._x = x if self.needs_backward and in_place(self.param) else None
        slope = blobs[0]
        if not self.channel_shared:
            slope = channel_view(xp, slope, x.ndim)
        return [xp.maximum(x, 0) + slope * xp.minimum(x, 0)]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = dy * (x > 0 ? 1 : a_c); da_c += sum over the channel (everything if shared) of
        dy * x * [x <= 0].  In place x is the copy kept by forward, so both are exact."""
        x = bottoms[0]
        if in_place(self.param):
            if self._x is None:
                raise self.error("backward in place needs the bottom kept by a forward run with "
                                 "needs_backward set")
            x = self._x
        dy = top_diffs[0]
        out = [None]
        if param_diffs and param_diffs[0] is not None:
            prod = dy * x
            prod *= x <= 0
            if self.channel_shared:
                total = xp.sum(prod, dtype=xp.float64)
            else:
                total = xp.sum(prod, axis=(0,) + tuple(range(2, x.ndim)), dtype=xp.float64)
            del prod
            acc = param_diffs[0]
            acc += total.astype(acc.dtype)
        if propagate_down[0]:
            slope = blobs[0]
            if not self.channel_shared:
                slope = channel_view(xp, slope, x.ndim)
            out[0] = dy * xp.where(x > 0, f32(1), slope)
        return out
