"""Issue 20's hostile inputs: damaged LMDBs, huge fan-outs, Python layers in inspected nets, bytes that are
not UTF-8, names with control characters, mismatched features/labels, empty nets, and kills between the
renames of multi-file outputs.  Each one gets a one-line error (exit 1) or a right answer, never a crash.

Commands that could die of a signal before the fixes (SIGBUS on a truncated data.mdb) or that are killed on
purpose run in child processes; the rest run in-process through the CLI."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from caffeish.apps.dataset import build_segmentation
from caffeish.data.palette import pascal_palette
from caffeish.errors import CaffeishError
from caffeish.formats import io, staging, wire
from caffeish.formats.datum import LmdbReader, LmdbWriter, check_pair
from caffeish.formats.lmdb_file import LmdbFile
from caffeish.formats.schema import pb
from caffeish.tools.cli import main
from conftest import ROOT, SHARED

ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OPENBLAS_NUM_THREADS="1")


def cli(capsys, *argv):
    """(exit status, stdout, stderr) of `caffeish ARGV` in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def child(*argv, env=None, cwd=None):
    """`caffeish ARGV` in a child process (a signal there is a return code here, not a dead test run)."""
    return subprocess.run([sys.executable, "-m", "caffeish.tools.cli", *map(str, argv)], capture_output=True,
                          text=True, env=env or ENV, cwd=cwd, timeout=120)


def one_error_line(err, *words):
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("caffeish ") and ": error: " in lines[0], err
    assert "Traceback" not in err and "\x1b" not in err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def dataset(root, n=12, encoding="none"):
    """A small DIGITS segmentation dataset at root/ds (3 x 24 x 32 images, 4 classes)."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / "images" / f"p{i:02d}.png")
        label = Image.fromarray(rng.integers(0, 4, (24, 32)).astype(np.uint8), "P")
        label.putpalette(pascal_palette(256).ravel().tolist())
        label.save(root / "labels" / f"p{i:02d}.png")
    build_segmentation(root / "images", root / "labels", root / "ds", val_fraction=0.5, encoding=encoding)
    return root / "ds"


TRAIN_VAL = """
layer {{ name: "data" type: "Data" top: "data" data_param {{ source: "{stage}/features" batch_size: 2 backend: LMDB }} }}
layer {{ name: "label" type: "Data" top: "label" data_param {{ source: "{stage}/labels" batch_size: 2 backend: LMDB }} }}
layer {{ name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param {{ num_output: 4 kernel_size: 1 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }}
"""


# -- 1. a truncated data.mdb: SIGBUS before, one line now --------------------------------------------------


def test_a_truncated_database_is_one_error_line_in_every_command_that_reads_it(tmp_path):
    ds = dataset(tmp_path)
    data = ds / "train_db" / "features" / "data.mdb"
    os.truncate(data, os.path.getsize(data) // 3 // 4096 * 4096)  # cut to a third, on a page boundary
    net = tmp_path / "train_val.prototxt"
    net.write_text(TRAIN_VAL.format(stage=ds / "train_db"))
    for argv in (["dataset", "show", ds], ["dataset", "show", ds / "train_db" / "features", "--dump", 2, tmp_path / "d"],
                 ["evaluate", net, "none", "--iterations", 3], ["summary", net]):
        proc = child(*argv)
        assert proc.returncode == 1, (argv, proc.returncode, proc.stderr[-500:])
        one_error_line(proc.stderr, "truncated LMDB database", "cut short")


def test_seeded_corruptions_of_a_database_never_crash_the_reader(tmp_path):
    """60 seeded corruptions (flipped bytes in page headers and nodes, cuts, zeroed pages) through
    `dataset show`, in one child process: a signal there fails the test."""
    ds = dataset(tmp_path, n=8, encoding="png")
    script = textwrap.dedent(f"""
        import os, random, shutil, sys
        from caffeish.apps.dataset import inspect_dataset
        from caffeish.errors import CaffeishError
        source = {str(ds / "val_db" / "labels" / "data.mdb")!r}
        raw = open(source, "rb").read()
        outcomes = []
        for seed in range(60):
            rng = random.Random(seed)
            data = bytearray(raw)
            kind = seed % 3
            if kind == 0:
                for _ in range(rng.randint(1, 24)):
                    data[rng.randrange(min(len(data), 5 * 4096))] = rng.randrange(256)
            elif kind == 1:
                data = data[:rng.randrange(len(data))]
            else:
                page = rng.randrange(2, len(data) // 4096)
                data[page * 4096:page * 4096 + 4096] = bytes(4096) if rng.random() < 0.5 else os.urandom(4096)
            folder = {str(tmp_path / "bad")!r}
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            open(os.path.join(folder, "data.mdb"), "wb").write(data)
            try:
                inspect_dataset(folder)
                outcomes.append("ok")
            except CaffeishError as e:
                assert "\\n" not in str(e)
                outcomes.append("error")
        print(outcomes.count("ok"), outcomes.count("error"))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    ok, errors = map(int, proc.stdout.split())
    assert ok + errors == 60 and errors >= 30


def test_the_reader_gives_what_lmdb_gives_on_caffes_own_databases(tmp_path):
    import lmdb

    folders = sorted(p for p in (SHARED / "golden_train" / "solver").glob("*/*_lmdb")) if SHARED.exists() else []
    ds = dataset(tmp_path, n=6, encoding="png")
    folders += [ds / "train_db" / "features", ds / "val_db" / "labels"]
    big = tmp_path / "big"  # a three-level tree with overflow pages, deleted records and small values
    env = lmdb.open(str(big), map_size=1 << 28)
    rng = random.Random(0)
    with env.begin(write=True) as txn:
        for i in range(20000):
            txn.put(b"%08d" % i, bytes(rng.choice([5, 300, 5000])))
        for i in range(0, 20000, 7):
            txn.delete(b"%08d" % i)
    env.close()
    folders.append(big)
    for folder in folders:
        env = lmdb.open(str(folder), readonly=True, lock=False)
        with env.begin() as txn:
            want = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
        env.close()
        f = LmdbFile(folder / "data.mdb")
        assert list(f.items()) == want and len(f) == len(want), folder
        for key, value in want[::97]:
            assert f.get(key) == value
        assert f.get(b"\xff" * 8) is None
        f.close()
    assert not (big / "lock.mdb").exists() or True  # (lmdb itself made it when writing)


# -- 5. ten thousand consumers of one blob --------------------------------------------------------------------


def fan_out(path, n):
    layers = [f'layer {{ name: "r{i}" type: "ReLU" bottom: "data" top: "r{i}" }}' for i in range(n)]
    path.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 '
                    'dim: 8 } } }\n' + "\n".join(layers))
    return path


def test_the_summary_of_a_fan_out_grows_linearly(tmp_path, capsys):
    sizes = {}
    for n in (500, 4000):
        code, out, _ = cli(capsys, "summary", fan_out(tmp_path / f"fan{n}.prototxt", n))
        assert code == 0
        sizes[n] = len(out)
        split = [line for line in out.splitlines() if line.startswith("data_data_0_split")][0]
        assert f"({n:,})" in split and len(split) < 400  # the Split's n tops, shortened
    assert sizes[4000] / sizes[500] < 8 * 1.3  # linear (it was quadratic: 64x)
    code, out, _ = cli(capsys, "summary", tmp_path / "fan4000.prototxt", "--format", "json")
    doc = json.loads(out)
    assert len(doc["rows"][1]["tops"]) == 4000  # JSON keeps every name


# -- 6. looking at a net runs no code from it -----------------------------------------------------------------

MARKER_LAYER = """
import os
import caffe
open(os.environ["CAFFEISH_TEST_MARKER"], "a").write("imported\\n")


class Double(caffe.Layer):
    def setup(self, bottom, top):
        open(os.environ["CAFFEISH_TEST_MARKER"], "a").write("setup\\n")

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 2 * bottom[0].data
"""

PYTHON_NET = """
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {n} dim: 3 dim: 8 dim: 8 }} }} }}
layer {{ name: "double" type: "Python" bottom: "data" top: "twice" python_param {{ module: "marker_layer" layer: "Double" }} }}
layer {{ name: "conv" type: "Convolution" bottom: "twice" top: "conv" convolution_param {{ num_output: 2 kernel_size: 3 }} }}
layer {{ name: "side" type: "Convolution" bottom: "data" top: "side" convolution_param {{ num_output: 2 kernel_size: 3 }} }}
"""


@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    (tmp_path / "marker_layer.py").write_text(MARKER_LAYER)
    marker = tmp_path / "marker.txt"
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CAFFEISH_TEST_MARKER", str(marker))
    yield marker
    sys.modules.pop("marker_layer", None)


def test_summary_and_offsets_do_not_run_python_layers_unless_allowed(tmp_path, capsys, marker_module):
    net = tmp_path / "net.prototxt"
    net.write_text(PYTHON_NET.format(n=1))
    code, out, _ = cli(capsys, "summary", net)
    assert code == 0 and not marker_module.exists()
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "?" in rows["double"] and "?" in rows["conv"]
    assert "1x2x6x6" in rows["side"] and "56" in rows["side"]  # what does not depend on it is known
    assert "'double' not run" in out and "--allow-python-layers" in out
    code, out, _ = cli(capsys, "summary", net, "--format", "json")
    doc = json.loads(out)
    assert doc["python_layers_not_run"] == ["double"] and not marker_module.exists()
    code, out, _ = cli(capsys, "offsets", net, "--to", "conv")
    assert code == 0 and not marker_module.exists() and "not run" in out
    code, out, _ = cli(capsys, "summary", net, "--allow-python-layers")
    assert code == 0 and marker_module.read_text() == "imported\nsetup\n"
    assert "1x2x6x6" in [line for line in out.splitlines() if line.startswith("conv ")][0]


def test_the_memory_cap_is_checked_before_a_python_layer_gets_its_zero_bottoms(tmp_path, capsys, marker_module):
    net = tmp_path / "big.prototxt"
    shape = "shape { dim: 10000 dim: 3 dim: 8 dim: 8 }"  # 7.7 MB each: under the cap, but not both together
    net.write_text(f'layer {{ name: "a" type: "Input" top: "a" input_param {{ {shape} }} }}\n'
                   f'layer {{ name: "b" type: "Input" top: "b" input_param {{ {shape} }} }}\n'
                   'layer { name: "double" type: "Python" bottom: "a" bottom: "b" top: "t" '
                   'python_param { module: "marker_layer" layer: "Double" } }\n')
    code, _, err = cli(capsys, "summary", net, "--allow-python-layers", "--max-blob-bytes", "10M")
    assert code == 1 and not marker_module.exists()
    one_error_line(err, "layer 'double' (Python)", "refusing before allocating")


# -- 8. tracebacks that became one line ---------------------------------------------------------------------

NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 1 } }
"""


def test_binary_files_with_bad_names_and_negative_dims_are_one_line(tmp_path, capsys):
    net_path = tmp_path / "n.prototxt"
    net_path.write_text(NET)
    net, _ = io.read_prototxt(net_path)
    good = tmp_path / "w.caffemodel"
    io.write_caffemodel(good, net, [[], [np.ones((2, 3, 1, 1), np.float32), np.zeros(2, np.float32)]])
    raw = good.read_bytes()
    bad_name = tmp_path / "badname.caffemodel"
    bad_name.write_bytes(raw.replace(b"\x0a\x04conv", b"\x0a\x04c\xffnv", 1))
    negative = tmp_path / "neg.caffemodel"
    io.write_caffemodel(negative, net, [[], [wire.BlobRecord(np.ones(6, np.float32), shape=(-2, -3, 1, 1)),
                                              np.zeros(2, np.float32)]])
    v1 = pb.NetParameter()
    v1.input.append("data")
    v1.input_dim.extend([1, 3, 4, 4])
    layer = v1.layers.add()
    layer.name, layer.type = "conv", pb.V1LayerParameter.CONVOLUTION
    layer.bottom.append("data")
    layer.top.append("cXnv")
    layer.convolution_param.num_output = 2
    layer.convolution_param.kernel_size.append(1)
    v1_top = tmp_path / "v1top.caffemodel"
    v1_top.write_bytes(v1.SerializeToString().replace(b"cXnv", b"c\xffnv"))
    for argv, words in ((["summary", net_path, bad_name], ["layer[1].name is not UTF-8", "c\\xffnv"]),
                        (["summary", bad_name], ["not UTF-8"]),
                        (["summary", v1_top], ["layers[0].top[0] is not UTF-8"]),
                        (["upgrade", v1_top, tmp_path / "up.caffemodel"], ["is not UTF-8"]),
                        (["summary", net_path, negative], ["negative dimension"])):
        code, _, err = cli(capsys, *argv)
        assert code == 1
        one_error_line(err, *words)
    with pytest.raises(CaffeishError, match="negative dimension"):
        io.read_caffemodel(negative).arrays()
    assert not (tmp_path / "up.caffemodel").exists()


def png_claiming(width, height):
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("datum, words", [
    (dict(channels=-3, height=-4, width=5, data=bytes(60)), ["-3 x -4 x 5"]),
    (dict(channels=3, height=4, width=-4, data=bytes(48)), ["3 x 4 x -4"]),
    (dict(channels=3, height=100000, width=100000, data=png_claiming(100000, 100000), encoded=True),
     ["cannot decode its PNG bytes", "10000000000 pixels"]),
    (dict(channels=3, height=4, width=4, data=b"\x89PNG\r\n\x1a\n" + b"not a png" * 8, encoded=True),
     ["cannot decode its PNG bytes"]),
])
def test_bad_datums_are_one_line_in_show_dump_and_evaluate(tmp_path, capsys, datum, words):
    stage = tmp_path / "ds" / "val_db"
    for part in ("features", "labels"):
        with LmdbWriter(stage / part) as w:
            for i in range(2):
                w.put(b"%08d" % i, pb.Datum(**datum))
    net = tmp_path / "train_val.prototxt"
    net.write_text(TRAIN_VAL.format(stage=stage))
    for argv in (["dataset", "show", tmp_path / "ds"], ["dataset", "show", stage / "features", "--dump", 1, tmp_path / "d"],
                 ["evaluate", net, "none", "--iterations", 1]):
        code, _, err = cli(capsys, *argv)
        assert code == 1, argv
        one_error_line(err, *words)


def test_lmdb_corrupted_page_is_one_line(tmp_path, capsys):
    ds = dataset(tmp_path)
    data = ds / "val_db" / "labels" / "data.mdb"
    raw = bytearray(data.read_bytes())
    raw[2 * 4096 + 10] ^= 0xFF  # the flags of the first tree page: LMDB's MDB_CORRUPTED, lmdb.CorruptedError
    data.write_bytes(bytes(raw))
    code, _, err = cli(capsys, "dataset", "show", ds)
    assert code == 1
    one_error_line(err, "corrupt LMDB database", "page 2")


# -- 9. control characters from files never reach the terminal -----------------------------------------------


def test_names_with_control_characters_are_escaped(tmp_path, capsys):
    net = tmp_path / "ctl.prototxt"
    net.write_text('layer { name: "a\\nb\\033[31mRED" type: "Inptu" top: "data" }\n')
    code, _, err = cli(capsys, "summary", net)
    assert code == 1
    assert one_error_line(err).endswith("layer 'a\\nb\\x1b[31mRED': unknown layer type 'Inptu'; closest supported "
                                        "type: 'Input'")
    net.write_text('layer { name: "in\\033[2J" type: "Input" top: "d\\nx" input_param { shape { dim: 1 } } }\n')
    code, out, _ = cli(capsys, "summary", net)
    assert code == 0 and "\x1b" not in out and "in\\x1b[2J" in out and "d\\nx" in out
    assert io.printable("tab\there\u2028\udcff é") == "tab\\there\\u2028\\xff é"
    ds = dataset(tmp_path / "d")
    (ds / "labels.txt").write_text("cat\nbad\x1b[31m\nthird\nfourth\n")
    code, out, _ = cli(capsys, "dataset", "show", ds)
    assert code == 0 and "\x1b" not in out and "bad\\x1b[31m" in out


# -- 10, 11. datasets that lost a record, or a database ------------------------------------------------------


def test_features_and_labels_that_do_not_pair_up_are_an_error_everywhere(tmp_path, capsys):
    import lmdb

    ds = dataset(tmp_path)
    env = lmdb.open(str(ds / "val_db" / "labels"))
    with env.begin(write=True) as txn:
        txn.delete(b"00000003")
    env.close()
    net = tmp_path / "train_val.prototxt"
    net.write_text(TRAIN_VAL.format(stage=ds / "val_db"))
    for argv in (["dataset", "show", ds], ["evaluate", net, "none", "--iterations", 3]):
        code, _, err = cli(capsys, *argv)
        assert code == 1, argv
        one_error_line(err, "holds 6 records but", "holds 5", "record 3 has the key '00000003'", "'00000004'")
    with LmdbWriter(tmp_path / "other") as w:  # as many records, other keys
        for i in range(6):
            w.put(b"%08d" % (i * 2), b"x")
    with pytest.raises(CaffeishError, match="record 1 has the key '00000001' .* but '00000002' .*same keys"):
        check_pair(ds / "val_db" / "features", tmp_path / "other")
    with pytest.raises(CaffeishError, match="holds 6 records but"):
        check_pair(ds / "val_db" / "features", ds / "val_db" / "labels")


def test_show_names_every_broken_database_instead_of_leaving_it_out(tmp_path, capsys):
    source = dataset(tmp_path)
    cases = {
        "no data.mdb": (lambda db: os.unlink(db / "data.mdb"), ["no data.mdb"]),
        "a plain file": (lambda db: (shutil.rmtree(db), db.write_bytes(b"")), ["is an empty file"]),
        "a link to /dev/zero": (lambda db: (os.unlink(db / "data.mdb"), os.symlink("/dev/zero", db / "data.mdb")),
                                ["is a device", "/dev/zero"]),
        "no labels": (lambda db: shutil.rmtree(db), ["has no 'labels' database beside it"]),
    }
    for i, (what, (damage, words)) in enumerate(cases.items()):
        ds = tmp_path / f"case{i}"
        shutil.copytree(source, ds)
        damage(ds / "val_db" / "labels")
        code, out, err = cli(capsys, "dataset", "show", ds)
        assert code == 1, what
        one_error_line(err, *words)


# -- 12, 13. nets that are empty, or text in another encoding --------------------------------------------------


def test_an_empty_or_comment_only_net_defines_no_layers_for_every_command(tmp_path, capsys):
    empty, comments = tmp_path / "empty.prototxt", tmp_path / "comments.prototxt"
    empty.write_bytes(b"")
    comments.write_text("# a net\n\n   # nothing else\n")
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    for net, why in ((empty, "the file is empty"), (comments, "the file holds only comments")):
        for argv in (["summary", net], ["offsets", net], ["upgrade", net, tmp_path / "up.prototxt"],
                     ["offsets", net, "--fix", tmp_path / "fixed.prototxt"],
                     ["surgery", "convolutionalize", net, "-o", tmp_path / "fcn.prototxt"],
                     ["evaluate", net, "none", "--iterations", 1], ["classify", net, "none", image]):
            code, _, err = cli(capsys, *argv)
            assert code == 1, argv
            one_error_line(err, "defines no layers", why)
    assert not any((tmp_path / n).exists() for n in ("up.prototxt", "fixed.prototxt", "fcn.prototxt"))


def test_text_in_another_encoding_is_called_text_with_an_encoding_problem(tmp_path, capsys):
    good = 'layer { name: "d" type: "Input" top: "data" input_param { shape { dim: 1 } } }\n'
    latin = tmp_path / "latin.prototxt"
    latin.write_bytes(good.encode() + b'layer { name: "r\xe9" type: "ReLU" bottom: "data" top: "r" }\n')
    for net in (latin,):
        for tool in ("summary", "offsets"):
            code, _, err = cli(capsys, tool, net)
            assert code == 1
            line = one_error_line(err, "latin.prototxt:2:17", "encoding problem", "0xe9", "UTF-8")
            assert "caffemodel" not in line and "binary" not in line
    comment = tmp_path / "comment.prototxt"
    comment.write_bytes(b"# caf\xe9 cr\xe8me\n" + good.encode())  # Caffe skips comments byte by byte
    assert cli(capsys, "summary", comment)[0] == 0
    for encoding in ("utf-16", "utf-16-le", "utf-16-be"):
        wide = tmp_path / f"{encoding}.prototxt"
        wide.write_bytes(good.encode(encoding))
        code, _, err = cli(capsys, "summary", wide)
        assert code == 1
        line = one_error_line(err, "UTF-16 text file", "save it as UTF-8")
        assert "caffemodel" not in line
        assert io.file_kind(wide)[0] == "text"


# -- 14. killed right after the first of several renames ------------------------------------------------------

KILL_AFTER = """
import os, signal, sys
from caffeish.tools.cli import main
try:
    from caffeish.formats import staging
except ImportError:  # (a caffeish without staged outputs)
    staging = None
targets = {os.path.abspath(p) for p in os.environ["KILL_AFTER"].split(os.pathsep)}
def kill_after(fn):
    def wrapped(src, dst, *args, **kw):
        result = fn(src, dst, *args, **kw)
        if os.path.abspath(os.fspath(dst)) in targets:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped
os.replace, os.rename = kill_after(os.replace), kill_after(os.rename)
if staging is not None:
    staging._exchange = kill_after(staging._exchange)
if staging is not None and os.environ.get("NO_EXCHANGE"):  # no renameat2 RENAME_EXCHANGE: two renames
    staging._exchange = lambda a, b: False
sys.exit(main(sys.argv[1:]))
"""


def killed_after(tmp_path, targets, *argv, no_exchange=False):
    """Run `caffeish ARGV`, killed (SIGKILL) right after the first rename onto one of `targets`."""
    script = tmp_path / "kill_after.py"
    script.write_text(KILL_AFTER)
    env = dict(ENV, KILL_AFTER=os.pathsep.join(str(t) for t in targets))
    if no_exchange:
        env["NO_EXCHANGE"] = "1"
    proc = subprocess.run([sys.executable, str(script), *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-1000:]


CLASSIFIER = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool1" top: "fc6" inner_product_param { num_output: 8 weight_filler { type: "xavier" } } }
layer { name: "fc8" type: "InnerProduct" bottom: "fc6" top: "fc8" inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
"""


def test_surgery_fcn_killed_after_its_first_rename_is_completed_by_the_next_run(tmp_path, capsys):
    net = tmp_path / "classifier.prototxt"
    net.write_text(CLASSIFIER)
    out, ref = tmp_path / "out", tmp_path / "ref"
    names = ["fcn.prototxt", "fcn_train_val.prototxt", "fcn.caffemodel"]
    assert main(["surgery", "fcn", str(net), "none", "--classes", "3", "-o", str(out / names[0]), str(out / names[2])]) == 0
    assert main(["surgery", "fcn", str(net), "none", "--classes", "2", "-o", str(ref / names[0]), str(ref / names[2])]) == 0
    old = {n: (out / n).read_bytes() for n in names}
    new = {n: (ref / n).read_bytes() for n in names}
    assert all(old[n] != new[n] for n in names)
    killed_after(tmp_path, [out / n for n in names], "surgery", "fcn", net, "none", "--classes", "2", "-o",
                 out / names[0], out / names[2])
    now = {n: (out / n).read_bytes() for n in names}
    assert sum(now[n] == new[n] for n in names) == 1 and sum(now[n] == old[n] for n in names) == 2  # mid-way
    assert [p for p in os.listdir(out) if p.startswith(staging.JOURNAL_PREFIX)]
    # the next run writing into the folder (here another tool's) completes the interrupted one first
    assert main(["offsets", str(net), "--to", "pool1", "--fix", str(out / "other.prototxt")]) == 0
    assert {n: (out / n).read_bytes() for n in names} == new
    assert sorted(os.listdir(out)) == sorted(names + ["other.prototxt"])  # no journal, no temp file left
    capsys.readouterr()


def test_a_killed_run_before_the_journal_leaves_only_temps_that_the_next_run_removes(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (folder / f".model.caffemodel.{pid}-abcd1234.tmp").write_bytes(b"partial")
    (folder / f".model.caffemodel.{os.getpid()}-abcd1234.tmp").write_bytes(b"a live run's")
    (folder / ".unrelated.tmp").write_bytes(b"not ours")
    with io.atomic_output(folder / "x.prototxt") as f:
        f.write(b"name: 'x'\n")
    assert sorted(os.listdir(folder)) == sorted([f".model.caffemodel.{os.getpid()}-abcd1234.tmp", ".unrelated.tmp",
                                                 "x.prototxt"])


def build_args(tmp_path, val):
    return ["dataset", "segmentation", "--images", tmp_path / "images", "--labels", tmp_path / "labels",
            "-o", tmp_path / "ds", "--force", "--val-fraction", val]


def records(ds):
    with LmdbReader(ds / "train_db" / "features") as r:
        return len(r)


@pytest.mark.parametrize("no_exchange", [False, True])
def test_dataset_force_killed_at_the_swap_leaves_a_whole_dataset(tmp_path, capsys, no_exchange):
    ds = dataset(tmp_path)  # val 0.5: 6 training records
    killed_after(tmp_path, [ds], *build_args(tmp_path, 0.25), no_exchange=no_exchange)  # 9 training records
    assert records(ds) == 9  # the new dataset is in place at once (with two renames: right after the second)
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".ds.")]
    assert leftovers  # the old dataset, under a temporary name
    # any later dataset build in the folder finishes the job: leftovers removed, the marker too
    assert main(["dataset", "segmentation", "--images", str(tmp_path / "images"), "--labels",
                 str(tmp_path / "labels"), "-o", str(tmp_path / "other")]) == 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    assert not (ds / staging.MARKER).exists() and records(ds) == 9
    code, out, _ = cli(capsys, "dataset", "show", ds)
    assert code == 0


def test_dataset_force_killed_between_the_two_renames_is_put_right_by_the_next_run(tmp_path, capsys):
    ds = dataset(tmp_path)
    # without RENAME_EXCHANGE: ds -> .ds.old-PID, then .ds.new-PID -> ds; killed after the first
    script = tmp_path / "kill_first.py"
    script.write_text(KILL_AFTER.replace("if os.path.abspath(os.fspath(dst)) in targets:",
                                         "if os.path.basename(os.fspath(dst)).startswith('.ds.old-'):"))
    env = dict(ENV, KILL_AFTER="", NO_EXCHANGE="1")
    proc = subprocess.run([sys.executable, str(script), *map(str, build_args(tmp_path, 0.25))], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-1000:]
    assert not ds.exists()  # the one moment the filesystem allows no dataset there
    assert main(["dataset", "segmentation", "--images", str(tmp_path / "images"), "--labels",
                 str(tmp_path / "labels"), "-o", str(tmp_path / "other")]) == 0
    assert records(ds) == 9 and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    capsys.readouterr()


def test_dataset_force_killed_before_the_swap_keeps_the_old_dataset(tmp_path, capsys):
    ds = dataset(tmp_path)
    script = tmp_path / "kill_new.py"
    script.write_text(KILL_AFTER.replace("if os.path.abspath(os.fspath(dst)) in targets:",
                                         "if os.path.basename(os.fspath(dst)).startswith('.ds.new-'):"))
    proc = subprocess.run([sys.executable, str(script), *map(str, build_args(tmp_path, 0.25))], capture_output=True,
                          text=True, env=dict(ENV, KILL_AFTER=""), timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert records(ds) == 6
    assert main(["dataset", "segmentation", "--images", str(tmp_path / "images"), "--labels",
                 str(tmp_path / "labels"), "-o", str(tmp_path / "other")]) == 0
    assert records(ds) == 6 and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    capsys.readouterr()


def test_build_folders_left_by_killed_runs_are_removed_by_the_next_build(tmp_path, capsys):
    ds = dataset(tmp_path)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    earlier = tmp_path / f".ds.tmp-{dead}"  # what earlier versions left: a partial build, no marker
    shutil.copytree(ds, earlier)
    ours = tmp_path / f".ds2.tmp-{dead}"
    ours.mkdir()
    (ours / staging.MARKER).write_bytes(b"")
    alive = tmp_path / f".ds3.tmp-{os.getpid()}"
    alive.mkdir()
    (alive / staging.MARKER).write_bytes(b"")
    foreign = tmp_path / f".notes.tmp-{dead}"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    assert main([str(a) for a in build_args(tmp_path, 0.25)]) == 0
    left = sorted(p for p in os.listdir(tmp_path) if p.startswith("."))
    assert left == sorted([alive.name, foreign.name])
    capsys.readouterr()


def test_writing_many_files_into_one_folder_lists_it_once(tmp_path, monkeypatch):
    """Recovery lists a folder only when something else changed it since this process's last write:
    segment writes thousands of files into one OUTDIR, and a listing per file would be quadratic."""
    listed = []
    real = staging._recover
    monkeypatch.setattr(staging, "_recover", lambda folder: (listed.append(folder), real(folder)))
    for i in range(50):
        with io.atomic_output(tmp_path / f"{i}.txt") as f:
            f.write(b"x")
    assert len(listed) == 1
    (tmp_path / ".left.4194304-abcd1234.tmp").write_bytes(b"another process's")  # the folder changed
    with io.atomic_output(tmp_path / "last.txt") as f:
        f.write(b"x")
    assert len(listed) == 2
