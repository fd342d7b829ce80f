"""pycaffe's caffe.io face: Transformer, load/resize images, oversample, BlobProto and Datum.

Expectations are hand computations of what pycaffe (with the scikit-image
resize of Caffe's era) returns for tiny inputs.
"""
import io as _io
import re

import numpy as np
import pytest
from PIL import Image

from caffeish.pycaffe import io as cio
from caffeish.errors import CaffeishError, ShapeError
from caffeish.formats.schema import pb

# ---------------------------------------------------------------------------- Transformer


def _image(h=2, w=2, k=3):
    return (np.arange(h * w * k, dtype=np.float32).reshape(h, w, k) + 1) / 20.0


def test_preprocess_applies_every_step_in_pycaffe_order():
    t = cio.Transformer({"data": (1, 3, 2, 2)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", np.array([10.0, 20.0, 30.0]))
    t.set_input_scale("data", 0.5)
    img = _image()
    out = t.preprocess("data", img)
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    for c in range(3):
        for y in range(2):
            for x in range(2):
                want = (float(img[y, x, 2 - c]) * 255.0 - [10.0, 20.0, 30.0][c]) * 0.5
                assert out[c, y, x] == pytest.approx(want, rel=1e-6)


def test_raw_scale_comes_before_the_mean_and_input_scale_after_it():
    t = cio.Transformer({"data": (1, 1, 1, 1)})
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([100.0]))
    t.set_input_scale("data", 2.0)
    out = t.preprocess("data", np.full((1, 1, 1), 0.5))
    # (0.5 * 255 - 100) * 2; other orders give 0.5*255 - 200 = -72.5 or (0.5 - 100) * 255 * 2.
    assert out.item() == pytest.approx(55.0)


def test_preprocess_without_settings_only_converts_to_float32():
    t = cio.Transformer({"data": (1, 3, 2, 2)})
    img = (np.arange(12).reshape(2, 2, 3)).astype(np.uint8)
    out = t.preprocess("data", img)
    assert out.dtype == np.float32 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, img.astype(np.float32))


def test_preprocess_resizes_to_the_blob_size_before_transposing():
    t = cio.Transformer({"data": (10, 3, 2, 2)})
    t.set_transpose("data", (2, 0, 1))
    img = _image(4, 4, 3)
    out = t.preprocess("data", img)
    assert out.shape == (3, 2, 2)
    np.testing.assert_array_equal(out, cio.resize_image(img, (2, 2)).transpose(2, 0, 1))
    # Downsampling by 2 averages 2 x 2 blocks (bilinear, pixel centres at 0.5 and 2.5).
    assert out[0, 0, 0] == pytest.approx(img[0:2, 0:2, 0].mean(), rel=1e-6)


def test_preprocess_does_not_modify_its_input():
    t = cio.Transformer({"data": (1, 3, 2, 2)})
    t.set_transpose("data", (2, 0, 1))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", np.array([1.0, 2.0, 3.0]))
    img = _image()
    before = img.copy()
    t.preprocess("data", img)
    np.testing.assert_array_equal(img, before)


def test_deprocess_undoes_preprocess_with_per_channel_mean():
    t = cio.Transformer({"data": (1, 3, 2, 2)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", np.array([104.0, 117.0, 123.0]))
    t.set_input_scale("data", 0.017)
    img = _image()
    batch = t.preprocess("data", img)[np.newaxis]  # 1 x 3 x 2 x 2, squeezed by deprocess
    back = t.deprocess("data", batch)
    assert back.shape == (2, 2, 3)
    np.testing.assert_allclose(back, img, rtol=0, atol=1e-5)


def test_deprocess_undoes_preprocess_with_per_pixel_mean():
    t = cio.Transformer({"data": (1, 3, 2, 3)})
    t.set_transpose("data", (2, 0, 1))
    t.set_raw_scale("data", 2.0)
    mean = np.arange(18, dtype=np.float64).reshape(3, 2, 3)
    t.set_mean("data", mean)
    img = _image(2, 3, 3)
    pre = t.preprocess("data", img)
    np.testing.assert_allclose(pre, img.transpose(2, 0, 1) * 2.0 - mean, rtol=1e-6)
    np.testing.assert_allclose(t.deprocess("data", pre), img, atol=1e-5)


def test_two_dimensional_mean_for_a_single_channel_input():
    t = cio.Transformer({"data": (1, 1, 2, 2)})
    t.set_transpose("data", (2, 0, 1))
    t.set_mean("data", np.array([[1.0, 2.0], [3.0, 4.0]]))
    out = t.preprocess("data", np.full((2, 2, 1), 10.0))
    np.testing.assert_array_equal(out, [[[9.0, 8.0], [7.0, 6.0]]])


@pytest.mark.parametrize("call, error, words", [
    (lambda t: t.preprocess("image", np.zeros((2, 2, 3))), CaffeishError, "not one of the net inputs"),
    (lambda t: t.set_raw_scale("image", 255), CaffeishError, "not one of the net inputs"),
    (lambda t: t.set_transpose("data", (1, 0)), ShapeError, "must have 3 axes"),
    (lambda t: t.set_channel_swap("data", (1, 0)), ShapeError, "must list 3 channels"),
    (lambda t: t.set_mean("data", np.zeros(4)), ShapeError, "mean has 4 channels"),
    (lambda t: t.set_mean("data", np.zeros((3, 5, 5))), ShapeError, "does not match input"),
    (lambda t: t.set_mean("data", np.zeros((4, 4))), ShapeError, "does not match input"),
    (lambda t: t.set_mean("data", np.zeros((1, 3, 4, 4))), ShapeError, "neither (K,) nor (K, H, W)"),
])
def test_transformer_errors(call, error, words):
    t = cio.Transformer({"data": (1, 3, 4, 4)})
    with pytest.raises(error, match=re.escape(words)):
        call(t)


def test_mean_without_transpose_is_named():
    t = cio.Transformer({"data": (1, 3, 2, 2)})
    t.set_mean("data", np.zeros(3))
    with pytest.raises(ShapeError, match="is set_transpose missing"):
        t.preprocess("data", np.zeros((2, 2, 3)))


def test_errors_are_caffeish_errors():
    assert issubclass(ShapeError, CaffeishError)


# ---------------------------------------------------------------------------- resize_image


def test_resize_same_size_is_identity():
    img = _image(3, 4, 3)
    np.testing.assert_allclose(cio.resize_image(img, (3, 4)), img, rtol=1e-6)


def test_resize_constant_image_is_filled_with_its_value():
    out = cio.resize_image(np.full((2, 3, 3), 7.0), (5, 4))
    assert out.shape == (5, 4, 3) and out.dtype == np.float32
    assert (out == 7.0).all()


def test_bilinear_upsampling_pulls_borders_to_the_minimum():
    # Row [0, 4] to 4 samples: sources -0.25, 0.25, 0.75, 1.25; outside pixels count as the minimum.
    out = cio.resize_image(np.array([[[0.0], [4.0]]]), (1, 4))
    np.testing.assert_allclose(out[0, :, 0], [0.0, 1.0, 3.0, 3.0], atol=1e-6)


def test_bilinear_downsampling_averages_pairs():
    out = cio.resize_image(np.array([[[0.0], [2.0], [4.0], [6.0]]]), (1, 2))
    np.testing.assert_allclose(out[0, :, 0], [1.0, 5.0], atol=1e-6)


def test_bilinear_is_separable_in_two_dimensions():
    img = np.array([[0.0, 4.0], [8.0, 12.0]])[:, :, None]
    out = cio.resize_image(img, (4, 4))[:, :, 0]
    # Per axis, weights (outside, p0, p1) for the 4 samples: (.25,.75,0) (0,.75,.25) (0,.25,.75) (0,0,.75)+.25 outside.
    w = np.array([[0.75, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 0.75]])
    np.testing.assert_allclose(out, w @ img[:, :, 0] @ w.T, atol=1e-5)


def test_three_channels_share_one_min_max_scale():
    img = np.array([[[10.0, 0.0, 5.0], [10.0, 20.0, 5.0]]])
    out = cio.resize_image(img, (1, 4))
    # Channel 0 is constant 10 but the border pulls towards the image minimum 0: 0.75 * 10.
    np.testing.assert_allclose(out[0, :, 0], [7.5, 10.0, 10.0, 7.5], atol=1e-5)
    np.testing.assert_allclose(out[0, :, 1], [0.0, 5.0, 15.0, 15.0], atol=1e-5)


def test_nearest_neighbour():
    row = np.array([[[0.0], [2.0], [4.0], [6.0]]])
    np.testing.assert_array_equal(cio.resize_image(row, (1, 2), interp_order=0)[0, :, 0], [2.0, 6.0])
    np.testing.assert_array_equal(
        cio.resize_image(np.array([[[1.0], [3.0]]]), (1, 4), interp_order=0)[0, :, 0], [1, 1, 3, 3])


def test_other_channel_counts_use_corner_aligned_zoom():
    img = np.stack([np.array([[0.0, 2.0, 4.0]]), np.array([[-1.0, -1.0, 5.0]])], axis=-1)
    out = cio.resize_image(img, (1, 5))
    assert out.shape == (1, 5, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0], [0.0, 1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(out[0, :, 1], [-1.0, -1.0, -1.0, 2.0, 5.0])


def test_resize_errors():
    with pytest.raises(ShapeError, match="H x W x K"):
        cio.resize_image(np.zeros((4, 4)), (2, 2))
    with pytest.raises(CaffeishError, match="interp_order 3"):
        cio.resize_image(np.zeros((4, 4, 3)), (2, 2), interp_order=3)


# ---------------------------------------------------------------------------- load_image


def _save(tmp_path, name, array, **kw):
    path = tmp_path / name
    Image.fromarray(array).save(path, **kw)
    return str(path)


RGB = np.array([[[255, 0, 10], [0, 128, 20]], [[1, 2, 3], [200, 100, 50]]], dtype=np.uint8)


def test_load_rgb_png(tmp_path):
    img = cio.load_image(_save(tmp_path, "rgb.png", RGB))
    assert img.dtype == np.float32 and img.shape == (2, 2, 3)
    np.testing.assert_array_equal(img, (RGB / 255.0).astype(np.float32))


def test_load_rgb_as_gray_uses_scikit_image_weights(tmp_path):
    img = cio.load_image(_save(tmp_path, "rgb.png", RGB), color=False)
    assert img.shape == (2, 2, 1)
    want = (RGB[..., 0] * 0.2125 + RGB[..., 1] * 0.7154 + RGB[..., 2] * 0.0721) / 255.0
    np.testing.assert_allclose(img[..., 0], want, rtol=1e-6)


def test_load_gray_png_as_color_and_as_gray(tmp_path):
    gray = np.array([[0, 51], [102, 255]], dtype=np.uint8)
    path = _save(tmp_path, "gray.png", gray)
    color = cio.load_image(path)
    assert color.shape == (2, 2, 3)
    for c in range(3):
        np.testing.assert_array_equal(color[..., c], (gray / 255.0).astype(np.float32))
    one = cio.load_image(path, color=False)
    assert one.shape == (2, 2, 1)
    np.testing.assert_array_equal(one[..., 0], (gray / 255.0).astype(np.float32))


def test_load_rgba_drops_alpha(tmp_path):
    rgba = np.concatenate([RGB, np.full((2, 2, 1), 7, np.uint8)], axis=-1)
    img = cio.load_image(_save(tmp_path, "rgba.png", rgba))
    np.testing.assert_array_equal(img, (RGB / 255.0).astype(np.float32))


def test_load_16_bit_png(tmp_path):
    deep = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    img = cio.load_image(_save(tmp_path, "deep.png", deep), color=False)
    np.testing.assert_allclose(img[..., 0], deep / 65535.0, rtol=1e-6)


def test_load_jpeg(tmp_path):
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[...] = (200, 100, 50)
    img = cio.load_image(_save(tmp_path, "flat.jpg", rgb, quality=100))
    assert img.shape == (16, 16, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img, np.broadcast_to(rgb / 255.0, img.shape), atol=3 / 255)
    gray = cio.load_image(_save(tmp_path, "gray.jpg", np.full((8, 8), 90, np.uint8), quality=100))
    assert gray.shape == (8, 8, 3)
    np.testing.assert_allclose(gray, 90 / 255.0, atol=2 / 255)


def test_load_palette_images(tmp_path):
    gray_pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    gray_pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    gray_pal.save(tmp_path / "gp.png")
    np.testing.assert_array_equal(cio.load_image(str(tmp_path / "gp.png"), color=False)[..., 0], [[0, 1], [1, 0]])
    color_pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    color_pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    color_pal.save(tmp_path / "cp.png")
    np.testing.assert_array_equal(cio.load_image(str(tmp_path / "cp.png")), [[[1, 0, 0], [0, 0, 1]]])


def test_load_missing_and_bad_files(tmp_path):
    with pytest.raises(CaffeishError, match="no such image file"):
        cio.load_image(str(tmp_path / "nope.png"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(CaffeishError, match="cannot read as an image"):
        cio.load_image(str(bad))


# ---------------------------------------------------------------------------- oversample


def test_oversample_crops_corners_centre_and_mirrors():
    im = np.arange(4 * 5, dtype=np.float32).reshape(4, 5, 1)
    crops = cio.oversample([im], (2, 3))
    assert crops.shape == (10, 2, 3, 1) and crops.dtype == np.float32
    want = [im[0:2, 0:3], im[0:2, 2:5], im[2:4, 0:3], im[2:4, 2:5], im[1:3, 1:4]]
    for i, w in enumerate(want):
        np.testing.assert_array_equal(crops[i], w)
        np.testing.assert_array_equal(crops[5 + i], w[:, ::-1])


def test_oversample_odd_margins_and_several_images():
    # pycaffe's centre crop: int(H / 2 - crop / 2); for H = 5, crop = 2 that is int(1.5) = 1.
    ims = [np.arange(5 * 5 * 2, dtype=np.float32).reshape(5, 5, 2) + k * 100 for k in range(2)]
    crops = cio.oversample(ims, (2, 2))
    assert crops.shape == (20, 2, 2, 2)
    start = int(5 / 2.0 - 2 / 2.0)
    for k in range(2):
        np.testing.assert_array_equal(crops[10 * k + 4], ims[k][start:start + 2, start:start + 2])
        np.testing.assert_array_equal(crops[10 * k + 7], ims[k][3:5, 0:2][:, ::-1])


def test_oversample_crop_too_big():
    with pytest.raises(ShapeError, match="does not fit"):
        cio.oversample([np.zeros((4, 4, 3))], (5, 2))


# ---------------------------------------------------------------------------- BlobProto


def test_blobproto_round_trip_with_shape_and_diff():
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    blob = cio.array_to_blobproto(arr, diff=-arr)
    assert list(blob.shape.dim) == [2, 3, 4]
    assert not blob.HasField("num")
    data = cio.blobproto_to_array(blob)
    assert data.dtype == np.float64 and data.shape == (2, 3, 4)
    np.testing.assert_array_equal(data, arr)
    np.testing.assert_array_equal(cio.blobproto_to_array(blob, return_diff=True), -arr)


def test_blobproto_legacy_four_dims_win_over_shape():
    blob = pb.BlobProto(num=1, channels=2, height=1, width=3, data=[1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(cio.blobproto_to_array(blob), [[[[1, 2, 3]], [[4, 5, 6]]]])


def test_blobproto_double_data_and_count_mismatch():
    blob = pb.BlobProto(double_data=[0.1, 0.2])
    blob.shape.dim.extend([2])
    np.testing.assert_array_equal(cio.blobproto_to_array(blob), [0.1, 0.2])
    bad = pb.BlobProto(data=[1, 2, 3])
    bad.shape.dim.extend([2, 2])
    with pytest.raises(ShapeError, match="3 data values but its shape"):
        cio.blobproto_to_array(bad)


def test_blobproto_rounds_to_float32():
    blob = cio.array_to_blobproto(np.array([0.1]))
    assert cio.blobproto_to_array(blob)[0] == float(np.float32(0.1))


def test_blobprotovector_round_trip():
    arrays = [np.ones((2, 2)), np.arange(3.0), np.zeros((1, 1, 2, 1))]
    raw = cio.arraylist_to_blobprotovector_str(arrays)
    assert isinstance(raw, bytes)
    assert len(pb.BlobProtoVector.FromString(raw).blobs) == 3
    back = cio.blobprotovector_str_to_arraylist(raw)
    for a, b in zip(arrays, back):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- Datum


def test_uint8_datum_round_trip():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    d = cio.array_to_datum(arr, label=7)
    assert (d.channels, d.height, d.width, d.label) == (2, 3, 4, 7)
    assert d.data == arr.tobytes() and len(d.float_data) == 0
    back = cio.datum_to_array(d)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, arr)


def test_float_datum_round_trip():
    arr = np.linspace(-1, 1, 12).reshape(3, 2, 2)
    d = cio.array_to_datum(arr)
    assert not d.HasField("label") and not d.data and len(d.float_data) == 12
    back = cio.datum_to_array(d)
    assert back.dtype == np.float64
    np.testing.assert_array_equal(back, arr.astype(np.float32))


def test_datum_errors():
    with pytest.raises(ShapeError, match="3-D C x H x W"):
        cio.array_to_datum(np.zeros((2, 2)))
    with pytest.raises(ShapeError, match="5 data bytes"):
        cio.datum_to_array(pb.Datum(channels=1, height=2, width=2, data=b"12345"))


def test_encoded_datum_is_decoded_as_bgr():
    buf = _io.BytesIO()
    Image.fromarray(RGB).save(buf, format="PNG")
    d = pb.Datum(data=buf.getvalue(), encoded=True, label=3)
    arr = cio.datum_to_array(d)
    assert arr.shape == (3, 2, 2) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, RGB[:, :, ::-1].transpose(2, 0, 1))


def test_caffe_pb2_alias():
    assert cio.caffe_pb2.BlobProto is pb.BlobProto
