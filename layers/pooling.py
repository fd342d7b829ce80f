"""Pooling and SPP (spatial pyramid pooling): 4-D bottoms, windows sized by caffeish.graph.geometry.

The array code sees the N*C planes as one (P, H, W) array and loops over the
kernel taps (strided slices: tap (i, j) of output (p, q) is cell
(p*sh + i - pad_h, q*sw + j - pad_w)), never over pixels.  A tap's slice holds
only the outputs whose cell is inside the image, so padding and the ceil-mode
overhang are never materialised.  Taps are visited in Caffe's row-major window
order, so that results match Caffe's sequential float32 arithmetic:

* MAX: start from -FLT_MAX and take a cell only when strictly greater, so the
  first maximum in row-major order wins and NaN never does; padding never takes
  part.  The mask is h*W + w within the plane (float32), -1 for a window that
  saw nothing greater than -FLT_MAX.
* AVE: 0 plus the window's cells inside the image, in row-major order, divided
  by its size clipped to [-pad, H + pad) (padding counts, the ceil-mode overhang
  does not).
* STOCHASTIC (TEST): sum(x*x) / sum(x) over the window clipped to the image,
  0 when sum(x) <= 0, as Caffe's GPU test-time kernel does.

Speed on numpy (every pass is a numpy loop, so what counts is how many passes
there are and how they stride): the planes are cut into blocks of about BLOCK
elements, which stay in the caches through a block's passes, and the blocks
run on all the cores (caffeish.runtime.parallel).  numpy's loops over strided
elements run several times slower than over contiguous ones, and masked copies
(copyto where=) slower still on irregular masks, so:
* the MAX forward takes the window rows first (whole image rows, contiguous),
  then the columns;
* the first match of a window is a minimum over the taps (of the tap's number
  or offset where it matches), and values are routed by multiplying their bits
  by a boolean, never by masked copies;
* 2x2 windows of stride 2 (VGG's) have MAX backward, mask and AVE backward
  paths that touch no strided element: each window row's two cells are
  compared with y written twice side by side (one integer multiply of its bits
  by 0x100000001), the first match is found with 16-bit shifts over the pairs
  of booleans, and dx is written one window row at a time.
"""
import sys

import numpy as np

from caffeish.runtime import parallel
from caffeish.runtime.backend import kernels_for
from caffeish.errors import ShapeError, UnsupportedError
from caffeish.graph.geometry import pool_params, reported_by, spp_pool_param
from caffeish.graph.registry import Layer, register
from caffeish.formats.schema import TRAIN, pb

FLT_MAX = float(np.finfo(np.float32).max)
MAX, AVE, STOCHASTIC = pb.PoolingParameter.MAX, pb.PoolingParameter.AVE, pb.PoolingParameter.STOCHASTIC

# Input elements per block of planes: a block's arrays stay in the caches between its passes.
BLOCK = 1 << 19

_NEG = np.float32(-FLT_MAX)
_ZERO = np.float32(0)
_TWICE = np.uint64(0x100000001)  # a 32-bit value times this: the value in both halves of 64 bits
_ALL = slice(None)


# -- tap geometry -----------------------------------------------------------------------------------


def _axis_tap(i, s, pad, size, lo, hi):
    """The outputs o in [lo, hi) whose tap i (cell o*s + i - pad) is inside [0, size), and those
    cells, as (outputs, cells) slices; None when there are none."""
    a = max(lo, -((i - pad) // s))
    b = min(hi, (size - 1 + pad - i) // s + 1)
    if b <= a:
        return None
    start = a * s + i - pad
    return slice(a, b), slice(start, start + (b - a - 1) * s + 1, s)


def _taps(geom, h, w, rect=None):
    """(i, j, outputs, cells) for every kernel tap in row-major order, as index tuples into the
    (P, oh, ow) outputs and the (P, H, W) input; only outputs inside rect (p0, p1, q0, q1) whose
    cell is inside the image.  Taps with no such output are left out."""
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = geom.kernel, geom.stride, geom.pad, geom.out
    p0, p1, q0, q1 = rect if rect is not None else (0, oh, 0, ow)
    rows = [_axis_tap(i, sh, ph, h, p0, p1) for i in range(kh)]
    cols = [_axis_tap(j, sw, pw, w, q0, q1) for j in range(kw)]
    return [(i, j, (_ALL, r[0], c[0]), (_ALL, r[1], c[1]))
            for i, r in enumerate(rows) if r is not None
            for j, c in enumerate(cols) if c is not None]


def _whole(geom):
    """The index of all the (P, oh, ow) outputs, as _taps writes it for a tap that reaches them all."""
    return (_ALL, slice(0, geom.out[0]), slice(0, geom.out[1]))


def _interior(geom, h, w):
    """(p0, p1, q0, q1): the outputs whose whole window is inside the image; None if none is."""

    def axis(k, s, p, size, o):
        return -(-p // s), min(o, (size + p - k) // s + 1)

    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = geom.kernel, geom.stride, geom.pad, geom.out
    (p0, p1), (q0, q1) = axis(kh, sh, ph, h, oh), axis(kw, sw, pw, w, ow)
    return (p0, p1, q0, q1) if p1 > p0 and q1 > q0 else None


def _around(out, inner):
    """The output rectangles around `inner`: together with it, the whole (oh, ow) grid."""
    (oh, ow), (p0, p1, q0, q1) = out, inner
    rects = [(0, p0, 0, ow), (p1, oh, 0, ow), (p0, p1, 0, q0), (p0, p1, q1, ow)]
    return [r for r in rects if r[1] > r[0] and r[3] > r[2]]


def _rest_after_pairs(geom, h, w, pairs, fast):
    """The output rectangles left for the general tap loop: the whole grid ([None]), or, where
    `pairs` allows and some windows lie wholly inside the image, `fast(inner)` does those (the
    2x2 stride-2 path) and the rectangles around them are left."""
    inner = _interior(geom, h, w) if pairs else None
    if inner is None:
        return [None]
    fast(inner)
    return _around(geom.out, inner)


def _disjoint(geom):
    """No two windows share a cell (kernel <= stride on both axes)."""
    return geom.kernel[0] <= geom.stride[0] and geom.kernel[1] <= geom.stride[1]


def _tiles(geom, h, w):
    """Every image cell lies in some window (no gaps between windows, none past the last)."""
    return all(k >= s and (o - 1) * s - p + k >= size
               for k, s, p, o, size in zip(geom.kernel, geom.stride, geom.pad, geom.out, (h, w)))


def _pair_2x2(geom):
    return tuple(geom.kernel) == (2, 2) and tuple(geom.stride) == (2, 2)


def _covers_plane(geom, h, w):
    """One window holding the whole plane, no padding: a plain reduction does it."""
    return geom.out == (1, 1) and geom.pad == (0, 0) and geom.kernel[0] >= h and geom.kernel[1] >= w


# -- helpers ----------------------------------------------------------------------------------------


def _planes(xp, a):
    """(N, C, ...) -> (N*C, ...)."""
    return xp.reshape(a, (a.shape[0] * a.shape[1],) + tuple(a.shape[2:]))


def _blocks(xp, planes, plane_size, fn):
    """fn(lo, hi) over [0, planes): on numpy in blocks of about BLOCK elements, spread over the cores."""
    if planes <= 0:
        return
    if xp is not np:
        fn(0, planes)
        return
    step = max(1, BLOCK // max(1, plane_size))

    def run(lo, hi):
        for b in range(lo, hi, step):
            fn(b, min(hi, b + step))

    parallel.split(xp, planes, run, elements=planes * plane_size)


def _twice(xp, a):
    """(..., m) float32 -> (..., 2m): every value twice, side by side (its bits times 0x100000001)."""
    wide = a.view(np.uint32).astype(np.uint64)
    xp.multiply(wide, _TWICE, out=wide)
    return wide.view(np.float32)


def _row_pairs(xp, a, geom, inner):
    """The cells of the 2x2 windows `inner` of a (P, H, W): (P, n, 2, 2m), [p, i, 2q + j] = window
    (p0 + p, q0 + q)'s cell (i, j).  A view (a's planes must be contiguous when writing into it)."""
    p0, p1, q0, q1 = inner
    r, c = 2 * p0 - geom.pad[0], 2 * q0 - geom.pad[1]
    n, m = p1 - p0, q1 - q0
    return xp.reshape(a[:, r:r + 2 * n], (a.shape[0], n, 2, a.shape[2]))[..., c:c + 2 * m]


def _unseen(xp, y):
    """Where y is not above -FLT_MAX (Caffe's mask stays -1 there: no cell beat its initial value),
    or None when that is nowhere."""
    if bool(y.min() > _NEG):  # NaN in y: False, so checked below
        return None
    return xp.logical_not(y > _NEG)


# -- forward ----------------------------------------------------------------------------------------


def _fmax_taps(xp, out, pieces, whole):
    """out = fmax over pieces (index into out, view); `whole` is the index of all of out.  Returns
    whether out is floored at -FLT_MAX (outputs that no piece reaches hold -FLT_MAX)."""
    full = [v for index, v in pieces if index == whole]
    rest = [(index, v) for index, v in pieces if index != whole]
    if len(full) >= 2:
        xp.fmax(full[0], full[1], out=out)
        floored = False
    elif full:
        xp.fmax(full[0], _NEG, out=out)
        floored = True
    else:
        out.fill(_NEG)
        floored = True
    for v in full[2:]:
        xp.fmax(out, v, out=out)
    for index, v in rest:
        xp.fmax(out[index], v, out=out[index])
    return floored


def _max_block(xp, x, top, geom):
    """top (P, oh, ow) = the fmax (NaN-ignoring: Caffe's strict > scan) of each window of x
    (P, H, W), floored at -FLT_MAX: over the window rows first (whole image rows, contiguous),
    then over the columns."""
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = geom.kernel, geom.stride, geom.pad, geom.out
    h, w = x.shape[1:]
    rows = xp.empty((x.shape[0], oh, w), dtype=top.dtype)
    pieces = []
    for i in range(kh):
        tap = _axis_tap(i, sh, ph, h, 0, oh)
        if tap is not None:
            pieces.append(((_ALL, tap[0]), x[:, tap[1]]))
    floored = _fmax_taps(xp, rows, pieces, (_ALL, slice(0, oh)))
    pieces = []
    for j in range(kw):
        tap = _axis_tap(j, sw, pw, w, 0, ow)
        if tap is not None:
            pieces.append(((_ALL, _ALL, tap[0]), rows[:, :, tap[1]]))
    floored = _fmax_taps(xp, top, pieces, (_ALL, _ALL, slice(0, ow))) or floored
    if not floored:
        xp.fmax(top, _NEG, out=top)


def _mask_block(xp, x, top, mask, geom, pairs):
    """mask = the plane index h*W + w of each window's first cell (row-major) equal to top, as
    float32; -1 where top is not above -FLT_MAX.  The first cell is the one at the least offset
    from the window's corner (i*W + j grows in row-major order): a minimum over the taps of the
    offset where the cell matches, of `none` where it does not (2x2 windows of stride 2:
    _mask_pairs).  Arithmetic, not masked copies: those are slow on irregular masks."""
    h, w = x.shape[1:]
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = geom.kernel, geom.stride, geom.pad, geom.out
    wide = np.int32 if (h + kh) * (w + kw) < 1 << 28 else np.int64
    none = 1 << (30 if wide is np.int32 else 62)
    which = xp.full(top.shape, none, dtype=wide)
    rects = _rest_after_pairs(geom, h, w, pairs, lambda inner: _mask_pairs(xp, x, top, which, geom, inner, none))
    hit = xp.empty(top.shape, dtype=np.bool_)
    offset = xp.empty(top.shape, dtype=wide)
    whole = _whole(geom)
    for rect in rects:
        for i, j, o, c in _taps(geom, h, w, rect):
            span = o
            if rect is None:  # all the outputs: the passes run over whole arrays, their loops are long
                if o != whole:
                    hit.fill(False)
                span = _ALL
            xp.equal(x[c], top[o], out=hit[o])
            xp.multiply(hit[span], wide(i * w + j - none), out=offset[span])
            xp.add(offset[span], wide(none), out=offset[span])  # i*W + j where the cell matches, else none
            xp.minimum(which[span], offset[span], out=which[span])
    found = which < none
    unseen = _unseen(xp, top)
    if unseen is not None:
        xp.logical_and(found, xp.logical_not(unseen), out=found)
    corners = (np.arange(oh) * sh - ph)[:, None] * w + (np.arange(ow) * sw - pw)[None, :]
    which += xp.asarray((corners + 1).astype(wide))
    which *= found
    which -= 1  # (index + 1) * found - 1
    mask[...] = which


def _mask_pairs(xp, x, top, which, geom, inner, none):
    """_mask_block's offsets for the 2x2 windows of stride 2 `inner`, in contiguous passes: per
    window row i, i*W if its left cell matches, else i*W + 1 if the right one does, else none;
    the least of the two rows."""
    p0, p1, q0, q1 = inner
    w = x.shape[2]
    hit = xp.equal(_row_pairs(xp, x, geom, inner), _twice(xp, top[:, p0:p1, q0:q1])[:, :, None, :])
    hit = hit.view(np.uint16)  # (P, n, 2, m): one window row's two booleans
    out = which[:, p0:p1, q0:q1]
    row1 = xp.empty(out.shape, dtype=out.dtype)
    for i, dest in ((0, out), (1, row1)):
        row = hit[:, :, i]
        kind = dest.dtype.type
        xp.multiply(row == 0, kind(none - i * w - 1), out=dest)
        xp.add(dest, kind(i * w + 1), out=dest)
        xp.subtract(dest, _left(xp, row), out=dest)  # none, or i*W + (0 if the left cell matches else 1)
    xp.minimum(out, row1, out=out)


def _left(xp, pairs):
    """The left cell's boolean of 16-bit pairs of booleans (the one first in memory)."""
    return xp.bitwise_and(pairs, 1) if sys.byteorder == "little" else xp.right_shift(pairs, 8)


def _sum_block(xp, x, total, geom):
    """total = 0 + the window's image cells in row-major order (Caffe's float32 order; padding
    cells would add +0.0, which changes no sum that starts at +0.0)."""
    h, w = x.shape[1:]
    taps = _taps(geom, h, w)
    if taps and taps[0][2] == _whole(geom):  # the first tap of every window: start from 0 + it
        xp.add(x[taps[0][3]], _ZERO, out=total)
        taps = taps[1:]
    else:
        total.fill(0)
    for _, _, o, c in taps:
        xp.add(total[o], x[c], out=total[o])


def _max_whole_plane(xp, x, want_mask):
    n, c, h, w = x.shape
    flat = xp.reshape(x, (n, c, h * w))
    if bool(xp.isnan(flat).any()):
        flat = xp.where(xp.isnan(flat), np.float32(-np.inf), flat)
    idx = xp.argmax(flat, axis=2)[:, :, None]  # first maximum
    best = xp.take_along_axis(flat, idx, axis=2)
    seen = best > _NEG
    top = xp.where(seen, best, _NEG).astype(np.float32).reshape(n, c, 1, 1)
    if not want_mask:
        return top, None
    mask = xp.where(seen, idx, -1).astype(np.float32).reshape(n, c, 1, 1)
    return top, mask


def _whole_plane_sum(xp, x):
    """0 + the plane's cells, left to right (cumsum adds strictly in order, as Caffe's loop)."""
    n, c, h, w = x.shape
    total = xp.cumsum(xp.reshape(x, (n, c, h * w)), axis=2, dtype=np.float32)[:, :, -1:].reshape(n, c, 1, 1)
    return total + _ZERO  # Caffe starts from +0.0: a sum of -0.0s is +0.0


def _ave_divisor(geom, h, w):
    """Caffe's AVE pool size per output: the window clipped to [-pad, size + pad), as float32."""

    def sizes(o, s, p, k, size):
        start = np.arange(o) * s - p
        return np.minimum(start + k, size + p) - start

    dh = sizes(geom.out[0], geom.stride[0], geom.pad[0], geom.kernel[0], h)
    dw = sizes(geom.out[1], geom.stride[1], geom.pad[1], geom.kernel[1], w)
    return (dh[:, None] * dw[None, :]).astype(np.float32)


def _stochastic(xp, total, squares):
    """sum(x^2)/sum(x); 0 where sum(x) <= 0."""
    positive = total > 0
    return xp.where(positive, squares / xp.where(positive, total, np.float32(1)), _ZERO).astype(np.float32)


def pool_forward(xp, x, geom, method, want_mask=False):
    """Pool x (N, C, H, W) with a PoolGeometry; returns (top, mask or None).

    On the GPU this is one launch of our kernel (kernels/pooling.cu)."""
    gpu = kernels_for(xp)
    if gpu is not None:
        return gpu.pool(x, geom, method, want_mask)
    if method not in (MAX, AVE, STOCHASTIC):
        raise UnsupportedError(f"unknown pooling method {method}")
    n, c, h, w = x.shape
    oh, ow = geom.out
    if n * c * oh * ow == 0:
        empty = xp.zeros((n, c) + geom.out, dtype=np.float32)
        return empty, (empty.copy() if want_mask else None)
    want_mask = want_mask and method == MAX
    if x.dtype != np.float32 and x.dtype != np.float64:
        x = x.astype(np.float32)
    if _covers_plane(geom, h, w):
        if method == MAX:
            return _max_whole_plane(xp, x, want_mask)
        total = _whole_plane_sum(xp, x)
        if method == AVE:
            return total / xp.asarray(_ave_divisor(geom, h, w)), None
        return _stochastic(xp, total, _whole_plane_sum(xp, x * x)), None
    planes = _planes(xp, x)
    # MAX keeps a float64 bottom's precision (the float64 gradient checks); the rest is float32.
    top = xp.empty((n * c, oh, ow), dtype=x.dtype if method == MAX else np.float32)
    mask = xp.empty((n * c, oh, ow), dtype=np.float32) if want_mask else None
    divisor = xp.asarray(_ave_divisor(geom, h, w)) if method == AVE else None
    pairs = _pair_2x2(geom) and x.dtype == np.float32

    def block(lo, hi):
        xb, tb = planes[lo:hi], top[lo:hi]
        if method == MAX:
            _max_block(xp, xb, tb, geom)
            if want_mask:
                _mask_block(xp, xb, tb, mask[lo:hi], geom, pairs)
        elif method == AVE:
            _sum_block(xp, xb, tb, geom)
            with np.errstate(divide="ignore", invalid="ignore"):  # a window wholly past the input: 0/0, as Caffe
                xp.divide(tb, divisor, out=tb)
        else:
            squares = xp.empty(tb.shape, dtype=np.float32)
            _sum_block(xp, xb, tb, geom)
            _sum_block(xp, xb * xb, squares, geom)
            tb[...] = _stochastic(xp, tb, squares)

    _blocks(xp, n * c, h * w, block)
    top = xp.reshape(top, (n, c, oh, ow))
    return top, (xp.reshape(mask, (n, c, oh, ow)) if want_mask else None)


# -- backward (../shared/caffe/training.md 10.2) ----------------------------------------------------
#
# Caffe zeroes dx and adds each output's share (dx[cell] += d): a cell in one window only ends as
# 0 + d, which is d except that -0.0 becomes +0.0; the disjoint paths below write 0 + d directly.
# Where windows overlap, the taps are added in REVERSE row-major order: a cell covered by several
# windows is reached by the later window through a smaller tap, so each cell adds its shares in
# Caffe's output order (ph, pw), the float32 order of its sequential loop.  Adding +0.0 for an
# output that sends nothing changes no such sum (it starts at +0.0 and so is never -0.0).


def _max_back_disjoint(xp, x, y, dy, dx, geom, fill, pairs):
    """MAX backward where no two windows share a cell: for each tap in row-major order, the
    outputs whose cell equals y get what is left of 0 + dy (its bits times the match), and that
    is then taken from what is left, so only the first match of a window receives it."""
    h, w = x.shape[1:]
    if fill:
        dx.fill(0)
    rest = xp.add(dy, _ZERO)  # 0 + dy
    rest_bits = rest.view(np.int32)
    unseen = _unseen(xp, y)
    if unseen is not None:
        xp.multiply(rest_bits, xp.logical_not(unseen), out=rest_bits)  # those send nothing
    rects = _rest_after_pairs(geom, h, w, pairs, lambda inner: _max_back_pairs(xp, x, y, rest, dx, geom, inner))
    hit = xp.empty(y.shape, dtype=np.bool_)
    dx_bits = dx.view(np.int32)
    for rect in rects:
        taps = _taps(geom, h, w, rect)
        for k, (_, _, o, c) in enumerate(taps):
            xp.equal(x[c], y[o], out=hit[o])
            xp.multiply(hit[o], rest_bits[o], out=dx_bits[c])
            if k + 1 < len(taps):
                xp.subtract(rest_bits[o], dx_bits[c], out=rest_bits[o])


def _max_back_pairs(xp, x, y, rest, dx, geom, inner):
    """_max_back_disjoint for the 2x2 windows of stride 2 `inner`, in contiguous passes."""
    p0, p1, q0, q1 = inner
    cells = _row_pairs(xp, x, geom, inner)  # (P, n, 2, 2m)
    hit = xp.equal(cells, _twice(xp, y[:, p0:p1, q0:q1])[:, :, None, :])
    hit = hit.view(np.uint16)  # (P, n, 2, m): one window row's two booleans, the left one first in memory
    first = xp.left_shift(hit, 8) if sys.byteorder == "little" else xp.right_shift(hit, 8)  # left -> right
    xp.invert(first, out=first)
    xp.bitwise_and(hit, first, out=first)  # the right cell only where the left one does not match
    xp.multiply(first[:, :, 1], hit[:, :, 0] == 0, out=first[:, :, 1])  # row 1 only where row 0 has none
    share = _twice(xp, rest[:, p0:p1, q0:q1]).view(np.int32)
    out = _row_pairs(xp, dx, geom, inner).view(np.int32)
    xp.multiply(first.view(np.uint8), share[:, :, None, :], out=out)


def _max_back_overlap(xp, x, y, dy, dx, geom):
    """MAX backward with overlapping windows: each output's winning tap (the first match: the
    least tap number t that matches, a minimum over the taps of t or K), then the taps added in
    reverse order."""
    h, w = x.shape[1:]
    taps = list(enumerate(_taps(geom, h, w)))
    k = len(taps)
    kind = np.int8 if k < 1 << 7 else np.int16 if k < 1 << 15 else np.int32
    whole = _whole(geom)
    which = xp.full(y.shape, k, dtype=kind)
    hit = xp.empty(y.shape, dtype=np.bool_)
    tap = xp.empty(y.shape, dtype=kind)
    for t, (_, _, o, c) in taps:
        if o != whole:
            hit.fill(False)  # the passes below run over whole arrays: their loops are long
        xp.equal(x[c], y[o], out=hit[o])
        xp.multiply(hit, kind(t - k), out=tap)
        xp.add(tap, kind(k), out=tap)  # t where the cell matches, else k
        xp.minimum(which, tap, out=which)
    dy_bits = dy.view(np.int32)
    unseen = _unseen(xp, y)
    if unseen is not None:
        dy_bits = dy_bits * xp.logical_not(unseen)  # those send nothing
    dx.fill(0)
    share = xp.empty(y.shape, dtype=np.int32)
    share_f = share.view(np.float32)
    for t, (_, _, o, c) in reversed(taps):
        xp.equal(which, kind(t), out=hit)
        xp.multiply(hit, dy_bits, out=share)  # dy's bits or +0.0: inf and NaN reach the winner only
        xp.add(dx[c], share_f[o], out=dx[c])


def _max_backward(xp, x, y, dy, geom):
    n, c, h, w = x.shape
    if _covers_plane(geom, h, w):
        # One window: the first cell equal to y gets 0 + dy (nothing where none does).
        planes, size = n * c, h * w
        flat = xp.reshape(x, (planes, size))
        yy = xp.reshape(y, (planes, 1))
        hit = flat == yy
        first = xp.argmax(hit, axis=1)
        rows = xp.arange(planes)
        won = hit[rows, first] & (yy[:, 0] > _NEG)
        dx = xp.zeros(planes * size, dtype=np.float32)
        dx[(rows * size + first)[won]] = (xp.reshape(dy, (planes,)) + _ZERO)[won]
        return xp.reshape(dx, (n, c, h, w))
    xs, ys, dys = _planes(xp, x), _planes(xp, y), _planes(xp, dy)
    dys = dys.astype(np.float32, copy=False)  # dy's bits are routed as float32's
    dx = xp.empty((n * c, h, w), dtype=np.float32)
    if _disjoint(geom):
        fill = not _tiles(geom, h, w)
        pairs = _pair_2x2(geom) and x.dtype == np.float32 and y.dtype == np.float32

        def block(lo, hi):
            _max_back_disjoint(xp, xs[lo:hi], ys[lo:hi], dys[lo:hi], dx[lo:hi], geom, fill, pairs)
    else:
        def block(lo, hi):
            _max_back_overlap(xp, xs[lo:hi], ys[lo:hi], dys[lo:hi], dx[lo:hi], geom)

    _blocks(xp, n * c, h * w, block)
    return xp.reshape(dx, (n, c, h, w))


def _ave_backward(xp, dy, x_shape, geom):
    n, c, h, w = x_shape
    divisor = _ave_divisor(geom, h, w)
    # A window with no cell in [-pad, size + pad) has divisor <= 0 and no image cell to reach.
    divisor = xp.asarray(np.where(divisor > 0, divisor, np.float32(1)).astype(np.float32))
    if _covers_plane(geom, h, w):
        share = dy / divisor + _ZERO  # Caffe: 0 + top_diff / pool_size, in float
        dx = xp.empty((n, c, h, w), dtype=np.float32)
        dx[...] = share
        return dx
    dys = _planes(xp, dy)
    dx = xp.empty((n * c, h, w), dtype=np.float32)
    disjoint, fill, pairs = _disjoint(geom), not _tiles(geom, h, w), _pair_2x2(geom)

    def block(lo, hi):
        share = xp.divide(dys[lo:hi], divisor).astype(np.float32, copy=False)  # Caffe: top_diff / pool_size
        out = dx[lo:hi]
        if not disjoint:
            out.fill(0)
            for _, _, o, c in reversed(_taps(geom, h, w)):
                xp.add(out[c], share[o], out=out[c])
            return
        xp.add(share, _ZERO, out=share)  # 0 + share
        if fill:
            out.fill(0)
        def pairs_of(inner):
            p0, p1, q0, q1 = inner
            xp.copyto(_row_pairs(xp, out, geom, inner), _twice(xp, share[:, p0:p1, q0:q1])[:, :, None, :])

        for rect in _rest_after_pairs(geom, h, w, pairs, pairs_of):
            for _, _, o, c in _taps(geom, h, w, rect):
                xp.copyto(out[c], share[o])

    _blocks(xp, n * c, h * w, block)
    return xp.reshape(dx, (n, c, h, w))


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
    dx = xp.zeros((planes, hw), dtype=np.float32)
    if dy.size == 0 or hw == 0:
        return xp.reshape(dx, x_shape)
    masks = xp.reshape(mask, (planes, -1))
    dys = xp.reshape(dy, (planes, -1))

    def block(lo, hi):
        index = masks[lo:hi].astype(np.int64)
        valid = (index >= 0) & (index < hw)
        index += xp.arange(hi - lo, dtype=np.int64)[:, None] * hw
        xp.add.at(xp.reshape(dx[lo:hi], (-1,)), index[valid], dys[lo:hi][valid])

    _blocks(xp, planes, hw, block)
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
