"""caffeish evaluate: `caffe test` on Data-layer nets, and segmentation metrics, against numpy."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

import caffeish
import caffeish.apps.evaluate
from caffeish.tools.cli import main
from caffeish.formats.datum import LmdbWriter, make_datum
from caffeish.formats.io import read_caffemodel
from caffeish.data.palette import pascal_palette
from caffeish.apps.dataset import build_classification, build_segmentation


def run_json(capsys, argv):
    assert main(argv + ["--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def softmax_loss_and_accuracy(x, label, w, b):
    scores = x.reshape(len(x), -1).astype(np.float64) @ w.T.astype(np.float64) + b
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(x)), label]).mean()
    return loss, np.mean(scores.argmax(axis=1) == label)


CLASSIFIER = """
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.01 mean_value: 100 mean_value: 120 }}
  data_param {{ source: "{source}" batch_size: 3 backend: LMDB }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  data_param {{ source: "/nonexistent/train_lmdb" batch_size: 64 backend: LMDB }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 0.5 }}
                         bias_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" loss_weight: 2 }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include {{ phase: TEST }} }}
"""


def test_caffe_test_means_equal_numpy(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 2, 2, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 7)
    with LmdbWriter(tmp_path / "db") as w:
        for i in range(7):
            w.put(b"%08d" % i, make_datum(x[i], labels[i]))
    net_path = tmp_path / "train_val.prototxt"
    net_path.write_text(CLASSIFIER.format(source=tmp_path / "db"))
    caffeish.Net(str(net_path), seed=1).save(str(tmp_path / "w.caffemodel"))
    w, b = read_caffemodel(str(tmp_path / "w.caffemodel")).arrays()["ip"]
    # three batches of 3 from 7 records: the third wraps around to records 0 and 1
    losses, accs = [], []
    for batch in ([0, 1, 2], [3, 4, 5], [6, 0, 1]):
        xb = (x[batch].astype(np.float32) - np.array([100, 120], np.float32).reshape(1, 2, 1, 1)) * np.float32(0.01)
        loss, acc = softmax_loss_and_accuracy(xb, labels[batch], w, b)
        losses.append(loss)
        accs.append(acc)
    out = run_json(capsys, ["evaluate", str(net_path), str(tmp_path / "w.caffemodel"), "--iterations", "3"])
    got = {r["output"]: r for r in out["rows"]}
    assert got["loss"]["mean"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert got["accuracy"]["mean"] == pytest.approx(np.mean(accs), rel=1e-6)
    assert got["loss"]["loss_weight"] == 2 and got["accuracy"]["loss_weight"] == 0
    assert out["loss"] == pytest.approx(2 * np.mean(losses), rel=1e-5)
    assert main(["evaluate", str(net_path), str(tmp_path / "w.caffemodel"), "--iterations", "3"]) == 0
    text = capsys.readouterr().out
    assert f"loss = {np.mean(losses):.6g} (* 2 = {2 * np.mean(losses):.6g} loss)" in text
    assert f"accuracy = {np.mean(accs):.6g}" in text


DIGITS_NET = """
layer { name: "train-data" type: "Data" top: "data" top: "label" data_param { batch_size: 2 }
        include { stage: "train" } }
layer { name: "val-data" type: "Data" top: "data" top: "label" data_param { batch_size: 2 }
        include { stage: "val" } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
        exclude { stage: "deploy" } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include { stage: "val" } }
"""


def test_a_digits_net_without_sources_reads_the_dataset_given(tmp_path, capsys):
    rng = np.random.default_rng(2)
    for cls in ("a", "b"):
        (tmp_path / "in" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).save(tmp_path / "in" / cls / f"{i}.png")
    build_classification(tmp_path / "in", tmp_path / "ds", val_fraction=0.5)
    net_path = tmp_path / "digits.prototxt"
    net_path.write_text(DIGITS_NET)
    with pytest.raises(caffeish.CaffeishError, match="--db"):
        caffeish.apps.evaluate.test_net(str(net_path), None)
    explicit = tmp_path / "explicit.prototxt"
    explicit.write_text(DIGITS_NET.replace("data_param {", f'data_param {{ backend: LMDB source: "{tmp_path}/ds/val_db"'))
    caffeish.Net(str(explicit), stages=["val"], seed=3).save(str(tmp_path / "w.caffemodel"))
    args = ["--iterations", "2"]
    a = run_json(capsys, ["evaluate", str(net_path), str(tmp_path / "w.caffemodel"), "--db", str(tmp_path / "ds")] + args)
    b = run_json(capsys, ["evaluate", str(explicit), str(tmp_path / "w.caffemodel"), "--stage", "val"] + args)
    assert a["rows"] == b["rows"] and {r["output"] for r in a["rows"]} == {"loss", "accuracy"}


SEG_NET = """
layer {{ name: "data" type: "Data" top: "data" include {{ phase: TEST }}
  transform_param {{ crop_size: 11 mean_value: 104 mean_value: 117 mean_value: 123 scale: 0.02 }}
  data_param {{ source: "{ds}/val_db/features" batch_size: 1 backend: LMDB }} }}
layer {{ name: "label" type: "Data" top: "label" include {{ phase: TEST }}
  transform_param {{ crop_size: 11 }}
  data_param {{ source: "{ds}/val_db/labels" batch_size: 1 backend: LMDB }} }}
layer {{ name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param {{ num_output: 4 kernel_size: 1 weight_filler {{ type: "gaussian" std: 1 }}
                       bias_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  loss_param {{ ignore_label: 255 }} }}
"""

DEPLOY = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 20 } } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 4 kernel_size: 1 } }
"""


def seg_dataset(tmp_path, n=6):
    rng = np.random.default_rng(5)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    pairs = {}
    for i in range(n):
        rgb = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
        classes = rng.integers(0, 4, (16, 20)).astype(np.uint8)
        classes[:3, :4] = 255
        Image.fromarray(rgb).save(tmp_path / "images" / f"p{i}.png")
        img = Image.fromarray(classes, "P")
        img.putpalette(pascal_palette(256).ravel().tolist())
        img.save(tmp_path / "labels" / f"p{i}.png")
        pairs[f"p{i}"] = (rgb, classes)
    build_segmentation(tmp_path / "images", tmp_path / "labels", tmp_path / "ds", val_fraction=0.5,
                       class_names=None)
    return pairs


def numpy_scores(items, w, b, mean, scale, crop=None, n=4):
    """score.py's numbers for a 1x1-convolution net, computed from the source images."""
    hist = np.zeros((n, n), np.int64)
    for rgb, classes in items:
        bgr = rgb[:, :, ::-1].astype(np.float32)
        if crop:
            (y, x, size) = crop
            bgr, classes = bgr[y:y + size, x:x + size], classes[y:y + size, x:x + size]
        feats = (bgr - np.array(mean, np.float32)) * np.float32(scale)
        scores = feats.reshape(-1, 3) @ w.reshape(n, 3).T + b
        pred = scores.argmax(axis=1)
        lab = classes.ravel().astype(np.int64)
        keep = lab < n
        hist += np.bincount(n * lab[keep] + pred[keep], minlength=n * n).reshape(n, n)
    diag = np.diag(hist)
    iu = diag / (hist.sum(1) + hist.sum(0) - diag)
    freq = hist.sum(1) / hist.sum()
    return hist, {"pixel_accuracy": diag.sum() / hist.sum(), "mean_accuracy": np.nanmean(diag / hist.sum(1)),
                  "mean_iu": np.nanmean(iu), "fwavacc": (freq[freq > 0] * iu[freq > 0]).sum(), "iu": iu}


def check_metrics(out, hist, want, confusion_path):
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iu", "fwavacc"):
        assert out[key] == pytest.approx(want[key], rel=1e-9), key
    np.testing.assert_allclose([c["iu"] for c in out["classes"]], want["iu"], rtol=1e-9)
    assert out["confusion"] == hist.tolist()
    with open(confusion_path, newline="") as f:
        rows = list(csv.reader(f))
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == hist.tolist()


def test_segmentation_metrics_equal_numpy_for_every_source(tmp_path, capsys):
    pairs = seg_dataset(tmp_path)
    ds = tmp_path / "ds"
    net_path = tmp_path / "seg.prototxt"
    net_path.write_text(SEG_NET.format(ds=ds))
    weights = str(tmp_path / "w.caffemodel")
    caffeish.Net(str(net_path), seed=4).save(weights)
    w, b = read_caffemodel(weights).arrays()["score"]
    val = [line.split()[1] for line in (ds / "val.txt").read_text().splitlines()]
    items = [pairs[p.rsplit("/", 1)[1][:-4]] for p in val]
    # the TEST crop of 16x20 to 11: offsets (2, 4)
    hist, want = numpy_scores(items, w, b, (104, 117, 123), 0.02, crop=(2, 4, 11))
    cm = tmp_path / "cm.csv"
    # 1. the net reads its own Data layers
    out = run_json(capsys, ["evaluate", "segmentation", str(net_path), weights, "--confusion", str(cm)])
    assert out["images"] == 3 and out["score"] == "score" and out["label"] == "label"
    assert [c["name"] for c in out["classes"]] == ["class0", "class1", "class2", "class3"]
    check_metrics(out, hist, want, cm)
    # 2. --db: the pairs are fed through the data layer's transform_param
    out = run_json(capsys, ["evaluate", "segmentation", str(net_path), weights, "--db", str(ds),
                            "--confusion", str(cm)])
    check_metrics(out, hist, want, cm)
    # 3. --images/--labels with a deploy net: whole images, 255 is not a class
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY)
    hist, want = numpy_scores(list(pairs.values()), w, b, (1, 2, 3), 0.5)
    out = run_json(capsys, ["evaluate", "segmentation", str(deploy), weights, "--images", str(tmp_path / "images"),
                            "--labels", str(tmp_path / "labels"), "--mean-value", "1,2,3", "--scale", "0.5",
                            "--confusion", str(cm)])
    assert out["images"] == 6 and out["ignored_pixels"] == 6 * 12
    check_metrics(out, hist, want, cm)


def test_segmentation_table_and_size_mismatch(tmp_path, capsys):
    seg_dataset(tmp_path, n=2)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY.replace("kernel_size: 1", "kernel_size: 3"))  # scores 2 pixels smaller
    caffeish.Net(str(deploy), seed=1).save(str(tmp_path / "w.caffemodel"))
    with pytest.raises(caffeish.CaffeishError, match="score blob is 14x18 but its label is 16x20"):
        caffeish.apps.evaluate.evaluate_segmentation(str(deploy), str(tmp_path / "w.caffemodel"),
                                                      db=str(tmp_path / "ds"))
    deploy.write_text(DEPLOY)
    caffeish.Net(str(deploy), seed=1).save(str(tmp_path / "w.caffemodel"))
    cm = tmp_path / "cm.csv"
    assert main(["evaluate", "segmentation", str(deploy), str(tmp_path / "w.caffemodel"), "--db",
                 str(tmp_path / "ds"), "--confusion", str(cm)]) == 0
    text = capsys.readouterr().out
    assert "mean accuracy / mean IU" in text and "frequency-weighted IU" in text and f"confusion matrix: {cm}" in text


def test_the_confusion_matrix_is_written_only_when_asked_for(tmp_path, capsys, monkeypatch):
    seg_dataset(tmp_path, n=2)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY)
    weights = str(tmp_path / "w.caffemodel")
    caffeish.Net(str(deploy), seed=1).save(weights)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["evaluate", "segmentation", str(deploy), weights, "--db", str(tmp_path / "ds")]
    for extra in ([], ["--confusion", "none"], ["--confusion", "NONE"]):  # 'none': what old scripts pass
        assert main(argv + extra) == 0
        out = capsys.readouterr().out
        assert "confusion matrix" not in out and "mean accuracy / mean IU" in out
        assert run_json(capsys, argv + extra)["confusion_csv"] is None
    assert os.listdir(work) == []
    # --confusion FILE: written (replaced when it exists), with the mode the umask gives
    (work / "cm.csv").write_text("old\n")
    old = os.umask(0o022)
    try:
        assert main(argv + ["--confusion", "cm.csv", "--format", "csv"]) == 0
    finally:
        os.umask(old)
    captured = capsys.readouterr()
    assert "confusion matrix: cm.csv" in captured.err  # not in the CSV on stdout
    assert next(csv.reader(open(work / "cm.csv")))[0] == "label \\ predicted"
    assert (work / "cm.csv").stat().st_mode & 0o777 == 0o644
    assert os.listdir(work) == ["cm.csv"]  # no temp files


def test_warns_when_the_score_blob_has_fewer_classes_than_the_dataset(tmp_path, capsys):
    pairs = seg_dataset(tmp_path)  # 4 classes (labels 0-3) and 255 borders
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY.replace("num_output: 4", "num_output: 3"))
    weights = str(tmp_path / "w.caffemodel")
    caffeish.Net(str(deploy), seed=1).save(weights)
    cm = str(tmp_path / "cm.csv")
    ds = tmp_path / "ds"
    assert main(["evaluate", "segmentation", str(deploy), weights, "--db", str(ds), "--confusion", cm]) == 0
    out = capsys.readouterr()
    assert (f"warning: the dataset has 4 classes ({ds}/dataset.json) but the score blob 'score' has 3 channels"
            in out.err)
    val = [line.split()[1].rsplit("/", 1)[1][:-4] for line in (ds / "val.txt").read_text().splitlines()]
    threes = sum(int((pairs[s][1] == 3).sum()) for s in val)
    border = 12 * len(val)  # the 255 blocks: the dataset's ignore label (dataset.json), the net has no loss layer
    assert (f"ignore label 255; {threes + border:,} pixels not scored ({threes:,} of them with labels 3, not "
            f"classes of the 3-channel score blob)") in out.out
    # folders without a dataset: the labels themselves show it
    assert main(["evaluate", "segmentation", str(deploy), weights, "--images", str(tmp_path / "images"),
                 "--labels", str(tmp_path / "labels"), "--ignore-label", "255", "--confusion", cm]) == 0
    out = capsys.readouterr()
    threes = sum(int((c == 3).sum()) for _, c in pairs.values())
    assert (f"warning: {threes:,} label pixels have values 3, which the score blob 'score' (3 channels) has no "
            f"class for; they are not scored" in out.err)
    assert f"({threes:,} of them with labels 3, not classes of the 3-channel score blob)" in out.out
    # a matching net says nothing
    deploy.write_text(DEPLOY)
    caffeish.Net(str(deploy), seed=1).save(weights)
    assert main(["evaluate", "segmentation", str(deploy), weights, "--db", str(ds), "--confusion", cm]) == 0
    assert "warning" not in capsys.readouterr().err
    # folders with no dataset and no ignore label: 255 is out of range, and the warning says what to pass
    assert main(["evaluate", "segmentation", str(deploy), weights, "--images", str(tmp_path / "images"),
                 "--labels", str(tmp_path / "labels"), "--confusion", cm]) == 0
    assert (f"warning: {12 * len(pairs)} label pixels have values 255, which the score blob 'score' (4 channels) "
            f"has no class for; they are not scored (if 255 marks borders, as in PASCAL VOC, say so with "
            f"--ignore-label 255)") in capsys.readouterr().err


def _digests(folder):
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_confusion_path_is_checked_against_every_input_before_evaluating(tmp_path, capsys, monkeypatch):
    seg_dataset(tmp_path, n=2)
    ds = tmp_path / "ds"
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY)
    weights = tmp_path / "w.caffemodel"
    caffeish.Net(str(deploy), seed=1).save(str(weights))
    train_val = tmp_path / "seg.prototxt"
    train_val.write_text(SEG_NET.format(ds=ds))
    (tmp_path / "colors.txt").write_text("0 0 0\n128 0 0\n0 128 0\n128 128 0\n")
    (tmp_path / "mean.binaryproto").write_bytes((ds / "mean.binaryproto").read_bytes())

    def evaluated(*args, **kwargs):
        raise AssertionError("evaluated before the confusion path was checked")

    real = caffeish.tools.evaluate.evaluate_segmentation

    monkeypatch.setattr(caffeish.tools.evaluate, "evaluate_segmentation", evaluated)
    db = ["--db", str(ds)]
    folders = ["--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels")]
    cases = [
        (deploy, db, f"--confusion {deploy}: refusing to overwrite an input file (NET {deploy})"),
        (weights, db, f"refusing to overwrite an input file (WEIGHTS {weights})"),
        (ds / "labels.txt", db, f"--confusion {ds}/labels.txt: lies inside the input folder --db {ds}"),
        (ds / "val_db" / "cm.csv", db, "lies inside the input folder --db"),
        (ds / "cm.csv", ["--db", str(ds / "val_db")], f"lies inside the input folder {ds} (the dataset of --db)"),
        (ds / "cm.csv", [], f"lies inside the input folder {ds} (the dataset layer 'data' reads)"),
        (tmp_path / "nodir" / "cm.csv", db, f"the folder {tmp_path}/nodir does not exist"),
        (ds, db, f"--confusion {ds}: is a folder"),
        (tmp_path / "images" / "cm.csv", folders, "lies inside the input folder --images"),
        (tmp_path / "colors.txt", folders + ["--color-map", str(tmp_path / "colors.txt")], "(--color-map "),
        (tmp_path / "mean.binaryproto", db + ["--mean-file", str(tmp_path / "mean.binaryproto")], "(--mean "),
        (tmp_path / "mean.binaryproto", db + ["--mean", str(tmp_path / "mean.binaryproto")], "(--mean "),
    ]
    before = _digests(tmp_path)
    for confusion, extra, message in cases:
        net = train_val if extra == [] else deploy
        assert main(["evaluate", "segmentation", str(net), str(weights), "--confusion", str(confusion)] + extra) == 1
        err = capsys.readouterr().err
        assert message in err and "(nothing was written)" in err and len(err.strip().splitlines()) == 1, err
    # Without --confusion nothing is written, wherever the current folder is (inside the dataset too).
    monkeypatch.chdir(ds)
    monkeypatch.setattr(caffeish.tools.evaluate, "evaluate_segmentation", real)
    assert main(["evaluate", "segmentation", str(deploy), str(weights)] + db) == 0
    assert _digests(tmp_path) == before  # nothing written, no temp file left


def test_count_error_names_the_users_label_blob_not_the_split(tmp_path, capsys):
    """A label blob read by both the loss and the accuracy goes through Caffe's automatic Split layer;
    messages name the blob the user wrote ('label'), not 'label_data_1_split_0'."""
    net = tmp_path / "dummy.prototxt"
    net.write_text("""
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 1 dim: 3 dim: 4 dim: 5 } shape { dim: 1 dim: 1 dim: 4 dim: 5 } } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "score" bottom: "label" top: "accuracy" }
""")
    argv = ["evaluate", "segmentation", str(net), "none", "--confusion", "none"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "cannot tell how many records the label blob 'label' has" in err and "split" not in err
    out = run_json(capsys, argv + ["--iterations", "2"])
    # zero data, zero labels, zero-filled weights: every pixel is class 0 and predicted 0
    assert out["label"] == "label" and out["images"] == 2 and out["confusion"] == [[40, 0], [0, 0]]


def test_deploy_net_fed_from_a_dataset_subtracts_its_mean(tmp_path, capsys):
    pairs = seg_dataset(tmp_path)
    ds = tmp_path / "ds"
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY)
    weights = str(tmp_path / "w.caffemodel")
    caffeish.Net(str(deploy), seed=1).save(weights)
    w, b = read_caffemodel(weights).arrays()["score"]
    val = [line.split()[1].rsplit("/", 1)[1][:-4] for line in (ds / "val.txt").read_text().splitlines()]
    items = [pairs[s] for s in val]
    train = [pairs[line.split()[1].rsplit("/", 1)[1][:-4]] for line in (ds / "train.txt").read_text().splitlines()]
    # The dataset's mean image: the train images' BGR mean, as H x W x C for numpy_scores.
    mean = np.mean([rgb[:, :, ::-1].astype(np.float64) for rgb, _ in train], axis=0).astype(np.float32)
    cm = tmp_path / "cm.csv"
    argv = ["evaluate", "segmentation", str(deploy), weights, "--db", str(ds), "--confusion", str(cm),
            "--format", "json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"note: subtracting the dataset's mean {ds}/mean.binaryproto" in captured.err
    assert "--mean none for no mean" in captured.err
    hist, want = numpy_scores(items, w, b, mean, 1.0)
    check_metrics(json.loads(captured.out), hist, want, cm)
    # --mean none (also spelled --mean-file none): the raw pixels, no note
    assert main(argv + ["--mean", "none"]) == 0
    captured = capsys.readouterr()
    assert "note:" not in captured.err
    hist, want = numpy_scores(items, w, b, (0, 0, 0), 1.0)
    check_metrics(json.loads(captured.out), hist, want, cm)
    # an explicit --mean-value (or --scale) replaces the default
    assert main(argv + ["--mean-value", "1,2,3", "--scale", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "note:" not in captured.err
    hist, want = numpy_scores(items, w, b, (1, 2, 3), 0.5)
    check_metrics(json.loads(captured.out), hist, want, cm)
    assert [c["name"] for c in json.loads(captured.out)["classes"]] == ["class0", "class1", "class2", "class3"]
    # --mean-value is read by preprocess.parse_values, as classify and segment read it
    for bad in ("1,x,3", ","):
        assert main(argv + ["--mean-value", bad]) == 1
        assert f"--mean-value: expected comma-separated numbers, got '{bad}'" in capsys.readouterr().err


# -- issue 15 ---------------------------------------------------------------------------------------------

FILLED = DEPLOY.replace("kernel_size: 1 }", 'kernel_size: 1 weight_filler { type: "gaussian" std: 1 } '
                                           'bias_filler { type: "gaussian" std: 0.5 } }')
ARGMAX = 'layer { name: "argmax" type: "ArgMax" bottom: "score" top: "classes" argmax_param { axis: 1 } }\n'


def test_an_argmax_output_is_scored_through_the_scores_it_reads(tmp_path, capsys):
    """A deploy net whose only output is an ArgMax over the channels (a label map, one channel): its
    argmax is that of the scores it reads, so those are scored; any other one-channel blob is refused."""
    pairs = seg_dataset(tmp_path)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(FILLED + ARGMAX)
    weights = str(tmp_path / "w.caffemodel")
    caffeish.Net(str(deploy), seed=4).save(weights)
    w, b = read_caffemodel(weights).arrays()["score"]
    cm = tmp_path / "cm.csv"
    argv = ["evaluate", "segmentation", str(deploy), weights, "--images", str(tmp_path / "images"), "--labels",
            str(tmp_path / "labels"), "--mean-value", "1,2,3", "--scale", "0.5", "--confusion", str(cm),
            "--ignore-label", "255", "--format", "json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert ("note: 'classes' is a label map (ArgMax 'argmax' over the channels): scoring the 4-channel blob "
            "'score' it reads, whose argmax it is") in captured.err
    assert "warning" not in captured.err
    out = json.loads(captured.out)
    assert out["score"] == "score" and len(out["classes"]) == 4
    hist, want = numpy_scores(list(pairs.values()), w, b, (1, 2, 3), 0.5)
    check_metrics(out, hist, want, cm)
    # --score naming the label map is walked back the same way
    assert main(argv + ["--score", "classes"]) == 0
    check_metrics(json.loads(capsys.readouterr().out), hist, want, cm)
    # a one-channel score blob: refused in one line, nothing written
    cm.unlink()
    deploy.write_text(FILLED.replace("num_output: 4", "num_output: 1"))
    caffeish.Net(str(deploy), seed=4).save(weights)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert ("the score blob 'score' has one channel (1x1x16x20): its argmax is class 0 at every pixel; pass "
            "--score BLOB naming the blob with one channel per class") in err
    assert len(err.strip().splitlines()) == 1 and not cm.exists()


TRAIN_VAL = """
layer {{ name: "data" type: "Data" top: "data" include {{ phase: TEST }}
  transform_param {{ mean_file: "{mean}" }}
  data_param {{ source: "val_db/features" batch_size: 1 backend: LMDB }} }}
layer {{ name: "label" type: "Data" top: "label" include {{ phase: TEST }}
  data_param {{ source: "val_db/labels" batch_size: 1 backend: LMDB }} }}
layer {{ name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param {{ num_output: 4 kernel_size: 1 weight_filler {{ type: "gaussian" std: 1 }}
                       bias_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  loss_param {{ ignore_label: 255 normalize: false }} }}
"""


def test_a_relative_mean_file_is_found_in_the_dataset_given_with_db(tmp_path, capsys, monkeypatch):
    """What `surgery fcn` writes without --dataset: sources and mean_file relative to where caffe runs.
    With --db the mean is the dataset's own mean.binaryproto, whatever the current folder."""
    pairs = seg_dataset(tmp_path)
    ds = tmp_path / "ds"
    (tmp_path / "nets").mkdir()
    net = tmp_path / "nets" / "train_val.prototxt"
    net.write_text(TRAIN_VAL.format(mean="mean.binaryproto"))
    weights = str(tmp_path / "nets" / "w.caffemodel")
    caffeish.Net(str(net), input_shapes={"data": (1, 3, 16, 20), "label": (1, 1, 16, 20)}, seed=2).save(weights)
    w, b = read_caffemodel(weights).arrays()["score"]
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    val = [line.split()[1].rsplit("/", 1)[1][:-4] for line in (ds / "val.txt").read_text().splitlines()]
    train = [pairs[line.split()[1].rsplit("/", 1)[1][:-4]] for line in (ds / "train.txt").read_text().splitlines()]
    mean = np.mean([rgb[:, :, ::-1].astype(np.float64) for rgb, _ in train], axis=0).astype(np.float32)
    hist, want = numpy_scores([pairs[s] for s in val], w, b, mean, 1.0)
    cm = tmp_path / "cm.csv"
    argv = ["evaluate", "segmentation", str(net), weights, "--db", str(ds), "--confusion", str(cm)]
    out = run_json(capsys, argv)
    check_metrics(out, hist, want, cm)
    # caffe test on the same net and dataset
    assert main(["evaluate", str(net), weights, "--db", str(ds), "--iterations", "2"]) == 0
    assert "loss = " in capsys.readouterr().out
    # beside the net, when the dataset has none of that name
    (tmp_path / "nets" / "other.binaryproto").write_bytes((ds / "mean.binaryproto").read_bytes())
    net.write_text(TRAIN_VAL.format(mean="other.binaryproto"))
    check_metrics(run_json(capsys, argv), hist, want, cm)
    # found nowhere: one line naming the places tried and what to pass
    net.write_text(TRAIN_VAL.format(mean="missing.binaryproto"))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert (f"layer 'data': transform_param mean_file 'missing.binaryproto' not found (looked for "
            f"{ds}/missing.binaryproto, {tmp_path}/nets/missing.binaryproto, {tmp_path}/work/missing.binaryproto); "
            f"pass --mean FILE (or --mean none)") in err and len(err.strip().splitlines()) == 1
    assert main(argv + ["--mean", str(ds / "mean.binaryproto")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(net), weights, "--db", str(ds), "--iterations", "1"]) == 1
    assert "give its full path in the net's transform_param" in capsys.readouterr().err


def test_ignore_label_none_and_its_old_spelling(tmp_path, capsys):
    seg_dataset(tmp_path, n=2)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(FILLED)
    weights = str(tmp_path / "w.caffemodel")
    caffeish.Net(str(deploy), seed=1).save(weights)
    argv = ["evaluate", "segmentation", str(deploy), weights, "--db", str(tmp_path / "ds")]
    default = run_json(capsys, argv)
    assert default["ignore_label"] == 255 and default["ignored_pixels"] == 12  # dataset.json's; one val image
    for spelling in ("none", "-1"):
        out = run_json(capsys, argv + ["--ignore-label", spelling])
        assert out["ignore_label"] is None and out["ignored_pixels"] == 12 and out["out_of_range_pixels"] == 12
    assert default["out_of_range_pixels"] == 0
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--ignore-label", "x"])
    assert exit_info.value.code == 2
    assert "argument --ignore-label: expected an integer or 'none', got 'x'" in capsys.readouterr().err
