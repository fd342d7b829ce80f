"""Backward of the loss layers and Accuracy (layers/loss.py), of the data layers (layers/data.py)
and of the recurrent layers (layers/recurrent.py).

1. Every loss, with every normalization mode (FULL, VALID, BATCH_SIZE, NONE, the legacy
   `normalize`), ignore_label and axis, against float64 finite differences of a slow reference
   loss that restates Caffe's formula (checked first to agree with the layer's own forward), times
   a loss weight that is not 1 (the top's diff).
2. Caffe's quirks, against hand-derived values: SoftmaxWithLoss reads its probabilities from top 1
   (Caffe's top shares prob_'s memory); SigmoidCrossEntropyLoss divides by the forward's
   normalizer; HingeLoss's sign(0) = 0 and the label entry's flipped sign; the log clamps of
   MultinomialLogisticLoss; ContrastiveLoss's d + 1e-4 and legacy_version; InfogainLoss's H from a
   file or from bottom 2.
3. The fatal cases (labels, the infogain matrix, Accuracy when asked), propagate_down false,
   allow_force_backward per layer.
4. The backward of every loss on the strict array module (CuPy's API on the CPU), against numpy.
5. Data layers and HDF5Output (no-op), RNN/LSTM (refused), LSTMUnit (finite differences).
6. A real Net against Caffe's recorded diffs (golden case `losses`).
"""
import json
import math

import numpy as np
import pytest

import caffeish
from caffeish.errors import UnsupportedError
from caffeish.formats.io import parse_text, write_binaryproto
from caffeish.formats.schema import TRAIN, pb
from caffeish.graph import registry
from caffeish.kernels import strict
from conftest import shared_path

FLT_MIN = float(np.finfo(np.float32).tiny)
LW = 0.75  # a loss weight that is not 1: the gradient must scale by the top's diff
MODES = [  # (loss_param text, the mode Caffe uses; None: the layer's default)
    ("", None),
    ("normalization: FULL", "FULL"),
    ("normalization: VALID", "VALID"),
    ("normalization: BATCH_SIZE", "BATCH_SIZE"),
    ("normalization: NONE", "NONE"),
    ("normalize: true", "VALID"),
    ("normalize: false", "BATCH_SIZE"),
]


def layer(text):
    return registry.create(parse_text(text, pb.LayerParameter()), TRAIN)


def run(text, *bottoms, needs_backward=True):
    """(layer, tops) after a forward that keeps what the backward reads."""
    lay = layer(text)
    lay.reshape([b.shape for b in bottoms])
    lay.needs_backward = needs_backward
    return lay, lay.forward(np, list(bottoms), [])


def backward(lay, tops, bottoms, propagate=None, lw=LW, xp=np):
    top_diffs = [xp.reshape(xp.asarray(np.float32(lw)), ())] + [xp.zeros(t.shape, dtype=np.float32) for t in tops[1:]]
    propagate = [True] + [False] * (len(bottoms) - 1) if propagate is None else propagate
    return lay.backward(xp, top_diffs, tops, list(bottoms), [], propagate, [])


def numeric(f, x, eps=1e-6):
    """Central differences of the float64 function f at x."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        keep = x[idx]
        x[idx] = keep + eps
        up = f(x)
        x[idx] = keep - eps
        down = f(x)
        x[idx] = keep
        grad[idx] = (up - down) / (2 * eps)
    return grad


def assert_close(got, want, tol=1e-5):
    """max|got - want| / max|want|, the golden tests' measure."""
    assert got is not None and got.shape == want.shape and got.dtype == np.float32, got
    err = float(np.abs(got.astype(np.float64) - want).max()) / (float(np.abs(want).max()) + 1e-12)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def labels(shape, classes, seed=0):
    return np.random.default_rng(seed).integers(0, classes, shape).astype(np.float32)


def normalizer_ref(mode, outer, inner, valid):
    return max(1.0, {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode])


def by_position(values, label, axis):
    outer = int(np.prod(values.shape[:axis]))
    inner = int(np.prod(values.shape[axis + 1:]))
    return values.reshape(outer, values.shape[axis], inner), label.reshape(outer, inner)


def softmax_ref(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# -- 1. finite differences ------------------------------------------------------------------------


def softmax_loss_ref(scores, label, axis, ignore, mode, h=None):
    """SoftmaxWithLoss (h None) or InfogainLoss, in float64 loops."""
    p3, lab = by_position(softmax_ref(scores, axis), label, axis)
    outer, classes, inner = p3.shape
    loss, count = 0.0, 0
    for i in range(outer):
        for j in range(inner):
            v = int(lab[i, j])
            if ignore is not None and v == ignore:
                continue
            if h is None:
                loss -= math.log(max(p3[i, v, j], FLT_MIN))
            else:
                loss -= sum(h[v, k] * math.log(max(p3[i, k, j], 1e-20)) for k in range(classes))
            count += 1
    return loss / normalizer_ref(mode, outer, inner, count)


@pytest.mark.parametrize("loss_param, mode", MODES)
@pytest.mark.parametrize("ignore", [None, 2])
def test_softmax_with_loss_gradient(loss_param, mode, ignore):
    scores, label = rand(3, 4, 2, 3), labels((3, 1, 2, 3), 4, seed=1)
    label[0, 0, 1, 2] = 2  # at least one ignored position
    ig = f"ignore_label: {ignore}" if ignore is not None else ""
    lay, tops = run(f'name: "sm" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" '
                    f'loss_param {{ {ig} {loss_param} }}', scores, label)
    mode = mode or "VALID"
    np.testing.assert_allclose(tops[0], softmax_loss_ref(scores.astype(np.float64), label, 1, ignore, mode),
                               rtol=1e-5)
    diff, none = backward(lay, tops, [scores, label])
    assert none is None
    want = LW * numeric(lambda x: softmax_loss_ref(x, label, 1, ignore, mode), scores)
    assert_close(diff, want)
    if ignore is not None:  # every class of an ignored position gets exactly 0
        assert not np.any(diff[0, :, 1, 2])


def test_softmax_with_loss_axis_and_prob_top():
    scores, label = rand(2, 3, 5), labels((2, 3), 5)
    lay, tops = run('name: "sm" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" top: "prob" '
                    'softmax_param { axis: -1 } loss_param { normalization: FULL }', scores, label)
    diff, _ = backward(lay, tops, [scores, label])
    want = LW * numeric(lambda x: softmax_loss_ref(x, label, 2, None, "FULL"), scores)
    assert_close(diff, want)


def test_softmax_with_loss_without_forward_state():
    """A backward whose forward kept nothing (needs_backward false) computes the softmax again."""
    scores, label = rand(2, 4, 3), labels((2, 3), 4)
    lay, tops = run('name: "sm" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss"', scores, label,
                    needs_backward=False)
    assert lay.prob is None
    diff, _ = backward(lay, tops, [scores, label])
    assert_close(diff, LW * numeric(lambda x: softmax_loss_ref(x, label, 1, None, "VALID"), scores))


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
@pytest.mark.parametrize("ignore", [None, 1])
def test_infogain_loss_gradient_with_matrix_bottom(mode, ignore):
    scores, label = rand(3, 4, 2), labels((3, 2), 4, seed=2)
    label[1, 0] = 1
    h = np.random.default_rng(3).uniform(0, 2, (4, 4)).astype(np.float32)
    ig = f"ignore_label: {ignore}" if ignore is not None else ""
    lay, tops = run(f'name: "ig" type: "InfogainLoss" bottom: "s" bottom: "l" bottom: "h" top: "loss" top: "prob" '
                    f'loss_param {{ {ig} normalization: {mode} }}', scores, label, h)
    np.testing.assert_allclose(tops[0], softmax_loss_ref(scores.astype(np.float64), label, 1, ignore, mode, h),
                               rtol=1e-5)
    diff, none_l, none_h = backward(lay, tops, [scores, label, h])
    assert none_l is None and none_h is None
    want = LW * numeric(lambda x: softmax_loss_ref(x, label, 1, ignore, mode, h.astype(np.float64)), scores)
    assert_close(diff, want)


def test_infogain_loss_gradient_with_source_and_axis(tmp_path):
    scores, label = rand(2, 2, 3), labels((2, 2), 3, seed=4)
    h = np.random.default_rng(5).uniform(0, 1, (1, 1, 3, 3)).astype(np.float32)
    path = tmp_path / "h.binaryproto"
    write_binaryproto(str(path), h)
    lay, tops = run(f'name: "ig" type: "InfogainLoss" bottom: "s" bottom: "l" top: "loss" '
                    f'infogain_loss_param {{ source: "{path}" axis: 2 }}', scores, label)
    diff, _ = backward(lay, tops, [scores, label])
    h2 = h.reshape(3, 3).astype(np.float64)
    assert_close(diff, LW * numeric(lambda x: softmax_loss_ref(x, label, 2, None, "VALID", h2), scores))


def test_euclidean_loss_gradient_both_bottoms():
    a, b = rand(3, 4), rand(3, 2, 2, seed=1)
    lay, tops = run('name: "eu" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "l"', a, b)

    def ref(x, y):
        return float(((x.reshape(-1) - y.reshape(-1).astype(np.float64)) ** 2).sum()) / 3 / 2

    np.testing.assert_allclose(tops[0], ref(a.astype(np.float64), b), rtol=1e-5)
    da, db = backward(lay, tops, [a, b], [True, True])
    assert_close(da, LW * numeric(lambda x: ref(x, b), a))
    assert_close(db, LW * numeric(lambda y: ref(a.astype(np.float64), y), b))
    assert db.shape == b.shape
    assert backward(lay, tops, [a, b], [False, True])[0] is None
    assert backward(lay, tops, [a, b], [True, False])[1] is None


def sce_ref(x, t, ignore, mode):
    total, count = 0.0, 0
    for xi, ti in zip(x.ravel(), t.ravel()):
        if ignore is not None and int(ti) == ignore:
            continue
        total += max(xi, 0) - xi * ti + math.log1p(math.exp(-abs(xi)))
        count += 1
    n = x.shape[0]
    return total / normalizer_ref(mode, n, x.size // n, count)


@pytest.mark.parametrize("loss_param, mode", MODES)
@pytest.mark.parametrize("ignore", [None, -1])
def test_sigmoid_cross_entropy_gradient(loss_param, mode, ignore):
    x = rand(3, 5) * 2
    t = np.random.default_rng(6).uniform(0, 1, (3, 5)).astype(np.float32)
    t[0, 1] = t[2, 4] = -1  # int(-1) == -1: ignored when ignore_label is -1
    ig = f"ignore_label: {ignore}" if ignore is not None else ""
    lay, tops = run(f'name: "sce" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "l" '
                    f'loss_param {{ {ig} {loss_param} }}', x, t)
    mode = mode or "BATCH_SIZE"  # Caffe's default here is BATCH_SIZE, not VALID
    np.testing.assert_allclose(tops[0], sce_ref(x.astype(np.float64), t, ignore, mode), rtol=1e-5)
    diff, _ = backward(lay, tops, [x, t])
    assert_close(diff, LW * numeric(lambda v: sce_ref(v, t, ignore, mode), x))


def hinge_ref(x, label, l2):
    rows = x.reshape(x.shape[0], -1)
    total = 0.0
    for n, row in enumerate(rows):
        for k, v in enumerate(row):
            m = max(0.0, 1 - v if k == int(label[n]) else 1 + v)
            total += m * m if l2 else m
    return total / x.shape[0]


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss_gradient(norm):
    x = rand(4, 3, 1, 2)
    x[np.abs(np.abs(x) - 1) < 0.05] += 0.2  # away from the kinks at |x| = 1
    label = labels((4,), 6, seed=7)
    lay, tops = run(f'name: "h" type: "HingeLoss" bottom: "x" bottom: "l" top: "loss" '
                    f'hinge_loss_param {{ norm: {norm} }}', x, label)
    np.testing.assert_allclose(tops[0], hinge_ref(x.astype(np.float64), label, norm == "L2"), rtol=1e-5)
    diff, _ = backward(lay, tops, [x, label])
    assert_close(diff, LW * numeric(lambda v: hinge_ref(v, label, norm == "L2"), x))


def mlog_ref(x, label):
    rows = x.reshape(x.shape[0], -1)
    return -sum(math.log(max(rows[n, int(label[n])], 1e-20)) for n in range(len(rows))) / x.shape[0]


def test_multinomial_logistic_gradient():
    x = np.random.default_rng(8).uniform(0.1, 1, (4, 5, 1, 1)).astype(np.float32)
    label = labels((4,), 5, seed=8)
    lay, tops = run('name: "m" type: "MultinomialLogisticLoss" bottom: "x" bottom: "l" top: "loss"', x, label)
    np.testing.assert_allclose(tops[0], mlog_ref(x.astype(np.float64), label), rtol=1e-5)
    diff, _ = backward(lay, tops, [x, label])
    assert_close(diff, LW * numeric(lambda v: mlog_ref(v, label), x))


def contrastive_ref(a, b, sim, margin, legacy):
    total = 0.0
    for n in range(a.shape[0]):
        d2 = float(((a[n].ravel() - b[n].ravel()) ** 2).sum())
        if int(sim[n]):
            total += d2
        elif legacy:
            total += max(margin - d2, 0.0)
        else:
            total += max(margin - math.sqrt(d2), 0.0) ** 2
    return total / a.shape[0] / 2


def contrastive_caffe(a, b, sim, margin, legacy, lw):
    """Caffe's ContrastiveLoss gradient for a, written from its loop (float64)."""
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    out = np.zeros_like(a)
    alpha = lw / a.shape[0]
    for n in range(a.shape[0]):
        diff = a[n] - b[n]
        d2 = float(diff @ diff)
        if int(sim[n]):
            out[n] = alpha * diff
        elif legacy:
            out[n] = -alpha * diff if margin - d2 > 0 else 0
        else:
            d = math.sqrt(d2)
            out[n] = -alpha * (margin - d) / (d + 1e-4) * diff if margin - d > 0 else 0
    return out


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_loss_gradient(legacy):
    a, b = rand(6, 3, 1, 1), rand(6, 3, 1, 1, seed=1)
    b[4] = a[4] + 2  # a dissimilar pair beyond the margin: no gradient
    sim = np.array([1, 0, 1, 0, 0, 0], np.float32)
    margin = 2.5 if legacy else 1.5
    lay, tops = run(f'name: "c" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "s" top: "l" '
                    f'contrastive_loss_param {{ margin: {margin} legacy_version: {str(legacy).lower()} }}', a, b, sim)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(tops[0], contrastive_ref(a64, b64, sim, margin, legacy), rtol=1e-5)
    da, db, ds = backward(lay, tops, [a, b, sim], [True, True, False])
    assert ds is None
    caffe = contrastive_caffe(a, b, sim, margin, legacy, LW).reshape(a.shape)
    assert_close(da, caffe)
    assert_close(db, -caffe)
    assert not np.any(da[4])
    # The true gradient differs only by Caffe's 1e-4 in d + 1e-4 (none in legacy_version).
    assert_close(da, LW * numeric(lambda x: contrastive_ref(x, b64, sim, margin, legacy), a),
                 tol=1e-5 if legacy else 1e-3)
    assert_close(db, LW * numeric(lambda y: contrastive_ref(a64, y, sim, margin, legacy), b),
                 tol=1e-5 if legacy else 1e-3)


# -- 2. Caffe's quirks, by hand --------------------------------------------------------------------


def test_softmax_with_loss_reads_the_prob_top():
    """Caffe's top 1 shares prob_'s memory: backward uses the top's current value (an in-place layer
    after it changes it), so dx = (top1 - onehot) * lw / Z."""
    scores, label = rand(2, 3), np.array([2, 0], np.float32)
    lay, tops = run('name: "sm" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" top: "prob"',
                    scores, label)
    changed = np.full((2, 3), 0.5, np.float32)
    diff, _ = backward(lay, [tops[0], changed], [scores, label])
    want = np.array([[0.5, 0.5, -0.5], [-0.5, 0.5, 0.5]]) * LW / 2
    np.testing.assert_array_equal(diff, want.astype(np.float32))


def test_softmax_with_loss_all_ignored_gives_zero():
    scores, label = rand(2, 3), np.ones(2, np.float32)
    lay, tops = run('name: "sm" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" '
                    'loss_param { ignore_label: 1 }', scores, label)
    diff, _ = backward(lay, tops, [scores, label])
    assert diff.shape == (2, 3) and not np.any(diff)


def test_sigmoid_cross_entropy_divides_by_the_forwards_normalizer():
    """normalizer_ is set in Forward; Backward divides by it even when the targets changed since."""
    x = rand(2, 4)
    t = np.zeros((2, 4), np.float32)
    t[0, :3] = 5  # three ignored targets at the forward: VALID count 5
    lay, tops = run('name: "sce" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "l" '
                    'loss_param { ignore_label: 5 normalization: VALID }', x, t)
    later = np.ones((2, 4), np.float32)  # nothing ignored now: the count would be 8
    diff, _ = backward(lay, tops, [x, later])
    want = (1 / (1 + np.exp(-x.astype(np.float64))) - 1) * LW / 5
    assert_close(diff, want)


def test_hinge_loss_sign_of_zero_and_label_entry():
    """L1: sign(m) with sign(0) = 0, the label entry negated: x at the label = 1 gives m = 0, so 0."""
    x = np.array([[1.0, 0.5, -1.0, -2.0]], np.float32)  # label 0: m = [0, 1.5, 0, 0]
    label = np.array([0], np.float32)
    lay, tops = run('name: "h" type: "HingeLoss" bottom: "x" bottom: "l" top: "loss"', x, label)
    diff, _ = backward(lay, tops, [x, label], lw=2.0)
    np.testing.assert_array_equal(diff, [[0, 2, 0, 0]])
    x = np.array([[0.5, 0.5, -0.5]], np.float32)  # m = [0.5, 1.5, 0.5]
    lay, tops = run('name: "h" type: "HingeLoss" bottom: "x" bottom: "l" top: "loss" '
                    'hinge_loss_param { norm: L2 }', x, label)
    diff, _ = backward(lay, tops, [x, label], lw=2.0)
    np.testing.assert_array_equal(diff, [[-2.0, 6.0, 2.0]])  # 2 lw / N * m, the label entry negated


def test_multinomial_logistic_clamps_at_1e_20():
    x = np.array([[0.0, 1.0], [0.5, 0.5]], np.float32)
    label = np.array([0, 1], np.float32)
    lay, tops = run('name: "m" type: "MultinomialLogisticLoss" bottom: "x" bottom: "l" top: "loss"', x, label)
    diff, _ = backward(lay, tops, [x, label], lw=1.0)
    scale = np.float32(-1.0) / np.float32(2)
    np.testing.assert_array_equal(diff, np.array([[scale / np.float32(1e-20), 0], [0, scale / np.float32(0.5)]],
                                                 np.float32))


def test_contrastive_loss_epsilon_in_the_distance():
    """A dissimilar pair at distance d = 0.01 < margin 1: da = -lw (1 - d) / (d + 1e-4) (a - b) / N,
    1% below the true gradient -lw (1 - d) / d (a - b) / N."""
    a, b, sim = np.array([[0.01, 0.0]], np.float32), np.zeros((1, 2), np.float32), np.zeros(1, np.float32)
    lay, tops = run('name: "c" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "s" top: "l"', a, b, sim)
    da, db, _ = backward(lay, tops, [a, b, sim], [True, True, False], lw=2.0)
    d = np.float32(0.01)
    want = np.float32(-2.0) * (np.float32(1) - d) / (d + np.float32(1e-4)) * a
    np.testing.assert_allclose(da, want, rtol=1e-6)
    np.testing.assert_array_equal(db, -da)
    assert abs(float(da[0, 0]) - (-2.0 * 0.99 / 0.01 * 0.01)) > 1e-3  # not the exact gradient


def test_loss_weight_zero_gives_zero_gradient():
    scores, label = rand(2, 3), labels((2,), 3)
    lay, tops = run('name: "sm" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss"', scores, label)
    assert not np.any(backward(lay, tops, [scores, label], lw=0.0)[0])


# -- 3. fatal cases, propagate_down, allow_force_backward ------------------------------------------

LABEL_LOSSES = [
    ('type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss"', (rand(2, 3), labels((2,), 3))),
    ('type: "InfogainLoss" bottom: "s" bottom: "l" bottom: "h" top: "loss"',
     (rand(2, 3), labels((2,), 3), np.eye(3, dtype=np.float32))),
    ('type: "SigmoidCrossEntropyLoss" bottom: "s" bottom: "l" top: "loss"', (rand(2, 3), labels((2, 3), 2))),
    ('type: "HingeLoss" bottom: "s" bottom: "l" top: "loss"', (rand(2, 3), labels((2,), 3))),
    ('type: "MultinomialLogisticLoss" bottom: "s" bottom: "l" top: "loss"',
     (np.full((2, 3), 0.3, np.float32), labels((2,), 3))),
]


@pytest.mark.parametrize("text, bottoms", LABEL_LOSSES, ids=lambda v: v.split('"')[1] if isinstance(v, str) else "")
def test_backpropagating_into_labels_is_fatal(text, bottoms):
    lay, tops = run(f'name: "the_loss" {text}', *bottoms)
    propagate = [True, True] + [False] * (len(bottoms) - 2)
    with pytest.raises(UnsupportedError, match=r"layer 'the_loss' .*cannot backpropagate to label inputs \(bottom 1, "
                                               r"'l'\)") as info:
        backward(lay, tops, bottoms, propagate)
    assert "\n" not in str(info.value)
    assert lay.allow_force_backward(0) and not lay.allow_force_backward(1)
    # propagate_down false for bottom 0: nothing computed
    assert backward(lay, tops, bottoms, [False] * len(bottoms)) == [None] * len(bottoms)


def test_infogain_matrix_bottom_is_fatal_when_asked():
    bottoms = (rand(2, 3), labels((2,), 3), np.eye(3, dtype=np.float32))
    lay, tops = run('name: "ig" type: "InfogainLoss" bottom: "s" bottom: "l" bottom: "h" top: "loss"', *bottoms)
    assert lay.allow_force_backward(2)  # Caffe: force_backward asks for it, and Backward is fatal
    with pytest.raises(UnsupportedError, match="cannot backpropagate to infogain inputs"):
        backward(lay, tops, bottoms, [True, False, True])


def test_euclidean_and_contrastive_force_backward_rules():
    eu = layer('name: "e" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "l"')
    assert eu.allow_force_backward(0) and eu.allow_force_backward(1)
    ctr = layer('name: "c" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "s" top: "l"')
    assert ctr.allow_force_backward(0) and ctr.allow_force_backward(1) and not ctr.allow_force_backward(2)
    a, b, s = rand(2, 3), rand(2, 3, seed=1), np.array([1, 0], np.float32)
    lay, tops = run('name: "c" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "s" top: "l"', a, b, s)
    # Caffe neither refuses nor computes a diff for the similarity labels.
    assert backward(lay, tops, [a, b, s], [False, False, True]) == [None, None, None]


def test_accuracy_is_fatal_only_when_asked():
    scores, label = rand(3, 4), labels((3,), 4)
    lay, tops = run('name: "acc" type: "Accuracy" bottom: "s" bottom: "l" top: "a"', scores, label)
    diffs = [np.zeros((), np.float32)]
    assert lay.backward(np, diffs, tops, [scores, label], [], [False, False], []) == [None, None]
    for propagate in ([True, False], [False, True]):
        with pytest.raises(UnsupportedError, match="layer 'acc' \\(Accuracy\\) does not backpropagate"):
            lay.backward(np, diffs, tops, [scores, label], [], propagate, [])
    assert lay.allow_force_backward(0) and lay.allow_force_backward(1)  # Caffe's default: so force_backward is fatal


# -- 4. the strict (CuPy-API) array module ---------------------------------------------------------

STRICT_CASES = [
    ('type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" top: "prob" loss_param { ignore_label: 1 }',
     (rand(2, 4, 3), labels((2, 3), 4)), [True, False]),
    ('type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" loss_param { normalization: FULL }',
     (rand(2, 4, 3), labels((2, 3), 4)), [True, False]),
    ('type: "InfogainLoss" bottom: "s" bottom: "l" bottom: "h" top: "loss" loss_param { ignore_label: 0 }',
     (rand(3, 4), labels((3,), 4), np.random.default_rng(1).uniform(0, 1, (4, 4)).astype(np.float32)),
     [True, False, False]),
    ('type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss"', (rand(3, 4), rand(3, 4, seed=1)), [True, True]),
    ('type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "loss" loss_param { ignore_label: 1 }',
     (rand(3, 4), labels((3, 4), 3)), [True, False]),
    ('type: "HingeLoss" bottom: "x" bottom: "l" top: "loss"', (rand(3, 4), labels((3,), 4)), [True, False]),
    ('type: "HingeLoss" bottom: "x" bottom: "l" top: "loss" hinge_loss_param { norm: L2 }',
     (rand(3, 4), labels((3,), 4)), [True, False]),
    ('type: "MultinomialLogisticLoss" bottom: "x" bottom: "l" top: "loss"',
     (np.random.default_rng(2).uniform(0, 1, (3, 4)).astype(np.float32), labels((3,), 4)), [True, False]),
    ('type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "s" top: "loss"',
     (rand(4, 3), rand(4, 3, seed=1), np.array([1, 0, 0, 1], np.float32)), [True, True, False]),
    (('type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "s" top: "loss" '
      'contrastive_loss_param { legacy_version: true margin: 3 }'),
     (rand(4, 3), rand(4, 3, seed=1), np.array([1, 0, 0, 1], np.float32)), [True, True, False]),
]


@pytest.mark.parametrize("text, bottoms, propagate", STRICT_CASES, ids=lambda v: v.split('"')[1]
                         if isinstance(v, str) else "")
def test_loss_backward_on_the_strict_array_module(text, bottoms, propagate):
    """The GPU code path's xp calls, on the CPU: a call CuPy lacks or refuses fails here."""
    xp = strict.XP
    lay, tops = run(f'name: "l" {text}', *bottoms)
    want = backward(lay, tops, bottoms, propagate)
    # What the forward kept, moved to the device (the forward itself runs on the strict backend in
    # tests/test_strict_backend.py; SoftmaxWithLoss's softmax is a kernel there).
    for name in ("prob", "diff", "sig", "kept"):
        if getattr(lay, name, None) is not None:
            setattr(lay, name, xp.asarray(getattr(lay, name)))
    if getattr(lay, "cache", None) is not None:
        lay.cache = tuple(xp.asarray(c) for c in lay.cache)
    if len(tops) > 1:
        tops = [tops[0], xp.asarray(tops[1])]
    got = backward(lay, [xp.asarray(t) for t in tops], [xp.asarray(b) for b in bottoms], propagate, xp=xp)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert type(g) is strict.StrictArray and g.dtype == np.float32
        np.testing.assert_allclose(g.get(), w, rtol=1e-6, atol=1e-9)


# -- 5. data layers and recurrent layers -----------------------------------------------------------


def test_data_layers_and_hdf5_output_have_a_no_op_backward():
    lay = layer('name: "in" type: "Input" top: "d" input_param { shape { dim: 2 dim: 3 } }')
    assert lay.backward(np, [np.ones((2, 3), np.float32)], [np.zeros((2, 3), np.float32)], [], [], [], []) == []
    lay = layer('name: "dd" type: "DummyData" top: "a" top: "b" dummy_data_param { shape { dim: 2 } shape { dim: 3 } }')
    assert lay.backward(np, [np.ones(2, np.float32), np.ones(3, np.float32)], [None, None], [], [], [], []) == []
    for t in ("Data", "ImageData", "WindowData", "MemoryData", "HDF5Data"):
        assert registry.lookup(t).backward is not registry.Layer.backward, t
    out = layer('name: "o" type: "HDF5Output" bottom: "a" bottom: "b" hdf5_output_param { file_name: "x.h5" }')
    a = np.ones((2, 3), np.float32)
    assert out.backward(np, [], [], [a, a], [], [True, True], []) == [None, None]


@pytest.mark.parametrize("type_", ["RNN", "LSTM"])
def test_rnn_and_lstm_refuse_backward(type_):
    lay = layer(f'name: "r" type: "{type_}" bottom: "x" bottom: "cont" top: "h" recurrent_param {{ num_output: 3 }}')
    assert lay.allow_force_backward(0) and not lay.allow_force_backward(1)
    with pytest.raises(UnsupportedError, match="'r'.*not implemented"):
        lay.backward(np, [np.zeros((2, 1, 3), np.float32)], [None], [None, None], [], [True, False], [])
    with pytest.raises(UnsupportedError, match="sequence continuation"):
        lay.backward(np, [np.zeros((2, 1, 3), np.float32)], [None], [None, None], [], [True, True], [])


def lstm_unit_ref(c_prev, x, cont):
    """Caffe's LSTMUnit forward (float64): gates i, f, o, g in blocks of D along axis 2."""
    d = c_prev.shape[2]
    def sig(v):
        return 1 / (1 + np.exp(-v))

    i, f, o, g = (x[:, :, k * d:(k + 1) * d] for k in range(4))
    i, o, g = sig(i), sig(o), np.tanh(g)
    f = np.where(cont[:, :, None] == 0, 0, cont[:, :, None] * sig(f))
    c = f * c_prev + i * g
    return c, o * np.tanh(c)


def test_lstm_unit_backward():
    n, d = 3, 2
    c_prev, x = rand(1, n, d), rand(1, n, 4 * d, seed=1)
    cont = np.array([[1, 0, 1]], np.float32)
    dc, dh = rand(1, n, d, seed=2), rand(1, n, d, seed=3)
    lay = layer('name: "u" type: "LSTMUnit" bottom: "c0" bottom: "x" bottom: "cont" top: "c" top: "h"')
    assert lay.reshape([c_prev.shape, x.shape, cont.shape]) == [(1, n, d)] * 2
    assert lay.allow_force_backward(1) and not lay.allow_force_backward(2)
    c, h = (v.astype(np.float32) for v in lstm_unit_ref(c_prev.astype(np.float64), x.astype(np.float64), cont))
    got_c, got_x, none = lay.backward(np, [dc, dh], [c, h], [c_prev, x, cont], [], [True, False, False], [])
    assert none is None and got_x is not None  # Caffe computes both diffs when either is asked for

    def objective(cp, xx):
        cc, hh = lstm_unit_ref(cp, xx, cont)
        return float((cc * dc).sum() + (hh * dh).sum())

    assert_close(got_c, numeric(lambda v: objective(v, x.astype(np.float64)), c_prev))
    assert_close(got_x, numeric(lambda v: objective(c_prev.astype(np.float64), v), x))
    assert not np.any(got_c[0, 1])  # cont = 0: f = 0, so nothing flows to c_prev
    with pytest.raises(UnsupportedError, match="sequence continuation"):
        lay.backward(np, [dc, dh], [c, h], [c_prev, x, cont], [], [True, True, True], [])
    assert lay.backward(np, [dc, dh], [c, h], [c_prev, x, cont], [], [False, False, False], []) == [None] * 3


# -- 6. a real Net against Caffe -------------------------------------------------------------------


def test_losses_golden_case_matches_caffe():
    folder = shared_path("golden_train", "backward", "losses")
    meta = json.loads((folder / "meta.json").read_text())
    net = caffeish.Net(str(folder / "net.prototxt"), None, caffeish.TRAIN)
    inputs = np.load(folder / "inputs.npz")
    for k in inputs.files:
        net.blobs[k].data[...] = inputs[k]
    net.forward()
    top_diffs = np.load(folder / "top_diffs.npz")
    for k in top_diffs.files:
        net.blobs[k].diff[...] = top_diffs[k]
    net.backward()
    diffs = np.load(folder / "diffs.npz")
    checked = 0
    for name in ("score", "vec", "vec2", "prob"):
        want = diffs[name]
        assert np.abs(want).max() > 0, name  # the case exercises every loss's gradient
        err = np.abs(net.blobs[name].diff - want).max() / (np.abs(want).max() + 1e-12)
        assert err <= meta["tolerance"], f"{name}: {err:.3g}"
        checked += 1
    for name in ("label", "lab1", "simlab"):  # labels never get a diff (force_backward is on)
        assert not np.any(net.blobs[name].diff), name
    assert checked == 4
