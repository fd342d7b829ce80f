"""The backward kernels (kernels/conv.cu, pooling.cu, crop.cu), run on the CPU by the harness.

caffeish.kernels.launch.Kernels' backward launchers run with the harness modules in place of
cupy.RawModule, so the launch code the GPU runs (argument marshalling, chunking) runs here:

1. conv2d_backward and deconv2d_backward (training.md 10.1): dx, dW and db against direct float64
   sums written below (a loop over the taps of einsums over zero-padded canvases, never an
   im2col), with dW and db ADDED into arrays that start non-zero; dx by both of its methods
   (matmul + col2im gather, direct gather; for Deconvolution the convolution forward's im2col +
   matmul and tiled direct kernel); column budgets small enough for several chunks of images and
   for bands of output rows in the weight gradient; want_dx False returns None and leaves the
   parameters' gradients as they would be.  200+ cases each: groups (depthwise, up to 8 groups),
   dilation 0 to 3, pads larger than the kernel, stride larger than the kernel, rectangular,
   batches of 1 to 3, 1-pixel inputs.
2. col2im (the Im2col layer's backward): a float64 scatter reference, and bit for bit the float32
   sum of each pixel's column entries in tap order (Caffe's col2im order), 200+ cases.
3. pool_backward: MAX against a float64 reference that finds each window's winner by Caffe's own
   forward scan (from -FLT_MAX, strict >, row-major over the in-image cells), not from y as the
   kernel does; AVE against dy / pool_size added to every in-image cell; both also bit for bit
   against Caffe's float32 order (outputs in row-major order, each adding into its cells).
   200+ cases each: ceil and floor rounding with the clip rule, global pooling, pads, stride
   larger than the kernel, rectangular windows, many ties (values from {0, 1, 2}), NaN, +-inf
   and -FLT_MAX (windows with no winner send nothing).
4. crop_backward: zeros with dy at the offsets, exactly; 1- to 7-axis blobs with offsets on
   every axis, including the fallback for more cropped axes than crop.cu takes.  200+ cases.
5. Every launcher also runs on the "strict" backend (caffeish.kernels.strict: numpy refusing what
   CuPy refuses) on some cases, with the same results.
6. Where the numpy layers' backward exists (caffeish.runtime.conv_grad, caffeish.ops.pooling
   .pool_backward, caffeish.ops.crop.crop_backward), the kernels agree with it (skipped, with a
   message, where it does not exist).

These tests need a C++ compiler (g++, or $CXX); they skip without one, except under CI (the CI
environment variable set), where a missing compiler fails.
"""
import collections
import importlib
import os
import shutil

import numpy as np
import pytest

from caffeish.errors import ShapeError, UnsupportedError
from caffeish.formats.schema import pb
from caffeish.graph.geometry import ConvGeometry, conv_output_shape, deconv_output_shape, effective_kernel, \
    pool_params

if shutil.which(os.environ.get("CXX", "g++")) is None and not os.environ.get("CI"):
    pytest.skip("no C++ compiler for the kernel harness (g++ or $CXX)", allow_module_level=True)

from caffeish.kernels import strict  # noqa: E402
from kernel_counting import CountingKernels  # noqa: E402

MIN_CASES = 200
TOLERANCE = 2e-5  # max |ours - ref| / max |ref| (float32 sums against float64)
FLT_MAX = float(np.finfo(np.float32).max)
P = pb.PoolingParameter


def rel_err(ours, ref):
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if ref.size == 0:
        return 0.0
    scale = np.max(np.abs(ref))
    return float(np.max(np.abs(ours - ref)) / (scale if scale > 0 else 1.0))


# ------------------------------------------------------------------------- float64 references


def _canvas(img, geom, grid):
    """img (N, C, H, W) in float64 at offset pad of a zero canvas holding every tap of the grid's positions."""
    n, c, h, w = img.shape
    sizes = [max(size + 2 * p, (m - 1) * s + effective_kernel(k, d) if m > 0 else 0)
             for size, p, m, s, k, d in zip((h, w), geom.pad, grid, geom.stride, geom.kernel, geom.dilation)]
    out = np.zeros((n, c) + tuple(sizes), np.float64)
    out[:, :, geom.pad[0]:geom.pad[0] + h, geom.pad[1]:geom.pad[1] + w] = img
    return out


def _taps(geom, grid):
    """(i, j, slices): tap (i, j) of every grid position p, at p*stride + tap*dilation of the canvas."""
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel, geom.stride, geom.dilation
    for i in range(kh):
        for j in range(kw):
            yield i, j, (slice(None), slice(None), slice(i * dh, i * dh + (grid[0] - 1) * sh + 1, sh),
                         slice(j * dw, j * dw + (grid[1] - 1) * sw + 1, sw))


def conv_grads_ref(x, weight, dy, geom, g):
    """Convolution: dx, dW, db in float64 (training.md 10.1): dW[o, c, q] = sum dy[n, o, p] *
    x[n, gCg + c, p*s - pad + q*dil]; dx adds W[o, c, q] * dy[n, o, p] at that pixel, padding dropped."""
    n, c, h, w = x.shape
    o, cg = weight.shape[:2]
    og = o // g
    grid = dy.shape[2:]
    xpad = _canvas(x, geom, grid)
    dxpad = np.zeros_like(xpad)
    dyg = dy.astype(np.float64).reshape(n, g, og, *grid)
    wg = weight.astype(np.float64).reshape(g, og, cg, *geom.kernel)
    dw = np.zeros(weight.shape, np.float64)
    for i, j, sl in _taps(geom, grid):
        tap = xpad[sl].reshape(n, g, cg, *grid)
        dw[:, :, i, j] = np.einsum("ngoab,ngcab->goc", dyg, tap).reshape(o, cg)
        dxpad[sl] += np.einsum("goc,ngoab->ngcab", wg[:, :, :, i, j], dyg).reshape(n, c, *grid)
    dx = dxpad[:, :, geom.pad[0]:geom.pad[0] + h, geom.pad[1]:geom.pad[1] + w]
    return dx, dw, dy.astype(np.float64).sum(axis=(0, 2, 3))


def deconv_grads_ref(x, weight, dy, geom, g):
    """Deconvolution (weight (C, Og, KH, KW)): with t = i*s - pad + q*dil and dy read as 0 outside the
    top, dW[c, o, q] = sum x[n, c, i] * dy[n, gOg + o, t] and dx[n, c, i] = sum W[c, o, q] * dy[n, gOg + o, t]."""
    n, c, ih, iw = x.shape
    og = weight.shape[1]
    cg = c // g
    grid = (ih, iw)
    dypad = _canvas(dy, geom, grid)
    xg = x.astype(np.float64).reshape(n, g, cg, ih, iw)
    wg = weight.astype(np.float64).reshape(g, cg, og, *geom.kernel)
    dw = np.zeros(weight.shape, np.float64)
    dx = np.zeros((n, g, cg, ih, iw), np.float64)
    for i, j, sl in _taps(geom, grid):
        tap = dypad[sl].reshape(n, g, og, ih, iw)
        dw[:, :, i, j] = np.einsum("ngcab,ngoab->gco", xg, tap).reshape(c, og)
        dx += np.einsum("gco,ngoab->ngcab", wg[:, :, :, i, j], tap)
    return dx.reshape(x.shape), dw, dy.astype(np.float64).sum(axis=(0, 2, 3))


def col2im_ref(dcol, geom, x_shape, dtype):
    """Each column entry added to its pixel, tap after tap (in float32 this is Caffe's col2im order
    for every pixel), entries in the padding dropped."""
    n, c, h, w = x_shape
    kh, kw = geom.kernel
    grid = dcol.shape[2:]
    cols = dcol.astype(dtype).reshape(n, c, kh, kw, *grid)
    canvas = _canvas(np.zeros(x_shape), geom, grid).astype(dtype)
    for i, j, sl in _taps(geom, grid):
        canvas[sl] += cols[:, :, i, j]
    return canvas[:, :, geom.pad[0]:geom.pad[0] + h, geom.pad[1]:geom.pad[1] + w]


def caffe_max_winners(x, geom):
    """Each output's winner as Caffe's forward finds it: maxval -FLT_MAX, a cell wins when strictly
    greater, row-major over the window's in-image cells.  (N, C, OH, OW) of h*W + w, or -1."""
    n, c, h, w = x.shape
    oh, ow = geom.out
    (kh, kw), (sh, sw), (ph, pw) = geom.kernel, geom.stride, geom.pad
    win = np.full((n, c, oh, ow), -1, np.int64)
    for a in range(oh):
        for b in range(ow):
            h0, w0 = a * sh - ph, b * sw - pw
            best = np.full((n, c), -FLT_MAX, np.float32)
            idx = np.full((n, c), -1, np.int64)
            for hh in range(max(h0, 0), min(h0 + kh, h)):
                for ww in range(max(w0, 0), min(w0 + kw, w)):
                    v = x[:, :, hh, ww]
                    better = v > best
                    best = np.where(better, v, best)
                    idx = np.where(better, hh * w + ww, idx)
            win[:, :, a, b] = idx
    return win


def pool_grad_ref(x, dy, geom, method, dtype):
    """dx of MAX (dy to the Caffe winner) or AVE (dy / pool_size to every in-image cell), the outputs
    taken in row-major order, each adding into its cells: in float32 exactly Caffe's arithmetic."""
    n, c, h, w = x.shape
    oh, ow = geom.out
    (kh, kw), (sh, sw), (ph, pw) = geom.kernel, geom.stride, geom.pad
    dx = np.zeros((n, c, h * w), dtype)
    dy = dy.astype(dtype)
    planes = np.arange(n * c)
    winners = caffe_max_winners(x, geom).reshape(n * c, oh, ow) if method == P.MAX else None
    flat = dx.reshape(n * c, h * w)
    box = dx.reshape(n, c, h, w)
    for a in range(oh):
        for b in range(ow):
            if method == P.MAX:
                at = winners[:, a, b]
                hit = at >= 0
                flat[planes[hit], at[hit]] += dy.reshape(n * c, oh, ow)[hit, a, b]
            else:
                h0, w0 = a * sh - ph, b * sw - pw
                size = (min(h0 + kh, h + ph) - h0) * (min(w0 + kw, w + pw) - w0)
                hs, he, ws, we = max(h0, 0), min(h0 + kh, h), max(w0, 0), min(w0 + kw, w)
                if he > hs and we > ws:
                    box[:, :, hs:he, ws:we] += (dy[:, :, a, b] / dtype(size))[:, :, None, None]
    return dx.reshape(n, c, h, w)


# ------------------------------------------------------------------------------ random cases


def random_conv(rng, deconv=False):
    """(x, weight, dy, geom, group) of a random 2-D Convolution or Deconvolution, or None when its
    output is empty."""
    form = rng.random()
    if form < 0.2:  # depthwise
        g, cg, og = int(rng.integers(1, 9)), 1, 1
    elif form < 0.45:  # the direct kernels' range: few channels per group
        g = int(rng.integers(2, 5))
        cg, og = (int(v) for v in rng.integers(1, 5, 2))
    else:
        g = int(rng.choice([1, 1, 2, 3]))
        cg, og = (int(v) for v in rng.integers(1, 7, 2))
    kernel, stride, dil = [], [], []
    for _ in range(2):
        k = int(rng.integers(1, 6))
        s = int(rng.choice([1, 1, 2, 3, k + 1, k + 2]))  # sometimes larger than the kernel
        kernel.append(k)
        stride.append(s)
        dil.append(int(rng.choice([1, 1, 1, 2, 3, 0])))
    ext = [effective_kernel(k, d) for k, d in zip(kernel, dil)]
    pad = [int(rng.integers(0, e + 3)) if rng.random() < 0.6 else 0 for e in ext]
    geom = ConvGeometry(tuple(kernel), tuple(stride), tuple(pad), tuple(dil))
    n = int(rng.integers(1, 4))
    h, w = (int(v) for v in rng.integers(1, 11, 2))
    try:
        out = deconv_output_shape((h, w), geom) if deconv else conv_output_shape((h, w), geom)
    except ShapeError:
        return None
    if min(out) <= 0:
        return None
    if deconv:
        x = rng.standard_normal((n, g * cg, h, w)).astype(np.float32)
        weight = rng.standard_normal((g * cg, og) + tuple(kernel)).astype(np.float32)
        dy = rng.standard_normal((n, g * og) + tuple(out)).astype(np.float32)
    else:
        x = rng.standard_normal((n, g * cg, h, w)).astype(np.float32)
        weight = rng.standard_normal((g * og, cg) + tuple(kernel)).astype(np.float32)
        dy = rng.standard_normal((n, g * og) + tuple(out)).astype(np.float32)
    return x, weight, dy, geom, g


def random_pool(rng):
    """(x, geom, method) of a random Pooling, or None when Caffe refuses it."""
    pp = P()
    pp.pool = P.MAX if rng.random() < 0.5 else P.AVE
    h, w = (int(v) for v in rng.integers(1, 10, 2))
    form = rng.random()
    if form < 0.12:
        pp.global_pooling = True
    else:
        kh, kw = (int(v) for v in rng.integers(1, 5, 2))
        if rng.random() < 0.5:
            pp.kernel_size = kh
            kw = kh
        else:
            pp.kernel_h, pp.kernel_w = kh, kw
        if rng.random() < 0.5:
            pp.stride = int(rng.choice([1, 2, 3, kh + 1]))
        else:
            pp.stride_h, pp.stride_w = int(rng.integers(1, 5)), int(rng.integers(1, kw + 3))
        if rng.random() < 0.5:
            r = rng.random()
            if r < 0.4:
                pp.pad = int(rng.integers(0, min(kh, kw)))
            else:
                pp.pad_h, pp.pad_w = int(rng.integers(0, kh)), int(rng.integers(0, kw))
    if rng.random() < 0.3:
        pp.round_mode = P.FLOOR
    try:
        geom = pool_params(pp, h, w)
    except ShapeError:
        return None
    if min(geom.out) <= 0:
        return None
    n, c = (int(v) for v in rng.integers(1, 4, 2))
    kind = rng.random()
    if kind < 0.4:  # ties everywhere
        x = rng.integers(0, 3, (n, c, h, w)).astype(np.float32)
    else:
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    if kind > 0.8:  # NaN, infinities, -FLT_MAX (windows where nothing beats Caffe's initial value)
        specials = np.array([np.nan, np.inf, -np.inf, -FLT_MAX, -FLT_MAX], np.float32)
        where = rng.random(x.shape) < 0.5
        x[where] = rng.choice(specials, int(where.sum()))
    return x, geom, pp.pool


def random_crop(rng):
    """(dy, offsets, bottom shape): an N-D crop from `axis` on, offsets on the cropped axes."""
    ndim = int(rng.integers(1, 8))
    axis = int(rng.integers(0, ndim))
    budget = 3000
    data, top, offsets = [], [], []
    for ax in range(ndim):
        d = int(rng.integers(1, 7 if ndim > 4 else 12))
        if ax < axis:
            t, off = d, 0
        else:
            t = int(rng.integers(1, d + 1))
            off = int(rng.integers(0, d - t + 1))
        data.append(d)
        top.append(t)
        offsets.append(off)
    if np.prod(data) > budget:
        return None
    dy = rng.standard_normal(top).astype(np.float32)
    return dy, tuple(offsets), tuple(data)


# ------------------------------------------------------------------------ 1. conv and deconv


def _check_conv_case(k, rng, case, deconv, method, failures, tag):
    x, weight, dy, geom, g = case
    ref_dx, ref_dw, ref_db = (deconv_grads_ref if deconv else conv_grads_ref)(x, weight, dy, geom, g)
    dw0 = (rng.standard_normal(weight.shape) * np.max(np.abs(ref_dw)) / 2).astype(np.float32)
    db0 = (rng.standard_normal(dy.shape[1]) * np.max(np.abs(ref_db)) / 2).astype(np.float32)
    dw, db = dw0.copy(), db0.copy()
    backward = k.deconv2d_backward if deconv else k.conv2d_backward
    want_dx = rng.random() < 0.9
    dx = backward(x, weight, dy, geom, g, want_dx, dw, db, method=method)
    errs = [rel_err(dw, dw0 + ref_dw), rel_err(db, db0 + ref_db.astype(np.float64))]
    if want_dx:
        errs.append(rel_err(dx, ref_dx))
    elif dx is not None:
        errs.append(np.inf)
    if not max(errs) <= TOLERANCE:
        failures.append(f"{tag} {method} x{x.shape} w{weight.shape} {geom} group {g} want_dx {want_dx}: {errs}")


def test_conv2d_backward():
    """200+ cases per dx method (col2im gather after the matmul, direct gather), against float64."""
    rng = np.random.default_rng(101)
    k = CountingKernels()
    cases = collections.Counter()
    failures = []
    while min(cases["gemm"], cases["direct"]) < MIN_CASES:
        case = random_conv(rng)
        if case is None:
            continue
        method = "direct" if cases["direct"] < cases["gemm"] else "gemm"
        k.col_budget = int(rng.choice([40, 300, 3000, 1 << 20]))  # bands of rows, chunks of images, all
        _check_conv_case(k, rng, case, False, method, failures, "conv")
        cases[method] += 1
    assert not failures, f"{len(failures)} of {sum(cases.values())} differ:\n" + "\n".join(failures[:10])
    assert k.count["im2col"] >= MIN_CASES and k.count["col2im"] >= 150 and k.count["deconv_direct"] >= 150


def test_deconv2d_backward():
    """200+ cases per dx method (the convolution forward by im2col + matmul or its tiled direct kernel)."""
    rng = np.random.default_rng(202)
    k = CountingKernels()
    cases = collections.Counter()
    failures = []
    while min(cases["gemm"], cases["direct"]) < MIN_CASES:
        case = random_conv(rng, deconv=True)
        if case is None:
            continue
        method = "direct" if cases["direct"] < cases["gemm"] else "gemm"
        if k._patch(case[3]) is None:  # the tiled direct kernel takes patches up to CONV_MAX_PATCH
            method = "gemm"
        k.col_budget = int(rng.choice([40, 300, 3000, 1 << 20]))
        _check_conv_case(k, rng, case, True, method, failures, "deconv")
        cases[method] += 1
    assert not failures, f"{len(failures)} of {sum(cases.values())} differ:\n" + "\n".join(failures[:10])
    assert k.count["im2col"] >= MIN_CASES and k.count["conv_direct"] >= 150


def test_conv_backward_auto_and_no_params():
    """method "auto" (and the direct gather once one image's columns exceed col_budget), and a call
    wanting only dx: the parameter gradients None, nothing else touched."""
    rng = np.random.default_rng(5)
    k = CountingKernels()
    for deconv in (False, True):
        done = 0
        while done < 30:
            case = random_conv(rng, deconv)
            if case is None:
                continue
            x, weight, dy, geom, g = case
            ref_dx = (deconv_grads_ref if deconv else conv_grads_ref)(x, weight, dy, geom, g)[0]
            k.col_budget = int(rng.choice([10, 1 << 20]))
            backward = k.deconv2d_backward if deconv else k.conv2d_backward
            assert rel_err(backward(x, weight, dy, geom, g, True, None, None), ref_dx) <= TOLERANCE
            done += 1


def test_weight_gradient_chunks():
    """The weight gradient's three ways (one chunk of all images, several chunks of images side by
    side, bands of output rows of one image) on one layer, each equal to the float64 sums, and the
    column buffer within the budget."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((5, 6, 9, 7)).astype(np.float32)
    weight = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    geom = ConvGeometry((3, 2), (2, 1), (2, 1), (1, 2))
    dy = rng.standard_normal((5, 4) + conv_output_shape((9, 7), geom)).astype(np.float32)
    _, ref_dw, _ = conv_grads_ref(x, weight, dy, geom, 2)
    assert dy.shape[2:] == (6, 7)
    per_image = 6 * 6 * 6 * 7  # C * taps * positions
    # im2col launches: all 5 images at once; 2 at a time; 1; bands of 5 rows (2 per image); rows one by one
    for budget, launches in ((1 << 20, 1), (2 * per_image, 3), (per_image, 5), (per_image - 1, 10), (36 * 7, 30)):
        k = CountingKernels(budget)
        dw = np.zeros_like(weight)
        assert k.conv2d_backward(x, weight, dy, geom, 2, False, dw, None) is None
        assert rel_err(dw, ref_dw) <= TOLERANCE, budget
        assert k.count["im2col"] == launches, (budget, k.count)


def test_dilation_zero_deconvolution():
    """Caffe accepts dilation 0 (every tap of the axis at one place); the Deconvolution gathers (its
    forward and the Convolution's dx) find those taps too."""
    rng = np.random.default_rng(3)
    k = CountingKernels()
    geom = ConvGeometry((3, 2), (2, 1), (1, 0), (0, 1))
    x = rng.standard_normal((2, 2, 4, 5)).astype(np.float32)
    weight = rng.standard_normal((2, 3, 3, 2)).astype(np.float32)
    for method in ("gemm", "direct"):
        y = k.deconv2d(x, weight, None, geom, 1, method=method)
        # the deconvolution of x is the input gradient of the convolution (same blob) for top gradient x
        ref, _, _ = conv_grads_ref(np.zeros(y.shape, np.float32), weight, x, geom, 1)
        assert rel_err(y, ref) <= TOLERANCE
    assert k.count["col2im"] == k.count["deconv_direct"] == 1


# ----------------------------------------------------------------------------------- 2. col2im


def test_col2im():
    """200+ cases: float64 scatter, and bit for bit the float32 tap-order sum (Caffe's order)."""
    rng = np.random.default_rng(303)
    k = CountingKernels()
    done = 0
    while done < MIN_CASES:
        case = random_conv(rng)
        if case is None:
            continue
        x, weight, dy, geom, g = case
        n, c, h, w = x.shape
        dcol = rng.standard_normal((n, c * geom.kernel[0] * geom.kernel[1]) + dy.shape[2:]).astype(np.float32)
        dx = k.col2im(dcol, geom, x.shape)
        assert rel_err(dx, col2im_ref(dcol, geom, x.shape, np.float64)) <= TOLERANCE, (x.shape, geom)
        np.testing.assert_array_equal(dx, col2im_ref(dcol, geom, x.shape, np.float32))
        done += 1
    assert k.count["col2im"] == MIN_CASES


def test_empty_gradients_launch_nothing():
    """An empty gradient output comes back as it is; a gradient flowing in that is empty (a 2-row
    input under a 3-row kernel has no output rows) leaves the output all zeros, with no launch."""
    k = CountingKernels()
    geom = ConvGeometry((3, 3), (1, 1), (0, 0), (1, 1))
    dx = k.col2im(np.ones((2, 27, 0, 2), np.float32), geom, (2, 3, 2, 4))
    assert dx.shape == (2, 3, 2, 4) and dx.dtype == np.float32 and not dx.any()
    assert k.col2im(np.ones((0, 27, 2, 2), np.float32), geom, (0, 3, 4, 4)).shape == (0, 3, 4, 4)
    pool = pool_params(P(pool=P.MAX, kernel_size=2, stride=2), 4, 4)
    for method in (P.MAX, P.AVE):
        x = np.ones((0, 3, 4, 4), np.float32)
        y = np.ones((0, 3) + tuple(pool.out), np.float32)
        assert k.pool_backward(x, y, y.copy(), pool, method).shape == x.shape
    assert not k.count


# ---------------------------------------------------------------------------------- 3. pooling


def test_pool_backward():
    """200+ cases each of MAX and AVE: float64 and bit for bit Caffe's float32 order."""
    rng = np.random.default_rng(404)
    k = CountingKernels()
    cases = collections.Counter()
    failures = []
    while min(cases[P.MAX], cases[P.AVE], cases["global"], cases["specials"]) < 20 or \
            min(cases[P.MAX], cases[P.AVE]) < MIN_CASES:
        case = random_pool(rng)
        if case is None:
            continue
        x, geom, method = case
        y, _ = k.pool(x, geom, method)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx = k.pool_backward(x, y, dy, geom, method)
        ref = pool_grad_ref(x, dy, geom, method, np.float64)
        exact = pool_grad_ref(x, dy, geom, method, np.float32)
        if not (rel_err(dx, ref) <= TOLERANCE and np.array_equal(dx, exact)):
            failures.append(f"{method} x{x.shape} {geom}: {rel_err(dx, ref)}")
        cases[method] += 1
        cases["global"] += geom.global_pooling
        cases["specials"] += bool(np.isnan(x).any())
    assert not failures, f"{len(failures)} differ:\n" + "\n".join(failures[:10])
    assert k.count["max_pool_argmax"] == k.count["max_pool_backward"] == cases[P.MAX]
    assert k.count["ave_pool_backward"] == cases[P.AVE]


def test_max_pool_backward_ties_and_nothing_won():
    """Hand-made: ties go to the first cell in Caffe's scan order, overlapping windows add up, and a
    window of -inf/NaN/-FLT_MAX (y = -FLT_MAX, Caffe's mask -1) sends its gradient nowhere."""
    k = CountingKernels()
    pp = P(pool=P.MAX, kernel_size=2, stride=1)
    x = np.array([[[[1, 1, 0], [1, 1, 0], [0, 0, 0]]]], np.float32)
    geom = pool_params(pp, 3, 3)
    y, _ = k.pool(x, geom, P.MAX)
    dy = np.array([[[[1, 2], [4, 8]]]], np.float32)
    # windows at (0,0), (0,1), (1,0), (1,1): maxima 1 at (0,0), (0,1), (1,0), (1,1) respectively
    np.testing.assert_array_equal(k.pool_backward(x, y, dy, geom, P.MAX)[0, 0],
                                  [[1, 2, 0], [4, 8, 0], [0, 0, 0]])
    x = np.array([[[[-np.inf, np.nan], [-FLT_MAX, -FLT_MAX]]]], np.float32)
    geom = pool_params(P(pool=P.MAX, kernel_size=2, stride=2), 2, 2)
    y, _ = k.pool(x, geom, P.MAX)
    assert y[0, 0, 0, 0] == -FLT_MAX
    np.testing.assert_array_equal(k.pool_backward(x, y, np.ones_like(y), geom, P.MAX), np.zeros_like(x))
    with pytest.raises(UnsupportedError, match="STOCHASTIC"):
        k.pool_backward(x, y, y, geom, P.STOCHASTIC)


# ------------------------------------------------------------------------------------- 4. crop


def test_crop_backward():
    """200+ cases, 1 to 7 axes, offsets on every axis: exactly zeros with dy at the offsets."""
    rng = np.random.default_rng(505)
    k = CountingKernels()
    done = 0
    while done < MIN_CASES + 5:
        if done < MIN_CASES:
            case = random_crop(rng)
            if case is None:
                continue
        else:  # 7 axes, every one cropped: 6 outer axes, more than crop.cu takes (the slice fallback)
            shape = tuple(int(v) for v in rng.integers(3, 5, 7))
            top = tuple(int(rng.integers(2, d)) for d in shape)
            offsets = tuple(int(rng.integers(0, d - t + 1)) for d, t in zip(shape, top))
            case = rng.standard_normal(top).astype(np.float32), offsets, shape
        dy, offsets, shape = case
        dx = k.crop_backward(dy, offsets, shape)
        ref = np.zeros(shape, np.float32)
        ref[tuple(slice(o, o + t) for o, t in zip(offsets, dy.shape))] = dy
        np.testing.assert_array_equal(dx, ref)
        done += 1
    assert k.count["crop_rows_backward"] == MIN_CASES


# ------------------------------------------------------------------------------ 5. strict backend


def test_launchers_on_the_strict_backend():
    """The backward launchers use only what CuPy has: the same results with caffeish.kernels.strict."""
    xp = strict.XP
    sk = strict.kernels()
    hk = CountingKernels()
    rng = np.random.default_rng(606)
    checked = collections.Counter()
    while min(checked.values(), default=0) < 10 or len(checked) < 5:
        for deconv in (False, True):
            case = random_conv(rng, deconv)
            if case is None:
                continue
            x, weight, dy, geom, g = case
            dw = rng.standard_normal(weight.shape).astype(np.float32)
            db = rng.standard_normal(dy.shape[1]).astype(np.float32)
            sdw, sdb = xp.asarray(dw), xp.asarray(db)
            fn_s = sk.deconv2d_backward if deconv else sk.conv2d_backward
            fn_h = hk.deconv2d_backward if deconv else hk.conv2d_backward
            sdx = fn_s(xp.asarray(x), xp.asarray(weight), xp.asarray(dy), geom, g, True, sdw, sdb)
            hdx = fn_h(x, weight, dy, geom, g, True, dw, db)
            np.testing.assert_allclose(sdx.get(), hdx, rtol=1e-6, atol=1e-6 * np.max(np.abs(hdx)))
            np.testing.assert_allclose(sdw.get(), dw, rtol=1e-6, atol=1e-6 * np.max(np.abs(dw)))
            np.testing.assert_allclose(sdb.get(), db, rtol=1e-6, atol=1e-6 * np.max(np.abs(db)))
            checked["deconv" if deconv else "conv"] += 1
            if not deconv:
                n, c = x.shape[:2]
                dcol = rng.standard_normal((n, c * geom.kernel[0] * geom.kernel[1]) + dy.shape[2:]).astype(np.float32)
                np.testing.assert_array_equal(sk.col2im(xp.asarray(dcol), geom, x.shape).get(),
                                              hk.col2im(dcol, geom, x.shape))
                checked["col2im"] += 1
        case = random_pool(rng)
        if case is not None:
            x, geom, method = case
            y, _ = hk.pool(x, geom, method)
            dy = rng.standard_normal(y.shape).astype(np.float32)
            got = sk.pool_backward(xp.asarray(x), xp.asarray(y), xp.asarray(dy), geom, method)
            np.testing.assert_array_equal(got.get(), hk.pool_backward(x, y, dy, geom, method))
            checked["pool"] += 1
        case = random_crop(rng)
        if case is not None:
            dy, offsets, shape = case
            got = sk.crop_backward(xp.asarray(dy), offsets, shape)
            assert type(got) is strict.StrictArray
            np.testing.assert_array_equal(got.get(), hk.crop_backward(dy, offsets, shape))
            checked["crop"] += 1


# ------------------------------------------------------------------- 6. the numpy layers' backward


def _numpy_backward(module, name):
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except ImportError:
        fn = None
    if fn is None:
        pytest.skip(f"{module}.{name} (the numpy layers' backward) does not exist yet: not compared")
    return fn


def test_conv_kernels_match_the_numpy_backward():
    """conv2d_backward / deconv2d_backward / col2im against caffeish.runtime.conv_grad, 60 cases each."""
    conv_backward = _numpy_backward("caffeish.runtime.conv_grad", "conv_backward")
    deconv_backward = _numpy_backward("caffeish.runtime.conv_grad", "deconv_backward")
    col2im = _numpy_backward("caffeish.runtime.conv_grad", "col2im")
    rng = np.random.default_rng(707)
    k = CountingKernels(3000)
    done = collections.Counter()
    while min(done["conv"], done["deconv"]) < 60:
        for deconv in (False, True):
            case = random_conv(rng, deconv)
            if case is None:
                continue
            x, weight, dy, geom, g = case
            dw0 = rng.standard_normal(weight.shape).astype(np.float32)
            db0 = rng.standard_normal(dy.shape[1]).astype(np.float32)
            ours = [dw0.copy(), db0.copy()]
            theirs = [dw0.copy(), db0.copy()]
            fn_k = k.deconv2d_backward if deconv else k.conv2d_backward
            fn_n = deconv_backward if deconv else conv_backward
            dx_k = fn_k(x, weight, dy, geom, g, True, *ours)
            dx_n = fn_n(np, x, weight, dy, geom, g, True, *theirs)
            for a, b in zip([dx_k] + ours, [dx_n] + theirs):
                assert rel_err(a, b) <= TOLERANCE, (deconv, x.shape, weight.shape, geom, g)
            if not deconv:
                n, c = x.shape[:2]
                dcol = rng.standard_normal((n, c * geom.kernel[0] * geom.kernel[1]) + dy.shape[2:]).astype(np.float32)
                np.testing.assert_array_equal(k.col2im(dcol, geom, x.shape), col2im(np, dcol, geom, x.shape))
            done["deconv" if deconv else "conv"] += 1


def test_pool_kernels_match_the_numpy_backward():
    """pool_backward against caffeish.ops.pooling.pool_backward, 200 cases, exactly."""
    pool_backward = _numpy_backward("caffeish.ops.pooling", "pool_backward")
    rng = np.random.default_rng(808)
    k = CountingKernels()
    done = 0
    while done < MIN_CASES:
        case = random_pool(rng)
        if case is None:
            continue
        x, geom, method = case
        y, _ = k.pool(x, geom, method)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        np.testing.assert_array_equal(k.pool_backward(x, y, dy, geom, method),
                                      pool_backward(np, x, y, dy, geom, method))
        done += 1


def test_crop_kernel_matches_the_numpy_backward():
    """crop_backward against caffeish.ops.crop.crop_backward, 100 cases, exactly."""
    crop_backward = _numpy_backward("caffeish.ops.crop", "crop_backward")
    rng = np.random.default_rng(909)
    k = CountingKernels()
    done = 0
    while done < 100:
        case = random_crop(rng)
        if case is None:
            continue
        dy, offsets, shape = case
        np.testing.assert_array_equal(k.crop_backward(dy, offsets, shape), crop_backward(np, dy, offsets, shape))
        done += 1
