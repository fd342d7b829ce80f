"""The model store format: model folders, their readme front matter, and index.json.

A store is a directory (served as is over HTTP by caffeish.apps.store_server) with
one folder per model and an index.json that `build_index` writes:

    STORE/index.json
    STORE/fcn_alexnet/deploy.prototxt       required
    STORE/fcn_alexnet/weights.caffemodel    required (or the file the readme's `caffemodel:` names)
    STORE/fcn_alexnet/train_val.prototxt    optional
    STORE/fcn_alexnet/mean.binaryproto      optional
    STORE/fcn_alexnet/labels.txt            optional, one class name per line
    STORE/fcn_alexnet/readme.md             Caffe Model Zoo front matter + free text

The readme front matter is the Caffe Model Zoo's: a block between two `---`
lines with `key: value` lines (name, caffemodel, caffemodel_url, sha1, license,
gist_id, caffe_commit, ...).  Caffe's scripts/download_model_binary.py read it
to fetch `caffemodel_url` and check the file's sha1; `verify_folder` does that
check here.  Our own keys (description, task, classes, input_shape) override
what `describe_model` infers from the net.

index.json lists every model that validated (the net parses, its shapes
infer, its weights bind): name, title, description, task, input shape,
classes, license, the Model Zoo keys, and every file with its size and sha256
(and sha1 where the readme gives one).  Hashes are computed in chunks: a
caffemodel is never held in memory to be hashed.

A store is untrusted input, to `build` (its folders) as to `pull` (its index):
every metadata read is bounded (index.json to 16 MiB, a readme to 1 MiB), an
index is checked field by field before anything is downloaded, names and text
quoted in messages have their control characters escaped (`shown`), `build`
refuses symbolic links that leave the store or reach a hidden file (the
server would not serve them either), and checking a net never imports the
module of a `type: "Python"` layer unless the caller allows it
(`allow_python_layers`, the CLI's --allow-python-layers).
"""
import hashlib
import json
import os
import posixpath
import re
import stat

from caffeish.formats import io
from caffeish.graph import weights
from caffeish.errors import CaffeishError, CorruptFileError
from caffeish.graph.graph import Graph, filter_net, make_state
from caffeish.values import parse_shape

INDEX = "index.json"
FORMAT = "caffeish-store"
VERSION = 1
DEPLOY = "deploy.prototxt"
WEIGHTS = "weights.caffemodel"
TRAIN_VAL = "train_val.prototxt"
MEAN = "mean.binaryproto"
LABELS = "labels.txt"
README = "readme.md"
HASH_CHUNK = 1 << 20
SEGMENTATION_TYPES = ("Deconvolution", "Crop")
MAX_INDEX_BYTES = 16 << 20  # a store's index.json (a few kB per model)
MAX_README_BYTES = 1 << 20  # the part of a readme.md that is read
MAX_FILE_BYTES = 1 << 50    # the largest file size an index may claim
MAX_AXES = 32               # a shape in an index: at most this many dimensions

_UNSAFE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_HEX = {"sha256": re.compile(r"[0-9a-fA-F]{64}"), "sha1": re.compile(r"[0-9a-fA-F]{40}")}


class ChecksumError(CorruptFileError):
    """A file whose size, sha256 or sha1 is not the one its store or readme records."""


class PythonLayersNotRun(CaffeishError):
    """A net with Python layers, whose code was not run to check it (allow_python_layers runs it)."""


def shown(text, limit=300):
    """`text` from a file or a server for a one-line message: cut to `limit` characters, then every
    unprintable character escaped (io.printable: a newline as \\n, ESC as \\x1b)."""
    text = str(text)
    return io.printable(text[:limit]) + ("..." if len(text) > limit else "")


def read_bounded(path, limit, what, follow=True):
    """The bytes of a small file (an index, a readme), refusing one larger than `limit` (never read whole)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise CaffeishError(f"{path}: cannot read the {what}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CaffeishError(f"{path}: the {what} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CaffeishError(f"{path}: the {what} is larger than {human_size(limit)}; not a {what}")
    return data


# ---------------------------------------------------------------------------- hashing


def hash_stream(f, hashes, length=None, chunk=HASH_CHUNK):
    """Feed the open binary file `f`, from where it stands, to `hashes` ({algorithm: hashlib object}) in chunks
    read into one reused buffer: `length` bytes (fewer if the file ends first), else all.  Returns the count."""
    view = memoryview(bytearray(chunk))
    done = 0
    while length is None or done < length:
        n = f.readinto(view if length is None else view[:min(chunk, length - done)])
        if not n:
            break
        for h in hashes.values():
            h.update(view[:n])
        done += n
    return done


def hash_file(path, algorithms=("sha256",), chunk=HASH_CHUNK):
    """{algorithm: hexdigest} of a file (hash_stream)."""
    hashes = {a: hashlib.new(a) for a in algorithms}
    try:
        with open(path, "rb", buffering=0) as f:
            hash_stream(f, hashes, chunk=chunk)
    except OSError as e:
        raise CaffeishError(f"{path}: cannot read: {e.strerror}") from None
    return {a: h.hexdigest() for a, h in hashes.items()}


# ---------------------------------------------------------------------------- readme


def parse_front_matter(text):
    """The Caffe Model Zoo front matter of a readme.md: ({key: value}, body text).

    Only the simple `key: value` lines are read (quotes stripped); nested YAML
    and lists are skipped, as no key we use needs them.  No front matter gives ({}, text).
    """
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}, text
    meta = {}
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            return meta, "\n".join(lines[i + 1:])
        m = re.match(r"^([A-Za-z_][\w-]*)\s*:\s*(.*?)\s*$", line)
        if m:
            value = m.group(2)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            meta[m.group(1)] = value
    return {}, text  # no closing '---': not front matter


def read_readme(folder):
    """({front matter}, body) of folder/readme.md, or ({}, "") when there is none."""
    path = os.path.join(folder, README)
    if not os.path.isfile(path):
        return {}, ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise CaffeishError(f"{path}: cannot read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_README_BYTES)  # the front matter and first paragraph are at the top
    return parse_front_matter(data.decode("utf-8", errors="replace"))


def first_paragraph(body, limit=300):
    """The first paragraph of a markdown body that is not a heading, on one line."""
    for block in re.split(r"\n\s*\n", body):
        text = " ".join(line.strip() for line in block.splitlines() if not line.lstrip().startswith("#"))
        text = " ".join(text.split())
        if text:
            return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."
    return ""


# ---------------------------------------------------------------------------- validation


def safe_name(name):
    """True for a plain file or folder name: no separators, not hidden, not '.' or '..', no control
    characters and nothing that is not text (an undecodable byte of a file name)."""
    return (isinstance(name, str) and bool(name) and len(name) <= 255 and not name.startswith(".")
            and "/" not in name and "\\" not in name and not _UNSAFE_CHARS.search(name))


def input_shapes_from(meta):
    """{blob: shape} from the front matter's input_shape (`1,3,227,227` or `data=1,3,227,227;...`)."""
    text = meta.get("input_shape", "").strip()
    if not text:
        return None
    shapes = {}
    for part in re.split(r"[;\s]+", text):
        if not part:
            continue
        if "=" in part:
            name, dims = part.split("=", 1)
            shapes[name.strip()] = parse_shape(dims)
        else:
            shapes["data"] = parse_shape(part)
    return shapes


def python_layers(net):
    """The `type: "Python"` layers of a net at TEST (their code runs when the net's shapes are inferred)."""
    return [layer for layer in filter_net(net, make_state(net, "TEST")).layer if layer.type == "Python"]


def check_net(deploy, weights_path, input_shapes=None, allow_python_layers=False):
    """Caffe's own checks on a model: the net parses, its shapes infer, its weights bind.

    The weights are checked without copying them (views over the mapped file),
    so a 500 MB caffemodel costs a few pages.  Returns the Graph.

    A net with Python layers at TEST is checked only this far (it parses, its
    weights parse) unless `allow_python_layers`: inferring its shapes imports the
    layers' modules and runs their setup and reshape.  PythonLayersNotRun says so.
    """
    net = io.read_net(deploy)
    if not allow_python_layers:
        found = python_layers(net)
        if found:
            io.read_caffemodel(weights_path, copy=False)
            names = ", ".join(f"'{shown(layer.name)}' (module '{shown(layer.python_param.module)}')"
                              for layer in found[:3]) + (", ..." if len(found) > 3 else "")
            raise PythonLayersNotRun(
                f"{deploy}: has Python layer(s) {names}; checking its shapes and weights would import and "
                f"run that code, which is not done unless --allow-python-layers is given")
    graph = Graph(net, phase="TEST", input_shapes=input_shapes)
    model = io.read_caffemodel(weights_path, copy=False)
    binding = weights.bind(graph, model, source=str(weights_path))
    if not binding.arrays:
        raise CaffeishError(
            f"{weights_path}: no layer of the weights matches a layer of {deploy} "
            f"(net layers with parameters: {', '.join(binding.missing) or 'none'})")
    if binding.missing:
        raise CaffeishError(
            f"{weights_path}: layers {', '.join(binding.missing)} of {deploy} have no weights "
            f"(a pretrained model must hold them all)")
    return graph


def describe_graph(graph):
    """(task, {input: shape}, classes) inferred from a deploy net's graph.

    A net whose output keeps spatial dimensions, or that upsamples
    (Deconvolution, Crop), is a segmentation net; otherwise a classifier.
    The classes are the channels of the last output.
    """
    inputs = {b: list(graph.blob_shapes[b]) for b in graph.sources}
    out = graph.outputs[-1] if graph.outputs else None
    shape = graph.blob_shapes.get(out, ()) if out else ()
    spatial = len(shape) >= 4 and any(d > 1 for d in shape[2:])
    upsamples = any(n.type in SEGMENTATION_TYPES for n in graph.nodes)
    task = "segmentation" if spatial or upsamples else "classification"
    classes = int(shape[1]) if len(shape) >= 2 else (int(shape[0]) if shape else None)
    return task, inputs, classes


def weights_file(folder, meta):
    """The caffemodel of a model folder: the readme's `caffemodel:`, else weights.caffemodel, else the only one."""
    named = meta.get("caffemodel")
    if named and safe_name(named) and os.path.isfile(os.path.join(folder, named)):
        return named
    if os.path.isfile(os.path.join(folder, WEIGHTS)):
        return WEIGHTS
    found = sorted(n for n in os.listdir(folder) if n.endswith(".caffemodel") and not n.startswith("."))
    if len(found) == 1:
        return found[0]
    if named:
        raise CaffeishError(f"{folder}: the readme names caffemodel '{shown(named)}', which is not in the folder")
    if found:
        raise CaffeishError(f"{folder}: several caffemodels ({', '.join(found)}) and none is {WEIGHTS}")
    raise CaffeishError(f"{folder}: no {WEIGHTS} (every store model needs its pretrained weights)")


def _labels_count(path):
    """The lines of labels.txt that are not blank, read in chunks (a file of one endless line included)."""
    count, filled = 0, False
    with open(path, "rb") as f:
        while True:
            chunk = f.read(HASH_CHUNK)
            if not chunk:
                return count + filled
            for i, piece in enumerate(chunk.split(b"\n")):
                if i:
                    count, filled = count + filled, False
                filled = filled or bool(piece.strip())


def check_inside(path, root):
    """Refuse a path of the store that a symbolic link takes out of the store `root`, or to a hidden
    file or folder in it (the server serves neither, and a pull would copy what is outside)."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    try:
        inside = os.path.commonpath([real, top]) == top
    except ValueError:
        inside = False
    if not inside:
        raise CaffeishError(f"{shown(path)}: a symbolic link to {shown(real)}, outside the store {shown(root)}; "
                            f"a store holds its own files (copy the file into the store)")
    rel = os.path.relpath(real, top)
    if rel != "." and not all(safe_name(p) for p in rel.split(os.sep)):
        raise CaffeishError(f"{shown(path)}: a symbolic link to {shown(real)}, a hidden or unnamable file of the "
                            f"store, which the store does not serve")


def describe_model(folder, name=None, path=None, root=None, allow_python_layers=False):
    """Validate one model folder and return its index entry (raises CaffeishError when it fails).

    `name` defaults to the folder's name; `path` is the folder relative to the
    index (default: the name); `root` is the store (default: the folder's parent),
    which no file of the model may leave through a symbolic link (check_inside).
    """
    folder = os.fspath(folder)
    name = name or os.path.basename(os.path.normpath(folder))
    root = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(folder))
    check_inside(folder, root)
    for fname in os.listdir(folder):
        if safe_name(fname) and fname != INDEX:
            check_inside(os.path.join(folder, fname), root)
    meta, body = read_readme(folder)
    deploy = os.path.join(folder, DEPLOY)
    if not os.path.isfile(deploy):
        raise CaffeishError(f"{folder}: no {DEPLOY}")
    caffemodel = weights_file(folder, meta)
    graph = check_net(deploy, os.path.join(folder, caffemodel), input_shapes_from(meta), allow_python_layers)
    if os.path.isfile(os.path.join(folder, TRAIN_VAL)):
        io.read_net(os.path.join(folder, TRAIN_VAL))
    if os.path.isfile(os.path.join(folder, MEAN)):
        io.read_binaryproto(os.path.join(folder, MEAN))
    task, inputs, classes = describe_graph(graph)
    if os.path.isfile(os.path.join(folder, LABELS)):
        classes = _labels_count(os.path.join(folder, LABELS))
    if meta.get("classes", "").strip():
        try:
            classes = int(meta["classes"])
        except ValueError:
            raise CaffeishError(f"{folder}/{README}: classes must be a number, not '{shown(meta['classes'])}'") from None
    task = meta.get("task", "").strip() or task
    files = []
    for fname in sorted(os.listdir(folder)):
        full = os.path.join(folder, fname)
        if not safe_name(fname) or fname == INDEX or not os.path.isfile(full):
            continue
        algorithms = ("sha256", "sha1") if fname == caffemodel and meta.get("sha1") else ("sha256",)
        digests = hash_file(full, algorithms)
        entry = {"name": fname, "size": os.path.getsize(full), "sha256": digests["sha256"]}
        if "sha1" in digests:
            if digests["sha1"] != meta["sha1"].strip().lower():
                raise ChecksumError(
                    f"{full}: sha1 is {digests['sha1']}, but {README} says {shown(meta['sha1'])} "
                    f"(the weights are not the ones the readme describes)")
            entry["sha1"] = digests["sha1"]
        files.append(entry)
    first = next(iter(inputs.values()), None)
    return {
        "name": name,
        "title": meta.get("name", name),
        "description": meta.get("description") or first_paragraph(body),
        "task": task,
        "input_shape": first,
        "inputs": inputs,
        "classes": classes,
        "license": meta.get("license", ""),
        "path": path if path is not None else name,
        "deploy": DEPLOY,
        "weights": caffemodel,
        "zoo": {k: v for k, v in meta.items() if k not in ("description", "task", "classes", "input_shape")},
        "files": files,
    }


# ---------------------------------------------------------------------------- index


def make_index(models):
    return {"format": FORMAT, "version": VERSION, "models": list(models)}


def write_index(path, index):
    with io.atomic_output(path) as f:
        f.write((json.dumps(index, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def human_size(n):
    """Bytes as '3.2 MB' / '3.6 kB' / '12 B' (powers of 1000, as download sizes are usually given)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def build_index(root, write=True, on_model=None, allow_python_layers=False):
    """Scan the model folders of a store, validate each, write index.json.

    Returns (index, failures): failures is [(folder name, message)] for the
    models left out; they are never listed.  `on_model(name, entry_or_None,
    error_or_None)` is called as each folder is done.  A model with Python
    layers is left out unless `allow_python_layers` (its code is not run).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise CaffeishError(f"{root}: not a directory")
    models, failures = [], []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not safe_name(name) or not os.path.isdir(folder):
            continue
        try:
            entry = describe_model(folder, name, root=root, allow_python_layers=allow_python_layers)
        except CaffeishError as e:
            failures.append((name, str(e)))
            if on_model:
                on_model(name, None, str(e))
            continue
        models.append(entry)
        if on_model:
            on_model(name, entry, None)
    index = make_index(models)
    if write:
        write_index(os.path.join(root, INDEX), index)
    return index, failures


def _is_int(value, low=0, high=MAX_FILE_BYTES):
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_shape(value):
    return (isinstance(value, list) and 0 < len(value) <= MAX_AXES
            and all(_is_int(d, 0, (1 << 31) - 1) for d in value))


def _check_model(m, where):
    """What is wrong with one model entry of an index, or None."""
    if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
        return "a model entry lacks its name"
    if not isinstance(m.get("files"), list) or not m["files"]:
        return f"model '{shown(m['name'])}' lists no files"
    path = m.get("path", m["name"])
    if not isinstance(path, str) or (path != "." and not all(safe_name(p) for p in path.split("/"))):
        return f"model '{shown(m['name'])}' has an unsafe path '{shown(path)}'"
    names = set()
    for f in m["files"]:
        if not isinstance(f, dict) or not safe_name(f.get("name")):
            name = f.get("name") if isinstance(f, dict) else f
            return f"model '{shown(m['name'])}' lists an unsafe file name '{shown(name)}'"
        what = f"model '{shown(m['name'])}' file '{f['name']}'"
        if f["name"] in names:
            return f"{what} is listed twice"
        if f["name"] == INDEX:
            return f"{what}: a model's files cannot include its folder's {INDEX}"
        names.add(f["name"])
        if not _is_int(f.get("size")):
            return f"{what} lacks its size (a whole number of bytes)"
        if not isinstance(f.get("sha256"), str) or not _HEX["sha256"].fullmatch(f["sha256"]):
            return f"{what} lacks its sha256 (64 hexadecimal digits)"
        if f.get("sha1") is not None and (not isinstance(f["sha1"], str) or not _HEX["sha1"].fullmatch(f["sha1"])):
            return f"{what} has a sha1 that is not 40 hexadecimal digits"
    for key in ("deploy", "weights"):
        if key in m and m[key] not in names:
            return f"model '{shown(m['name'])}': its {key} '{shown(m[key])}' is not one of its files"
    inputs = m.get("inputs")
    if inputs is not None and not (isinstance(inputs, dict) and all(
            isinstance(k, str) and k and _is_shape(v) for k, v in inputs.items())):
        return f"model '{shown(m['name'])}': 'inputs' must map input names to shapes (lists of whole numbers)"
    for key in ("title", "description", "license", "task"):
        if m.get(key) is not None and not isinstance(m[key], str):
            return f"model '{shown(m['name'])}': '{key}' must be text"
    if m.get("classes") is not None and not _is_int(m["classes"]):
        return f"model '{shown(m['name'])}': 'classes' must be a whole number"
    if m.get("input_shape") is not None and not _is_shape(m["input_shape"]):
        return f"model '{shown(m['name'])}': 'input_shape' must be a list of whole numbers"
    return None


def check_index(index, where):
    """Check an index document's structure, names and types (a store is untrusted input); returns it.

    Everything a pull or a listing uses is checked here, before any download: file
    names (plain, not hidden, no control characters), sizes, checksums, the
    input shapes the net is re-validated with."""
    if not isinstance(index, dict) or not isinstance(index.get("models"), list):
        raise CaffeishError(f"{where}: not a model store index (no 'models' list)")
    for m in index["models"]:
        problem = _check_model(m, where)
        if problem:
            raise CaffeishError(f"{where}: {problem}")
    return index


def parse_index(data, where):
    """The checked index from its JSON bytes (at most MAX_INDEX_BYTES)."""
    if len(data) > MAX_INDEX_BYTES:
        raise CaffeishError(f"{where}: larger than {human_size(MAX_INDEX_BYTES)}; not a model store index")
    try:
        index = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except RecursionError:
        raise CaffeishError(f"{where}: not a model store index (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a number of thousands of digits
        raise CaffeishError(f"{where}: not a model store index ({shown(e, 120)})") from None
    return check_index(index, where)


def read_index(root):
    path = os.path.join(root, INDEX)
    if not os.path.isfile(path):
        raise CaffeishError(f"{root}: no {INDEX} (run `caffeish store build {root}` first)")
    return parse_index(read_bounded(path, MAX_INDEX_BYTES, "model store index"), path)


def find_model(index, name, where):
    """The entry named `name` (exact, else case-insensitive on name or title)."""
    models = index["models"]
    for m in models:
        if m["name"] == name:
            return m
    low = name.lower()
    hits = [m for m in models if m["name"].lower() == low or str(m.get("title", "")).lower() == low]
    if len(hits) == 1:
        return hits[0]
    names = ", ".join(shown(m["name"], 80) for m in models[:50]) or "none"
    more = f", and {len(models) - 50} more" if len(models) > 50 else ""
    raise CaffeishError(f"{where}: no model named '{shown(name)}' (models: {names}{more})")


def model_dir(root, entry):
    return os.path.normpath(os.path.join(root, *posixpath.normpath(entry.get("path", entry["name"])).split("/")))


# ---------------------------------------------------------------------------- verify


def check_file(path, expected):
    """'ok' or what is wrong with a file against an index file entry {size, sha256[, sha1]}."""
    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    if size != expected["size"]:
        return f"size {size}, expected {expected['size']}"
    algorithms = ("sha256", "sha1") if expected.get("sha1") else ("sha256",)
    digests = hash_file(path, algorithms)
    for a in algorithms:
        if digests[a] != str(expected[a]).lower():
            return f"{a} {digests[a]}, expected {expected[a]}"
    return "ok"


def verify_folder(folder):
    """Check a store, a pulled model or a Model Zoo folder: [{model, file, check, status}].

    With an index.json, every file it lists (size, sha256, sha1); otherwise the
    readme.md front matter's sha1 of its caffemodel, as Caffe's
    download_model_binary.py did (and each subfolder's readme for a store
    without an index).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CaffeishError(f"{folder}: not a directory")
    rows = []
    if os.path.isfile(os.path.join(folder, INDEX)):
        index = read_index(folder)
        for entry in index["models"]:
            base = model_dir(folder, entry)
            for f in entry["files"]:
                rows.append({"model": entry["name"], "file": f["name"],
                             "check": "sha256+sha1" if f.get("sha1") else "sha256",
                             "status": check_file(os.path.join(base, f["name"]), f)})
        return rows
    folders = [folder] if os.path.isfile(os.path.join(folder, README)) else [
        os.path.join(folder, n) for n in sorted(os.listdir(folder))
        if safe_name(n) and os.path.isfile(os.path.join(folder, n, README))]
    if not folders:
        raise CaffeishError(f"{folder}: nothing to verify against (no {INDEX} and no {README})")
    for sub in folders:
        meta, _ = read_readme(sub)
        name = meta.get("name") or os.path.basename(os.path.normpath(sub))
        if not meta.get("sha1"):
            rows.append({"model": name, "file": README, "check": "sha1", "status": "no sha1 in the front matter"})
            continue
        try:
            caffemodel = weights_file(sub, meta)
        except CaffeishError:
            caffemodel = meta.get("caffemodel") or WEIGHTS
        path = os.path.join(sub, caffemodel)
        if not os.path.isfile(path):
            status = "missing"
        else:
            got = hash_file(path, ("sha1",))["sha1"]
            want = meta["sha1"].strip().lower()
            status = "ok" if got == want else f"sha1 {got}, expected {want}"
        rows.append({"model": name, "file": caffemodel, "check": "sha1", "status": status})
    return rows
