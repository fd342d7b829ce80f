"""Outputs that appear whole or not at all, even when the writer is killed, and the clean-up of what
killed writers left behind.

Every temporary name carries the writer's process id, so that a later run can tell the leftovers of a
dead writer from the work of a live one (`pid_alive`):

    .NAME.PID-XXXXXXXX.tmp         a file being written beside NAME (io.atomic_output, io.atomic_outputs)
    .caffeish-journal.PID-XXXXXXXX the renames that complete one multi-file output (io.atomic_outputs)
    .NAME.tmp-PID/                 a folder being built for NAME (`OutputFolder` in apps/dataset)
    .NAME.new-PID/                 that folder, complete, about to take NAME's place
    .NAME.old-PID/                 NAME's previous contents, being removed

Several files (`commit_files`): each is written and synced under its temporary name first; then a
journal listing the renames is written and synced in every folder involved (the commit point), the
renames are done and the journal removed.  A run killed before the journal exists leaves only
temporary files, which the next run removes; one killed after it leaves a journal that the next run
writing into any of those folders completes (`recover`), so the set of files is either all old or all
new once anyone looks again.

A folder (`swap_in`): built under `.NAME.tmp-PID` with a marker file inside, renamed to
`.NAME.new-PID` once complete, then swapped with NAME in one step (Linux's renameat2
RENAME_EXCHANGE; elsewhere two renames, the gap closed by the next run).  The marker inside NAME says
that the swap happened; the previous contents are then removed and the marker last.  `recover_folder`
finishes or undoes what a killed run left: a swap that happened is finished, a complete folder with no
NAME is moved into place, anything else is rolled back (NAME keeps its old contents).

Only names of these forms, owned by the current user, whose process is gone, are ever touched, and a
journal only ever renames a temporary file onto the file it is named after, in the same folder.
"""
import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import stat
import tempfile

from caffeish.errors import CaffeishError

JOURNAL_PREFIX = ".caffeish-journal."
MARKER = ".caffeish-incoming"  # inside a folder being built or swapped in
MAX_JOURNAL_BYTES = 1 << 20

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[A-Za-z0-9_]{8}\.tmp$")
_JOURNAL = re.compile(r"^" + re.escape(JOURNAL_PREFIX) + r"(?P<pid>\d+)-[A-Za-z0-9_]{8}$")
_FOLDER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|new|old)-(?P<pid>\d+)$")
_LEGACY_OLD = re.compile(r"^(?P<name>[^.].*)\.old-(?P<pid>\d+)$")  # `NAME.old-PID` of earlier versions


def pid_alive(pid):
    """Whether a process with this id exists (another user's counts as alive)."""
    pid = int(pid)
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _mine(st):
    return st.st_uid == os.geteuid()


def _lstat(path):
    try:
        return os.lstat(path)
    except OSError:
        return None


def _fsync_folder(folder):
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_tree(path):
    """Remove a folder (or the link or file at `path`) without following links."""
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


# ---------------------------------------------------------------------------- files


def temp_file(path):
    """(fd, temp path) of a new file beside `path`, named `.NAME.PID-XXXXXXXX.tmp`."""
    folder = os.path.dirname(os.path.abspath(path))
    return tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}-", suffix=".tmp", dir=folder)


def _journal_renames(path, pid):
    """The (temp, final) pairs of a journal file, checked (see the module doc), or None."""
    st = _lstat(path)
    if st is None or not stat.S_ISREG(st.st_mode) or not _mine(st) or st.st_size > MAX_JOURNAL_BYTES:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        pairs = [(str(t), str(d)) for t, d in doc["renames"]]
        copies = [str(c) for c in doc.get("journals", [])]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    checked = []
    for tmp, final in pairs:
        m = _TEMP.match(os.path.basename(tmp))
        if (not m or int(m.group("pid")) != pid or m.group("name") != os.path.basename(final)
                or os.path.dirname(tmp) != os.path.dirname(final) or not os.path.isabs(tmp)):
            return None
        checked.append((tmp, final))
    copies = [c for c in copies if _JOURNAL.match(os.path.basename(c)) and os.path.isabs(c)]
    return checked, copies


def _complete(journal, pid):
    """Finish the renames a dead writer's journal lists; remove the journal and its copies."""
    found = _journal_renames(journal, pid)
    if found is None:
        st = _lstat(journal)
        if st is not None and stat.S_ISREG(st.st_mode) and _mine(st):
            with contextlib.suppress(OSError):
                os.unlink(journal)  # cut short by a kill before the commit point: its temps go too
        return
    pairs, copies = found
    for tmp, final in pairs:
        st = _lstat(tmp)
        if st is not None and stat.S_ISREG(st.st_mode) and _mine(st):
            with contextlib.suppress(OSError):
                os.replace(tmp, final)
    for folder in {os.path.dirname(final) for _, final in pairs}:
        _fsync_folder(folder)
    for path in set(copies) | {journal}:
        st = _lstat(path)
        if st is not None and stat.S_ISREG(st.st_mode) and _mine(st):
            with contextlib.suppress(OSError):
                os.unlink(path)


_clean = {}  # real path of a folder -> its mtime (ns) when this process last left it recovered


def _mtime(folder):
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None


def mark_clean(folder):
    """Note that `folder` holds nothing to recover as it is now (after this process's own write), so
    that the next write into it costs a stat, not a listing (segment writes thousands of files into
    one OUTDIR).  Anything another process does there changes the folder's mtime, and recover then
    lists it again."""
    _clean[os.path.realpath(folder)] = _mtime(folder)


def recover(folder):
    """Complete the journals and remove the temporary files that killed writers left in `folder`
    (skipped while the folder is as this process last left it, see mark_clean)."""
    key = os.path.realpath(folder)
    before = _mtime(folder)
    if before is not None and _clean.get(key) == before:
        return
    _recover(folder)
    _clean[key] = _mtime(folder)


def _recover(folder):
    try:
        entries = [e.name for e in os.scandir(folder) if e.name.startswith(".")]
    except OSError:
        return
    for name in entries:  # journals first: their temporary files are what they rename
        m = _JOURNAL.match(name)
        if m and not pid_alive(m.group("pid")):
            _complete(os.path.join(folder, name), int(m.group("pid")))  # (one that does not parse: removed)
    for name in entries:
        m = _TEMP.match(name)
        if m and not pid_alive(m.group("pid")):
            path = os.path.join(folder, name)
            st = _lstat(path)
            if st is not None and not stat.S_ISDIR(st.st_mode) and _mine(st):
                with contextlib.suppress(OSError):
                    os.unlink(path)


class RenameError(CaffeishError, OSError):
    """A rename into place failed while committing several files (also an OSError, as the rename's own)."""


def _write_journal(path, body):
    """Write a journal in place (no rename: a journal cut short by a kill does not parse, and the next
    run removes it and the temps it would have named)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def commit_files(staged):
    """Rename [(temp, final)] into place as one: journal (synced) first, renames, then no journal.

    Every temp must already be written, synced and closed.  One file needs no journal.  A run killed
    during the renames leaves the journal for the next run to complete (`recover`).  A rename that
    fails here (the folder removed or made read-only meanwhile) raises RenameError, after the journal
    is removed: the files renamed before it stay, the caller removes the other temps."""
    staged = [(os.path.abspath(t), os.path.abspath(f)) for t, f in staged]
    folders = sorted({os.path.dirname(f) for _, f in staged})
    journals = []
    if len(staged) > 1:
        token = os.path.basename(staged[0][0]).rsplit(".", 2)[-2]  # PID-XXXXXXXX of the first temp
        paths = [os.path.join(folder, JOURNAL_PREFIX + token) for folder in folders]
        body = json.dumps({"renames": staged, "journals": paths}).encode("utf-8")
        try:
            for journal in paths:
                _write_journal(journal, body)
                journals.append(journal)
        except OSError as e:
            for done in journals:
                with contextlib.suppress(OSError):
                    os.unlink(done)
            raise CaffeishError(f"{e.filename or folders[0]}: cannot write: {e.strerror} (nothing was written)") from None
        except BaseException:
            for done in journals:
                with contextlib.suppress(OSError):
                    os.unlink(done)
            raise
        for folder in folders:
            _fsync_folder(folder)
    try:
        for tmp, final in staged:
            try:
                os.replace(tmp, final)
            except OSError as e:
                raise RenameError(f"{final}: cannot rename into place: {e.strerror or e}") from None
    except RenameError:
        for journal in journals:
            with contextlib.suppress(OSError):
                os.unlink(journal)
        raise
    for folder in folders:
        _fsync_folder(folder)
    for journal in journals:
        with contextlib.suppress(OSError):
            os.unlink(journal)


# ---------------------------------------------------------------------------- folders


def folder_name(path, kind, pid=None):
    """`.NAME.KIND-PID` beside `path` (kind: tmp, new or old)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{kind}-{pid or os.getpid()}")


def build_folder(path):
    """A fresh `.NAME.tmp-PID` folder beside `path`, with the marker inside; returns its path."""
    tmp = folder_name(path, "tmp")
    _remove_tree(tmp)
    os.makedirs(tmp)
    with open(os.path.join(tmp, MARKER), "wb"):
        pass
    return tmp


def write_folder(path, write):
    """Make the folder `path` whole: write(tmp) fills a build_folder beside it and swap_in moves it into
    place; on any failure the half-built folder is removed and `path` is left as it was."""
    tmp = build_folder(path)
    try:
        write(tmp)
        swap_in(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove_tree(tmp)
        raise
    return path


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a, b):
    """Swap two directory entries in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), a)


def _finish(path, leftover):
    """After the swap: remove the previous contents (`leftover`, renamed to .old-PID first), then the marker."""
    if leftover is not None and _lstat(leftover) is not None:
        old = folder_name(path, "old")
        _remove_tree(old)
        os.rename(leftover, old)
        leftover = old
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(path, MARKER))
    if leftover is not None:
        _remove_tree(leftover)


def swap_in(tmp, path):
    """Put the complete folder `tmp` (from build_folder) at `path`, replacing what is there in one step
    where the system allows (see the module doc).  A link at `path` is replaced, its target left alone."""
    path = os.path.abspath(path)
    new = folder_name(path, "new")
    _remove_tree(new)
    os.rename(tmp, new)  # complete: a killed run's next run may move it into place
    _fsync_folder(os.path.dirname(path))
    if _lstat(path) is None:
        os.rename(new, path)
        _finish(path, None)
    elif _exchange(new, path):
        _finish(path, new)  # `new` now names the previous contents
    else:
        old = folder_name(path, "old")
        _remove_tree(old)
        os.rename(path, old)
        os.rename(new, path)
        _finish(path, old)
    _fsync_folder(os.path.dirname(path))


def recover_folder(path, looks_ours=None):
    """Finish or undo what killed `swap_in`/`build_folder` runs left beside `path` and beside any other
    folder of its parent (see the module doc).  `looks_ours(folder)` may accept `.NAME.tmp-PID`
    folders without the marker (left by versions that wrote none)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        names = [e.name for e in os.scandir(parent)]
    except OSError:
        return
    found = {}  # NAME -> {kind: [(pid, path)]}
    for name in names:
        m = _FOLDER.match(name) or _LEGACY_OLD.match(name)
        if not m or pid_alive(m.group("pid")):
            continue
        full = os.path.join(parent, name)
        st = _lstat(full)
        if st is None or not _mine(st):
            continue
        kind = m.groupdict().get("kind") or "old"
        found.setdefault(m.group("name"), {}).setdefault(kind, []).append(full)
    for name, kinds in found.items():
        _recover_one(os.path.join(parent, name), kinds, looks_ours)


def _has_marker(folder):
    st = _lstat(os.path.join(folder, MARKER))
    return st is not None and stat.S_ISREG(st.st_mode)


def _recover_one(path, kinds, looks_ours=None):
    for tmp in kinds.get("tmp", []):
        if _has_marker(tmp) or (looks_ours is not None and not os.path.islink(tmp) and looks_ours(tmp)):
            _remove_tree(tmp)  # an unfinished build
    news, olds = kinds.get("new", []), kinds.get("old", [])
    if _lstat(path) is not None and not os.path.islink(path) and _has_marker(path):
        for leftover in news + olds:  # the swap happened: these hold the previous contents
            _remove_tree(leftover)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(path, MARKER))
        return
    complete = [n for n in news if _has_marker(n)]
    if _lstat(path) is None and complete:
        os.rename(complete[0], path)  # killed between the two renames (or before the first build's one)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(path, MARKER))
        for leftover in news[1:] + olds:
            _remove_tree(leftover)
        return
    for new in complete:
        _remove_tree(new)  # killed before the swap: NAME keeps its contents
    if _lstat(path) is None and len(olds) == 1:
        os.rename(olds[0], path)  # only the previous contents are left: put them back
    elif _lstat(path) is not None:
        for old in olds:
            _remove_tree(old)
