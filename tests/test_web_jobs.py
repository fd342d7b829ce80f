"""`caffeish serve`'s training jobs through Starlette's TestClient, with real job processes: a job made
from a model and a dataset trains as `caffeish train` would (same net, same log, same snapshots), its
state is on disk (a restarted app shows finished, stopped and interrupted jobs), stop is Caffe's SIGINT,
resume goes on from the newest snapshot with the curves, a snapshot tests an image and becomes a model;
and hostile or impossible requests (bad settings, paths out of the workspace, data or Python layers,
a second job while one runs) get one-line errors and leave the workspace as it was.
tests/test_web_browser.py starts a job in Chromium and watches its curve grow."""
import html
import io
import json
import os
import re
import signal
import time
import warnings

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the web app needs the web extra: pip install 'caffeish[web]'")

from caffeish.apps import dataset as datasets  # noqa: E402
from caffeish.apps import train_val  # noqa: E402
from caffeish.apps.curves import read_csv  # noqa: E402
from caffeish.formats import io as cio  # noqa: E402
from caffeish.web.app import create_app  # noqa: E402
from caffeish.web.jobs import Jobs, build_solver, settings_from_form  # noqa: E402
from caffeish.web.workspace import Workspace  # noqa: E402
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient  # noqa: E402
from test_web_workspace import make_workspace, picture, snapshot  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def form(**changes):
    base = {"name": "j1", "network": "fcn", "dataset": "streets", "weights": "model:fcn", "type": "SGD",
            "base_lr": "0.01", "max_iter": "40", "lr_policy": "fixed", "test_interval": "20", "snapshot": "20",
            "display": "5", "random_seed": "7"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture()
def space(tmp_path):
    root, _ = make_workspace(tmp_path / "ws")
    os.makedirs(os.path.join(root, "datasets"))
    datasets.build_segmentation(os.path.join(root, "data", "images"), os.path.join(root, "data", "labels"),
                                os.path.join(root, "datasets", "streets"), val_fraction=0.34, workers=1)
    return root


@pytest.fixture()
def app(space):
    return create_app(space)


@pytest.fixture()
def client(app):
    with TestClient(app, raise_server_exceptions=False, follow_redirects=False) as c:
        yield c


def wait_state(client, name, states=("done", "stopped", "failed", "interrupted"), timeout=120, where=None):
    end = time.time() + timeout
    while time.time() < end:
        s = client.get(f"/jobs/{name}/status.json").json()
        if s["state"] in states and (where is None or where(s)):
            return s
        time.sleep(0.1)
    raise AssertionError(f"job {name} did not reach {states}: {s}")


def error_line(response):
    found = re.search(r'id="error">([^<]*)<', response.text)
    return html.unescape(found.group(1)) if found else response.text


def job_dir(root, name="j1"):
    return os.path.join(root, "jobs", name)


def test_a_job_trains_as_caffeish_train_would(client, space):
    before = snapshot(os.path.join(space, "models")), snapshot(os.path.join(space, "datasets"))
    r = client.post("/jobs", data=form())
    assert r.status_code == 303 and r.headers["location"] == "/jobs/j1", error_line(r)
    s = wait_state(client, "j1")
    assert s["state"] == "done", s
    assert s["iteration"] == 40 and s["max_iter"] == 40 and s["fraction"] == 1.0
    assert [x["iteration"] for x in s["snapshots"]] == [20, 40]
    folder = job_dir(space)
    names = set(os.listdir(folder))
    assert {"job.json", "solver.prototxt", "train_val.prototxt", "deploy.prototxt", "labels.txt", "palette.txt",
            "mean.binaryproto", "log.txt", "curves.csv", "curves.png", "state.json", "lock",
            "snapshot_iter_20.caffemodel", "snapshot_iter_40.solverstate"} <= names
    # the job only read the workspace: models and datasets are as they were
    assert (snapshot(os.path.join(space, "models")), snapshot(os.path.join(space, "datasets"))) == before
    # the net: Data layers on the dataset (inside the workspace), the deploy body, loss and accuracy
    net = cio.read_net(os.path.join(folder, "train_val.prototxt"))
    data = [l for l in net.layer if l.type == "Data"]
    assert [l.data_param.source for l in data] == [
        os.path.join(space, "datasets", "streets", db, part) for db in ("train_db", "val_db")
        for part in ("features", "labels")]
    assert [l.type for l in net.layer][-2:] == ["SoftmaxWithLoss", "Accuracy"]
    assert net.layer[-2].loss_param.normalize and net.layer[-2].loss_param.ignore_label == 255
    # the log is Caffe's, the curves what it says
    log = open(os.path.join(folder, "log.txt")).read()
    assert "Solving" in log and "Optimization Done." in log and "caffeish job j1: done" in log
    curves = read_csv(os.path.join(folder, "curves.csv"))
    losses = dict(zip(*curves.series("train_loss")))
    for it, loss in re.findall(r"Iteration (\d+) \(.*\), loss = (\S+)", log):
        assert losses[int(it)] == pytest.approx(float(loss), rel=1e-5)
    assert [p["iteration"] for p in curves.test_passes(0)] == [0, 20, 40]
    state = json.load(open(os.path.join(folder, "state.json")))
    assert state["state"] == "done" and state["iteration"] == 40 and state["runs"] == 1
    # pages
    page = client.get("/jobs/j1")
    assert page.status_code == 200 and 'id="job-curves"' in page.text
    assert '<td>40</td><td><a href="/jobs/j1/snapshots/40/caffemodel">caffemodel</a>' in page.text
    assert client.get("/jobs/j1/curves.png").content[:4] == b"\x89PNG"
    assert client.get("/jobs").status_code == 200 and "j1" in client.get("/jobs").text
    assert "j1" in client.get("/").text
    model = client.get("/jobs/j1/snapshots/40/caffemodel")
    assert model.status_code == 200 and model.content == open(os.path.join(folder, "snapshot_iter_40.caffemodel"),
                                                              "rb").read()
    assert client.get("/jobs/j1/log.txt").text == log


def test_the_same_run_as_the_cli(client, space, tmp_path, capsys):
    """The job's files given to `caffeish train` give the same losses (the same code, the same seed)."""
    from caffeish.tools.cli import main

    assert client.post("/jobs", data=form(max_iter="10", snapshot="0")).status_code == 303
    assert wait_state(client, "j1")["state"] == "done"
    folder = job_dir(space)
    cli = tmp_path / "cli"
    cli.mkdir()
    for name in ("solver.prototxt", "train_val.prototxt"):
        (cli / name).write_text(open(os.path.join(folder, name)).read())
    cwd = os.getcwd()
    os.chdir(cli)
    try:
        rc = main(["train", "--solver", "solver.prototxt", "--weights",
                   os.path.join(space, "models", "fcn", "weights.caffemodel")])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert rc == 0, err
    ours = re.findall(r"Iteration \d+ \(.*\), loss = (\S+)", open(os.path.join(folder, "log.txt")).read())
    assert ours and ours == re.findall(r"Iteration \d+ \(.*\), loss = (\S+)", err)


def test_stop_takes_a_snapshot_and_resume_goes_on_with_the_curves(client, space):
    r = client.post("/jobs", data=form(max_iter="200000", snapshot="0", display="50"))
    assert r.status_code == 303
    wait_state(client, "j1", ("running",), where=lambda s: (s["iteration"] or 0) >= 100)
    assert client.post("/jobs/j1/stop").status_code == 303
    s = wait_state(client, "j1")
    assert s["state"] == "stopped" and s["message"].startswith("stopped at iteration")
    stopped_at = s["snapshots"][-1]["iteration"]
    assert stopped_at > 0 and stopped_at == json.load(open(os.path.join(job_dir(space), "state.json")))["iteration"]
    rows_before = read_csv(os.path.join(job_dir(space), "curves.csv"))
    assert client.post("/jobs/j1/stop").status_code == 409  # not running
    # resume to a smaller end: it goes on from the snapshot and stops there
    r = client.post("/jobs/j1/resume", data={"max_iter": str(stopped_at + 30)})
    assert r.status_code == 303, error_line(r)
    s = wait_state(client, "j1")
    assert s["state"] == "done" and s["iteration"] == stopped_at + 30
    log = open(os.path.join(job_dir(space), "log.txt")).read()
    assert f"resumed from snapshot_iter_{stopped_at}.solverstate" in log
    assert f"Restoring previous solver status from snapshot_iter_{stopped_at}.solverstate" in log
    after = read_csv(os.path.join(job_dir(space), "curves.csv"))
    iters = after.series("train_loss")[0]
    assert iters[0] == 0 and iters[-1] >= stopped_at  # one curve from 0 through the resumed part
    assert [i for i in rows_before.series("train_loss")[0] if i < stopped_at] == [i for i in iters if i < stopped_at]
    assert json.load(open(os.path.join(job_dir(space), "state.json")))["runs"] == 2
    # done: resuming needs more iterations
    r = client.post("/jobs/j1/resume", data={})
    assert r.status_code == 409 and "give more iterations" in error_line(r)


def test_a_second_job_while_one_runs_is_refused(client, space):
    assert client.post("/jobs", data=form(max_iter="200000", snapshot="0", display="100")).status_code == 303
    before = snapshot(os.path.join(space, "jobs"))
    r = client.post("/jobs", data=form(name="j2"))
    assert r.status_code == 409 and "job 'j1' is running" in error_line(r)
    assert not os.path.exists(job_dir(space, "j2"))
    r = client.post("/jobs/j1/resume", data={})
    assert r.status_code == 409 and "running already" in error_line(r)
    r = client.post("/jobs/j1/delete")
    assert r.status_code == 409 and "stop it first" in error_line(r)
    assert set(snapshot(os.path.join(space, "jobs"))) >= set(before)
    client.post("/jobs/j1/stop")
    assert wait_state(client, "j1")["state"] == "stopped"
    assert client.post("/jobs", data=form(name="j2", max_iter="5", snapshot="0")).status_code == 303
    assert wait_state(client, "j2")["state"] == "done"


def test_a_killed_job_is_interrupted_and_a_restarted_server_shows_every_job(space):
    app = create_app(space)
    with TestClient(app, raise_server_exceptions=False, follow_redirects=False) as c:
        assert c.post("/jobs", data=form(name="finished", max_iter="10", snapshot="0")).status_code == 303
        assert wait_state(c, "finished")["state"] == "done"
        assert c.post("/jobs", data=form(name="killed", max_iter="200000", snapshot="50", display="50")).status_code == 303
        wait_state(c, "killed", ("running",), where=lambda s: len(s["snapshots"]) >= 1)
        pid = json.load(open(os.path.join(job_dir(space, "killed"), "state.json")))["pid"]
        os.kill(pid, signal.SIGKILL)
        s = wait_state(c, "killed")
        assert s["state"] == "interrupted" and "ended without saying" in s["message"]
    # a new server over the same workspace
    with TestClient(create_app(space), raise_server_exceptions=False, follow_redirects=False) as c:
        page = c.get("/jobs").text
        assert re.search(r"finished</a></td><td class=\"state done\">done", page)
        assert re.search(r"killed</a></td><td class=\"state interrupted\">interrupted", page)
        s = c.get("/jobs/finished/status.json").json()
        assert s["iteration"] == 10 and s["points"] > 0
        newest = c.get("/jobs/killed/status.json").json()["snapshots"][-1]["iteration"]
        r = c.post("/jobs/killed/resume", data={"max_iter": str(newest + 10)})
        assert r.status_code == 303, error_line(r)
        s = wait_state(c, "killed")
        assert s["state"] == "done" and s["iteration"] == newest + 10


def test_the_server_stopping_stops_its_jobs_with_a_snapshot(space):
    with TestClient(create_app(space), raise_server_exceptions=False, follow_redirects=False) as c:
        assert c.post("/jobs", data=form(max_iter="200000", snapshot="0", display="50")).status_code == 303
        wait_state(c, "j1", ("running",), where=lambda s: (s["iteration"] or 0) >= 50)
    state = json.load(open(os.path.join(job_dir(space), "state.json")))
    assert state["state"] == "stopped"
    assert os.path.isfile(os.path.join(job_dir(space), f"snapshot_iter_{state['iteration']}.solverstate"))


def test_a_job_picked_up_by_a_restarted_server_while_it_runs_can_be_stopped(space):
    app = create_app(space)
    c1 = TestClient(app, raise_server_exceptions=False, follow_redirects=False)
    assert c1.post("/jobs", data=form(max_iter="200000", snapshot="0", display="50")).status_code == 303
    wait_state(c1, "j1", ("running",))
    with TestClient(create_app(space), raise_server_exceptions=False, follow_redirects=False) as c2:
        assert c2.get("/jobs/j1/status.json").json()["state"] == "running"
        assert c2.post("/jobs/j1/stop").status_code == 303
        assert wait_state(c2, "j1")["state"] == "stopped"


def test_test_an_image_with_a_snapshot_and_make_a_model_of_it(client, app, space):
    assert client.post("/jobs", data=form()).status_code == 303
    assert wait_state(client, "j1")["state"] == "done"
    buf = io.BytesIO()
    picture(np.random.default_rng(3), (24, 32)).save(buf, "PNG")
    r = client.post("/jobs/j1/test", data={"iteration": "20"}, files={"images": ("street.png", buf.getvalue(),
                                                                                   "image/png")})
    assert r.status_code == 303, error_line(r)
    task = app.state.web["tasks"].wait(r.headers["location"].rsplit("/", 1)[1])
    assert task.state == "done", task.message
    result = task.result
    assert result["kind"] == "segmentation" and result["back"]["url"] == "/jobs/j1"
    page = client.get(task.next_url)
    assert "j1 @ iteration 20" in page.text and "legend" in page.text
    # the same classes as the snapshot's net through the library
    import caffeish
    from caffeish.apps import inference
    from caffeish.data.preprocess import Preprocess, load_mean

    net = inference.open_net(os.path.join(job_dir(space), "deploy.prototxt"),
                             os.path.join(job_dir(space), "snapshot_iter_20.caffemodel"))
    seg = inference.Segmenter(net, Preprocess(mean=load_mean(os.path.join(job_dir(space), "mean.binaryproto"))))
    _, x = seg.prepare(Image.open(io.BytesIO(buf.getvalue())))
    classes, _ = seg.run(x, keep_scores=False)
    got = np.frombuffer(result["items"][0]["classes"], np.uint8).reshape(classes.shape)
    assert (got == classes).all()
    assert caffeish  # the library the CLI uses
    # a dataset record instead of an upload
    r = client.post("/jobs/j1/test", data={"iteration": "40", "use_dataset": "on", "split": "val", "record": "0"})
    assert r.status_code == 303, error_line(r)
    assert app.state.web["tasks"].wait(r.headers["location"].rsplit("/", 1)[1]).state == "done"
    # make a model
    r = client.post("/jobs/j1/publish", data={"iteration": "40", "name": "trained"})
    assert r.status_code == 303
    assert app.state.web["tasks"].wait(r.headers["location"].rsplit("/", 1)[1]).state == "done"
    folder = os.path.join(space, "models", "trained")
    assert open(os.path.join(folder, "weights.caffemodel"), "rb").read() == open(
        os.path.join(job_dir(space), "snapshot_iter_40.caffemodel"), "rb").read()
    assert client.get("/models/trained").status_code == 200
    # and the new model's weights start another job
    r = client.post("/jobs", data=form(name="j2", network="trained", weights="model:trained", max_iter="4",
                                       snapshot="0"))
    assert r.status_code == 303, error_line(r)
    assert wait_state(client, "j2")["state"] == "done"
    r = client.post("/jobs", data=form(name="j3", weights="job:j1:20", max_iter="4", snapshot="0"))
    assert r.status_code == 303, error_line(r)
    assert wait_state(client, "j3")["state"] == "done"


def test_a_classifier_trains_on_a_classification_dataset(client, space):
    rng = np.random.default_rng(5)
    for k, cls in enumerate(("cat", "dog")):
        os.makedirs(os.path.join(space, "shots", cls))
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) // (k + 1)).save(
                os.path.join(space, "shots", cls, f"{i}.png"))
    datasets.build_classification(os.path.join(space, "shots"), os.path.join(space, "datasets", "pets"),
                                  val_fraction=0.3, workers=1)
    r = client.post("/jobs", data=form(network="cls", dataset="pets", weights="", max_iter="6", batch_size="2",
                                       snapshot="0", test_interval="3"))
    assert r.status_code == 303, error_line(r)
    assert wait_state(client, "j1")["state"] == "done"
    net = cio.read_net(os.path.join(job_dir(space), "train_val.prototxt"))
    assert [l.type for l in net.layer] == ["Data", "Data", "Convolution", "ReLU", "InnerProduct", "SoftmaxWithLoss",
                                           "Accuracy"]  # the deploy's Softmax "prob" dropped
    assert list(net.layer[0].top) == ["data", "label"]
    assert "Test net output #0: accuracy" in open(os.path.join(job_dir(space), "log.txt")).read()
    r = client.post("/jobs/j1/test", data={"iteration": "6", "use_dataset": "on", "split": "val", "record": "0"})
    assert r.status_code == 303, error_line(r)
    task = client.app.state.web["tasks"].wait(r.headers["location"].rsplit("/", 1)[1])
    assert task.state == "done", task.message
    assert task.result["kind"] == "classification"
    assert {t["name"] for t in task.result["items"][0]["top"]} <= {"cat", "dog", "class 2", "class 3", "class 4"}
    r = client.post("/jobs/j1/test", data={"iteration": "6", "use_dataset": "on", "split": "val", "record": "99"})
    assert r.status_code == 400 and "record 99: the val split has" in error_line(r)


def test_a_malformed_image_for_a_snapshot_is_one_line(client, space):
    assert client.post("/jobs", data=form(max_iter="3", snapshot="0")).status_code == 303
    wait_state(client, "j1")
    before = snapshot(space)
    r = client.post("/jobs/j1/test", data={"iteration": "3"}, files={"images": ("x.png", b"\x89PNG\r\n\x1a\nbroken",
                                                                                 "image/png")})
    assert r.status_code == 400 and "x.png: not an image file" in error_line(r), error_line(r)
    assert snapshot(space) == before


# -- refusals ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    ({"base_lr": "abc"}, "base learning rate: a number, not 'abc'"),
    ({"base_lr": "nan"}, "base learning rate: a finite number"),
    ({"max_iter": "0"}, "iterations: between 1"),
    ({"max_iter": ""}, "iterations: required"),
    ({"type": "Magic"}, "solver type 'Magic': one of SGD"),
    ({"lr_policy": "cosine"}, "lr policy 'cosine'"),
    ({"lr_policy": "multistep", "stepvalue": "30,x"}, "step values: whole numbers"),
    ({"extra": 'net: "/etc/passwd"'}, "extra solver fields: net is set by the job"),
    ({"extra": 'snapshot_prefix: "/tmp/x"'}, "snapshot_prefix is set by the job"),
    ({"extra": "no_such_field: 1"}, "extra solver fields:"),
    ({"device": "tpu"}, "device 'tpu': cpu, or gpu0"),
    ({"name": "../x"}, "job '../x': use letters"),
    ({"name": "a" * 101}, "job 'aaaa"),
    ({"network": "../models/fcn"}, "model '../models/fcn'"),
    ({"network": "nosuch"}, "'models/nosuch': not in the workspace"),
    ({"dataset": "nosuch"}, "'datasets/nosuch': not in the workspace"),
    ({"weights": "job:../../x:1"}, "job '../../x'"),
    ({"weights": "file:/etc/passwd"}, "weights 'file:/etc/passwd': none, model:NAME or job:NAME:ITERATION"),
    ({"network": "cls", "weights": ""}, "model 'cls' is a classifier (its output 'fc' is 1x5, one score per image) "
                                        "and the dataset is a segmentation dataset: make a fully convolutional net"),
    ({"network": "pooled", "weights": "", "dataset": "streets"}, "model 'pooled' is a classifier"),
    ({"batch_size": "2", "crop_size": "40"}, "crop size 40 is larger than the dataset's 32x24 images"),
])
def test_bad_settings_are_one_line_errors_and_write_nothing(client, space, changes, message):
    before = snapshot(space)
    r = client.post("/jobs", data=form(**changes))
    assert r.status_code in (400, 404), r.text[:300]
    line = error_line(r)
    assert message in line and "\n" not in line, line
    assert snapshot(space) == before


def test_a_net_with_too_few_classes_is_refused(client, space):
    folder = os.path.join(space, "models", "two")
    os.makedirs(folder)
    text = open(os.path.join(space, "models", "fcn", "deploy.prototxt")).read()
    text = text.replace("num_output: 3 kernel_size: 1", "num_output: 2 kernel_size: 1").replace(
        "num_output: 3 group: 3", "num_output: 2 group: 2")
    open(os.path.join(folder, "deploy.prototxt"), "w").write(text)
    r = client.post("/jobs", data=form(network="two", weights=""))
    assert r.status_code == 400 and "scores 2 classes" in error_line(r) and "the dataset has 3" in error_line(r)


@pytest.mark.parametrize("layer, message", [
    ('layer { name: "py" type: "Python" bottom: "crop" top: "crop2" python_param { module: "os" layer: "x" } }',
     "runs Python code"),
    ('layer { name: "h5" type: "HDF5Output" bottom: "crop" bottom: "crop" hdf5_output_param { file_name: "/tmp/x" } }',
     "reads or writes files of its own"),
])
def test_a_net_that_runs_code_or_touches_files_is_refused(client, space, layer, message):
    folder = os.path.join(space, "models", "bad")
    os.makedirs(folder)
    text = open(os.path.join(space, "models", "fcn", "deploy.prototxt")).read() + layer + "\n"
    open(os.path.join(folder, "deploy.prototxt"), "w").write(text)
    r = client.post("/jobs", data=form(network="bad", weights=""))
    assert r.status_code == 400 and message in error_line(r), error_line(r)
    assert not os.path.exists(os.path.join(space, "jobs", "j1"))


def test_a_dataset_whose_mean_lies_outside_the_workspace_is_refused(client, space, tmp_path):
    outside = tmp_path / "outside.binaryproto"
    outside.write_bytes(open(os.path.join(space, "datasets", "streets", "mean.binaryproto"), "rb").read())
    meta_path = os.path.join(space, "datasets", "streets", "dataset.json")
    meta = json.load(open(meta_path))
    meta["mean_file"] = os.path.relpath(outside, os.path.join(space, "datasets", "streets"))
    json.dump(meta, open(meta_path, "w"))
    r = client.post("/jobs", data=form())
    assert r.status_code == 400 and "outside the workspace" in error_line(r), error_line(r)


def test_a_linked_database_is_not_followed(client, space, tmp_path):
    db = os.path.join(space, "datasets", "streets", "val_db")
    os.rename(db, tmp_path / "val_db")
    os.symlink(tmp_path / "val_db", db)
    r = client.post("/jobs", data=form())
    assert r.status_code in (400, 404) and "symbolic link" in error_line(r), error_line(r)


def test_a_database_file_linked_elsewhere_is_not_read(client, space, tmp_path):
    mdb = os.path.join(space, "datasets", "streets", "train_db", "labels", "data.mdb")
    os.rename(mdb, tmp_path / "data.mdb")
    os.symlink(tmp_path / "data.mdb", mdb)
    r = client.post("/jobs", data=form())
    assert r.status_code == 400 and "train_db/labels/data.mdb': a symbolic link" in error_line(r), error_line(r)


@pytest.mark.parametrize("url", ["/jobs/nosuch", "/jobs/..%2F..%2Fetc/status.json", "/jobs/j1/snapshots/5/caffemodel",
                                 "/jobs/j1/snapshots/x/caffemodel", "/jobs/j1/snapshots/40/passwd",
                                 "/jobs/nosuch/curves.png", "/jobs/nosuch/log.txt"])
def test_unknown_jobs_and_snapshots_are_one_line_errors(client, space, url):
    assert client.post("/jobs", data=form(max_iter="40")).status_code == 303
    wait_state(client, "j1")
    r = client.get(url)
    assert r.status_code in (400, 404) and "\n" not in error_line(r).strip()


def test_a_linked_job_folder_is_not_followed(client, space, tmp_path):
    os.makedirs(os.path.join(space, "jobs"))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "job.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere", os.path.join(space, "jobs", "linked"))
    assert client.get("/jobs/linked").status_code == 404
    assert client.post("/jobs/linked/delete").status_code == 404
    assert os.path.isdir(tmp_path / "elsewhere")
    assert "/jobs/linked" not in client.get("/jobs").text


def test_test_and_publish_need_a_snapshot_of_the_job(client, space):
    assert client.post("/jobs", data=form(max_iter="5", snapshot="0")).status_code == 303
    wait_state(client, "j1")
    r = client.post("/jobs/j1/test", data={"iteration": "3", "use_dataset": "on"})
    assert r.status_code == 404 and "no snapshot at iteration 3" in error_line(r)
    r = client.post("/jobs/j1/publish", data={"iteration": "5", "name": "fcn"})
    assert r.status_code == 404 and "exists already" in error_line(r)
    r = client.post("/jobs/j1/resume", data={"max_iter": "-4"})
    assert r.status_code == 400


def test_delete_removes_the_job_and_nothing_else(client, space):
    assert client.post("/jobs", data=form(max_iter="5", snapshot="0")).status_code == 303
    wait_state(client, "j1")
    before = snapshot(os.path.join(space, "models"))
    assert client.post("/jobs/j1/delete").status_code == 303
    assert not os.path.exists(job_dir(space)) and snapshot(os.path.join(space, "models")) == before


def test_a_job_failing_at_its_start_says_why_in_one_line(client, space):
    # weights that are not a caffemodel: the job's process fails with Caffe's one-line error
    open(os.path.join(space, "models", "fcn", "weights.caffemodel"), "wb").write(b"not a caffemodel")
    r = client.post("/jobs", data=form(max_iter="5"))
    assert r.status_code == 303
    s = wait_state(client, "j1")
    assert s["state"] == "failed" and s["message"] and "\n" not in s["message"]
    assert "Traceback" not in open(os.path.join(job_dir(space), "log.txt")).read()


# -- units ----------------------------------------------------------------------------------------------------
def test_solver_settings_fill_in_an_epoch_and_keep_caffe_checks():
    s = settings_from_form(form(test_interval="", display="", snapshot="", max_iter="1000", batch_size="4",
                                val_batch_size="3"))
    p = build_solver(s, train_records=10, val_records=7)
    assert (p.test_interval, list(p.test_iter), p.display, p.snapshot) == (3, [3], 20, 0)
    assert p.net == "train_val.prototxt" and p.snapshot_prefix == "snapshot" and p.random_seed == 7
    s = settings_from_form(form(type="Adam", lr_policy="step", stepsize="", extra="clip_gradients: 5 momentum: 0.8"))
    p = build_solver(s, 6, 2)
    assert (p.type, p.stepsize, p.clip_gradients, p.momentum, p.momentum2) == ("Adam", 13, 5.0, pytest.approx(0.8),
                                                                               pytest.approx(0.999))
    assert settings_from_form({**form(), "normalize": "off"})["normalize"] is False


def test_train_val_from_a_deploy_net(space):
    ws = Workspace(space)
    d = train_val.Dataset(ws.dataset("streets"))
    net, notes, score = train_val.from_deploy(cio.read_net(ws.model("fcn").deploy), d, batch_size=2)
    assert score == "crop" and not notes
    assert [l.data_param.batch_size for l in net.layer if l.type == "Data"] == [2, 2, 2, 2]
    cls = cio.read_net(ws.model("cls").deploy)
    net, _, score = train_val.from_deploy(cls, d)
    assert score == "fc" and "prob" not in [l.name for l in net.layer]


def test_jobs_of_an_empty_workspace(tmp_path):
    jobs = Jobs(Workspace(str(tmp_path)))
    assert jobs.names() == [] and jobs.running() == []
    assert jobs.weights_choices() == [("", "none: the layers' fillers (from scratch)")]


def test_two_jobs_asked_for_at_once_start_one(app, space):
    import threading

    jobs = app.state.web["jobs"]
    settings = settings_from_form(form(max_iter="200000", snapshot="0", display="100"))
    outcomes = []

    def make(name):
        try:
            jobs.create(name, "fcn", "streets", "model:fcn", settings)
            outcomes.append((name, "started"))
        except Exception as e:  # noqa: BLE001 - the refusal is what we look at
            outcomes.append((name, str(e)))

    threads = [threading.Thread(target=make, args=(f"race{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [n for n, what in outcomes if what == "started"]
    assert len(started) == 1, outcomes
    assert all("is running" in what for n, what in outcomes if n not in started)
    assert sorted(os.listdir(os.path.join(space, "jobs"))) == started
    jobs.shutdown()
    assert json.load(open(job_dir(space, started[0]) + "/state.json"))["state"] == "stopped"


def test_the_curves_picture_is_the_jobs_own_while_it_runs_and_drawn_from_the_csv_when_stale(client, space):
    assert client.post("/jobs", data=form(max_iter="200000", snapshot="0", display="50")).status_code == 303
    folder = job_dir(space)
    wait_state(client, "j1", ("running",), where=lambda s: os.path.exists(os.path.join(folder, "curves.png")))
    drawn = client.get("/jobs/j1/curves.png").content
    assert drawn[:4] == b"\x89PNG"
    assert client.post("/jobs/j1/stop").status_code == 303
    wait_state(client, "j1")
    final = open(os.path.join(folder, "curves.png"), "rb").read()
    assert client.get("/jobs/j1/curves.png").content == final  # the run drew its last picture at the end
    os.remove(os.path.join(folder, "curves.png"))  # as a kill between two pictures leaves it: drawn from the CSV
    again = client.get("/jobs/j1/curves.png").content
    assert again[:4] == b"\x89PNG" and not os.path.exists(os.path.join(folder, "curves.png"))


def test_a_gpu_job_without_a_gpu_is_refused_before_it_starts(client, space, monkeypatch):
    from caffeish.runtime import backend

    if backend.gpu_unavailable_reason() is None:
        pytest.skip("this machine has a GPU")
    assert "no GPU:" in client.get("/jobs/new").text
    r = client.post("/jobs", data=form(device="gpu0"))
    assert r.status_code == 400 and "cannot train on GPU 0:" in error_line(r) and "choose the CPU" in error_line(r)
    assert not os.path.exists(os.path.join(space, "jobs"))


def test_mutated_job_forms_never_get_a_traceback(client, app, space):
    """Seeded mutations of the new-job form, one field at a time: every answer is a job (303) or a
    one-line error (400, 404, 409), never a 500; a refused form writes nothing."""
    rng = np.random.default_rng(19)
    garbage = ["", " ", "-1", "0", "1e400", "nan", "-inf", "1" * 30, "0x10", "3.5", "\x00", "../../etc/passwd",
               "<script>alert(1)</script>", "model:", "job:", "job:j1:", "model:../fcn", "gpu99", "é", "%s%n",
               'net: "x"', "base_lr: -1", "{", "max_iter: 0", "type: \"Nope\""]
    fields = list(form(max_iter="3", snapshot="0").keys()) + ["device", "crop_size", "mirror", "normalize", "extra",
                                                              "iter_size", "val_batch_size", "stepvalue", "power"]
    seen = set()
    for k in range(60):
        field = fields[rng.integers(len(fields))]
        value = garbage[rng.integers(len(garbage))]
        data = form(name=f"f{k}", max_iter="3", snapshot="0")
        data[field] = value
        before = snapshot(space)
        r = client.post("/jobs", data=data)
        seen.add(r.status_code)
        assert r.status_code in (303, 400, 404, 409), (field, value, r.status_code, r.text[-300:])
        if r.status_code == 303:
            name = r.headers["location"].rsplit("/", 1)[1]
            s = wait_state(client, name)
            assert s["state"] in ("done", "failed"), s
            assert "\n" not in s["message"]
            assert client.post(f"/jobs/{name}/delete").status_code == 303
        else:
            line = error_line(r)
            assert line.startswith("error: ") and "\n" not in line and "Traceback" not in line, line
            assert snapshot(space) == before, (field, value)
    assert {303, 400} <= seen


def test_a_damaged_curves_file_still_shows_the_job(client, space):
    assert client.post("/jobs", data=form(max_iter="3", snapshot="0")).status_code == 303
    wait_state(client, "j1")
    open(os.path.join(job_dir(space), "curves.csv"), "w").write("garbage,here\n")
    os.remove(os.path.join(job_dir(space), "curves.png"))
    s = client.get("/jobs/j1/status.json").json()
    assert s["state"] == "done" and "not a curves.csv" in s["message"]
    assert client.get("/jobs/j1").status_code == 200
    r = client.get("/jobs/j1/curves.png")
    assert r.status_code == 404 and "no curves to draw" in error_line(r)
    assert client.get("/jobs").status_code == 200
