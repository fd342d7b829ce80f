"""The model store against hostile servers, clients, stores and kills (issue 20's store items).

Servers here are written in the test: raw sockets on 127.0.0.1 that answer as a broken or malicious
server would (416 to every range, a zero-length 206, one byte a second, a 3 GB index, a redirect
loop, ...).  Every case must end with one clear CaffeishError line (or a success), quickly, with
nothing left where it does not belong.  `_within` turns a hang into a test failure.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from caffeish.apps import download, store
from caffeish.apps.store_server import StoreServer, parse_range
from caffeish.errors import CaffeishError
from caffeish.tools import cli
from test_store_models import CLASSIFIER, sha256, write_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = "weights.caffemodel"


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A store with one small model 'cls' (a ~260 kB caffemodel)."""
    root = str(tmp_path_factory.mktemp("store"))
    write_model(os.path.join(root, "cls"), CLASSIFIER, seed=1, labels=["a", "b", "c", "d", "e"],
                pad_bytes=256 << 10)
    _, failures = store.build_index(root)
    assert failures == []
    return root


def _within(seconds, fn):
    """fn()'s result (or its exception), failing the test when it runs longer than `seconds`."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # handed to the test's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s (a hang)")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _send(conn, status, headers=None, body=b""):
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    conn.sendall(head.encode("latin-1") + b"Connection: close\r\n\r\n" + body)


class Raw:
    """A hostile HTTP server: answer(method, path, headers, conn) writes whatever it likes, in a thread per
    connection (urllib sends one request per connection)."""

    def __init__(self, answer):
        self.answer, self.count, self.closed = answer, 0, threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            conn.settimeout(20)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                lines = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)}
                self.count += 1
                self.answer(method, path, headers, conn)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed.set()
        self.sock.close()


def _file(root, path):
    with open(os.path.join(root, *path.lstrip("/").split("/")), "rb") as f:
        return f.read()


def _honest(root):
    """answer() of a plain server of `root` (no ranges), for what a hostile answer does not change."""
    def answer(method, path, headers, conn):
        data = _file(root, path)
        _send(conn, "200 OK", {"Content-Length": len(data)}, data)
    return answer


def _hostile_weights(root, weights_answer):
    """answer() serving index.json and small files honestly and the caffemodel through weights_answer."""
    honest = _honest(root)

    def answer(method, path, headers, conn):
        if path.endswith(".caffemodel"):
            weights_answer(_file(root, path), headers, conn)
        else:
            honest(method, path, headers, conn)
    return answer


def _one_line(message):
    assert "\n" not in message and "\x1b" not in message and "Traceback" not in message, message
    return message


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


# ---------------------------------------------------------------------------- item 2: bounded attempts


def test_a_server_refusing_ranges_and_dropping_whole_answers_is_given_up(store_dir, tmp_path):
    """416 to every range, the whole file dropped halfway: each restart from byte 0 used to count as progress,
    so the pull looped forever."""
    def weights(data, headers, conn):
        if "range" in headers:
            _send(conn, "416 Range Not Satisfiable", {"Content-Range": f"bytes */{len(data)}", "Content-Length": 0})
        else:
            _send(conn, "200 OK", {"Content-Length": len(data)}, data[:len(data) // 2])

    out = str(tmp_path / "out")
    with Raw(_hostile_weights(store_dir, weights)) as srv:
        with pytest.raises(CaffeishError) as e:
            _within(20, lambda: download.pull(srv.url, "cls", out, retries=2, retry_wait=0))
    message = _one_line(str(e.value))
    assert "gave up after 2 retries without new data" in message and "(HTTP 416)" in message
    assert srv.count < 12 and not os.path.exists(out)


def test_a_zero_length_206_that_restarts_at_byte_0_is_given_up(store_dir, tmp_path):
    """A 206 whose Content-Range says byte 0 and whose body is empty: a restart, then the same again."""
    def weights(data, headers, conn):
        if "range" in headers:
            _send(conn, "206 Partial Content", {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}",
                                                "Content-Length": 0})
        else:
            _send(conn, "200 OK", {"Content-Length": len(data)}, data[:1000])

    with Raw(_hostile_weights(store_dir, weights)) as srv:
        with pytest.raises(CaffeishError, match="gave up after 3 retries without new data") as e:
            _within(20, lambda: download.pull(srv.url, "cls", str(tmp_path / "out"), retries=3, retry_wait=0))
    _one_line(str(e.value))
    assert srv.count < 15


def test_a_server_sending_a_little_more_each_time_is_bounded_by_the_attempts_in_all(store_dir, tmp_path):
    """1 kB more per connection is progress every time: the attempts in all still end it."""
    def weights(data, headers, conn):
        start = int(headers["range"][6:-1]) if "range" in headers else 0
        end = min(start + 1000, len(data))
        _send(conn, "206 Partial Content", {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}",
                                            "Content-Length": len(data) - start}, data[start:end])

    with Raw(_hostile_weights(store_dir, weights)) as srv:
        with pytest.raises(CaffeishError, match=r"gave up after 12 failed attempts in all"):
            _within(20, lambda: download.pull(srv.url, "cls", str(tmp_path / "out"), retries=2, retry_wait=0))


@pytest.mark.parametrize("raw, expected", [
    (b"HTTP/1.1 204 No Content\r\n\r\n", "unexpected HTTP 204"),
    (b"\x1b[31mgarbage\r\n\r\n", "BadStatusLine: \\x1b[31mgarbage"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "IncompleteRead"),
    (b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n", "HTTP 999"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n", "got more than 100 headers"),
])
def test_broken_answers_for_a_file(store_dir, tmp_path, raw, expected):
    def weights(data, headers, conn):
        conn.sendall(raw)

    with Raw(_hostile_weights(store_dir, weights)) as srv:
        with pytest.raises(CaffeishError) as e:
            _within(20, lambda: download.pull(srv.url, "cls", str(tmp_path / "out"), retries=1, retry_wait=0))
    assert expected in _one_line(str(e.value))
    assert not (tmp_path / "out").exists()


def test_a_fifo_in_a_store_is_not_served_nor_pulled(tmp_path):
    root = tmp_path / "store"
    write_model(str(root / "cls"), CLASSIFIER, seed=1)
    store.build_index(str(root))
    os.unlink(root / "cls" / "deploy.prototxt")
    os.mkfifo(root / "cls" / "deploy.prototxt")
    with StoreServer(str(root), port=0) as srv:
        assert _within(10, lambda: _get_status(srv, "/cls/deploy.prototxt")) == 404
    with pytest.raises(CaffeishError, match="deploy.prototxt: not a regular file"):
        _within(10, lambda: download.pull(str(root), "cls", str(tmp_path / "out")))


# ---------------------------------------------------------------------------- item 4: bounded reads and time


def test_an_index_of_3_GB_is_refused_at_once(tmp_path, capsys):
    def answer(method, path, headers, conn):
        _send(conn, "200 OK", {"Content-Length": 3 << 30}, b'{"models": [')
        time.sleep(5)

    with Raw(answer) as srv:
        start = time.monotonic()
        assert _within(20, lambda: cli.main(["store", "list", srv.url, "--timeout", "3"])) == 1
        assert time.monotonic() - start < 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "larger than 16.8 MB; not a model store index" in err


def test_an_endless_index_is_cut_at_the_limit(tmp_path):
    def answer(method, path, headers, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        while True:
            conn.sendall(b" " * (1 << 20))

    with Raw(answer) as srv:
        with pytest.raises(CaffeishError, match="larger than 16.8 MB; not a model store index"):
            _within(20, lambda: download.read_index(srv.url))


def _trickle(prefix, delay=0.05):
    """answer() that sends `prefix`, then one byte every `delay` seconds."""
    def answer(method, path, headers, conn):
        conn.sendall(prefix)
        while True:
            conn.sendall(b" ")
            time.sleep(delay)
    return answer


def test_an_index_at_a_few_bytes_a_second_is_given_up(tmp_path):
    with Raw(_trickle(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")) as srv:
        with pytest.raises(CaffeishError, match=r"slower than the minimum 1.0 kB/s \(--min-rate\)") as e:
            _within(20, lambda: download.read_index(srv.url, min_rate=1000, rate_window=1.0))
    _one_line(str(e.value))


def test_headers_at_a_few_bytes_a_second_are_given_up(tmp_path):
    """http.client reads headers line by line, each byte restarting the socket timeout: a whole response's
    headers must arrive within --timeout."""
    with Raw(_trickle(b"HTTP/1.1 200 OK\r\nX-Slow: ", 0.05)) as srv:
        start = time.monotonic()
        with pytest.raises(CaffeishError, match=r"no response within 1 s \(gave up after 1 retries\)"):
            _within(20, lambda: download.read_index(srv.url, timeout=1, retries=1, retry_wait=0))
        assert time.monotonic() - start < 6


def test_a_file_at_a_few_bytes_a_second_is_given_up_and_can_be_resumed(store_dir, tmp_path):
    def weights(data, headers, conn):
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        for i in range(len(data)):
            conn.sendall(data[i:i + 1])
            time.sleep(0.05)

    out = tmp_path / "out"
    with Raw(_hostile_weights(store_dir, weights)) as srv:
        with pytest.raises(CaffeishError, match=r"slower than the minimum 1.0 kB/s \(--min-rate\); run the same "
                                                r"pull again to resume"):
            _within(20, lambda: download.pull(srv.url, "cls", str(out), min_rate=1000, rate_window=1.0))
    assert not out.exists()
    parts = tmp_path / f".out{download.PARTS}"
    assert 0 < os.path.getsize(parts / f"{WEIGHTS}.part") < 1000  # kept for the next pull
    result = download.pull(store_dir, "cls", str(out))  # resumes from the directory store
    assert result["bytes"] < sum(f["size"] for f in store.read_index(store_dir)["models"][0]["files"])
    assert sha256(out / WEIGHTS) == sha256(os.path.join(store_dir, "cls", WEIGHTS)) and _leftovers(tmp_path) == []


def test_the_overall_time_limit(store_dir, tmp_path, capsys):
    def weights(data, headers, conn):  # 20 kB/s: above the minimum rate, too slow for --max-time 1
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        for i in range(0, len(data), 2000):
            conn.sendall(data[i:i + 2000])
            time.sleep(0.1)

    with Raw(_hostile_weights(store_dir, weights)) as srv:
        code = _within(20, lambda: cli.main(["store", "pull", srv.url, "cls", "-o", str(tmp_path / "out"),
                                             "--max-time", "1"]))
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "the pull's time limit of 1 s (--max-time) ran out" in err


# ---------------------------------------------------------------------------- item 8: tracebacks, pull side


def test_a_content_length_that_is_not_ascii_digits(store_dir, tmp_path):
    """`Content-Length: ²` (byte 0xb2: headers are latin-1) is a digit to str.isdigit and not a number to
    int(): it is ignored, and the body read to the end."""
    def weights(data, headers, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\nConnection: close\r\n\r\n" + data)

    out = tmp_path / "out"
    with Raw(_hostile_weights(store_dir, weights)) as srv:
        _within(20, lambda: download.pull(srv.url, "cls", str(out)))
    assert sha256(out / WEIGHTS) == sha256(os.path.join(store_dir, "cls", WEIGHTS))


@pytest.mark.parametrize("content_range", ["bytes " + "9" * 5000 + "-1/2", "bytes ²-3/4", "bytes 5-1/9", "x"])
def test_a_malformed_content_range(store_dir, tmp_path, content_range):
    def weights(data, headers, conn):
        _send(conn, "206 Partial Content", {"Content-Range": content_range, "Content-Length": 1}, b"x")

    with Raw(_hostile_weights(store_dir, weights)) as srv:
        with pytest.raises(CaffeishError, match="malformed Content-Range") as e:
            _within(20, lambda: download.pull(srv.url, "cls", str(tmp_path / "out")))
    assert len(str(e.value)) < 400


def _serve_index(text):
    def answer(method, path, headers, conn):
        body = text.encode("utf-8")
        _send(conn, "200 OK", {"Content-Length": len(body)}, body)
    return answer


@pytest.mark.parametrize("text, expected", [
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"models": [], "x": ' + "1" * 5000 + "}", "not a model store index"),
    ('{"models": [{"name": "m", "files": [{"name": "a", "size": 1e999, "sha256": "' + "0" * 64 + '"}]}]}',
     "lacks its size"),
    ('{"models": [{"name": "m", "files": [{"name": "a\\u001b[2J", "size": 1, "sha256": "' + "0" * 64 + '"}]}]}',
     "unsafe file name 'a\\x1b[2J'"),
    ('{"models": [{"name": "m", "files": [{"name": "index.json", "size": 1, "sha256": "' + "0" * 64 + '"}]}]}',
     "cannot include its folder's index.json"),
    ('{"models": [{"name": "m", "path": "a/../../b", "files": []}]}', "lists no files"),
    ('{"models": [{"name": "m", "path": "a/../../b", "files": [{"name": "x", "size": 1, "sha256": "' + "0" * 64
     + '"}]}]}', "unsafe path 'a/../../b'"),
])
def test_a_hostile_index_is_one_clean_error(tmp_path, text, expected):
    with Raw(_serve_index(text)) as srv:
        with pytest.raises(CaffeishError) as e:
            _within(20, lambda: download.pull(srv.url, "m", str(tmp_path / "out")))
    assert expected in _one_line(str(e.value))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("inputs", ["data", {"data": "1,3,8,8"}, [1, 3, 8, 8], {"data": [1, -3]}, {"": [1]},
                                    {"data": [[1]]}])
def test_index_inputs_of_the_wrong_type_are_refused_before_the_download(store_dir, tmp_path, inputs):
    index = store.read_index(store_dir)
    index["models"][0]["inputs"] = inputs
    with Raw(_serve_index(json.dumps(index))) as srv:
        with pytest.raises(CaffeishError, match="'inputs' must map input names to shapes"):
            _within(20, lambda: download.pull(srv.url, "cls", str(tmp_path / "out")))
        assert srv.count == 1  # the index only: nothing downloaded
    assert os.listdir(tmp_path) == []


def test_an_index_claiming_more_than_the_free_space_downloads_nothing(store_dir, tmp_path):
    index = store.read_index(store_dir)
    index["models"][0]["files"][0]["size"] = 1 << 49
    with Raw(_serve_index(json.dumps(index))) as srv:
        with pytest.raises(CaffeishError, match=r"needs .* more, but only .* is free there \(nothing was downloaded"):
            _within(20, lambda: download.pull(srv.url, "cls", str(tmp_path / "out")))
        assert srv.count == 1
    assert os.listdir(tmp_path) == []


def test_a_redirect_loop_is_one_line(tmp_path, capsys):
    def answer(method, path, headers, conn):
        _send(conn, "302 Found", {"Location": path, "Content-Length": 0})

    with Raw(answer) as srv:
        assert _within(20, lambda: cli.main(["store", "list", srv.url])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a redirect loop or more than 10 redirects" in err


def test_control_characters_from_a_server_are_escaped(store_dir, tmp_path, capsys):
    def answer(method, path, headers, conn):
        conn.sendall(b"HTTP/1.1 404 Not\x1b[31m Found\x07\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    with Raw(answer) as srv:
        with pytest.raises(CaffeishError) as e:
            _within(20, lambda: download.read_index(srv.url))
    assert "Not\\x1b[31m Found\\x07" in _one_line(str(e.value))
    index = store.read_index(store_dir)
    index["models"][0].update(name="evil\x1b]0;pwned\x07\nname", description="two\nlines\x1b[2J")
    with Raw(_serve_index(json.dumps(index))) as srv:
        assert cli.main(["store", "list", srv.url]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out and "two\\nlines\\x1b[2J" in out
        with pytest.raises(CaffeishError) as e:
            download.pull(srv.url, "nothing", str(tmp_path / "out"))
    assert "evil\\x1b]0;pwned\\x07\\nname" in _one_line(str(e.value))


# ---------------------------------------------------------------------------- item 8: the output folder


def test_pull_into_a_file_or_over_a_folder(store_dir, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_bytes(b"mine")
    assert cli.main(["store", "pull", store_dir, "cls", "-o", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not a folder" in err and target.read_bytes() == b"mine"
    out = tmp_path / "out"
    (out / WEIGHTS).mkdir(parents=True)
    (out / WEIGHTS / "inside").write_bytes(b"x")
    assert cli.main(["store", "pull", store_dir, "cls", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and differs from the store's copy (a folder)" in err
    assert cli.main(["store", "pull", store_dir, "cls", "-o", str(out), "--force"]) == 0
    assert sha256(out / WEIGHTS) == sha256(os.path.join(store_dir, "cls", WEIGHTS))
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- item 7 and 8: the server


def _connect(srv):
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def test_the_server_closes_idle_connections_and_caps_them(store_dir):
    with StoreServer(store_dir, port=0, timeout=0.5, max_connections=3) as srv:
        idle = [_connect(srv) for _ in range(3)]
        for s in idle:
            s.sendall(b"GET /index.json HTTP/1.1\r\n")  # and never the end of the request
        time.sleep(0.2)
        extra = _connect(srv)
        extra.sendall(b"GET /index.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert extra.recv(100).startswith(b"HTTP/1.1 503")  # at once: every slot is taken
        start = time.monotonic()
        for s in idle:
            while s.recv(1000):  # the server answers 408 or just closes: then EOF
                pass
        assert time.monotonic() - start < 5
        deadline = time.monotonic() + 5
        while _within(10, lambda: _get_status(srv, "/index.json")) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)  # a slot is freed just after its socket is closed
        assert _get_status(srv, "/index.json") == 200  # the slots are free again
        for s in idle + [extra]:
            s.close()


def _get_status(srv, path, headers=""):
    s = _connect(srv)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return int(data.split(b" ", 2)[1])
    finally:
        s.close()


def test_a_range_of_thousands_of_digits(store_dir):
    import io as pyio

    assert parse_range("bytes=" + "9" * 5000 + "-", 10) == "unsatisfiable"
    assert parse_range("bytes=0-" + "9" * 5000, 10) == (0, 9)
    assert parse_range("bytes=-" + "9" * 5000, 10) == (0, 9)
    assert parse_range("bytes=" + "0" * 5000 + "1-", 10) == (1, 9)
    assert parse_range("bytes=²-", 10) is None
    log = pyio.StringIO()
    with StoreServer(store_dir, port=0, log=log) as srv:
        assert _get_status(srv, "/cls/" + WEIGHTS, "Range: bytes=" + "9" * 5000 + "-\r\n") == 416
        assert _get_status(srv, "/cls/" + WEIGHTS, "Range: bytes=0-" + "9" * 5000 + "\r\n") == 206
        assert _get_status(srv, "/cls/%1b[31m%0a") == 404
    assert "Traceback" not in log.getvalue() and "ValueError" not in log.getvalue()
    assert "\x1b" not in log.getvalue() and "%1b[31m%0a" in log.getvalue()


def test_serve_refuses_bad_ports_and_hosts_in_one_line(store_dir, capsys):
    for port in ("70000", "-1"):
        with pytest.raises(SystemExit) as e:
            cli.main(["store", "serve", store_dir, "--port", port])
        assert e.value.code == 2 and "argument --port: must be" in capsys.readouterr().err
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = str(taken.getsockname()[1])
        assert cli.main(["store", "serve", store_dir, "--port", port]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the port is in use" in err and "serving" not in err
    finally:
        taken.close()
    assert cli.main(["store", "serve", store_dir, "--host", "no-such-host.invalid", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown host" in err and "serving" not in err


def test_links_to_hidden_files_or_out_of_the_store(tmp_path, capsys):
    """The server refuses a link inside the store to a hidden file; build refuses links leaving the store
    or reaching a hidden file (a pull from a directory store too), and never indexes what is outside."""
    root = tmp_path / "store"
    write_model(str(root / "cls"), CLASSIFIER, seed=1)
    (root / "cls" / ".secret").write_bytes(b"secret")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "notes.txt").write_bytes(b"secret")
    (tmp_path / "outside.txt").write_bytes(b"outside")
    store.build_index(str(root))
    os.symlink(".secret", root / "cls" / "shown.txt")
    os.symlink("../.hidden/notes.txt", root / "cls" / "notes.txt")
    with StoreServer(str(root), port=0) as srv:
        assert _get_status(srv, "/cls/shown.txt") == 404 and _get_status(srv, "/cls/notes.txt") == 404
        assert _get_status(srv, "/cls/labels.txt") in (404,) and _get_status(srv, "/cls/deploy.prototxt") == 200
    index, failures = store.build_index(str(root))
    assert index["models"] == [] and "a hidden or unnamable file of the store" in failures[0][1]
    os.unlink(root / "cls" / "shown.txt")
    os.unlink(root / "cls" / "notes.txt")
    os.symlink(tmp_path / "outside.txt", root / "cls" / "outside.txt")
    shutil.copytree(root / "cls", tmp_path / "elsewhere", symlinks=True)
    os.symlink(tmp_path / "elsewhere", root / "linked")
    assert cli.main(["store", "build", str(root)]) == 1
    out = capsys.readouterr().out
    assert out.count("outside the store") >= 2 and "FAILED" in out
    assert store.read_index(str(root))["models"] == []


def test_a_directory_store_does_not_copy_files_from_outside(tmp_path):
    root = tmp_path / "store"
    write_model(str(root / "cls"), CLASSIFIER, seed=1)
    store.build_index(str(root))
    (tmp_path / "outside").write_bytes((root / "cls" / "deploy.prototxt").read_bytes())
    os.unlink(root / "cls" / "deploy.prototxt")
    os.symlink(tmp_path / "outside", root / "cls" / "deploy.prototxt")
    with pytest.raises(CaffeishError, match="outside the store"):
        download.pull(str(root), "cls", str(tmp_path / "out"))


# ---------------------------------------------------------------------------- item 6: no code runs


PYTHON_NET = CLASSIFIER.replace('bottom: "conv1" top: "fc"', 'bottom: "py" top: "fc"').replace(
    'layer { name: "fc"', 'layer { name: "py" type: "Python" bottom: "conv1" top: "py"\n'
                          '  python_param { module: "MODULE" layer: "Identity" } }\nlayer { name: "fc"')

LAYER_CODE = """\
import caffe
with open({marker!r}, "a") as f:
    f.write("imported\\n")


class Identity(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data
"""


def test_python_layers_run_only_with_allow_python_layers(tmp_path, monkeypatch, capsys):
    module = f"caffeish_store_marker_{os.getpid()}"
    marker = tmp_path / "imported"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{module}.py").write_text(LAYER_CODE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    root = tmp_path / "store"
    write_model(str(root / "py"), CLASSIFIER, seed=1)  # the weights of conv1 and fc; py is an identity
    (root / "py" / "deploy.prototxt").write_text(PYTHON_NET.replace("MODULE", module))
    try:
        assert cli.main(["store", "build", str(root)]) == 1
        out = capsys.readouterr().out
        assert "Python layer(s) 'py'" in out and "--allow-python-layers" in out and not marker.exists()
        assert cli.main(["store", "build", str(root), "--allow-python-layers"]) == 0
        assert marker.exists()
        sys.modules.pop(module, None)
        marker.unlink()
        result = download.pull(str(root), "py", str(tmp_path / "a"))
        assert not marker.exists() and result["validated"] is False and "--allow-python-layers" in result["note"]
        assert cli.main(["store", "pull", str(root), "py", "-o", str(tmp_path / "b")]) == 0
        assert "net not validated past parsing" in capsys.readouterr().out and not marker.exists()
        result = download.pull(str(root), "py", str(tmp_path / "c"), allow_python_layers=True)
        assert marker.exists() and result["validated"] is True
    finally:
        sys.modules.pop(module, None)


# ---------------------------------------------------------------------------- item 14: kills


KILLER = """\
import os, signal, sys
from caffeish.apps import download
from caffeish.formats import staging

calls, at = [0], int(sys.argv[3])


def killing(fn):
    def run(*args, **kwargs):
        result = fn(*args, **kwargs)
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return run


os.rename, os.replace, staging._exchange = killing(os.rename), killing(os.replace), killing(staging._exchange)
download.pull(sys.argv[1], "cls", sys.argv[2], force=True, retry_wait=0)
"""


def _state(out, versions):
    """Which version ('old' or 'new') the files in `out` are, wholly; a mix fails the test."""
    got = {n: sha256(os.path.join(out, n)) for n in os.listdir(out) if not n.startswith(".")}
    for name, files in versions.items():
        if got == files:
            return name
    pytest.fail(f"{out} holds a mix of versions: {got}")


def _version(folder):
    return {n: sha256(os.path.join(folder, n)) for n in os.listdir(folder) if not n.startswith(".")}


def test_a_forced_pull_killed_after_any_rename_leaves_the_old_or_the_new_model(store_dir, tmp_path):
    """`store pull --force` over an older version, SIGKILLed right after its 1st, 2nd, ... rename: the
    folder is the old version or the new one, whole (the user's own file kept), and the next pull leaves
    nothing beside it."""
    new_store = tmp_path / "new_store"
    write_model(str(new_store / "cls"), CLASSIFIER, seed=7, labels=["v", "w", "x", "y", "z"], pad_bytes=1000)
    store.build_index(str(new_store))
    versions = {}
    for name, source in (("old", store_dir), ("new", str(new_store))):
        download.pull(source, "cls", str(tmp_path / name))
        (tmp_path / name / "notes.txt").write_bytes(b"the user's own file")
        versions[name] = _version(tmp_path / name)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "cls"
    shutil.copytree(tmp_path / "old", out)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    states = []
    for at in range(1, 12):
        proc = subprocess.run([sys.executable, str(script), str(new_store), str(out), str(at)], env=env,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        states.append(_state(str(out), versions))
        download.pull(store_dir, "cls", str(out), force=True)  # back to the old version, cleaning up
        assert _leftovers(work) == [], f"killed after rename {at}: left {_leftovers(work)}"
        assert _leftovers(out) == [] and _state(str(out), versions) == "old"
    assert proc.returncode == 0, "the pull was killed at every step"
    assert "old" in states and "new" in states, states  # the kills hit both sides of the swap
    assert _state(str(out), versions) == "new" and _leftovers(work) == [] and _leftovers(out) == []
