"""The preprocessing spec: Caffe's Data-layer arithmetic, pycaffe's Transformer, means, decoding, options."""
import argparse

import numpy as np
import pytest
from PIL import Image

from caffeish.formats import io
from caffeish.data import preprocess as pp
from caffeish.formats import images
from caffeish.errors import CaffeishError, ShapeError
from caffeish.formats.schema import pb
from caffeish.pycaffe.transformer import load_image
from caffeish.tools.options import add_preprocess_options, preprocess_from_args
from conftest import shared_path


def _rgb(tmp_path, h=40, w=50, seed=0, name="im.png"):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path = tmp_path / name
    Image.fromarray(arr).save(path)
    return path, arr


def test_transform_param_is_caffes_data_layer_at_test(tmp_path):
    """scale, mean_file and crop_size: (BGR pixel - mean) * scale on the centre crop, as DataTransformer."""
    path, arr = _rgb(tmp_path, 40, 50)
    mean = np.random.default_rng(1).uniform(0, 255, (3, 40, 50)).astype(np.float32)
    io.write_binaryproto(tmp_path / "mean.binaryproto", mean[np.newaxis])
    tp = pb.TransformationParameter(scale=0.017, mean_file="mean.binaryproto", crop_size=32, mirror=True)
    spec = pp.from_transform_param(tp, base_dir=str(tmp_path))
    x = spec.apply(spec.load(path, 3), (32, 32))
    # Independent: Caffe's TEST crop starts at (H - crop) / 2 in the datum and in the mean alike.
    bgr = arr[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)
    top, left = (40 - 32) // 2, (50 - 32) // 2
    want = (bgr[:, top:top + 32, left:left + 32] - mean[:, top:top + 32, left:left + 32]) * np.float32(0.017)
    assert x.dtype == np.float32 and x.shape == (3, 32, 32)
    np.testing.assert_array_equal(x, want)


def test_mean_values_one_for_all_channels_or_one_each(tmp_path):
    path, arr = _rgb(tmp_path, 8, 9)
    bgr = arr[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)
    one = pp.from_transform_param(pb.TransformationParameter(mean_value=[100]))
    np.testing.assert_array_equal(one.apply(one.load(path), (8, 9)), bgr - 100)
    three = pp.from_transform_param(pb.TransformationParameter(mean_value=[104, 117, 123]))
    want = bgr - np.array([104, 117, 123], np.float32)[:, None, None]
    np.testing.assert_array_equal(three.apply(three.load(path), (8, 9)), want)


def test_matches_pycaffe_transformer(tmp_path):
    """The spec and the pycaffe Transformer it configures agree (up to float rounding), resize included."""
    path, _ = _rgb(tmp_path, 30, 45)
    spec = pp.Preprocess(mean=np.array([104, 117, 123], np.float32), raw_scale=255.0, scale=0.5)
    for hw in ((30, 45), (24, 20)):
        shape = (1, 3) + hw
        ours = spec.apply(spec.load(path), hw)
        theirs = spec.transformer("data", shape).preprocess("data", load_image(str(path)))
        np.testing.assert_allclose(ours, theirs, atol=2e-3)
    # RGB kept and raw_scale 1: pycaffe's [0, 1] images.
    spec = pp.Preprocess(raw_scale=1.0, channel_swap=None)
    np.testing.assert_allclose(spec.apply(spec.load(path), (30, 45)),
                               load_image(str(path)).transpose(2, 0, 1), atol=1e-6)


def test_mean_image_is_cropped_or_resized_to_the_input():
    mean = np.arange(3 * 6 * 8, dtype=np.float32).reshape(3, 6, 8)
    spec = pp.Preprocess(mean=mean)
    np.testing.assert_array_equal(spec.mean_for((3, 4, 4)), mean[:, 1:5, 2:6])  # centre crop
    resized = spec.mean_for((3, 12, 16))
    assert resized.shape == (3, 12, 16)
    assert mean.min() <= resized.min() and resized.max() <= mean.max()


def test_mean_of_the_wrong_shape_names_both_shapes():
    spec = pp.Preprocess(mean=np.zeros((3, 32, 32), np.float32), mean_source="mean file m.binaryproto")
    with pytest.raises(ShapeError, match=r"m\.binaryproto of shape 3x32x32 has 3 channels.*1x28x28"):
        spec.mean_for((1, 28, 28))
    spec = pp.Preprocess(mean=np.array([1, 2], np.float32))
    with pytest.raises(ShapeError, match="2 values.*3 channels"):
        spec.mean_for((3, 5, 5))


def test_gray_uses_opencv_weights_and_color_repeats_gray(tmp_path):
    path, arr = _rgb(tmp_path, 5, 6)
    gray = pp.Preprocess().load(path, channels=1)
    want = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert gray.shape == (5, 6, 1)
    assert np.abs(gray[:, :, 0] - want).max() <= 1.0  # Pillow's integer rounding of the same weights
    forced = pp.Preprocess(grayscale=True).load(path, channels=3)
    assert forced.shape == (5, 6, 3) and (forced[:, :, 0] == forced[:, :, 2]).all()


def test_decode_formats_and_errors(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert images.decode(tmp_path / "a.png")[0, 0].tolist() == [200, 0, 0]  # alpha dropped
    deep = np.full((3, 3), 65535, np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert images.decode(tmp_path / "d.png", gray=True)[0, 0, 0] == pytest.approx(255.0)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(CaffeishError, match="bad.jpg: cannot read as an image"):
        images.decode(tmp_path / "bad.jpg")
    with pytest.raises(CaffeishError, match="nope.png: no such image file"):
        images.decode(tmp_path / "nope.png")
    assert images.decode(np.full((2, 2), 0.5)).tolist() == [[[127.5] * 3] * 2] * 2  # pycaffe's [0, 1] arrays


def _png16(path, rgb):
    """Write an H x W x 3 uint16 array as a 16-bit RGB PNG (Pillow cannot write one)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


DEEP = np.array([[0, 255, 256, 511], [32767, 32768, 65280, 65535]], np.uint16)
DEEP_8BIT = [[0, 0, 1, 1], [127, 128, 255, 255]]  # value >> 8: libpng's strip_16, what cv::imread keeps


def test_16_bit_images_keep_their_high_byte_as_opencv_imread(tmp_path):
    Image.fromarray(DEEP).save(tmp_path / "gray16.png")  # Pillow opens it as mode I;16, full values
    with Image.open(tmp_path / "gray16.png") as img:
        assert img.mode.startswith("I")
    color = images.decode(tmp_path / "gray16.png")
    assert color.shape == (2, 4, 3) and (color == np.array(DEEP_8BIT)[:, :, None]).all()
    assert images.decode(tmp_path / "gray16.png", gray=True)[:, :, 0].tolist() == DEEP_8BIT
    assert images.decode_8bit(tmp_path / "gray16.png").dtype == np.uint8
    _png16(tmp_path / "rgb16.png", np.stack([DEEP, DEEP[:, ::-1], 65535 - DEEP], axis=2))
    rgb = images.decode(tmp_path / "rgb16.png")
    assert rgb[:, :, 0].tolist() == DEEP_8BIT and rgb[:, :, 1].tolist() == np.array(DEEP_8BIT)[:, ::-1].tolist()
    assert rgb[:, :, 2].tolist() == ((65535 - DEEP) >> 8).tolist()
    np.testing.assert_array_equal(pp.Preprocess().load(tmp_path / "rgb16.png", 3), rgb)


def test_every_centre_crop_takes_one_window():
    """preprocess's image and mean crops and the Data layer's crop use geometry.center_crop_offsets."""
    from caffeish.runtime.data_transform import DataTransformer
    from caffeish.graph.geometry import center_crop_offsets
    from caffeish.formats.schema import TEST

    x = np.arange(7 * 10, dtype=np.float32).reshape(7, 10, 1)
    assert center_crop_offsets((7, 10), (4, 5)) == (1, 2)
    np.testing.assert_array_equal(pp.center_crop(x, (4, 5)), x[1:5, 2:7])
    np.testing.assert_array_equal(pp.Preprocess(mean=x.transpose(2, 0, 1)).mean_for((1, 4, 5)),
                                  x[1:5, 2:7].transpose(2, 0, 1))
    layer = DataTransformer(pb.TransformationParameter(crop_size=4), TEST, "test")
    assert layer.offsets(7, 10) == (1, 3)
    np.testing.assert_array_equal(layer.crop(x.transpose(2, 0, 1)), x[1:5, 3:7].transpose(2, 0, 1))


def test_train_val_transform_param_and_relative_mean_file(tmp_path):
    proto = shared_path("models", "cifar10_quick_ikki", "examples", "prediction_example",
                        "prediction_example.prototxt")
    tp = pp.transform_param_of(proto)
    assert tp.mean_file == "./examples/cifar10/mean.binaryproto"
    # The repository holds no mean.binaryproto: the message says where we looked and what to do.
    with pytest.raises(CaffeishError, match=r"mean_file './examples/cifar10/mean.binaryproto' not found.*--mean"):
        pp.from_transform_param(tp, base_dir=str(proto.parent))
    # Caffe resolves it from where caffe ran: a folder above the prototxt.
    (tmp_path / "examples" / "cifar10").mkdir(parents=True)
    (tmp_path / "examples" / "net").mkdir()
    io.write_binaryproto(tmp_path / "examples" / "cifar10" / "mean.binaryproto", np.ones((1, 3, 32, 32)))
    spec = pp.from_transform_param(tp, base_dir=str(tmp_path / "examples" / "net"))
    assert spec.mean.shape == (3, 32, 32) and spec.crop == "none"


def _args(*argv, keep_size=False):
    p = argparse.ArgumentParser()
    add_preprocess_options(p, keep_size=keep_size)
    return p.parse_args(list(argv))


def test_command_line_options(tmp_path):
    spec = preprocess_from_args(_args("--mean-value", "104,117,123", "--scale", "0.5", "--raw-scale", "1",
                              "--channel-swap", "none", "--crop", "center", "--resize", "40x48"))
    assert spec.mean.tolist() == [104, 117, 123] and spec.scale == 0.5 and spec.raw_scale == 1
    assert spec.channel_swap is None and spec.crop == "center" and spec.resize == (48, 40)  # WxH -> (H, W)
    np.save(tmp_path / "m.npy", np.zeros((3, 8, 8)))
    assert preprocess_from_args(_args("--mean", str(tmp_path / "m.npy")), keep_size=True).resize == "keep"
    with pytest.raises(CaffeishError, match="not both"):
        preprocess_from_args(_args("--mean", "x.npy", "--mean-value", "1"))
    # Options win over the transform_param of --transform-from.
    proto = tmp_path / "tv.prototxt"
    proto.write_text('layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TEST } '
                     'transform_param { scale: 0.25 mean_value: 7 crop_size: 4 } }\n'
                     'layer { name: "t" type: "Data" top: "data" top: "label" include { phase: TRAIN } '
                     'transform_param { scale: 9 } }\n')
    spec = preprocess_from_args(_args("--transform-from", str(proto)))
    assert spec.scale == 0.25 and spec.mean.tolist() == [7] and spec.crop == "center"
    assert preprocess_from_args(_args("--transform-from", str(proto), "--scale", "2")).scale == 2


def test_centre_crop_with_resize_to_the_mean_size(tmp_path):
    """--crop center resizes to the mean image's size first (the datum size), then crops with the mean."""
    path, arr = _rgb(tmp_path, 12, 12)
    spec = pp.Preprocess(mean=np.zeros((3, 12, 12), np.float32), crop="center")
    x = spec.apply(spec.load(path), (8, 8))
    np.testing.assert_array_equal(x, arr[2:10, 2:10, ::-1].transpose(2, 0, 1).astype(np.float32))
    assert spec.oversampled(spec.load(path), (8, 8)).shape == (10, 3, 8, 8)


@pytest.mark.parametrize("order", [(0, 0, 5), (0, 1, 3), (1, 1), (0, 0.5, 2), (-1, 0, 1)])
def test_channel_swap_must_be_a_permutation(order):
    with pytest.raises(CaffeishError, match="is not a permutation of 0..%d" % (len(order) - 1)):
        pp.Preprocess(channel_swap=order)


def test_channel_swap_length_must_match_the_input():
    x = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)  # H x W x 3
    with pytest.raises(ShapeError, match="channel swap 1,0 lists 2 channels but the net input has 3"):
        pp.Preprocess(channel_swap=(1, 0)).finish(x)
    with pytest.raises(ShapeError, match="lists 2 channels but the net input has 3"):
        pp.Preprocess(channel_swap=(1, 0)).transformer("data", (1, 3, 2, 3))
    # Orders that fit are applied: (1, 2, 0) puts G, B, R in channels 0, 1, 2.
    out = pp.Preprocess(channel_swap=(1, 2, 0)).finish(x)
    np.testing.assert_array_equal(out, x.transpose(2, 0, 1)[[1, 2, 0]])
    # The default RGB -> BGR swap leaves a gray (1-channel) input as it is; another length is refused.
    gray = x[:, :, :1]
    np.testing.assert_array_equal(pp.Preprocess().finish(gray), gray.transpose(2, 0, 1))
    with pytest.raises(ShapeError, match="lists 2 channels but the net input has 1"):
        pp.Preprocess(channel_swap=(1, 0)).finish(gray)


def test_non_finite_numbers_are_refused():
    for field in ("scale", "raw_scale"):
        with pytest.raises(CaffeishError, match=f"{field} must be a finite number"):
            pp.Preprocess(**{field: float("nan")})
    with pytest.raises(CaffeishError, match="--mean-value: the mean holds NaN"):
        preprocess_from_args(_args("--mean-value", "1,nan,3"))
    for option in ("--scale", "--raw-scale"):
        with pytest.raises(SystemExit):
            _args(option, "inf")
    with pytest.raises(CaffeishError, match="channel swap 0,0,5 is not a permutation"):
        preprocess_from_args(_args("--channel-swap", "0,0,5"))


def test_mean_file_alias_and_mean_none(tmp_path):
    """--mean-file is --mean (one spelling for every subcommand); --mean none drops a mean, even the one
    --transform-from reads."""
    np.save(tmp_path / "m.npy", np.full((3, 8, 8), 5.0))
    spec = preprocess_from_args(_args("--mean-file", str(tmp_path / "m.npy")))
    assert spec.mean.shape == (3, 8, 8) and spec.mean_source == f"mean file {tmp_path / 'm.npy'}"
    proto = tmp_path / "tv.prototxt"
    proto.write_text('layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TEST } '
                     'transform_param { scale: 0.25 mean_value: 7 } }\n')
    assert preprocess_from_args(_args("--transform-from", str(proto))).mean.tolist() == [7]
    spec = preprocess_from_args(_args("--transform-from", str(proto), "--mean", "none"))
    assert spec.mean is None and spec.scale == 0.25
    with pytest.raises(CaffeishError, match="not both"):
        preprocess_from_args(_args("--mean", "none", "--mean-value", "1"))
