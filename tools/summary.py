"""`caffeish summary`: one row per layer with shapes, parameter counts and MACs.

    caffeish summary NET.prototxt [WEIGHTS.caffemodel] [--input-shape data=1,3,500,500]
                     [--phase TRAIN|TEST] [--format table|markdown|json|csv]

Parameters are split into weights and biases (a layer's bias blobs: the second
blob of Convolution, Deconvolution, InnerProduct, Embed and Scale, the blob of
Bias, the 1-D blobs of RNN/LSTM; everything else counts as weights).  MACs
are given per batch (the net's input shapes as they are) and per image (per
batch divided by the batch size, the first dimension of the first input).
The rows are computed by caffeish.apps.summary (also the web app's model page);
this module renders them as text and is the command line.
"""
from caffeish.formats import io
from caffeish.tools import report
from caffeish.apps.summary import COLUMNS, fmt_shape, summarize  # noqa: F401  (summarize: the library call)
from caffeish.tools.options import add_allow_python_layers_option


# A table row is padded to its widest cell, so one very long cell (a Split with 10,000 tops, a name
# of a megabyte) would make the whole table quadratic in the net's size: cells are shortened.
MAX_LIST_ITEMS = 6
MAX_CELL = 80


def _short_list(values, sep, fmt):
    """At most MAX_LIST_ITEMS items (the first ones, '...', the last and the count), each shortened."""
    items = [_short(fmt(v), MAX_CELL // 3) for v in (values if len(values) <= MAX_LIST_ITEMS else
                                                     list(values[:MAX_LIST_ITEMS - 2]) + [values[-1]])]
    if len(values) > MAX_LIST_ITEMS:
        items[-1:-1] = ["..."]
        items[-1] += f" ({len(values):,})"
    return sep.join(items)


def _short(text, limit=MAX_CELL):
    text = io.printable(text)
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]}...{text[-half:]}"


def _table_row(row):
    """A row for the table and markdown formats: names escaped, long lists and names shortened."""
    out = dict(row)
    for key in ("name", "type"):
        out[key] = _short(row[key])
    for key in ("bottoms", "tops"):
        out[key] = _short_list(row[key], ",", str)
    if isinstance(row["top_shapes"], list):
        out["top_shapes"] = _short_list(row["top_shapes"], " ", fmt_shape)
    return out


def render(summary, fmt="table"):
    """The summary as text; the table and markdown formats escape names from the file and shorten long
    cells (JSON and CSV carry every value as it is, JSON-escaped or quoted)."""
    columns = list(COLUMNS)
    if any("weights" in r for r in summary["rows"]):
        columns.append(("weights", "in weights file"))
    rows, notes = summary["rows"], summary["notes"]
    if fmt in ("table", "markdown"):
        rows = [_table_row(r) for r in rows]
        notes = [io.printable(n) for n in notes]
    return report.render(columns, rows, fmt, totals=summary["totals"], notes=notes, extra=summary["extra"])


def add_arguments(p):
    p.add_argument("net", help="net definition (.prototxt; a .caffemodel also works)")
    p.add_argument("weights", nargs="?", help="optional .caffemodel to check against the net")
    add_allow_python_layers_option(p)


def run(args):
    s = summarize(args.net, args.weights, phase=args.phase, input_shapes=args.input_shape,
                  stages=args.stage, level=args.level, max_blob_bytes=args.max_blob_bytes,
                  allow_python_layers=args.allow_python_layers)
    print(render(s, args.format), end="")
    return 0
