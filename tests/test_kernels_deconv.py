"""The Deconvolution kernels (kernels/conv.cu's col2im and deconv_direct), run on the CPU by the harness.

Both kernels visit only the taps that land on each output (deconv_taps: the first valid
tap of each axis, then every stride/gcd(stride, dilation)-th one) instead of testing all
kernel_h * kernel_w taps.  They are checked three ways:

1. against the numpy runtime's deconvolution (caffeish.runtime.im2col.deconv_forward, the
   CPU path of layers/conv.py) within the tolerance of tests/test_kernels_harness.py;
2. bit for bit, on every launch, against a float32 sum of the taps in Caffe's order computed
   from the launch's own arguments (tap_order_sum below: numpy slices over each tap's inputs;
   for deconv_direct the per-tap sums over the group's channels, in channel order, first),
   which is what the kernels computed before, when they tested all kernel_h * kernel_w taps:
   the taps skipped now contributed nothing.  Each launch also runs on a random small grid
   now and then (the grid-stride loops of all three axes), into an output filled with NaN
   first (every output is written);
3. FCN-Alexnet's `upscore` (21 groups of one channel, kernel 63, stride 32, 16x16 -> 543x543)
   and FCN-8s's `upscore8` (21 -> 21 dense, kernel 16, stride 8, 70x70 -> 568x568) at their
   real sizes, bit for bit against a float32 sum of the taps in Caffe's order (numpy slices),
   and against deconv_forward.

At least 200 randomized cases per kernel: groups (up to 21 of one channel), kernels larger
than the stride and not multiples of it, smaller than it (outputs no tap reaches), 1x1,
rectangular, strides up to 9, pads up to the extent + 1 where the output stays positive,
dilations up to 4 (gcd(stride, dilation) > 1 included), batches, odd and 1-pixel inputs.

These tests need a C++ compiler (g++, or $CXX); they skip without one, except under CI (the
CI environment variable set), where a missing compiler fails.
"""
import collections
import itertools
import os
import shutil

import numpy as np
import pytest

from caffeish.errors import ShapeError
from caffeish.graph.geometry import ConvGeometry, deconv_output_shape, effective_kernel
from caffeish.runtime.im2col import deconv_forward
from caffeish.runtime.fillers import bilinear_kernel

if shutil.which(os.environ.get("CXX", "g++")) is None and not os.environ.get("CI"):
    pytest.skip("no C++ compiler for the kernel harness (g++ or $CXX)", allow_module_level=True)

from caffeish.kernels import harness, launch  # noqa: E402

MIN_CASES = 200
TOLERANCE = 1e-5  # relative to max |ref| + 1, as tests/test_kernels_harness.py

OUTPUT_ARG = {"col2im": 2, "deconv_direct": 3}  # the index of y among each kernel's arguments


def tap_order_sum(values, geom, out):
    """y[n, c, h, w] = the float32 sum, in increasing (kh, kw) order starting from 0, of
    values[n, c, kh, kw, ih, iw] over the taps that land on (h, w): what both kernels compute
    (col2im's columns as they are; deconv_direct's per-tap channel sums, launch_reference)."""
    n, c, kh_, kw_, ih_, iw_ = values.shape
    y = np.zeros((n, c) + tuple(out), np.float32)
    (sh, sw), (ph, pw), (dh, dw) = geom.stride, geom.pad, geom.dilation

    def span(k, s, p, d, size, limit):
        first = -(-(p - k * d) // s) if p > k * d else 0  # inputs whose output is >= 0
        last = min(size - 1, (limit - 1 + p - k * d) // s)  # ... and < limit
        return first, last

    for kh in range(kh_):
        h0, h1 = span(kh, sh, ph, dh, ih_, out[0])
        if h1 < h0:
            continue
        for kw in range(kw_):
            w0, w1 = span(kw, sw, pw, dw, iw_, out[1])
            if w1 < w0:
                continue
            oh, ow = h0 * sh - ph + kh * dh, w0 * sw - pw + kw * dw
            y[:, :, oh:oh + (h1 - h0) * sh + 1:sh, ow:ow + (w1 - w0) * sw + 1:sw] += \
                values[:, :, kh, kw, h0:h1 + 1, w0:w1 + 1]
    return y


def launch_reference(name, args):
    """The output of a col2im or deconv_direct launch, from its arguments, in float32 as the kernels
    sum: each output's taps in (kh, kw) order; deconv_direct's tap first sums W[c, o % og, kh, kw] *
    x[n, c, ih, iw] over the group's channels c in order; then the bias (when has_bias)."""
    if name == "col2im":
        col, bias = args[:2]
        n, c, oh, ow, ih, iw, kh, kw, sh, sw, ph, pw, dh, dw, has_bias = (int(v) for v in args[3:])
        values = col.reshape(n, c, kh, kw, ih, iw)
    else:
        x, weight, bias = args[:3]
        n, c, ih, iw, o, g, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, has_bias = (int(v) for v in args[4:])
        cg, og = c // g, o // g
        wg, xg = weight.reshape(g, cg, og, kh, kw), x.reshape(n, g, cg, ih, iw)
        acc = np.zeros((n, g, og, kh, kw, ih, iw), np.float32)
        for ci in range(cg):
            acc += wg[None, :, ci, :, :, :, None, None] * xg[:, :, ci, None, None, None]
        values = acc.reshape(n, o, kh, kw, ih, iw)
    y = tap_order_sum(values, ConvGeometry((kh, kw), (sh, sw), (ph, pw), (dh, dw)), (oh, ow))
    return y + bias[:, None, None] if has_bias else y


class CheckedKernels(launch.Kernels):
    """The launchers on the harness.  Each Deconvolution kernel launch (sometimes on a random
    small grid, into an output filled with NaN) must equal launch_reference bit for bit."""

    def __init__(self, rng, col_budget=1 << 20):
        super().__init__(harness.XP, harness.module, col_budget)
        self.rng = rng
        self.count = collections.Counter()
        self.mismatches = []

    def launch(self, module, name, grid, block, args):
        if name not in OUTPUT_ARG:
            return super().launch(module, name, grid, block, args)
        self.count[name] += 1
        y = args[OUTPUT_ARG[name]]
        if self.rng.random() < 0.25:
            grid = tuple(int(v) for v in self.rng.integers(1, 4, 3))
        y.fill(np.nan)
        super().launch(module, name, grid, block, args)
        ref = launch_reference(name, args)
        if not np.array_equal(y, ref):
            self.mismatches.append(f"{name} grid {grid}: {int(np.sum(y != ref))} of {y.size} outputs differ")


def relative_error(ours, ref):
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(ours.astype(np.float64) - ref)) / (np.max(np.abs(ref)) + 1.0))


def random_case(rng):
    """(x, weight, bias, geometry, group) of a random 2-D Deconvolution, or None if its output is empty."""
    if rng.random() < 0.15:  # FCN's bilinear upsampling form: one channel per group, many groups
        g, cg, og = int(rng.integers(2, 22)), 1, 1
    else:
        g = int(rng.integers(1, 5))
        cg, og = (int(v) for v in rng.integers(1, 5, 2))
    kernel, stride, dil = [], [], []
    for _ in range(2):
        s = int(rng.choice([1, 2, 2, 3, 4, 5, 8, 9]))
        form = rng.random()
        if form < 0.1:
            k = 1
        elif form < 0.3:
            k = int(rng.integers(1, s + 1))  # k <= s: some outputs get no tap
        elif form < 0.5:
            k = 2 * s - int(rng.integers(0, 2))  # FCN's 2s (and 2s - 1, as 63 for 32)
        else:
            k = int(rng.integers(1, 3 * s + 3))  # larger than the stride, any multiple or not
        kernel.append(k)
        stride.append(s)
        dil.append(int(rng.choice([1, 1, 1, 2, 3, 4])))
    ext = [effective_kernel(k, d) for k, d in zip(kernel, dil)]
    pad = [int(rng.integers(0, e + 2)) if rng.random() < 0.6 else 0 for e in ext]
    geom = ConvGeometry(tuple(kernel), tuple(stride), tuple(pad), tuple(dil))
    n = int(rng.integers(1, 4))
    h, w = (int(v) for v in rng.integers(1, 10, 2))
    try:
        if min(deconv_output_shape((h, w), geom)) == 0:  # a pad of the whole extent: nothing to launch
            return None
    except ShapeError:
        return None
    x = rng.standard_normal((n, g * cg, h, w)).astype(np.float32)
    weight = rng.standard_normal((g * cg, og) + tuple(kernel)).astype(np.float32)
    bias = rng.standard_normal(g * og).astype(np.float32) if rng.random() < 0.7 else None
    return x, weight, bias, geom, g


def test_deconvolution_kernels_visit_only_valid_taps():
    """200+ randomized cases per kernel: equal to the numpy runtime within the tolerance, and every
    launch bit for bit to the float32 tap-order sum of its arguments."""
    rng = np.random.default_rng(18)
    k = CheckedKernels(np.random.default_rng(180))
    cases = collections.Counter()
    failures = []
    while min(cases["gemm"], cases["direct"]) < MIN_CASES:
        case = random_case(rng)
        if case is None:
            continue
        x, weight, bias, geom, g = case
        method = "direct" if cases["direct"] <= cases["gemm"] else "gemm"
        k.col_budget = int(rng.choice([64, 2000, 1 << 20]))  # gemm: one image or several per col2im
        y = k.deconv2d(x, weight, bias, geom, g, method=method)
        ref = deconv_forward(np, x, weight, bias, geom, g, deconv_output_shape(x.shape[2:], geom))
        cases[method] += 1
        if y.shape != ref.shape or not relative_error(y, ref) <= TOLERANCE:
            failures.append(f"{method} x{x.shape} w{weight.shape} {geom} group {g}")
    total = sum(cases.values())
    assert not failures, f"{len(failures)} of {total} cases differ from numpy:\n" + "\n".join(failures[:10])
    assert not k.mismatches, f"{len(k.mismatches)} launches differ:\n" + "\n".join(k.mismatches[:10])
    assert k.count["col2im"] >= MIN_CASES and k.count["deconv_direct"] >= MIN_CASES


def test_taps_of_every_residue_class():
    """Every stride and dilation up to 6 against each other (gcd > 1 included), each pad up to the
    extent + 1, on one small input: both kernels bit for bit to the tap-order sum."""
    rng = np.random.default_rng(7)
    k = CheckedKernels(np.random.default_rng(70))
    x = rng.standard_normal((2, 2, 5, 3)).astype(np.float32)
    checked = 0
    for s, d in itertools.product(range(1, 7), repeat=2):
        kernel = (7, 4)
        ext = [effective_kernel(kk, d) for kk in kernel]
        for ph, pw in zip(range(0, ext[0] + 2, 2), range(ext[1] + 1, -1, -1)):
            geom = ConvGeometry(kernel, (s, s + 1), (ph, pw), (d, 7 - d))
            try:
                out = deconv_output_shape((5, 3), geom)
            except ShapeError:
                continue
            weight = rng.standard_normal((2, 3) + kernel).astype(np.float32)
            for method in ("direct", "gemm"):
                y = k.deconv2d(x, weight, None, geom, 1, method=method)
                assert relative_error(y, deconv_forward(np, x, weight, None, geom, 1, out)) <= TOLERANCE
                checked += 1
    assert checked > 100
    assert not k.mismatches, "\n".join(k.mismatches[:10])


def test_fcn_alexnet_upscore():
    """DIGITS' FCN-Alexnet `upscore`: 21 groups of one channel, bilinear kernel 63, stride 32,
    16x16 -> 543x543, by deconv_direct: bit for bit the taps' sum in Caffe's order."""
    k = launch.Kernels(harness.XP, harness.module)
    geom = ConvGeometry((63, 63), (32, 32), (0, 0), (1, 1))
    x = np.random.default_rng(1).standard_normal((2, 21, 16, 16)).astype(np.float32)
    weight = np.ascontiguousarray(np.broadcast_to(bilinear_kernel(63), (21, 1, 63, 63)))
    assert k.deconv_grid(543 * 543, 21, 2) == (1152, 8, 1)
    y = k.deconv2d(x, weight, None, geom, 21)
    assert y.shape == (2, 21, 543, 543)
    per_tap = weight[None, :, 0, :, :, None, None] * x[:, :, None, None]  # (n, c, kh, kw, ih, iw)
    np.testing.assert_array_equal(y, tap_order_sum(per_tap, geom, (543, 543)))
    ref = deconv_forward(np, x, weight, None, geom, 21, (543, 543))
    assert relative_error(y, ref) <= TOLERANCE


def test_fcn8s_upscore8():
    """fcn.berkeleyvision.org's FCN-8s `upscore8`: 21 -> 21 (one group), kernel 16, stride 8,
    70x70 -> 568x568, through matmul + col2im; col2im alone bit for bit on random columns."""
    rng = np.random.default_rng(2)
    k = launch.Kernels(harness.XP, harness.module)
    geom = ConvGeometry((16, 16), (8, 8), (0, 0), (1, 1))
    x = rng.standard_normal((1, 21, 70, 70)).astype(np.float32)
    weight = rng.standard_normal((21, 21, 16, 16)).astype(np.float32)
    y = k.deconv2d(x, weight, None, geom, 1)
    assert y.shape == (1, 21, 568, 568)
    assert relative_error(y, deconv_forward(np, x, weight, None, geom, 1, (568, 568))) <= TOLERANCE
    col = rng.standard_normal((1, 21, 16, 16, 70, 70)).astype(np.float32)
    bias = rng.standard_normal(21).astype(np.float32)
    y = np.full((1, 21, 568, 568), np.nan, np.float32)
    k.launch("conv", "col2im", k.deconv_grid(568 * 568, 21, 1), (launch.BLOCK,),
             (col, bias, y) + launch._i32(1, 21, 568, 568, 70, 70, 16, 16, 8, 8, 0, 0, 1, 1, 1))
    np.testing.assert_array_equal(y, tap_order_sum(col, geom, (568, 568)) + bias[:, None, None])


def test_deconv_grid():
    """x covers the positions; y then z split channels and images up to about DECONV_BLOCKS blocks."""
    k = launch.Kernels(harness.XP, harness.module)
    assert k.deconv_grid(543 * 543, 21, 8) == (1152, 8, 1)  # FCN-Alexnet upscore at batch 8
    assert k.deconv_grid(568 * 568, 21, 8) == (1261, 7, 1)  # FCN-8s upscore8
    assert k.deconv_grid(16, 4, 3) == (1, 4, 3)
    assert k.deconv_grid(10 ** 9, 100, 100) == (launch.MAX_BLOCKS, 1, 1)
    gx, gy, gz = k.deconv_grid(1, 10 ** 6, 10 ** 6)
    assert gx == 1 and gy == k.DECONV_BLOCKS and gz == 1
