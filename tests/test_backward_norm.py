"""Backward of the normalisation layers (LRN, MVN, BatchNorm) and of Scale and Bias.

1. Gradients against central finite differences in float64: of the layer's own forward where it
   keeps float64 (LRN, Scale, Bias, BatchNorm with global stats), else of an independent float64
   forward written here (MVN, BatchNorm with batch statistics), for bottoms and parameters.
2. Caffe's rules, against hand-derived values (../shared/caffe/training.md 9.3, 10.5, 10.6):
   BatchNorm's running statistics after TRAIN forwards (order, m/(m-1)), its untouched param
   diffs and its exact in-place backward even when a later in-place layer overwrote its output;
   MVN's formula with its missing (sigma+eps)/sigma factor; LRN ACROSS_CHANNELS, MVN and
   BatchNorm writing the bottom diff whatever propagate_down says; the garbled in-place results
   of LRN (both regions) and MVN; Scale's = versus += cases over two passes, its in-place copy of
   x, its product left in bottom 0's diff; Bias's learned (+=) and second-bottom (=) diffs.
3. Every backward on the strict backend's array module (CuPy's rules), LRN also after the
   forward of our CUDA kernel (the harness build), against numpy.
"""
import os
import shutil

import numpy as np
import pytest
from google.protobuf import text_format

from caffeish.formats.schema import TEST, TRAIN, pb
from caffeish.graph.registry import create
from caffeish.kernels import strict
from caffeish.runtime import backend
from layer_checks import assert_close, numeric

HAVE_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None or bool(os.environ.get("CI"))
needs_cxx = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the kernel harness (g++ or $CXX)")
SHAPE = (2, 6, 5, 7)


def make(text, phase=TEST, inplace=False, bottoms=("x",)):
    param = text_format.Parse(text, pb.LayerParameter())
    param.name = param.name or "L"
    param.bottom.extend(bottoms)
    param.top.append("x" if inplace else "y")
    return create(param, phase)


def rand(*shape, seed=0, low=-2.0, high=2.0, dtype=np.float64):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(dtype)


def forward(layer, bottoms, blobs=(), xp=np):
    layer.reshape([tuple(b.shape) for b in bottoms])
    return layer.forward(xp, list(bottoms), list(blobs))[0]


def forward_backward(layer, bottoms, dy, blobs=(), propagate=None, param_diffs=None, inplace=False, xp=np):
    """needs_backward, forward, backward; in place bottoms[0] is the output (tops[0])."""
    layer.needs_backward = True
    y = forward(layer, bottoms, blobs, xp)
    given = [y] + list(bottoms[1:]) if inplace else list(bottoms)
    if propagate is None:
        propagate = [True] * len(bottoms)
    if param_diffs is None:
        param_diffs = [None] * len(blobs)
    return layer.backward(xp, [dy], [y], given, list(blobs), list(propagate), param_diffs)


# -- LRN -------------------------------------------------------------------------------------------

LRN_CASES = [
    "lrn_param { local_size: 5 alpha: 0.1 beta: 0.75 k: 2 }",
    "lrn_param { local_size: 3 alpha: 0.3 beta: 0.6 }",
    "lrn_param { local_size: 3 alpha: 0.5 beta: 1 k: 1.5 }",
    "lrn_param { local_size: 3 alpha: 0.2 beta: 0.6 norm_region: WITHIN_CHANNEL }",
    "lrn_param { local_size: 5 alpha: 0.4 beta: 0.75 norm_region: WITHIN_CHANNEL }",
    "lrn_param { local_size: 3 alpha: 0.2 beta: -2 norm_region: WITHIN_CHANNEL }",  # Power's power-2 case
    "lrn_param { local_size: 3 alpha: 0.2 beta: -1 norm_region: WITHIN_CHANNEL }",  # Power's power-1 case
]
SMALL = (2, 4, 3, 5)


@pytest.mark.parametrize("text", LRN_CASES)
def test_lrn_gradient_matches_finite_differences(text):
    x = rand(*SMALL, seed=1)
    dy = rand(*SMALL, seed=2)
    dx, = forward_backward(make(f"type: 'LRN' {text}"), [x], dy)
    assert dx.dtype == np.float64
    assert_close(dx, numeric(lambda v: forward(make(f"type: 'LRN' {text}"), [v]), x, dy))


def test_lrn_propagate_down_false():
    """ACROSS_CHANNELS writes the bottom diff anyway (Caffe ignores the flag); WITHIN_CHANNEL does not."""
    x, dy = rand(*SMALL, seed=3), rand(*SMALL, seed=4)
    across = "type: 'LRN' lrn_param { local_size: 3 }"
    dx, = forward_backward(make(across), [x], dy, propagate=[False])
    assert_close(dx, forward_backward(make(across), [x], dy)[0], 0)
    within = "type: 'LRN' lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL }"
    assert forward_backward(make(within), [x], dy, propagate=[False]) == [None]


def lrn_across_in_place_reference(x, n, alpha, beta, k):
    """Caffe's CrossChannelBackward_cpu with top diff and bottom diff one array: bottom_diff =
    S^-beta, then *= top_diff (itself), so dy becomes S^-2beta; bottom data is y."""
    c = x.shape[1]
    h = (n - 1) // 2
    s = np.empty_like(x)
    for ch in range(c):
        lo, hi = max(0, ch - h), min(c, ch + h + 1)
        s[:, ch] = k + alpha / n * (x[:, lo:hi] ** 2).sum(axis=1)
    y = x * s ** -beta
    dy = s ** (-2 * beta)
    dx = np.empty_like(x)
    for ch in range(c):
        lo, hi = max(0, ch - h), min(c, ch + h + 1)
        acc = (dy[:, lo:hi] * y[:, lo:hi] / s[:, lo:hi]).sum(axis=1)
        dx[:, ch] = dy[:, ch] - 2 * alpha * beta / n * y[:, ch] * acc
    return dx


def lrn_within_reference(u, x, dy, n, alpha, beta):
    """dx = dy P - (2 alpha beta / n^2) u sum_{p: r in window(p)} dy[p] u[p] P[p] / (1 + alpha A[p]),
    A the zero-padded n x n mean of x^2, P = (1 + alpha A)^-beta; u is what Caffe's internal
    product and square inputs hold (x, or y in place)."""
    hh, ww = x.shape[2:]
    h = (n - 1) // 2
    a = np.zeros_like(x)
    for i in range(hh):
        for j in range(ww):
            a[:, :, i, j] = (x[:, :, max(0, i - h):i + h + 1, max(0, j - h):j + h + 1] ** 2).sum(axis=(2, 3)) / n ** 2
    p = (1 + alpha * a) ** -beta
    t = dy * u * p / (1 + alpha * a)
    dx = dy * p
    for i in range(hh):
        for j in range(ww):
            dx[:, :, i, j] -= 2 * alpha * beta / n ** 2 * u[:, :, i, j] * \
                t[:, :, max(0, i - h):i + h + 1, max(0, j - h):j + h + 1].sum(axis=(2, 3))
    return dx


@pytest.mark.parametrize("n,alpha,beta,k", [(5, 0.1, 0.75, 2.0), (3, 0.3, 0.6, 1.0)])
def test_lrn_across_in_place_is_caffes_garbled_result(n, alpha, beta, k):
    x, dy = rand(*SMALL, seed=5), rand(*SMALL, seed=6)
    text = f"type: 'LRN' lrn_param {{ local_size: {n} alpha: {alpha} beta: {beta} k: {k} }}"
    dx, = forward_backward(make(text, inplace=True), [x], dy, inplace=True)
    assert_close(dx, lrn_across_in_place_reference(x, n, alpha, beta, k))


@pytest.mark.parametrize("inplace", [False, True])
def test_lrn_within_against_the_hand_formula(inplace):
    x, dy = rand(*SMALL, seed=7), rand(*SMALL, seed=8)
    text = "type: 'LRN' lrn_param { local_size: 3 alpha: 0.2 beta: 0.6 norm_region: WITHIN_CHANNEL }"
    layer = make(text, inplace=inplace)
    dx, = forward_backward(layer, [x], dy, inplace=inplace)
    u = forward(make(text), [x]) if inplace else x
    assert_close(dx, lrn_within_reference(u, x, dy, 3, 0.2, 0.6))


# -- MVN -------------------------------------------------------------------------------------------

def mvn_reference(x, normalize_variance=True, across_channels=False, eps=1e-9):
    shape = x.shape + (1,) * (4 - x.ndim)
    rows = shape[0] if across_channels else shape[0] * shape[1]
    flat = x.reshape(rows, -1)
    y = flat - flat.mean(axis=1, keepdims=True)
    if normalize_variance:
        y = y / (np.sqrt((y ** 2).mean(axis=1, keepdims=True)) + eps)
    return y.reshape(shape)


MVN_CASES = [("", {}), ("mvn_param { across_channels: true }", {"across_channels": True}),
             ("mvn_param { normalize_variance: false }", {"normalize_variance": False}),
             ("mvn_param { normalize_variance: false across_channels: true }",
              {"normalize_variance": False, "across_channels": True})]


@pytest.mark.parametrize("text,kw", MVN_CASES)
def test_mvn_gradient_matches_finite_differences(text, kw):
    x = rand(*SMALL, seed=9, dtype=np.float32)
    dy = rand(*SMALL, seed=10, dtype=np.float32)
    dx, = forward_backward(make(f"type: 'MVN' {text}"), [x], dy)
    ref = numeric(lambda v: mvn_reference(v, **kw), x.astype(np.float64), dy.astype(np.float64))
    assert_close(dx, ref, 2e-5)


def test_mvn_keeps_caffes_formula_with_a_large_eps():
    """dx = (dy - mean(dy) - y mean(dy y)) / (sigma + eps): the true gradient has sigma, not
    sigma + eps, under the last term; with eps 0.5 the two differ and we give Caffe's."""
    x = rand(3, 4, 2, 5, seed=11, dtype=np.float32)
    dy = rand(3, 4, 2, 5, seed=12, dtype=np.float32)
    dx, = forward_backward(make("type: 'MVN' mvn_param { eps: 0.5 }"), [x], dy)
    xd, dyd = x.astype(np.float64).reshape(12, -1), dy.astype(np.float64).reshape(12, -1)
    c = xd - xd.mean(axis=1, keepdims=True)
    sigma = np.sqrt((c ** 2).mean(axis=1, keepdims=True))
    y = c / (sigma + 0.5)
    caffe = (dyd - dyd.mean(axis=1, keepdims=True) - y * (dyd * y).mean(axis=1, keepdims=True)) / (sigma + 0.5)
    assert_close(dx, caffe.reshape(x.shape), 2e-6)
    true = numeric(lambda v: mvn_reference(v, eps=0.5), x.astype(np.float64), dy.astype(np.float64))
    assert np.abs(dx - true).max() > 1e-3 * np.abs(true).max()


def test_mvn_in_place_is_caffes_garbled_result():
    """With dy and dx one array: m = sum(y dy); dx = (y m + sum(y m)) (1 - 1/dim) / (sigma + eps)."""
    x = rand(*SMALL, seed=13, dtype=np.float32)
    dy = rand(*SMALL, seed=14, dtype=np.float32)
    dx, = forward_backward(make("type: 'MVN'", inplace=True), [x], dy, inplace=True)
    xd, dyd = x.astype(np.float64).reshape(8, -1), dy.astype(np.float64).reshape(8, -1)
    c = xd - xd.mean(axis=1, keepdims=True)
    std = np.sqrt((c ** 2).mean(axis=1, keepdims=True)) + 1e-9
    y = c / std
    m = (y * dyd).sum(axis=1, keepdims=True)
    ref = (y * m + (y * m).sum(axis=1, keepdims=True)) * (1 - 1 / xd.shape[1]) / std
    assert_close(dx, ref.reshape(x.shape), 2e-5)
    # mean only: exact in place
    dx, = forward_backward(make("type: 'MVN' mvn_param { normalize_variance: false }", inplace=True), [x], dy,
                           inplace=True)
    assert_close(dx, (dyd - dyd.mean(axis=1, keepdims=True)).reshape(x.shape), 1e-6)


def test_mvn_two_axis_bottom_and_propagate_down_false():
    """A (N, C) bottom has a (N, C, 1, 1) top; the diff has the bottom's shape, and is written
    whatever propagate_down says."""
    x = rand(4, 6, seed=15, dtype=np.float32)
    dy = rand(4, 6, 1, 1, seed=16, dtype=np.float32)
    text = "type: 'MVN' mvn_param { across_channels: true }"
    dx, = forward_backward(make(text), [x], dy, propagate=[False])
    assert dx.shape == (4, 6)
    ref = numeric(lambda v: mvn_reference(v, across_channels=True), x.astype(np.float64), dy.astype(np.float64))
    assert_close(dx, ref.reshape(4, 6), 2e-5)


# -- BatchNorm ---------------------------------------------------------------------------------------

def bn_reference(x, eps=1e-5):
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def bn_blobs(c=6, seed=20):
    return [rand(c, seed=seed, dtype=np.float32), rand(c, seed=seed + 1, low=0.5, high=2, dtype=np.float32),
            np.array([2.5], np.float32)]


@pytest.mark.parametrize("shape", [SMALL, (5, 3), (2, 3, 2, 2, 3)])
def test_batchnorm_batch_mode_gradient(shape):
    x = rand(*shape, seed=21, dtype=np.float32)
    dy = rand(*shape, seed=22, dtype=np.float32)
    c = shape[1]
    dx, = forward_backward(make("type: 'BatchNorm'", phase=TRAIN), [x], dy, bn_blobs(c))
    assert_close(dx, numeric(bn_reference, x.astype(np.float64), dy.astype(np.float64)), 2e-5)


def test_batchnorm_global_mode_gradient():
    x, dy = rand(*SMALL, seed=23), rand(*SMALL, seed=24)
    blobs = [b.astype(np.float64) for b in bn_blobs(4)]
    text = "type: 'BatchNorm' batch_norm_param { eps: 0.01 }"
    dx, = forward_backward(make(text), [x], dy, blobs)
    assert_close(dx, numeric(lambda v: forward(make(text), [v], blobs), x, dy))
    f = 1 / 2.5
    assert_close(dx, dy / np.sqrt(f * blobs[1].reshape(1, -1, 1, 1) + 0.01))


def test_batchnorm_train_forward_updates_the_running_statistics():
    """Order blob2, blob0, blob1; blob1 gets m/(m-1) times the biased variance; twice."""
    x1, x2 = rand(*SMALL, seed=25, dtype=np.float32), rand(*SMALL, seed=26, dtype=np.float32)
    blobs = bn_blobs(4)
    expect = [b.astype(np.float64) for b in blobs]
    layer = make("type: 'BatchNorm' batch_norm_param { moving_average_fraction: 0.9 }", phase=TRAIN)
    m = 2 * 3 * 5
    for x in (x1, x2):
        forward(layer, [x], blobs)
        xd = x.astype(np.float64)
        mean = xd.mean(axis=(0, 2, 3))
        var = ((xd - mean.reshape(1, -1, 1, 1)) ** 2).mean(axis=(0, 2, 3))
        expect = [0.9 * expect[0] + mean, 0.9 * expect[1] + m / (m - 1) * var, 0.9 * expect[2] + 1]
        for ours, ref in zip(blobs, expect):
            assert_close(ours, ref, 1e-6)
    # global stats (TEST's default) never touch the blobs
    before = [b.copy() for b in blobs]
    forward(make("type: 'BatchNorm'"), [x1], blobs)
    for ours, ref in zip(blobs, before):
        np.testing.assert_array_equal(ours, ref)


def test_batchnorm_running_variance_factor_is_one_for_a_single_value():
    x = rand(1, 3, seed=27, dtype=np.float32)
    blobs = [np.ones(3, np.float32), np.full(3, 2.0, np.float32), np.array([1.0], np.float32)]
    forward(make("type: 'BatchNorm' batch_norm_param { use_global_stats: false }"), [x], blobs)
    assert_close(blobs[0], 0.999 + x[0].astype(np.float64))
    assert_close(blobs[1], np.full(3, 2 * 0.999))
    assert_close(blobs[2], [1.999])


def test_batchnorm_never_writes_param_diffs_and_ignores_propagate_down():
    x, dy = rand(*SMALL, seed=28, dtype=np.float32), rand(*SMALL, seed=29, dtype=np.float32)
    for text, phase in (("type: 'BatchNorm'", TRAIN), ("type: 'BatchNorm'", TEST)):
        diffs = [np.full(4, 7.0, np.float32), np.full(4, 7.0, np.float32), np.full(1, 7.0, np.float32)]
        ref, = forward_backward(make(text, phase=phase), [x], dy, bn_blobs(4))
        dx, = forward_backward(make(text, phase=phase), [x], dy, bn_blobs(4), propagate=[False],
                               param_diffs=diffs)
        np.testing.assert_array_equal(dx, ref)
        for d in diffs:
            np.testing.assert_array_equal(d, 7.0)


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_batchnorm_in_place_is_exact_even_after_a_later_layer_overwrote_y(phase):
    x, dy = rand(*SMALL, seed=30, dtype=np.float32), rand(*SMALL, seed=31, dtype=np.float32)
    ref, = forward_backward(make("type: 'BatchNorm'", phase=phase), [x], dy, bn_blobs(4))
    layer = make("type: 'BatchNorm'", phase=phase, inplace=True)
    layer.needs_backward = True
    y = forward(layer, [x], bn_blobs(4))
    np.maximum(y, 0, out=y)  # an in-place ReLU after it
    dx, = layer.backward(np, [dy], [y], [y], bn_blobs(4), [True], [None] * 3)
    assert_close(dx, ref, 1e-6)


# -- Scale and Bias --------------------------------------------------------------------------------

SCALE_CASES = [  # (scale_param text, operand shape) for a SMALL bottom
    ("", (4,)),
    ("axis: 1 num_axes: 2", (4, 3)),
    ("axis: -1", (5,)),
    ("num_axes: 0", ()),
    ("axis: 0 num_axes: -1", SMALL),
    ("axis: 2 num_axes: -1", (3, 5)),
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("text,shape", SCALE_CASES)
def test_scale_gradients_learned(text, shape, bias):
    full = f"type: 'Scale' scale_param {{ {text} bias_term: {'true' if bias else 'false'} }}"
    x, dy = rand(*SMALL, seed=32), rand(*SMALL, seed=33)
    blobs = [rand(*shape, seed=34)] + ([rand(*shape, seed=35)] if bias else [])
    diffs = [np.zeros(shape) for _ in blobs]
    dx, = forward_backward(make(full), [x], dy, blobs, param_diffs=diffs)
    assert_close(dx, numeric(lambda v: forward(make(full), [v], blobs), x, dy))
    for j, diff in enumerate(diffs):
        def f(p, j=j):
            b = list(blobs)
            b[j] = p
            return forward(make(full), [x], b)
        assert_close(diff, numeric(f, blobs[j], dy))


@pytest.mark.parametrize("text,shape", [("axis: 1", (4, 3)), ("axis: 0", SMALL), ("axis: 3", (5,)), ("", ())])
def test_scale_gradients_second_bottom(text, shape):
    full = f"type: 'Scale' scale_param {{ {text} bias_term: true }}"
    x, s, dy = rand(*SMALL, seed=36), rand(*shape, seed=37), rand(*SMALL, seed=38)
    b = rand(*shape, seed=39)
    diff = np.zeros(shape)
    dx, ds = forward_backward(make(full, bottoms=("x", "s")), [x, s], dy, [b], param_diffs=[diff])
    assert_close(dx, numeric(lambda v: forward(make(full, bottoms=("x", "s")), [v, s], [b]), x, dy))
    assert_close(ds, numeric(lambda v: forward(make(full, bottoms=("x", "s")), [x, v], [b]), s, dy))
    assert_close(diff, numeric(lambda v: forward(make(full, bottoms=("x", "s")), [x, s], [v]), b, dy))


@pytest.mark.parametrize("xshape,text,accumulates", [
    ((2, 4, 3, 5), "", True),                    # outer 2: +=
    ((1, 4, 3, 5), "", False),                   # batch size 1: outer 1, D > 1, inner > 1: =
    ((1, 4, 3, 5), "num_axes: 0", True),         # scalar: D = 1: +=
    ((1, 4, 3, 1), "axis: 1 num_axes: 2", False),  # outer 1, inner 1: count(x) = D: =
    ((2, 4, 3, 1), "axis: 1 num_axes: 2", True),   # inner 1, outer 2: +=
    ((2, 3), "axis: 0 num_axes: -1", False),     # elementwise, count(x) = D: =
    ((3, 4), "axis: 1", True),                   # inner 1, outer 3: +=
    ((1, 4), "axis: 1", False),                  # outer 1, inner 1: elementwise: =
])
def test_scale_learned_diff_overwrite_cases_over_two_passes(xshape, text, accumulates):
    """training.md 10.6: a learned scale's diff is added, except overwritten when count(x) = D or
    (outer = 1, D > 1, inner > 1); the bias diff always accumulates."""
    full = f"type: 'Scale' scale_param {{ {text} bias_term: true }}"
    layer = make(full)
    shape = tuple(layer.reshape([xshape]) and layer.param_shapes([xshape])[0])
    x, dy = rand(*xshape, seed=40, dtype=np.float32), rand(*xshape, seed=41, dtype=np.float32)
    blobs = [rand(*shape, seed=42, dtype=np.float32), rand(*shape, seed=43, dtype=np.float32)]
    once = [np.zeros(shape, np.float32), np.zeros(shape, np.float32)]
    forward_backward(make(full), [x], dy, blobs, param_diffs=once)
    start = np.full(shape, 3.0, np.float32)
    twice = [start.copy(), start.copy()]
    forward_backward(make(full), [x], dy, blobs, param_diffs=twice)
    forward_backward(make(full), [x], dy, blobs, param_diffs=twice)
    assert_close(twice[1], 3.0 + 2 * once[1].astype(np.float64), 1e-6)
    assert_close(twice[0], 3.0 + 2 * once[0].astype(np.float64) if accumulates else once[0], 1e-6)


def test_scale_in_place_uses_the_kept_bottom():
    full = "type: 'Scale' scale_param { bias_term: true }"
    x, dy = rand(*SMALL, seed=44, dtype=np.float32), rand(*SMALL, seed=45, dtype=np.float32)
    blobs = [rand(4, seed=46, dtype=np.float32), rand(4, seed=47, dtype=np.float32)]
    ref_diffs = [np.zeros(4, np.float32), np.zeros(4, np.float32)]
    ref, = forward_backward(make(full), [x], dy, blobs, param_diffs=ref_diffs)
    diffs = [np.zeros(4, np.float32), np.zeros(4, np.float32)]
    dx, = forward_backward(make(full, inplace=True), [x], dy, blobs, param_diffs=diffs, inplace=True)
    assert_close(dx, ref, 0)
    for ours, want in zip(diffs, ref_diffs):
        assert_close(ours, want, 1e-6)


def test_scale_leaves_its_product_in_bottom_diff_when_not_propagating():
    """Caffe computes dy * x in bottom 0's diff to reduce it into the scale diff; with
    propagate_down false nothing overwrites it (not in place, not elementwise)."""
    x, dy = rand(*SMALL, seed=48, dtype=np.float32), rand(*SMALL, seed=49, dtype=np.float32)
    blobs = [rand(4, seed=50, dtype=np.float32)]
    out = forward_backward(make("type: 'Scale'"), [x], dy, blobs, propagate=[False],
                           param_diffs=[np.zeros(4, np.float32)])
    np.testing.assert_array_equal(out[0], dy * x)
    # nothing to compute: nothing written
    assert forward_backward(make("type: 'Scale'"), [x], dy, blobs, propagate=[False]) == [None]
    # in place the product goes to a scratch blob instead
    out = forward_backward(make("type: 'Scale'", inplace=True), [x], dy, blobs, propagate=[False],
                           param_diffs=[np.zeros(4, np.float32)], inplace=True)
    assert out == [None]


def test_bias_learned_accumulates_and_second_bottom_is_written():
    x, dy = rand(*SMALL, seed=51), rand(*SMALL, seed=52)
    b = rand(4, 3, seed=53)
    diff = np.full((4, 3), 2.0)
    text = "type: 'Bias' bias_param { axis: 1 num_axes: 2 }"
    dx, = forward_backward(make(text), [x], dy, [b], param_diffs=[diff])
    np.testing.assert_array_equal(dx, dy)
    assert dx is not dy
    assert_close(diff - 2.0, numeric(lambda v: forward(make(text), [x], [v]), b, dy))
    dx, db = forward_backward(make("type: 'Bias'", bottoms=("x", "b")), [x, b[:, 0]], dy)
    assert_close(db, dy.sum(axis=(0, 2, 3)))
    # in place the bottom diff is the top diff itself (Caffe does nothing)
    dx, = forward_backward(make(text, inplace=True), [x], dy, [b], param_diffs=[None], inplace=True)
    assert dx is dy


# -- the strict (CuPy-rules) array module ---------------------------------------------------------

STRICT_CASES = [
    ("LRN across", "type: 'LRN' lrn_param { local_size: 5 alpha: 0.1 beta: 0.75 k: 2 }", TEST, ["x"], 0),
    ("LRN across beta 0.6", "type: 'LRN' lrn_param { local_size: 3 beta: 0.6 }", TEST, ["x"], 0),
    ("LRN within", "type: 'LRN' lrn_param { local_size: 3 alpha: 0.2 beta: 0.6 norm_region: WITHIN_CHANNEL }",
     TEST, ["x"], 0),
    ("MVN", "type: 'MVN'", TEST, ["x"], 0),
    ("MVN mean only", "type: 'MVN' mvn_param { normalize_variance: false across_channels: true }", TEST, ["x"], 0),
    ("BatchNorm batch", "type: 'BatchNorm'", TRAIN, ["x"], 3),
    ("BatchNorm global", "type: 'BatchNorm'", TEST, ["x"], 3),
    ("Scale learned bias", "type: 'Scale' scale_param { bias_term: true }", TEST, ["x"], 2),
    ("Scale batch 1", "type: 'Scale' scale_param { axis: 1 num_axes: 2 }", TEST, ["x"], 1),
    ("Scale two bottoms", "type: 'Scale' scale_param { axis: 1 bias_term: true }", TEST, ["x", "s"], 1),
    ("Bias", "type: 'Bias'", TEST, ["x"], 1),
    ("Bias two bottoms", "type: 'Bias' bias_param { axis: 1 }", TEST, ["x", "s"], 0),
]


def strict_inputs(name, blobs_count, bottoms):
    xs = [rand(*SMALL, seed=60, low=0.1, high=2.0, dtype=np.float32)]
    if len(bottoms) == 2:
        xs.append(rand(4, 3, seed=61, dtype=np.float32) if "Scale" in name else rand(4, seed=61, dtype=np.float32))
    shape = (4, 3) if "batch 1" in name else (4,)
    if "two bottoms" in name:
        shape = (4, 3)
    blobs = bn_blobs(4) if "BatchNorm" in name else [rand(*shape, seed=62 + j, dtype=np.float32)
                                                      for j in range(blobs_count)]
    return xs, blobs


def run_backend(xp, name, text, phase, bottoms, blobs_count, inplace):
    xs, blobs = strict_inputs(name, blobs_count, bottoms)
    dy = rand(*SMALL, seed=63, dtype=np.float32)
    layer = make(text, phase=phase, inplace=inplace, bottoms=bottoms)
    blobs = [xp.asarray(b) for b in blobs]
    diffs = [xp.asarray(np.ones(b.shape, np.float32)) for b in blobs]
    out = forward_backward(layer, [xp.asarray(a) for a in xs], xp.asarray(dy), blobs,
                           param_diffs=diffs, inplace=inplace, xp=xp)
    return [backend.to_numpy(a) for a in out if a is not None] + [backend.to_numpy(a) for a in blobs + diffs]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", STRICT_CASES, ids=[c[0] for c in STRICT_CASES])
def test_backward_on_the_strict_array_module(case, inplace):
    name, text, phase, bottoms, blobs_count = case
    ref = run_backend(np, name, text, phase, bottoms, blobs_count, inplace)
    got = run_backend(strict.XP, name, text, phase, bottoms, blobs_count, inplace)
    assert len(got) == len(ref)
    for ours, want in zip(got, ref):
        np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6)


@needs_cxx
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("within", [False, True])
def test_lrn_backward_after_the_kernel_forward(within, inplace):
    """The GPU code path: the forward is our CUDA kernel (compiled for the CPU), the backward xp code
    on the strict module; the same diff as numpy's."""
    xp = backend.get("strict")
    assert backend.kernels_for(xp) is not None
    region = "norm_region: WITHIN_CHANNEL" if within else ""
    text = f"type: 'LRN' lrn_param {{ local_size: 3 alpha: 0.3 beta: 0.75 k: 1.5 {region} }}"
    x = rand(*SMALL, seed=64, dtype=np.float32)
    dy = rand(*SMALL, seed=65, dtype=np.float32)
    ref, = forward_backward(make(text, inplace=inplace), [x], dy, inplace=inplace)
    got, = forward_backward(make(text, inplace=inplace), [xp.asarray(x)], xp.asarray(dy), inplace=inplace, xp=xp)
    np.testing.assert_allclose(backend.to_numpy(got), ref, rtol=1e-5, atol=1e-6)
