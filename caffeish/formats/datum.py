"""Caffe Datum records and the LMDB databases that hold them.

A Datum is one record of a Caffe Data layer's database: `channels`, `height`,
`width`, and the pixels either as `data` bytes (uint8, C x H x W, colour in
BGR order as OpenCV gives it), as `float_data`, or, when `encoded` is set, as
the bytes of an image file (PNG, JPEG) that Caffe decodes with OpenCV.  The
record's `label` is the class of a classification image; DIGITS' segmentation
datasets keep a second database of 1-channel label images instead, with the
same keys in the same order.

Here:
  * `make_datum(array, label, encoding)` builds a record (raw or PNG/JPEG) from
    a C x H x W uint8 array in Caffe's channel order; `datum_array(datum,
    color)` gives the array back, decoding encoded images the way Caffe's
    `DecodeDatumToCVMatNative` (imdecode, "unchanged") or
    `DecodeDatumToCVMat(datum, is_color)` do, with Pillow;
  * `parse_datum(value, where)` refuses a value that is not a Datum, saying
    what it looks like instead (a bare PNG file, a BlobProto, text, ...);
  * `LmdbReader` reads a database with caffeish.formats.lmdb_file (pread, every
    page checked; no lock file, so reading never writes into the user's folder,
    and a truncated or corrupt database is an error, never a crash); `check_pair`
    refuses a features/labels pair whose keys differ; `LmdbWriter` writes with
    py-lmdb in batched transactions and doubles the map size whenever it fills up.

The numpy <-> Datum conversions of pycaffe (`caffe.io.array_to_datum`,
`datum_to_array`) live in caffeish.formats.arrays; this module builds on them.
"""
import io
import itertools
import os
import stat

import numpy as np

from caffeish.errors import CaffeishError
from caffeish.formats.schema import pb
from caffeish.formats.arrays import array_to_datum, datum_to_array
from caffeish.formats.lmdb_file import DamagedLmdbError, LmdbError, LmdbFile

ENCODINGS = ("none", "png", "jpg")
IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
DEFAULT_MAP_SIZE = 1 << 26  # 64 MiB; LmdbWriter doubles it as needed
DEFAULT_TXN_RECORDS = 256  # records per write transaction, at most
DEFAULT_TXN_BYTES = 16 << 20  # and at most this many bytes of values


class NotDatumError(CaffeishError):
    """A database record that is not a serialized Caffe Datum."""


# ---------------------------------------------------------------------------- images


def image_format(data):
    """'PNG', 'JPEG', ... when `data` starts like an image file, else None."""
    head = bytes(data[:8])
    for magic, name in IMAGE_MAGIC:
        if head.startswith(magic):
            return name
    return None


def encode_image(array, encoding="png"):
    """PNG or JPEG bytes of a C x H x W uint8 array in Caffe's order (BGR for 3 channels, BGRA for 4).

    The file holds RGB(A) pixels, as OpenCV's imencode writes a BGR image, so
    Caffe's decoder gives the array back (exactly, for PNG).
    """
    from PIL import Image

    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[0] not in (1, 3, 4):
        raise CaffeishError(
            f"cannot encode an array of shape {array.shape} and type {array.dtype} as an image; "
            f"give uint8 C x H x W with 1, 3 or 4 channels"
        )
    if array.shape[0] == 1:
        img = Image.fromarray(array[0], "L")
    else:
        order = [2, 1, 0] + ([3] if array.shape[0] == 4 else [])
        img = Image.fromarray(np.ascontiguousarray(array[order].transpose(1, 2, 0)),
                              "RGB" if array.shape[0] == 3 else "RGBA")
    buf = io.BytesIO()
    if encoding == "png":
        img.save(buf, format="PNG", compress_level=1)
    elif encoding in ("jpg", "jpeg"):
        if array.shape[0] == 4:
            raise CaffeishError("JPEG cannot hold 4 channels; use --encoding png or none")
        img.save(buf, format="JPEG", quality=90)
    else:
        raise CaffeishError(f"unknown image encoding '{encoding}'; choose png or jpg")
    return buf.getvalue()


def _chw(arr):
    return arr[np.newaxis] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def encoded_shape(data, where="an encoded Datum"):
    """(C, H, W) of encoded image bytes as decode_image would give them (color=None), from the header
    alone; a CaffeishError when the bytes are not an image Pillow opens (or claim too many pixels)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            mode, (width, height) = img.mode, img.size
    except Exception as e:  # Pillow raises many types for undecodable data (DecompressionBombError too)
        kind = image_format(data) or "image"
        raise CaffeishError(f"{where}: cannot decode its {kind} bytes ({e})") from None
    channels = 1 if mode in ("1", "L", "I", "F") or mode.startswith("I;16") else 4 if mode in (
        "RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info) else 3
    return channels, height, width


def decode_image(data, color=None, where="an encoded Datum"):
    """Decode image bytes into C x H x W uint8, as OpenCV's imdecode gives them to Caffe.

    color=None is imdecode's "unchanged" (Caffe's DecodeDatumToCVMatNative):
    grey stays 1 channel, colour becomes BGR, an alpha channel (or a palette
    with transparency) gives BGRA.  color=True forces 3-channel BGR and
    color=False 1-channel grey (transform_param force_color / force_gray).
    Caffe's DataTransformer takes 8-bit images only; 16-bit and float images
    are refused.
    """
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(bytes(data)))
        img.load()
    except Exception as e:  # Pillow raises many types for undecodable data
        kind = image_format(data) or "image"
        raise CaffeishError(f"{where}: cannot decode its {kind} bytes ({e})") from None
    if color is not None:  # forced colour/grey: imdecode's IMREAD_COLOR / IMREAD_GRAYSCALE (16-bit -> high byte)
        from caffeish.formats.images import pil_pixels

        arr = pil_pixels(img, gray=not color)
        arr = arr[:, :, ::-1] if arr.shape[2] == 3 else arr
        return np.ascontiguousarray(arr.transpose(2, 0, 1))
    else:
        mode = img.mode
        if mode in ("I", "F") or mode.startswith("I;16"):
            raise CaffeishError(
                f"{where}: a {mode} (16-bit or float) image; Caffe's DataTransformer takes 8-bit images only"
            )
        if mode in ("1", "L"):
            img = img.convert("L")
        elif mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif mode in ("LA", "PA", "RGBA", "La", "RGBa"):
            img = img.convert("RGBA")
        elif mode != "RGB":
            img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 3:
        order = [2, 1, 0, 3][: arr.shape[2]]
        arr = arr[:, :, order]
    return np.ascontiguousarray(_chw(arr))


# ---------------------------------------------------------------------------- datums


def make_datum(array, label=0, encoding="none"):
    """A Datum of a C x H x W array (Caffe's channel order), raw or encoded as PNG/JPEG.

    Raw uint8 arrays go to `data`, other types to `float_data`.  Encoded
    records also carry channels/height/width, as DIGITS writes them.
    """
    array = np.asarray(array)
    if encoding in (None, "none", "raw"):
        return array_to_datum(array, int(label))
    datum = pb.Datum()
    datum.channels, datum.height, datum.width = (int(d) for d in array.shape)
    datum.data = encode_image(array, encoding)
    datum.encoded = True
    datum.label = int(label)
    return datum


def datum_encoding(datum):
    """'raw', 'float' or the image format of an encoded Datum ('PNG', 'JPEG', ...)."""
    if datum.encoded:
        return image_format(datum.data) or "encoded"
    return "raw" if len(datum.data) else "float"


def datum_array(datum, color=None, where="a Datum"):
    """The C x H x W array of a Datum: uint8 for `data` and encoded images, float32 for `float_data`.

    `color` applies to encoded records only (see decode_image), as in Caffe.
    """
    if datum.encoded:
        return decode_image(datum.data, color, where)
    try:
        arr = datum_to_array(datum)
    except CaffeishError as e:
        raise NotDatumError(f"{where}: {e}") from None
    return arr if arr.dtype == np.uint8 else arr.astype(np.float32)


def datum_shape(datum, color=None, where="a Datum"):
    """(C, H, W) of a Datum without decoding raw pixels (encoded images are decoded)."""
    if datum.encoded:
        return tuple(datum_array(datum, color, where).shape)
    return (datum.channels, datum.height, datum.width)


def parse_datum(value, where="a record"):
    """A pb.Datum from serialized bytes, or NotDatumError saying what the bytes look like."""
    value = bytes(value)
    try:
        datum = pb.Datum.FromString(value)
    except Exception:  # protobuf's DecodeError and friends
        datum = None
    problem = None if datum is None else _datum_problem(datum)
    if datum is None or problem:
        found = describe_value(value)
        why = f" ({problem})" if datum is not None and problem and found.startswith(f"{len(value)} bytes") else ""
        raise NotDatumError(f"{where} is not a Caffe Datum: found {found}{why}")
    return datum


def _datum_problem(datum):
    """Why a parsed Datum cannot be one Caffe wrote, or None."""
    if datum.encoded:
        return None if image_format(datum.data) else "encoded, but its data is not a PNG/JPEG/BMP/GIF/TIFF file"
    count = datum.channels * datum.height * datum.width
    if min(datum.channels, datum.height, datum.width) <= 0:
        return f"channels x height x width = {datum.channels} x {datum.height} x {datum.width}"
    if len(datum.data) == count or (not len(datum.data) and len(datum.float_data) == count):
        return None
    return (f"{len(datum.data)} data bytes and {len(datum.float_data)} float_data values for "
            f"{datum.channels} x {datum.height} x {datum.width}")


def describe_value(value):
    """A short description of a database value that is not a Datum."""
    value = bytes(value)
    kind = image_format(value)
    if kind:
        return f"a bare {kind} image file ({len(value):,} bytes), not wrapped in a Datum"
    if value.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    if value[:1] == b"\x80" and value[-1:] == b".":
        return "a Python pickle"
    if not value:
        return "an empty value"
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        snippet = text if len(text) <= 40 else text[:40] + "..."
        return f"text {snippet!r}"
    inner = _annotated_datum(value)
    if inner:
        return inner
    try:
        blob = pb.BlobProto.FromString(value)
        if len(blob.data) or len(blob.double_data):
            return "a Caffe BlobProto (an array, as in a mean file), not a Datum"
    except Exception:
        pass
    return f"{len(value):,} bytes of unrecognized data starting {value[:8].hex(' ')}"


def _annotated_datum(value):
    """'an AnnotatedDatum ...' when the value is the SSD fork's wrapper around a Datum."""
    # field 1, length-delimited: the wrapped Datum
    if value[:1] != b"\x0a":
        return None
    length, shift, i = 0, 0, 1
    while i < len(value) and i < 6:
        b = value[i]
        length |= (b & 0x7F) << shift
        shift += 7
        i += 1
        if not b & 0x80:
            break
    inner = value[i:i + length]
    if len(inner) != length:
        return None
    try:
        if _datum_problem(pb.Datum.FromString(inner)) is None:
            return "an AnnotatedDatum (the SSD Caffe fork's record, a Datum plus boxes), not a plain Datum"
    except Exception:
        pass
    return None


# ---------------------------------------------------------------------------- LMDB


def _lmdb():
    import lmdb

    return lmdb


def _listing(path):
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return ""
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"; it holds: {shown}" if names else "; it is empty"


def _data_file(path):
    """(data file, st) of an LMDB path (a folder holding data.mdb, or the data file itself), checked:
    it must be a regular file (a link to /dev/zero, a FIFO or a folder is refused before it is read)."""
    if not os.path.lexists(path):
        raise LmdbError(f"{path}: no such LMDB database")
    data = os.path.join(path, "data.mdb") if os.path.isdir(path) else path
    if data != path and not os.path.lexists(data):
        hint = ""
        if os.path.isdir(os.path.join(path, "features")):
            hint = "; it looks like a DIGITS dataset stage: its databases are 'features' and 'labels'"
        elif os.path.isdir(os.path.join(path, "train_db")):
            hint = "; it looks like a dataset folder: its databases are under train_db/ and val_db/"
        raise LmdbError(f"{path}: not an LMDB database (no data.mdb){hint or _listing(path)}")
    try:
        st = os.stat(data)
    except OSError as e:
        raise LmdbError(f"{data}: cannot read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        what = ("a folder" if stat.S_ISDIR(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or
                stat.S_ISBLK(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file")
        link = f" (a link to {os.path.realpath(data)})" if os.path.islink(data) else ""
        raise DamagedLmdbError(f"{data}: is {what}{link}, not an LMDB data file")
    if not st.st_size:
        raise DamagedLmdbError(f"{data}: is an empty file, not an LMDB database")
    return data, st


class LmdbReader:
    """A read-only view of an LMDB database of Datums, in key order (Caffe's cursor order).

    `path` is the database directory (data.mdb inside) or the data file itself.  The
    file is read with caffeish.formats.lmdb_file (pread, every page checked), never
    through LMDB's memory map: nothing is written into the user's folder (no
    lock.mdb), and a damaged database (truncated, corrupt, a data.mdb that is not a
    regular file) is a DamagedLmdbError naming it, never a crash.
    """

    _file = None

    def __init__(self, path):
        self.path = os.fspath(path)
        data, _ = _data_file(self.path)
        self._file = LmdbFile(data, shown=self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _open_file(self):
        if self._file is None:
            raise LmdbError(f"{self.path}: the database was closed")
        return self._file

    def __len__(self):
        return len(self._open_file())

    def items(self, start=None, values=True):
        """(key, value bytes) in key order, from `start` (the first key >= start) or the first record
        (values=False: keys only, with None for each value)."""
        for key, value in self._open_file().items(values):
            if start is None or key >= start:
                yield key, value

    def keys(self):
        """The keys in order (bytes), without reading the values."""
        for key, _ in self.items(values=False):
            yield key

    def datums(self, start=None):
        """(key, Datum) in key order; a value that is not a Datum raises NotDatumError."""
        for key, value in self.items(start):
            yield key, parse_datum(value, self.where(key))

    def where(self, key):
        return f"record {key.decode('ascii', 'backslashreplace')!r} of {self.path}"

    def first(self):
        """The first (key, Datum), or a CaffeishError when the database is empty."""
        for item in self.datums():
            return item
        raise LmdbError(f"{self.path}: the LMDB database holds no records")

    def get(self, key):
        value = self._open_file().get(key)
        return None if value is None else parse_datum(value, self.where(key))


def check_pair(features, labels):
    """A LmdbError unless the two databases of one stage (DIGITS' features and labels) hold the same keys:
    their records are paired by position, so one lost record would pair every later image with the
    wrong labels."""
    def shown(key):
        return "(none)" if key is None else repr(key.decode("ascii", "backslashreplace"))

    with LmdbReader(features) as fr, LmdbReader(labels) as lr:
        nf = nl = 0
        first = None
        for i, (fk, lk) in enumerate(itertools.zip_longest(fr.keys(), lr.keys())):
            nf, nl = nf + (fk is not None), nl + (lk is not None)
            if first is None and fk != lk:
                first = f"record {i} has the key {shown(fk)} in {features} but {shown(lk)} in {labels}"
    if nf != nl:
        raise LmdbError(f"{features} holds {nf:,} records but {labels} holds {nl:,} ({first}): the features and "
                        f"labels of one stage pair up one to one (a lost record? build the dataset again)")
    if first is not None:
        raise LmdbError(f"{first}: the features and labels of one stage must have the same keys (build the "
                        f"dataset again)")


def sibling_pair(path):
    """(features, labels) when `path` is one of the two databases of a DIGITS stage folder and the other
    exists beside it, else None."""
    folder, name = os.path.split(os.path.normpath(os.fspath(path)))
    other = {"features": "labels", "labels": "features"}.get(name)
    if other is None or not os.path.lexists(os.path.join(folder, other)):
        return None
    pair = {name: os.path.join(folder, name), other: os.path.join(folder, other)}
    return pair["features"], pair["labels"]


class BatchCursor:
    """Caffe's Data-layer cursor: records in key order, `take(n)` at a time, wrapping at the end.

    It walks the database forward once per pass (first, next, ..., first again), never searching
    for a key."""

    def __init__(self, reader):
        self.reader = reader
        self._records = None

    def take(self, n):
        """The next n (key, Datum) records; after the last record comes the first again."""
        out = []
        fresh = False
        while len(out) < n:
            if self._records is None:
                self._records, fresh = self.reader.datums(), True
            before = len(out)
            for item in self._records:
                out.append(item)
                if len(out) == n:
                    break
            else:  # the end of the database: wrap around, as Caffe's "Restarting data prefetching"
                self._records = None
                if fresh and len(out) == before:
                    raise LmdbError(f"{self.reader.path}: the LMDB database holds no records")
                fresh = False
        return out


class LmdbWriter:
    """Writes (key, value) records into a new LMDB database in batched transactions.

    Records wait in memory until `txn_records` of them (or `txn_bytes` of
    values) are pending, then go in one transaction, so memory stays bounded
    whatever the size of the database.  When the map is full the transaction is dropped, the map
    size doubled, and the batch written again (a database grows as needed;
    its file holds only the pages written).
    """

    def __init__(self, path, map_size=DEFAULT_MAP_SIZE, txn_records=DEFAULT_TXN_RECORDS, txn_bytes=DEFAULT_TXN_BYTES):
        lmdb = _lmdb()
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        self.env = lmdb.open(self.path, map_size=map_size, subdir=True, max_dbs=0, sync=False,
                             metasync=False, map_async=False, readahead=False)
        self.txn_records = max(1, int(txn_records))
        self.txn_bytes = int(txn_bytes)
        self.pending = []
        self.pending_bytes = 0
        self.count = 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def put(self, key, value):
        if isinstance(value, pb.Datum):
            value = value.SerializeToString()
        self.pending.append((key, value))
        self.pending_bytes += len(value)
        if len(self.pending) >= self.txn_records or self.pending_bytes >= self.txn_bytes:
            self.flush()

    def flush(self):
        lmdb = _lmdb()
        while self.pending:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self.pending:
                        txn.put(key, value)
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
                continue
            self.count += len(self.pending)
            self.pending = []
            self.pending_bytes = 0

    def close(self):
        if self.env is None:
            return
        self.flush()
        self.env.sync(True)
        self.env.close()
        self.env = None

    def abort(self):
        self.pending = []
        self.pending_bytes = 0
        if self.env is not None:
            self.env.close()
            self.env = None
