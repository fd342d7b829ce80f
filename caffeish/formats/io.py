"""Reading and writing Caffe's files: prototxt, caffemodel and binaryproto.

* `read_prototxt(path)` parses a text NetParameter (errors name file:line:column
  and the offending token; fields from Caffe forks are named as such) and
  upgrades legacy V0/V1 nets, as Caffe's ReadNetParamsFromTextFileOrDie does.
* `read_caffemodel(path)` reads a binary NetParameter of up to 2 GB.  Weight
  blobs never go through the protobuf library: they become numpy views over
  the file's bytes (see caffeish.formats.wire).  The layer definitions, stripped of
  their blobs, are parsed by protobuf and upgraded like a prototxt.
* `read_binaryproto(path)` reads a BlobProto (mean file) into float32.
* Each reader first looks at what the file is (`file_kind`): a caffemodel
  where a prototxt is expected, a prototxt or an image where a caffemodel is
  expected (the net and the weights given in the wrong order) is one line
  saying so, for every tool, rather than a parse error about its bytes.
* `write_prototxt`, `write_caffemodel` and `write_binaryproto` write atomically
  (temp file in the same folder, then rename) and never overwrite an input.
  `atomic_outputs` stages several files and renames them only once all are
  written; `check_outputs` refuses, before any work, an output that is an
  input, lies inside an input folder, is a folder or has no folder.
"""
import contextlib
import mmap
import os
import re

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from caffeish.formats import staging, wire
from caffeish.errors import CaffeishError, CorruptFileError, ForkFieldError, ParseError
from caffeish.formats.schema import pb
from caffeish.formats.upgrade import upgrade_net

# Caffe raises the protobuf total-bytes limit to INT_MAX.
__all__ = [
    "Model", "parse_text", "read_prototxt", "is_binary_file", "file_kind", "read_net", "read_caffemodel", "read_binaryproto",
    "atomic_output", "atomic_outputs", "labelled_name", "same_file", "inside_folder", "check_outputs",
    "missing_folders", "make_folders", "remove_empty_folders", "current_umask",
    "format_prototxt", "write_prototxt", "model_chunks", "serialize_model", "write_caffemodel",
    "write_binaryproto", "MAX_BINARY_BYTES", "FORK_FIELDS", "printable", "printable_cells", "decode_text", "check_has_layers",
    "check_strings", "check_dims",
]

MAX_BINARY_BYTES = 2**31 - 1

# Net-level and layer-level field numbers (proto/caffe.proto).
NET_LAYERS_V1 = 2
NET_LAYER = 100
LAYER_NAME, LAYER_BLOBS = 1, 7
V1_NAME, V1_BLOBS, V1_V0LAYER = 4, 6, 1
V0_NAME, V0_BLOBS = 1, 50

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Image files by their first bytes (the formats Pillow and OpenCV read).
IMAGE_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"),
                    (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
NET_FIRST = "are the net and the weights given in the wrong order? (the net prototxt comes first)"
WEIGHTS_SECOND = "are the net and the weights given in the wrong order? (the weights come second)"

# Fields that Caffe forks added to the schema, and where they come from.
FORK_FIELDS = {
    "bn_param": "the SegNet/ENet/PSPNet Caffe forks (their 'BN' layer)",
    "ceil_mode": "Caffe forks with a Pooling ceil_mode switch (BVLC uses round_mode)",
    "permute_param": "the SSD Caffe fork",
    "dense_image_data_param": "the SegNet Caffe fork",
    "upsample_param": "the SegNet Caffe fork",
    "interp_param": "the DeepLab/PSPNet Caffe forks",
    "prior_box_param": "the SSD Caffe fork",
    "detection_output_param": "the SSD Caffe fork",
    "norm_param": "the SSD Caffe fork",
    "roi_pooling_param": "the Fast/Faster R-CNN Caffe forks",
    "proposal_param": "the Faster R-CNN Caffe fork",
    "batch_norm_param_fork": "a Caffe fork",
    "shuffle_channel_param": "the ShuffleNet Caffe forks",
    "upsample_param_fork": "a Caffe fork",
}


class Model:
    """A net definition with its weight blobs, as read from a caffemodel.

    `net` is the (upgraded) NetParameter with the blobs taken out of its layers;
    `blobs[i]` is the list of BlobRecords of `net.layer[i]`.  `changes` lists
    what the legacy upgrade changed (empty for a current-format file).
    """

    def __init__(self, net, blobs, changes=(), path=None):
        self.net = net
        self.blobs = list(blobs)
        self.changes = list(changes)
        self.path = path

    def layer_blobs(self):
        """{layer name: [BlobRecord, ...]} for layers that hold blobs (later duplicates win, as in Caffe)."""
        out = {}
        for layer, records in zip(self.net.layer, self.blobs):
            if records:
                out[layer.name] = records
        return out

    def arrays(self):
        """{layer name: [float32 array in its declared shape, ...]}."""
        return {name: [r.array() for r in recs] for name, recs in self.layer_blobs().items()}

    def full_message(self):
        """The NetParameter with the blobs put back (slow for big models: for tests and small files)."""
        return pb.NetParameter.FromString(serialize_model(self.net, self.blobs))


# ---------------------------------------------------------------------------- text


# A net given where a solver is read, and the other way round: (read as, taken for, names, what to pass).
_MIXED_UP = ((pb.NetParameter, pb.SolverParameter, "net", "solver", "pass the net prototxt it names"),
             (pb.SolverParameter, pb.NetParameter, "solver", "net",
              "pass the solver prototxt that names it (net: ...)"))


def _token_at(text, line, column):
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return ""
    src = lines[line - 1]
    col = max(column - 1, 0)
    m = re.match(r'\s*("[^"]*"?|[^\s{}:]+|[{}:])', src[col:])
    if not m:
        # Column may point just past the token: take the word that ends there.
        m = re.search(r'([^\s{}:]+)\s*$', src[:col])
    return m.group(1).strip() if m else ""


def parse_text(text, message, path="<string>"):
    """Parse protobuf text into `message` (a fresh instance), turning errors into ParseError."""
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        line, column = e.GetLine(), e.GetColumn()
        detail = str(e)
        detail = re.sub(r"^\d+:\d+ : ", "", detail)
        where = f"{path}:{line}:{column}" if line else path
        fork = re.search(r'has no field named "([^"]+)"', detail)
        if fork:
            field = fork.group(1)
            owner = re.search(r'Message type "caffe\.([^"]+)"', detail)
            for wanted, other, kind, other_kind, hint in _MIXED_UP:
                if (isinstance(message, wanted) and owner and owner.group(1) == wanted.__name__
                        and field in other.DESCRIPTOR.fields_by_name):
                    raise ParseError(
                        f"{where}: field '{field}' belongs to a {other_kind} definition: this looks like a "
                        f"{other_kind} prototxt ({other.__name__}), not a {kind}; {hint}") from None
            origin = FORK_FIELDS.get(field, "a fork of Caffe")
            raise ForkFieldError(
                f"{where}: field '{field}' is not a field of BVLC Caffe's "
                f"{owner.group(1) if owner else 'schema'}; it comes from {origin}, "
                f"so this file is not BVLC Caffe and caffeish cannot read it as is"
            ) from None
        token = _token_at(text, line, column) if line else ""
        near = f" (at token '{token}')" if token else ""
        raise ParseError(f"{where}: {detail}{near}") from None
    return message


def printable(text):
    """`text` with every character that is not printable escaped (\\n, \\t, \\x1b, \\u2028, ...), so that a
    name taken from a file can neither split a one-line message nor reach a terminal as an escape
    sequence.  Bytes kept by surrogateescape show as \\xNN.  Every message quoting a file's content
    goes through it (the CLI applies it to every error line)."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
            continue
        code = ord(ch)
        if ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def printable_cells(row):
    """A report row (a dict) with its text values, and the text items of its list values, escaped with
    `printable` (for the table and markdown formats; JSON escapes by itself)."""
    def cell(value):
        if isinstance(value, str):
            return printable(value)
        if isinstance(value, (list, tuple)):
            return [cell(v) for v in value]
        return value
    return {key: cell(value) for key, value in row.items()}


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_WHITESPACE = frozenset(b"\t\n\v\f\r")


def _utf16(head):
    """True when the bytes are UTF-16 text: a byte-order mark, or ASCII text with every other byte NUL."""
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return True
    n = len(head) - len(head) % 2
    if n < 8:
        return False
    for text, zeros in ((head[0:n:2], head[1:n:2]), (head[1:n:2], head[0:n:2])):
        if zeros.count(0) == len(zeros) and 0 not in text and all(32 <= c < 127 or c in _WHITESPACE for c in text):
            return True
    return False


def _mostly_text(head):
    """True for bytes a person typed in some 8-bit encoding: no control characters but whitespace, and at
    least half plain ASCII (a caffemodel's first bytes always hold field tags and lengths below 32)."""
    if not head:
        return False
    controls = sum(1 for c in head if (c < 32 and c not in _WHITESPACE) or c == 127)
    plain = sum(1 for c in head if 32 <= c < 127 or c in _WHITESPACE)
    return controls == 0 and plain * 2 >= len(head)


def _comment_start(line):
    """Where a `#` comment starts in a prototxt line (bytes), outside quoted strings; len(line) if none."""
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote is not None:
            if c == 0x5C:  # backslash: skip the escaped byte
                i += 1
            elif c == quote:
                quote = None
        elif c in (0x22, 0x27):
            quote = c
        elif c == 0x23:
            return i
        i += 1
    return len(line)


def decode_text(raw, path):
    """The text of a prototxt's bytes (UTF-8; a byte-order mark is dropped).  Bytes that are not UTF-8
    are allowed in comments, as Caffe allows them; anywhere else they are a ParseError naming the line,
    the column and the byte, and UTF-16 text is one saying so: Caffe reads prototxt files as UTF-8."""
    if _utf16(bytes(raw[:4096])):
        raise ParseError(f"{path}: this is a UTF-16 text file; Caffe reads prototxt files as UTF-8: save it as "
                         f"UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    raw = bytes(raw)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        code = line[:_comment_start(line)]
        try:
            code.decode("utf-8")
        except UnicodeDecodeError as e:
            column = len(code[:e.start].decode("utf-8", errors="replace")) + 1
            raise ParseError(
                f"{path}:{number}:{column}: a text file with an encoding problem: byte 0x{code[e.start]:02x} is not "
                f"UTF-8; Caffe reads prototxt files as UTF-8: save the file as UTF-8 (e.g. iconv -f latin1 "
                f"-t UTF-8)") from None
        lines.append(line.decode("utf-8", errors="replace"))
    return "\n".join(lines)


def _image_kind(head):
    """'PNG', 'JPEG', ... when the bytes start an image file, else None."""
    for signature, kind in IMAGE_SIGNATURES:
        if head.startswith(signature):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
        return "BMP"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "PNM"
    return None


_CONTROL = bytes(c for c in range(32) if c not in b"\t\n\v\f\r") + b"\x7f"


def _looks_text(head):
    """True for text a person wrote (a prototxt): UTF-8 without NULs or control characters.

    Stricter than `not _looks_binary`: a caffemodel always holds control bytes (its
    field tags and lengths) or bytes that are not UTF-8."""
    if head and _utf16(head):
        return True
    if not head or _looks_binary(head):
        return False
    return not any(c in _CONTROL for c in head)


def unreadable(path, e):
    """The one-line error for a file that open() refused (OSError; ValueError: a NUL byte in the name)."""
    if isinstance(e, ValueError):
        return CaffeishError(f"{path!r}: cannot read: a file name cannot hold a NUL byte")
    return CaffeishError(f"{path}: cannot read: {e.strerror or e}")


def file_kind(path, head=None):
    """What a file is, judged by its first bytes: ("image", "PNG"), ("hdf5", None), ("empty", None),
    ("text", None) or ("binary", None) (binary protobuf: a caffemodel or binaryproto)."""
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except (OSError, ValueError) as e:
            raise unreadable(path, e) from None
    head = bytes(head[:4096])
    if not head:
        return "empty", None
    image = _image_kind(head)
    if image:
        return "image", image
    if head.startswith(HDF5_SIGNATURE):
        return "hdf5", None
    if _looks_binary(head):
        return "binary", None
    return "text", None


def not_a_prototxt(path, kind, detail):
    """The one-line error for a file that is not the text a prototxt is (see file_kind), or None."""
    if kind == "image":
        return ParseError(f"{path}: this is a {detail} image, not a prototxt (the net prototxt comes first, "
                          f"images last)")
    if kind == "hdf5":
        return ParseError(f"{path}: this is an HDF5 file (.caffemodel.h5?), not a prototxt; {NET_FIRST}")
    if kind == "binary":
        return ParseError(f"{path}: this is a binary file (a caffemodel?), not a prototxt; {NET_FIRST}")
    return None


def _not_binary(path, head, what):
    """The one-line error for a file where a binary `what` (caffemodel, binaryproto) is expected that is
    an image or a text file (a prototxt), or None."""
    kind, detail = file_kind(path, head)
    if kind == "image":
        hint = " (the weights come after the net prototxt, images last)" if what == "caffemodel" else ""
        return CorruptFileError(f"{path}: this is a {detail} image, not a {what}{hint}")
    if kind == "text" and _looks_text(bytes(head[:4096])):
        hint = f"; {WEIGHTS_SECOND}" if what == "caffemodel" else ""
        return CorruptFileError(f"{path}: this is a text file (a prototxt?), not a {what}{hint}")
    return None


def _read_text_file(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except (OSError, ValueError) as e:
        raise unreadable(path, e) from None
    head = raw[:4096]
    if (b"\0" in head and not _utf16(head)) or _image_kind(head) or raw.startswith(HDF5_SIGNATURE):
        raise not_a_prototxt(path, *file_kind(path, head)) or ParseError(
            f"{path}: this is a binary file, not a prototxt; {NET_FIRST}")
    return decode_text(raw, path)


def read_prototxt(path, upgrade=True, message=None):
    """Read a text NetParameter (or another message type); returns (message, changes).

    Legacy nets are upgraded when `upgrade` is true, and `changes` lists what changed.
    """
    text = _read_text_file(path)
    net = parse_text(text, message if message is not None else pb.NetParameter(), path=str(path))
    if upgrade and isinstance(net, pb.NetParameter):
        net, changes, _ = upgrade_net(net)
        return net, changes
    return net, []


def is_binary_file(path):
    """True when the file holds binary protobuf (a caffemodel), False for text, judged by content."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise CaffeishError(f"{path}: cannot read: {e.strerror}") from None
    return _looks_binary(head)


def read_net(path, upgrade=True, caffemodel=False):
    """A NetParameter from a prototxt, judged by content (not extension).

    A caffemodel (binary) or an image where the net is expected is an error
    saying so (the net and the weights given in the wrong order), unless
    `caffemodel` is true: then a caffemodel's own layer definitions are the net.
    """
    kind, detail = file_kind(path)
    if kind == "binary" and caffemodel:
        return read_caffemodel(path, upgrade=upgrade).net
    error = not_a_prototxt(path, kind, detail)
    if error is not None:
        if caffemodel and kind == "hdf5":
            read_caffemodel(path, upgrade=upgrade)  # its own error: HDF5 weights are not read
        raise error
    net = read_prototxt(path, upgrade=upgrade)[0]
    check_has_layers(net, path)
    return net


def check_has_layers(net, path):
    """A ParseError for a net that defines no layers (an empty file, or only comments)."""
    if len(net.layer) or len(net.layers):
        return
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except OSError:
        raw = b"?"
    lines = [line.strip() for line in raw.splitlines()]
    if not any(lines):
        why = " (the file is empty)"
    elif all(not line or line.startswith(b"#") for line in lines):
        why = " (the file holds only comments)"
    else:
        why = ""
    raise ParseError(f"{path}: defines no layers{why}; a net prototxt needs at least one layer")


def _looks_binary(head):
    """True for binary protobuf; False for text, UTF-16 text and text in another 8-bit encoding included."""
    if not head:
        return False
    head = bytes(head)
    if _utf16(head):
        return False
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        # A multi-byte character cut at the end of the window is still text.
        return e.start < len(head) - 4 and not _mostly_text(head)
    return False


# ---------------------------------------------------------------------------- binary


def _binary_size(path):
    """The file's size, refused over Caffe's 2 GB protobuf limit (OSError passes through)."""
    size = os.path.getsize(path)
    if size > MAX_BINARY_BYTES:
        raise CorruptFileError(f"{path}: {size} bytes is over the 2 GB limit Caffe has for binary protobuf files")
    return size


def _read_bytes(path, what):
    try:
        size = _binary_size(path)
        buf = bytearray(size)
        with open(path, "rb", buffering=0) as f:
            n = f.readinto(buf)
    except OSError as e:
        raise CaffeishError(f"{path}: cannot read: {e.strerror}") from None
    if n != size:
        raise CorruptFileError(f"{path}: expected {size} bytes, read {n}")
    if not size:
        raise CorruptFileError(f"{path}: empty file, not a {what}")
    if buf[:8] == HDF5_SIGNATURE:
        raise CorruptFileError(
            f"{path}: this is an HDF5 file (.caffemodel.h5); caffeish reads binary protobuf {what}s only"
        )
    error = _not_binary(path, buf[:4096], what)
    if error is not None:
        raise error
    return buf


def _name_in(buf, start, end, name_field):
    try:
        for field, wire_type, _, vs, ve in wire.iter_fields(buf, start, end):
            if field == name_field and wire_type == wire.LENGTH:
                return bytes(buf[vs:ve]).decode("utf-8", errors="replace")
    except wire.Truncated:
        pass
    return None


def _strip_blobs(buf, start, end, blob_field, nested=None):
    """Split a layer message into (bytes without blobs, [BlobRecord]).

    `nested` = (field, blob_field) strips blobs of a nested V0 layer inside a V1 layer.
    """
    kept = bytearray()
    records = []
    for field, wire_type, tag_start, vs, ve in wire.iter_fields(buf, start, end):
        if field == blob_field and wire_type == wire.LENGTH:
            records.append(wire.decode_blob(buf, vs, ve))
        elif nested and field == nested[0] and wire_type == wire.LENGTH:
            inner, inner_records = _strip_blobs(buf, vs, ve, nested[1])
            records.extend(inner_records)
            kept += wire.tag(field, wire.LENGTH) + wire.encode_varint(len(inner)) + inner
        else:
            kept += buf[tag_start:ve]
    return bytes(kept), records


def _map_file(path, what):
    """The file mapped read-only (pages come in as they are scanned), with _read_bytes' checks."""
    try:
        size = _binary_size(path)
        if not size:
            raise CorruptFileError(f"{path}: empty file, not a {what}")
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CaffeishError(f"{path}: cannot read: {e.strerror}") from None
    if mapped[:8] == HDF5_SIGNATURE:
        mapped.close()
        raise CorruptFileError(
            f"{path}: this is an HDF5 file (.caffemodel.h5); caffeish reads binary protobuf {what}s only"
        )
    error = _not_binary(path, mapped[:4096], what)
    if error is not None:
        mapped.close()
        raise error
    return mapped


# Blobs are copied out of the mapping in pieces of this many bytes, each piece's
# pages dropped once copied, so even fc6's 411 MB never sits in memory twice.
COPY_PIECE = 64 << 20


def _drop_pages(mapped, start, end):
    if end <= start or not hasattr(mmap, "MADV_DONTNEED"):
        return
    lo = start - start % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, lo, end - lo)


def _copy_out(array, mapped, base):
    """An aligned, writable copy of `array`, a view into `mapped` starting at address base."""
    out = np.empty_like(array)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    step = max(1, COPY_PIECE // max(array.itemsize, 1))
    for i in range(0, flat_in.size, step):
        piece = flat_in[i:i + step]
        flat_out[i:i + step] = piece
        start = piece.ctypes.data - base
        _drop_pages(mapped, start, start + piece.nbytes)
    return out


def _own_records(records, mapped, base):
    """Copy each blob out of the mapping into its own aligned array, dropping the pages copied.

    The copies are writable and aligned (a float field sits at any byte offset in
    the file, and unaligned arrays halve BLAS speed), and dropping the mapped
    pages as we go keeps the resident memory near one copy of the weights.
    """
    for r in records:
        r.data = _copy_out(r.data, mapped, base) if r.data.base is not None else r.data
        if r.diff is not None and r.diff.base is not None:
            r.diff = _copy_out(r.diff, mapped, base)


def read_caffemodel(path, upgrade=True, copy=True):
    """Read a binary NetParameter into a Model (layer definitions + numpy blobs).

    Every blob becomes its own float32/float64 array (aligned, writable); the
    file is mapped, scanned and copied layer by layer, so the peak memory is
    about one copy of the weights.  `copy=False` leaves every blob a read-only
    view over the mapped file, read from disk only when used: checking shapes
    (e.g. weights.bind) then costs a few pages, whatever the file's size.
    """
    mapped = _map_file(path, "caffemodel")
    try:
        return _read_caffemodel(path, mapped, upgrade, copy)
    finally:
        with contextlib.suppress(BufferError):
            mapped.close()  # refused only while something still views it; then the GC closes it


def _read_caffemodel(path, buf, upgrade, copy=True):
    mv = memoryview(buf)
    base = np.frombuffer(mv, dtype=np.uint8, count=1).ctypes.data  # the mapping's address
    skeleton = bytearray()
    blobs = []
    index = 0
    current = None
    try:
        for field, wire_type, tag_start, vs, ve in wire.iter_fields(mv, 0, len(buf)):
            if field in (NET_LAYER, NET_LAYERS_V1) and wire_type == wire.LENGTH:
                if field == NET_LAYER:
                    current = _name_in(mv, vs, ve, LAYER_NAME)
                    stripped, records = _strip_blobs(mv, vs, ve, LAYER_BLOBS)
                else:
                    current = _name_in(mv, vs, ve, V1_NAME)
                    stripped, records = _strip_blobs(mv, vs, ve, V1_BLOBS, nested=(V1_V0LAYER, V0_BLOBS))
                if copy:
                    _own_records(records, buf, base)
                skeleton += wire.tag(field, wire.LENGTH) + wire.encode_varint(len(stripped)) + stripped
                blobs.append(records)
                index += 1
            else:
                skeleton += mv[tag_start:ve]
    except wire.Truncated as e:
        where = f"in layer #{index}" + (f" '{current}'" if current else "")
        raise wire.corrupt(path, "caffemodel", f"{where}: {e}{_text_hint(buf)}") from None
    try:
        net = pb.NetParameter.FromString(bytes(skeleton))
    except DecodeError as e:
        raise wire.corrupt(path, "caffemodel", f"the layer definitions do not parse ({e}){_text_hint(buf)}") from None
    if not len(net.layer) and not len(net.layers):
        raise wire.corrupt(path, "caffemodel", f"no layers found{_text_hint(buf) or ' (is this really a caffemodel?)'}")
    check_strings(net, path)
    for records, name in zip(blobs, _layer_names(net)):
        for i, r in enumerate(records):
            check_dims(r, path, f"layer '{printable(name)}' blob {i}")
            if r.data.size != r.count:
                raise CorruptFileError(
                    f"{path}: layer '{name}' blob {i}: declared shape {r.declared_shape} "
                    f"holds {r.count} values but the file has {r.data.size}"
                )
    changes = []
    if upgrade:
        # Per-layer blob lists follow the layer they came from through the upgrade.
        source = blobs
        net, changes, origin = upgrade_net(net)
        blobs = [source[o] if o is not None else [] for o in origin]
    return Model(net, blobs, changes, path=path)


def check_dims(record, path, where):
    """A CorruptFileError for a blob whose declared shape has a negative dimension."""
    shape = record.declared_shape
    if any(d < 0 for d in shape):
        raise CorruptFileError(f"{path}: {where}: declared shape {tuple(shape)} has a negative dimension")


def _bad_string(message, where=""):
    """(field path, raw bytes) of the first string field of `message` that is not UTF-8, or None.

    protobuf hands such a field back as bytes instead of str (and fails later, when it is copied)."""
    for field, value in message.ListFields():
        repeated = field.is_repeated
        values = list(value) if repeated else [value]
        for i, v in enumerate(values):
            here = f"{where}{field.name}" + (f"[{i}]" if repeated else "")
            if field.type == field.TYPE_STRING and isinstance(v, bytes):
                return here, v
            if field.type == field.TYPE_MESSAGE:
                found = _bad_string(v, here + ".")
                if found:
                    return found
    return None


def check_strings(message, path):
    """A CorruptFileError naming the first string field (a layer name, a top, ...) that is not UTF-8 text."""
    found = _bad_string(message)
    if found:
        field, raw = found
        shown = printable(raw.decode("utf-8", errors="surrogateescape"))
        raise CorruptFileError(f"{path}: {field} is not UTF-8 text ('{shown}'); Caffe's names and other "
                               f"strings are UTF-8")


def _text_hint(buf):
    return "" if _looks_binary(bytes(buf[:4096])) else " (the file is text: is it a prototxt?)"


def _layer_names(net):
    if len(net.layer):
        return [layer.name for layer in net.layer]
    # V1 layers; a V0 net keeps the name inside the nested V0 layer.
    return [layer.name or layer.layer.name for layer in net.layers]


def read_binaryproto(path):
    """Read a BlobProto file (e.g. a mean file) as a float32 array in its declared shape."""
    buf = _read_bytes(path, "binaryproto")
    try:
        record = wire.decode_blob(memoryview(buf), 0, len(buf))
    except wire.Truncated as e:
        raise wire.corrupt(path, "binaryproto", str(e)) from None
    check_dims(record, path, "the blob")
    if record.data.size != record.count:
        raise CorruptFileError(
            f"{path}: declared shape {record.declared_shape} holds {record.count} values "
            f"but the file has {record.data.size}"
        )
    return record.array()


# ---------------------------------------------------------------------------- writing


def current_umask():
    """The process's umask (the mode bits new files and folders do not get)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path, inputs=()):
    """Open a temp file beside `path` for binary writing; rename it over `path` on success.

    Refuses to write over any of `inputs` (inputs are never modified).  The temp file is named
    `.NAME.PID-XXXXXXXX.tmp`; those that killed runs left in the folder are removed first
    (caffeish.formats.staging).
    """
    path = os.fspath(path)
    for src in inputs:
        if src is not None and same_file(path, src):
            raise CaffeishError(f"{path}: refusing to overwrite an input file; choose another output path")
    folder = os.path.dirname(os.path.abspath(path))
    staging.recover(folder)
    fd, tmp = staging.temp_file(path)
    try:
        # mkstemp makes the file owner-only (0600); give it the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        staging.mark_clean(folder)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):
            raise CaffeishError(f"{path}: cannot write: {e.strerror or e} (nothing was written)") from None
        raise


@contextlib.contextmanager
def atomic_outputs(paths, inputs=()):
    """Several outputs all or nothing: yields one open binary temp file per path (beside it).

    On success every temp file is flushed, synced and closed first; then a journal of the
    renames is written and synced in each output folder, the temps are renamed into place and
    the journal removed (caffeish.formats.staging.commit_files).  If anything fails before the
    journal exists, no destination is touched and the temps are removed.  A run killed during
    the renames leaves the journal, which the next run writing into any of those folders
    completes (it also removes the temps of runs killed earlier): once anyone writes there
    again, the outputs are all old or all new.  (A rename failing in a live run, which a full
    disk cannot cause, raises RenameError and leaves the files renamed before it.)
    """
    paths = [os.fspath(p) for p in paths]
    for path in paths:
        for src in inputs:
            if src is not None and same_file(path, src):
                raise CaffeishError(f"{path}: refusing to overwrite an input file; choose another output path")
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in paths):
        staging.recover(folder)
    staged, files, committed = [], [], False
    try:
        mode = 0o666 & ~current_umask()
        for path in paths:
            fd, tmp = staging.temp_file(path)
            staged.append(tmp)
            os.fchmod(fd, mode)
            files.append(os.fdopen(fd, "wb"))
        yield files
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        staging.commit_files(list(zip(staged, paths)))
        committed = True
        for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in paths):
            staging.mark_clean(folder)
    finally:
        for f in files:
            with contextlib.suppress(OSError):
                f.close()
        if not committed:
            for tmp in staged:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _labelled(item):
    """(option, path) from a path or an (option, path) pair."""
    return tuple(item) if isinstance(item, (tuple, list)) else (None, item)


def labelled_name(option, path):
    """How a message names a path: 'OPTION PATH', or OPTION with '{}' replaced by the path."""
    if not option:
        return os.fspath(path)
    return option.replace("{}", os.fspath(path)) if "{}" in option else f"{option} {os.fspath(path)}"


def same_file(a, b):
    """Whether two paths name one file (symlinks and hard links included; either may not exist yet)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def inside_folder(path, folder):
    """Whether `path` lies inside the existing folder `folder` (real paths: links followed)."""
    if not os.path.isdir(folder):
        return False
    real, root = os.path.realpath(path), os.path.realpath(folder)
    try:
        return real != root and os.path.commonpath([real, root]) == root
    except ValueError:  # different drives
        return False


def missing_folders(path):
    """The folders to create for the file `path` (outermost first; [] when its folder exists).

    A CaffeishError when they cannot be: the nearest existing ancestor is not a
    folder, or we may not write in it (the rule of `segment -o`)."""
    folder = os.path.dirname(os.path.abspath(path))
    missing = []
    while not os.path.lexists(folder):
        missing.insert(0, folder)
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise CaffeishError(f"cannot create the folder {missing[-1]}: {folder} is not a folder" if missing
                            else f"{folder} is not a folder")
    if not missing:
        return []
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CaffeishError(f"cannot create the folder {missing[-1]}: no permission to write in {folder}")
    return missing


def make_folders(paths):
    """Create the missing folders of the files `paths`; returns those created (outermost first), for
    remove_empty_folders when the run fails."""
    created = []
    try:
        for path in paths:
            for folder in missing_folders(path):
                os.mkdir(folder)
                created.append(folder)
    except OSError as e:
        remove_empty_folders(created)
        raise CaffeishError(f"cannot create the folder {e.filename}: {e.strerror}") from None
    except BaseException:
        remove_empty_folders(created)
        raise
    return created


def remove_empty_folders(folders):
    """Remove folders a failed run created (innermost first), where still empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def check_outputs(outputs, inputs=(), create_folders=False):
    """Refuse, before any work, output paths that would modify an input or cannot be written.

    outputs and inputs are paths or (option, path) pairs (the option names the
    path in the message, see labelled_name).  An output is refused when it is an input file, lies
    inside an input folder (inputs are never modified, datasets included), is a
    folder, has no existing parent folder (with create_folders: a parent that
    cannot be created, see missing_folders), or names the same file as an
    earlier output.  Each error is one line ending in "(nothing was written)".
    """
    outputs = [_labelled(o) for o in outputs if o and _labelled(o)[1]]
    inputs = [_labelled(i) for i in inputs if i and _labelled(i)[1]]
    name = labelled_name

    for k, (option, out) in enumerate(outputs):
        out = os.fspath(out)
        if os.path.isdir(out):
            raise CaffeishError(f"{name(option, out)}: is a folder; give a file path for this output "
                                "(nothing was written)")
        folder = os.path.dirname(os.path.abspath(out))
        if create_folders:
            try:
                missing_folders(out)
            except CaffeishError as e:
                raise CaffeishError(f"{name(option, out)}: {e} (nothing was written)") from None
        elif not os.path.isdir(folder):
            raise CaffeishError(f"{name(option, out)}: the folder {folder} does not exist (nothing was written)")
        for src_option, src in inputs:
            if same_file(out, src):
                raise CaffeishError(f"{name(option, out)}: refusing to overwrite an input file "
                                    f"({name(src_option, src)}); choose another output path (nothing was written)")
            if inside_folder(out, src):
                raise CaffeishError(f"{name(option, out)}: lies inside the input folder {name(src_option, src)}; "
                                    "inputs are never modified: choose a path outside it (nothing was written)")
        for _, other in outputs[:k]:
            if same_file(out, other):
                raise CaffeishError(f"two outputs are the same file '{out}'"
                                    + ("" if out == os.fspath(other) else f" (also given as '{other}')")
                                    + "; give each output its own path (nothing was written)")


def format_prototxt(net):
    return text_format.MessageToString(net)


def write_prototxt(path, net, inputs=()):
    with atomic_output(path, inputs) as f:
        f.write(format_prototxt(net).encode("utf-8"))


def _layer_chunks(layer, records, field=NET_LAYER, blob_field=LAYER_BLOBS):
    """A layer's bytes with its blobs spliced in at their field-number position."""
    body = layer.SerializeToString()
    # Find where fields numbered above blob_field start, so the output is in
    # canonical field order, as Caffe (C++ protobuf) writes it.
    split = len(body)
    for f, _, tag_start, _, _ in wire.iter_fields(body, 0, len(body)):
        if f > blob_field:
            split = tag_start
            break
    chunks = [body[:split]]
    for r in records:
        if not isinstance(r, wire.BlobRecord):
            r = wire.BlobRecord.from_array(r)
        enc = wire.encode_blob(r)
        chunks += [wire.tag(blob_field, wire.LENGTH), wire.encode_varint(wire.chunks_size(enc))] + enc
    chunks.append(body[split:])
    return [wire.tag(field, wire.LENGTH), wire.encode_varint(wire.chunks_size(chunks))] + chunks


def model_chunks(net, blobs):
    """Byte chunks of a NetParameter with blobs (arrays or BlobRecords) per layer."""
    head = pb.NetParameter()
    head.CopyFrom(net)
    del head.layer[:]
    del head.layers[:]
    if len(net.layers):
        raise CaffeishError("refusing to write a V1 (legacy) net: upgrade it first")
    if len(blobs) != len(net.layer):
        raise CaffeishError(f"{len(blobs)} blob lists for {len(net.layer)} layers")
    chunks = [head.SerializeToString()]
    for layer, records in zip(net.layer, blobs):
        if len(layer.blobs):
            raise CaffeishError(f"layer '{layer.name}': blobs must be passed separately, not inside the layer")
        chunks += _layer_chunks(layer, records or [])
    return chunks


def serialize_model(net, blobs):
    return b"".join(bytes(c) for c in model_chunks(net, blobs))


def write_caffemodel(path, net, blobs, inputs=()):
    """Write a binary NetParameter: `net` without blobs, `blobs[i]` the arrays/BlobRecords of layer i."""
    chunks = model_chunks(net, blobs)
    total = wire.chunks_size(chunks)
    if total > MAX_BINARY_BYTES:
        raise CaffeishError(f"{path}: the model would be {total} bytes, over Caffe's 2 GB limit")
    with atomic_output(path, inputs) as f:
        for c in chunks:
            f.write(c)


def write_binaryproto(path, array, inputs=()):
    record = wire.BlobRecord.from_array(np.asarray(array, dtype=np.float32))
    with atomic_output(path, inputs) as f:
        for c in wire.encode_blob(record):
            f.write(c)
