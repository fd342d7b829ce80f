"""`--ray`: segment, classify and evaluate segmentation on a local Ray cluster (Ray Data, an actor pool),
against the single-machine runs: the same files byte for byte, the same JSON Lines, the same metrics;
a worker killed mid-run still yields every output; --resume; without Ray, one line saying how to
install it.  The cluster is tests/conftest.py's ray fixture (ray.init(num_cpus=2) on 127.0.0.1), shared by the tests;
they skip, saying so, when Ray is not installed (pip install 'caffeish[ray]')."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import caffeish
from caffeish.apps.dataset import build_segmentation
from caffeish.data.palette import pascal_palette
from caffeish.tools.cli import main
from test_segment import FCN  # conv/pool, a 1x1 score, a bilinear x4 Deconvolution, a Crop back to the input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEPLOY = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 20 } } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }
"""
N_IMAGES = 40
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray Data's own settings


def _picture(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, ((xx // 8 + yy // 8) % 2) * 255], axis=2)
    return np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The FCN and its weights, and a folder of 40 images of several sizes (some in a subfolder, two
    whose outputs would collide without renaming) plus one corrupt file."""
    root = tmp_path_factory.mktemp("ray")
    (root / "fcn.prototxt").write_text(FCN)
    caffeish.Net(str(root / "fcn.prototxt"), seed=7).save(str(root / "fcn.caffemodel"))
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(11)
    for i in range(N_IMAGES - 1):
        name = f"sub/p{i:02d}.png" if i % 7 == 0 else f"p{i:02d}.png"
        Image.fromarray(_picture(rng, int(rng.integers(90, 140)), int(rng.integers(120, 180)))).save(images / name)
    Image.fromarray(_picture(rng, 100, 130)).save(images / "p01.jpg")  # p01.jpg takes p01.png: p01_png.png
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    return root


def _tree(folder):
    """{relative path: bytes} of every file below folder."""
    out = {}
    for base, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(base, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def single_machine(*args):
    """(exit code, stdout, stderr) of the command run without Ray in a process of its own, with one BLAS
    thread as each actor has (--ray-threads 1): BLAS sums in another order with another thread count,
    which can change a score's last bits."""
    one = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    p = subprocess.run([sys.executable, "-m", "caffeish.tools.cli", *map(str, args)], capture_output=True,
                       text=True, env=dict(os.environ, **one), timeout=300)
    return p.returncode, p.stdout, p.stderr


def _segment_args(work, out, *more):
    return ["segment", work / "fcn.prototxt", work / "fcn.caffemodel", work / "images", "-o", out, "--format",
            "json", *more]


def _segment(work, out, capsys, *more):
    code = main([str(a) for a in _segment_args(work, out, *more)])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.replace(str(out), "OUT"))["rows"], captured.err


SINGLE = {}


def _single(work):
    """(rows, files) of the single-machine run (once per module)."""
    if work not in SINGLE:
        code, out, err = single_machine(*_segment_args(work, work / "single"))
        assert code == 1 and "broken.png" in err
        SINGLE[work] = (json.loads(out.replace(str(work / "single"), "OUT"))["rows"], _tree(work / "single"))
    return SINGLE[work]


def test_the_command_starts_and_stops_its_own_local_cluster(tmp_path, work):
    """The real command, in a process of its own: `--ray` starts a local cluster, stdout holds only the
    results (what Ray prints goes to stderr), and the cluster is gone after.  (First in the module:
    before the module's own cluster starts, so that two clusters do not share the 2 CPUs.)"""
    pytest.importorskip("ray.data", reason="Ray is not installed (pip install 'caffeish[ray]')")
    folder = tmp_path / "few"
    folder.mkdir()
    for name in ("p02.png", "p03.png", "p04.png"):
        (folder / name).write_bytes((work / "images" / name).read_bytes())
    args = [sys.executable, "-m", "caffeish.tools.cli", "classify", str(work / "fcn.prototxt"),
            str(work / "fcn.caffemodel"), str(folder), "--blob", "score_fr", "--format", "csv"]
    code, out, _ = single_machine(*args[3:])
    on_ray = subprocess.run(args + ["--ray", "--ray-threads", "1"], capture_output=True, text=True, timeout=120)
    assert code == on_ray.returncode == 0, on_ray.stderr
    assert on_ray.stdout == out
    assert "ray: 3 images" in on_ray.stderr and "Traceback" not in on_ray.stderr


def test_segment_on_ray_writes_the_single_machine_files_byte_for_byte(ray, work, capsys):
    rows, files = _single(work)
    out = work / "on_ray"
    code, ray_rows, err = _segment(work, out, capsys, "--ray", "--ray-actors", "2", "--npy")
    assert code == 1  # the corrupt file, named and skipped as without --ray
    assert "caffeish segment: error:" in err and "broken.png" in err
    assert "1 of 41 images could not be segmented" in err
    assert "ray: 41 images" in err and "2 CPU actors" in err and "1 failed" in err
    assert len([line for line in err.splitlines() if "ray:   worker" in line]) == 2
    got = _tree(out)
    npy = {k: v for k, v in got.items() if k.endswith(".npy")}
    assert len(npy) == N_IMAGES
    assert {k: v for k, v in got.items() if k not in npy} == files  # the marker, PNGs and overlays: the same bytes
    assert "p01_png.png" in files and "sub/p00_overlay.png" in files and ".caffeish-segment" in files
    assert [{k: v for k, v in r.items() if k != "outputs"} for r in ray_rows] == \
        [{k: v for k, v in r.items() if k != "outputs"} for r in rows]
    # the scores: those of the net run here on the same input
    net = caffeish.Net(str(work / "fcn.prototxt"), str(work / "fcn.caffemodel"))
    seg = caffeish.apps.inference.Segmenter(net)
    _, x = seg.prepare(str(work / "images" / "p03.png"))
    np.testing.assert_allclose(np.load(out / "p03.npy"), seg.scores(x), rtol=1e-5, atol=1e-6)


def test_resume_skips_the_images_whose_outputs_exist(ray, work, capsys):
    rows, files = _single(work)
    out = work / "resumed"
    out.mkdir()
    done = {k: v for k, v in files.items() if not k.startswith(("p05", "p06", "sub/p07"))}
    for name, data in done.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(data)
    (out / "p06.png").write_bytes(files["p06.png"])  # an image with one output of two is not finished
    (out / ".p05.png.1234-abcdefgh.tmp").write_bytes(b"half")  # what a killed writer leaves
    before = {name: os.stat(out / name).st_mtime_ns for name in done if name != ".caffeish-segment"}
    code, ray_rows, err = _segment(work, out, capsys, "--ray", "--resume")
    assert "--resume: 37 of 41 images already have their outputs" in err  # broken.png has none
    assert [r["image"] for r in ray_rows] == [str(work / "images" / n) for n in ("p05.png", "p06.png", "sub/p07.png")]
    assert _tree(out) == files
    assert {name: os.stat(out / name).st_mtime_ns for name in before} == before  # not written again


def test_resume_without_ray_skips_the_same_images(work, capsys):
    rows, files = _single(work)
    out = work / "resumed_single"
    out.mkdir()
    for name, data in files.items():
        if not name.startswith("p1"):  # p10 ... p19 but sub/p14 are left to do
            (out / name).parent.mkdir(exist_ok=True)
            (out / name).write_bytes(data)
    code, again, err = _segment(work, out, capsys, "--resume")
    assert code == 1 and "--resume: 31 of 41 images already have their outputs" in err
    assert [os.path.basename(r["image"]) for r in again] == [f"p{i}.png" for i in range(10, 20) if i != 14]
    assert _tree(out) == files


def test_a_failure_of_the_net_stops_the_run_as_without_ray(ray, work, capsys):
    # conv1 is not at the input's size: an image fails, the next the same way, and so does a blank
    # image: the net's failure, decided in image order as the single-machine run decides it
    args = _segment_args(work, work / "net_fails", "--blob", "conv1")
    code, _, single = single_machine(*args)
    assert code == 1 and "a blank image of their sizes" in single
    assert main([str(a) for a in args] + ["--ray"]) == 1
    err = capsys.readouterr().err
    last = [line for line in err.splitlines() if "error:" in line]
    assert [line.split(" (above)")[0] for line in last] == \
        [line.split(" (above)")[0] for line in single.splitlines() if "error:" in line]
    assert "stopped after 3 of 41 images" in last[-1]  # broken.png, p01.jpg, p01.png


def _descendants_named(pid, text):
    """Processes below `pid` whose command line holds `text` (Ray names an actor's process after it)."""
    parents, names = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                names[int(entry)] = f.read().decode("utf-8", "replace")
        except OSError:
            continue

    def below(p):
        while p in parents and p > 1:
            p = parents[p]
            if p == pid:
                return True
        return False

    return [p for p, name in names.items() if text in name and below(p)]


def test_a_worker_killed_mid_run_still_yields_every_output(ray, work, capsys):
    if not os.path.isdir("/proc"):
        pytest.skip("finds the worker processes through /proc")
    rows, files = _single(work)
    out = work / "killed"
    killed = {}

    def kill_one_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            finished = [n for n in os.listdir(out)] if out.exists() else []
            if any(n.endswith("_overlay.png") for n in finished):  # the run is under way
                workers = _descendants_named(os.getpid(), "SegmentActor")
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed.update(pid=workers[0], done=sum(n.endswith("_overlay.png") for n in finished))
            time.sleep(0.002)

    watcher = threading.Thread(target=kill_one_worker)
    watcher.start()
    try:
        code, ray_rows, err = _segment(work, out, capsys, "--ray", "--ray-actors", "2")
    finally:
        watcher.join()
    assert killed, "no worker was found to kill"
    assert killed["done"] < N_IMAGES - 5, f"the kill came too late to be mid-run: {killed}"
    assert code == 1 and _tree(out) == files
    assert ray_rows == rows
    assert "(raylet) A worker died" in err.replace("\x1b[33m", "").replace("\x1b[0m", "")  # said on stderr


def test_classify_on_ray_writes_the_same_json_lines(ray, work, capsys):
    net = os.path.join(ROOT, "examples", "lenet_deploy.prototxt")
    weights = str(work / "lenet.caffemodel")
    caffeish.Net(net, seed=5).save(weights)
    argv = ["classify", net, weights, str(work / "images"), "--format", "json", "--batch-size", "8", "--top-k", "3"]
    code, out, err = single_machine(*argv)
    assert code == 1 and "broken.png" in err
    assert main(argv + ["--ray"]) == 1
    on_ray = capsys.readouterr()
    assert on_ray.out == out and len(out.splitlines()) == N_IMAGES
    assert "broken.png" in on_ray.err and "ray: 41 images" in on_ray.err


def _dataset(root, n=12):
    rng = np.random.default_rng(5)
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for i in range(n):
        h, w = int(rng.integers(14, 22)), int(rng.integers(16, 26))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"q{i:02d}.png")
        classes = rng.integers(0, 5, (h, w)).astype(np.uint8)  # 4 is no class of the net's 4
        classes[:3, :4] = 255
        label = Image.fromarray(classes, "P")
        label.putpalette(pascal_palette(256).ravel().tolist())
        label.save(root / "labels" / f"q{i:02d}.png")
    build_segmentation(root / "images", root / "labels", root / "ds", val_fraction=0.5, class_names=None)


def test_evaluate_on_ray_gives_the_single_machine_metrics(ray, tmp_path, capsys):
    _dataset(tmp_path)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY)
    weights = str(tmp_path / "w.caffemodel")
    caffeish.Net(str(deploy), seed=3).save(weights)
    for source in (["--db", str(tmp_path / "ds")],
                   ["--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "--mean-value", "9"]):
        argv = ["evaluate", "segmentation", str(deploy), weights, *source, "--ignore-label", "255", "--format", "json"]
        code, out, _ = single_machine(*argv)
        assert code == 0
        single = json.loads(out)
        assert main(argv + ["--ray", "--ray-actors", "2"]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out) == single
        assert single["out_of_range_pixels"] > 0 and np.asarray(single["confusion"]).sum() > 0
        assert f"ray: {single['images']} pairs" in captured.err


def test_ray_option_errors(work, capsys, monkeypatch):
    net, weights = str(work / "fcn.prototxt"), str(work / "fcn.caffemodel")
    assert main(["segment", net, weights, str(work / "images"), "-o", str(work / "x"), "--ray-actors", "2"]) == 1
    assert "--ray-actors needs --ray" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # --ray before the images would take the folder for an address
        main(["classify", net, weights, "--ray", str(work / "images")])
    assert exit_.value.code == 2 and "put --ray after them" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    for argv in (["segment", net, weights, str(work / "images"), "-o", str(work / "x"), "--ray"],
                 ["classify", net, weights, str(work / "images"), "--ray", "auto"],
                 ["evaluate", "segmentation", net, weights, "--db", str(work), "--ray"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install 'caffeish[ray]'" in err, err
    assert not (work / "x").exists()


def test_evaluate_on_ray_needs_pairs(ray, tmp_path, capsys):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY)
    assert main(["evaluate", str(deploy), "none", "--ray"]) == 1
    assert "--ray runs 'caffeish evaluate segmentation'" in capsys.readouterr().err
    assert main(["evaluate", "segmentation", str(deploy), "none", "--ray"]) == 1
    assert "give --db DATASET or --images DIR --labels DIR" in capsys.readouterr().err
