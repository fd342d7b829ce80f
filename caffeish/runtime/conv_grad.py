"""Backward of Convolution, Deconvolution and Im2col (Caffe's base_conv_layer.cpp, util/im2col.cpp).

The array code beside caffeish.runtime.im2col (the forward).  Arrays are laid
out (N, C, *spatial), any number of spatial axes; every function takes the
array module `xp` (numpy or cupy: only operations both have).
../shared/caffe/training.md section 10.1 gives the formulas.  With Cg = C/group,
Og = O/group and the image position r = p*stride - pad + q*dilation of output
position p and kernel tap q:

* db[o] += sum over n, p of dy[n, o, p];
* dW[o, c, q] += sum over n, p of dy[n, o, p] * x[n, g*Cg + c, r]  (x = 0 outside);
* dx = col2im(W^T dy): zero the image, add each column entry to its pixel, drop
  the entries that fall in the padding.

Both run chunk by chunk (several images, or a band of output rows of one
image) through one column buffer of at most COL_BUDGET floats, laid out
(C, prod(kernel), images, positions) so that each chunk is one big float32
matmul per group over all its images: the columns of x are copied in tap by tap
(one strided slice copy per tap, only the in-image part, the rest zero), then
dW += dy . cols^T (for a small weight computed as cols . dy^T, summed over the
chunks and added transposed once: see _im2col_backward), then the same buffer
receives W^T . dy and is added back
into dx tap by tap (prod(kernel) vectorised adds over strided slices, in
Caffe's col2im order).  No padded copy of x or dx is made.  Depthwise
convolutions (one input and one output channel per group) work tap by tap on
shifted slices instead.

Deconvolution is Caffe's adjoint of convolution: its dx is a convolution
forward of dy with the same weight blob (caffeish.runtime.im2col.conv_forward,
no bias), and its dW is the convolution weight gradient with the roles of x
and dy swapped (the columns are those of dy).  Im2col's backward is col2im.
"""
import math

import numpy as np

from caffeish.graph.geometry import ConvGeometry, conv_tap_range
from caffeish.runtime import blas, conv_rows, winograd
from caffeish.runtime.im2col import COL_BUDGET, MIN_COLUMNS, conv_forward, work_chunks

# Largest weight (elements) whose gradient is computed transposed, see _im2col_backward.
SMALL_WEIGHT = 1 << 22

F32 = np.float32


# -- geometry helpers ----------------------------------------------------------------------


def _tap_plan(geom, spatial_in, out, r0, r1):
    """For each tap (row-major), the slices (of the chunk's columns, of the image) it touches.

    The chunk covers output rows [r0, r1) of the first spatial axis and all of the
    others.  Returns (plan, full): plan holds (tap index, column slices relative to the
    chunk, image slices) for the taps that touch the image; full says whether every tap
    covers every position of the chunk (no zero padding in the columns).
    """
    plan = []
    full = True
    bounds = [(r0, r1)] + [(0, m) for m in out[1:]]
    for i, q in enumerate(np.ndindex(*geom.kernel)):
        col_sl, img_sl = [], []
        empty = False
        for ax, (qa, (b0, b1)) in enumerate(zip(q, bounds)):
            s, d, p = geom.stride[ax], geom.dilation[ax], geom.pad[ax]
            lo, hi, r = conv_tap_range(qa, p, s, d, spatial_in[ax], b0, b1)
            if hi <= lo:
                empty = True
                break
            if lo != b0 or hi != b1:
                full = False
            col_sl.append(slice(lo - b0, hi - b0))
            img_sl.append(slice(r, r + (hi - lo - 1) * s + 1, s))
        if empty:
            full = False
            continue
        plan.append((i, tuple(col_sl), tuple(img_sl)))
    return plan, full


# -- bias ---------------------------------------------------------------------------------


def bias_backward(xp, dy, dbias):
    """dbias += sum of dy (N, O, *spatial) over N and the positions (Caffe: a gemv per image)."""
    n, o = dy.shape[:2]
    p = math.prod(dy.shape[2:])
    if n * o * p == 0:
        return
    per_image = xp.matmul(xp.reshape(dy, (n, o, p)), xp.ones((p,), dtype=F32))  # (N, O)
    dbias += xp.reshape(per_image.sum(axis=0), dbias.shape)


# -- col2im -------------------------------------------------------------------------------


def col2im(xp, dcol, geom, x_shape):
    """Caffe's col2im: dx (N, C, *in) from dcol (N, C*prod(kernel), *out) (Im2col's backward)."""
    n, c = x_shape[:2]
    spatial_in = tuple(x_shape[2:])
    kernel = tuple(geom.kernel)
    k = math.prod(kernel)
    out = tuple(dcol.shape[2:])
    dx = xp.zeros(tuple(x_shape), dtype=F32)
    if dx.size == 0 or dcol.size == 0:
        return dx
    if not kernel:
        dx[...] = xp.reshape(dcol, x_shape)
        return dx
    cols = xp.reshape(dcol, (n, c, k) + out)
    plan, _ = _tap_plan(geom, spatial_in, out, 0, out[0])
    lead = (slice(None), slice(None))
    for i, col_sl, img_sl in plan:
        dx[lead + img_sl] += cols[(slice(None), slice(None), i) + col_sl]
    return dx


# -- convolution --------------------------------------------------------------------------


def conv_backward(xp, x, weight, dy, geom, group, want_dx, dweight, dbias, budget=COL_BUDGET):
    """Caffe's convolution backward for x (N, C, *in), weight (O, C/group, *kernel), dy (N, O, *out).

    Adds the weight gradient into `dweight` and the bias gradient into `dbias` (either may
    be None: not wanted); returns dx (N, C, *in) when `want_dx`, else None.
    """
    if dbias is not None:
        bias_backward(xp, dy, dbias)
    if not want_dx and dweight is None:
        return None
    if not geom.kernel:
        # No spatial axes: the same arithmetic as one axis of size 1 with a 1-tap kernel.
        one = ConvGeometry((1,), (1,), (0,), (1,))
        dx = conv_backward(xp, xp.reshape(x, tuple(x.shape) + (1,)), weight, xp.reshape(dy, tuple(dy.shape) + (1,)),
                           one, group, want_dx, dweight, None, budget)
        return None if dx is None else xp.reshape(dx, x.shape)
    n, c = x.shape[:2]
    o = dy.shape[1]
    g = group
    cg, og = c // g, o // g
    out = tuple(dy.shape[2:])
    dx = xp.zeros(x.shape, dtype=F32) if want_dx else None
    if n * c * o * math.prod(out) * math.prod(x.shape[2:]) == 0:
        return dx
    if cg == 1 and og == 1:
        _depthwise_backward(xp, x, weight, dy, geom, dx, dweight)
        return dx
    dx_left, dweight_left = dx, dweight
    if dx is not None and _winograd_input_gradient(xp, weight, dy, geom, g, dx):
        dx_left = None  # done
    if dweight is not None and _winograd_backward(xp, x, dy, geom, g, out):
        winograd.weight_gradient(x, dy, geom, dweight)
        dweight_left = None
    if dx_left is None and dweight_left is None:
        return dx
    if conv_rows.applies(xp, x, geom, g, out):
        conv_rows.backward(x, weight, dy, geom, g, dx_left, dweight_left)
    else:
        _im2col_backward(xp, x, weight, dy, geom, g, dx_left, dweight_left, budget)
    return dx


def _winograd_backward(xp, a, b, geom, g, out):
    """Whether a backward convolution (of a, with b's channel count on the other side) goes through
    Winograd: both channel counts at least winograd.BACKWARD_MIN_CHANNELS."""
    least = winograd.BACKWARD_MIN_CHANNELS
    return b.shape[1] >= least and winograd.applies(xp, a, geom, g, out, min_channels=least)


def _winograd_input_gradient(xp, weight, dy, geom, g, dx):
    """dx of a 3x3 stride-1 convolution by Winograd (caffeish.runtime.winograd), where it applies:
    the convolution of dy with the kernel rotated by 180 degrees and its channel axes swapped,
    padded by 2 - pad.  Returns whether it did."""
    if any(p > 2 for p in geom.pad):
        return False
    turned = ConvGeometry(tuple(geom.kernel), tuple(geom.stride), tuple(2 - p for p in geom.pad),
                          tuple(geom.dilation))
    spatial = tuple(dx.shape[2:])
    if not _winograd_backward(xp, dy, dx, turned, g, spatial):
        return False
    rotated = weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    winograd.forward(dy, rotated, None, turned, spatial, dx)
    return True


def _add_into(dweight, acc):
    """dweight += acc, acc holding the same values in the canonical layout."""
    dweight += acc.reshape(dweight.shape)


def _gemm_into(xp, dyc, mat, dweight, g):
    """dW += dy . cols^T per group straight into the parameter diff (BLAS with beta = 1, as Caffe's
    weight gradient), with no weight-sized temporary: FCN's fc6 would need 411 MB for one.  False
    where that is not available (another array module or BLAS); the caller then uses a temporary."""
    if xp is not np or not dweight.flags.c_contiguous:
        return False
    target = dweight.reshape(g, dyc.shape[1], mat.shape[1])
    for i in range(g):
        if not blas.gemm_nt_add(dyc[i], mat[i], target[i]):
            if i:
                raise AssertionError("gemm_nt_add refused a group after accepting the first")
            return False
    return True


def _im2col_backward(xp, x, weight, dy, geom, g, dx, dweight, budget):
    """The general case: columns chunk by chunk, one matmul per group for dW and one for dcol."""
    n, c = x.shape[:2]
    spatial_in = tuple(x.shape[2:])
    o = dy.shape[1]
    cg, og = c // g, o // g
    out = tuple(dy.shape[2:])
    nsp = len(out)
    k = math.prod(geom.kernel)
    rest = math.prod(out[1:])
    chunks = list(work_chunks(n, out[0], rest, c * k * rest, budget, MIN_COLUMNS))
    most = max((n1 - n0) * (r1 - r0) for n0, n1, r0, r1 in chunks) * rest
    buf = xp.empty(c * k * most, dtype=F32)
    wt = xp.reshape(weight, (g, og, cg * k))
    # The weight gradient of a chunk is one matmul per group.  OpenBLAS is much faster (and
    # steadier on a busy machine) at cols . dy^T, whose output is (Cg*k, Og), than at
    # dy . cols^T when that output is small and the chunk long, so a small dW is summed
    # transposed (acc) and added into dweight once; a big one (FCN's fc6: 103M floats) is
    # computed as dy . cols^T straight into dweight by BLAS with beta = 1 (_gemm_into), or
    # where that is not reachable added chunk by chunk through one temporary (tmp).
    small_weight = dweight is not None and g * og * cg * k <= SMALL_WEIGHT
    acc = tmp = None
    plans = {}
    for n0, n1, r0, r1 in chunks:
        m, rows = n1 - n0, r1 - r0
        positions = rows * rest
        cols = buf[:c * k * m * positions].reshape((c, k, m, rows) + out[1:])
        key = (r0, r1)
        if key not in plans:
            plans[key] = _tap_plan(geom, spatial_in, out, r0, r1)
        plan, full = plans[key]
        # dy of the chunk as (G, Og, m * positions)
        dyc = dy[n0:n1, :, r0:r1]
        if m == 1:
            dyc = xp.reshape(dyc, (g, og, positions))
        else:
            dyc = xp.reshape(xp.ascontiguousarray(
                xp.reshape(dyc, (m, g, og, positions)).transpose(1, 2, 0, 3)), (g, og, m * positions))
        mat = cols.reshape(g, cg * k, m * positions)
        if dweight is not None:
            if not full:
                cols.fill(0)
            xc = x[n0:n1]
            for i, col_sl, img_sl in plan:
                dst = cols[(slice(None), i, slice(None)) + col_sl]
                dst = dst.transpose((1, 0) + tuple(range(2, 2 + nsp)))
                dst[...] = xc[(slice(None), slice(None)) + img_sl]
            if small_weight:
                # dW^T = cols . dy^T, summed over the chunks, added transposed at the end.
                if acc is None:
                    acc = xp.matmul(mat, dyc.transpose(0, 2, 1))
                else:
                    if tmp is None:
                        tmp = xp.empty(acc.shape, dtype=F32)
                    xp.matmul(mat, dyc.transpose(0, 2, 1), out=tmp)
                    acc += tmp
            elif not _gemm_into(xp, dyc, mat, dweight, g):
                if tmp is None:
                    tmp = xp.matmul(dyc, mat.transpose(0, 2, 1))
                else:
                    xp.matmul(dyc, mat.transpose(0, 2, 1), out=tmp)
                _add_into(dweight, tmp)
        if dx is not None:
            xp.matmul(wt.transpose(0, 2, 1), dyc, out=mat)
            dxc = dx[n0:n1]
            for i, col_sl, img_sl in plan:
                src = cols[(slice(None), i, slice(None)) + col_sl]
                dxc[(slice(None), slice(None)) + img_sl] += src.transpose((1, 0) + tuple(range(2, 2 + nsp)))
    if acc is not None:
        _add_into(dweight, acc.transpose(0, 2, 1))


def _depthwise_backward(xp, x, weight, dy, geom, dx, dweight):
    """One input and one output channel per group: tap by tap on shifted slices of x, dy and dx."""
    c = x.shape[1]
    spatial_in = tuple(x.shape[2:])
    out = tuple(dy.shape[2:])
    nsp = len(out)
    k = math.prod(geom.kernel)
    w = xp.reshape(weight, (c, k))
    plan, _ = _tap_plan(geom, spatial_in, out, 0, out[0])
    buf = xp.empty(dy.size, dtype=F32)
    acc = xp.zeros((c, k), dtype=F32) if dweight is not None else None
    lead = (slice(None), slice(None))
    red = (0,) + tuple(range(2, 2 + nsp))
    for i, col_sl, img_sl in plan:
        dyq = dy[lead + col_sl]
        prod = buf[:dyq.size].reshape(dyq.shape)
        if acc is not None:
            xp.multiply(dyq, x[lead + img_sl], out=prod)
            acc[:, i] = prod.sum(axis=red)
        if dx is not None:
            xp.multiply(dyq, w[:, i].reshape((1, c) + (1,) * nsp), out=prod)
            dx[lead + img_sl] += prod
    if dweight is not None:
        _add_into(dweight, acc)


# -- deconvolution ------------------------------------------------------------------------


def deconv_backward(xp, x, weight, dy, geom, group, want_dx, dweight, dbias, budget=COL_BUDGET):
    """Caffe's deconvolution backward for x (N, C, *in), weight (C, O/group, *kernel), dy (N, O, *out).

    dx is the convolution of dy with the same blob (no bias); dW is the convolution weight
    gradient with x and dy swapped.  Adds into `dweight`/`dbias` (None: not wanted);
    returns dx when `want_dx`, else None.
    """
    if dbias is not None:
        bias_backward(xp, dy, dbias)
    if dweight is not None:
        conv_backward(xp, dy, weight, x, geom, group, False, dweight, None, budget)
    if not want_dx:
        return None
    if x.size == 0 or dy.size == 0 or weight.size == 0:
        return xp.zeros(x.shape, dtype=F32)
    return conv_forward(xp, dy, weight, None, geom, group, tuple(x.shape[2:]))
