"""Loss layers and Accuracy.

Caffe's LossLayer takes 2 bottoms (prediction, label/target), checks that they
have the same first dimension, and produces a scalar top of shape ().  Loss
layers default to loss_weight 1 and, like Caffe (AutoTopBlobs), would get an
anonymous top if the prototxt gives none.  None of them owns blobs.
"""
import math

from caffeish.registry import Layer, register

from caffeish.layers.neuron import legacy_shape


def _count(shape, start=0, end=None):
    return math.prod(shape[start:end])


class LossLayer(Layer):
    """Caffe's LossLayer base: 2 bottoms, 1 scalar top, bottoms agree on shape[0]."""

    exact_bottoms = 2
    exact_tops = 1
    auto_top_blobs = True  # Caffe's AutoTopBlobs(): a missing top is created anonymously

    def check(self, bottoms):
        """Per-type checks after the common one; override."""

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
        self.check_label_count(bottoms, self.axis)

    def extra_tops(self, bottoms):
        return [bottoms[0]]


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

    def check(self, bottoms):
        if len(bottoms) < 3 and not self.has_source:
            raise self.error(
                "the infogain matrix is missing: give infogain_loss_param.source "
                "(a binaryproto) or a third bottom"
            )
        axis = self.check_label_count(bottoms, self.axis)
        num_labels = bottoms[0][axis]
        if len(bottoms) == 3 and _count(bottoms[2]) != num_labels * num_labels:
            raise self.error(
                f"the infogain matrix (bottom 2, shape {bottoms[2]}) must have "
                f"{num_labels}*{num_labels} = {num_labels * num_labels} elements "
                f"(bottom 0 has {num_labels} labels on axis {axis})"
            )

    def extra_tops(self, bottoms):
        return [bottoms[0]]


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


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(LossLayer):
    """Caffe's SigmoidCrossEntropyLoss: cross-entropy of sigmoid(bottom 0) against the
    targets in bottom 1, which must hold the same count."""

    def check(self, bottoms):
        if _count(bottoms[0]) != _count(bottoms[1]):
            raise self.error(
                f"inputs must have the same count: bottom 0 {bottoms[0]} has "
                f"{_count(bottoms[0])} values, bottom 1 {bottoms[1]} has {_count(bottoms[1])}"
            )


@register("HingeLoss")
class HingeLoss(LossLayer):
    """Caffe's HingeLoss (L1 or L2): one integer label per item of bottom 0.

    Caffe checks only the common first-dimension rule.
    """


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
        tops = [()]
        if len(self.param.top) > 1:
            tops.append((data[axis],))
        return tops
