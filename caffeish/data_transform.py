"""Caffe's DataTransformer at TEST: what `transform_param` does to each record a data layer reads.

For every image (a Datum's C x H x W pixels, or a decoded file), Caffe's
`DataTransformer::Transform` computes, per channel c and output pixel (h, w):

    top[c, h, w] = (pixel[c, h + h_off, w + w_off] - mean) * scale

where
  * crop_size (if set) cuts a crop_size x crop_size window; at TEST it is the
    centre one, h_off = (H - crop_size) // 2, w_off = (W - crop_size) // 2
    (TRAIN draws random offsets; caffeish always uses the TEST window, so a
    paired image/label database pair stays aligned);
  * mean is mean_file's value at the same (uncropped) position, whose C x H x W
    must equal the image's, or mean_value[c] (one value repeats for every
    channel); mean_file and mean_value exclude each other;
  * scale defaults to 1;
  * the arithmetic is float32, as Caffe's Dtype=float.
`mirror` flips images at random in Caffe, at TEST too; caffeish does not
mirror (it cannot reproduce Caffe's random draws) and warns once.
`force_color` / `force_gray` choose how encoded images are decoded (3-channel
BGR / 1-channel grey); raw Datums are used as stored.

`resize_linear` is OpenCV's cv::resize INTER_LINEAR (pixel centres aligned,
edges replicated), which Caffe's ImageData layer uses for new_height/new_width.
"""
import os
import warnings

import numpy as np

from caffeish.errors import CaffeishError, ShapeError
from caffeish.schema import TEST


class DataTransformer:
    """transform_param applied to C x H x W arrays, with Caffe's semantics at TEST.

    `where` names the layer in error messages.  The mean file is read once, at
    construction (Caffe reads it in the transformer's constructor).
    """

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
        if param.mirror:
            warnings.warn(
                f"{where}: mirror is set; Caffe mirrors at random, caffeish does not mirror",
                stacklevel=3,
            )

    @property
    def color(self):
        """How encoded images are decoded: None (as stored), True (force_color) or False (force_gray)."""
        if self.param.force_color:
            return True
        if self.param.force_gray:
            return False
        return None

    def _read_mean(self, path):
        from caffeish import io

        if not os.path.isfile(path):
            raise CaffeishError(f"{self.where}: mean_file '{path}' does not exist")
        mean = io.read_binaryproto(path).astype(np.float32)
        if mean.ndim == 4 and mean.shape[0] == 1:
            mean = mean[0]
        if mean.ndim != 3:
            raise ShapeError(f"{self.where}: mean_file '{path}' holds shape {mean.shape}; Caffe needs 1 x C x H x W")
        return mean

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
        return (height - self.crop_size) // 2, (width - self.crop_size) // 2

    def crop(self, array):
        """The crop window of a (..., H, W) array: the same window for an image and its label."""
        if not self.crop_size:
            return array
        h, w = array.shape[-2:]
        h_off, w_off = self.offsets(h, w)
        return array[..., h_off:h_off + self.crop_size, w_off:w_off + self.crop_size]

    # -- values ------------------------------------------------------------------------------
    def __call__(self, array, what="an image"):
        """The transformed float32 C x H' x W' array of a C x H x W image (uint8 or float)."""
        array = np.asarray(array)
        if array.ndim != 3:
            raise ShapeError(f"{self.where}: expected a C x H x W image, got shape {array.shape}")
        c, h, w = array.shape
        x = self.crop(array).astype(np.float32)
        if self.mean is not None:
            if self.mean.shape != (c, h, w):
                raise ShapeError(
                    f"{self.where}: mean_file '{self.param.mean_file}' is {self.mean.shape} (C, H, W) "
                    f"but {what} is {(c, h, w)}; Caffe requires them equal"
                )
            x -= self.crop(self.mean)
        elif self.mean_values.size:
            if self.mean_values.size not in (1, c):
                raise ShapeError(
                    f"{self.where}: {self.mean_values.size} mean_value entries for {what} with {c} channels; "
                    f"give one, or one per channel"
                )
            x -= self.mean_values.reshape(-1, 1, 1)
        if self.scale != 1:
            x *= self.scale
        return x


def resize_linear(array, height, width):
    """Resize an H x W (x C) uint8 image as OpenCV's cv::resize(INTER_LINEAR) does.

    Source coordinates are (dst + 0.5) * in / out - 0.5, clamped to the image
    (edge pixels repeat).  OpenCV weights in 11-bit fixed point; this computes
    in float and rounds, so a value can differ from OpenCV's by 1.
    """
    array = np.asarray(array)
    if height < 1 or width < 1:
        raise CaffeishError(f"cannot resize to {width}x{height}")
    out = array.astype(np.float32)
    for axis, n_out in ((0, height), (1, width)):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        lo = np.floor(src)
        frac = (src - lo).astype(np.float32)
        lo = lo.astype(np.int64)
        frac[lo < 0] = 0
        frac[lo >= n_in - 1] = 0
        lo = np.clip(lo, 0, n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        shape = [1] * out.ndim
        shape[axis] = n_out
        frac = frac.reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - frac) + np.take(out, hi, axis=axis) * frac
    if array.dtype == np.uint8:
        return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    return out.astype(array.dtype)
