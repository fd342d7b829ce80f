"""Net surgery: convolutionalize, transplant and bilinear weights, checked against Caffe's numbers."""
import hashlib
import os

import numpy as np
import pytest
from google.protobuf import text_format

from caffeish.formats import io
from caffeish.apps import surgery
from caffeish.tools.cli import main
from caffeish.errors import CaffeishError, UnsupportedError, WeightError
from caffeish.graph.graph import Graph
from caffeish.data.metrics import relative_error
from caffeish.runtime import fillers
from caffeish.runtime.net import Net
from caffeish.formats.schema import pb
from conftest import shared_path

V1_TYPES = {"Convolution": "CONVOLUTION", "Pooling": "POOLING", "InnerProduct": "INNER_PRODUCT", "ReLU": "RELU",
            "Softmax": "SOFTMAX", "LRN": "LRN", "Dropout": "DROPOUT"}
V1_PARAMS = {"Convolution": "convolution_param", "Pooling": "pooling_param", "InnerProduct": "inner_product_param",
             "LRN": "lrn_param", "Dropout": "dropout_param"}


def golden(name, *parts):
    return shared_path("golden", name, *parts)


def golden_io(name):
    inputs = np.load(golden(name, "inputs.npz"))
    blobs = np.load(golden(name, "blobs.npz"))
    return {k: inputs[k] for k in inputs.files}, blobs


def write_v1(path, net, arrays):
    """Write `net` (current format, Input + the layer types above) with `arrays` as a V1 caffemodel,
    blobs in the legacy 4-D num/channels/height/width form, as Caffe rc1-era files are."""
    v1 = pb.NetParameter(name=net.name)
    for layer in net.layer:
        if layer.type == "Input":
            v1.input.extend(layer.top)
            v1.input_dim.extend(layer.input_param.shape[0].dim)
            continue
        out = v1.layers.add(name=layer.name, type=getattr(pb.V1LayerParameter, V1_TYPES[layer.type]))
        out.bottom.extend(layer.bottom)
        out.top.extend(layer.top)
        if layer.type in V1_PARAMS:
            getattr(out, V1_PARAMS[layer.type]).CopyFrom(getattr(layer, V1_PARAMS[layer.type]))
        for a in arrays.get(layer.name, []):
            a = np.asarray(a, np.float32)
            blob = out.blobs.add()
            blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - a.ndim) + a.shape
            blob.data.extend(a.reshape(-1).tolist())
    path.write_bytes(v1.SerializeToString())
    return path


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def tiny_net(text):
    return text_format.Parse(text, pb.NetParameter())


# -- convolutionalize ------------------------------------------------------------------------------------


def test_alexnet_tiny_fcn_gives_caffes_probabilities():
    model = io.read_caffemodel(golden("alexnet_tiny", "weights.caffemodel"))
    net, blobs, report = surgery.convolutionalize(golden("alexnet_tiny", "net.prototxt"), model)
    layers = {l.name: l for l in net.layer}
    assert [layers[n].type for n in ("fc6", "fc7", "fc8")] == ["Convolution"] * 3
    assert list(layers["fc6"].convolution_param.kernel_size) == [6]
    assert list(layers["fc7"].convolution_param.kernel_size) == [1]
    assert report.params_before == report.params_after == Graph(net).param_count
    by_name = dict(zip([l.name for l in net.layer], blobs))
    ip = model.arrays()["fc6"]
    assert by_name["fc6"][0].shape == (256, 16, 6, 6)
    assert np.array_equal(by_name["fc6"][0].reshape(256, -1), ip[0]) and np.array_equal(by_name["fc6"][1], ip[1])
    assert np.shares_memory(by_name["fc6"][0], ip[0]) or by_name["fc6"][0].base is not None  # a view, not a copy
    assert {c["blob"] for c in report.checks} >= {"prob", "fc6", "fc7", "fc8"}
    assert all(c["ok"] and c["rel_diff"] <= 1e-5 for c in report.checks)
    # The FCN with the reshaped weights gives what BVLC Caffe gave for the classifier.
    inputs, expected = golden_io("alexnet_tiny")
    fcn = Net(net)
    surgery.set_params(fcn, {l.name: b for l, b in zip(net.layer, blobs) if b})
    prob = fcn.forward(**inputs)["prob"]
    assert prob.shape == expected["prob"].shape + (1, 1)
    assert relative_error(prob[:, :, 0, 0], expected["prob"]) <= 1e-4


def test_googlenet_tiny_classifier_on_1x1_pool_becomes_1x1_conv():
    path = golden("googlenet_tiny", "weights.caffemodel")
    net, blobs, report = surgery.convolutionalize(golden("googlenet_tiny", "net.prototxt"), path)
    cls = [l for l in net.layer if l.name == "loss3/classifier"][0]
    assert cls.type == "Convolution" and list(cls.convolution_param.kernel_size) == [1]
    assert [r["input"][2:] for r in report.rows] == [[1, 1]]
    assert [c for c in report.checks if c["blob"] == "prob"][0]["converted"] == [1, 62, 1, 1]
    inputs, expected = golden_io("googlenet_tiny")
    fcn = Net(net)
    surgery.set_params(fcn, {l.name: b for l, b in zip(net.layer, blobs) if b})
    assert relative_error(fcn.forward(**inputs)["prob"][:, :, 0, 0], expected["prob"]) <= 1e-4


def shrunk(path, divisor=16):
    """A channel-reduced copy of a full-size net (the golden cases' recipe: channels / 16)."""
    net = io.read_net(path)
    for layer in net.layer:
        if layer.type == "Convolution":
            layer.convolution_param.num_output //= divisor
        elif layer.type == "InnerProduct":
            layer.inner_product_param.num_output //= divisor
    return net


def test_vgg16_reduced_is_equivalent_with_random_weights():
    net = shrunk(shared_path("models", "vgg16", "models", "VGG_ILSVRC_16_layers_deploy.prototxt"))
    out, blobs, report = surgery.convolutionalize(net, seed=3)
    assert blobs is None
    fc6 = [r for r in report.rows if r["layer"] == "fc6"][0]
    assert fc6["kernel"] == "7x7" and fc6["new"][0] == [256, 32, 7, 7]
    assert report.params_before == report.params_after
    checks = {c["blob"]: c for c in report.checks}
    assert checks["prob"]["converted"] == [1, 62, 1, 1] and checks["prob"]["ok"]
    assert any("random weights" in n for n in report.notes)


def test_full_size_alexnet_geometry_without_running():
    net, blobs, report = surgery.convolutionalize(
        shared_path("models", "bvlc_caffe", "models", "bvlc_alexnet", "deploy.prototxt"), verify=False)
    rows = {r["layer"]: r for r in report.rows}
    assert rows["fc6"]["new"][0] == [4096, 256, 6, 6] and rows["fc6"]["params"] == 37_752_832
    assert rows["fc7"]["new"][0] == [4096, 4096, 1, 1] and rows["fc8"]["new"][0] == [1000, 4096, 1, 1]
    assert report.params_before == report.params_after == 60_965_224
    assert report.checks == []
    graph = Graph(net)
    assert graph.blob_shapes["prob"] == (10, 1000, 1, 1)
    assert graph.node("fc6").param_count == 37_752_832


def test_v1_caffemodel_is_upgraded_first(tmp_path):
    model = io.read_caffemodel(golden("lenet_real_weights", "weights.caffemodel"))
    net = io.read_net(golden("lenet_real_weights", "net.prototxt"))
    v1 = write_v1(tmp_path / "lenet_v1.caffemodel", net, model.arrays())
    legacy = io.read_caffemodel(v1)
    assert legacy.changes and legacy.blobs[3][0].legacy is not None  # V1 layers, 4-D legacy blob shapes
    out, blobs, report = surgery.convolutionalize(v1, legacy)  # the V1 caffemodel's own layer list as the net
    assert [l.type for l in out.layer if l.name in ("ip1", "ip2")] == ["Convolution"] * 2
    by_name = {l.name: b for l, b in zip(out.layer, blobs)}
    assert by_name["ip1"][0].shape == (500, 50, 4, 4)
    inputs, expected = golden_io("lenet_real_weights")
    fcn = Net(out)
    surgery.set_params(fcn, by_name)
    assert relative_error(fcn.forward(**inputs)["prob"][:, :, 0, 0], expected["prob"]) <= 1e-5


def test_sliding_window_property_on_lenet():
    path = golden("lenet_real_weights", "weights.caffemodel")
    net, blobs, _ = surgery.convolutionalize(golden("lenet_real_weights", "net.prototxt"), path)
    arrays = {l.name: b for l, b in zip(net.layer, blobs) if b}
    rng = np.random.default_rng(1)
    image = rng.random((1, 1, 40, 36), dtype=np.float32)
    fcn = Net(net, input_shapes={"data": image.shape}, keep=["ip2"])
    surgery.set_params(fcn, arrays)
    scores = fcn.forward(data=image, blobs=["ip2"])["ip2"]
    assert scores.shape == (1, 10, 4, 3)  # (40-28)/4+1 x (36-28)/4+1 windows, stride 4 (two 2x2 pools)
    windows = np.stack([image[0, :, 4 * i:4 * i + 28, 4 * j:4 * j + 28] for i in range(4) for j in range(3)])
    classifier = Net(golden("lenet_real_weights", "net.prototxt"), path, input_shapes={"data": windows.shape})
    expected = classifier.forward(data=windows, blobs=["ip2"])["ip2"]  # (12, 10): one row per window
    got = scores[0].reshape(10, 12).T
    assert relative_error(got, expected) <= 1e-5


FLAT_NET = """
name: "flat"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 7 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "flat" type: "%s" bottom: "conv" top: "flat" %s }
layer { name: "ip1" type: "InnerProduct" bottom: "flat" top: "ip1"
        param { lr_mult: 3 decay_mult: 0 name: "shared_w" } param { lr_mult: 5 }
        inner_product_param { num_output: 6 transpose: %s weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 3 bias_term: false } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""


@pytest.mark.parametrize("kind, extra, transpose", [
    ("Flatten", "", "false"),
    ("Reshape", "reshape_param { shape { dim: 0 dim: -1 } }", "true"),
])
def test_flatten_and_reshape_feeding_inner_products_are_removed(kind, extra, transpose):
    net, _, report = surgery.convolutionalize(tiny_net(FLAT_NET % (kind, extra, transpose)))
    assert "flat" not in [l.name for l in net.layer]
    ip1 = [l for l in net.layer if l.name == "ip1"][0]
    assert list(ip1.bottom) == ["conv"]
    assert ip1.convolution_param.kernel_h == 6 and ip1.convolution_param.kernel_w == 5
    assert [(p.lr_mult, p.decay_mult, p.name) for p in ip1.param] == [(3, 0, "shared_w"), (5, 1, "")]
    assert ip1.convolution_param.weight_filler.type == "xavier"
    ip2 = [l for l in net.layer if l.name == "ip2"][0]
    assert ip2.convolution_param.bias_term is False
    assert any(f"removed flat ({kind})" in n for n in report.notes)
    assert all(c["ok"] for c in report.checks) and report.checks


def test_refuses_what_has_no_equivalent_convolution():
    axis2 = tiny_net((FLAT_NET % ("Flatten", "", "false")).replace("num_output: 6", "num_output: 6 axis: 2")
                     .replace('bottom: "flat" top: "ip1"', 'bottom: "conv" top: "ip1"'))
    with pytest.raises(UnsupportedError, match="'ip1'.*axis is 2"):
        surgery.convolutionalize(axis2)
    vector_input = tiny_net("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 10 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 } }""")
    with pytest.raises(UnsupportedError, match="'ip'.*comes from layer 'data' \\(Input\\)"):
        surgery.convolutionalize(vector_input)
    no_ip = tiny_net('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 } } }')
    with pytest.raises(CaffeishError, match="no InnerProduct"):
        surgery.convolutionalize(no_ip)


def test_verification_catches_a_wrong_weight_layout(monkeypatch):
    """Reshaping fc6 as (N, H, W, C) instead of Caffe's (N, C, H, W) must be caught."""
    def wrong(self, arrays):
        w = np.asarray(arrays[0])
        n, c, h, k = self.new_shapes[0]
        return [w.reshape(n, h, k, c).transpose(0, 3, 1, 2)] + [np.asarray(a) for a in arrays[1:]]

    monkeypatch.setattr(surgery._Conversion, "weights", wrong)
    with pytest.raises(surgery.EquivalenceError, match="'prob' differs"):
        surgery.convolutionalize(golden("alexnet_tiny", "net.prototxt"), golden("alexnet_tiny", "weights.caffemodel"))


# -- transplant --------------------------------------------------------------------------------------------


def test_transplant_classifier_into_digits_fcn_alexnet():
    src, weights = golden("alexnet_tiny", "net.prototxt"), golden("alexnet_tiny", "weights.caffemodel")
    dst = golden("fcn_alexnet_tiny", "net.prototxt")
    net, blobs, report = surgery.transplant(src, weights, dst)
    actions = {(r["layer"], r["blob"]): r["action"] for r in report.rows if r["layer"]}
    assert actions[("conv1", 0)] == "copied" and actions[("fc6", 0)] == "reshaped" and actions[("fc7", 0)] == "reshaped"
    assert actions[("fc6", 1)] == "copied"
    assert actions[("score_fr_21classes", 0)] == "filler (constant)"
    assert actions[("upscore_21classes", 0)] == "filler (bilinear)"
    assert [r["source"] for r in report.rows if r["action"] == "skipped (no match)"] == ["fc8"]
    assert report.summary == {"copied": 12, "reshaped": 2, "filler": 3, "skipped": 1}
    by_name = {l.name: b for l, b in zip(net.layer, blobs)}
    src_arrays = io.read_caffemodel(weights).arrays()
    assert np.array_equal(by_name["fc6"][0], src_arrays["fc6"][0].reshape(256, 16, 6, 6))
    assert np.array_equal(by_name["upscore_21classes"][0][3, 0], surgery.bilinear_weights((1, 1, 63, 63))[0, 0])


def test_transplant_count_mismatch_is_an_error_unless_partial(tmp_path):
    src, weights = golden("alexnet_tiny", "net.prototxt"), golden("alexnet_tiny", "weights.caffemodel")
    dst = golden("fcn_alexnet_tiny", "net.prototxt")
    mapping = surgery.parse_map(["fc8=score_fr_21classes"])
    with pytest.raises(WeightError, match=r"'score_fr_21classes' blob 0: the source 'fc8' has shape \(62, 256\).*"
                                          r"needs \(21, 256, 1, 1\)"):
        surgery.transplant(src, weights, dst, mapping=mapping)
    net, blobs, report = surgery.transplant(src, weights, dst, mapping=mapping, allow_partial=True)
    rows = [r for r in report.rows if r["layer"] == "score_fr_21classes"]
    assert [r["action"] for r in rows] == ["skipped (count mismatch)"] * 2
    assert any(n.startswith("partial:") for n in report.notes)
    # The CLI: exit 1, one line naming the layer and both shapes, nothing written.
    out = tmp_path / "out.caffemodel"
    assert main(["surgery", "transplant", str(src), str(weights), str(dst), "-o", str(out),
                 "--map", "fc8=score_fr_21classes"]) == 1
    assert not out.exists()
    with pytest.raises(CaffeishError, match="no layer 'nope'"):
        surgery.transplant(src, weights, dst, mapping={"nope": "fc6"})


def test_transplant_blob_number_mismatch_is_an_error():
    src = tiny_net("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
        layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 2 kernel_size: 1 } }""")
    dst = pb.NetParameter()
    dst.CopyFrom(src)
    dst.layer[1].convolution_param.bias_term = False
    model = io.Model(src, [[], [io.wire.BlobRecord.from_array(np.ones((2, 2, 1, 1), np.float32)),
                               io.wire.BlobRecord.from_array(np.ones(2, np.float32))]])
    with pytest.raises(WeightError, match="'c': the source 'c' has 2 blobs"):
        surgery.transplant(src, model, dst)
    _, blobs, report = surgery.transplant(src, model, dst, allow_partial=True)
    assert len(blobs[1]) == 1 and "skipped (no destination blob)" in [r["action"] for r in report.rows]


# -- bilinear --------------------------------------------------------------------------------------------


def test_bilinear_4x4_example_and_caffes_filler():
    w = surgery.bilinear_weights((1, 1, 4, 4))
    line = np.array([0.25, 0.75, 0.75, 0.25], np.float32)
    assert np.array_equal(w[0, 0], np.outer(line, line))
    assert w[0, 0, 1, 1] == np.float32(0.5625) and w[0, 0, 0, 0] == np.float32(0.0625)
    # Caffe's own bilinear filler (golden params): the kernel in every slot of (3, 1, 4, 4).
    params = np.load(golden("deconv_bilinear_filler", "params.npz"))
    assert np.array_equal(surgery.bilinear_weights((3, 1, 4, 4), "caffe"), params["up/0"])
    # FCN's diagonal form for a dense 3 -> 3 deconvolution: the kernel on (i, i), zeros elsewhere.
    d = surgery.bilinear_weights((3, 3, 4, 4), "diagonal")
    assert np.array_equal(d[1, 1], w[0, 0]) and not d[0, 1].any() and not d[2, 0].any()
    assert np.array_equal(surgery.bilinear_weights((3, 3, 4, 4)), d)  # auto: diagonal for a square blob


def test_bilinear_dense_deconvolution_upsamples_like_caffes_grouped_one(tmp_path):
    text = golden("deconv_bilinear_filler", "net.prototxt").read_text()
    dense = tiny_net(text.replace("group: 3 ", "").replace('weight_filler { type: "bilinear" }', ""))
    net, blobs, report = surgery.bilinear(dense)
    assert report.rows[0]["form"] == "diagonal" and report.rows[0]["shape"] == [3, 3, 4, 4]
    path = tmp_path / "up.caffemodel"
    io.write_caffemodel(path, net, blobs)
    inputs, expected = golden_io("deconv_bilinear_filler")
    up = Net(net, path).forward(**inputs)["up"]
    assert relative_error(up, expected["up"]) <= 1e-6
    # Interior of a x2 upsampling of a linear ramp is the interpolated ramp.
    ramp = np.arange(6, dtype=np.float32)[None, None, None, :].repeat(5, axis=2).repeat(3, axis=1)
    out = Net(net, path).forward(data=ramp)["up"][0, 0, 2]
    assert np.allclose(out[1:-1], (np.arange(1, 11) - 0.5) / 2, atol=1e-6)


def test_bilinear_refuses_the_caffe_form_on_a_dense_layer():
    text = golden("deconv_bilinear_filler", "net.prototxt").read_text().replace("group: 3 ", "")
    with pytest.raises(CaffeishError, match="'up'.*every \\(in, out\\) slot.*group: 3"):
        surgery.bilinear(tiny_net(text), form="caffe")
    with pytest.raises(CaffeishError, match="matches no Deconvolution layer \\(it matches data"):
        surgery.bilinear(tiny_net(text), layers=["data"])


# -- the CLI --------------------------------------------------------------------------------------------------


def test_cli_convolutionalize_writes_atomically_and_leaves_inputs(tmp_path, capsys):
    src, weights = golden("alexnet_tiny", "net.prototxt"), golden("alexnet_tiny", "weights.caffemodel")
    before = digest(weights)
    out = tmp_path / "fcn.prototxt"
    assert main(["surgery", "convolutionalize", str(src), str(weights), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "240,678" in text and "identical" in text and "2,62,1,1" in text
    assert digest(weights) == before
    assert sorted(os.listdir(tmp_path)) == ["fcn.caffemodel", "fcn.prototxt"]  # no temp files left
    model = io.read_caffemodel(tmp_path / "fcn.caffemodel")
    assert model.layer_blobs()["fc6"][0].shape == (256, 16, 6, 6)
    inputs, expected = golden_io("alexnet_tiny")
    prob = Net(str(out), str(tmp_path / "fcn.caffemodel")).forward(**inputs)["prob"]
    assert relative_error(prob[:, :, 0, 0], expected["prob"]) <= 1e-4
    # Refuses to write over an input.
    copy = tmp_path / "w.caffemodel"
    copy.write_bytes(open(weights, "rb").read())
    assert main(["surgery", "convolutionalize", str(src), str(copy), "-o", str(tmp_path / "x.prototxt"),
                 str(copy), "--no-verify"]) == 1
    assert "refusing to overwrite an input" in capsys.readouterr().err
    assert digest(copy) == before


def test_cli_transplant_and_bilinear(tmp_path, capsys):
    src, weights = golden("alexnet_tiny", "net.prototxt"), golden("alexnet_tiny", "weights.caffemodel")
    dst = golden("fcn_alexnet_tiny", "net.prototxt")
    out = tmp_path / "t.caffemodel"
    assert main(["surgery", "transplant", str(src), str(weights), str(dst), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "reshaped" in text and "skipped (no match)" in text and "filler (bilinear)" in text
    up = tmp_path / "b.caffemodel"
    assert main(["surgery", "bilinear", str(dst), str(out), "-o", str(up), "--layers", "upscore*"]) == 0
    assert "caffe" in capsys.readouterr().out
    stored = io.read_caffemodel(up).arrays()
    assert np.array_equal(stored["upscore_21classes"][0], surgery.bilinear_weights((21, 1, 63, 63)))
    assert np.array_equal(stored["fc6"][0], io.read_caffemodel(out).arrays()["fc6"][0])


def _snapshot(folder):
    return {name: digest(folder / name) if (folder / name).is_file() else os.listdir(folder / name)
            for name in sorted(os.listdir(folder))}


@pytest.fixture()
def classifier_copy(tmp_path):
    """alexnet_tiny's prototxt and caffemodel copied into tmp_path (cls.prototxt, cls.caffemodel)."""
    for src, name in ((golden("alexnet_tiny", "net.prototxt"), "cls.prototxt"),
                      (golden("alexnet_tiny", "weights.caffemodel"), "cls.caffemodel")):
        (tmp_path / name).write_bytes(open(src, "rb").read())
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    # The audit's cases: an input named as the first output; the second output would have been written first.
    (["convolutionalize", "cls.prototxt", "cls.caffemodel", "-o", "cls.prototxt", "new.caffemodel"],
     "refusing to overwrite an input"),
    (["fcn", "cls.prototxt", "cls.caffemodel", "--classes", "3", "-o", "fcnA.prototxt", "fcnA.caffemodel",
      "--train-val", "cls.prototxt"], "refusing to overwrite an input"),
    (["fcn", "cls.prototxt", "cls.caffemodel", "--classes", "3", "-o", "fcnA.prototxt", "cls.caffemodel"],
     "refusing to overwrite an input"),
    # Two outputs naming one file (also through another spelling of the path).
    (["convolutionalize", "cls.prototxt", "cls.caffemodel", "-o", "a.prototxt", "./a.prototxt"],
     "two outputs are the same file"),
    (["fcn", "cls.prototxt", "cls.caffemodel", "--classes", "3", "-o", "f.prototxt", "x.caffemodel",
      "--train-val", "x.caffemodel"], "two outputs are the same file"),
    (["transplant", "cls.prototxt", "cls.caffemodel", "cls.prototxt", "-o", "cls.caffemodel"],
     "refusing to overwrite an input"),
    (["bilinear", "cls.prototxt", "cls.caffemodel", "-o", "cls.caffemodel"], "refusing to overwrite an input"),
    # A folder or a missing folder as an output: refused before the first file is staged.
    (["convolutionalize", "cls.prototxt", "cls.caffemodel", "-o", "sub"], "sub: is a folder"),
    (["fcn", "cls.prototxt", "cls.caffemodel", "--classes", "3", "-o", "f.prototxt", "--train-val",
      "cls.caffemodel/tv.prototxt"], "cls.caffemodel is not a folder"),
    (["fcn", "cls.prototxt", "cls.caffemodel", "--classes", "3", "-o", "new/f.prototxt", "--train-val",
      "cls.caffemodel/tv.prototxt"], "cls.caffemodel is not a folder"),  # and new/ is not created
])
def test_cli_refused_output_writes_nothing(classifier_copy, argv, message, capsys, monkeypatch):
    monkeypatch.chdir(classifier_copy)
    (classifier_copy / "sub").mkdir()
    before = _snapshot(classifier_copy)
    assert main(["surgery"] + argv + ["--no-verify"] * (argv[0] in ("convolutionalize", "fcn"))) == 1
    err = capsys.readouterr().err
    assert message in err and "nothing was written" in err
    assert _snapshot(classifier_copy) == before  # no new file, no temp file, inputs unchanged


def test_write_all_is_all_or_nothing(tmp_path):
    from caffeish.apps import surgery_files as tool

    def failing():
        yield b"partial "
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        tool.write_all([(str(tmp_path / "a.prototxt"), [b"name: 'a'\n"]),
                        (str(tmp_path / "b.caffemodel"), failing())], inputs=[])
    assert os.listdir(tmp_path) == []  # the complete first file was not renamed into place; temps removed
    tool.write_all([(str(tmp_path / "a.prototxt"), [b"name: 'a'\n"]), (str(tmp_path / "b"), [b"x", b"y"])], [])
    assert sorted(os.listdir(tmp_path)) == ["a.prototxt", "b"] and (tmp_path / "b").read_bytes() == b"xy"


def test_write_all_renames_only_after_every_file_is_written(tmp_path, monkeypatch):
    """Every temp file is complete and synced before the first rename (no file is renamed while a later
    one is still being written); a rename failing removes the temps not yet renamed."""
    from caffeish.apps import surgery_files as tool

    real_replace, renames = os.replace, []

    def replace(src, dst):
        # When the first rename happens, every staged temp already holds its whole content.
        temps = sorted(p for p in os.listdir(tmp_path) if p.endswith(".tmp"))
        renames.append((os.path.basename(dst), {p: (tmp_path / p).read_bytes() for p in temps}))
        if len(renames) == 2:
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    files = [(str(tmp_path / "a.prototxt"), [b"a1", b"a2"]), (str(tmp_path / "b.caffemodel"), [b"b1", b"b2"]),
             (str(tmp_path / "c.prototxt"), [b"c"])]
    with pytest.raises(OSError, match="rename failed"):
        tool.write_all(files, inputs=[])
    first, staged = renames[0]
    assert first == "a.prototxt" and sorted(staged.values()) == [b"a1a2", b"b1b2", b"c"]
    # The window io.atomic_outputs documents: the first rename is done and cannot be undone; the rest never
    # reached their destinations and no temp file is left.
    assert sorted(os.listdir(tmp_path)) == ["a.prototxt"]


@pytest.mark.parametrize("op", ["convolutionalize", "transplant", "fcn"])
def test_negative_seed_is_refused(classifier_copy, op, capsys, monkeypatch):
    monkeypatch.chdir(classifier_copy)
    argv = {"convolutionalize": ["cls.prototxt", "cls.caffemodel", "-o", "o.prototxt"],
            "transplant": ["cls.prototxt", "cls.caffemodel", "cls.prototxt", "-o", "o.caffemodel"],
            "fcn": ["cls.prototxt", "--classes", "3", "-o", "o.prototxt"]}[op]
    with pytest.raises(SystemExit) as e:
        main(["surgery", op] + argv + ["--seed", "-1"])
    assert e.value.code == 2 and "argument --seed: must be at least 0, got -1" in capsys.readouterr().err
    # The Python API: a CaffeishError, not numpy's ValueError.
    with pytest.raises(CaffeishError, match="seed must be a non-negative integer, got -1"):
        surgery.convolutionalize("cls.prototxt", seed=-1)
    with pytest.raises(CaffeishError, match="seed must be a non-negative integer"):
        surgery.transplant("cls.prototxt", "cls.caffemodel", "cls.prototxt", seed=-2)


# -- issue 15: transplant names what got nothing; surgery creates its output folders --------------------------


def _renamed_fcn(tmp_path, fillers=False):
    """alexnet_tiny convolutionalized with fc6/fc7/fc8 renamed fc6-conv/fc7-conv/fc8-conv (DIGITS' naming);
    their weight fillers constant 0 (none given), or gaussian with `fillers`."""
    net, _, _ = surgery.convolutionalize(golden("alexnet_tiny", "net.prototxt"), verify=False)
    for layer in net.layer:
        if layer.name in ("fc6", "fc7", "fc8"):
            layer.name += "-conv"
            if fillers:
                layer.convolution_param.weight_filler.type = "gaussian"
                layer.convolution_param.weight_filler.std = 0.01
    path = tmp_path / "fcn_renamed.prototxt"
    io.write_prototxt(path, net)
    return path


def test_transplant_names_the_layers_that_got_nothing_and_warns_about_constant_ones(tmp_path, capsys):
    src, weights = golden("alexnet_tiny", "net.prototxt"), golden("alexnet_tiny", "weights.caffemodel")
    dst, out = _renamed_fcn(tmp_path), tmp_path / "out.caffemodel"
    assert main(["surgery", "transplant", str(src), str(weights), str(dst), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "note: got nothing from the source, kept their fillers: fc6-conv, fc7-conv, fc8-conv" in captured.out
    warnings = captured.err.splitlines()
    assert len(warnings) == 3 and all(w.startswith("warning: layer 'fc") for w in warnings)
    assert ("warning: layer 'fc6-conv' (Convolution) got no weights from the source and keeps its filler "
            "(constant 0): its outputs do not depend on its input; the source's unused layer fc6 has weights of "
            "that size: --map fc6=fc6-conv") in warnings
    stored = io.read_caffemodel(out).arrays()
    assert not stored["fc8-conv"][0].any()  # what the warning is about
    # Mapped, nothing is left behind and nothing is warned about.
    assert main(["surgery", "transplant", str(src), str(weights), str(dst), "-o", str(out), "--map", "fc6=fc6-conv",
                 "--map", "fc7=fc7-conv", "--map", "fc8=fc8-conv"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "got nothing" not in captured.out
    # A random filler is reported but not warned about.
    _, _, report = surgery.transplant(src, weights, _renamed_fcn(tmp_path, fillers=True))
    assert report.empty == ["fc6-conv", "fc7-conv", "fc8-conv"] and report.warnings == []


@pytest.mark.parametrize("spec, how", [
    (None, "no filler: zeros"), (pb.FillerParameter(), "constant 0"), (pb.FillerParameter(value=0.5), "constant 0.5"),
    (pb.FillerParameter(type="gaussian", std=0, mean=1), "gaussian with std 0: constant 1"),
    (pb.FillerParameter(type="uniform", min=2, max=2), "uniform from 2 to 2: constant"),
    (pb.FillerParameter(type="gaussian", std=0.1), None), (pb.FillerParameter(type="xavier"), None),
    (pb.FillerParameter(type="bilinear"), None)])
def test_constant_filler(spec, how):
    assert fillers.constant_filler(spec) == how


def test_surgery_creates_missing_output_folders(classifier_copy, capsys, monkeypatch):
    monkeypatch.chdir(classifier_copy)
    src, weights = golden("alexnet_tiny", "net.prototxt"), golden("alexnet_tiny", "weights.caffemodel")
    assert main(["surgery", "convolutionalize", "cls.prototxt", "cls.caffemodel", "-o", "a/b/fcn.prototxt",
                 "--no-verify"]) == 0
    assert sorted(os.listdir("a/b")) == ["fcn.caffemodel", "fcn.prototxt"]
    assert main(["surgery", "transplant", str(src), str(weights), "a/b/fcn.prototxt", "-o", "c/t.caffemodel"]) == 0
    assert main(["surgery", "bilinear", str(golden("fcn_alexnet_tiny", "net.prototxt")), "-o", "d/e/b.caffemodel"]) == 0
    assert main(["surgery", "fcn", "cls.prototxt", "cls.caffemodel", "--classes", "3", "-o", "f/fcn.prototxt",
                 "--train-val", "g/h/tv.prototxt", "--no-verify"]) == 0
    assert os.path.isfile("c/t.caffemodel") and os.path.isfile("d/e/b.caffemodel")
    assert sorted(os.listdir("f")) == ["fcn.caffemodel", "fcn.prototxt"] and os.listdir("g/h") == ["tv.prototxt"]
    capsys.readouterr()


def test_a_failed_write_removes_the_folders_it_created(tmp_path):
    from caffeish.apps import surgery_files as tool

    def failing():
        yield b"partial "
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        tool.write_all([(str(tmp_path / "new" / "a.prototxt"), [b"name: 'a'\n"]),
                        (str(tmp_path / "new" / "deeper" / "b.caffemodel"), failing())], inputs=[])
    assert os.listdir(tmp_path) == []
