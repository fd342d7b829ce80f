"""The web app's workspace: what a request's path may name (plain names inside ROOT, no link followed),
how model folders are read; plus the small workspace the other test_web*.py files share
(`make_workspace`: tiny generated models, image/label folders, a model store)."""
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the web app needs the web extra: pip install 'caffeish[web]'")

from caffeish.apps import store  # noqa: E402
from caffeish.web.workspace import Workspace, WorkspaceError, check_name  # noqa: E402
from test_store_models import CLASSIFIER, FCN, POOLED_CLASSIFIER, make_store, write_model  # noqa: E402

FCN_LABELS = ["background", "thing", "sky"]


def make_workspace(root):
    """models/{fcn,cls,pooled}, data/{images,labels} (6 pairs, palette labels with 3 classes), and a built
    store beside the workspace (returned: (root, store folder))."""
    root = str(root)
    write_model(os.path.join(root, "models", "fcn"), FCN, seed=2, labels=FCN_LABELS)
    write_model(os.path.join(root, "models", "cls"), CLASSIFIER, seed=1,
                labels=["cat", "dog", "bird", "fish", "frog"])
    write_model(os.path.join(root, "models", "pooled"), POOLED_CLASSIFIER, seed=1)
    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(root, "data", sub))
    for k in range(6):
        picture(rng, (24, 32)).save(os.path.join(root, "data", "images", f"p{k}.png"))
        label = np.zeros((24, 32), np.uint8)
        label[:, 10 + k:] = 1
        label[:6] = 2
        img = Image.fromarray(label, "P")
        img.putpalette([0, 0, 0, 200, 30, 30, 40, 90, 220] + [0] * (256 * 3 - 9))
        img.save(os.path.join(root, "data", "labels", f"p{k}.png"))
    shop = os.path.join(os.path.dirname(root), os.path.basename(root) + "-store")
    make_store(shop, pad_bytes=64 << 10)
    index, failures = store.build_index(shop)
    assert not failures
    return root, shop


def picture(rng, hw):
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx // 4 + yy // 4) % 2) * 255], axis=2)
    return Image.fromarray(np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def snapshot(root):
    """{relative path: (size, mtime)} of every file under root (links not followed)."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture()
def ws(tmp_path):
    root, _ = make_workspace(tmp_path / "ws")
    return Workspace(root)


def test_models_are_found_with_their_files(ws):
    names = [m.name for m in ws.models()]
    assert names == ["cls", "fcn", "pooled"]
    fcn = ws.model("fcn")
    assert fcn.deploy.endswith("deploy.prototxt") and fcn.weights.endswith("weights.caffemodel")
    assert fcn.labels and fcn.mean is None and fcn.problem is None


def test_a_folder_with_one_prototxt_and_no_weights_is_a_model_with_fillers(ws):
    folder = os.path.join(ws.root, "models", "bare")
    os.makedirs(folder)
    with open(os.path.join(folder, "net.prototxt"), "w") as f:
        f.write(FCN)
    m = ws.model("bare")
    assert m.deploy.endswith("net.prototxt") and m.weights is None


@pytest.mark.parametrize("bad", ["../x", "models/../../etc", "/etc/passwd", "models/.hidden", "a\x00b",
                                 "models/fcn/../../..", "..", "models\\..\\..", "x/" * 40])
def test_request_paths_stay_inside(ws, bad):
    with pytest.raises(WorkspaceError):
        ws.resolve(bad)


def test_no_symbolic_link_is_followed(ws, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    os.symlink(outside, os.path.join(ws.root, "data", "link"))
    os.symlink(os.path.join(ws.root, "models", "fcn"), os.path.join(ws.root, "models", "alias"))
    with pytest.raises(WorkspaceError, match="symbolic link"):
        ws.resolve("data/link/secret.png")
    with pytest.raises(WorkspaceError, match="symbolic link"):
        ws.model("alias")
    assert "alias" not in [m.name for m in ws.models()]
    assert not any(f.startswith("data/link") for f in ws.folders())


def test_a_linked_weights_file_is_not_read(ws, tmp_path):
    folder = os.path.join(ws.root, "models", "fcn")
    os.replace(os.path.join(folder, "weights.caffemodel"), tmp_path / "w.caffemodel")
    os.symlink(tmp_path / "w.caffemodel", os.path.join(folder, "weights.caffemodel"))
    assert ws.model("fcn").weights is None


def test_names_the_app_creates_are_plain(ws):
    assert check_name("fcn-8s_v1.2") == "fcn-8s_v1.2"
    for bad in ("", ".x", "a/b", "a b", "..", "x" * 101, "<script>"):
        with pytest.raises(WorkspaceError):
            check_name(bad)
    with pytest.raises(WorkspaceError, match="exists already"):
        ws.new_model_path("fcn")


def test_folders_and_stores(ws):
    assert ws.folders()[:3] == ["data", "data/images", "data/labels"]
    with open(os.path.join(ws.root, "stores.txt"), "w") as f:
        f.write("# stores\nhttp://127.0.0.1:9/\n\n")
    assert ws.stores() == ["http://127.0.0.1:9/"]
    assert ws.store_location("http://127.0.0.1:9/") == "http://127.0.0.1:9/"
    with pytest.raises(WorkspaceError):
        ws.store_location("/etc")
