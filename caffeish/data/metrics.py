"""Metrics: how close two arrays are (the golden cases' measure), and segmentation scores.

relative_error(ours, reference) = max |ours - reference| / (max |reference| + 1e-12),
the tolerance measure of ../shared/golden's meta.json, used to compare a net with
Caffe, a converted net with its source, or the GPU with the CPU.

Segmentation: the confusion matrix and fcn.berkeleyvision.org's score.py definitions.

The confusion matrix `hist` is n x n, rows the ground-truth class, columns the
predicted class.  As in score.py, a pixel counts only when its label is a
class, 0 <= label < n; any other label (255 in PASCAL VOC, say) is ignored.
`ignore_label` ignores one more value, as Caffe's loss_param.ignore_label.

From hist (score.py's formulas, with numpy's nan rules):
  pixel accuracy       = sum(diag) / sum(hist)
  class accuracy[i]    = diag[i] / hist[i, :].sum()          (nan when class i never occurs)
  mean class accuracy  = nanmean(class accuracy)
  IU[i]                = diag[i] / (hist[i, :].sum() + hist[:, i].sum() - diag[i])
  mean IU              = nanmean(IU)                          (classes neither labelled nor predicted are skipped)
  frequency-weighted IU = sum over classes with freq > 0 of freq[i] * IU[i],  freq = hist[i, :].sum() / sum(hist)
"""
import warnings

import numpy as np

from caffeish.errors import CaffeishError


def relative_error(ours, reference):
    """max |ours - reference| / (max |reference| + 1e-12), in float64; 0 for empty arrays."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if ours.size == 0 and reference.size == 0:
        return 0.0
    return float(np.max(np.abs(ours - reference)) / (np.max(np.abs(reference)) + 1e-12))


def compare_blobs(get, expected, tolerance, exact=()):
    """Compare blobs with recorded ones (a golden case's blobs.npz, `exact` from its meta.json).

    get(name) gives our array for a blob (any backend) or None when we have no
    such blob.  Returns (worst relative error, [one line per blob that fails]):
    shapes must agree, `exact` blobs (pooling masks, argmax indices) must be
    identical, the others within `tolerance` (relative_error)."""
    from caffeish.runtime.backend import to_numpy

    worst, failures = 0.0, []
    for name in expected.files if hasattr(expected, "files") else expected:
        theirs = np.asarray(expected[name])
        ours = get(name)
        if ours is None:
            failures.append(f"{name}: missing from our net")
            continue
        ours = to_numpy(ours)
        if tuple(ours.shape) != tuple(theirs.shape):
            failures.append(f"{name}: shape {tuple(ours.shape)} != Caffe's {tuple(theirs.shape)}")
        elif name in exact:
            if not np.array_equal(ours, theirs):
                failures.append(f"{name}: must match exactly; {int(np.sum(ours != theirs))} element(s) differ")
        else:
            err = relative_error(ours, theirs)
            worst = max(worst, err)
            if not err <= tolerance:
                failures.append(f"{name}: relative error {err:.3g} > {tolerance:g}")
    return worst, failures


def confusion(label, pred, n, ignore_label=None):
    """The n x n int64 confusion matrix of label (ground truth) against pred (class indices), any shape."""
    label = np.asarray(label).ravel()
    pred = np.asarray(pred).ravel()
    if label.shape != pred.shape:
        raise CaffeishError(f"confusion: {label.size} labels for {pred.size} predictions")
    if label.dtype.kind == "f":
        label = np.rint(label)
    label = label.astype(np.int64)
    pred = pred.astype(np.int64)
    keep = (label >= 0) & (label < n)
    if ignore_label is not None:
        keep &= label != int(ignore_label)
    if ((pred[keep] < 0) | (pred[keep] >= n)).any():
        raise CaffeishError(f"confusion: a predicted class is outside [0, {n})")
    return np.bincount(n * label[keep] + pred[keep], minlength=n * n).reshape(n, n)


class ConfusionMatrix:
    """A running confusion matrix: `update(label, pred)` per image, then `scores()`."""

    def __init__(self, n, ignore_label=None):
        self.n = int(n)
        self.ignore_label = ignore_label
        self.hist = np.zeros((self.n, self.n), dtype=np.int64)
        self.ignored = 0  # pixels not counted (ignore label or not a class)

    def update(self, label, pred):
        h = confusion(label, pred, self.n, self.ignore_label)
        self.hist += h
        self.ignored += int(np.asarray(label).size - h.sum())
        return h

    def scores(self):
        return scores(self.hist)


def scores(hist):
    """score.py's metrics of a confusion matrix, as a dict of floats and per-class arrays."""
    hist = np.asarray(hist, dtype=np.float64)
    if hist.ndim != 2 or hist.shape[0] != hist.shape[1]:
        raise CaffeishError(f"a confusion matrix is square; got shape {hist.shape}")
    total = hist.sum()
    diag = np.diag(hist)
    labelled = hist.sum(1)
    predicted = hist.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-nan: nan, as in score.py
        pixel_accuracy = diag.sum() / total if total else np.nan
        class_accuracy = diag / labelled
        iu = diag / (labelled + predicted - diag)
        freq = labelled / total if total else np.zeros_like(labelled)
        mean_accuracy = np.nanmean(class_accuracy)
        mean_iu = np.nanmean(iu)
    present = freq > 0
    return {
        "pixel_accuracy": float(pixel_accuracy),
        "mean_accuracy": float(mean_accuracy),
        "mean_iu": float(mean_iu),
        "fwavacc": float((freq[present] * iu[present]).sum()),
        "class_accuracy": class_accuracy,
        "iu": iu,
        "pixels": labelled.astype(np.int64),
        "predicted": predicted.astype(np.int64),
    }
