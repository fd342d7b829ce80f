"""`caffeish classify` and caffeish.classify on real trained models, against the Net run on arrays
preprocessed independently here (PIL -> numpy, Caffe's (x - mean) * scale in BGR)."""
import csv
import io as stdio
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

import caffeish
from caffeish.formats import io
from caffeish.tools.cli import main
from caffeish.errors import CaffeishError, GraphError, ShapeError
from caffeish.data.preprocess import Preprocess
from conftest import shared_path

CIFAR_NET = ("models", "everpeace_caffe", "examples", "cifar10", "cifar10_quick.prototxt")
CIFAR_WEIGHTS = ("models", "cifar10_quick_ikki", "examples", "cifar10", "cifar10_quick_iter_5000.caffemodel")
CIFAR_IMAGES = ("models", "cifar10_quick_ikki", "examples", "images")
MNIST_SCALE = 0.00390625  # lenet_train_test.prototxt's transform_param: scale 1/256

# Digits drawn as pen strokes on a 28 x 28 canvas, white on black as in MNIST.
STROKES = {
    0: [("ellipse", (8, 4, 20, 24))],
    1: [("line", [(14, 4), (14, 24)])],
    2: [("line", [(8, 8), (11, 4), (17, 4), (20, 8), (20, 11), (8, 24), (21, 24)])],
    3: [("line", [(8, 5), (19, 5), (13, 13), (19, 16), (19, 21), (15, 24), (8, 23)])],
    4: [("line", [(17, 24), (17, 4), (7, 18), (21, 18)])],
    5: [("line", [(20, 4), (9, 4), (8, 13), (16, 12), (20, 16), (19, 22), (14, 24), (8, 23)])],
    6: [("line", [(18, 4), (11, 9), (8, 16), (9, 22), (14, 24), (19, 21), (19, 16), (14, 13), (9, 16)])],
    7: [("line", [(7, 4), (21, 4), (12, 24)])],
    8: [("ellipse", (9, 3, 19, 13)), ("ellipse", (8, 13, 20, 25))],
    9: [("ellipse", (8, 4, 19, 14)), ("line", [(19, 9), (18, 24)])],
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    for d, strokes in STROKES.items():
        im = Image.new("L", (28, 28), 0)
        draw = ImageDraw.Draw(im)
        for kind, geo in strokes:
            if kind == "ellipse":
                draw.ellipse(geo, outline=255, width=3)
            else:
                draw.line(geo, fill=255, width=3, joint="curve")
        im.save(folder / f"digit{d}.png")
    return folder


@pytest.fixture(scope="module", params=["lenet_caffe_tensorflow", "everpeace_caffe"])
def lenet(request):
    """The MNIST LeNet: ethereon's copy, and everpeace's V1 prototxt + V1 caffemodel."""
    folder = ("models", request.param, "examples", "mnist")
    return shared_path(*folder, "lenet.prototxt"), shared_path(*folder, "lenet_iter_10000.caffemodel")


def _reference(proto, weights, batch):
    net = caffeish.Net(str(proto), str(weights), caffeish.TEST)
    return net.forward(data=batch)["prob"].reshape(len(batch), -1)


def _digit_batch(folder):
    paths = [folder / f"digit{d}.png" for d in range(10)]
    x = np.stack([np.asarray(Image.open(p).convert("L"), np.float32)[None] for p in paths])
    return paths, x * np.float32(MNIST_SCALE)


def test_lenet_json_lines_match_the_net_on_independent_arrays(digits, lenet, capsys):
    proto, weights = lenet
    assert main(["classify", str(proto), str(weights), str(digits), "--scale", str(MNIST_SCALE),
                 "--format", "json", "--top-k", "3", "--batch-size", "10"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # no progress bar when not on a terminal
    lines = [json.loads(line) for line in captured.out.splitlines()]
    paths, x = _digit_batch(digits)
    prob = _reference(proto, weights, x)
    assert [line["image"] for line in lines] == [str(p) for p in paths]
    for line, p in zip(lines, prob):
        order = np.argsort(-p, kind="stable")[:3]
        assert [t["class"] for t in line["top"]] == order.tolist()
        assert [t["rank"] for t in line["top"]] == [1, 2, 3]
        assert [t["probability"] for t in line["top"]] == [float(v) for v in p[order]]
    # The trained LeNet reads the drawn digits.
    correct = sum(line["top"][0]["class"] == d for d, line in enumerate(lines))
    assert correct >= 9, [line["top"][0]["class"] for line in lines]


def test_lenet_python_api_batches_and_labels(digits, lenet, tmp_path):
    proto, weights = lenet
    paths, x = _digit_batch(digits)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"digit {d}\n" for d in range(10)))
    spec = Preprocess(scale=MNIST_SCALE)
    res = caffeish.classify(str(proto), [str(p) for p in paths], weights=str(weights), preprocess=spec,
                            batch_size=10, top_k=2, labels=str(labels))
    np.testing.assert_array_equal(res.probs, _reference(proto, weights, x))
    assert res.top.shape == (10, 2) and res.top_probs.shape == (10, 2)
    assert res.name(int(res.top[1, 0])) == f"digit {res.top[1, 0]}"
    # Batches of 3 give the same classes (and the same numbers up to BLAS blocking).
    res3 = caffeish.classify(str(proto), [str(p) for p in paths], weights=str(weights), preprocess=spec,
                             batch_size=3)
    np.testing.assert_array_equal(res3.top[:, 0], res.top[:, 0])
    np.testing.assert_allclose(res3.probs, res.probs, atol=1e-6)


def test_lenet_table_and_csv(digits, lenet, tmp_path, capsys):
    proto, weights = lenet
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"n{d:02d} digit {d}\n" for d in range(10)))
    image = digits / "digit7.png"
    assert main(["classify", str(proto), str(weights), str(image), "--scale", str(MNIST_SCALE),
                 "--labels", str(labels), "--top-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["image", "rank", "class", "label", "probability"]
    cls = int(out[2][len(str(image)):].split()[1])
    assert out[2].startswith(str(image)) and f"n{cls:02d} digit {cls}" in out[2]
    assert out[3].split()[:2] == ["2", out[3].split()[1]] and not out[3].startswith(str(image))
    assert main(["classify", str(proto), str(weights), str(image), "--scale", str(MNIST_SCALE),
                 "--format", "csv", "--top-k", "1"]) == 0
    rows = list(csv.DictReader(stdio.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and rows[0]["class"] == str(cls) and float(rows[0]["probability"]) > 0.5


def _cifar_mean(path):
    """No mean.binaryproto ships with the CIFAR-10 models in ../shared: a generated one, the
    CIFAR-10 per-channel means (B, G, R) spread over 3 x 32 x 32 with a gentle ramp."""
    mean = np.empty((3, 32, 32), np.float32)
    ramp = np.linspace(-4, 4, 32, dtype=np.float32)
    for c, m in enumerate((113.9, 123.0, 125.3)):
        mean[c] = m + ramp[:, None]
    io.write_binaryproto(path, mean[np.newaxis])
    return mean


def test_cifar10_quick_with_its_mean_file(tmp_path, capsys):
    proto, weights = shared_path(*CIFAR_NET), shared_path(*CIFAR_WEIGHTS)
    folder = shared_path(*CIFAR_IMAGES)
    mean = _cifar_mean(tmp_path / "mean.binaryproto")
    assert main(["classify", str(proto), str(weights), str(folder), "--mean", str(tmp_path / "mean.binaryproto"),
                 "--format", "json", "--top-k", "10"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = ["cat10.png", "dog10.png", "truck10.png"]
    assert [line["image"].rsplit("/", 1)[-1] for line in lines] == names
    x = np.stack([np.asarray(Image.open(folder / n).convert("RGB"), np.float32)[:, :, ::-1].transpose(2, 0, 1)
                  for n in names]) - mean
    prob = _reference(proto, weights, x)
    for line, p in zip(lines, prob):
        got = np.zeros(10, np.float32)
        for t in line["top"]:
            got[t["class"]] = t["probability"]
        np.testing.assert_allclose(got, p, rtol=1e-6, atol=1e-7)
    # CIFAR-10 classes: 3 cat, 5 dog, 9 truck.
    assert [line["top"][0]["class"] for line in lines] == [3, 5, 9]


def test_oversample_is_the_mean_over_ten_crops(tmp_path):
    proto, weights = shared_path(*CIFAR_NET), shared_path(*CIFAR_WEIGHTS)
    arr = np.asarray(Image.open(shared_path(*CIFAR_IMAGES, "dog10.png")).convert("RGB").resize((36, 36)))
    Image.fromarray(arr).save(tmp_path / "dog36.png")
    spec = Preprocess(mean=np.array([113.9, 123.0, 125.3], np.float32), crop="center")
    res = caffeish.classify(str(proto), str(tmp_path / "dog36.png"), weights=str(weights), preprocess=spec,
                            oversample=True)
    bgr = arr[:, :, ::-1].astype(np.float32)
    crops = [bgr[r:r + 32, c:c + 32] for r, c in ((0, 0), (0, 4), (4, 0), (4, 4), (2, 2))]
    crops += [c[:, ::-1] for c in crops]
    x = np.stack(crops).transpose(0, 3, 1, 2) - np.array([113.9, 123.0, 125.3], np.float32)[:, None, None]
    want = _reference(proto, weights, x).mean(axis=0)
    np.testing.assert_allclose(res.probs[0], want, rtol=1e-5, atol=1e-7)


def test_bad_files_are_named_and_counted(digits, lenet, tmp_path, capsys):
    proto, weights = lenet
    folder = tmp_path / "mixed"
    folder.mkdir()
    for d in (3, 4):
        (folder / f"digit{d}.png").write_bytes((digits / f"digit{d}.png").read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "readme.txt").write_text("not an image")
    assert main(["classify", str(proto), str(weights), str(folder), "--scale", str(MNIST_SCALE),
                 "--format", "json", "--top-k", "1"]) == 1
    captured = capsys.readouterr()
    assert [json.loads(line)["image"].rsplit("/", 1)[-1] for line in captured.out.splitlines()] == \
        ["digit3.png", "digit4.png"]
    assert "readme.txt: not an image file" in captured.err
    assert "broken.png: cannot read as an image" in captured.err
    assert "1 of 3 images could not be classified" in captured.err


def test_output_blob_choice_and_errors(lenet, digits, tmp_path, capsys):
    proto, weights = lenet
    net = caffeish.Net(str(proto), str(weights), caffeish.TEST)
    res = caffeish.classify(net, str(digits / "digit1.png"), blob="ip2",
                            preprocess=Preprocess(scale=MNIST_SCALE))
    assert res.probs.shape == (1, 10) and res.top[0, 0] == 1 and res.probs.max() > 1  # raw scores
    assert main(["classify", str(proto), str(weights), str(digits / "digit1.png"), "--blob", "ip2",
                 "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "image,rank,class,score"
    with pytest.raises(GraphError, match=r"no blob named 'fc8'.*ip2 \(64x10\)"):
        caffeish.classify(net, str(digits / "digit1.png"), blob="fc8")
    # A net without Softmax names its blobs.
    (tmp_path / "noprob.prototxt").write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 4 dim: 4 } } }\n'
        'layer { name: "ip2" type: "InnerProduct" bottom: "data" top: "ip2" inner_product_param { num_output: 3 } }\n')
    with pytest.raises(GraphError, match=r"no Softmax layer.*--blob.*ip2"):
        caffeish.classify(str(tmp_path / "noprob.prototxt"), str(digits / "digit1.png"))
    # A mean of the wrong channel count names both shapes.
    np.save(tmp_path / "m.npy", np.zeros((3, 28, 28), np.float32))
    assert main(["classify", str(proto), str(weights), str(digits), "--mean", str(tmp_path / "m.npy")]) == 1
    assert "of shape 3x28x28 has 3 channels but the net input is 1x28x28" in capsys.readouterr().err
    with pytest.raises(ShapeError):
        caffeish.classify(net, str(digits / "digit1.png"), preprocess=Preprocess(
            mean=np.zeros(3, np.float32)))


TINY_RGB = """
name: "tiny_rgb"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.fixture()
def tiny_rgb(tmp_path):
    (tmp_path / "net.prototxt").write_text(TINY_RGB)
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(tmp_path / "im.png")
    return str(tmp_path / "net.prototxt"), str(tmp_path / "im.png")


@pytest.mark.parametrize("option, value, message", [
    ("--seed", "-1", "must be at least 0, got -1"),  # was numpy's ValueError traceback
    ("--top-k", "0", "must be at least 1, got 0"),
    ("--batch-size", "-2", "must be at least 1, got -2"),
    ("--scale", "nan", "expected a finite number, got 'nan'"),  # NaN scores otherwise
    ("--raw-scale", "inf", "expected a finite number, got 'inf'"),
])
def test_cli_refuses_out_of_range_numbers_by_name(tiny_rgb, option, value, message, capsys):
    net, image = tiny_rgb
    with pytest.raises(SystemExit) as e:
        main(["classify", net, "none", image, option, value])
    assert e.value.code == 2 and f"argument {option}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("swap, message", [
    ("0,0,5", "channel swap 0,0,5 is not a permutation of 0..2"),  # was an IndexError traceback
    ("1,0", "channel swap 1,0 lists 2 channels but the net input has 3"),  # was silently ignored
])
def test_cli_channel_swap_is_checked(tiny_rgb, swap, message, capsys):
    net, image = tiny_rgb
    assert main(["classify", net, "none", image, "--channel-swap", swap]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_api_checks_channel_swap_top_k_and_batch_size(tiny_rgb):
    net, image = tiny_rgb
    with pytest.raises(ShapeError, match="lists 2 channels but the net input has 3"):
        caffeish.classify(net, image, preprocess=Preprocess(channel_swap=(1, 0)))
    for kwargs in ({"top_k": 0}, {"batch_size": 0}, {"batch_size": 1.5}):
        with pytest.raises(CaffeishError, match="must be a whole number of at least 1"):
            caffeish.classify(net, image, **kwargs)
    # A valid swap changes the input as asked: (0, 1, 2) keeps RGB, equal to channel_swap=None.
    kept = caffeish.classify(net, image, preprocess=Preprocess(channel_swap=(0, 1, 2)))
    rgb = caffeish.classify(net, image, preprocess=Preprocess(channel_swap=None))
    np.testing.assert_array_equal(kept.probs, rgb.probs)


# An Embed layer reads each gray pixel as an index below 200: an image with a brighter pixel is refused
# by the forward pass (InputValueError), whatever the batch it is in.
EMBED_NET = """
name: "embed"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 2 dim: 2 } } }
layer { name: "embed" type: "Embed" bottom: "data" top: "embed"
  embed_param { num_output: 3 input_dim: 200 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "embed" top: "fc"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_an_image_the_net_refuses_fails_alone_and_its_batch_gets_results(tmp_path, capsys, monkeypatch):
    from caffeish.apps import inference
    (tmp_path / "embed.prototxt").write_text(EMBED_NET)
    folder = tmp_path / "gray"
    folder.mkdir()
    pixels = {"a.png": [[3, 50], [199, 0]], "b.png": [[10, 250], [20, 30]], "c.png": [[7, 7], [120, 64]],
              "d.png": [[1, 2], [3, 4]]}
    for name, values in pixels.items():
        Image.fromarray(np.array(values, np.uint8)).save(folder / name)
    calls = []
    real = inference.Classifier.predict
    monkeypatch.setattr(inference.Classifier, "predict", lambda self, p: calls.append(len(p)) or real(self, p))
    args = ["classify", str(tmp_path / "embed.prototxt"), "none", str(folder), "--seed", "3", "--top-k", "4",
            "--format", "json", "--batch-size", "3"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert calls == [3, 1, 1, 1, 1]  # the failed batch again image by image; the last batch in one pass
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["image"].rsplit("/", 1)[-1] for line in lines] == ["a.png", "c.png", "d.png"]
    assert f"caffeish classify: error: {folder / 'b.png'}: layer 'embed' (Embed): bottom value 250.0" in captured.err
    assert "1 of 4 images could not be classified" in captured.err
    net = caffeish.Net(str(tmp_path / "embed.prototxt"), None, caffeish.TEST, seed=3)
    x = np.array([pixels[n] for n in ("a.png", "c.png", "d.png")], np.float32)[:, None]
    net.reshape(data=x.shape)
    prob = net.forward(data=x)["prob"]
    for line, want in zip(lines, prob):
        got = np.zeros(4)
        for entry in line["top"]:
            got[entry["class"]] = entry["probability"]
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # Without the bad image every batch is one forward pass.
    (folder / "b.png").unlink()
    calls.clear()
    assert main(args) == 0 and calls == [3]
    # A bug (not a CaffeishError) is not taken for a bad image.
    monkeypatch.setattr(inference.Classifier, "predict", lambda self, p: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(args)


# -- issue 15 ---------------------------------------------------------------------------------------------

def _gray_folder(tmp_path, names=("a.png", "b.png", "c.png")):
    folder = tmp_path / "gray"
    folder.mkdir()
    for i, name in enumerate(names):
        Image.fromarray(np.array([[i, 2 * i], [3, 4]], np.uint8)).save(folder / name)
    return folder


def test_layers_left_at_a_constant_weight_filler_are_warned_about_once(tmp_path, capsys):
    import re

    (tmp_path / "bare.prototxt").write_text(re.sub(r'(inner_product_param \{ num_output: 4) weight_filler \{[^}]*\}',
                                                   r"\1", EMBED_NET))
    folder = _gray_folder(tmp_path)
    assert main(["classify", str(tmp_path / "bare.prototxt"), "none", str(folder)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1, err
    assert ("caffeish classify: warning: WEIGHTS is 'none' and the layers 'fc' are left at a constant weight filler "
            "(0): their outputs do not depend on the image") in err
    (tmp_path / "embed.prototxt").write_text(EMBED_NET)
    assert main(["classify", str(tmp_path / "embed.prototxt"), "none", str(folder)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_failure_every_image_hits_is_said_once_and_stops_the_run(tmp_path, capsys, monkeypatch):
    """A net that fails on a blank image as on the image (every input has the net's shape, so every image
    would fail): said once, and the run stops; an unreadable file is still named on its own."""
    from caffeish.apps import inference
    (tmp_path / "embed.prototxt").write_text(EMBED_NET)
    folder = _gray_folder(tmp_path, ("a.png", "b.png", "c.png", "d.png"))
    (folder / "0_bad.png").write_bytes(b"not a png")
    calls = []

    def broken(self, prepared):
        calls.append(len(prepared))
        raise ShapeError("layer 'fc' (InnerProduct): the net is broken")

    monkeypatch.setattr(inference.Classifier, "predict", broken)
    assert main(["classify", str(tmp_path / "embed.prototxt"), "none", str(folder), "--batch-size", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "0_bad.png: cannot read as an image" in err[0]
    assert err[1:] == [f"caffeish classify: error: {folder / 'a.png'}: layer 'fc' (InnerProduct): the net is broken "
                       f"(a blank image fails the same way, so every image would: stopped after 2 of 5 images)"]
    assert calls == [1, 1]  # the batch (a.png alone after 0_bad.png), then the blank image: no more
