"""Caffe's DataTransformer: what `transform_param` does to each record a data layer reads.

For every image (a Datum's C x H x W pixels, or a decoded file), Caffe's
`DataTransformer::Transform` computes, per channel c and output pixel (h, w):

    top[c, h, w'] = (pixel[c, h + h_off, w + w_off] - mean) * scale

where
  * crop_size (if set) cuts a crop_size x crop_size window: at TEST the
    centre one, h_off = (H - crop_size) // 2, w_off = (W - crop_size) // 2;
    at TRAIN a random one, h_off = r % (H - crop_size + 1), then
    w_off = r % (W - crop_size + 1);
  * with `mirror`, each item is flipped left-right when r % 2 == 1 (drawn
    first), at TRAIN and at TEST alike: w' = crop - 1 - w, else w' = w;
  * mean is mean_file's value at the same (uncropped) position, whose C x H x W
    must equal the image's (cropped alike, NOT mirrored: it is subtracted
    before the flip), or mean_value[c] (one value repeats for every channel);
    mean_file and mean_value exclude each other;
  * scale defaults to 1;
  * the arithmetic is float32, as Caffe's Dtype=float.
Each r is a raw 32-bit output of the transformer's own mt19937 (std::mt19937
seeded with a 32-bit value: `seed()`); there is no draw without mirror or a
TRAIN crop.  The data layers seed it from the Net's random stream (or, for a
DIGITS features/labels pair, from the pair and the Net's seed, so that image
and label get the same window and flip).  Without a seed given, the first draw
seeds it from `rng` (a numpy Generator), else from the global stream
(caffeish.set_random_seed), else from 0.
`force_color` / `force_gray` choose how encoded images are decoded (3-channel
BGR / 1-channel grey); raw Datums are used as stored.

`resize_linear` is OpenCV's cv::resize INTER_LINEAR (pixel centres aligned,
edges replicated, uint8 in OpenCV's fixed point, bit-exact), which Caffe's
ImageData layer (new_height/new_width) and convert_imageset use;
`resize_nearest` is cv::resize INTER_NEAREST, for label images.
"""
import os

import numpy as np

from caffeish.errors import CaffeishError, ShapeError
from caffeish.graph.geometry import center_crop_offsets
from caffeish.formats.schema import TEST, TRAIN


class DataTransformer:
    """transform_param applied to C x H x W arrays, with Caffe's semantics at TRAIN and TEST.

    `where` names the layer in error messages.  The mean file is read once, at
    construction (Caffe reads it in the transformer's constructor).  The random
    crops and flips come from the transformer's own mt19937 (see `seed`); one
    transformer serves one stream of items, in order (one thread at a time).
    """

    rng = None  # a numpy Generator the first draw seeds the mt19937 from, when `seed` was not called
    _mt = None  # the transformer's own mt19937 (Caffe's rng_), once seeded

    def __init__(self, param, phase=TEST, where="transform_param"):
        self.param = param
        self.phase = phase
        self.where = where
        if param.force_color and param.force_gray:
            raise ShapeError(f"{where}: force_color and force_gray cannot both be set")
        if param.HasField("mean_file") and len(param.mean_value):
            raise ShapeError(f"{where}: give mean_file or mean_value, not both")
        self.scale = np.float32(param.scale)
        self.crop_size = int(param.crop_size)
        self.mean = None
        self.mean_values = np.array(param.mean_value, dtype=np.float32)
        if param.HasField("mean_file"):
            self.mean = self._read_mean(param.mean_file)

    @property
    def color(self):
        """How encoded images are decoded: None (as stored), True (force_color) or False (force_gray)."""
        if self.param.force_color:
            return True
        if self.param.force_gray:
            return False
        return None

    def _read_mean(self, path):
        from caffeish.formats import io

        if not os.path.isfile(path):
            raise CaffeishError(f"{self.where}: mean_file '{path}' does not exist")
        mean = io.read_binaryproto(path).astype(np.float32)
        if mean.ndim == 4 and mean.shape[0] == 1:
            mean = mean[0]
        if mean.ndim != 3:
            raise ShapeError(f"{self.where}: mean_file '{path}' holds shape {mean.shape}; Caffe needs 1 x C x H x W")
        return mean

    # -- randomness ---------------------------------------------------------------------------
    @property
    def random(self):
        """Whether items draw from the mt19937: `mirror`, or a crop at TRAIN (Caffe's InitRand condition)."""
        return bool(self.param.mirror) or (self.crop_size > 0 and self.phase == TRAIN)

    def seed(self, value):
        """Seed the transformer's own mt19937 as std::mt19937(value) (value taken modulo 2**32)."""
        state = np.random.RandomState(int(value) & 0xFFFFFFFF).get_state(legacy=False)
        self._mt = np.random.MT19937()
        self._mt.state = state

    def rand(self, n):
        """Caffe's DataTransformer::Rand(n): a raw 32-bit mt19937 output modulo n."""
        if self._mt is None:
            source = self.rng
            if source is None:
                from caffeish.runtime import fillers

                source = fillers.global_rng() or np.random.default_rng(0)
            self.seed(int(source.integers(0, 2 ** 32)))
        return int(self._mt.random_raw()) % n

    def draw(self, height, width):
        """(h_off, w_off, mirror) of the next item, H x W before the crop, drawn in Caffe's order:
        the flip (with `mirror`), then h_off and w_off (a crop at TRAIN; the centre at TEST)."""
        mirror = bool(self.param.mirror) and self.rand(2) == 1
        if not self.crop_size:
            return 0, 0, mirror
        self._check_crop(height, width)
        if self.phase == TRAIN:
            h_off = self.rand(height - self.crop_size + 1)
            w_off = self.rand(width - self.crop_size + 1)
            return h_off, w_off, mirror
        return self.offsets(height, width) + (mirror,)

    # -- geometry ----------------------------------------------------------------------------
    def output_shape(self, channels, height, width):
        """C x H x W after the transform (crop_size replaces H and W)."""
        if self.crop_size:
            self._check_crop(height, width)
            return channels, self.crop_size, self.crop_size
        return channels, height, width

    def _check_crop(self, height, width):
        if height < self.crop_size or width < self.crop_size:
            raise ShapeError(
                f"{self.where}: crop_size {self.crop_size} is larger than a {height}x{width} image"
            )

    def offsets(self, height, width):
        """(h_off, w_off) of the TEST crop: the centre window, rounded down."""
        if not self.crop_size:
            return 0, 0
        self._check_crop(height, width)
        return center_crop_offsets((height, width), (self.crop_size, self.crop_size))

    def crop(self, array):
        """The TEST crop window (the centre) of a (..., H, W) array: the same window for an image and its
        label.  No flip: a mirrored item's flip is `draw`'s."""
        if not self.crop_size:
            return array
        h, w = array.shape[-2:]
        return self.window(array, *self.offsets(h, w))

    def window(self, array, h_off, w_off):
        """The crop_size x crop_size window of a (..., H, W) array at (h_off, w_off) (all of it without a crop)."""
        if not self.crop_size:
            return array
        return array[..., h_off:h_off + self.crop_size, w_off:w_off + self.crop_size]

    # -- values ------------------------------------------------------------------------------
    def __call__(self, array, what="an image"):
        """The transformed float32 C x H' x W' array of a C x H x W image (uint8 or float).

        Each call is the next item: with `random`, it draws its window and flip (see `draw`)."""
        array = np.asarray(array)
        if array.ndim != 3:
            raise ShapeError(f"{self.where}: expected a C x H x W image, got shape {array.shape}")
        c, h, w = array.shape
        if self.crop_size:
            self._check_crop(h, w)
        if self.mean is not None and self.mean.shape != (c, h, w):
            raise ShapeError(
                f"{self.where}: mean_file '{self.param.mean_file}' is {self.mean.shape} (C, H, W) "
                f"but {what} is {(c, h, w)}; Caffe requires them equal"
            )
        if self.mean is None and self.mean_values.size not in (0, 1, c):
            raise ShapeError(
                f"{self.where}: {self.mean_values.size} mean_value entries for {what} with {c} channels; "
                f"give one, or one per channel"
            )
        h_off, w_off, mirror = self.draw(h, w) if self.random else self.offsets(h, w) + (False,)
        x = self.window(array, h_off, w_off).astype(np.float32)
        if self.mean is not None:
            x -= self.window(self.mean, h_off, w_off)  # cropped alike, subtracted before the flip
        elif self.mean_values.size:
            x -= self.mean_values.reshape(-1, 1, 1)
        if mirror:
            x = np.ascontiguousarray(x[:, :, ::-1])
        if self.scale != 1:
            x *= self.scale
        return x


# OpenCV's fixed-point bilinear weights: 11 bits (INTER_RESIZE_COEF_BITS).
COEF_BITS = 11
COEF_SCALE = 1 << COEF_BITS


def _scale(n_in, n_out):
    """OpenCV's source step: 1 / inv_scale with inv_scale = out / in (both in double, as cv::resize)."""
    return 1.0 / (n_out / n_in)


def linear_taps(n_in, n_out, clamp_weights):
    """Along one axis: (first source index, second source index, weight0, weight1) per output index.

    OpenCV computes f = (float)((d + 0.5) * scale - 0.5) in single precision,
    s = floor(f), f -= s; the weights are (1 - f, f).  Across a row
    (`clamp_weights`) an index left of the image becomes s = 0, f = 0 and one
    at or past the last pixel s = n - 1, f = 0.  Down the columns the weights
    are not clamped: only the row indices are (so a border row is a weighted
    sum of one row with itself, which fixed point rounds differently).
    """
    f = ((np.arange(n_out, dtype=np.float64) + 0.5) * _scale(n_in, n_out) - 0.5).astype(np.float32)
    s = np.floor(f)
    f = f - s
    s = s.astype(np.int64)
    if clamp_weights:
        low = s < 0
        f[low], s[low] = 0, 0
        high = s >= n_in - 1
        f[high], s[high] = 0, n_in - 1
    w0 = np.float32(1) - f
    return np.clip(s, 0, n_in - 1), np.clip(s + 1, 0, n_in - 1), w0, f


def _is_half_size(n_in, n_out):
    """OpenCV's 'area fast' test for a factor of exactly 2 (scale within DBL_EPSILON of the integer 2)."""
    scale = _scale(n_in, n_out)
    return abs(scale - 2) < np.finfo(np.float64).eps


def resize_linear(array, height, width):
    """Resize an H x W (x C) image as OpenCV's cv::resize(INTER_LINEAR) does, bit for bit on uint8.

    This is what Caffe's ImageData layer (new_height / new_width) and
    convert_imageset (--resize_height / --resize_width) do to each image.
    For uint8 OpenCV works in fixed point: weights w = round(weight * 2048);
    a row pass gives integers h = p0 * wx0 + p1 * wx1; the column pass gives
    ((wy0 * (h0 >> 4)) >> 16) + ((wy1 * (h1 >> 4)) >> 16), then (v + 2) >> 2.
    Halving both sides of a 2-channel image goes through INTER_AREA, which
    rounds the 2 x 2 mean half to even.  Float images are interpolated in
    float32 with the same weights.  A same-size resize is a copy.
    """
    array = np.asarray(array)
    if height < 1 or width < 1:
        raise CaffeishError(f"cannot resize to {width}x{height}")
    if array.ndim not in (2, 3) or array.shape[0] < 1 or array.shape[1] < 1:
        raise CaffeishError(f"cannot resize an image of shape {array.shape}; expected H x W or H x W x C")
    n_h, n_w = array.shape[:2]
    if (n_h, n_w) == (height, width):
        return array.copy()
    channel = (slice(None),) if array.ndim == 3 else ()
    x0, x1, wx0, wx1 = linear_taps(n_w, width, True)
    y0, y1, wy0, wy1 = linear_taps(n_h, height, False)
    across = (np.newaxis, slice(None)) + (np.newaxis,) * len(channel)  # weights along W
    down = (slice(None), np.newaxis) + (np.newaxis,) * len(channel)  # weights along H
    if array.dtype != np.uint8:
        x = array.astype(np.float32)
        rows = x[:, x0] * wx0[across] + x[:, x1] * wx1[across]
        return (rows[y0] * wy0[down] + rows[y1] * wy1[down]).astype(array.dtype)
    if array.ndim == 3 and array.shape[2] == 2 and _is_half_size(n_h, height) and _is_half_size(n_w, width):
        x = array.astype(np.int32)
        total = x[0::2, 0::2] + x[0::2, 1::2] + x[1::2, 0::2] + x[1::2, 1::2]
        return np.rint(total / 4).astype(np.uint8)
    ax0, ax1 = (np.rint(w * COEF_SCALE).astype(np.int32) for w in (wx0, wx1))
    by0, by1 = (np.rint(w * COEF_SCALE).astype(np.int32) for w in (wy0, wy1))
    x = array.astype(np.int32)
    rows = x[:, x0] * ax0[across] + x[:, x1] * ax1[across]
    rows >>= 4
    out = ((rows[y0] * by0[down]) >> 16) + ((rows[y1] * by1[down]) >> 16) + 2
    out >>= 2
    return out.astype(np.uint8)


def resize_nearest(array, height, width):
    """Resize an H x W (x C) array as OpenCV's cv::resize(INTER_NEAREST): no new values appear.

    Output pixel d takes source index min(floor(d * scale), n - 1) with
    scale = 1 / (out / in), per axis; labels keep their classes.
    """
    array = np.asarray(array)
    if height < 1 or width < 1:
        raise CaffeishError(f"cannot resize to {width}x{height}")
    n_h, n_w = array.shape[:2]
    ys = np.minimum(np.floor(np.arange(height) * _scale(n_h, height)).astype(np.int64), n_h - 1)
    xs = np.minimum(np.floor(np.arange(width) * _scale(n_w, width)).astype(np.int64), n_w - 1)
    return array[ys[:, np.newaxis], xs]
