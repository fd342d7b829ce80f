"""Pooling and SPP (spatial pyramid pooling): 4-D bottoms, windows sized by caffeish.graph.geometry.

The forward pass loops over the kernel taps (kh*kw strided slices of a padded
copy of the input), never over pixels, and visits the taps in Caffe's row-major
window order so that results match Caffe's sequential float32 arithmetic:

* MAX: start from -FLT_MAX and take a cell only when strictly greater, so the
  first maximum in row-major order wins and NaN never does; padding cells hold
  -FLT_MAX and so never take part.  The mask is h*W + w within the plane
  (float32), -1 for a window that saw nothing greater than -FLT_MAX.
* AVE: the window's sum over the image, divided by its size clipped to
  [-pad, H + pad) (padding counts, the ceil-mode overhang does not).
* STOCHASTIC (TEST): sum(x*x) / sum(x) over the window clipped to the image,
  0 when sum(x) <= 0, as Caffe's GPU test-time kernel does.
"""
import numpy as np

from caffeish.runtime.backend import kernels_for
from caffeish.errors import ShapeError, UnsupportedError
from caffeish.graph.geometry import pool_params, reported_by, spp_pool_param
from caffeish.graph.registry import Layer, register
from caffeish.formats.schema import TRAIN, pb

FLT_MAX = float(np.finfo(np.float32).max)
MAX, AVE, STOCHASTIC = pb.PoolingParameter.MAX, pb.PoolingParameter.AVE, pb.PoolingParameter.STOCHASTIC


def _padded_plane(xp, x, geom, fill):
    """x (N, C, H, W) inside a (Hp, Wp) canvas filled with `fill`: cell (h, w) at (h + pad_h, w + pad_w).

    The canvas covers every window, including the ceil-mode overhang past H + pad.
    """
    n, c, h, w = x.shape
    sizes = tuple(
        max(size + p, (o - 1) * s + k)
        for size, p, o, s, k in zip((h, w), geom.pad, geom.out, geom.stride, geom.kernel)
    )
    if geom.pad == (0, 0) and sizes == (h, w):
        return x
    out = xp.full((n, c) + sizes, fill, dtype=np.float32)
    out[:, :, geom.pad[0]:geom.pad[0] + h, geom.pad[1]:geom.pad[1] + w] = x
    return out


def _taps(xpad, geom):
    """(i, j, view) for every kernel tap in row-major order: xpad[..., o*s + i, o*s + j]."""
    (kh, kw), (sh, sw), (oh, ow) = geom.kernel, geom.stride, geom.out
    for i in range(kh):
        for j in range(kw):
            yield i, j, xpad[:, :, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw]


def _covers_plane(geom, h, w):
    """One window holding the whole plane, no padding: a plain reduction does it."""
    return geom.out == (1, 1) and geom.pad == (0, 0) and geom.kernel[0] >= h and geom.kernel[1] >= w


def _max_pool(xp, x, geom, want_mask):
    """Caffe's MAX: the first maximum in row-major order, NaN never winning, floor -FLT_MAX.

    The maximum is an fmax chain over the taps (NaN-ignoring), which equals
    Caffe's strict-> scan from -FLT_MAX.  The mask is the first tap holding
    that maximum, found with branch-free arithmetic (masked copies are slow on
    random data): scanning the taps backwards, which = which + eq*(offset - which).
    """
    n, c, h, w = x.shape
    if _covers_plane(geom, h, w):
        return _max_whole_plane(xp, x, want_mask)
    xpad = _padded_plane(xp, x, geom, -FLT_MAX)
    if not want_mask:
        return _separable_max(xp, xpad, geom), None
    taps = list(_taps(xpad, geom))
    top = _fmax_chain(xp, [tap for _, _, tap in taps])
    xp.fmax(top, np.float32(-FLT_MAX), out=top)
    which = xp.zeros(top.shape, dtype=np.int32)  # the winner's offset i*W + j inside its window
    step = xp.empty(top.shape, dtype=np.int32)
    for i, j, tap in reversed(taps):
        eq = tap == top
        xp.subtract(np.int32(i * w + j), which, out=step)
        step *= eq
        which += step
    # Window top-left corners in the plane (negative inside the padding).
    hs = np.arange(geom.out[0]) * geom.stride[0] - geom.pad[0]
    ws = np.arange(geom.out[1]) * geom.stride[1] - geom.pad[1]
    which += xp.asarray((hs[:, None] * w + ws[None, :] + 1).astype(np.int32))
    # -1 where no cell beat -FLT_MAX (Caffe's initial value): (index + 1) * seen - 1.
    which *= top > np.float32(-FLT_MAX)
    which -= 1
    return top, which.astype(np.float32)


def _fmax_chain(xp, views):
    """fmax over the views (NaN-ignoring), floored at -FLT_MAX, in a new array."""
    if len(views) == 1:
        out = xp.fmax(views[0], np.float32(-FLT_MAX))
        return out
    out = xp.fmax(views[0], views[1])
    for v in views[2:]:
        xp.fmax(out, v, out=out)
    return out


def _separable_max(xp, xpad, geom):
    """The fmax over each window as a max over columns, then over rows: kh + kw passes, not kh*kw."""
    (kh, kw), (sh, sw), (oh, ow) = geom.kernel, geom.stride, geom.out
    part = xpad[:, :, :(oh - 1) * sh + kh]
    cols = _fmax_chain(xp, [part[:, :, :, j:j + (ow - 1) * sw + 1:sw] for j in range(kw)])
    top = _fmax_chain(xp, [cols[:, :, i:i + (oh - 1) * sh + 1:sh] for i in range(kh)])
    xp.fmax(top, np.float32(-FLT_MAX), out=top)
    return top


def _max_whole_plane(xp, x, want_mask):
    n, c, h, w = x.shape
    flat = xp.reshape(x, (n, c, h * w))
    if bool(xp.isnan(flat).any()):
        flat = xp.where(xp.isnan(flat), np.float32(-np.inf), flat)
    idx = xp.argmax(flat, axis=2)[:, :, None]  # first maximum
    best = xp.take_along_axis(flat, idx, axis=2)
    seen = best > np.float32(-FLT_MAX)
    top = xp.where(seen, best, np.float32(-FLT_MAX)).astype(np.float32).reshape(n, c, 1, 1)
    if not want_mask:
        return top, None
    mask = xp.where(seen, idx, -1).astype(np.float32).reshape(n, c, 1, 1)
    return top, mask


def _ave_divisor(geom, h, w):
    """Caffe's AVE pool size per output: the window clipped to [-pad, size + pad), as float32."""

    def sizes(o, s, p, k, size):
        start = np.arange(o) * s - p
        return np.minimum(start + k, size + p) - start

    dh = sizes(geom.out[0], geom.stride[0], geom.pad[0], geom.kernel[0], h)
    dw = sizes(geom.out[1], geom.stride[1], geom.pad[1], geom.kernel[1], w)
    return (dh[:, None] * dw[None, :]).astype(np.float32)


def _sequential_sum(xp, x, geom):
    """Window sums, accumulated tap by tap in row-major order (Caffe's float32 order)."""
    n, c, h, w = x.shape
    if _covers_plane(geom, h, w):
        # cumsum adds strictly left to right, like Caffe's loop.
        return xp.cumsum(xp.reshape(x, (n, c, h * w)), axis=2, dtype=np.float32)[:, :, -1:].reshape(n, c, 1, 1)
    total = None
    for _, _, tap in _taps(_padded_plane(xp, x, geom, 0.0), geom):
        if total is None:
            total = tap.astype(np.float32, copy=True)
        else:
            total += tap
    return total


def _ave_pool(xp, x, geom):
    n, c, h, w = x.shape
    total = _sequential_sum(xp, x, geom)
    divisor = _ave_divisor(geom, h, w)
    if (divisor <= 0).any():  # a window wholly past the input (stride > kernel, no pad): as Caffe, 0/0
        with np.errstate(divide="ignore", invalid="ignore"):
            return (total / xp.asarray(divisor)).astype(np.float32)
    total /= xp.asarray(divisor)
    return total


def _stochastic_test(xp, x, geom):
    """sum(x^2)/sum(x) over each window clipped to the image; 0 where sum(x) <= 0."""
    total = _sequential_sum(xp, x, geom)
    squares = _sequential_sum(xp, x * x, geom)
    positive = total > 0
    return xp.where(positive, squares / xp.where(positive, total, np.float32(1)), np.float32(0)).astype(np.float32)


def pool_forward(xp, x, geom, method, want_mask=False):
    """Pool x (N, C, H, W) with a PoolGeometry; returns (top, mask or None).

    On the GPU this is one launch of our kernel (kernels/pooling.cu)."""
    gpu = kernels_for(xp)
    if gpu is not None:
        return gpu.pool(x, geom, method, want_mask)
    n, c = x.shape[:2]
    if n * c * geom.out[0] * geom.out[1] == 0:
        empty = xp.zeros((n, c) + geom.out, dtype=np.float32)
        return empty, (empty.copy() if want_mask else None)
    if method == MAX:
        return _max_pool(xp, x, geom, want_mask)
    if method == AVE:
        return _ave_pool(xp, x, geom), None
    if method == STOCHASTIC:
        return _stochastic_test(xp, x, geom), None
    raise UnsupportedError(f"unknown pooling method {method}")


# -- backward (../shared/caffe/training.md 10.2) ----------------------------------------------------


def _canvas_shape(x_shape, geom):
    """(N, C, Hp, Wp) of _padded_plane's canvas for an input of x_shape."""
    n, c, h, w = x_shape
    return (n, c) + tuple(
        max(size + p, (o - 1) * s + k)
        for size, p, o, s, k in zip((h, w), geom.pad, geom.out, geom.stride, geom.kernel)
    )


def _tap_views(canvas, geom):
    """The kernel taps of `canvas` as (tap number, view), in REVERSE row-major order.

    Tap t = i*kw + j of output (p, q) is canvas cell (p*sh + i, q*sw + j).  A cell covered by
    several windows is reached by the later window through a smaller tap, so adding the taps
    in reverse order adds each cell's contributions in Caffe's output order (ph, pw), the
    float32 order of its sequential loop."""
    kw = geom.kernel[1]
    taps = list(_taps(canvas, geom))
    for i, j, view in reversed(taps):
        yield i * kw + j, view


def _from_canvas(xp, dpad, x_shape, geom):
    """The image part of a gradient canvas (cells in the padding or the ceil overhang dropped)."""
    h, w = x_shape[2:]
    if dpad.shape == tuple(x_shape):
        return dpad
    ph, pw = geom.pad
    return xp.ascontiguousarray(dpad[:, :, ph:ph + h, pw:pw + w])


def _max_winner(xp, x, y, geom):
    """Per output, the tap number of the first cell (row-major) of its window holding y; -1 where
    y is not above -FLT_MAX (Caffe's mask stays -1: no cell beat its initial value) or no cell
    holds y.  Padding cells hold -FLT_MAX and never match."""
    xpad = _padded_plane(xp, x, geom, -FLT_MAX)
    which = xp.full(y.shape, -1, dtype=np.int32)
    step = xp.empty(y.shape, dtype=np.int32)
    for t, tap in _tap_views(xpad, geom):  # backwards: the first match is written last
        xp.subtract(np.int32(t), which, out=step)
        step *= tap == y
        which += step
    which += np.int32(1)
    which *= y > np.float32(-FLT_MAX)
    which -= np.int32(1)
    return which


def _max_backward(xp, x, y, dy, geom):
    n, c, h, w = x.shape
    if _covers_plane(geom, h, w):
        # One window: the first cell equal to y gets dy (no cell gets anything where none does).
        flat = xp.reshape(x, (n, c, h * w))
        yy = xp.reshape(y, (n, c, 1))
        hit = flat == yy
        first = xp.argmax(hit, axis=2)[:, :, None]
        seen = xp.any(hit, axis=2, keepdims=True) & (yy > np.float32(-FLT_MAX))
        chosen = (xp.arange(h * w)[None, None, :] == first) & seen
        dx = xp.where(chosen, xp.reshape(dy, (n, c, 1)), np.float32(0))
        return xp.reshape(dx.astype(np.float32, copy=False), (n, c, h, w))
    which = _max_winner(xp, x, y, geom)
    dpad = xp.zeros(_canvas_shape(x.shape, geom), dtype=np.float32)
    zero = np.float32(0)
    for t, view in _tap_views(dpad, geom):
        view += xp.where(which == t, dy, zero)  # where, not dy * mask: inf/NaN reach the winner only
    return _from_canvas(xp, dpad, x.shape, geom)


def _ave_backward(xp, dy, x_shape, geom):
    n, c, h, w = x_shape
    divisor = _ave_divisor(geom, h, w)
    # A window with no cell in [-pad, size + pad) has divisor <= 0 and no image cell to reach.
    divisor = np.where(divisor > 0, divisor, np.float32(1)).astype(np.float32)
    share = dy / xp.asarray(divisor)  # Caffe: top_diff / pool_size, in float
    if _covers_plane(geom, h, w):
        dx = xp.empty((n, c, h, w), dtype=np.float32)
        dx[...] = share
        return dx
    dpad = xp.zeros(_canvas_shape(x_shape, geom), dtype=np.float32)
    for _, view in _tap_views(dpad, geom):
        view += share
    return _from_canvas(xp, dpad, x_shape, geom)


def pool_backward(xp, x, y, dy, geom, method):
    """Caffe's Pooling backward: dx (N, C, H, W) for the bottom x, the top y and its diff dy.

    MAX: each output's dy goes to the first cell of its window (row-major) equal to y, padding
    never; overlapping windows add up (in Caffe's output order); an output whose y is not above
    -FLT_MAX (a window of -inf or NaN: Caffe's mask is -1) sends nothing.  AVE: dy / pool_size,
    the forward's divisor, to every cell of the window inside the image; padding cells get
    nothing.  STOCHASTIC: Caffe's CPU build does not implement it (UnsupportedError).
    x, y, dy as the forward's bottom, top and the top's diff; geom and method as for
    pool_forward.  On the GPU one launch of our kernel (kernels/pooling.cu)."""
    if method == STOCHASTIC:
        raise UnsupportedError("STOCHASTIC pooling has no backward (Caffe: Backward_cpu is NOT_IMPLEMENTED)")
    if method not in (MAX, AVE):
        raise UnsupportedError(f"unknown pooling method {method}")
    gpu = kernels_for(xp)
    if gpu is not None:
        return gpu.pool_backward(x, y, dy, geom, method)
    if x.size == 0 or dy.size == 0:
        return xp.zeros(x.shape, dtype=np.float32)
    if method == MAX:
        return _max_backward(xp, x, y, dy, geom)
    return _ave_backward(xp, dy, x.shape, geom)


def _mask_backward(xp, mask, dy, x_shape):
    """MAX with a mask top: dx[plane, int(mask)] += dy, in output order (Caffe reads the mask
    top's data, truncated to int).  Indices outside the plane (-1: the window saw nothing above
    -FLT_MAX) are dropped; Caffe's CPU loop would write outside the plane there."""
    n, c, h, w = x_shape
    planes, hw = n * c, h * w
    dx = xp.zeros(planes * hw, dtype=np.float32)
    if dy.size == 0 or hw == 0:
        return xp.reshape(dx, x_shape)
    index = xp.reshape(mask, (planes, -1)).astype(np.int64)
    valid = (index >= 0) & (index < hw)
    index += xp.arange(planes, dtype=np.int64)[:, None] * hw
    xp.add.at(dx, index[valid], xp.reshape(dy, (planes, -1))[valid])
    return xp.reshape(dx, x_shape)


def _stochastic_backward(layer):
    return UnsupportedError(
        f"layer '{layer.name}' ({layer.type}): STOCHASTIC pooling cannot backpropagate (Caffe: "
        "Backward_cpu is NOT_IMPLEMENTED, and the GPU one needs the indices sampled by a TRAIN forward)"
    )


def _check_runnable(layer, method):
    if method == STOCHASTIC and layer.phase == TRAIN:
        raise UnsupportedError(
            f"layer '{layer.name}' ({layer.type}): STOCHASTIC pooling samples at random in the TRAIN "
            "phase (and Caffe's CPU build does not implement it); only TEST is supported"
        )


def _check_4d(layer, shape):
    if len(shape) != 4:
        raise layer.error(
            f"the bottom must have 4 axes (num, channels, height, width), got shape {tuple(shape)}"
        )


@register("Pooling")
class Pooling(Layer):
    """Caffe's Pooling: (N, C, H, W) -> (N, C, pooled_h, pooled_w).

    MAX, AVE and STOCHASTIC pooling share the size rule (ceil by default, with the
    pad-only clip rule).  A second top, the argmax mask, is allowed only for MAX
    and has the same shape as the first.
    """

    exact_bottoms = 1
    min_tops = 1
    max_tops = 2

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.pool_param = param.pooling_param
        self.method = self.pool_param.pool
        # Set by reshape(), for the forward pass.
        self.geometry = None

    def reshape(self, bottom_shapes):
        bottom = tuple(bottom_shapes[0])
        _check_4d(self, bottom)
        n_tops = len(self.param.top)
        if n_tops > 1 and self.method != pb.PoolingParameter.MAX:
            method = pb.PoolingParameter.PoolMethod.Name(self.method)
            raise self.error(f"a second top (the max mask) is only allowed for MAX pooling, not {method}")
        n, c, h, w = bottom
        with reported_by(self):
            self.geometry = pool_params(self.pool_param, h, w)
        top = (n, c) + self.geometry.out
        return [top] * n_tops

    # MAX's top as its forward computed it, kept when the backward will run (a later in-place
    # layer may rewrite the top blob; Caffe keeps its argmax mask instead).
    saved_top = None

    def forward(self, xp, bottoms, blobs):
        _check_runnable(self, self.method)
        want_mask = len(self.param.top) > 1
        top, mask = pool_forward(xp, bottoms[0], self.geometry, self.method, want_mask)
        keep = self.needs_backward and self.method == MAX and not want_mask
        self.saved_top = top.copy() if keep else None
        return [top, mask] if want_mask else [top]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """training.md 10.2: dx zeroed, then MAX sends dy to each window's first maximum (with a
        mask top, to the index in the mask top's data) and AVE dy/pool_size to the window's
        image cells.  Nothing when propagate_down is false (Caffe returns first)."""
        if not propagate_down[0]:
            return [None]
        if self.method == STOCHASTIC:
            raise _stochastic_backward(self)
        x = bottoms[0]
        if len(top_diffs) > 1:
            return [_mask_backward(xp, tops[1], top_diffs[0], tuple(x.shape))]
        y = self.saved_top if self.saved_top is not None else tops[0]
        return [pool_backward(xp, x, y, top_diffs[0], self.geometry, self.method)]


@register("SPP")
class SPP(Layer):
    """Caffe's spatial pyramid pooling.

    Level l (0 <= l < pyramid_height) pools the input into 2**l x 2**l bins with
    the window chosen by geometry.spp_pool_param; each level's output is flattened
    and the levels are concatenated, so the top is (N, C * sum of the levels'
    pooled_h*pooled_w), normally (N, C * sum 4**l).  With pyramid_height 1 Caffe
    returns the single pooling's 4-D output (N, C, 1, 1) instead.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.pyramid_height = param.spp_param.pyramid_height
        # SPPParameter.PoolMethod has the same numbers as PoolingParameter.PoolMethod.
        self.method = param.spp_param.pool
        # Set by reshape(): the PoolGeometry of each level.
        self.levels = None

    def reshape(self, bottom_shapes):
        bottom = tuple(bottom_shapes[0])
        _check_4d(self, bottom)
        n, c, h, w = bottom
        if h <= 0 or w <= 0:
            raise self.error(f"input height and width must be positive, got {h}x{w}")
        if self.pyramid_height < 1:
            raise self.error("spp_param.pyramid_height must be at least 1")
        levels = []
        for level in range(self.pyramid_height):
            pp = spp_pool_param(level, h, w, self.method)
            try:
                levels.append(pool_params(pp, h, w))
            except ShapeError as exc:
                bins = 2 ** level
                raise self.error(
                    f"pyramid level {level} ({bins}x{bins} bins on a {h}x{w} input): {exc}"
                ) from None
        self.levels = levels
        if self.pyramid_height == 1:
            return [(n, c) + levels[0].out]
        return [(n, c * sum(g.out[0] * g.out[1] for g in levels))]

    # Each level's pooled output, kept for a MAX backward (the top may be rewritten in place).
    saved_levels = None

    def forward(self, xp, bottoms, blobs):
        """Each level pooled, flattened to (N, C*bins) and concatenated in level order."""
        _check_runnable(self, self.method)
        x = bottoms[0]
        n = x.shape[0]
        pooled = [pool_forward(xp, x, g, self.method)[0] for g in self.levels]
        self.saved_levels = None
        if self.needs_backward and self.method == MAX:
            # With several levels the top is a concatenated copy: the level arrays are ours.
            self.saved_levels = [pooled[0].copy()] if self.pyramid_height == 1 else pooled
        if self.pyramid_height == 1:
            return [pooled[0]]
        return [xp.concatenate([p.reshape(n, -1) for p in pooled], axis=1)]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """training.md 10.2: the chain of Caffe's internal layers.  The Concat gives each level its
        columns of dy, the Flatten reshapes them, each Pooling scatters them, and the Split adds
        the levels' diffs in level order."""
        if not propagate_down[0]:
            return [None]
        if self.method == STOCHASTIC:
            raise _stochastic_backward(self)
        x = bottoms[0]
        n, c = x.shape[:2]
        dy = top_diffs[0]
        saved = self.saved_levels
        dx, start = None, 0
        for level, geom in enumerate(self.levels):
            if self.pyramid_height == 1:
                y_level, dy_level = tops[0], dy
            else:
                width = c * geom.out[0] * geom.out[1]
                shape = (n, c) + geom.out
                dy_level = xp.reshape(xp.ascontiguousarray(dy[:, start:start + width]), shape)
                if saved is None:
                    y_level = xp.reshape(xp.ascontiguousarray(tops[0][:, start:start + width]), shape)
                start += width
            if saved is not None:
                y_level = saved[level]
            part = pool_backward(xp, x, y_level, dy_level, geom, self.method)
            if dx is None:
                dx = part
            else:
                dx += part
        return [dx]
