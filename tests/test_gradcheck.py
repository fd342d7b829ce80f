"""Finite-difference gradient checks of every layer type that backpropagates, on small random nets.

For each case a net is built from prototxt (Input layers, the layer under test, `force_backward:
true`), run forward and backward as a user would, and the diff of every input blob and of every
parameter is compared with central differences of L = sum(top * dy) over the outputs (a loss output
contributes loss_weight * loss), on a random sample of elements and along one random direction
(tests/gradcheck_nets.py).  Inputs are drawn away from kinks (ReLU/AbsVal at 0, MAX ties, Clip
edges, hinge and contrastive margins).  Each case runs on the CPU and on the GPU code path (the
"strict" backend: our CUDA kernels compiled for the CPU, an array module that refuses what CuPy
refuses), and, where the layer keeps float64 arrays, alone on float64 inputs with a tolerance near
1e-6 ("float64 where the layer allows"; layers that compute in float32 skip that part, saying so).

Layers whose index or matrix bottom Caffe refuses to backpropagate into under force_backward
(Embed, BatchReindex, Filter, InfogainLoss with H as bottom 2) run without it, their top carrying a
loss weight; a per-element Bias "probe" in front of them gets their bottom's diff as its parameter
diff.  Also checked: in-place layers alone and in a chain, weight sharing, Parameter, Silence, a
Python layer, DummyData, small nets of several layers, and LSTMUnit's backward (no forward in this
runtime) against Caffe's forward written here in float64.

Where Caffe's backward is deliberately not the derivative of its forward, the check compares with
Caffe's formula instead (training.md 9.3 and 10): Dropout at TRAIN (the mask the forward drew), the
garbled in-place Power and Log, in-place BNLL (reads y as x) and Clip (passes everything), an
in-place ReLU reading the value later in-place layers left, SoftmaxWithLoss ignoring its prob top's
diff, Silence and Crop's reference bottom (zero diffs).  The last test checks that every registered
type is covered here or listed with the reason it is not.
"""
import os
import re
import shutil
import sys
import zlib

import numpy as np
import pytest
from gradcheck_nets import (
    away,
    build_net,
    distinct,
    layer_check64,
    net_check,
    normal,
    seed_outputs,
    uniform,
)

from caffeish.formats.schema import TEST, TRAIN, pb
from caffeish.graph.registry import registered_types

F32 = np.float32
HAVE_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None


def layer(body, bottoms, tops=("y",), name="L"):
    b = " ".join(f'bottom: "{x}"' for x in bottoms)
    t = " ".join(f'top: "{x}"' for x in tops)
    return f'layer {{ name: "{name}" {b} {t} {body} }}\n'


def labels(rng, shape, classes):
    return rng.integers(0, classes, size=shape).astype(np.float32)


GAUSS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


class Case:
    """One layer `L` with Input bottoms.  inputs(rng) -> {name: array} (the layer's bottoms, in order).
    fixed: bottoms that get no diff (labels).  rtol64: the tolerance of the float64 layer check.
    setup(net): sets parameter values.  The other keywords go to net_check."""

    def __init__(self, id, body, inputs, tops=("y",), fixed=(), phase=TRAIN, rtol64=1e-6, setup=None, **kw):
        self.id, self.body, self.inputs, self.tops = id, body, inputs, tuple(tops)
        self.fixed, self.phase, self.rtol64, self.setup, self.kw = fixed, phase, rtol64, setup, kw


def set_params(**values):
    """setup(net): give layer parameters values ({'L': [array, ...]})."""
    def setup(net):
        for name, arrays in values.items():
            for blob, value in zip(net.params[name], arrays):
                blob.data[...] = value
    return setup


CASES = [
    # -- Convolution family --------------------------------------------------------------------
    Case("conv_stride_pad", f'type: "Convolution" convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 '
         f'stride: 2 {GAUSS} }}', lambda r: {"x": normal(r, (2, 3, 5, 5))}),
    Case("conv_group_dilation", f'type: "Convolution" convolution_param {{ num_output: 6 group: 2 kernel_h: 3 '
         f'kernel_w: 2 dilation: 2 pad: 1 {GAUSS} }}', lambda r: {"x": normal(r, (2, 4, 7, 6))}),
    Case("conv_1d", f'type: "Convolution" convolution_param {{ num_output: 3 kernel_size: 3 stride: 2 pad: 1 '
         f'{GAUSS} }}', lambda r: {"x": normal(r, (2, 3, 9))}),
    Case("conv_3d", f'type: "Convolution" convolution_param {{ num_output: 3 kernel_size: 2 pad: 1 stride: 2 '
         f'{GAUSS} }}', lambda r: {"x": normal(r, (1, 2, 4, 5, 3))}),
    Case("conv_two_bottoms_nobias", 'type: "Convolution" convolution_param { num_output: 3 kernel_size: 2 '
         'bias_term: false weight_filler { type: "gaussian" std: 0.5 } }',
         lambda r: {"x1": normal(r, (2, 2, 4, 4)), "x2": normal(r, (2, 2, 4, 4))}, tops=("y1", "y2")),
    Case("deconv_stride_group", f'type: "Deconvolution" convolution_param {{ num_output: 4 group: 2 '
         f'kernel_size: 3 stride: 2 pad: 1 {GAUSS} }}', lambda r: {"x": normal(r, (2, 4, 3, 3))}),
    Case("deconv_dilation_1d", f'type: "Deconvolution" convolution_param {{ num_output: 2 kernel_size: 2 '
         f'dilation: 2 {GAUSS} }}', lambda r: {"x": normal(r, (2, 3, 4))}),
    Case("im2col", 'type: "Im2col" convolution_param { kernel_size: 3 stride: 2 pad: 1 }',
         lambda r: {"x": normal(r, (2, 2, 5, 5))}),
    # -- InnerProduct ----------------------------------------------------------------------------
    Case("inner_product", f'type: "InnerProduct" inner_product_param {{ num_output: 4 {GAUSS} }}',
         lambda r: {"x": normal(r, (3, 2, 2, 2))}),
    Case("inner_product_transpose_axis2", f'type: "InnerProduct" inner_product_param {{ num_output: 5 axis: 2 '
         f'transpose: true {GAUSS} }}', lambda r: {"x": normal(r, (2, 3, 4))}),
    # -- Pooling and SPP -------------------------------------------------------------------------
    Case("pool_max", 'type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }',
         lambda r: {"x": distinct(r, (2, 2, 4, 4))}),
    Case("pool_max_pad_ceil_overlap", 'type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 '
         'pad: 1 }', lambda r: {"x": distinct(r, (1, 2, 6, 5))}),
    Case("pool_max_mask_top", 'type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 }',
         lambda r: {"x": distinct(r, (2, 1, 5, 5))}, tops=("y", "mask")),
    Case("pool_max_global", 'type: "Pooling" pooling_param { pool: MAX global_pooling: true }',
         lambda r: {"x": distinct(r, (2, 3, 3, 4))}),
    Case("pool_ave_pad", 'type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }',
         lambda r: {"x": normal(r, (2, 2, 5, 5))}),
    Case("pool_ave_rect_global", 'type: "Pooling" pooling_param { pool: AVE global_pooling: true }',
         lambda r: {"x": normal(r, (2, 3, 3, 4))}),
    Case("spp_max", 'type: "SPP" spp_param { pyramid_height: 2 pool: MAX }',
         lambda r: {"x": distinct(r, (1, 2, 5, 5))}),
    Case("spp_ave", 'type: "SPP" spp_param { pyramid_height: 3 pool: AVE }',
         lambda r: {"x": normal(r, (2, 2, 8, 7))}),
    # -- Crop ------------------------------------------------------------------------------------
    Case("crop", 'type: "Crop" crop_param { axis: 2 offset: 1 offset: 2 }',
         lambda r: {"x": normal(r, (2, 3, 6, 6)), "ref": normal(r, (1, 1, 3, 4))}, fixed=("ref",),
         zero=("ref",)),
    # -- Normalisation ----------------------------------------------------------------------------
    Case("lrn_across", 'type: "LRN" lrn_param { local_size: 3 alpha: 0.8 beta: 0.75 k: 1.5 }',
         lambda r: {"x": normal(r, (2, 5, 3, 3))}),
    Case("lrn_across_5", 'type: "LRN" lrn_param { local_size: 5 alpha: 2.0 beta: 0.6 }',
         lambda r: {"x": normal(r, (1, 6, 2, 3))}),
    Case("lrn_within", 'type: "LRN" lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.8 '
         'beta: 0.75 }', lambda r: {"x": normal(r, (2, 2, 5, 4))}),
    Case("mvn", 'type: "MVN"', lambda r: {"x": normal(r, (2, 3, 3, 3))}),
    Case("mvn_across_channels", 'type: "MVN" mvn_param { across_channels: true }',
         lambda r: {"x": normal(r, (2, 3, 2, 3))}),
    Case("mvn_mean_only", 'type: "MVN" mvn_param { normalize_variance: false }',
         lambda r: {"x": normal(r, (2, 3, 2, 2))}),
    Case("mvn_mean_only_across", 'type: "MVN" mvn_param { normalize_variance: false across_channels: true }',
         lambda r: {"x": normal(r, (2, 3, 2, 2))}),
    Case("batchnorm_train", 'type: "BatchNorm"', lambda r: {"x": normal(r, (3, 2, 3, 3))}, skip_params=("L",)),
    Case("batchnorm_train_2d", 'type: "BatchNorm"', lambda r: {"x": normal(r, (6, 3))}, skip_params=("L",)),
    Case("batchnorm_global_stats", 'type: "BatchNorm" batch_norm_param { use_global_stats: true }',
         lambda r: {"x": normal(r, (2, 3, 2, 2))}, skip_params=("L",),
         setup=set_params(L=[np.array([0.1, -0.3, 0.5]), np.array([0.8, 1.5, 0.3]), np.array([2.0])])),
    Case("batchnorm_test_phase", 'type: "BatchNorm"', lambda r: {"x": normal(r, (2, 3, 2, 2))},
         phase=TEST, skip_params=("L",),
         setup=set_params(L=[np.array([0.1, -0.3, 0.5]), np.array([0.8, 1.5, 0.3]), np.array([0.5])])),
    Case("scale_learned_bias", 'type: "Scale" scale_param { bias_term: true filler { type: "gaussian" } '
         'bias_filler { type: "gaussian" } }', lambda r: {"x": normal(r, (2, 3, 2, 2))}),
    Case("scale_batch1", 'type: "Scale" scale_param { filler { type: "gaussian" } }',
         lambda r: {"x": normal(r, (1, 3, 2, 2))}),
    Case("scale_scalar", 'type: "Scale" scale_param { num_axes: 0 filler { type: "gaussian" } }',
         lambda r: {"x": normal(r, (2, 3))}),
    Case("scale_whole", 'type: "Scale" scale_param { axis: 0 num_axes: -1 filler { type: "gaussian" } }',
         lambda r: {"x": normal(r, (2, 3))}),
    Case("scale_bottom", 'type: "Scale" scale_param { axis: 0 }',
         lambda r: {"x": normal(r, (2, 3, 4)), "s": normal(r, (2, 3))}),
    Case("scale_bottom_bias", 'type: "Scale" scale_param { axis: 1 bias_term: true bias_filler { type: '
         '"gaussian" } }', lambda r: {"x": normal(r, (2, 3, 4)), "s": normal(r, (3, 4))}),
    Case("bias_learned", 'type: "Bias" bias_param { filler { type: "gaussian" } }',
         lambda r: {"x": normal(r, (2, 3, 2))}),
    Case("bias_bottom", 'type: "Bias" bias_param { axis: 2 }',
         lambda r: {"x": normal(r, (2, 3, 4)), "b": normal(r, (4,))}),
    # -- Eltwise and Softmax ---------------------------------------------------------------------
    Case("eltwise_sum_coeff", 'type: "Eltwise" eltwise_param { operation: SUM coeff: 0.5 coeff: -2 }',
         lambda r: {"a": normal(r, (2, 3, 2)), "b": normal(r, (2, 3, 2))}),
    Case("eltwise_sum3", 'type: "Eltwise" eltwise_param { operation: SUM }',
         lambda r: {"a": normal(r, (2, 3)), "b": normal(r, (2, 3)), "c": normal(r, (2, 3))}),
    Case("eltwise_prod", 'type: "Eltwise" eltwise_param { operation: PROD }',
         lambda r: {"a": normal(r, (2, 3)), "b": normal(r, (2, 3)), "c": normal(r, (2, 3))}),
    Case("eltwise_prod_unstable", 'type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }',
         lambda r: {"a": away(r, (2, 3), 0.3), "b": away(r, (2, 3), 0.3)}, rtol64=1e-5),
    Case("eltwise_max", 'type: "Eltwise" eltwise_param { operation: MAX }',
         lambda r: dict(zip("abc", distinct(r, (3, 2, 3, 2))))),
    Case("softmax", 'type: "Softmax"', lambda r: {"x": normal(r, (2, 4, 3))}),
    Case("softmax_last_axis", 'type: "Softmax" softmax_param { axis: -1 }', lambda r: {"x": normal(r, (2, 3, 4))}),
    # -- Neurons ---------------------------------------------------------------------------------
    Case("relu", 'type: "ReLU"', lambda r: {"x": away(r, (2, 3, 4))}),
    Case("relu_leaky", 'type: "ReLU" relu_param { negative_slope: 0.1 }', lambda r: {"x": away(r, (2, 3, 4))}),
    Case("prelu", 'type: "PReLU" prelu_param { filler { type: "uniform" min: -0.5 max: 0.5 } }',
         lambda r: {"x": away(r, (2, 3, 2, 2))}),
    Case("prelu_shared", 'type: "PReLU" prelu_param { channel_shared: true }',
         lambda r: {"x": away(r, (2, 3, 4))}),
    Case("elu", 'type: "ELU" elu_param { alpha: 0.5 }', lambda r: {"x": away(r, (2, 3, 4))}),
    Case("sigmoid", 'type: "Sigmoid"', lambda r: {"x": normal(r, (2, 3, 4), 2.0)}),
    Case("tanh", 'type: "TanH"', lambda r: {"x": normal(r, (2, 3, 4))}),
    Case("absval", 'type: "AbsVal"', lambda r: {"x": away(r, (2, 3, 4))}),
    Case("bnll", 'type: "BNLL"', lambda r: {"x": normal(r, (2, 3, 4), 2.0)}),
    Case("power_square", 'type: "Power" power_param { power: 2 scale: 1.5 shift: 0.3 }',
         lambda r: {"x": normal(r, (2, 3, 4))}),
    Case("power_linear", 'type: "Power" power_param { power: 1 scale: -2 shift: 0.5 }',
         lambda r: {"x": normal(r, (2, 3, 4))}),
    Case("power_cube_noshift", 'type: "Power" power_param { power: 3 scale: 0.7 }',
         lambda r: {"x": away(r, (2, 3, 4))}),
    Case("power_sqrt", 'type: "Power" power_param { power: 0.5 scale: 0.5 shift: 2 }',
         lambda r: {"x": uniform(r, (2, 3, 4), -2, 2)}),
    Case("power_constant", 'type: "Power" power_param { power: 2 scale: 0 shift: 3 }',
         lambda r: {"x": normal(r, (2, 3))}),
    Case("exp", 'type: "Exp" exp_param { scale: 0.5 shift: 0.2 }', lambda r: {"x": normal(r, (2, 3, 4))}),
    Case("exp_base2", 'type: "Exp" exp_param { base: 2 scale: -1.5 }', lambda r: {"x": normal(r, (2, 3, 4))}),
    Case("log", 'type: "Log"', lambda r: {"x": uniform(r, (2, 3, 4), 0.5, 2)}),
    Case("log_base10", 'type: "Log" log_param { base: 10 scale: 2 shift: 3 }',
         lambda r: {"x": uniform(r, (2, 3, 4), -1, 1)}),
    Case("clip", 'type: "Clip" clip_param { min: -0.5 max: 0.6 }',
         lambda r: {"x": np.where(r.random((2, 3, 4)) < 0.5, uniform(r, (2, 3, 4), -0.4, 0.5),
                                  away(r, (2, 3, 4), 0.7, 1.5))}),
    Case("swish", 'type: "Swish"', lambda r: {"x": normal(r, (2, 3, 4), 2.0)}),
    Case("swish_beta", 'type: "Swish" swish_param { beta: 1.7 }', lambda r: {"x": normal(r, (2, 3, 4))}),
    Case("dropout_test", 'type: "Dropout" dropout_param { dropout_ratio: 0.4 }',
         lambda r: {"x": normal(r, (2, 3, 4))}, phase=TEST),
    # -- Losses ----------------------------------------------------------------------------------
    Case("softmax_loss", 'type: "SoftmaxWithLoss"', lambda r: {"x": normal(r, (4, 5)), "label": labels(r, (4,), 5)},
         tops=("loss",), fixed=("label",)),
    *[Case(f"softmax_loss_{mode.lower()}_ignore", f'type: "SoftmaxWithLoss" loss_weight: 2 loss_param {{ '
           f'ignore_label: 1 normalization: {mode} }}',
           lambda r: {"x": normal(r, (2, 3, 2, 2)), "label": labels(r, (2, 1, 2, 2), 3)},
           tops=("loss",), fixed=("label",)) for mode in ("VALID", "FULL", "BATCH_SIZE", "NONE")],
    Case("softmax_loss_legacy_normalize_axis2_prob", 'type: "SoftmaxWithLoss" loss_weight: 1 loss_weight: 0 '
         'softmax_param { axis: 2 } loss_param { normalize: false }',
         lambda r: {"x": normal(r, (2, 2, 3)), "label": labels(r, (2, 2), 3)},
         tops=("loss", "prob"), fixed=("label",), ignore=("prob",)),
    Case("sigmoid_cross_entropy", 'type: "SigmoidCrossEntropyLoss"',
         lambda r: {"x": normal(r, (3, 4), 2.0), "t": uniform(r, (3, 4), 0, 1)}, tops=("loss",), fixed=("t",)),
    Case("sigmoid_cross_entropy_ignore_valid", 'type: "SigmoidCrossEntropyLoss" loss_weight: 0.7 loss_param { '
         'ignore_label: -1 normalization: VALID }',
         lambda r: {"x": normal(r, (3, 4), 2.0),
                    "t": np.where(r.random((3, 4)) < 0.3, -1, r.integers(0, 2, (3, 4))).astype(F32)},
         tops=("loss",), fixed=("t",)),
    Case("euclidean", 'type: "EuclideanLoss" loss_weight: 0.5',
         lambda r: {"a": normal(r, (3, 4)), "b": normal(r, (3, 4))}, tops=("loss",)),
    *[Case(f"hinge_{norm.lower()}", f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}',
           lambda r: hinge_inputs(r), tops=("loss",), fixed=("label",)) for norm in ("L1", "L2")],
    Case("infogain_source", 'type: "InfogainLoss" infogain_loss_param { source: "@H" }',
         lambda r: {"x": normal(r, (4, 3)), "label": labels(r, (4,), 3)}, tops=("loss",), fixed=("label",)),
    Case("multinomial_logistic", 'type: "MultinomialLogisticLoss"',
         lambda r: {"x": uniform(r, (4, 5), 0.1, 1), "label": labels(r, (4,), 5)}, tops=("loss",),
         fixed=("label",)),
    # Caffe divides by d + 1e-4 where the gradient has d: 1e-4 / d relative (d ~ 0.5 here).
    Case("contrastive", 'type: "ContrastiveLoss" contrastive_loss_param { margin: 1.0 }',
         lambda r: contrastive_inputs(r, legacy=False), tops=("loss",), fixed=("sim",), rtol64=1e-3),
    Case("contrastive_legacy", 'type: "ContrastiveLoss" loss_weight: 1.5 contrastive_loss_param { margin: 1.2 '
         'legacy_version: true }', lambda r: contrastive_inputs(r, legacy=True), tops=("loss",), fixed=("sim",)),
    # -- Routing and shapes ----------------------------------------------------------------------
    Case("concat", 'type: "Concat"', lambda r: {"a": normal(r, (2, 2, 3)), "b": normal(r, (2, 3, 3))}),
    Case("concat_axis0", 'type: "Concat" concat_param { axis: 0 }',
         lambda r: {"a": normal(r, (1, 2, 3)), "b": normal(r, (2, 2, 3))}),
    Case("concat_one", 'type: "Concat"', lambda r: {"a": normal(r, (2, 3))}),
    Case("slice", 'type: "Slice" slice_param { axis: 1 slice_point: 1 slice_point: 3 }',
         lambda r: {"x": normal(r, (2, 5, 2))}, tops=("y1", "y2", "y3")),
    Case("slice_even_axis0", 'type: "Slice" slice_param { axis: 0 }', lambda r: {"x": normal(r, (4, 3))},
         tops=("y1", "y2")),
    Case("slice_one", 'type: "Slice"', lambda r: {"x": normal(r, (2, 3))}),
    Case("split", 'type: "Split"', lambda r: {"x": normal(r, (2, 3))}, tops=("y1", "y2", "y3")),
    Case("flatten", 'type: "Flatten" flatten_param { axis: 1 end_axis: 2 }', lambda r: {"x": normal(r, (2, 3, 2, 2))}),
    Case("reshape", 'type: "Reshape" reshape_param { shape { dim: 0 dim: -1 dim: 2 } }',
         lambda r: {"x": normal(r, (2, 3, 2, 2))}),
    Case("tile", 'type: "Tile" tile_param { axis: 1 tiles: 3 }', lambda r: {"x": normal(r, (2, 2, 3))}),
    Case("reduction_sum_all", 'type: "Reduction"', lambda r: {"x": normal(r, (2, 3, 2))}),
    Case("reduction_mean", 'type: "Reduction" reduction_param { operation: MEAN axis: 1 coeff: 2 }',
         lambda r: {"x": normal(r, (2, 3, 2))}),
    Case("reduction_asum", 'type: "Reduction" reduction_param { operation: ASUM axis: 1 coeff: -0.5 }',
         lambda r: {"x": away(r, (2, 3, 2))}),
    Case("reduction_sumsq", 'type: "Reduction" reduction_param { operation: SUMSQ axis: -1 coeff: 1.5 }',
         lambda r: {"x": normal(r, (2, 3, 2))}),
]


def hinge_inputs(r):
    """Scores off the hinge kinks (1 + x = 0 off the label, 1 - x = 0 at it), some inactive."""
    x = uniform(r, (4, 5), -0.8, 0.8)
    label = labels(r, (4,), 5)
    x[0, (int(label[0]) + 1) % 5] = -1.5  # inactive off-label entry
    x[1, int(label[1])] = 1.4  # inactive label entry
    return {"x": x, "label": label}


def contrastive_inputs(r, legacy):
    """Pairs with distances off the margin: similar pairs, active and inactive dissimilar pairs."""
    a = normal(r, (4, 3))
    direction = normal(r, (4, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    dist = np.array([0.7, 0.5, 0.8, 1.6] if not legacy else [0.7, 0.6, 0.9, 1.4])
    b = (a + direction * dist[:, None]).astype(F32)
    sim = np.array([1, 0, 0, 0], np.float32)  # pair 3 is a dissimilar pair beyond the margin
    return {"a": a, "b": b, "sim": sim}


def _prepare(case, tmp_path):
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    inputs = case.inputs(rng)
    body = case.body
    if "@H" in body:
        h = np.abs(normal(rng, (3, 3))) + np.eye(3, dtype=F32)
        path = tmp_path / "H.binaryproto"
        blob = pb.BlobProto()
        blob.shape.dim.extend([1, 1, 3, 3])
        blob.data.extend(h.ravel().tolist())
        path.write_bytes(blob.SerializeToString())
        body = body.replace("@H", str(path))
    return inputs, body


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_layer_in_net(case, tmp_path):
    inputs, body = _prepare(case, tmp_path)
    net_check(tmp_path, layer(body, list(inputs), case.tops), inputs, phase=case.phase, fixed=case.fixed,
              setup=case.setup, **case.kw)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_layer_in_net_gpu_path(case, tmp_path):
    """The same check on the "strict" backend: the GPU code path (our CUDA kernels compiled for the CPU,
    an array module that refuses what CuPy refuses)."""
    if not HAVE_CXX:
        pytest.skip("no C++ compiler for the kernel harness (g++ or $CXX)")
    inputs, body = _prepare(case, tmp_path)
    net_check(tmp_path, layer(body, list(inputs), case.tops), inputs, phase=case.phase, fixed=case.fixed,
              setup=case.setup, backend="strict", **case.kw)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_layer_float64(case, tmp_path):
    inputs, body = _prepare(case, tmp_path)
    if case.kw.get("ignore"):
        pytest.skip("a top whose diff Caffe ignores: the net check covers it")
    net = build_net(tmp_path, layer(body, list(inputs), case.tops), inputs, case.phase)
    if case.setup is not None:
        case.setup(net)
    blobs = [np.array(b.data, np.float64) for b in net.params.get("L", [])]
    _, dxs, _ = layer_check64(body, inputs, case.tops, blobs, phase=case.phase, fixed=case.fixed,
                              rtol=case.rtol64, blob_diffs="L" not in case.kw.get("skip_params", ()))
    for name in case.kw.get("zero", ()):
        d = dxs[list(inputs).index(name)]
        assert d is None or not np.any(d), f"'{name}' should get no diff"


def test_softmax_loss_ignores_prob_diff(tmp_path):
    """SoftmaxWithLoss's backward reads only the loss top's diff: a diff on its prob top changes nothing."""
    rng = np.random.default_rng(28)
    inputs = {"x": normal(rng, (3, 4)), "label": labels(rng, (3,), 4)}
    text = layer('type: "SoftmaxWithLoss" loss_weight: 1 loss_weight: 0', ["x", "label"], ["loss", "prob"])
    diffs = []
    for prob_diff in (0.0, 5.0):
        net = build_net(tmp_path, text, inputs)
        for k, v in inputs.items():
            net.blobs[k].data[...] = v
        net.forward()
        net.blobs["prob"].diff[...] = prob_diff
        net.backward()
        diffs.append(np.array(net.blobs["x"].diff))
    assert np.any(diffs[0])
    np.testing.assert_array_equal(diffs[0], diffs[1])


# -- in place ------------------------------------------------------------------------------------
# x -> pre (Power scale 2, a fresh array) -> y, then the layer in place on y.  Caffe's in-place
# layers that are exact (training.md 9.3) must give the true gradient through the Net.
PRE = layer('type: "Power" power_param { scale: 2 }', ["x"], ["y"], name="pre")

IN_PLACE_EXACT = [
    ("relu", 'type: "ReLU"', TRAIN),
    ("relu_leaky", 'type: "ReLU" relu_param { negative_slope: 0.2 }', TRAIN),
    ("elu", 'type: "ELU" elu_param { alpha: 0.7 }', TRAIN),
    ("sigmoid", 'type: "Sigmoid"', TRAIN),
    ("tanh", 'type: "TanH"', TRAIN),
    ("exp", 'type: "Exp" exp_param { scale: 0.5 shift: -0.3 }', TRAIN),
    ("swish", 'type: "Swish" swish_param { beta: 1.3 }', TRAIN),
    ("softmax", 'type: "Softmax"', TRAIN),
    ("prelu", 'type: "PReLU" prelu_param { filler { type: "uniform" min: 0.1 max: 0.6 } }', TRAIN),
    ("batchnorm", 'type: "BatchNorm"', TRAIN),
    ("scale", ('type: "Scale" scale_param { bias_term: true filler { type: "gaussian" } bias_filler { type: '
               '"gaussian" } }'), TRAIN),
    ("bias", 'type: "Bias" bias_param { filler { type: "gaussian" } }', TRAIN),
    ("dropout_test", 'type: "Dropout"', TEST),
]


@pytest.mark.parametrize("body,phase", [c[1:] for c in IN_PLACE_EXACT], ids=[c[0] for c in IN_PLACE_EXACT])
def test_in_place_exact(body, phase, tmp_path):
    rng = np.random.default_rng(7)
    net_check(tmp_path, PRE + layer(body, ["y"], ["y"]), {"x": away(rng, (2, 3, 2, 2), 0.1, 1.0)}, phase=phase,
              skip_params=("L",) if "BatchNorm" in body else ())


def test_in_place_chain(tmp_path):
    """Leaky ReLU, Scale and TanH all in place on one blob: one data and one diff array in Caffe.  The
    ReLU's backward reads the blob's final value; a positive scale and TanH keep its sign, so the
    result is the true gradient."""
    rng = np.random.default_rng(8)
    text = (PRE + layer('type: "ReLU" relu_param { negative_slope: 0.1 }', ["y"], ["y"], name="relu")
            + layer('type: "Scale" scale_param { filler { type: "uniform" min: 0.5 max: 1.5 } }', ["y"], ["y"],
                    name="scale")
            + layer('type: "TanH"', ["y"], ["y"], name="tanh"))
    net_check(tmp_path, text, {"x": away(rng, (2, 3, 2), 0.1, 1.0)})


def test_in_place_relu_reads_final_value(tmp_path):
    """In place, ReLU's backward reads the blob as the later in-place layers left it: after Scale(-1)
    its mask is the opposite of the forward's (Caffe's shared data array), not the true gradient."""
    x = away(np.random.default_rng(27), (2, 3, 2), 0.1, 1.0)
    text = (PRE + layer('type: "ReLU" relu_param { negative_slope: 0.1 }', ["y"], ["y"], name="relu")
            + layer('type: "Scale" scale_param { filler { type: "constant" value: -1 } }', ["y"], ["y"],
                    name="scale"))
    net = build_net(tmp_path, text, {"x": x})
    net.blobs["x"].data[...] = x
    net.forward()
    np.testing.assert_allclose(net.blobs["y"].data, -np.where(x > 0, 2 * x, 0.2 * x), rtol=1e-6)
    dy = seed_outputs(net, np.random.default_rng(3))["y"]
    net.backward()
    np.testing.assert_allclose(net.blobs["x"].diff, 2 * -dy * np.where(x > 0, 0.1, 1.0), rtol=1e-6)


def _in_place_diffs(tmp_path, body, x):
    """(y after the layer, dy given, diff of x) for pre -> layer in place."""
    net = build_net(tmp_path, PRE + layer(body, ["y"], ["y"]), {"x": x})
    net.blobs["x"].data[...] = x
    net.forward()
    y = np.array(net.blobs["y"].data, np.float64)
    dy = np.array(seed_outputs(net, np.random.default_rng(3))["y"])
    net.backward()
    return y, dy, np.array(net.blobs["x"].diff, np.float64)


def test_in_place_power_garbled(tmp_path):
    """In-place Power(2): Caffe writes D (scale y + shift) over dy, then multiplies it by itself
    (training.md 9.3: (2y)^2 for scale 1, shift 0), whatever dy was."""
    x = away(np.random.default_rng(9), (2, 3, 2), 0.1, 1.0)
    y, _, dx = _in_place_diffs(tmp_path, 'type: "Power" power_param { power: 2 scale: 1.5 shift: 0.3 }', x)
    g = 3.0 * (1.5 * y + 0.3)
    np.testing.assert_allclose(dx, 2 * g * g, rtol=1e-5, atol=1e-6 * np.max(np.abs(g * g)))


def test_in_place_log_garbled(tmp_path):
    """In-place Log: Caffe writes (scale / ln base) / (scale y + shift) over dy, then multiplies it by
    itself (log_layer.cpp reads the overwritten top diff)."""
    x = uniform(np.random.default_rng(10), (2, 3, 2), 0.2, 1.0)
    y, _, dx = _in_place_diffs(tmp_path, 'type: "Log" log_param { base: 10 scale: 2 shift: 3 }', x)
    g = (2 / np.log(10.0)) / (2 * y + 3)
    np.testing.assert_allclose(dx, 2 * g * g, rtol=1e-5, atol=1e-6 * np.max(np.abs(g * g)))


def test_in_place_bnll_reads_y(tmp_path):
    """In-place BNLL uses y as x: dx = dy e/(e+1) with e = exp(min(y, 50))."""
    x = normal(np.random.default_rng(11), (2, 3, 2))
    y, dy, dx = _in_place_diffs(tmp_path, 'type: "BNLL"', x)
    e = np.exp(np.minimum(y, 50))
    np.testing.assert_allclose(dx, 2 * dy * e / (e + 1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(dx, 2 * dy / (1 + np.exp(-2 * x)), rtol=1e-3)  # not the true gradient


def test_in_place_clip_passes_all(tmp_path):
    """In-place Clip reads the clipped y, always inside [min, max]: every gradient passes."""
    x = away(np.random.default_rng(12), (2, 3, 2), 0.1, 1.5)
    _, dy, dx = _in_place_diffs(tmp_path, 'type: "Clip" clip_param { min: -0.8 max: 0.9 }', x)
    assert np.any(np.abs(2 * x) > 0.9)
    np.testing.assert_allclose(dx, 2 * dy, rtol=1e-6)


# -- Dropout at TRAIN: a new mask each forward, so the check uses the mask the forward drew --------
@pytest.mark.parametrize("in_place", [False, True], ids=["out_of_place", "in_place"])
def test_dropout_train_mask(in_place, tmp_path):
    ratio = 0.3
    scale = F32(1.0 / (1.0 - ratio))
    x = away(np.random.default_rng(13), (4, 5, 3), 0.1, 1.0)
    body = f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}'
    if in_place:
        y, dy, dx = _in_place_diffs(tmp_path, body, x)
        before = 2 * x
        dx = dx / 2
    else:
        net = build_net(tmp_path, layer(body, ["x"]), {"x": x})
        net.blobs["x"].data[...] = x
        net.forward()
        y = np.array(net.blobs["y"].data, np.float64)
        dy = seed_outputs(net, np.random.default_rng(3))["y"]
        net.backward()
        dx = np.array(net.blobs["x"].diff, np.float64)
        before = x
    mask = y != 0
    assert 0.4 < mask.mean() < 0.95  # a real draw, about 1 - ratio kept
    np.testing.assert_allclose(y, before * mask * scale, rtol=1e-6)
    np.testing.assert_allclose(dx, (dy.astype(F32) * mask * scale).astype(np.float64), rtol=1e-6)


# -- layers that refuse force_backward on a bottom: the diff reaches a probe ----------------------
# A Bias layer with one bias per element of x (zeros) feeds the layer: its parameter diff is the diff
# of the layer's bottom.  The layer's top carries a loss weight (randomised seed) so that it runs
# backward without force_backward.
PROBE = layer('type: "Bias" bias_param { axis: 0 num_axes: -1 filler { type: "constant" value: 0 } }',
              ["x"], ["xb"], name="probe")


def test_embed(tmp_path):
    """Embed: the weights and bias only (its index bottom cannot get a diff)."""
    text = layer('type: "Embed" loss_weight: 1 embed_param { input_dim: 5 num_output: 3 '
                 'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }', ["idx"], ["e"])
    idx = np.array([[0, 3, 3], [1, 4, 3]], np.float32)  # repeated indices add up
    net, _ = net_check(tmp_path, text, {"idx": idx}, force=False, fixed=("idx",), randomize=("e",))
    assert not np.any(net.params["L"][0].diff[2])  # index 2 never used


def test_embed_propagate_down_false(tmp_path):
    rng = np.random.default_rng(15)
    text = layer('type: "Embed" propagate_down: false loss_weight: 2 embed_param { input_dim: 4 num_output: 2 '
                 'bias_term: false weight_filler { type: "gaussian" } }', ["idx"], ["e"])
    net_check(tmp_path, text, {"idx": labels(rng, (5,), 4)}, force=False, fixed=("idx",))


def test_batch_reindex(tmp_path):
    rng = np.random.default_rng(16)
    text = PROBE + layer('type: "BatchReindex" loss_weight: 1', ["xb", "idx"])
    idx = np.array([2, 0, 2, 3, 2], np.float32)  # repeats add up, item 1 gets nothing
    net, _ = net_check(tmp_path, text, {"x": normal(rng, (4, 3, 2)), "idx": idx}, force=False,
                       fixed=("x", "idx"), randomize=("y",))
    assert not np.any(net.params["probe"][0].diff[1])


def test_filter(tmp_path):
    rng = np.random.default_rng(17)
    text = PROBE + layer('type: "Filter" loss_weight: 1', ["xb", "sel"])
    net, _ = net_check(tmp_path, text, {"x": normal(rng, (4, 3)), "sel": np.array([1, 0, 1, 1], np.float32)},
                       force=False, fixed=("x", "sel"), randomize=("y",))
    assert not np.any(net.params["probe"][0].diff[1])


def test_infogain_matrix_bottom(tmp_path):
    """InfogainLoss with H as bottom 2 (force_backward would ask H for a diff, fatal in Caffe)."""
    rng = np.random.default_rng(18)
    text = PROBE + layer('type: "InfogainLoss" loss_weight: 1.5 loss_param { ignore_label: 2 }',
                         ["xb", "label", "H"], ["loss"])
    h = (np.abs(normal(rng, (4, 4))) + np.eye(4)).astype(F32)
    net_check(tmp_path, text, {"x": normal(rng, (5, 4)), "label": np.array([0, 2, 3, 1, 2], F32), "H": h},
              force=False, fixed=("x", "label", "H"))


# -- Silence, Parameter, data layers, weight sharing ----------------------------------------------
def test_silence(tmp_path):
    """x feeds Silence and TanH (a split adds the Silence's zeros); z feeds only a Silence."""
    rng = np.random.default_rng(19)
    text = (layer('type: "Silence"', ["x"], (), name="s1") + layer('type: "TanH"', ["x"], ["y"], name="t")
            + layer('type: "Silence"', ["z"], (), name="s2"))
    net_check(tmp_path, text, {"x": normal(rng, (2, 3)), "z": normal(rng, (3,))}, fixed=("z",), zero=("z",))


def test_parameter(tmp_path):
    """A Parameter top used twice (Eltwise PROD with x, and TanH): its param diff is the top's diff."""
    rng = np.random.default_rng(20)
    text = (layer('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', [], ["w"], name="p")
            + layer('type: "Eltwise" eltwise_param { operation: PROD }', ["x", "w"], ["y"], name="prod")
            + layer('type: "TanH"', ["w"], ["t"], name="tanh"))
    net_check(tmp_path, text, {"x": normal(rng, (2, 3))}, setup=set_params(p=[normal(rng, (2, 3))]))


def test_dummy_data_feeds_inner_product(tmp_path):
    """A DummyData top (constant filler: the same values each forward) into InnerProduct: params only."""
    text = ('layer { name: "d" type: "DummyData" top: "d" dummy_data_param { shape { dim: 3 dim: 4 } '
            'data_filler { type: "constant" value: 0.7 } } }\n'
            + layer(f'type: "InnerProduct" inner_product_param {{ num_output: 2 {GAUSS} }}', ["d"]))
    net, _ = net_check(tmp_path, text, {})
    np.testing.assert_allclose(net.params["L"][0].diff, np.tile(0.7 * np.sum(net.blobs["y"].diff, 0)[:, None],
                                                                (1, 4)), rtol=1e-5)


def test_shared_weights(tmp_path):
    """Two InnerProducts sharing weight and bias by name: one diff, the sum of both uses."""
    rng = np.random.default_rng(21)
    spec = f'param {{ name: "w" }} param {{ name: "b" }} inner_product_param {{ num_output: 3 {GAUSS} }}'
    text = (layer('type: "InnerProduct" ' + spec, ["x1"], ["y1"], name="ip1")
            + layer('type: "InnerProduct" ' + spec, ["x2"], ["y2"], name="ip2"))
    net, _ = net_check(tmp_path, text, {"x1": normal(rng, (2, 4)), "x2": normal(rng, (3, 4))})
    assert np.shares_memory(net.params["ip1"][0].diff, net.params["ip2"][0].diff) or np.array_equal(
        net.params["ip1"][0].diff, net.params["ip2"][0].diff)


# -- small nets of several layers ----------------------------------------------------------------
def test_net_conv_bn_pool_softmax_loss(tmp_path):
    rng = np.random.default_rng(22)
    text = (layer(f'type: "Convolution" convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 {GAUSS} }}',
                  ["x"], ["c"], name="conv")
            + layer('type: "BatchNorm"', ["c"], ["c"], name="bn")
            + layer('type: "Scale" scale_param { bias_term: true filler { type: "gaussian" } bias_filler { '
                    'type: "gaussian" } }', ["c"], ["c"], name="scale")
            + layer('type: "TanH"', ["c"], ["c"], name="tanh")
            + layer('type: "Pooling" pooling_param { pool: AVE kernel_size: 2 stride: 2 }', ["c"], ["p"],
                    name="pool")
            + layer(f'type: "InnerProduct" inner_product_param {{ num_output: 3 {GAUSS} }}', ["p"], ["s"],
                    name="ip")
            + layer('type: "SoftmaxWithLoss" loss_weight: 3', ["s", "label"], ["loss"], name="loss"))
    net_check(tmp_path, text, {"x": normal(rng, (3, 2, 4, 4)), "label": labels(rng, (3,), 3)}, fixed=("label",),
              skip_params=("bn",))


def test_net_deconv_concat_lrn_euclidean(tmp_path):
    """Also a loss weight on a plain top (the TanH's: its seed flows through the TanH)."""
    rng = np.random.default_rng(23)
    text = (layer(f'type: "Deconvolution" convolution_param {{ num_output: 2 kernel_size: 2 stride: 2 {GAUSS} }}',
                  ["x"], ["d"], name="deconv")
            + layer('type: "Sigmoid"', ["d"], ["d"], name="sig")
            + layer('type: "Concat"', ["d", "z"], ["cat"], name="cat")
            + layer('type: "LRN" lrn_param { local_size: 3 alpha: 1.0 beta: 0.75 }', ["cat"], ["n"], name="lrn")
            + layer('type: "Flatten"', ["n"], ["f"], name="flat")
            + layer(f'type: "InnerProduct" inner_product_param {{ num_output: 4 {GAUSS} }}', ["f"], ["o"],
                    name="ip")
            + layer('type: "EuclideanLoss"', ["o", "target"], ["loss"], name="loss")
            + layer('type: "TanH" loss_weight: 0.5', ["z"], ["tz"], name="tz"))
    net_check(tmp_path, text, {"x": normal(rng, (2, 3, 2, 2)), "z": normal(rng, (2, 1, 4, 4)),
                               "target": normal(rng, (2, 4))})


def test_net_with_accuracy_no_force(tmp_path):
    """Without force_backward: Accuracy (beside the loss) never runs backward; the params still train."""
    rng = np.random.default_rng(24)
    text = (layer(f'type: "InnerProduct" inner_product_param {{ num_output: 4 {GAUSS} }}', ["x"], ["s"], name="ip")
            + layer('type: "SoftmaxWithLoss"', ["s", "label"], ["loss"], name="loss")
            + layer('type: "Accuracy"', ["s", "label"], ["accuracy"], name="acc"))
    net_check(tmp_path, text, {"x": normal(rng, (5, 3)), "label": labels(rng, (5,), 4)}, force=False,
              fixed=("x", "label"), ignore=("accuracy",))


# -- Python layer --------------------------------------------------------------------------------
PY_LAYER = '''
import caffe
import numpy as np


class CubeScale(caffe.Layer):
    """y = w[c] * x0 ** 3 + x1, one learned w per channel (axis 1)."""

    def setup(self, bottom, top):
        self.blobs.add_blob(bottom[0].data.shape[1])
        self.blobs[0].data[...] = np.linspace(0.5, 1.5, bottom[0].data.shape[1])

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def _w(self, x):
        return self.blobs[0].data.reshape((1, -1) + (1,) * (x.ndim - 2))

    def forward(self, bottom, top):
        x = bottom[0].data
        top[0].data[...] = self._w(x) * x ** 3 + bottom[1].data

    def backward(self, top, propagate_down, bottom):
        x, dy = bottom[0].data, top[0].diff
        if propagate_down[0]:
            bottom[0].diff[...] = 3 * self._w(x) * x ** 2 * dy
        if propagate_down[1]:
            bottom[1].diff[...] = dy
        self.blobs[0].diff[...] += np.sum(dy * x ** 3, axis=(0, 2))
'''


def test_python_layer(tmp_path, monkeypatch):
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "gradcheck_cube_layer.py").write_text(PY_LAYER)
    monkeypatch.syspath_prepend(str(folder))
    saved = {k: sys.modules.get(k) for k in ("caffe", "caffe.io", "gradcheck_cube_layer")}
    try:
        rng = np.random.default_rng(25)
        text = layer('type: "Python" python_param { module: "gradcheck_cube_layer" layer: "CubeScale" }',
                     ["x1", "x2"])
        net_check(tmp_path, text, {"x1": normal(rng, (2, 3, 4)), "x2": normal(rng, (2, 3, 4))})
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# -- LSTMUnit: no forward in this runtime; its backward against Caffe's forward written here ---------
def _lstm_unit_forward(c_prev, x, cont):
    """lstm_unit_layer.cpp's forward in float64: i, f, o, g gates; f = 0 where cont is 0."""
    n, d = c_prev.shape[1], c_prev.shape[2]
    gates = x.reshape(n, 4, d)

    def sig(v):
        return 1 / (1 + np.exp(-v))

    i, o, g = sig(gates[:, 0]), sig(gates[:, 2]), np.tanh(gates[:, 3])
    f = np.where(cont.reshape(n, 1) == 0, 0.0, cont.reshape(n, 1) * sig(gates[:, 1]))
    c = f * c_prev.reshape(n, d) + i * g
    return c.reshape(c_prev.shape), (o * np.tanh(c)).reshape(c_prev.shape)


def test_lstm_unit_backward():
    from gradcheck_nets import make_layer

    rng = np.random.default_rng(26)
    c_prev, x = rng.standard_normal((1, 3, 2)), rng.standard_normal((1, 3, 8))
    cont = np.array([[1.0, 0.0, 1.0]])
    lay = make_layer('type: "LSTMUnit"', ["c_prev", "x", "cont"], ["c", "h"])
    assert not lay.allow_force_backward(2) and lay.allow_force_backward(0)
    lay.reshape([c_prev.shape, x.shape, cont.shape])
    lay.needs_backward = True
    c, h = _lstm_unit_forward(c_prev, x, cont)
    dc, dh = rng.standard_normal(c.shape), rng.standard_normal(h.shape)
    dxs = lay.backward(np, [dc.astype(F32), dh.astype(F32)], [c.astype(F32), h.astype(F32)],
                       [a.astype(F32) for a in (c_prev, x, cont)], [], [True, True, False], [])
    assert dxs[2] is None

    def objective():
        c_, h_ = _lstm_unit_forward(c_prev, x, cont)
        return float(np.sum(c_ * dc) + np.sum(h_ * dh))

    for array, analytic in ((c_prev, dxs[0]), (x, dxs[1])):
        flat, numeric = array.reshape(-1), []
        for k in range(flat.size):
            old = flat[k]
            flat[k] = old + 1e-6
            up = objective()
            flat[k] = old - 1e-6
            numeric.append((up - objective()) / 2e-6)
            flat[k] = old
        np.testing.assert_allclose(np.asarray(analytic, np.float64).reshape(-1), numeric, rtol=1e-4, atol=1e-5)


# -- every registered type is covered here or listed with the reason ---------------------------------
NOT_CHECKED = {
    "ArgMax": "no backward in Caffe (fatal whenever called)",
    "Threshold": "no backward in Caffe (fatal whenever called)",
    "Data": "a data layer reading an LMDB/LevelDB source: no-op backward",
    "ImageData": "a data layer reading image files: no-op backward",
    "HDF5Data": "a data layer reading HDF5 files: no-op backward",
    "MemoryData": "a data layer fed by set_input_arrays: no-op backward",
    "WindowData": "a data layer reading windows of images: no-op backward",
    "HDF5Output": "writes its bottoms to a file: no-op backward",
    "RNN": "the runtime does not run recurrent layers (no forward, backward refused)",
    "LSTM": "the runtime does not run recurrent layers (no forward, backward refused)",
}


def test_every_registered_type_is_checked():
    with open(__file__) as f:
        source = f.read()
    used = set(re.findall(r'type: \\?"(\w+)"', source))
    used.add("Input")  # every net here starts with Input layers (gradcheck_nets.input_layers)
    registered = set(registered_types())
    missing = registered - used - set(NOT_CHECKED)
    assert not missing, f"registered layer types without a gradient check here: {sorted(missing)}"
    assert not (set(NOT_CHECKED) & used), "a type listed as not checked is checked"
    assert set(NOT_CHECKED) <= registered
