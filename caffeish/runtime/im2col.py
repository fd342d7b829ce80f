"""Convolution and deconvolution kernels on strided views (im2col without loops).

Shared by Convolution, Deconvolution and Im2col (layers/conv.py).  Arrays are
laid out (N, C, *spatial): the layer folds the axes before its channel axis
into N.  Every function takes the array module `xp` (numpy or cupy).

Convolution, as Caffe computes it: y[n, o, p] = sum over the input channels c
of o's group and the kernel taps q of W[o, c, q] * x[n, c, p*stride - pad +
q*dilation], reading zero outside the input.  A strided view over the padded
input gives every window without copying; the windows are copied chunk by
chunk (several images, or a band of output rows) into a column buffer of at
most COL_BUDGET floats, and each chunk is one batched float32 matmul over all
groups, its bias added afterwards as Caffe does.  A big input is padded band by
band rather than copied whole.  1x1 convolutions without padding skip the
columns (a plain matmul); depthwise ones (one input and one output channel per
group) sum shifted slices tap by tap instead.  Big 2-D convolutions with stride
1 down the rows (VGG's 3x3 layers) copy the input kw times rather than kh*kw and
multiply kernel row by kernel row (caffeish.runtime.conv_rows); deep 3x3 ones
(128 channels and more) use Winograd's F(2x2, 3x3) (caffeish.runtime.winograd).

Deconvolution (Caffe's adjoint of convolution) is turned into a convolution by
splitting the kernel into stride phases, see deconv_forward: no scatter-add.
"""
import math

import numpy as np

from caffeish.runtime import conv_rows, parallel, winograd

# Upper bound on a column buffer, in float32 elements (16 MiB).  Measured on 2
# cores (median ms, 1 / 2 / 4 Mi elements): VGG 3x3 64->64 at 698x698 387/355/339,
# 128->128 at 349x349 366/300/305, 256->256 at 175x175 266/234/180, 512->512 at
# 88x88 218/223/186; AlexNet's layers at batch 10 are within noise of each other.
COL_BUDGET = 1 << 22
# Fewest output positions per chunk, so that the matmul stays efficient.
MIN_COLUMNS = 256
# Images batched into one GEMM only up to about this many output positions: enough to
# fill the matmul where an image has few (AlexNet's 13x13 layers), while an image with
# many is its own chunk, multiplied straight into the output with its columns still in
# cache.  Measured on AlexNet at batch 10 (interleaved, median ms, batched to the budget /
# this cap): conv1 (3025 positions) 19.4 / 16.8, conv2 (729) 30.4 / 30.7, conv3-5 (169 each)
# 16.6 / 16.7, 14.6 / 14.5 and 11.5 / 11.4; not batching at all: conv3-5 19.8, 17.6 and 13.8.
BATCH_COLUMNS = 2048
# Deconvolution: fewest input positions per chunk (its matmul is wide: Og*stride^2 columns).
MIN_DECONV_ROWS = 64


# -- views ------------------------------------------------------------------------------


def as_strided(xp, a, shape, strides):
    return xp.lib.stride_tricks.as_strided(a, shape=tuple(shape), strides=tuple(strides))


def reshape_view(xp, a, shape):
    """Reshape `a` without copying (the result must alias `a`)."""
    try:
        return xp.reshape(a, shape, copy=False)
    except TypeError:  # an array module without reshape(copy=...)
        v = a.view()
        v.shape = shape
        return v


def padded(xp, x, before, sizes, value=0.0):
    """x (lead..., *spatial) placed at offset `before` in a new array of spatial `sizes`.

    The rest is `value`.  Returns x itself when nothing needs adding.
    """
    nsp = len(sizes)
    spatial = x.shape[x.ndim - nsp:]
    if not any(before) and tuple(sizes) == tuple(spatial):
        return x
    lead = x.shape[:x.ndim - nsp]
    if value == 0:
        out = xp.zeros(lead + tuple(sizes), dtype=x.dtype)
    else:
        out = xp.full(lead + tuple(sizes), value, dtype=x.dtype)
    inner = tuple(slice(b, b + n) for b, n in zip(before, spatial))
    out[(Ellipsis,) + inner] = x
    return out


def windows(xp, x, kernel, stride, dilation, out):
    """View (lead..., *out, *kernel) of x (lead..., *spatial): x[..., p*stride + q*dilation].

    x must be large enough: (out-1)*stride + (kernel-1)*dilation < size per axis.
    """
    nsp = len(kernel)
    lead = x.shape[:x.ndim - nsp]
    lead_st = x.strides[:x.ndim - nsp]
    sp_st = x.strides[x.ndim - nsp:]
    shape = lead + tuple(out) + tuple(kernel)
    strides = (lead_st + tuple(s * st for s, st in zip(stride, sp_st))
               + tuple(d * st for d, st in zip(dilation, sp_st)))
    return as_strided(xp, x, shape, strides)


def _extents(geom):
    return tuple(d * (k - 1) + 1 for k, d in zip(geom.kernel, geom.dilation))


def _padded_sizes(spatial, geom, out):
    """Padded input sizes that hold every window (a window may stick out beyond in + 2*pad)."""
    return tuple(
        max(n + 2 * p, (o - 1) * s + e)
        for n, p, o, s, e in zip(spatial, geom.pad, out, geom.stride, _extents(geom))
    )


def padded_input(xp, x, geom, out):
    """x (N, C, *in) zero-padded so that every window of the convolution lies inside.

    Caffe reads zeros outside the input, and with its truncating size formula a
    window may even stick out beyond in + 2*pad; the padding covers that too.
    """
    return padded(xp, x, geom.pad, _padded_sizes(x.shape[2:], geom, out))


def col_windows(xp, x, geom, out):
    """The im2col view (N, C, *kernel, *out) of x (N, C, *in): Caffe's column order (c, q) x p."""
    nsp = len(geom.kernel)
    win = windows(xp, padded_input(xp, x, geom, out), geom.kernel, geom.stride, geom.dilation, out)
    perm = (0, 1) + tuple(range(2 + nsp, 2 + 2 * nsp)) + tuple(range(2, 2 + nsp))
    return win.transpose(perm)


# -- convolution ------------------------------------------------------------------------


def conv_forward(xp, x, weight, bias, geom, group, out, budget=COL_BUDGET, relu=False):
    """Caffe's convolution of x (N, C, *in) with weight (O, C/group, *kernel) -> (N, O, *out).

    relu: then max(y, 0) (what an in-place ReLU after the layer computes), done while each
    chunk of the output is in cache where the path allows."""
    n, c = x.shape[:2]
    o = weight.shape[0]
    g = group
    cg, og = c // g, o // g
    kernel = tuple(geom.kernel)
    k = math.prod(kernel)
    y = xp.empty((n, o) + tuple(out), dtype=np.float32)
    if y.size == 0:
        return y
    if cg * k == 0:
        y[...] = 0
    elif all(kk == 1 for kk in kernel) and not any(geom.pad):
        _conv_1x1(xp, x, weight, geom, g, out, y)
    elif cg == 1 and og == 1 and _strided_blocks(geom):
        _conv_depthwise_blocks(xp, x, weight, geom, out, y)
    elif cg == 1 and og == 1:
        _conv_depthwise(xp, x, weight, geom, out, y)
    elif winograd.applies(xp, x, geom, g, out):
        winograd.forward(x, weight, bias, geom, out, y, relu=relu)
        return y
    elif conv_rows.applies(xp, x, geom, g, out):
        conv_rows.forward(x, weight, bias, geom, g, out, y, relu=relu)
        return y
    else:
        _conv_im2col(xp, x, weight, bias, geom, g, out, y, budget, relu)
        return y
    if bias is not None:
        y += bias.reshape((1, o) + (1,) * len(out))
    if relu:
        xp.maximum(y, 0, out=y)
    return y


def _conv_1x1(xp, x, weight, geom, g, out, y):
    """1x1 kernel, no padding: a (strided) subsample of x times W, one matmul per image."""
    n, c = x.shape[:2]
    o = weight.shape[0]
    p = math.prod(out)
    if any(s != 1 for s in geom.stride):
        x = x[(slice(None), slice(None)) + tuple(slice(0, (m - 1) * s + 1, s) for m, s in zip(out, geom.stride))]
    if g == 1 and p == 1:
        # No spatial extent left (e.g. a 0-D convolution): one matmul over the whole batch.
        xp.matmul(xp.reshape(x, (n, c)), weight.reshape(o, c).T, out=y.reshape(n, o))
        return
    w = weight.reshape(g, o // g, c // g)
    xp.matmul(w, xp.reshape(x, (n, g, c // g, p)), out=y.reshape(n, g, o // g, p))


def _tap_slices(geom, out, q):
    """Slices picking tap q's input for every output position, from a padded input."""
    return tuple(
        slice(qi * d, qi * d + (m - 1) * s + 1, s)
        for qi, d, m, s in zip(q, geom.dilation, out, geom.stride)
    )


def _conv_depthwise(xp, x, weight, geom, out, y):
    """One input and one output channel per group: sum over taps of W[c, q] * shifted x."""
    c = x.shape[1]
    nsp = len(out)
    xpad = padded_input(xp, x, geom, out)
    w = weight.reshape((c, -1))
    lead = (slice(None), slice(None))
    term = None
    for i, q in enumerate(np.ndindex(*geom.kernel)):
        tap = xpad[lead + _tap_slices(geom, out, q)]
        wq = w[:, i].reshape((1, c) + (1,) * nsp)
        if i == 0:
            xp.multiply(tap, wq, out=y)
        else:
            term = xp.multiply(tap, wq, out=term)
            y += term


def _strided_blocks(geom):
    """Whether a depthwise convolution goes by stride blocks (_conv_depthwise_blocks): 2-D, no
    dilation, strides of 4 and more (FCN's upsampling adjoints: kernel 63 stride 32, 16 / 8)."""
    return (len(geom.kernel) == 2 and all(d == 1 for d in geom.dilation)
            and all(s >= 4 for s in geom.stride))


def _conv_depthwise_blocks(xp, x, weight, geom, out, y):
    """Depthwise convolution with a big stride s, by blocks of s x s input pixels.

    Output (i, j) reads the input rows and columns i*s - pad + q, q < k, that is the A x A
    blocks (A = ceil(k / s)) of the input shifted by -pad cut into s x s blocks, starting at
    block (i, j).  With the blocks laid out (C, rows of blocks, columns of blocks, s*s) and the
    kernel zero-padded to A*s taps a side, y[c, i, j] is the sum over the A*A block offsets
    (a, b) of matrix-vector products over s*s: A*A GEMVs per image and channel over two copies
    of the input, where the tap loop would make k*k passes (3969 for FCN-Alexnet's kernel 63)."""
    n, c = x.shape[:2]
    (kh, kw), (sh, sw), (ph, pw) = geom.kernel, geom.stride, geom.pad
    ah, aw = -(-kh // sh), -(-kw // sw)
    bh, bw = out[0] - 1 + ah, out[1] - 1 + aw  # blocks a side
    z = xp.zeros((n, c, bh * sh, bw * sw), dtype=np.float32)  # z[r] = x[r - pad]
    rows = min(x.shape[2], bh * sh - ph)
    cols = min(x.shape[3], bw * sw - pw)
    if rows > 0 and cols > 0:
        z[:, :, ph:ph + rows, pw:pw + cols] = x[:, :, :rows, :cols]
    blocks = xp.ascontiguousarray(
        z.reshape(n, c, bh, sh, bw, sw).transpose(0, 1, 2, 4, 3, 5)).reshape(n, c, bh, bw, sh * sw)
    del z
    w = xp.zeros((c, ah * sh, aw * sw), dtype=np.float32)
    w[:, :kh, :kw] = weight.reshape(c, kh, kw)
    w = xp.ascontiguousarray(w.reshape(c, ah, sh, aw, sw).transpose(0, 1, 3, 2, 4)).reshape(c, ah, aw, sh * sw)
    y[...] = 0
    for i in range(n):
        for ch in range(c):
            for a in range(ah):
                for b in range(aw):
                    y[i, ch] += xp.matmul(blocks[i, ch, a:a + out[0], b:b + out[1]], w[ch, a, b])


def work_chunks(n, rows_total, row_size, per_row, budget, min_positions):
    """(n0, n1, r0, r1) work chunks over images n and rows r of the first spatial axis.

    Several whole images per chunk while they fit `budget` (floats of buffer;
    a row holds `row_size` positions and costs `per_row` floats), else bands of
    rows of one image, at least `min_positions` positions each.  Chunks are
    balanced in size.
    """
    per_image = per_row * rows_total
    if per_image <= budget:
        nb = min(n, max(1, budget // max(per_image, 1)))
        nb = -(-n // -(-n // nb))
        for n0 in range(0, n, nb):
            yield n0, min(n, n0 + nb), 0, rows_total
        return
    rows = max(1, budget // per_row, -(-min_positions // max(row_size, 1)))
    rows = -(-rows_total // -(-rows_total // rows))
    for i in range(n):
        for r0 in range(0, rows_total, rows):
            yield i, i + 1, r0, min(rows_total, r0 + rows)


def _chunk_windows(xp, x, geom, out, chunks, budget):
    """A function (n0, n1, r0, r1) -> im2col view (m, C, *kernel, rows, *out[1:]) of that chunk.

    Small inputs are padded once.  A big one that needs padding (FCN pads its
    first convolution by 100) is padded band by band instead: each chunk copies
    the input rows its windows read into a zeroed, cache-sized buffer, so no
    padded copy of the whole input is made.
    """
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    nsp = len(spatial)
    sizes = _padded_sizes(spatial, geom, out)
    perm = (0, 1) + tuple(range(2 + nsp, 2 + 2 * nsp)) + tuple(range(2, 2 + nsp))
    if sizes == spatial and not any(geom.pad) or n * c * math.prod(sizes) <= 4 * budget:
        win = col_windows(xp, x, geom, out)
        lead = (slice(None),) * (1 + nsp)
        return lambda n0, n1, r0, r1: win[(slice(n0, n1),) + lead + (slice(r0, r1),)]
    s0, p0, e0 = geom.stride[0], geom.pad[0], _extents(geom)[0]

    def band_rows(r0, r1):
        return (r1 - r0 - 1) * s0 + e0

    most = max((n1 - n0) * band_rows(r0, r1) for n0, n1, r0, r1 in chunks)
    band_buf = xp.empty(most * c * math.prod(sizes[1:]), dtype=np.float32)
    inner = tuple(slice(p, p + m) for p, m in zip(geom.pad[1:], spatial[1:]))

    def get(n0, n1, r0, r1):
        m, rows = n1 - n0, band_rows(r0, r1)
        band = band_buf[:m * c * rows * math.prod(sizes[1:])].reshape((m, c, rows) + sizes[1:])
        band.fill(0)
        first = r0 * s0 - p0  # input row at the band's top
        lo, hi = max(first, 0), min(first + rows, spatial[0])
        if hi > lo:
            band[(slice(None), slice(None), slice(lo - first, hi - first)) + inner] = x[n0:n1, :, lo:hi]
        view = windows(xp, band, geom.kernel, geom.stride, geom.dilation, (r1 - r0,) + tuple(out[1:]))
        return view.transpose(perm)

    return get


def _conv_im2col(xp, x, weight, bias, geom, g, out, y, budget, relu=False):
    """Columns copied from the window view chunk by chunk, each chunk one matmul per group.

    The columns of a chunk of several images are laid out (G, Cg*k, images, positions), so
    that each group is one GEMM over all the chunk's images (AlexNet's 13x13 layers: 1690
    columns rather than 169), whose result is then copied into place; a chunk of one image
    is multiplied straight into the output.  The bias is added to each chunk's output right
    after its matmul (while it is in cache), as Caffe adds it after its GEMM: folding it into
    the matmul as a row of ones would change how BLAS blocks the sum over K, and so the
    float32 rounding, away from Caffe's.
    """
    n, c = x.shape[:2]
    o = weight.shape[0]
    cg, og = c // g, o // g
    nsp = len(out)
    kernel = tuple(geom.kernel)
    k = math.prod(kernel)
    rows_k = cg * k
    w = weight.reshape(g, og, rows_k)
    bias_view = None if bias is None else bias.reshape(1, g, og, 1)
    rest = math.prod(out[1:])
    per_image = g * rows_k * rest * out[0]
    budget = min(budget, max(per_image, per_image * (BATCH_COLUMNS // max(1, rest * out[0]))))
    chunks = list(work_chunks(n, out[0], rest, g * rows_k * rest, budget, MIN_COLUMNS))
    most = max((n1 - n0) * (r1 - r0) for n0, n1, r0, r1 in chunks) * rest
    buf = xp.empty(most * g * rows_k, dtype=np.float32)
    res_buf = None
    chunk_windows = _chunk_windows(xp, x, geom, out, chunks, budget)
    # (m, G, Cg, *kernel, rows, *out[1:]) -> (G, Cg, *kernel, m, rows, *out[1:])
    perm = (1, 2) + tuple(range(3, 3 + nsp)) + (0,) + tuple(range(3 + nsp, 3 + 2 * nsp))
    for n0, n1, r0, r1 in chunks:
        m, positions = n1 - n0, (r1 - r0) * rest
        src = chunk_windows(n0, n1, r0, r1)  # (m, C, *kernel, rows, *out[1:])
        src = src.reshape((m, g, cg) + src.shape[2:]).transpose(perm)
        col = buf[:m * g * rows_k * positions]
        parallel.copy(xp, col.reshape(src.shape), src)
        col = col.reshape(g, rows_k, m * positions)
        target = reshape_view(xp, y[n0:n1, :, r0:r1], (m, g, og, positions))
        if m == 1:
            xp.matmul(w, col, out=target[0])
        else:
            if res_buf is None:
                res_buf = xp.empty(most * o, dtype=np.float32)
            res = res_buf[:o * m * positions].reshape(g, og, m * positions)
            xp.matmul(w, col, out=res)
            target[...] = res.reshape(g, og, m, positions).transpose(2, 0, 1, 3)
        if bias_view is not None:
            target += bias_view
        if relu:
            xp.maximum(target, 0, out=target)


def im2col(xp, x, geom, out):
    """Caffe's im2col: (N, C * prod(kernel), *out), channel index c*K + q."""
    n, c = x.shape[:2]
    k = math.prod(geom.kernel)
    cols = xp.empty((n, c) + tuple(geom.kernel) + tuple(out), dtype=np.float32)
    if cols.size:
        cols[...] = col_windows(xp, x, geom, out)
    return cols.reshape((n, c * k) + tuple(out))


# -- deconvolution ----------------------------------------------------------------------


def _interleave(a, b):
    return tuple(v for pair in zip(a, b) for v in pair)


def deconv_forward(xp, x, weight, bias, geom, group, out, budget=COL_BUDGET):
    """Caffe's deconvolution of x (N, C, *in) with weight (C, O/group, *kernel) -> (N, O, *out).

    y[n, g*Og + o, i*stride - pad + q*dilation] += x[n, c, i] * W[c, o, q] for the
    input channels c of group g; positions outside [0, out) are dropped.

    Computed by phases, per axis: with the kernel spread out by the dilation
    and zero-padded to A*s taps (A = ceil(extent / s)), tap a*s + b sends input
    i to output (i + a)*s + b.  So block l of s outputs (l < L = in - 1 + A)
    at phase b is the sum over a and c of W[c, o, a*s + b] * x[c, l - a]: a
    stride-1 convolution with an A-tap kernel over the input padded by A - 1,
    whose prod(s) outputs per channel are the phases.  Each chunk of blocks is
    one matmul (positions x (c, a)) @ ((c, a) x (o, b)), whose rows are then
    copied into place with the phases interleaved (contiguous runs of s
    values); no scatter-add.  The result is cropped by pad.
    """
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    nsp = len(spatial)
    g = group
    cg, og = c // g, weight.shape[1]
    o = og * g
    if n * o * math.prod(out) == 0:
        return xp.zeros((n, o) + tuple(out), dtype=np.float32)
    stride = tuple(geom.stride)
    ext = _extents(geom)
    a = tuple(-(-e // s) for e, s in zip(ext, stride))
    kp = tuple(ai * s for ai, s in zip(a, stride))
    if kp == tuple(geom.kernel) and all(d == 1 for d in geom.dilation):
        wk = weight
    else:
        wk = xp.zeros((c, og) + kp, dtype=np.float32)
        wk[(slice(None), slice(None)) + tuple(slice(0, e, d) for e, d in zip(ext, geom.dilation))] = weight
    n_taps, n_phases = math.prod(a), math.prod(stride)
    # (G, Cg, Og, A1, s1, A2, s2, ...) -> (G, Cg*A (taps flipped), Og*S)
    wv = wk.reshape((g, cg, og) + _interleave(a, stride))
    wv = wv[(slice(None),) * 3 + _interleave((slice(None, None, -1),) * nsp, (slice(None),) * nsp)]
    perm = ((0, 1) + tuple(3 + 2 * i for i in range(nsp)) + (2,) + tuple(4 + 2 * i for i in range(nsp)))
    wmat = xp.ascontiguousarray(wv.transpose(perm)).reshape(g, cg * n_taps, og * n_phases)

    blocks = tuple(m - 1 + ai for m, ai in zip(spatial, a))
    xpad = padded(xp, x, tuple(ai - 1 for ai in a), tuple(m + 2 * (ai - 1) for m, ai in zip(spatial, a)))
    win = windows(xp, xpad, a, (1,) * nsp, (1,) * nsp, blocks)  # (N, C, *L, *A)
    win = win.transpose((0,) + tuple(range(2, 2 + nsp)) + (1,) + tuple(range(2 + nsp, 2 + 2 * nsp)))
    full = xp.empty((n, o) + tuple(ll * s for ll, s in zip(blocks, stride)), dtype=np.float32)
    fullv = full.reshape((n, g, og) + _interleave(blocks, stride))
    rest = math.prod(blocks[1:])
    # result (m, G, rows, *L[1:], Og, *s) -> (m, G, Og, rows, s1, L2, s2, ...)
    back = (0, 1, 2 + nsp) + _interleave(tuple(range(2, 2 + nsp)), tuple(range(3 + nsp, 3 + 2 * nsp)))
    chunks = list(work_chunks(n, blocks[0], rest, rest * max(c * n_taps, o * n_phases), budget, MIN_DECONV_ROWS))
    most = max((n1 - n0) * (r1 - r0) for n0, n1, r0, r1 in chunks) * rest
    col_buf = xp.empty(most * c * n_taps, dtype=np.float32)
    res_buf = xp.empty(most * o * n_phases, dtype=np.float32)
    for n0, n1, r0, r1 in chunks:
        m, r = n1 - n0, r1 - r0
        src = win[n0:n1, r0:r1]  # (m, rows, *L[1:], C, *A)
        col = col_buf[:src.size].reshape(src.shape)
        col[...] = src
        col = col.reshape(m, r * rest, g, cg * n_taps).transpose(0, 2, 1, 3)
        res = res_buf[:m * r * rest * o * n_phases].reshape(m, g, r * rest, og * n_phases)
        xp.matmul(col, wmat, out=res)
        res = res.reshape((m, g, r) + blocks[1:] + (og,) + stride)
        parallel.copy(xp, fullv[(slice(n0, n1), slice(None), slice(None), slice(r0, r1))], res.transpose(back))
    if bias is not None:
        full += bias.reshape((1, o) + (1,) * nsp)
    crop = full[(slice(None), slice(None)) + tuple(slice(p, p + m) for p, m in zip(geom.pad, out))]
    if crop.flags.c_contiguous:
        return crop
    y = xp.empty(crop.shape, dtype=np.float32)
    parallel.copy(xp, y, crop)
    return y
