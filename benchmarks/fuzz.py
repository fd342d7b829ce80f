"""Fuzz campaign: seeded mutations of the ../shared/models files through `caffeish summary`, `offsets`,
`upgrade` and the caffeish.io readers; every outcome must be a success or a clean one-line error.

    python benchmarks/fuzz.py [--minutes 20] [--inputs N] [--seed 0] [--timeout 10] [--memory 4G]
                              [--lmdb-every 10] [--save DIR] [--shared ../shared]

Each input is one file made from a model file of ../shared/models (prototxt, caffemodel, binaryproto)
by a seeded mutation: byte flips, cuts, splices of two files, protobuf-aware edits of a caffemodel
(a varint, a length, a shape dimension set to 0, -1, 2**31, 2**63 ...; the enclosing lengths fixed up
so the edit reaches the code behind the parser), text edits of a prototxt (numbers and names replaced
by hostile ones: control characters, invalid UTF-8, huge and negative dims, fork fields, V1 layers,
Python layers, a blob with thousands of consumers), other encodings (UTF-16, Latin-1), an empty or
comment-only file.  Every --lmdb-every'th input is instead a corrupted copy of a small DIGITS dataset
(a database cut short, bytes flipped in its pages) through `caffeish dataset show`.

The inputs run in a worker process under an address-space limit (--memory, resource.RLIMIT_AS) with a
per-input alarm (--timeout); the commands run in-process through caffeish.tools.cli.main.  An input
counts as a failure when anything escapes as a traceback, an error is not exactly one line, the worker
dies of a signal (SIGBUS, SIGSEGV, the kernel's OOM killer), or the input runs past its time.  Clean
errors and successes are counted; failures are listed with what reproduces them (seed, source file,
mutation), and --save DIR keeps their files.  tests/test_fuzz.py runs a few hundred inputs of the same
generator on every push.
"""
import argparse
import contextlib
import io
import itertools
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_SHARED = os.environ.get("CAFFEISH_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
EXTENSIONS = (".prototxt", ".caffemodel", ".binaryproto")
MAX_SOURCE_BYTES = 8 << 20

# ---------------------------------------------------------------------------- the corpus


def corpus(shared=DEFAULT_SHARED):
    """Sorted paths of the model files under SHARED/models that the mutations start from (solver
    definitions left out: they are not nets, and every mutation of one is refused as such)."""
    root = os.path.join(shared, "models")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            if (name.endswith(EXTENSIONS) and "solver" not in name and os.path.getsize(path) <= MAX_SOURCE_BYTES):
                found.append(path)
    return found


def pairs(files):
    """{caffemodel: net prototxt} for the caffemodels of the corpus with a net in their folder (or the one
    above) that `caffeish summary NET WEIGHTS` accepts, and the reverse; so that mutated weights meet a
    good net, and mutated nets good weights."""
    from caffeish.tools.cli import main

    found = {}
    nets = [f for f in files if f.endswith(".prototxt")]
    for model in (f for f in files if f.endswith(".caffemodel")):
        folder = os.path.dirname(model)
        near = [n for n in nets if os.path.dirname(n) in (folder, os.path.dirname(folder))]
        stem = os.path.basename(model).split("_iter_")[0].split(".")[0]
        for net in sorted(near, key=lambda n: (os.path.dirname(n) != folder, not os.path.basename(n).startswith(stem),
                                               "train" in n, n)):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ok = main(["summary", net, model]) == 0
            if ok:
                found[model] = net
                found.setdefault(net, model)
                break
    return found


# ---------------------------------------------------------------------------- mutations

NUMBERS = [b"0", b"-1", b"1", b"-2147483648", b"2147483647", b"2147483648", b"4294967295", b"4294967296",
           b"9223372036854775807", b"-9223372036854775809", b"99999999999999999999999", b"1e309", b"-1e309",
           b"nan", b"inf", b"0x7fffffff", b"3.5", b"-0", b"100000", b"65535"]
STRINGS = [b"", b"a\\nb", b"\\033[31mred\\033[0m", b"\\377\\376", b"\\303\\251t\\303\\251", b"x" * 5000,
           b"../../../etc/passwd", b"/dev/zero", b"/proc/self/mem", b"data", b"label", b"\\x00", b"\\t\\r",
           b"\\u2028", "é€中".encode("utf-8")]
RAW_BYTES = [b"\n", b"\x1b[2J", b"\xff", b"\xc3", b"\x00", b"\xe2\x80\xa8", b"\r", b"\x7f"]
SNIPPETS = [
    b'bn_param { slope_filler { type: "constant" } }',
    b'layer { name: "p" type: "Python" bottom: "data" top: "p" python_param { module: "os" layer: "system" } }',
    b'layer { name: "py" type: "Python" top: "pd" python_param { module: "voc_layers" layer: "VOCSegDataLayer" } }',
    b'layers { name: "v1" type: CONVOLUTION bottom: "data" top: "v1" convolution_param { num_output: 2 } }',
    b'input: "data" input_dim: 1 input_dim: 3 input_dim: 100000 input_dim: 100000',
    b'layer { name: "in" type: "Input" top: "in" input_param { shape { dim: -1 dim: -1 } } }',
    b'layer { name: "big" type: "Input" top: "big" input_param { shape { dim: 4096 dim: 4096 dim: 4096 } } }',
    b'layer { name: "d" type: "Data" top: "d" top: "l" data_param { source: "/dev/zero" batch_size: 1 } }',
    b'layer { name: "i" type: "ImageData" top: "i" top: "j" image_data_param { source: "/dev/null" batch_size: 1 } }',
    b'include { phase: TRAIN }', b'exclude { stage: "deploy" }', b'state { level: -5 }',
    b'layer { name: "c" type: "Crop" bottom: "data" bottom: "data" top: "c" crop_param { offset: -7 } }',
    b'layer { name: "r" type: "Reshape" bottom: "data" top: "r" reshape_param { shape { dim: 0 dim: -1 dim: -1 } } }',
    b'force_backward: true', b'debug_info: true', b'# comment \xff\xfe', b'}', b'{', b'layer {', b'"',
]


def _fan_out(data, rng):
    """A layer reading the first top of the net, repeated thousands of times (item 5's blow-up)."""
    import re

    m = re.search(rb'top:\s*"([^"]+)"', data)
    blob = m.group(1) if m else b"data"
    count = rng.choice([200, 1000, 3000])
    layers = b"".join(b'layer { name: "f%d" type: "ReLU" bottom: "%s" top: "f%d" }\n' % (i, blob, i)
                      for i in range(count))
    return data + b"\n" + layers, f"fan-out x{count} of {blob!r}"


def _text_mutation(data, rng):
    import re

    kind = rng.choice(["number", "number", "string", "string", "snippet", "snippet", "line", "raw", "fan",
                       "encoding", "dup-layer"])
    if kind == "number":
        spots = [m.span(1) for m in re.finditer(rb"(?<![\w.])(-?\d+(?:\.\d+)?(?:e-?\d+)?)(?![\w.])", data)]
        if spots:
            a, b = rng.choice(spots)
            value = rng.choice(NUMBERS)
            return data[:a] + value + data[b:], f"number at {a} -> {value.decode()}"
    if kind == "string":
        spots = [m.span(1) for m in re.finditer(rb'"([^"\n]*)"', data)]
        if spots:
            a, b = rng.choice(spots)
            value = rng.choice(STRINGS)
            return data[:a] + value + data[b:], f"string at {a} -> {value[:20]!r}"
    if kind == "snippet":
        lines = data.split(b"\n")
        at = rng.randrange(len(lines) + 1)
        snippet = rng.choice(SNIPPETS)
        return b"\n".join(lines[:at] + [snippet] + lines[at:]), f"snippet at line {at}: {snippet[:40]!r}"
    if kind == "line":
        lines = data.split(b"\n")
        if len(lines) > 1:
            at = rng.randrange(len(lines))
            if rng.random() < 0.5:
                del lines[at]
                return b"\n".join(lines), f"line {at} deleted"
            lines.insert(at, lines[rng.randrange(len(lines))])
            return b"\n".join(lines), f"line copied to {at}"
    if kind == "raw":
        at = rng.randrange(len(data) + 1)
        raw = rng.choice(RAW_BYTES)
        return data[:at] + raw + data[at:], f"raw byte(s) {raw!r} at {at}"
    if kind == "fan":
        return _fan_out(data, rng)
    if kind == "encoding":
        how = rng.choice(["utf-16", "utf-16-le", "latin-1", "bom", "comments", "empty"])
        text = data.decode("utf-8", errors="replace")
        if how.startswith("utf-16"):
            return text.encode(how), f"re-encoded {how}"
        if how == "latin-1":
            return text.replace("a", "\u00e4", 3).encode("latin-1", errors="replace"), "re-encoded latin-1"
        if how == "bom":
            return b"\xef\xbb\xbf" + data, "byte-order mark"
        if how == "comments":
            return b"".join(b"# " + line + b"\n" for line in data.split(b"\n")[:50]), "commented out"
        return b"", "emptied"
    if kind == "dup-layer":
        blocks = [m.span() for m in re.finditer(rb"\nlayers? \{", data)]
        if blocks:
            a = rng.choice(blocks)[0]
            return data[:a] + data[a:a + 400] + data[a:], f"layer block at {a} duplicated (cut at 400 bytes)"
    return _byte_mutation(data, rng)


def _byte_mutation(data, rng):
    data = bytearray(data)
    kind = rng.choice(["flip", "flip", "set", "cut", "delete", "insert", "repeat"])
    if not data:
        return bytes(rng.randbytes(rng.randint(1, 64))), "random bytes"
    if kind == "flip":
        n = rng.randint(1, 16)
        for _ in range(n):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data), f"{n} bit flip(s)"
    if kind == "set":
        at = rng.randrange(len(data))
        data[at] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x0A, 0x22])
        return bytes(data), f"byte {at} set to 0x{data[at]:02x}"
    if kind == "cut":
        at = rng.randrange(len(data))
        return bytes(data[:at]), f"cut at {at}"
    if kind == "delete":
        a = rng.randrange(len(data))
        b = min(len(data), a + rng.randint(1, 256))
        return bytes(data[:a] + data[b:]), f"bytes {a}..{b} deleted"
    if kind == "insert":
        at = rng.randrange(len(data) + 1)
        return bytes(data[:at]) + rng.randbytes(rng.randint(1, 64)) + bytes(data[at:]), f"random bytes at {at}"
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.randint(1, 4096))
    return bytes(data[:b]) + bytes(data[a:b]) * rng.randint(1, 20) + bytes(data[b:]), f"bytes {a}..{b} repeated"


# -- protobuf-aware edits: parse the message tree, change one value, write it back with every length fixed


def _varint(buf, pos):
    """caffeish.formats.wire's varint reader; ValueError where the buffer ends inside one."""
    from caffeish.formats import wire

    try:
        return wire.read_varint(buf, pos, len(buf))
    except wire.Truncated:
        raise ValueError from None


def _encode_varint(value):
    from caffeish.formats.wire import encode_varint

    return encode_varint(value & ((1 << 64) - 1))


def _parse(buf, depth=0):
    """[[field, wire type, value]]: value an int (varint), bytes, or a nested list (a message)."""
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError
            value = bytes(buf[pos:pos + n])
            pos += n
            if depth < 6 and 0 < n < (1 << 20):
                with contextlib.suppress(ValueError):
                    value = _parse(value, depth + 1)
        elif wire == 5:
            value, pos = bytes(buf[pos:pos + 4]), pos + 4
        elif wire == 1:
            value, pos = bytes(buf[pos:pos + 8]), pos + 8
        else:
            raise ValueError
        if pos > len(buf):
            raise ValueError
        fields.append([field, wire, value])
    return fields


def _serialize(fields):
    out = bytearray()
    for field, wire, value in fields:
        out += _encode_varint(field << 3 | wire)
        if wire == 0:
            out += _encode_varint(value)
        elif wire == 2:
            body = _serialize(value) if isinstance(value, list) else value
            out += _encode_varint(len(body)) + body
        else:
            out += value
    return bytes(out)


def _leaves(fields, path=()):
    for i, (field, wire, value) in enumerate(fields):
        here = path + (i,)
        yield here, field, wire, value
        if isinstance(value, list):
            yield from _leaves(value, here)


VARINTS = [0, 1, 2, 3, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, (1 << 64) - 1,
           (1 << 64) - 2, 100000, 65536, 255]


def _is_name(value):
    return isinstance(value, bytes) and 0 < len(value) <= 64 and all(32 <= c < 127 for c in value)


def _negate_dims(fields, rng):
    """Negate two dimensions of one blob's shape (field 7, packed or not): the product, and so the value
    count, stays the same.  Returns a description, or None when no shape has two dims."""
    shapes = [v for _, f, w, v in _leaves(fields) if f == 7 and w == 2 and isinstance(v, list)]
    rng.shuffle(shapes)
    for shape in shapes:
        dims = [entry for entry in shape if entry[0] == 1]
        if len(dims) == 1 and isinstance(dims[0][2], bytes):  # packed: the varints in one field
            raw, values, pos = dims[0][2], [], 0
            with contextlib.suppress(ValueError):
                while pos < len(raw):
                    v, pos = _varint(raw, pos)
                    values.append(v)
            if len(values) >= 2:
                for i in rng.sample(range(len(values)), 2):
                    values[i] = (-values[i]) & ((1 << 64) - 1)
                dims[0][2] = b"".join(_encode_varint(v) for v in values)
                return "two dims of a shape negated"
        elif len(dims) >= 2 and all(entry[1] == 0 for entry in dims):
            for entry in rng.sample(dims, 2):
                entry[2] = (-entry[2]) & ((1 << 64) - 1)
            return "two dims of a shape negated"
    return None


def _proto_mutation(data, rng):
    try:
        fields = _parse(data)
    except ValueError:
        return _byte_mutation(data, rng)
    leaves = list(_leaves(fields))
    if not leaves:
        return _byte_mutation(data, rng)
    special = rng.random()
    if special < 0.15:
        what = _negate_dims(fields, rng)
        if what:
            return _serialize(fields), what
    elif special < 0.35:
        names = [leaf for leaf in leaves if leaf[2] == 2 and _is_name(leaf[3])]
        if names:
            path, field, _, value = rng.choice(names)
            node = fields
            for i in path[:-1]:
                node = node[i][2]
            at = rng.randrange(len(value) + 1)
            raw = rng.choice([b"\xff", b"\xc3", b"\n", b"\x1b[31m", b"\xe2\x80\xa8", b"\x00"])
            node[path[-1]][2] = value[:at] + raw + value[at:]
            return _serialize(fields), f"string field {field} {value[:20]!r}: {raw!r} inserted"
    path, field, wire, value = rng.choice(leaves)
    node = fields
    for i in path[:-1]:
        node = node[i][2]
    entry = node[path[-1]]
    kind = rng.choice(["value", "value", "drop", "copy", "bytes"])
    if kind == "drop":
        del node[path[-1]]
        what = "dropped"
    elif kind == "copy":
        node.insert(path[-1], [entry[0], entry[1], entry[2]])
        what = "repeated"
    elif wire == 0 or (kind == "value" and wire != 2):
        entry[1], entry[2] = 0, rng.choice(VARINTS)
        what = f"varint -> {entry[2]}"
    elif isinstance(value, list):
        entry[2] = _serialize(value)
        entry[2] = entry[2][:rng.randrange(len(entry[2]) + 1)]
        what = "message cut"
    else:
        raw = bytearray(value)
        for _ in range(rng.randint(1, 4)):
            if raw:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        if rng.random() < 0.3:
            raw = raw[:rng.randrange(len(raw) + 1)]
        entry[2] = bytes(raw)
        what = "bytes edited"
    return _serialize(fields), f"field {field} at {'/'.join(map(str, path))}: {what}"


def mutate(rng, data, path, others):
    """(new bytes, description) of one seeded mutation of `data` (the bytes of `path`)."""
    roll = rng.random()
    if roll < 0.06:
        other = rng.choice(others)
        with open(other, "rb") as f:
            tail = f.read()
        a, b = rng.randrange(len(data) + 1), rng.randrange(len(tail) + 1)
        return data[:a] + tail[b:], f"splice with {os.path.relpath(other, os.path.dirname(path))} at {a}/{b}"
    if path.endswith(".prototxt"):
        return _text_mutation(data, rng) if roll < 0.85 else _byte_mutation(data, rng)
    return _proto_mutation(data, rng) if roll < 0.75 else _byte_mutation(data, rng)


def make_input(seed, files):
    """(bytes, source path, description, suffix) of input number `seed`."""
    rng = random.Random(seed)
    path = rng.choice(files)
    with open(path, "rb") as f:
        data = f.read()
    for step in range(rng.choice([1, 1, 1, 2, 3])):
        data, what = mutate(rng, data, path, files)
        if step == 0:
            first = what
    description = first if step == 0 else f"{first} (+{step} more)"
    suffix = rng.choice([os.path.splitext(path)[1]] * 4 + [".prototxt", ".caffemodel", ".bin"])
    return data, path, description, suffix


# ---------------------------------------------------------------------------- the worker


class Overtime(BaseException):
    """The per-input alarm (a BaseException, so that no `except Exception` swallows it)."""


def _cli(argv, main=None):
    """(kind, detail) of `caffeish ARGV` run in-process: ok, error (one clean line) or failure."""
    if main is None:
        from caffeish.tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except (Overtime, KeyboardInterrupt):
        raise
    except SystemExit as e:
        return "failure", f"SystemExit({e.code}): {err.getvalue().strip()[-300:]}"
    except BaseException as e:
        return "failure", "".join(traceback.format_exception(type(e), e, e.__traceback__))[-2000:]
    text = err.getvalue()
    if code == 0:
        return "ok", ""
    lines = text.strip("\n").split("\n")
    if code == 1 and len(lines) == 1 and lines[0].startswith(f"caffeish {argv[0]}: error: "):
        return "error", lines[0][:300]
    return "failure", f"exit {code} with {len(lines)} line(s) on stderr: {text[:1000]!r}"


def _call(fn):
    from caffeish.errors import CaffeishError

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fn()
    except (Overtime, KeyboardInterrupt):
        raise
    except CaffeishError as e:
        return "error", str(e)[:300]
    except BaseException as e:
        return "failure", "".join(traceback.format_exception(type(e), e, e.__traceback__))[-2000:]
    return "ok", ""


def operations(path, scratch, partner=None, source="", thorough=True):
    """[(name, thunk)] run on one input file (`partner`: the good net or weights its source pairs with;
    thorough=False leaves out the two that repeat summary's path: its JSON and read_net)."""
    from caffeish.formats import io as cio

    out = os.path.join(scratch, "upgraded.out")
    paired = []
    if partner:
        argv = ["summary", partner, path] if source.endswith(".caffemodel") else ["summary", path, partner]
        paired = [("summary+pair", lambda: _cli(argv))]
    ops = paired + [
        ("summary", lambda: _cli(["summary", path])),
        ("summary-json", lambda: _cli(["summary", path, "--format", "json"])),
        ("offsets", lambda: _cli(["offsets", path])),
        ("upgrade", lambda: _cli(["upgrade", path, out])),
        ("file_kind", lambda: _call(lambda: cio.file_kind(path))),
        ("read_net", lambda: _call(lambda: cio.read_net(path, caffemodel=True))),
        ("read_caffemodel", lambda: _call(lambda: cio.read_caffemodel(path).arrays())),
        ("read_binaryproto", lambda: _call(lambda: cio.read_binaryproto(path))),
    ]
    return ops if thorough else [op for op in ops if op[0] not in ("summary-json", "read_net")]


def lmdb_operations(folder):
    return [("dataset show", lambda: _cli(["dataset", "show", folder])),
            ("dataset show --dump", lambda: _cli(["dataset", "show", folder, "--dump", "2",
                                                  os.path.join(folder, "..", "dump")]))]


def canary_operations(kind, timeout, memory):
    """Operations that fail on purpose, one way each, to show that the harness sees every kind of failure."""
    def die():
        os.kill(os.getpid(), signal.SIGBUS)

    return {"signal": [("signal", lambda: (die(), ("ok", ""))[1])],
            "traceback": [("traceback", lambda: _call(lambda: {}["missing"]))],
            "overtime": [("overtime", lambda: (time.sleep(timeout + 30), ("ok", ""))[1])],
            "memory": [("memory", lambda: _call(lambda: bytearray(memory)))],
            "two lines": [("two lines", lambda: _cli(["summary"], main=_two_line_error))],
            }[kind]


def _two_line_error(argv):
    print("caffeish summary: error: layer 'a\nb'", file=sys.stderr)  # a raw newline from a file
    return 1


def worker(timeout, memory):
    """Read jobs (JSON lines) from stdin; print {"start": id} before and a result line after each."""
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    def alarm(*_):
        raise Overtime()

    signal.signal(signal.SIGALRM, alarm)
    import caffeish.tools.cli  # noqa: F401  (imported before the first alarm starts)

    for line in sys.stdin:
        job = json.loads(line)
        print(json.dumps({"start": job["id"]}), flush=True)
        if job.get("canary"):
            ops = canary_operations(job["canary"], timeout, memory)
        elif job.get("lmdb"):
            ops = lmdb_operations(job["path"])
        else:
            ops = operations(job["path"], job["scratch"], job.get("partner"), job.get("source", ""),
                             job.get("thorough", True))
        results = []
        start = time.time()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            for name, op in ops:
                kind, detail = op()
                results.append([name, kind, detail])
        except Overtime:
            results.append(["*", "failure", f"over {timeout} s (after {[r[0] for r in results]})"])
        except MemoryError:
            results.append(["*", "failure", f"MemoryError under the {memory:,}-byte address-space limit"])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        print(json.dumps({"id": job["id"], "results": results, "seconds": time.time() - start}), flush=True)


# ---------------------------------------------------------------------------- LMDB inputs


def make_dataset(folder):
    """A small DIGITS segmentation dataset (raw and PNG records) to corrupt."""
    import numpy as np
    from PIL import Image

    from caffeish.apps.dataset import build_segmentation
    from caffeish.data.palette import pascal_palette

    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(folder, sub))
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(f"{folder}/images/p{i}.png")
        label = Image.fromarray(rng.integers(0, 4, (24, 32)).astype(np.uint8), "P")
        label.putpalette(pascal_palette(256).ravel().tolist())
        label.save(f"{folder}/labels/p{i}.png")
    for encoding in ("none", "png"):
        build_segmentation(f"{folder}/images", f"{folder}/labels", f"{folder}/ds-{encoding}", val_fraction=0.25,
                           encoding=encoding)
    return [f"{folder}/ds-none", f"{folder}/ds-png"]


def corrupt_dataset(seed, datasets, target):
    """A copy of one dataset at `target` with one database damaged; returns the description."""
    rng = random.Random(seed)
    source = rng.choice(datasets)
    shutil.copytree(source, target)
    db = os.path.join(target, rng.choice(["train_db", "val_db"]), rng.choice(["features", "labels"]))
    data_file = os.path.join(db, "data.mdb")
    with open(data_file, "rb") as f:
        data = bytearray(f.read())
    kind = rng.choice(["cut", "cut-page", "flip", "flip", "zero-page", "page-header", "lose-record"])
    if kind == "cut":
        data = data[:rng.randrange(len(data))]
    elif kind == "cut-page":
        data = data[:rng.randrange(len(data) // 4096 + 1) * 4096]
    elif kind == "flip":
        for _ in range(rng.randint(1, 24)):
            at = rng.randrange(len(data)) if rng.random() < 0.5 else rng.randrange(min(len(data), 4 * 4096))
            data[at] = rng.randrange(256)
    elif kind == "zero-page":
        page = rng.randrange(len(data) // 4096)
        data[page * 4096:(page + 1) * 4096] = bytes(4096)
    elif kind == "page-header":
        page = rng.randrange(2, max(3, len(data) // 4096))
        at = page * 4096 + rng.randrange(16)
        if at < len(data):
            data[at] = rng.randrange(256)
    else:
        import lmdb

        env = lmdb.open(db)
        with env.begin(write=True) as txn:
            txn.delete(b"%08d" % rng.randrange(3))
        env.close()
        return f"{os.path.relpath(db, target)}: a record deleted"
    with open(data_file, "wb") as f:
        f.write(data)
    return f"{os.path.relpath(db, target)}: {kind} ({os.path.basename(source)})"


# ---------------------------------------------------------------------------- the campaign


class Campaign:
    """Runs inputs through a worker, restarting it when it dies; counts the outcomes."""

    def __init__(self, files, scratch, timeout=10, memory=4 << 30, save=None, lmdb_every=0, log=None, thorough=True):
        self.files, self.scratch, self.timeout, self.memory = files, scratch, timeout, memory
        self.thorough = thorough
        self.save, self.lmdb_every, self.log = save, lmdb_every, log
        self.counts = {"inputs": 0, "successes": 0, "clean errors": 0, "failures": 0}
        self.operations = {"ok": 0, "error": 0, "failure": 0}
        self.failures = []
        self.proc = None
        self.datasets = make_dataset(os.path.join(scratch, "lmdb-source")) if lmdb_every else []
        self.pairs = pairs(files)

    def _start(self):
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cwd = os.path.join(self.scratch, "cwd")  # relative sources in the mutated nets find nothing here
        os.makedirs(cwd, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", "--timeout", str(self.timeout),
             "--memory", str(self.memory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, cwd=cwd, env=env)
        self._buffer = b""

    def _stop(self):
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self):
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self._stop()

    def _read_line(self, deadline):
        """The worker's next line; "" at its end, None past the deadline (its own buffer: select() does not
        see the lines a buffered reader already holds)."""
        import select

        while b"\n" not in self._buffer:
            left = deadline - time.time()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    return ""
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode("utf-8", errors="replace") + "\n"

    def run(self, seed, canary=None):
        """Run input number `seed`; returns its outcome: 'success', 'clean error' or 'failure'.  `canary`
        runs one of canary_operations instead (the harness's own test)."""
        job_dir = os.path.join(self.scratch, f"input-{seed}")
        os.makedirs(job_dir)
        lmdb = self.lmdb_every and seed % self.lmdb_every == self.lmdb_every - 1
        if canary:
            lmdb, path, source, what = False, job_dir, "canary", canary
        elif lmdb:
            path = os.path.join(job_dir, "dataset")
            source, what = "lmdb", corrupt_dataset(seed, self.datasets, path)
        else:
            data, source, what, suffix = make_input(seed, self.files)
            path = os.path.join(job_dir, "input" + suffix)
            with open(path, "wb") as f:
                f.write(data)
        if self.proc is None:
            self._start()
        job = {"id": seed, "path": path, "scratch": job_dir, "lmdb": bool(lmdb), "source": source,
               "partner": None if lmdb else self.pairs.get(source), "canary": canary, "thorough": self.thorough}
        self.proc.stdin.write(json.dumps(job).encode("utf-8") + b"\n")
        self.proc.stdin.flush()
        deadline = time.time() + self.timeout * 3 + 60  # the worker's own alarm comes first
        results, problem = None, None
        while results is None and problem is None:
            line = self._read_line(deadline)
            if line is None:
                problem = f"no answer within {self.timeout * 3 + 60:.0f} s (hung)"
            elif line == "":
                code = self.proc.wait()
                problem = (f"worker killed by signal {signal.Signals(-code).name}" if code < 0
                           else f"worker exited with status {code}")
            else:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue  # something the code under test printed
                if isinstance(doc, dict) and doc.get("id") == seed:
                    results = doc["results"]
        if problem is not None:
            self._stop()
            results = [["*", "failure", problem]]
        kinds = [kind for _, kind, _ in results]
        for k in kinds:
            self.operations[k] = self.operations.get(k, 0) + 1
        # the input's outcome: its first command's (summary, dataset show), unless anything failed
        outcome = "failure" if "failure" in kinds else "success" if kinds[0] == "ok" else "clean error"
        self.counts["inputs"] += 1
        self.counts[{"success": "successes", "clean error": "clean errors", "failure": "failures"}[outcome]] += 1
        if outcome == "failure":
            record = {"seed": seed, "source": source, "mutation": what,
                      "failed": [[name, detail] for name, kind, detail in results if kind == "failure"]}
            self.failures.append(record)
            if self.save and not canary:
                os.makedirs(self.save, exist_ok=True)
                target = os.path.join(self.save, f"fuzz-{seed}" + ("" if lmdb else os.path.splitext(path)[1]))
                (shutil.copytree if lmdb else shutil.copy)(path, target)
            if self.log:
                self.log(f"FAILURE seed {seed} ({os.path.relpath(source, DEFAULT_SHARED) if '/' in source else source}: "
                         f"{what}): {record['failed'][0][0]}: {record['failed'][0][1].strip().splitlines()[-1][:300]}")
        shutil.rmtree(job_dir, ignore_errors=True)
        return outcome


def campaign(files, seeds, scratch, timeout=10, memory=4 << 30, save=None, lmdb_every=0, deadline=None, log=None,
             thorough=True):
    """Run the inputs of `seeds` (until `deadline`, a time.time() value); returns the Campaign."""
    c = Campaign(files, scratch, timeout=timeout, memory=memory, save=save, lmdb_every=lmdb_every, log=log,
                 thorough=thorough)
    try:
        for seed in seeds:
            if deadline is not None and time.time() > deadline:
                break
            c.run(seed)
    finally:
        c.close()
    return c


def _bytes(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = str(text).strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="stop after this long (default 20)")
    p.add_argument("--inputs", type=int, default=None, help="stop after this many inputs")
    p.add_argument("--seed", type=int, default=0, help="the first input's seed (inputs are seed, seed+1, ...)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per input (default 10)")
    p.add_argument("--memory", default="4G", help="the worker's address-space limit (default 4G)")
    p.add_argument("--lmdb-every", type=int, default=10, help="every Nth input is a damaged dataset (0: none)")
    p.add_argument("--save", metavar="DIR", help="keep the files of failing inputs here")
    p.add_argument("--shared", default=DEFAULT_SHARED, help="the shared folder holding models/")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.timeout, _bytes(args.memory))
        return 0
    files = corpus(args.shared)
    if not files:
        print(f"no model files under {args.shared}/models", file=sys.stderr)
        return 2
    start = time.time()
    seeds = range(args.seed, args.seed + args.inputs) if args.inputs else itertools.count(args.seed)
    with tempfile.TemporaryDirectory(prefix="caffeish-fuzz-") as scratch:
        c = campaign(files, seeds, scratch, timeout=args.timeout, memory=_bytes(args.memory), save=args.save,
                     lmdb_every=args.lmdb_every, deadline=start + args.minutes * 60,
                     log=lambda line: print(line, flush=True))
    elapsed = time.time() - start
    n = c.counts
    print(f"{n['inputs']:,} inputs from {len(files)} model files in {elapsed / 60:.1f} min "
          f"({n['inputs'] / max(elapsed, 1e-9):.1f}/s): {n['successes']:,} successes, {n['clean errors']:,} clean "
          f"errors, {n['failures']:,} failures; operations: {c.operations}")
    for f in c.failures[:50]:
        print(json.dumps(f)[:600])
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
