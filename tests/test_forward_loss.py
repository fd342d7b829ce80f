"""Forward of the loss layers and Accuracy (layers/loss.py): slow loop references that
restate Caffe's formulas, and Caffe's recorded values (golden case `losses`)."""
import json
import math

import numpy as np
import pytest

from caffeish.graph import registry
from caffeish.errors import ShapeError
from caffeish.graph.graph import Graph
from caffeish.formats.io import parse_text, read_prototxt, write_binaryproto
from caffeish.formats.schema import TEST, pb
from conftest import shared_path

FLT_MIN = float(np.finfo(np.float32).tiny)
LOSS_TYPES = {"SoftmaxWithLoss", "Accuracy", "EuclideanLoss", "SigmoidCrossEntropyLoss", "HingeLoss",
              "InfogainLoss", "MultinomialLogisticLoss", "ContrastiveLoss"}


def run(text, *bottoms):
    lay = registry.create(parse_text(text, pb.LayerParameter()), TEST)
    shapes = lay.reshape([b.shape for b in bottoms])
    tops = lay.forward(np, list(bottoms), [])
    assert [t.shape for t in tops] == [tuple(s) for s in shapes]
    assert all(t.dtype == np.float32 for t in tops)
    return tops


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def labels(shape, classes, seed=0):
    return np.random.default_rng(seed).integers(0, classes, shape).astype(np.float32)


def softmax_ref(x, axis):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def normalizer_ref(mode, outer, inner, valid):
    n = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return max(1.0, n)


# -- SoftmaxWithLoss ------------------------------------------------------------------------


def by_position(values, label, axis):
    """values as (outer, classes, inner) and label as (outer, inner), Caffe's loss-layer view."""
    outer = int(np.prod(values.shape[:axis]))
    inner = int(np.prod(values.shape[axis + 1:]))
    return values.reshape(outer, values.shape[axis], inner), label.reshape(outer, inner)


def softmax_loss_ref(scores, label, axis, ignore, mode):
    prob = softmax_ref(scores, axis)
    p3, lab = by_position(prob, label, axis)
    outer, classes, inner = p3.shape
    loss, count = 0.0, 0
    for i in range(outer):
        for j in range(inner):
            v = int(lab[i, j])
            if ignore is not None and v == ignore:
                continue
            loss -= math.log(max(p3[i, v, j], FLT_MIN))
            count += 1
    return loss / normalizer_ref(mode, outer, inner, count), prob


@pytest.mark.parametrize("loss_param, mode", [
    ("", "VALID"),
    ("normalization: FULL", "FULL"),
    ("normalization: VALID", "VALID"),
    ("normalization: BATCH_SIZE", "BATCH_SIZE"),
    ("normalization: NONE", "NONE"),
    ("normalize: true", "VALID"),
    ("normalize: false", "BATCH_SIZE"),
    ("normalize: false normalization: FULL", "FULL"),
])
def test_softmax_with_loss_normalization_and_ignore(loss_param, mode):
    scores = rand(3, 4, 2, 5)
    label = labels((3, 1, 2, 5), 4)
    label[0, 0, 1, 2] = label[2, 0, 0, 0] = 9
    tops = run(f'type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" top: "prob" '
               f'loss_param {{ ignore_label: 9 {loss_param} }}', scores, label)
    want, prob = softmax_loss_ref(scores, label, 1, 9, mode)
    assert tops[0].shape == ()
    np.testing.assert_allclose(tops[0], want, rtol=1e-5)
    np.testing.assert_allclose(tops[1], prob, rtol=1e-5, atol=1e-7)


def test_softmax_with_loss_axis_and_clamp():
    scores = rand(2, 3, 4)
    label = labels((2, 3), 4)
    (loss,) = run('type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" softmax_param { axis: 2 }',
                  scores, label)
    np.testing.assert_allclose(loss, softmax_loss_ref(scores, label, 2, None, "VALID")[0], rtol=1e-5)
    # A probability that underflows to 0 costs -log(FLT_MIN), not infinity.
    scores = np.array([[0, -200]], np.float32)
    (loss,) = run('type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss"', scores, np.array([1], np.float32))
    np.testing.assert_allclose(loss, -math.log(FLT_MIN), rtol=1e-6)


def test_softmax_with_loss_all_ignored_is_zero():
    scores = rand(2, 3)
    (loss,) = run('type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" loss_param { ignore_label: 1 }',
                  scores, np.ones(2, np.float32))
    assert loss == 0


def test_loss_weight_does_not_scale_the_top():
    scores, label = rand(2, 3), labels((2,), 3)
    (plain,) = run('type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss"', scores, label)
    (weighted,) = run('type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" loss_weight: 5', scores, label)
    assert plain == weighted


def test_label_out_of_range_is_an_error():
    with pytest.raises(ShapeError, match="label 3 .* outside the 3 classes"):
        run('type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss"', rand(2, 3), np.array([0, 3], np.float32))
    with pytest.raises(ShapeError, match="outside"):
        run('type: "Accuracy" bottom: "s" bottom: "l" top: "a"', rand(2, 3), np.array([-1, 0], np.float32))


# -- Accuracy -------------------------------------------------------------------------------


def accuracy_ref(scores, label, axis, top_k, ignore):
    s3, lab = by_position(scores, label, axis)
    outer, classes, inner = s3.shape
    hits, count = 0, 0
    per_hit, per_count = [0] * classes, [0] * classes
    for i in range(outer):
        for j in range(inner):
            v = int(lab[i, j])
            if ignore is not None and v == ignore:
                continue
            # Caffe: the true class is found when fewer than top_k *other* scores are >= its score.
            better = sum(1 for k in range(classes) if s3[i, k, j] >= s3[i, v, j]) - 1
            per_count[v] += 1
            if better < top_k:
                hits += 1
                per_hit[v] += 1
            count += 1
    per_class = [h / c if c else 0.0 for h, c in zip(per_hit, per_count)]
    return (hits / count if count else 0.0), per_class


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_accuracy_with_ties_ignore_and_per_class(top_k):
    scores = np.round(rand(4, 5, 3) * 1.5)  # small integers: many ties
    label = labels((4, 3), 5)
    label[1, 1] = 255
    acc, per_class = run(f'type: "Accuracy" bottom: "s" bottom: "l" top: "a" top: "pc" '
                         f'accuracy_param {{ top_k: {top_k} ignore_label: 255 }}', scores, label)
    want, want_pc = accuracy_ref(scores, label, 1, top_k, 255)
    np.testing.assert_allclose(acc, want, rtol=1e-6)
    np.testing.assert_allclose(per_class, want_pc, rtol=1e-6)


def test_accuracy_tie_with_true_class_counts_against_it():
    scores = np.array([[3, 3, 1]], np.float32)
    for true in (0, 1):
        (acc,) = run('type: "Accuracy" bottom: "s" bottom: "l" top: "a"', scores, np.array([true], np.float32))
        assert acc == 0
    (acc,) = run('type: "Accuracy" bottom: "s" bottom: "l" top: "a" accuracy_param { top_k: 2 }',
                 scores, np.array([0], np.float32))
    assert acc == 1


def test_accuracy_axis_and_nothing_counted():
    scores = rand(2, 3, 4)
    label = labels((2, 3), 4)
    (acc,) = run('type: "Accuracy" bottom: "s" bottom: "l" top: "a" accuracy_param { axis: -1 }', scores, label)
    np.testing.assert_allclose(acc, accuracy_ref(scores, label, 2, 1, None)[0], rtol=1e-6)
    (acc,) = run('type: "Accuracy" bottom: "s" bottom: "l" top: "a" accuracy_param { ignore_label: 0 }',
                 rand(2, 3), np.zeros(2, np.float32))
    assert acc == 0


# -- Euclidean / SigmoidCrossEntropy / Hinge / MultinomialLogistic / Contrastive -------------


def test_euclidean_loss():
    a, b = rand(3, 4), rand(3, 4, 1, 1, seed=1)
    (loss,) = run('type: "EuclideanLoss" bottom: "a" bottom: "b" top: "l"', a, b)
    want = sum((float(x) - float(y)) ** 2 for x, y in zip(a.ravel(), b.ravel())) / 3 / 2
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def sce_ref(x, t, ignore, mode):
    total, count = 0.0, 0
    for xi, ti in zip(x.ravel().astype(np.float64), t.ravel().astype(np.float64)):
        if ignore is not None and int(ti) == ignore:
            continue
        # -[t log s(x) + (1 - t) log(1 - s(x))], written stably
        total += max(xi, 0) - xi * ti + math.log1p(math.exp(-abs(xi)))
        count += 1
    outer = x.shape[0]
    return total / normalizer_ref(mode, outer, x.size // outer, count)


@pytest.mark.parametrize("loss_param, mode", [
    ("", "BATCH_SIZE"),  # SigmoidCrossEntropyLoss's own default
    ("normalization: VALID", "VALID"),
    ("normalization: FULL", "FULL"),
    ("normalization: NONE", "NONE"),
    ("normalize: true", "VALID"),
])
def test_sigmoid_cross_entropy(loss_param, mode):
    x = rand(3, 4) * 10  # large magnitudes exercise the stable form
    t = np.random.default_rng(1).random((3, 4)).astype(np.float32)
    (loss,) = run(f'type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "l" loss_param {{ {loss_param} }}',
                  x, t)
    np.testing.assert_allclose(loss, sce_ref(x, t, None, mode), rtol=1e-5)


def test_sigmoid_cross_entropy_ignore_label():
    x = rand(2, 5)
    t = np.array([[1, 0, -1, 1, 0], [-1, -1, 1, 0, 1]], np.float32)
    (loss,) = run('type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "l" '
                  'loss_param { ignore_label: -1 normalization: VALID }', x, t)
    np.testing.assert_allclose(loss, sce_ref(x, t, -1, "VALID"), rtol=1e-5)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss(norm):
    x = rand(4, 5)
    lab = np.array([0, 4, 2, 2], np.float32)
    (loss,) = run(f'type: "HingeLoss" bottom: "x" bottom: "l" top: "h" hinge_loss_param {{ norm: {norm} }}', x, lab)
    total = 0.0
    for n in range(4):
        for k in range(5):
            t = -float(x[n, k]) if k == int(lab[n]) else float(x[n, k])
            m = max(0.0, 1 + t)
            total += m if norm == "L1" else m * m
    np.testing.assert_allclose(loss, total / 4, rtol=1e-5)


def test_multinomial_logistic_loss_with_clamp():
    prob = np.array([[0.2, 0.8, 0.0], [0.5, 0.25, 0.25]], np.float32)
    lab = np.array([2, 1], np.float32)
    (loss,) = run('type: "MultinomialLogisticLoss" bottom: "p" bottom: "l" top: "m"', prob, lab)
    want = (-math.log(1e-20) - math.log(0.25)) / 2
    np.testing.assert_allclose(loss, want, rtol=1e-5)


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_loss(legacy):
    a, b = rand(4, 3, 1, 1) * 0.5, rand(4, 3, 1, 1, seed=1) * 0.5
    sim = np.array([1, 0, 0, 1], np.float32)
    (loss,) = run(f'type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "s" top: "c" '
                  f'contrastive_loss_param {{ margin: 1.2 legacy_version: {str(legacy).lower()} }}', a, b, sim)
    total = 0.0
    for n in range(4):
        d2 = float(((a[n].astype(np.float64) - b[n]) ** 2).sum())
        if sim[n]:
            total += d2
        elif legacy:
            total += max(1.2 - d2, 0.0)
        else:
            total += max(1.2 - math.sqrt(d2), 0.0) ** 2
    np.testing.assert_allclose(loss, total / 4 / 2, rtol=1e-5)


# -- InfogainLoss ---------------------------------------------------------------------------


def infogain_ref(scores, label, h, axis, ignore, mode):
    p3, lab = by_position(softmax_ref(scores, axis), label, axis)
    outer, classes, inner = p3.shape
    loss, count = 0.0, 0
    for i in range(outer):
        for j in range(inner):
            v = int(lab[i, j])
            if ignore is not None and v == ignore:
                continue
            for k in range(classes):
                loss -= h[v, k] * math.log(max(p3[i, k, j], 1e-20))
            count += 1
    return loss / normalizer_ref(mode, outer, inner, count)


def test_infogain_loss_with_matrix_bottom():
    scores = rand(3, 4, 2)
    label = labels((3, 2), 4)
    label[1, 0] = 7
    h = np.abs(rand(4, 4, seed=3))
    loss, prob = run('type: "InfogainLoss" bottom: "s" bottom: "l" bottom: "h" top: "loss" top: "prob" '
                     'loss_param { ignore_label: 7 }', scores, label, h)
    np.testing.assert_allclose(loss, infogain_ref(scores, label, h, 1, 7, "VALID"), rtol=1e-5)
    np.testing.assert_allclose(prob, softmax_ref(scores, 1), rtol=1e-5, atol=1e-7)


def test_infogain_loss_reads_source_binaryproto(tmp_path):
    scores = rand(5, 3)
    label = labels((5,), 3)
    h = np.abs(rand(3, 3, seed=4))
    path = tmp_path / "H.binaryproto"
    write_binaryproto(str(path), h.reshape(1, 1, 3, 3))
    (loss,) = run(f'type: "InfogainLoss" bottom: "s" bottom: "l" top: "loss" '
                  f'infogain_loss_param {{ source: "{path}" }} loss_param {{ normalization: BATCH_SIZE }}',
                  scores, label)
    np.testing.assert_allclose(loss, infogain_ref(scores, label, h, 1, None, "BATCH_SIZE"), rtol=1e-5)
    # Identity H: the SoftmaxWithLoss value (but with the 1e-20 clamp).
    write_binaryproto(str(path), np.eye(3, dtype=np.float32))
    (loss,) = run(f'type: "InfogainLoss" bottom: "s" bottom: "l" top: "loss" infogain_loss_param {{ source: "{path}" }}',
                  scores, label)
    np.testing.assert_allclose(loss, softmax_loss_ref(scores, label, 1, None, "VALID")[0], rtol=1e-5)


def test_infogain_loss_errors(tmp_path):
    path = tmp_path / "H.binaryproto"
    write_binaryproto(str(path), np.eye(2, dtype=np.float32))
    with pytest.raises(ShapeError, match="2\\*2|3\\*3"):
        run(f'type: "InfogainLoss" bottom: "s" bottom: "l" top: "loss" infogain_loss_param {{ source: "{path}" }}',
            rand(2, 3), labels((2,), 3))
    with pytest.raises(ShapeError, match="normalization"):
        run('type: "InfogainLoss" bottom: "s" bottom: "l" bottom: "h" top: "loss" loss_param { normalize: true }',
            rand(2, 3), labels((2,), 3), np.eye(3, dtype=np.float32))


# -- golden: Caffe's recorded values --------------------------------------------------------


def test_golden_losses():
    folder = shared_path("golden", "losses")
    meta = json.loads((folder / "meta.json").read_text())
    blobs = np.load(folder / "blobs.npz")
    graph = Graph(read_prototxt(folder / "net.prototxt")[0])
    checked = set()
    for node in graph.nodes:
        if node.type not in LOSS_TYPES:
            continue
        bottoms = [blobs[b] for b in node.bottoms]
        node.layer.reshape([b.shape for b in bottoms])
        tops = node.layer.forward(np, bottoms, [])
        for name, top in zip(node.tops, tops):
            want = blobs[name]
            assert top.dtype == np.float32 and top.shape == want.shape, name
            err = np.abs(top - want).max() / (np.abs(want).max() + 1e-12)
            assert err <= meta["tolerance"], (name, float(top.max()), float(want.max()))
        checked.add(node.type)
    assert checked == LOSS_TYPES - {"InfogainLoss"}
