"""Our CUDA kernels (kernels/*.cu), run on the CPU by the harness, against the numpy runtime.

The kernels are launched through the same launchers the GPU uses
(caffeish.kernels.launch.Kernels), with the harness modules in place of
cupy.RawModule: argument types, launch sizes and chunking are exercised too.
The references are the numpy layers, which match real Caffe on the golden
cases.  Each kernel runs on at least 200 randomized cases (counted per kernel):
groups, dilation, rectangular kernels, odd sizes, pads as large as the kernel
or larger where Caffe allows it (Convolution; Pooling needs pad < kernel),
ceil- and floor-mode edges with the clip rule, global pooling, ties and NaN in
MAX pooling, and Crop offsets on every axis of 1- to 7-axis blobs.

These tests need a C++ compiler (g++, or $CXX); they skip without one, except
under CI (the CI environment variable set), where a missing compiler fails.
"""
import os
import shutil
import textwrap

import numpy as np
import pytest

from caffeish.errors import ShapeError
from caffeish.graph.geometry import conv_output_shape, crop_offsets, deconv_output_shape, pool_params, ConvGeometry
from caffeish.runtime.im2col import conv_forward, deconv_forward, im2col
from caffeish.formats.schema import pb

if shutil.which(os.environ.get("CXX", "g++")) is None and not os.environ.get("CI"):
    pytest.skip("no C++ compiler for the kernel harness (g++ or $CXX)", allow_module_level=True)

from caffeish.kernels import harness, launch  # noqa: E402
from kernel_counting import CountingKernels  # noqa: E402
from caffeish.ops.pooling import pool_forward  # noqa: E402

MIN_CASES = 200
P = pb.PoolingParameter


def relative_error(ours, ref):
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(ours.astype(np.float64) - ref)) / (np.max(np.abs(ref)) + 1.0))


def _conv_case(rng):
    """(x, weight, bias, geometry, group) for a random 2-D convolution, or None if the output is empty."""
    g = int(rng.integers(1, 4))
    cg, og = (int(v) for v in rng.integers(1, 5, 2))
    if rng.random() < 0.15:  # the plain-matmul path: 1x1, stride 1, no pad
        kernel, stride, pad, dil = (1, 1), (1, 1), (0, 0), tuple(int(v) for v in rng.integers(1, 3, 2))
    else:
        kernel = tuple(int(v) for v in rng.integers(1, 6, 2))
        stride = tuple(int(v) for v in rng.integers(1, 4, 2))
        dil = tuple(int(v) for v in rng.integers(1, 4, 2))
        pad = tuple(int(rng.integers(0, k + 2)) for k in kernel)  # up to kernel + 1
    geom = ConvGeometry(kernel, stride, pad, dil)
    n = int(rng.integers(1, 3))
    h, w = (int(v) for v in rng.integers(1, 15, 2))
    try:
        out = conv_output_shape((h, w), geom)
    except ShapeError:
        return None
    x = rng.standard_normal((n, g * cg, h, w)).astype(np.float32)
    weight = rng.standard_normal((g * og, cg) + kernel).astype(np.float32)
    bias = rng.standard_normal(g * og).astype(np.float32) if rng.random() < 0.8 else None
    return x, weight, bias, geom, g, out


def test_convolution_kernels_match_numpy():
    """im2col + matmul (with row bands when the budget is small), direct tiled, bias: 200+ cases each."""
    rng = np.random.default_rng(1)
    k = CountingKernels()
    failures, cases = [], 0
    while min(k.count["im2col"], k.count["conv_direct"], k.count["add_bias"]) < MIN_CASES:
        case = _conv_case(rng)
        if case is None:
            continue
        x, weight, bias, geom, g, out = case
        method = ("gemm", "direct")[cases % 2]
        k.col_budget = int(rng.choice([64, 500, 1 << 20]))
        ref = conv_forward(np, x, weight, bias, geom, g, out)
        y = k.conv2d(x, weight, bias, geom, g, method=method)
        cases += 1
        if y.shape != ref.shape or relative_error(y, ref) > 1e-5:
            failures.append(f"{method} x{x.shape} w{weight.shape} {geom} group {g}: "
                            f"{y.shape} vs {ref.shape}, error {relative_error(y, ref) if y.shape == ref.shape else '-'}")
    assert not failures, f"{len(failures)} of {cases} cases differ:\n" + "\n".join(failures[:10])


def test_deconvolution_kernels_match_numpy():
    """matmul + col2im gather and the direct gather, bias fused: 200+ cases each, against numpy's phase method."""
    rng = np.random.default_rng(2)
    k = CountingKernels()
    failures, cases = [], 0
    while min(k.count["col2im"], k.count["deconv_direct"]) < MIN_CASES:
        g = int(rng.integers(1, 4))
        cg, og = (int(v) for v in rng.integers(1, 5, 2))
        kernel = tuple(int(v) for v in rng.integers(1, 6, 2))
        stride = tuple(int(v) for v in rng.integers(1, 4, 2))
        dil = tuple(int(v) for v in rng.integers(1, 3, 2))
        ext = tuple(d * (kk - 1) + 1 for kk, d in zip(kernel, dil))
        pad = tuple(int(rng.integers(0, e + 2)) for e in ext)  # up to the extent + 1 where the output stays positive
        geom = ConvGeometry(kernel, stride, pad, dil)
        n = int(rng.integers(1, 3))
        h, w = (int(v) for v in rng.integers(1, 10, 2))
        try:
            out = deconv_output_shape((h, w), geom)
        except ShapeError:
            continue
        x = rng.standard_normal((n, g * cg, h, w)).astype(np.float32)
        weight = rng.standard_normal((g * cg, og) + kernel).astype(np.float32)
        bias = rng.standard_normal(g * og).astype(np.float32) if rng.random() < 0.7 else None
        method = ("gemm", "direct")[cases % 2]
        k.col_budget = int(rng.choice([64, 1 << 20]))
        ref = deconv_forward(np, x, weight, bias, geom, g, out)
        y = k.deconv2d(x, weight, bias, geom, g, method=method)
        cases += 1
        if y.shape != ref.shape or relative_error(y, ref) > 1e-5:
            failures.append(f"{method} x{x.shape} w{weight.shape} {geom} group {g}")
    assert not failures, f"{len(failures)} of {cases} cases differ:\n" + "\n".join(failures[:10])


def _pool_param(rng, method):
    pp = P(pool=method)
    if rng.random() < 0.1:
        pp.global_pooling = True
        return pp
    kh, kw = (int(v) for v in rng.integers(1, 6, 2))
    pp.kernel_h, pp.kernel_w = kh, kw
    pp.stride_h, pp.stride_w = (int(v) for v in rng.integers(1, 5, 2))
    if method != P.STOCHASTIC and rng.random() < 0.6:
        pp.pad_h, pp.pad_w = int(rng.integers(0, kh)), int(rng.integers(0, kw))  # Caffe: pad < kernel
    if rng.random() < 0.3:
        pp.round_mode = P.FLOOR
    return pp


def _pool_input(rng, shape, method):
    x = rng.standard_normal(shape).astype(np.float32)
    if method == P.MAX:
        if rng.random() < 0.4:
            x = np.round(x).astype(np.float32)  # ties: the first maximum in row-major order wins
        if rng.random() < 0.2:
            flat = x.reshape(-1)
            flat[rng.integers(0, flat.size, max(1, flat.size // 8))] = rng.choice([np.nan, -np.inf, np.inf])
    if method == P.STOCHASTIC and rng.random() < 0.7:
        x = np.abs(x)
    return x


def test_pooling_kernels_match_numpy():
    """MAX (top and mask exactly), AVE (exactly: same order of additions), STOCHASTIC at TEST: 200+ cases each."""
    rng = np.random.default_rng(3)
    k = CountingKernels()
    failures, cases = [], 0
    names = {P.MAX: "max_pool", P.AVE: "ave_pool", P.STOCHASTIC: "stochastic_pool_test"}
    while min(k.count[v] for v in names.values()) < MIN_CASES:
        method = (P.MAX, P.AVE, P.STOCHASTIC)[cases % 3]
        pp = _pool_param(rng, method)
        n, c = (int(v) for v in rng.integers(1, 4, 2))
        h, w = (int(v) for v in rng.integers(1, 14, 2))
        try:
            geom = pool_params(pp, h, w)
        except ShapeError:
            continue
        x = _pool_input(rng, (n, c, h, w), method)
        want_mask = method == P.MAX and rng.random() < 0.7
        ref, ref_mask = pool_forward(np, x, geom, method, want_mask)
        y, mask = k.pool(x, geom, method, want_mask)
        cases += 1
        if method == P.STOCHASTIC:
            same = np.allclose(y, ref, rtol=1e-6, atol=1e-30, equal_nan=True)
        else:
            same = np.array_equal(y, ref, equal_nan=True)
        if want_mask:
            same = same and np.array_equal(mask, ref_mask)
        if not same:
            failures.append(f"{names[method]} x{x.shape} {geom}")
    assert not failures, f"{len(failures)} of {cases} cases differ:\n" + "\n".join(failures[:10])


def _crop_case(rng):
    ndim = int(rng.integers(1, 8))
    data = tuple(int(v) for v in rng.integers(1, 7 if ndim <= 4 else 4, ndim))
    if rng.random() < 0.5:  # a long innermost run, as FCN's crops have
        data = data[:-1] + (int(rng.integers(32, 90)),)
    cp = pb.CropParameter(axis=int(rng.integers(-ndim, ndim)))
    start = cp.axis % ndim
    mode = rng.random()
    if mode < 0.6:  # one offset per cropped axis, non-zero where the axis allows it
        offs = [int(rng.integers(1, d)) if d > 1 else 0 for d in data[start:]]
        cp.offset.extend(offs)
    elif mode < 0.8:
        cp.offset.append(int(rng.integers(0, min(data[start:]))))
        offs = [cp.offset[0]] * (ndim - start)
    else:
        offs = [0] * (ndim - start)
    ref_shape = list(data[:start]) + [int(rng.integers(1, d - o + 1)) for d, o in zip(data[start:], offs)]
    if rng.random() < 0.2:
        ref_shape[:start] = [int(v) for v in rng.integers(1, 5, start)]  # not checked before the axis
    return cp, data, tuple(ref_shape)


def test_crop_kernels_match_numpy():
    """N-D crops, 1 to 7 axes, offsets on every axis: 200+ cases each with rows of a warp or more and shorter."""
    rng = np.random.default_rng(4)
    k = CountingKernels()
    failures, cases = [], 0
    while min(k.count["crop_rows long"], k.count["crop_rows short"]) < MIN_CASES:
        cp, data_shape, ref_shape = _crop_case(rng)
        _, offsets, top = crop_offsets(cp, data_shape, ref_shape)
        x = rng.standard_normal(data_shape).astype(np.float32)
        ref = x[tuple(slice(o, o + t) for o, t in zip(offsets, top))]
        y = k.crop(x, offsets, top)
        cases += 1
        if not np.array_equal(y, ref):
            failures.append(f"data {data_shape} offsets {offsets} top {top}")
    assert not failures, f"{len(failures)} of {cases} cases differ:\n" + "\n".join(failures[:10])


def test_crop_plan_merges_whole_axes():
    """FCN's score crop (N, 21, 568, 568) -> (N, 21, 500, 500) at 19, 19: rows of 500 floats."""
    base, outer, run = launch.crop_plan((2, 21, 568, 568), (0, 0, 19, 19), (2, 21, 500, 500))
    assert base == 19 * 568 + 19
    assert outer == [(42, 568 * 568), (500, 568)] and run == 500
    # cropping only the channels: one run of C*H*W floats per image
    assert launch.crop_plan((2, 5, 3, 4), (0, 1, 0, 0), (2, 3, 3, 4)) == (12, [(2, 60)], 36)


def test_im2col_layer_kernel_matches_numpy():
    rng = np.random.default_rng(5)
    k = CountingKernels()
    for _ in range(20):
        case = _conv_case(rng)
        if case is None:
            continue
        x, _, _, geom, _, out = case
        np.testing.assert_array_equal(k.im2col(x, geom), im2col(np, x, geom, out))


def test_grid_stride_loops_cover_everything_with_few_blocks(monkeypatch):
    """With at most 2 blocks per grid, every kernel still covers its whole output (grid-stride loops)."""
    monkeypatch.setattr(launch, "MAX_BLOCKS", 2)
    rng = np.random.default_rng(6)
    k = CountingKernels()
    x = rng.standard_normal((2, 4, 23, 19)).astype(np.float32)
    geom = ConvGeometry((3, 3), (1, 2), (2, 1), (2, 1))
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    out = conv_output_shape((23, 19), geom)
    for method in ("gemm", "direct"):
        np.testing.assert_allclose(k.conv2d(x, w, b, geom, 2, method=method),
                                   conv_forward(np, x, w, b, geom, 2, out), rtol=1e-5, atol=1e-5)
    wd = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    for method in ("gemm", "direct"):
        np.testing.assert_allclose(k.deconv2d(x, wd, None, geom, 2, method=method),
                                   deconv_forward(np, x, wd, None, geom, 2, deconv_output_shape((23, 19), geom)),
                                   rtol=1e-5, atol=1e-5)
    pp = P(pool=P.MAX, kernel_size=3, stride=2, pad=1)
    geo = pool_params(pp, 23, 19)
    y, mask = k.pool(x, geo, P.MAX, True)
    ref, ref_mask = pool_forward(np, x, geo, P.MAX, True)
    assert np.array_equal(y, ref) and np.array_equal(mask, ref_mask)
    assert np.array_equal(k.crop(x, (0, 1, 2, 3), (2, 2, 20, 5)), x[:, 1:3, 2:22, 3:8])
    assert np.array_equal(k.crop(x, (1, 0, 0, 0), (1, 4, 23, 19)), x[1:])


def test_harness_checks_kernel_arguments():
    """What the GPU would silently misread is an error here: Python ints, wrong dtypes, strided views."""
    fn = harness.module("conv").get_function("add_bias")
    y = np.zeros((2, 3, 4), np.float32)
    b = np.arange(3, dtype=np.float32)
    fn((1,), (32,), (y, b, np.int32(24), np.int32(3), np.int32(4)))
    np.testing.assert_array_equal(y, np.broadcast_to(b[None, :, None], y.shape))
    with pytest.raises(TypeError, match="numpy.int32"):
        fn((1,), (32,), (y, b, 24, np.int32(3), np.int32(4)))
    with pytest.raises(TypeError, match="float32"):
        fn((1,), (32,), (y.astype(np.float64), b, np.int32(24), np.int32(3), np.int32(4)))
    with pytest.raises(TypeError, match="contiguous"):
        fn((1,), (32,), (y[:, :, ::2], b, np.int32(12), np.int32(3), np.int32(2)))
    with pytest.raises(TypeError, match="takes 5 arguments"):
        fn((1,), (32,), (y, b))
    with pytest.raises(harness.HarnessError, match="dynamic shared memory"):
        fn((1,), (32,), (y, b, np.int32(24), np.int32(3), np.int32(4)), shared_mem=1024)


def test_harness_shared_memory_and_barriers(tmp_path):
    """__shared__ is one array per block and __syncthreads orders the block's threads; a divergent
    barrier is an error.  (A kernel written for this test, compiled by the same harness.)"""
    cu = tmp_path / "selftest.cu"
    cu.write_text(textwrap.dedent("""
        extern "C" __global__ void reverse_blocks(const float* x, float* y, int n) {
            __shared__ float tile[256];
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            tile[threadIdx.x] = i < n ? x[i] : -1.0f;
            __syncthreads();
            int j = blockIdx.x * blockDim.x + (blockDim.x - 1 - threadIdx.x);
            if (j < n) y[j] = tile[threadIdx.x];
        }
        extern "C" __global__ void block_sum(const float* x, float* y) {
            __shared__ float part[64];
            part[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
            __syncthreads();
            for (int s = blockDim.x / 2; s > 0; s /= 2) {
                if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
                __syncthreads();
            }
            if (threadIdx.x == 0) y[blockIdx.x] = part[0];
        }
        extern "C" __global__ void divergent(float* y) {
            if (threadIdx.x < 3) __syncthreads();
            y[threadIdx.x] = 1.0f;
        }
    """))
    mod = harness.HarnessModule(str(cu))
    x = np.arange(200, dtype=np.float32)
    y = np.zeros_like(x)
    mod.get_function("reverse_blocks")((4,), (64,), (x, y, np.int32(200)))
    padded = np.concatenate([x, np.full(56, -1, np.float32)])  # threads past n load -1
    expected = padded.reshape(4, 64)[:, ::-1].reshape(-1)[:200]
    np.testing.assert_array_equal(y, expected)
    sums = np.zeros(3, np.float32)
    mod.get_function("block_sum")((3,), (64,), (x[:192].copy(), sums))
    np.testing.assert_array_equal(sums, x[:192].reshape(3, 64).sum(axis=1))
    with pytest.raises(harness.HarnessError, match="divergent __syncthreads"):
        mod.get_function("divergent")((1,), (8,), (np.zeros(8, np.float32),))
    # the harness recovers: the next launch runs normally
    mod.get_function("reverse_blocks")((4,), (64,), (x, y, np.int32(200)))
    np.testing.assert_array_equal(y, expected)


def test_parse_kernels_reads_signatures_and_barriers():
    kernels = {name: (params, barrier) for name, params, barrier in
               harness.parse_kernels(open(harness.source_path("conv")).read())}
    assert set(kernels) == {"im2col", "add_bias", "conv_direct", "col2im", "deconv_direct"}
    assert kernels["im2col"][0][:3] == [("const float*", "x"), ("float*", "col"), ("int", "images")]
    assert kernels["conv_direct"][1] and not kernels["im2col"][1]
