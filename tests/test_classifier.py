"""caffe.Classifier and caffe.Detector as pycaffe's, checked against numpy.

Small nets (an InnerProduct and a Softmax) whose outputs numpy computes directly; the
crops, mirrors, preprocessing order (transpose, channel swap, raw scale, mean, input
scale), batching and averaging are each written out here the way pycaffe's
classifier.py and detector.py define them.
"""
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import caffeish
from caffeish.errors import CaffeishError, ShapeError, UnsupportedError
from caffeish.formats import io as cio
from caffeish.pycaffe.classifier import Classifier
from caffeish.pycaffe.detector import Detector
from caffeish.pycaffe.transformer import resize_image

NET = """\
name: "tiny"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {n} dim: 3 dim: {h} dim: {w} }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 5 weight_filler {{ type: "gaussian" std: 0.01 }}
                        bias_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "prob" type: "Softmax" bottom: "ip" top: "prob" }}
"""

MEAN = np.array([104.0, 117.0, 123.0])  # BGR, the net's channel order


@pytest.fixture
def tiny(tmp_path):
    """(prototxt, caffemodel, {layer: arrays}) of a 4 x 3 x 6 x 6 -> 5 classes net."""
    return _tiny(tmp_path, 4, 6, 6)


def _tiny(tmp_path, n, h, w):
    proto = tmp_path / f"tiny{n}x{h}x{w}.prototxt"
    proto.write_text(NET.format(n=n, h=h, w=w))
    weights = tmp_path / f"tiny{n}x{h}x{w}.caffemodel"
    caffeish.Net(str(proto), seed=4).save(str(weights))
    return str(proto), str(weights), cio.read_caffemodel(str(weights)).arrays()


def _net_numpy(x, model):
    """Softmax(W x + b) for a batch of K x H x W inputs."""
    logits = x.reshape(len(x), -1).astype(np.float64) @ model["ip"][0].T + model["ip"][1]
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _preprocess(crop):
    """pycaffe's order: H x W x K -> K x H x W, RGB -> BGR, x255, minus the mean, x0.5."""
    x = crop.transpose(2, 0, 1)[[2, 1, 0]] * 255.0
    return (x - MEAN[:, None, None]) * 0.5


def _images(rng, count, h, w):
    return [rng.uniform(0, 1, (h, w, 3)).astype(np.float32) for _ in range(count)]


def test_classifier_oversample_averages_ten_crops(tiny):
    proto, weights, model = tiny
    net = Classifier(proto, weights, image_dims=(8, 9), mean=MEAN, input_scale=0.5, raw_scale=255,
                     channel_swap=(2, 1, 0))
    assert net.image_dims == (8, 9) and list(net.crop_dims) == [6, 6]
    assert net.inputs == ["data"] and isinstance(net, caffeish.Net)
    images = _images(np.random.default_rng(0), 3, 10, 12)
    probs = net.predict(images)  # 30 crops through a batch of 4: 8 forwards, the last one padded
    expected = []
    for im in images:
        im = resize_image(im, (8, 9))
        crops = []
        for y, x in [(0, 0), (0, 3), (2, 0), (2, 3), (1, 1)]:  # corners, then the centre
            crops.append(im[y:y + 6, x:x + 6])
        crops += [c[:, ::-1] for c in crops]  # their mirrors
        expected.append(_net_numpy(np.stack([_preprocess(c) for c in crops]), model).mean(0))
    assert probs.shape == (3, 5)
    np.testing.assert_allclose(probs, np.array(expected), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)


def test_classifier_center_crop(tiny):
    proto, weights, model = tiny
    net = Classifier(proto, weights, image_dims=(9, 8), mean=MEAN, input_scale=0.5, raw_scale=255,
                     channel_swap=(2, 1, 0))
    images = _images(np.random.default_rng(1), 5, 9, 8)
    probs = net.predict(images, oversample=False)
    # Centre (4.5, 4) minus / plus half the crop (3, 3): rows int(1.5)..int(7.5), columns 1..7.
    expected = _net_numpy(np.stack([_preprocess(resize_image(im, (9, 8))[1:7, 1:7]) for im in images]), model)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)


def test_classifier_defaults_to_the_input_size(tiny):
    proto, weights, model = tiny
    net = Classifier(proto, weights)
    assert list(net.image_dims) == [6, 6]
    image = np.random.default_rng(2).uniform(0, 1, (6, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(net.predict([image], oversample=False),
                               _net_numpy(resize_image(image, (6, 6)).transpose(2, 0, 1)[None], model),
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(CaffeishError):
        net.predict([])


def test_a_non_image_input_is_refused_by_name(tmp_path):
    proto = tmp_path / "flat.prototxt"
    proto.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 } } }\n')
    for cls in (Classifier, Detector):
        with pytest.raises(ShapeError) as e:
            cls(str(proto), None)
        assert str(e.value) == f"{cls.__name__} needs an N x K x H x W input; 'data' has shape (2, 3, 4)"


def test_caffeish_names_them():
    assert caffeish.Classifier is Classifier and caffeish.Detector is Detector


# ------------------------------------------------------------------ Detector


def _image_file(path, rng, h, w):
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)  # PNG: exact, so load_image gives pixels / 255
    return pixels.astype(np.float32) / 255


def test_detector_windows(tiny, tmp_path):
    proto, weights, model = tiny
    det = Detector(proto, weights, mean=MEAN, input_scale=0.5, raw_scale=255, channel_swap=(2, 1, 0))
    rng = np.random.default_rng(3)
    a = _image_file(tmp_path / "a.png", rng, 12, 14)
    b = _image_file(tmp_path / "b.png", rng, 9, 9)
    windows = [(str(tmp_path / "a.png"), [(0, 0, 5, 6), (2, 3, 12, 14), (4, 4, 10, 7)]),
               (str(tmp_path / "b.png"), [np.array([1, 1, 8, 8])])]
    dets = det.detect_windows(windows)
    crops = [a[0:5, 0:6], a[2:12, 3:14], a[4:10, 4:7], b[1:8, 1:8]]
    expected = _net_numpy(np.stack([_preprocess(resize_image(c, (6, 6))) for c in crops]), model)
    assert [d["filename"] for d in dets] == [str(tmp_path / "a.png")] * 3 + [str(tmp_path / "b.png")]
    assert [tuple(d["window"]) for d in dets] == [(0, 0, 5, 6), (2, 3, 12, 14), (4, 4, 10, 7), (1, 1, 8, 8)]
    np.testing.assert_allclose(np.stack([d["prediction"] for d in dets]), expected, rtol=1e-4, atol=1e-6)
    assert det.detect_windows([]) == []


def test_detector_context_crop(tmp_path):
    proto, weights, _ = _tiny(tmp_path, 2, 8, 8)
    det = Detector(proto, weights, mean=np.array([10.0, 20.0, 30.0]), raw_scale=255, channel_swap=(2, 1, 0),
                   context_pad=2)
    assert list(det.crop_dims) == [8, 8, 3]
    # The mean back in image space: RGB order, divided by the raw scale.
    np.testing.assert_allclose(det.crop_mean.reshape(3), np.array([30.0, 20.0, 10.0]) / 255, rtol=1e-6)
    im = np.random.default_rng(4).uniform(0, 1, (12, 12, 3)).astype(np.float32)
    # A window inside the image: scale 8 / (8 - 2 * 2) = 2 about its centre gives rows and
    # columns 2..10, warped 9 -> 8 pixels: the crop is im[2:10, 2:10].
    np.testing.assert_allclose(det.crop(im, (4, 4, 7, 7)), im[2:10, 2:10], rtol=1e-5, atol=1e-6)
    # At the corner: the box starts at -2, i.e. round(2 * 8/9) = 2 pixels of mean, then
    # round(7 * 8/9) = 6 pixels of im[0:6].
    crop = det.crop(im, (0, 0, 3, 3))
    expected = np.ones((8, 8, 3), np.float32) * (np.array([30.0, 20.0, 10.0]) / 255)
    expected[2:8, 2:8] = im[0:6, 0:6]
    np.testing.assert_allclose(crop, expected, rtol=1e-5, atol=1e-6)
    # Without context, the window itself.
    det.configure_crop(None)
    np.testing.assert_array_equal(det.crop(im, (1, 2, 5, 9)), im[1:5, 2:9])


def test_detector_without_selective_search(tiny, tmp_path, monkeypatch):
    proto, weights, _ = tiny
    monkeypatch.setitem(sys.modules, "selective_search_ijcv_with_python", None)  # import fails
    det = Detector(proto, weights)
    with pytest.raises(UnsupportedError, match="selective_search_ijcv_with_python"):
        det.detect_selective_search([str(tmp_path / "a.png")])


def test_detector_with_selective_search(tiny, tmp_path, monkeypatch):
    proto, weights, model = tiny
    pixels = _image_file(tmp_path / "a.png", np.random.default_rng(5), 10, 10)
    module = tmp_path / "ss" / "selective_search_ijcv_with_python.py"
    module.parent.mkdir()
    module.write_text(textwrap.dedent("""\
        import os
        CALLS = []
        def get_windows(image_fnames, cmd='selective_search'):
            CALLS.append((list(image_fnames), cmd))
            if os.environ.get('FAKE_NO_MATLAB'):
                raise FileNotFoundError(2, 'No such file or directory', 'matlab')
            return [[(0, 0, 6, 6), (2, 2, 10, 9)] for _ in image_fnames]
        """))
    monkeypatch.syspath_prepend(str(module.parent))
    monkeypatch.delitem(sys.modules, "selective_search_ijcv_with_python", raising=False)
    monkeypatch.chdir(tmp_path)
    det = Detector(proto, weights)
    dets = det.detect_selective_search(["a.png"])
    ss = sys.modules["selective_search_ijcv_with_python"]
    assert ss.CALLS == [([str(tmp_path / "a.png")], "selective_search_rcnn")]  # absolute, for MATLAB
    crops = [pixels[0:6, 0:6], pixels[2:10, 2:9]]
    expected = _net_numpy(np.stack([resize_image(c, (6, 6)).transpose(2, 0, 1) for c in crops]), model)
    np.testing.assert_allclose(np.stack([d["prediction"] for d in dets]), expected, rtol=1e-4, atol=1e-6)
    monkeypatch.setenv("FAKE_NO_MATLAB", "1")
    with pytest.raises(UnsupportedError, match="MATLAB"):
        det.detect_selective_search(["a.png"])
    with pytest.raises(CaffeishError, match="no such image"):
        det.detect_selective_search(["missing.png"])
