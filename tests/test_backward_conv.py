"""Backward of Convolution, Deconvolution and Im2col (training.md 10.1), CPU array code.

The references are independent of the backward code:
1. the adjoint of the forward: each layer is linear in its input and in its weight, so
   with L = sum over tops of <dy, top>, dL/dx[i] = <dy, forward(e_i; W, 0)> and
   dL/dW[j] = sum over bottoms of <dy, forward(x; e_j, 0)>: the float32 forward of a
   one-hot input or weight is exact (each output is one product by 1, or 0), so these
   finite differences with step 1 give the gradient exactly, summed in float64.  Checked
   over many geometries: groups (depthwise too), dilation (0 too), pad larger than the
   kernel, stride larger than the kernel, windows sticking out past the padded input,
   rectangular kernels, 0-D, 1-D and 3-D, channel axis != 1, several bottoms sharing the
   weights, bias_term false;
2. Caffe's formulas in float64 loops (dW, db, dx of a convolution, one output position
   and tap at a time; deconvolution's formula);
3. the conventions: param diffs accumulate (+=) into what they held, None param diffs
   and propagate_down false compute nothing, Im2col writes dx whatever propagate_down;
4. the chunked column path (bands of rows, several images per chunk; small and big
   weights) gives the same as one chunk and as the formulas;
5. the array code run with the strict backend's xp (CuPy's API) for N-D convolutions,
   deconvolutions and col2im (the GPU path for spatial ranks other than 2).
"""
import numpy as np
import pytest

from caffeish.graph.geometry import ConvGeometry, conv_output_shape
from caffeish.kernels import strict
from caffeish.runtime import conv_grad
from caffeish.runtime.backend import to_numpy
from layer_checks import make, rel_err

TOL = 1e-5


def rand(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def layer_text(kind, conv, n_bottoms=1):
    bottoms = " ".join(f'bottom: "x{i}"' for i in range(n_bottoms))
    tops = " ".join(f'top: "y{i}"' for i in range(n_bottoms))
    return f'name: "l" type: "{kind}" {bottoms} {tops} convolution_param {{ {conv} }}'


def setup(kind, conv, x_shape, n_bottoms=1, seed=0):
    """The layer, random bottoms, blobs, the tops and random top diffs."""
    rng = np.random.default_rng(seed)
    lay = make(layer_text(kind, conv, n_bottoms))
    shapes = [tuple(x_shape)] * n_bottoms
    lay.reshape(shapes)
    blobs = [rand(rng, s) for s in lay.param_shapes(shapes)]
    xs = [rand(rng, x_shape) for _ in range(n_bottoms)]
    tops = lay.forward(np, xs, blobs)
    dys = [rand(rng, t.shape) for t in tops]
    return lay, xs, blobs, tops, dys


def loss(lay, xs, blobs, dys):
    """sum over tops of <dy, top>, in float64, from the float32 forward."""
    tops = lay.forward(np, xs, blobs)
    return sum(float(np.dot(d.ravel().astype(np.float64), t.ravel().astype(np.float64))) for d, t in zip(dys, tops))


def one_hot(shape, i):
    e = np.zeros(int(np.prod(shape)), np.float32)
    e[i] = 1
    return e.reshape(shape)


def adjoint_reference(lay, xs, blobs, dys):
    """Exact gradients (see the module docstring): (dx per bottom, d per blob)."""
    zero_blobs = [np.zeros_like(b) for b in blobs]
    dxs = []
    for i, x in enumerate(xs):
        ref = np.zeros(x.shape)
        for j in range(x.size):
            ins = [np.zeros_like(v) for v in xs]
            ins[i] = one_hot(x.shape, j)
            ref.flat[j] = loss(lay, ins, [blobs[0]] + zero_blobs[1:], dys)
        dxs.append(ref)
    dblobs = []
    for k, b in enumerate(blobs):
        ref = np.zeros(b.shape)
        for j in range(b.size):
            bl = list(zero_blobs)
            bl[k] = one_hot(b.shape, j)
            # The weight gradient reads x; the bias gradient the layer with zero input.
            ref.flat[j] = loss(lay, xs if k == 0 else [np.zeros_like(v) for v in xs], bl, dys)
        dblobs.append(ref)
    return dxs, dblobs


def backward(lay, xs, blobs, tops, dys, propagate_down=None, param_diffs="zeros", xp=np):
    if propagate_down is None:
        propagate_down = [True] * len(xs)
    if param_diffs == "zeros":
        param_diffs = [np.zeros_like(b) for b in blobs]
    return lay.backward(xp, dys, tops, xs, blobs, propagate_down, param_diffs), param_diffs


CONV_CASES = [
    # (conv params, bottom shape, bottoms)
    ("num_output: 6 kernel_size: 3 pad: 1 group: 2", (2, 4, 7, 6), 1),
    ("num_output: 4 kernel_size: 3 pad: 1 stride: 2 dilation: 2 group: 2", (2, 4, 7, 8), 1),
    # pad larger than the kernel, stride larger than the kernel, rectangular
    ("num_output: 3 kernel_h: 2 kernel_w: 3 pad_h: 3 pad_w: 1 stride_h: 3 stride_w: 4", (1, 2, 5, 9), 1),
    # depthwise
    ("num_output: 3 kernel_size: 3 pad: 1 stride: 2 group: 3", (2, 3, 6, 5), 1),
    ("num_output: 3 kernel_size: 2 pad: 2 dilation: 3 group: 3", (1, 3, 5, 6), 1),
    # windows sticking out past the padded input (in 2, k 3, s 2: out 1)
    ("num_output: 2 kernel_size: 3 stride: 2", (2, 2, 2, 5), 1),
    # 1x1, strided; and plain 1x1
    ("num_output: 5 kernel_size: 1 stride: 2", (2, 3, 5, 4), 1),
    ("num_output: 4 kernel_size: 1 group: 2", (3, 4, 3, 2), 1),
    # dilation 0 (Caffe accepts it: every tap reads the same pixel)
    ("num_output: 2 kernel_size: 2 dilation: 0 pad: 1", (1, 2, 4, 3), 1),
    # several bottoms sharing the weights, no bias
    ("num_output: 4 kernel_size: 2 stride: 1 pad: 1 bias_term: false", (2, 2, 4, 5), 2),
    ("num_output: 4 kernel_size: 3 pad: 1 group: 2", (1, 4, 5, 4), 3),
    # 1-D, 3-D and 0-D
    ("num_output: 4 kernel_size: 3 stride: 2 pad: 2 dilation: 2 group: 2", (2, 4, 9), 1),
    (("num_output: 3 kernel_size: 2 kernel_size: 3 kernel_size: 2 stride: 1 stride: 2 stride: 1 "
      "pad: 1 pad: 0 pad: 1"), (1, 2, 4, 5, 3), 1),
    ("num_output: 3", (4, 5), 1),
    # channel axis 2 (the axes before it fold into N) and -3
    ("num_output: 4 kernel_size: 2 pad: 1 stride: 2 axis: 2", (2, 3, 4, 5, 3), 1),
    ("num_output: 2 kernel_size: 3 axis: -3 group: 2", (1, 2, 4, 4, 3), 1),
]


@pytest.mark.parametrize("conv, shape, n_bottoms", CONV_CASES)
def test_convolution_is_the_adjoint_of_its_forward(conv, shape, n_bottoms):
    lay, xs, blobs, tops, dys = setup("Convolution", conv, shape, n_bottoms)
    (dxs, pd) = backward(lay, xs, blobs, tops, dys)
    ref_dxs, ref_blobs = adjoint_reference(lay, xs, blobs, dys)
    assert len(dxs) == n_bottoms
    for dx, ref, x in zip(dxs, ref_dxs, xs):
        assert dx.dtype == np.float32 and dx.shape == x.shape
        assert rel_err(dx, ref) < TOL
    assert len(pd) == len(ref_blobs) == (1 if "bias_term: false" in conv else 2)
    for d, ref in zip(pd, ref_blobs):
        assert rel_err(d, ref) < TOL


DECONV_CASES = [
    ("num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 2", (2, 4, 3, 4), 1),
    ("num_output: 3 kernel_size: 3 stride: 1 pad: 0", (1, 2, 3, 3), 1),
    ("num_output: 2 kernel_h: 2 kernel_w: 3 stride_h: 3 stride_w: 1 pad_h: 0 pad_w: 1", (1, 3, 3, 4), 1),
    ("num_output: 2 kernel_size: 3 stride: 2 dilation: 2 pad: 2 bias_term: false", (1, 2, 4, 3), 2),
    ("num_output: 3 kernel_size: 3 stride: 2 group: 3", (2, 3, 3, 3), 1),
    ("num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 2", (2, 2, 5), 1),
    ("num_output: 2 kernel_size: 2 stride: 2 pad: 1", (1, 2, 2, 3, 2), 1),
    ("num_output: 2 kernel_size: 3 stride: 2 axis: 2", (2, 2, 3, 3, 2), 1),
]


@pytest.mark.parametrize("conv, shape, n_bottoms", DECONV_CASES)
def test_deconvolution_is_the_adjoint_of_its_forward(conv, shape, n_bottoms):
    lay, xs, blobs, tops, dys = setup("Deconvolution", conv, shape, n_bottoms, seed=1)
    assert blobs[0].shape[:2] == (shape[lay.channel_axis], lay.num_output // lay.group)
    (dxs, pd) = backward(lay, xs, blobs, tops, dys)
    ref_dxs, ref_blobs = adjoint_reference(lay, xs, blobs, dys)
    for dx, ref in zip(dxs, ref_dxs):
        assert dx.dtype == np.float32
        assert rel_err(dx, ref) < TOL
    for d, ref in zip(pd, ref_blobs):
        assert rel_err(d, ref) < TOL


IM2COL_CASES = [
    ("kernel_size: 3 pad: 1 stride: 2", (2, 3, 5, 6)),
    ("kernel_h: 2 kernel_w: 3 pad_h: 2 pad_w: 0 stride_h: 1 stride_w: 3 dilation: 2", (1, 2, 6, 7)),
    ("kernel_size: 3 stride: 2", (1, 2, 2, 5)),  # a window beyond the padded input
    ("kernel_size: 3 pad: 1 stride: 2", (2, 2, 7)),
    ("kernel_size: 2 pad: 1", (1, 2, 3, 2, 3)),
    ("kernel_size: 2 stride: 2 axis: 2", (2, 2, 3, 4, 4)),
]


@pytest.mark.parametrize("conv, shape", IM2COL_CASES)
def test_im2col_backward_is_col2im_and_ignores_propagate_down(conv, shape):
    rng = np.random.default_rng(2)
    lay = make(f'name: "l" type: "Im2col" bottom: "x" top: "y" convolution_param {{ {conv} }}')
    lay.reshape([shape])
    x = rand(rng, shape)
    (y,) = lay.forward(np, [x], [])
    dy = rand(rng, y.shape)
    ref = np.zeros(x.shape)
    for j in range(x.size):
        (col,) = lay.forward(np, [one_hot(x.shape, j)], [])
        ref.flat[j] = np.dot(dy.ravel().astype(np.float64), col.ravel().astype(np.float64))
    for flag in (True, False):
        (dx,) = lay.backward(np, [dy], [y], [x], [], [flag], [])
        assert dx.dtype == np.float32 and dx.shape == x.shape
        assert rel_err(dx, ref) < TOL


# -- Caffe's formulas, in float64 loops ---------------------------------------------------


def formula_conv_grads(x, w, dy, stride, pad, dil, group):
    """training.md 10.1, one output position and one tap at a time."""
    x, w, dy = (a.astype(np.float64) for a in (x, w, dy))
    c = x.shape[1]
    o = w.shape[0]
    cg, og = c // group, o // group
    spatial = x.shape[2:]
    dx, dw = np.zeros(x.shape), np.zeros(w.shape)
    db = dy.sum(axis=(0,) + tuple(range(2, dy.ndim)))
    for p in np.ndindex(*dy.shape[2:]):
        for q in np.ndindex(*w.shape[2:]):
            r = tuple(pi * s - pd + qi * d for pi, s, pd, qi, d in zip(p, stride, pad, q, dil))
            if not all(0 <= v < size for v, size in zip(r, spatial)):
                continue
            for g in range(group):
                cs, os_ = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
                dyp = dy[(slice(None), os_) + p]  # (n, og)
                xr = x[(slice(None), cs) + r]  # (n, cg)
                dw[(os_, slice(None)) + q] += dyp.T @ xr
                dx[(slice(None), cs) + r] += dyp @ w[(os_, slice(None)) + q]
    return dx, dw, db


def formula_deconv_grads(x, w, dy, stride, pad, dil, group):
    """training.md 10.1: t = i*stride - pad + q*dil, dy read as 0 outside the top."""
    x, w, dy = (a.astype(np.float64) for a in (x, w, dy))
    c = x.shape[1]
    og = w.shape[1]
    cg = c // group
    out = dy.shape[2:]
    dx, dw = np.zeros(x.shape), np.zeros(w.shape)
    db = dy.sum(axis=(0,) + tuple(range(2, dy.ndim)))
    for i in np.ndindex(*x.shape[2:]):
        for q in np.ndindex(*w.shape[2:]):
            t = tuple(ii * s - pd + qi * d for ii, s, pd, qi, d in zip(i, stride, pad, q, dil))
            if not all(0 <= v < size for v, size in zip(t, out)):
                continue
            for g in range(group):
                cs, os_ = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
                dyt = dy[(slice(None), os_) + t]  # (n, og)
                xi = x[(slice(None), cs) + i]  # (n, cg)
                dw[(cs, slice(None)) + q] += xi.T @ dyt
                dx[(slice(None), cs) + i] += dyt @ w[(cs, slice(None)) + q].T
    return dx, dw, db


@pytest.mark.parametrize("conv, shape, stride, pad, dil, group", [
    ("num_output: 6 kernel_size: 3 pad: 2 stride: 2 dilation: 2 group: 3", (2, 6, 9, 8), (2, 2), (2, 2), (2, 2), 3),
    ("num_output: 4 kernel_h: 1 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0", (1, 3, 6, 7),
     (2, 1), (1, 0), (1, 1), 1),
    ("num_output: 2 kernel_size: 3 stride: 3 pad: 4 group: 2", (2, 2, 5), (3,), (4,), (1,), 2),
])
def test_convolution_matches_caffe_formulas(conv, shape, stride, pad, dil, group):
    lay, xs, blobs, tops, dys = setup("Convolution", conv, shape, seed=3)
    (dx,), (dw, db) = backward(lay, xs, blobs, tops, dys)
    rdx, rdw, rdb = formula_conv_grads(xs[0], blobs[0], dys[0], stride, pad, dil, group)
    assert rel_err(dx, rdx) < TOL
    assert rel_err(dw, rdw) < TOL
    assert rel_err(db, rdb) < TOL


@pytest.mark.parametrize("conv, shape, stride, pad, dil, group", [
    ("num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 2", (2, 4, 4, 3), (2, 2), (1, 1), (1, 1), 2),
    ("num_output: 3 kernel_size: 3 stride: 3 pad: 2 dilation: 2", (1, 2, 3, 4), (3, 3), (2, 2), (2, 2), 1),
])
def test_deconvolution_matches_caffe_formulas(conv, shape, stride, pad, dil, group):
    lay, xs, blobs, tops, dys = setup("Deconvolution", conv, shape, seed=4)
    (dx,), (dw, db) = backward(lay, xs, blobs, tops, dys)
    rdx, rdw, rdb = formula_deconv_grads(xs[0], blobs[0], dys[0], stride, pad, dil, group)
    assert rel_err(dx, rdx) < TOL
    assert rel_err(dw, rdw) < TOL
    assert rel_err(db, rdb) < TOL


# -- conventions --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
def test_param_diffs_accumulate_and_propagate_down(kind):
    conv = "num_output: 4 kernel_size: 3 pad: 1 stride: 2 group: 2"
    lay, xs, blobs, tops, dys = setup(kind, conv, (2, 4, 5, 6), n_bottoms=2, seed=5)
    (dx_all, fresh) = backward(lay, xs, blobs, tops, dys)
    rng = np.random.default_rng(6)
    held = [rand(rng, b.shape) for b in blobs]
    start = [h.copy() for h in held]
    dxs, _ = backward(lay, xs, blobs, tops, dys, propagate_down=[False, True], param_diffs=held)
    assert dxs[0] is None
    np.testing.assert_array_equal(dxs[1], dx_all[1])
    for h, s, f in zip(held, start, fresh):
        np.testing.assert_allclose(h, s + f, rtol=1e-5, atol=1e-5)
    # Twice in a row adds twice (Caffe never zeroes param diffs).
    backward(lay, xs, blobs, tops, dys, param_diffs=held)
    for h, s, f in zip(held, start, fresh):
        np.testing.assert_allclose(h, s + 2 * f, rtol=1e-5, atol=1e-5)
    # None param diffs: only dx; nothing wanted: nothing computed.
    dxs, _ = backward(lay, xs, blobs, tops, dys, param_diffs=[None, None])
    np.testing.assert_array_equal(dxs[0], dx_all[0])
    dxs, _ = backward(lay, xs, blobs, tops, dys, propagate_down=[False, False], param_diffs=[None, None])
    assert dxs == [None, None]
    # Only the bias.
    db = np.zeros_like(blobs[1])
    backward(lay, xs, blobs, tops, dys, propagate_down=[False, False], param_diffs=[None, db])
    np.testing.assert_allclose(db, fresh[1], rtol=1e-5, atol=1e-6)


def test_backward_does_not_write_its_inputs():
    lay, xs, blobs, tops, dys = setup("Convolution", "num_output: 4 kernel_size: 3 pad: 1 group: 2",
                                      (2, 4, 5, 5), seed=7)
    copies = [a.copy() for a in xs + blobs + tops + dys]
    backward(lay, xs, blobs, tops, dys)
    for a, c in zip(xs + blobs + tops + dys, copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("geom, x_shape, o, group", [
    (ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1)), (3, 4, 12, 7), 6, 2),
    (ConvGeometry((3, 2), (2, 1), (3, 0), (2, 1)), (2, 2, 13, 5), 4, 1),
    (ConvGeometry((2, 3, 2), (1, 2, 1), (1, 1, 0), (1, 1, 1)), (2, 2, 6, 5, 4), 2, 1),
])
@pytest.mark.parametrize("budget", [40, 300, 2000])
@pytest.mark.parametrize("small_weight", [conv_grad.SMALL_WEIGHT, 0])
def test_chunked_columns_match_one_chunk(geom, x_shape, o, group, budget, small_weight, monkeypatch):
    """Small column budgets force bands of rows and several images per chunk; both ways of
    computing the weight gradient (transposed and summed for small weights, or added chunk by
    chunk for big ones)."""
    monkeypatch.setattr(conv_grad, "SMALL_WEIGHT", small_weight)
    rng = np.random.default_rng(8)
    c = x_shape[1]
    x = rand(rng, x_shape)
    w = rand(rng, (o, c // group) + geom.kernel)
    out = conv_output_shape(x_shape[2:], geom)
    dy = rand(rng, (x_shape[0], o) + out)
    dw_ref, db_ref = np.zeros_like(w), np.zeros(o, np.float32)
    dx_ref = conv_grad.conv_backward(np, x, w, dy, geom, group, True, dw_ref, db_ref, budget=1 << 30)
    dw, db = np.zeros_like(w), np.zeros(o, np.float32)
    dx = conv_grad.conv_backward(np, x, w, dy, geom, group, True, dw, db, budget=budget)
    rdx, rdw, rdb = formula_conv_grads(x, w, dy, geom.stride, geom.pad, geom.dilation, group)
    assert rel_err(dx_ref, rdx) < TOL and rel_err(dw_ref, rdw) < TOL and rel_err(db_ref, rdb) < TOL
    assert rel_err(dx, rdx) < TOL and rel_err(dw, rdw) < TOL and rel_err(db, rdb) < TOL


# -- the strict backend (CuPy's API) ------------------------------------------------------


@pytest.mark.parametrize("kind, conv, shape", [
    ("Convolution", "num_output: 4 kernel_size: 3 stride: 2 pad: 2 dilation: 2 group: 2", (2, 4, 9)),
    ("Convolution", "num_output: 3 kernel_size: 3 pad: 1 group: 3", (1, 3, 5)),
    ("Convolution", "num_output: 3 kernel_size: 2 kernel_size: 3 kernel_size: 2 pad: 1", (1, 2, 4, 5, 3)),
    ("Convolution", "num_output: 3", (4, 5)),
    ("Deconvolution", "num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 2", (2, 2, 5)),
    ("Deconvolution", "num_output: 2 kernel_size: 2 stride: 2 pad: 1", (1, 2, 2, 3, 2)),
])
def test_nd_backward_runs_on_the_strict_backend(kind, conv, shape):
    xp = strict.XP
    lay, xs, blobs, tops, dys = setup(kind, conv, shape, n_bottoms=2, seed=9)
    (dx_ref, pd_ref) = backward(lay, xs, blobs, tops, dys)
    dev = [xp.asarray(a) for a in xs + blobs + tops + dys]
    dxs_d, bl_d, tops_d, dys_d = dev[:2], dev[2:2 + len(blobs)], dev[2 + len(blobs):4 + len(blobs)], dev[-2:]
    pd_d = [xp.zeros(b.shape, dtype=np.float32) for b in blobs]
    dxs = lay.backward(xp, dys_d, tops_d, dxs_d, bl_d, [True, True], pd_d)
    for a, r in zip(dxs, dx_ref):
        assert rel_err(to_numpy(a), r) < 1e-6
    for a, r in zip(pd_d, pd_ref):
        assert rel_err(to_numpy(a), r) < 1e-6


@pytest.mark.parametrize("geom, x_shape", [
    (ConvGeometry((3, 3), (2, 2), (1, 1), (1, 1)), (2, 3, 5, 6)),
    (ConvGeometry((2,), (1,), (1,), (2,)), (1, 2, 6)),
])
def test_col2im_and_2d_conv_arrays_on_the_strict_backend(geom, x_shape):
    """The array functions themselves with CuPy's API (2-D: the GPU uses our kernels instead)."""
    xp = strict.XP
    rng = np.random.default_rng(10)
    c = x_shape[1]
    out = conv_output_shape(x_shape[2:], geom)
    k = int(np.prod(geom.kernel))
    dcol = rand(rng, (x_shape[0], c * k) + out)
    ref = conv_grad.col2im(np, dcol, geom, x_shape)
    got = conv_grad.col2im(xp, xp.asarray(dcol), geom, x_shape)
    np.testing.assert_array_equal(to_numpy(got), ref)
    for group, o in ((1, 4), (c, c)):
        x = rand(rng, x_shape)
        w = rand(rng, (o, c // group) + geom.kernel)
        dy = rand(rng, (x_shape[0], o) + out)
        dw, db = np.zeros_like(w), np.zeros(o, np.float32)
        dx = conv_grad.conv_backward(np, x, w, dy, geom, group, True, dw, db, budget=64)
        dw_d, db_d = xp.zeros(w.shape, dtype=np.float32), xp.zeros((o,), dtype=np.float32)
        dx_d = conv_grad.conv_backward(xp, xp.asarray(x), xp.asarray(w), xp.asarray(dy), geom, group, True,
                                       dw_d, db_d, budget=64)
        assert rel_err(to_numpy(dx_d), dx) < 1e-6
        assert rel_err(to_numpy(dw_d), dw) < 1e-6
        assert rel_err(to_numpy(db_d), db) < 1e-6


def test_blas_gemm_adds_into_its_output():
    from caffeish.runtime import blas

    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((5, 7), dtype=np.float32), rng.standard_normal((3, 7), dtype=np.float32)
    c = rng.standard_normal((5, 3), dtype=np.float32)
    expected = c.astype(np.float64) + a.astype(np.float64) @ b.T.astype(np.float64)
    if not blas.gemm_nt_add(a, b, c):
        pytest.skip("numpy's OpenBLAS is not reachable here: the numpy fallback is what runs")
    np.testing.assert_allclose(c, expected, rtol=1e-5, atol=1e-5)
    assert not blas.gemm_nt_add(a, b, c[:, :2])  # shapes that do not fit are refused, not guessed


def test_a_big_weight_gradient_needs_no_weight_sized_temporary():
    """FCN's fc6 (a 7x7 convolution, 411 MB of weights) must not double its memory in backward."""
    import tracemalloc

    from caffeish.runtime import blas
    from caffeish.runtime.conv_grad import SMALL_WEIGHT, conv_backward

    if not blas.gemm_nt_add(np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32)):
        pytest.skip("numpy's OpenBLAS is not reachable here: the weight gradient goes through a temporary")
    rng = np.random.default_rng(8)
    o, c, k = 1024, 512, 3
    assert o * c * k * k > SMALL_WEIGHT
    x = rng.standard_normal((1, c, k, k), dtype=np.float32)
    w = rng.standard_normal((o, c, k, k), dtype=np.float32)
    dy = rng.standard_normal((1, o, 1, 1), dtype=np.float32)
    dw = np.zeros_like(w)
    g = ConvGeometry((k, k), (1, 1), (0, 0), (1, 1))
    tracemalloc.start()
    conv_backward(np, x, w, dy, g, 1, False, dw, None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < w.nbytes // 4, peak
    np.testing.assert_allclose(dw, (dy[0, :, 0, 0][:, None] * x.reshape(1, -1)).reshape(w.shape), rtol=1e-5, atol=1e-6)
