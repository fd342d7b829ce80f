"""Legacy net upgrade (Caffe's UpgradeNetAsNeeded) and solver upgrade.

The expected current-format texts below were written by hand from the rules in
semantics.md section 5 and Caffe's upgrade_proto.cpp, not from our own output.
"""
import csv
import difflib
import json
import re

import pytest
from google.protobuf import text_format

from conftest import shared_path
from caffeish.errors import UpgradeError
from caffeish.formats.schema import pb
from caffeish.formats.upgrade import (LEGACY_TYPES, SOLVER_TYPES, V0_ROUTES, V1_PARAM_FIELDS,
                              needs_upgrade, upgrade_net, upgrade_solver)


def net_from(text):
    return text_format.Parse(text, pb.NetParameter())


def assert_net_equals(actual, expected_text):
    expected = net_from(expected_text)
    if actual != expected:
        diff = "\n".join(difflib.unified_diff(
            text_format.MessageToString(expected).splitlines(),
            text_format.MessageToString(actual).splitlines(), "expected", "actual", lineterm=""))
        pytest.fail("upgraded net differs from the expected text:\n" + diff)


def upgrade_checked(net):
    """upgrade_net, checking on the way that the input is untouched and the result is final."""
    before = net.SerializeToString(deterministic=True)
    out, changes, origin = upgrade_net(net)
    assert net.SerializeToString(deterministic=True) == before, "upgrade_net modified its input"
    assert len(origin) == len(out.layer)
    assert len(out.layers) == 0 and len(out.input) == 0
    assert len(out.input_dim) == 0 and len(out.input_shape) == 0
    again, again_changes, again_origin = upgrade_net(out)
    assert again == out and again_changes == [], f"second upgrade changed: {again_changes}"
    assert again_origin == list(range(len(out.layer)))
    assert not needs_upgrade(out)
    return out, changes, origin


# ---------------------------------------------------------------------------------------------
# The tables

def test_type_table_matches_shared_tsv():
    rows = list(csv.DictReader(open(shared_path("caffe", "legacy_type_map.tsv")), delimiter="\t"))
    from_tsv = [(r["v1_enum_name"], int(r["v1_enum_number"]), r["current_type_string"],
                 r["v0_type_string"] or None) for r in rows]
    assert sorted(from_tsv) == sorted(LEGACY_TYPES)


def test_type_table_matches_schema():
    enum = pb.V1LayerParameter.LayerType
    assert sorted(name for name, *_ in LEGACY_TYPES) == sorted(enum.keys())
    for name, number, _, _ in LEGACY_TYPES:
        assert enum.Value(name) == number


def test_current_type_strings_are_registered_caffe_types():
    types = set(shared_path("caffe", "layer_types.txt").read_text().split())
    for name, _, string, _ in LEGACY_TYPES:
        if name != "NONE":
            assert string in types, f"{name} -> {string!r} is not a BVLC layer type"


def test_routing_tables_name_real_fields():
    v1 = pb.V1LayerParameter.DESCRIPTOR.fields_by_name
    v0 = pb.V0LayerParameter.DESCRIPTOR.fields_by_name
    for v0_field, routes in V0_ROUTES.items():
        assert v0_field in v0
        for sub_name, sub_field in routes.values():
            sub = v1[sub_name].message_type
            assert sub_field is None or sub_field in sub.fields_by_name, (sub_name, sub_field)
    layer = pb.LayerParameter.DESCRIPTOR.fields_by_name
    for field in V1_PARAM_FIELDS:
        assert layer[field].message_type is v1[field].message_type
    assert len(V1_PARAM_FIELDS) == 30        # every *_param of V1LayerParameter in caffe.proto


# ---------------------------------------------------------------------------------------------
# V0 nets

V0_DEPLOY = """
name: "tiny_v0"
input: "data"
input_dim: 10 input_dim: 3 input_dim: 32 input_dim: 32
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers {
  layer {
    name: "conv1" type: "conv" num_output: 16 kernelsize: 5 stride: 1 group: 1 biasterm: true
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0.1 }
    blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  }
  bottom: "pad1" top: "conv1"
}
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pad2" type: "padding" pad: 1 } bottom: "conv1" top: "pad2" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 } bottom: "pad2" top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 3 alpha: 0.0001 beta: 0.75 k: 2 } bottom: "pool1" top: "norm1" }
layers { layer { name: "fc1" type: "innerproduct" num_output: 10 biasterm: false } bottom: "norm1" top: "fc1" }
layers { layer { name: "drop1" type: "dropout" dropout_ratio: 0.3 } bottom: "fc1" top: "fc1" }
layers { layer { name: "prob" type: "softmax" } bottom: "fc1" top: "prob" }
"""

V0_DEPLOY_EXPECTED = """
name: "tiny_v0"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 10 dim: 3 dim: 32 dim: 32 } } }
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 }
  param { lr_mult: 2 decay_mult: 0 }
  convolution_param {
    num_output: 16 bias_term: true pad: 2 kernel_size: 5 group: 1 stride: 1
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0.1 }
  }
}
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer {
  name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: AVE pad: 1 kernel_size: 3 stride: 2 }
}
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
        lrn_param { local_size: 3 alpha: 0.0001 beta: 0.75 k: 2 } }
layer { name: "fc1" type: "InnerProduct" bottom: "norm1" top: "fc1"
        inner_product_param { num_output: 10 bias_term: false } }
layer { name: "drop1" type: "Dropout" bottom: "fc1" top: "fc1" dropout_param { dropout_ratio: 0.3 } }
layer { name: "prob" type: "Softmax" bottom: "fc1" top: "prob" }
"""


def test_v0_deploy_net_with_padding_layers():
    out, changes, origin = upgrade_checked(net_from(V0_DEPLOY))
    assert_net_equals(out, V0_DEPLOY_EXPECTED)
    # The padding layers (input indices 0 and 3) are gone; the Input layer is inserted.
    assert origin == [None, 1, 2, 4, 5, 6, 7, 8]
    assert "layer 'pad1' (V0 padding) folded into 'conv1' (pad 2)" in changes
    assert "layer 'pad2' (V0 padding) folded into 'pool1' (pad 1)" in changes
    assert "layer 'conv1': V0 type 'conv' -> V1 CONVOLUTION" in changes
    assert "layer 'conv1': V1 type CONVOLUTION -> 'Convolution'" in changes
    assert "layer 'conv1': blobs_lr [1, 2] -> param { lr_mult }" in changes
    assert "layer 'conv1': weight_decay [1, 0] -> param { decay_mult }" in changes
    assert "input 'data' (10,3,32,32) -> Input layer 'input'" in changes
    assert not any("not fully compatible" in c for c in changes)


V0_TRAIN = """
name: "v0_train"
layers {
  layer { name: "data" type: "data" source: "train_lmdb" meanfile: "mean.binaryproto" batchsize: 64
          cropsize: 227 mirror: true scale: 0.5 rand_skip: 10 }
  top: "data" top: "label"
}
layers {
  layer { name: "imgs" type: "images" source: "list.txt" batchsize: 8 shuffle_images: true
          new_height: 256 new_width: 256 rand_skip: 3 }
  top: "img" top: "img_label"
}
layers {
  layer { name: "win" type: "window_data" source: "windows.txt" batchsize: 4 det_fg_threshold: 0.6
          det_bg_threshold: 0.4 det_fg_fraction: 0.3 det_context_pad: 16 det_crop_mode: "square" }
  top: "win" top: "win_label"
}
layers { layer { name: "h5" type: "hdf5_data" source: "h5.txt" batchsize: 2 } top: "h5data" }
layers { layer { name: "cat" type: "concat" concat_dim: 1 } bottom: "data" bottom: "img" top: "cat" }
layers { layer { name: "loss" type: "softmax_loss" } bottom: "cat" bottom: "label" top: "loss" }
layers { layer { name: "igl" type: "infogain_loss" source: "H.binaryproto" } bottom: "cat" bottom: "label" }
layers { layer { name: "out" type: "hdf5_output" hdf5_output_param { file_name: "out.h5" } }
         bottom: "cat" bottom: "label" }
force_backward: true
"""

V0_TRAIN_EXPECTED = """
name: "v0_train"
force_backward: true
layer {
  name: "data" type: "Data" top: "data" top: "label"
  transform_param { scale: 0.5 mirror: true crop_size: 227 mean_file: "mean.binaryproto" }
  data_param { source: "train_lmdb" batch_size: 64 rand_skip: 10 }
}
layer {
  name: "imgs" type: "ImageData" top: "img" top: "img_label"
  image_data_param { source: "list.txt" batch_size: 8 shuffle: true new_height: 256 new_width: 256
                     rand_skip: 3 }
}
layer {
  name: "win" type: "WindowData" top: "win" top: "win_label"
  window_data_param { source: "windows.txt" batch_size: 4 fg_threshold: 0.6 bg_threshold: 0.4
                      fg_fraction: 0.3 context_pad: 16 crop_mode: "square" }
}
layer { name: "h5" type: "HDF5Data" top: "h5data" hdf5_data_param { source: "h5.txt" batch_size: 2 } }
layer { name: "cat" type: "Concat" bottom: "data" bottom: "img" top: "cat" concat_param { concat_dim: 1 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "cat" bottom: "label" top: "loss" }
layer { name: "igl" type: "InfogainLoss" bottom: "cat" bottom: "label"
        infogain_loss_param { source: "H.binaryproto" } }
layer { name: "out" type: "HDF5Output" bottom: "cat" bottom: "label"
        hdf5_output_param { file_name: "out.h5" } }
"""


def test_v0_train_net_routes_every_field():
    out, changes, origin = upgrade_checked(net_from(V0_TRAIN))
    assert_net_equals(out, V0_TRAIN_EXPECTED)
    assert origin == list(range(8))
    assert "layer 'data': V0 scale, meanfile, cropsize, mirror -> transform_param" in changes
    assert "layer 'imgs': V0 type 'images' -> V1 IMAGE_DATA" in changes
    assert not any("not fully compatible" in c for c in changes)


def test_v0_transform_fields_go_to_transform_param_for_any_type():
    net = net_from("""
        input: "x" input_dim: 1 input_dim: 1 input_dim: 4 input_dim: 4
        layers { layer { name: "c" type: "conv" num_output: 2 kernelsize: 1 scale: 0.5 mirror: true }
                 bottom: "x" top: "c" }""")
    out, _, _ = upgrade_checked(net)
    assert_net_equals(out, """
        layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 1 dim: 1 dim: 4 dim: 4 } } }
        layer { name: "c" type: "Convolution" bottom: "x" top: "c"
                transform_param { scale: 0.5 mirror: true }
                convolution_param { num_output: 2 kernel_size: 1 } }""")


def test_v0_field_on_wrong_type_is_a_warning_not_an_error():
    net = net_from("""
        name: "w"
        input: "x" input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 3
        state { phase: TRAIN }
        layers { layer { name: "relu1" type: "relu" num_output: 7 new_num: 3 } bottom: "x" top: "x" }""")
    out, changes, origin = upgrade_checked(net)
    assert_net_equals(out, """
        name: "w"
        layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
        layer { name: "relu1" type: "ReLU" bottom: "x" top: "x" }""")
    warnings = [c for c in changes if "not fully compatible" in c]
    assert len(warnings) == 3, changes
    assert any("'relu1'" in w and "num_output" in w and "'relu'" in w for w in warnings)
    assert any("'relu1'" in w and "new_num" in w for w in warnings)
    assert any("'state'" in w for w in warnings)       # V0 upgrade keeps only 4 net-level fields
    assert origin == [None, 0]


def test_v1_entry_inside_a_v0_net_keeps_only_bottom_and_top():
    """Caffe's UpgradeV0LayerParameter copies only bottom/top from an entry without a V0 message."""
    net = net_from("""
        input: "x" input_dim: 1 input_dim: 1 input_dim: 2 input_dim: 2
        layers { layer { name: "r" type: "relu" } bottom: "x" top: "y" }
        layers { name: "v1" type: SIGMOID bottom: "y" top: "z" }""")
    out, changes, origin = upgrade_checked(net)
    assert_net_equals(out, """
        layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 1 dim: 1 dim: 2 dim: 2 } } }
        layer { name: "r" type: "ReLU" bottom: "x" top: "y" }
        layer { bottom: "y" top: "z" }""")
    assert origin == [None, 0, 1]
    assert any("'v1'" in c and "not fully compatible" in c for c in changes)


def test_v0_padding_errors_name_the_layers():
    bad_consumer = """
        input: "x" input_dim: 1 input_dim: 1 input_dim: 4 input_dim: 4
        layers { layer { name: "pad1" type: "padding" pad: 1 } bottom: "x" top: "p" }
        layers { layer { name: "relu1" type: "relu" } bottom: "p" top: "r" }"""
    with pytest.raises(UpgradeError, match=r"pad1.*relu1"):
        upgrade_net(net_from(bad_consumer))
    two_bottoms = """
        input: "x" input: "y" input_dim: 1 input_dim: 1 input_dim: 4 input_dim: 4
        input_dim: 1 input_dim: 1 input_dim: 4 input_dim: 4
        layers { layer { name: "pad1" type: "padding" pad: 1 } bottom: "x" top: "p" }
        layers { layer { name: "conv1" type: "conv" num_output: 1 kernelsize: 1 } bottom: "p" bottom: "y" top: "c" }"""
    with pytest.raises(UpgradeError, match=r"pad1.*conv1.*2 bottoms"):
        upgrade_net(net_from(two_bottoms))
    two_tops = """
        input: "x" input_dim: 1 input_dim: 1 input_dim: 4 input_dim: 4
        layers { layer { name: "pad1" type: "padding" pad: 1 } bottom: "x" top: "p" top: "q" }
        layers { layer { name: "pool1" type: "pool" kernelsize: 2 } bottom: "p" top: "c" }"""
    with pytest.raises(UpgradeError, match=r"pad1.*2 tops"):
        upgrade_net(net_from(two_tops))
    unknown_bottom = """
        layers { layer { name: "relu1" type: "relu" } bottom: "nowhere" top: "r" }"""
    with pytest.raises(UpgradeError, match=r"relu1.*nowhere"):
        upgrade_net(net_from(unknown_bottom))


def test_unknown_v0_type_is_an_error():
    net = net_from("""layers { layer { name: "weird1" type: "fancy" } top: "t" }""")
    with pytest.raises(UpgradeError, match=r"weird1.*fancy"):
        upgrade_net(net)


def test_v0_blobs_are_copied():
    net = net_from("""
        input: "x" input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 2
        layers { layer { name: "fc" type: "innerproduct" num_output: 1
                         blobs { num: 1 channels: 1 height: 1 width: 2 data: 3 data: 4 }
                         blobs { num: 1 channels: 1 height: 1 width: 1 data: 5 } }
                 bottom: "x" top: "y" }""")
    wire = net.SerializeToString()
    parsed = pb.NetParameter.FromString(wire)
    out, _, _ = upgrade_checked(parsed)
    fc = out.layer[1]
    assert [list(b.data) for b in fc.blobs] == [[3.0, 4.0], [5.0]]
    assert (fc.blobs[0].num, fc.blobs[0].channels, fc.blobs[0].height, fc.blobs[0].width) == (1, 1, 1, 2)


# ---------------------------------------------------------------------------------------------
# V1 nets

V1_NET = """
name: "v1net"
input: "extra"
input_shape { dim: 2 dim: 5 }
state { phase: TRAIN }
layers {
  name: "data" type: DATA top: "data" top: "label"
  data_param { source: "lmdb" batch_size: 32 scale: 0.00390625 mean_file: "m.binaryproto"
               crop_size: 28 mirror: true }
  include { phase: TRAIN }
}
layers {
  name: "data_test" type: DATA top: "data" top: "label"
  data_param { source: "lmdb_test" batch_size: 10 }
  include { phase: TEST }
}
layers {
  name: "img" type: IMAGE_DATA top: "img" top: "img_label"
  image_data_param { source: "list.txt" mirror: true }
  transform_param { scale: 2 }
  exclude { stage: "deploy" }
}
layers {
  name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  param: "w_shared" param: "b_shared"
  blob_share_mode: STRICT blob_share_mode: PERMISSIVE
  blobs_lr: 1 blobs_lr: 2
  weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 8 kernel_size: 3 }
}
layers {
  name: "ip" type: INNER_PRODUCT bottom: "conv1" top: "ip"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 0.5
  inner_product_param { num_output: 10 }
}
layers {
  name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" top: "loss"
  loss_weight: 2
  loss_param { ignore_label: 255 }
}
layers { name: "sil" type: SILENCE bottom: "extra" }
"""

# data_test gets an empty transform_param: Caffe's data-transform upgrade touches
# (creates) transform_param on every DATA/IMAGE_DATA/WINDOW_DATA layer once any needs it.
V1_NET_EXPECTED = """
name: "v1net"
state { phase: TRAIN }
layer { name: "input" type: "Input" top: "extra" input_param { shape { dim: 2 dim: 5 } } }
layer {
  name: "data" type: "Data" top: "data" top: "label"
  include { phase: TRAIN }
  transform_param { scale: 0.00390625 mean_file: "m.binaryproto" crop_size: 28 mirror: true }
  data_param { source: "lmdb" batch_size: 32 }
}
layer {
  name: "data_test" type: "Data" top: "data" top: "label"
  include { phase: TEST }
  transform_param { }
  data_param { source: "lmdb_test" batch_size: 10 }
}
layer {
  name: "img" type: "ImageData" top: "img" top: "img_label"
  exclude { stage: "deploy" }
  transform_param { scale: 2 mirror: true }
  image_data_param { source: "list.txt" }
}
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { name: "w_shared" share_mode: STRICT lr_mult: 1 decay_mult: 1 }
  param { name: "b_shared" share_mode: PERMISSIVE lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 8 kernel_size: 3 }
}
layer {
  name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip"
  param { lr_mult: 1 decay_mult: 0.5 }
  param { lr_mult: 2 }
  inner_product_param { num_output: 10 }
}
layer {
  name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
  loss_weight: 2
  loss_param { ignore_label: 255 }
}
layer { name: "sil" type: "Silence" bottom: "extra" }
"""


def test_v1_net_full_upgrade():
    out, changes, origin = upgrade_checked(net_from(V1_NET))
    assert_net_equals(out, V1_NET_EXPECTED)
    assert out.layer[2].HasField("transform_param")
    assert not out.layer[2].data_param.HasField("scale")
    assert origin == [None, 0, 1, 2, 3, 4, 5, 6]
    for line in [
        "layer 'data': data_param.scale -> transform_param.scale",
        "layer 'data': data_param.mean_file -> transform_param.mean_file",
        "layer 'data': data_param.crop_size -> transform_param.crop_size",
        "layer 'data': data_param.mirror -> transform_param.mirror",
        "layer 'img': image_data_param.mirror -> transform_param.mirror",
        "layer 'conv1': V1 type CONVOLUTION -> 'Convolution'",
        "layer 'conv1': blobs_lr [1, 2] -> param { lr_mult }",
        "layer 'ip': weight_decay [0.5] -> param { decay_mult }",
        "input 'extra' (2,5) -> Input layer 'input'",
    ]:
        assert line in changes, line


def test_v1_window_data_transform_and_untyped_layer():
    net = net_from("""
        layers { name: "w" type: WINDOW_DATA top: "d" top: "l"
                 window_data_param { source: "win.txt" crop_size: 227 scale: 0.5 } }
        layers { name: "none" type: NONE }
        layers { name: "notype" }""")
    out, _, origin = upgrade_checked(net)
    assert_net_equals(out, """
        layer { name: "w" type: "WindowData" top: "d" top: "l"
                transform_param { scale: 0.5 crop_size: 227 }
                window_data_param { source: "win.txt" } }
        layer { name: "none" type: "" }
        layer { name: "notype" }""")
    assert origin == [0, 1, 2]


def test_v1_blobs_are_copied_from_binary():
    net = net_from("""
        layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y"
                 blobs { shape { dim: 1 dim: 2 } data: 0.25 data: -1 }
                 blobs { shape { dim: 1 } data: 7 } }""")
    out, _, _ = upgrade_checked(pb.NetParameter.FromString(net.SerializeToString()))
    assert list(out.layer[0].blobs) == list(net.layers[0].blobs)
    # Field 7 of LayerParameter holds them on the wire.
    wire = out.layer[0].SerializeToString()
    assert wire.count(bytes([7 << 3 | 2])) >= 2


def test_layer_and_layers_together_is_an_error():
    net = net_from("""
        layer { name: "a" type: "ReLU" bottom: "x" top: "x" }
        layers { name: "b" type: RELU bottom: "x" top: "x" }""")
    with pytest.raises(UpgradeError, match=r"'layer'.*'layers'"):
        upgrade_net(net)
    v0_and_current = net_from("""
        layer { name: "a" type: "ReLU" bottom: "x" top: "x" }
        layers { layer { name: "b" type: "relu" } bottom: "x" top: "x" }""")
    with pytest.raises(UpgradeError, match=r"'layer'.*'layers'"):
        upgrade_net(v0_and_current)


# ---------------------------------------------------------------------------------------------
# Input fields

def test_two_inputs_from_input_dim():
    net = net_from("""
        input: "a" input: "b"
        input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
        input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 5
        layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "c" }""")
    out, changes, origin = upgrade_checked(net)
    assert_net_equals(out, """
        layer { name: "input" type: "Input" top: "a" top: "b"
                input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } shape { dim: 1 dim: 1 dim: 1 dim: 5 } } }
        layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "c" }""")
    assert origin == [None, 0]
    assert changes == ["input 'a' (1,3,8,8) -> Input layer 'input'",
                       "input 'b' (1,1,1,5) -> Input layer 'input'"]


def test_input_shape_wins_over_input_dim():
    net = net_from("""
        input: "a" input_shape { dim: 4 dim: 2 } input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4
        layer { name: "r" type: "ReLU" bottom: "a" top: "a" }""")
    out, changes, _ = upgrade_checked(net)
    assert list(out.layer[0].input_param.shape[0].dim) == [4, 2]
    assert any("not fully compatible" in c and "input_dim" in c for c in changes)


def test_bare_input_names_are_dropped():
    net = net_from("""input: "data" layer { name: "r" type: "ReLU" bottom: "data" top: "data" }""")
    out, changes, origin = upgrade_checked(net)
    assert_net_equals(out, """layer { name: "r" type: "ReLU" bottom: "data" top: "data" }""")
    assert origin == [0]
    assert len(changes) == 1 and "'data'" in changes[0] and "dropped" in changes[0]


def test_bad_input_counts_are_errors():
    with pytest.raises(UpgradeError, match=r"input_dim.*4 per input"):
        upgrade_net(net_from("""input: "a" input_dim: 1 input_dim: 3 input_dim: 8"""))
    with pytest.raises(UpgradeError, match=r"input_dim"):
        upgrade_net(net_from("""input: "a" input: "b" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8"""))
    with pytest.raises(UpgradeError, match=r"2 inputs.*1 input_shape"):
        upgrade_net(net_from("""input: "a" input: "b" input_shape { dim: 1 }"""))


# ---------------------------------------------------------------------------------------------
# BatchNorm

def test_batchnorm_with_three_params_gets_zero_lr_and_decay():
    net = net_from("""
        layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"
                param { lr_mult: 1 name: "m" } param { lr_mult: 1 decay_mult: 1 } param { } }
        layer { name: "bn2" type: "BatchNorm" bottom: "x" top: "y" param { lr_mult: 1 } param { lr_mult: 1 } }
        layer { name: "sc" type: "Scale" bottom: "y" top: "y"
                param { lr_mult: 1 } param { lr_mult: 1 } param { lr_mult: 1 } }""")
    assert needs_upgrade(net)
    out, changes, origin = upgrade_checked(net)
    assert_net_equals(out, """
        layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"
                param { name: "m" lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 }
                param { lr_mult: 0 decay_mult: 0 } }
        layer { name: "bn2" type: "BatchNorm" bottom: "x" top: "y" param { lr_mult: 1 } param { lr_mult: 1 } }
        layer { name: "sc" type: "Scale" bottom: "y" top: "y"
                param { lr_mult: 1 } param { lr_mult: 1 } param { lr_mult: 1 } }""")
    assert origin == [0, 1, 2]
    assert len(changes) == 1 and changes[0].startswith("layer 'bn': BatchNorm")


def test_batchnorm_already_fixed_is_not_a_change():
    net = net_from("""
        layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"
                param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 }
                param { lr_mult: 0 decay_mult: 0 } }""")
    assert not needs_upgrade(net)
    out, changes, origin = upgrade_net(net)
    assert out == net and changes == [] and origin == [0]


def test_needs_upgrade():
    assert needs_upgrade(net_from(V0_DEPLOY))
    assert needs_upgrade(net_from(V1_NET))
    assert needs_upgrade(net_from('input: "a"'))
    assert not needs_upgrade(net_from('layer { name: "r" type: "ReLU" bottom: "a" top: "a" }'))


# ---------------------------------------------------------------------------------------------
# Solver

@pytest.mark.parametrize("enum_name,expected", [
    ("SGD", "SGD"), ("NESTEROV", "Nesterov"), ("ADAGRAD", "AdaGrad"),
    ("RMSPROP", "RMSProp"), ("ADADELTA", "AdaDelta"), ("ADAM", "Adam")])
def test_solver_type_enum_to_string(enum_name, expected):
    solver = text_format.Parse(f"base_lr: 0.1 solver_type: {enum_name}", pb.SolverParameter())
    out, changes = upgrade_solver(solver)
    assert out.type == expected and not out.HasField("solver_type")
    assert out.base_lr == pytest.approx(0.1)
    assert changes == [f"solver_type {enum_name} -> type '{expected}'"]
    assert solver.HasField("solver_type")         # input untouched
    assert upgrade_solver(out) == (out, [])
    assert len(SOLVER_TYPES) == len(pb.SolverParameter.SolverType.keys())


def test_solver_with_both_types_is_an_error():
    solver = text_format.Parse('solver_type: ADAM type: "Adam"', pb.SolverParameter())
    with pytest.raises(UpgradeError, match="solver_type"):
        upgrade_solver(solver)


def test_shared_solver_with_solver_type():
    solver = text_format.Parse(
        shared_path("models", "enet", "prototxts", "enet_solver_encoder.prototxt").read_text(),
        pb.SolverParameter())
    out, changes = upgrade_solver(solver)
    assert out.type == "Adam" and len(changes) == 1
    current = text_format.Parse(
        shared_path("models", "bvlc_caffe", "examples", "mnist", "lenet_solver_adam.prototxt").read_text(),
        pb.SolverParameter())
    assert upgrade_solver(current) == (current, [])


# ---------------------------------------------------------------------------------------------
# Real files from ../shared

def _v1_nets():
    """Every V1-format net under ../shared/models: (label, NetParameter), embedded solver nets too."""
    root = shared_path("models")
    found = []
    for path in sorted(root.rglob("*.prototxt")):
        text = path.read_text(errors="replace")
        if not re.search(r"(?m)^\s*layers\s*\{", text):
            continue
        label = str(path.relative_to(root))
        try:
            found.append((label, text_format.Parse(text, pb.NetParameter())))
        except text_format.ParseError:
            solver = text_format.Parse(text, pb.SolverParameter())
            nets = ([solver.net_param] if solver.HasField("net_param") else []) + \
                ([solver.train_net_param] if solver.HasField("train_net_param") else []) + \
                list(solver.test_net_param)
            found += [(f"{label}[{i}]", n) for i, n in enumerate(nets)]
    return found


def test_shared_v1_models_upgrade_to_current_types():
    types = set(shared_path("caffe", "layer_types.txt").read_text().split())
    nets = _v1_nets()
    labels = [label for label, _ in nets]
    assert len(nets) >= 8, labels
    assert any(label.startswith("everpeace_caffe/examples/cifar10/") for label in labels)
    for label, net in nets:
        assert len(net.layers) > 0, label
        out, changes, origin = upgrade_checked(net)
        inserted = 1 if len(net.input) and len(net.input_dim) + len(net.input_shape) else 0
        assert len(out.layer) == len(net.layers) + inserted, label
        assert origin == [None] * inserted + list(range(len(net.layers))), label
        for layer, src in zip(out.layer[inserted:], net.layers):
            assert layer.type in types, (label, layer.name, layer.type)
            assert layer.name == src.name and list(layer.top) == list(src.top), label
        assert changes, label


def test_shared_v1_cifar_quick_deploy():
    text = shared_path("models", "everpeace_caffe", "examples", "cifar10", "cifar10_quick.prototxt").read_text()
    out, _, _ = upgrade_checked(net_from(text))
    head = pb.NetParameter()
    head.layer.extend(out.layer[:2])
    assert_net_equals(head, """
        layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
        layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
                param { lr_mult: 1 } param { lr_mult: 2 }
                convolution_param { num_output: 32 pad: 2 kernel_size: 5 stride: 1 } }""")


def test_shared_current_file_is_unchanged():
    net = net_from(shared_path("models", "bvlc_caffe", "models", "bvlc_alexnet", "deploy.prototxt").read_text())
    assert net.layer[0].type == "Input" and len(net.input) == 0
    out, changes, origin = upgrade_net(net)
    assert out == net and changes == [] and origin == list(range(len(net.layer)))
    assert not needs_upgrade(net)


def test_shared_input_dim_file_gets_exact_input_layer():
    net = net_from(shared_path("models", "resnet", "prototxt", "ResNet-50-deploy.prototxt").read_text())
    out, changes, origin = upgrade_checked(net)
    first = pb.NetParameter()
    first.layer.append(out.layer[0])
    assert_net_equals(first, """
        layer { name: "input" type: "Input" top: "data"
                input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }""")
    assert list(out.layer[1:]) == list(net.layer)
    assert origin == [None] + list(range(len(net.layer)))
    assert changes == ["input 'data' (1,3,224,224) -> Input layer 'input'"]


def test_golden_input_shapes_match_caffe_recorded_shapes():
    root = shared_path("golden")
    checked = 0
    for case in sorted(p for p in root.iterdir() if (p / "net.prototxt").exists()):
        net = net_from((case / "net.prototxt").read_text())
        if not len(net.input):
            continue
        out, _, origin = upgrade_checked(net)
        shapes = json.loads((case / "meta.json").read_text())["blob_shapes"]
        assert out.layer[0].type == "Input" and origin[0] is None
        for top, shape in zip(out.layer[0].top, out.layer[0].input_param.shape):
            assert list(shape.dim) == shapes[top], (case.name, top)
            checked += 1
    assert checked >= 3


def test_shared_batchnorm_file():
    path = shared_path("models", "bvlc_caffe", "examples", "cifar10", "cifar10_full_sigmoid_train_test_bn.prototxt")
    net = net_from(path.read_text())
    out, changes, _ = upgrade_checked(net)
    bns = [layer for layer in out.layer if layer.type == "BatchNorm"]
    assert len(bns) == 3 and len(changes) == 3
    for layer in bns:
        assert [(p.lr_mult, p.decay_mult) for p in layer.param] == [(0, 0)] * 3
        assert all(p.HasField("decay_mult") for p in layer.param)


def test_golden_caffemodel_keeps_blobs():
    """A caffemodel Caffe saved: BatchNorm params it wrote (lr_mult 0) also get decay_mult 0."""
    net = pb.NetParameter.FromString(shared_path("golden", "resnet50_tiny", "weights.caffemodel").read_bytes())
    out, changes, origin = upgrade_checked(net)
    bn_count = sum(layer.type == "BatchNorm" for layer in net.layer)
    assert bn_count > 0 and len(changes) == bn_count
    assert origin == list(range(len(net.layer)))
    for before, after in zip(net.layer, out.layer):
        assert list(before.blobs) == list(after.blobs)
        if before.type != "BatchNorm":
            assert before == after
