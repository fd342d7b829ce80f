"""`caffeish segment` and caffeish.segment on a small FCN (conv/pool, score, bilinear Deconvolution
upscore, Crop) with filler weights: classes against the Net run on independently preprocessed
arrays, the pictures (palette PNG, overlay, legend), palettes, exact tiling, and the errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import caffeish
from caffeish.apps import inference
from caffeish.data import palette as palettes
from caffeish.tools.cli import main
from caffeish.errors import CaffeishError, GraphError, ShapeError
from caffeish.formats.io import parse_text
from caffeish.data.preprocess import Preprocess
from caffeish.formats.schema import pb
from conftest import shared_path

# conv1 pad 5 + pool 3/2 + conv 3 + pool 2/2 -> total stride 4; upscore kernel 7 stride 4;
# the input lands at x + 5 in 'upscore' (caffeish offsets computes 5), so Crop offset 5.
FCN = """
name: "tiny_fcn"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 37 dim: 53 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 5
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "score_fr" type: "Convolution" bottom: "pool2" top: "score_fr"
  convolution_param { num_output: 5 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "upscore" type: "Deconvolution" bottom: "score_fr" top: "upscore" param { lr_mult: 0 }
  convolution_param { num_output: 5 group: 5 bias_term: false kernel_size: 7 stride: 4
    weight_filler { type: "bilinear" } } }
layer { name: "score" type: "Crop" bottom: "upscore" bottom: "data" top: "score" crop_param { axis: 2 offset: 5 } }
"""
MEAN = np.array([104.0, 117.0, 123.0], np.float32)
LABELS = ["background", "cat", "dog", "car", "sky"]


def _net():
    return caffeish.Net(parse_text(FCN, pb.NetParameter()), seed=7)


@pytest.fixture(scope="module")
def net():
    return _net()


@pytest.fixture()
def files(tmp_path):
    """The prototxt, a folder with two images (37x53 and 40x31), a labels file."""
    (tmp_path / "fcn.prototxt").write_text(FCN)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    arrays = {}
    for name, hw in (("a.png", (37, 53)), ("b.png", (40, 31))):
        arr = _picture(rng, hw)
        Image.fromarray(arr).save(folder / name)
        arrays[name] = arr
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return tmp_path, folder, arrays


def _picture(rng, hw):
    """A picture with structure (bright and dark blocks plus noise), so several classes appear."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx // 8 + yy // 8) % 2) * 255], axis=2)
    return np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def _reference(net, arr):
    """The Net on Caffe's input computed here: BGR, minus the mean, N x C x H x W."""
    x = arr[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) - MEAN[:, None, None]
    return net.forward(data=x[np.newaxis])["score"][0].copy()


def test_segment_api_matches_the_net(net, files):
    _, folder, arrays = files
    seg = caffeish.segment(net, str(folder / "a.png"), preprocess=Preprocess(mean=MEAN), labels=LABELS)
    scores = _reference(net, arrays["a.png"])
    assert seg.scores.shape == (5, 37, 53) and seg.classes.shape == (37, 53)
    np.testing.assert_array_equal(seg.scores, scores)
    np.testing.assert_array_equal(seg.classes, scores.argmax(axis=0))
    assert len(np.unique(seg.classes)) >= 2  # the test picture gives more than one class
    np.testing.assert_array_equal(seg.image, arrays["a.png"])
    img = seg.label_image()
    assert img.mode == "P" and img.size == (53, 37)
    np.testing.assert_array_equal(np.asarray(img), seg.classes)
    over = seg.overlay_image(alpha=0.25)
    want = np.rint(arrays["a.png"] * 0.75 + palettes.pascal_palette()[seg.classes] * 0.25)
    assert over.mode == "RGB" and np.abs(np.asarray(over).astype(int) - want).max() <= 1


def test_cli_writes_palette_png_overlay_legend_and_scores(net, files, capsys):
    tmp, folder, arrays = files
    out = tmp / "out"
    assert main(["segment", str(tmp / "fcn.prototxt"), "none", str(folder), "-o", str(out), "--seed", "7",
                 "--mean-value", "104,117,123", "--legend", "--npy", "--labels", str(tmp / "labels.txt")]) == 0
    assert "a.png" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == [".caffeish-segment", "a.npy", "a.png", "a_overlay.png", "b.npy", "b.png",
                                       "b_overlay.png"]
    pascal = palettes.pascal_palette()
    for name, hw in (("a", (37, 53)), ("b", (40, 31))):
        scores = _reference(net, arrays[name + ".png"])
        np.testing.assert_array_equal(np.load(out / f"{name}.npy"), scores)
        with Image.open(out / f"{name}.png") as png:
            assert png.mode == "P" and png.size == (hw[1], hw[0])
            table = np.array(png.getpalette()[:15]).reshape(5, 3)
            np.testing.assert_array_equal(table, pascal[:5])
            np.testing.assert_array_equal(np.asarray(png), scores.argmax(axis=0))
        with Image.open(out / f"{name}_overlay.png") as over:
            over = np.asarray(over.convert("RGB")) if over.mode != "RGB" else np.asarray(over)
        assert over.shape[0] >= hw[0] and over.shape[1] > hw[1]  # the legend sits on the right
        legend = over[:, hw[1]:].reshape(-1, 3)
        for c in np.unique(scores.argmax(axis=0)):  # every class present has its swatch
            assert (legend == pascal[c]).all(axis=1).any(), c


def test_dataset_palette_and_labels(net, files, capsys):
    tmp, folder, _ = files
    dataset = tmp / "dataset"
    dataset.mkdir()
    colors = np.array([[0, 0, 0], [250, 10, 10], [10, 250, 10], [10, 10, 250], [200, 200, 0]], np.uint8)
    palettes.write_colormap(dataset / "palette.txt", colors)
    (dataset / "labels.txt").write_text("\n".join(LABELS) + "\n")
    assert palettes.read_colormap(dataset / "palette.txt")[0].tolist() == colors.tolist()
    assert main(["segment", str(tmp / "fcn.prototxt"), "none", str(folder / "a.png"), "-o", str(tmp / "o"),
                 "--seed", "7", "--palette", str(dataset), "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["classes"] and set(row["classes"]) <= set(LABELS)  # class names from labels.txt
    with Image.open(tmp / "o" / "a.png") as png:
        np.testing.assert_array_equal(np.array(png.getpalette()[:15]).reshape(5, 3), colors)
    (tmp / "three.txt").write_text("0 0 0\n1 2 3\n4 5 6\n")
    with pytest.raises(ShapeError, match="3 colors but the net scores 5 classes"):
        caffeish.segment(net, str(folder / "a.png"), palette=str(tmp / "three.txt"))


def test_palettes():
    p = palettes.pascal_palette()
    assert p[0].tolist() == [0, 0, 0] and p[1].tolist() == [128, 0, 0] and p[2].tolist() == [0, 128, 0]
    assert p[15].tolist() == [192, 128, 128]  # VOC 'person'
    assert p[255].tolist() == [224, 224, 192]  # VOC 'void'
    assert len({tuple(c) for c in p}) == 256


def test_pascal_names_and_padding(tmp_path):
    import pathlib

    for spec in (None, "pascal", "VOC", pathlib.Path("Pascal")):
        assert palettes.is_pascal(spec)
        np.testing.assert_array_equal(palettes.load_palette(spec)[0], palettes.pascal_palette())
    for spec in ("pascal.txt", str(tmp_path), np.zeros((3, 3), np.uint8)):
        assert not palettes.is_pascal(spec)
    own = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
    padded = palettes.pad_with_pascal(own, 4)
    assert padded.tolist() == [[1, 2, 3], [4, 5, 6]] + palettes.pascal_palette(4)[2:].tolist()
    assert palettes.pad_with_pascal(own, 1).tolist() == [[1, 2, 3]]
    np.testing.assert_array_equal(palettes.pad_with_pascal(None, 3), palettes.pascal_palette(3))
    palettes.write_colormap(tmp_path / "p.txt", padded)
    assert (tmp_path / "p.txt").read_text() == "1 2 3\n4 5 6\n0 128 0\n128 128 0\n"


def test_colormap_errors(tmp_path):
    (tmp_path / "bad.txt").write_text("0 0 0\n1 2\n")
    with pytest.raises(CaffeishError, match=r"bad.txt:2: expected 'R G B \[name\]'"):
        palettes.read_colormap(tmp_path / "bad.txt")
    with pytest.raises(CaffeishError, match="no palette.txt"):
        palettes.load_palette(str(tmp_path))
    (tmp_path / "dup.txt").write_text("0 0 0 background\n128 0 0 cat\n128,0,0 dog\n")
    with pytest.raises(CaffeishError, match=r"--color-map .*dup.txt: classes \[1, 2\] share the color \(128, 0, 0\)"):
        palettes.read_colormap(tmp_path / "dup.txt", "--color-map")


def test_colormap_names_and_dataset_labels(tmp_path):
    (tmp_path / "map.txt").write_text("\ufeff# DIGITS colour map\n0 0 0 background\n128,0,0 cat  # comment\n")
    colors, names = palettes.read_colormap(tmp_path / "map.txt")
    assert colors.tolist() == [[0, 0, 0], [128, 0, 0]] and names == ["background", "cat"]
    (tmp_path / "palette.txt").write_text("0 0 0\n0 128 0\n")
    assert palettes.load_palette(str(tmp_path))[1] is None
    (tmp_path / "labels.txt").write_text("\ufeffsky\n\ntree\n\n")  # a blank name keeps its index
    assert palettes.load_palette(str(tmp_path))[1] == ["sky", "", "tree"]
    # Colors that are only shown may repeat (Cityscapes-style maps reuse black).
    (tmp_path / "show.txt").write_text("0 0 0\n128 64 128\n0 0 0\n")
    assert palettes.load_palette(str(tmp_path / "show.txt"))[0].tolist() == [[0, 0, 0], [128, 64, 128], [0, 0, 0]]


def _big_picture(hw=(61, 83)):
    return _picture(np.random.default_rng(11), hw)


def test_tiled_equals_untiled(net):
    arr = _big_picture()
    seg = inference.Segmenter(net, Preprocess(mean=MEAN))
    shown, x = seg.prepare(arr)
    whole = seg.scores(x)
    np.testing.assert_array_equal(whole, _reference(net, arr))
    g = seg.geometry()
    assert g.stride == (4, 4) and g.margin == (8, 8) and g.offset == (0, 0)
    seg.max_work = None  # tiles far smaller than sensible, to test every seam
    for tile in ((20, 20), (24, 36), (40, 28), (61, 30)):
        seg.tile = tile
        spans = [inference.tile_spans(n, t, m, s) for n, t, m, s in zip(x.shape[1:], tile, g.margin, g.stride)]
        assert len(spans[0]) * len(spans[1]) > 1
        tiled = seg.scores(x)
        np.testing.assert_array_equal(tiled.argmax(axis=0), whole.argmax(axis=0))
        np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    # The margin is needed: one stride less of context changes pixels near the seams.
    seg.tile = (24, 36)
    seg._geometry = g._replace(margin=(4, 4))
    assert np.abs(seg.scores(x) - whole).max() > 1e-3 * np.abs(whole).max()


def test_automatic_tiling_under_a_memory_budget(net, tmp_path):
    arr = _big_picture()
    seg = inference.Segmenter(net, Preprocess(mean=MEAN), max_memory=60_000)
    _, x = seg.prepare(arr)
    tile = seg.tile_size(x.shape[1:])
    assert tile is not None and tile[0] < x.shape[1]
    res = caffeish.segment(net, arr, preprocess=Preprocess(mean=MEAN), max_memory=60_000)
    np.testing.assert_array_equal(res.classes, _reference(net, arr).argmax(axis=0))
    with pytest.raises(ShapeError, match=r"too small.*at least 76x76 \(at most 2x the work\)"):
        caffeish.segment(net, arr, tile=(12, 12))


def test_tile_geometry_of_digits_fcn_alexnet():
    proto = shared_path("models", "digits", "examples", "semantic-segmentation", "fcn_alexnet.deploy.prototxt")
    g = inference.tile_geometry(str(proto), "data", "score")
    # Four stride-2/4 layers: 4 * 2 * 2 * 2 = 32; the Crop's offset 18 aligns the score with the input.
    assert g.stride == (32, 32) and g.offset == (0, 0)
    assert g.margin[0] % 32 == 0 and g.margin[0] >= g.reach[0] >= 387 // 2


def test_no_score_blob_lists_the_blobs(files):
    tmp, folder, _ = files
    text = FCN.split('layer { name: "upscore"')[0]  # scores at 1/4 of the input
    net = caffeish.Net(parse_text(text, pb.NetParameter()), seed=0)
    with pytest.raises(GraphError, match=r"no Softmax or score output of the input's size 37x53.*score_fr"):
        caffeish.segment(net, str(folder / "a.png"))


def test_bad_images_are_counted_and_outdir_is_never_half_written(files, capsys, monkeypatch):
    tmp, folder, _ = files
    (folder / "c.jpg").write_bytes(b"\xff\xd8\xff broken")
    (folder / "notes.md").write_text("not an image")
    out = tmp / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"old result")
    (out / "keep.txt").write_text("unrelated")
    args = ["segment", str(tmp / "fcn.prototxt"), "none", str(folder), "-o", str(out), "--overlay", "0"]
    # An interrupt in the middle of the run leaves OUTDIR as it was, and no temporary folder behind.
    calls = []

    def interrupted(self, x):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, x)

    real = inference.Segmenter.scores
    monkeypatch.setattr(inference.Segmenter, "scores", interrupted)
    assert main(args) == 130
    assert sorted(os.listdir(out)) == ["a.png", "keep.txt"] and (out / "a.png").read_bytes() == b"old result"
    assert sorted(os.listdir(tmp)) == sorted(["fcn.prototxt", "images", "labels.txt", "out"])
    monkeypatch.setattr(inference.Segmenter, "scores", real)
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "notes.md: not an image file" in err and "c.jpg: cannot read as an image" in err
    assert "1 of 3 images could not be segmented" in err
    assert sorted(os.listdir(out)) == [".caffeish-segment", "a.png", "b.png", "keep.txt"]
    with Image.open(out / "a.png") as png:
        assert png.mode == "P"
    # Writing next to the inputs would replace them: refused before anything runs.
    before = (folder / "a.png").read_bytes()
    assert main(["segment", str(tmp / "fcn.prototxt"), "none", str(folder / "a.png"), "-o", str(folder)]) == 1
    assert "would replace an input image" in capsys.readouterr().err
    assert (folder / "a.png").read_bytes() == before


def test_a_failed_write_in_the_writer_thread_stops_the_run_and_leaves_outdir_as_it_was(files, monkeypatch):
    from caffeish.apps import segment as segment_lib
    tmp, folder, _ = files
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("unrelated")
    real = segment_lib._save_png
    writes = []

    def disk_full(img, path):
        writes.append(path)
        if len(writes) == 2:
            raise CaffeishError("simulated: no space left on device")
        real(img, path)

    monkeypatch.setattr(segment_lib, "_save_png", disk_full)
    args = ["segment", str(tmp / "fcn.prototxt"), "none", str(folder), "-o", str(out)]
    assert main(args) == 1
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert sorted(os.listdir(tmp)) == sorted(["fcn.prototxt", "images", "labels.txt", "out"])


def test_cli_tiles_give_the_untiled_pictures(files):
    tmp, folder, _ = files
    Image.fromarray(_big_picture((150, 190))).save(tmp / "a.png")
    base = ["segment", str(tmp / "fcn.prototxt"), "none", str(tmp / "a.png"), "--seed", "7", "--npy"]
    assert main(base + ["-o", str(tmp / "whole")]) == 0
    assert main(base + ["-o", str(tmp / "tiled"), "--tile", "80x96"]) == 0
    assert main(base[:-1] + ["-o", str(tmp / "tiled_classes"), "--tile", "80x96"]) == 0  # classes only
    with Image.open(tmp / "whole" / "a.png") as whole:
        want = np.asarray(whole)
    for out in ("tiled", "tiled_classes"):
        with Image.open(tmp / out / "a.png") as png:
            np.testing.assert_array_equal(np.asarray(png), want)
    whole_scores = np.load(tmp / "whole" / "a.npy")
    np.testing.assert_allclose(np.load(tmp / "tiled" / "a.npy"), whole_scores,
                               atol=1e-5 * np.abs(whole_scores).max())


# 300 classes from one 1x1 Convolution: score_c = c * A * t - c^2 / 2 on the first channel's value t
# peaks at the class c nearest A * t, so the classes of a gray picture are known by hand.
CLASSES_300 = """
name: "c300"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 1 dim: 5 } } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 300 kernel_size: 1 } }
"""
A = 299.0 / 255.0


def test_more_than_256_classes_give_a_16_bit_index_png_an_overlay_and_scores(tmp_path, capsys):
    net = caffeish.Net(parse_text(CLASSES_300, pb.NetParameter()))
    c = np.arange(300, dtype=np.float32)
    net.params["score"][0].data[...] = 0
    net.params["score"][0].data[:, 0, 0, 0] = c * np.float32(A)
    net.params["score"][1].data[...] = -c * c / 2
    net.save(str(tmp_path / "c300.caffemodel"))
    (tmp_path / "c300.prototxt").write_text(CLASSES_300)
    t = np.array([0, 10, 100, 250, 255], np.uint8)
    want = np.array([[0, 12, 117, 293, 299]])  # round(A * t): 0, 11.73, 117.25, 293.14, 299
    Image.fromarray(np.repeat(t.reshape(1, 5, 1), 3, axis=2)).save(tmp_path / "gray.png")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "c300.prototxt"), str(tmp_path / "c300.caffemodel"),
                 str(tmp_path / "gray.png"), "-o", str(out), "--npy", "--overlay", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "the net scores 300 classes" in captured.err and "16-bit gray" in captured.err
    assert sorted(os.listdir(out)) == [".caffeish-segment", "gray.npy", "gray.png", "gray_overlay.png"]
    with Image.open(out / "gray.png") as png:
        assert png.mode.startswith("I") and png.size == (5, 1)
        np.testing.assert_array_equal(np.asarray(png), want)
    scores = np.load(out / "gray.npy")
    assert scores.shape == (300, 1, 5)
    np.testing.assert_array_equal(scores.argmax(axis=0), want)
    # The overlay's colors: the PASCAL scheme continued past 256 (its first 256 colors are VOC's).
    colors = palettes.pascal_palette(300)
    np.testing.assert_array_equal(colors[:256], palettes.pascal_palette())
    assert len({tuple(x) for x in colors}) == 300
    with Image.open(out / "gray_overlay.png") as over:
        blended = np.asarray(over.convert("RGB")).astype(int)
    expected = np.rint(t.reshape(1, 5, 1) * 0.5 + colors[want] * 0.5)
    assert np.abs(blended - expected).max() <= 1
    # The Python API gives the same picture.
    seg = caffeish.segment(net, str(tmp_path / "gray.png"))
    assert seg.label_image().mode == "I;16" and seg.colors.shape == (300, 3)
    np.testing.assert_array_equal(np.asarray(seg.label_image()), want)


@pytest.mark.parametrize("option, value, message, code", [
    ("--seed", "-1", "argument --seed: must be at least 0, got -1", 2),  # was numpy's ValueError traceback
    ("--overlay", "nan", "argument --overlay: expected a finite number, got 'nan'", 2),
    ("--max-memory", "-5", "memory size: expected a positive size such as 8G, 512M or 1048576, got '-5'", 1),  # math error
    ("--max-memory", "0", "expected a positive size", 1),
    ("--max-memory", "nan", "expected a positive size", 1),
    ("--max-memory", "inf", "expected a positive size", 1),
])
def test_cli_refuses_out_of_range_numbers(files, option, value, message, code, capsys):
    tmp, folder, _ = files
    argv = ["segment", str(tmp / "fcn.prototxt"), "none", str(folder / "a.png"), "-o", str(tmp / "out"),
            f"{option}={value}"]
    if code == 2:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    else:
        assert main(argv) == 1
    assert message in capsys.readouterr().err and not (tmp / "out").exists()


def test_channel_swap_of_the_wrong_length_is_refused(net, files):
    _, folder, _ = files
    with pytest.raises(ShapeError, match="channel swap 1,0 lists 2 channels but the net input has 3"):
        caffeish.segment(net, str(folder / "a.png"), preprocess=Preprocess(channel_swap=(1, 0)))


def test_output_names_never_collide():
    from caffeish.apps.segment import output_names
    images = [(f"in/{n}", n) for n in ("a.jpg", "a.png", "a_overlay.png", "a_png.png", "sub/b.png")]
    images += [("other/a.png", "a.png"), ("other/A.png", "A.png")]  # the same name in a second folder argument
    plan = output_names(images, npy=True, overlay=True)
    assert [names[0] for names in plan] == ["a.png", "a_png.png", "a_overlay_png.png", "a_png_png.png",
                                            "sub/b.png", "a_png_2.png", "A_png_3.png"]
    assert plan[2] == ["a_overlay_png.png", "a_overlay_png_overlay.png", "a_overlay_png.npy"]
    every = [n.casefold() for names in plan for n in names]
    assert len(every) == len(set(every)) == 3 * len(images)
    assert output_names(images, npy=True, overlay=True) == plan  # deterministic
    # Without overlays a.png and a_overlay.png do not meet.
    assert [n[0] for n in output_names(images[1:3], npy=False, overlay=False)] == ["a.png", "a_overlay.png"]


def test_an_image_named_like_an_overlay_keeps_both_pictures(files, capsys):
    tmp, _, _ = files
    coll = tmp / "coll"
    coll.mkdir()
    rng = np.random.default_rng(5)
    Image.fromarray(_picture(rng, (20, 24))).save(coll / "a.png")
    Image.fromarray(_picture(rng, (28, 16))).save(coll / "a_overlay.png")
    out = tmp / "collout"
    assert main(["segment", str(tmp / "fcn.prototxt"), "none", str(coll), "-o", str(out), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [[os.path.basename(o) for o in r["outputs"]] for r in rows] == [
        ["a.png", "a_overlay.png"], ["a_overlay_png.png", "a_overlay_png_overlay.png"]]
    sizes = {}
    for name in ("a.png", "a_overlay.png", "a_overlay_png.png", "a_overlay_png_overlay.png"):
        with Image.open(out / name) as im:
            sizes[name] = im.size
    assert sizes["a.png"] == sizes["a_overlay.png"] == (24, 20)  # a.png's classes and overlay
    assert sizes["a_overlay_png.png"] == sizes["a_overlay_png_overlay.png"] == (16, 28)


def test_an_output_folder_inside_the_input_folder_is_not_searched(files, capsys):
    tmp, _, arrays = files
    imgs = tmp / "imgs2"
    imgs.mkdir()
    Image.fromarray(arrays["a.png"]).save(imgs / "im0.png")
    base = ["segment", str(tmp / "fcn.prototxt"), "none", str(imgs), "--format", "json"]
    for run in range(2):  # the second run used to take out/im0.png for an input it would replace
        assert main(base + ["-o", str(imgs / "out")]) == 0
        captured = capsys.readouterr()
        assert [r["image"] for r in json.loads(captured.out)["rows"]] == [str(imgs / "im0.png")]
        assert (f"skipped {imgs / 'out'}: it is the output folder" in captured.err) == (run == 1)
    assert sorted(os.listdir(imgs / "out")) == [".caffeish-segment", "im0.png", "im0_overlay.png"]
    # Another OUTDIR: the pictures of the earlier run are not segmented as photos either.
    assert main(base + ["-o", str(imgs / "out2")]) == 0
    captured = capsys.readouterr()
    assert [r["image"] for r in json.loads(captured.out)["rows"]] == [str(imgs / "im0.png")]
    assert "it holds the pictures of an earlier caffeish segment" in captured.err
    with Image.open(imgs / "out" / "im0.png") as first, Image.open(imgs / "out2" / "im0.png") as second:
        np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    # A folder given by name is searched even when it holds the marker.
    assert main(base[:3] + [str(imgs / "out"), "-o", str(tmp / "again"), "--overlay", "0", "--format", "json"]) == 0
    assert [os.path.basename(r["image"]) for r in json.loads(capsys.readouterr().out)["rows"]] == \
        ["im0.png", "im0_overlay.png"]
    # Pictures written into an input folder itself do not mark it as an output folder.
    photos = tmp / "photos"
    photos.mkdir()
    Image.fromarray(arrays["b.png"]).save(photos / "x.jpg")
    assert main(base[:3] + [str(photos), "-o", str(photos)]) == 0
    assert sorted(os.listdir(photos)) == ["x.jpg", "x.png", "x_overlay.png"]


# conv 3x3 then deconv 3x3: the scores have the input's size, but a 1x1 image makes the conv's output -1.
SMALL_FCN = """
name: "small_fcn"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "c" type: "Convolution" bottom: "data" top: "c"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "score" type: "Deconvolution" bottom: "c" top: "score"
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 } } }
"""


def test_an_image_the_net_refuses_is_named_and_the_others_are_written(tmp_path, capsys, monkeypatch):
    (tmp_path / "small.prototxt").write_text(SMALL_FCN)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    rng = np.random.default_rng(8)
    arrays = {"a.png": _picture(rng, (48, 48)), "b.png": _picture(rng, (1, 1)), "c.png": _picture(rng, (20, 30))}
    for name, arr in arrays.items():
        Image.fromarray(arr).save(mixed / name)
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "small.prototxt"), "none", str(mixed), "-o", str(out), "--seed", "4",
            "--npy", "--format", "json"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert [os.path.basename(r["image"]) for r in json.loads(captured.out)["rows"]] == ["a.png", "c.png"]
    assert f"caffeish segment: error: {mixed / 'b.png'}: layer 'c' (Convolution): output size" in captured.err
    assert "1 of 3 images could not be segmented" in captured.err
    assert sorted(os.listdir(out)) == [".caffeish-segment", "a.npy", "a.png", "a_overlay.png", "c.npy", "c.png",
                                       "c_overlay.png"]
    net = caffeish.Net(parse_text(SMALL_FCN, pb.NetParameter()), seed=4)
    for name in ("a", "c"):
        x = arrays[name + ".png"][:, :, ::-1].transpose(2, 0, 1).astype(np.float32)[np.newaxis]
        net.reshape(data=x.shape)
        want = net.forward(data=x)["score"][0]
        np.testing.assert_array_equal(np.load(out / f"{name}.npy"), want)
        with Image.open(out / f"{name}.png") as png:
            np.testing.assert_array_equal(np.asarray(png), want.argmax(axis=0))
    # A bug (not a CaffeishError) still stops the run, and OUTDIR stays as it was.
    def broken(self, image, pixels=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr(inference.Segmenter, "prepare", broken)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(RuntimeError, match="a bug"):
        main(args)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["mixed", "out", "small.prototxt"]


def test_an_unusable_outdir_is_refused_before_any_image_runs(files, capsys, monkeypatch):
    tmp, folder, _ = files
    (tmp / "file").write_text("a file")
    calls = []
    monkeypatch.setattr(inference.Segmenter, "load", lambda self, image: calls.append(image))
    base = ["segment", str(tmp / "fcn.prototxt"), "none", str(folder), "-o"]
    for outdir, message in ((tmp / "file", f"output folder {tmp / 'file'} exists and is not a folder"),
                            (tmp / "file" / "sub" / "out", f"{tmp / 'file'} is not a folder")):
        assert main(base + [str(outdir)]) == 1
        assert message in capsys.readouterr().err
    assert calls == [] and (tmp / "file").read_text() == "a file"
    # Folders created above OUTDIR for the staging go again when the run stops.
    monkeypatch.setattr(inference.Segmenter, "load", lambda self, image: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(base + [str(tmp / "new" / "deeper" / "out")]) == 130
    assert not (tmp / "new").exists()


# -- issue 15 ---------------------------------------------------------------------------------------------

ARGMAX = 'layer { name: "argmax" type: "ArgMax" bottom: "score" top: "label" argmax_param { axis: 1 } }\n'
ONE_CHANNEL = ('layer { name: "one" type: "Convolution" bottom: "score" top: "one" convolution_param { '
               'num_output: 1 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }\n')


def test_an_argmax_output_gives_the_classes_of_the_scores_it_reads(net, files, capsys):
    """A deploy net ending in ArgMax (a label map, one channel): its classes are those of the scores it
    reads, never class 0 everywhere; any other one-channel blob is refused, once."""
    tmp, folder, arrays = files
    (tmp / "argmax.prototxt").write_text(FCN + ARGMAX)
    out = tmp / "out"
    assert main(["segment", str(tmp / "argmax.prototxt"), "none", str(folder), "-o", str(out), "--seed", "7",
                 "--mean-value", "104,117,123"]) == 0
    err = capsys.readouterr().err
    assert err.count("'label' is a label map (ArgMax 'argmax' over the channels)") == 1
    assert "5-channel blob 'score'" in err
    for name in ("a", "b"):
        with Image.open(out / f"{name}.png") as png:
            np.testing.assert_array_equal(np.asarray(png), _reference(net, arrays[name + ".png"]).argmax(axis=0))
    (tmp / "one.prototxt").write_text(FCN + ONE_CHANNEL)
    assert main(["segment", str(tmp / "one.prototxt"), "none", str(folder), "-o", str(tmp / "one")]) == 1
    err = capsys.readouterr().err
    assert err.count("blob 'one' has one channel") == 1 and len(err.strip().splitlines()) == 1, err
    assert "its argmax is class 0 at every pixel" in err and not (tmp / "one").exists()


def test_layers_left_at_a_constant_weight_filler_are_warned_about_once(files, capsys):
    import re

    tmp, folder, _ = files
    (tmp / "bare.prototxt").write_text(re.sub(r'weight_filler \{ type: "gaussian" std: [0-9.]+ \}', "", FCN))
    assert main(["segment", str(tmp / "bare.prototxt"), "none", str(folder), "-o", str(tmp / "out")]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1, err
    assert ("caffeish segment: warning: WEIGHTS is 'none' and the layers 'conv1', 'conv2', 'score_fr' are left at "
            "a constant weight filler (0)") in warnings[0]
    assert "upscore" not in warnings[0]  # its bilinear filler is not constant
    # Fillers in the prototxt: nothing to say.
    assert main(["segment", str(tmp / "fcn.prototxt"), "none", str(folder), "-o", str(tmp / "out2")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_failure_every_image_hits_is_said_once_and_stops_the_run(tmp_path, capsys):
    """A net that is not fully convolutional (an InnerProduct) refuses every size but its own: the first
    image's error is said, the second image fails the same way (as a blank image does), and the run
    stops there, with nothing written; a bad file is still named per image."""
    fixed = FCN.replace('layer { name: "upscore"', 'layer { name: "fc" type: "InnerProduct" bottom: "score_fr" '
                        'top: "fc" inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }\n'
                        'layer { name: "upscore"')
    (tmp_path / "fixed.prototxt").write_text(fixed)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    (folder / "0_bad.png").write_bytes(b"not a png")
    for i, hw in enumerate([(40, 50), (45, 44), (30, 61), (50, 50)]):
        Image.fromarray(_picture(rng, hw)).save(folder / f"img{i}.png")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "fixed.prototxt"), "none", str(folder), "-o", str(out),
                 "--blob", "score"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3, err
    assert "0_bad.png: cannot read as an image" in err[0]
    assert f"{folder / 'img0.png'}: layer 'fc' (InnerProduct)" in err[1]
    assert (f"caffeish segment: error: {folder / 'img1.png'} fails as {folder / 'img0.png'} did (above), and so "
            f"does a blank image of their sizes: the net cannot run these images; stopped after 3 of 5 images, "
            f"nothing written") == err[2]
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["fixed.prototxt", "images"]


def _modes(root):
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outdir_and_its_files_follow_the_umask(files, mask):
    tmp, folder, _ = files
    old = os.umask(mask)
    try:
        assert main(["segment", str(tmp / "fcn.prototxt"), "none", str(folder), "-o", str(tmp / "new" / "dir"),
                     "--npy"]) == 0
    finally:
        os.umask(old)
    modes = _modes(tmp / "new")
    assert modes.pop(".") == modes.pop("dir") == 0o777 & ~mask
    assert set(modes.values()) == {0o666 & ~mask}, modes  # the pictures, the scores, the marker


SLOW_SEGMENT = """
import sys, time
from caffeish.apps import inference
real = inference.Segmenter.scores
def slow(self, x):
    time.sleep(0.2)
    return real(self, x)
inference.Segmenter.scores = slow
from caffeish.tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_leaves_no_staging_folder_and_outdir_as_it_was(files):
    import signal
    import subprocess
    import sys
    import time

    tmp, folder, arrays = files
    for i in range(30):
        Image.fromarray(arrays["a.png"]).save(folder / f"more{i}.png")
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SEGMENT, "segment", str(tmp / "fcn.prototxt"), "none",
                             str(folder), "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    staged = []
    while not staged and time.time() < deadline and proc.poll() is None:
        staged = [p for p in tmp.iterdir() if p.name.startswith(".out.") and p.name.endswith(".tmp")]
        if staged and not list(staged[0].iterdir()):  # wait for the first picture in the staging folder
            staged = []
        time.sleep(0.05)
    assert staged and proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert b"Traceback" not in err
    assert sorted(p.name for p in tmp.iterdir()) == ["fcn.prototxt", "images", "labels.txt", "out"]
    assert sorted(os.listdir(out)) == ["keep.txt"]


BIG = (150, 190)  # H x W of the picture the tiling tests cut


def test_tiles_too_small_for_the_net_are_refused_with_the_smallest_sensible_one(files, capsys):
    """The tiny FCN needs 8 pixels of context on each side of a tile: tiles of 20x24 would cost several
    times the untiled work; the smallest sensible tile keeps it within 2x and gives the untiled pictures."""
    import re

    tmp, folder, _ = files
    Image.fromarray(_big_picture(BIG)).save(tmp / "big.png")
    base = ["segment", str(tmp / "fcn.prototxt"), "none", str(tmp / "big.png"), "--seed", "7"]
    assert main(base + ["-o", str(tmp / "small"), "--tile", "20x24"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not (tmp / "small").exists(), err
    match = re.search(r"tiles of 20x24 \(WxH\) are too small for this net: each needs 8x8 pixels of context on "
                      r"each side \(its receptive field\), so they would cost ([0-9.]+)x the work per pixel of an "
                      r"untiled run; use tiles of at least (\d+)x(\d+) \(at most 2x the work\), or no tiles", err)
    assert match and float(match[1]) > 2, err
    least = (int(match[3]), int(match[2]))  # (h, w)
    seg = inference.Segmenter(_net(), tile=least)
    seg.score_blob(BIG)
    g, model = seg.geometry(), seg.work_model()
    assert seg.smallest_tile() == least and least[0] < BIG[0] and least[1] < BIG[1]
    assert model.inner_work(least, g.margin) <= 2 < model.inner_work((least[0] - 4, least[1] - 4), g.margin)
    spans = [inference.tile_spans(n, t, m, s) for n, t, m, s in zip(BIG, least, g.margin, g.stride)]
    assert len(spans[0]) * len(spans[1]) > 1 and model.plan_work(BIG, spans) <= 2
    for n, t, m, s in zip(BIG, least, g.margin, g.stride):  # every tile within the size, origins on the grid
        rows = inference.tile_spans(n, t, m, s)
        assert all(r1 - r0 <= t and r0 % s == 0 for r0, r1, _, _ in rows)
        assert rows[0][2] == 0 and rows[-1][3] == n and all(a[3] == b[2] for a, b in zip(rows, rows[1:]))
    assert main(base + ["-o", str(tmp / "whole")]) == 0
    tile = f"--tile={least[1]}x{least[0]}"
    assert main(base + ["-o", str(tmp / "tiled"), tile]) == 0
    with Image.open(tmp / "whole" / "big.png") as whole, Image.open(tmp / "tiled" / "big.png") as tiled:
        np.testing.assert_array_equal(np.asarray(tiled), np.asarray(whole))


def test_each_tile_shows_on_the_progress_bar(files, capsys, monkeypatch):
    tmp, _, _ = files
    Image.fromarray(_big_picture(BIG)).save(tmp / "big.png")
    monkeypatch.setenv("CAFFEISH_PROGRESS", "1")
    assert main(["segment", str(tmp / "fcn.prototxt"), "none", str(tmp / "big.png"), "-o", str(tmp / "out"),
                 "--tile", "88x88"]) == 0
    err = capsys.readouterr().err
    assert f"tiles of {BIG[1]}x{BIG[0]}:" in err and "0/6 [" in err, err  # 2 rows of 3


def test_digits_fcn_alexnet_tiles_stay_within_twice_the_untiled_work():
    """FCN-Alexnet needs 224 pixels of context per side (and pads its input by 100): tiles of 480x480 on a
    1200x900 image would run ~1100 forwards; they are refused, and the smallest sensible tile costs at
    most twice the untiled work on any image."""
    proto = shared_path("models", "digits", "examples", "semantic-segmentation", "fcn_alexnet.deploy.prototxt")
    seg = inference.Segmenter(caffeish.Net(str(proto), None, caffeish.TEST), tile=(480, 480))
    seg.score_blob((480, 480))
    with pytest.raises(inference.NetShapeError, match=r"tiles of 480x480 .* too small .* at least (\d+)x\1"):
        seg.check_tile((900, 1200))
    model, g = seg.work_model(), seg.geometry()
    least = seg.smallest_tile()
    for h, w in ((900, 1200), (3000, 4000), (least[0] + 1, 2 * least[1] + 50)):
        spans = [inference.tile_spans(n, t, m, s) for n, t, m, s in zip((h, w), least, g.margin, g.stride)]
        assert model.plan_work((h, w), spans) <= 2.05, (h, w)
    seg.net.reshape(data=(1, 3, 900, 1200))  # the model is the net's own count of multiply-accumulates
    macs = sum(int(n.layer.macs(n.bottom_shapes, n.top_shapes)) for n in seg.net.nodes if n.bottoms)
    assert model(900, 1200) == pytest.approx(macs, rel=0.02)  # up to the pooling's rounding
