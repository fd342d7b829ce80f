"""Normalisation layers: LRN, MVN, BatchNorm, and the broadcasting Scale and Bias.

All keep the bottom's shape (MVN pads it to 4 axes, see below).  BatchNorm owns
its running statistics (updated in place by every batch-mode forward, as Caffe's);
Scale and Bias own their operand when it is not given as a second bottom.

Backward: ../shared/caffe/training.md 10.5-10.6, quirks included.  LRN
ACROSS_CHANNELS, MVN and BatchNorm write the bottom diff whatever propagate_down
says.  In place (the param names the top as the bottom) LRN and MVN give Caffe's
garbled numbers (9.3); BatchNorm and Scale are exact through what their forward
kept (run with `needs_backward`): BatchNorm its output and std, Scale its bottom.
"""
import math

import numpy as np

from caffeish.graph.registry import Layer, register
from caffeish.formats.schema import TEST, pb

from caffeish.ops.neuron import (
    channel_view, constant_filler, copy_filler, f32, in_place, layer_phase, legacy_shape,
    pass_through, power_gradient, times_top_diff)
from caffeish.runtime import blas, parallel
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

    _kept = None  # an in-place forward's scale (ACROSS: S; WITHIN: the pool's mean A), for backward

    def forward(self, xp, bottoms, blobs):
        """On the GPU one launch of our kernel (kernels/norm.cu), else the array code below."""
        x = bottoms[0]
        # In place, backward cannot recompute the scale from x (Caffe keeps scale_ / its internal
        # blobs): keep it then.  Out of place backward recomputes it from the bottom.
        keep = self.needs_backward and in_place(self.param)
        self._kept = None
        gpu = kernels_for(xp)
        if gpu is not None:
            if keep:
                self._kept = self._mean_squares(xp, x) if self.within_channel else self._scale(xp, x)
            return [gpu.lrn(x, self.local_size, self.alpha, self.beta, self.k, self.within_channel)]
        if self.within_channel:
            mean = self._mean_squares(xp, x)
            if keep:
                self._kept = mean.copy()
            scale = self._within_scale(mean)
        else:
            scale = self._scale(xp, x)
            if keep:
                self._kept = scale.copy()
        return [_times_power(xp, x, scale, self.beta)]

    def _mean_squares(self, xp, x):
        """WITHIN_CHANNEL: the zero-padded n x n window mean A of x^2 (a fresh array).

        Caffe: Power(2) -> AVE pool (kernel n, pad (n-1)/2, stride 1) -> Power(shift 1, scale
        alpha, power -beta) -> product.  The pool's divisor is n*n everywhere (the padded window
        never overhangs), so zero padding and a fixed n*n divisor."""
        mean = _window_sum_hw(xp, x * x, self.local_size)
        mean /= f32(self.local_size * self.local_size)
        return mean

    def _within_scale(self, mean):
        """1 + alpha * A, written into A."""
        mean *= f32(self.alpha)
        mean += f32(1)
        return mean

    def _scale(self, xp, x):
        """ACROSS_CHANNELS: S = k + alpha/n * (sum of x^2 over channels [c - h, c + h] in [0, C)).

        On the CPU in Caffe's order and rounding (CrossChannelForward_cpu): per image a running
        sum over channels, each step an axpy (fused, OpenBLAS's, see caffeish.runtime.blas) that
        adds the entering channel's square and subtracts the leaving one's."""
        if xp is not np:
            scale = _window_sum_c(xp, x * x, self.local_size)
            scale *= f32(self.alpha) / f32(self.local_size)
            scale += f32(self.k)
            return scale
        n_img, c = x.shape[:2]
        size = self.local_size
        pre = (size - 1) // 2
        step = f32(self.alpha) / f32(size)  # Caffe's alpha_over_size: a float division
        dtype = np.result_type(x.dtype, np.float32)
        # Channel-major (C, N, ...), so that each step of the running sum is one axpy over all the
        # images (the same operations per element as Caffe's image by image, in fewer calls).
        swap = (1, 0) + tuple(range(2, x.ndim))
        xt = x.transpose(swap)
        squares = np.zeros((c + size - 1, n_img) + tuple(x.shape[2:]), dtype=dtype)
        parallel.split(np, c, lambda a, b: np.multiply(xt[a:b], xt[a:b], out=squares[pre + a:pre + b]),
                       elements=x.size)
        s = np.full((c, n_img) + tuple(x.shape[2:]), self.k, dtype=dtype)
        for j in range(size):
            blas.axpy(step, squares[j], s[0])
        for j in range(1, c):
            s[j] = s[j - 1]
            blas.axpy(step, squares[j + size - 1], s[j])
            blas.axpy(-step, squares[j - 1], s[j])
        squares = None  # let go before the scale is allocated: the peak holds three arrays of x's size
        scale = np.empty(x.shape, dtype=dtype)
        parallel.copy(np, scale, s.transpose(swap))
        return scale

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """ACROSS_CHANNELS (whatever propagate_down says, as Caffe):
        dx = dy S^-beta - (2 alpha beta / n) x sum_{c'} dy[c'] y[c'] / S[c'].
        WITHIN_CHANNEL: the chain of Caffe's internal layers (training.md 10.5).

        In place (training.md 9.3), Caffe's own numbers: ACROSS first overwrites dy with
        S^-beta * S^-beta and reads y as x; WITHIN reads y as x in its product and square layers."""
        x, y, dy = bottoms[0], tops[0], top_diffs[0]
        same = in_place(self.param)
        if same and self._kept is None:
            raise self.error("backward in place needs the scale kept by a forward run with needs_backward set")
        if self.within_channel:
            if not propagate_down[0]:
                return [None]
            return [self._within_backward(xp, x, dy, self._kept if same else None)]
        scale = self._kept if same else self._scale(xp, x)
        n = self.local_size
        powered = _inverse_power(xp, scale, self.beta)  # S^-beta
        if same:
            # bottom_diff = S^-beta, then bottom_diff *= top_diff (the same memory): dy is now S^-2beta
            powered *= powered
            dy = powered
            first = powered
        else:
            first = powered
            first *= dy
        ratio = dy * y
        ratio /= scale
        acc = _window_sum_c(xp, ratio, n)
        del ratio
        acc *= x
        acc *= f32(2.0 * self.alpha * self.beta / n)  # Caffe's cache_ratio_value
        first -= acc
        return [first]

    def _within_backward(self, xp, x, dy, mean):
        """Caffe's WithinChannelBackward through its internal Eltwise PROD, Power, AVE pool, Power(2)
        and Split layers.  x is what Caffe's product and square inputs hold (y in place); mean
        the pool output A (recomputed from x when None)."""
        n = self.local_size
        if mean is None:
            mean = self._mean_squares(xp, x)
        power_out = self._within_scale(mean.copy())
        blas.powx(xp, power_out, -self.beta, out=power_out)  # P = (1 + alpha A)^-beta
        # Product (stable PROD): product_input.diff = P * dy, power_output.diff = x * dy.
        # Power (power -beta, scale alpha, shift 1): pool_output.diff = g(A, P) * power_output.diff.
        g, scalar = power_gradient(-self.beta, self.alpha, 1.0, mean, power_out)
        if scalar:
            pool_diff = None if g == 0 else x * dy * g
        else:
            pool_diff = times_top_diff(xp, g, x * dy, False)
        dx = power_out
        dx *= dy
        if pool_diff is not None:
            # AVE pool: each output adds diff / n^2 to the cells of its window; Power(2): * 2x.
            pool_diff /= f32(n * n)
            square_diff = _window_sum_hw(xp, pool_diff, n)
            del pool_diff
            square_diff *= x * f32(2)
            dx += square_diff
        return dx


def _window_sum_c(xp, a, n):
    """Sum of `a` over channels [c - (n-1)/2, c + (n-1)/2] clipped to [0, C), for each c (fresh)."""
    half, c = n // 2, a.shape[1]
    padded = xp.pad(a, ((0, 0), (half, half), (0, 0), (0, 0)))
    out = padded[:, 0:c].copy()
    for i in range(1, n):
        out += padded[:, i:i + c]
    return out


def _window_sum_hw(xp, a, n):
    """Sum of `a` over the zero-padded n x n window centred on each (h, w) (fresh)."""
    half, h, w = n // 2, a.shape[2], a.shape[3]
    padded = xp.pad(a, ((0, 0), (0, 0), (half, half), (0, 0)))
    rows = padded[:, :, 0:h].copy()
    for i in range(1, n):
        rows += padded[:, :, i:i + h]
    padded = xp.pad(rows, ((0, 0), (0, 0), (0, 0), (half, half)))
    out = padded[:, :, :, 0:w].copy()
    for j in range(1, n):
        out += padded[:, :, :, j:j + w]
    return out


def _times_power(xp, x, scale, beta):
    """x * scale^-beta, written into scale, as Caffe: powx(scale, -beta), then times x (on both
    cores, image by image, on the CPU)."""
    rows = math.prod(scale.shape[:2])
    flat_s, flat_x = xp.reshape(scale, (rows, -1)), xp.reshape(x, (rows, -1))

    def part(a, b):
        blas.powx(xp, flat_s[a:b], -beta, out=flat_s[a:b])
        flat_s[a:b] *= flat_x[a:b]

    parallel.split(xp, rows, part, elements=scale.size)
    return scale


def _inverse_power(xp, scale, beta):
    """scale^-beta as a fresh array (Caffe's powx(scale, -beta))."""
    return blas.powx(xp, scale, -beta)


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
        flat = xp.reshape(x, (self._rows(shape), -1))
        y = flat - xp.mean(flat, axis=1, keepdims=True, dtype=xp.float32)
        self._std = None
        if self.normalize_variance:
            std = xp.sqrt(xp.mean(y * y, axis=1, keepdims=True, dtype=xp.float32))
            std += f32(self.eps)
            if self.needs_backward:
                self._std = std  # Caffe's variance_ (sigma + eps), one per row, read by backward
            y = y / std
        return [xp.reshape(y, shape)]

    _std = None

    def _rows(self, shape):
        return shape[0] if self.across_channels else shape[0] * shape[1]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """Caffe's formula as is, whatever propagate_down says (training.md 10.5), per row r:
        normalize_variance: dx = (dy - mean(dy) - y mean(dy y)) / (sigma + eps), which omits a
        factor (sigma + eps) / sigma on the last term; else dx = dy - mean(dy).

        In place dy and dx are one array and Caffe overwrites it while it still reads it: with
        m = sum(y dy) it ends with (y m + sum(y m)) (1 - 1/dim) / (sigma + eps)."""
        x, y = bottoms[0], tops[0]
        rows = self._rows(legacy_shape(self, x.shape))
        dy = xp.reshape(top_diffs[0], (rows, -1))
        y = xp.reshape(y, (rows, -1))
        dim = dy.shape[1]
        if not self.normalize_variance:
            dx = dy - xp.mean(dy, axis=1, keepdims=True, dtype=dy.dtype)
            return [xp.reshape(dx, x.shape)]
        if self._std is None or self._std.shape[0] != rows:
            raise self.error("backward needs the std of a forward run with needs_backward set")
        inv_dim = f32(-1.0 / dim)
        dx = y * dy
        m = xp.sum(dx, axis=1, keepdims=True, dtype=dx.dtype)
        xp.multiply(y, m, out=dx)  # y * sum(dy y)
        if in_place(self.param):
            # top_diff is bottom_diff: it holds y * m now, so the "sum of dy" is sum(y m) and the
            # final axpby(1, top_diff, -1/dim, bottom_diff) reads one array twice.
            dx += xp.sum(dx, axis=1, keepdims=True, dtype=dx.dtype)
            dx += dx * inv_dim
        else:
            dx += xp.sum(dy, axis=1, keepdims=True, dtype=dy.dtype)
            dx *= inv_dim
            dx += dy
        dx /= self._std
        return [xp.reshape(dx, x.shape)]


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

    _std = None   # sqrt(var + eps) per channel (broadcastable), Caffe's temp_
    _x_norm = None  # a copy of the batch-mode output, Caffe's x_norm_ (later in-place layers may overwrite y)

    def forward(self, xp, bottoms, blobs):
        """Normalise per channel: y = (x - mean) / sqrt(var + eps).

        Global stats: mean = f * blob0, var = f * blob1 with f = 0 if blob2 == 0
        else 1 / blob2.  Otherwise the batch mean and biased batch variance over
        every axis but 1, and, as Caffe does on every batch-mode forward (whatever the
        phase), the running statistics in the blobs are updated in place (training.md
        10.5): blob2 = lambda blob2 + 1, blob0 = lambda blob0 + mean, blob1 = lambda blob1 +
        m/(m-1) var (m values per channel; factor 1 if m = 1), lambda = moving_average_fraction.
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
            mean = xp.mean(x, axis=axes, keepdims=True, dtype=xp.float32)
            centred = x - mean
            var = xp.mean(centred * centred, axis=axes, keepdims=True, dtype=xp.float32)
            self._update_running_stats(blobs, mean, var, x.size // self._channels(tuple(x.shape)))
        std = xp.sqrt(var + f32(self.eps))
        y = centred
        y /= std
        self._std = std if self.needs_backward else None
        self._x_norm = y.copy() if self.needs_backward and not self.use_global_stats else None
        return [y]

    def _update_running_stats(self, blobs, mean, var, m):
        fraction = f32(self.moving_average_fraction)
        blobs[2] *= fraction
        blobs[2] += f32(1)
        blobs[0] *= fraction
        blobs[0] += mean.reshape(blobs[0].shape)
        correction = f32(m) / f32(m - 1) if m > 1 else f32(1)
        blobs[1] *= fraction
        blobs[1] += var.reshape(blobs[1].shape) * correction

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """Whatever propagate_down says (Caffe always writes it); never touches the blobs' diffs.
        Batch mode: dx = (dy - mean(dy) - y mean(dy y)) / s with the forward's y and s;
        global mode: dx = dy / s.  Exact in place (Caffe copies dy first)."""
        dy = top_diffs[0]
        if self._std is None:
            raise self.error("backward needs the statistics of a forward run with needs_backward set")
        if self.use_global_stats:
            return [dy / self._std]
        y = self._x_norm
        axes = (0,) + tuple(range(2, dy.ndim))
        m = dy.size // self._channels(tuple(dy.shape))
        dx = y * dy
        sum_dyy = xp.sum(dx, axis=axes, keepdims=True, dtype=dx.dtype)
        xp.multiply(y, sum_dyy, out=dx)
        dx += xp.sum(dy, axis=axes, keepdims=True, dtype=dy.dtype)
        dx *= f32(-1.0 / m)
        dx += dy
        dx /= self._std
        return [dx]


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
        self.operand_axis = axis
        return axis

    def broadcast(self, xp, operand):
        """The operand (blob or bottom 1) shaped to broadcast against bottom 0."""
        return xp.reshape(operand, self.broadcast_shape)

    def dims(self, shape, operand_size):
        """Caffe's (outer_dim, operand count, inner_dim) for bottom 0's shape."""
        outer = 1
        for d in shape[:self.operand_axis]:
            outer *= int(d)
        count = 1
        for d in shape:
            count *= int(d)
        return outer, operand_size, count // max(outer * operand_size, 1)

    def reduce_to_operand(self, xp, a, operand_size):
        """Sum of `a` (bottom 0's shape) over the outer and inner axes: one value per operand entry."""
        outer, dim, inner = self.dims(tuple(a.shape), operand_size)
        return xp.sum(xp.reshape(a, (outer, dim, inner)), axis=(0, 2), dtype=a.dtype)

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

    _x = None  # the bottom of an in-place forward, kept for backward (Caffe's temp_ copy)

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        # The forward writes a new array, so x itself serves as Caffe's copy of an in-place bottom.
        self._x = x if self.needs_backward and in_place(self.param) else None
        if len(bottoms) == 2:
            scale, rest = bottoms[1], blobs
        else:
            scale, rest = blobs[0], blobs[1:]
        y = x * self.broadcast(xp, scale)
        if self.bias_term:
            y = y + self.broadcast(xp, rest[0])
        return [y]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """training.md 10.6.  dx = dy * s.  ds = sum of dy * x over the outer and inner axes:
        written (=) into bottom 1's diff; for a learned scale added (+=) into its diff, except
        overwritten when count(x) = D or (outer = 1, D > 1, inner > 1).  The bias (last blob)
        always accumulates db += sum dy.  In place x is the copy kept by forward.

        Caffe computes the product dy * x in bottom 0's diff (not in place, not elementwise): with
        propagate_down[0] false that diff is left holding it, and so is ours."""
        x, dy = bottoms[0], top_diffs[0]
        same = in_place(self.param)
        if same:
            if self._x is None:
                raise self.error("backward in place needs the bottom kept by a forward run with "
                                 "needs_backward set")
            x = self._x
        two = len(bottoms) == 2
        scale = bottoms[1] if two else blobs[0]
        out = [None] * len(bottoms)
        if self.bias_term and param_diffs[-1] is not None:
            acc = param_diffs[-1]
            acc += self.reduce_to_operand(xp, dy, acc.size).reshape(acc.shape)
        scratch = None
        wanted = propagate_down[1] if two else param_diffs[0] is not None
        if wanted:
            size = int(scale.size)
            outer, _, inner = self.dims(tuple(x.shape), size)
            product = dy * x
            eltwise = x.size == size
            ds = product.reshape(scale.shape) if eltwise else \
                self.reduce_to_operand(xp, product, size).reshape(scale.shape)
            if not eltwise and not same:
                scratch = product  # Caffe's "hack": the product lives in bottom 0's diff
            if two:
                out[1] = ds
            elif eltwise or (outer == 1 and size > 1 and inner > 1):
                param_diffs[0][...] = ds
            else:
                acc = param_diffs[0]
                acc += ds
        if propagate_down[0]:
            out[0] = dy * self.broadcast(xp, scale)
        elif scratch is not None:
            out[0] = scratch
        return out


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

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = dy (in place the same memory); a learned bias gets += sum dy over the outer and
        inner axes, a 2nd-bottom bias = sum dy."""
        dy = top_diffs[0]
        out = [None] * len(bottoms)
        if propagate_down[0]:
            out[0] = pass_through(self, dy)
        if len(bottoms) == 2:
            if propagate_down[1]:
                out[1] = self.reduce_to_operand(xp, dy, int(bottoms[1].size)).reshape(bottoms[1].shape)
        elif param_diffs and param_diffs[0] is not None:
            acc = param_diffs[0]
            acc += self.reduce_to_operand(xp, dy, acc.size).reshape(acc.shape)
        return out
