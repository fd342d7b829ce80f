"""BlobProto and Datum messages <-> numpy arrays, with pycaffe's names and results.

pycaffe's caffe.io exposes these (`blobproto_to_array`, `array_to_blobproto`,
`array_to_datum`, `datum_to_array`, ...); the Datum and LMDB code builds on
them.  `datum_to_array` also decodes `encoded` Datums (JPEG/PNG bytes, as
`convert_imageset --encoded` writes them); pycaffe fails on those.
"""
import io as _io

import numpy as np

from caffeish.errors import BlobShapeError, CaffeishError
from caffeish.formats.schema import pb


# ---------------------------------------------------------------------------- blobs


def _blob_values(blob, diff):
    """Float32 values of a BlobProto's data (or diff); the double fields when the float ones are empty."""
    single, double = (blob.diff, blob.double_diff) if diff else (blob.data, blob.double_data)
    if len(single) or not len(double):
        return np.array(single, dtype=np.float32)
    return np.array(double, dtype=np.float64)


def blobproto_to_array(blob, return_diff=False):
    """A BlobProto's data (or diff) as a float64 array in the blob's shape, as pycaffe returns it.

    The shape is the legacy (num, channels, height, width) when any of those
    four fields is set, else `shape.dim`.  Blobs written with `double_data`
    (which pycaffe ignores) are read from there.
    """
    values = _blob_values(blob, return_diff)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(blob.shape.dim)
    count = int(np.prod(shape, dtype=np.int64))
    if values.size != count:
        what = "diff" if return_diff else "data"
        raise BlobShapeError(
            f"BlobProto has {values.size} {what} values but its shape {shape} holds {count}"
        )
    return values.astype(np.float64).reshape(shape)


def array_to_blobproto(arr, diff=None):
    """A BlobProto with `shape.dim` = arr.shape and the values as float32 (and `diff` if given)."""
    arr = np.asarray(arr)
    blob = pb.BlobProto()
    blob.shape.dim.extend(int(d) for d in arr.shape)
    blob.data.extend(arr.astype(np.float32).ravel().tolist())
    if diff is not None:
        diff = np.asarray(diff)
        if diff.size != arr.size:
            raise BlobShapeError(f"diff of shape {diff.shape} does not match data of shape {arr.shape}")
        blob.diff.extend(diff.astype(np.float32).ravel().tolist())
    return blob


def arraylist_to_blobprotovector_str(arraylist):
    """Serialized BlobProtoVector holding one BlobProto per array."""
    vec = pb.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(a) for a in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(str):  # noqa: A002 (pycaffe's argument name)
    """The arrays of a serialized BlobProtoVector (float64, as blobproto_to_array)."""
    vec = pb.BlobProtoVector()
    vec.ParseFromString(str)
    return [blobproto_to_array(b) for b in vec.blobs]


def array_to_datum(arr, label=None):
    """A Datum from a C x H x W array: uint8 arrays go to `data` bytes, others to `float_data`."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise BlobShapeError(f"a Datum holds a 3-D C x H x W array; got shape {arr.shape}")
    datum = pb.Datum()
    datum.channels, datum.height, datum.width = (int(d) for d in arr.shape)
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(np.float32).ravel().tolist())
    if label is not None:
        datum.label = label
    return datum


def datum_to_array(datum):
    """A Datum's C x H x W array: uint8 from `data`, float64 from `float_data`.

    An `encoded` Datum (image file bytes) is decoded with Pillow into the
    layout Caffe's DecodeDatumNative gives: uint8, color as BGR, gray as 1 channel.
    """
    if datum.encoded:
        return _decode_datum(datum)
    shape = (datum.channels, datum.height, datum.width)
    count = shape[0] * shape[1] * shape[2]
    if len(datum.data):
        if len(datum.data) != count:
            raise BlobShapeError(f"Datum has {len(datum.data)} data bytes but C x H x W = {shape} holds {count}")
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape).copy()
    if len(datum.float_data) != count:
        raise BlobShapeError(
            f"Datum has {len(datum.float_data)} float_data values but C x H x W = {shape} holds {count}"
        )
    return np.array(datum.float_data, dtype=np.float32).astype(np.float64).reshape(shape)


def _decode_datum(datum):
    from PIL import Image

    try:
        img = Image.open(_io.BytesIO(datum.data))
        img.load()
    except Exception as e:  # Pillow raises many types for bad data
        raise CaffeishError(f"encoded Datum: cannot decode its image bytes: {e}") from None
    gray = img.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
    img = img.convert("L" if gray else "RGB")  # 8 bits per channel, alpha dropped
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        return arr[np.newaxis].copy()
    return np.ascontiguousarray(arr[:, :, ::-1].transpose(2, 0, 1))
