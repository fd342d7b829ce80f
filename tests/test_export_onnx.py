"""`caffeish export onnx`: exported models run in onnxruntime and give what caffeish gives.

* every golden case of ../shared/golden whose layers are exportable, every blob compared
  with caffeish's and with Caffe's recorded one (the case's tolerance; masks and argmax
  indices exactly); a case holding a refused layer type must be refused, naming the layer;
* --dynamic-hw: the FCN cases at their own size and at two others, one model for all;
* nets built here for what the golden cases do not reach (pooling edge windows, Im2col,
  Reshape/Slice on spatial axes, losses and Accuracy variants, ...), at several opsets;
* clear one-line errors for layers ONNX cannot hold, nothing written.
Skipped when onnx or onnxruntime is not installed (pip install 'caffeish[test]').
"""
import json
import os
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'caffeish[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'caffeish[test]')")

from conftest import shared_path  # noqa: E402
from golden import cases  # noqa: E402

import caffeish  # noqa: E402
from caffeish.apps.export_onnx import (DEFAULT_OPSET, REFUSED, ExportError, build_model,  # noqa: E402
                                       export_onnx)
from caffeish.data.metrics import compare_blobs, relative_error  # noqa: E402
from caffeish.errors import CaffeishError, MissingDependencyError  # noqa: E402
from caffeish.formats import io  # noqa: E402
from caffeish.tools.cli import main  # noqa: E402

CASES = cases()
FCN_CASES = ["fcn8s_tiny", "fcn_alexnet_tiny"]


def run_onnx(result, feeds):
    """{blob: array} from running an Export's model in onnxruntime."""
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {name: feeds[name] for name in result.inputs})))
    return {blob: values[name] for blob, name in result.outputs.items()}


def caffeish_blobs(prototxt, weights, feeds, **options):
    net = caffeish.Net(str(prototxt), weights, caffeish.TEST, input_shapes={k: v.shape for k, v in feeds.items()},
                       **options)
    net.forward(**feeds)
    return {name: np.array(net.blobs[name].data) for name in net.blobs.keys()}


def assert_same(ours, reference, tolerance, exact=()):
    """compare_blobs, with NaN where the reference has NaN (Caffe's 0/0 of an AVE window wholly past
    the input) counted as equal."""
    reference = {name: np.asarray(reference[name]) for name in (reference.files if hasattr(reference, "files")
                                                                 else reference)}
    ours = dict(ours)
    for name, ref in reference.items():
        if name in ours and ours[name].shape == ref.shape and np.isnan(ref).any():
            assert np.array_equal(np.isnan(ours[name]), np.isnan(ref)), f"{name}: NaN elsewhere than Caffe's"
            ours[name], reference[name] = np.nan_to_num(ours[name]), np.nan_to_num(ref)
    worst, failures = compare_blobs(lambda name: ours.get(name), reference, tolerance, set(exact))
    assert not failures, "; ".join(failures)
    return worst


def golden_case(case):
    folder = shared_path("golden", case)
    meta = json.loads((folder / "meta.json").read_text())
    weights = str(folder / meta["weights"]) if meta.get("weights") else None
    feeds = dict(np.load(folder / "inputs.npz"))
    return folder, meta, weights, feeds


def refused_type(prototxt):
    """The first layer type the exporter refuses by type, or None."""
    net = io.read_net(str(prototxt))
    return next((layer.type for layer in net.layer if layer.type in REFUSED), None)


@pytest.mark.skipif(not CASES, reason="golden cases not found (../shared is absent)")
@pytest.mark.parametrize("case", CASES or ["none"])
def test_golden_case_runs_in_onnxruntime_as_in_caffeish(case):
    folder, meta, weights, feeds = golden_case(case)
    prototxt = folder / "net.prototxt"
    refused = refused_type(prototxt)
    if refused:
        with pytest.raises(ExportError, match=rf"\({refused}\): cannot export to ONNX"):
            build_model(str(prototxt), weights)
        return
    result = build_model(str(prototxt), weights, input_shapes={k: v.shape for k, v in feeds.items()}, outputs="all")
    ours = run_onnx(result, feeds)
    tolerance, exact = meta["tolerance"], meta.get("exact", [])
    expected = caffeish_blobs(prototxt, weights, feeds)
    assert_same(ours, {k: v for k, v in expected.items() if k in ours}, tolerance, exact)
    assert_same(ours, np.load(folder / "blobs.npz"), tolerance, exact)  # and what Caffe itself computed
    # The model's outputs are the net's outputs, under the blobs' names.
    net_outputs = caffeish.Net(str(prototxt), weights, caffeish.TEST,
                               input_shapes={k: v.shape for k, v in feeds.items()}).outputs
    plain = build_model(str(prototxt), weights, input_shapes={k: v.shape for k, v in feeds.items()})
    assert list(plain.outputs) == list(net_outputs)
    assert [o.name for o in plain.model.graph.output] == [plain.outputs[b] for b in net_outputs]


@pytest.mark.skipif(not CASES, reason="golden cases not found (../shared is absent)")
@pytest.mark.parametrize("case", FCN_CASES)
def test_dynamic_hw_fcn_takes_any_input_size(case, tmp_path):
    folder, meta, weights, feeds = golden_case(case)
    out = tmp_path / "fcn.onnx"
    result = export_onnx(str(folder / "net.prototxt"), weights, str(out), dynamic_hw=True)
    model = onnx.load(str(out))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, "data_height", "data_width"]
    n, c, h, w = feeds["data"].shape
    rng = np.random.default_rng(3)
    sizes = [(h, w), (h + 21, w + 13), (h + 37, w + 2)]
    shapes = set()
    for size in sizes:
        data = feeds["data"] if size == (h, w) else rng.standard_normal((n, c) + size).astype(np.float32) * 30
        ours = run_onnx(result, {"data": data})
        expected = caffeish_blobs(folder / "net.prototxt", weights, {"data": data})
        assert ours["score"].shape == expected["score"].shape == (1, expected["score"].shape[1]) + size
        assert relative_error(ours["score"], expected["score"]) <= meta["tolerance"]
        shapes.add(ours["score"].shape)
    assert len(shapes) == 3


def test_dynamic_hw_refuses_a_net_that_is_not_fully_convolutional():
    folder, _, weights, _ = golden_case("alexnet_tiny")
    with pytest.raises(ExportError, match=r"layer 'fc6' \(InnerProduct\): cannot export to ONNX: .*not fully "
                                          r"convolutional.*convolutionalize"):
        build_model(str(folder / "net.prototxt"), weights, dynamic_hw=True)


# -- nets built here ---------------------------------------------------------------------------

SPATIAL = """
name: "spatial"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 11 dim: 14 } } }
layer { name: "c" type: "Convolution" bottom: "data" top: "c"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 }
                      bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "far" type: "Pooling" bottom: "c" top: "far" pooling_param { pool: MAX kernel_size: 1 stride: 3 } }
layer { name: "far_ave" type: "Pooling" bottom: "c" top: "far_ave" pooling_param { pool: AVE kernel_size: 2 stride: 3 } }
layer { name: "pm" type: "Pooling" bottom: "c" top: "pm" top: "pm_mask"
  pooling_param { pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 1 } }
layer { name: "pf" type: "Pooling" bottom: "c" top: "pf" top: "pf_mask" pooling_param { pool: MAX kernel_size: 2 stride: 3 } }
layer { name: "pa" type: "Pooling" bottom: "c" top: "pa" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pa_floor" type: "Pooling" bottom: "c" top: "pa_floor"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR } }
layer { name: "relu_c" type: "ReLU" bottom: "c" top: "c_pos" }
layer { name: "ps" type: "Pooling" bottom: "c_pos" top: "ps" pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 } }
layer { name: "pg" type: "Pooling" bottom: "c" top: "pg" top: "pg_mask" pooling_param { pool: MAX global_pooling: true } }
layer { name: "pgs" type: "Pooling" bottom: "c_pos" top: "pgs" pooling_param { pool: STOCHASTIC global_pooling: true } }
layer { name: "i2c" type: "Im2col" bottom: "c" top: "i2c"
  convolution_param { kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 dilation: 2 } }
layer { name: "dc" type: "Deconvolution" bottom: "c" top: "dc"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 dilation: 2
                      weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "lrn" type: "LRN" bottom: "c" top: "lrn" lrn_param { local_size: 5 alpha: 0.3 beta: 0.7 norm_region: WITHIN_CHANNEL } }
layer { name: "sl" type: "Slice" bottom: "c" top: "sl_a" top: "sl_b" slice_param { axis: 3 slice_point: 5 } }
layer { name: "sl_even" type: "Slice" bottom: "c" top: "se_a" top: "se_b" slice_param { axis: 1 } }
layer { name: "cat" type: "Concat" bottom: "sl_b" bottom: "sl_a" top: "cat" concat_param { axis: 3 } }
layer { name: "tile" type: "Tile" bottom: "se_a" top: "tile" tile_param { axis: 2 tiles: 2 } }
layer { name: "rs" type: "Reshape" bottom: "c" top: "rs" reshape_param { shape { dim: 0 dim: -1 dim: 1 } axis: 1 num_axes: 2 } }
layer { name: "fl" type: "Flatten" bottom: "c" top: "fl" flatten_param { axis: 1 end_axis: 2 } }
layer { name: "gp" type: "Pooling" bottom: "c" top: "gp" pooling_param { pool: AVE global_pooling: true } }
layer { name: "gpf" type: "Flatten" bottom: "gp" top: "gpf" }
layer { name: "sc2" type: "Scale" bottom: "c" bottom: "gpf" top: "sc2" scale_param { axis: 0 bias_term: true
  bias_filler { type: "gaussian" std: 1 } } }
layer { name: "bi2" type: "Bias" bottom: "c" bottom: "gpf" top: "bi2" bias_param { axis: 0 } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "bn" batch_norm_param { use_global_stats: false } }
layer { name: "mvn" type: "MVN" bottom: "c" top: "mvn" mvn_param { across_channels: true eps: 0.01 } }
layer { name: "am" type: "ArgMax" bottom: "c" top: "am" argmax_param { axis: 1 top_k: 2 } }
layer { name: "amv" type: "ArgMax" bottom: "c" top: "amv" argmax_param { axis: 3 top_k: 3 out_max_val: true } }
layer { name: "red" type: "Reduction" bottom: "c" top: "red" reduction_param { operation: MEAN axis: 2 coeff: 3 } }
layer { name: "red_s" type: "Reduction" bottom: "c" top: "red_s" reduction_param { operation: SUM axis: 1 coeff: -0.5 } }
layer { name: "red_a" type: "Reduction" bottom: "c" top: "red_a" reduction_param { operation: ASUM axis: 1 } }
layer { name: "red_q" type: "Reduction" bottom: "c" top: "red_q" reduction_param { operation: SUMSQ axis: 2 coeff: 2 } }
layer { name: "sm" type: "Softmax" bottom: "c" top: "sm" softmax_param { axis: 2 } }
layer { name: "e_sum" type: "Eltwise" bottom: "c" bottom: "bn" bottom: "mvn" top: "e_sum" }
layer { name: "e_prod" type: "Eltwise" bottom: "c" bottom: "bn" bottom: "mvn" top: "e_prod" eltwise_param { operation: PROD } }
layer { name: "e_max" type: "Eltwise" bottom: "c" bottom: "bn" bottom: "mvn" top: "e_max" eltwise_param { operation: MAX } }
layer { name: "crop" type: "Crop" bottom: "dc" bottom: "c" top: "crop" crop_param { offset: 1 offset: 2 } }
layer { name: "crop_c" type: "Crop" bottom: "c" bottom: "se_a" top: "crop_c" crop_param { axis: 1 offset: 2 offset: 0 offset: 0 } }
layer { name: "p0" type: "Power" bottom: "c" top: "p0" power_param { power: 0 } }
layer { name: "p1" type: "Power" bottom: "c" top: "p1" power_param { scale: 0 shift: 2 power: 3 } }
layer { name: "clip" type: "Clip" bottom: "c" top: "clip" clip_param { min: 0.5 max: -0.5 } }
layer { name: "exp" type: "Exp" bottom: "c" top: "exp" exp_param { shift: 0.3 scale: 0.2 } }
layer { name: "elu" type: "ELU" bottom: "exp" top: "exp" elu_param { alpha: 0.4 } }
layer { name: "sig" type: "Sigmoid" bottom: "exp" top: "exp" }
layer { name: "log" type: "Log" bottom: "p0" top: "log" }
"""

LOSSES = """
name: "losses"
layer { name: "in" type: "Input" top: "score" top: "label" top: "vec" top: "vec2" top: "lab1" top: "target" top: "sim"
  top: "H" input_param { shape { dim: 3 dim: 4 dim: 2 dim: 5 } shape { dim: 3 dim: 1 dim: 2 dim: 5 }
    shape { dim: 6 dim: 5 } shape { dim: 6 dim: 5 } shape { dim: 6 } shape { dim: 6 dim: 5 } shape { dim: 6 }
    shape { dim: 4 dim: 4 } } }
layer { name: "sm_full" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "sm_full" top: "sm_prob"
  loss_param { ignore_label: 3 normalization: FULL } }
layer { name: "sm_batch" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "sm_batch"
  loss_param { normalization: BATCH_SIZE ignore_label: 1 } }
layer { name: "sm_none" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "sm_none" loss_param { normalization: NONE } }
layer { name: "ig3" type: "InfogainLoss" bottom: "score" bottom: "label" bottom: "H" top: "ig3" loss_param { ignore_label: 2 } }
layer { name: "igs" type: "InfogainLoss" bottom: "score" bottom: "label" top: "igs" top: "igs_prob"
  infogain_loss_param { source: "INFOGAIN" } loss_param { normalization: BATCH_SIZE } }
layer { name: "acc" type: "Accuracy" bottom: "score" bottom: "label" top: "acc" top: "acc_pc"
  accuracy_param { top_k: 2 ignore_label: 0 } }
layer { name: "acc_ax" type: "Accuracy" bottom: "vec" bottom: "lab1" top: "acc_ax" }
layer { name: "hinge2" type: "HingeLoss" bottom: "vec" bottom: "lab1" top: "hinge2" hinge_loss_param { norm: L2 } }
layer { name: "ctr_legacy" type: "ContrastiveLoss" bottom: "vec" bottom: "vec2" bottom: "sim" top: "ctr_legacy"
  contrastive_loss_param { margin: 40 legacy_version: true } }
layer { name: "sce" type: "SigmoidCrossEntropyLoss" bottom: "vec" bottom: "target" top: "sce"
  loss_param { ignore_label: -1 normalization: VALID } }
layer { name: "softmax_v" type: "Softmax" bottom: "vec2" top: "pv" }
layer { name: "mlog" type: "MultinomialLogisticLoss" bottom: "pv" bottom: "lab1" top: "mlog" }
"""


def _spatial_feeds(rng, h=11, w=14):
    return {"data": rng.standard_normal((2, 4, h, w)).astype(np.float32)}


@pytest.mark.parametrize("opset", [13, 17, 18, DEFAULT_OPSET])
def test_spatial_layers_match_caffeish_static_and_dynamic(opset, tmp_path):
    proto = tmp_path / "spatial.prototxt"
    proto.write_text(SPATIAL)
    rng = np.random.default_rng(opset)
    exact = ("pm_mask", "pf_mask", "pg_mask", "am")
    static = build_model(str(proto), opset=opset, outputs="all")
    dynamic = build_model(str(proto), opset=opset, dynamic_hw=True, outputs="all")
    for result, sizes in ((static, [(11, 14)]), (dynamic, [(11, 14), (16, 9), (24, 31)])):
        for h, w in sizes:
            feeds = _spatial_feeds(rng, h, w)
            ours = run_onnx(result, feeds)
            expected = caffeish_blobs(proto, None, feeds, seed=0)
            assert set(expected) <= set(ours)
            assert_same(ours, expected, 1e-5, exact)


def test_conv_on_a_later_axis_inner_product_axes_and_constant_tops(tmp_path):
    proto = tmp_path / "axes.prototxt"
    proto.write_text("""
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 6 dim: 5 } } }
layer { name: "idx" type: "Input" top: "idx" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "c" type: "Convolution" bottom: "x" top: "c" convolution_param { axis: 2 num_output: 3 kernel_size: 2
  weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "ip0" type: "InnerProduct" bottom: "c" top: "ip0" inner_product_param { axis: 0 num_output: 3
  weight_filler { type: "gaussian" std: 1 } } }
layer { name: "ip3" type: "InnerProduct" bottom: "c" top: "ip3" inner_product_param { axis: 3 num_output: 2
  transpose: true weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "emb" type: "Embed" bottom: "idx" top: "emb" embed_param { num_output: 3 input_dim: 7
  weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 2 dim: 3 } } }
layer { name: "dd" type: "DummyData" top: "dd" dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: "constant" value: 2 } } }
layer { name: "sum" type: "Eltwise" bottom: "p" bottom: "dd" bottom: "idx" top: "sum" }
""")
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 3, 4, 6, 5)).astype(np.float32),
             "idx": rng.integers(0, 7, (2, 3)).astype(np.float32)}
    ours = run_onnx(build_model(str(proto), outputs="all"), feeds)
    expected = caffeish_blobs(proto, None, feeds, seed=0)
    assert {"c", "ip0", "ip3", "emb", "sum"} <= set(ours)
    assert_same(ours, expected, 1e-5)


def test_ties_in_argmax_and_accuracy_follow_caffe(tmp_path):
    proto = tmp_path / "ties.prototxt"
    proto.write_text("""
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 3 dim: 5 dim: 2 dim: 4 } } }
layer { name: "a1" type: "ArgMax" bottom: "x" top: "a1" }
layer { name: "a3" type: "ArgMax" bottom: "x" top: "a3" argmax_param { top_k: 3 } }
layer { name: "a3v" type: "ArgMax" bottom: "x" top: "a3v" argmax_param { top_k: 3 out_max_val: true } }
layer { name: "ax" type: "ArgMax" bottom: "x" top: "ax" argmax_param { axis: 1 top_k: 2 } }
layer { name: "ax3" type: "ArgMax" bottom: "x" top: "ax3" argmax_param { axis: -1 } }
layer { name: "lab" type: "Input" top: "lab" input_param { shape { dim: 3 dim: 1 dim: 2 dim: 4 } } }
layer { name: "acc" type: "Accuracy" bottom: "x" bottom: "lab" top: "acc" top: "acc_pc" accuracy_param { top_k: 2 } }
""")
    rng = np.random.default_rng(2)
    feeds = {"x": rng.integers(0, 3, (3, 5, 2, 4)).astype(np.float32),  # many ties
             "lab": rng.integers(0, 5, (3, 1, 2, 4)).astype(np.float32)}
    ours = run_onnx(build_model(str(proto), outputs="all"), feeds)
    expected = caffeish_blobs(proto, None, feeds)
    assert 0 < expected["acc"] < 1
    assert_same(ours, expected, 0, exact=("a1", "a3", "a3v", "ax", "ax3", "acc", "acc_pc"))


def test_memory_data_tops_are_inputs_and_unread_inputs_are_left_out(tmp_path, capsys):
    # VGG-16's deploy net feeds its data through MemoryData, whose label no layer reads.
    proto = tmp_path / "memory.prototxt"
    proto.write_text("""
layer { name: "data" type: "MemoryData" top: "data" top: "label" include { phase: TEST }
  memory_data_param { batch_size: 2 channels: 3 height: 8 width: 8 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 3
  weight_filler { type: "gaussian" std: 1 } } }
layer { name: "prob" type: "Softmax" bottom: "conv" top: "prob" }
""")
    result = build_model(str(proto))
    assert result.inputs == ["data"] and result.unread == ["label"] and list(result.outputs) == ["prob"]
    feeds = {"data": np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    expected = caffeish_blobs(proto, None, {**feeds, "label": np.zeros((2,), np.float32)}, seed=0)
    assert_same(run_onnx(result, feeds), {"prob": expected["prob"]}, 1e-5)
    assert main(["export", "onnx", str(proto), "-o", str(tmp_path / "m.onnx"), "--dynamic-hw"]) == 0
    printed = capsys.readouterr().out
    assert "inputs: data 2x3xdata_heightxdata_width" in printed and "left out input(s) no layer reads: label" in printed


def test_losses_and_accuracy_match_caffeish(tmp_path):
    infogain = tmp_path / "infogain.binaryproto"
    rng = np.random.default_rng(5)
    io.write_binaryproto(str(infogain), rng.random((4, 4)).astype(np.float32))
    proto = tmp_path / "losses.prototxt"
    proto.write_text(LOSSES.replace("INFOGAIN", str(infogain)))
    feeds = {
        "score": rng.standard_normal((3, 4, 2, 5)).astype(np.float32) * 3,
        "label": rng.integers(0, 4, (3, 1, 2, 5)).astype(np.float32),
        "vec": rng.standard_normal((6, 5)).astype(np.float32) * 3,
        "vec2": rng.standard_normal((6, 5)).astype(np.float32) * 3,
        "lab1": rng.integers(0, 5, (6,)).astype(np.float32),
        "target": rng.choice([-1.0, 0.0, 1.0, 0.25], (6, 5)).astype(np.float32),
        "sim": np.array([0, 1, 1, 0, 2, 0], np.float32),
        "H": rng.random((4, 4)).astype(np.float32),
    }
    result = build_model(str(proto), outputs="all")
    ours = run_onnx(result, feeds)
    expected = caffeish_blobs(proto, None, feeds)
    assert {"sm_full", "ig3", "igs", "acc", "acc_pc", "hinge2", "ctr_legacy", "sce", "mlog"} <= set(ours)
    assert_same(ours, expected, 1e-5)


# -- errors ------------------------------------------------------------------------------------


def _net(tmp_path, body, name="bad.prototxt"):
    path = tmp_path / name
    path.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }\n'
                    + body)
    return path


@pytest.mark.parametrize("body, pattern", [
    ('layer { name: "py\\nx" type: "Python" bottom: "data" top: "out" python_param { module: "caffeish_export_never_imported" '
     'layer: "L" } }', r"layer 'py\\nx' \(Python\): cannot export to ONNX: runs Python code"),
    ('layer { name: "dd" type: "DummyData" top: "noise" dummy_data_param { shape { dim: 2 } data_filler { type: "gaussian" } } }',
     r"layer 'dd' \(DummyData\): cannot export to ONNX: its gaussian filler draws new random values"),
    ('layer { name: "h5" type: "HDF5Output" bottom: "data" bottom: "data" hdf5_output_param { file_name: "x.h5" } }',
     r"layer 'h5' \(HDF5Output\): cannot export to ONNX: writes HDF5 files"),
])
def test_a_layer_onnx_cannot_hold_is_named(tmp_path, body, pattern):
    with pytest.raises(ExportError, match=pattern):
        build_model(str(_net(tmp_path, body)))
    assert "caffeish_export_never_imported" not in sys.modules  # the Python layer's module never ran


def test_dropout_and_stochastic_pooling_at_train_are_refused(tmp_path):
    path = _net(tmp_path, 'layer { name: "drop" type: "Dropout" bottom: "data" top: "data" }')
    with pytest.raises(ExportError, match=r"layer 'drop' \(Dropout\): .*random mask"):
        build_model(str(path), phase="TRAIN")
    assert build_model(str(path)).outputs == {"data": "data_out"}  # at TEST: the identity (an input, renamed)


def test_cli_writes_the_model_atomically_and_errors_are_one_line(tmp_path, capsys):
    folder, _, weights, feeds = golden_case("lenet_real_weights")
    out = tmp_path / "sub" / "lenet.onnx"
    assert main(["export", "onnx", str(folder / "net.prototxt"), weights, "-o", str(out), "--input-shape",
                 "data=4,1,28,28"]) == 1  # the folder does not exist
    assert "does not exist" in capsys.readouterr().err and not out.parent.exists()
    out.parent.mkdir()
    assert main(["export", "onnx", str(folder / "net.prototxt"), weights, "-o", str(out), "--input-shape",
                 "data=4,1,28,28", "--opset", "17"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: ONNX opset 17" in printed and "inputs: data 4x1x28x28" in printed
    model = onnx.load(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (prob,) = session.run(None, {"data": feeds["data"]})
    expected = np.load(folder / "blobs.npz")[model.graph.output[0].name]
    assert relative_error(prob, expected) <= 1e-5
    assert sorted(os.listdir(out.parent)) == ["lenet.onnx"]  # no temp file left
    bad = _net(tmp_path, 'layer { name: "lstm" type: "LSTM" bottom: "data" bottom: "data" top: "h" '
                         'recurrent_param { num_output: 2 } }')
    target = tmp_path / "bad.onnx"
    assert main(["export", "onnx", str(bad), "-o", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layer 'lstm' (LSTM): cannot export to ONNX" in err
    assert not target.exists()
    before = (folder / "net.prototxt").read_bytes()
    assert main(["export", "onnx", str(folder / "net.prototxt"), "-o", str(folder / "net.prototxt")]) == 1
    assert "refusing to overwrite an input" in capsys.readouterr().err
    assert (folder / "net.prototxt").read_bytes() == before


def test_opset_range_and_missing_onnx(tmp_path, monkeypatch):
    path = _net(tmp_path, 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }')
    with pytest.raises(ExportError, match=r"opset 12 is not supported: give one from 13"):
        build_model(str(path), opset=12)
    with pytest.raises(SystemExit):
        main(["export", "onnx", str(path), "-o", str(tmp_path / "x.onnx"), "--opset", "5"])
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingDependencyError, match=r"needs the onnx package.*pip install 'caffeish\[onnx\]'"):
        build_model(str(path))
    assert issubclass(MissingDependencyError, CaffeishError)
