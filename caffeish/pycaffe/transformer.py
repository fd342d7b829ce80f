"""pycaffe's `caffe.io` helpers: the input Transformer, image loading and
resizing, and 10-crop oversampling (the BlobProto / Datum <-> numpy conversions
are caffeish.formats.arrays; caffeish.pycaffe.io gathers both).

Same names, arguments, order of operations and results as pycaffe, so that
`import caffeish as caffe` scripts keep working:

    transformer = caffe.io.Transformer({'data': net.blobs['data'].data.shape})
    transformer.set_transpose('data', (2, 0, 1))     # H x W x K -> K x H x W
    transformer.set_channel_swap('data', (2, 1, 0))  # RGB -> BGR
    transformer.set_raw_scale('data', 255)           # [0, 1] -> [0, 255]
    transformer.set_mean('data', mean)               # (K,) or (K, H, W)
    x = transformer.preprocess('data', caffe.io.load_image('cat.jpg'))

Where we differ from pycaffe (deliberately, all documented at the function):
  * errors are caffeish errors (ShapeError for shapes, CaffeishError for an
    unknown input) instead of bare Exception / ValueError;
  * `preprocess` never writes into the caller's array (pycaffe scales a
    float32 input in place when no resize is needed);
  * pycaffe resizes with scikit-image / scipy, which we do not depend on:
    `resize_image` reproduces their interpolation with numpy (see there);
  * `load_image` decodes with Pillow, converting modes as scikit-image's
    Pillow plugin does.
"""
import numpy as np

from caffeish.errors import CaffeishError, ShapeError
from caffeish.formats.schema import pb

# pycaffe's caffe.io imports the compiled schema as `caffe_pb2`; scripts use
# `caffe.io.caffe_pb2.BlobProto()`.
caffe_pb2 = pb

# scikit-image's rgb2gray weights (ITU-R BT.709), used by load_image(color=False).
GRAY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721])

__all__ = ["Transformer", "load_image", "resize_image", "oversample", "caffe_pb2"]


# ---------------------------------------------------------------------------- images


def _pil_to_array(img):
    """Pillow image -> ndarray with scikit-image's imread mode rules (palette, 1-bit, alpha, CMYK)."""
    mode = img.mode
    if mode == "P":
        rgb = np.asarray(img.convert("RGB"))
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            img = img.convert("L")
        else:
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "1":
        img = img.convert("L")
    elif "A" in mode:
        img = img.convert("RGBA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.uint16)
    return arr


def _as_float(arr):
    """scikit-image's img_as_float: unsigned ints scaled to [0, 1], signed to [-1, 1], floats kept."""
    if arr.dtype.kind == "u":
        return arr.astype(np.float64) / np.iinfo(arr.dtype).max
    if arr.dtype.kind == "i":
        return arr.astype(np.float64) / np.iinfo(arr.dtype).max
    if arr.dtype == bool:
        return arr.astype(np.float64)
    return arr.astype(np.float64, copy=False)


def load_image(filename, color=True):
    """Load an image as float32 in [0, 1]: H x W x 3 (RGB) when `color`, else H x W x 1 gray.

    A gray file loaded with color=True is repeated into 3 channels; an alpha
    channel is dropped (not composited).  color=False turns color into gray
    with scikit-image's weights 0.2125 R + 0.7154 G + 0.0721 B, as pycaffe does.
    16-bit images are scaled by 1/65535.
    """
    from PIL import Image

    try:
        with Image.open(filename) as img:
            img.load()
            arr = _pil_to_array(img)
    except FileNotFoundError:
        raise CaffeishError(f"{filename}: no such image file") from None
    except OSError as e:
        raise CaffeishError(f"{filename}: cannot read as an image: {e}") from None
    img = _as_float(arr)
    if not color and img.ndim == 3:
        img = img[:, :, :3] @ GRAY_WEIGHTS
    img = img.astype(np.float32)
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
        if color:
            img = np.tile(img, (1, 1, 3))
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return img


def _axis_coords(n_in, n_out, align_corners):
    """Source coordinate of each output index along one axis."""
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:  # scipy.ndimage.zoom: first and last samples on the corners
        return i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
    return (i + 0.5) * (n_in / n_out) - 0.5  # scikit-image: pixel centres aligned


def _resize_axis(im, axis, n_out, order, align_corners):
    """Interpolate `im` (float64) along `axis` to n_out samples; outside samples read as 0."""
    n_in = im.shape[axis]
    src = _axis_coords(n_in, n_out, align_corners)
    if order == 0:
        idx = np.clip(np.floor(src + 0.5).astype(np.int64), 0, n_in - 1)
        return np.take(im, idx, axis=axis)
    lo = np.floor(src).astype(np.int64)
    frac = src - lo
    pad = [(0, 0)] * im.ndim
    pad[axis] = (1, 1)
    padded = np.pad(im, pad)  # zeros: scikit-image's mode='constant', cval=0
    lo_idx = np.clip(lo + 1, 0, n_in + 1)
    hi_idx = np.clip(lo + 2, 0, n_in + 1)
    shape = [1] * im.ndim
    shape[axis] = n_out
    frac = frac.reshape(shape)
    return np.take(padded, lo_idx, axis=axis) * (1 - frac) + np.take(padded, hi_idx, axis=axis) * frac


def resize_image(im, new_dims, interp_order=1):
    """Resize an H x W x K image to new_dims = (height, width); returns float32.

    interp_order 1 is bilinear, 0 is nearest neighbour (higher spline orders
    are not supported).  As in pycaffe:
      * images with 1 or 3 channels are scaled to [0, 1] by their min and max,
        resized the way scikit-image's `resize(order=..., mode='constant')`
        does (pixel centres aligned: source = (dst + 0.5) * in/out - 0.5;
        neighbours outside the image count as 0 in that [0, 1] scale, so
        upsampled borders are pulled towards the image minimum), then scaled
        back; a constant image is returned filled with its value;
      * other channel counts follow scipy.ndimage.zoom (first and last pixels
        aligned: source = dst * (in - 1) / (out - 1)), without rescaling.
    Differences: scikit-image >= 0.15 also smooths before downsampling
    (anti_aliasing) by default and we do not (Caffe-era scikit-image did not);
    nearest neighbour rounds halves up where scipy may round differently.
    """
    im = np.asarray(im)
    if im.ndim != 3:
        raise ShapeError(f"resize_image takes an H x W x K image; got shape {im.shape}")
    if interp_order not in (0, 1):
        raise CaffeishError(f"resize_image: interp_order {interp_order} is not supported (use 0 or 1)")
    new_h, new_w = (int(d) for d in new_dims)
    if new_h < 1 or new_w < 1:
        raise ShapeError(f"resize_image: new_dims {tuple(new_dims)} must be positive")
    if im.shape[-1] in (1, 3):
        im_min, im_max = float(im.min()), float(im.max())
        if not im_max > im_min:
            return np.full((new_h, new_w, im.shape[-1]), im_min, dtype=np.float32)
        std = (im.astype(np.float64) - im_min) / (im_max - im_min)
        out = _resize_axis(std, 0, new_h, interp_order, align_corners=False)
        out = _resize_axis(out, 1, new_w, interp_order, align_corners=False)
        return (out * (im_max - im_min) + im_min).astype(np.float32)
    out = _resize_axis(im.astype(np.float64), 0, new_h, interp_order, align_corners=True)
    out = _resize_axis(out, 1, new_w, interp_order, align_corners=True)
    return out.astype(np.float32)


def oversample(images, crop_dims):
    """Ten crops of each H x W x K image: 4 corners and the centre, then the same 5 mirrored.

    Returns (10 * N) x crop_h x crop_w x K float32, per image in the order
    top-left, top-right, bottom-left, bottom-right, centre, then their
    left-right mirrors.  The centre crop starts at floor((H - crop_h) / 2).
    """
    images = [np.asarray(im) for im in images]
    if not images:
        return np.empty((0, int(crop_dims[0]), int(crop_dims[1]), 0), dtype=np.float32)
    h, w = images[0].shape[:2]
    ch, cw = (int(d) for d in crop_dims)
    if images[0].ndim != 3 or ch > h or cw > w or ch < 1 or cw < 1:
        raise ShapeError(f"oversample: crop {(ch, cw)} does not fit images of shape {images[0].shape}")
    if any(im.shape != images[0].shape for im in images):
        raise ShapeError("oversample: all images must have the same shape")
    stack = np.stack(images)
    corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)]
    crops = np.stack([stack[:, y:y + ch, x:x + cw, :] for y, x in corners], axis=1)
    crops = np.concatenate([crops, crops[:, :, :, ::-1, :]], axis=1)
    return crops.reshape((-1, ch, cw, stack.shape[-1])).astype(np.float32)


# ---------------------------------------------------------------------------- Transformer


class Transformer:
    """Turns H x W x K images into net inputs (and back), per input blob.

    `inputs` is {input name: blob shape}, e.g. {'data': net.blobs['data'].data.shape}.
    Each setting is per input and optional; `preprocess` applies, in order:
    resize to the blob's H x W (when different), transpose, channel swap,
    multiply by raw_scale, subtract mean, multiply by input_scale.
    `deprocess` undoes them in reverse (except the resize).
    """

    def __init__(self, inputs):
        self.inputs = inputs
        self.transpose = {}
        self.channel_swap = {}
        self.raw_scale = {}
        self.mean = {}
        self.input_scale = {}

    def _check_input(self, in_):
        if in_ not in self.inputs:
            raise CaffeishError(f"{in_!r} is not one of the net inputs: {list(self.inputs)}")

    def preprocess(self, in_, data):
        """An H' x W' x K image -> the K x H x W float32 array for input `in_` (the input is not modified)."""
        self._check_input(in_)
        caffe_in = np.array(data, dtype=np.float32)
        in_dims = tuple(self.inputs[in_][2:])
        if tuple(caffe_in.shape[:2]) != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        transpose = self.transpose.get(in_)
        channel_swap = self.channel_swap.get(in_)
        raw_scale = self.raw_scale.get(in_)
        mean = self.mean.get(in_)
        input_scale = self.input_scale.get(in_)
        if transpose is not None:
            caffe_in = caffe_in.transpose(transpose)
        if channel_swap is not None:
            caffe_in = caffe_in[list(channel_swap), :, :]
        if raw_scale is not None:
            caffe_in *= raw_scale
        if mean is not None:
            try:
                caffe_in -= mean
            except ValueError:
                raise ShapeError(
                    f"input {in_!r}: mean of shape {np.shape(mean)} cannot be subtracted from the "
                    f"image of shape {caffe_in.shape} (is set_transpose missing?)"
                ) from None
        if input_scale is not None:
            caffe_in *= input_scale
        return caffe_in

    def deprocess(self, in_, data):
        """Undo preprocess (without resizing back): input_scale, mean, raw_scale, channel swap, transpose.

        The input is squeezed first, so a 1 x K x H x W batch gives an H x W x K image.
        """
        self._check_input(in_)
        decaf_in = np.array(data).squeeze()
        transpose = self.transpose.get(in_)
        channel_swap = self.channel_swap.get(in_)
        raw_scale = self.raw_scale.get(in_)
        mean = self.mean.get(in_)
        input_scale = self.input_scale.get(in_)
        if input_scale is not None:
            decaf_in /= input_scale
        if mean is not None:
            decaf_in += mean
        if raw_scale is not None:
            decaf_in /= raw_scale
        if channel_swap is not None:
            decaf_in = decaf_in[np.argsort(channel_swap), :, :]
        if transpose is not None:
            decaf_in = decaf_in.transpose(np.argsort(transpose))
        return decaf_in

    def set_transpose(self, in_, order):
        """Axis order applied to the image, e.g. (2, 0, 1) for H x W x K -> K x H x W."""
        self._check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise ShapeError(
                f"transpose order {tuple(order)} for input {in_!r} must have "
                f"{len(self.inputs[in_]) - 1} axes (the input's shape {tuple(self.inputs[in_])} less the batch axis)"
            )
        self.transpose[in_] = order

    def set_channel_swap(self, in_, order):
        """Channel order applied after the transpose, e.g. (2, 1, 0) for RGB -> BGR."""
        self._check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise ShapeError(
                f"channel swap {tuple(order)} for input {in_!r} must list "
                f"{self.inputs[in_][1]} channels (the input's shape is {tuple(self.inputs[in_])})"
            )
        self.channel_swap[in_] = order

    def set_raw_scale(self, in_, scale):
        """Factor applied after the channel swap, e.g. 255 to take [0, 1] images to [0, 255]."""
        self._check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_, mean):
        """Mean subtracted after raw scaling: per channel (K,), or per pixel (K, H, W) / (H, W) when K = 1."""
        self._check_input(in_)
        mean = np.asarray(mean)
        shape = tuple(self.inputs[in_])
        ms = mean.shape
        if mean.ndim == 1:
            if ms[0] != shape[1]:
                raise ShapeError(
                    f"mean has {ms[0]} channels but input {in_!r} of shape {shape} has {shape[1]}"
                )
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if len(ms) == 2:
                ms = (1,) + ms
            if len(ms) != 3:
                raise ShapeError(f"mean of shape {mean.shape} is neither (K,) nor (K, H, W)")
            if ms != shape[1:]:
                raise ShapeError(
                    f"mean of shape {mean.shape} does not match input {in_!r} (K, H, W) = {shape[1:]}"
                )
        self.mean[in_] = mean

    def set_input_scale(self, in_, scale):
        """Factor applied last, after the mean subtraction."""
        self._check_input(in_)
        self.input_scale[in_] = scale
