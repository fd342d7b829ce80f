"""`caffeish summary`: one row per layer with shapes, parameter counts and MACs.

    caffeish summary NET.prototxt [WEIGHTS.caffemodel] [--input-shape data=1,3,500,500]
                     [--phase TRAIN|TEST] [--format table|markdown|json|csv]

Parameters are split into weights and biases (a layer's bias blobs: the second
blob of Convolution, Deconvolution, InnerProduct, Embed and Scale, the blob of
Bias, the 1-D blobs of RNN/LSTM; everything else counts as weights).  MACs
are given per batch (the net's input shapes as they are) and per image (per
batch divided by the batch size, the first dimension of the first input).
"""
import math

from caffeish.formats import io
from caffeish.tools import report
from caffeish.graph import weights
from caffeish.graph.graph import Graph

COLUMNS = [
    ("name", "layer"),
    ("type", "type"),
    ("bottoms", "bottoms"),
    ("tops", "tops"),
    ("top_shapes", "top shapes"),
    ("params", "params"),
    ("weight_params", "weights"),
    ("bias_params", "biases"),
    ("macs_per_image", "MACs/image"),
    ("macs", "MACs/batch"),
]
BIAS_BLOB = {"Convolution": 1, "Deconvolution": 1, "InnerProduct": 1, "Embed": 1, "Scale": 1, "Bias": 0}


def split_params(node):
    """(weight parameters, bias parameters) of a graph node."""
    shapes = [tuple(s) for s in node.param_shapes]
    counts = [int(math.prod(s)) for s in shapes]
    if node.type in ("RNN", "LSTM"):
        biases = [i for i, s in enumerate(shapes) if len(s) == 1]
    elif node.type == "Scale" and len(node.bottoms) == 2:
        biases = [0]  # the scale is the second bottom: the only blob is the bias
    elif node.type in BIAS_BLOB:
        biases = [BIAS_BLOB[node.type]]
    else:
        biases = []
    bias = sum(c for i, c in enumerate(counts) if i in biases)
    return sum(counts) - bias, bias


def batch_size(graph):
    """(N, blob): the first dimension of the first input (or of the first layer's top without inputs)."""
    for blob in graph.sources:
        shape = graph.blob_shapes.get(blob)
        if shape:
            return int(shape[0]), blob
    for node in graph.nodes:
        if node.top_shapes and len(node.top_shapes[0]):
            return int(node.top_shapes[0][0]), node.tops[0]
    return 1, None


def per_image(macs, batch):
    if batch <= 1 or macs % batch == 0:
        return macs // max(batch, 1)
    return round(macs / batch, 1)


def summarize(net_path, weights_path=None, phase="TEST", input_shapes=None, stages=(), level=0,
              max_blob_bytes=None):
    """Build the summary of a net: {'rows': [...], 'totals': {...}, 'notes': [...], ...}."""
    net = io.read_net(net_path, caffemodel=weights_path is None)  # a caffemodel alone: its own layers
    graph = Graph(net, phase=phase, level=level, stages=stages, input_shapes=input_shapes,
                  max_blob_bytes=max_blob_bytes)
    rows = []
    batch, batch_blob = batch_size(graph)
    for node in graph.nodes:
        weight_params, bias_params = split_params(node)
        rows.append({
            "name": node.name,
            "type": node.type,
            "bottoms": node.bottoms,
            "tops": node.tops,
            "top_shapes": [list(s) for s in node.top_shapes],
            "params": node.param_count,
            "weight_params": weight_params,
            "bias_params": bias_params,
            "macs_per_image": per_image(node.macs, batch),
            "macs": node.macs,
        })
    totals = {"name": "total", "params": graph.param_count,
              "weight_params": sum(r["weight_params"] for r in rows),
              "bias_params": sum(r["bias_params"] for r in rows),
              "macs_per_image": per_image(graph.macs, batch), "macs": graph.macs}
    notes = [
        f"inputs: {', '.join(f'{b} {_shape(graph.blob_shapes[b])}' for b in graph.sources) or '(none)'}",
        f"outputs: {', '.join(f'{b} {_shape(graph.blob_shapes[b])}' for b in graph.outputs) or '(none)'}",
    ]
    if batch_blob is not None:
        notes.append(f"batch: {batch} (the first dimension of '{batch_blob}'); MACs/image = MACs/batch / {batch}")
    extra = {"inputs": graph.sources, "outputs": graph.outputs, "batch": batch}
    if weights_path is not None:
        model = io.read_caffemodel(weights_path)
        binding = weights.bind(graph, model, source=str(weights_path))
        for r in rows:
            if r["name"] in binding.missing:
                r["weights"] = "missing"
            elif r["name"] in binding.arrays:
                r["weights"] = "loaded"
        if binding.missing:
            notes.append(f"missing from the weights (will keep their fillers): {', '.join(binding.missing)}")
        if binding.unused:
            notes.append(f"in the weights but not in the net (ignored): {', '.join(binding.unused)}")
        if not binding.missing and not binding.unused:
            notes.append("weights: every layer with parameters is matched")
        extra.update({"missing": binding.missing, "unused": binding.unused})
    return {"rows": rows, "totals": totals, "notes": notes, "extra": extra, "graph": graph}


def _shape(shape):
    return "x".join(str(d) for d in shape) if shape else "()"


def render(summary, fmt="table"):
    columns = list(COLUMNS)
    if any("weights" in r for r in summary["rows"]):
        columns.append(("weights", "in weights file"))
    return report.render(columns, summary["rows"], fmt, totals=summary["totals"],
                         notes=summary["notes"], extra=summary["extra"])


def add_arguments(p):
    p.add_argument("net", help="net definition (.prototxt; a .caffemodel also works)")
    p.add_argument("weights", nargs="?", help="optional .caffemodel to check against the net")


def run(args):
    s = summarize(args.net, args.weights, phase=args.phase, input_shapes=args.input_shape,
                  stages=args.stage, level=args.level, max_blob_bytes=args.max_blob_bytes)
    print(render(s, args.format), end="")
    return 0
