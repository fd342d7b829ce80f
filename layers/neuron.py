"""Neuron (pointwise) layers: one bottom, one top of exactly the bottom's shape.

Caffe's NeuronLayer reshapes its top like its bottom and allows in-place use
(top name == bottom name), with one exception: AbsVal checks in LayerSetUp that
its top is not its bottom.  PReLU is the only neuron layer that owns a blob
(the negative slopes, one per channel or one shared).
"""
import numpy as np

from caffeish.graph.registry import Layer, register
from caffeish.formats.schema import TRAIN, pb


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
            return [xp.maximum(x, 0, out=x)]
        factor = xp.where(x < 0, f32(self.negative_slope), f32(1))
        xp.multiply(x, factor, out=x)
        return [x]


@register("ELU")
class ELU(NeuronLayer):
    """Caffe's ELU layer: y = max(x, 0) + alpha * (exp(min(x, 0)) - 1)."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.alpha = param.elu_param.alpha

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        return [xp.maximum(x, 0) + self.alpha * (xp.exp(xp.minimum(x, 0)) - 1)]


@register("Sigmoid")
class Sigmoid(NeuronLayer):
    """Caffe's Sigmoid layer: y = 1 / (1 + exp(-x)).

    Caffe's CPU code evaluates it as 0.5 * tanh(0.5 * x) + 0.5, which never
    overflows; we use the same form.
    """

    def forward(self, xp, bottoms, blobs):
        return [sigmoid(xp, bottoms[0])]


@register("TanH")
class TanH(NeuronLayer):
    """Caffe's TanH layer: y = tanh(x)."""

    def forward(self, xp, bottoms, blobs):
        return [xp.tanh(bottoms[0])]


@register("BNLL")
class BNLL(NeuronLayer):
    """Caffe's BNLL layer: y = log(1 + exp(x)).

    Caffe evaluates x > 0 ? x + log(1 + exp(-x)) : log(1 + exp(x)) so that exp
    never overflows; max(x, 0) + log1p(exp(-|x|)) is the same in one expression.
    """

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        return [xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))]


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


@register("Swish")
class Swish(NeuronLayer):
    """Caffe's Swish layer: y = x * sigmoid(beta * x)."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.beta = param.swish_param.beta

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        return [x * sigmoid(xp, self.beta * x)]


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


@register("AbsVal")
class AbsVal(NeuronLayer):
    """Caffe's AbsVal layer: y = |x|.  Caffe's LayerSetUp refuses in-place use."""

    allows_in_place = False

    def forward(self, xp, bottoms, blobs):
        return [xp.abs(bottoms[0])]

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

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        natural = self.base == -1
        log_base = f32(1) if natural else np.log(f32(self.base))
        inner = log_base * f32(self.scale)
        if self.shift == 0:
            outer = f32(1)
        elif natural:
            outer = np.exp(f32(self.shift))
        else:
            outer = f32(self.base) ** f32(self.shift)
        y = xp.exp(x if inner == 1 else x * inner)
        if outer != 1:
            y = y * outer
        return [y]


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
        base_scale = f32(1) if self.base == -1 else f32(1) / np.log(f32(self.base))
        if base_scale != 1:
            y = y * base_scale
        return [y]


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
        scale = f32(1.0 / (1.0 - self.ratio))
        return [x * xp.asarray(keep, dtype=xp.float32) * scale]


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

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        slope = blobs[0]
        if not self.channel_shared:
            slope = channel_view(xp, slope, x.ndim)
        return [xp.maximum(x, 0) + slope * xp.minimum(x, 0)]
