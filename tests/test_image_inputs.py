"""The image list of segment and classify (caffeish.apps.inference.find_images): besides image files,
folders and globs, a list file (@LIST.txt) and an LMDB dataset made by `caffeish dataset` (one image a
record, named by its escaped key).  The Ray path uses the same list (the cluster of tests/conftest.py's ray fixture)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from caffeish.apps import inference
from caffeish.apps.dataset import build_segmentation
from caffeish.data.preprocess import Preprocess
from caffeish.formats.datum import LmdbWriter, make_datum
from caffeish.tools.cli import main

from test_segment import FCN


def _picture(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture()
def work(tmp_path):
    """fcn.prototxt, images/{a,b,c}.png, labels/{a,b,c}.png, and a dataset built from them (all in train_db)."""
    (tmp_path / "fcn.prototxt").write_text(FCN)
    rng = np.random.default_rng(5)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for stem, (h, w) in (("a", (37, 53)), ("b", (40, 31)), ("c", (29, 29))):
        Image.fromarray(_picture(rng, h, w)).save(tmp_path / "images" / f"{stem}.png")
        Image.fromarray(rng.integers(0, 3, (h, w), dtype=np.uint8), "L").save(tmp_path / "labels" / f"{stem}.png")
    return tmp_path


def _files(folder):
    return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(folder) for f in fs if not f.startswith(".")}


def _segment(work, inputs, out, capsys, extra=()):
    code = main(["segment", str(work / "fcn.prototxt"), "none", *map(str, inputs), "-o", str(out), "--seed", "3",
                 "--format", "json", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_file_gives_the_outputs_of_the_files_named(work, capsys):
    lists = work / "lists"
    lists.mkdir()
    (lists / "l.txt").write_text(f"# three images\n../images/a.png\n\n  {work / 'images' / 'b.png'}  \n"
                                 "   # a comment\n../images/c.png\n")
    code, _, _ = _segment(work, [work / "images" / n for n in ("a.png", "b.png", "c.png")], work / "direct", capsys)
    assert code == 0
    code, _, _ = _segment(work, ["@" + str(lists / "l.txt")], work / "listed", capsys)
    assert code == 0
    direct, listed = _files(work / "direct"), _files(work / "listed")
    assert sorted(direct) == ["a.png", "a_overlay.png", "b.png", "b_overlay.png", "c.png", "c_overlay.png"]
    assert direct == listed
    images, notes = inference.find_images(["@" + str(lists / "l.txt")])
    assert [n for _, n in images] == ["a.png", "b.png", "c.png"] and not notes
    assert images[0][0] == os.path.normpath(str(work / "images" / "a.png"))


def test_list_file_missing_entries_and_missing_list(work, capsys):
    (work / "l.txt").write_text("images/a.png\nimages/nothere.png\n")
    code, _, err = _segment(work, ["@" + str(work / "l.txt")], work / "out", capsys)
    assert code == 1
    assert f"{work / 'images' / 'nothere.png'}: no such image file" in err
    assert "1 of 2 images could not be segmented" in err
    assert sorted(_files(work / "out")) == ["a.png", "a_overlay.png"]
    code, _, err = _segment(work, ["@" + str(work / "none.txt")], work / "out2", capsys)
    assert code != 0 and "none.txt: no such list file" in err
    # a file whose name starts with @ is still an image, as before
    os.rename(work / "images" / "c.png", work / "images" / "@c.png")
    images, _ = inference.find_images([str(work / "images" / "@c.png")])
    assert images == [(str(work / "images" / "@c.png"), "@c.png")]


def test_classify_reads_a_list_file(work, capsys):
    (work / "l.txt").write_text("images/a.png\nimages/b.png\n")
    args = ["classify", str(work / "fcn.prototxt"), "none", "--format", "json", "--blob", "score_fr", "--top-k", "2"]
    # the FCN's score_fr is 5 x 11 x 15: classify reads it whole (its top "classes" are cells), enough to compare
    assert main(args + [str(work / "images" / "a.png"), str(work / "images" / "b.png")]) == 0
    direct = capsys.readouterr().out
    assert main(args + ["@" + str(work / "l.txt")]) == 0
    assert capsys.readouterr().out == direct
    # a dataset: one row per record, the tops of the image files the records came from
    build_segmentation(str(work / "images"), str(work / "labels"), str(work / "ds"), val_fraction=0, workers=1)
    assert main(args + [str(work / "ds")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [os.path.basename(r["image"]) for r in rows] == ["00000000", "00000001", "00000002"]
    files = [line.split()[1] for line in (work / "ds" / "train.txt").read_text().splitlines()]
    assert main(args + files) == 0
    assert [r["top"] for r in rows] == [json.loads(line)["top"] for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("encoding", ["png", "none"])
def test_dataset_records_give_the_outputs_of_their_images(work, capsys, encoding):
    build_segmentation(str(work / "images"), str(work / "labels"), str(work / "ds"), val_fraction=0.34,
                       encoding=encoding, workers=1)
    stems = {}
    for split in ("train", "val"):
        for line in (work / "ds" / f"{split}.txt").read_text().splitlines():
            key, image, _ = line.split()
            stems[f"{split}_db/{key}"] = os.path.splitext(os.path.basename(image))[0]
    assert len(stems) == 3
    code, out, _ = _segment(work, [work / "ds"], work / "from_ds", capsys)
    assert code == 0
    code, _, _ = _segment(work, [work / "images"], work / "from_files", capsys)
    assert code == 0
    got, want = _files(work / "from_ds"), _files(work / "from_files")
    assert len(got) == 6
    for name, stem in stems.items():
        assert got[name + ".png"] == want[stem + ".png"]
        assert got[name + "_overlay.png"] == want[stem + "_overlay.png"]
    # a stage folder and its features database: the records named by their keys alone
    images, _ = inference.find_images([str(work / "ds" / "val_db")])
    features, _ = inference.find_images([str(work / "ds" / "val_db" / "features")])
    assert images == features and [n for _, n in images] == ["00000000"]
    # the pixels are the image file's
    spec = Preprocess()
    key = next(k for k in stems if k.startswith("val_db"))
    pixels = spec.load(inference.read_record(images[0][0]), 3)
    assert np.array_equal(pixels, spec.load(str(work / "images" / f"{stems[key]}.png"), 3))
    assert json.loads(out)["rows"][0]["image"].endswith(os.path.join("features", "data.mdb", "00000000"))


def test_hostile_keys_never_name_a_file_outside_outdir(work, capsys):
    db = work / "db"
    arr = np.zeros((3, 29, 29), np.uint8)
    keys = [b"../evil", b"..", b"a/../b", b"", b"sub/x.jpg", b".hidden", b"%41 \xff\\y", b"ok"]
    with LmdbWriter(str(db)) as w:
        for k in keys:
            if k:
                w.put(k, make_datum(arr, encoding="png"))
    images, notes = inference.find_images([str(db)])
    assert [n for _, n in images] == ["%2541%20%FF%5Cy", "%2Ehidden", "ok", "sub%2Fx.jpg"]
    assert len(notes) == 3 and all("cannot name an output file" in n for n in notes)
    for ref, name in images:
        assert inference.parse_record_ref(ref)[1] in keys and "/" not in name and ".." != name
    out = work / "out"
    code, _, err = _segment(work, [db], out, capsys)
    assert code == 0 and "cannot name an output file" in err
    written = sorted(_files(out))
    assert written == sorted(n for s in ("%2Ehidden", "%2541%20%FF%5Cy", "ok", "sub%2Fx") for n in
                             (s + ".png", s + "_overlay.png"))
    assert not (work / "evil.png").exists() and not (work / "b.png").exists()


def test_record_names():
    assert inference.record_name(b"00000001") == "00000001"
    assert inference.record_name(b"00000001_cat/1.jpg") == "00000001_cat%2F1.jpg"
    for bad in (b"", b".", b"..", b"../x", b"x/..", b"a\\..\\b"):
        assert inference.record_name(bad) is None
    ref = inference.record_ref("/d/db", b"a b/c")
    assert ref == "/d/db/data.mdb/a%20b%2Fc"
    assert inference.parse_record_ref(ref) is None  # no such database: an ordinary (missing) path


def test_corrupt_record_is_named_and_skipped(work, capsys):
    db = work / "db"
    with LmdbWriter(str(db)) as w:
        w.put(b"bad", make_datum(np.zeros((3, 29, 29), np.uint8), encoding="png").SerializeToString()[:-20])
        w.put(b"good", make_datum(np.zeros((3, 29, 29), np.uint8), encoding="png"))
    code, _, err = _segment(work, [db], work / "out", capsys)
    assert code == 1 and os.path.join("data.mdb", "bad") in err
    assert sorted(_files(work / "out")) == ["good.png", "good_overlay.png"]


def test_ray_gives_the_single_machine_outputs_for_lists_and_datasets(ray, work, capsys):
    build_segmentation(str(work / "images"), str(work / "labels"), str(work / "ds"), val_fraction=0.34, workers=1)
    (work / "l.txt").write_text("images/a.png\nimages/b.png\n")
    inputs = ["@" + str(work / "l.txt"), work / "ds"]
    code, single, _ = _segment(work, inputs, work / "single", capsys)
    assert code == 0
    code, distributed, err = _segment(work, inputs, work / "ray", capsys, ["--ray", "auto", "--ray-actors", "2"])
    assert code == 0 and "ray" in err.lower()  # the run's summary
    assert _files(work / "single") == _files(work / "ray") and len(_files(work / "ray")) == 10
    strip = [{k: v for k, v in row.items() if k != "outputs"} for row in json.loads(single)["rows"]]
    assert strip == [{k: v for k, v in row.items() if k != "outputs"} for row in json.loads(distributed)["rows"]]
