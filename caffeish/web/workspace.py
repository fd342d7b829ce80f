"""The workspace folder the web app serves, and the only way a request's words become paths.

    ROOT/models/NAME/     a model: a deploy prototxt (deploy.prototxt, *deploy*.prototxt or the only
                          .prototxt), weights (the readme's caffemodel, weights.caffemodel or the only
                          .caffemodel; none: the layers' fillers), labels.txt, mean.binaryproto,
                          palette.txt, readme.md (Model Zoo front matter), as `caffeish store pull` writes
    ROOT/datasets/NAME/   a dataset of `caffeish dataset` (dataset.json, train_db/, val_db/, ...)
    ROOT/stores.txt       model store URLs (or folders inside ROOT), one a line, besides `--store`
    ROOT/anything else    image and label folders to build datasets from

A name from a request (a model, a dataset, a folder) is a path relative to ROOT whose parts are
plain names (store.safe_name: no '..', no separator, not hidden); every existing part is checked
with lstat, so a symbolic link is never followed, in or out of the workspace (`resolve`).  Files
the app reads inside a model or dataset folder are checked the same way (`file_in`).
"""
import os
import re
import stat

from caffeish.apps.store import read_readme, safe_name, weights_file
from caffeish.errors import CaffeishError
from caffeish.formats.io import printable

MODELS, DATASETS, STORES = "models", "datasets", "stores.txt"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}\Z")  # names the app creates and serves
MAX_DEPTH = 16
SKIP_FOLDERS = {MODELS, DATASETS, "jobs"}


class WorkspaceError(CaffeishError):
    """A request's path that the workspace does not serve (a 404 or 400 for the page)."""


def check_name(name, what="name"):
    """A model or dataset name the app creates: letters, digits, '.', '_', '+', '-' (at most 100)."""
    if not isinstance(name, str) or not NAME.match(name):
        raise WorkspaceError(f"{what} '{printable(name)}': use letters, digits, '.', '_', '+' and '-' "
                             f"(starting with a letter or digit, at most 100)")
    return name


class ModelFiles:
    """The files of a model folder (absolute paths or None)."""

    def __init__(self, name, folder):
        self.name, self.folder = name, folder
        names = sorted(n for n in os.listdir(folder) if safe_name(n))
        protos = [n for n in names if n.endswith(".prototxt")]
        deploys = [n for n in protos if n == "deploy.prototxt"] or [n for n in protos if "deploy" in n]
        if not deploys and len(protos) == 1:
            deploys = protos
        self.problem = None
        self.deploy = _regular(folder, deploys[0]) if deploys else None
        if self.deploy is None:
            self.problem = "no deploy prototxt (deploy.prototxt, *deploy*.prototxt or a single .prototxt)"
        try:
            self.meta, self.readme = read_readme(folder)
        except CaffeishError:
            self.meta, self.readme = {}, ""
        try:
            self.weights = _regular(folder, weights_file(folder, self.meta))
        except CaffeishError:
            self.weights = None  # no weights: the layers' fillers
        self.labels = _regular(folder, "labels.txt")
        self.mean = _regular(folder, "mean.binaryproto")
        self.palette = _regular(folder, "palette.txt")
        self.title = str(self.meta.get("name") or name)

    def stamp(self):
        """What changes when a file of the model changes (cache keys)."""
        return tuple(_stamp(p) for p in (self.deploy, self.weights, self.labels, self.mean, self.palette))


def _stamp(path):
    if path is None:
        return None
    st = os.stat(path)
    return (path, st.st_mtime_ns, st.st_size, st.st_ino)


def _regular(folder, name):
    """folder/name when it is a regular file (not a link), else None."""
    path = os.path.join(folder, name)
    try:
        return path if stat.S_ISREG(os.lstat(path).st_mode) else None
    except OSError:
        return None


class Workspace:
    def __init__(self, root, stores=()):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise CaffeishError(f"{root}: not a folder (the workspace must exist)")
        self.root = os.path.realpath(root)
        self.given_stores = list(stores)

    # -- paths -----------------------------------------------------------------------------------
    def resolve(self, rel, must_exist=True, kind=None):
        """ROOT/rel for a request's relative path: plain names only, no link followed.

        kind: 'dir' or 'file' to require one (when it exists)."""
        if not isinstance(rel, str) or "\x00" in rel or len(rel) > 1024:
            raise WorkspaceError("not a path of the workspace")
        parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("",)]
        if len(parts) > MAX_DEPTH or any(p in (".", "..") or not safe_name(p) for p in parts):
            raise WorkspaceError(f"'{printable(rel)}' is not a path inside the workspace (plain names only: "
                                 "no '..', no hidden or absolute paths)")
        path = self.root
        for i, part in enumerate(parts):
            path = os.path.join(path, part)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if must_exist:
                    raise WorkspaceError(f"'{printable(rel)}': not in the workspace") from None
                return path
            if stat.S_ISLNK(st.st_mode):
                raise WorkspaceError(f"'{printable(rel)}': a symbolic link; the web app follows none")
            if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
                raise WorkspaceError(f"'{printable(rel)}': not in the workspace")
        if os.path.lexists(path):
            mode = os.lstat(path).st_mode
            if kind == "dir" and not stat.S_ISDIR(mode):
                raise WorkspaceError(f"'{printable(rel)}' is not a folder")
            if kind == "file" and not stat.S_ISREG(mode):
                raise WorkspaceError(f"'{printable(rel)}' is not a file")
        return path

    def relative(self, path):
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def _names(self, folder):
        top = os.path.join(self.root, folder)
        if not os.path.isdir(top) or os.path.islink(top):
            return []
        return sorted(n for n in os.listdir(top) if NAME.match(n)
                      and stat.S_ISDIR(os.lstat(os.path.join(top, n)).st_mode))

    # -- models ------------------------------------------------------------------------------------
    def models(self):
        return [self.model(n) for n in self._names(MODELS)]

    def model(self, name):
        check_name(name, "model")
        return ModelFiles(name, self.resolve(f"{MODELS}/{name}", kind="dir"))

    def new_model_path(self, name):
        """ROOT/models/NAME for a new model: refused when it exists."""
        return self._new_path(MODELS, name, "model")

    # -- datasets ----------------------------------------------------------------------------------
    def datasets(self):
        return [n for n in self._names(DATASETS)
                if os.path.isfile(os.path.join(self.root, DATASETS, n, "dataset.json"))]

    def dataset(self, name):
        check_name(name, "dataset")
        path = self.resolve(f"{DATASETS}/{name}", kind="dir")
        if _regular(path, "dataset.json") is None:
            raise WorkspaceError(f"dataset '{name}' has no dataset.json")
        return path

    def new_dataset_path(self, name):
        return self._new_path(DATASETS, name, "dataset")

    def _new_path(self, folder, name, what):
        check_name(name, what)
        os.makedirs(os.path.join(self.root, folder), exist_ok=True)
        path = self.resolve(f"{folder}/{name}", must_exist=False)
        if os.path.lexists(path):
            raise WorkspaceError(f"{what} '{name}' exists already; choose another name")
        return path

    def folders(self, limit=500):
        """Relative paths of the workspace's folders outside models/ and datasets/ (image and label folders
        to build datasets from), links not followed."""
        found = []
        for top, dirs, _ in os.walk(self.root):
            rel = os.path.relpath(top, self.root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            dirs[:] = sorted(d for d in dirs if safe_name(d) and not os.path.islink(os.path.join(top, d))
                             and not (depth == 0 and d in SKIP_FOLDERS) and depth < MAX_DEPTH)
            if rel != ".":
                found.append(rel.replace(os.sep, "/"))
            if len(found) >= limit:
                break
        return found

    # -- stores ------------------------------------------------------------------------------------
    def stores(self):
        """Store locations: --store ones, then ROOT/stores.txt's (URLs, or folders inside ROOT)."""
        out = list(self.given_stores)
        listed = _regular(self.root, STORES)
        if listed:
            with open(listed, encoding="utf-8", errors="replace") as f:
                for line in f.read(1 << 16).splitlines():
                    line = line.strip()
                    if line and not line.startswith("#") and line not in out:
                        out.append(line)
        return out

    def store_location(self, text):
        """A store location from a request: an http(s) URL, or a folder inside the workspace."""
        text = (text or "").strip()
        if text in self.stores() or re.match(r"https?://[^\s]+\Z", text):
            return text
        return self.resolve(text, kind="dir")
