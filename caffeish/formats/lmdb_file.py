"""A read-only LMDB reader in Python that a damaged file cannot crash.

LMDB (and py-lmdb over it) reads a database through a memory map and trusts
every page: a data.mdb cut short makes the process die of SIGBUS as soon as a
page past the end is touched, and a corrupted size or page number sends it
reading past the end (py-lmdb even touches a value's pages before handing it
over).  Caffe's databases are simple (one unnamed B+tree of keys and values,
no duplicates), so they are read here from the file itself with `os.pread`:
every page is checked before it is used (its number, its kind, the bounds of
its nodes, keys and values, the overflow pages a large value spans), and
anything wrong is an LmdbFormatError naming the page, never a signal.

The layout is LMDB's on-disk format (mdb.c, data version 1: LMDB 0.9, the one
Caffe, DIGITS and py-lmdb write), little-endian, 64-bit page numbers:

    page      : pgno u64, pad u16, flags u16, lower u16, upper u16 (overflow: page count u32), then
                `lower - 16` / 2 node offsets (u16, from the page start)
    meta      : pages 0 and 1 (the one with the larger txnid is current), at byte 16: magic u32
                (0xBEEFC0DE), version u32, address u64, mapsize u64, the free and main trees
                (pad u32 = page size for the free tree, flags u16, depth u16, branch, leaf and overflow
                page counts, entries, root: u64 each), last page u64, txnid u64
    node      : lo u16, hi u16, flags u16, key size u16, key, data.  Branch: child page lo | hi << 16 |
                flags << 32.  Leaf: data size lo | hi << 16; with F_BIGDATA the data is the u64 number
                of the first overflow page, the value starting 16 bytes into it
"""
import os
import struct

from caffeish.errors import CaffeishError

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
P_BRANCH, P_LEAF, P_OVERFLOW, P_META, P_LEAF2 = 0x01, 0x02, 0x04, 0x08, 0x20
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
MDB_DUPSORT = 0x04
P_INVALID = (1 << 64) - 1
PAGE_HEADER = 16
NODE_HEADER = 8
MAX_DEPTH = 64

_HEADER = struct.Struct("<QHHHH")
_META = struct.Struct("<IIQQ" + "IHHQQQQQ" * 2 + "QQ")
_NODE = struct.Struct("<HHHH")
_PGNO = struct.Struct("<Q")


class LmdbError(CaffeishError):
    """A database that cannot be read: missing, not an LMDB database, truncated or corrupt."""


class DamagedLmdbError(LmdbError):
    """A database that is there but cannot be read: not LMDB, truncated, corrupt, not a regular file."""


LmdbFormatError = DamagedLmdbError


class LmdbFile:
    """One LMDB data file, read with pread: `len()`, `items()` in key order, `get(key)`."""

    def __init__(self, path, shown=None):
        self.path = os.fspath(path)
        self.shown = shown or self.path
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise LmdbFormatError(f"{self.shown}: cannot read: {e.strerror}") from None
        try:
            self.size = os.fstat(self.fd).st_size
            self._read_meta()
        except BaseException:
            self.close()
            raise

    def close(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()

    def error(self, detail):
        return LmdbFormatError(f"{self.shown}: corrupt LMDB database: {detail}")

    # -- the file ---------------------------------------------------------------------------
    def _pread(self, size, offset, what):
        try:
            data = os.pread(self.fd, size, offset)
        except (OSError, OverflowError) as e:
            raise self.error(f"cannot read {what} at byte {offset:,} ({getattr(e, 'strerror', None) or e})") from None
        if len(data) != size:
            raise self.error(f"{what} at byte {offset:,} runs past the end of the file ({self.size:,} bytes)")
        return data

    def _read_meta(self):
        head = os.pread(self.fd, PAGE_HEADER + _META.size, 0)
        if len(head) < PAGE_HEADER + _META.size or struct.unpack_from("<I", head, PAGE_HEADER)[0] != MAGIC:
            raise LmdbFormatError(f"{self.shown}: not an LMDB database (no LMDB header: "
                                  f"{'an empty file' if not self.size else 'another kind of file'})")
        psize = _META.unpack_from(head, PAGE_HEADER)[4]  # the free tree's pad holds the page size
        if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
            raise self.error(f"page size {psize} in its header")
        self.psize = psize
        metas = []
        for pgno in (0, 1):
            page = os.pread(self.fd, PAGE_HEADER + _META.size, pgno * psize)
            if len(page) < PAGE_HEADER + _META.size:
                continue
            fields = _META.unpack_from(page, PAGE_HEADER)
            if fields[0] == MAGIC and _HEADER.unpack_from(page)[2] & P_META:
                metas.append(fields)
        if not metas:
            raise self.error("neither meta page is valid")
        meta = max(metas, key=lambda m: m[-1])  # the newest commit
        if meta[1] != DATA_VERSION:
            raise LmdbFormatError(f"{self.shown}: LMDB data version {meta[1]}; caffeish reads version "
                                  f"{DATA_VERSION} (LMDB 0.9, what Caffe and DIGITS write)")
        main = meta[12:20]
        flags, self.depth, self.entries, self.root, self.last_page = main[1], main[2], main[6], main[7], meta[20]
        if flags & MDB_DUPSORT:
            raise LmdbFormatError(f"{self.shown}: a database with duplicate keys (MDB_DUPSORT); Caffe's "
                                  f"databases have one value per key")
        pages = self.last_page + 1
        if self.size < pages * psize:
            raise LmdbFormatError(
                f"{self.shown}: truncated LMDB database: the file has {self.size:,} bytes but its header counts "
                f"{pages:,} pages of {psize:,} bytes ({pages * psize:,} bytes); the file was cut short (copy or "
                f"build it again)")

    def __len__(self):
        return int(self.entries)

    # -- pages ------------------------------------------------------------------------------
    def _page(self, pgno, kinds):
        """(bytes, flags, [node offsets]) of a branch or leaf page, checked."""
        if not 2 <= pgno <= self.last_page:
            raise self.error(f"a reference to page {pgno:,}, outside pages 2..{self.last_page:,}")
        page = self._pread(self.psize, pgno * self.psize, f"page {pgno:,}")
        number, _, flags, lower, upper = _HEADER.unpack_from(page)
        if number != pgno:
            raise self.error(f"page {pgno:,} says it is page {number:,}")
        if flags & P_LEAF2 or not flags & kinds:
            raise self.error(f"page {pgno:,} has flags 0x{flags:x}, not a {'branch or leaf' if kinds == 3 else 'leaf'} page")
        if not (PAGE_HEADER <= lower <= upper <= self.psize) or (lower - PAGE_HEADER) % 2:
            raise self.error(f"page {pgno:,}: bad bounds (lower {lower}, upper {upper})")
        count = (lower - PAGE_HEADER) // 2
        offsets = struct.unpack_from(f"<{count}H", page, PAGE_HEADER)
        for i, off in enumerate(offsets):
            if not upper <= off <= self.psize - NODE_HEADER:
                raise self.error(f"page {pgno:,}: node {i} at offset {off} lies outside the page's nodes")
        return page, flags, offsets

    def _node(self, page, pgno, off):
        """(flags, key, size field, data start) of the node at `off`, its key inside the page."""
        lo, hi, flags, ksize = _NODE.unpack_from(page, off)
        start = off + NODE_HEADER
        if start + ksize > self.psize:
            raise self.error(f"page {pgno:,}: a key of {ksize} bytes runs past the page")
        return lo, hi, flags, page[start:start + ksize], start + ksize

    def _children(self, page, pgno, offsets):
        for off in offsets:
            lo, hi, flags, key, _ = self._node(page, pgno, off)
            yield key, lo | hi << 16 | flags << 32

    def _value(self, page, pgno, lo, hi, flags, data_start, key):
        size = lo | hi << 16
        if flags & (F_SUBDATA | F_DUPDATA):
            raise LmdbFormatError(f"{self.shown}: record {key!r} is a named sub-database or has duplicates "
                                  f"(node flags 0x{flags:x}); Caffe's databases hold plain values")
        if not flags & F_BIGDATA:
            if data_start + size > self.psize:
                raise self.error(f"page {pgno:,}: the value of {key!r} ({size:,} bytes) runs past the page")
            return page[data_start:data_start + size]
        if data_start + 8 > self.psize:
            raise self.error(f"page {pgno:,}: the overflow page number of {key!r} runs past the page")
        first = _PGNO.unpack_from(page, data_start)[0]
        if not 2 <= first <= self.last_page:
            raise self.error(f"the value of {key!r} is on page {first:,}, outside pages 2..{self.last_page:,}")
        if size > (self.last_page + 1 - first) * self.psize - PAGE_HEADER:
            raise self.error(f"the value of {key!r} ({size:,} bytes from page {first:,}) runs past the last page")
        data = self._pread(PAGE_HEADER + size, first * self.psize, f"the value of {key!r}")
        number, _, oflags, _, _ = _HEADER.unpack_from(data)
        pages = struct.unpack_from("<I", data, 12)[0]
        if number != first or not oflags & P_OVERFLOW or pages * self.psize < PAGE_HEADER + size:
            raise self.error(f"the value of {key!r}: page {first:,} is not the overflow page that should hold it")
        return data[PAGE_HEADER:]

    # -- reading ----------------------------------------------------------------------------
    def items(self, values=True):
        """(key, value) in key order (value None with values=False), walking the tree depth first."""
        if self.root == P_INVALID:
            return
        stack = [iter([(b"", self.root)])]
        seen = set()
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                continue
            pgno = child[1]
            if pgno in seen or len(stack) > MAX_DEPTH:
                raise self.error(f"page {pgno:,} is reached twice (a loop in the tree)")
            seen.add(pgno)
            page, flags, offsets = self._page(pgno, P_BRANCH | P_LEAF)
            if flags & P_BRANCH:
                stack.append(self._children(page, pgno, offsets))
                continue
            for off in offsets:
                lo, hi, nflags, key, data_start = self._node(page, pgno, off)
                value = self._value(page, pgno, lo, hi, nflags, data_start, key) if values else None
                yield key, value

    def get(self, key):
        """The value of `key`, or None."""
        key = bytes(key)
        pgno, depth = self.root, 0
        while pgno != P_INVALID:
            depth += 1
            if depth > MAX_DEPTH:
                raise self.error("the tree is deeper than any LMDB database")
            page, flags, offsets = self._page(pgno, P_BRANCH | P_LEAF)
            if flags & P_BRANCH:
                chosen = None
                for i, (node_key, child) in enumerate(self._children(page, pgno, offsets)):
                    if i == 0 or node_key <= key:  # the first branch key stands for "smaller than all"
                        chosen = child
                    else:
                        break
                if chosen is None:
                    return None
                pgno = chosen
                continue
            for off in offsets:
                lo, hi, nflags, node_key, data_start = self._node(page, pgno, off)
                if node_key == key:
                    return self._value(page, pgno, lo, hi, nflags, data_start, node_key)
            return None
        return None
