"""resize_linear / resize_nearest: OpenCV's cv::resize (INTER_LINEAR, INTER_NEAREST), as Caffe's ImageData
layer and convert_imageset use it.  Hand-computed cases run everywhere; the comparison with cv2 runs where
opencv-python is installed (it is never a dependency)."""
import os

import numpy as np
import pytest

from caffeish.runtime.data_transform import linear_taps, resize_linear, resize_nearest
from caffeish.errors import CaffeishError


def test_two_by_two_to_three_by_three_by_hand():
    # Per axis: source x = (d + 0.5) * 2/3 - 0.5 = -1/6, 1/2, 7/6.  Across a row the ends clamp to pixels 0
    # and 1 (weights 2048, 0); the middle is (1024, 1024).  So row 0 gives 0, 50 * 2048, 100 * 2048.
    out = resize_linear(np.array([[0, 100], [200, 40]], np.uint8), 3, 3)
    assert out.tolist() == [[0, 50, 100], [100, 85, 70], [200, 120, 40]]


def test_border_rows_round_in_fixed_point_as_opencv():
    # Row pass of [[0, 101]] to width 3: 0, 101 * 1024, 101 * 2048; >> 4: 0, 6464, 12928.
    # Rows are not clamped: output row 0 has y = -1/3, i.e. rows (0, 0) with weights
    # round(1/3 * 2048) = 683 and round(2/3 * 2048) = 1365, so the middle pixel is
    # ((683 * 6464) >> 16) + ((1365 * 6464) >> 16) + 2 >> 2 = (67 + 134 + 2) >> 2 = 50,
    # while the middle row (y = 0, weights 2048, 0) gives (202 + 2) >> 2 = 51.  Float rounding gives 51 for all.
    out = resize_linear(np.array([[0, 101]], np.uint8), 3, 3)
    assert out.tolist() == [[0, 50, 101], [0, 51, 101], [0, 50, 101]]
    rows, _, w0, w1 = linear_taps(1, 3, clamp_weights=False)
    assert rows.tolist() == [0, 0, 0]
    assert np.rint(w0 * 2048).astype(int).tolist() == [683, 2048, 1365]
    assert np.rint(w1 * 2048).astype(int).tolist() == [1365, 0, 683]


def test_halving_averages_two_by_two_blocks():
    block = np.array([[1, 2], [3, 4]], np.uint8)  # sum 10: 2.5
    assert resize_linear(block, 1, 1).tolist() == [[3]]  # (10 + 2) >> 2
    assert resize_linear(np.dstack([block] * 3), 1, 1).tolist() == [[[3, 3, 3]]]
    # 2-channel images take OpenCV's INTER_AREA path, which rounds half to even
    assert resize_linear(np.dstack([block] * 2), 1, 1).tolist() == [[[2, 2]]]


def test_upscaling_one_row_and_float_images():
    # 1 x 2 -> 1 x 4: source x = -0.25, 0.25, 0.75, 1.25, clamped at the edges
    assert resize_linear(np.array([[0, 100]], np.uint8), 1, 4).tolist() == [[0, 25, 75, 100]]
    out = resize_linear(np.array([[0, 100]], np.float32), 1, 4)
    assert out.dtype == np.float32 and out.tolist() == [[0, 25, 75, 100]]
    same = np.arange(12, dtype=np.uint8).reshape(3, 4)
    copy = resize_linear(same, 3, 4)
    np.testing.assert_array_equal(copy, same)
    assert copy is not same


def test_nearest_takes_the_floor_of_the_scaled_index():
    # OpenCV: source index min(floor(d * in / out), in - 1), not the pixel centre (Pillow would take 1 and 3)
    assert resize_nearest(np.array([[1, 2, 3]], np.uint8), 1, 2).tolist() == [[1, 2]]
    assert resize_nearest(np.array([[1, 2]], np.uint8), 1, 3).tolist() == [[1, 1, 2]]
    labels = np.arange(16 * 20, dtype=np.uint8).reshape(16, 20)
    np.testing.assert_array_equal(resize_nearest(labels, 8, 10), labels[0::2, 0::2])


def test_bad_sizes_are_errors():
    with pytest.raises(CaffeishError, match="cannot resize to 0x4"):
        resize_linear(np.zeros((2, 2), np.uint8), 4, 0)
    with pytest.raises(CaffeishError, match="cannot resize an image of shape"):
        resize_linear(np.zeros((0, 2), np.uint8), 4, 4)


def random_cases(rng, count):
    """(image, out height, out width): up and down, odd factors, exact halving, 1-pixel sides, 1-4 channels."""
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        kind = rng.integers(0, 5)
        if kind == 0:
            oh, ow = h * int(rng.integers(1, 4)), w * int(rng.integers(1, 4))
        elif kind == 1:
            oh, ow = max(1, h // int(rng.integers(1, 4))), max(1, w // int(rng.integers(1, 4)))
        elif kind == 2:
            oh, ow = max(1, h // 2), max(1, w // 2)
            h, w = 2 * oh, 2 * ow
        else:
            oh, ow = (int(v) for v in rng.integers(1, 60, 2))
        if rng.random() < 0.1:
            h = 1
        if rng.random() < 0.1:
            ow = 1
        channels = int(rng.integers(1, 5))
        shape = (h, w) if channels == 1 else (h, w, channels)
        yield rng.integers(0, 256, shape, dtype=np.uint8), oh, ow


def test_bit_exact_with_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for image, oh, ow in random_cases(rng, 300):
        for fn, mode in ((resize_linear, cv2.INTER_LINEAR), (resize_nearest, cv2.INTER_NEAREST)):
            want = cv2.resize(image, (ow, oh), interpolation=mode)
            got = fn(image, oh, ow)
            np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=f"{image.shape} -> {oh}x{ow}")
    photo = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)  # a VOC-sized image to FCN's 256 x 256
    np.testing.assert_array_equal(resize_linear(photo, 256, 256), cv2.resize(photo, (256, 256)))


def test_bit_exact_with_recorded_opencv_results():
    """tests/data/opencv_resize.npz: what cv2.resize (OpenCV 4.14) gave on small random cases (up, down,
    odd factors, exact halving, 1-pixel sides, 1-4 channels), so CI checks bit-exactness without cv2.
    Recorded as cv2.resize(image, (w, h), interpolation=INTER_LINEAR / INTER_NEAREST) over
    random_cases(np.random.default_rng(2026), 200), keeping cases of at most 1,500 elements."""
    recorded = np.load(os.path.join(os.path.dirname(__file__), "data", "opencv_resize.npz"))
    cases = sorted({k.split("/")[0] for k in recorded.files}, key=int)
    assert len(cases) >= 50
    for case in cases:
        image = recorded[f"{case}/image"]
        for fn, kind in ((resize_linear, "linear"), (resize_nearest, "nearest")):
            want = recorded[f"{case}/{kind}"]
            got = fn(image, want.shape[0], want.shape[1])
            np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=f"{kind} {image.shape} -> {want.shape}")

