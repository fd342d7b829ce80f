"""Serving a model store over HTTP, with the range requests resumable downloads need.

`StoreServer(root)` serves the files under `root` (index.json and the model
folders) read-only: GET and HEAD, `Range: bytes=a-b`, `bytes=a-` and
`bytes=-n` answered with 206 Partial Content and Content-Range, 416 for a
range past the end, ETag/Last-Modified and If-Range (a changed file is sent
whole).  Only regular files inside `root` are served: no directory listings,
no hidden files (a pull's `.part` files) whatever path or symbolic link leads
to them, nothing reached through `..` or a symbolic link out of the store.  It
binds to 127.0.0.1 unless told otherwise.

Hostile clients are bounded: a connection that sends nothing (or does not
read) for `timeout` seconds is closed, at most `max_connections` are served at
once (the next ones get 503 at once), a Range header's numbers of any length
are read without converting thousands of digits, and a request's text is
escaped in the log.  Binding errors (a port in use, an unknown host) are
CaffeishErrors raised before anything is served.

    with StoreServer("store", port=0) as server:   # port 0: any free port
        print(server.url)                          # http://127.0.0.1:PORT/
"""
import email.utils
import errno
import os
import re
import socket
import stat
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from caffeish.errors import CaffeishError
from caffeish.apps.store import INDEX, safe_name, shown

SEND_CHUNK = 1 << 20
TIMEOUT = 30.0        # seconds a connection may stay silent (or not read) before it is closed
MAX_CONNECTIONS = 32  # connections served at once
_BIG = 18             # digits: a number this long is larger than any file
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n"
         b"Connection: close\r\n\r\n")
CONTENT_TYPES = {
    ".json": "application/json",
    ".md": "text/markdown; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".prototxt": "text/plain; charset=utf-8",
}


def parse_range(header, size):
    """(start, end inclusive) for a single `bytes=` range; None to send the whole file; 'unsatisfiable'.

    As RFC 9110 allows, a header we do not understand (another unit, several
    ranges, bad syntax) is ignored and the whole file is sent.
    """
    m = re.fullmatch(r"[ \t]*bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*", header or "")
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix range: the last n bytes
        n = _int(last)
        if n == 0:
            return "unsatisfiable"
        return (max(size - n, 0), size - 1) if size else "unsatisfiable"
    start = _int(first)
    end = _int(last) if last else size - 1
    if last and end < start:
        return None  # invalid: ignored
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def _int(digits):
    """A decimal number; one of more than 18 digits (past any file size) is taken as 10**18, so that
    thousands of digits are never converted."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _BIG else 10 ** _BIG


class StoreHandler(BaseHTTPRequestHandler):
    """GET/HEAD of the store's files with single byte ranges."""

    server_version = "caffeish-store/1"

    def setup(self):
        self.timeout = self.server.read_timeout  # StreamRequestHandler sets it on the socket
        super().setup()

    def do_GET(self):
        self._respond(body=True)

    def do_HEAD(self):
        self._respond(body=False)

    # -- the request ---------------------------------------------------------
    def resolve(self):
        """The file the URL names inside the store, or None (hidden, outside, not a file)."""
        path = urllib.parse.urlsplit(self.path).path
        parts = [urllib.parse.unquote(p) for p in path.split("/") if p]
        if not parts:
            parts = [INDEX]
        if not all(safe_name(p) for p in parts):
            return None
        root = self.server.root
        full = os.path.realpath(os.path.join(root, *parts))
        if os.path.commonpath([root, full]) != root:
            return None
        # Where links lead counts too: no hidden file or folder of the store, whatever the path.
        if not all(safe_name(p) for p in os.path.relpath(full, root).split(os.sep)) or not os.path.isfile(full):
            return None
        return full

    def _respond(self, body):
        full = self.resolve()
        if full is None:
            self.send_error(404, "Not Found")
            return
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.send_error(404, "Not Found")
            return
        f = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for a FIFO or a device since resolve()
            f.close()
            self.send_error(404, "Not Found")
            return
        with f:
            st = os.fstat(f.fileno())
            size = st.st_size
            etag = f'"{size:x}-{st.st_mtime_ns:x}"'
            rng = parse_range(self.headers.get("Range"), size)
            if_range = self.headers.get("If-Range")
            if rng is not None and if_range and if_range.strip() != etag:
                rng = None  # the file changed since the client's first part: send it whole
            if rng == "unsatisfiable":
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if rng is None:
                start, end = 0, size - 1
                self.send_response(200)
            else:
                start, end = rng
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            length = end - start + 1 if size else 0
            ext = os.path.splitext(full)[1].lower()
            self.send_header("Content-Type", CONTENT_TYPES.get(ext, "application/octet-stream"))
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
            self.end_headers()
            if body and length:
                f.seek(start)
                try:
                    self.send_body(f, length)
                except OSError:  # the client went away or stopped reading (timeout); it can resume
                    self.close_connection = True

    def send_body(self, f, length):
        """Copy `length` bytes of the open file to the client in chunks (tests override this)."""
        remaining = length
        while remaining:
            chunk = f.read(min(SEND_CHUNK, remaining))
            if not chunk:
                break
            self.wfile.write(chunk)
            remaining -= len(chunk)

    def log_message(self, format, *args):
        if self.server.log:
            self.server.log.write("%s - %s\n" % (self.address_string(), shown(format % args, 1000)))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, root, log, timeout=TIMEOUT, max_connections=MAX_CONNECTIONS):
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.root = root
        self.log = log
        self.read_timeout = timeout
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        """Serve in a thread while a slot is free; otherwise answer 503 at once and close."""
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class StoreServer:
    """The store at `root` served over HTTP; start()/stop() run it in a thread, serve_forever() in front."""

    def __init__(self, root, host="127.0.0.1", port=8000, handler=StoreHandler, log=None, timeout=TIMEOUT,
                 max_connections=MAX_CONNECTIONS):
        self.root = os.path.realpath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise CaffeishError(f"{root}: not a directory")
        if not 0 <= port <= 65535:
            raise CaffeishError(f"port {port}: must be between 0 and 65535")
        try:
            self.httpd = _Server((host, port), handler, self.root, log, timeout, max_connections)
        except socket.gaierror as e:
            raise CaffeishError(f"--host {shown(host)}: unknown host or address ({e.strerror})") from None
        except OSError as e:
            why = {errno.EADDRINUSE: "the port is in use (another server?); choose another --port",
                   errno.EACCES: "permission denied (ports below 1024 need privileges); choose another --port",
                   errno.EADDRNOTAVAIL: "not an address of this machine; choose another --host"}.get(
                       e.errno, e.strerror)
            raise CaffeishError(f"cannot serve at {shown(host)} port {port}: {why}") from None
        except (OverflowError, ValueError, UnicodeError) as e:
            raise CaffeishError(f"cannot serve at {shown(host)} port {port}: {shown(e, 100)}") from None
        self.host = host
        self.port = self.httpd.server_address[1]
        self._thread = None

    @property
    def url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = socket.gethostname()
        return f"http://{host}:{self.port}/"

    def start(self):
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="caffeish-store-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self):
        try:
            self.httpd.serve_forever(poll_interval=0.5)
        finally:
            self.httpd.server_close()

    def stop(self):
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve(root, host="127.0.0.1", port=8000, log=sys.stderr, timeout=TIMEOUT, max_connections=MAX_CONNECTIONS,
          ready=None):
    """Serve until interrupted (Ctrl-C); `ready(server)` is called once the port is bound."""
    server = StoreServer(root, host, port, log=log, timeout=timeout, max_connections=max_connections)
    if ready:
        ready(server)
    server.serve_forever()
