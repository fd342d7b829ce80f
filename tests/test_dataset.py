"""caffeish dataset: DIGITS-style segmentation and classification LMDBs, round trips and clear errors."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

import caffeish
from caffeish.tools.cli import main
from caffeish.formats.datum import LmdbReader, datum_array
from caffeish.formats.io import parse_text, read_binaryproto
from caffeish.formats.schema import pb
from caffeish.data.palette import pascal_palette
from caffeish.apps.dataset import build_segmentation

W, H = 20, 16
COLORS = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]], np.uint8)


def make_pairs(root, n=6, kind="palette", seed=0):
    """n images (PNG) with label images of `kind`; returns {stem: (rgb image, class map)}."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    pairs = {}
    for i in range(n):
        stem = f"img{i:02d}"
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        classes = rng.integers(0, 4, (H, W)).astype(np.uint8)
        classes[0, :3] = 255 if kind != "rgb" else 0  # VOC's boundary label
        Image.fromarray(rgb).save(root / "images" / f"{stem}.png")
        save_label(root / "labels" / f"{stem}.png", classes, kind)
        pairs[stem] = (rgb, classes)
    return pairs


def save_label(path, classes, kind):
    if kind == "palette":
        img = Image.fromarray(classes, "P")
        img.putpalette(pascal_palette(256).ravel().tolist())
    elif kind == "gray":
        img = Image.fromarray(classes, "L")
    else:
        img = Image.fromarray(COLORS[classes], "RGB")
    img.save(path)


def write_color_map(path):
    names = ["background", "road", "tree", "building"]
    path.write_text("".join(f"{r} {g} {b} {n}\n" for (r, g, b), n in zip(COLORS.tolist(), names)))
    return str(path)


def listing(out, split):
    """[(key, stem)] of OUT/<split>.txt."""
    rows = [line.split() for line in (out / f"{split}.txt").read_text().splitlines()]
    return [(k.encode(), os.path.splitext(os.path.basename(img))[0]) for k, img, _ in rows]


def check_records(out, split, pairs):
    with LmdbReader(out / f"{split}_db" / "features") as f, LmdbReader(out / f"{split}_db" / "labels") as lab:
        entries = listing(out, split)
        assert len(f) == len(lab) == len(entries)
        for key, stem in entries:
            rgb, classes = pairs[stem]
            np.testing.assert_array_equal(datum_array(f.get(key)), rgb[:, :, ::-1].transpose(2, 0, 1))
            np.testing.assert_array_equal(datum_array(lab.get(key))[0], classes)
    return entries


def test_palette_labels_round_trip_through_a_data_layer_net(tmp_path):
    pairs = make_pairs(tmp_path)
    out = tmp_path / "ds"
    assert main(["dataset", "segmentation", "--images", str(tmp_path / "images"), "--labels",
                 str(tmp_path / "labels"), "-o", str(out), "--val-fraction", "0.34"]) == 0
    train = check_records(out, "train", pairs)
    val = check_records(out, "val", pairs)
    assert len(train) == 4 and len(val) == 2  # floor(6 * 0.34) = 2 pairs go to val
    assert sorted(s for _, s in train + val) == sorted(pairs)
    # palette and classes survive: 4 classes (255 is the ignore label)
    assert (out / "palette.txt").read_text().splitlines() == [
        " ".join(map(str, c)) for c in pascal_palette(4).tolist()]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["label_format"] == ["palette"] and len(meta["classes"]) == 4
    # the mean file is the mean of the training images, BGR
    mean = read_binaryproto(str(out / "mean.binaryproto"))
    want = np.mean([pairs[s][0][:, :, ::-1].transpose(2, 0, 1) for _, s in train], axis=0)
    np.testing.assert_allclose(mean[0], want, rtol=1e-6)
    check_through_net(out, val, pairs)


def check_through_net(out, val, pairs):
    """Read val_db back through a net's two Data layers, cropped: image and label stay paired."""
    text = "".join(
        f'layer {{ name: "{t}" type: "Data" top: "{t}" transform_param {{ crop_size: 11 }} '
        f'data_param {{ source: "{out}/val_db/{db}" batch_size: 1 backend: LMDB }} }}'
        for t, db in (("data", "features"), ("label", "labels")))
    net = caffeish.Net(parse_text(text, pb.NetParameter()))
    for _, stem in val + val[:1]:
        got = net.forward()
        rgb, classes = pairs[stem]
        # TEST crop offsets: (16 - 11) // 2 = 2, (20 - 11) // 2 = 4
        np.testing.assert_array_equal(got["data"][0], rgb[2:13, 4:15, ::-1].transpose(2, 0, 1))
        np.testing.assert_array_equal(got["label"][0, 0], classes[2:13, 4:15])


def test_rgb_labels_with_a_color_map(tmp_path):
    pairs = make_pairs(tmp_path, kind="rgb")
    out = tmp_path / "ds"
    meta = build_segmentation(tmp_path / "images", tmp_path / "labels", out,
                              color_map=write_color_map(tmp_path / "cmap.txt"), val_fraction=0.2,
                              encoding="none")
    check_records(out, "train", pairs)
    check_through_net(out, check_records(out, "val", pairs), pairs)
    assert (out / "labels.txt").read_text().split() == ["background", "road", "tree", "building"]
    assert (out / "palette.txt").read_text().splitlines() == [" ".join(map(str, c)) for c in COLORS.tolist()]
    assert meta["encoding"] == "none" and meta["splits"]["val"]["records"] == 1
    with LmdbReader(out / "train_db" / "labels") as r:
        assert not r.first()[1].encoded  # raw Datums with --encoding none


def test_gray_labels_separate_val_folders_and_resize(tmp_path):
    pairs = make_pairs(tmp_path / "a", n=3, kind="gray")
    make_pairs(tmp_path / "b", n=2, kind="gray", seed=1)
    out = tmp_path / "ds"
    build_segmentation(tmp_path / "a" / "images", tmp_path / "a" / "labels", out,
                       val_images=tmp_path / "b" / "images", val_labels=tmp_path / "b" / "labels",
                       resize=(10, 8))
    with LmdbReader(out / "train_db" / "labels") as lab, LmdbReader(out / "train_db" / "features") as feat:
        assert len(lab) == 3
        for key, stem in listing(out, "train"):
            rgb, classes = pairs[stem]
            got = datum_array(lab.get(key))[0]
            # cv::resize INTER_NEAREST halving 16x20: source index floor(2 * d), the top-left of each 2x2
            np.testing.assert_array_equal(got, classes[0::2, 0::2])
            # convert_imageset's INTER_LINEAR halving: each 2x2 block's sum, (sum + 2) >> 2
            x = rgb.astype(np.int32)
            want = (x[0::2, 0::2] + x[0::2, 1::2] + x[1::2, 0::2] + x[1::2, 1::2] + 2) >> 2
            np.testing.assert_array_equal(datum_array(feat.get(key)), want[:, :, ::-1].transpose(2, 0, 1))
    with LmdbReader(out / "val_db" / "features") as f:
        assert len(f) == 2 and datum_array(f.first()[1]).shape == (3, 8, 10)


def run_fails(tmp_path, args, match):
    out = tmp_path / "ds"
    with pytest.raises(caffeish.CaffeishError, match=match):
        build_segmentation(tmp_path / "images", tmp_path / "labels", out, **args)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds")] == []  # no half database


def test_error_when_image_and_label_sizes_differ(tmp_path):
    make_pairs(tmp_path)
    Image.new("P", (W + 1, H)).save(tmp_path / "labels" / "img03.png")
    run_fails(tmp_path, {}, r"img03.png is 20x16 but its label image .*img03.png is 21x16")


def test_error_when_a_label_color_is_not_in_the_color_map(tmp_path):
    make_pairs(tmp_path, kind="rgb")
    bad = np.asarray(Image.open(tmp_path / "labels" / "img04.png")).copy()
    bad[2:4, 5:8] = (1, 2, 3)
    Image.fromarray(bad).save(tmp_path / "labels" / "img04.png")
    cmap = write_color_map(tmp_path / "cmap.txt")
    run_fails(tmp_path, {"color_map": cmap}, r"img04.png: 6 pixels .* \(1, 2, 3\): 6 pixels")


def test_error_when_palettes_differ(tmp_path):
    make_pairs(tmp_path)
    img = Image.open(tmp_path / "labels" / "img02.png")
    pal = img.getpalette()
    pal[3:6] = [9, 9, 9]
    img.putpalette(pal)
    img.save(tmp_path / "labels" / "img02.png")
    run_fails(tmp_path, {"val_fraction": 0}, r"img02.png: its palette differs from that of .*index 1: \(9, 9, 9\) vs \(128, 0, 0\)")


def test_error_for_rgba_labels_with_real_transparency(tmp_path):
    make_pairs(tmp_path, kind="rgb")
    rgba = np.asarray(Image.open(tmp_path / "labels" / "img01.png").convert("RGBA")).copy()
    opaque = tmp_path / "opaque.png"
    Image.fromarray(rgba).save(opaque)
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "labels" / "img01.png")
    cmap = write_color_map(tmp_path / "cmap.txt")
    run_fails(tmp_path, {"color_map": cmap}, r"img01.png: RGBA label image with real transparency \(1 of 320")
    os.replace(opaque, tmp_path / "labels" / "img01.png")  # an opaque alpha channel is fine
    build_segmentation(tmp_path / "images", tmp_path / "labels", tmp_path / "ds", color_map=cmap)


def test_error_for_rgb_labels_without_a_color_map_and_unpaired_images(tmp_path):
    make_pairs(tmp_path, kind="rgb")
    run_fails(tmp_path, {}, r"img\d\d.png: an RGB label image, but no colour map")
    os.remove(tmp_path / "labels" / "img05.png")
    run_fails(tmp_path, {}, r"1 image\(s\) .* have no label image .*img05.png")


def test_existing_output_is_kept_unless_forced_and_only_a_dataset_is_replaced(tmp_path):
    make_pairs(tmp_path, n=2)
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(caffeish.CaffeishError, match="already exists"):
        build_segmentation(tmp_path / "images", tmp_path / "labels", out)
    with pytest.raises(caffeish.CaffeishError, match="not a dataset folder"):
        build_segmentation(tmp_path / "images", tmp_path / "labels", out, force=True)
    assert (out / "keep.txt").read_text() == "x"
    os.remove(out / "keep.txt")  # an empty folder is fine
    build_segmentation(tmp_path / "images", tmp_path / "labels", out, val_fraction=0.5)
    assert (out / "val_db").is_dir()
    build_segmentation(tmp_path / "images", tmp_path / "labels", out, force=True, val_fraction=0)
    assert (out / "dataset.json").is_file() and not (out / "val_db").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "images", "labels"]  # no .old / .tmp left


def refused(argv, match):
    with pytest.raises(caffeish.CaffeishError, match=match):
        main_raise(["dataset"] + [str(a) for a in argv])


def test_force_never_removes_a_folder_holding_the_inputs(tmp_path):
    """The issue's case: `-o ok --force` with --images ok/img --labels ok/lbl deleted the inputs."""
    ok = tmp_path / "ok"
    pairs = make_pairs(ok, n=3)
    (ok / "dataset.json").write_text("{}")  # even when it also looks like a dataset
    seg = ["segmentation", "--images", ok / "images", "--labels", ok / "labels", "--force"]
    refused(seg + ["-o", ok], r"--images .*ok/images is inside it")
    assert len(list((ok / "images").iterdir())) == len(pairs) == len(list((ok / "labels").iterdir()))
    # a colour map or class-names file inside the output counts too
    make_pairs(tmp_path / "src", n=3, kind="rgb")
    cmap = write_color_map(ok / "cmap.txt")
    src = ["segmentation", "--images", tmp_path / "src" / "images", "--labels", tmp_path / "src" / "labels",
           "--force"]
    refused(src + ["--color-map", cmap, "-o", ok], r"--color-map .*cmap.txt is inside it")
    refused(src + ["--color-map", cmap, "--class-names", ok / "images" / "img00.png", "-o", ok / "images"],
            "is inside it")
    # the output inside an input folder, directly or through a symbolic link
    refused(src + ["--color-map", cmap, "-o", tmp_path / "src" / "images" / "ds"], r"lies inside --images")
    os.symlink(ok, tmp_path / "link")
    refused(seg + ["-o", tmp_path / "link"], "is inside it")
    # classification: the class folders inside the output
    refused(["classification", "--images", ok, "-o", tmp_path, "--force"], "is inside it")
    assert (ok / "cmap.txt").is_file() and len(list((ok / "images").iterdir())) == 3
    refused(src + ["--class-names", tmp_path / "src" / "images" / "img00.png", "-o", tmp_path / "new"],
            "--class-names .*img00.png: not a UTF-8 text file")


def test_force_refuses_the_current_folder_its_parents_and_files(tmp_path, monkeypatch):
    make_pairs(tmp_path / "src", n=2)
    seg = ["segmentation", "--images", tmp_path / "src" / "images", "--labels", tmp_path / "src" / "labels",
           "--force"]
    work = tmp_path / "work" / "inner"
    work.mkdir(parents=True)
    (work / "dataset.json").write_text("{}")
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    refused(seg + ["-o", "."], "current folder or a parent of it")
    refused(seg + ["-o", ".."], "current folder or a parent of it")
    assert (work / "notes.txt").read_text() == "mine"
    target = tmp_path / "a_file"
    target.write_text("data")
    refused(seg + ["-o", target], "is a file, not a folder")
    assert target.read_text() == "data"
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


def test_small_datasets_still_get_one_val_record(tmp_path, capsys):
    make_pairs(tmp_path, n=6)
    # floor(6 * 0.1) = 0, but a train/val net needs a val_db: one pair goes there, and the output says so
    assert main(["dataset", "segmentation", "--images", str(tmp_path / "images"), "--labels",
                 str(tmp_path / "labels"), "-o", str(tmp_path / "ds")]) == 0
    text = capsys.readouterr().out
    assert "train: 5 records" in text and "val: 1 record," in text
    assert "--val-fraction 0.1 of 6 pairs rounds down to 0; 1 went to val_db" in text
    with LmdbReader(tmp_path / "ds" / "val_db" / "labels") as r:
        assert len(r) == 1
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["splits"]["val"]["records"] == 1 and "rounds down" in meta["split_note"]
    # a single pair cannot be split; --val-fraction 0 means no val_db; both are noted
    from caffeish.apps.dataset import split_pairs

    assert [len(p) for p in split_pairs(list(range(1)), 0.1, 0)] == [1, 0]
    assert [len(p) for p in split_pairs(list(range(2)), 0.1, 0)] == [1, 1]
    assert [len(p) for p in split_pairs(list(range(20)), 0.1, 0)] == [18, 2]
    assert [len(p) for p in split_pairs(list(range(6)), 0, 0)] == [6, 0]
    meta = build_segmentation(tmp_path / "images", tmp_path / "labels", tmp_path / "ds0", val_fraction=0)
    assert "val" not in meta["splits"] and meta["split_note"] == "no val_db (--val-fraction 0)"


def test_classification_dataset_like_convert_imageset(tmp_path):
    rng = np.random.default_rng(3)
    images = {}
    for cls in ("cat", "dog"):
        (tmp_path / "in" / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "in" / cls / f"{i}.png")
            images[f"{cls}/{i}.png"] = arr
    out = tmp_path / "ds"
    assert main(["dataset", "classification", "--images", str(tmp_path / "in"), "-o", str(out),
                 "--val-fraction", "0.34"]) == 0
    assert (out / "labels.txt").read_text().split() == ["cat", "dog"]
    train = [line.split() for line in (out / "train.txt").read_text().splitlines()]
    with LmdbReader(out / "train_db") as r:
        records = list(r.datums())
    assert len(records) == len(train) == 4
    for (key, datum), (rel, label) in zip(records, train):
        assert key.decode().endswith(rel) and datum.label == int(label) == ("dog" in rel)
        np.testing.assert_array_equal(datum_array(datum), images[rel][:, :, ::-1].transpose(2, 0, 1))
    mean = read_binaryproto(str(out / "mean.binaryproto"))
    want = np.mean([images[rel][:, :, ::-1].transpose(2, 0, 1) for rel, _ in train], axis=0)
    np.testing.assert_allclose(mean, want[np.newaxis], rtol=1e-6)


def test_classification_refuses_mixed_sizes(tmp_path):
    for cls, size in (("a", (4, 4)), ("b", (5, 4))):
        (tmp_path / "in" / cls).mkdir(parents=True)
        Image.new("RGB", size).save(tmp_path / "in" / cls / "x.png")
    with pytest.raises(caffeish.CaffeishError, match="pass --resize"):
        main_raise(["dataset", "classification", "--images", str(tmp_path / "in"), "-o", str(tmp_path / "ds"),
                    "--val-fraction", "0"])
    assert not (tmp_path / "ds").exists()


def main_raise(argv):
    from caffeish.tools.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.run(args)


def test_show_prints_counts_and_class_frequencies_and_dumps(tmp_path, capsys):
    pairs = make_pairs(tmp_path)
    out = tmp_path / "ds"
    build_segmentation(tmp_path / "images", tmp_path / "labels", out, val_fraction=0.34)
    assert main(["dataset", "show", str(out), "--dump", "2", str(tmp_path / "dump")]) == 0
    text = capsys.readouterr().out
    assert re.search(r"train_db/features +4 +3x16x20 +PNG", text)
    val = [s for _, s in listing(out, "val")]
    pixels = np.bincount(np.concatenate([pairs[s][1].ravel() for s in val]), minlength=256)
    share = 100 * pixels[3] / pixels.sum()
    assert re.search(rf"val_db/labels +3 +class3 +{pixels[3]:,} +{share:.1f}%", text)
    assert re.search(rf"val_db/labels +255 +\(ignored\) +{pixels[255]:,} ", text)
    dumped = Image.open(tmp_path / "dump" / "val_db_labels_00000000.png")
    assert dumped.mode == "P" and dumped.getpalette()[3:6] == pascal_palette(2)[1].tolist()
    np.testing.assert_array_equal(np.asarray(dumped), pairs[val[0]][1])
    assert len(list((tmp_path / "dump").iterdir())) == 8  # 2 records of each of the 4 databases


def test_show_refuses_a_database_that_is_not_datums(tmp_path):
    from caffeish.formats.datum import LmdbWriter

    with LmdbWriter(tmp_path / "db") as w:
        w.put(b"a", b'{"json": true}')
    with pytest.raises(caffeish.CaffeishError, match=r"record 'a' .* is not a Caffe Datum: found text"):
        main_raise(["dataset", "show", str(tmp_path / "db")])
    with pytest.raises(caffeish.CaffeishError, match="not an LMDB database"):
        main_raise(["dataset", "show", str(tmp_path)])


def test_a_16_bit_image_gives_the_pixels_classify_sees(tmp_path):
    """16-bit PNGs keep their high byte (cv::imread, as convert_imageset), in the Datums and in classify."""
    from caffeish.formats import images

    make_pairs(tmp_path, n=2)
    deep = np.random.default_rng(5).integers(0, 65536, (H, W), dtype=np.uint16)
    deep[0, :4] = [255, 256, 32768, 65535]
    os.remove(tmp_path / "images" / "img00.png")
    Image.fromarray(deep).save(tmp_path / "images" / "img00.png")  # a 16-bit gray PNG
    out = tmp_path / "ds"
    build_segmentation(tmp_path / "images", tmp_path / "labels", out, val_fraction=0)
    key = next(k for k, stem in listing(out, "train") if stem == "img00")
    with LmdbReader(out / "train_db" / "features") as f:
        stored = datum_array(f.get(key))
    assert stored.shape == (3, H, W) and stored[0, 0, :4].tolist() == [0, 1, 128, 255]
    np.testing.assert_array_equal(stored, np.repeat((deep >> 8).astype(np.uint8)[np.newaxis], 3, axis=0))
    seen = images.decode(tmp_path / "images" / "img00.png")  # classify's / segment's pixels, RGB
    np.testing.assert_array_equal(stored, seen[:, :, ::-1].transpose(2, 0, 1))


def test_classification_takes_every_image_extension_classify_takes(tmp_path):
    from caffeish.formats.images import IMAGE_EXTENSIONS
    from caffeish.apps import dataset

    assert dataset.IMAGE_EXTENSIONS is IMAGE_EXTENSIONS  # one list
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    for cls, name in (("a", "x.pnm"), ("a", "y.jpe"), ("b", "z.pbm")):
        (tmp_path / "in" / cls).mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(gray)
        (img.convert("1") if name.endswith(".pbm") else img.convert("RGB")).save(tmp_path / "in" / cls / name)
    meta = dataset.build_classification(tmp_path / "in", tmp_path / "ds", val_fraction=0)
    assert meta["splits"]["train"]["label_counts"] == {"0": 2, "1": 1}


def test_force_does_not_take_a_folder_with_only_labels_txt_for_a_dataset(tmp_path):
    """labels.txt is in model folders too (DIGITS jobs, caffeish stores): --force never replaces such a folder."""
    from caffeish.data import dataset_meta

    make_pairs(tmp_path, n=2)
    model = tmp_path / "model"
    model.mkdir()
    (model / "labels.txt").write_text("a\nb\n")
    (model / "weights.caffemodel").write_bytes(b"x")
    with pytest.raises(caffeish.CaffeishError, match="not a dataset folder"):
        build_segmentation(tmp_path / "images", tmp_path / "labels", model, force=True)
    assert sorted(p.name for p in model.iterdir()) == ["labels.txt", "weights.caffemodel"]
    assert not dataset_meta.is_dataset(model) and dataset_meta.dataset_root(model / "db") is None
    out = tmp_path / "ds"
    build_segmentation(tmp_path / "images", tmp_path / "labels", out, val_fraction=0)
    assert dataset_meta.dataset_root(out / "train_db" / "features") == str(out)
    mean = read_binaryproto(str(out / "mean.binaryproto"))  # compute_image_mean's 1 x C x H x W
    assert mean.shape == (1, 3, H, W)
    colors = np.array([[int(v) for v in line.split()] for line in (out / "palette.txt").read_text().splitlines()])
    np.testing.assert_array_equal(colors, pascal_palette(256)[:len(colors)])  # palette PNG labels: VOC's


# ---------------------------------------------------------------------------- class names


def _gray_pairs_up_to_7(root):
    """Three grey label images with values 0..7 (and VOC's 255 boundary); returns the pixel count per value."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(3)
    counts = np.zeros(256, np.int64)
    for i in range(3):
        classes = rng.integers(0, 8, (H, W)).astype(np.uint8)
        classes[0, :2] = 255
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "images" / f"i{i}.png")
        Image.fromarray(classes, "L").save(root / "labels" / f"i{i}.png")
        counts += np.bincount(classes.ravel(), minlength=256)
    names = root / "names.txt"
    names.write_text("background\nroad\ntree\nbuilding\ncar\n")
    return counts, str(names)


def test_label_values_past_the_class_names_are_an_error_naming_them_with_their_pixels(tmp_path, capsys):
    counts, names = _gray_pairs_up_to_7(tmp_path)
    out = tmp_path / "ds"
    args = ["dataset", "segmentation", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
            "-o", str(out), "--class-names", names]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--class-names {names} names 5 classes (0..4) but the labels hold values" in err
    for v in (5, 6, 7):
        assert f"{v} ({counts[v]:,} pixels)" in err
    assert "(4 " not in err and "255 (" not in err and "--allow-extra-classes" in err
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".ds")]
    # Allowed: a warning with the same counts, and the extra classes get placeholder names.
    assert main(args + ["--allow-extra-classes"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and f"7 ({counts[7]:,} pixels)" in err and "class5..class7" in err
    assert (out / "labels.txt").read_text().split() == ["background", "road", "tree", "building", "car",
                                                         "class5", "class6", "class7"]


def test_every_named_class_is_a_class_even_when_no_label_holds_it(tmp_path):
    make_pairs(tmp_path, kind="gray")  # values 0..3
    names = tmp_path / "names.txt"
    names.write_text("".join(f"c{i}\n" for i in range(6)))
    meta = build_segmentation(tmp_path / "images", tmp_path / "labels", tmp_path / "ds", class_names=str(names))
    assert meta["classes"] == [f"c{i}" for i in range(6)] and meta["warnings"] == []
    assert len((tmp_path / "ds" / "palette.txt").read_text().splitlines()) == 6


@pytest.mark.parametrize("value, stored", [("none", None), ("-1", None), ("NONE", None), ("0", 0), ("255", 255)])
def test_ignore_label_spellings(tmp_path, value, stored):
    make_pairs(tmp_path, kind="gray")
    assert main(["dataset", "segmentation", "--images", str(tmp_path / "images"), "--labels",
                 str(tmp_path / "labels"), "-o", str(tmp_path / "ds"), "--ignore-label", value]) == 0
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["ignore_label"] == stored


@pytest.mark.parametrize("value", ["x", "2147483648"])
def test_ignore_label_out_of_range_is_refused_by_name(tmp_path, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["dataset", "segmentation", "--images", "i", "--labels", "l", "-o", str(tmp_path / "ds"),
              "--ignore-label", value])
    assert e.value.code == 2 and "argument --ignore-label" in capsys.readouterr().err


def test_missing_output_folders_are_made_and_a_file_in_the_way_is_one_line(tmp_path, capsys):
    make_pairs(tmp_path, n=4)
    args = ["dataset", "segmentation", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels")]
    assert main(args + ["-o", str(tmp_path / "workspace" / "datasets" / "mine")]) == 0
    assert (tmp_path / "workspace" / "datasets" / "mine" / "dataset.json").is_file()
    (tmp_path / "afile").write_text("x")
    assert main(args + ["-o", str(tmp_path / "afile" / "sub" / "ds")]) == 1
    err = capsys.readouterr().err
    assert "cannot make the folder" in err and len(err.strip().splitlines()) == 1
