"""Segmentation metrics against hand-computed values and score.py's definitions."""
import math

import numpy as np
import pytest

from caffeish.errors import CaffeishError
from caffeish.data.metrics import ConfusionMatrix, confusion, scores

# rows: label, columns: prediction
HIST = np.array([[3, 1, 0],
                 [0, 2, 2],
                 [1, 0, 1]])


def test_metrics_of_a_small_confusion_matrix_by_hand():
    s = scores(HIST)
    # pixel accuracy: (3 + 2 + 1) / 10
    assert s["pixel_accuracy"] == pytest.approx(0.6)
    # class accuracy: 3/4, 2/4, 1/2 -> mean 7/12
    np.testing.assert_allclose(s["class_accuracy"], [0.75, 0.5, 0.5])
    assert s["mean_accuracy"] == pytest.approx(7 / 12)
    # IU: 3/(4+4-3), 2/(4+3-2), 1/(2+3-1)
    np.testing.assert_allclose(s["iu"], [0.6, 0.4, 0.25])
    assert s["mean_iu"] == pytest.approx(1.25 / 3)
    # frequency weights 0.4, 0.4, 0.2
    assert s["fwavacc"] == pytest.approx(0.4 * 0.6 + 0.4 * 0.4 + 0.2 * 0.25)
    assert s["pixels"].tolist() == [4, 4, 2]


def test_confusion_from_label_and_prediction_maps():
    label = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 255, 7]])
    pred = np.array([[0, 0, 0, 1], [1, 1, 2, 2], [0, 2, 1, 0]])
    hist = confusion(label, pred, 3)
    assert hist.tolist() == [[3, 1, 0], [0, 2, 2], [1, 0, 1]]  # 255 and 7 are not classes: skipped
    # an ignore label inside the class range is skipped as well
    hist = confusion(label, pred, 3, ignore_label=2)
    assert hist.tolist() == [[3, 1, 0], [0, 2, 2], [0, 0, 0]]
    # float labels (a net's label blob) work the same
    assert confusion(label.astype(np.float32), pred, 3).tolist() == [[3, 1, 0], [0, 2, 2], [1, 0, 1]]


def test_running_matrix_counts_ignored_pixels():
    cm = ConfusionMatrix(3, ignore_label=255)
    cm.update(np.array([0, 1, 255, 9]), np.array([0, 2, 1, 0]))
    cm.update(np.array([2]), np.array([2]))
    assert cm.hist.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    assert cm.ignored == 2
    assert cm.scores()["pixel_accuracy"] == pytest.approx(2 / 3)


def test_absent_classes_follow_numpy_nan_rules():
    # class 2 never labelled but predicted once; class 3 never labelled nor predicted
    hist = np.array([[2, 0, 1, 0], [0, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    s = scores(hist)
    assert math.isnan(s["class_accuracy"][2]) and math.isnan(s["class_accuracy"][3])
    assert s["mean_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["iu"][2] == 0 and math.isnan(s["iu"][3])
    assert s["mean_iu"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert s["fwavacc"] == pytest.approx(0.5 * 2 / 3 + 0.5 * 1)


def score_py(label, pred, n):
    """fcn.berkeleyvision.org score.py's definitions, restated (fast_hist + do_seg_tests' formulas)."""
    k = (label >= 0) & (label < n)
    hist = np.bincount(n * label[k].astype(int) + pred[k], minlength=n ** 2).reshape(n, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.diag(hist).sum() / hist.sum()
        cls_acc = np.nanmean(np.diag(hist) / hist.sum(1))
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
        freq = hist.sum(1) / hist.sum()
    return hist, acc, cls_acc, np.nanmean(iu), (freq[freq > 0] * iu[freq > 0]).sum()


def test_random_maps_match_score_py_definitions():
    rng = np.random.default_rng(4)
    n = 5
    label = rng.integers(0, n, (3, 30, 40))
    label[rng.random(label.shape) < 0.1] = 255  # VOC's boundary label
    label[label == 3] = 4  # class 3 never labelled
    pred = rng.integers(0, n, label.shape)
    cm = ConfusionMatrix(n)
    for lab, p in zip(label, pred):
        cm.update(lab, p)
    hist, acc, cls_acc, mean_iu, fw = score_py(label.ravel(), pred.ravel(), n)
    assert cm.hist.tolist() == hist.tolist()
    s = cm.scores()
    assert s["pixel_accuracy"] == pytest.approx(acc)
    assert s["mean_accuracy"] == pytest.approx(cls_acc)
    assert s["mean_iu"] == pytest.approx(mean_iu)
    assert s["fwavacc"] == pytest.approx(fw)


def test_bad_inputs_are_errors():
    with pytest.raises(CaffeishError, match="labels for"):
        confusion(np.zeros(3), np.zeros(4), 2)
    with pytest.raises(CaffeishError, match="outside"):
        confusion(np.zeros(3), np.array([0, 1, 2]), 2)
    with pytest.raises(CaffeishError, match="square"):
        scores(np.zeros((2, 3)))
