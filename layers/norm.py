"""Normalisation layers: LRN, MVN, BatchNorm, and the broadcasting Scale and Bias.

All keep the bottom's shape (MVN pads it to 4 axes, see below).  BatchNorm owns
its running statistics; Scale and Bias own their operand when it is not given
as a second bottom.
"""
from caffeish.registry import Layer, register
from caffeish.schema import TEST, pb

from caffeish.layers.neuron import layer_phase, legacy_shape


class _OneToOne(Layer):
    exact_bottoms = 1
    exact_tops = 1


@register("LRN")
class LRN(_OneToOne):
    """Caffe's LRN layer (local response normalisation), 4-D bottoms only.

    ACROSS_CHANNELS: y = x * (k + alpha/n * sum of x^2 over n neighbouring
    channels)^-beta.  WITHIN_CHANNEL: y = x * (1 + alpha/n^2 * sum of x^2 over an
    n x n window)^-beta (k is ignored).  local_size n must be odd.
    """

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = param.lrn_param
        self.local_size, self.alpha, self.beta, self.k = p.local_size, p.alpha, p.beta, p.k
        self.within_channel = p.norm_region == pb.LRNParameter.WITHIN_CHANNEL

    def reshape(self, bottom_shapes):
        self.check_counts(len(bottom_shapes), len(self.param.top))
        bottom = tuple(bottom_shapes[0])
        if self.local_size % 2 != 1:
            raise self.error(f"lrn_param.local_size must be odd, got {self.local_size}")
        if len(bottom) != 4:
            raise self.error(
                f"the bottom must have 4 axes (num, channels, height, width), got shape {bottom}"
            )
        return [bottom]


@register("MVN")
class MVN(_OneToOne):
    """Caffe's MVN layer: subtract the mean (and divide by the std) per (n, c), or per n
    if across_channels.

    Caffe reshapes the top through the legacy accessors as (num, channels,
    height, width), so the bottom may have at most 4 axes and the top always has
    4: a (N, C) bottom gives a (N, C, 1, 1) top.
    """

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = param.mvn_param
        self.normalize_variance, self.across_channels, self.eps = (
            p.normalize_variance, p.across_channels, p.eps)

    def reshape(self, bottom_shapes):
        self.check_counts(len(bottom_shapes), len(self.param.top))
        return [legacy_shape(self, bottom_shapes[0])]


@register("BatchNorm")
class BatchNorm(_OneToOne):
    """Caffe's BatchNorm layer: normalise each channel (axis 1) over all other axes.

    Blobs: running mean sum (C,), running variance sum (C,), scale factor (1,).
    Their lr_mult must be 0: Caffe adds `param { lr_mult: 0 }` entries where
    missing and refuses a given entry with lr_mult != 0 (a layer with exactly 3
    entries has them zeroed by the upgrade, so it never fails).
    use_global_stats defaults to (phase == TEST).
    """

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = param.batch_norm_param
        self.use_global_stats = (
            p.use_global_stats if p.HasField("use_global_stats") else layer_phase(param, phase) == TEST
        )
        self.moving_average_fraction, self.eps = p.moving_average_fraction, p.eps

    def _channels(self, bottom):
        # LayerSetUp: a 1-axis bottom has 1 channel, otherwise shape[1].
        return 1 if len(bottom) == 1 else bottom[1]

    def reshape(self, bottom_shapes):
        self.check_counts(len(bottom_shapes), len(self.param.top))
        bottom = tuple(bottom_shapes[0])
        if len(bottom) < 2:
            # LayerSetUp reads shape(1) for 0 axes, and Reshape reads shape(1) for any
            # bottom with an axis, so Caffe fails on both 0 and 1 axes.
            raise self.error(
                f"the bottom must have at least 2 axes (channels are axis 1), got shape {bottom}"
            )
        if len(self.param.param) != 3:
            for i, spec in enumerate(self.param.param[:3]):
                if spec.lr_mult != 0:
                    raise self.error(
                        f"param {i} has lr_mult {spec.lr_mult}: batch normalization statistics "
                        f"cannot be learned parameters; use lr_mult 0 (or drop the param entries)"
                    )
        return [bottom]

    def param_shapes(self, bottom_shapes):
        c = self._channels(tuple(bottom_shapes[0]))
        return [(c,), (c,), (1,)]


class _Broadcast(Layer):
    """Shared logic of Scale and Bias: y = x (op) operand, broadcast over bottom 0.

    With 2 bottoms the operand is bottom 1, whose shape must equal
    bottom0.shape[axis : axis + len(bottom1.shape)] (a 0-axis operand is a
    scalar and the axis is then ignored).  With 1 bottom the operand is a
    learned blob of shape bottom0.shape[axis : axis + num_axes] (num_axes -1:
    all remaining axes; 0: a scalar).
    """

    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1
    field = None
    operand = None  # "scale" or "bias", for messages

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = getattr(param, self.field)
        self.axis, self.num_axes = p.axis, p.num_axes

    def learned_shape(self, bottom):
        """The operand blob's shape for a single bottom (LayerSetUp's checks included)."""
        axis = self.canonical_axis(self.axis, len(bottom))
        if self.num_axes < -1:
            raise self.error(
                f"{self.field}.num_axes must be non-negative, or -1 to extend to the end of "
                f"bottom 0; got {self.num_axes}"
            )
        if self.num_axes == -1:
            return bottom[axis:]
        if axis + self.num_axes > len(bottom):
            raise self.error(
                f"the {self.operand} blob's shape extends past bottom 0's shape {bottom}: "
                f"axis {axis} + num_axes {self.num_axes} > {len(bottom)} axes"
            )
        return bottom[axis:axis + self.num_axes]

    def check_operand(self, bottom, operand):
        """Reshape's check that the operand fits bottom 0 at the axis; returns the axis."""
        axis = 0 if len(operand) == 0 else self.canonical_axis(self.axis, len(bottom))
        if axis + len(operand) > len(bottom) or bottom[axis:axis + len(operand)] != operand:
            raise self.error(
                f"the {self.operand} shape {operand} does not match bottom 0's shape {bottom} "
                f"at axis {axis}: expected bottom0.shape[{axis}:{axis + len(operand)}] = "
                f"{bottom[axis:axis + len(operand)]}"
            )
        return axis

    def reshape(self, bottom_shapes):
        self.check_counts(len(bottom_shapes), len(self.param.top))
        bottom = tuple(bottom_shapes[0])
        if len(bottom_shapes) == 2:
            operand = tuple(bottom_shapes[1])
        else:
            operand = self.learned_shape(bottom)
        self.check_operand(bottom, operand)
        return [bottom]


@register("Scale")
class Scale(_Broadcast):
    """Caffe's Scale layer: y = x * s (+ b with bias_term), s broadcast as in _Broadcast.

    Blobs: [scale, bias] with 1 bottom, [bias] with 2 bottoms and bias_term;
    the bias has the scale operand's shape.  The internal Bias layer always
    canonicalises the axis against bottom 0, even for a scalar operand.
    """

    field = "scale_param"
    operand = "scale"

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.bias_term = param.scale_param.bias_term

    def reshape(self, bottom_shapes):
        tops = super().reshape(bottom_shapes)
        if self.bias_term:
            self.canonical_axis(self.axis, len(bottom_shapes[0]))
        return tops

    def param_shapes(self, bottom_shapes):
        bottom = tuple(bottom_shapes[0])
        if len(bottom_shapes) == 2:
            shape = tuple(bottom_shapes[1])
            return [shape] if self.bias_term else []
        shape = self.learned_shape(bottom)
        return [shape, shape] if self.bias_term else [shape]


@register("Bias")
class Bias(_Broadcast):
    """Caffe's Bias layer: y = x + b, b broadcast as in _Broadcast.  Blob: [bias] with 1 bottom."""

    field = "bias_param"
    operand = "bias"

    def param_shapes(self, bottom_shapes):
        if len(bottom_shapes) == 2:
            return []
        return [self.learned_shape(tuple(bottom_shapes[0]))]
