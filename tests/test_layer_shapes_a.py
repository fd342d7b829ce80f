"""Shape inference of the neuron, normalisation, InnerProduct/Embed, loss, recurrent
and Python layers.

Top shapes are compared with the shapes real Caffe recorded in the golden cases'
meta.json, blob shapes with their params.npz, the rest with Caffe's unit-test
vectors and hand computations.
"""
import json
import math

import numpy as np
import pytest
from google.protobuf import text_format

from caffeish.errors import ShapeError, UnsupportedError
from caffeish.graph.registry import create, registered_types
from caffeish.formats.schema import TEST, TRAIN, pb
from conftest import SHARED, shared_path

NEURON_TYPES = {
    "ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL",
    "Threshold", "Clip", "Swish", "Dropout",
}
MY_TYPES = NEURON_TYPES | {
    "LRN", "MVN", "BatchNorm", "Scale", "Bias", "InnerProduct", "Embed",
    "SoftmaxWithLoss", "EuclideanLoss", "SigmoidCrossEntropyLoss", "HingeLoss", "InfogainLoss",
    "MultinomialLogisticLoss", "ContrastiveLoss", "Accuracy", "RNN", "LSTM", "LSTMUnit", "Python",
}


def layer(text, phase=TEST):
    return create(text_format.Parse(text, pb.LayerParameter()), phase)


def tops_of(lay, bottom_shapes):
    return lay.reshape([tuple(s) for s in bottom_shapes])


def count(shape):
    return math.prod(shape)


def test_all_my_types_are_registered():
    assert MY_TYPES <= set(registered_types())


# -- golden cases --------------------------------------------------------------------------------


def load_params(case):
    """The golden case's params.npz as {key: array}, or None where it has none."""
    path = SHARED / "golden" / case / "params.npz"
    return dict(np.load(path)) if path.exists() else None


def recorded_blobs(params, layer_name):
    """Shapes of a layer's blobs as Caffe saved them ('layer/index' keys), in blob order."""
    n = sum(1 for k in params if k.rsplit("/", 1)[0] == layer_name)
    return [tuple(params[f"{layer_name}/{i}"].shape) for i in range(n)]


def _source_shapes(lp):
    """Top shapes of an Input or DummyData layer, read straight from its parameters."""
    if lp.type == "Input":
        shapes = [tuple(s.dim) for s in lp.input_param.shape]
    else:
        p = lp.dummy_data_param
        if len(p.shape):
            shapes = [tuple(s.dim) for s in p.shape]
        else:
            shapes = list(zip(p.num, p.channels, p.height, p.width))
    # One shape given for several tops applies to all of them.
    return shapes * len(lp.top) if len(shapes) == 1 else shapes


@pytest.mark.parametrize("case", ["activations", "normalization", "inner_product", "losses"])
def test_golden_walk_from_inputs(case):
    net = text_format.Parse(shared_path("golden", case, "net.prototxt").read_text(), pb.NetParameter())
    meta = json.loads(shared_path("golden", case, "meta.json").read_text())
    recorded = {name: tuple(shape) for name, shape in meta["blob_shapes"].items()}
    params = load_params(case)
    registered = set(registered_types())
    shapes, checked, skipped = {}, 0, []
    for lp in net.layer:
        if lp.type in ("Input", "DummyData"):
            tops = _source_shapes(lp)
        else:
            if lp.type not in registered:
                assert lp.type not in MY_TYPES, f"{lp.type} is not registered"
                skipped.append(lp.name)
                continue
            if not all(b in shapes for b in lp.bottom):
                skipped.append(lp.name)
                continue
            lay = create(lp, TEST)
            bottoms = [shapes[b] for b in lp.bottom]
            tops = tops_of(lay, bottoms)
            if params is not None:
                assert lay.param_shapes(bottoms) == recorded_blobs(params, lp.name), lp.name
        assert len(tops) == len(lp.top), lp.name
        for name, shape in zip(lp.top, tops):
            assert tuple(shape) == recorded[name], (lp.name, name)
            shapes[name] = tuple(shape)
            checked += 1
    if not skipped:
        # Every blob Caffe recorded, apart from the Split copies it inserts, was produced.
        assert {n for n in recorded if "_split_" not in n} == set(shapes)
    assert checked >= len(net.layer)


def golden_cases():
    root = SHARED / "golden"
    return sorted(p.name for p in root.iterdir() if (p / "meta.json").exists()) if root.exists() else []


@pytest.mark.parametrize("case", golden_cases())
def test_every_golden_layer_of_these_families(case):
    """Each of these layers in every golden net, fed Caffe's recorded bottom shapes;
    blob shapes are compared with params.npz where the case has one."""
    net = text_format.Parse(shared_path("golden", case, "net.prototxt").read_text(), pb.NetParameter())
    meta = json.loads(shared_path("golden", case, "meta.json").read_text())
    recorded = {name: tuple(shape) for name, shape in meta["blob_shapes"].items()}
    params = load_params(case)
    for lp in net.layer:
        if lp.type in MY_TYPES:
            lay = create(lp, TEST)
            bottoms = [recorded[b] for b in lp.bottom]
            assert tops_of(lay, bottoms) == [recorded[t] for t in lp.top], lp.name
            if params is not None:
                assert lay.param_shapes(bottoms) == recorded_blobs(params, lp.name), lp.name


# -- neuron layers -------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", sorted(NEURON_TYPES - {"PReLU"}))
@pytest.mark.parametrize("shape", [(7,), (2, 3), (2, 3, 4, 5), (1, 2, 3, 4, 5, 6)])
def test_neuron_keeps_shape(type_name, shape):
    lay = layer(f'name: "n" type: "{type_name}" bottom: "x" top: "y"')
    assert tops_of(lay, [shape]) == [shape]
    assert lay.param_shapes([shape]) == []
    assert lay.macs([shape], [shape]) == 0


def test_neuron_in_place_flags():
    for type_name in NEURON_TYPES - {"AbsVal"}:
        assert layer(f'name: "n" type: "{type_name}" bottom: "x" top: "x"').allows_in_place, type_name
    absval = layer('name: "abs1" type: "AbsVal" bottom: "x" top: "x"')
    assert not absval.allows_in_place
    with pytest.raises(ShapeError, match="'abs1'.*in-place"):
        tops_of(absval, [(2, 3)])


def test_neuron_needs_one_bottom():
    lay = layer('name: "r" type: "ReLU" bottom: "a" bottom: "b" top: "y"')
    with pytest.raises(ShapeError, match="'r'.*exactly 1 bottom"):
        tops_of(lay, [(2, 3), (2, 3)])


def test_prelu_blob_and_axes():
    per_channel = layer('name: "p" type: "PReLU" bottom: "x" top: "y"')
    assert tops_of(per_channel, [(2, 3, 4, 5)]) == [(2, 3, 4, 5)]
    assert per_channel.param_shapes([(2, 3, 4, 5)]) == [(3,)]
    assert per_channel.param_shapes([(8, 16)]) == [(16,)]
    shared = layer('name: "p" type: "PReLU" bottom: "x" top: "y" prelu_param { channel_shared: true }')
    assert shared.param_shapes([(2, 3, 4, 5)]) == [()]
    with pytest.raises(ShapeError, match="'p'.*at least 2 axes"):
        tops_of(per_channel, [(10,)])
    with pytest.raises(ShapeError, match="'p'.*at most 4 axes"):
        tops_of(per_channel, [(1, 2, 3, 4, 5)])


@pytest.mark.parametrize("type_name,field", [("Exp", "exp_param"), ("Log", "log_param")])
def test_exp_log_base(type_name, field):
    for ok in ("-1", "2", "0.5"):
        lay = layer(f'name: "e" type: "{type_name}" bottom: "x" top: "y" {field} {{ base: {ok} }}')
        assert tops_of(lay, [(4,)]) == [(4,)]
    for bad in ("0", "-2"):
        lay = layer(f'name: "e" type: "{type_name}" bottom: "x" top: "y" {field} {{ base: {bad} }}')
        with pytest.raises(ShapeError, match="'e'.*base must be strictly positive"):
            tops_of(lay, [(4,)])


def test_dropout_ratio():
    lay = layer('name: "d" type: "Dropout" bottom: "x" top: "x" dropout_param { dropout_ratio: 1.5 }')
    with pytest.raises(ShapeError, match="'d'.*dropout_ratio"):
        tops_of(lay, [(2, 3)])
    assert not layer('name: "d" type: "Dropout" bottom: "x" top: "x"').train
    assert layer('name: "d" type: "Dropout" bottom: "x" top: "x"', TRAIN).train
    assert not layer('name: "d" type: "Dropout" bottom: "x" top: "x" phase: TEST', TRAIN).train


# -- normalisation -------------------------------------------------------------------------------


def test_lrn_setup_vectors():
    """Caffe's test_lrn_layer.cpp TestSetup* vectors."""
    vectors = json.loads(shared_path("caffe", "test_vectors.json").read_text())
    setups = [v for v in vectors if v["layer"] == "LRN" and "top_shape" in v]
    assert setups
    for v in setups:
        text = " ".join(
            f"{k}: {val}" for k, val in v["params"].items()
        )
        lay = layer(f'name: "lrn" type: "LRN" bottom: "x" top: "y" lrn_param {{ {text} }}')
        assert tops_of(lay, [v["bottom_shape"]]) == [tuple(v["top_shape"])], v["test"]


def test_lrn_checks():
    even = layer('name: "norm1" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 4 }')
    with pytest.raises(ShapeError, match="'norm1'.*odd"):
        tops_of(even, [(2, 3, 4, 5)])
    lay = layer('name: "norm1" type: "LRN" bottom: "x" top: "y"')
    with pytest.raises(ShapeError, match="'norm1'.*4 axes"):
        tops_of(lay, [(2, 3, 4)])


def test_mvn_top_is_legacy_4d():
    lay = layer('name: "m" type: "MVN" bottom: "x" top: "y"')
    assert tops_of(lay, [(2, 6, 5, 7)]) == [(2, 6, 5, 7)]
    assert tops_of(lay, [(2, 6)]) == [(2, 6, 1, 1)]
    with pytest.raises(ShapeError, match="'m'.*at most 4 axes"):
        tops_of(lay, [(1, 2, 3, 4, 5)])


def test_batchnorm_blobs_and_checks():
    lay = layer('name: "bn1" type: "BatchNorm" bottom: "x" top: "x"')
    assert tops_of(lay, [(2, 6, 5, 7)]) == [(2, 6, 5, 7)]
    assert lay.param_shapes([(2, 6, 5, 7)]) == [(6,), (6,), (1,)]
    assert lay.param_shapes([(8, 64)]) == [(64,), (64,), (1,)]
    assert lay.use_global_stats
    assert not layer('name: "bn1" type: "BatchNorm" bottom: "x" top: "x"', TRAIN).use_global_stats
    forced = layer('name: "b" type: "BatchNorm" bottom: "x" top: "x" batch_norm_param { use_global_stats: false }')
    assert not forced.use_global_stats
    with pytest.raises(ShapeError, match="'bn1'.*at least 2 axes"):
        tops_of(lay, [(5,)])
    learned = layer('name: "bn2" type: "BatchNorm" bottom: "x" top: "x" param { lr_mult: 1 }')
    with pytest.raises(ShapeError, match="'bn2'.*lr_mult"):
        tops_of(learned, [(2, 3)])
    frozen = layer('name: "bn3" type: "BatchNorm" bottom: "x" top: "x" param { lr_mult: 0 }')
    assert tops_of(frozen, [(2, 3)]) == [(2, 3)]


SCALE_ONE_BOTTOM = [
    # (scale_param text, bottom, expected scale blob)
    ("", (2, 3, 4, 5), (3,)),
    ("axis: 0 num_axes: 2", (2, 3, 4, 5), (2, 3)),
    ("axis: 1 num_axes: -1", (2, 3, 4, 5), (3, 4, 5)),
    ("axis: -1", (2, 3, 4, 5), (5,)),
    ("num_axes: 0", (2, 3, 4, 5), ()),
    ("axis: 2 num_axes: 2", (2, 3, 4, 5), (4, 5)),
]


@pytest.mark.parametrize("text,bottom,blob", SCALE_ONE_BOTTOM)
def test_scale_and_bias_learned_blob(text, bottom, blob):
    scale = layer(f'name: "s" type: "Scale" bottom: "x" top: "y" scale_param {{ {text} }}')
    assert tops_of(scale, [bottom]) == [bottom]
    assert scale.param_shapes([bottom]) == [blob]
    with_bias = layer(f'name: "s" type: "Scale" bottom: "x" top: "y" scale_param {{ {text} bias_term: true }}')
    assert with_bias.param_shapes([bottom]) == [blob, blob]
    bias = layer(f'name: "b" type: "Bias" bottom: "x" top: "y" bias_param {{ {text} }}')
    assert tops_of(bias, [bottom]) == [bottom]
    assert bias.param_shapes([bottom]) == [blob]


def test_scale_two_bottoms():
    lay = layer('name: "s" type: "Scale" bottom: "x" bottom: "s" top: "y"')
    assert tops_of(lay, [(2, 3, 4, 5), (3, 4)]) == [(2, 3, 4, 5)]
    assert lay.param_shapes([(2, 3, 4, 5), (3, 4)]) == []
    # A scalar operand ignores the axis (even an out-of-range one).
    far = layer('name: "s" type: "Scale" bottom: "x" bottom: "s" top: "y" scale_param { axis: 7 }')
    assert tops_of(far, [(2, 3), ()]) == [(2, 3)]
    biased = layer('name: "s" type: "Scale" bottom: "x" bottom: "s" top: "y" scale_param { axis: 0 bias_term: true }')
    assert biased.param_shapes([(2, 3, 4), (2, 3)]) == [(2, 3)]
    with pytest.raises(ShapeError, match="'s'.*does not match"):
        tops_of(lay, [(2, 3, 4, 5), (4,)])
    with pytest.raises(ShapeError, match="'s'.*does not match"):
        tops_of(lay, [(2, 3), (3, 1)])
    bias = layer('name: "b" type: "Bias" bottom: "x" bottom: "c" top: "y" bias_param { axis: 0 }')
    assert tops_of(bias, [(1, 4, 8), (1, 4)]) == [(1, 4, 8)]
    assert bias.param_shapes([(1, 4, 8), (1, 4)]) == []
    with pytest.raises(ShapeError, match="'b'.*does not match"):
        tops_of(bias, [(1, 4, 8), (4,)])


def test_scale_bias_param_checks():
    past_end = layer('name: "s" type: "Scale" bottom: "x" top: "y" scale_param { axis: 1 num_axes: 3 }')
    with pytest.raises(ShapeError, match="'s'.*extends past"):
        tops_of(past_end, [(2, 3, 4)])
    bad_num = layer('name: "b" type: "Bias" bottom: "x" top: "y" bias_param { num_axes: -2 }')
    with pytest.raises(ShapeError, match="'b'.*num_axes"):
        tops_of(bad_num, [(2, 3)])
    bad_axis = layer('name: "s" type: "Scale" bottom: "x" top: "y" scale_param { axis: 4 num_axes: 0 }')
    with pytest.raises(ShapeError, match="'s'.*axis 4 out of range"):
        tops_of(bad_axis, [(2, 3)])
    three = layer('name: "s" type: "Scale" bottom: "a" bottom: "b" bottom: "c" top: "y"')
    with pytest.raises(ShapeError, match="'s'.*at most 2 bottom"):
        tops_of(three, [(2,), (2,), (2,)])


# -- InnerProduct and Embed ----------------------------------------------------------------------


def test_inner_product_setup_vectors():
    """Caffe's test_inner_product_layer.cpp TestSetUp* vectors."""
    vectors = json.loads(shared_path("caffe", "test_vectors.json").read_text())
    setups = [v for v in vectors if v["layer"] == "InnerProduct" and "weight_shape" in v]
    assert len(setups) == 2
    for v in setups:
        text = " ".join(f"{k}: {str(val).lower()}" for k, val in v["params"].items())
        lay = layer(f'name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param {{ {text} }}')
        assert tops_of(lay, [v["bottom_shape"]]) == [tuple(v["top_shape"])]
        assert lay.param_shapes([tuple(v["bottom_shape"])])[0] == tuple(v["weight_shape"])


def test_alexnet_fc6_counts():
    lay = layer('name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6" inner_product_param { num_output: 4096 }')
    bottom = (10, 256, 6, 6)
    tops = tops_of(lay, [bottom])
    assert tops == [(10, 4096)]
    blobs = lay.param_shapes([bottom])
    assert blobs == [(4096, 9216), (4096,)]
    assert sum(count(s) for s in blobs) == 37_752_832
    assert lay.macs([bottom], tops) == 10 * 4096 * 9216


def test_inner_product_axis_and_checks():
    lay = layer('name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 3 axis: -1 bias_term: false }')
    assert tops_of(lay, [(2, 4, 5)]) == [(2, 4, 3)]
    assert lay.param_shapes([(2, 4, 5)]) == [(3, 5)]
    assert lay.macs([(2, 4, 5)], [(2, 4, 3)]) == 2 * 4 * 5 * 3
    unset = layer('name: "fc" type: "InnerProduct" bottom: "x" top: "y"')
    with pytest.raises(ShapeError, match="'fc'.*num_output"):
        tops_of(unset, [(2, 3)])
    far = layer('name: "fc" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 axis: 3 }')
    with pytest.raises(ShapeError, match="'fc'.*axis 3 out of range"):
        tops_of(far, [(2, 3)])


def test_embed():
    lay = layer('name: "emb" type: "Embed" bottom: "w" top: "e" embed_param { input_dim: 1000 num_output: 16 }')
    assert tops_of(lay, [(20, 4)]) == [(20, 4, 16)]
    assert lay.param_shapes([(20, 4)]) == [(1000, 16), (16,)]
    no_bias = layer('name: "emb" type: "Embed" bottom: "w" top: "e" embed_param { input_dim: 10 num_output: 3 bias_term: false }')
    assert no_bias.param_shapes([(5,)]) == [(10, 3)]
    missing = layer('name: "emb" type: "Embed" bottom: "w" top: "e" embed_param { num_output: 3 }')
    with pytest.raises(ShapeError, match="'emb'.*input_dim"):
        tops_of(missing, [(5,)])


# -- losses and accuracy -------------------------------------------------------------------------


def test_softmax_with_loss():
    lay = layer('name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" top: "prob"')
    assert tops_of(lay, [(4, 5, 3, 2), (4, 1, 3, 2)]) == [(), (4, 5, 3, 2)]
    assert tops_of(lay, [(4, 5, 3, 2), (4, 6)]) == [(), (4, 5, 3, 2)]
    one = layer('name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss"')
    assert tops_of(one, [(10, 1000), (10,)]) == [()]
    with pytest.raises(ShapeError, match="'loss'.*number of labels"):
        tops_of(one, [(4, 5, 3, 2), (4, 5)])
    with pytest.raises(ShapeError, match="'loss'.*same first dimension"):
        tops_of(one, [(4, 5), (1, 4)])
    axis2 = layer('name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" softmax_param { axis: 2 }')
    assert tops_of(axis2, [(4, 5, 3), (4, 5)]) == [()]


def test_count_checking_losses():
    eu = layer('name: "eu" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "l"')
    assert tops_of(eu, [(4, 5), (4, 5, 1, 1)]) == [()]
    with pytest.raises(ShapeError, match="'eu'.*same dimension"):
        tops_of(eu, [(4, 5), (4, 6)])
    sce = layer('name: "sce" type: "SigmoidCrossEntropyLoss" bottom: "a" bottom: "b" top: "l"')
    assert tops_of(sce, [(4, 5), (4, 5)]) == [()]
    with pytest.raises(ShapeError, match="'sce'.*same count"):
        tops_of(sce, [(4, 5), (4, 1)])
    hinge = layer('name: "h" type: "HingeLoss" bottom: "a" bottom: "b" top: "l"')
    assert tops_of(hinge, [(4, 5), (4,)]) == [()]
    with pytest.raises(ShapeError, match="'h'.*same first dimension"):
        tops_of(hinge, [(4, 5), (3,)])
    two_tops = layer('name: "h" type: "HingeLoss" bottom: "a" bottom: "b" top: "l" top: "m"')
    with pytest.raises(ShapeError, match="'h'.*exactly 1 top"):
        tops_of(two_tops, [(4, 5), (4,)])


def test_multinomial_and_contrastive():
    mll = layer('name: "mlog" type: "MultinomialLogisticLoss" bottom: "p" bottom: "l" top: "loss"')
    assert tops_of(mll, [(4, 5), (4, 1, 1, 1)]) == [()]
    with pytest.raises(ShapeError, match="'mlog'.*one value per item"):
        tops_of(mll, [(4, 5), (4, 2)])
    ctr = layer('name: "ctr" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "s" top: "loss"')
    assert tops_of(ctr, [(4, 5), (4, 5), (4,)]) == [()]
    assert tops_of(ctr, [(4, 5, 1, 1), (4, 5, 1, 1), (4, 1, 1, 1)]) == [()]
    with pytest.raises(ShapeError, match="'ctr'.*same channel count"):
        tops_of(ctr, [(4, 5), (4, 6), (4,)])
    with pytest.raises(ShapeError, match="'ctr'.*height and width 1"):
        tops_of(ctr, [(4, 5, 2), (4, 5, 2), (4,)])
    with pytest.raises(ShapeError, match="'ctr'.*similarity"):
        tops_of(ctr, [(4, 5), (4, 5), (4, 2)])
    with pytest.raises(ShapeError, match="'ctr'.*exactly 3 bottom"):
        tops_of(ctr, [(4, 5), (4, 5)])


def test_infogain_loss():
    with_source = layer('name: "ig" type: "InfogainLoss" bottom: "s" bottom: "l" top: "loss" infogain_loss_param { source: "H.binaryproto" }')
    assert tops_of(with_source, [(4, 5), (4,)]) == [()]
    no_source = layer('name: "ig" type: "InfogainLoss" bottom: "s" bottom: "l" top: "loss"')
    with pytest.raises(ShapeError, match="'ig'.*source"):
        tops_of(no_source, [(4, 5), (4,)])
    three = layer('name: "ig" type: "InfogainLoss" bottom: "s" bottom: "l" bottom: "H" top: "loss" top: "prob"')
    assert tops_of(three, [(4, 5, 2), (4, 2), (1, 1, 5, 5)]) == [(), (4, 5, 2)]
    with pytest.raises(ShapeError, match="'ig'.*infogain matrix"):
        tops_of(three, [(4, 5, 2), (4, 2), (4, 4)])
    with pytest.raises(ShapeError, match="'ig'.*number of labels"):
        tops_of(three, [(4, 5, 2), (4,), (5, 5)])


def test_accuracy():
    acc = layer('name: "acc" type: "Accuracy" bottom: "s" bottom: "l" top: "acc" top: "per_class"')
    assert tops_of(acc, [(4, 5, 3, 2), (4, 1, 3, 2)]) == [(), (5,)]
    top5 = layer('name: "acc" type: "Accuracy" bottom: "s" bottom: "l" top: "acc" accuracy_param { top_k: 5 }')
    assert tops_of(top5, [(10, 1000), (10,)]) == [()]
    with pytest.raises(ShapeError, match="'acc'.*top_k"):
        tops_of(top5, [(10, 4), (10,)])
    with pytest.raises(ShapeError, match="'acc'.*number of labels"):
        tops_of(top5, [(10, 1000, 2), (10,)])
    axis2 = layer('name: "acc" type: "Accuracy" bottom: "s" bottom: "l" top: "a" top: "pc" accuracy_param { axis: 2 }')
    assert tops_of(axis2, [(2, 3, 7), (6,)]) == [(), (7,)]


# -- recurrent -----------------------------------------------------------------------------------


def test_lstm_shapes():
    lay = layer('name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h" recurrent_param { num_output: 4 }')
    bottoms = [(3, 2, 5), (3, 2)]
    tops = tops_of(lay, bottoms)
    assert tops == [(3, 2, 4)]
    assert lay.param_shapes(bottoms) == [(16, 5), (16,), (16, 4)]
    assert lay.macs(bottoms, tops) == 3 * 2 * 16 * 5 + 3 * 2 * 16 * 4
    static = [(3, 2, 5, 2), (3, 2), (2, 7)]
    assert tops_of(lay, static) == [(3, 2, 4)]
    assert lay.param_shapes(static) == [(16, 10), (16,), (16, 7), (16, 4)]
    assert lay.macs(static, [(3, 2, 4)]) == 3 * 2 * 16 * (10 + 4) + 2 * 16 * 7


def test_rnn_shapes_and_expose_hidden():
    lay = layer('name: "rnn" type: "RNN" bottom: "x" bottom: "cont" top: "o" recurrent_param { num_output: 6 }')
    bottoms = [(5, 3, 8), (5, 3)]
    assert tops_of(lay, bottoms) == [(5, 3, 6)]
    assert lay.param_shapes(bottoms) == [(6, 8), (6,), (6, 6), (6, 6), (6,)]
    assert lay.param_shapes(bottoms + [(3, 2)]) == [(6, 8), (6,), (6, 2), (6, 6), (6, 6), (6,)]
    assert lay.macs(bottoms, [(5, 3, 6)]) == 5 * 3 * (6 * 8 + 6 * 6 + 6 * 6)
    exposed = layer(
        'name: "rnn" type: "RNN" bottom: "x" bottom: "cont" bottom: "h0" top: "o" top: "hT" '
        'recurrent_param { num_output: 6 expose_hidden: true }'
    )
    assert tops_of(exposed, bottoms + [(1, 3, 6)]) == [(5, 3, 6), (1, 3, 6)]
    assert exposed.param_shapes(bottoms + [(1, 3, 6)]) == [(6, 8), (6,), (6, 6), (6, 6), (6,)]
    with pytest.raises(ShapeError, match="'rnn'.*hidden state shape"):
        tops_of(exposed, bottoms + [(1, 3, 5)])
    lstm = layer(
        'name: "l" type: "LSTM" bottom: "x" bottom: "cont" bottom: "h0" bottom: "c0" '
        'top: "h" top: "hT" top: "cT" recurrent_param { num_output: 2 expose_hidden: true }'
    )
    assert tops_of(lstm, [(4, 1, 3), (4, 1), (1, 1, 2), (1, 1, 2)]) == [(4, 1, 2), (1, 1, 2), (1, 1, 2)]
    with pytest.raises(ShapeError, match="'l'.*at least 4 bottom"):
        tops_of(lstm, [(4, 1, 3), (4, 1), (1, 1, 2)])


def test_recurrent_checks():
    lay = layer('name: "lstm1" type: "LSTM" bottom: "x" bottom: "cont" top: "h" recurrent_param { num_output: 4 }')
    with pytest.raises(ShapeError, match="'lstm1'.*bottom 1"):
        tops_of(lay, [(3, 2, 5), (3, 3)])
    with pytest.raises(ShapeError, match="'lstm1'.*exactly 2 axes"):
        tops_of(lay, [(3, 2, 5), (3, 2, 1)])
    with pytest.raises(ShapeError, match="'lstm1'.*at least 3 axes"):
        tops_of(lay, [(3, 2), (3, 2)])
    with pytest.raises(ShapeError, match="'lstm1'.*static input"):
        tops_of(lay, [(3, 2, 5), (3, 2), (3, 7)])
    unset = layer('name: "lstm2" type: "LSTM" bottom: "x" bottom: "cont" top: "h"')
    with pytest.raises(ShapeError, match="'lstm2'.*num_output"):
        tops_of(unset, [(3, 2, 5), (3, 2)])


def test_lstm_unit():
    lay = layer('name: "unit" type: "LSTMUnit" bottom: "c0" bottom: "x" bottom: "cont" top: "c" top: "h"')
    assert tops_of(lay, [(1, 2, 4), (1, 2, 16), (1, 2)]) == [(1, 2, 4), (1, 2, 4)]
    assert lay.param_shapes([(1, 2, 4), (1, 2, 16), (1, 2)]) == []
    with pytest.raises(ShapeError, match="'unit'.*4\\*4 = 16"):
        tops_of(lay, [(1, 2, 4), (1, 2, 12), (1, 2)])
    with pytest.raises(ShapeError, match="'unit'.*must start with"):
        tops_of(lay, [(1, 2, 4), (1, 3, 16), (1, 2)])
    with pytest.raises(ShapeError, match="'unit'.*2 axes"):
        tops_of(lay, [(1, 2, 4), (1, 2, 16), (1, 2, 1)])


# -- Python --------------------------------------------------------------------------------------


def test_python_layer_is_unsupported():
    lay = layer(
        'name: "data" type: "Python" top: "data" top: "label" '
        'python_param { module: "voc_layers" layer: "VOCSegDataLayer" param_str: "{}" }'
    )
    with pytest.raises(UnsupportedError) as err:
        tops_of(lay, [])
    msg = str(err.value)
    for word in ("'data'", "voc_layers", "VOCSegDataLayer", "cannot import module 'voc_layers'", "PYTHONPATH",
                 "--input-shape data=", "--input-shape label="):
        assert word in msg
    lay.input_shapes = {"data": (1, 3, 500, 500), "label": (1, 1, 500, 500)}
    assert tops_of(lay, []) == [(1, 3, 500, 500), (1, 1, 500, 500)]
    loss = layer('name: "pl" type: "Python" bottom: "x" top: "y" python_param { module: "m" layer: "L" }')
    with pytest.raises(UnsupportedError, match="'pl'.*module 'm'.*layer 'L'.*cannot import module 'm'.*PYTHONPATH"):
        tops_of(loss, [(2, 3)])
