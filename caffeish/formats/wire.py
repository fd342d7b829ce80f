"""Protobuf wire format, just enough to move weight blobs without Python loops.

A caffemodel is a binary NetParameter whose bulk is packed float fields inside
BlobProto messages.  Parsing it with the protobuf library and converting the
repeated floats to numpy walks every float in Python.  Instead we scan the
message structure ourselves (a handful of fields per layer), hand the layer
definitions *without* their blobs to protobuf, and turn every packed float
field into a numpy view with `numpy.frombuffer` over the file's bytes.

Field numbers used here come from proto/caffe.proto (BlobProto, BlobShape,
LayerParameter, V1LayerParameter, V0LayerParameter, NetParameter).
"""
import numpy as np

from caffeish.errors import CorruptFileError

VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5

# BlobProto field numbers.
BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH = 1, 2, 3, 4
BLOB_DATA, BLOB_DIFF, BLOB_SHAPE, BLOB_DOUBLE_DATA, BLOB_DOUBLE_DIFF = 5, 6, 7, 8, 9


class Truncated(Exception):
    """Internal: the buffer ended inside a field (turned into CorruptFileError by callers)."""


def read_varint(buf, pos, end):
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise Truncated(f"varint runs past the end at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise Truncated(f"varint longer than 10 bytes at byte {pos}")


def encode_varint(value):
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def signed64(value):
    return value - (1 << 64) if value >= 1 << 63 else value


def signed32(value):
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def tag(field, wire_type):
    return encode_varint((field << 3) | wire_type)


def iter_fields(buf, start, end):
    """Yield (field, wire_type, tag_start, value_start, value_end) for each field in buf[start:end].

    For VARINT fields value_start..value_end spans the varint bytes; for LENGTH
    fields it spans the payload.  Groups (long deprecated, never used by Caffe)
    are rejected as corrupt.
    """
    pos = start
    while pos < end:
        tag_start = pos
        key, pos = read_varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise Truncated(f"field number 0 at byte {tag_start}")
        if wire_type == VARINT:
            _, after = read_varint(buf, pos, end)
            yield field, wire_type, tag_start, pos, after
            pos = after
        elif wire_type == LENGTH:
            length, vstart = read_varint(buf, pos, end)
            vend = vstart + length
            if vend > end:
                raise Truncated(
                    f"field {field} at byte {tag_start} declares {length} bytes but only {end - vstart} remain"
                )
            yield field, wire_type, tag_start, vstart, vend
            pos = vend
        elif wire_type == FIXED32:
            if pos + 4 > end:
                raise Truncated(f"fixed32 field {field} at byte {tag_start} runs past the end")
            yield field, wire_type, tag_start, pos, pos + 4
            pos += 4
        elif wire_type == FIXED64:
            if pos + 8 > end:
                raise Truncated(f"fixed64 field {field} at byte {tag_start} runs past the end")
            yield field, wire_type, tag_start, pos, pos + 8
            pos += 8
        else:
            raise Truncated(f"unsupported wire type {wire_type} for field {field} at byte {tag_start}")


class BlobRecord:
    """One BlobProto as stored: the numbers in their stored precision and how the shape was given.

    `data` is a flat float32 (or float64 for `double_data`) array, usually a
    zero-copy view into the file's buffer.  `shape` is the `shape.dim` tuple or
    None; `legacy` is (num, channels, height, width) when any legacy field was on
    the wire, else None.  Writing a record back reproduces the same message.
    """

    __slots__ = ("data", "diff", "shape", "legacy")

    def __init__(self, data, shape=None, legacy=None, diff=None):
        self.data = data
        self.shape = shape
        self.legacy = legacy
        self.diff = diff

    @classmethod
    def from_array(cls, array):
        array = np.asarray(array)
        if array.dtype != np.float64:
            array = np.asarray(array, dtype=np.float32)
        return cls(array.reshape(-1), shape=tuple(int(d) for d in array.shape))

    @property
    def declared_shape(self):
        """The blob's shape as Caffe reads it: legacy 4-D if any legacy field was present, else shape.dim."""
        if self.legacy is not None:
            return self.legacy
        return self.shape if self.shape is not None else ()

    @property
    def count(self):
        n = 1
        for d in self.declared_shape:
            n *= d
        return n

    def array(self):
        """The data as float32 in its declared shape (a view when already float32)."""
        data = self.data if self.data.dtype == np.float32 else self.data.astype(np.float32)
        return data.reshape(self.declared_shape)

    def __repr__(self):
        return f"BlobRecord(shape={self.declared_shape}, dtype={self.data.dtype})"


def _floats(buf, wire_type, vstart, vend, dtype, pieces):
    """Collect one occurrence of a repeated float/double field (packed or not)."""
    if wire_type == LENGTH:
        size = np.dtype(dtype).itemsize
        if (vend - vstart) % size:
            raise Truncated(f"packed {np.dtype(dtype).name} field of {vend - vstart} bytes is not a multiple of {size}")
        pieces.append(np.frombuffer(buf, dtype=dtype, count=(vend - vstart) // size, offset=vstart))
    elif (wire_type == FIXED32 and dtype == "<f4") or (wire_type == FIXED64 and dtype == "<f8"):
        # Unpacked repeated field: one element per tag (legal, but no Caffe writer does it).
        pieces.append(np.frombuffer(buf, dtype=dtype, count=1, offset=vstart))
    else:
        raise Truncated(f"unexpected wire type {wire_type} for a {np.dtype(dtype).name} field")


def _join(pieces, dtype):
    if not pieces:
        return None
    if len(pieces) == 1:
        return pieces[0]
    return np.concatenate(pieces).astype(dtype, copy=False)


def _shape_dims(buf, start, end):
    dims = []
    for field, wire_type, _, vstart, vend in iter_fields(buf, start, end):
        if field != 1:
            continue
        if wire_type == VARINT:
            dims.append(signed64(read_varint(buf, vstart, vend)[0]))
        elif wire_type == LENGTH:
            pos = vstart
            while pos < vend:
                v, pos = read_varint(buf, pos, vend)
                dims.append(signed64(v))
        else:
            raise Truncated(f"unexpected wire type {wire_type} for BlobShape.dim")
    return tuple(dims)


def decode_blob(buf, start, end):
    """Decode a BlobProto in buf[start:end] into a BlobRecord without copying the floats."""
    legacy = [None, None, None, None]
    shape = None
    data, diff, ddata, ddiff = [], [], [], []
    for field, wire_type, _, vstart, vend in iter_fields(buf, start, end):
        if BLOB_NUM <= field <= BLOB_WIDTH and wire_type == VARINT:
            legacy[field - 1] = signed32(read_varint(buf, vstart, vend)[0])
        elif field == BLOB_DATA:
            _floats(buf, wire_type, vstart, vend, "<f4", data)
        elif field == BLOB_DIFF:
            _floats(buf, wire_type, vstart, vend, "<f4", diff)
        elif field == BLOB_DOUBLE_DATA:
            _floats(buf, wire_type, vstart, vend, "<f8", ddata)
        elif field == BLOB_DOUBLE_DIFF:
            _floats(buf, wire_type, vstart, vend, "<f8", ddiff)
        elif field == BLOB_SHAPE and wire_type == LENGTH:
            shape = _shape_dims(buf, vstart, vend)
    if any(v is not None for v in legacy):
        legacy_shape = tuple(0 if v is None else v for v in legacy)
    else:
        legacy_shape = None
    # Caffe: double_data wins when non-empty, else data.
    values = _join(ddata, "<f8")
    if values is None:
        values = _join(data, "<f4")
    if values is None:
        values = np.zeros(0, dtype=np.float32)
    diff_values = _join(ddiff, "<f8")
    if diff_values is None:
        diff_values = _join(diff, "<f4")
    return BlobRecord(values, shape=shape, legacy=legacy_shape, diff=diff_values)


def _packed(field, array, dtype):
    array = np.ascontiguousarray(array, dtype=dtype)
    return [tag(field, LENGTH), encode_varint(array.nbytes), memoryview(array).cast("B")]


def encode_blob(record):
    """Serialize a BlobRecord as a list of byte chunks (no copy of the data), in field-number order."""
    chunks = []
    if record.legacy is not None:
        for i, v in enumerate(record.legacy):
            chunks += [tag(i + 1, VARINT), encode_varint(int(v))]
    double = record.data.dtype == np.float64
    if not double and record.data.size:
        chunks += _packed(BLOB_DATA, record.data, "<f4")
    if record.diff is not None and record.diff.dtype != np.float64 and record.diff.size:
        chunks += _packed(BLOB_DIFF, record.diff, "<f4")
    if record.shape is not None:
        dims = b"".join(encode_varint(int(d)) for d in record.shape)
        inner = (tag(1, LENGTH) + encode_varint(len(dims)) + dims) if dims else b""
        chunks += [tag(BLOB_SHAPE, LENGTH), encode_varint(len(inner)), inner]
    if double and record.data.size:
        chunks += _packed(BLOB_DOUBLE_DATA, record.data, "<f8")
    if record.diff is not None and record.diff.dtype == np.float64 and record.diff.size:
        chunks += _packed(BLOB_DOUBLE_DIFF, record.diff, "<f8")
    return chunks


def chunks_size(chunks):
    return sum(len(c) if not isinstance(c, memoryview) else c.nbytes for c in chunks)


def corrupt(path, what, detail):
    return CorruptFileError(f"{path}: truncated or corrupt {what}: {detail}")
