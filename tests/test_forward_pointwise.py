"""Forward of the pointwise (neuron), normalisation and InnerProduct/Embed layers.

Three kinds of checks:
1. independent references: per-element Python `math` in float64, or slow,
   obviously-correct loops, on small random inputs, for every type and variant;
2. golden: each of these layers in the golden cases, run on Caffe's recorded
   bottoms and parameters, against Caffe's recorded tops (meta.json tolerance);
3. the LRN and InnerProduct entries of Caffe's unit-test vectors.
"""
import json
import math

import numpy as np
import pytest
from google.protobuf import text_format

from caffeish.errors import CaffeishError, ShapeError
from caffeish.graph.graph import Graph
from caffeish.formats.io import read_prototxt
from caffeish.graph.registry import create
from caffeish.formats.schema import TEST, TRAIN, pb
from conftest import shared_path

NEURON_TYPES = {
    "ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL",
    "Threshold", "Clip", "Swish", "Dropout",
}
MY_TYPES = NEURON_TYPES | {"LRN", "MVN", "BatchNorm", "Scale", "Bias", "InnerProduct", "Embed"}

TOL = 1e-5


def make(text, phase=TEST, bottoms=("x",), tops=("y",)):
    """A layer from the inside of a `layer { ... }` block (bottoms/tops added)."""
    param = text_format.Parse(text, pb.LayerParameter())
    if not param.name:
        param.name = "L"
    if not len(param.bottom):
        param.bottom.extend(bottoms)
    if not len(param.top):
        param.top.extend(tops)
    return create(param, phase)


def run(layer, bottoms, blobs=()):
    """reshape + forward, checking the interface: one float32 top per top name, of the
    shape reshape promised, and bottoms and blobs left untouched."""
    bottoms = [np.asarray(b, dtype=np.float32) for b in bottoms]
    blobs = [np.asarray(b, dtype=np.float32) for b in blobs]
    before = [b.copy() for b in bottoms + blobs]
    shapes = layer.reshape([b.shape for b in bottoms])
    tops = layer.forward(np, bottoms, blobs)
    assert len(tops) == len(layer.param.top) == len(shapes)
    for top, shape in zip(tops, shapes):
        assert top.dtype == np.float32
        assert tuple(top.shape) == tuple(shape)
    for old, new in zip(before, bottoms + blobs):
        np.testing.assert_array_equal(old, new)
    return tops


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / (np.abs(ref).max() + 1e-12))


def assert_close(ours, ref, tol=TOL):
    err = rel_err(ours, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def elementwise(fn, x):
    """fn applied to every element in float64 (Python math): an independent reference."""
    x = np.asarray(x, dtype=np.float64)
    return np.array([fn(v) for v in x.ravel()], dtype=np.float64).reshape(x.shape)


def rand(*shape, seed=0, low=-3.0, high=3.0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


# -- 1. pointwise layers against per-element references -------------------------------------------

def sig(v):
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


POINTWISE = [
    ("ReLU", "type: 'ReLU'", lambda v: max(v, 0.0)),
    ("leaky ReLU", "type: 'ReLU' relu_param { negative_slope: 0.1 }",
     lambda v: v if v > 0 else 0.1 * v),
    ("ELU default", "type: 'ELU'", lambda v: v if v > 0 else math.exp(v) - 1),
    ("ELU alpha", "type: 'ELU' elu_param { alpha: 0.7 }", lambda v: v if v > 0 else 0.7 * (math.exp(v) - 1)),
    ("Sigmoid", "type: 'Sigmoid'", sig),
    ("TanH", "type: 'TanH'", math.tanh),
    ("AbsVal", "type: 'AbsVal'", abs),
    ("BNLL", "type: 'BNLL'", lambda v: v + math.log1p(math.exp(-v)) if v > 0 else math.log1p(math.exp(v))),
    ("Threshold default", "type: 'Threshold'", lambda v: 1.0 if v > 0 else 0.0),
    ("Threshold", "type: 'Threshold' threshold_param { threshold: 0.5 }", lambda v: 1.0 if v > 0.5 else 0.0),
    ("Clip", "type: 'Clip' clip_param { min: -0.5 max: 0.75 }", lambda v: min(max(v, -0.5), 0.75)),
    ("Clip min > max", "type: 'Clip' clip_param { min: 1 max: -1 }", lambda v: 1.0),
    ("Swish default", "type: 'Swish'", lambda v: v * sig(v)),
    ("Swish beta", "type: 'Swish' swish_param { beta: 1.3 }", lambda v: v * sig(1.3 * v)),
    ("Power default", "type: 'Power'", lambda v: v),
    ("Power", "type: 'Power' power_param { power: 2 scale: 0.5 shift: 0.1 }", lambda v: (0.1 + 0.5 * v) ** 2),
    ("Power cube", "type: 'Power' power_param { power: 3 scale: -2 }", lambda v: (-2 * v) ** 3),
    ("Power 0", "type: 'Power' power_param { power: 0 scale: 3 shift: 2 }", lambda v: 1.0),
    ("Power scale 0", "type: 'Power' power_param { power: 3 scale: 0 shift: 2 }", lambda v: 8.0),
    ("Exp default", "type: 'Exp'", math.exp),
    ("Exp base 2", "type: 'Exp' exp_param { base: 2 scale: 0.5 shift: 0.1 }", lambda v: 2 ** (0.1 + 0.5 * v)),
    ("Exp e shift", "type: 'Exp' exp_param { shift: 0.3 scale: -1.5 }", lambda v: math.exp(0.3 - 1.5 * v)),
    ("Exp base 0.5", "type: 'Exp' exp_param { base: 0.5 scale: 2 }", lambda v: 0.5 ** (2 * v)),
]

POSITIVE = [
    ("Log default", "type: 'Log'", math.log),
    ("Log base 10", "type: 'Log' log_param { base: 10 scale: 2 shift: 0.5 }", lambda v: math.log10(0.5 + 2 * v)),
    ("Log base 2", "type: 'Log' log_param { base: 2 }", math.log2),
    ("Power sqrt", "type: 'Power' power_param { power: 0.5 scale: 1.5 }", lambda v: math.sqrt(1.5 * v)),
    ("Power negative", "type: 'Power' power_param { power: -0.75 shift: 1 }", lambda v: (1 + v) ** -0.75),
]


@pytest.mark.parametrize("name,text,fn", POINTWISE, ids=[p[0] for p in POINTWISE])
def test_pointwise_reference(name, text, fn):
    x = rand(2, 3, 4, 5)
    x.flat[:4] = [0.0, 0.5, -0.5, 1.0]  # exact threshold/clip boundaries
    (y,) = run(make(text, tops=("t",)), [x])
    assert_close(y, elementwise(fn, x))


@pytest.mark.parametrize("name,text,fn", POSITIVE, ids=[p[0] for p in POSITIVE])
def test_pointwise_positive_inputs(name, text, fn):
    x = rand(2, 3, 4, 5, low=0.05, high=4.0)
    (y,) = run(make(text), [x])
    assert_close(y, elementwise(fn, x))


@pytest.mark.parametrize("type_", ["Sigmoid", "BNLL", "Swish", "TanH", "ELU"])
def test_no_overflow_on_extreme_inputs(type_):
    x = np.array([-200.0, -88.0, -30.0, 0.0, 30.0, 88.0, 200.0], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise"):
        (y,) = run(make(f"type: '{type_}'"), [x])
    assert np.all(np.isfinite(y))
    if type_ == "Sigmoid":
        assert y[0] == 0.0 and y[-1] == 1.0 and y[3] == 0.5
    if type_ == "BNLL":
        assert_close(y, elementwise(lambda v: max(v, 0) + math.log1p(math.exp(-abs(v))), x))


def test_power_constant_keeps_shape():
    (y,) = run(make("type: 'Power' power_param { power: 0.5 scale: 0 shift: 4 }"), [rand(3, 2)])
    np.testing.assert_array_equal(y, np.full((3, 2), 2.0, np.float32))


def test_neuron_works_on_any_rank():
    for shape in [(), (7,), (2, 3), (2, 3, 2, 2, 2)]:
        x = rand(*shape) if shape else np.float32(-1.5).reshape(())
        (y,) = run(make("type: 'ReLU' relu_param { negative_slope: 0.5 }"), [x])
        assert_close(y, elementwise(lambda v: v if v > 0 else 0.5 * v, x))


# -- PReLU -----------------------------------------------------------------------------------------

def prelu_loop(x, slopes, shared):
    y = np.empty(x.shape, np.float64)
    for idx in np.ndindex(*x.shape):
        a = slopes.reshape(-1)[0] if shared else slopes[idx[1]]
        y[idx] = x[idx] if x[idx] > 0 else a * x[idx]
    return y


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 3), (2, 3, 5)])
def test_prelu_per_channel(shape):
    x = rand(*shape, seed=1)
    slopes = rand(shape[1], seed=2, low=-1, high=1)
    lay = make("type: 'PReLU'")
    (y,) = run(lay, [x], [slopes])
    assert lay.param_shapes([shape]) == [(shape[1],)]
    assert_close(y, prelu_loop(x, slopes, False))


def test_prelu_channel_shared():
    x = rand(2, 3, 4, 5, seed=3)
    slope = np.array(0.3, np.float32)
    lay = make("type: 'PReLU' prelu_param { channel_shared: true }")
    assert lay.param_shapes([x.shape]) == [()]
    (y,) = run(lay, [x], [slope])
    assert_close(y, prelu_loop(x, slope, True))


def test_prelu_fillers():
    (f,) = make("type: 'PReLU'").fillers()
    assert f.type == "constant" and f.value == pytest.approx(0.25)
    (f,) = make("type: 'PReLU' prelu_param { filler { type: 'gaussian' std: 0.1 } }").fillers()
    assert f.type == "gaussian" and f.std == pytest.approx(0.1)


# -- Dropout ---------------------------------------------------------------------------------------

def test_dropout_test_phase_is_identity():
    x = rand(2, 3, 4, 5)
    (y,) = run(make("type: 'Dropout' dropout_param { dropout_ratio: 0.3 }"), [x])
    np.testing.assert_array_equal(y, x)
    # A TRAIN net whose Dropout says phase: TEST is also the identity.
    (y,) = run(make("type: 'Dropout' phase: TEST", phase=TRAIN), [x])
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("how", ["net phase", "layer phase"])
def test_dropout_train_mask_and_scale(how):
    text = "type: 'Dropout' dropout_param { dropout_ratio: 0.25 }"
    lay = make(text, phase=TRAIN) if how == "net phase" else make(text + " phase: TRAIN", phase=TEST)
    lay.rng = np.random.default_rng(7)
    x = rand(40, 50, low=0.5, high=2.0)
    (y,) = run(lay, [x])
    kept = y != 0
    # Kept values are scaled by 1 / (1 - ratio); dropped ones are 0.
    assert_close(y[kept], x[kept] / 0.75, 1e-6)
    assert abs(kept.mean() - 0.75) < 0.03
    # Reproducible with the same generator seed, different with another.
    lay.rng = np.random.default_rng(7)
    (y2,) = run(lay, [x])
    np.testing.assert_array_equal(y, y2)
    lay.rng = np.random.default_rng(8)
    (y3,) = run(lay, [x])
    assert not np.array_equal(y, y3)


def test_dropout_ratio_one_at_train_is_refused():
    lay = make("name: 'drop' type: 'Dropout' dropout_param { dropout_ratio: 1 }", phase=TRAIN)
    with pytest.raises(ShapeError, match="'drop'"):
        run(lay, [rand(3)])


# -- 1b. normalisation ------------------------------------------------------------------------------

def lrn_loop(x, n, alpha, beta, k, within):
    N, C, H, W = x.shape
    x = x.astype(np.float64)
    y = np.empty_like(x)
    half = (n - 1) // 2
    for i, c, h, w in np.ndindex(N, C, H, W):
        if within:
            s = sum(x[i, c, hh, ww] ** 2
                    for hh in range(max(0, h - half), min(H, h + half + 1))
                    for ww in range(max(0, w - half), min(W, w + half + 1)))
            scale = 1.0 + alpha / (n * n) * s
        else:
            s = sum(x[i, cc, h, w] ** 2 for cc in range(max(0, c - half), min(C, c + half + 1)))
            scale = k + alpha / n * s
        y[i, c, h, w] = x[i, c, h, w] * scale ** -beta
    return y


LRN_CASES = [
    ("default", "", dict(n=5, alpha=1, beta=0.75, k=1, within=False)),
    ("k 2", "local_size: 5 alpha: 0.1 beta: 0.75 k: 2", dict(n=5, alpha=0.1, beta=0.75, k=2, within=False)),
    ("large region", "local_size: 15", dict(n=15, alpha=1, beta=0.75, k=1, within=False)),
    ("n 1", "local_size: 1 alpha: 2 beta: 0.5", dict(n=1, alpha=2, beta=0.5, k=1, within=False)),
    ("within 3 (k ignored)", "local_size: 3 alpha: 0.2 beta: 0.6 k: 5 norm_region: WITHIN_CHANNEL",
     dict(n=3, alpha=0.2, beta=0.6, k=5, within=True)),
    ("within 5", "local_size: 5 norm_region: WITHIN_CHANNEL", dict(n=5, alpha=1, beta=0.75, k=1, within=True)),
]


@pytest.mark.parametrize("name,text,ref", LRN_CASES, ids=[c[0] for c in LRN_CASES])
def test_lrn_reference(name, text, ref):
    x = rand(2, 7, 3, 4, seed=4)
    (y,) = run(make(f"type: 'LRN' lrn_param {{ {text} }}"), [x])
    assert_close(y, lrn_loop(x, **ref))


def mvn_loop(x, normalize_variance=True, across_channels=False, eps=1e-9):
    x = x.astype(np.float64).reshape(x.shape + (1,) * (4 - x.ndim))
    y = np.empty_like(x)
    groups = [(n,) for n in range(x.shape[0])] if across_channels else list(np.ndindex(*x.shape[:2]))
    for g in groups:
        v = x[g]
        d = v - v.sum() / v.size
        if normalize_variance:
            d = d / (math.sqrt((d * d).sum() / d.size) + eps)
        y[g] = d
    return y


MVN_CASES = [
    ("default", "", {}),
    ("no variance", "normalize_variance: false", dict(normalize_variance=False)),
    ("across channels", "across_channels: true", dict(across_channels=True)),
    ("eps on the std", "eps: 0.5", dict(eps=0.5)),
    ("across, no variance", "across_channels: true normalize_variance: false",
     dict(across_channels=True, normalize_variance=False)),
]


@pytest.mark.parametrize("name,text,ref", MVN_CASES, ids=[c[0] for c in MVN_CASES])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4), (2, 3, 5)])
def test_mvn_reference(name, text, ref, shape):
    x = rand(*shape, seed=5) + 1.0
    (y,) = run(make(f"type: 'MVN' mvn_param {{ {text} }}"), [x])
    assert y.ndim == 4
    assert_close(y, mvn_loop(x, **ref))


def batchnorm_loop(x, mean, var, eps):
    y = np.empty(x.shape, np.float64)
    for idx in np.ndindex(*x.shape):
        c = idx[1]
        y[idx] = (x[idx] - mean[c]) / math.sqrt(var[c] + eps)
    return y


def batch_stats(x):
    axes = (0,) + tuple(range(2, x.ndim))
    xd = x.astype(np.float64)
    m = xd.mean(axis=axes)
    v = ((xd - m.reshape((1, -1) + (1,) * (x.ndim - 2))) ** 2).mean(axis=axes)
    return m, v


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (6, 3), (2, 3, 2, 2, 2)])
@pytest.mark.parametrize("s", [1.0, 2.5, 0.0])
def test_batchnorm_global_stats(shape, s):
    x = rand(*shape, seed=6)
    mean_sum = rand(3, seed=7)
    var_sum = rand(3, seed=8, low=0.5, high=3.0)
    lay = make("type: 'BatchNorm' batch_norm_param { eps: 0.001 }")
    assert lay.use_global_stats
    (y,) = run(lay, [x], [mean_sum, var_sum, np.array([s], np.float32)])
    f = 0.0 if s == 0 else 1.0 / s
    assert_close(y, batchnorm_loop(x, f * mean_sum.astype(np.float64), f * var_sum.astype(np.float64), 0.001))


@pytest.mark.parametrize("text,phase", [
    ("batch_norm_param { use_global_stats: false }", TEST),
    ("", TRAIN),
    ("phase: TRAIN", TEST),
])
def test_batchnorm_batch_stats(text, phase):
    x = rand(4, 3, 2, 5, seed=9) * 2 + 1
    blobs = [rand(3, seed=10), rand(3, seed=11, low=1, high=2), np.array([3.0], np.float32)]
    lay = make(f"type: 'BatchNorm' {text}", phase=phase)
    assert not lay.use_global_stats
    before = [b.astype(np.float64) for b in blobs]
    lay.reshape([x.shape])
    (y,) = lay.forward(np, [x], blobs)
    m, v = batch_stats(x)
    assert_close(y, batchnorm_loop(x, m, v, 1e-5))
    # Caffe updates the running statistics on every batch-mode forward (training.md 10.5).
    count = x.size // 3
    assert_close(blobs[0], 0.999 * before[0] + m)
    assert_close(blobs[1], 0.999 * before[1] + count / (count - 1) * v)
    assert_close(blobs[2], 0.999 * before[2] + 1)


def test_batchnorm_explicit_global_stats_at_train():
    x = rand(2, 3, 4, seed=12)
    lay = make("type: 'BatchNorm' batch_norm_param { use_global_stats: true }", phase=TRAIN)
    mean_sum, var_sum = rand(3, seed=13), rand(3, seed=14, low=1, high=2)
    (y,) = run(lay, [x], [mean_sum, var_sum, np.array([4.0], np.float32)])
    assert_close(y, batchnorm_loop(x, mean_sum / 4.0, var_sum / 4.0, 1e-5))


def test_batchnorm_fillers_are_zeros():
    assert make("type: 'BatchNorm'").fillers() == [None, None, None]


# -- Scale and Bias --------------------------------------------------------------------------------

def broadcast_loop(x, operand, axis, op):
    """y[idx] = x[idx] op operand[idx[axis : axis + operand.ndim]]."""
    y = np.empty(x.shape, np.float64)
    for idx in np.ndindex(*x.shape):
        o = operand[idx[axis:axis + operand.ndim]] if operand.ndim else operand[()]
        y[idx] = op(float(x[idx]), float(o))
    return y


def mul(a, b):
    return a * b


def add(a, b):
    return a + b


SCALE_ONE_BOTTOM = [
    # (scale_param text, axis where the blob sits, blob shape) for a (2, 3, 4, 5) bottom
    ("", 1, (3,)),
    ("axis: 2", 2, (4,)),
    ("axis: -1", 3, (5,)),
    ("axis: 0 num_axes: 2", 0, (2, 3)),
    ("num_axes: -1", 1, (3, 4, 5)),
    ("num_axes: 0", 0, ()),
    ("axis: 1 num_axes: 3", 1, (3, 4, 5)),
]


@pytest.mark.parametrize("text,axis,shape", SCALE_ONE_BOTTOM, ids=[c[0] or "default" for c in SCALE_ONE_BOTTOM])
def test_scale_one_bottom(text, axis, shape):
    x = rand(2, 3, 4, 5, seed=15)
    s = rand(*shape, seed=16) if shape else np.array(1.7, np.float32)
    lay = make(f"type: 'Scale' scale_param {{ {text} }}")
    assert lay.param_shapes([x.shape]) == [shape]
    (y,) = run(lay, [x], [s])
    assert_close(y, broadcast_loop(x, s, axis, mul))

    # With bias_term, the bias has the scale's shape and is added after scaling.
    b = rand(*shape, seed=17) if shape else np.array(-0.4, np.float32)
    lay = make(f"type: 'Scale' scale_param {{ {text} bias_term: true }}")
    assert lay.param_shapes([x.shape]) == [shape, shape]
    (y,) = run(lay, [x], [s, b])
    ref = broadcast_loop(x, s, axis, mul)
    assert_close(y, ref + broadcast_loop(np.zeros_like(x), b, axis, add))

    lay = make(f"type: 'Bias' bias_param {{ {text} }}")
    (y,) = run(lay, [x], [b])
    assert_close(y, broadcast_loop(x, b, axis, add))


SCALE_TWO_BOTTOMS = [
    ("", 1, (3,)),
    ("", 1, (3, 4)),
    ("axis: 0", 0, (2, 3, 4, 5)),
    ("axis: -2", 2, (4, 5)),
    ("axis: 2", 0, ()),  # a scalar operand ignores the axis
]


@pytest.mark.parametrize("text,axis,shape", SCALE_TWO_BOTTOMS)
def test_scale_and_bias_two_bottoms(text, axis, shape):
    x = rand(2, 3, 4, 5, seed=18)
    s = rand(*shape, seed=19) if shape else np.array(0.6, np.float32)
    b = rand(*shape, seed=20) if shape else np.array(2.0, np.float32)
    lay = make(f"type: 'Scale' scale_param {{ {text} }}", bottoms=("x", "s"))
    assert lay.param_shapes([x.shape, s.shape]) == []
    (y,) = run(lay, [x, s])
    assert_close(y, broadcast_loop(x, s, axis, mul))

    lay = make(f"type: 'Scale' scale_param {{ {text} bias_term: true }}", bottoms=("x", "s"))
    assert lay.param_shapes([x.shape, s.shape]) == [shape]
    (y,) = run(lay, [x, s], [b])
    assert_close(y, broadcast_loop(x, s, axis, mul) + broadcast_loop(np.zeros_like(x), b, axis, add))

    lay = make(f"type: 'Bias' bias_param {{ {text} }}", bottoms=("x", "b"))
    (y,) = run(lay, [x, b])
    assert_close(y, broadcast_loop(x, b, axis, add))


def test_scale_and_bias_fillers():
    (f,) = make("type: 'Scale'").fillers()
    assert f.type == "constant" and f.value == 1.0
    # A filler given without a type is constant 0.
    (f,) = make("type: 'Scale' scale_param { filler { } }").fillers()
    assert f.type == "constant" and f.value == 0.0
    (f,) = make("type: 'Scale' scale_param { filler { type: 'uniform' max: 3 } }").fillers()
    assert f.type == "uniform" and f.max == 3.0
    fs, fb = make("type: 'Scale' scale_param { bias_term: true }").fillers()
    assert (fs.type, fs.value, fb.type, fb.value) == ("constant", 1.0, "constant", 0.0)
    fs, fb = make("type: 'Scale' scale_param { bias_term: true bias_filler { value: 0.5 } }").fillers()
    assert fb.type == "constant" and fb.value == 0.5
    # Two bottoms: only the bias blob.
    (fb,) = make("type: 'Scale' scale_param { bias_term: true }", bottoms=("x", "s")).fillers()
    assert fb.type == "constant" and fb.value == 0.0
    assert make("type: 'Scale'", bottoms=("x", "s")).fillers() == []
    (f,) = make("type: 'Bias'").fillers()
    assert f.type == "constant" and f.value == 0.0
    (f,) = make("type: 'Bias' bias_param { filler { type: 'constant' value: 2 } }").fillers()
    assert f.value == 2.0
    assert make("type: 'Bias'", bottoms=("x", "b")).fillers() == []


# -- 1c. InnerProduct and Embed ------------------------------------------------------------------------

def ip_loop(x, w, b, axis, transpose):
    m = math.prod(x.shape[:axis])
    k = math.prod(x.shape[axis:])
    flat = x.astype(np.float64).reshape(m, k)
    n = w.shape[1] if transpose else w.shape[0]
    y = np.zeros((m, n))
    for i in range(m):
        for o in range(n):
            acc = 0.0 if b is None else float(b[o])
            for j in range(k):
                acc += flat[i, j] * float(w[j, o] if transpose else w[o, j])
            y[i, o] = acc
    return y.reshape(x.shape[:axis] + (n,))


IP_CASES = [
    ("", 1, False, True),
    ("axis: 2", 2, False, True),
    ("axis: -1", 3, False, True),
    ("axis: 0", 0, False, True),
    ("transpose: true", 1, True, True),
    ("bias_term: false", 1, False, False),
    ("axis: 2 transpose: true bias_term: false", 2, True, False),
]


@pytest.mark.parametrize("text,axis,transpose,bias", IP_CASES, ids=[c[0] or "default" for c in IP_CASES])
def test_inner_product_reference(text, axis, transpose, bias):
    x = rand(3, 4, 2, 5, seed=21)
    lay = make(f"type: 'InnerProduct' inner_product_param {{ num_output: 6 {text} }}")
    shapes = lay.param_shapes([x.shape])
    blobs = [rand(*s, seed=22 + i) for i, s in enumerate(shapes)]
    (y,) = run(lay, [x], blobs)
    assert_close(y, ip_loop(x, blobs[0], blobs[1] if bias else None, axis, transpose))


def test_inner_product_fillers():
    fw, fb = make("type: 'InnerProduct' inner_product_param { num_output: 2 }").fillers()
    assert (fw.type, fw.value, fb.type, fb.value) == ("constant", 0.0, "constant", 0.0)
    (fw,) = make("type: 'InnerProduct' inner_product_param { num_output: 2 bias_term: false "
                 "weight_filler { type: 'xavier' } }").fillers()
    assert fw.type == "xavier"


def test_inner_product_weight_count_mismatch_names_layer():
    lay = make("name: 'fc' type: 'InnerProduct' inner_product_param { num_output: 2 }")
    with pytest.raises(ShapeError, match="'fc'"):
        run(lay, [rand(2, 3)], [rand(2, 4), rand(2)])


def embed_loop(ids, w, b):
    y = np.empty(ids.shape + (w.shape[1],))
    for idx in np.ndindex(*ids.shape):
        y[idx] = w[int(ids[idx])] + (0 if b is None else b)
    return y


@pytest.mark.parametrize("bias", [True, False])
def test_embed_reference(bias):
    ids = np.array([[3, 0, 9], [9, 1, 3]], np.float32)
    lay = make(f"type: 'Embed' embed_param {{ num_output: 4 input_dim: 10 bias_term: {str(bias).lower()} }}")
    blobs = [rand(*s, seed=30 + i) for i, s in enumerate(lay.param_shapes([ids.shape]))]
    (y,) = run(lay, [ids], blobs)
    assert_close(y, embed_loop(ids, blobs[0], blobs[1] if bias else None))
    assert len(lay.fillers()) == len(blobs)
    assert all(f.type == "constant" and f.value == 0 for f in lay.fillers())


@pytest.mark.parametrize("bad", [2.5, -1.0, 10.0, float("nan")])
def test_embed_refuses_bad_indices(bad):
    ids = np.array([1, 2, bad], np.float32)
    lay = make("name: 'emb' type: 'Embed' embed_param { num_output: 2 input_dim: 10 }")
    with pytest.raises(CaffeishError, match=r"'emb'.*\[0, 10\)"):
        run(lay, [ids], [rand(10, 2), rand(2)])


# -- 2. golden cases ---------------------------------------------------------------------------------

GOLDEN_CASES = ["activations", "normalization", "inner_product", "misc"]


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden(case):
    """Run this file's layers in net order from Caffe's recorded inputs.

    In-place blobs in blobs.npz hold their final value, so values are chained
    through the net; other layers' tops are taken from the recording.  A top is
    compared where its last writer ran.
    """
    net, _ = read_prototxt(shared_path("golden", case, "net.prototxt"))
    inputs = np.load(shared_path("golden", case, "inputs.npz"))
    recorded = np.load(shared_path("golden", case, "blobs.npz"))
    params = np.load(shared_path("golden", case, "params.npz"))
    meta = json.loads(shared_path("golden", case, "meta.json").read_text())
    graph = Graph(net)
    last_writer = {top: node.name for node in graph.nodes for top in node.tops}
    values, checked, failures = {}, [], []
    for node in graph.nodes:
        if node.type == "Input":
            values.update({t: inputs[t] for t in node.tops})
            continue
        if node.type == "Split":
            values.update({t: values[node.bottoms[0]] for t in node.tops})
            continue
        if node.type not in MY_TYPES:
            values.update({t: recorded[t] for t in node.tops})
            continue
        blobs = [params[f"{node.name}/{i}"] for i in range(len(node.param_shapes))]
        tops = run(node.layer, [values[b] for b in node.bottoms], blobs)
        for top, value in zip(node.tops, tops):
            values[top] = value
            if last_writer[top] != node.name:
                continue
            tol = 0.0 if top in meta["exact"] else meta["tolerance"]
            err = rel_err(value, recorded[top])
            checked.append(node.name)
            if err > tol:
                failures.append(f"{node.name} ({node.type}) top '{top}': {err:.3g} > {tol}")
    assert checked, f"no layer of this file in golden case {case}"
    assert not failures, failures


# -- 3. Caffe unit-test vectors ------------------------------------------------------------------------

def vectors_for(layer_type):
    entries = json.loads(shared_path("caffe", "test_vectors.json").read_text())
    return [e for e in entries if e["layer"] == layer_type]


def params_text(params, skip=()):
    """test_vectors 'params' as prototxt fields (enum values are upper-case strings)."""
    parts = []
    for key, value in params.items():
        if key in skip:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        parts.append(f"{key}: {value}")
    return " ".join(parts)


def test_lrn_vectors():
    entries = vectors_for("LRN")
    setups = [e for e in entries if "top_shape" in e]
    forwards = [e for e in entries if "expected" in e]
    assert setups and forwards
    for e in setups:
        lay = make(f"type: 'LRN' lrn_param {{ {params_text(e['params'])} }}")
        assert lay.reshape([tuple(e["bottom_shape"])]) == [tuple(e["top_shape"])], e["test"]
    # Caffe's forward tests: default params, local_size 15, and WITHIN_CHANNEL local_size 3,
    # Gaussian bottom, against the reference formula (constant 1, alpha 1, beta 0.75), 1e-5.
    x = np.random.default_rng(1701).standard_normal(tuple(forwards[0]["bottom_shape"])).astype(np.float32)
    for text, n, within in [("", 5, False), ("local_size: 15", 15, False),
                            ("local_size: 3 norm_region: WITHIN_CHANNEL", 3, True)]:
        (y,) = run(make(f"type: 'LRN' lrn_param {{ {text} }}"), [x])
        ref = lrn_loop(x, n=n, alpha=1.0, beta=0.75, k=1.0, within=within)
        assert np.abs(y - ref).max() <= 1e-5, text


def test_inner_product_vectors():
    entries = vectors_for("InnerProduct")
    setups = [e for e in entries if "top_shape" in e and "weight_shape" in e]
    forwards = [e for e in entries if "expected" in e]
    assert setups and forwards
    for e in setups:
        lay = make(f"type: 'InnerProduct' inner_product_param {{ {params_text(e['params'])} }}")
        bottom = tuple(e["bottom_shape"])
        assert lay.reshape([bottom]) == [tuple(e["top_shape"])], e["test"]
        assert lay.param_shapes([bottom])[0] == tuple(e["weight_shape"]), e["test"]
    # TestForward / TestForwardNoBatch: weights ~U[0,1], bias ~U[1,2], bottom ~U[0,1]
    # (NoBatch: a (1,2,3,4) bottom left at zero): every top value >= 1.
    rng = np.random.default_rng(1701)
    for bottom in [rng.uniform(0, 1, tuple(forwards[0]["bottom_shape"])), np.zeros((1, 2, 3, 4))]:
        lay = make("type: 'InnerProduct' inner_product_param { num_output: 10 }")
        w_shape, b_shape = lay.param_shapes([bottom.shape])
        (y,) = run(lay, [bottom], [rng.uniform(0, 1, w_shape), rng.uniform(1, 2, b_shape)])
        assert y.shape == (bottom.shape[0], 10)
        assert np.all(y >= 1)
    # TestForwardTranspose: a transposed layer with the transposed weights gives the same top.
    x = rng.uniform(0, 1, (2, 3, 4, 5)).astype(np.float32)
    w, b = rng.uniform(0, 1, (10, 60)), rng.uniform(1, 2, (10,))
    (plain,) = run(make("type: 'InnerProduct' inner_product_param { num_output: 10 }"), [x], [w, b])
    (trans,) = run(make("type: 'InnerProduct' inner_product_param { num_output: 10 transpose: true }"),
                   [x], [np.ascontiguousarray(w.T), b])
    assert_close(trans, plain, 1e-6)
