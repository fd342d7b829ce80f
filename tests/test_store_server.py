"""The store's HTTP server: byte ranges as RFC 9110 defines them, and nothing served outside the store."""
import http.client
import os

import pytest

from caffeish.apps.store_server import StoreServer, parse_range


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    (root / "m").mkdir()
    (root / "m" / "w.bin").write_bytes(bytes(range(256)) * 4)  # 1024 bytes
    (root / "index.json").write_text('{"models": []}\n')
    (root / "m" / ".w.bin.part").write_bytes(b"secret")
    (root.parent / "outside.txt").write_text("outside the store")
    os.symlink(root.parent / "outside.txt", root / "m" / "link.txt")
    with StoreServer(str(root), port=0) as srv:
        yield srv, (root / "m" / "w.bin").read_bytes()


def _get(srv, path, method="GET", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_parse_range():
    assert parse_range("bytes=0-99", 1000) == (0, 99)
    assert parse_range("bytes=500-", 1000) == (500, 999)
    assert parse_range("bytes=-100", 1000) == (900, 999)
    assert parse_range("bytes=990-2000", 1000) == (990, 999)
    assert parse_range("bytes=1000-", 1000) == "unsatisfiable"
    assert parse_range("bytes=-0", 1000) == "unsatisfiable"
    assert parse_range("bytes=5-2", 1000) is None        # invalid: ignored, whole file
    assert parse_range("bytes=0-1,5-6", 1000) is None    # several ranges: whole file
    assert parse_range("items=0-1", 1000) is None
    assert parse_range(None, 1000) is None


def test_whole_file_and_head(served):
    srv, data = served
    status, headers, body = _get(srv, "/m/w.bin")
    assert (status, body) == (200, data)
    assert headers["Accept-Ranges"] == "bytes" and headers["Content-Length"] == "1024"
    status, headers, body = _get(srv, "/m/w.bin", "HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", "1024")
    status, headers, body = _get(srv, "/")
    assert (status, headers["Content-Type"], body) == (200, "application/json", b'{"models": []}\n')


def test_ranges(served):
    srv, data = served
    status, headers, body = _get(srv, "/m/w.bin", headers={"Range": "bytes=100-199"})
    assert (status, headers["Content-Range"], body) == (206, "bytes 100-199/1024", data[100:200])
    status, headers, body = _get(srv, "/m/w.bin", headers={"Range": "bytes=1000-"})
    assert (status, headers["Content-Range"], body) == (206, "bytes 1000-1023/1024", data[1000:])
    status, headers, body = _get(srv, "/m/w.bin", headers={"Range": "bytes=-10"})
    assert (status, body) == (206, data[-10:])
    status, headers, body = _get(srv, "/m/w.bin", headers={"Range": "bytes=1024-"})
    assert (status, headers["Content-Range"], body) == (416, "bytes */1024", b"")


def test_if_range_sends_a_changed_file_whole(served):
    srv, data = served
    etag = _get(srv, "/m/w.bin", "HEAD")[1]["ETag"]
    assert _get(srv, "/m/w.bin", headers={"Range": "bytes=10-", "If-Range": etag})[0] == 206
    status, _, body = _get(srv, "/m/w.bin", headers={"Range": "bytes=10-", "If-Range": '"other"'})
    assert (status, body) == (200, data)


@pytest.mark.parametrize("path", ["/../outside.txt", "/m/../../outside.txt", "/%2e%2e/outside.txt",
                                  "/m/%2e%2e%2f%2e%2e%2foutside.txt", "/m/.w.bin.part", "/m/link.txt", "/m",
                                  "/m/", "/nothing"])
def test_nothing_outside_the_store_nor_hidden_is_served(served, path):
    srv, _ = served
    status, _, body = _get(srv, path)
    assert status == 404 and b"outside" not in body and b"secret" not in body


def test_binds_to_localhost_by_default(tmp_path):
    srv = StoreServer(str(tmp_path), port=0)
    try:
        assert srv.httpd.server_address[0] == "127.0.0.1" and srv.url.startswith("http://127.0.0.1:")
    finally:
        srv.stop()
