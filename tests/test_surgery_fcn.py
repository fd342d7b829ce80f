"""Building segmentation FCNs from classifiers: DIGITS' FCN-Alexnet and fcn.berkeleyvision.org's FCN-8s."""
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest

from caffeish.formats import io
from caffeish.apps import surgery
from caffeish.tools.cli import main
from caffeish.errors import CaffeishError, ShapeError
from caffeish.graph.graph import Graph
from caffeish.runtime.net import Net
from caffeish.formats.schema import TEST, TRAIN, pb
from caffeish.apps.surgery_fcn import build_fcn, default_train_val_path
from conftest import ROOT, shared_path
from test_surgery import golden, shrunk, write_v1

SCRIPT = os.path.join(ROOT, "tests", "scripts", "digits_net_surgery.py")
POINTWISE = {"ReLU", "Dropout", "LRN", "Power", "Input", "Softmax"}


def model_path(*parts):
    return shared_path("models", *parts)


def geometry(net):
    """(type, kernel, stride, pad, group, num_output, bias) per spatial layer; Crop (axis, offsets)."""
    rows = []
    for layer in net.layer:
        if layer.type in ("Convolution", "Deconvolution"):
            cp = layer.convolution_param
            rows.append((layer.type, list(cp.kernel_size), list(cp.stride) or [1], list(cp.pad) or [0], cp.group,
                         cp.num_output, cp.bias_term))
        elif layer.type == "Pooling":
            pp = layer.pooling_param
            rows.append((layer.type, pp.pool, pp.kernel_size, pp.stride, pp.pad))
        elif layer.type == "Crop":
            rows.append((layer.type, layer.crop_param.axis, list(layer.crop_param.offset)))
    return rows


def caffenet_tiny(tmp_path):
    """CaffeNet (the DIGITS post's layer order: pool before norm) with channels / 16 and alexnet_tiny's
    random weights (same names and shapes), the weights saved as a V1 caffemodel."""
    net = shrunk(model_path("bvlc_caffe", "models", "bvlc_reference_caffenet", "deploy.prototxt"))
    arrays = io.read_caffemodel(golden("alexnet_tiny", "weights.caffemodel")).arrays()
    proto = tmp_path / "caffenet_tiny.prototxt"
    io.write_prototxt(proto, net)
    return net, proto, write_v1(tmp_path / "caffenet_tiny_v1.caffemodel", net, arrays)


def arrays_of(net, blobs):
    return {l.name: [surgery.as_array(x) for x in b] for l, b in zip(net.layer, blobs) if b}


# -- reference geometry on the full-size nets (shapes only) -------------------------------------------------


def test_alexnet_becomes_digits_fcn_alexnet():
    fcn = build_fcn(model_path("bvlc_caffe", "models", "bvlc_alexnet", "deploy.prototxt"), classes=21, verify=False)
    digits = io.read_net(model_path("digits", "examples", "semantic-segmentation", "fcn_alexnet.deploy.prototxt"))
    assert geometry(fcn.deploy) == geometry(digits)
    assert fcn.offsets == {"score": 18} and fcn.stride == 32
    up = [l for l in fcn.deploy.layer if l.name == "upscore"][0]
    assert list(up.convolution_param.kernel_size) == [63] and [p.lr_mult for p in up.param] == [0]
    assert up.convolution_param.weight_filler.type == "bilinear"
    assert list([l for l in fcn.deploy.layer if l.name == "score"][0].bottom) == ["upscore", "data"]
    # The train/val net has DIGITS' fcn_alexnet.prototxt layer names (it adds a Power 'shift' layer).
    theirs = io.read_net(model_path("digits", "examples", "semantic-segmentation", "fcn_alexnet.prototxt"))
    assert sorted(l.name for l in fcn.train_val.layer) == sorted(l.name for l in theirs.layer if l.name != "shift")
    assert geometry(fcn.train_val) == geometry(theirs)
    # CaffeNet has the post's exact layer order: every layer type matches, one by one.
    caffenet = build_fcn(model_path("bvlc_caffe", "models", "bvlc_reference_caffenet", "deploy.prototxt"),
                         classes=21, verify=False)
    assert [l.type for l in caffenet.deploy.layer] == [l.type for l in digits.layer if l.type != "Power"]


def test_vgg16_with_skips_becomes_voc_fcn8s():
    fcn = build_fcn(model_path("vgg16", "models", "VGG_ILSVRC_16_layers_deploy.prototxt"), classes=21,
                    skips=["pool4", "pool3"], verify=False)
    assert fcn.offsets == {"score_pool4c": 5, "score_pool3c": 9, "score": 31}
    voc = io.read_net(model_path("fcn", "voc-fcn8s", "deploy.prototxt"))
    assert [l.name for l in fcn.deploy.layer if l.type not in POINTWISE] == \
        [l.name for l in voc.layer if l.type not in POINTWISE]
    ours, theirs = geometry(fcn.deploy), geometry(voc)
    # voc-fcn8s' deconvolutions are dense (group 1, FCN's diagonal interp weights); ours are per class
    # (group 21, Caffe's bilinear filler): the same upsampling.
    strip = [r[:4] + r[5:] if r[0] == "Deconvolution" else r for r in ours]
    assert strip == [r[:4] + r[5:] if r[0] == "Deconvolution" else r for r in theirs]
    assert [r[4] for r in ours if r[0] == "Deconvolution"] == [21, 21, 21]
    # FCN-32s takes kernel 64 for VGG-16 (2S gives a whole offset), FCN-16s kernel 32.
    fcn32 = build_fcn(model_path("vgg16", "models", "VGG_ILSVRC_16_layers_deploy.prototxt"), classes=21, verify=False)
    assert [r[1] for r in geometry(fcn32.deploy) if r[0] == "Deconvolution"] == [[64]]
    voc32 = io.read_net(model_path("fcn", "voc-fcn32s", "val.prototxt"))
    assert geometry(fcn32.deploy)[-1] == geometry(voc32)[-1] == ("Crop", 2, [19])
    fcn16 = build_fcn(model_path("vgg16", "models", "VGG_ILSVRC_16_layers_deploy.prototxt"), classes=21,
                      skips=["pool4"], verify=False)
    assert fcn16.offsets == {"score_pool4c": 5, "score": 27}
    assert [l.name for l in fcn16.deploy.layer][-6:] == ["upscore2", "score_pool4", "score_pool4c", "fuse_pool4",
                                                         "upscore16", "score"]


def test_upscore_kernel_override_and_errors():
    alexnet = model_path("bvlc_caffe", "models", "bvlc_alexnet", "deploy.prototxt")
    with pytest.raises(ShapeError, match="kernel 64: .*not a whole number"):
        build_fcn(alexnet, classes=21, upscore_kernel=64, verify=False)
    assert geometry(build_fcn(alexnet, classes=21, upscore_kernel=63, verify=False).deploy) == \
        geometry(build_fcn(alexnet, classes=21, verify=False).deploy)
    with pytest.raises(CaffeishError, match="--skip pool9: no blob or layer"):
        build_fcn(alexnet, classes=21, skips=["pool9"], verify=False)


# -- weights and equivalence on the tiny variants ----------------------------------------------------------------


def test_transplant_into_digits_deploy_equals_our_fcn(tmp_path):
    net, proto, v1 = caffenet_tiny(tmp_path)
    fcn = build_fcn(proto, v1, classes=21)
    assert all(c["ok"] for c in fcn.conv_report.checks) and fcn.offsets == {"score": 18}
    ours = arrays_of(fcn.deploy, fcn.blobs)
    assert ours["score_fr"][0].shape == (21, 256, 1, 1) and ours["upscore"][0].shape == (21, 1, 63, 63)
    # DIGITS' flow: the classifier's weights transplanted into the hand-written FCN-Alexnet.
    digits_proto = golden("fcn_alexnet_tiny", "net.prototxt")
    dnet, dblobs, report = surgery.transplant(proto, v1, digits_proto)
    assert {r["layer"] for r in report.rows if r["action"] == "reshaped"} == {"fc6", "fc7"}
    theirs = arrays_of(dnet, dblobs)
    for name in ("conv1", "conv5", "fc6", "fc7"):
        assert all(np.array_equal(a, b) for a, b in zip(ours[name], theirs[name])), name
    assert np.array_equal(ours["upscore"][0], theirs["upscore_21classes"][0])
    # Same score layer in both, then the same input: DIGITS' net subtracts 116 in a Power layer first.
    theirs["score_fr_21classes"] = ours["score_fr"]
    digits = Net(digits_proto, keep=["fc7"])
    surgery.set_params(digits, theirs)
    built = Net(fcn.deploy, keep=["fc7"])
    surgery.set_params(built, ours)
    x = np.load(golden("fcn_alexnet_tiny", "inputs.npz"))["data"]
    out_d = digits.forward(data=x, blobs=["fc7"])
    out_b = built.forward(data=x - np.float32(116), blobs=["fc7"])
    assert out_b["score"].shape == x.shape[:1] + (21,) + x.shape[2:]
    assert np.array_equal(out_b["fc7"], out_d["fc7"])
    assert np.array_equal(out_b["score"], out_d["score"])


def test_digits_net_surgery_script_runs_on_caffeish(tmp_path):
    net, proto, v1 = caffenet_tiny(tmp_path)
    digits_proto = golden("fcn_alexnet_tiny", "net.prototxt")
    out = tmp_path / "fcn_alexnet.caffemodel"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, SCRIPT, str(proto), str(v1), str(digits_proto), str(out)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    log = json.loads(result.stdout)["log"]
    assert ["coercing", "fc6", 0, [256, 576], [256, 16, 6, 6]] in log and ["dropping", "fc8"] in log
    assert ["copying", "conv2", 0, [16, 3, 5, 5], [16, 3, 5, 5]] in log
    # The same weights as our transplant command.
    _, blobs, _ = surgery.transplant(proto, v1, digits_proto)
    ours = arrays_of(io.read_net(digits_proto), blobs)
    saved = io.read_caffemodel(out).arrays()
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "upscore_21classes"):
        assert all(np.array_equal(a, b) for a, b in zip(ours[name], saved[name])), name


def test_score_layer_kept_or_expanded():
    src, weights = golden("alexnet_tiny", "net.prototxt"), golden("alexnet_tiny", "weights.caffemodel")
    fc8 = io.read_caffemodel(weights).arrays()["fc8"]
    same = arrays_of(*_deploy_blobs(build_fcn(src, weights, classes=62, verify=False)))
    assert np.array_equal(same["score_fr"][0].reshape(62, 256), fc8[0]) and np.array_equal(same["score_fr"][1], fc8[1])
    grown = build_fcn(src, weights, classes=70, keep_classes=True, verify=False)
    w = arrays_of(*_deploy_blobs(grown))["score_fr"]
    assert np.array_equal(w[0][:62].reshape(62, 256), fc8[0]) and np.array_equal(w[1][:62], fc8[1])
    assert w[0][62:].std() > 0 and not w[1][62:].any()
    fresh = arrays_of(*_deploy_blobs(build_fcn(src, weights, classes=5, verify=False)))["score_fr"]
    assert fresh[0].shape == (5, 256, 1, 1) and abs(fresh[0].std() - np.sqrt(2 / 256)) < 0.03  # msra
    with pytest.raises(CaffeishError, match="fewer than the classifier's 62"):
        build_fcn(src, weights, classes=40, keep_classes=True, verify=False)


def _deploy_blobs(fcn):
    return fcn.deploy, fcn.blobs


def test_fcn8s_from_reduced_vgg_runs_and_skips_start_at_zero():
    vgg = shrunk(model_path("vgg16", "models", "VGG_ILSVRC_16_layers_deploy.prototxt"))
    rng = np.random.default_rng(0)
    arrays = surgery.random_params(Graph(vgg), rng)
    model = io.Model(vgg, [[io.wire.BlobRecord.from_array(a) for a in arrays.get(l.name, [])] for l in vgg.layer])
    fcn = build_fcn(vgg, model, classes=5, skips=["pool3", "pool4"], seed=1)  # any order: coarse to fine
    assert fcn.offsets == {"score_pool4c": 5, "score_pool3c": 9, "score": 31}
    net = Net(fcn.deploy, input_shapes={"data": (1, 3, 40, 56)}, keep=True)
    surgery.set_params(net, arrays_of(fcn.deploy, fcn.blobs))
    out = net.forward(data=rng.standard_normal((1, 3, 40, 56), dtype=np.float32))
    assert out["score"].shape == (1, 5, 40, 56)
    # score_pool4/3 are zero-initialised, so each fuse equals the upsampled coarser scores.
    assert np.array_equal(net.blobs["fuse_pool4"].data, net.blobs["upscore2"].data)
    assert not net.blobs["score_pool3c"].data.any()


def seg_dataset(folder, sizes, classes=3):
    """A `caffeish dataset segmentation` folder (folder/ds) of random images of the given (H, W) sizes
    with greyscale labels 0..classes-1; half of them for val."""
    from PIL import Image

    from caffeish.apps.dataset import build_segmentation

    rng = np.random.default_rng(7)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "images" / f"i{i}.png")
        labels = rng.integers(0, classes, (h, w)).astype(np.uint8)
        labels[0, 0] = classes - 1
        Image.fromarray(labels).save(folder / "labels" / f"i{i}.png")
    build_segmentation(folder / "images", folder / "labels", folder / "ds", val_fraction=0.5)
    return folder / "ds"


def test_train_val_net_reads_the_dataset_layout(tmp_path):
    ds = str(seg_dataset(tmp_path, [(12, 16)] * 4))
    fcn = build_fcn(golden("alexnet_tiny", "net.prototxt"), golden("alexnet_tiny", "weights.caffemodel"),
                    classes=3, dataset=ds, batch_size=2, verify=False)
    data = [l for l in fcn.train_val.layer if l.type == "Data"]
    assert [(l.top[0], l.include[0].phase, l.data_param.source) for l in data] == [
        ("data", TRAIN, f"{ds}/train_db/features"), ("label", TRAIN, f"{ds}/train_db/labels"),
        ("data", TEST, f"{ds}/val_db/features"), ("label", TEST, f"{ds}/val_db/labels")]
    assert data[0].transform_param.mean_file == f"{ds}/mean.binaryproto" and not data[1].HasField("transform_param")
    assert all(l.data_param.backend == pb.DataParameter.LMDB and l.data_param.batch_size == 2 for l in data)
    assert fcn.warnings == []
    loss = [l for l in fcn.train_val.layer if l.type == "SoftmaxWithLoss"][0]
    assert loss.loss_param.HasField("normalize") and loss.loss_param.normalize is False
    acc = [l for l in fcn.train_val.layer if l.type == "Accuracy"][0]
    assert acc.include[0].phase == TEST and acc.accuracy_param.ignore_label == 255
    # It evaluates on arrays with the built weights.
    path = tmp_path / "fcn.caffemodel"
    io.write_caffemodel(path, fcn.deploy, fcn.blobs)
    net = Net(fcn.train_val, str(path), TEST, input_shapes={"data": (2, 3, 48, 40), "label": (2, 1, 48, 40)})
    label = np.random.default_rng(0).integers(0, 3, (2, 1, 48, 40)).astype(np.float32)
    out = net.forward(data=np.zeros((2, 3, 48, 40), np.float32), label=label)
    assert set(out) == {"loss", "accuracy"} and np.isfinite(out["loss"])
    # Without a dataset the mean is DIGITS' relative name; --no-mean (mean_file=None) writes none.
    assert build_fcn(golden("alexnet_tiny", "net.prototxt"), classes=3, verify=False).train_val.layer[0] \
        .transform_param.mean_file == "mean.binaryproto"
    bare = build_fcn(golden("alexnet_tiny", "net.prototxt"), classes=3, dataset=ds, mean_file=None, verify=False)
    assert not bare.train_val.layer[0].HasField("transform_param")


def test_mixed_size_dataset_gets_no_mean_and_its_train_val_net_evaluates(tmp_path, capsys):
    """A dataset of mixed-size images records "mean_file": null; the train/val net then has no mean
    (it named a missing DS/mean.binaryproto, and evaluate stopped on it) and evaluates as written."""
    ds = seg_dataset(tmp_path, [(12, 16), (13, 17), (14, 18), (15, 19)])
    assert json.loads((ds / "dataset.json").read_text())["mean_file"] is None
    assert not (ds / "mean.binaryproto").exists()
    out = tmp_path / "out"
    out.mkdir()
    src, weights = golden("alexnet_tiny", "net.prototxt"), golden("alexnet_tiny", "weights.caffemodel")
    assert main(["surgery", "fcn", str(src), str(weights), "--classes", "3", "-o", str(out / "fcn.prototxt"),
                 "--dataset", str(ds), "--no-verify"]) == 0
    text = capsys.readouterr().out
    assert "note: mean: none in the train/val net (no mean.binaryproto: training images differ in size" in text
    tv = io.read_net(out / "fcn_train_val.prototxt")
    assert [l.HasField("transform_param") for l in tv.layer if l.type == "Data"] == [False] * 4
    assert main(["evaluate", "segmentation", str(out / "fcn_train_val.prototxt"), str(out / "fcn.caffemodel"),
                 "--confusion", "none", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 2 and len(result["classes"]) == 3


def test_dataset_mean_values_when_it_has_no_mean_image(tmp_path):
    ds = seg_dataset(tmp_path, [(12, 16)] * 4)
    meta = json.loads((ds / "dataset.json").read_text())
    means = meta["mean_value"]
    assert len(means) == 3
    meta["mean_file"] = None
    (ds / "dataset.json").write_text(json.dumps(meta))
    (ds / "mean.binaryproto").unlink()
    fcn = build_fcn(golden("alexnet_tiny", "net.prototxt"), classes=3, dataset=str(ds), verify=False)
    data = [l for l in fcn.train_val.layer if l.type == "Data" and l.top[0] == "data"]
    assert [list(l.transform_param.mean_value) for l in data] == [pytest.approx(means)] * 2
    assert not any(l.transform_param.HasField("mean_file") for l in data)
    assert any("per-channel mean_value" in n for n in fcn.report.notes)


def test_cli_refuses_a_missing_dataset_and_warns_on_a_class_count_mismatch(tmp_path, capsys):
    src = str(golden("alexnet_tiny", "net.prototxt"))
    out = tmp_path / "out"
    out.mkdir()
    for bad, what in ((tmp_path / "nonexistent", "no such folder"), (out, "not a dataset folder")):
        assert main(["surgery", "fcn", src, "--classes", "3", "-o", str(out / "f.prototxt"), "--dataset",
                     str(bad), "--no-verify"]) == 1
        err = capsys.readouterr().err
        assert f"--dataset {bad}: {what}" in err and len(err.strip().splitlines()) == 1
        assert os.listdir(out) == []
    with pytest.raises(CaffeishError, match="--dataset /nonexistent: no such folder"):
        build_fcn(src, classes=3, dataset="/nonexistent", verify=False)
    ds = seg_dataset(tmp_path, [(12, 16)] * 4, classes=4)
    # An output inside the dataset folder is refused: the dataset is an input.
    assert main(["surgery", "fcn", src, "--classes", "4", "-o", str(ds / "f.prototxt"), "--dataset", str(ds),
                 "--no-verify"]) == 1
    assert "lies inside the input folder --dataset" in capsys.readouterr().err
    assert main(["surgery", "fcn", src, "--classes", "3", "-o", str(out / "f.prototxt"), "--dataset", str(ds),
                 "--no-verify"]) == 0
    err = capsys.readouterr().err
    assert (f"warning: the net has 3 classes but the dataset has 4 ({ds}/dataset.json); labels 3 and above are "
            f"outside the net's classes") in err
    assert main(["surgery", "fcn", src, "--classes", "4", "-o", str(out / "g.prototxt"), "--dataset", str(ds),
                 "--no-verify"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_cli_fcn_writes_three_files(tmp_path, capsys):
    src, weights = golden("alexnet_tiny", "net.prototxt"), golden("alexnet_tiny", "weights.caffemodel")
    ds = seg_dataset(tmp_path / "data", [(12, 16)] * 2, classes=21)
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    deploy = tmp_path / "fcn.deploy.prototxt"
    rc = main(["surgery", "fcn", str(src), str(weights), "--classes", "21", "-o", str(deploy),
               str(tmp_path / "fcn.caffemodel"), "--dataset", str(ds), "--skip", "pool2"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "score_pool2c" in text and "1e-05" in text
    assert sorted(os.listdir(tmp_path)) == ["fcn.caffemodel", "fcn.deploy.prototxt", "fcn.train_val.prototxt"]
    assert default_train_val_path("a/b.prototxt") == os.path.join("a", "b_train_val.prototxt")
    net = Net(str(deploy), str(tmp_path / "fcn.caffemodel"), input_shapes={"data": (1, 3, 50, 70)})
    assert net.forward(data=np.ones((1, 3, 50, 70), np.float32))["score"].shape == (1, 21, 50, 70)
    tv = io.read_net(tmp_path / "fcn.train_val.prototxt")
    assert tv.layer[0].data_param.source == str(ds / "train_db" / "features")
    assert tv.layer[0].transform_param.mean_file == str(ds / "mean.binaryproto")


@pytest.mark.parametrize("option, value, message", [
    ("--upscore-kernel", "0", "must be at least 1, got 0"),  # was silently taken as 'not given'
    ("--upscore-kernel", "-3", "must be at least 1, got -3"),
    ("--pad", "-5", "must be at least 0, got -5"),  # was protobuf's ValueError traceback
    ("--batch-size", "0", "must be at least 1, got 0"),  # was reported as an --input-shape the user never gave
    ("--classes", "0", "must be at least 1, got 0"),
    ("--classes", "4294967296", "must be at most 4294967295"),  # num_output is a uint32
    ("--pad", "x", "expected an integer, got 'x'"),
])
def test_cli_refuses_out_of_range_numbers_by_name(option, value, message, tmp_path, capsys):
    argv = ["surgery", "fcn", str(golden("alexnet_tiny", "net.prototxt")), "--classes", "3",
            "-o", str(tmp_path / "f.prototxt"), option, value]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {option}: {message}" in err and "--input-shape data=" not in err
    assert os.listdir(tmp_path) == []


def test_ignore_label_out_of_int32_is_an_error(tmp_path, capsys):
    argv = ["surgery", "fcn", str(golden("alexnet_tiny", "net.prototxt")), "--classes", "3",
            "-o", str(tmp_path / "f.prototxt"), "--ignore-label", "99999999999", "--no-verify"]
    with pytest.raises(SystemExit) as e:  # the shared --ignore-label N|none option refuses it by name
        main(argv)
    assert e.value.code == 2
    assert "argument --ignore-label: Caffe's ignore_label is a 32-bit integer, got 99999999999" in \
        capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"upscore_kernel": 0}, "--upscore-kernel must be at least 1, got 0"),
    ({"pad": -5}, r"--pad \(the first Convolution's pad\) must be at least 0, got -5"),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"batch_size": 2.5}, "--batch-size must be a whole number, got 2.5"),
    ({"classes": -1}, "--classes must be at least 1, got -1"),
    ({"ignore_label": 2**31}, "--ignore-label must be at most 2147483647"),
    ({"seed": -1}, "seed must be a non-negative integer, got -1"),
])
def test_api_refuses_out_of_range_numbers(kwargs, message):
    with pytest.raises(CaffeishError, match=message):
        build_fcn(golden("alexnet_tiny", "net.prototxt"), **dict({"classes": 3, "verify": False}, **kwargs))


def test_upscore_kernel_given_is_used_not_ignored():
    src = golden("alexnet_tiny", "net.prototxt")
    default = build_fcn(src, classes=3, verify=False)
    assert default.stride == 32 and default.offsets == {"score": 18}  # kernel 63 (AlexNet's)
    # A kernel two taps shorter centres the upsampled map one pixel earlier: offset 17.
    chosen = build_fcn(src, classes=3, verify=False, upscore_kernel=61)
    assert chosen.deploy.layer[-2].convolution_param.kernel_size[:] == [61] and chosen.offsets == {"score": 17}
    with pytest.raises(ShapeError, match="kernel 1: .*negative offset"):  # 1 is taken, not read as 'not given'
        build_fcn(src, classes=3, verify=False, upscore_kernel=1)


# -- issue 15: `none` weights, random from the fillers; the shared mean and ignore-label spellings ------------

SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool2" top: "fc" inner_product_param { num_output: 8 } }
layer { name: "fc8" type: "InnerProduct" bottom: "fc" top: "fc8"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""


def test_fcn_with_none_weights_writes_seeded_random_weights_from_the_fillers(tmp_path, capsys):
    proto = tmp_path / "small.prototxt"
    proto.write_text(SMALL)
    out = tmp_path / "new" / "fcn.prototxt"
    argv = ["surgery", "fcn", str(proto), "none", "--classes", "3", "-o", str(out), "--seed", "7"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    model = tmp_path / "new" / "fcn.caffemodel"
    assert model.is_file() and "random from the layers' fillers (seed 7)" in captured.out
    # The one classifier layer without a random filler is warned about (fc: no filler, constant 0).
    assert captured.err.splitlines() == [
        "warning: layer 'fc' starts at a constant filler (constant 0): every output of it is alike, so training "
        "from scratch cannot tell its channels apart; give it a random weight_filler (gaussian, xavier, msra) in "
        "the classifier prototxt"]
    arrays = io.read_caffemodel(model).arrays()
    assert set(arrays) == {"conv1", "conv2", "fc", "score_fr", "upscore"}
    assert 0.05 < arrays["conv1"][0].std() < 0.2 and arrays["score_fr"][0].std() > 0  # gaussian 0.1, msra
    assert not arrays["fc"][0].any()
    k = arrays["upscore"][0].shape[-1]
    assert np.array_equal(arrays["upscore"][0], surgery.bilinear_weights((3, 1, k, k), "caffe"))
    net = Net(str(out), str(model), TEST)
    assert net.missing_weights == [] and net.forward(data=np.ones((1, 3, 32, 32), np.float32))["score"].shape \
        == (1, 3, 32, 32)
    # Seeded: the same seed gives the same bytes, another seed other weights.
    first = model.read_bytes()
    assert main(argv) == 0 and model.read_bytes() == first
    assert main(argv[:-1] + ["8"]) == 0 and model.read_bytes() != first
    capsys.readouterr()


def test_fcn_mean_and_ignore_label_spellings(tmp_path, capsys):
    proto = tmp_path / "small.prototxt"
    proto.write_text(SMALL)
    mean = tmp_path / "mean.binaryproto"
    io.write_binaryproto(mean, np.zeros((1, 3, 32, 32), np.float32))
    base = ["surgery", "fcn", str(proto), "--classes", "3", "-o", str(tmp_path / "f.prototxt"), "--no-verify"]

    def data_layer(*extra):
        assert main(base + list(extra)) == 0, capsys.readouterr().err
        tv = io.read_net(tmp_path / "f_train_val.prototxt")
        loss = [l for l in tv.layer if l.type == "SoftmaxWithLoss"][0]
        return [l for l in tv.layer if l.name == "data"][0].transform_param, loss.loss_param

    for spelling in ("--mean", "--mean-file"):
        tp, _ = data_layer(spelling, str(mean))
        assert tp.mean_file == str(mean) and not tp.mean_value
    tp, _ = data_layer("--mean-value", "104,117,123")
    assert list(tp.mean_value) == [104, 117, 123] and not tp.mean_file
    for none in (["--mean", "none"], ["--no-mean"]):
        tp, _ = data_layer(*none)
        assert not tp.mean_file and not tp.mean_value
    for value, has, label in (("none", False, 0), ("-1", False, 0), ("3", True, 3)):
        _, lp = data_layer("--ignore-label", value)
        assert lp.HasField("ignore_label") == has and lp.ignore_label == label
    assert main(base + ["--mean-value", "1,2"]) == 1
    assert "--mean-value gives 2 values but 'data' has 3 channels" in capsys.readouterr().err
    assert main(base + ["--mean", str(mean), "--mean-value", "1"]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(base + ["--mean", str(proto)]) == 1
    assert "this is a text file (a prototxt?), not a binaryproto" in capsys.readouterr().err


def test_dataset_trains_with_the_surgery_train_val_net_unedited(tmp_path, capsys, monkeypatch):
    """`caffeish dataset segmentation` -> `caffeish surgery fcn --dataset` -> `caffeish train`: the
    train/val net trains as written (Data layers on the dataset, its mean, SoftmaxWithLoss with
    ignore_label, Accuracy at TEST), and the trained weights serve the deploy net."""
    ds = seg_dataset(tmp_path, [(12, 16)] * 4)
    out = tmp_path / "out"
    src, weights = golden("alexnet_tiny", "net.prototxt"), golden("alexnet_tiny", "weights.caffemodel")
    assert main(["surgery", "fcn", str(src), str(weights), "--classes", "3", "-o", str(out / "fcn.prototxt"),
                 str(out / "fcn.caffemodel"), "--dataset", str(ds), "--no-verify"]) == 0
    train_val = out / "fcn_train_val.prototxt"
    before = train_val.read_bytes()
    (out / "solver.prototxt").write_text(
        f'net: "{train_val}"\nbase_lr: 1e-6\nlr_policy: "fixed"\nmomentum: 0.9\nweight_decay: 0.0005\n'
        f'max_iter: 3\ndisplay: 1\ntest_iter: 2\ntest_interval: 3\nsnapshot_prefix: "{out}/snap"\n'
        f'random_seed: 5\n')
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--solver", str(out / "solver.prototxt"), "--weights", str(out / "fcn.caffemodel")]) == 0
    log = capsys.readouterr().err
    losses = [float(x) for x in re.findall(r"Iteration \d+ \(.*\), loss = (\S+)", log)]
    assert len(losses) == 3 and all(np.isfinite(losses)), log[-2000:]
    assert re.search(r"Iteration 3, Testing net \(#0\)", log) and "Test net output #0: accuracy = " in log
    assert train_val.read_bytes() == before  # used as written
    assert (out / "snap_iter_3.caffemodel").is_file() and (out / "snap_iter_3.solverstate").is_file()
    assert (out / "curves.csv").is_file() and (out / "curves.png").is_file()
    deploy = Net(str(out / "fcn.prototxt"), str(out / "snap_iter_3.caffemodel"), TEST)
    trained = io.read_caffemodel(str(out / "snap_iter_3.caffemodel"))
    assert "score_fr" in {layer.name for layer in trained.net.layer} and deploy.params["score_fr"][0].data.any()
