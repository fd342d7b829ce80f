"""Training curves (DIGITS' "loss and accuracy against iterations"): OUT/curves.csv and OUT/curves.png.

`Curves(out_dir)` records what a training run reports and writes the two files, updated as the run
goes (`caffeish train` calls it):

    curves = Curves(out_dir, title="cls")
    curves.test(0, {"accuracy": 0.75, "loss": 1.2146})        # a test pass of test net #0
    curves.train(0, 1.5218, outputs={"loss": 1.5218})         # the displayed (smoothed) loss
    curves.lr(0, 0.01)                                        # the rate of update #0
    curves.flush()                                            # csv always, png at most every 5 s
    curves.close()                                            # final flush, png included

`read_caffe_log(path, curves)` feeds a Curves from a real Caffe (glog) training log, so that the
same files can be drawn for a run of BVLC Caffe; `write_from_log(log, out_dir)` does both.

curves.csv: one row per iteration that has any value, sorted by iteration; columns `iteration`,
`lr`, `train_loss`, then `train_<name>` for the train net's other outputs, then `test_<name>` (test
net 0) and `test<k>_<name>` (test net k > 0), each group in order of first appearance; empty cells
where an iteration has no value.  `train_loss` is the loss Caffe displays (smoothed over
average_loss, mean over iter_size); a train output named `loss` has no column of its own (it is that
loss when average_loss and iter_size are 1).  Outputs with several elements get one column per
element, `name[0]`, `name[1]`, ...; Caffe's `Test loss:` line (test_compute_loss) is the test output
`total_loss`.  Values are written in their shortest round-trip form: float32 values (numpy float32,
or Python floats that are exactly a float32) as float32 reprs, others as Python's repr; NaN and
infinities as `nan`, `inf`, `-inf`.

curves.png: x = iterations; left axis the losses (train loss as a line, test losses as points on a
line), right axis the accuracies (0..1 or 0..100, as the values are), the learning rate in a small
panel below (log scale when it spans more than a factor of 10), a legend and an optional title.
Non-finite values are left out of the plot (kept in the CSV); each series is thinned evenly to at
most `max_points` points for the plot only.  Drawn with matplotlib's Figure and Agg canvas, never
pyplot, so a caller's backend is left alone; without matplotlib the PNG is skipped with one warning.

Both files are written atomically (caffeish.formats.io.atomic_output): a crash leaves the old file
or the new one under the final name, never a part.  Values are kept in flat arrays (10 bytes per
cell, 8 per row), so long runs stay cheap.
"""
import bisect
import math
import os
import re
import time
import warnings
from array import array

import numpy as np

from caffeish.formats.io import atomic_output

CSV_NAME = "curves.csv"
PNG_NAME = "curves.png"

_clock = time.monotonic  # the PNG interval's clock (tests replace it)

_ROWS_PER_WRITE = 4096


# ---------------------------------------------------------------------------- values


def _scalar_items(name, value):
    """(name, value) pairs of one output: a scalar as is, an array with several elements as name[i]."""
    if isinstance(value, (int, float, np.generic)):
        return [(name, value)]
    flat = np.asarray(value).reshape(-1)
    if flat.size == 1:
        return [(name, flat[0])]
    return [(f"{name}[{i}]", v) for i, v in enumerate(flat)]


def _as_float(value):
    """(float, whether it is a float32 value) of a number."""
    if isinstance(value, np.floating) and value.dtype.itemsize <= 4:
        return float(value), True
    f = float(value)
    return f, bool(math.isfinite(f) and float(np.float32(f)) == f)


def format_value(value, is_float32=False):
    """A value's CSV text: shortest round-trip (float32's for float32 values); nan, inf, -inf."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if is_float32:
        return str(np.float32(value))  # numpy's shortest float32 repr ('1.2146', '1e-05', '3.0')
    return repr(value)


# ---------------------------------------------------------------------------- the curves


class Curves:
    """Records a training run's curves and writes OUT/curves.csv and OUT/curves.png (module doc).

    out_dir: the folder of the two files (made when first written); None keeps the curves in
    memory only (flush then refuses).  png: whether to draw curves.png.  min_png_interval: the
    least seconds between two PNGs that flush draws unless forced.  title: the plot's title.
    max_points: the most points per plotted series.
    """

    def __init__(self, out_dir, png=True, min_png_interval=5.0, title=None, max_points=2000):
        self.out_dir = None if out_dir is None else os.fspath(out_dir)
        self.png = png
        self.min_png_interval = float(min_png_interval)
        self.title = title
        self.max_points = max(2, int(max_points))
        self._iters = array("q")
        # column name -> [values array('d'), presence bytearray, float32 flags bytearray]
        self._data = {}
        self._train_cols = []
        self._test_cols = []
        self._test_names = {}  # column -> (net_index, output name)
        for col in ("lr", "train_loss"):
            self._new_column(col)
        self._last_png = None  # clock time of the last PNG
        self._png_version = None
        self._version = 0
        self._warned = set()

    def clear(self):
        """Forget every value (the settings stay)."""
        self.__init__(self.out_dir, self.png, self.min_png_interval, self.title, self.max_points)

    # ------------------------------------------------------------------ recording

    def train(self, iteration, loss, lr=None, outputs=None):
        """The displayed train loss at `iteration`, the rate of its update (or later, lr()), and the
        train net's outputs {name: value}; an output named `loss` has no column of its own."""
        row = self._row(iteration)
        if loss is not None:
            self._set("train_loss", row, loss)
        if lr is not None:
            self._set("lr", row, lr)
        for name, value in (outputs or {}).items():
            for item, v in _scalar_items(str(name), value):
                if item == "loss":
                    continue
                col = "train_" + item
                if col not in self._data:
                    self._new_column(col)
                    self._train_cols.append(col)
                self._set(col, row, v)

    def lr(self, iteration, rate):
        """The learning rate of update number `iteration`."""
        self._set("lr", self._row(iteration), rate)

    def test(self, iteration, outputs, net_index=0):
        """One test pass of test net #net_index at `iteration`: its mean outputs {name: value}."""
        net_index = int(net_index)
        prefix = "test_" if net_index == 0 else f"test{net_index}_"
        row = self._row(iteration)
        for name, value in outputs.items():
            for item, v in _scalar_items(str(name), value):
                col = prefix + item
                if col not in self._data:
                    self._new_column(col)
                    self._test_cols.append(col)
                    self._test_names[col] = (net_index, item)
                self._set(col, row, v)

    # ------------------------------------------------------------------ reading back

    @property
    def columns(self):
        """The CSV's column names, in order."""
        return ["iteration", "lr", "train_loss"] + self._train_cols + self._test_cols

    def __len__(self):
        return len(self._iters)

    def rows(self):
        """(iteration, {column: value}) per row, sorted by iteration; missing values left out."""
        cols = [(c, self._data[c]) for c in self.columns[1:]]
        for i, it in enumerate(self._iters):
            yield it, {c: d[0][i] for c, d in cols if d[1][i]}

    def series(self, column):
        """(iterations, values) where `column` has a value (lists; [] and [] for an unknown one)."""
        if column not in self._data:
            return [], []
        values, present, _ = self._data[column]
        idx = np.flatnonzero(np.frombuffer(present, np.uint8)) if len(present) else np.zeros(0, int)
        iters = np.frombuffer(self._iters, np.int64)[idx] if len(idx) else np.zeros(0, np.int64)
        vals = np.frombuffer(values, np.float64)[idx] if len(idx) else np.zeros(0)
        return iters.tolist(), vals.tolist()

    def test_passes(self, net_index=0):
        """[{"iteration": i, "outputs": {name: value}}] of test net #net_index, by iteration."""
        cols = [(c, name) for c, (k, name) in self._test_names.items() if k == net_index]
        passes = []
        for i, it in enumerate(self._iters):
            outputs = {name: self._data[c][0][i] for c, name in cols if self._data[c][1][i]}
            if outputs:
                passes.append({"iteration": it, "outputs": outputs})
        return passes

    # ------------------------------------------------------------------ writing

    @property
    def csv_path(self):
        return None if self.out_dir is None else os.path.join(self.out_dir, CSV_NAME)

    @property
    def png_path(self):
        return None if self.out_dir is None else os.path.join(self.out_dir, PNG_NAME)

    def flush(self, force=False):
        """Write curves.csv (always) and curves.png (when `force`, or when min_png_interval seconds
        passed since the last one and something changed), each atomically.  A failure writing the
        CSV raises (caffeish.errors.CaffeishError for the file system's); one drawing the PNG is a
        warning, so that a plotting problem never stops a training run."""
        if self.out_dir is None:
            raise ValueError("these curves have no output folder (Curves(None)); nothing to write")
        os.makedirs(self.out_dir, exist_ok=True)
        self.write_csv(self.csv_path)
        if not self.png:
            return
        now = _clock()
        due = self._last_png is None or now - self._last_png >= self.min_png_interval
        if not (force or due):
            return
        if not force and self._png_version == self._version and os.path.exists(self.png_path):
            return
        self._last_png = now
        try:
            written = self.write_png(self.png_path)
        except Exception as e:  # noqa: BLE001 - a plot must never stop training
            self._warn_once(f"png:{type(e).__name__}:{e}",
                            f"{self.png_path}: not drawn: {type(e).__name__}: {e}")
            return
        if written:
            self._png_version = self._version

    def close(self):
        """The final flush, PNG included."""
        self.flush(force=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def write_csv(self, path):
        """Write the CSV to `path`, atomically."""
        cols = self.columns
        data = [self._data[c] for c in cols[1:]]
        header = ",".join(_csv_field(c) for c in cols) + "\n"
        n = len(self._iters)
        with atomic_output(path) as f:
            f.write(header.encode())
            for start in range(0, n, _ROWS_PER_WRITE):
                lines = []
                for i in range(start, min(n, start + _ROWS_PER_WRITE)):
                    cells = [str(self._iters[i])]
                    for values, present, f32 in data:
                        cells.append(format_value(values[i], f32[i]) if present[i] else "")
                    lines.append(",".join(cells))
                f.write(("\n".join(lines) + "\n").encode())

    def write_png(self, path):
        """Draw the curves into `path`, atomically; False (and one warning) without matplotlib."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:
            self._warn_once("no-matplotlib", f"{path} not drawn: matplotlib is not installed ({e}); "
                            "curves.csv is still written (pip install matplotlib)")
            return False
        fig = Figure(figsize=(10, 6.5), dpi=100)
        FigureCanvasAgg(fig)
        self._draw(fig)
        with atomic_output(path) as f:
            fig.savefig(f, format="png")
        return True

    def png_bytes(self, size=(10, 6.5), dpi=100):
        """The picture as PNG bytes (a web page's live curves); needs matplotlib."""
        import io

        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=size, dpi=dpi)
        FigureCanvasAgg(fig)
        self._draw(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    # ------------------------------------------------------------------ drawing

    def _plotted(self, column):
        """(x, y) numpy arrays of a column's finite values, thinned evenly to max_points."""
        values, present, _ = self._data[column]
        if not len(present):
            return np.zeros(0, np.int64), np.zeros(0)
        keep = np.frombuffer(present, np.uint8).astype(bool)
        y = np.frombuffer(values, np.float64)
        keep &= np.isfinite(y)
        idx = np.flatnonzero(keep)
        if len(idx) > self.max_points:
            idx = idx[np.unique(np.linspace(0, len(idx) - 1, self.max_points).round().astype(np.int64))]
        return np.frombuffer(self._iters, np.int64)[idx], y[idx]

    def _label(self, column):
        if column in self._test_names:
            k, name = self._test_names[column]
            return f"{name} (val)" if k == 0 else f"{name} (val #{k})"
        return column[len("train_"):] + " (train)"

    def _draw(self, fig):
        grid = fig.add_gridspec(2, 1, height_ratios=[4, 1], hspace=0.08)
        ax = fig.add_subplot(grid[0])
        ax_lr = fig.add_subplot(grid[1], sharex=ax)
        if self.title:
            ax.set_title(str(self.title))
        colors = [f"C{i}" for i in range(10)]
        handles = []
        acc_series, n_color = [], 0
        for col in ["train_loss"] + self._train_cols + self._test_cols:
            name = self._test_names[col][1] if col in self._test_names else col[len("train_"):]
            if "acc" in name.lower():
                acc_series.append(col)
                continue
            x, y = self._plotted(col)
            color = colors[n_color % 10]
            n_color += 1
            if not len(x):
                continue
            if col in self._test_names:
                h, = ax.plot(x, y, "o-", color=color, markersize=4, linewidth=1.2, label=self._label(col))
            else:
                h, = ax.plot(x, y, "-" if len(x) > 1 else "o", color=color, linewidth=1.0,
                             alpha=0.9, label=self._label(col))
            handles.append(h)
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        plotted_acc = [(col, *self._plotted(col)) for col in acc_series]
        plotted_acc = [p for p in plotted_acc if len(p[1])]
        if plotted_acc:
            ax_acc = ax.twinx()
            top = max(float(np.max(y)) for _, _, y in plotted_acc)
            bottom = min(float(np.min(y)) for _, _, y in plotted_acc)
            if bottom >= 0 and top <= 100:
                full = 1 if top <= 1 else 100  # a fraction or a percentage
                ax_acc.set_ylim(-0.02 * full, 1.02 * full)
            ax_acc.set_ylabel("accuracy")
            for col, x, y in plotted_acc:
                color = colors[n_color % 10]
                n_color += 1
                style = "o-" if col in self._test_names else ("--" if len(x) > 1 else "o")
                h, = ax_acc.plot(x, y, style, color=color, markersize=4, linewidth=1.2, label=self._label(col))
                handles.append(h)
        if handles:
            ax.legend(handles=handles, labels=[h.get_label() for h in handles], loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "no values yet", transform=ax.transAxes, ha="center", va="center", color="gray")
        x, y = self._plotted("lr")
        if len(x):
            ax_lr.plot(x, y, "-" if len(x) > 1 else "o", color="C7", linewidth=1.0, markersize=3,
                       drawstyle="steps-post")  # the rate holds from its update to the next one
            positive = y[y > 0]
            if len(positive) == len(y) and positive.max() > 10 * positive.min():
                ax_lr.set_yscale("log")
        ax_lr.set_ylabel("learning rate", fontsize="small")
        ax_lr.set_xlabel("iteration")
        ax_lr.grid(True, alpha=0.3)
        ax_lr.tick_params(labelsize="small")
        ax.tick_params(labelbottom=False)
        fig.subplots_adjust(left=0.08, right=0.92, top=0.94 if self.title else 0.97, bottom=0.08)

    # ------------------------------------------------------------------ storage

    def _new_column(self, col):
        n = len(self._iters)
        self._data[col] = [array("d", bytes(8 * n)), bytearray(n), bytearray(n)]

    def _row(self, iteration):
        """The row index of `iteration`, made when new (rows stay sorted)."""
        it = int(iteration)
        iters = self._iters
        if not iters or it > iters[-1]:
            iters.append(it)
            for values, present, f32 in self._data.values():
                values.append(0.0)
                present.append(0)
                f32.append(0)
            return len(iters) - 1
        if it == iters[-1]:
            return len(iters) - 1
        i = bisect.bisect_left(iters, it)
        if iters[i] != it:  # an earlier iteration seen late (a resumed run, say): insert it
            iters.insert(i, it)
            for values, present, f32 in self._data.values():
                values.insert(i, 0.0)
                present.insert(i, 0)
                f32.insert(i, 0)
        return i

    def _set(self, col, row, value):
        f, is32 = _as_float(value)
        values, present, f32 = self._data[col]
        values[row] = f
        present[row] = 1
        f32[row] = is32
        self._version += 1

    def _warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def read_csv(path, curves=None, before=None):
    """Feed `curves` (a new in-memory Curves when None) from a curves.csv this module wrote; with
    `before`, only the rows of iterations below it (a run resumed at that iteration goes on from
    there).  A missing file gives empty curves; a malformed one raises CaffeishError.  Returns the curves."""
    import csv

    from caffeish.errors import CaffeishError

    if curves is None:
        curves = Curves(None)
    try:
        f = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        return curves
    except OSError as e:
        raise CaffeishError(f"{path}: cannot read the curves ({e.strerror or e})") from None
    with f:
        rows = csv.reader(f)
        header = next(rows, None)
        if not header:
            return curves
        if header[:3] != ["iteration", "lr", "train_loss"]:
            raise CaffeishError(f"{path}: not a curves.csv (its columns start {', '.join(header[:3])})")
        for col in header[3:]:
            if col in curves._data:
                continue
            curves._new_column(col)
            test = re.match(r"test(\d*)_(.+)\Z", col)
            if test:
                curves._test_cols.append(col)
                curves._test_names[col] = (int(test.group(1) or 0), test.group(2))
            else:
                curves._train_cols.append(col)
        for line, cells in enumerate(rows, 2):
            if not cells:
                continue
            try:
                it = int(cells[0])
                values = [(col, float(text)) for col, text in zip(header[1:], cells[1:]) if text != ""]
            except ValueError:
                raise CaffeishError(f"{path}: line {line}: not a row of numbers") from None
            if before is not None and it >= before:
                continue
            row = curves._row(it)
            for col, value in values:  # each cell's text, written again, is the same text
                curves._set(col, row, value)
    return curves


def _csv_field(text):
    if any(ch in text for ch in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


# ---------------------------------------------------------------------------- Caffe logs

_NUM = r"([-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf(?:inity)?))"
_DISPLAY = re.compile(r"\bIteration (\d+) \(.*\), loss = " + _NUM, re.IGNORECASE)
_DISPLAY_OLD = re.compile(r"\bIteration (\d+), loss = " + _NUM, re.IGNORECASE)
_LR = re.compile(r"\bIteration (\d+), lr = " + _NUM, re.IGNORECASE)
_TESTING = re.compile(r"\bIteration (\d+), Testing net \(#(\d+)\)")
_OUTPUT = re.compile(r"\b(Train|Test) net output #\d+: (\S+) = " + _NUM, re.IGNORECASE)
_TEST_LOSS = re.compile(r"\bTest loss: " + _NUM, re.IGNORECASE)
_SOLVING = re.compile(r"\bSolving (\S+)\s*$")


def parse_caffe_log(lines):
    """The curve events of a Caffe training log, in order: (method, kwargs) pairs for a Curves
    ("train", "lr", "test"), plus ("solving", {"name": net name}).  glog prefixes are optional;
    other lines are ignored.  An output printed on several lines (one per element) becomes
    name[0], name[1], ...; a test pass's `Test loss:` becomes its output `total_loss`."""
    block = None  # the output block being read: [kind, kwargs, [(name, value)]]

    def end_block():
        nonlocal block
        if block is None:
            return
        kind, kwargs, items = block
        block = None
        counts = {}
        for name, _ in items:
            counts[name] = counts.get(name, 0) + 1
        seen, outputs = {}, {}
        for name, value in items:
            if counts[name] > 1:
                k = seen.get(name, 0)
                seen[name] = k + 1
                name = f"{name}[{k}]"
            outputs[name] = value
        if kind == "train" or outputs:
            yield kind, dict(kwargs, outputs=outputs)

    for line in lines:
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        m = _OUTPUT.search(line)
        if m:
            if block is not None and block[0] == m.group(1).lower():
                block[2].append((m.group(2), float(m.group(3))))
            continue
        m = _TEST_LOSS.search(line)
        if m:
            if block is not None and block[0] == "test":
                block[2].append(("total_loss", float(m.group(1))))
            continue
        if "Iteration" not in line and "Solving" not in line:
            continue  # a line between outputs (a data layer's note, say) does not end a block
        m = _DISPLAY.search(line) or _DISPLAY_OLD.search(line)
        if m:
            yield from end_block()
            block = ["train", {"iteration": int(m.group(1)), "loss": float(m.group(2))}, []]
            continue
        m = _TESTING.search(line)
        if m:
            yield from end_block()
            block = ["test", {"iteration": int(m.group(1)), "net_index": int(m.group(2))}, []]
            continue
        m = _LR.search(line)
        if m:
            yield from end_block()
            yield "lr", {"iteration": int(m.group(1)), "rate": float(m.group(2))}
            continue
        m = _SOLVING.search(line)
        if m:
            yield from end_block()
            yield "solving", {"name": m.group(1)}
    yield from end_block()


def read_caffe_log(path_or_lines, curves=None):
    """Feed `curves` (a new in-memory Curves when None) from a Caffe training log: a path, or an
    iterable of lines (str or bytes; a str is a path, so pass text.splitlines()).  Sets the title
    to the solved net's name when the curves have none.  Returns the curves."""
    if curves is None:
        curves = Curves(None)
    if isinstance(path_or_lines, (str, bytes, os.PathLike)):
        with open(path_or_lines, encoding="utf-8", errors="replace") as f:
            return _feed(parse_caffe_log(f), curves)
    return _feed(parse_caffe_log(path_or_lines), curves)


def _feed(events, curves):
    for kind, kwargs in events:
        if kind == "solving":
            if not curves.title:
                curves.title = kwargs["name"]
        else:
            getattr(curves, kind)(**kwargs)
    return curves


def write_from_log(log_path, out_dir, title=None, png=True):
    """Read a Caffe training log and write out_dir/curves.csv and curves.png; returns the Curves."""
    curves = Curves(out_dir, png=png, title=title)
    read_caffe_log(log_path, curves)
    curves.close()
    return curves
