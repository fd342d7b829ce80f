"""pooling.cu and crop.cu, every kernel and every launch path, on the CPU harness against the numpy runtime.

The launchers (caffeish.kernels.launch.Kernels.pool/crop) pick a kernel by
geometry and alignment: pooling's 2x2 stride-2 kernels with float4 or float2
loads (max with and without the mask, ave) or the general ones (any window,
padding, stride, ceil/floor, global pooling); crop's float4 rows (the data rows
0 to 3 floats off a 16-byte boundary), float rows (long runs) or packed short
rows, long rows split into parts.  Each kernel runs on at least 200 randomized
cases, inputs placed 0 to 3 floats past a 16-byte boundary so that every
alignment path is taken, and the results must equal the numpy layers'
(layers/pooling.py, layers/crop.py) exactly: values (NaN where numpy has NaN),
masks as indices, ties to the first maximum in Caffe's scan order.  The harness
counts misaligned vector accesses (harness_shim.h), and there must be none.

These tests need a C++ compiler (g++, or $CXX); they skip without one, except
under CI (the CI environment variable set), where a missing compiler fails.
"""
import collections
import ctypes
import os
import shutil
import textwrap

import numpy as np
import pytest
from google.protobuf import text_format

import caffeish
from caffeish.errors import ShapeError
from caffeish.formats.schema import TEST, pb
from caffeish.graph.geometry import crop_offsets, pool_params

if shutil.which(os.environ.get("CXX", "g++")) is None and not os.environ.get("CI"):
    pytest.skip("no C++ compiler for the kernel harness (g++ or $CXX)", allow_module_level=True)

from caffeish.kernels import harness, launch  # noqa: E402
from kernel_counting import CountingKernels  # noqa: E402
from caffeish.ops.pooling import pool_forward  # noqa: E402

MIN_CASES = 200
P = pb.PoolingParameter
FLT_MAX = np.finfo(np.float32).max
SPECIALS = np.array([np.nan, np.inf, -np.inf, FLT_MAX, -FLT_MAX, 0.0, -0.0], np.float32)


def misaligned(module):
    """Misaligned vector accesses the harness has counted in kernels/<module>.cu so far."""
    try:
        return ctypes.c_int.in_dll(harness.module(module)._lib, "harness_misaligned").value
    except ValueError:  # the module makes no vector access at all
        return 0


def placed(rng, values, shift=None):
    """`values` copied into a fresh buffer starting `shift` floats (random 0-3) past a 16-byte boundary."""
    shift = int(rng.integers(0, 4)) if shift is None else shift
    buf = np.empty(values.size + 8, np.float32)
    start = (-(buf.ctypes.data // 4)) % 4 + shift
    out = buf[start:start + values.size].reshape(values.shape)
    out[...] = values
    assert launch._address(out) % 16 == 4 * shift
    return out


# ---------------------------------------------------------------------------------- pooling

def _pool_case(rng, method, kind):
    """(x, geometry) for one random pooling; kind: "f4", "f2" (the 2x2 vector kernels' geometry and
    alignment, with now and then an odd width or a misaligned input for the general kernel), "any"."""
    pp = P(pool=method)
    shift = int(rng.integers(0, 4))
    if kind != "any":
        pp.kernel_size, pp.stride = 2, 2
        h = int(rng.integers(1, 12))
        w = 2 * int(rng.integers(1, 12)) if rng.random() < 0.95 else int(rng.choice([258, 300, 2 * 97]))
        if kind == "f4":
            w, shift = w + w % 4, 0
        else:
            shift = 2 * int(rng.integers(0, 2)) if w % 4 else 2
        if rng.random() < 0.1:
            w -= 1  # odd: the general kernel (the last window overhangs in ceil mode)
        elif rng.random() < 0.1:
            shift = 1 + 2 * int(rng.integers(0, 2))  # misaligned: the general kernel
    else:
        if rng.random() < 0.12:
            pp.global_pooling = True
        else:
            kh, kw = (int(v) for v in rng.integers(1, 6, 2))
            pp.kernel_h, pp.kernel_w = kh, kw
            pp.stride_h, pp.stride_w = (int(v) for v in rng.integers(1, 5, 2))
            if rng.random() < 0.6:
                pp.pad_h, pp.pad_w = int(rng.integers(0, kh)), int(rng.integers(0, kw))  # Caffe: pad < kernel
        h, w = (int(v) for v in rng.integers(1, 16, 2))
        if rng.random() < 0.05:
            w = int(rng.integers(130, 300))  # more outputs per row than one step of a warp
    if rng.random() < 0.3:
        pp.round_mode = P.FLOOR
    n, c = (int(v) for v in rng.integers(1, 4, 2))
    try:
        geom = pool_params(pp, h, w)
    except ShapeError:
        return None
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    r = rng.random()
    if r < 0.35:
        x = np.round(x).astype(np.float32)  # ties: the first maximum in scan order wins
    elif r < 0.6:
        flat = x.reshape(-1)
        hit = rng.random(flat.size) < rng.choice([0.1, 0.5, 1.0])
        flat[hit] = rng.choice(SPECIALS, int(hit.sum()))
    elif r < 0.65:
        x[...] = rng.choice([-np.inf, np.nan, -FLT_MAX])  # no window sees anything: mask -1
    return placed(rng, x, shift), geom


def _check_pool(k, x, geom, method, want_mask):
    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf in AVE: NaN, as on the GPU
        ref, ref_mask = pool_forward(np, np.array(x), geom, method, want_mask)
    y, mask = k.pool(x, geom, method, want_mask)
    ok = y.shape == ref.shape and np.array_equal(y, ref, equal_nan=True)
    if want_mask:
        ok = ok and mask is not None and np.array_equal(mask, ref_mask)
    else:
        ok = ok and mask is None
    return ok


def test_pooling_kernels_match_numpy_exactly():
    """max_pool, ave_pool and the four 2x2 vector kernels: 200+ cases each (MAX also counted
    with and without the mask), values and masks equal to the numpy runtime's."""
    rng = np.random.default_rng(11)
    k = CountingKernels()
    names = ("max_pool", "ave_pool", "max_pool_2x2_f2", "max_pool_2x2_f4", "ave_pool_2x2_f2", "ave_pool_2x2_f4")
    masks = collections.Counter()
    failures, cases = [], 0
    before = misaligned("pooling")
    while min(k.count[n] for n in names) < MIN_CASES or min(masks.values(), default=0) < MIN_CASES // 2 \
            or len(masks) < 6:
        method = (P.MAX, P.AVE)[cases % 2]
        kind = ("f4", "f2", "any")[(cases // 2) % 3]
        case = _pool_case(rng, method, kind)
        if case is None:
            continue
        x, geom = case
        want_mask = method == P.MAX and rng.random() < 0.5
        k.last = None
        ok = _check_pool(k, x, geom, method, want_mask)
        cases += 1
        name = k.last[0] if k.last else "-"
        if name.startswith("max"):
            masks[(name, want_mask)] += 1
        if not ok:
            failures.append(f"{name} mask={want_mask} x{x.shape} at {launch._address(x) % 16} {geom}")
    assert not failures, f"{len(failures)} of {cases} cases differ:\n" + "\n".join(failures[:10])
    assert misaligned("pooling") == before


def test_pooling_picks_the_kernel_by_geometry_and_alignment():
    rng = np.random.default_rng(12)
    k = CountingKernels()
    x = rng.standard_normal((2, 3, 7, 12)).astype(np.float32)
    geom = pool_params(P(pool=P.MAX, kernel_size=2, stride=2), 7, 12)
    for shift, name in ((0, "max_pool_2x2_f4"), (2, "max_pool_2x2_f2"), (1, "max_pool"), (3, "max_pool")):
        assert _check_pool(k, placed(rng, x, shift), geom, P.MAX, True)
        assert k.last[0] == name, (shift, k.last[0])
    xw = rng.standard_normal((2, 3, 7, 14)).astype(np.float32)  # W % 4 == 2: float2 even when aligned
    assert _check_pool(k, placed(rng, xw, 0), pool_params(P(pool=P.AVE, kernel_size=2, stride=2), 7, 14), P.AVE, False)
    assert k.last[0] == "ave_pool_2x2_f2"
    for pp in (P(pool=P.MAX, kernel_size=2, stride=2, pad=1), P(pool=P.MAX, kernel_size=3, stride=2),
               P(pool=P.MAX, kernel_size=2, stride=1), P(pool=P.MAX, global_pooling=True)):
        assert _check_pool(k, placed(rng, x, 0), pool_params(pp, 7, 12), P.MAX, False)
        assert k.last[0] == "max_pool"
    # The launch: one warp per long output row, blocks of 256 threads, no grid-stride loop.
    big = rng.standard_normal((1, 2, 4, 2 * 300)).astype(np.float32)
    assert _check_pool(k, placed(rng, big, 0), pool_params(P(pool=P.MAX, kernel_size=2, stride=2), 4, 600),
                       P.MAX, True)
    name, grid, block, args = k.last
    assert name == "max_pool_2x2_f4" and block == (256,) and grid == (1,) and args[-1] == 5
    assert misaligned("pooling") == 0


def test_pooling_mask_and_ties_follow_caffes_scan_order():
    """Hand-made windows: the first maximum wins, NaN and -inf never do, -FLT_MAX does not beat the
    start value (mask -1), and AVE divides by the window clipped to the padded image."""
    k = CountingKernels()
    nan, inf = np.nan, np.inf
    x = np.array([[1, 1, 2, nan, -inf, -inf, 0, 5],
                  [1, 1, 2, 2, nan, -FLT_MAX, 5, 5]], np.float32)[None, None]
    for shift in range(4):
        y, mask = k.pool(placed(np.random.default_rng(0), x, shift),
                         pool_params(P(pool=P.MAX, kernel_size=2, stride=2), 2, 8), P.MAX, True)
        np.testing.assert_array_equal(y.reshape(-1), [1, 2, -FLT_MAX, 5])
        np.testing.assert_array_equal(mask.reshape(-1), [0, 2, -1, 7])
    geom = pool_params(P(pool=P.AVE, kernel_size=3, stride=2, pad=1), 2, 8)
    y, _ = k.pool(np.ones((1, 1, 2, 8), np.float32), geom, P.AVE)
    ref, _ = pool_forward(np, np.ones((1, 1, 2, 8), np.float32), geom, P.AVE)
    np.testing.assert_array_equal(y, ref)
    assert y[0, 0, 0, 0] == np.float32(4) / np.float32(9)  # 2x2 of the image in a 3x3 padded window


def test_pooling_empty_blobs():
    k = CountingKernels()
    geom = pool_params(P(pool=P.MAX, kernel_size=2, stride=2), 6, 8)
    for shape in ((0, 3, 6, 8), (2, 0, 6, 8)):
        y, mask = k.pool(np.zeros(shape, np.float32), geom, P.MAX, True)
        assert y.shape == mask.shape == shape[:2] + (3, 4)
    assert not k.count


def _pool_net(method, tops):
    top = " ".join(f'top: "{t}"' for t in tops)
    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 8 } } }'
            f'layer {{ name: "p" type: "Pooling" bottom: "x" {top} pooling_param {{ pool: {method} '
            'kernel_size: 2 stride: 2 } }')
    return text_format.Parse(text, pb.NetParameter())


def test_the_mask_is_computed_only_for_a_second_top(monkeypatch):
    asked = []
    original = launch.Kernels.pool
    monkeypatch.setattr(launch.Kernels, "pool", lambda self, x, geom, method, want_mask=False:
                        asked.append(want_mask) or original(self, x, geom, method, want_mask))
    x = np.random.default_rng(13).standard_normal((2, 3, 6, 8)).astype(np.float32)
    for tops in (("y",), ("y", "mask")):
        want = caffeish.Net(_pool_net("MAX", tops), None, TEST).forward(x=x)
        got = caffeish.Net(_pool_net("MAX", tops), None, TEST, backend="harness").forward(x=x)
        for name in tops:
            np.testing.assert_array_equal(got[name], want[name])
    assert asked == [False, True]


# ---------------------------------------------------------------------------------- crop

def _crop_case(rng, vector):
    """(CropParameter, data shape, reference shape); `vector`: inner sizes and offsets that allow
    float4 rows (multiples of 4) more often."""
    ndim = int(rng.integers(1, 8))
    data = [int(v) for v in rng.integers(1, 7 if ndim <= 4 else 4, ndim)]
    if rng.random() < 0.5:
        data[-1] = int(rng.integers(32, 90))  # a long innermost run, as FCN's crops have
    if vector:
        data[-1] = 4 * max(2, data[-1] // 4)
    cp = pb.CropParameter(axis=int(rng.integers(-ndim, ndim)))
    start = cp.axis % ndim
    mode = rng.random()
    if mode < 0.6:
        offs = [int(rng.integers(1, d)) if d > 1 else 0 for d in data[start:]]
        cp.offset.extend(offs)
    elif mode < 0.8:
        cp.offset.append(int(rng.integers(0, min(data[start:]))))
        offs = [cp.offset[0]] * (ndim - start)
    else:
        offs = [0] * (ndim - start)
    ref = list(data[:start]) + [int(rng.integers(1, d - o + 1)) for d, o in zip(data[start:], offs)]
    if vector and ndim - 1 >= start:
        room = data[-1] - offs[-1]
        ref[-1] = 4 * int(rng.integers(1, room // 4 + 1)) if room >= 4 else ref[-1]
    if rng.random() < 0.2:
        ref[:start] = [int(v) for v in rng.integers(1, 5, start)]  # not checked before the axis
    return cp, tuple(data), tuple(ref)


def test_crop_kernels_match_numpy_exactly():
    """crop_rows4 (each of the 4 shifts) and crop_rows (rows of a warp or more, and shorter): 200+ N-D crops each, with the
    data placed at every alignment; equal to the numpy layer's slice."""
    rng = np.random.default_rng(21)
    k = CountingKernels()
    shifts = collections.Counter()
    failures, cases = [], 0
    before = misaligned("crop")
    names = ("crop_rows4", "crop_rows long", "crop_rows short")
    while min(k.count[n] for n in names) < MIN_CASES or min(shifts[s] for s in range(4)) < MIN_CASES // 4:
        cp, data_shape, ref_shape = _crop_case(rng, vector=k.count["crop_rows4"] < MIN_CASES and rng.random() < 0.5)
        _, offsets, top = crop_offsets(cp, data_shape, ref_shape)
        x = placed(rng, rng.standard_normal(data_shape).astype(np.float32), int(rng.choice([0, 0, 1, 2, 3])))
        ref = x[tuple(slice(o, o + t) for o, t in zip(offsets, top))]
        k.last = None
        y = k.crop(x, offsets, top)
        cases += 1
        if k.last and k.last[0] == "crop_rows4":
            shifts[int(k.last[3][3])] += 1
        if y.shape != ref.shape or not np.array_equal(y, ref):
            failures.append(f"data {data_shape} at {launch._address(x) % 16} offsets {offsets} top {top}")
    assert not failures, f"{len(failures)} of {cases} cases differ:\n" + "\n".join(failures[:10])
    assert misaligned("crop") == before == 0


def test_long_rows_are_split_into_parts(monkeypatch):
    """Rows longer than a part (CROP_PART_STEPS steps of a row's threads) span several blocks
    along grid.y; with parts of one step every part boundary is exercised."""
    rng = np.random.default_rng(22)
    k = CountingKernels()
    x = placed(rng, rng.standard_normal((2, 5, 30, 44)).astype(np.float32), 0)
    y = k.crop(x, (0, 1, 0, 0), (2, 3, 30, 44))  # only channels: one run of 3*30*44 floats per image
    assert k.last[0] == "crop_rows4" and k.last[1] == (1, 1) and np.array_equal(y, x[:, 1:4])
    monkeypatch.setattr(launch, "CROP_PART_STEPS", 1)
    parts = []
    for shift in range(4):
        for offsets, top in (((0, 1, 0, 0), (2, 3, 30, 44)), ((0, 0, 3, 1), (2, 5, 20, 41)),
                             ((1, 2, 0, 0), (1, 1, 30, 44)), ((0, 0, 0, 2), (2, 5, 30, 40))):
            xs = placed(rng, np.array(x), shift)
            y = k.crop(xs, offsets, top)
            assert np.array_equal(y, xs[tuple(slice(o, o + t) for o, t in zip(offsets, top))]), (shift, offsets)
            parts.append(k.last[1][1])
    assert max(parts) == 31 and min(parts) == 1  # 3*30*44 floats in parts of 32 lanes x 4
    seg, parts = launch._row_parts(3 * 30 * 44 // 4, 5)
    assert (seg, parts) == (128, 8)
    for items in (1, 1000, 65535 * 128, 65535 * 1024 + 1, 2 ** 31 // 4):
        for lanes_log2 in (0, 3, 5):
            seg, parts = launch._row_parts(items, lanes_log2)
            assert parts <= 65535 and seg * parts >= items > seg * (parts - 1)
            assert seg % (launch.CROP_UNROLL << lanes_log2) == 0
    assert misaligned("crop") == 0


def test_fcn_score_crop_takes_float4_rows():
    """FCN's score crop, (N, 21, 568, 568) at 19, 19 (smaller here): float4 stores, the data rows 3
    floats past a boundary, a warp per 500-float row, 8 rows per block, one part."""
    rng = np.random.default_rng(23)
    k = CountingKernels()
    x = placed(rng, rng.standard_normal((1, 3, 40, 568)).astype(np.float32), 0)
    y = k.crop(x, (0, 0, 19, 19), (1, 3, 20, 500))
    name, grid, block, args = k.last
    assert name == "crop_rows4" and int(args[3]) == 3 and int(args[5]) == 125
    assert grid == (-(-60 // 8), 1) and block == (256,) and int(args[-1]) == 5
    assert np.array_equal(y, x[:, :, 19:39, 19:519])
    assert k.crop(np.zeros((2, 3, 4), np.float32), (0, 1, 0), (2, 0, 4)).shape == (2, 0, 4)


# ---------------------------------------------------------------------------------- the shim

def test_shim_vector_types_and_alignment_check(tmp_path):
    """float2/float4, make_float2/4 and __ldg as CUDA has them; misaligned vector loads and stores
    are counted in harness_misaligned (x86 would run them silently)."""
    cu = tmp_path / "vectors.cu"
    cu.write_text(textwrap.dedent("""
        extern "C" __global__ void copy4(const float* x, float* y, int at) {
            const float4 v = __ldg(reinterpret_cast<const float4*>(x + at) + threadIdx.x);
            reinterpret_cast<float4*>(y)[threadIdx.x] = make_float4(v.w, v.z, v.y, v.x);
        }
        extern "C" __global__ void copy2(const float* x, float* y, int at) {
            const float2 v = __ldg(reinterpret_cast<const float2*>(x) + threadIdx.x);
            reinterpret_cast<float2*>(y + at)[threadIdx.x] = make_float2(v.y, __ldg(x + threadIdx.x));
        }
    """))
    mod = harness.HarnessModule(str(cu))
    count = ctypes.c_int.in_dll(mod._lib, "harness_misaligned")
    rng = np.random.default_rng(24)
    x = placed(rng, np.arange(40, dtype=np.float32), 0)
    y = placed(rng, np.zeros(40, np.float32), 0)
    mod.get_function("copy4")((1,), (8,), (x, y, np.int32(4)))
    np.testing.assert_array_equal(y[:32], x[4:36].reshape(8, 4)[:, ::-1].reshape(-1))
    assert count.value == 0
    mod.get_function("copy2")((1,), (8,), (x, y, np.int32(2)))
    np.testing.assert_array_equal(y[2:18].reshape(8, 2), np.stack([x[1:16:2], x[:8]], axis=1))
    assert count.value == 0
    mod.get_function("copy4")((1,), (8,), (x, y, np.int32(2)))  # loads 8 bytes off
    assert count.value == 8
    mod.get_function("copy2")((1,), (8,), (x, y, np.int32(1)))  # stores 4 bytes off
    assert count.value == 16
