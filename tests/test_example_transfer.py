"""examples/transfer_learning: `run.py --quick` goes through every stage (world, both datasets,
classifier pretraining, surgery fcn twice, both trainings, evaluation, plots) and writes its outputs."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "examples", "transfer_learning", "run.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _caffeish_available():
    import shutil

    return os.path.isfile(os.path.join(os.path.dirname(sys.executable), "caffeish")) or shutil.which("caffeish")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if not _caffeish_available():
        pytest.skip("the caffeish command is not installed (pip install -e .)")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("transfer") / "out"
    proc = subprocess.run([sys.executable, RUN, "--out", str(out), "--quick"], capture_output=True, text=True,
                          check=False, timeout=180, cwd=str(out.parent))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _png(path):
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path


def test_every_stage_wrote_its_outputs(quick_run):
    out, _ = quick_run
    for k, name in enumerate(("sky", "road", "building", "car", "pedestrian")):
        assert os.listdir(out / "world" / "crops" / f"{k}_{name}")
    for split in ("train", "val"):
        assert os.listdir(out / "world" / split / "images") and os.listdir(out / "world" / split / "labels")
    for ds in ("street", "crops"):
        meta = json.loads((out / "datasets" / ds / "dataset.json").read_text())
        assert meta["type"] == ("segmentation" if ds == "street" else "classification")
        for db in ("train_db", "val_db"):
            assert os.path.isdir(out / "datasets" / ds / db)
    assert os.path.isfile(out / "classifier" / "classifier.deploy.prototxt")
    assert os.path.isfile(out / "classifier" / "snapshots" / "classifier_iter_20.caffemodel")
    _png(out / "classifier" / "curves.png")
    for key in ("scratch", "transfer"):
        folder = out / f"fcn_{key}"
        for name in ("fcn.deploy.prototxt", "fcn.train_val.prototxt", "fcn.caffemodel", "curves.csv"):
            assert os.path.isfile(folder / name), folder / name
        assert os.path.getsize(folder / "snapshots" / "fcn_iter_20.caffemodel") > 0
        _png(folder / "curves.png")
        header = (folder / "curves.csv").read_text().splitlines()[0].split(",")
        assert {"iteration", "train_loss", "test_accuracy"} <= set(header)
        assert os.path.isfile(folder / "segment" / "scene_00008.png")
    _png(out / "comparison.png")
    _png(out / "examples.png")
    assert "| (a) from scratch |" in (out / "results.md").read_text()


def test_results_json(quick_run):
    out, stdout = quick_run
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["classifier"]["val_accuracy"] <= 1
    for key in ("scratch", "transfer"):
        r = results["runs"][key]
        assert r["iterations"] == 20
        for when in (r, r["initial"], r["after"]):
            for metric in ("pixel_accuracy", "mean_iu"):
                assert 0 <= when[metric] <= 1, (key, metric, when[metric])
        assert os.path.isfile(out / r["weights"])
    assert results["solver"]["iterations"] == 20
    # the train/val nets are surgery's, unedited: both runs train the same net with the same solver
    a = (out / "fcn_scratch" / "fcn.train_val.prototxt").read_text()
    b = (out / "fcn_transfer" / "fcn.train_val.prototxt").read_text()
    assert a == b
    assert "| (b) transfer learning |" in stdout
