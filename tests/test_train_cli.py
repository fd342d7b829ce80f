"""`caffeish train` (tools/train.py, caffeish.apps.train) against ../shared/caffe/training.md sections 12
and 14: flags, the solver file's rewrites, errors, the log, the curves, signals and resuming.

In-process through caffeish.tools.cli.main where possible; signals go to a subprocess
(`python -m caffeish.tools.cli train ...`).  Nets are tiny (a few floats per batch).
"""
import csv
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import caffeish
from caffeish.apps import train
from caffeish.apps.curves import read_caffe_log
from caffeish.errors import CaffeishError
from caffeish.formats.datum import LmdbWriter, make_datum
from caffeish.formats.io import parse_text
from caffeish.formats.schema import TRAIN, pb
from caffeish.runtime.solver import Solver, read_state
from caffeish.tools.cli import main

f64 = np.float64
GLOG = re.compile(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")

XS = np.array([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7], [-2.0, 0.1, 0.4], [0.9, 0.9, -1.2], [0.0, -0.6, 1.1],
               [1.2, -2.2, 0.3]], np.float32)
YS = np.array([1, 0, 1, 0, 1, 0])
W = np.array([[0.3, -0.2, 0.5], [-0.4, 0.6, 0.1]], np.float32)
B = np.array([0.05, -0.1], np.float32)


def write_db(path, xs, ys):
    with LmdbWriter(str(path)) as w:
        for i, (x, y) in enumerate(zip(xs, ys)):
            w.put(b"%08d" % i, make_datum(np.asarray(x, np.float32).reshape(3, 1, 1), label=int(y)))
    return str(path)


def dummy_net(name="tiny", num_output=2, extra=""):
    return f"""name: "{name}"
layer {{ name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param {{ shape {{ dim: 4 dim: 3 }} shape {{ dim: 4 }}
    data_filler {{ type: "gaussian" std: 1 }} data_filler {{ type: "constant" value: 1 }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: {num_output} weight_filler {{ type: "gaussian" std: 0.5 }}
                         bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
{extra}"""


def data_net():
    return """name: "datanet"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "train_db" batch_size: 2 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  data_param { source: "train_db" batch_size: 3 backend: LMDB } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include { phase: TEST } }
"""


def setup(folder, solver_text, net_text=None, solver_name="solver.prototxt"):
    """net.prototxt and a solver file in `folder` (the cwd of the run: paths are relative)."""
    (folder / "net.prototxt").write_text(dummy_net() if net_text is None else net_text)
    path = folder / solver_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'net: "net.prototxt"\n{solver_text}\n')
    return str(path.relative_to(folder))


def save_weights(path, w=W, b=B):
    net = caffeish.Net(parse_text(dummy_net(), pb.NetParameter()), phase=TRAIN)
    net.params["ip"][0].data[...] = w
    net.params["ip"][1].data[...] = b
    net.save(str(path))
    return str(path)


def softmax_loss(x, y, w=W, b=B):
    z = np.asarray(x, f64) @ np.asarray(w, f64).T + np.asarray(b, f64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), np.asarray(y, int)].mean())


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert all(len(r) == len(header) for r in body)
    return [dict(zip(header, r)) for r in body]


def model_layers(path):
    m = pb.NetParameter()
    with open(path, "rb") as f:
        m.ParseFromString(f.read())
    return {l.name: l for l in m.layer}


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_main(capsys, *argv):
    rc = main(["train", *argv])
    out, err = capsys.readouterr()
    return rc, err


def one_line_error(err):
    lines = [l for l in err.splitlines() if not GLOG.match(l) and l.strip()]
    errors = [l for l in lines if l.startswith("caffeish train: error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


# -- argument errors ---------------------------------------------------------------------------------------
def test_weights_with_snapshot_is_a_usage_error(cwd, capsys):
    solver = setup(cwd, 'lr_policy: "fixed" max_iter: 1')
    with pytest.raises(SystemExit) as e:
        main(["train", "--solver", solver, "--weights", "a.caffemodel", "--snapshot", "b.solverstate"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: caffeish train")
    assert "--weights" in err and "--snapshot" in err
    assert not list(cwd.glob("*_iter_*"))


def test_prepare_refuses_weights_with_snapshot(cwd):
    solver = setup(cwd, 'lr_policy: "fixed" max_iter: 1')
    with pytest.raises(CaffeishError, match="--weights.*--snapshot"):
        train.prepare(solver, weights="a.caffemodel", snapshot="b.solverstate")


@pytest.mark.parametrize("flag,name", [("--weights", "missing.caffemodel"), ("--snapshot", "missing.solverstate"),
                                       ("--solver", "missing.prototxt")])
def test_a_missing_file_is_a_one_line_error(cwd, capsys, flag, name):
    solver = setup(cwd, 'lr_policy: "fixed" max_iter: 1')
    argv = ["--solver", solver] if flag != "--solver" else []
    rc, err = run_main(capsys, *argv, flag, name)
    assert rc == 1
    assert name in one_line_error(err)
    assert not list(cwd.glob("*_iter_*"))


def test_a_missing_weights_file_in_a_comma_list_is_named(cwd, capsys):
    solver = setup(cwd, 'lr_policy: "fixed" max_iter: 1')
    good = save_weights(cwd / "good.caffemodel")
    rc, err = run_main(capsys, "--solver", solver, "--weights", f"{good},nope.caffemodel")
    assert rc == 1 and "nope.caffemodel" in one_line_error(err)


def test_a_solver_caffe_refuses_is_a_one_line_error_before_training(cwd, capsys):
    solver = setup(cwd, 'lr_policy: "step" stepsize: 0 max_iter: 3')
    rc, err = run_main(capsys, "--solver", solver)
    assert rc == 1 and "stepsize" in one_line_error(err)
    assert "Iteration" not in err


# -- the solver file's rewrites (12, 14) -------------------------------------------------------------------
def test_rewrite_prefix():
    p = pb.SolverParameter()
    train.rewrite_prefix(p, "models/run/solver.prototxt")
    assert p.snapshot_prefix == "models/run/solver"
    p = pb.SolverParameter(snapshot_prefix="snaps/given")
    train.rewrite_prefix(p, "solver.prototxt")
    assert p.snapshot_prefix == "snaps/given"


def test_unset_prefix_becomes_the_solver_path_without_extension(cwd, capsys):
    solver = setup(cwd, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 2', solver_name="sub/my_solver.prototxt")
    rc, err = run_main(capsys, "--solver", solver, "--no-curves")
    assert rc == 0, err
    assert sorted(os.listdir(cwd / "sub")) == ["my_solver.prototxt", "my_solver_iter_2.caffemodel",
                                               "my_solver_iter_2.solverstate"]


def test_an_existing_directory_prefix_becomes_dir_slash_solver_stem(cwd, capsys):
    (cwd / "snaps").mkdir()
    solver = setup(cwd, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 2 snapshot_prefix: "snaps"',
                   solver_name="lenet_solver.prototxt")
    rc, err = run_main(capsys, "--solver", solver, "--no-curves")
    assert rc == 0, err
    assert sorted(os.listdir(cwd / "snaps")) == ["lenet_solver_iter_2.caffemodel", "lenet_solver_iter_2.solverstate"]
    assert train.prepare(solver).snapshot_prefix == os.path.join("snaps", "lenet_solver")


LEVEL_NET = dummy_net(extra="""
layer { name: "lvl2" type: "Power" bottom: "data" top: "p2" include { min_level: 2 } }
layer { name: "stage_x" type: "Power" bottom: "data" top: "px" include { stage: "x" } }
layer { name: "stage_y" type: "Power" bottom: "data" top: "py" include { stage: "y" } }
layer { name: "stage_empty" type: "Power" bottom: "data" top: "pe" include { stage: "" } }
layer { name: "lvl3" type: "Power" bottom: "data" top: "p3" include { min_level: 3 } }
""")
EXTRA = {"lvl2", "stage_x", "stage_y", "stage_empty", "lvl3"}


def test_level_and_stage_reach_the_train_net_only(cwd, capsys):
    solver = setup(cwd, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 1 snapshot_prefix: "m" test_iter: 1 '
                        'test_interval: 10 train_state { level: 3 }', LEVEL_NET)
    rc, err = run_main(capsys, "--solver", solver, "--level", "2", "--stage", "x,y", "--no-curves")
    assert rc == 0, err
    # the snapshot holds every train layer: level 2 (replacing the file's 3), stages x and y
    assert set(model_layers(cwd / "m_iter_1.caffemodel")) & EXTRA == {"lvl2", "stage_x", "stage_y"}
    s = train.run(solver, level=2, stages=["x", "y"], curves=False, log=lambda m, w: None)
    assert set(s.net._layer_names) & EXTRA == {"lvl2", "stage_x", "stage_y"}
    assert set(s.test_nets[0]._layer_names) & EXTRA == set()  # test nets are unaffected
    param = train.prepare(solver, level=2, stages=["x,y", " z"])
    assert param.train_state.level == 2 and list(param.train_state.stage) == ["x", "y", "z"]
    assert len(param.test_state) == 0


def test_level_is_always_set_and_an_empty_stage_appends_the_empty_stage(cwd, capsys):
    solver = setup(cwd, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 1 snapshot_prefix: "m" '
                        'train_state { level: 3 }', LEVEL_NET)
    rc, err = run_main(capsys, "--solver", solver, "--stage", "", "--no-curves")
    assert rc == 0, err
    assert set(model_layers(cwd / "m_iter_1.caffemodel")) & EXTRA == {"stage_empty"}  # level 0, not 3


def test_weights_replace_the_solvers_and_load_into_train_and_test_nets(cwd, capsys):
    a = save_weights(cwd / "a.caffemodel", w=np.full((2, 3), 5, np.float32), b=np.full(2, 5, np.float32))
    b = save_weights(cwd / "b.caffemodel")
    solver = setup(cwd, f'lr_policy: "fixed" base_lr: 0 max_iter: 1 weights: "{a}" test_iter: 1 test_interval: 5 '
                        f'snapshot_after_train: false')
    param = train.prepare(solver, weights=b)
    assert list(param.weights) == [b]
    s = train.run(solver, weights=b, curves=False, log=lambda m, w: None)
    for net in (s.net, s.test_nets[0]):
        assert np.array_equal(net.params["ip"][0].data, W) and np.array_equal(net.params["ip"][1].data, B)
    assert list(train.prepare(solver).weights) == [a]


def test_device_for():
    assert train.device_for(pb.SolverParameter(), None) is None
    assert train.device_for(pb.SolverParameter(), 1) == "cuda:1"
    assert train.device_for(pb.SolverParameter(solver_mode=pb.SolverParameter.CPU), None) is None
    assert train.device_for(pb.SolverParameter(solver_mode=pb.SolverParameter.GPU, device_id=2), None) == "cuda:2"


def test_solver_mode_gpu_without_a_gpu_trains_on_the_cpu_with_a_warning(cwd, capsys, monkeypatch):
    """BVLC's and DIGITS' solvers say solver_mode: GPU; without one the file still trains (as pycaffe's
    set_mode_gpu() does), while an explicit --gpu is an error."""
    from caffeish.runtime import backend

    monkeypatch.setattr(backend, "gpu_unavailable_reason", lambda: "no GPU here")
    solver = setup(cwd, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 2 solver_mode: GPU snapshot_prefix: "s"')
    rc, err = run_main(capsys, "--solver", solver, "--no-curves")
    assert rc == 0, err
    assert "warning: the solver asks for solver_mode: GPU, but no GPU here; training on the CPU" in err
    assert "Use CPU." in err and os.path.isfile(cwd / "s_iter_2.caffemodel")
    rc, err = run_main(capsys, "--solver", solver, "--no-curves", "--gpu")
    assert rc == 1 and one_line_error(err) == "caffeish train: error: cannot train on the GPU: no GPU here"


# -- the log and the curves ----------------------------------------------------------------------------
def test_log_lines_have_glog_prefixes_and_parse_to_the_solvers_losses(cwd, capsys):
    write_db(cwd / "train_db", XS, YS)
    weights = save_weights(cwd / "w.caffemodel")
    solver = setup(cwd, 'lr_policy: "fixed" base_lr: 0 max_iter: 6 display: 1 test_iter: 1 test_interval: 3 '
                        'snapshot_prefix: "snaps/run"', data_net())
    (cwd / "snaps").mkdir()
    rc, err = run_main(capsys, "--solver", solver, "--weights", weights)
    assert rc == 0, err
    lines = err.splitlines()
    for line in lines:
        if re.search(r"Iteration \d+|Test net output|Train net output|Snapshotting|Optimization Done", line):
            assert GLOG.match(line), line
    # the weights are fixed (lr 0): the batch at iteration k is records 2k, 2k+1 (mod 6)
    losses = [softmax_loss(XS[[(2 * k) % 6, (2 * k + 1) % 6]], YS[[(2 * k) % 6, (2 * k + 1) % 6]]) for k in range(7)]
    curves = read_caffe_log(err.splitlines())
    iters, logged = curves.series("train_loss")
    assert iters == list(range(7))  # 0..5 and Solve's final display forward at 6
    np.testing.assert_allclose(logged, losses, rtol=2e-5)
    rows = read_csv(cwd / "snaps" / "curves.csv")
    csv_losses = [(int(r["iteration"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
    assert [i for i, _ in csv_losses] == iters
    np.testing.assert_allclose([v for _, v in csv_losses], logged, rtol=1e-5)  # the log is the solver's loss
    tests = curves.test_passes()
    assert [t["iteration"] for t in tests] == [0, 3, 6]
    test_losses = [softmax_loss(XS[[(3 * p + k) % 6 for k in range(3)]], YS[[(3 * p + k) % 6 for k in range(3)]])
                   for p in range(3)]
    np.testing.assert_allclose([t["outputs"]["loss"] for t in tests], test_losses, rtol=2e-5)
    assert os.path.getsize(cwd / "snaps" / "curves.png") > 0


def test_curves_go_to_out_and_no_curves_writes_none(cwd, capsys):
    solver = setup(cwd, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 3 display: 1 snapshot_prefix: "snaps/m"')
    (cwd / "snaps").mkdir()
    rc, err = run_main(capsys, "--solver", solver, "-o", "elsewhere")
    assert rc == 0, err
    assert sorted(os.listdir(cwd / "elsewhere")) == ["curves.csv", "curves.png"]
    assert not {"curves.csv", "curves.png"} & set(os.listdir(cwd / "snaps"))
    rows = read_csv(cwd / "elsewhere" / "curves.csv")
    assert [r["iteration"] for r in rows if r["lr"]] == ["0", "1", "2"]
    assert all(float(r["lr"]) == pytest.approx(0.1) for r in rows if r["lr"])
    (cwd / "other").mkdir()
    solver2 = setup(cwd / "other", 'lr_policy: "fixed" base_lr: 0.1 max_iter: 2 display: 1')
    monkey_cwd = os.getcwd()
    os.chdir(cwd / "other")
    try:
        rc, err = run_main(capsys, "--solver", solver2, "--no-curves")
    finally:
        os.chdir(monkey_cwd)
    assert rc == 0, err
    assert sorted(os.listdir(cwd / "other")) == ["net.prototxt", "solver.prototxt", "solver_iter_2.caffemodel",
                                                 "solver_iter_2.solverstate"]


# -- resume -------------------------------------------------------------------------------------------
def test_resume_from_a_state_of_another_solver_type_or_net_is_a_one_line_error(cwd, capsys):
    solver = setup(cwd, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 2 snapshot_prefix: "m"')
    rc, err = run_main(capsys, "--solver", solver, "--no-curves")
    assert rc == 0, err
    (cwd / "adam.prototxt").write_text('net: "net.prototxt"\ntype: "Adam"\nlr_policy: "fixed"\nmax_iter: 4\n'
                                       'snapshot_prefix: "adam"\n')
    rc, err = run_main(capsys, "--solver", "adam.prototxt", "--snapshot", "m_iter_2.solverstate", "--no-curves")
    assert rc == 1
    line = one_line_error(err)
    assert "m_iter_2.solverstate" in line and re.search(r"\b2\b", line) and re.search(r"\b4\b", line)
    assert not list(cwd.glob("adam_iter_*"))
    (cwd / "wide.prototxt").write_text(dummy_net(num_output=3))
    (cwd / "wide_solver.prototxt").write_text('net: "wide.prototxt"\nlr_policy: "fixed"\nmax_iter: 4\n'
                                              'snapshot_prefix: "wide"\n')
    rc, err = run_main(capsys, "--solver", "wide_solver.prototxt", "--snapshot", "m_iter_2.solverstate",
                       "--no-curves")
    assert rc == 1
    assert "m_iter_2.solverstate" in one_line_error(err)
    assert not list(cwd.glob("wide_iter_*"))


def test_resume_in_process_continues_iter_and_history(cwd, capsys):
    solver = setup(cwd, 'type: "Nesterov" momentum: 0.9 lr_policy: "fixed" base_lr: 0.1 max_iter: 3 '
                        'snapshot_prefix: "m" display: 1')
    rc, err = run_main(capsys, "--solver", solver, "--no-curves")
    assert rc == 0, err
    (cwd / solver).write_text((cwd / solver).read_text().replace("max_iter: 3", "max_iter: 5"))
    rc, err = run_main(capsys, "--solver", solver, "--snapshot", "m_iter_3.solverstate", "--no-curves")
    assert rc == 0, err
    assert "Restoring previous solver status from m_iter_3.solverstate" in err
    shown = [int(m.group(1)) for m in re.finditer(r"\] Iteration (\d+) \(", err)]
    assert shown == [3, 4]
    it, learned, _, history = read_state(cwd / "m_iter_5.solverstate")
    assert (it, learned, len(history)) == (5, "m_iter_5.caffemodel", 2)


# -- signals (subprocess) --------------------------------------------------------------------------------
class Child:
    """`python -m caffeish.tools.cli train ARGS` in `cwd`, its stderr read line by line as it comes."""

    def __init__(self, cwd, *args):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("GLOG_minloglevel", None)
        self.p = subprocess.Popen([sys.executable, "-m", "caffeish.tools.cli", "train", *args], cwd=str(cwd),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.p.stderr:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)
            self.cond.notify_all()

    def wait_for(self, pattern, count=1, timeout=60):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                hits = [l for l in self.lines if l is not None and re.search(pattern, l)]
                if len(hits) >= count:
                    return hits[count - 1]
                if None in self.lines:
                    raise AssertionError(f"ended before {pattern!r}:\n" + "\n".join(self.lines[:-1][-30:]))
                left = deadline - time.monotonic()
                if left <= 0:
                    self.p.kill()
                    raise AssertionError(f"no {pattern!r} in {timeout}s")
                self.cond.wait(left)

    def finish(self, timeout=120):
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise
        self.thread.join(10)
        return rc, "\n".join(l for l in self.lines if l is not None)


def long_run(folder, max_iter=100000, extra=""):
    return setup(folder, f'lr_policy: "fixed" base_lr: 0.01 max_iter: {max_iter} display: 500 '
                         f'snapshot_prefix: "snaps/run" {extra}')


def snapshots(folder):
    return sorted(f for f in os.listdir(folder) if re.fullmatch(r"run_iter_\d+\.(caffemodel|solverstate)", f))


def test_sigint_stops_with_a_snapshot_and_the_run_resumes_to_max_iter(tmp_path):
    solver = long_run(tmp_path)
    (tmp_path / "snaps").mkdir()
    child = Child(tmp_path, "--solver", solver)
    child.wait_for(r"\] Iteration \d+ \(")
    child.p.send_signal(signal.SIGINT)
    rc, err = child.finish()
    assert rc == 0, err
    assert "Optimization stopped early." in err
    assert "Optimization Done." not in err and "Traceback" not in err
    files = snapshots(tmp_path / "snaps")
    assert len(files) == 2, files
    n = int(re.search(r"_iter_(\d+)\.", files[0]).group(1))
    assert 0 < n < 100000
    assert files == [f"run_iter_{n}.caffemodel", f"run_iter_{n}.solverstate"]
    it, learned, _, history = read_state(tmp_path / "snaps" / files[1])
    assert (it, learned, len(history)) == (n, f"snaps/run_iter_{n}.caffemodel", 2)
    assert re.search(rf"Snapshotting solver state to binary proto file snaps/run_iter_{n}\.solverstate", err)
    # resume: to max_iter (made near, so that the test stays short)
    (tmp_path / solver).write_text((tmp_path / solver).read_text().replace("max_iter: 100000", f"max_iter: {n + 7}"))
    child = Child(tmp_path, "--solver", solver, "--snapshot", f"snaps/run_iter_{n}.solverstate")
    rc, err = child.finish()
    assert rc == 0, err
    assert "Optimization Done." in err
    it, _, _, _ = read_state(tmp_path / "snaps" / f"run_iter_{n + 7}.solverstate")
    assert it == n + 7


def test_sighup_snapshots_and_training_goes_on(tmp_path):
    solver = long_run(tmp_path, max_iter=3000)
    (tmp_path / "snaps").mkdir()
    child = Child(tmp_path, "--solver", solver, "--no-curves")
    child.wait_for(r"\] Iteration 0 \(")
    child.p.send_signal(signal.SIGHUP)
    child.wait_for(r"Snapshotting solver state to binary proto file snaps/run_iter_\d+\.solverstate")
    rc, err = child.finish()
    assert rc == 0, err
    assert "Optimization Done." in err and "stopped early" not in err
    iters = sorted({int(re.search(r"_iter_(\d+)\.", f).group(1)) for f in snapshots(tmp_path / "snaps")})
    assert len(iters) == 2 and 0 < iters[0] < 3000 and iters[1] == 3000, iters
    assert len(snapshots(tmp_path / "snaps")) == 4


def test_sigint_effect_none_ignores_ctrl_c(tmp_path):
    solver = long_run(tmp_path, max_iter=3000)
    (tmp_path / "snaps").mkdir()
    child = Child(tmp_path, "--solver", solver, "--sigint-effect", "none", "--no-curves")
    child.wait_for(r"\] Iteration 0 \(")
    child.p.send_signal(signal.SIGINT)
    rc, err = child.finish()
    assert rc == 0, err
    assert "Optimization Done." in err and "stopped early" not in err
    assert snapshots(tmp_path / "snaps") == ["run_iter_3000.caffemodel", "run_iter_3000.solverstate"]


def test_sigint_effect_snapshot_and_sighup_effect_stop(tmp_path):
    solver = long_run(tmp_path)
    (tmp_path / "snaps").mkdir()
    child = Child(tmp_path, "--solver", solver, "--sigint-effect", "snapshot", "--sighup-effect", "stop",
                  "--no-curves")
    child.wait_for(r"\] Iteration 0 \(")
    child.p.send_signal(signal.SIGINT)
    child.wait_for(r"Snapshotting solver state")
    child.p.send_signal(signal.SIGHUP)
    rc, err = child.finish()
    assert rc == 0, err
    assert "Optimization stopped early." in err
    iters = sorted({int(re.search(r"_iter_(\d+)\.", f).group(1)) for f in snapshots(tmp_path / "snaps")})
    assert 1 <= len(iters) <= 2 and iters[-1] < 100000


def test_kill_9_never_leaves_a_truncated_snapshot_under_a_final_name(tmp_path):
    solver_text = ('lr_policy: "fixed" base_lr: 0.01 momentum: 0.9 max_iter: 100000 display: 0 snapshot: 1 '
                   'snapshot_prefix: "snaps/run"')
    rng = random.Random(5)
    for attempt in range(3):
        folder = tmp_path / f"a{attempt}"
        folder.mkdir()
        solver = setup(folder, solver_text)
        (folder / "snaps").mkdir()
        child = Child(folder, "--solver", solver)
        child.wait_for(r"Snapshotting to binary proto file", count=5 + 3 * attempt)
        time.sleep(rng.uniform(0, 0.01))
        child.p.send_signal(signal.SIGKILL)
        child.finish()
        files = snapshots(folder / "snaps")
        assert files
        param = parse_text(f'net: "{folder}/net.prototxt"\n{solver_text}', pb.SolverParameter())
        param.snapshot_prefix = str(folder / "snaps" / "run")
        for name in files:
            path = folder / "snaps" / name
            n = int(re.search(r"_iter_(\d+)\.", name).group(1))
            if name.endswith(".caffemodel"):
                layers = model_layers(path)
                assert set(layers) == {"data", "ip", "loss"}
                assert [len(b.data) for b in layers["ip"].blobs] == [6, 2]
                caffeish.Net(str(folder / "net.prototxt"), str(path), caffeish.TEST)  # loads with its checks
            else:
                s = Solver(param, log=lambda m, w: None)
                old = os.getcwd()
                os.chdir(folder)  # learned_net is relative to the training cwd
                try:
                    s.restore(str(path))
                finally:
                    os.chdir(old)
                assert s.iter == n and len(s.history) == 2
        if os.path.exists(folder / "snaps" / "curves.csv"):
            read_csv(folder / "snaps" / "curves.csv")


def test_names_from_files_are_escaped_in_the_log(cwd, capsys):
    """A net name, a blob name and a snapshot prefix with a newline or an escape sequence reach the
    log escaped: every line stays one line and no escape sequence reaches the terminal."""
    net = dummy_net(name="evil\\033[2Jnet").replace('top: "loss"', 'top: "lo\\nss"')
    solver = setup(cwd, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 2 display: 1 snapshot_prefix: "p\\033[31m"', net)
    rc, err = run_main(capsys, "--solver", solver, "--no-curves")
    assert rc == 0, err
    assert "\x1b" not in err
    assert "Solving evil\\x1b[2Jnet" in err and "Train net output #0: lo\\nss = " in err
    assert "Snapshotting to binary proto file p\\x1b[31m_iter_2.caffemodel" in err
    assert os.path.isfile(cwd / "p\x1b[31m_iter_2.caffemodel")  # the file itself has the name asked for


def test_progress_bar_counts_iterations_from_where_training_starts(cwd, capsys, monkeypatch):
    """On a terminal (CAFFEISH_PROGRESS=1 stands for one) a bar shows the iterations, the loss and the
    rate; resumed, it starts at the restored iteration."""
    monkeypatch.setenv("CAFFEISH_PROGRESS", "1")
    solver = setup(cwd, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 4 display: 1 snapshot: 2 snapshot_prefix: "s"')
    rc, err = run_main(capsys, "--solver", solver, "--no-curves")
    assert rc == 0, err
    frames = err.replace("\r", "\n").splitlines()
    assert any(re.search(r"train: 100%.*\b4/4\b.*iter/s, loss \S+", f) for f in frames), err[-2000:]
    rc, err = run_main(capsys, "--solver", solver, "--no-curves", "--snapshot", "s_iter_2.solverstate")
    assert rc == 0, err
    frames = err.replace("\r", "\n").splitlines()
    bars = [f for f in frames if f.startswith("train:") and "/4" in f]
    assert any(" 2/4 " in f for f in bars) and not any(" 1/4 " in f for f in bars), bars


def test_a_net_given_as_the_solver_is_named_as_such(cwd, capsys):
    (cwd / "net.prototxt").write_text(dummy_net())
    rc, err = run_main(capsys, "--solver", "net.prototxt")
    assert rc == 1
    assert "this looks like a net prototxt (NetParameter), not a solver" in one_line_error(err)


def test_a_missing_snapshot_folder_is_refused_before_the_nets_are_built(cwd, capsys):
    solver = setup(cwd, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 2 snapshot_prefix: "nowhere/run"')
    rc, err = run_main(capsys, "--solver", solver, "--no-curves")
    assert rc == 1 and "cannot write snapshots with snapshot_prefix 'nowhere/run'" in one_line_error(err)
    assert "Creating training net" not in err and not (cwd / "nowhere").exists()


def test_a_resumed_run_goes_on_with_its_curves(cwd, capsys):
    solver = setup(cwd, 'lr_policy: "step" stepsize: 2 gamma: 0.5 base_lr: 0.1 max_iter: 3 snapshot_prefix: "m" '
                        'display: 1')
    rc, err = run_main(capsys, "--solver", solver, "-o", "out")
    assert rc == 0, err
    first = (cwd / "out" / "curves.csv").read_text().splitlines()
    (cwd / solver).write_text((cwd / solver).read_text().replace("max_iter: 3", "max_iter: 5"))
    rc, err = run_main(capsys, "--solver", solver, "--snapshot", "m_iter_3.solverstate", "-o", "out")
    assert rc == 0, err
    resumed = (cwd / "out" / "curves.csv").read_text().splitlines()
    iters = [int(line.split(",")[0]) for line in resumed[1:]]
    assert iters == [0, 1, 2, 3, 4, 5] or iters == [0, 1, 2, 3, 4]
    assert resumed[:4] == first[:4]  # iterations 0-2 as the first run wrote them
    lrs = [line.split(",")[1] for line in resumed[1:5]]
    assert lrs == ["0.1", "0.1", "0.05", "0.05"]


def test_a_damaged_curves_file_does_not_stop_a_resumed_run(cwd, capsys):
    solver = setup(cwd, 'lr_policy: "fixed" base_lr: 0.1 max_iter: 2 snapshot_prefix: "m" display: 1')
    rc, err = run_main(capsys, "--solver", solver, "-o", "out")
    assert rc == 0, err
    (cwd / "out" / "curves.csv").write_text("garbage\n")
    (cwd / solver).write_text((cwd / solver).read_text().replace("max_iter: 2", "max_iter: 3"))
    rc, err = run_main(capsys, "--solver", solver, "--snapshot", "m_iter_2.solverstate", "-o", "out")
    assert rc == 0, err
    assert "the curves start again at iteration 2" in err
    assert (cwd / "out" / "curves.csv").read_text().splitlines()[1].startswith("2,")
