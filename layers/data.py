"""Data and input layers: the net's sources (no bottoms), plus HDF5Output.

Input, DummyData and MemoryData declare their shapes in the prototxt.  Data,
ImageData, WindowData and HDF5Data take them from files: Caffe reads the first
record at setup.  caffeish reads what it can (an LMDB database, an image list
and its first image) and otherwise raises InputShapeRequired, which tells the
user which file it would need and which `--input-shape` to pass instead.

Shapes the user gave (`self.input_shapes`, top name -> shape, set by the graph)
win over what a layer would declare or read.  For the layers with a data top
and a label top (Data, ImageData, WindowData, MemoryData), a shape for the data
top alone gives the label top Caffe's label shape (N,).

At run time Input tops are fed by the caller, DummyData fills its tops, and
Data (LMDB) and ImageData read their files batch by batch with transform_param
applied (caffeish.runtime.data_transform), as Caffe does at TRAIN and TEST, when
their source was readable at setup and the user gave no shape for their tops.
Otherwise, and for the other file readers (WindowData, HDF5Data, MemoryData),
the tops are inputs the caller feeds, and `unsupported_reason` says why.

Data and ImageData start reading at their first forward (building a net reads
only the first record, for the shapes): from then on one daemon thread per
layer reads and transforms the next batches (data_param.prefetch of them, 4 by
default, for ImageData too; 0 reads in the forward itself), handed over
strictly in order, so the batches are the same with and without it.  An error
while reading is raised by the forward that needs that batch (and by every
forward after it).  `close()`, or the layer being garbage-collected, stops the
thread; a later forward starts again from the first record.  Their random
choices (crops, flips, ImageData's shuffle and rand_skip) are seeded at the
first forward from the layer's `rng`, the Net's seeded stream.

Backward is a no-op for all of them, and for HDF5Output, as in Caffe.
"""
import hashlib
import os
import queue
import threading
import weakref

import numpy as np

from caffeish.runtime import fillers
from caffeish.runtime.data_transform import DataTransformer, resize_linear
from caffeish.formats.datum import (BatchCursor, DamagedLmdbError, LmdbReader, NotDatumError, check_pair, datum_array, datum_shape,
                                    parse_datum, sibling_pair)
from caffeish.errors import CaffeishError, InputShapeRequired, ShapeError, UnsupportedError
from caffeish.formats.images import decode_8bit
from caffeish.graph.graph import MAX_BLOB_AXES
from caffeish.graph.registry import Layer, register
from caffeish.formats.schema import pb



def declared_shape(layer, blob_shape, what):
    """A prototxt BlobShape as a tuple, with the checks of Caffe's Blob::Reshape."""
    dims = tuple(int(d) for d in blob_shape.dim)
    if len(dims) > MAX_BLOB_AXES:
        raise layer.error(f"{what} has {len(dims)} axes; Caffe allows at most {MAX_BLOB_AXES}")
    if any(d < 0 for d in dims):
        raise layer.error(f"{what} {dims} has a negative dim")
    return dims


class SourceLayer(Layer):
    """A layer without bottoms that produces net inputs."""

    is_data = True
    exact_bottoms = 0

    out_shapes = None

    def reshape(self, bottom_shapes):
        self.check_counts(len(bottom_shapes), len(self.param.top))
        self.out_shapes = [tuple(int(d) for d in s) for s in self.top_shapes()]
        return self.out_shapes

    def current_shapes(self):
        """The top shapes of the last reshape (reshaping now if there was none)."""
        if self.out_shapes is None:
            self.reshape([])
        return self.out_shapes

    def top_shapes(self):
        raise NotImplementedError

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """Caffe's data layers have a no-op Backward (training.md 10.8)."""
        return [None] * len(bottoms)

    # -- user-given shapes ---------------------------------------------------------
    def given(self):
        """The user's shapes for this layer's tops, checked to be positive integers."""
        out = {}
        for top in self.param.top:
            if top not in self.input_shapes:
                continue
            shape = tuple(self.input_shapes[top])
            try:
                ok = bool(shape) and all(int(d) == d and d > 0 for d in shape)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise self.error(f"--input-shape {top}={shape}: give positive integer dims, e.g. {top}=N,C,H,W")
            out[top] = tuple(int(d) for d in shape)
        return out

    def per_top(self, declared):
        """One shape per top: the user's, else the declared one (None: unknown)."""
        given = self.given()
        shapes = [given.get(t, d) for t, d in zip(self.param.top, declared)]
        missing = [t for t, s in zip(self.param.top, shapes) if s is None]
        if missing:
            raise self.need_shape(f"nothing declares the shape of top(s) {missing}", missing)
        return shapes

    def need_shape(self, reason, tops=None, dims="N,C,H,W"):
        """InputShapeRequired naming this layer, why, and the --input-shape to pass."""
        tops = list(tops or self.param.top[:1])
        flags = " ".join(f"--input-shape {t}={dims}" for t in tops)
        python = ", ".join(f"'{t}': ({dims})" for t in tops)
        return InputShapeRequired(f"layer '{self.name}' ({self.type}): {reason}; give the shape(s) to feed it "
                                  f"yourself: {flags} (summary, offsets) or input_shapes={{{python}}} in Python")


def reads_files(what):
    """The unsupported_reason of a layer that reads training data from `what`."""
    return (
        f"it reads training data from {what}, which the caffeish runtime does not do; run a "
        f"deploy prototxt whose inputs are Input layers, or choose a phase (--phase) or stage "
        f"that excludes this layer"
    )


class BatchSourceLayer(SourceLayer):
    """A source with a data top and an optional label top of shape (N,)."""

    def with_label(self, data_shape):
        shapes = [tuple(data_shape)]
        if len(self.param.top) > 1:
            shapes.append((data_shape[0],))
        return shapes

    def given_batch(self):
        """Top shapes from the user's shapes, or None when the user gave none for this layer."""
        given = self.given()
        if not given:
            return None
        tops = list(self.param.top)
        if tops[0] not in given:
            raise self.need_shape(f"--input-shape gives the label top '{tops[1]}' but not the data top")
        shapes = self.with_label(given[tops[0]])
        if len(tops) > 1 and tops[1] in given and given[tops[1]] != shapes[1]:
            raise self.error(
                f"the label top '{tops[1]}' has shape (N,) = {shapes[1]} for the data top "
                f"{shapes[0]}; --input-shape gave {given[tops[1]]}"
            )
        return shapes

    def need_shape(self, reason, tops=None, dims="N,C,H,W"):
        err = super().need_shape(reason, tops, dims)
        if tops is None and len(self.param.top) > 1:
            err.args = (err.args[0] + f" (the label top '{self.param.top[1]}' then gets shape (N,))",)
        return err

    def check_transform(self):
        """DataTransformer's constructor check, shared by the prefetching data layers."""
        t = self.param.transform_param
        if t.HasField("mean_file") and len(t.mean_value):
            raise self.error("transform_param: give mean_file or mean_value, not both")

    def crop(self, channels, height, width, where):
        """DataTransformer::InferBlobShape: crop_size (if set) replaces H and W."""
        crop = self.param.transform_param.crop_size
        if crop and (height < crop or width < crop):
            raise self.error(
                f"transform_param.crop_size {crop} is larger than the {height}x{width} images of {where}"
            )
        return (channels, crop, crop) if crop else (channels, height, width)


class FileBatchSourceLayer(BatchSourceLayer):
    """A data layer that caffeish runs by reading its files (Data over LMDB, ImageData).

    It runs when the net is built from a readable source and the user gave no
    shape for its tops; otherwise (`--input-shape`, or a source that is not
    here) its tops are net inputs the caller feeds, as for the other file
    readers.  Subclasses set `source_ok` in top_shapes and give
    `start_reading()`, called at the first forward: it draws the layer's random
    seeds and returns an item source whose `take(n)` gives n (C x H x W array,
    label, where) and `close()` releases its files.  The item source, not the
    layer, is what the prefetch thread holds, so the layer can be collected.
    """

    what_is_read = "files"
    source_ok = False
    rng = None  # the Net's random stream (set by the Net); None: the global one, else a fixed seed
    _transformer = None
    _feed = None
    _finalizer = None

    @property
    def can_forward(self):
        return self.source_ok

    @property
    def unsupported_reason(self):
        return (
            f"it reads training data from {self.what_is_read}, which was not readable when the net was "
            f"built (or --input-shape gave its shape), so its tops are inputs to pass; or run a deploy "
            f"prototxt whose inputs are Input layers, or choose a phase (--phase) or stage that excludes "
            f"this layer"
        )

    @property
    def what(self):
        return f"layer '{self.name}' ({self.type})"

    def transformer(self):
        if self._transformer is None:
            self._transformer = DataTransformer(self.param.transform_param, self.phase, f"{self.what} transform_param")
        return self._transformer

    def random_stream(self):
        """The stream the layer's seeds are drawn from: the Net's, else the global one, else seed 0."""
        if self.rng is None:
            self.rng = fillers.global_rng() or np.random.default_rng(0)
        return self.rng

    def draw_seed(self):
        """A 32-bit value from the layer's random stream (Caffe's caffe_rng_rand())."""
        return int(self.random_stream().integers(0, 2 ** 32))

    def batch_size(self):
        raise NotImplementedError

    def start_reading(self):
        raise NotImplementedError

    def forward(self, xp, bottoms, blobs):
        if not self.can_forward:
            raise UnsupportedError(f"{self.what}: cannot run: {self.unsupported_reason}")
        if self._feed is None:
            items = self.start_reading()
            feed = BatchFeed(BatchMaker(items, self.transformer(), self.batch_size(), self.what),
                             int(self.param.data_param.prefetch), f"caffeish prefetch: {self.what}")
            self._finalizer = weakref.finalize(self, feed.close)
            self._feed = feed
        out, labels = self._feed.next()
        tops = [xp.asarray(out), xp.asarray(labels)]
        return tops[:len(self.param.top)]

    def close(self):
        """Stop the prefetch thread and close the files; a later forward starts again from the first item
        (with a new transformer: the stopped thread may still hold the old one)."""
        finalizer, self._feed, self._finalizer = self._finalizer, None, None
        self._transformer = None
        if finalizer is not None:
            finalizer()


class BatchMaker:
    """One batch of a file data layer: the next batch_size items of `items`, transformed, as
    (float32 N x C x H x W, float32 labels (N,)).  It holds no reference to the layer."""

    def __init__(self, items, transform, batch_size, what):
        self.items, self.transform, self.batch_size, self.what = items, transform, batch_size, what

    def __call__(self):
        items = self.items.take(self.batch_size)
        first, _, first_where = items[0]
        out = np.empty((len(items),) + self.transform.output_shape(*first.shape), dtype=np.float32)
        labels = np.empty(len(items), dtype=np.float32)
        for i, (array, label, where) in enumerate(items):
            if array.shape != first.shape:
                raise ShapeError(
                    f"{self.what}: {where} is {array.shape} (C, H, W) but {first_where}, "
                    f"the first of its batch, is {first.shape}; a batch needs one size (use batch_size 1, "
                    f"a crop_size, or a dataset built with --resize)"
                )
            out[i] = self.transform(array, where)
            labels[i] = label
        return out, labels

    def close(self):
        self.items.close()


class BatchFeed:
    """The batches `make()` gives, in order: made ahead in one daemon thread (at most `depth` made and not
    yet taken), or in `next()` itself when depth is 0.

    An exception `make()` raises comes out of the `next()` that would have returned that batch, and out of
    every later one.  `close()` stops the thread (it finishes the batch in hand) and closes `make`'s
    files; the thread itself is started by the first `next()`.
    """

    JOIN_S = 10.0  # how long close() waits for the batch in hand

    def __init__(self, make, depth, name):
        self._make = make
        self._depth = max(int(depth), 0)
        self._name = name
        self._thread = None
        self._error = None
        self._results = queue.Queue()
        self._slots = threading.Semaphore(self._depth)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._released = False

    def next(self):
        if self._error is not None:
            raise self._error
        if self._stop.is_set():
            raise CaffeishError(f"{self._name}: the data layer was closed")
        if self._depth == 0:
            try:
                return self._make()
            except Exception as e:
                self._error = e
                raise
        if self._thread is None:
            self._thread = threading.Thread(target=_prefetch, name=self._name, daemon=True,
                                            args=(self._make, self._results, self._slots, self._stop,
                                                  self._release))
            self._thread.start()
        while True:
            try:
                ok, value = self._results.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._results.empty():
                    self._error = CaffeishError(f"{self._name}: the prefetch thread stopped without a batch")
                    raise self._error from None
        self._slots.release()
        if not ok:
            self._error = value
            raise value
        return value

    @property
    def thread(self):
        return self._thread

    def close(self):
        """Stop the thread and close the files (the thread closes them if it is still reading)."""
        self._stop.set()
        self._slots.release()  # wakes a thread that waits for a free slot
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.JOIN_S)
        if thread is None or not thread.is_alive():
            self._release()

    def _release(self):
        with self._lock:
            if self._released:
                return
            self._released = True
        try:
            self._make.close()
        except Exception:
            pass


def _prefetch(make, results, slots, stop, release):
    """The prefetch thread: make batches while a slot is free, until stopped or until make() raises (the
    exception is handed over as the next result).  Nothing escapes it (no traceback on stderr)."""
    try:
        while True:
            slots.acquire()
            if stop.is_set():
                break
            try:
                batch = (True, make())
            except BaseException as e:  # handed to the forward that needs this batch
                batch = (False, e)
            results.put(batch)
            if not batch[0]:
                break
    except BaseException:
        pass
    finally:
        if stop.is_set():
            try:
                release()
            except BaseException:
                pass


def paired_seed(pair, transform, rng):
    """The transformer seed of a Data layer over one database of a DIGITS features/labels pair: the same
    for both (given the same crop_size, mirror and phase), so that an image and its label map get the
    same window and flip, and taken from the Net's seed (its SeedSequence), not drawn, so that the two
    layers need not draw alike.  A stream without a SeedSequence gives a fixed seed per pair."""
    seed_seq = getattr(getattr(rng, "bit_generator", None), "seed_seq", None)
    entropy = getattr(seed_seq, "entropy", None)
    material = None if entropy is None else (int(entropy) if not isinstance(entropy, (list, tuple))
                                             else tuple(int(e) for e in entropy),
                                             tuple(int(k) for k in seed_seq.spawn_key))
    key = ("caffeish paired transform", os.path.realpath(pair[0]), os.path.realpath(pair[1]),
           transform.crop_size, bool(transform.param.mirror), int(transform.phase), material)
    return int.from_bytes(hashlib.sha256(repr(key).encode("utf-8", "surrogateescape")).digest()[:4], "little")


# -- declared shapes ------------------------------------------------------------------


@register("Input")
class Input(SourceLayer):
    """The net's inputs: input_param.shape once for all tops, once per top, or not at all.

    With no shape (Caffe leaves such tops empty until the caller reshapes them)
    the user must give each top's shape.
    """

    min_tops = 1

    def top_shapes(self):
        shapes = self.param.input_param.shape
        n_tops = len(self.param.top)
        if len(shapes) not in (0, 1, n_tops):
            raise self.error(
                f"{len(shapes)} input_param.shape entries for {n_tops} tops; give one for all tops, "
                f"one per top, or none"
            )
        if shapes:
            declared = [declared_shape(self, shapes[0 if len(shapes) == 1 else i], "input_param.shape")
                        for i in range(n_tops)]
        else:
            declared = [None] * n_tops
        return self.per_top(declared)

    def forward(self, xp, bottoms, blobs):
        """Zeros of the tops' shapes: the runtime replaces them with the caller's inputs."""
        return [xp.zeros(s, dtype=xp.float32) for s in self.current_shapes()]


@register("DummyData")
class DummyData(SourceLayer):
    """Filler-made tops: dummy_data_param.shape, or the legacy num/channels/height/width.

    Each field is given once for all tops or once per top; so are the data_fillers
    (or not at all: constant 0).  As in Caffe, constant tops are filled once (what a
    script writes into them stays, until their shape changes) and the others anew at
    every forward, from the layer's own random generator (Caffe's random values
    cannot be reproduced).
    """

    min_tops = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.rng = np.random.default_rng()
        self._filled = {}  # top index -> (xp, the array a constant filler filled: kept, not refilled)

    def forward(self, xp, bottoms, blobs):
        specs = list(self.param.dummy_data_param.data_filler)
        tops = []
        for i, (top, shape) in enumerate(zip(self.param.top, self.current_shapes())):
            spec = specs[0 if len(specs) == 1 else i] if specs else None
            what = f"layer '{self.name}' (DummyData) top '{top}'"
            if spec is None or (spec.type == "constant" and spec.sparse == -1):
                kept_xp, kept = self._filled.get(i, (None, None))
                if kept_xp is not xp or tuple(kept.shape) != tuple(shape):
                    kept = xp.full(shape, spec.value if spec is not None else 0, dtype=xp.float32)
                    self._filled[i] = (xp, kept)
                tops.append(kept)
            else:
                tops.append(xp.asarray(fillers.fill(spec, shape, self.rng, what=what)))
        return tops

    def top_shapes(self):
        p = self.param.dummy_data_param
        n_tops = len(self.param.top)
        if len(p.data_filler) not in (0, 1, n_tops):
            raise self.error(
                f"{len(p.data_filler)} data_filler entries for {n_tops} tops; give none, one, or one per top"
            )
        for f in p.data_filler:
            if f.type not in fillers.TYPES:
                raise self.error(f"unknown filler type '{f.type}' (known: {', '.join(fillers.TYPES)})")
        legacy = {"num": p.num, "channels": p.channels, "height": p.height, "width": p.width}
        if any(len(v) for v in legacy.values()):
            if len(p.shape):
                raise self.error("give either shape or the legacy num/channels/height/width, not both")
            for field, values in legacy.items():
                if len(values) not in (1, n_tops):
                    raise self.error(
                        f"legacy field '{field}' given {len(values)} time(s); give it once, or once per "
                        f"top ({n_tops})"
                    )
            declared = [
                tuple(int(v[0 if len(v) == 1 else i]) for v in legacy.values()) for i in range(n_tops)
            ]
        else:
            if len(p.shape) not in (1, n_tops):
                raise self.error(
                    f"{len(p.shape)} shape entries for {n_tops} tops; give one for all tops or one per top"
                )
            declared = [declared_shape(self, p.shape[0 if len(p.shape) == 1 else i], "dummy_data_param.shape")
                        for i in range(n_tops)]
        return self.per_top(declared)


@register("MemoryData")
class MemoryData(BatchSourceLayer):
    """Arrays handed in by the caller: data (batch_size, channels, height, width), label (batch_size,).

    pycaffe's net.set_input_arrays(data, labels) gives the layer N items (the Net
    checks them as pycaffe does); each forward then takes the next batch_size of
    them, wrapping around, as views of the caller's arrays (Caffe's Reset and
    set_cpu_data: nothing is copied and transform_param does not apply).  Until
    then its tops are net inputs the caller feeds (forward(data=..., label=...)).
    """

    exact_tops = 2
    unsupported_reason = (
        "its batches come from pycaffe's net.set_input_arrays(data, labels), or its tops are fed like "
        "an Input layer's: net.forward(data=..., label=...)"
    )
    _data = _labels = None
    _pos = 0

    def reset(self, data, labels):
        """Caffe's MemoryDataLayer::Reset: serve `data` (N, C, H, W) and `labels` (N, 1, 1, 1) from item 0."""
        self._data, self._labels, self._pos = data, labels.reshape(len(labels)), 0

    def next_batch(self):
        """The (data, label) views of the next batch_size items; the position wraps at N."""
        n = self.param.memory_data_param.batch_size
        lo = self._pos
        self._pos = (lo + n) % len(self._data)
        return [self._data[lo:lo + n], self._labels[lo:lo + n]]

    def top_shapes(self):
        p = self.param.memory_data_param
        self.check_transform()
        dims = (p.batch_size, p.channels, p.height, p.width)
        if not all(dims):
            raise self.error(
                f"memory_data_param batch_size, channels, height and width must all be positive, got "
                f"{dims}"
            )
        return self.given_batch() or self.with_label(dims)


# -- shapes that live in files --------------------------------------------------------


@register("Data")
class Data(FileBatchSourceLayer):
    """Records from a LEVELDB or LMDB database of Datum: (batch_size, C, H, W) and label (batch_size,).

    C, H, W come from the database's first record (crop_size replaces H and W).
    caffeish reads LMDB only, read-only and without locking.  At run time each
    forward reads the next batch_size records in key order, wrapping around
    at the end, as Caffe's DataLayer does (a new net starts at the first
    record; rand_skip is ignored, as in Caffe).  Raw (`data` bytes),
    `float_data` and encoded (PNG/JPEG) records are read; transform_param
    applies (see caffeish.runtime.data_transform): random crops at TRAIN,
    random flips with mirror.  Two Data layers over a DIGITS features and
    labels database (sibling folders with the same keys) stay aligned record
    by record, and with the same crop_size and mirror they get the same
    window and flip for every record (Caffe draws them apart).  The shape of
    each batch is its first record's, as in Caffe.  The next batches are read
    ahead in a thread (data_param.prefetch).
    """

    min_tops = 1
    max_tops = 2
    what_is_read = "a LEVELDB/LMDB database (data_param.source)"

    def top_shapes(self):
        p = self.param.data_param
        self.check_transform()
        self.source_ok = False
        given = self.given_batch()
        if given:
            return given
        if p.backend != pb.DataParameter.LMDB:
            raise self.need_shape(
                f"its shape comes from the first record of the LEVELDB database '{p.source}', which "
                f"caffeish cannot read (it reads LMDB only)"
            )
        if p.batch_size <= 0:
            raise self.error("data_param.batch_size must be positive")
        datum = self.first_datum(p.source)
        if datum.encoded:
            chw = self.decoded_size(datum, p.source)
        else:
            chw = (datum.channels, datum.height, datum.width)
        self.source_ok = True
        return self.with_label((p.batch_size,) + self.crop(*chw, f"'{p.source}'"))

    def first_datum(self, source):
        """The first record (in key order, as Caffe's cursor) of an LMDB directory, as a Datum."""
        if not source:
            raise self.need_shape("its shape comes from an LMDB database, but data_param.source is not set")
        if not os.path.isdir(source):
            raise self.need_shape(
                f"its shape comes from the first record of the LMDB database '{source}', which "
                f"{'is not a directory' if os.path.exists(source) else 'does not exist'}"
            )
        try:
            with LmdbReader(source) as reader:
                for _, value in reader.items():
                    value = bytes(value)
                    break
                else:
                    value = None
        except DamagedLmdbError:
            raise  # there, but truncated or corrupt: not a source to replace with --input-shape
        except CaffeishError as e:
            raise self.need_shape(f"could not open the LMDB database '{source}' ({e})") from e
        if value is None:
            raise self.need_shape(f"the LMDB database '{source}' holds no records")
        try:
            return parse_datum(value, f"the first record of the LMDB database '{source}'")
        except NotDatumError as e:
            raise self.need_shape(str(e)) from e

    def decoded_size(self, datum, source):
        """(C, H, W) of an encoded Datum's image, decoded the way Caffe's DataTransformer does.

        force_color gives 3 channels, force_gray 1; otherwise the image as
        stored (OpenCV's "unchanged"): grey 1, colour 3, with alpha 4.
        """
        t = self.param.transform_param
        if t.force_color and t.force_gray:
            raise self.error("transform_param: force_color and force_gray cannot both be set")
        color = True if t.force_color else (False if t.force_gray else None)
        try:
            return datum_shape(datum, color, f"the first record of '{source}'")
        except CaffeishError as e:
            raise self.need_shape(f"could not decode the encoded image in the first record of '{source}' ({e})") from e

    # -- run time ------------------------------------------------------------------------
    def batch_size(self):
        return int(self.param.data_param.batch_size)

    def start_reading(self):
        p = self.param.data_param
        pair = sibling_pair(p.source)
        if pair is not None:  # DIGITS' features and labels: paired record by record, so they must agree
            check_pair(*pair)
        transform = self.transformer()
        if transform.random:
            transform.seed(paired_seed(pair, transform, self.random_stream()) if pair is not None
                           else self.draw_seed())
        return LmdbItems(LmdbReader(p.source), transform.color)


class LmdbItems:
    """A Data layer's items: the records of an LMDB database in key order, wrapping around."""

    def __init__(self, reader, color):
        self.reader, self.cursor, self.color = reader, BatchCursor(reader), color

    def take(self, n):
        items = []
        for key, datum in self.cursor.take(n):
            where = self.reader.where(key)
            items.append((datum_array(datum, self.color, where), float(datum.label), where))
        return items

    def close(self):
        self.reader.close()


@register("ImageData")
class ImageData(FileBatchSourceLayer):
    """Images named in a list file ("path label" lines): (batch_size, 3 or 1, H, W), label (batch_size,).

    H, W are new_height/new_width when set (both or neither), else crop_size,
    else the size of the first listed image (root_folder + path).  At run time
    each forward reads the next batch_size lines, wrapping around at the end:
    the image root_folder + path, as BGR (is_color, the default) or grey,
    resized to new_height x new_width with OpenCV's bilinear rule when set,
    then transform_param (random crops at TRAIN, random flips with mirror).
    The lines come in file order; with shuffle, in a random order, shuffled
    again at every wrap (a private generator seeded from the layer's `rng`).
    rand_skip skips (a draw from `rng`) % rand_skip lines at the start.  The
    next batches are read ahead in a thread (data_param.prefetch, 4 by default).
    """

    exact_tops = 2
    what_is_read = "the image files of a list file (image_data_param.source)"

    def top_shapes(self):
        p = self.param.image_data_param
        if (p.new_height > 0) != (p.new_width > 0):
            raise self.error(
                f"new_height ({p.new_height}) and new_width ({p.new_width}) must be set together"
            )
        if p.batch_size <= 0:
            raise self.error("image_data_param.batch_size must be positive")
        self.check_transform()
        self.source_ok = False
        given = self.given_batch()
        if given:
            return given
        channels = 3 if p.is_color else 1
        crop = self.param.transform_param.crop_size
        if p.new_height:
            height, width = p.new_height, p.new_width
        elif crop:
            height = width = crop
        else:
            height, width = self.first_image_size(p)
        shapes = self.with_label((p.batch_size,) + self.crop(channels, height, width, f"'{p.source}'"))
        self.source_ok = os.path.isfile(p.source)
        return shapes

    def first_image_size(self, p):
        """(H, W) of the first image of the list file, read with PIL."""
        source = p.source
        if not os.path.isfile(source):
            raise self.need_shape(
                f"its shape comes from the first image listed in '{source}', which does not exist"
            )
        with open(source, encoding="utf-8", errors="surrogateescape") as f:
            line = f.readline().rstrip("\r\n")
        if not line:
            raise self.need_shape(f"its shape comes from the first image listed in '{source}', which is empty")
        path = p.root_folder + split_list_line(line)[0]
        from PIL import Image

        try:
            with Image.open(path) as img:
                width, height = img.size
        except (OSError, ValueError) as e:
            raise self.need_shape(
                f"its shape comes from '{path}', the first image listed in '{source}', which cannot "
                f"be read ({e})"
            ) from e
        return height, width

    # -- run time ------------------------------------------------------------------------
    def read_lines(self):
        """The list file's (path, label) entries (Caffe: each line splits at its last space)."""
        p = self.param.image_data_param
        with open(p.source, encoding="utf-8", errors="surrogateescape") as f:
            lines = [split_list_line(line.rstrip("\r\n")) for line in f if line.strip()]
        if not lines:
            raise CaffeishError(f"layer '{self.name}' (ImageData): the list file '{p.source}' names no images")
        return lines

    def batch_size(self):
        return int(self.param.image_data_param.batch_size)

    def start_reading(self):
        """Caffe's ImageDataLayer setup: the transformer's seed, then the shuffle, then rand_skip."""
        p = self.param.image_data_param
        lines = self.read_lines()
        transform = self.transformer()
        if transform.random:
            transform.seed(self.draw_seed())
        order = None
        if p.shuffle:
            order = np.random.default_rng(self.draw_seed())
            shuffle_lines(lines, order)
        start = self.draw_seed() % p.rand_skip % len(lines) if p.rand_skip else 0
        return ListItems(lines, start, order, p, self.name)


def shuffle_lines(lines, order):
    """Put the list's lines in a random order (in place), from the numpy Generator `order`."""
    lines[:] = [lines[i] for i in order.permutation(len(lines))]


class ListItems:
    """An ImageData layer's items: the images of its list, from line `start`, shuffled again at every wrap
    when `order` (a Generator) is given."""

    def __init__(self, lines, start, order, p, name):
        self.lines, self.next_line, self.order = lines, start, order
        self.source, self.root, self.gray = p.source, p.root_folder, not p.is_color
        self.size = (p.new_height, p.new_width) if p.new_height else None
        self.name = name

    def take(self, n):
        items = []
        for _ in range(n):
            path, label = self.lines[self.next_line]
            self.next_line += 1
            if self.next_line == len(self.lines):  # Caffe: back to the first line, reshuffled
                self.next_line = 0
                if self.order is not None:
                    shuffle_lines(self.lines, self.order)
            full = self.root + path
            where = f"image '{full}' (listed in '{self.source}')"
            try:  # as cv::imread(IMREAD_COLOR / IMREAD_GRAYSCALE): 8 bits, a 16-bit image's high byte
                arr = decode_8bit(full, gray=self.gray)
            except CaffeishError as e:
                raise CaffeishError(f"layer '{self.name}' (ImageData): {e} (listed in '{self.source}')") from None
            if self.size:
                arr = resize_linear(arr, *self.size)
            arr = np.ascontiguousarray((arr[:, :, ::-1] if arr.shape[2] == 3 else arr).transpose(2, 0, 1))
            items.append((arr, float(label), where))
        return items

    def close(self):
        pass


def split_list_line(line):
    """(path, label) of an image list line "<path> <label>", split at the last space as Caffe does."""
    space = line.rfind(" ")
    if space < 0:
        return line, 0
    try:
        label = int(line[space + 1:])
    except ValueError:
        label = 0  # Caffe's atoi gives 0 for a label that is not a number
    return line[:space], label


@register("WindowData")
class WindowData(BatchSourceLayer):
    """Windows cut from images and warped to crop_size: (batch_size, 3, crop_size, crop_size), label (batch_size,).

    crop_size lives in transform_param (the upgrade moves it there) and Caffe
    requires it to be positive.  Caffe takes the channel count from the window
    file's entries; they are 3 for the colour images its forward reads, and
    caffeish does not read the window file.
    """

    exact_tops = 2
    unsupported_reason = reads_files("the windows listed in a window file (window_data_param.source)")

    def top_shapes(self):
        p = self.param.window_data_param
        self.check_transform()
        given = self.given_batch()
        if given:
            return given
        crop = self.param.transform_param.crop_size
        if crop <= 0:
            raise self.need_shape(
                f"it warps every window to transform_param.crop_size, which is not set (Caffe refuses "
                f"crop_size 0; window file '{p.source}')"
            )
        return self.with_label((p.batch_size, 3, crop, crop))


@register("HDF5Data")
class HDF5Data(SourceLayer):
    """Datasets named like the tops, from the HDF5 files listed in `source`.

    Each top is (batch_size,) + the dataset's per-item shape.  caffeish does not
    read HDF5 at shape time, so every top's shape must be given.
    """

    min_tops = 1
    unsupported_reason = reads_files("the HDF5 files listed in hdf5_data_param.source")

    def top_shapes(self):
        p = self.param.hdf5_data_param
        given = self.given()
        missing = [t for t in self.param.top if t not in given]
        if missing:
            raise self.need_shape(
                f"the shapes of top(s) {missing} come from the HDF5 files listed in '{p.source}', "
                f"which caffeish does not read; each is (batch_size = {p.batch_size},) + the shape "
                f"of one item of the dataset of the same name",
                missing,
                dims="N,D1,D2,...",
            )
        return [given[t] for t in self.param.top]


@register("HDF5Output")
class HDF5Output(Layer):
    """Writes its two bottoms (data, label) to hdf5_output_param.file_name; no tops.

    Caffe creates the file at setup; shape inference only checks the blob counts.
    """

    exact_bottoms = 2
    exact_tops = 0
    unsupported_reason = (
        "it writes its bottoms to an HDF5 file (hdf5_output_param.file_name), which the caffeish "
        "runtime does not do; remove the layer, or read the blobs from the net's outputs instead"
    )

    def reshape(self, bottom_shapes):
        self.check_counts(len(bottom_shapes), len(self.param.top))
        return []

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """A no-op in Caffe: it never gives its bottoms a diff."""
        return [None] * len(bottoms)
