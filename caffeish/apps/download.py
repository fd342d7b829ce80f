"""Pulling a model from a store (a URL or a directory): resumable, verified, atomic.

`pull(location, name, outdir)` does what Caffe's download_model_binary.py did
for one caffemodel, for every file of a store model:

* each file streams in 1 MiB chunks into a hidden `.NAME.part` beside its
  destination, hashed (sha256, and sha1 where the store gives one) as it
  arrives, so memory does not grow with the file;
* a dropped connection is retried with `Range: bytes=N-` from where it stopped
  (up to `retries` times without progress, waiting a little longer each time);
  a `.part` left by an interrupted run is re-hashed in chunks and resumed the
  same way; a server that ignores the range (200) restarts the file from zero;
* the size and checksums are compared with index.json: a mismatch deletes the
  pull's part files and raises ChecksumError (a resumed file that fails is
  fetched once more from the start before giving up);
* the net is re-validated from the verified parts (it parses, its shapes
  infer, its weights bind) and only then are the parts renamed into place, so
  OUTDIR never holds a half-written or unverified file;
* an existing file with the same sha256 is kept; a different one is refused
  unless `force`.

OUTDIR also gets an index.json describing the one model (path "."), so that
`caffeish store verify OUTDIR` can check it later.

One pull at a time per OUTDIR: a pull holds an exclusive lock (fcntl.flock) on
OUTDIR/.caffeish-pull.lock for its whole run, so a second pull into the same
folder stops at once saying that another pull is running, instead of both
writing the same `.part` files.  The lock file and the `.part` files are
opened with O_NOFOLLOW: a symbolic link planted in their place is refused,
never followed.  The lock file is removed when the pull ends; one left by a
killed pull is not locked and is simply reused.
"""
import errno
import fcntl
import hashlib
import http.client
import json
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request

from caffeish.apps import progress
from caffeish.errors import CaffeishError
from caffeish.formats import io
from caffeish.apps.store import (INDEX, ChecksumError, check_file, check_net, find_model, hash_stream, make_index,
                                 parse_index, write_index)

CHUNK = 1 << 20
LOCK = ".caffeish-pull.lock"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Transient(Exception):
    """Internal: a network failure worth retrying (dropped connection, timeout, 5xx)."""


class RangeNotSatisfiable(Exception):
    """Internal: the server answered 416 to a range request."""


class Response:
    """An open download: `start` is the first byte it carries, `total` the file's size when known."""

    def __init__(self, stream, start, total, etag=None):
        self.stream, self.start, self.total, self.etag = stream, start, total, etag

    def read(self, n):
        try:
            return self.stream.read(n)
        except (OSError, http.client.HTTPException) as e:
            raise Transient(_reason(e)) from None

    def close(self):
        try:
            self.stream.close()
        except (OSError, http.client.HTTPException):
            pass


def _reason(e):
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# ---------------------------------------------------------------------------- sources


class LocalSource:
    """A store on disk: files are read in chunks from the directory."""

    def __init__(self, root):
        self.root = os.fspath(root)

    def where(self, *parts):
        return os.path.join(self.root, *parts)

    def read_index(self):
        path = self.where(INDEX)
        if not os.path.isfile(path):
            raise CaffeishError(f"{self.root}: no {INDEX} (run `caffeish store build {self.root}` first)")
        with open(path, "rb") as f:
            return parse_index(f.read(), path)

    def open(self, parts, start, etag=None):
        path = self.where(*parts)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise CaffeishError(f"{path}: cannot read: {e.strerror}") from None
        total = os.fstat(f.fileno()).st_size
        if start > total:
            f.close()
            raise RangeNotSatisfiable()
        f.seek(start)
        return Response(f, start, total)


class HttpSource:
    """A store over HTTP(S), read with urllib; proxies from the environment except for loopback."""

    def __init__(self, url, timeout=60.0):
        split = urllib.parse.urlsplit(url)
        if split.path.endswith(".json"):
            self.index_url = url
            self.base = url[:url.rindex("/") + 1]
        else:
            self.base = url if url.endswith("/") else url + "/"
            self.index_url = self.base + INDEX
        self.timeout = timeout
        handlers = [urllib.request.ProxyHandler({})] if split.hostname in LOOPBACK else []
        self.opener = urllib.request.build_opener(*handlers)

    def where(self, *parts):
        return self.base + "/".join(urllib.parse.quote(p) for p in parts)

    def _open(self, url, headers):
        req = urllib.request.Request(url, headers={"User-Agent": "caffeish-store", **headers})
        try:
            return self.opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416:
                raise RangeNotSatisfiable() from None
            if e.code in (408, 429) or e.code >= 500:
                raise Transient(f"HTTP {e.code} {e.reason}") from None
            raise CaffeishError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise Transient(_reason(e)) from None

    def read_index(self):
        resp = self._open(self.index_url, {})
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise Transient(_reason(e)) from None
        finally:
            resp.close()
        return parse_index(data, self.index_url)

    def open(self, parts, start, etag=None):
        url = self.where(*parts)
        headers = {}
        if start:
            headers["Range"] = f"bytes={start}-"
            if etag:
                headers["If-Range"] = etag
        resp = self._open(url, headers)
        length = resp.headers.get("Content-Length")
        etag = resp.headers.get("ETag")
        if resp.status == 206:
            first, total = _content_range(resp.headers.get("Content-Range"), url)
            return Response(resp, first, total, etag)
        if resp.status != 200:
            resp.close()
            raise CaffeishError(f"{url}: unexpected HTTP {resp.status}")
        return Response(resp, 0, int(length) if length and length.isdigit() else None, etag)


def _content_range(header, url):
    """(first byte, total or None) from `Content-Range: bytes a-b/total`."""
    try:
        unit, rest = (header or "").split(None, 1)
        span, total = rest.split("/")
        first = int(span.split("-")[0])
        return first, (None if total.strip() == "*" else int(total))
    except ValueError:
        raise CaffeishError(f"{url}: the server sent a malformed Content-Range '{header}'") from None


def open_source(location, timeout=60.0):
    """A LocalSource or HttpSource for a store URL, a store directory or its index.json."""
    location = os.fspath(location)
    scheme = urllib.parse.urlsplit(location).scheme.lower()
    if scheme in ("http", "https"):
        return HttpSource(location, timeout)
    if scheme == "file":
        location = urllib.request.url2pathname(urllib.parse.urlsplit(location).path)
    if os.path.isfile(location) and os.path.basename(location) == INDEX:
        return LocalSource(os.path.dirname(location) or ".")
    if os.path.isdir(location):
        return LocalSource(location)
    raise CaffeishError(f"{location}: not a store directory or an http(s) URL")


def _with_retries(what, action, retries, retry_wait, log):
    failures = 0
    while True:
        try:
            return action()
        except Transient as e:
            failures += 1
            if failures > retries:
                raise CaffeishError(f"{what}: {e} (gave up after {retries} retries)") from None
            if log:
                log(f"{what}: {e}; retrying ({failures} of {retries})")
            time.sleep(retry_wait * failures)


def read_index(location, timeout=60.0, retries=3, retry_wait=1.0, log=None):
    source = open_source(location, timeout)
    return _with_retries(source.where(INDEX), source.read_index, retries, retry_wait, log)


# ---------------------------------------------------------------------------- one file


def _hashers(expected):
    names = ("sha256", "sha1") if expected.get("sha1") else ("sha256",)
    return {a: hashlib.new(a) for a in names}


def _mb(n):
    return f"{n / 1e6:.1f} MB"


def download(source, parts, part, expected, retries=5, retry_wait=1.0, log=None, desc=None):
    """Fetch one file into `part` (resuming what is there) and verify it; returns bytes transferred.

    `expected` is the index's file entry {name, size, sha256[, sha1]}.  On a
    size or checksum mismatch the part is deleted and ChecksumError raised.
    """
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
    failures, etag = 0, None
    try:
        while offset < size:
            before = offset
            try:
                try:
                    resp = source.open(parts, offset, etag)
                except RangeNotSatisfiable:
                    # The server's file is shorter than our part: start the file again.
                    offset, hashes, etag = 0, _hashers(expected), None
                    out.seek(0)
                    out.truncate(0)
                    bar.reset(total=size)
                    raise Transient("the server refused the range (416); starting the file again") from None
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
                finally:
                    resp.close()
            except Transient as e:
                if offset > before:
                    failures = 0
                failures += 1
                if failures > retries:
                    raise CaffeishError(
                        f"{where}: download failed at {_mb(offset)} of {_mb(size)}: {e} (gave up after "
                        f"{retries} retries; run the same pull again to resume)") from None
                if log:
                    log(f"{desc}: {e}; resuming with a range request ({failures} of {retries})")
                time.sleep(retry_wait * failures)
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
        raise CaffeishError(f"{path}: cannot open the pull's {what}: {e.strerror}") from None
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
    """An exclusive lock on OUTDIR/.caffeish-pull.lock: one pull at a time into a folder.

    The lock is fcntl.flock on a file opened with O_NOFOLLOW (a planted link is
    refused); a second pull fails at once, naming the folder.  Released (and the
    file removed) by `release`; a file left by a killed pull holds no lock.
    """

    def __init__(self, outdir):
        self.outdir = os.fspath(outdir)
        self.path = os.path.join(self.outdir, LOCK)
        self.fd = None
        self.discarded = False  # set when a failed pull deleted its parts (OUTDIR may then go too)

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
                        f"{LOCK}); wait for it to finish or pull into another folder") from None
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


def part_path(outdir, name):
    return os.path.join(outdir, f".{name}.part")


# ---------------------------------------------------------------------------- a model


def pull(location, name, outdir, force=False, retries=5, retry_wait=1.0, timeout=60.0, validate=True, log=None):
    """Download model `name` from a store into `outdir`; returns a summary dict.

    Raises CaffeishError (ChecksumError for a size or checksum mismatch).  Files
    in place are never touched by a failed pull: after a checksum or validation
    failure nothing of the pull is kept (nor OUTDIR, if the pull created it);
    after a network failure the hidden `.part` files stay for the next pull to
    resume.
    """
    source = open_source(location, timeout)
    index = _with_retries(source.where(INDEX), source.read_index, retries, retry_wait, log)
    entry = find_model(index, name, source.where(INDEX))
    path = [p for p in str(entry.get("path", entry["name"])).split("/") if p not in ("", ".")]
    outdir = os.fspath(outdir)
    created = io.make_folders([os.path.join(outdir, LOCK)])  # OUTDIR and the folders above it that are missing
    lock = PullLock(outdir)
    try:
        lock.acquire()
    except CaffeishError:
        io.remove_empty_folders(created)
        raise
    failed = True
    try:
        result = _pull_locked(source, entry, path, outdir, lock, force, retries, retry_wait, validate, log)
        failed = False
        return result
    finally:
        lock.release()
        if failed and lock.discarded:
            io.remove_empty_folders(created)


def _pull_locked(source, entry, path, outdir, lock, force, retries, retry_wait, validate, log):
    """pull's work once OUTDIR is locked; `lock.discarded` says whether a failure threw the pull away."""
    local_index = make_index([dict(entry, path=".")])
    index_path = os.path.join(outdir, INDEX)
    if os.path.isfile(index_path) and not force and _json(index_path) != json.loads(json.dumps(local_index)):
        raise CaffeishError(f"{index_path} exists and describes another model or version; "
                            f"pass --force to overwrite the folder's files")
    plan, kept = [], []
    for f in entry["files"]:
        dest = os.path.join(outdir, f["name"])
        if os.path.lexists(dest):
            status = check_file(dest, f) if os.path.isfile(dest) else "not a regular file"
            if status == "ok":
                kept.append(f["name"])
                continue
            if not force:
                raise CaffeishError(f"{dest} exists and differs from the store's copy ({status}); "
                                    f"pass --force to overwrite it")
        plan.append((f, dest, part_path(outdir, f["name"])))
    transferred = 0
    try:
        for f, dest, part in plan:
            try:
                transferred += download(source, path + [f["name"]], part, f, retries, retry_wait, log)
            except ChecksumError as e:
                if not getattr(e, "resumed", False):
                    raise
                if log:
                    log(f"{f['name']}: the resumed file did not verify; downloading it again from the start")
                transferred += download(source, path + [f["name"]], part, f, retries, retry_wait, log)
    except ChecksumError:
        _discard(plan, lock)  # the store's copy is bad: nothing of this pull is kept
        raise
    paths = {f["name"]: os.path.join(outdir, f["name"]) for f in entry["files"]}
    paths.update({f["name"]: part for f, _, part in plan})
    if validate:
        try:
            check_net(paths[entry.get("deploy", "deploy.prototxt")], paths[entry.get("weights", "weights.caffemodel")],
                      entry.get("inputs") or None)
        except KeyError as e:
            raise CaffeishError(f"model '{entry['name']}': the index lists no file {e}") from None
        except CaffeishError as e:
            _discard(plan, lock)
            raise CaffeishError(f"model '{entry['name']}' downloaded and verified, but the net does not "
                                f"validate: {e}") from None
    for f, dest, part in plan:
        os.replace(part, dest)
    write_index(index_path, local_index)
    return {"name": entry["name"], "outdir": outdir, "files": len(entry["files"]),
            "downloaded": [f["name"] for f, _, _ in plan], "kept": kept, "bytes": transferred,
            "size": sum(f["size"] for f in entry["files"]), "validated": validate,
            "sha1": any(f.get("sha1") for f in entry["files"])}


def _discard(plan, lock):
    """Delete this pull's part files (OUTDIR goes too, once unlocked, when the pull created it and it is empty)."""
    for _, _, part in plan:
        _remove(part)
    lock.discarded = True


def _json(path):
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
