"""2-D convolutions with stride 1 down the rows, as GEMMs over row-shifted views (numpy, CPU).

im2col copies every input pixel prod(kernel) times into a column buffer before
one GEMM.  When the stride along the first spatial axis (rows) is 1, the kernel
rows need no copy: with the input stacked only across the kernel's columns,

    S[c, j, t, w] = x[c, r0 - pad_h + t, w*stride_w - pad_w + j*dil_w]   (0 outside x)

for the rows t of a band of output rows [r0, r1), the output band is

    y[o, r0 + h, w] = sum over kernel rows i of  W_i[o, (c, j)] . S[(c, j), h + i*dil_h, w]

and for each i the right-hand operand is a plain submatrix of S: rows (c, j),
row stride R * Wo, starting i*dil_h*Wo elements in, (r1 - r0) * Wo contiguous
columns.  So a convolution is kh GEMMs per group, accumulated with beta = 1
straight into the output (OpenBLAS's cblas_sgemm, which numpy's matmul cannot
do on strided operands), over a stacked band kw times the input rather than
kh*kw times, with the zero padding written while stacking (no padded copy).  The
backward uses the same bands: dW_i += dy . S_i^T, and dS = sum over i of W_i^T
dy shifted by i rows, folded back into dx along the columns.

The stacking and folding copies are split over the channels on both cores
(caffeish.runtime.parallel); the GEMMs are threaded by OpenBLAS.  The sums
group the kernel taps by rows, so the float32 rounding differs from one long
GEMM (Caffe's) by a few ulps, within the golden cases' tolerances.
"""

import numpy as np

from caffeish.graph.geometry import conv_tap_range
from caffeish.runtime import blas, parallel

F32 = np.float32
_ITEM = 4  # bytes per float32

# A stacked band holds at most this many floats (16 MiB); with fewer than MIN_COLUMNS output
# positions per band, or fewer than MIN_DEPTH (channels x kernel columns) per GEMM, the GEMMs
# are too thin to pay and im2col is used instead.  Measured on 2 cores against im2col and
# PyTorch: see benchmarks/conv_layers.py.
BAND_BUDGET = 1 << 22
MIN_COLUMNS = 1024
MIN_DEPTH = 48


def applies(xp, x, geom, group, out):
    """Whether this path takes the convolution of x (N, C, H, W) with this geometry."""
    if xp is not np or len(geom.kernel) != 2 or geom.stride[0] != 1 or not blas.have_sgemm():
        return False
    if x.dtype != F32 or not x.flags.c_contiguous or geom.kernel[0] < 2:
        return False
    cg = x.shape[1] // group
    return cg * geom.kernel[1] >= MIN_DEPTH and out[0] * out[1] >= MIN_COLUMNS


def _bands(n_rows, width, c, kw, kh_extent):
    """Balanced bands [r0, r1) of output rows whose stacked input fits BAND_BUDGET."""
    per_row = c * kw * width
    rows = max(1, BAND_BUDGET // max(per_row, 1) - (kh_extent - 1), -(-MIN_COLUMNS // max(width, 1)))
    rows = min(rows, n_rows)
    count = -(-n_rows // rows)
    return [(n_rows * i // count, n_rows * (i + 1) // count) for i in range(count)]


class _Stack:
    """The stacked band S (C, kw, R, Wo) of one image, and how its columns map to the input."""

    def __init__(self, x_shape, geom, out, bands):
        _, c, self.height, self.width = x_shape
        self.geom = geom
        self.out = out
        kw = geom.kernel[1]
        self.ext = (geom.kernel[0] - 1) * geom.dilation[0]
        most = max(r1 - r0 for r0, r1 in bands) + self.ext
        self.buf = np.empty(c * kw * most * out[1], dtype=F32)
        # For each kernel column j: output columns [lo, hi) read input columns r, r + s, ...
        self.columns = [conv_tap_range(j, geom.pad[1], geom.stride[1], geom.dilation[1], self.width, 0, out[1])
                        for j in range(kw)]

    def band(self, c, r0, r1):
        rows = r1 - r0 + self.ext
        return self.buf[:c * self.geom.kernel[1] * rows * self.out[1]].reshape(
            c, self.geom.kernel[1], rows, self.out[1])

    def rows_in(self, r0, r1):
        """Band rows [t0, t1) that lie in the input, and the input row of t0."""
        first = r0 - self.geom.pad[0]
        rows = r1 - r0 + self.ext
        t0 = min(max(0, -first), rows)
        t1 = max(t0, min(rows, self.height - first))
        return t0, t1, first + t0

    def fill(self, s, xi, r0, r1):
        """S = the stacked band of image xi (C, H, W) for output rows [r0, r1), zeros outside."""
        t0, t1, row = self.rows_in(r0, r1)
        stride_w = self.geom.stride[1]

        def part(c0, c1):
            for j, (lo, hi, r) in enumerate(self.columns):
                dst = s[c0:c1, j]
                if hi <= lo or t1 <= t0:
                    dst[...] = 0
                    continue
                dst[:, :t0] = 0
                dst[:, t1:] = 0
                dst[:, t0:t1, :lo] = 0
                dst[:, t0:t1, hi:] = 0
                dst[:, t0:t1, lo:hi] = xi[c0:c1, row:row + t1 - t0, r:r + (hi - lo - 1) * stride_w + 1:stride_w]

        parallel.split(np, s.shape[0], part, elements=s.size)

    def fold(self, s, dxi, r0, r1):
        """dxi (C, H, W) += the stacked band's gradient dS folded back onto the input columns."""
        t0, t1, row = self.rows_in(r0, r1)
        if t1 <= t0:
            return
        stride_w = self.geom.stride[1]

        def part(c0, c1):
            for j, (lo, hi, r) in enumerate(self.columns):
                if hi > lo:
                    dxi[c0:c1, row:row + t1 - t0, r:r + (hi - lo - 1) * stride_w + 1:stride_w] += \
                        s[c0:c1, j, t0:t1, lo:hi]

        parallel.split(np, s.shape[0], part, elements=s.size)


def _row_major_weight(weight, group):
    """weight (O, Cg, kh, kw) as (kh, O, Cg * kw), contiguous: one GEMM operand per kernel row."""
    o, cg, kh, kw = weight.shape
    wr = np.empty((kh, o, cg, kw), dtype=F32)
    parallel.copy(np, wr, weight.transpose(2, 0, 1, 3))
    return wr.reshape(kh, o, cg * kw)


def forward(x, weight, bias, geom, group, out, y, relu=False):
    """y (N, O, Ho, Wo) = Caffe's convolution of x (N, C, H, W) with weight (O, C/group, kh, kw);
    relu: then max(y, 0), band by band while in cache (an in-place ReLU after it, see Net)."""
    n, c = x.shape[:2]
    o = weight.shape[0]
    g = group
    cg, og = c // g, o // g
    kh, kw = geom.kernel
    ho, wo = out
    bands = _bands(ho, wo, c, kw, (kh - 1) * geom.dilation[0] + 1)
    stack = _Stack(x.shape, geom, out, bands)
    wr = _row_major_weight(weight, g)
    depth = cg * kw
    plane = ho * wo
    for i in range(n):
        for r0, r1 in bands:
            s = stack.band(c, r0, r1)
            stack.fill(s, x[i], r0, r1)
            rows = s.shape[2]
            for gi in range(g):
                for ki in range(kh):
                    a = wr.ctypes.data + (ki * o + gi * og) * depth * _ITEM
                    b = s.ctypes.data + (gi * depth * rows + ki * geom.dilation[0]) * wo * _ITEM
                    cc = y.ctypes.data + ((i * o + gi * og) * plane + r0 * wo) * _ITEM
                    blas.sgemm_raw(False, False, og, (r1 - r0) * wo, depth, a, depth, b, rows * wo,
                                   0.0 if ki == 0 else 1.0, cc, plane)
            if bias is not None or relu:
                yb = y[i, :, r0:r1]
                parallel.split(np, o, lambda a0, a1: _epilogue(yb[a0:a1], bias, a0, a1, relu), elements=yb.size)
    return y


def _epilogue(yb, bias, a0, a1, relu):
    """yb (channels a0..a1 of an output band) += bias, then max(., 0) when relu."""
    if bias is not None:
        yb += bias[a0:a1].reshape((-1,) + (1,) * (yb.ndim - 1))
    if relu:
        np.maximum(yb, 0, out=yb)


def backward(x, weight, dy, geom, group, dx, dweight):
    """Caffe's convolution backward on this path: dx (N, C, H, W, zeros on entry, or None) +=
    the input gradient; dweight (O, C/group, kh, kw, or None) += the weight gradient."""
    n, c = x.shape[:2]
    o = weight.shape[0]
    g = group
    cg, og = c // g, o // g
    kh, kw = geom.kernel
    ho, wo = dy.shape[2:]
    dil = geom.dilation[0]
    bands = _bands(ho, wo, c, kw, (kh - 1) * dil + 1)
    stack = _Stack(x.shape, geom, (ho, wo), bands)
    grad = _Stack(x.shape, geom, (ho, wo), bands) if dx is not None else None
    depth = cg * kw
    plane = ho * wo
    dy = np.ascontiguousarray(dy, dtype=F32)
    wr = _row_major_weight(weight, g) if dx is not None else None
    # dW_i^T per group, (depth x Og): OpenBLAS runs S_i . dy^T faster than dy . S_i^T when Og is
    # small (VGG's 64 channels: 158 against 139 GFLOP/s on 2 cores) and as fast otherwise.
    dwt = np.zeros((kh, g, depth, og), dtype=F32) if dweight is not None else None
    for i in range(n):
        for r0, r1 in bands:
            cols = (r1 - r0) * wo
            rows = r1 - r0 + stack.ext
            top = dy.ctypes.data + (i * o * plane + r0 * wo) * _ITEM
            if dwt is not None:
                s = stack.band(c, r0, r1)
                stack.fill(s, x[i], r0, r1)
                for gi in range(g):
                    for ki in range(kh):
                        # dW_i^T (Cg*kw x Og) += S_i (Cg*kw x cols) . dy^T
                        blas.sgemm_raw(False, True, depth, og, cols,
                                       s.ctypes.data + (gi * depth * rows + ki * dil) * wo * _ITEM, rows * wo,
                                       top + gi * og * plane * _ITEM, plane,
                                       1.0, dwt.ctypes.data + (ki * g + gi) * depth * og * _ITEM, og)
            if dx is not None:
                ds = grad.band(c, r0, r1)
                ds[:, :, r1 - r0:] = 0  # the rows the first kernel row does not write
                for gi in range(g):
                    for ki in range(kh):
                        # dS rows shifted by i (Cg*kw x cols) += W_i^T . dy
                        blas.sgemm_raw(True, False, depth, cols, og,
                                       wr.ctypes.data + (ki * o + gi * og) * depth * _ITEM, depth,
                                       top + gi * og * plane * _ITEM, plane, 0.0 if ki == 0 else 1.0,
                                       ds.ctypes.data + (gi * depth * rows + ki * dil) * wo * _ITEM, rows * wo)
                grad.fold(ds, dx[i], r0, r1)
    if dwt is not None:
        # (kh, G, Cg, kw, Og) -> (G, Og, Cg, kh, kw)
        dweight += dwt.reshape(kh, g, cg, kw, og).transpose(1, 4, 2, 0, 3).reshape(dweight.shape)
