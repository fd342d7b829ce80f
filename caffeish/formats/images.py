"""Image files -> the 8-bit pixels Caffe reads (one decoder for every tool and layer).

convert_imageset, the ImageData layer and encoded Datums go through OpenCV's
imread; here Pillow gives the same 8 bits: palettes and 1-bit images expanded,
alpha dropped, 16-bit images reduced to their high byte (value >> 8), gray
with OpenCV's weights.  classify, segment, dataset, evaluate, ImageData and
Datum decoding share `decode_8bit`/`pil_pixels`, so a file gives the same
numbers everywhere; `IMAGE_EXTENSIONS` says what counts as an image.
"""
import os

import numpy as np

from caffeish.errors import CaffeishError, ShapeError

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm",
})

def is_image_name(path):
    """Whether a file name has an image extension (folders are scanned for these)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------- decoding


def pil_pixels(img, gray=False):
    """A Pillow image -> uint8 H x W x K (K = 1 gray, else 3 RGB), the 8 bits OpenCV's imread gives Caffe.

    convert_imageset and the ImageData layer read files with cv::imread in
    IMREAD_COLOR or IMREAD_GRAYSCALE, which keep 8 bits of a 16-bit image:
    libpng's png_set_strip_16, the high byte (value >> 8).  Pillow already
    does that for 16-bit colour PNGs (mode RGB) but opens 16-bit gray as mode
    I;16 with the full values (its own convert would clip them at 255), so
    those are shifted here; mode I (32-bit) is taken as 16-bit values.  Mode F
    (float) is rounded and clipped to 0..255.  Palettes and 1-bit images are
    expanded and an alpha channel is dropped (imread's IMREAD_COLOR).
    """
    mode = img.mode
    if mode == "F":
        arr = np.clip(np.rint(np.asarray(img, dtype=np.float32)), 0, 255).astype(np.uint8)
    elif mode == "I" or mode.startswith("I;16"):
        arr = (np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
    else:
        if mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        arr = np.asarray(img.convert("L" if gray else "RGB"), dtype=np.uint8)
        return arr[:, :, np.newaxis] if arr.ndim == 2 else arr
    arr = arr[:, :, np.newaxis]
    return arr if gray else np.repeat(arr, 3, axis=2)


def _open(source, read):
    """read(Pillow image) of a path or a Pillow image; an unreadable file raises CaffeishError naming it."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return read(source)
    path = os.fspath(source)
    try:
        with Image.open(path) as img:
            img.load()
            return read(img)
    except FileNotFoundError:
        raise CaffeishError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise CaffeishError(f"{path}: is a folder, not an image") from None
    except CaffeishError:
        raise
    except (MemoryError, RecursionError):
        raise CaffeishError(f"{path}: cannot read as an image: too large to decode") from None
    except Exception as e:  # Pillow: UnidentifiedImageError, truncated data, DecompressionBombError, ...
        raise CaffeishError(f"{path}: cannot read as an image: {e}") from None


def decode_8bit(source, gray=False):
    """A path or Pillow image -> uint8 H x W x K pixels (K = 1 gray, else 3 RGB), as `pil_pixels`."""
    return _open(source, lambda img: pil_pixels(img, gray))


def decode(source, gray=False):
    """Decode an image into float32 H x W x K pixels in 0..255 (K = 1 gray, else 3 RGB).

    source: a path, a Pillow image (both decoded as `pil_pixels`: the 8-bit
    values Caffe's Datums hold), or an array (H x W or H x W x K; uint8 taken
    as 0..255, floats as pycaffe's [0, 1] images from load_image).
    An unreadable file raises CaffeishError naming it.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, gray)
    return decode_8bit(source, gray).astype(np.float32)


def _from_array(arr, gray):
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, np.newaxis]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ShapeError(f"an image array is H x W, H x W x 1, 3 or 4; got shape {arr.shape}")
    arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32)
    else:
        x = arr.astype(np.float32) * np.float32(255.0)
    if gray and x.shape[2] == 3:
        x = (x @ np.array([0.299, 0.587, 0.114], np.float32))[:, :, np.newaxis]
    elif not gray and x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return x
