"""Normalisation layers: LRN, MVN, BatchNorm, and the broadcasting Scale and Bias.

All keep the bottom's shape (MVN pads it to 4 axes, see below).  BatchNorm owns
its running statistics; Scale and Bias own their operand when it is not given
as a second bottom.
"""
from caffeish.graph.registry import Layer, register
from caffeish.formats.schema import TEST, pb

from caffeish.ops.neuron import (
    channel_view, constant_filler, copy_filler, f32, layer_phase, legacy_shape)
from caffeish.runtime.backend import kernels_for


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

    def forward(self, xp, bottoms, blobs):
        """On the GPU one launch of our kernel (kernels/norm.cu), else the array code below."""
        x = bottoms[0]
        gpu = kernels_for(xp)
        if gpu is not None:
            return [gpu.lrn(x, self.local_size, self.alpha, self.beta, self.k, self.within_channel)]
        n, half = self.local_size, self.local_size // 2
        sq = x * x
        # Window sums accumulate in place into arrays this method owns (no temporaries).
        if self.within_channel:
            # Caffe: Power(2) -> AVE pool (kernel n, pad (n-1)/2, stride 1) -> Power(shift 1,
            # scale alpha, power -beta) -> product.  The pool's divisor is n*n everywhere
            # (the padded window never overhangs), so zero padding and a fixed n*n divisor.
            h, w = x.shape[2], x.shape[3]
            padded = xp.pad(sq, ((0, 0), (0, 0), (half, half), (0, 0)))
            rows = padded[:, :, 0:h].copy()
            for i in range(1, n):
                rows += padded[:, :, i:i + h]
            padded = xp.pad(rows, ((0, 0), (0, 0), (0, 0), (half, half)))
            scale = padded[:, :, :, 0:w].copy()
            for j in range(1, n):
                scale += padded[:, :, :, j:j + w]
            scale /= f32(n * n)
            scale *= f32(self.alpha)
            scale += f32(1)
        else:
            # Sum of squares over channels [c - half, c + half] clipped to [0, C).
            c = x.shape[1]
            padded = xp.pad(sq, ((0, 0), (half, half), (0, 0), (0, 0)))
            scale = padded[:, 0:c].copy()
            for i in range(1, n):
                scale += padded[:, i:i + c]
            scale *= f32(self.alpha) / f32(n)
            scale += f32(self.k)
        return [_times_power(xp, x, scale, self.beta)]


def _times_power(xp, x, scale, beta):
    """x * scale^-beta, written into scale.

    float32 pow runs single-threaded in libm at ~10 ns a value (AlexNet's norm1: 30 ms),
    so the common exponents use square roots: beta 0.75 (AlexNet, CaffeNet, GoogLeNet),
    0.5 and 1.  They differ from powf by about 1e-7 relative, far inside Caffe's tolerance.
    """
    if beta == 0.75:
        root = xp.sqrt(scale)
        scale *= root
        xp.sqrt(scale, out=scale)
    elif beta == 0.5:
        xp.sqrt(scale, out=scale)
    elif beta != 1:
        scale **= f32(beta)
    xp.divide(x, scale, out=scale)
    return scale


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

    def forward(self, xp, bottoms, blobs):
        """Caffe: y = x - mean; with normalize_variance, y /= (sqrt(mean(y^2)) + eps).

        eps is added to the standard deviation, not to the variance.
        """
        x = bottoms[0]
        shape = legacy_shape(self, x.shape)
        rows = shape[0] if self.across_channels else shape[0] * shape[1]
        flat = xp.reshape(x, (rows, -1))
        y = flat - xp.mean(flat, axis=1, keepdims=True, dtype=xp.float32)
        if self.normalize_variance:
            std = xp.sqrt(xp.mean(y * y, axis=1, keepdims=True, dtype=xp.float32))
            y = y / (std + f32(self.eps))
        return [xp.reshape(y, shape)]


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

    def fillers(self):
        # Caffe zero-fills all three statistics blobs.
        return [None, None, None]

    def forward(self, xp, bottoms, blobs):
        """Normalise per channel: y = (x - mean) / sqrt(var + eps).

        Global stats: mean = f * blob0, var = f * blob1 with f = 0 if blob2 == 0
        else 1 / blob2.  Otherwise the batch mean and biased batch variance over
        every axis but 1.  (Caffe then also updates the running statistics in its
        blobs; forward here never writes blobs, so that update is not done.)
        """
        x = bottoms[0]
        if self.use_global_stats:
            s = f32(float(blobs[2].reshape(-1)[0]))
            factor = f32(0) if s == 0 else f32(1) / s
            mean = channel_view(xp, blobs[0] * factor, x.ndim)
            var = channel_view(xp, blobs[1] * factor, x.ndim)
            centred = x - mean
        else:
            axes = (0,) + tuple(range(2, x.ndim))
            centred = x - xp.mean(x, axis=axes, keepdims=True, dtype=xp.float32)
            var = xp.mean(centred * centred, axis=axes, keepdims=True, dtype=xp.float32)
        return [centred / xp.sqrt(var + f32(self.eps))]


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
        """Reshape's check that the operand fits bottom 0 at the axis; returns the axis.

        Also records the shape the operand takes to broadcast against bottom 0:
        1 on the outer axes (before `axis`) and on the inner ones (after it).
        """
        axis = 0 if len(operand) == 0 else self.canonical_axis(self.axis, len(bottom))
        if axis + len(operand) > len(bottom) or bottom[axis:axis + len(operand)] != operand:
            raise self.error(
                f"the {self.operand} shape {operand} does not match bottom 0's shape {bottom} "
                f"at axis {axis}: expected bottom0.shape[{axis}:{axis + len(operand)}] = "
                f"{bottom[axis:axis + len(operand)]}"
            )
        self.broadcast_shape = (1,) * axis + operand + (1,) * (len(bottom) - axis - len(operand))
        return axis

    def broadcast(self, xp, operand):
        """The operand (blob or bottom 1) shaped to broadcast against bottom 0."""
        return xp.reshape(operand, self.broadcast_shape)

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

    def fillers(self):
        """Scale: `filler` if given (a typeless one is constant 0), else constant 1.
        Bias: `bias_filler` (default constant 0)."""
        p = self.param.scale_param
        out = []
        if len(self.param.bottom) < 2:
            out.append(copy_filler(p.filler) if p.HasField("filler") else constant_filler(1.0))
        if self.bias_term:
            out.append(copy_filler(p.bias_filler))
        return out

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        if len(bottoms) == 2:
            scale, rest = bottoms[1], blobs
        else:
            scale, rest = blobs[0], blobs[1:]
        y = x * self.broadcast(xp, scale)
        if self.bias_term:
            y = y + self.broadcast(xp, rest[0])
        return [y]


@register("Bias")
class Bias(_Broadcast):
    """Caffe's Bias layer: y = x + b, b broadcast as in _Broadcast.  Blob: [bias] with 1 bottom."""

    field = "bias_param"
    operand = "bias"

    def param_shapes(self, bottom_shapes):
        if len(bottom_shapes) == 2:
            return []
        return [self.learned_shape(tuple(bottom_shapes[0]))]

    def fillers(self):
        if len(self.param.bottom) == 2:
            return []
        return [copy_filler(self.param.bias_param.filler)]

    def forward(self, xp, bottoms, blobs):
        bias = bottoms[1] if len(bottoms) == 2 else blobs[0]
        return [bottoms[0] + self.broadcast(xp, bias)]
