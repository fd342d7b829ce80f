"""Pulling a model from a store (a URL or a directory): resumable, verified, bounded, all or nothing.

`pull(location, name, outdir)` does what Caffe's download_model_binary.py did
for one caffemodel, for every file of a store model:

* the store's index.json is read with a size limit (16 MiB) and checked field
  by field before anything is downloaded (caffeish.apps.store.check_index);
* each file streams in chunks into `NAME.part` in the pull's parts folder
  PARENT/.OUT.caffeish-pull (beside OUTDIR), hashed (sha256, and sha1 where the
  store gives one) as it arrives, so memory does not grow with the file;
* a dropped connection is retried with `Range: bytes=N-` from where it
  stopped; a `.part` left by an interrupted run is re-hashed and resumed the
  same way; a server that ignores the range (200) restarts the file from zero;
* every bound says why it gave up (`Limits`): `retries` failed attempts in a
  row that bring no byte beyond the most the file has had (a restart from
  byte 0 is not progress), 4 x (retries + 1) failed attempts in all, a
  response slower than `min_rate` bytes/s over `rate_window` seconds, the
  status and headers of a response not there within `timeout` seconds, and
  an optional overall deadline (`max_time`);
* the size and checksums are compared with index.json: a mismatch deletes the
  pull's part files and raises ChecksumError (a resumed file that fails is
  fetched once more from the start before giving up);
* the net is re-validated from the verified parts (it parses, its shapes
  infer, its weights bind; a net with Python layers only as far as that runs
  no code, unless `allow_python_layers`);
* then OUTDIR is replaced as a whole (caffeish.formats.staging): a fresh
  folder beside it (.OUT.tmp-PID) gets the model's files (new ones linked from
  the parts, identical ones and every other entry of the old OUTDIR linked from
  it) and index.json, and one directory-entry swap (renameat2 RENAME_EXCHANGE;
  two renames where the system lacks it) puts it in OUTDIR's place.  A pull
  killed at any moment leaves OUTDIR wholly old or wholly new, never mixed; the
  next pull finishes or undoes what a killed one left beside OUTDIR
  (staging.recover_folder) before it starts.
* an existing file with the same sha256 is kept; a different one (or a link,
  a folder in a file's place) is refused unless `force`.

OUTDIR gets an index.json describing the one model (path "."), so that
`caffeish store verify OUTDIR` can check it later.

One pull at a time per OUTDIR: a pull holds an exclusive lock (fcntl.flock) on
PARENT/.OUT.caffeish-pull.lock for its whole run, so a second pull into the same
folder stops at once saying that another pull is running.  The lock file and
the `.part` files are opened with O_NOFOLLOW and the parts folder must be a
real folder: a symbolic link planted in their place is refused, never followed.
"""
import errno
import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from caffeish.apps import progress
from caffeish.errors import CaffeishError
from caffeish.formats import io, staging
from caffeish.apps.store import (DEPLOY, INDEX, MAX_INDEX_BYTES, WEIGHTS, ChecksumError, PythonLayersNotRun,
                                 check_file, check_inside, check_net, find_model, hash_stream, human_size,
                                 make_index, parse_index, read_bounded, shown)

CHUNK = 1 << 20
MIN_RATE = 1000      # bytes per second: a slower response is given up (0: no minimum)
RATE_WINDOW = 30.0   # seconds over which the rate is measured
MAX_REDIRECTS = 10
LOCK = ".caffeish-pull.lock"  # PARENT/.OUT.caffeish-pull.lock
PARTS = ".caffeish-pull"      # PARENT/.OUT.caffeish-pull/NAME.part: the parts of an unfinished pull
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_ETAG = re.compile(r'(W/)?"[\x21\x23-\x7e]{0,200}"')
_DIGITS = re.compile(r"[0-9]{1,18}")


class Transient(Exception):
    """Internal: a network failure worth retrying (dropped connection, timeout, 5xx)."""


class RangeNotSatisfiable(Exception):
    """Internal: the server answered 416 to a range request."""


def _reason(e):
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason
    return shown(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, 200)


def _number(text):
    """A header's decimal number (ASCII digits only, at most 18 of them), else None."""
    text = (text or "").strip()
    return int(text) if _DIGITS.fullmatch(text) else None


# ---------------------------------------------------------------------------- bounds


class Limits:
    """The bounds of one pull (see the module doc); `meter(where)` watches one response's rate."""

    def __init__(self, retries=5, retry_wait=1.0, timeout=60.0, min_rate=MIN_RATE, rate_window=RATE_WINDOW,
                 max_time=None):
        self.retries, self.retry_wait, self.timeout = retries, retry_wait, timeout
        self.min_rate, self.rate_window, self.max_time = min_rate, rate_window, max_time
        self.max_failures = 4 * (retries + 1)
        self.deadline = time.monotonic() + max_time if max_time else None

    def remaining(self):
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check_time(self, where):
        left = self.remaining()
        if left is not None and left <= 0:
            raise CaffeishError(f"{where}: gave up: the pull's time limit of {self.max_time:g} s (--max-time) "
                                f"ran out; run the same pull again to resume")

    def socket_timeout(self):
        left = self.remaining()
        return self.timeout if left is None else max(0.05, min(self.timeout, left))

    def sleep(self, seconds):
        left = self.remaining()
        time.sleep(max(0.0, seconds if left is None else min(seconds, left)))

    def meter(self, where):
        return _Meter(self, where)


class _Meter:
    """Counts the bytes of one response: under the minimum rate over the window, or past the deadline,
    raises a CaffeishError that says so."""

    def __init__(self, limits, where):
        self.limits, self.where = limits, where
        self.start, self.count = time.monotonic(), 0

    def add(self, n):
        now = time.monotonic()
        self.count += n
        elapsed = now - self.start
        if self.limits.min_rate and elapsed >= self.limits.rate_window:
            if self.count < self.limits.min_rate * elapsed:
                raise CaffeishError(
                    f"{self.where}: gave up: the server sent {self.count} bytes in {elapsed:.0f} s, slower than "
                    f"the minimum {human_size(self.limits.min_rate)}/s (--min-rate); run the same pull again "
                    f"to resume")
            self.start, self.count = now, 0
        self.limits.check_time(self.where)


class _Watch:
    """Shuts down the sockets a request opens when its response's status and headers take longer than
    `seconds` in all (http.client reads them line by line, each line only bounded by the socket timeout)."""

    current = threading.local()

    def __init__(self, seconds):
        self.seconds, self.timers, self.sockets, self.fired = seconds, [], [], False
        self.start = time.monotonic()
        _Watch.current.watch = self

    def add(self, sock):
        self.sockets.append(sock)
        timer = threading.Timer(max(0.0, self.seconds - (time.monotonic() - self.start)), self._expire)
        timer.daemon = True
        self.timers.append(timer)
        timer.start()

    def _expire(self):
        self.fired = True
        for sock in self.sockets:
            try:
                sock.shutdown(2)
            except OSError:
                pass

    def stop(self):
        _Watch.current.watch = None
        for timer in self.timers:
            timer.cancel()


def _watched(connection_class):
    class Watched(connection_class):
        def connect(self):
            super().connect()
            watch = getattr(_Watch.current, "watch", None)
            if watch is not None:
                watch.add(self.sock)

    return Watched


_HTTPConnection = _watched(http.client.HTTPConnection)
_HTTPSConnection = _watched(http.client.HTTPSConnection)


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS
    inf_msg = f"a redirect loop or more than {MAX_REDIRECTS} redirects; the last answer was: "


# ---------------------------------------------------------------------------- sources


class Response:
    """An open download: `start` is the first byte it carries, `total` the file's size when known."""

    def __init__(self, stream, start, total, etag=None):
        self.stream, self.start, self.total, self.etag = stream, start, total, etag
        self._read = getattr(stream, "read1", None) or stream.read

    def read(self, n):
        """Up to n bytes, as soon as some arrive (so the rate and the deadline are checked between reads)."""
        try:
            return self._read(n)
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise Transient(_reason(e)) from None

    def close(self):
        try:
            self.stream.close()
        except (OSError, ValueError, http.client.HTTPException):
            pass


class LocalSource:
    """A store on disk: files are read in chunks from the directory (never through a link leaving it)."""

    def __init__(self, root, limits=None):
        self.root = os.fspath(root)
        self.limits = limits or Limits()

    def where(self, *parts):
        return os.path.join(self.root, *parts)

    def read_index(self):
        path = self.where(INDEX)
        if not os.path.isfile(path):
            raise CaffeishError(f"{self.root}: no {INDEX} (run `caffeish store build {self.root}` first)")
        return parse_index(read_bounded(path, MAX_INDEX_BYTES, "model store index"), path)

    def open(self, parts, start, etag=None):
        path = self.where(*parts)
        check_inside(path, self.root)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise CaffeishError(f"{path}: cannot read: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise CaffeishError(f"{path}: not a regular file")
        if start > st.st_size:
            os.close(fd)
            raise RangeNotSatisfiable()
        f = os.fdopen(fd, "rb")
        f.seek(start)
        return Response(f, start, st.st_size)


class HttpSource:
    """A store over HTTP(S), read with urllib; proxies from the environment except for loopback."""

    def __init__(self, url, limits=None):
        split = urllib.parse.urlsplit(url)
        try:
            split.port
        except ValueError as e:
            raise CaffeishError(f"{shown(url)}: not a valid URL ({e})") from None
        if not split.hostname:
            raise CaffeishError(f"{shown(url)}: not a valid URL (no host)")
        if split.path.endswith(".json"):
            self.index_url = url
            self.base = url[:url.rindex("/") + 1]
        else:
            self.base = url if url.endswith("/") else url + "/"
            self.index_url = self.base + INDEX
        self.limits = limits or Limits()
        handlers = [_HTTPHandler(), _HTTPSHandler(), _RedirectHandler()]
        if split.hostname in LOOPBACK:
            handlers.append(urllib.request.ProxyHandler({}))
        self.opener = urllib.request.build_opener(*handlers)

    def where(self, *parts):
        return self.base + "/".join(urllib.parse.quote(p) for p in parts)

    def _open(self, url, headers):
        req = urllib.request.Request(url, headers={"User-Agent": "caffeish-store", **headers})
        watch = _Watch(self.limits.socket_timeout())
        try:
            resp = self.opener.open(req, timeout=self.limits.socket_timeout())
            if watch.fired:  # the headers were cut short by the watch: not a response
                resp.close()
                raise OSError("cut")
            return resp
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416:
                raise RangeNotSatisfiable() from None
            if e.code in (408, 429) or e.code >= 500:
                raise Transient(f"HTTP {e.code} {shown(e.reason, 100)}") from None
            raise CaffeishError(f"{url}: HTTP {e.code}: {shown(e.reason, 200)}") from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            if watch.fired:
                raise Transient(f"no response within {watch.seconds:g} s") from None
            raise Transient(_reason(e)) from None
        finally:
            watch.stop()

    def read_index(self):
        resp = self._open(self.index_url, {})
        try:
            length = _number(resp.headers.get("Content-Length"))
            if length is not None and length > MAX_INDEX_BYTES:
                raise CaffeishError(f"{self.index_url}: the server's index is {human_size(length)}, larger than "
                                    f"{human_size(MAX_INDEX_BYTES)}; not a model store index")
            body, meter, stream = bytearray(), self.limits.meter(self.index_url), Response(resp, 0, length)
            while True:
                chunk = stream.read(1 << 16)
                if not chunk:
                    break
                body += chunk
                if len(body) > MAX_INDEX_BYTES:
                    raise CaffeishError(f"{self.index_url}: larger than {human_size(MAX_INDEX_BYTES)}; "
                                        f"not a model store index")
                meter.add(len(chunk))
        finally:
            resp.close()
        if length is not None and len(body) < length:
            raise Transient(f"connection closed after {len(body)} of {length} bytes")
        return parse_index(bytes(body), self.index_url)

    def open(self, parts, start, etag=None):
        url = self.where(*parts)
        headers = {}
        if start:
            headers["Range"] = f"bytes={start}-"
            if etag:
                headers["If-Range"] = etag
        resp = self._open(url, headers)
        etag = resp.headers.get("ETag")
        etag = etag if etag and _ETAG.fullmatch(etag) else None
        if resp.status == 206:
            try:
                first, total = _content_range(resp.headers.get("Content-Range"), url)
            except CaffeishError:
                resp.close()
                raise
            return Response(resp, first, total, etag)
        if resp.status != 200:
            resp.close()
            raise CaffeishError(f"{url}: unexpected HTTP {resp.status}")
        return Response(resp, 0, _number(resp.headers.get("Content-Length")), etag)


def _content_range(header, url):
    """(first byte, total or None) from `Content-Range: bytes a-b/total`."""
    m = re.fullmatch(r"\s*bytes\s+([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18}|\*)\s*", header or "")
    if not m or int(m.group(2)) < int(m.group(1)):
        raise CaffeishError(f"{url}: the server sent a malformed Content-Range '{shown(header, 100)}'")
    return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))


def open_source(location, timeout=60.0, limits=None):
    """A LocalSource or HttpSource for a store URL, a store directory or its index.json."""
    limits = limits or Limits(timeout=timeout)
    location = os.fspath(location)
    scheme = urllib.parse.urlsplit(location).scheme.lower()
    if scheme in ("http", "https"):
        return HttpSource(location, limits)
    if scheme == "file":
        location = urllib.request.url2pathname(urllib.parse.urlsplit(location).path)
    if os.path.isfile(location) and os.path.basename(location) == INDEX:
        return LocalSource(os.path.dirname(location) or ".", limits)
    if os.path.isdir(location):
        return LocalSource(location, limits)
    raise CaffeishError(f"{shown(location)}: not a store directory or an http(s) URL")


def _with_retries(what, action, limits, log):
    failures = 0
    while True:
        limits.check_time(what)
        try:
            return action()
        except Transient as e:
            failures += 1
            if failures > limits.retries:
                raise CaffeishError(f"{what}: {e} (gave up after {limits.retries} retries)") from None
            if log:
                log(f"{what}: {e}; retrying ({failures} of {limits.retries})")
            limits.sleep(limits.retry_wait * failures)


def read_index(location, timeout=60.0, retries=3, retry_wait=1.0, log=None, min_rate=MIN_RATE,
               rate_window=RATE_WINDOW, max_time=None):
    limits = Limits(retries, retry_wait, timeout, min_rate, rate_window, max_time)
    source = open_source(location, limits=limits)
    return _with_retries(source.where(INDEX), source.read_index, limits, log)


# ---------------------------------------------------------------------------- one file


def _hashers(expected):
    names = ("sha256", "sha1") if expected.get("sha1") else ("sha256",)
    return {a: hashlib.new(a) for a in names}


def _mb(n):
    return f"{n / 1e6:.1f} MB"


def download(source, parts, part, expected, limits=None, log=None, desc=None):
    """Fetch one file into `part` (resuming what is there) and verify it; returns bytes transferred.

    `expected` is the index's file entry {name, size, sha256[, sha1]}.  On a
    size or checksum mismatch the part is deleted and ChecksumError raised.
    """
    limits = limits or Limits()
    size = expected["size"]
    desc = desc or expected["name"]
    where = source.where(*parts)
    out = _open_part(part)
    try:
        offset = os.fstat(out.fileno()).st_size
        if offset > size:
            offset = 0
        hashes = _hashers(expected)
        if offset:
            out.seek(0)
            if hash_stream(out, hashes, offset) < offset:
                raise CaffeishError(f"{part}: shrank while it was read (is another program writing it?)")
            if log:
                log(f"{desc}: resuming at {_mb(offset)} of {_mb(size)}")
        out.truncate(offset)
        out.seek(offset)
    except OSError as e:
        out.close()
        raise CaffeishError(f"{part}: cannot write: {e.strerror}") from None
    except BaseException:
        out.close()
        raise
    resumed = offset > 0
    transferred = 0
    bar = progress.bytes_bar(total=size, desc=desc, initial=offset)
    high = offset  # the most bytes the file has had: only passing it is progress (not a restart from 0)
    in_row = failures = 0
    etag, reasons = None, {}
    try:
        while offset < size:
            limits.check_time(where)
            try:
                try:
                    resp = source.open(parts, offset, etag)
                except RangeNotSatisfiable:
                    # The server's file is shorter than our part: start the file again.
                    offset, hashes, etag = 0, _hashers(expected), None
                    out.seek(0)
                    out.truncate(0)
                    bar.reset(total=size)
                    raise Transient("the server refused the range request (HTTP 416); starting the file "
                                    "again from its first byte") from None
                try:
                    if resp.total is not None and resp.total != size:
                        raise ChecksumError(
                            f"{where}: the server's file has {resp.total} bytes but the store's index says "
                            f"{size}: the store changed since its index.json was built")
                    if resp.start != offset:
                        if resp.start != 0:
                            raise CaffeishError(f"{where}: asked for bytes from {offset}, got from {resp.start}")
                        if log and offset:
                            log(f"{desc}: the server ignored the range request; starting again from zero")
                        offset = 0
                        out.seek(0)
                        out.truncate(0)
                        hashes = _hashers(expected)
                        bar.reset(total=size)
                    etag = resp.etag or etag
                    meter = limits.meter(where)
                    while offset < size:
                        chunk = resp.read(CHUNK)
                        if not chunk:
                            raise Transient(f"connection closed at {_mb(offset)} of {_mb(size)}")
                        chunk = chunk[:size - offset]
                        out.write(chunk)
                        for h in hashes.values():
                            h.update(chunk)
                        offset += len(chunk)
                        transferred += len(chunk)
                        bar.update(len(chunk))
                        meter.add(len(chunk))
                finally:
                    resp.close()
            except Transient as e:
                failures += 1
                if offset > high:
                    high, in_row, reasons = offset, 0, {}
                in_row += 1
                reasons[str(e)] = None  # what the attempts without new data met, each once
                if in_row > limits.retries or failures >= limits.max_failures:
                    why = (f"{limits.retries} retries without new data" if in_row > limits.retries
                           else f"{failures} failed attempts in all")
                    raise CaffeishError(
                        f"{where}: download failed at {_mb(offset)} of {_mb(size)}: {'; '.join(list(reasons)[-3:])} "
                        f"(gave up after {why}; run the same pull again to resume)") from None
                if log:
                    log(f"{desc}: {e}; resuming with a range request ({in_row} of {limits.retries})")
                limits.sleep(limits.retry_wait * in_row)
        out.flush()
        os.fsync(out.fileno())
    except OSError as e:
        raise CaffeishError(f"{part}: cannot write: {e.strerror}") from None
    except ChecksumError:
        out.close()
        _remove(part)
        raise
    finally:
        out.close()
        bar.close()
    got = {a: h.hexdigest() for a, h in hashes.items()}
    for a in got:
        want = str(expected[a]).lower()
        if got[a] != want:
            _remove(part)
            msg = (f"{where}: {a} checksum mismatch: got {got[a]}, the store's index says {want}; "
                   f"the partial download was deleted (the store's copy is corrupt or changed since "
                   f"its index was built)")
            err = ChecksumError(msg)
            err.resumed = resumed
            raise err
    return transferred


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _open_nofollow(path, what):
    """An fd of the regular file `path`, created if missing, never through a symbolic link."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CaffeishError(f"{path}: is a symbolic link where the pull keeps its {what}; refusing to follow "
                                f"it (remove the link)") from None
        hint = (" (a pull writes in the folder that holds OUTDIR)" if e.errno in (errno.EACCES, errno.EROFS)
                and what == "lock file" else "")
        raise CaffeishError(f"{path}: cannot open the pull's {what}: {e.strerror}{hint}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CaffeishError(f"{path}: is not a regular file, where the pull keeps its {what}; remove it")
    return fd


def _open_part(part):
    """The `.part` file opened for reading and writing (created if missing), never through a link."""
    fd = _open_nofollow(part, "partial download")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+b")


class PullLock:
    """An exclusive lock on PARENT/.OUT.caffeish-pull.lock: one pull at a time into a folder.

    The lock is fcntl.flock on a file opened with O_NOFOLLOW (a planted link is
    refused); a second pull fails at once, naming the folder.  Released (and the
    file removed) by `release`; a file left by a killed pull holds no lock.
    """

    def __init__(self, path, outdir):
        self.path, self.outdir = os.fspath(path), os.fspath(outdir)
        self.fd = None
        self.discarded = False  # set when a failed pull deleted its parts (OUTDIR's parents may then go too)

    def acquire(self):
        for _ in range(100):
            fd = _open_nofollow(self.path, "lock file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise CaffeishError(
                        f"{self.outdir}: another `caffeish store pull` into this folder is running (it holds "
                        f"{self.path}); wait for it to finish or pull into another folder") from None
                raise CaffeishError(f"{self.path}: cannot lock: {e.strerror}") from None
            # A pull that just finished removes the file it locked: ours must still be the one at the path.
            mine = os.fstat(fd)
            try:
                there = os.lstat(self.path)
            except FileNotFoundError:
                there = None
            if there is not None and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                self.fd = fd
                return self
            os.close(fd)
        raise CaffeishError(f"{self.path}: the lock file keeps changing (other pulls into {self.outdir}?)")

    def release(self):
        """Remove the lock file (while still holding it, so no other pull holds that file) and unlock."""
        if self.fd is None:
            return
        try:
            mine, there = os.fstat(self.fd), os.lstat(self.path)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


# ---------------------------------------------------------------------------- the folder swap


def _old_temporary(name, files):
    """Names of the old layout's temporary files inside OUTDIR, which a new folder does not carry."""
    return (name in (LOCK, staging.MARKER) or (name.startswith(".") and name.endswith(".part") and name[1:-5] in files)
            or (name.startswith(f".{INDEX}.") and name.endswith(".tmp")))


def _carry(src, dst, skip=(), files=()):
    """Recreate the entries of folder `src` in `dst`: files as hard links (copies where a link fails),
    folders recursively, symbolic links as links (never followed)."""
    with os.scandir(src) as entries:
        for e in entries:
            if e.name in skip or (files and _old_temporary(e.name, files)):
                continue
            s, d = e.path, os.path.join(dst, e.name)
            st = e.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(s), d)
            elif stat.S_ISDIR(st.st_mode):
                os.mkdir(d, 0o700)
                _carry(s, d)
                os.chmod(d, stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                _link_or_copy(s, d)
            else:
                raise CaffeishError(f"{shown(s)}: not a file, folder or link; a pull replaces its folder as a "
                                    f"whole and cannot carry it over: remove it or pull into another folder")


def _rmtree(path):
    """Remove a folder, or the file or link at `path` (never followed)."""
    try:
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path)
    except OSError:
        pass


def _link_or_copy(src, dst):
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(target, existed, plan, parts, files, local_index):
    """Assemble the new OUTDIR beside it and swap it in whole (caffeish.formats.staging: a killed run is
    finished or undone by the next one's recover_folder)."""
    tmp = None
    try:
        tmp = staging.build_folder(target)
        if existed:
            _carry(target, tmp, skip={f["name"] for f in plan} | {INDEX}, files=files)
        for f in plan:
            _link_or_copy(parts[f["name"]], os.path.join(tmp, f["name"]))
        with open(os.path.join(tmp, INDEX), "xb") as out:
            out.write((json.dumps(local_index, indent=2) + "\n").encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode) if existed else 0o777 & ~io.current_umask())
        _fsync_dir(tmp)
        staging.swap_in(tmp, target)
        tmp = None
    except OSError as e:
        raise CaffeishError(f"{target}: cannot put the pulled model in place: {e.strerror} "
                            f"({shown(e.filename)})") from None
    finally:
        if tmp is not None:
            _rmtree(tmp)


# ---------------------------------------------------------------------------- a model


def _target(outdir):
    """OUTDIR as an absolute path (a link the user names is followed to its folder); refuses a file."""
    path = os.path.abspath(os.fspath(outdir))
    if os.path.islink(path):
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            raise CaffeishError(f"{outdir}: a symbolic link to {shown(real)}, which is not a folder; "
                                f"-o names the folder the model's files go into")
        path = real
    if os.path.lexists(path) and not os.path.isdir(path):
        raise CaffeishError(f"{outdir}: exists and is not a folder; -o names the folder the model's files go "
                            f"into (nothing was written)")
    if os.path.dirname(path) == path:
        raise CaffeishError(f"{outdir}: a pull replaces its folder as a whole; name a folder inside it")
    return path


def _status(dest, expected):
    """'missing', 'ok', or what is wrong with the entry at `dest` (a link or a folder is never followed)."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return check_file(dest, expected)


def _local_index(path):
    """The parsed index.json of OUTDIR, or None (missing, unreadable, not JSON, a link: never followed)."""
    try:
        return json.loads(read_bounded(path, MAX_INDEX_BYTES, "index", follow=False))
    except (CaffeishError, ValueError, RecursionError):
        return None


def _parts_folder(parent, base):
    """PARENT/.OUT.caffeish-pull, created if missing; a link or a file there is refused."""
    path = os.path.join(parent, f".{base}{PARTS}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise CaffeishError(f"{path}: cannot create the pull's parts folder: {e.strerror}") from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise CaffeishError(f"{path}: is a symbolic link where the pull keeps its partial downloads; refusing "
                            f"to follow it (remove the link)")
    if not stat.S_ISDIR(st.st_mode):
        raise CaffeishError(f"{path}: is not a folder, where the pull keeps its partial downloads; remove it")
    return path


def _check_space(folder, plan, parts):
    need = 0
    for f in plan:
        try:
            have = os.lstat(parts[f["name"]]).st_size
        except OSError:
            have = 0
        need += max(0, f["size"] - have) if have <= f["size"] else f["size"]
    try:
        st = os.statvfs(folder)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise CaffeishError(f"{folder}: the model needs {human_size(need)} more, but only {human_size(free)} is "
                            f"free there (nothing was downloaded)")


def pull(location, name, outdir, force=False, retries=5, retry_wait=1.0, timeout=60.0, validate=True,
         allow_python_layers=False, min_rate=MIN_RATE, rate_window=RATE_WINDOW, max_time=None, log=None):
    """Download model `name` from a store into `outdir`; returns a summary dict.

    Raises CaffeishError (ChecksumError for a size or checksum mismatch).  OUTDIR
    is never touched by a failed pull, and changes in one step when a pull
    succeeds.  After a checksum or validation failure nothing of the pull is
    kept (nor the folders above OUTDIR that the pull created); after a network
    failure the parts folder's `.part` files stay for the next pull to resume.
    """
    limits = Limits(retries, retry_wait, timeout, min_rate, rate_window, max_time)
    source = open_source(location, limits=limits)
    index = _with_retries(source.where(INDEX), source.read_index, limits, log)
    entry = find_model(index, name, source.where(INDEX))
    path = [p for p in str(entry.get("path", entry["name"])).split("/") if p not in ("", ".")]
    target = _target(outdir)
    parent, base = os.path.split(target)
    created = io.make_folders([target])  # the folders above OUTDIR that are missing
    lock = PullLock(os.path.join(parent, f".{base}{LOCK}"), outdir)
    try:
        lock.acquire()
    except CaffeishError:
        io.remove_empty_folders(created)
        raise
    failed = True
    try:
        result = _pull_locked(source, entry, path, target, os.fspath(outdir), lock, force, limits, validate,
                              allow_python_layers, log)
        failed = False
        return result
    finally:
        lock.release()
        if failed and lock.discarded:
            io.remove_empty_folders(created)


def _pull_locked(source, entry, path, target, outdir, lock, force, limits, validate, allow_python_layers, log):
    """pull's work once OUTDIR is locked; `lock.discarded` says whether a failure threw the pull away."""
    parent, base = os.path.split(target)
    staging.recover_folder(target)  # what pulls (or other writers) killed beside OUTDIR left
    local_index = make_index([dict(entry, path=".")])
    existed = os.path.isdir(target)
    index_path = os.path.join(target, INDEX)
    same_index = _local_index(index_path) == json.loads(json.dumps(local_index))
    if os.path.lexists(index_path) and not same_index and not force:
        raise CaffeishError(f"{index_path} exists and describes another model or version; "
                            f"pass --force to overwrite the folder's files")
    names = [f["name"] for f in entry["files"]]
    deploy, weights = entry.get("deploy", DEPLOY), entry.get("weights", WEIGHTS)
    if validate and (deploy not in names or weights not in names):
        raise CaffeishError(f"model '{shown(entry['name'])}': the index lists no file "
                            f"'{deploy if deploy not in names else weights}' to validate the net with "
                            f"(--no-validate skips the check)")
    plan, kept = [], []
    for f in entry["files"]:
        dest = os.path.join(target, f["name"])
        status = _status(dest, f)
        if status == "ok":
            kept.append(f["name"])
            continue
        if status != "missing" and not force:
            raise CaffeishError(f"{dest} exists and differs from the store's copy ({status}); "
                                f"pass --force to overwrite it")
        plan.append(f)
    result = {"name": entry["name"], "outdir": outdir, "files": len(entry["files"]),
              "downloaded": [f["name"] for f in plan], "kept": kept, "bytes": 0,
              "size": sum(f["size"] for f in entry["files"]), "validated": validate, "note": None,
              "sha1": any(f.get("sha1") for f in entry["files"])}
    if not plan and same_index:
        _rmtree(os.path.join(parent, f".{base}{PARTS}"))  # parts of an unfinished pull: stale now
        return result
    stage = os.path.join(parent, f".{base}{PARTS}")
    parts = {f["name"]: os.path.join(stage, f["name"] + ".part") for f in plan}
    _check_space(parent, plan, parts)
    _parts_folder(parent, base)
    try:
        for f in plan:
            try:
                result["bytes"] += download(source, path + [f["name"]], parts[f["name"]], f, limits, log)
            except ChecksumError as e:
                if not getattr(e, "resumed", False):
                    raise
                if log:
                    log(f"{f['name']}: the resumed file did not verify; downloading it again from the start")
                result["bytes"] += download(source, path + [f["name"]], parts[f["name"]], f, limits, log)
    except ChecksumError:
        _discard(stage, lock)  # the store's copy is bad: nothing of this pull is kept
        raise
    paths = {n: os.path.join(target, n) for n in names}
    paths.update(parts)
    if validate:
        try:
            check_net(paths[deploy], paths[weights], entry.get("inputs") or None, allow_python_layers)
        except PythonLayersNotRun as e:
            result["validated"], result["note"] = False, str(e)
            if log:
                log(f"note: the net was not validated: {e}")
        except CaffeishError as e:
            _discard(stage, lock)
            raise CaffeishError(f"model '{shown(entry['name'])}' downloaded and verified, but the net does not "
                                f"validate: {e}") from None
    in_it = _contains(target)
    _commit(target, existed, plan, parts, set(names), local_index)
    _rmtree(stage)
    if in_it and existed and log:
        log(f"note: {outdir} was replaced by a new folder; a shell inside it should `cd` to it again")
    return result


def _contains(folder, path=None):
    """Whether `path` (default: the current folder) lies in `folder` or is it."""
    try:
        path = os.getcwd() if path is None else path
        return os.path.commonpath([os.path.realpath(folder), os.path.realpath(path)]) == os.path.realpath(folder)
    except (ValueError, OSError):
        return False


def _discard(stage, lock):
    """Delete this pull's parts folder (OUTDIR's new parents go too, once unlocked)."""
    _rmtree(stage)
    lock.discarded = True
