"""The model store: build, serve, list, pull and verify, against a real HTTP server on loopback.

Checksums are compared with hashlib over the whole file (the test's own,
independent computation); the server is caffeish's own, started on port 0.
"""
import hashlib
import json
import os
import shutil

import pytest

from caffeish.tools import cli
from caffeish.apps import download, store
from caffeish.errors import CaffeishError
from caffeish.apps.store_server import StoreHandler, StoreServer
from test_store_models import (CLASSIFIER, FCN, copy_store, make_store, sha1, sha256, write_model)


@pytest.fixture(scope="module")
def built_store(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("store"))
    make_store(root)
    index, failures = store.build_index(root)
    assert failures == []
    return root


@pytest.fixture(scope="module")
def server(built_store):
    with StoreServer(built_store, port=0) as srv:
        yield srv


def _files(entry):
    return {f["name"]: f for f in entry["files"]}


# ---------------------------------------------------------------------------- build


def test_build_writes_an_index_with_metadata_and_checksums(built_store):
    with open(os.path.join(built_store, "index.json")) as f:
        index = json.load(f)
    assert [m["name"] for m in index["models"]] == ["classifier", "fcn"]
    cls, fcn = index["models"]
    assert (cls["task"], cls["input_shape"], cls["classes"]) == ("classification", [1, 3, 8, 8], 5)
    assert (fcn["task"], fcn["input_shape"], fcn["classes"]) == ("segmentation", [1, 3, 16, 16], 3)
    assert cls["title"] == "Tiny Classifier" and cls["license"] == "unrestricted"
    assert cls["description"] == "A five-class classifier generated with fillers, for the store tests."
    assert cls["zoo"]["gist_id"] == "0123abcd"
    assert fcn["description"] == "A miniature FCN with bilinear upsampling"
    assert set(_files(cls)) == {"deploy.prototxt", "weights.caffemodel", "labels.txt", "readme.md"}
    assert set(_files(fcn)) == {"deploy.prototxt", "weights.caffemodel", "mean.binaryproto", "readme.md"}
    for entry in (cls, fcn):
        for name, f in _files(entry).items():
            path = os.path.join(built_store, entry["name"], name)
            assert f["size"] == os.path.getsize(path)
            assert f["sha256"] == sha256(path)
    # sha1 only where the readme gives one: the classifier's caffemodel.
    assert _files(cls)["weights.caffemodel"]["sha1"] == sha1(os.path.join(built_store, "classifier",
                                                                          "weights.caffemodel"))
    assert not any("sha1" in f for f in fcn["files"])


def test_build_refuses_a_model_whose_prototxt_does_not_parse(tmp_path, capsys):
    root = str(tmp_path)
    make_store(root, pad_bytes=0)
    write_model(os.path.join(root, "broken"), CLASSIFIER, seed=3)
    with open(os.path.join(root, "broken", "deploy.prototxt"), "a") as f:
        f.write("layer { name: 'oops' type: \n")
    assert cli.main(["store", "build", root]) == 1
    out = capsys.readouterr().out
    assert "broken" in out and "FAILED" in out and "deploy.prototxt:" in out
    with open(os.path.join(root, "index.json")) as f:
        assert [m["name"] for m in json.load(f)["models"]] == ["classifier", "fcn"]


def test_build_refuses_weights_that_do_not_bind_or_do_not_match_the_readme(tmp_path):
    root = str(tmp_path)
    write_model(os.path.join(root, "fcn"), FCN, seed=2)
    fcn_weights = os.path.join(root, "fcn", "weights.caffemodel")
    # The FCN's conv1 is 4x3x3x3 like the classifier's, but the classifier's fc has no weights there.
    write_model(os.path.join(root, "missing_fc"), CLASSIFIER, seed=1)
    shutil.copy(fcn_weights, os.path.join(root, "missing_fc", "weights.caffemodel"))
    write_model(os.path.join(root, "wrong_shape"), CLASSIFIER.replace("num_output: 4", "num_output: 6"), seed=1)
    shutil.copy(fcn_weights, os.path.join(root, "wrong_shape", "weights.caffemodel"))
    write_model(os.path.join(root, "bad_sha1"), CLASSIFIER, seed=1,
                readme="---\nname: x\nsha1: 0000000000000000000000000000000000000000\n---\n")
    os.makedirs(os.path.join(root, "no_deploy"))
    index, failures = store.build_index(root)
    assert [m["name"] for m in index["models"]] == ["fcn"]
    reasons = dict(failures)
    assert sorted(reasons) == ["bad_sha1", "missing_fc", "no_deploy", "wrong_shape"]
    assert "sha1" in reasons["bad_sha1"] and "0000000000" in reasons["bad_sha1"]
    assert "layers fc " in reasons["missing_fc"] and "no weights" in reasons["missing_fc"]
    assert "'conv1'" in reasons["wrong_shape"] and "(4, 3, 3, 3)" in reasons["wrong_shape"]
    assert "no deploy.prototxt" in reasons["no_deploy"]


# ---------------------------------------------------------------------------- list and pull


def test_list_over_http_and_from_a_directory(server, built_store, capsys):
    assert cli.main(["store", "list", server.url, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["name"], r["task"], r["classes"]) for r in rows] == [
        ("classifier", "classification", 5), ("fcn", "segmentation", 3)]
    assert cli.main(["store", "list", built_store]) == 0
    table = capsys.readouterr().out
    assert "classifier" in table and "segmentation" in table and "3.2 MB" in table
    assert "1,3,16,16" in table


def _parts(outdir):
    """The folder beside OUTDIR where a pull keeps its partial downloads."""
    outdir = os.path.abspath(outdir)
    return os.path.join(os.path.dirname(outdir), f".{os.path.basename(outdir)}{download.PARTS}")


def _assert_same_files(store_dir, name, outdir):
    for fname in os.listdir(os.path.join(store_dir, name)):
        assert sha256(os.path.join(outdir, fname)) == sha256(os.path.join(store_dir, name, fname)), fname
    assert not [n for n in os.listdir(outdir) if n.startswith(".")], "temporary files left behind"
    parent = os.path.dirname(os.path.abspath(outdir))
    assert not [n for n in os.listdir(parent) if n.startswith(".")], "temporary files left beside OUTDIR"


def test_pull_over_http_verifies_and_validates(server, built_store, tmp_path, capsys):
    out = str(tmp_path / "fcn")
    assert cli.main(["store", "pull", server.url, "fcn", "-o", out]) == 0
    assert "net validated" in capsys.readouterr().out
    _assert_same_files(built_store, "fcn", out)
    with open(os.path.join(out, "index.json")) as f:
        local = json.load(f)
    assert local["models"][0]["name"] == "fcn" and local["models"][0]["path"] == "."
    assert cli.main(["store", "verify", out]) == 0
    # Pulling again keeps the identical files and transfers nothing.
    result = download.pull(server.url, "fcn", out)
    assert result["bytes"] == 0 and len(result["kept"]) == 4
    # The classifier's caffemodel is also checked against the readme's sha1.
    out2 = str(tmp_path / "cls")
    result = download.pull(server.url + "index.json", "Tiny Classifier", out2)
    assert result["sha1"] and result["name"] == "classifier"
    _assert_same_files(built_store, "classifier", out2)


def test_pull_never_overwrites_a_different_file_without_force(server, built_store, tmp_path, capsys):
    out = tmp_path / "cls"
    out.mkdir()
    (out / "labels.txt").write_text("mine\n")
    assert cli.main(["store", "pull", server.url, "classifier", "-o", str(out)]) == 1
    assert "labels.txt exists and differs" in capsys.readouterr().err
    assert (out / "labels.txt").read_text() == "mine\n" and sorted(os.listdir(out)) == ["labels.txt"]
    assert cli.main(["store", "pull", server.url, "classifier", "-o", str(out), "--force"]) == 0
    _assert_same_files(built_store, "classifier", str(out))


def test_pull_from_a_directory(built_store, tmp_path):
    out = str(tmp_path / "fcn")
    result = download.pull(built_store, "fcn", out)
    assert result["bytes"] == sum(os.path.getsize(os.path.join(built_store, "fcn", n))
                                  for n in os.listdir(os.path.join(built_store, "fcn")))
    _assert_same_files(built_store, "fcn", out)


def test_pull_of_an_unknown_model_names_the_available_ones(server, tmp_path, capsys):
    assert cli.main(["store", "pull", server.url, "alexnet", "-o", str(tmp_path / "x")]) == 1
    assert "no model named 'alexnet' (models: classifier, fcn)" in capsys.readouterr().err


# ---------------------------------------------------------------------------- interruptions


def _recording_handler(drop_first=(), ignore_range=False):
    """A handler that records each GET's Range header and closes the connection halfway
    through the first response for each file name in `drop_first`."""

    class Handler(StoreHandler):
        ranges = []
        dropped = set()

        def do_GET(self):
            if not self.path.endswith("index.json"):
                Handler.ranges.append((self.path.rsplit("/", 1)[-1], self.headers.get("Range")))
            if ignore_range:
                del self.headers["Range"]
            super().do_GET()

        def send_body(self, f, length):
            name = self.path.rsplit("/", 1)[-1]
            if name in drop_first and name not in Handler.dropped:
                Handler.dropped.add(name)
                self.wfile.write(f.read(length // 2))
                self.close_connection = True
                return
            super().send_body(f, length)

    return Handler


def test_interrupted_pull_resumes_with_a_range_request(built_store, tmp_path):
    handler = _recording_handler(drop_first={"weights.caffemodel"})
    size = os.path.getsize(os.path.join(built_store, "fcn", "weights.caffemodel"))
    out = str(tmp_path / "fcn")
    with StoreServer(built_store, port=0, handler=handler) as srv:
        result = download.pull(srv.url, "fcn", out, retry_wait=0)
    weights = [r for name, r in handler.ranges if name == "weights.caffemodel"]
    assert weights == [None, f"bytes={size // 2}-"]
    assert result["bytes"] == sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)
                                  if n != "index.json")
    _assert_same_files(built_store, "fcn", out)


def test_a_part_left_by_an_earlier_run_is_resumed(built_store, tmp_path):
    handler = _recording_handler()
    src = os.path.join(built_store, "fcn", "weights.caffemodel")
    out = tmp_path / "fcn"
    os.mkdir(_parts(out))
    with open(src, "rb") as f:
        (tmp_path / _parts(out) / "weights.caffemodel.part").write_bytes(f.read(1000))
    with StoreServer(built_store, port=0, handler=handler) as srv:
        result = download.pull(srv.url, "fcn", str(out), retry_wait=0)
    assert ("weights.caffemodel", "bytes=1000-") in handler.ranges
    assert result["bytes"] == sum(os.path.getsize(out / n) for n in os.listdir(out)
                                  if n != "index.json") - 1000
    _assert_same_files(built_store, "fcn", str(out))


def test_a_corrupt_part_is_downloaded_again_from_the_start(built_store, tmp_path):
    handler = _recording_handler()
    out = tmp_path / "fcn"
    os.mkdir(_parts(out))
    (tmp_path / _parts(out) / "weights.caffemodel.part").write_bytes(b"\x00" * 1000)
    with StoreServer(built_store, port=0, handler=handler) as srv:
        download.pull(srv.url, "fcn", str(out), retry_wait=0)
    assert [r for n, r in handler.ranges if n == "weights.caffemodel"] == ["bytes=1000-", None]
    _assert_same_files(built_store, "fcn", str(out))


def test_a_server_that_ignores_ranges_restarts_the_file(built_store, tmp_path):
    handler = _recording_handler(drop_first={"weights.caffemodel"}, ignore_range=True)
    out = str(tmp_path / "fcn")
    with StoreServer(built_store, port=0, handler=handler) as srv:
        download.pull(srv.url, "fcn", out, retry_wait=0)
    assert handler.dropped == {"weights.caffemodel"}
    _assert_same_files(built_store, "fcn", out)


def test_a_dropped_connection_gives_up_after_the_retries_without_progress(built_store, tmp_path):
    class AlwaysDrop(StoreHandler):
        def send_body(self, f, length):
            if self.path.endswith(".caffemodel"):
                self.close_connection = True  # headers, then nothing
            else:
                super().send_body(f, length)

    out = str(tmp_path / "fcn")
    with StoreServer(built_store, port=0, handler=AlwaysDrop) as srv:
        with pytest.raises(CaffeishError, match=r"connection closed at 0.0 MB of 3.1 MB "
                                                r"\(gave up after 2 retries without new data; run the same pull again"):
            download.pull(srv.url, "fcn", out, retries=2, retry_wait=0)
    assert not os.path.exists(os.path.join(out, "weights.caffemodel"))
    assert not os.path.exists(os.path.join(out, "index.json"))


def test_a_corrupted_file_on_the_server_is_caught_by_the_checksum(built_store, tmp_path, capsys):
    root = copy_store(built_store, str(tmp_path / "store"))
    path = os.path.join(root, "fcn", "weights.caffemodel")
    with open(path, "r+b") as f:  # same size, one byte changed deep in the weights
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = tmp_path / "new" / "fcn"
    with StoreServer(root, port=0) as srv:
        assert cli.main(["store", "pull", srv.url, "fcn", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "weights.caffemodel: sha256 checksum mismatch" in err and "deleted" in err
    assert not (tmp_path / "new").exists()  # nothing of the failed pull is left, not even the folders it created
    # verify on the server's folder finds the same file.
    assert cli.main(["store", "verify", root]) == 1
    assert "sha256" in capsys.readouterr().out


# ---------------------------------------------------------------------------- verify


def test_verify_a_model_zoo_folder_by_its_readme_sha1(built_store, tmp_path, capsys):
    folder = shutil.copytree(os.path.join(built_store, "classifier"), str(tmp_path / "cls"))
    assert cli.main(["store", "verify", folder]) == 0
    assert "ok" in capsys.readouterr().out
    with open(os.path.join(folder, "weights.caffemodel"), "ab") as f:
        f.write(b"\0")
    assert cli.main(["store", "verify", folder, "--format", "json"]) == 1
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["check"] == "sha1" and rows[0]["status"].startswith("sha1 ")
    expected = hashlib.sha1(open(os.path.join(folder, "weights.caffemodel"), "rb").read()).hexdigest()
    assert expected in rows[0]["status"]


# ---------------------------------------------------------------------------- untrusted stores


def _rewrite_index(root, change):
    path = os.path.join(root, "index.json")
    with open(path) as f:
        index = json.load(f)
    change(index)
    with open(path, "w") as f:
        json.dump(index, f)


def test_pull_revalidates_the_net(built_store, tmp_path, capsys):
    """A store whose index matches its files but whose net does not bind its weights is refused."""
    root = copy_store(built_store, str(tmp_path / "store"))
    deploy = os.path.join(root, "fcn", "deploy.prototxt")
    with open(deploy, "w") as f:
        f.write(CLASSIFIER)

    def point_at_new_deploy(index):
        entry = _files(index["models"][1])["deploy.prototxt"]
        entry.update(size=os.path.getsize(deploy), sha256=sha256(deploy))

    _rewrite_index(root, point_at_new_deploy)
    out = tmp_path / "fcn"
    with StoreServer(root, port=0) as srv:
        assert cli.main(["store", "pull", srv.url, "fcn", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "downloaded and verified, but the net does not validate" in err and "fc" in err
    assert not out.exists()


@pytest.mark.parametrize("bad", ["../evil.txt", "/etc/evil", ".hidden", "a/b"])
def test_an_index_naming_files_outside_the_model_folder_is_refused(built_store, tmp_path, bad):
    root = copy_store(built_store, str(tmp_path / "store"))
    _rewrite_index(root, lambda index: index["models"][0]["files"][0].update(name=bad))
    with pytest.raises(CaffeishError, match="unsafe file name"):
        download.pull(root, "classifier", str(tmp_path / "out"))
    assert not (tmp_path / "evil.txt").exists()


# ---------------------------------------------------------------------------- memory


def test_validation_reads_the_weights_without_copying_them(built_store):
    from caffeish.formats import io
    path = os.path.join(built_store, "fcn", "weights.caffemodel")
    views, copies = io.read_caffemodel(path, copy=False), io.read_caffemodel(path)
    for (name, v), (_, c) in zip(views.arrays().items(), copies.arrays().items()):
        for a, b in zip(v, c):
            assert not a.flags.writeable and b.flags.writeable  # views over the mapped file vs copies
            assert (a == b).all(), name


def test_pull_memory_does_not_grow_with_the_file(tmp_path):
    """A 24 MB caffemodel is pulled over HTTP, hashed and validated with a few MB of allocations."""
    import tracemalloc
    root = str(tmp_path / "store")
    write_model(os.path.join(root, "big"), FCN, seed=5, pad_bytes=24 << 20)
    store.build_index(root)
    with StoreServer(root, port=0) as srv:
        tracemalloc.start()
        try:
            download.pull(srv.url, "big", str(tmp_path / "out"))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert os.path.getsize(tmp_path / "out" / "weights.caffemodel") > 24 << 20
    assert peak < 8 << 20, f"peak Python allocations {peak / 2**20:.1f} MiB while pulling a 24 MiB file"


# ---------------------------------------------------------------------------- one pull per folder


def test_two_pulls_into_one_folder_at_once_the_second_says_another_is_running(built_store, tmp_path, capsys):
    """The first pull stalls in the middle of the weights; a second pull into the same folder stops at once
    saying another pull is running (it used to write the same .part files and both failed as 'corrupt')."""
    import threading

    stalled, go_on = threading.Event(), threading.Event()

    class Stall(StoreHandler):
        def send_body(self, f, length):
            if self.path.endswith("weights.caffemodel") and not stalled.is_set():
                self.wfile.write(f.read(length // 2))
                self.wfile.flush()
                stalled.set()
                go_on.wait(30)
                length -= length // 2
            super().send_body(f, length)

    out = tmp_path / "fcn"
    first = {}

    def pull_first():
        try:
            first["result"] = download.pull(srv.url, "fcn", str(out), retry_wait=0)
        except BaseException as e:  # reported by the main thread
            first["error"] = e

    with StoreServer(built_store, port=0, handler=Stall) as srv:
        thread = threading.Thread(target=pull_first)
        thread.start()
        try:
            assert stalled.wait(30), "the first pull never reached the weights"
            assert cli.main(["store", "pull", srv.url, "fcn", "-o", str(out)]) == 1
            err = capsys.readouterr().err
            assert "another `caffeish store pull` into this folder is running" in err and str(out) in err
            assert err.count("\n") == 1 and "corrupt" not in err
            with pytest.raises(CaffeishError, match="another `caffeish store pull`"):
                download.pull(built_store, "fcn", str(out))  # from a directory store too
        finally:
            go_on.set()
            thread.join(60)
    assert "error" not in first, first.get("error")
    assert first["result"]["name"] == "fcn"
    _assert_same_files(built_store, "fcn", str(out))  # no lock file or part left behind
    # The folder is free again.
    assert download.pull(built_store, "fcn", str(out))["bytes"] == 0


def test_a_lock_file_left_by_a_killed_pull_does_not_block(built_store, tmp_path):
    out = tmp_path / "fcn"
    out.mkdir()
    (out / download.LOCK).write_bytes(b"")  # where earlier versions kept it: not carried into the new folder
    (tmp_path / f".fcn{download.LOCK}").write_bytes(b"")
    download.pull(built_store, "fcn", str(out))
    _assert_same_files(built_store, "fcn", str(out))


@pytest.mark.parametrize("planted", [f".fcn{download.LOCK}", f".fcn{download.PARTS}",
                                     f".fcn{download.PARTS}/weights.caffemodel.part"])
def test_a_symlink_planted_as_the_lock_or_a_part_is_not_followed(built_store, tmp_path, capsys, planted):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    (tmp_path / "victim_dir").mkdir()
    out = tmp_path / "fcn"
    out.mkdir()
    if "/" in planted:
        (tmp_path / f".fcn{download.PARTS}").mkdir()
    os.symlink(tmp_path / "victim_dir" if planted.endswith(download.PARTS) else victim, tmp_path / planted)
    assert cli.main(["store", "pull", built_store, "fcn", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{planted}: is a symbolic link" in err and "refusing to follow it" in err and err.count("\n") == 1
    assert victim.read_bytes() == b"keep me" and os.path.islink(tmp_path / planted)
    assert os.listdir(tmp_path / "victim_dir") == [] and os.listdir(out) == []


def test_a_symlink_planted_where_earlier_versions_kept_a_part_is_never_written_through(built_store, tmp_path):
    """OUT/.NAME.part was where a part lived: a link planted there (which made a pull append the model's
    bytes to the link's target and report success) is neither written through nor carried over."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    out = tmp_path / "fcn"
    out.mkdir()
    os.symlink(victim, out / ".weights.caffemodel.part")
    download.pull(built_store, "fcn", str(out))
    assert victim.read_bytes() == b"keep me"
    _assert_same_files(built_store, "fcn", str(out))
