"""Loss layers and Accuracy.

Caffe's LossLayer takes 2 bottoms (prediction, label/target), checks that they
have the same first dimension, and produces a scalar top of shape ().  Loss
layers default to loss_weight 1 and, like Caffe (AutoTopBlobs), would get an
anonymous top if the prototxt gives none.  None of them owns blobs.

Forward gives the loss value itself: `loss_weight` only scales the loss's
contribution to the net's objective, never the top's data (Caffe's Layer::Forward
keeps the data and multiplies by the weight stored in the top's diff).  Labels are
read the way Caffe reads them, static_cast<int> (truncation toward zero); a label
outside the class range, which Caffe does not check in release builds, is an error.

Backward (../shared/caffe/training.md 10.7): the loss weight lw is the top's diff
(`top_diffs[0]`, its first value), each layer scales its gradient by lw divided by
its normalizer, in float32 and in Caffe's order of operations.  Backpropagating into
the labels (bottom 1) is fatal, as in Caffe; force_backward never asks for them
(`allow_force_backward`), except for EuclideanLoss, whose two bottoms are both data,
and ContrastiveLoss, whose similarity labels are bottom 2.  What Caffe keeps from the
forward (SoftmaxWithLoss's and InfogainLoss's probabilities, SigmoidCrossEntropyLoss's
sigmoid and normalizer, HingeLoss's margins, ContrastiveLoss's differences) is kept
on the layer when its backward will run (`needs_backward`); otherwise the backward
computes it again from the bottoms.  Accuracy has no backward: it is fatal only when a
bottom asks for a diff.
"""
import math

import numpy as np

from caffeish.errors import UnsupportedError
from caffeish.graph.registry import Layer, register
from caffeish.formats.schema import pb

from caffeish.ops.neuron import legacy_shape, sigmoid
from caffeish.ops.routing import f32, softmax

FLT_MIN = np.float32(np.finfo(np.float32).tiny)  # SoftmaxWithLoss's log clamp
LOG_THRESHOLD = np.float32(1e-20)  # Caffe's kLOG_THRESHOLD
Norm = pb.LossParameter


def _count(shape, start=0, end=None):
    return math.prod(shape[start:end])


def scalar(xp, value):
    """A shape-() float32 array."""
    return xp.reshape(xp.asarray(value, dtype=xp.float32), ())


def normalization_mode(loss_param, default):
    """Caffe's choice: `normalization` if set, else the legacy `normalize` (true: VALID,
    false: BATCH_SIZE), else the layer's default."""
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return Norm.VALID if loss_param.normalize else Norm.BATCH_SIZE
    return default


def normalizer(mode, outer, inner, valid):
    """Caffe's get_normalizer: FULL outer*inner, VALID the counted labels, BATCH_SIZE outer,
    NONE 1; never below 1 (so that a batch of ignored labels gives 0, not NaN)."""
    if mode == Norm.FULL:
        n = outer * inner
    elif mode == Norm.VALID:
        n = valid
    elif mode == Norm.BATCH_SIZE:
        n = outer
    else:
        n = 1
    return f32(max(1.0, float(n)))


def int_labels(xp, labels):
    """Labels as Caffe reads them: static_cast<int>, truncating toward zero."""
    return labels.astype(xp.int64)


def ignored_mask(xp, labels, ignore_label):
    """True where a label counts (is not the ignore_label)."""
    if ignore_label is None:
        return xp.ones(labels.shape, dtype=bool)
    return labels != ignore_label


def check_labels(layer, xp, labels, valid, num_classes, what="label"):
    """Refuse counted labels outside [0, num_classes) (Caffe only DCHECKs them)."""
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bool(xp.any(bad)):
        pos = int(xp.flatnonzero(xp.reshape(bad, (-1,)))[0])
        value = int(xp.reshape(labels, (-1,))[pos])
        raise layer.error(
            f"{what} {value} at position {pos} of bottom 1 is outside the {num_classes} classes "
            f"0..{num_classes - 1}"
        )


def valid_normalizer(xp, mode, outer, inner, valid, ignore_label):
    """normalizer() with the VALID count taken on the device (no host sync): a float32 scalar, or
    a 0-d float32 array of xp."""
    if mode != Norm.VALID or ignore_label is None:
        return normalizer(mode, outer, inner, outer * inner)
    return xp.maximum(xp.sum(valid, dtype=xp.float32), f32(1))


def loss_weight(xp, top_diffs):
    """Caffe's `top[0]->cpu_diff()[0]`: the loss weight a loss layer scales its gradient by (a
    0-d array or scalar of xp; no host sync)."""
    return xp.reshape(top_diffs[0], (-1,))[0]


def flat_positions(xp, outer, classes, inner, labels2):
    """Flat indices, into an (outer, classes, inner) array, of the label entries (o, labels2[o, i], i)."""
    o = xp.arange(outer, dtype=xp.int64)[:, None] * (classes * inner)
    i = xp.arange(inner, dtype=xp.int64)[None, :]
    return xp.reshape(o + labels2 * inner + i, (-1,))


def split_axis(shape, axis):
    """(outer, classes, inner) of a blob around its class axis."""
    return _count(shape, 0, axis), shape[axis], _count(shape, axis + 1)


def pick(xp, scores3, labels2):
    """scores3[o, labels2[o, i], i] for every (o, i)."""
    return xp.take_along_axis(scores3, labels2[:, None, :], axis=1)[:, 0, :]


class LossLayer(Layer):
    """Caffe's LossLayer base: 2 bottoms, 1 scalar top, bottoms agree on shape[0]."""

    exact_bottoms = 2
    exact_tops = 1
    auto_top_blobs = True  # Caffe's AutoTopBlobs(): a missing top is created anonymously

    def check(self, bottoms):
        """Per-type checks after the common one; override."""

    def allow_force_backward(self, bottom_index):
        """Caffe's LossLayer: force_backward never makes the labels (bottom 1) need a diff."""
        return bottom_index != 1

    def refuse(self, propagate_down, index=1, what="label inputs"):
        """Caffe's LOG(FATAL) when a diff is asked for bottom `index` (the labels)."""
        if len(propagate_down) > index and propagate_down[index]:
            name = self.param.bottom[index] if index < len(self.param.bottom) else f"bottom {index}"
            raise UnsupportedError(
                f"layer '{self.name}' ({self.type}): cannot backpropagate to {what} (bottom {index}, "
                f"'{name}'), but the net asks for its diff (a layer that needs backward produces it, or "
                f"propagate_down/force_backward asks for it); give this layer propagate_down: false for "
                f"that bottom (Caffe: {self.type} Layer cannot backpropagate to {what}.)")

    def extra_tops(self, bottoms):
        """Shapes of tops after the scalar loss (SoftmaxWithLoss/InfogainLoss: the probabilities)."""
        return []

    def reshape(self, bottom_shapes):
        self.check_counts(len(bottom_shapes), len(self.param.top))
        bottoms = [tuple(s) for s in bottom_shapes]
        for i in (0, 1):
            if len(bottoms[i]) == 0:
                raise self.error(f"bottom {i} is a scalar; it needs at least 1 axis (the batch)")
        if bottoms[0][0] != bottoms[1][0]:
            raise self.error(
                f"the data and label should have the same first dimension: bottom 0 is "
                f"{bottoms[0]}, bottom 1 is {bottoms[1]}"
            )
        self.check(bottoms)
        return [()] + self.extra_tops(bottoms)[: len(self.param.top) - 1]

    def check_label_count(self, bottoms, axis_field):
        """SoftmaxWithLoss/InfogainLoss: one label per prediction outside the class axis."""
        data, label = bottoms[0], bottoms[1]
        axis = self.canonical_axis(axis_field, len(data))
        outer, inner = _count(data, 0, axis), _count(data, axis + 1)
        if outer * inner != _count(label):
            raise self.error(
                f"number of labels must match number of predictions: bottom 0 {data} with the "
                f"class axis {axis} has {outer}*{inner} = {outer * inner} predictions, but bottom 1 "
                f"{label} holds {_count(label)} labels (for (N, C, H, W) scores the label count "
                f"must be N*H*W, values in 0..C-1)"
            )
        return axis


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(LossLayer):
    """Caffe's SoftmaxWithLoss: softmax over softmax_param.axis (default 1), then the
    multinomial logistic loss.  Optional top 1: the probabilities (bottom 0's shape).
    """

    exact_tops = None
    min_tops = 1
    max_tops = 2

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.axis = param.softmax_param.axis
        loss = param.loss_param
        self.ignore_label = loss.ignore_label if loss.HasField("ignore_label") else None

    def check(self, bottoms):
        self.canonical = self.check_label_count(bottoms, self.axis)

    def extra_tops(self, bottoms):
        return [bottoms[0]]

    def forward(self, xp, bottoms, blobs):
        """loss = -sum(log(max(p[label], FLT_MIN))) over counted labels / normalizer.

        Normalization: loss_param.normalization (default VALID), or the legacy
        normalize (true VALID, false BATCH_SIZE).  Top 1: the probabilities.
        """
        scores, labels = bottoms[0], bottoms[1]
        outer, classes, inner = split_axis(scores.shape, self.canonical)
        prob = softmax(xp, scores, self.canonical)
        self.prob = prob if self.needs_backward else None  # Caffe's prob_, read by Backward
        labels = int_labels(xp, xp.reshape(labels, (outer, inner)))
        valid = ignored_mask(xp, labels, self.ignore_label)
        check_labels(self, xp, labels, valid, classes)
        picked = pick(xp, xp.reshape(prob, (outer, classes, inner)), xp.where(valid, labels, 0))
        logs = xp.where(valid, xp.log(xp.maximum(picked, FLT_MIN)), f32(0))
        if xp is np:  # Caffe's CPU loop adds one pixel at a time in float: an unnormalized FCN loss
            # (a sum of 10^5 terms) then prints as Caffe's to the last digit; numpy's sum is pairwise.
            loss = -np.cumsum(logs.reshape(-1), dtype=np.float32)[-1] if logs.size else f32(0)
        else:
            loss = -xp.sum(logs, dtype=xp.float32)
        mode = normalization_mode(self.param.loss_param, Norm.VALID)
        tops = [scalar(xp, loss / normalizer(mode, outer, inner, int(xp.sum(valid))))]
        return tops + [prob][: len(self.param.top) - 1]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = (p - onehot(label)) * (lw / normalizer), 0 at every class of an ignored position."""
        self.refuse(propagate_down)
        out = [None] * len(bottoms)
        if propagate_down[0]:
            mode = normalization_mode(self.param.loss_param, Norm.VALID)
            out[0] = softmax_loss_grad(self, xp, top_diffs, tops, bottoms, mode, None)
        return out


def _probabilities(layer, xp, tops, scores):
    """Caffe's prob_ in Backward: top 1 where there is one (it shares prob_'s memory, so a later
    in-place layer's changes show), else the forward's copy, else the softmax again."""
    if len(tops) > 1 and tops[1] is not None:
        return tops[1]
    prob = getattr(layer, "prob", None)
    if prob is not None and tuple(prob.shape) == tuple(scores.shape):
        return prob
    return softmax(xp, scores, layer.canonical)


def softmax_loss_grad(layer, xp, top_diffs, tops, bottoms, mode, h):
    """The bottom-0 diff of SoftmaxWithLoss (h None) or InfogainLoss (h the (C, C) matrix):
    Caffe's loop as array operations, then the scaling by lw / normalizer."""
    scores, labels = bottoms[0], bottoms[1]
    outer, classes, inner = split_axis(scores.shape, layer.canonical)
    prob = xp.reshape(_probabilities(layer, xp, tops, scores), (outer, classes, inner))
    labels = int_labels(xp, xp.reshape(labels, (outer, inner)))
    valid = ignored_mask(xp, labels, layer.ignore_label)
    safe = xp.where(valid, labels, 0) if layer.ignore_label is not None else labels
    if h is None:  # p, then p[label] -= 1
        diff = xp.array(prob, dtype=xp.float32, copy=True)
        flat = xp.reshape(diff, (-1,))
        idx = flat_positions(xp, outer, classes, inner, safe)
        flat[idx] = flat[idx] - f32(1)
    else:  # p * sum_j H[label, j] - H[label, :]
        sum_rows = xp.sum(h, axis=1, dtype=xp.float32)
        diff = prob * sum_rows[safe][:, None, :]
        diff -= xp.transpose(h[safe], (0, 2, 1))
    if layer.ignore_label is not None:
        diff *= valid[:, None, :]
    z = valid_normalizer(xp, mode, outer, inner, valid, layer.ignore_label)
    diff *= loss_weight(xp, top_diffs) / z
    return xp.reshape(diff, scores.shape)


@register("InfogainLoss")
class InfogainLoss(LossLayer):
    """Caffe's InfogainLoss: softmax over infogain_loss_param.axis, then a loss weighted
    by the infogain matrix H (num_labels x num_labels).

    H is bottom 2, or read from infogain_loss_param.source when there are only
    2 bottoms (that file is not read for shape inference).  Optional top 1:
    the probabilities.
    """

    exact_bottoms = None
    min_bottoms = 2
    max_bottoms = 3
    exact_tops = None
    min_tops = 1
    max_tops = 2

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = param.infogain_loss_param
        self.axis, self.source = p.axis, p.source
        self.has_source = p.HasField("source")
        loss = param.loss_param
        self.ignore_label = loss.ignore_label if loss.HasField("ignore_label") else None

    matrix = None  # H read from `source`, cached at the first forward

    def check(self, bottoms):
        if len(bottoms) < 3 and not self.has_source:
            raise self.error(
                "the infogain matrix is missing: give infogain_loss_param.source "
                "(a binaryproto) or a third bottom"
            )
        if self.param.loss_param.HasField("normalize"):
            raise self.error('loss_param.normalize is deprecated for InfogainLoss; use "normalization"')
        axis = self.check_label_count(bottoms, self.axis)
        self.canonical = axis
        num_labels = bottoms[0][axis]
        if len(bottoms) == 3 and _count(bottoms[2]) != num_labels * num_labels:
            raise self.error(
                f"the infogain matrix (bottom 2, shape {bottoms[2]}) must have "
                f"{num_labels}*{num_labels} = {num_labels * num_labels} elements "
                f"(bottom 0 has {num_labels} labels on axis {axis})"
            )

    def extra_tops(self, bottoms):
        return [bottoms[0]]

    def infogain(self, xp, bottoms, classes):
        """H as a (classes, classes) array: bottom 2, or the `source` binaryproto."""
        if len(bottoms) > 2:
            return xp.reshape(bottoms[2], (classes, classes))
        if self.matrix is None:
            from caffeish.formats.io import read_binaryproto

            self.matrix = read_binaryproto(self.source).astype(np.float32, copy=False)
        if self.matrix.size != classes * classes:
            raise self.error(
                f"the infogain matrix in '{self.source}' has shape {self.matrix.shape} "
                f"({self.matrix.size} values); bottom 0 has {classes} labels, so it needs "
                f"{classes}*{classes} = {classes * classes}"
            )
        return xp.asarray(self.matrix.reshape(classes, classes))

    def forward(self, xp, bottoms, blobs):
        """loss = -sum_l H[label, l] * log(max(p_l, 1e-20)) over counted labels / normalizer.

        p is the softmax over infogain_loss_param.axis; normalization
        (loss_param.normalization, default VALID).  Top 1: the probabilities.
        """
        scores, labels = bottoms[0], bottoms[1]
        outer, classes, inner = split_axis(scores.shape, self.canonical)
        h = self.infogain(xp, bottoms, classes)
        prob = softmax(xp, scores, self.canonical)
        self.prob = prob if self.needs_backward else None  # Caffe's prob_, read by Backward
        labels = int_labels(xp, xp.reshape(labels, (outer, inner)))
        valid = ignored_mask(xp, labels, self.ignore_label)
        check_labels(self, xp, labels, valid, classes)
        logp = xp.log(xp.maximum(xp.reshape(prob, (outer, classes, inner)), LOG_THRESHOLD))
        rows = h[xp.where(valid, labels, 0)]  # (outer, inner, classes): H[label, :]
        per_item = xp.einsum("oic,oci->oi", rows, logp)
        loss = -xp.sum(xp.where(valid, per_item, f32(0)), dtype=xp.float32)
        mode = self.param.loss_param.normalization
        tops = [scalar(xp, loss / normalizer(mode, outer, inner, int(xp.sum(valid))))]
        return tops + [prob][: len(self.param.top) - 1]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx_k = (p_k * sum_j H[label, j] - H[label, k]) * (lw / normalizer), 0 at ignored
        positions.  Backpropagating into the labels or into H (bottom 2) is fatal."""
        self.refuse(propagate_down)
        self.refuse(propagate_down, 2, "infogain inputs")
        out = [None] * len(bottoms)
        if propagate_down[0]:
            classes = bottoms[0].shape[self.canonical]
            h = self.infogain(xp, bottoms, classes)
            mode = self.param.loss_param.normalization
            out[0] = softmax_loss_grad(self, xp, top_diffs, tops, bottoms, mode, h)
        return out


@register("EuclideanLoss")
class EuclideanLoss(LossLayer):
    """Caffe's EuclideanLoss: sum((a - b)^2) / (2N); both bottoms hold the same count."""

    def check(self, bottoms):
        if _count(bottoms[0], 1) != _count(bottoms[1], 1):
            raise self.error(
                f"inputs must have the same dimension: bottom 0 {bottoms[0]} has "
                f"{_count(bottoms[0], 1)} values per item, bottom 1 {bottoms[1]} has "
                f"{_count(bottoms[1], 1)}"
            )

    def forward(self, xp, bottoms, blobs):
        """sum((a - b)^2) / N / 2, with N = shape[0]."""
        a, b = bottoms[0], bottoms[1]
        diff = xp.reshape(a, (-1,)) - xp.reshape(b, (-1,))
        self.diff = diff if self.needs_backward else None  # Caffe's diff_, read by Backward
        return [scalar(xp, xp.dot(diff, diff) / f32(a.shape[0]) / f32(2))]

    def allow_force_backward(self, bottom_index):
        """Both bottoms are data: force_backward may ask for either."""
        return True

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """da = (lw / N) * (a - b) and db = (-lw / N) * (a - b), each where asked."""
        out = [None, None]
        if not (propagate_down[0] or propagate_down[1]):
            return out
        a, b = bottoms[0], bottoms[1]
        diff = getattr(self, "diff", None)
        if diff is None or diff.size != a.size:
            diff = xp.reshape(a, (-1,)) - xp.reshape(b, (-1,))
        lw = loss_weight(xp, top_diffs)
        for i, sign in ((0, f32(1)), (1, f32(-1))):
            if propagate_down[i]:
                alpha = sign * lw / f32(bottoms[i].shape[0])
                out[i] = xp.reshape(diff * alpha, bottoms[i].shape)
        return out


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(LossLayer):
    """Caffe's SigmoidCrossEntropyLoss: cross-entropy of sigmoid(bottom 0) against the
    targets in bottom 1, which must hold the same count.

    Per element: -(x * (t - [x >= 0]) - log(1 + exp(-|x|))), summed over targets
    whose int value is not loss_param.ignore_label, divided by the normalizer:
    loss_param.normalization, else the legacy normalize, else BATCH_SIZE (N).
    """

    def __init__(self, param, phase):
        super().__init__(param, phase)
        loss = param.loss_param
        self.ignore_label = loss.ignore_label if loss.HasField("ignore_label") else None

    def forward(self, xp, bottoms, blobs):
        x = xp.reshape(bottoms[0], (-1,))
        t = xp.reshape(bottoms[1], (-1,))
        positive = (x >= 0).astype(xp.float32)
        terms = x * (t - positive) - xp.log(f32(1) + xp.exp(x - f32(2) * x * positive))
        valid = ignored_mask(xp, int_labels(xp, t), self.ignore_label)
        if self.ignore_label is not None:
            terms = xp.where(valid, terms, f32(0))
        loss = -xp.sum(terms, dtype=xp.float32)
        # Caffe's normalizer_ (Backward divides by the forward's) and its sigmoid layer's output.
        self.norm = self.normalizer(xp, bottoms[0], valid)
        self.sig = sigmoid(xp, bottoms[0]) if self.needs_backward else None
        return [scalar(xp, loss / self.norm)]

    def normalizer(self, xp, x, valid):
        outer = x.shape[0]
        mode = normalization_mode(self.param.loss_param, Norm.BATCH_SIZE)
        count = int(xp.sum(valid)) if self.ignore_label is not None else x.size
        return normalizer(mode, outer, x.size // max(outer, 1), count)

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = (sigmoid(x) - t) * (lw / Z), 0 where int(t) is the ignore_label; Z is the
        forward's normalizer."""
        self.refuse(propagate_down)
        if not propagate_down[0]:
            return [None, None]
        x, t = bottoms[0], bottoms[1]
        sig = getattr(self, "sig", None)
        if sig is None or tuple(sig.shape) != tuple(x.shape):
            sig = sigmoid(xp, x)
        diff = sig - xp.reshape(t, x.shape)
        valid = None
        if self.ignore_label is not None:
            valid = ignored_mask(xp, int_labels(xp, xp.reshape(t, x.shape)), self.ignore_label)
            diff *= valid
        norm = getattr(self, "norm", None)
        if norm is None:  # no forward ran: the normalizer it would have computed
            norm = self.normalizer(xp, x, valid)
        diff *= loss_weight(xp, top_diffs) / norm
        return [diff, None]

    def check(self, bottoms):
        if _count(bottoms[0]) != _count(bottoms[1]):
            raise self.error(
                f"inputs must have the same count: bottom 0 {bottoms[0]} has "
                f"{_count(bottoms[0])} values, bottom 1 {bottoms[1]} has {_count(bottoms[1])}"
            )


@register("HingeLoss")
class HingeLoss(LossLayer):
    """Caffe's HingeLoss (L1 or L2): one integer label per item of bottom 0.

    Caffe checks only the common first-dimension rule.  With x the (N, D) scores
    and t = -x at the label, x elsewhere: L1 = sum(max(0, 1 + t)) / N,
    L2 = sum(max(0, 1 + t)^2) / N (hinge_loss_param.norm, default L1).
    """

    def margins(self, xp, bottoms):
        """m = max(0, 1 + x), with -x at the label entry, as (N, D)."""
        scores = bottoms[0]
        num = scores.shape[0]
        rows = xp.reshape(scores, (num, -1))
        labels = int_labels(xp, xp.reshape(bottoms[1], (-1,))[:num])
        check_labels(self, xp, labels, xp.ones(labels.shape, dtype=bool), rows.shape[1])
        at_label = xp.arange(rows.shape[1])[None, :] == labels[:, None]
        return xp.maximum(f32(1) + xp.where(at_label, -rows, rows), f32(0))

    def forward(self, xp, bottoms, blobs):
        num = bottoms[0].shape[0]
        margins = self.margins(xp, bottoms)
        self.kept = margins if self.needs_backward else None  # Caffe keeps them in bottom[0]'s diff
        if self.param.hinge_loss_param.norm == pb.HingeLossParameter.L2:
            total = xp.dot(xp.reshape(margins, (-1,)), xp.reshape(margins, (-1,)))
        else:
            total = xp.sum(margins, dtype=xp.float32)
        return [scalar(xp, total / f32(num))]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """With m the forward's margins and the label entry's sign flipped: L1 dx = sign(m) * (lw / N),
        L2 dx = m * (2 lw / N)."""
        self.refuse(propagate_down)
        if not propagate_down[0]:
            return [None, None]
        scores = bottoms[0]
        num = scores.shape[0]
        kept = getattr(self, "kept", None)
        if kept is None or kept.size != scores.size:
            diff = self.margins(xp, bottoms)
        else:  # the layer's own array, used up here (a second backward computes it again)
            diff, self.kept = kept, None
        dim = diff.shape[1]
        flat = xp.reshape(diff, (-1,))
        labels = int_labels(xp, xp.reshape(bottoms[1], (-1,))[:num])
        idx = xp.arange(num, dtype=xp.int64) * dim + labels
        flat[idx] = -flat[idx]
        lw = loss_weight(xp, top_diffs)
        if self.param.hinge_loss_param.norm == pb.HingeLossParameter.L2:
            diff *= lw * f32(2) / f32(num)
        else:
            diff = xp.sign(diff)
            diff *= lw / f32(num)
        return [xp.reshape(diff, scores.shape), None]


@register("MultinomialLogisticLoss")
class MultinomialLogisticLoss(LossLayer):
    """Caffe's MultinomialLogisticLoss: -log(prob[label]) averaged over items.

    The labels (bottom 1) must be (N,) or (N, 1, 1, 1)-like: Caffe checks its
    legacy channels, height and width are 1.
    """

    def check(self, bottoms):
        _, c, h, w = legacy_shape(self, bottoms[1], "bottom 1 (the labels)")
        if (c, h, w) != (1, 1, 1):
            raise self.error(
                f"bottom 1 (the labels) must have one value per item: its channels, height and "
                f"width must be 1, got shape {bottoms[1]}"
            )

    def forward(self, xp, bottoms, blobs):
        """-sum(log(max(prob[n, label_n], 1e-20))) / N; bottom 0 holds probabilities."""
        prob = bottoms[0]
        num = prob.shape[0]
        rows = xp.reshape(prob, (num, -1))
        labels = int_labels(xp, xp.reshape(bottoms[1], (-1,))[:num])
        check_labels(self, xp, labels, xp.ones(labels.shape, dtype=bool), rows.shape[1])
        picked = xp.take_along_axis(rows, labels[:, None], axis=1)
        loss = -xp.sum(xp.log(xp.maximum(picked, LOG_THRESHOLD)), dtype=xp.float32)
        return [scalar(xp, loss / f32(num))]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx[n, label_n] = (-lw / N) / max(x[n, label_n], 1e-20), 0 elsewhere."""
        self.refuse(propagate_down)
        if not propagate_down[0]:
            return [None, None]
        prob = bottoms[0]
        num = prob.shape[0]
        dim = prob.size // num if num else 0
        labels = int_labels(xp, xp.reshape(bottoms[1], (-1,))[:num])
        idx = xp.arange(num, dtype=xp.int64) * dim + labels
        scale = -loss_weight(xp, top_diffs) / f32(num)
        diff = xp.zeros(prob.shape, dtype=xp.float32)
        flat = xp.reshape(diff, (-1,))
        flat[idx] = scale / xp.maximum(xp.reshape(prob, (-1,))[idx], LOG_THRESHOLD)
        return [diff, None]


@register("ContrastiveLoss")
class ContrastiveLoss(LossLayer):
    """Caffe's ContrastiveLoss: bottoms a (N, C, 1, 1), b (N, C, 1, 1), similarity (N, 1, 1, 1).

    Shapes are read through the legacy accessors (at most 4 axes each; 2-D
    (N, C) features and a (N,) label are fine).
    """

    exact_bottoms = 3

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = param.contrastive_loss_param
        self.margin, self.legacy_version = p.margin, p.legacy_version

    def check(self, bottoms):
        a = legacy_shape(self, bottoms[0], "bottom 0")
        b = legacy_shape(self, bottoms[1], "bottom 1")
        sim = legacy_shape(self, bottoms[2], "bottom 2 (the similarity labels)")
        if a[1] != b[1]:
            raise self.error(
                f"bottoms 0 and 1 must have the same channel count: {bottoms[0]} vs {bottoms[1]}"
            )
        for i, s in ((0, a), (1, b)):
            if s[2:] != (1, 1):
                raise self.error(f"bottom {i} must have height and width 1, got shape {bottoms[i]}")
        if sim[1:] != (1, 1, 1):
            raise self.error(
                f"bottom 2 (the similarity labels) must have channels, height and width 1, "
                f"got shape {bottoms[2]}"
            )

    def forward(self, xp, bottoms, blobs):
        """d2 = |a - b|^2 per item; similar pairs (int label != 0) add d2, dissimilar ones
        max(margin - d, 0)^2 (legacy_version: max(margin - d2, 0)); the sum / N / 2."""
        a, b, sim = bottoms
        num = a.shape[0]
        diff = xp.reshape(a, (num, -1)) - xp.reshape(b, (num, -1))
        dist_sq = xp.einsum("ij,ij->i", diff, diff)
        self.cache = (diff, dist_sq) if self.needs_backward else None  # Caffe's diff_ and dist_sq_
        margin = f32(self.margin)
        if self.legacy_version:
            apart = xp.maximum(margin - dist_sq, f32(0))
        else:
            apart = xp.maximum(margin - xp.sqrt(dist_sq), f32(0)) ** 2
        similar = int_labels(xp, xp.reshape(sim, (-1,))[:num]) != 0
        loss = xp.sum(xp.where(similar, dist_sq, apart), dtype=xp.float32)
        return [scalar(xp, loss / f32(num) / f32(2))]

    def allow_force_backward(self, bottom_index):
        """a and b may get diffs under force_backward; the similarity labels (bottom 2) never."""
        return bottom_index != 2

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """Per item, with alpha = +-lw / N (+ for a, - for b) and d = |a - b|: a similar pair gets
        alpha (a - b); a dissimilar one -alpha (margin - d) / (d + 1e-4) (a - b) where margin > d,
        else 0 (legacy_version: -alpha (a - b) where margin > d^2).  Bottom 2 gets nothing (Caffe
        neither computes nor refuses it)."""
        out = [None, None, None]
        if not (propagate_down[0] or propagate_down[1]):
            return out
        a, b, sim = bottoms
        num = a.shape[0]
        cache = getattr(self, "cache", None)
        if cache is None or cache[0].size != a.size:
            diff = xp.reshape(a, (num, -1)) - xp.reshape(b, (num, -1))
            cache = diff, xp.einsum("ij,ij->i", diff, diff)
        diff, dist_sq = cache
        similar = int_labels(xp, xp.reshape(sim, (-1,))[:num]) != 0
        margin = f32(self.margin)
        alpha = loss_weight(xp, top_diffs) / f32(num)  # bottom 0's; bottom 1's is its negative
        if self.legacy_version:
            mdist = margin - dist_sq
            beta = -alpha
        else:
            dist = xp.sqrt(dist_sq)
            mdist = margin - dist
            beta = -alpha * mdist / (dist + f32(1e-4))
        coeff = xp.where(similar, alpha, xp.where(mdist > f32(0), beta, f32(0))).astype(xp.float32)
        grad = diff * coeff[:, None]
        if propagate_down[0]:
            out[0] = xp.reshape(grad, a.shape)
        if propagate_down[1]:
            out[1] = xp.reshape(-grad, b.shape)
        return out


@register("Accuracy")
class Accuracy(Layer):
    """Caffe's Accuracy layer: fraction of items whose label is among the top_k scores.

    Bottoms: scores and labels (one label per score position outside `axis`).
    Top 0: the accuracy, a scalar (); optional top 1: per-class accuracy
    (num_classes,) with num_classes = scores.shape[axis].
    """

    exact_bottoms = 2
    min_tops = 1
    max_tops = 2

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = param.accuracy_param
        self.top_k, self.axis = p.top_k, p.axis
        self.ignore_label = p.ignore_label if p.HasField("ignore_label") else None

    def reshape(self, bottom_shapes):
        self.check_counts(len(bottom_shapes), len(self.param.top))
        data, label = (tuple(s) for s in bottom_shapes)
        n_labels = _count(label)
        if n_labels and self.top_k > _count(data) // n_labels:
            raise self.error(
                f"top_k ({self.top_k}) must be less than or equal to the number of classes "
                f"({_count(data)} scores / {n_labels} labels = {_count(data) // n_labels})"
            )
        axis = self.canonical_axis(self.axis, len(data))
        outer, inner = _count(data, 0, axis), _count(data, axis + 1)
        if outer * inner != n_labels:
            raise self.error(
                f"number of labels must match number of predictions: bottom 0 {data} with the "
                f"class axis {axis} has {outer}*{inner} = {outer * inner} predictions, but bottom 1 "
                f"{label} holds {n_labels} labels"
            )
        self.canonical = axis
        tops = [()]
        if len(self.param.top) > 1:
            tops.append((data[axis],))
        return tops

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """Caffe's NOT_IMPLEMENTED when a bottom asks for a diff; otherwise nothing to do."""
        for i, wanted in enumerate(propagate_down):
            if wanted:
                raise UnsupportedError(
                    f"layer '{self.name}' (Accuracy) does not backpropagate, but the net asks for the diff of "
                    f"its bottom {i} ('{self.param.bottom[i]}') (force_backward, or a loss_weight on its top, "
                    f"asks for it); remove that, or leave the layer out of the training phase (include "
                    f"{{ phase: TEST }}) (Caffe: Not Implemented Yet)")
        return [None] * len(bottoms)

    def forward(self, xp, bottoms, blobs):
        """A label counts as found when at most top_k scores are >= its own score
        (Caffe's rule, so a tie with the true class counts against it).  Top 0: found /
        counted (0 when nothing is counted); top 1: the same per true class."""
        scores, labels = bottoms[0], bottoms[1]
        outer, classes, inner = split_axis(scores.shape, self.canonical)
        scores3 = xp.reshape(scores, (outer, classes, inner))
        labels = int_labels(xp, xp.reshape(labels, (outer, inner)))
        valid = ignored_mask(xp, labels, self.ignore_label)
        check_labels(self, xp, labels, valid, classes)
        safe = xp.where(valid, labels, 0)
        true_score = pick(xp, scores3, safe)
        at_least = xp.sum(scores3 >= true_score[:, None, :], axis=1)
        found = valid & (at_least <= self.top_k)
        count = int(xp.sum(valid))
        hits = xp.sum(found, dtype=xp.float32)
        tops = [scalar(xp, hits / f32(count) if count else f32(0))]
        if len(self.param.top) > 1:
            per_class = xp.bincount(safe[valid], minlength=classes).astype(xp.float32)
            per_hit = xp.bincount(safe[found], minlength=classes).astype(xp.float32)
            ratio = per_hit / xp.maximum(per_class, f32(1))
            tops.append(xp.where(per_class == 0, f32(0), ratio).astype(xp.float32))
        return tops
