"""Backward of the neuron (pointwise) layers, against references that do not share their code.

1. Gradients: each layer and variant run on float64 arrays (the neuron forwards keep the dtype)
   against central finite differences of its own forward, for the bottom and for PReLU's slopes.
2. Caffe's quirks, checked against hand-derived values (../shared/caffe/training.md 9.3, 10.4):
   ReLU at x = 0 gives negative_slope; AbsVal's sign(0) = 0; Power's cases (power * scale = 0
   ignores dy, power 1, shift 0 gives NaN at x = 0); Dropout's TRAIN mask and TEST identity;
   Threshold refuses; propagate_down false computes nothing (PReLU's slope diff still
   accumulates); the in-place results: exact layers equal their out-of-place result, BNLL reads
   y as x, Clip passes every gradient, Power and Log square their local derivative
   (in-place Power(2) gives (2y)^2).
3. The strict backend's array module (CuPy's rules, kernels/strict.py) runs every backward and
   gives numpy's numbers.
"""
import math

import numpy as np
import pytest
from google.protobuf import text_format

from caffeish.errors import ShapeError, UnsupportedError
from caffeish.formats.schema import TEST, TRAIN, pb
from caffeish.graph.registry import create
from caffeish.kernels import strict
from caffeish.runtime import backend
from layer_checks import assert_close, numeric

SHAPE = (2, 3, 4, 5)


def make(text, phase=TEST, inplace=False):
    """A layer from the inside of a `layer { ... }` block, bottom x, top y (or x in place)."""
    param = text_format.Parse(text, pb.LayerParameter())
    param.name = param.name or "L"
    param.bottom.append("x")
    param.top.append("x" if inplace else "y")
    return create(param, phase)


def rand(*shape, seed=0, low=-2.0, high=2.0, dtype=np.float64):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(dtype)


def away_from(x, points, gap=0.05):
    """x with values within `gap` of any of `points` pushed away (kinks spoil finite differences)."""
    x = x.copy()
    for p in points:
        near = np.abs(x - p) < gap
        x[near] = p + np.where(x[near] >= p, gap, -gap) * 2
    return x


def forward(layer, x, blobs=(), xp=np):
    layer.reshape([tuple(x.shape)])
    return layer.forward(xp, [x], list(blobs))[0]


def backward(layer, x, y, dy, blobs=(), propagate=(True,), param_diffs=None, xp=np):
    if param_diffs is None:
        param_diffs = [None] * len(blobs)
    return layer.backward(xp, [dy], [y], [x], list(blobs), list(propagate), param_diffs)


def run(layer, x, dy, blobs=(), **kw):
    """forward (with needs_backward) then backward out of place: the bottom diff."""
    layer.needs_backward = True
    y = forward(layer, x, blobs)
    return backward(layer, x, y, dy, blobs, **kw)[0]


def run_in_place(layer, x, dy, blobs=()):
    """forward then backward as an in-place layer: bottoms[0] is tops[0] (the output)."""
    layer.needs_backward = True
    y = forward(layer, x, blobs)
    return backward(layer, y, y, dy, blobs)[0]


# -- 1. finite differences ------------------------------------------------------------------------

GRADIENT_CASES = [
    ("ReLU", "type: 'ReLU'", [0.0]),
    ("leaky ReLU", "type: 'ReLU' relu_param { negative_slope: 0.1 }", [0.0]),
    ("ELU", "type: 'ELU' elu_param { alpha: 0.7 }", [0.0]),
    ("Sigmoid", "type: 'Sigmoid'", []),
    ("TanH", "type: 'TanH'", []),
    ("AbsVal", "type: 'AbsVal'", [0.0]),
    ("BNLL", "type: 'BNLL'", []),
    ("Clip", "type: 'Clip' clip_param { min: -0.5 max: 0.7 }", [-0.5, 0.7]),
    ("Swish", "type: 'Swish' swish_param { beta: 1.3 }", []),
    ("Power 2", "type: 'Power' power_param { power: 2 scale: 0.5 shift: 0.1 }", []),
    ("Power 3", "type: 'Power' power_param { power: 3 scale: -1.5 }", []),
    ("Power 1", "type: 'Power' power_param { power: 1 scale: 2.5 shift: 1 }", []),
    ("Exp base 2", "type: 'Exp' exp_param { base: 2 scale: 0.5 shift: 0.1 }", []),
    ("Exp e", "type: 'Exp' exp_param { scale: -1.2 }", []),
    ("Dropout TEST", "type: 'Dropout' dropout_param { dropout_ratio: 0.3 }", []),
]


@pytest.mark.parametrize("name,text,kinks", GRADIENT_CASES, ids=[c[0] for c in GRADIENT_CASES])
def test_bottom_gradient_matches_finite_differences(name, text, kinks):
    layer = make(text)
    x = away_from(rand(*SHAPE, seed=1), kinks)
    dy = rand(*SHAPE, seed=2)
    dx = run(layer, x, dy)
    assert dx.shape == x.shape and dx.dtype == np.float64
    assert_close(dx, numeric(lambda v: forward(make(text), v), x, dy))


@pytest.mark.parametrize("text,low", [
    ("type: 'Power' power_param { power: 0.5 scale: 1.5 }", 0.2),
    ("type: 'Power' power_param { power: -1.7 scale: 2 shift: 0.5 }", 0.2),
    ("type: 'Log' log_param { base: 10 scale: 2 shift: 0.5 }", 0.2),
    ("type: 'Log'", 0.2),
])
def test_positive_domain_gradients(text, low):
    x = rand(*SHAPE, seed=3, low=low, high=3.0)
    dy = rand(*SHAPE, seed=4)
    assert_close(run(make(text), x, dy), numeric(lambda v: forward(make(text), v), x, dy))


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_bottom_and_slope_gradients(shared):
    text = f"type: 'PReLU' prelu_param {{ channel_shared: {'true' if shared else 'false'} }}"
    x = away_from(rand(*SHAPE, seed=5), [0.0])
    dy = rand(*SHAPE, seed=6)
    slopes = np.array(0.3) if shared else np.array([0.25, -0.4, 1.5])
    start = np.full(slopes.shape, 0.5)  # the slope diff accumulates onto what is there
    acc = start.copy()
    layer = make(text)
    layer.needs_backward = True
    y = forward(layer, x, [slopes])
    dx, = backward(layer, x, y, dy, [slopes], param_diffs=[acc])
    assert_close(dx, numeric(lambda v: forward(make(text), v, [slopes]), x, dy))
    slope_grad = _slope_numeric(text, x, slopes, dy)
    assert_close(acc - start, slope_grad)
    # propagate_down false: no bottom diff, but the slope diff still accumulates
    again = acc.copy()
    out = backward(layer, x, y, dy, [slopes], propagate=(False,), param_diffs=[again])
    assert out == [None]
    assert_close(again - acc, slope_grad)


def _slope_numeric(text, x, slopes, dy, h=1e-6):
    g = np.zeros(slopes.shape)
    for idx in np.ndindex(*slopes.shape):
        plus, minus = slopes.copy(), slopes.copy()
        plus[idx] += h
        minus[idx] -= h
        g[idx] = (np.sum(forward(make(text), x, [plus]) * dy) - np.sum(forward(make(text), x, [minus]) * dy)) / (2 * h)
    return g


# -- 2. Caffe's rules and quirks -------------------------------------------------------------------


def test_relu_at_zero_uses_negative_slope():
    x = np.array([-1.0, 0.0, 2.0], np.float32)
    dy = np.array([3.0, 5.0, 7.0], np.float32)
    np.testing.assert_array_equal(run(make("type: 'ReLU' relu_param { negative_slope: 0.25 }"), x, dy),
                                  [0.75, 1.25, 7.0])
    np.testing.assert_array_equal(run(make("type: 'ReLU'"), x, dy), [0.0, 0.0, 7.0])


def test_absval_sign_of_zero_is_zero():
    x = np.array([-2.0, 0.0, 3.0, -0.0], np.float32)
    dy = np.array([1.5, 4.0, 2.0, 8.0], np.float32)
    np.testing.assert_array_equal(run(make("type: 'AbsVal'"), x, dy), [-1.5, 0.0, 2.0, 0.0])


def test_bnll_clamps_the_exponent_at_50():
    x = np.array([60.0, 100.0, -1.0], np.float32)
    dy = np.ones(3, np.float32)
    e = math.exp(-1.0)
    assert_close(run(make("type: 'BNLL'"), x, dy), [math.exp(50) / (math.exp(50) + 1), 1.0, e / (e + 1)])


def test_clip_passes_the_gradient_at_both_bounds():
    x = np.array([-0.5, 0.7, -0.6, 0.8, 0.0], np.float32)
    dy = np.full(5, 2.0, np.float32)
    dx = run(make("type: 'Clip' clip_param { min: -0.5 max: 0.7 }"), x, dy)
    np.testing.assert_array_equal(dx, [2.0, 2.0, 0.0, 0.0, 2.0])


def test_power_with_zero_diff_scale_ignores_dy():
    x = rand(*SHAPE, seed=7, dtype=np.float32)
    dy = rand(*SHAPE, seed=8, dtype=np.float32)
    dy[0, 0, 0, 0] = np.nan
    for text in ("power_param { power: 0 scale: 2 shift: 1 }", "power_param { power: 3 scale: 0 shift: 2 }"):
        dx = run(make(f"type: 'Power' {text}"), x, dy)
        np.testing.assert_array_equal(dx, np.zeros(SHAPE, np.float32))


def test_power_one_and_shift_zero_cases():
    x = np.array([-1.0, 0.0, 2.0], np.float32)
    dy = np.array([3.0, 5.0, 7.0], np.float32)
    np.testing.assert_array_equal(run(make("type: 'Power' power_param { scale: -2 shift: 3 }"), x, dy),
                                  [-6.0, -10.0, -14.0])
    # shift 0, power 3: dy * power * y / x, so 0 / 0 = NaN at x = 0 (Caffe's own result)
    with np.errstate(invalid="ignore"):
        dx = run(make("type: 'Power' power_param { power: 3 scale: 2 }"), x, dy)
    assert np.isnan(dx[1])
    assert_close(dx[[0, 2]], [3.0 * 3 * 2 ** 3 * 1.0, 7.0 * 3 * 2 ** 3 * 4.0])
    # power 2 is its own case and has no NaN at 0: dy * 2 * scale * (shift + scale x)
    dx = run(make("type: 'Power' power_param { power: 2 scale: 2 }"), x, dy)
    np.testing.assert_array_equal(dx, [3.0 * 4 * -2, 0.0, 7.0 * 4 * 4])


def test_identity_power_out_of_place_passes_dy():
    """Power with the defaults returns its bottom array itself, so top and bottom data are one
    object although the layer is not in place: still dx = dy (and in place 1 * 1)."""
    x = rand(*SHAPE, seed=34, dtype=np.float32)
    dy = rand(*SHAPE, seed=35, dtype=np.float32)
    layer = make("type: 'Power'")
    assert forward(layer, x) is x
    np.testing.assert_array_equal(run(layer, x, dy), dy)
    np.testing.assert_array_equal(run_in_place(make("type: 'Power'", inplace=True), x, dy), np.ones(SHAPE))


def test_dropout_train_uses_the_forward_mask_and_scale():
    layer = make("type: 'Dropout' dropout_param { dropout_ratio: 0.3 }", phase=TRAIN)
    layer.rng = np.random.default_rng(3)
    layer.needs_backward = True
    x = rand(4, 50, seed=9, dtype=np.float32)
    y = forward(layer, x)
    dy = rand(4, 50, seed=10, dtype=np.float32)
    dx, = backward(layer, x, y, dy)
    kept = y != 0
    assert 0 < kept.sum() < kept.size
    scale = np.float32(1 / (1 - 0.3))
    np.testing.assert_array_equal(dx, np.where(kept, dy * np.float32(1) * scale, 0).astype(np.float32))
    # in place: the same numbers (the mask is the layer's)
    layer = make("type: 'Dropout' dropout_param { dropout_ratio: 0.3 }", phase=TRAIN, inplace=True)
    layer.rng = np.random.default_rng(3)
    np.testing.assert_array_equal(run_in_place(layer, x, dy), dx)


def test_dropout_test_phase_is_identity_and_the_layer_phase_wins():
    x = rand(3, 4, seed=11, dtype=np.float32)
    dy = rand(3, 4, seed=12, dtype=np.float32)
    for text, phase in (("", TEST), ("phase: TEST", TRAIN)):
        dx = run(make(f"type: 'Dropout' {text}", phase=phase), x, dy)
        np.testing.assert_array_equal(dx, dy)
        assert dx is not dy


def test_dropout_train_backward_without_a_mask_is_refused():
    layer = make("type: 'Dropout'", phase=TRAIN)
    x = rand(3, 4, seed=13, dtype=np.float32)
    y = forward(layer, x)  # needs_backward not set: no mask kept
    with pytest.raises(ShapeError, match="mask"):
        backward(layer, x, y, x)


def test_threshold_does_not_backpropagate():
    layer = make("type: 'Threshold'")
    x = rand(3, 4, seed=14, dtype=np.float32)
    y = forward(layer, x)
    with pytest.raises(UnsupportedError, match="does not backpropagate"):
        backward(layer, x, y, x)


ALL_TYPES = [
    "type: 'ReLU'", "type: 'ELU'", "type: 'Sigmoid'", "type: 'TanH'", "type: 'AbsVal'", "type: 'BNLL'",
    "type: 'Clip' clip_param { min: -1 max: 1 }", "type: 'Swish'", "type: 'Power' power_param { power: 2 }",
    "type: 'Exp'", "type: 'Log'", "type: 'Dropout'", "type: 'PReLU'",
]


@pytest.mark.parametrize("text", ALL_TYPES)
def test_propagate_down_false_computes_no_bottom_diff(text):
    layer = make(text)
    x = rand(*SHAPE, seed=15, low=0.1, dtype=np.float32)
    blobs = [np.full(3, 0.25, np.float32)] if "PReLU" in text else []
    layer.needs_backward = True
    y = forward(layer, x, blobs)
    assert backward(layer, x, y, x, blobs, propagate=(False,)) == [None]


# In place (training.md 9.3).  Exact layers: the same result as out of place.
EXACT_IN_PLACE = [
    "type: 'ReLU' relu_param { negative_slope: 0.2 }", "type: 'ELU' elu_param { alpha: 0.5 }",
    "type: 'Sigmoid'", "type: 'TanH'", "type: 'Exp' exp_param { base: 3 scale: 0.5 }",
    "type: 'Swish' swish_param { beta: 0.8 }", "type: 'Dropout'",
]


@pytest.mark.parametrize("text", EXACT_IN_PLACE)
def test_exact_layers_in_place(text):
    x = rand(*SHAPE, seed=16, dtype=np.float32)
    dy = rand(*SHAPE, seed=17, dtype=np.float32)
    assert_close(run_in_place(make(text, inplace=True), x, dy), run(make(text), x, dy), 1e-6)


def test_prelu_in_place_uses_the_kept_bottom():
    x = away_from(rand(*SHAPE, seed=18, dtype=np.float32), [0.0])
    dy = rand(*SHAPE, seed=19, dtype=np.float32)
    slopes = np.array([0.25, -0.4, 1.5], np.float32)
    ref_acc, acc = np.zeros(3, np.float32), np.zeros(3, np.float32)
    ref = run(make("type: 'PReLU'"), x, dy, [slopes], param_diffs=[ref_acc])
    layer = make("type: 'PReLU'", inplace=True)
    layer.needs_backward = True
    y = forward(layer, x, [slopes])
    dx, = backward(layer, y, y, dy, [slopes], param_diffs=[acc])
    assert_close(dx, ref)
    assert_close(acc, ref_acc)


def test_bnll_in_place_reads_y_as_x():
    x = rand(*SHAPE, seed=20, dtype=np.float32)
    dy = rand(*SHAPE, seed=21, dtype=np.float32)
    y = forward(make("type: 'BNLL'"), x).astype(np.float64)
    e = np.exp(np.minimum(y, 50))
    assert_close(run_in_place(make("type: 'BNLL'", inplace=True), x, dy), dy * e / (e + 1))


def test_clip_in_place_passes_every_gradient():
    x = rand(*SHAPE, seed=22, dtype=np.float32)
    dy = rand(*SHAPE, seed=23, dtype=np.float32)
    text = "type: 'Clip' clip_param { min: -0.5 max: 0.7 }"
    assert (run(make(text), x, dy) == 0).any()
    np.testing.assert_array_equal(run_in_place(make(text, inplace=True), x, dy), dy)


def test_power_two_in_place_gives_two_y_squared():
    """Caffe's checked case: in-place Power(2) gives (2y)^2 whatever dy (training.md 9.3)."""
    x = rand(*SHAPE, seed=24, dtype=np.float32)
    dy = rand(*SHAPE, seed=25, dtype=np.float32)
    y = (x.astype(np.float64)) ** 2
    assert_close(run_in_place(make("type: 'Power' power_param { power: 2 }", inplace=True), x, dy), (2 * y) ** 2)


@pytest.mark.parametrize("power,scale,shift", [(2, 0.5, 0.1), (3, 1.5, 0.0), (0.5, 1.5, 2.0), (1, -2.0, 1.0)])
def test_power_in_place_squares_the_local_derivative(power, scale, shift):
    """In place, bottom data is y and Caffe's first writes replace dy by the local derivative g
    (computed from y), so the final dy * g is g * g."""
    x = rand(*SHAPE, seed=26, low=0.1, high=2.0, dtype=np.float32)
    dy = rand(*SHAPE, seed=27, dtype=np.float32)
    text = f"type: 'Power' power_param {{ power: {power} scale: {scale} shift: {shift} }}"
    y = (shift + scale * x.astype(np.float64)) ** power
    d = power * scale
    if power == 1:
        g = np.full(SHAPE, d)
    elif power == 2:
        g = d * scale * y + d * shift
    elif shift == 0:
        g = power * y / y
    else:
        g = d * y / (scale * y + shift)
    assert_close(run_in_place(make(text, inplace=True), x, dy), g * g, 1e-5)


def test_log_in_place_squares_the_local_derivative():
    x = rand(*SHAPE, seed=28, low=0.5, high=3.0, dtype=np.float32)
    dy = rand(*SHAPE, seed=29, dtype=np.float32)
    text = "type: 'Log' log_param { base: 10 scale: 2 shift: 0.5 }"
    y = np.log10(2 * x.astype(np.float64) + 0.5)
    g = (2 / math.log(10)) / (2 * y + 0.5)
    assert_close(run_in_place(make(text, inplace=True), x, dy), g * g, 1e-5)


# -- 3. the strict (CuPy-rules) array module -------------------------------------------------------

STRICT_CASES = GRADIENT_CASES + [
    ("Log", "type: 'Log' log_param { base: 2 scale: 0.5 shift: 3 }", []),
    ("Power shift 0", "type: 'Power' power_param { power: 1.5 scale: 2 }", []),
    ("Power zero", "type: 'Power' power_param { power: 0 }", []),
]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name,text,kinks", STRICT_CASES, ids=[c[0] for c in STRICT_CASES])
def test_backward_on_the_strict_array_module(name, text, kinks, inplace):
    if inplace and "AbsVal" in text:
        pytest.skip("AbsVal refuses to run in place")
    xp = strict.XP
    x = rand(*SHAPE, seed=30, low=0.1 if "Log" in text or "shift 0" in name else -2.0, dtype=np.float32)
    dy = rand(*SHAPE, seed=31, dtype=np.float32)
    results = []
    for module in (np, xp):
        layer = make(text, inplace=inplace)
        layer.needs_backward = True
        xa, dya = module.asarray(x), module.asarray(dy)
        y = forward(layer, xa, xp=module)
        bottom = y if inplace else xa
        dx, = backward(layer, bottom, y, dya, xp=module)
        results.append(backend.to_numpy(dx))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("text", ["type: 'PReLU'", "type: 'PReLU' prelu_param { channel_shared: true }",
                                  "type: 'Dropout' dropout_param { dropout_ratio: 0.4 }"])
def test_stateful_backward_on_the_strict_array_module(text, inplace):
    xp = strict.XP
    x = rand(*SHAPE, seed=32, dtype=np.float32)
    dy = rand(*SHAPE, seed=33, dtype=np.float32)
    shared = "channel_shared" in text
    slopes = np.float32([0.3]).reshape(()) if shared else np.float32([0.2, -0.5, 1.1])
    results = []
    for module in (np, xp):
        layer = make(text, phase=TRAIN, inplace=inplace)
        layer.rng = np.random.default_rng(5)
        layer.needs_backward = True
        blobs = [module.asarray(slopes)] if "PReLU" in text else []
        diffs = [module.asarray(np.ones(slopes.shape, np.float32))] if blobs else []
        y = forward(layer, module.asarray(x), blobs, xp=module)
        bottom = y if inplace else module.asarray(x)
        dx, = layer.backward(module, [module.asarray(dy)], [y], [bottom], blobs, [True], diffs)
        results.append([backend.to_numpy(a) for a in [dx] + diffs])
    for ours, ref in zip(results[1], results[0]):
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
