"""Neuron (pointwise) layers: one bottom, one top of exactly the bottom's shape.

Caffe's NeuronLayer reshapes its top like its bottom and allows in-place use
(top name == bottom name), with one exception: AbsVal checks in LayerSetUp that
its top is not its bottom.  PReLU is the only neuron layer that owns a blob
(the negative slopes, one per channel or one shared).
"""
from caffeish.registry import Layer, register
from caffeish.schema import TRAIN


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


@register("ELU")
class ELU(NeuronLayer):
    """Caffe's ELU layer: y = max(x, 0) + alpha * (exp(min(x, 0)) - 1)."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.alpha = param.elu_param.alpha


@register("Sigmoid")
class Sigmoid(NeuronLayer):
    """Caffe's Sigmoid layer: y = 1 / (1 + exp(-x))."""


@register("TanH")
class TanH(NeuronLayer):
    """Caffe's TanH layer: y = tanh(x)."""


@register("BNLL")
class BNLL(NeuronLayer):
    """Caffe's BNLL layer: y = log(1 + exp(x))."""


@register("Threshold")
class Threshold(NeuronLayer):
    """Caffe's Threshold layer: y = 1 if x > threshold else 0."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.threshold = param.threshold_param.threshold


@register("Clip")
class Clip(NeuronLayer):
    """Caffe's Clip layer: y = min(max(x, min), max).  Caffe does not check min <= max."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.min, self.max = param.clip_param.min, param.clip_param.max


@register("Swish")
class Swish(NeuronLayer):
    """Caffe's Swish layer: y = x * sigmoid(beta * x)."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.beta = param.swish_param.beta


@register("Power")
class Power(NeuronLayer):
    """Caffe's Power layer: y = (shift + scale * x) ^ power (constant if power * scale == 0)."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = param.power_param
        self.power, self.scale, self.shift = p.power, p.scale, p.shift


@register("AbsVal")
class AbsVal(NeuronLayer):
    """Caffe's AbsVal layer: y = |x|.  Caffe's LayerSetUp refuses in-place use."""

    allows_in_place = False

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
    """Caffe's Exp layer: y = base ^ (shift + scale * x)."""

    field = "exp_param"


@register("Log")
class Log(_BaseShiftScale):
    """Caffe's Log layer: y = log_base(shift + scale * x)."""

    field = "log_param"


@register("Dropout")
class Dropout(NeuronLayer):
    """Caffe's Dropout layer: identity at TEST; at TRAIN y = x * mask / (1 - ratio).

    Caffe only DCHECKs 0 < ratio < 1 (debug builds); release builds accept any
    value, and at TEST the ratio is never used.  We refuse values outside [0, 1],
    which are meaningless in either phase.
    """

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.ratio = param.dropout_param.dropout_ratio
        self.train = layer_phase(param, phase) == TRAIN

    def check(self, bottom_shape):
        if not 0.0 <= self.ratio <= 1.0:
            raise self.error(f"dropout_param.dropout_ratio must be in [0, 1], got {self.ratio}")


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
