"""caffeish.apps.curves: OUT/curves.csv and curves.png of a training run, and Caffe logs read into them."""
import json
import math
import os
import sys
import warnings

import numpy as np
import pytest
from conftest import SHARED, shared_path

from caffeish.apps import curves as curves_mod
from caffeish.apps.curves import Curves, parse_caffe_log, read_caffe_log, write_from_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(curves_mod, "_clock", c)
    return c


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def read(path):
    with open(path, "rb") as f:
        return f.read()


def check_png(path):
    from PIL import Image

    data = read(path)
    assert data.startswith(PNG_MAGIC)
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0
    return data


def only_files(folder):
    """The folder's entries (hidden temp files included)."""
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------- the CSV

TRAIN = [1.5, 1.25, 1.375, 1.125, 1.0, 0.875, 0.75, 0.8125, 0.625, 0.5, 0.4375]
EXPECTED_CSV = """\
iteration,lr,train_loss,train_top5,test_accuracy,test_loss,test1_accuracy,test1_loss,test1_iou
0,0.01,1.5,0.25,0.125,2.5,0.5,3.0,
1,0.01,1.25,0.25,,,,,
2,0.01,1.375,0.25,,,,,
3,0.01,1.125,0.25,,,,,
4,0.01,1.0,0.25,,,,,
5,0.005,0.875,0.25,0.375,2.0,0.5,3.0,0.3
6,0.005,0.75,0.25,,,,,
7,0.005,0.8125,0.25,,,,,
8,0.005,0.625,0.25,,,,,
9,0.005,0.5,0.25,,,,,
10,,0.4375,,0.625,1.5,0.5,3.0,0.3
"""


def synthetic(out_dir, **kw):
    """Train every iteration (lr after the loss, as Caffe logs it), tests every 5 on two test nets."""
    c = Curves(out_dir, **kw)
    for i, loss in enumerate(TRAIN):
        if i % 5 == 0:
            c.test(i, {"accuracy": 0.125 + 0.25 * (i // 5), "loss": 2.5 - 0.5 * (i // 5)})
            c.test(i, {"accuracy": 0.5, "loss": np.float32(3.0), **({"iou": np.float32(0.3)} if i else {})},
                   net_index=1)
        if i < 10:
            c.train(i, loss, outputs={"loss": loss, "top5": np.float32(0.25)})
            c.lr(i, 0.01 if i < 5 else 0.005)
        else:
            c.train(i, loss)  # Caffe's last display: the loss alone
    return c


def test_csv_columns_and_rows(tmp_path, clock, no_warnings):
    c = synthetic(tmp_path, png=False)
    assert c.columns == EXPECTED_CSV.splitlines()[0].split(",")
    c.flush()
    assert read(tmp_path / "curves.csv").decode() == EXPECTED_CSV
    assert only_files(tmp_path) == ["curves.csv"]
    assert c.series("lr") == (list(range(10)), [0.01] * 5 + [0.005] * 5)
    assert c.test_passes(1)[1] == {"iteration": 5, "outputs": {"accuracy": 0.5, "loss": 3.0,
                                                               "iou": float(np.float32(0.3))}}


def test_lr_given_with_train_and_rows_sorted(tmp_path, no_warnings):
    c = Curves(tmp_path, png=False)
    c.train(20, 1.0, lr=0.1)
    c.train(10, 2.0, lr=0.1)  # an earlier iteration seen late (a resumed run)
    c.train(20, 0.5)          # a value given again replaces the old one
    c.test(15, {"accuracy": 0.5})
    c.flush()
    assert read(tmp_path / "curves.csv").decode() == (
        "iteration,lr,train_loss,test_accuracy\n10,0.1,2.0,\n15,,,0.5\n20,0.1,0.5,\n")


def test_value_formats(tmp_path):
    c = Curves(tmp_path, png=False)
    c.train(0, np.float32(1.2146), outputs={"a": 1.2146, "b": float(np.float32(1.2146)), "c": 1 / 3,
                                            "d": np.float64(1e-7), "e": 7, "f": np.array([0.5, 2.0])})
    c.flush()
    header, row = read(tmp_path / "curves.csv").decode().splitlines()
    assert header == "iteration,lr,train_loss,train_a,train_b,train_c,train_d,train_e,train_f[0],train_f[1]"
    assert row == f"0,,1.2146,1.2146,1.2146,{1 / 3!r},1e-07,7.0,0.5,2.0"


def test_nan_and_inf_losses(tmp_path, clock, no_warnings):
    c = Curves(tmp_path, title="diverged")
    c.train(0, 1.0, lr=0.1)
    c.train(1, float("nan"), lr=0.1)
    c.train(2, np.float32("inf"), lr=0.1)
    c.train(3, float("-inf"))
    c.test(2, {"loss": float("nan"), "accuracy": 0.25})
    c.close()
    assert read(tmp_path / "curves.csv").decode() == (
        "iteration,lr,train_loss,test_loss,test_accuracy\n"
        "0,0.1,1.0,,\n1,0.1,nan,,\n2,0.1,inf,nan,0.25\n3,,-inf,,\n")
    check_png(tmp_path / "curves.png")


@pytest.mark.parametrize("fill", ["empty", "one_point", "train_only", "nan_only", "percent", "lr_zero"])
def test_png_edge_cases(tmp_path, clock, no_warnings, fill):
    c = Curves(tmp_path)
    if fill == "one_point":
        c.train(0, 2.0, lr=0.01)
        c.test(0, {"accuracy": 0.5, "loss": 2.5})
    elif fill == "train_only":
        for i in range(50):
            c.train(i, 3.0 / (i + 1))
    elif fill == "nan_only":
        c.train(0, float("nan"), lr=float("nan"))
        c.test(0, {"accuracy": float("nan")})
    elif fill == "percent":
        for i in range(0, 100, 10):
            c.train(i, 1.0, lr=0.1 * 0.5 ** i)
            c.test(i, {"accuracy": 10.0 * i / 10})
    elif fill == "lr_zero":
        for i in range(5):
            c.train(i, 1.0, lr=0.0 if i else 1.0)
    c.close()
    check_png(tmp_path / "curves.png")
    assert only_files(tmp_path) == ["curves.csv", "curves.png"]


def test_png_interval(tmp_path, clock, no_warnings):
    c = Curves(tmp_path, min_png_interval=5.0)
    c.train(0, 1.0, lr=0.1)
    c.flush()  # the first flush draws
    first = check_png(tmp_path / "curves.png")
    c.train(1, 0.5, lr=0.1)
    clock.now += 1
    c.flush()  # too soon: the CSV changes, the PNG does not
    assert read(tmp_path / "curves.png") == first
    assert read(tmp_path / "curves.csv").decode().endswith("1,0.1,0.5\n")
    c.flush(force=True)
    second = check_png(tmp_path / "curves.png")
    assert second != first
    c.train(2, 0.25)
    clock.now += 4.5
    c.flush()
    assert read(tmp_path / "curves.png") == second
    clock.now += 0.5  # 5 s after the forced one
    c.flush()
    third = check_png(tmp_path / "curves.png")
    assert third != second
    os.utime(tmp_path / "curves.png", ns=(0, 0))
    clock.now += 60
    c.flush()  # nothing new: not drawn again
    assert os.stat(tmp_path / "curves.png").st_mtime_ns == 0
    c.close()  # close always draws
    assert os.stat(tmp_path / "curves.png").st_mtime_ns != 0
    assert only_files(tmp_path) == ["curves.csv", "curves.png"]


def test_png_disabled(tmp_path):
    c = synthetic(tmp_path, png=False)
    c.close()
    assert only_files(tmp_path) == ["curves.csv"]


def test_thinned_for_the_plot_only(tmp_path, clock, no_warnings):
    c = Curves(tmp_path, max_points=2000)
    n = 10007
    for i in range(n):
        c.train(i, 1.0 / (i + 1), lr=0.01)
    x, y = c._plotted("train_loss")
    assert 1900 <= len(x) <= 2000 and x[0] == 0 and x[-1] == n - 1
    assert np.all(np.diff(x) > 0) and np.allclose(y, 1.0 / (x + 1))
    c.close()
    lines = read(tmp_path / "curves.csv").decode().splitlines()
    assert len(lines) == n + 1 and lines[-1] == f"{n - 1},0.01,{1.0 / n!r}"
    check_png(tmp_path / "curves.png")


# ---------------------------------------------------------------------------- atomic writes


def test_csv_write_is_atomic(tmp_path, clock, monkeypatch):
    c = synthetic(tmp_path, png=False)
    c.flush()
    old = read(tmp_path / "curves.csv")
    for i in range(11, 200):
        c.train(i, 0.125, lr=0.001)
    calls = []
    real = curves_mod.format_value

    def failing(value, is_float32=False):
        calls.append(value)
        if len(calls) > 300:
            raise RuntimeError("killed mid-write")
        return real(value, is_float32)

    monkeypatch.setattr(curves_mod, "format_value", failing)
    monkeypatch.setattr(curves_mod, "_ROWS_PER_WRITE", 8)  # part of the new file was written first
    with pytest.raises(RuntimeError, match="killed mid-write"):
        c.flush()
    assert read(tmp_path / "curves.csv") == old
    assert only_files(tmp_path) == ["curves.csv"]  # no temp file left beside it
    monkeypatch.setattr(curves_mod, "format_value", real)
    c.flush()
    new = read(tmp_path / "curves.csv").decode().splitlines()
    assert len(new) == 201 and new[-1] == "199,0.001,0.125,,,,,,"


def test_png_write_is_atomic_and_never_raises(tmp_path, clock, monkeypatch):
    from matplotlib.figure import Figure

    c = synthetic(tmp_path)
    c.flush()
    old = check_png(tmp_path / "curves.png")
    c.train(11, 0.25)

    def broken_savefig(self, f, **kw):
        f.write(PNG_MAGIC + b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.warns(RuntimeWarning, match="curves.png.*not drawn"):
        c.flush(force=True)
    assert read(tmp_path / "curves.png") == old
    assert read(tmp_path / "curves.csv").decode().endswith("11,,0.25,,,,,,\n")
    assert only_files(tmp_path) == ["curves.csv", "curves.png"]


def test_without_matplotlib(tmp_path, clock, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    c = synthetic(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        c.flush(force=True)
        c.train(11, 0.25)
        c.close()
    assert [(w.category, "matplotlib is not installed" in str(w.message)) for w in record] == [(RuntimeWarning, True)]
    assert read(tmp_path / "curves.csv").decode().endswith("11,,0.25,,,,,,\n")
    assert only_files(tmp_path) == ["curves.csv"]


def test_backend_left_alone(tmp_path, clock, no_warnings):
    import matplotlib

    backend = dict.__getitem__(matplotlib.rcParams, "backend")
    had_pyplot = "matplotlib.pyplot" in sys.modules
    synthetic(tmp_path, title="t").close()
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


def test_no_out_dir():
    c = Curves(None)
    c.train(0, 1.0)
    with pytest.raises(ValueError, match="no output folder"):
        c.flush()


# ---------------------------------------------------------------------------- Caffe logs

PLAIN_LOG = """\
Solving plain_net
Learning Rate Policy: step
Iteration 0, Testing net (#0)
Test loss: 2.5
    Test net output #0: accuracy = 0.25
    Test net output #1: loss = 2.5 (* 1 = 2.5 loss)
Iteration 0, Testing net (#1)
    Test net output #0: per_class = 0.5
    Test net output #1: per_class = 0.75
Iteration 0, loss = 2.25
    Train net output #0: loss = 2.25 (* 1 = 2.25 loss)
    Train net output #1: top5 = 1e-05
Iteration 0, lr = 0.1
this line means nothing
Iteration 10 (12.5 iter/s, 0.8s/10 iters), loss = nan
Restarting data prefetching from start.
    Train net output #0: loss = -nan (* 1 = -nan loss)
    Train net output #1: top5 = inf
Iteration 10, lr = 1e-05
MultiStep Status: Iteration 10, step = 1
Snapshotting to binary proto file snapshots/x_iter_20.caffemodel
Iteration 20, loss = 1.5
Iteration 20, Testing net (#0)
    Test net output #0: accuracy = 0.5
    Test net output #1: loss = 1.75 (* 1 = 1.75 loss)
Optimization Done.
"""

PLAIN_CSV = """\
iteration,lr,train_loss,train_top5,test_total_loss,test_accuracy,test_loss,test1_per_class[0],test1_per_class[1]
0,0.1,2.25,1e-05,2.5,0.25,2.5,0.5,0.75
10,1e-05,nan,inf,,,,,
20,,1.5,,,0.5,1.75,,
"""


def test_log_without_glog_prefixes(tmp_path, no_warnings):
    c = write_from_log_lines(PLAIN_LOG.splitlines(), tmp_path)
    assert c.title == "plain_net"
    assert read(tmp_path / "curves.csv").decode() == PLAIN_CSV
    # the same lines with glog prefixes (and as bytes) give the same curves
    prefixed = [f"I20261204 15:59:34.{i:06d} 26477 solver.cpp:{200 + i}] {line}".encode()
                for i, line in enumerate(PLAIN_LOG.splitlines())]
    c2 = read_caffe_log(prefixed)
    assert c2.title == "plain_net" and list(map(repr, c2.rows())) == list(map(repr, c.rows()))


def write_from_log_lines(lines, out_dir):
    c = Curves(out_dir, png=False)
    read_caffe_log(lines, c)
    c.close()
    return c


def test_parse_events():
    events = list(parse_caffe_log(PLAIN_LOG.splitlines()))
    assert events[0] == ("solving", {"name": "plain_net"})
    assert events[1] == ("test", {"iteration": 0, "net_index": 0,
                                  "outputs": {"total_loss": 2.5, "accuracy": 0.25, "loss": 2.5}})
    assert events[3] == ("train", {"iteration": 0, "loss": 2.25, "outputs": {"loss": 2.25, "top5": 1e-05}})
    assert [e[0] for e in events] == ["solving", "test", "test", "train", "lr", "train", "lr", "train", "test"]


def solver_cases():
    root = SHARED / "golden_train" / "solver"
    found = sorted(p.name for p in root.iterdir() if (p / "caffe.log").is_file()) if root.is_dir() else []
    return sorted(set(found) | {"sgd_step_cls"})


@pytest.mark.parametrize("case", solver_cases())
def test_real_caffe_log(tmp_path, clock, no_warnings, case):
    folder = shared_path("golden_train", "solver", case)
    with open(folder / "expected.json") as f:
        expected = json.load(f)
    c = write_from_log(folder / "caffe.log", tmp_path)
    assert c.series("train_loss") == (expected["loss_iterations"], expected["loss"])
    assert c.series("lr") == (expected["lr_iterations"], expected["lr"])
    assert c.test_passes(0) == expected["tests"]
    assert c.title  # the net's name, from "Solving <name>"
    check_png(tmp_path / "curves.png")
    lines = read(tmp_path / "curves.csv").decode().splitlines()
    assert lines[0].startswith("iteration,lr,train_loss")
    losses = {int(r.split(",")[0]): r.split(",")[2] for r in lines[1:]}
    assert [float(losses[i]) for i in expected["loss_iterations"]] == expected["loss"]
    assert all(math.isfinite(v) for v in expected["loss"])


# -- reading curves.csv back (a resumed run, the web app's live curves) ---------------------------------------
def test_read_csv_gives_back_the_same_file(tmp_path, clock, no_warnings):
    c = synthetic(tmp_path, png=False)
    c.test(3, {"total_loss": 1 / 3, "f": np.array([0.5, 2.0])}, net_index=2)
    c.flush()
    again = curves_mod.read_csv(tmp_path / "curves.csv")
    assert again.columns == c.columns
    out = tmp_path / "again"
    again.out_dir = str(out)
    again.flush()
    assert read(out / "curves.csv") == read(tmp_path / "curves.csv")
    for a, b in zip(again.test_passes(1), c.test_passes(1)):  # a float32 value comes back as its shortest text
        assert a["iteration"] == b["iteration"] and a["outputs"] == pytest.approx(b["outputs"], rel=1e-7)
    assert again.series("lr") == c.series("lr")


def test_read_csv_before_keeps_the_earlier_rows_only(tmp_path, clock, no_warnings):
    c = synthetic(tmp_path, png=False)
    c.flush()
    part = curves_mod.read_csv(tmp_path / "curves.csv", before=5)
    assert part.series("lr") == ([0, 1, 2, 3, 4], [0.01] * 5)
    assert curves_mod.read_csv(tmp_path / "missing.csv").columns == ["iteration", "lr", "train_loss"]


@pytest.mark.parametrize("text", ["a,b,c\n1,2,3\n", "iteration,lr,train_loss\nx,1,2\n",
                                  "iteration,lr,train_loss\n1,abc,2\n"])
def test_read_csv_refuses_another_file_in_one_line(tmp_path, text):
    from caffeish.errors import CaffeishError

    (tmp_path / "curves.csv").write_text(text)
    with pytest.raises(CaffeishError, match="curves.csv") as e:
        curves_mod.read_csv(tmp_path / "curves.csv")
    assert "\n" not in str(e.value)


def test_png_bytes(tmp_path, clock, no_warnings):
    c = synthetic(tmp_path, png=False)
    assert c.png_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
