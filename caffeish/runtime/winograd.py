"""3x3 convolutions with stride 1 by Winograd's minimal filtering F(2x2, 3x3) (numpy, CPU).

Each 2x2 block of outputs is computed from the 4x4 input tile under it as

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise, summed over input channels)

with B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]] and
A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] (Lavin and Gray, 2015).  The sum over
channels of the 16 elementwise products is 16 GEMMs (O x C) . (C x tiles), 16
multiply-adds per tile and channel pair where direct convolution needs 36: 2.25
times fewer flops in the part that dominates.  The transforms are adds and
subtractions over strided views (no multiplications on the data), done band by
band of tile rows so that a band's transformed input and products stay bounded,
on both cores (caffeish.runtime.parallel).

The result differs from direct convolution by float32 rounding only (the
transforms' few extra additions, of the same size as a reordered sum): checked
against float64 in tests/test_winograd.py and against the golden cases through
whole nets.  The input gradient of such a convolution is one too (dy with the
kernel rotated and the channels swapped, padded by 2 - pad), see
caffeish.runtime.conv_grad; its weight gradient goes through the same transforms'
adjoints (weight_gradient).
"""
import numpy as np

from caffeish.runtime import parallel

F32 = np.float32

# Floats of transformed input (16 x C x tiles) per band (16 MiB).
BAND_BUDGET = 1 << 22
# The fewest input channels, and 2x2 output tiles per image, for which the transforms pay
# (measured on 2 cores, benchmarks/conv_layers.py, median of 5, conv_rows / Winograd: VGG's
# conv2_2 at 349x349 225 / 180 ms, conv3_1 98 / 79; its 64-channel layers and AlexNet's 13x13
# ones are faster by conv_rows or im2col).  Since the transforms read even and odd columns
# apart, the forward pays from 128 channels as the backward does.
MIN_CHANNELS = 128
MIN_TILES = 256
# The backward pays from 128 input and output channels (VGG's conv2_2 backward at 291x291:
# 327 ms by conv_rows, 255 by Winograd; conv2_1, 64 -> 128, is slower by Winograd).
BACKWARD_MIN_CHANNELS = 128


def applies(xp, x, geom, group, out, min_channels=None):
    """Whether the convolution of x (N, C, H, W) with this geometry is taken here (x with at
    least `min_channels` channels, default MIN_CHANNELS)."""
    if xp is not np or tuple(geom.kernel) != (3, 3) or tuple(geom.stride) != (1, 1):
        return False
    if tuple(geom.dilation) != (1, 1) or group != 1 or x.dtype != F32:
        return False
    least = MIN_CHANNELS if min_channels is None else min_channels
    return x.shape[1] >= least and ((out[0] + 1) // 2) * ((out[1] + 1) // 2) >= MIN_TILES


_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
# U[4a + b] = sum over i, j of G[a, i] G[b, j] g[3i + j]: one (16 x 9) . (9 x O*C) GEMM.
_KRON32 = np.kron(_G, _G).astype(F32)  # its entries (products of 0, 1/2 and 1) are exact


def transform_weight(weight):
    """G g G^T for weight (O, C, 3, 3): (16, O, C) float32, index 4a + b for G's rows a, b."""
    o, c = weight.shape[:2]
    return (_KRON32 @ np.reshape(weight, (o * c, 9)).T).reshape(16, o, c)


def _input_tiles(d, out):
    """B^T d B along one axis: four arrays from the four stride-2 views d[k::2] of d's axis -1."""
    d0, d1, d2, d3 = d
    np.subtract(d0, d2, out=out[0])
    np.add(d1, d2, out=out[1])
    np.subtract(d2, d1, out=out[2])
    np.subtract(d1, d3, out=out[3])


def _output_tiles(m, out):
    """A^T m along one axis: two arrays from four."""
    m0, m1, m2, m3 = m
    np.add(m0, m1, out=out[0])
    np.add(out[0], m2, out=out[0])
    np.subtract(m1, m2, out=out[1])
    np.subtract(out[1], m3, out=out[1])


def _chunks(n, th, tw, channels):
    """Work chunks (i0, i1, t0, t1): several whole images while their transformed arrays fit
    BAND_BUDGET together (one GEMM over all their tiles), else balanced bands [t0, t1) of tile
    rows of one image."""
    per_image = 16 * channels * th * tw
    if per_image <= BAND_BUDGET:
        m = max(1, min(n, BAND_BUDGET // max(per_image, 1)))
        count = -(-n // m)
        return [(n * i // count, n * (i + 1) // count, 0, th) for i in range(count)]
    rows = max(1, min(th, BAND_BUDGET // max(1, 16 * channels * tw)))
    count = -(-th // rows)
    bands = [(th * i // count, th * (i + 1) // count) for i in range(count)]
    return [(i, i + 1, t0, t1) for i in range(n) for t0, t1 in bands]


def _most(chunks, tw):
    """The most tiles in one chunk."""
    return max((i1 - i0) * (t1 - t0) for i0, i1, t0, t1 in chunks) * tw


class _Input:
    """B^T d B for the tiles of a chunk (images i0..i1, tile rows t0..t1): V (4, 4, C, m, tb, tw)."""

    def __init__(self, c, geom, size, tiles, chunks):
        self.c, self.geom, self.size, self.tiles = c, geom, size, tiles
        tw = tiles[1]
        rows = max(t1 - t0 for _, _, t0, t1 in chunks)
        self.half_w = tw + 1  # the padded band's columns, split into even and odd ones
        self.pad_buf = np.empty(2 * c * (2 * rows + 2) * self.half_w, dtype=F32)
        self.rows_buf = np.empty(4 * 2 * c * rows * self.half_w, dtype=F32)
        self.v_buf = np.empty(16 * c * _most(chunks, tw), dtype=F32)

    def transform(self, x, i0, i1, t0, t1):
        tb, tw = t1 - t0, self.tiles[1]
        v = self.v_buf[:16 * self.c * (i1 - i0) * tb * tw].reshape(4, 4, self.c, i1 - i0, tb, tw)
        for j in range(i1 - i0):
            self._image(x[i0 + j], t0, t1, v[:, :, :, j])
        return v

    def _image(self, xi, t0, t1, v):
        """v (4, 4, C, tb, tw) = the tiles of tile rows t0..t1 of image xi (C, H, W)."""
        c, half_w, tw = self.c, self.half_w, self.tiles[1]
        h, w = self.size
        ph, pw = self.geom.pad
        tb = t1 - t0
        hp = 2 * tb + 2
        # The band's input, zero-padded (rows 2*t0 - ph ..., columns -pw ...), its even and odd
        # columns apart (p[0], p[1]), so that every later pass reads contiguous rows.
        p = self.pad_buf[:2 * c * hp * half_w].reshape(2, c, hp, half_w)
        first = 2 * t0 - ph
        lo, hi = max(first, 0), min(first + hp, h)
        columns = []
        for e in range(2):  # padded column 2j + e is input column 2j + e - pw
            j0 = max(0, (pw - e + 1) // 2)
            j1 = min(half_w, (w + pw - e + 1) // 2)
            columns.append((j0, j1, 2 * j0 + e - pw))

        def fill(a, b):
            for e, (j0, j1, col) in enumerate(columns):
                dst = p[e, a:b]
                if hi <= lo or j1 <= j0:
                    dst[...] = 0
                    continue
                dst[:, :lo - first] = 0
                dst[:, hi - first:] = 0
                dst[:, lo - first:hi - first, :j0] = 0
                dst[:, lo - first:hi - first, j1:] = 0
                dst[:, lo - first:hi - first, j0:j1] = xi[a:b, lo:hi, col:col + 2 * (j1 - j0) - 1:2]

        parallel.split(np, c, fill, elements=p.size)
        u = self.rows_buf[:8 * c * tb * half_w].reshape(4, 2, c, tb, half_w)

        def transform_in(a, b):
            for e in range(2):
                _input_tiles([p[e, a:b, k:k + 2 * tb:2] for k in range(4)], [u[r, e, a:b] for r in range(4)])
            for r in range(4):
                # padded columns 2j + k: even ones at j (k = 0) and j + 1 (k = 2), odd ones likewise
                taps = [u[r, k % 2, a:b, :, k // 2:k // 2 + tw] for k in range(4)]
                _input_tiles(taps, [v[r, s, a:b] for s in range(4)])

        parallel.split(np, c, transform_in, elements=16 * c * tb * tw)


def forward(x, weight, bias, geom, out, y, wt=None, relu=False):
    """y (N, O, Ho, Wo) = Caffe's 3x3 stride-1 convolution of x (N, C, H, W), by F(2x2, 3x3);
    relu: then max(y, 0), while in cache."""
    n, c, h, w = x.shape
    o = weight.shape[0]
    ho, wo = out
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    if wt is None:
        wt = transform_weight(weight)
    chunks = _chunks(n, th, tw, max(c, o))
    most = _most(chunks, tw)
    source = _Input(c, geom, (h, w), (th, tw), chunks)
    m_buf = np.empty(16 * o * most, dtype=F32)
    half_buf = np.empty(8 * o * most, dtype=F32)
    for i0, i1, t0, t1 in chunks:
        tb, mi = t1 - t0, i1 - i0
        tiles = mi * tb * tw
        v = source.transform(x, i0, i1, t0, t1)
        m = m_buf[:16 * o * tiles].reshape(16, o, tiles)
        np.matmul(wt, v.reshape(16, c, tiles), out=m)
        m = m.reshape(4, 4, o, mi, tb, tw)
        half = half_buf[:8 * o * tiles].reshape(2, 4, o, mi, tb, tw)

        def transform_out(a, b):
            for s in range(4):
                _output_tiles([m[r, s, a:b] for r in range(4)], [half[q, s, a:b] for q in range(2)])
            for q in range(2):
                res = (m[q, 0, a:b], m[q, 1, a:b])  # m is consumed: scratch
                _output_tiles([half[q, s, a:b] for s in range(4)], res)
                r0 = 2 * t0 + q
                n_rows = min(tb, (ho - r0 + 1) // 2)
                for e in range(2):
                    n_cols = (wo - e + 1) // 2
                    if n_rows <= 0 or n_cols <= 0:
                        continue
                    for j in range(mi):
                        dst = y[i0 + j, a:b, r0:r0 + 2 * n_rows - 1:2, e:e + 2 * n_cols - 1:2]
                        dst[...] = res[e][:, j, :n_rows, :n_cols]
                        if bias is not None:
                            dst += bias[a:b].reshape(-1, 1, 1)
                        if relu:
                            np.maximum(dst, 0, out=dst)

        parallel.split(np, o, transform_out, elements=16 * o * tiles)
    return y


def _gradient_tiles(d, out):
    """A d along one axis (the adjoint of A^T): four arrays from two; out[3] = -d1."""
    d0, d1 = d
    np.copyto(out[0], d0)
    np.add(d0, d1, out=out[1])
    np.subtract(d0, d1, out=out[2])
    np.negative(d1, out=out[3])


def weight_gradient(x, dy, geom, dweight):
    """dweight (O, C, 3, 3) += the weight gradient of the 3x3 stride-1 convolution of x (N, C, H, W)
    with output gradient dy (N, O, Ho, Wo), by F(2x2, 3x3)'s adjoint:

        dU[ab] = sum over tiles of (A dY A^T)[ab] (O x tiles) . (B^T d B)[ab]^T (tiles x C),
        dW = G^T dU G,

    16 GEMMs over the tiles (2.25 times fewer flops than the direct sum over positions)."""
    n, c, h, w = x.shape
    o = dy.shape[1]
    ho, wo = dy.shape[2:]
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    chunks = _chunks(n, th, tw, max(c, o))
    most = _most(chunks, tw)
    source = _Input(c, geom, (h, w), (th, tw), chunks)
    g_buf = np.empty(4 * o * most, dtype=F32)  # dy's tiles, rows and columns even/odd apart
    r_buf = np.empty(8 * o * most, dtype=F32)
    m_buf = np.empty(16 * o * most, dtype=F32)
    du = np.zeros((16, o, c), dtype=F32)
    tmp = np.empty((16, o, c), dtype=F32)
    for i0, i1, t0, t1 in chunks:
        tb, mi = t1 - t0, i1 - i0
        tiles = mi * tb * tw
        v = source.transform(x, i0, i1, t0, t1)
        d = g_buf[:4 * o * tiles].reshape(2, 2, o, mi, tb, tw)
        rows = r_buf[:8 * o * tiles].reshape(4, 2, o, mi, tb, tw)
        m = m_buf[:16 * o * tiles].reshape(4, 4, o, mi, tb, tw)

        def transform_dy(a, b):
            for q in range(2):
                r0 = 2 * t0 + q
                n_rows = max(0, min(tb, (ho - r0 + 1) // 2))
                for e in range(2):
                    n_cols = (wo - e + 1) // 2
                    dst = d[q, e, a:b]
                    dst[...] = 0
                    if n_rows and n_cols:
                        for j in range(mi):
                            dst[:, j, :n_rows, :n_cols] = dy[i0 + j, a:b, r0:r0 + 2 * n_rows - 1:2,
                                                             e:e + 2 * n_cols - 1:2]
            for e in range(2):
                _gradient_tiles([d[0, e, a:b], d[1, e, a:b]], [rows[r, e, a:b] for r in range(4)])
            for r in range(4):
                _gradient_tiles([rows[r, 0, a:b], rows[r, 1, a:b]], [m[r, s, a:b] for s in range(4)])

        parallel.split(np, o, transform_dy, elements=16 * o * tiles)
        np.matmul(m.reshape(16, o, tiles), v.reshape(16, c, tiles).transpose(0, 2, 1), out=tmp)
        du += tmp
    # dW[o, c, i, j] = sum over a, b of G[a, i] G[b, j] dU[4a + b]
    dw = (_KRON32.T @ du.reshape(16, o * c)).reshape(3, 3, o, c)
    dweight += dw.transpose(2, 3, 0, 1)
