"""The numpy Pooling paths of layers/pooling.py against Caffe's loops, bit for bit, on many shapes.

pooling.py computes on the N*C planes in blocks (several per call, on several threads), takes
each kernel tap's slice only where its cells are inside the image, and has contiguous paths for
2x2 windows of stride 2 (the interior windows; the clipped ones around them take the tap loop).
Here a transliteration of Caffe's pooling_layer.cpp (vectorised over the planes only) checks
them over random geometries (kernels 1-4, strides 1-4, padding, ceil and floor rounding,
overlapping, disjoint and gapped windows, global pooling, 2x2/2 on odd and even sizes) and
inputs full of ties, zeros of both signs, infinities, NaN and -FLT_MAX:

* MAX forward: the same top values (the sign of a zero maximum aside: numpy's fmax picks
  either, Caffe the first) and exactly Caffe's mask;
* AVE forward: exactly Caffe's bits (0 + the cells in row-major order, / pool_size);
* MAX and AVE backward, with and without a mask top: exactly Caffe's bits (dx zeroed, then
  += per output in (ph, pw) order), NaN payloads aside;
* MAX backward for a top that is not the forward's: the first cell equal to it;
* a float64 bottom: MAX tops stay float64 (the float64 gradient checks use them), the same
  windows win, diffs are float32.

Each case runs with one block and with blocks of a few planes spread over two threads.
"""
import numpy as np
import pytest

from caffeish.errors import ShapeError
from caffeish.formats.schema import pb
from caffeish.graph.geometry import pool_params
from caffeish.ops import pooling
from caffeish.ops.pooling import AVE, MAX, _mask_backward, pool_backward, pool_forward
from caffeish.runtime import parallel

F = np.float32
FLT_MAX = F(np.finfo(np.float32).max)
# The special values overflow and make NaN on purpose (warnings from the pool's threads too).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SPECIAL = np.array([0.0, -0.0, 0.0, 1.0, 1.0, 2.0, -1.0, np.nan, -np.inf, np.inf, -FLT_MAX, FLT_MAX], F)


# -- Caffe's loops (pooling_layer.cpp), over the N*C planes at once ----------------------------------


def _windows(geom, h, w):
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = geom.kernel, geom.stride, geom.pad, geom.out
    for p in range(oh):
        for q in range(ow):
            hs, ws = p * sh - ph, q * sw - pw
            he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
            size = (he - hs) * (we - ws)
            yield p, q, hs, ws, he, we, size


def caffe_forward(x, geom, method):
    """(top, mask) of Forward_cpu: MAX scans with strict > from -FLT_MAX; AVE sums from 0."""
    n, c, h, w = x.shape
    planes = x.reshape(n * c, h, w)
    top = np.zeros((n * c,) + geom.out, F)
    mask = np.full((n * c,) + geom.out, -1, np.int64)
    for p, q, hs, ws, he, we, size in _windows(geom, h, w):
        rows = range(max(hs, 0), min(he, h))
        cols = range(max(ws, 0), min(we, w))
        if method == MAX:
            best = np.full(n * c, -FLT_MAX, F)
            idx = np.full(n * c, -1, np.int64)
            for r in rows:
                for s in cols:
                    v = planes[:, r, s]
                    gt = v > best
                    best = np.where(gt, v, best)
                    idx = np.where(gt, r * w + s, idx)
            top[:, p, q], mask[:, p, q] = best, idx
        else:
            total = np.zeros(n * c, F)
            for r in rows:
                for s in cols:
                    total = total + planes[:, r, s]
            with np.errstate(divide="ignore", invalid="ignore"):
                top[:, p, q] = total / F(size)
    return top.reshape(x.shape[:2] + geom.out), mask.reshape(x.shape[:2] + geom.out)


def caffe_max_backward(mask, dy, x_shape):
    """Backward_cpu for MAX: dx zeroed, then dx[mask] += dy in output order (-1: nothing)."""
    n, c, h, w = x_shape
    dx = np.zeros((n * c, h * w), F)
    m = mask.reshape(n * c, -1)
    d = dy.reshape(n * c, -1)
    planes = np.arange(n * c)
    for k in range(m.shape[1]):
        ok = m[:, k] >= 0
        with np.errstate(invalid="ignore"):
            dx[planes[ok], m[ok, k]] += d[ok, k]
    return dx.reshape(x_shape)


def caffe_ave_backward(dy, x_shape, geom):
    """Backward_cpu for AVE: dx zeroed, then += top_diff / pool_size over the window's image cells."""
    n, c, h, w = x_shape
    dx = np.zeros((n * c, h, w), F)
    d = dy.reshape((n * c,) + geom.out)
    for p, q, hs, ws, he, we, size in _windows(geom, h, w):
        share = d[:, p, q] / F(size) if size > 0 else None
        for r in range(max(hs, 0), min(he, h)):
            for s in range(max(ws, 0), min(we, w)):
                with np.errstate(invalid="ignore"):
                    dx[:, r, s] += share
    return dx.reshape(x_shape)


def first_equal(x, y, geom):
    """pool_backward's contract for any y: the first cell (row-major) of the window equal to y,
    where y is above -FLT_MAX; else -1."""
    n, c, h, w = x.shape
    planes = x.reshape(n * c, h, w)
    yy = y.reshape((n * c,) + geom.out)
    mask = np.full((n * c,) + geom.out, -1, np.int64)
    for p, q, hs, ws, he, we, size in _windows(geom, h, w):
        found = np.full(n * c, -1, np.int64)
        for r in range(max(hs, 0), min(hs + geom.kernel[0], h)):
            for s in range(max(ws, 0), min(ws + geom.kernel[1], w)):
                hit = (found < 0) & (planes[:, r, s] == yy[:, p, q]) & (yy[:, p, q] > -FLT_MAX)
                found[hit] = r * w + s
        mask[:, p, q] = found
    return mask.reshape(y.shape)


# -- comparisons --------------------------------------------------------------------------------------


def assert_bits(got, want, what):
    """Equal bit for bit, except that two NaNs may differ in payload and sign."""
    got, want = np.asarray(got, F), np.asarray(want, F)
    assert got.shape == want.shape, what
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    if not same.all():
        at = tuple(np.argwhere(~same)[0])
        pytest.fail(f"{what}: {int((~same).sum())} differ, first at {at}: got {got[at]!r}, Caffe {want[at]!r}")


def _data(rng, shape, kind):
    if kind == "gauss":
        return rng.standard_normal(shape, dtype=F)
    if kind == "ties":
        return rng.integers(-2, 3, shape).astype(F)
    if kind == "relu":
        return np.maximum(rng.standard_normal(shape, dtype=F), F(0))
    return rng.choice(SPECIAL, shape)


def _random_case(rng):
    while True:
        h, w = (int(v) for v in rng.integers(1, 15, 2))
        pp = pb.PoolingParameter(pool=MAX if rng.random() < 0.6 else AVE)
        if rng.random() < 0.04:
            pp.global_pooling = True
        elif rng.random() < 0.4:
            pp.kernel_size, pp.stride = 2, 2
            pp.pad = int(rng.random() < 0.2)
        else:
            pp.kernel_h, pp.kernel_w = (int(v) for v in rng.integers(1, 5, 2))
            pp.stride_h, pp.stride_w = (int(v) for v in rng.integers(1, 5, 2))
            if rng.random() < 0.5:
                pp.pad_h, pp.pad_w = int(rng.integers(0, pp.kernel_h)), int(rng.integers(0, pp.kernel_w))
        if rng.random() < 0.3:
            pp.round_mode = pb.PoolingParameter.FLOOR
        try:
            geom = pool_params(pp, h, w)
        except ShapeError:
            continue
        if geom.out[0] > 0 and geom.out[1] > 0:
            n, c = int(rng.integers(1, 3)), int(rng.integers(1, 5))
            return (n, c, h, w), geom, pp.pool


@pytest.fixture(params=["one block", "blocks on two threads"])
def blocking(request, monkeypatch):
    if request.param != "one block":
        monkeypatch.setattr(pooling, "BLOCK", 40)  # a few planes per block
        monkeypatch.setattr(parallel, "MIN_ELEMENTS", 1)
        monkeypatch.setenv("CAFFEISH_THREADS", "2")
    return request.param


@pytest.mark.parametrize("seed", range(4))
def test_random_geometries_match_caffe(seed, blocking):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        shape, geom, method = _random_case(rng)
        kind = ["gauss", "ties", "relu", "special"][int(rng.integers(0, 4))]
        x = _data(rng, shape, kind)
        dy = _data(rng, shape[:2] + geom.out, ["gauss", "special"][int(rng.integers(0, 2))])
        what = f"{method=} {shape=} {geom} {kind}"
        top, mask = caffe_forward(x, geom, method)
        with np.errstate(all="ignore"):
            got, got_mask = pool_forward(np, x, geom, method, want_mask=method == MAX)
            dx = pool_backward(np, x, got, dy, geom, method)
        if method == MAX:
            np.testing.assert_array_equal(got, top, err_msg=what)  # a zero maximum's sign aside
            assert_bits(got_mask, mask.astype(F), what + " mask")
            want_dx = caffe_max_backward(mask, dy, shape)
            assert_bits(dx, want_dx, what + " dx")
            with np.errstate(all="ignore"):
                assert_bits(_mask_backward(np, got_mask, dy, shape), want_dx, what + " dx from the mask top")
            assert_bits(pool_forward(np, x, geom, method)[0], got, what + " top without a mask")
        else:
            assert got_mask is None
            assert_bits(got, top, what)
            assert_bits(dx, caffe_ave_backward(dy, shape, geom), what + " dx")


@pytest.mark.parametrize("seed", range(2))
def test_max_backward_of_any_top(seed, blocking):
    """y need not be the forward's top: each output's dy goes to the first cell equal to y."""
    rng = np.random.default_rng(100 + seed)
    for _ in range(60):
        shape, geom, _ = _random_case(rng)
        x = _data(rng, shape, "ties")
        y = _data(rng, shape[:2] + geom.out, "ties")
        y[rng.random(y.shape) < 0.1] = -FLT_MAX
        dy = _data(rng, y.shape, "gauss")
        dx = pool_backward(np, x, y, dy, geom, MAX)
        assert_bits(dx, caffe_max_backward(first_equal(x, y, geom), dy, shape), f"{shape} {geom}")


@pytest.mark.parametrize("size", [(36, 36), (37, 37), (36, 39), (41, 6), (2, 2), (3, 3)])
@pytest.mark.parametrize("pad", [0, 1])
@pytest.mark.parametrize("floor", [False, True])
def test_2x2_stride_2(size, pad, floor, blocking):
    """VGG's windows, whose backward has contiguous paths: odd and even sizes (the last window
    clipped in ceil mode, left out in floor mode), padding, post-ReLU ties and all-zero windows."""
    h, w = size
    pp = pb.PoolingParameter(pool=MAX, kernel_size=2, stride=2, pad=pad)
    if floor:
        pp.round_mode = pb.PoolingParameter.FLOOR
    rng = np.random.default_rng(h * 100 + w + pad)
    for method in (MAX, AVE):
        pp.pool = method
        geom = pool_params(pp, h, w)
        x = _data(rng, (2, 5, h, w), "relu")
        x[0, 0, :2, :2] = [[-0.0, 0.0], [0.0, -0.0]]
        x[0, 1, 1::3, ::4] = -np.inf
        dy = _data(rng, (2, 5) + geom.out, "gauss")
        dy[0, 2, :, ::3] = -0.0
        dy[1, 0, ::2, :2] = np.inf
        top, mask = caffe_forward(x, geom, method)
        got, got_mask = pool_forward(np, x, geom, method, want_mask=method == MAX)
        dx = pool_backward(np, x, got, dy, geom, method)
        if method == MAX:
            np.testing.assert_array_equal(got, top)
            assert_bits(got_mask, mask.astype(F), "mask")
            assert_bits(dx, caffe_max_backward(mask, dy, x.shape), "MAX dx")
        else:
            assert_bits(got, top, "AVE top")
            assert_bits(dx, caffe_ave_backward(dy, x.shape, geom), "AVE dx")


def test_windows_of_nothing(blocking):
    """Windows of -inf, NaN and -FLT_MAX send nothing (Caffe's mask stays -1), on both paths."""
    for kernel, stride in ((2, 2), (3, 2), (3, 3)):
        pp = pb.PoolingParameter(pool=MAX, kernel_size=kernel, stride=stride)
        geom = pool_params(pp, 12, 12)
        x = np.full((1, 3, 12, 12), -np.inf, F)
        x[0, 1] = np.nan
        x[0, 2] = -FLT_MAX
        x[0, 2, 5, 5] = 1.0
        top, mask = caffe_forward(x, geom, MAX)
        got, got_mask = pool_forward(np, x, geom, MAX, want_mask=True)
        assert_bits(got_mask, mask.astype(F), "mask")
        dx = pool_backward(np, x, got, np.ones_like(got), geom, MAX)
        assert_bits(dx, caffe_max_backward(mask, np.ones_like(got), x.shape), "dx")
        assert dx.sum() == 1.0 and dx[0, 2, 5, 5] == 1.0


def test_non_contiguous_bottom():
    """A bottom that is a strided view (numpy may have to copy its planes) gives the same results."""
    rng = np.random.default_rng(7)
    base = np.maximum(rng.standard_normal((2, 6, 30, 34), dtype=F), F(0))
    x = base[:, ::2, :, 1:33]
    for method in (MAX, AVE):
        geom = pool_params(pb.PoolingParameter(pool=method, kernel_size=2, stride=2), 30, 32)
        top, _ = pool_forward(np, np.ascontiguousarray(x), geom, method)
        got, _ = pool_forward(np, x, geom, method)
        assert_bits(got, top, "top")
        dy = rng.standard_normal(top.shape, dtype=F)
        assert_bits(pool_backward(np, x, got, dy, geom, method),
                    pool_backward(np, np.ascontiguousarray(x), top, dy, geom, method), "dx")


def test_float64_bottom():
    """A float64 bottom (the float64 gradient checks): MAX keeps float64 tops, the same windows win,
    and the diffs are float32 as for a float32 bottom."""
    rng = np.random.default_rng(3)
    x32 = _data(rng, (2, 3, 9, 10), "ties")
    for kernel, stride, pad in ((2, 2, 0), (3, 2, 1), (2, 1, 0)):
        for method in (MAX, AVE):
            geom = pool_params(pb.PoolingParameter(pool=method, kernel_size=kernel, stride=stride, pad=pad), 9, 10)
            top32, mask32 = pool_forward(np, x32, geom, method, want_mask=method == MAX)
            top64, mask64 = pool_forward(np, x32.astype(np.float64), geom, method, want_mask=method == MAX)
            assert top64.dtype == (np.float64 if method == MAX else np.float32)
            np.testing.assert_array_equal(top64, top32)
            if method == MAX:
                assert_bits(mask64, mask32, "mask")
            dy = _data(rng, top32.shape, "gauss")
            dx64 = pool_backward(np, x32.astype(np.float64), top64, dy.astype(np.float64), geom, method)
            assert dx64.dtype == np.float32
            assert_bits(dx64, pool_backward(np, x32, top32, dy, geom, method), f"{kernel}/{stride}/{pad} dx")
