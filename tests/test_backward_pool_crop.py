"""Backward of Pooling, SPP and Crop (layers/pooling.py, layers/crop.py; ../shared/caffe/training.md 10.2, 10.8).

* `pool_backward` (the numpy reference the GPU kernel is tested against) equals, bit for bit, a
  transliteration of Caffe's Forward_cpu mask and Backward_cpu loops written here (strict `>` scan
  from -FLT_MAX, dx[mask] += dy in output order; AVE: dy / pool_size over the window's image
  cells), over MAX and AVE, padding, ceil and floor rounding, overlapping and gapped windows,
  windows past the input, global pooling, and inputs full of ties.
* float64 central differences of the float32 forward agree (MAX on distinct values, AVE).
* By hand: MAX ties (only the first maximum, row-major), padding never wins, -inf windows send
  nothing; AVE divisors with padding (padding counts in the divisor, padding cells get nothing).
* The layer: the mask top's data is the index Caffe reads; a top rewritten by a later in-place
  layer does not change MAX's routing (the forward's top is kept); STOCHASTIC is fatal (unless
  propagate_down is false); propagate_down false gives None.
* SPP: central differences, and the sum of its levels' pooling backwards for 1 to 3 levels.
* Crop: dx is zeros with dy at the offsets; the reference bottom gets nothing.
* The strict backend (CuPy's rules) runs the layers' xp code; the GPU launchers, where they exist.
"""
import numpy as np
import pytest

from caffeish.errors import UnsupportedError
from caffeish.formats.io import parse_text
from caffeish.formats.schema import TEST, pb
from caffeish.graph import registry
from caffeish.graph.geometry import pool_params
from caffeish.kernels import strict
from caffeish.ops.crop import crop_backward
from caffeish.ops.pooling import AVE, MAX, pool_backward, pool_forward
from caffeish.runtime import backend

F = np.float32
FLT_MAX = np.finfo(np.float32).max


def caffe_pool_backward(x, dy, geom, method):
    """Caffe's pooling_layer.cpp, as loops in float32: Forward_cpu's MAX mask (strict > from
    -FLT_MAX over the window clipped to the image) and Backward_cpu (zero, then += per output in
    (ph, pw) order; AVE: top_diff / pool_size with pool_size from the window clipped to
    [-pad, size + pad))."""
    n, c, H, W = x.shape
    (kh, kw), (sh, sw), (pad_h, pad_w), (oh, ow) = geom.kernel, geom.stride, geom.pad, geom.out
    dx = np.zeros(x.shape, np.float32)
    for a in range(n):
        for b in range(c):
            for ph in range(oh):
                for pw in range(ow):
                    hs, ws = ph * sh - pad_h, pw * sw - pad_w
                    if method == MAX:
                        he, we = min(hs + kh, H), min(ws + kw, W)
                        best, idx = F(-FLT_MAX), -1
                        for h in range(max(hs, 0), he):
                            for w in range(max(ws, 0), we):
                                if x[a, b, h, w] > best:
                                    best, idx = x[a, b, h, w], h * W + w
                        if idx >= 0:
                            dx[a, b, idx // W, idx % W] += dy[a, b, ph, pw]
                    else:
                        he, we = min(hs + kh, H + pad_h), min(ws + kw, W + pad_w)
                        size = (he - hs) * (we - ws)
                        for h in range(max(hs, 0), min(he, H)):
                            for w in range(max(ws, 0), min(we, W)):
                                dx[a, b, h, w] += dy[a, b, ph, pw] / F(size)
    return dx


def geometry(h, w, kernel=None, stride=1, pad=0, floor=False, global_pooling=False, method=MAX):
    pp = pb.PoolingParameter(pool=method)
    if global_pooling:
        pp.global_pooling = True
    else:
        if isinstance(kernel, tuple):
            pp.kernel_h, pp.kernel_w = kernel
        else:
            pp.kernel_size = kernel
        pp.stride, pp.pad = stride, pad
    if floor:
        pp.round_mode = pb.PoolingParameter.FLOOR
    return pool_params(pp, h, w)


GEOMETRIES = [  # (H, W, keyword arguments of `geometry`)
    (9, 12, {"kernel": 3, "stride": 2}),  # overlapping, ceil
    (9, 12, {"kernel": 3, "stride": 2, "pad": 1}),
    (9, 12, {"kernel": 2, "stride": 2, "pad": 1}),  # the AVE divisor's padding rule
    (7, 7, {"kernel": 3, "stride": 1, "pad": 1}),
    (5, 5, {"kernel": 1, "stride": 3}),  # gaps, and a window past the input (ceil)
    (6, 5, {"kernel": 3, "stride": 2, "floor": True}),
    (8, 8, {"kernel": 4, "stride": 4, "pad": 2}),
    (4, 6, {"kernel": 5, "stride": 1, "pad": 2}),
    (5, 9, {"kernel": (2, 4), "stride": 3, "pad": 1}),
    (5, 7, {"global_pooling": True}),
    (3, 3, {"kernel": 4, "stride": 1}),  # one window larger than the plane
]


@pytest.mark.parametrize("method", [MAX, AVE], ids=["MAX", "AVE"])
@pytest.mark.parametrize("h,w,kw", GEOMETRIES, ids=[str(i) for i in range(len(GEOMETRIES))])
def test_pool_backward_equals_caffes_loops(h, w, kw, method):
    rng = np.random.default_rng(h * 31 + w)
    geom = geometry(h, w, method=method, **kw)
    for x in (rng.standard_normal((2, 3, h, w)).astype(F),
              np.round(rng.standard_normal((2, 3, h, w)), 0).astype(F)):  # the second: full of ties
        y, _ = pool_forward(np, x, geom, method)
        dy = rng.standard_normal(y.shape).astype(F)
        dx = pool_backward(np, x, y, dy, geom, method)
        assert dx.dtype == F and dx.shape == x.shape and dx.flags.c_contiguous
        np.testing.assert_array_equal(dx, caffe_pool_backward(x, dy, geom, method))


def numeric_grad(f, x, r, eps):
    """float64 central differences of sum(f(x) * r), f run in float32."""
    g = np.zeros(x.shape, np.float64)
    for i in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[i] += F(eps)
        down[i] -= F(eps)
        diff = np.sum(f(up).astype(np.float64) * r) - np.sum(f(down).astype(np.float64) * r)
        g[i] = diff / (np.float64(up[i]) - np.float64(down[i]))
    return g


@pytest.mark.parametrize("method", [MAX, AVE], ids=["MAX", "AVE"])
def test_pool_backward_matches_finite_differences(method):
    rng = np.random.default_rng(1)
    h, w = 7, 8
    geom = geometry(h, w, kernel=3, stride=2, pad=1, method=method)
    # Distinct values spaced 0.1 apart: MAX is locally linear for steps of 0.01.
    x = (rng.permutation(2 * h * w).reshape(2, 1, h, w) * 0.1 - 5).astype(F)
    y, _ = pool_forward(np, x, geom, method)
    r = rng.standard_normal(y.shape)
    num = numeric_grad(lambda v: pool_forward(np, v, geom, method)[0], x, r, 0.01)
    dx = pool_backward(np, x, y, r.astype(F), geom, method)
    np.testing.assert_allclose(dx, num, rtol=1e-3, atol=1e-4)


def test_max_ties_go_to_the_first_maximum_only():
    x = np.array([[[[1, 3, 3],
                    [3, 0, 3],
                    [2, 3, 1]]]], F)
    geom = geometry(3, 3, kernel=2, stride=1)  # 2x2 outputs, every window holds a 3
    y, _ = pool_forward(np, x, geom, MAX)
    dy = np.array([[[[1, 10], [100, 1000]]]], F)
    dx = pool_backward(np, x, y, dy, geom, MAX)
    # windows: (0,0) -> first 3 at (0,1); (0,1) -> (0,1); (1,0) -> (1,0); (1,1) -> (1,2)
    expect = np.zeros_like(x)
    expect[0, 0, 0, 1] = 11
    expect[0, 0, 1, 0] = 100
    expect[0, 0, 1, 2] = 1000
    np.testing.assert_array_equal(dx, expect)


def test_max_padding_never_wins_and_empty_windows_send_nothing():
    # All-negative input with padding: the window maxima are image cells, never the padding's 0.
    x = np.full((1, 1, 2, 2), -5, F)
    x[0, 0, 1, 1] = -7
    geom = geometry(2, 2, kernel=2, stride=1, pad=1)  # 3x3 windows
    y, _ = pool_forward(np, x, geom, MAX)
    dy = np.ones(y.shape, F)
    dx = pool_backward(np, x, y, dy, geom, MAX)
    np.testing.assert_array_equal(dx, caffe_pool_backward(x, dy, geom, MAX))
    assert dx.sum() == 9 and dx[0, 0, 1, 1] == 1  # the -7's own corner window
    # A plane of -inf: no cell beats -FLT_MAX, Caffe's mask stays -1, nothing is sent.
    x = np.full((1, 2, 4, 4), -np.inf, F)
    x[0, 1] = np.nan
    geom = geometry(4, 4, kernel=2, stride=2)
    y, _ = pool_forward(np, x, geom, MAX)
    dx = pool_backward(np, x, y, np.ones(y.shape, F), geom, MAX)
    np.testing.assert_array_equal(dx, np.zeros_like(x))


def test_ave_divisor_counts_padding_but_padding_cells_get_nothing():
    # 3x3 input, kernel 2, stride 2, pad 1: windows start at -1 and 1 on each axis; the divisor
    # is min(start + 2, 3 + 1) - start = 2 on both, so every window divides by 4 (its padding
    # cells count) and every image cell is in exactly one window.
    geom = geometry(3, 3, kernel=2, stride=2, pad=1, method=AVE)
    assert geom.out == (2, 2)
    x = np.zeros((1, 1, 3, 3), F)
    dy = np.array([[[[4, 8], [12, 16]]]], F)
    dx = pool_backward(np, x, pool_forward(np, x, geom, AVE)[0], dy, geom, AVE)
    np.testing.assert_array_equal(dx[0, 0], np.array([[1, 2, 2], [3, 4, 4], [3, 4, 4]], F))
    # The ceil overhang does not count: 4 wide, kernel 3, stride 2 -> windows [0,3) and [2,5)
    # clipped to [2,4): divisors 3 and 2 along w.
    geom = geometry(1, 4, kernel=(1, 3), stride=2, method=AVE)
    dy = np.array([[[[6, 6]]]], F)
    dx = pool_backward(np, np.zeros((1, 1, 1, 4), F), None, dy, geom, AVE)
    np.testing.assert_array_equal(dx[0, 0, 0], np.array([2, 2, 5, 3], F))


def layer(text, phase=TEST):
    return registry.create(parse_text(text, pb.LayerParameter()), phase)


def run_layer(text, x, phase=TEST, needs_backward=True):
    lay = layer(text, phase)
    lay.reshape([x.shape])
    lay.needs_backward = needs_backward
    return lay, lay.forward(np, [x], [])


POOL = 'name: "p" type: "Pooling" bottom: "x" top: "y" {tops} pooling_param {{ {params} }}'


def test_mask_top_data_is_the_index():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 6, 6)).astype(F)
    text = POOL.format(tops='top: "mask"', params="pool: MAX kernel_size: 3 stride: 2 pad: 1")
    lay, (y, mask) = run_layer(text, x)
    dy = rng.standard_normal(y.shape).astype(F)
    (dx,) = lay.backward(np, [dy, np.zeros_like(mask)], [y, mask], [x], [], [True], [])
    np.testing.assert_array_equal(dx, caffe_pool_backward(x, dy, lay.geometry, MAX))
    # Caffe reads whatever the mask top holds: point every output of plane (1, 2) at cell 5.
    moved = mask.copy()
    moved[1, 2] = 5
    (dx2,) = lay.backward(np, [dy, np.zeros_like(mask)], [y, moved], [x], [], [True], [])
    np.testing.assert_array_equal(dx2[1, 2].reshape(-1)[5], np.cumsum(dy[1, 2], dtype=F)[-1])  # added in output order
    assert np.count_nonzero(dx2[1, 2]) == 1
    np.testing.assert_array_equal(dx2[:1], dx[:1])


def test_max_routing_survives_an_in_place_layer_on_the_top():
    """A later in-place layer (a leaky ReLU) rewrites the top blob; Caffe's mask still routes by
    the forward's maxima, and so does the kept copy of the top."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 6, 6)).astype(F)
    text = POOL.format(tops="", params="pool: MAX kernel_size: 2 stride: 2")
    lay, (y,) = run_layer(text, x)
    expect = caffe_pool_backward(x, np.ones(y.shape, F), lay.geometry, MAX)
    y *= F(0.1)  # in place, as the runtime's forward_in_place would
    (dx,) = lay.backward(np, [np.ones(y.shape, F)], [y], [x], [], [True], [])
    np.testing.assert_array_equal(dx, expect)
    # Without needs_backward nothing is kept (inference pays nothing).
    lay, _ = run_layer(text, x, needs_backward=False)
    assert lay.saved_top is None


def test_stochastic_backward_is_fatal_and_propagate_down_false_gives_none():
    x = np.abs(np.random.default_rng(4).standard_normal((1, 1, 4, 4))).astype(F)
    lay, (y,) = run_layer(POOL.format(tops="", params="pool: STOCHASTIC kernel_size: 2 stride: 2"), x)
    with pytest.raises(UnsupportedError, match="STOCHASTIC"):
        lay.backward(np, [np.ones_like(y)], [y], [x], [], [True], [])
    assert lay.backward(np, [np.ones_like(y)], [y], [x], [], [False], []) == [None]
    with pytest.raises(UnsupportedError, match="STOCHASTIC"):
        pool_backward(np, x, y, np.ones_like(y), lay.geometry, pb.PoolingParameter.STOCHASTIC)
    lay, (y,) = run_layer(POOL.format(tops="", params="pool: AVE kernel_size: 2"), x)
    assert lay.backward(np, [np.ones_like(y)], [y], [x], [], [False], []) == [None]


SPP = 'name: "s" type: "SPP" bottom: "x" top: "y" spp_param {{ pyramid_height: {h} pool: {pool} }}'


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_spp_matches_finite_differences(pool):
    rng = np.random.default_rng(5)
    x = (rng.permutation(2 * 6 * 7).reshape(1, 2, 6, 7) * 0.1 - 3).astype(F)
    lay, (y,) = run_layer(SPP.format(h=3, pool=pool), x)
    r = rng.standard_normal(y.shape)
    num = numeric_grad(lambda v: lay.forward(np, [v], [])[0], x, r, 0.01)
    lay.forward(np, [x], [])
    (dx,) = lay.backward(np, [r.astype(F)], [y], [x], [], [True], [])
    np.testing.assert_allclose(dx, num, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("height", [1, 2, 3])
@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_spp_is_the_sum_of_its_levels_in_order(height, pool):
    rng = np.random.default_rng(height)
    x = np.round(rng.standard_normal((2, 3, 9, 6)), 0).astype(F)  # ties
    lay, (y,) = run_layer(SPP.format(h=height, pool=pool), x)
    dy = rng.standard_normal(y.shape).astype(F)
    (dx,) = lay.backward(np, [dy], [y], [x], [], [True], [])
    method = MAX if pool == "MAX" else AVE
    expect, start = None, 0
    for geom in lay.levels:
        width = 3 * geom.out[0] * geom.out[1]
        dy_level = dy.reshape(2, 3, *geom.out) if height == 1 else dy[:, start:start + width].reshape(2, 3, *geom.out)
        start += width
        part = caffe_pool_backward(x, dy_level, geom, method)
        expect = part if expect is None else expect + part
    np.testing.assert_array_equal(dx, expect)
    assert lay.backward(np, [dy], [y], [x], [], [False], []) == [None]


CROP = 'name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param {{ {params} }}'


@pytest.mark.parametrize("params,ref_shape", [
    ("axis: 2 offset: 1 offset: 2", (1, 1, 3, 4)),
    ("axis: 1 offset: 1", (1, 2, 3, 3)),
    ("axis: -1 offset: 3", (7, 7, 7, 2)),
])
def test_crop_backward_scatters_dy_at_the_offsets(params, ref_shape):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 5, 6)).astype(F)
    ref = np.zeros(ref_shape, F)
    lay = layer(CROP.format(params=params))
    lay.reshape([x.shape, ref.shape])
    (y,) = lay.forward(np, [x, ref], [])
    dy = rng.standard_normal(y.shape).astype(F)
    dx, dref = lay.backward(np, [dy], [y], [x, ref], [], [True, True], [])
    assert dref is None
    # Independent check: the adjoint of the crop, <crop(v), dy> == <v, dx> for every basis v.
    np.testing.assert_array_equal(dx[tuple(slice(o, o + n) for o, n in zip(lay.offsets, y.shape))], dy)
    mask = np.ones(x.shape, bool)
    mask[tuple(slice(o, o + n) for o, n in zip(lay.offsets, y.shape))] = False
    assert not dx[mask].any() and dx.dtype == F and dx.shape == x.shape
    np.testing.assert_array_equal(crop_backward(np, dy, lay.offsets, x.shape), dx)
    assert lay.backward(np, [dy], [y], [x, ref], [], [False, True], []) == [None, None]


# -- the strict backend (CuPy's rules) -----------------------------------------------------------------

xp = strict.XP


def dev(a):
    return xp.asarray(np.asarray(a, dtype=F))


def host(a):
    return backend.to_numpy(a)


@pytest.fixture
def strict_xp_code(monkeypatch):
    """The strict module without our kernels bound to it: the layers' own xp code under CuPy's rules."""
    monkeypatch.setattr(backend, "_kernel_sets", {k: v for k, v in backend._kernel_sets.items()
                                                  if k != id(xp)})
    return xp


STRICT_CASES = [
    POOL.format(tops="", params="pool: MAX kernel_size: 3 stride: 2 pad: 1"),
    POOL.format(tops="", params="pool: AVE kernel_size: 3 stride: 2 pad: 1"),
    POOL.format(tops="", params="pool: MAX global_pooling: true"),
    POOL.format(tops="", params="pool: AVE global_pooling: true"),
    POOL.format(tops='top: "mask"', params="pool: MAX kernel_size: 2 stride: 2"),
    SPP.format(h=3, pool="MAX"),
    SPP.format(h=2, pool="AVE"),
]


def run_backward(xp_, text, x, dy_seed=7):
    lay = layer(text)
    tops_n = len(lay.param.top)
    lay.reshape([x.shape])
    lay.needs_backward = True
    tops = lay.forward(xp_, [xp_.asarray(x)], [])
    rng = np.random.default_rng(dy_seed)
    dys = [xp_.asarray(rng.standard_normal(tuple(t.shape)).astype(F)) for t in tops][:tops_n]
    (dx,) = lay.backward(xp_, dys, tops, [xp_.asarray(x)], [], [True], [])
    return host(dx)


@pytest.mark.parametrize("text", STRICT_CASES, ids=[f"case{i}" for i in range(len(STRICT_CASES))])
def test_backward_under_strict_xp(strict_xp_code, text):
    x = np.round(np.random.default_rng(8).standard_normal((2, 3, 7, 9)), 1).astype(F)
    np.testing.assert_array_equal(run_backward(strict_xp_code, text, x), run_backward(np, text, x))


def test_crop_backward_under_strict_xp(strict_xp_code):
    dy = np.random.default_rng(9).standard_normal((2, 3, 2, 4)).astype(F)
    got = crop_backward(strict_xp_code, dev(dy), (0, 0, 1, 2), (2, 3, 5, 6))
    np.testing.assert_array_equal(host(got), crop_backward(np, dy, (0, 0, 1, 2), (2, 3, 5, 6)))


def _have_launchers():
    from caffeish.kernels.launch import Kernels

    return hasattr(Kernels, "pool_backward") and hasattr(Kernels, "crop_backward")


@pytest.mark.skipif(not _have_launchers(), reason="the GPU launchers pool_backward/crop_backward are not there yet")
@pytest.mark.parametrize("text", STRICT_CASES[:4], ids=[f"case{i}" for i in range(4)])
def test_backward_on_the_strict_gpu_path(text):
    """The layers call our kernels on the strict backend (CuPy's rules, kernels on the CPU harness)."""
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler for the kernel harness")
    strict_xp = backend.get("strict")
    x = np.round(np.random.default_rng(10).standard_normal((2, 3, 7, 9)), 1).astype(F)
    np.testing.assert_array_equal(run_backward(strict_xp, text, x), run_backward(np, text, x))
