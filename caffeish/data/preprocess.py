"""The one preprocessing spec: image file -> net input, for classify, segment and the Python API.

Caffe models expect what their Data layer gave them in training: Caffe's
DataTransformer takes the Datum's uint8 pixels (BGR, as `convert_imageset`
stores them through OpenCV), crops (centre crop at TEST), subtracts the mean
(image or per-channel values) and multiplies by `scale`.  pycaffe's
`caffe.io.Transformer` (caffeish/pycaffe/transformer.py) does the same to [0, 1] RGB
images in its own order: resize, transpose, channel swap, raw_scale, mean,
input_scale.  A `Preprocess` is that pipeline with Caffe's defaults:

    pixels (H x W x K, values 0..255, RGB or gray, as decoded)
      -> resize to the net input (or keep the size: fully convolutional nets)
      -> centre crop (--crop center) -> K x H x W
      -> channel swap (2,1,0: RGB -> BGR, for 3 channels)
      -> * raw_scale / 255          (raw_scale 255: the pixel values as they are)
      -> - mean                     (K values, or a K x H' x W' image fitted to H x W)
      -> * scale                    (transform_param.scale, pycaffe's input_scale)

With raw_scale 255 (the default) the arithmetic is exactly Caffe's Data layer:
(pixel - mean) * scale on the decoded 8-bit values.  `from_transform_param`
maps a train/val prototxt's transform_param onto the spec, `transformer()`
gives the equivalent pycaffe Transformer; the command-line options that build
one are caffeish.tools.options' `add_preprocess_options`/`preprocess_from_args`.

Decoding (caffeish.formats.images): Pillow; gray images (--grayscale, or a 1-channel net) use Pillow's
L = 0.299 R + 0.587 G + 0.114 B (OpenCV's weights, which convert_imageset
--gray and force_gray use); an alpha channel is dropped; 16-bit images keep
their high byte (value >> 8), as OpenCV's imread gives them to Caffe, so an
image file gives the same pixels here as in a dataset's Datums.  A mean image whose size differs from the input is centre
cropped when it is larger in both dimensions (Caffe's DataTransformer crops
the mean with the image), else resized with `resize_image`.

Channel swap: a permutation of 0..K-1 of the input's K channels (checked:
ShapeError naming the order and the channels otherwise).  The default
(2, 1, 0) is for colour images and does nothing to 1-channel (gray) inputs.
"""
import dataclasses
import math
import os
from typing import Optional, Tuple

import numpy as np

from caffeish.errors import CaffeishError, ShapeError
from caffeish.formats.images import decode
from caffeish.graph.geometry import center_crop_offsets
from caffeish.pycaffe.transformer import Transformer, oversample, resize_image

CROP_MODES = ("none", "center")
DEFAULT_CHANNEL_SWAP = (2, 1, 0)  # RGB -> BGR, what Caffe's models expect


def load_mean(path):
    """A mean file: .binaryproto (Caffe, DIGITS) or .npy (pycaffe's ilsvrc_2012_mean.npy) -> float32.

    Returns (K,) or (K, H, W); leading axes of size 1 are dropped.
    """
    from caffeish.formats import io

    path = os.fspath(path)
    if not os.path.exists(path):
        raise CaffeishError(f"{path}: no such mean file (give another with --mean or --mean-value)")
    if path.lower().endswith(".npy"):
        try:
            mean = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CaffeishError(f"{path}: cannot read as a .npy mean: {e}") from None
    else:
        mean = io.read_binaryproto(path)
    mean = np.asarray(mean, dtype=np.float32)
    while mean.ndim > 3 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim == 2:
        mean = mean[np.newaxis]
    if mean.ndim not in (1, 3):
        raise ShapeError(f"{path}: a mean is K values or a K x H x W image; got shape {mean.shape}")
    return mean


def parse_values(text, what="values"):
    """'104,117,123' -> (104.0, 117.0, 123.0)."""
    try:
        values = tuple(float(v) for v in str(text).replace(" ", "").split(",") if v != "")
    except ValueError:
        raise CaffeishError(f"{what}: expected comma-separated numbers, got '{text}'") from None
    if not values:
        raise CaffeishError(f"{what}: expected comma-separated numbers, got '{text}'")
    return values


# ---------------------------------------------------------------------------- the spec


@dataclasses.dataclass
class Preprocess:
    """How an image becomes a net input (see the module docstring for the order).

    mean: None, K values or a K x H x W image (in the net's channel order, BGR
    for Caffe's models).  scale: multiplied after the mean (transform_param.scale).
    raw_scale: the value a white [0, 1] pixel takes (255: the 8-bit values).
    channel_swap: the order of the input's channels (a permutation of 0..K-1;
    None keeps RGB); the default (2, 1, 0) leaves 1-channel inputs alone.
    grayscale: load as 1 channel; None decides from the net input's channels.
    crop: "none" (resize to the input) or "center" (resize to `resize`, or the
    mean image's size, then centre crop to the input).  resize: None (the net
    input), "keep" (the image's own size: fully convolutional nets) or (h, w).
    """

    mean: Optional[np.ndarray] = None
    scale: float = 1.0
    raw_scale: float = 255.0
    channel_swap: Optional[Tuple[int, ...]] = DEFAULT_CHANNEL_SWAP
    grayscale: Optional[bool] = None
    crop: str = "none"
    resize: object = None
    mean_source: str = "mean"

    def __post_init__(self):
        if self.crop not in CROP_MODES:
            raise CaffeishError(f"crop must be one of {', '.join(CROP_MODES)}, got '{self.crop}'")
        if self.mean is not None:
            self.mean = np.asarray(self.mean, dtype=np.float32)
            if self.mean.ndim == 2:
                self.mean = self.mean[np.newaxis]
            if self.mean.ndim not in (1, 3):
                raise ShapeError(f"{self.mean_source}: a mean is K values or a K x H x W image; "
                                 f"got shape {self.mean.shape}")
        for name in ("scale", "raw_scale"):
            if not math.isfinite(getattr(self, name)):
                raise CaffeishError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.mean is not None and not np.all(np.isfinite(self.mean)):
            raise CaffeishError(f"{self.mean_source}: the mean holds NaN or infinite values")
        if self.channel_swap is not None:
            self.channel_swap = _permutation(self.channel_swap)

    def swap_for(self, channels):
        """The channel order to apply to an input of `channels` channels (None: none).

        The order must list every channel once; the default (2, 1, 0) is not
        applied to 1-channel inputs.  A mismatch is a ShapeError naming both.
        """
        swap = self.channel_swap
        if swap is None or (channels == 1 and swap in (DEFAULT_CHANNEL_SWAP, (0,))):
            return None
        if len(swap) != channels:
            raise ShapeError(f"channel swap {','.join(map(str, swap))} lists {len(swap)} channels but the net "
                             f"input has {channels}; give a permutation of 0..{channels - 1} (or 'none')")
        return None if swap == tuple(range(channels)) else swap

    # -- decoding -------------------------------------------------------------------
    def gray_for(self, channels):
        """Whether images load as gray for a net input with `channels` channels."""
        if channels not in (1, 3):
            raise ShapeError(f"the net input has {channels} channels; images give 1 (gray) or 3 (color)")
        return channels == 1 if self.grayscale is None else bool(self.grayscale)

    def load(self, source, channels=3):
        """Decode `source` for a net input with `channels` channels: H x W x channels, 0..255."""
        pixels = decode(source, gray=self.gray_for(channels))
        if pixels.shape[2] != channels:  # --grayscale on a 3-channel net: gray repeated
            pixels = np.repeat(pixels[:, :, :1], channels, axis=2)
        return pixels

    # -- geometry -------------------------------------------------------------------
    def resize_dims(self, image_hw, input_hw):
        """The size the image is resized to before cropping."""
        image_hw = tuple(image_hw)
        if self.resize == "keep" or input_hw is None:
            return image_hw
        if self.resize is not None:
            return tuple(int(d) for d in self.resize)
        input_hw = tuple(input_hw)
        if self.crop == "center":
            if self.mean is not None and self.mean.ndim == 3:
                mean_hw = tuple(self.mean.shape[1:])
                if mean_hw[0] >= input_hw[0] and mean_hw[1] >= input_hw[1]:
                    return mean_hw
            if image_hw[0] >= input_hw[0] and image_hw[1] >= input_hw[1]:
                return image_hw
        return input_hw

    def _resized(self, pixels, dims):
        if tuple(pixels.shape[:2]) == tuple(dims):
            return pixels
        return resize_image(pixels, dims)

    def mean_for(self, shape):
        """The mean fitted to a K x H x W input: (K, 1, 1) values or a K x H x W image."""
        if self.mean is None:
            return None
        k, h, w = shape
        m = self.mean
        if m.ndim == 1:
            if m.shape[0] == 1:
                return np.full((k, 1, 1), m[0], np.float32)
            if m.shape[0] != k:
                raise ShapeError(f"{self.mean_source} has {m.shape[0]} values, one per channel, but the "
                                 f"net input has {k} channels (input shape {k}x{h}x{w})")
            return m.reshape(k, 1, 1)
        if m.shape[0] != k:
            raise ShapeError(f"{self.mean_source} of shape {'x'.join(map(str, m.shape))} has {m.shape[0]} "
                             f"channels but the net input is {k}x{h}x{w}: {k} channels")
        mh, mw = m.shape[1:]
        if (mh, mw) == (h, w):
            return m
        if mh >= h and mw >= w:  # cropped with the image's centre window, as Caffe's DataTransformer
            top, left = center_crop_offsets((mh, mw), (h, w))
            return m[:, top:top + h, left:left + w]
        return resize_image(m.transpose(1, 2, 0), (h, w)).transpose(2, 0, 1)

    # -- the arithmetic ---------------------------------------------------------------
    def apply(self, pixels, input_hw=None):
        """H x W x K pixels (0..255) -> the K x h x w float32 net input.

        input_hw: the net input's (h, w), or None to keep the image size.
        """
        pixels = np.asarray(pixels, dtype=np.float32)
        dims = self.resize_dims(pixels.shape[:2], input_hw)
        x = self._resized(pixels, dims)
        if input_hw is not None and self.crop == "center" and tuple(x.shape[:2]) != tuple(input_hw):
            x = center_crop(x, input_hw)
        return self.finish(x)

    def finish(self, x):
        """The per-pixel arithmetic on an H x W x K image already at the input size."""
        x = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
        swap = self.swap_for(x.shape[0])
        if swap is not None:
            x = x[list(swap)]
        if self.raw_scale != 255:
            x = x * np.float32(self.raw_scale / 255.0)
        mean = self.mean_for(x.shape)
        if mean is not None:
            x = x - mean
        if self.scale != 1:
            x = x * np.float32(self.scale)
        return np.ascontiguousarray(x, dtype=np.float32)

    def oversampled(self, pixels, input_hw):
        """pycaffe's 10 crops (4 corners, centre, and their mirrors): 10 x K x h x w."""
        pixels = np.asarray(pixels, dtype=np.float32)
        dims = self.resize_dims(pixels.shape[:2], input_hw)
        if dims[0] < input_hw[0] or dims[1] < input_hw[1]:
            dims = tuple(max(d, i) for d, i in zip(dims, input_hw))
        x = self._resized(pixels, dims)
        return np.stack([self.finish(c) for c in oversample([x], input_hw)])

    def transformer(self, name, shape):
        """pycaffe's caffe.io.Transformer set up the same way for input `name` of `shape`.

        It takes load_image's [0, 1] RGB images and resizes straight to the input
        (no centre crop); the numbers agree with `apply` up to float rounding.
        """
        t = Transformer({name: tuple(shape)})
        t.set_transpose(name, (2, 0, 1))
        swap = self.swap_for(shape[1])
        if swap is not None:
            t.set_channel_swap(name, swap)
        t.set_raw_scale(name, self.raw_scale)
        mean = self.mean_for(tuple(shape[1:]))
        if mean is not None:
            t.set_mean(name, mean.ravel() if mean.shape[1:] == (1, 1) else mean)
        if self.scale != 1:
            t.set_input_scale(name, self.scale)
        return t


def _permutation(order):
    """A channel order as a tuple of ints, each of 0..len-1 once (CaffeishError otherwise)."""
    try:
        values = tuple(order)
        ints = tuple(int(c) for c in values)
    except (TypeError, ValueError):
        raise CaffeishError(f"channel swap: expected channel indices, got {order!r}") from None
    if any(i != v for i, v in zip(ints, values)) or sorted(ints) != list(range(len(ints))):
        raise CaffeishError(f"channel swap {','.join(f'{float(v):g}' for v in values)} is not a permutation of "
                            f"0..{len(values) - 1}: it must list each channel index once (e.g. 2,1,0)")
    return ints


def center_crop(x, hw):
    """The centre h x w window of an H x W x K image (offset floor((H - h) / 2), as Caffe's TEST crop)."""
    h, w = hw
    H, W = x.shape[:2]
    if h > H or w > W:
        raise ShapeError(f"cannot crop {h}x{w} out of an image of {H}x{W}")
    top, left = center_crop_offsets((H, W), (h, w))
    return x[top:top + h, left:left + w]


# ---------------------------------------------------------------------------- from Caffe's transform_param


def from_transform_param(tp, base_dir=None, **overrides):
    """The spec for a TransformationParameter, as Caffe's Data layer applies it at TEST.

    scale -> scale; mean_file -> a mean image (a relative path is looked up from
    the prototxt's folder `base_dir` and up to three folders above it, where
    caffe may have run, then in the current folder); mean_value ->
    per-channel values (one value: every channel); crop_size -> centre crop;
    force_gray / force_color -> grayscale; mirror is a TRAIN-time augmentation
    and is ignored.  Pixels are taken as Caffe's Datums hold them: 0..255, BGR.
    `overrides` replace fields (the command-line options win).
    """
    fields = {"raw_scale": 255.0, "channel_swap": DEFAULT_CHANNEL_SWAP}
    if tp.HasField("scale"):
        fields["scale"] = float(tp.scale)
    if tp.mean_file and "mean" not in overrides:
        if len(tp.mean_value):
            raise CaffeishError("transform_param gives both mean_file and mean_value; Caffe refuses that")
        path = tp.mean_file
        candidates = []
        if base_dir and not os.path.isabs(path):  # Caffe's paths are relative to where caffe ran:
            folder = os.path.abspath(base_dir)    # try the prototxt's folder and three above it
            for _ in range(4):
                candidates.append(os.path.normpath(os.path.join(folder, path)))
                folder = os.path.dirname(folder)
        candidates.append(path)
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:
            raise CaffeishError(f"transform_param mean_file '{path}' not found (looked in "
                                f"{', '.join(repr(c) for c in candidates)}); give the mean with --mean FILE")
        fields["mean"] = load_mean(found)
        fields["mean_source"] = f"mean file {found}"
    elif len(tp.mean_value):
        fields["mean"] = np.array(tp.mean_value, np.float32)
        fields["mean_source"] = "transform_param mean_value"
    if tp.crop_size:
        fields["crop"] = "center"
    if tp.force_gray:
        fields["grayscale"] = True
    elif tp.force_color:
        fields["grayscale"] = False
    fields.update(overrides)
    return Preprocess(**fields)


def transform_param_of(path, phase="TEST"):
    """The transform_param of the data layer a train/val prototxt uses at `phase` (None when it has none)."""
    from caffeish.formats import io
    from caffeish.graph.graph import layer_included, make_state
    from caffeish.formats.schema import TEST, TRAIN

    net = io.read_net(os.fspath(path))
    state = make_state(net, TEST if phase == "TEST" else TRAIN, 0, ())
    for layer in net.layer:
        if layer.HasField("transform_param") and not layer.bottom and layer_included(layer, state):
            return layer.transform_param
    return None


