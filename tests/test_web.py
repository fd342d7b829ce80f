"""`caffeish serve` through Starlette's TestClient: every page over a small workspace, checked against
the library the CLI calls (the same rows, classes, offsets), and hostile requests (traversal, huge and
malformed uploads, decompression bombs, other origins) that get one-line errors and leave the workspace
as it was.  tests/test_web_browser.py drives the same app in Chromium."""
import io
import json
import os
import re
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the web app needs the web extra: pip install 'caffeish[web]'")

import caffeish  # noqa: E402
from caffeish.apps import inference, offsets  # noqa: E402
from caffeish.apps.store_server import StoreServer  # noqa: E402
from caffeish.apps.summary import summarize  # noqa: E402
from caffeish.web.app import create_app  # noqa: E402
with warnings.catch_warnings():  # starlette >= 1.9 prefers httpx2 and says so; httpx still works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient  # noqa: E402
from conftest import shared_path  # noqa: E402
from test_web_workspace import FCN_LABELS, make_workspace, picture, snapshot  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root, shop = make_workspace(tmp_path_factory.mktemp("web") / "ws")
    return root, shop


@pytest.fixture(scope="module")
def app(space):
    return create_app(space[0], max_upload=2 << 20, max_pixels=4_000_000)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False, follow_redirects=False) as c:
        yield c


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def finish(app, client, response, ok=True):
    """Follow a task: the POST's redirect, the task to its end, then its page (the result)."""
    assert response.status_code == 303, response.text[:500]
    tid = response.headers["location"].rsplit("/", 1)[1]
    task = app.state.web["tasks"].wait(tid, timeout=60)
    if ok:
        assert task.state == "done", task.message
    return task, client.get(f"/tasks/{tid}", follow_redirects=True)


def png_bomb(side):
    """A tiny PNG whose header says side x side 8-bit gray pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (PNG + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


def error_line(response):
    found = re.search(r'id="error">([^<]*)<', response.text)
    return found.group(1) if found else response.text


# ---------------------------------------------------------------------------- models


def test_home_lists_models_and_datasets(client):
    r = client.get("/")
    assert r.status_code == 200
    for name in ("cls", "fcn", "pooled"):
        assert f'href="/models/{name}"' in r.text


def test_model_page_shows_the_summary_the_cli_computes(client, space):
    r = client.get("/models/fcn")
    assert r.status_code == 200
    s = summarize(os.path.join(space[0], "models", "fcn", "deploy.prototxt"))
    table = r.text[r.text.index('id="layer-table"'):r.text.index("</table>", r.text.index('id="layer-table"'))]
    for row in s["rows"]:
        assert f">{row['name']}</a>" in table
    assert f"<td>{s['totals']['params']:,}</td>" in table and "MACs/image" in table
    # conv1: 4x3x3x3 weights and 4 biases, as the summary splits them
    conv1 = next(r for r in s["rows"] if r["name"] == "conv1")
    assert (conv1["weight_params"], conv1["bias_params"]) == (108, 4)
    assert "<td>108</td><td>4</td>" in table
    # the offsets: the Crop's computed offset agrees with the prototxt (offsets.check says so too)
    assert offsets.check(os.path.join(space[0], "models", "fcn", "deploy.prototxt")) == []
    assert re.search(r'crop-check ok">Crop crop: computed 1, the Crop says 1: agrees', r.text)


def test_network_picture_folds_in_place_layers_and_hides_splits(client):
    r = client.get("/models/fcn/net.svg")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    svg = r.text
    assert svg.startswith("<svg")
    assert "+ relu1 (ReLU)" in svg and "split" not in svg.lower()
    boxes = re.findall(r'<g id="layer&#45;(\d+)" class="node">', svg)
    assert len(boxes) == 6  # data, conv1(+relu1), pool1, score, upscore, crop
    assert 'xlink:href="/models/fcn/layers/' in svg


def test_layer_page_histograms_and_filters(client):
    page = client.get("/models/fcn")
    index = re.search(r'<td>(\d+)</td><td><a href="/models/fcn/layers/\d+">conv1</a>', page.text).group(1)
    r = client.get(f"/models/fcn/layers/{index}")
    assert r.status_code == 200 and "Convolution" in r.text and 'id="blob-stats"' in r.text
    assert "num_output: 4" in r.text
    for url in (f"/models/fcn/layers/{index}/histogram.png", "/models/fcn/filters.png"):
        got = client.get(url)
        assert got.status_code == 200 and got.content.startswith(PNG)
    assert client.get("/models/fcn/layers/99").status_code == 404


def test_fcn8s_page_offsets_and_picture(tmp_path):
    """fcn.berkeleyvision.org's voc-fcn8s (from ../shared): its three Crops agree (5, 9, 31), the picture
    has a box per layer, the in-place ReLUs folded and the Splits hidden."""
    deploy = shared_path("models", "fcn", "voc-fcn8s", "deploy.prototxt")
    os.makedirs(tmp_path / "models" / "fcn8s")
    shutil.copyfile(deploy, tmp_path / "models" / "fcn8s" / "deploy.prototxt")
    with TestClient(create_app(str(tmp_path))) as c:
        page = c.get("/models/fcn8s")
        assert page.status_code == 200 and "134,477,280" in page.text  # summary's parameter total
        checks = re.findall(r'crop-check ok">Crop (\w+): computed (\d+)', page.text)
        assert sorted(int(v) for _, v in checks) == [5, 9, 31]
        svg = c.get("/models/fcn8s/net.svg").text
    assert "+ relu1_1 (ReLU)" in svg and "+ relu7 (ReLU)" in svg
    boxes = re.findall(r'<g id="layer&#45;(\d+)" class="node">', svg)
    net_layers = summarize(deploy)["rows"]
    folded = sum(1 for r in net_layers if r["type"] in ("ReLU", "Dropout") or r["type"] == "Split")
    assert len(boxes) == len(net_layers) - folded


# ---------------------------------------------------------------------------- inference


def same_classes_as_the_library(client, task, space, img):
    """The result's class map is caffeish.segment's (the CLI's library call) on the same image."""
    rid = task.next_url.rsplit("/", 1)[1]
    classes = np.frombuffer(client.get(f"/results/{rid}/0/classes.bin").content, np.uint8)
    folder = os.path.join(space[0], "models", "fcn")
    seg = caffeish.segment(os.path.join(folder, "deploy.prototxt"), img,
                           weights=os.path.join(folder, "weights.caffemodel"))
    assert np.array_equal(classes.reshape(seg.classes.shape), seg.classes)
    return seg


def test_segmentation_gives_the_classes_of_the_library(app, client, space):
    img = picture(np.random.default_rng(5), (30, 41))
    r = client.post("/models/fcn/infer", files=[("images", ("a.png", png_bytes(img), "image/png"))])
    task, page = finish(app, client, r)
    assert page.status_code == 200 and 'class="grid legend"' in page.text
    seg = same_classes_as_the_library(client, task, space, img)
    for c in np.unique(seg.classes):
        share = 100.0 * np.count_nonzero(seg.classes == c) / seg.classes.size
        assert f"{c} {FCN_LABELS[c]}</td><td>{np.count_nonzero(seg.classes == c):,}</td><td>{share:.1f}%" in page.text
    rid = task.next_url.rsplit("/", 1)[1]
    for kind in ("image", "classmap"):
        got = client.get(f"/results/{rid}/0/{kind}.png")
        assert Image.open(io.BytesIO(got.content)).size == (41, 30)


def test_classification_top5_and_visualizations(app, client, space):
    img = picture(np.random.default_rng(6), (8, 8))
    r = client.post("/models/cls/infer", files=[("images", ("b.png", png_bytes(img), "image/png"))],
                    data={"visualize": "on"})
    task, page = finish(app, client, r)
    folder = os.path.join(space[0], "models", "cls")
    top = inference.classify(os.path.join(folder, "deploy.prototxt"), [img],
                             weights=os.path.join(folder, "weights.caffemodel"), top_k=5).top
    names = ["cat", "dog", "bird", "fish", "frog"]
    shown = re.findall(r"<tr><td>(\w+)</td><td class=\"bar\">", page.text)
    assert shown == [names[i] for i in top[0]]
    assert "Visualizations and statistics" in page.text and "conv1 1x4x6x6" in page.text
    rid = task.next_url.rsplit("/", 1)[1]
    assert client.get(f"/results/{rid}/0/act0.png").content.startswith(PNG)


def test_big_images_run_in_tiles_with_progress(app, client, space):
    img = picture(np.random.default_rng(7), (60, 90))
    r = client.post("/models/fcn/infer", files=[("images", ("big.png", png_bytes(img), "image/png"))],
                    data={"tile": "32x32"})
    task, page = finish(app, client, r)
    assert any(s.startswith("tiles of 90x60") for s in task.stages), task.stages
    same_classes_as_the_library(client, task, space, img)


# ---------------------------------------------------------------------------- datasets


def test_build_a_dataset_then_browse_it_and_segment_a_record(app, client, space):
    r = client.post("/datasets", data={"name": "tiny", "images": "data/images", "labels": "data/labels",
                                       "val_fraction": "0.34"})
    task, page = finish(app, client, r)
    assert page.status_code == 200 and "tiny" in page.text
    meta = json.load(open(os.path.join(space[0], "datasets", "tiny", "dataset.json")))
    assert meta["splits"]["train"]["records"] + meta["splits"]["val"]["records"] == 6
    legend = re.findall(r"<td>(\d) (class\d)</td><td>([\d.]+)%</td>", page.text)
    assert [int(i) for i, _, _ in legend] == [0, 1, 2]
    assert abs(sum(float(s) for _, _, s in legend) - 100) < 0.5
    assert page.text.count('class="sample"') == meta["splits"]["train"]["records"]
    for kind in ("image", "label", "overlay"):
        got = client.get(f"/datasets/tiny/samples/train/0/{kind}.png")
        assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (32, 24)
    assert client.get("/datasets/tiny/distribution.png").content.startswith(PNG)
    r = client.post("/models/fcn/infer", data={"dataset": "tiny", "split": "val", "record": "0"})
    task, page = finish(app, client, r)
    assert "tiny/val/0" in page.text and 'class="grid legend"' in page.text
    # the same name again is refused before anything is built
    again = client.post("/datasets", data={"name": "tiny", "images": "data/images", "labels": "data/labels"})
    assert again.status_code == 404 and "exists already" in error_line(again)


# ---------------------------------------------------------------------------- surgery and offsets


def test_surgery_writes_new_models_and_leaves_the_source_alone(app, client, space):
    before = snapshot(os.path.join(space[0], "models", "pooled"))
    r = client.post("/models/pooled/surgery", data={"operation": "convolutionalize", "name": "pooled-conv"})
    task, page = finish(app, client, r)
    assert page.url.path == "/models/pooled-conv" and "<td>InnerProduct</td>" not in page.text
    assert "<td>Convolution</td>" in page.text
    r = client.post("/models/pooled/surgery", data={"operation": "fcn", "name": "pooled-fcn", "classes": "3"})
    task, page = finish(app, client, r)
    assert "Deconvolution" in page.text and re.search(r'crop-check ok">Crop score: computed \d+', page.text)
    assert snapshot(os.path.join(space[0], "models", "pooled")) == before
    # a Crop with a wrong offset: the page says MISMATCH, and fix-offsets writes a corrected copy
    folder = os.path.join(space[0], "models", "wrong")
    os.makedirs(folder)
    text = open(os.path.join(space[0], "models", "fcn", "deploy.prototxt")).read()
    with open(os.path.join(folder, "deploy.prototxt"), "w") as f:
        f.write(text.replace("offset: 1", "offset: 2"))
    assert "computed 1, the Crop says 2: MISMATCH" in client.get("/models/wrong").text
    r = client.post("/models/wrong/surgery", data={"operation": "fix-offsets", "name": "wrong-fixed"})
    task, page = finish(app, client, r)
    assert "agrees" in page.text
    assert "offset: 2" in open(os.path.join(folder, "deploy.prototxt")).read()
    # an offset past the reference: the shapes do not infer, the page says so and still shows the check
    with open(os.path.join(folder, "deploy.prototxt"), "w") as f:
        f.write(text.replace("offset: 1", "offset: 3"))
    page = client.get("/models/wrong")
    assert page.status_code == 200 and 'id="summary-error"' in page.text and "MISMATCH" in page.text


def test_import_from_a_store_over_http(app, client, space):
    with StoreServer(space[1], port=0) as server:
        listing = client.get("/models", headers={})  # the stores of --store / stores.txt: none here
        assert "No store configured" in listing.text
        r = client.post("/import", data={"store": server.url, "model": "fcn", "name": "fcn-imported"})
        task, page = finish(app, client, r)
    assert page.url.path == "/models/fcn-imported" and "Deconvolution" in page.text
    assert any(s.endswith("[B]") for s in task.stages), task.stages  # the download's bytes, as the CLI's bar
    assert os.path.isfile(os.path.join(space[0], "models", "fcn-imported", "index.json"))


def test_a_store_that_does_not_answer_is_one_line_on_the_models_page(space, tmp_path):
    app = create_app(space[0], stores=["http://127.0.0.1:9/"])
    with TestClient(app) as c:
        r = c.get("/models")
    assert r.status_code == 200 and re.search(r'<p class="error">[^<]*127\.0\.0\.1:9[^<]*</p>', r.text)


# ---------------------------------------------------------------------------- hostile requests


@pytest.mark.parametrize("url", ["/models/..%2F..%2Fetc", "/models/%2e%2e", "/models/fcn/layers/-1",
                                 "/models/fcn/layers/x", "/datasets/..%2Fmodels", "/results/999",
                                 "/results/1/99/image.png", "/tasks/999", "/datasets/tiny/samples/x/0/image.png",
                                 "/static/../app.py", "/models/fcn/layers/0/histogram.png"])
def test_traversal_and_unknown_paths_are_one_line_errors(client, url):
    r = client.get(url)
    assert r.status_code in (400, 404), (url, r.status_code)
    assert "Traceback" not in r.text and "\n" not in error_line(r)


def test_hostile_uploads_are_refused_and_the_workspace_is_intact(app, client, space):
    before = snapshot(space[0])
    huge = client.post("/models/fcn/infer", files=[("images", ("h.png", b"\0" * (3 << 20), "image/png"))])
    assert huge.status_code == 413 and "larger than the limit" in huge.text
    bad = client.post("/models/fcn/infer", files=[("images", ("x.png", b"\x89PNG\r\n\x1a\nnot really", "image/png"))])
    assert bad.status_code == 400 and "x.png: not a readable image (OSError: Truncated File Read)" in error_line(bad)
    text = client.post("/models/fcn/infer", files=[("images", ("t.png", b"hello", "text/plain"))])
    assert text.status_code == 400 and "t.png: not an image file" in error_line(text)
    cut = png_bytes(picture(np.random.default_rng(1), (40, 40)))[:300]
    cut = client.post("/models/fcn/infer", files=[("images", ("cut.png", cut, "image/png"))])
    assert cut.status_code == 400 and "cut.png: not a readable image" in error_line(cut)
    # decompression bombs: a few KB of PNG that would decode to 5000x5000 (over this app's limit of 4M
    # pixels) or 30000x30000 pixels (over Pillow's own), refused before decoding
    r = client.post("/models/fcn/infer", files=[("images", ("bomb.png", png_bomb(5000), "image/png"))])
    assert r.status_code == 400 and "bomb.png: 5000x5000 pixels is over the limit" in error_line(r)
    r = client.post("/models/fcn/infer", files=[("images", ("bomb.png", png_bomb(30000), "image/png"))])
    assert r.status_code == 400 and "bomb.png: refused" in error_line(r)
    none = client.post("/models/fcn/infer", data={"mean": "auto"})
    assert none.status_code == 400 and "no image" in error_line(none)
    away = client.post("/datasets", data={"name": "evil", "images": "../../etc", "labels": "data/labels"})
    assert away.status_code == 404 and "not a path inside the workspace" in error_line(away)
    name = client.post("/models/fcn/surgery", data={"operation": "convolutionalize", "name": "../../x"})
    assert name.status_code == 404
    store = client.post("/import", data={"store": "/etc", "model": "x", "name": "x"})
    assert store.status_code == 404
    other = client.post("/models/fcn/surgery", data={"operation": "convolutionalize", "name": "x1"},
                        headers={"Origin": "http://evil.example"})
    assert other.status_code == 403
    json_error = client.get("/tasks/999.json")
    assert json_error.status_code == 404 and json_error.json()["error"].startswith("error: ")
    assert snapshot(space[0]) == before


def test_only_local_host_names_when_bound_to_localhost(space):
    app = create_app(space[0], allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert c.get("/").status_code == 200
    with TestClient(app, base_url="http://rebound.example") as c:
        assert c.get("/").status_code == 400


def test_serve_command_binds_localhost_and_warns_for_other_hosts(space, monkeypatch, capsys):
    import uvicorn

    from caffeish.tools.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app, host=host, port=port))
    assert main(["serve", "--root", space[0], "--port", "5123"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 5123
    assert "warning" not in capsys.readouterr().err
    assert main(["serve", "--root", space[0], "--host", "0.0.0.0"]) == 0
    assert "warning: serving on 0.0.0.0" in capsys.readouterr().err
    assert main(["serve", "--root", os.path.join(space[0], "nowhere")]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_serve_jobs_option(space, monkeypatch, capsys):
    import uvicorn

    from caffeish.tools.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app))
    assert main(["serve", "--root", space[0], "--jobs", "3"]) == 0
    assert seen["app"].state.web["jobs"].max_running == 3
    with pytest.raises(SystemExit):
        main(["serve", "--root", space[0], "--jobs", "0"])
    assert "--jobs" in capsys.readouterr().err
