"""A net's summary: one row per layer with shapes, parameter counts and MACs (the library side of
`caffeish summary`; the command-line face and its text rendering are tools/summary.py, and the web
app's model page shows the same rows).

Parameters are split into weights and biases (a layer's bias blobs: the second
blob of Convolution, Deconvolution, InnerProduct, Embed and Scale, the blob of
Bias, the 1-D blobs of RNN/LSTM; everything else counts as weights).  MACs
are given per batch (the net's input shapes as they are) and per image (per
batch divided by the batch size, the first dimension of the first input).
"""
import math

from caffeish.formats import io
from caffeish.graph import weights
from caffeish.apps.offsets import check_python_bottoms, without_python_layers
from caffeish.graph.graph import Graph, default_max_blob_bytes, filter_net, layer_included, make_state

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
              max_blob_bytes=None, allow_python_layers=False):
    """Build the summary of a net: {'rows': [...], 'totals': {...}, 'notes': [...], ...}.

    Python layers' code does not run unless allow_python_layers: their tops, and every layer computed
    from them, get rows with unknown shapes ("?") and no counts (offsets.without_python_layers)."""
    net = io.read_net(net_path, caffemodel=weights_path is None)  # a caffemodel alone: its own layers
    shapes = dict(input_shapes or {})
    cap = default_max_blob_bytes() if max_blob_bytes is None else max_blob_bytes
    kept, skipped = without_python_layers(net, phase, level, stages, shapes)
    if allow_python_layers and skipped:
        known = Graph(kept, phase=phase, level=level, stages=stages, input_shapes=shapes, max_blob_bytes=cap)
        check_python_bottoms(net, known, skipped, cap)
        kept, skipped = net, []
    graph = Graph(kept, phase=phase, level=level, stages=stages, input_shapes=shapes, max_blob_bytes=cap)
    batch, batch_blob = batch_size(graph)
    rows = _rows(net, graph, kept, skipped, batch)
    known = [r for r in rows if not r.get("unknown")]
    totals = {"name": "total", "params": graph.param_count,
              "weight_params": sum(r["weight_params"] for r in known),
              "bias_params": sum(r["bias_params"] for r in known),
              "macs_per_image": per_image(graph.macs, batch), "macs": graph.macs}
    outputs = _outputs(net, graph, skipped)
    notes = [
        f"inputs: {', '.join(f'{b} {fmt_shape(graph.blob_shapes[b])}' for b in graph.sources) or '(none)'}",
        f"outputs: {', '.join(f'{b} {fmt_shape(graph.blob_shapes.get(b))}' for b in outputs) or '(none)'}",
    ]
    if batch_blob is not None:
        notes.append(f"batch: {batch} (the first dimension of '{batch_blob}'); MACs/image = MACs/batch / {batch}")
    if skipped:
        python = [net.layer[i].name for i in skipped if net.layer[i].type == "Python"]
        notes.append(f"Python layer(s) {_names(python)} not run (their code runs only with --allow-python-layers): "
                     f"the shapes of their tops and of the {len(skipped) - len(python)} layer(s) computed from "
                     f"them are unknown (?), and the totals leave those layers out")
    extra = {"inputs": graph.sources, "outputs": outputs, "batch": batch,
             "python_layers_not_run": [net.layer[i].name for i in skipped if net.layer[i].type == "Python"]}
    if weights_path is not None:
        model = io.read_caffemodel(weights_path)
        binding = weights.bind(graph, model, source=str(weights_path))
        unknown = {net.layer[i].name for i in skipped}
        in_file = set(model.layer_blobs())
        unused = [n for n in binding.unused if n not in unknown]
        for r in rows:
            if r["name"] in binding.missing:
                r["weights"] = "missing"
            elif r["name"] in binding.arrays:
                r["weights"] = "loaded"
            elif r.get("unknown") and r["name"] in in_file:
                r["weights"] = "in file (not checked)"
        if binding.missing:
            notes.append(f"missing from the weights (will keep their fillers): {', '.join(binding.missing)}")
        if unused:
            notes.append(f"in the weights but not in the net (ignored): {', '.join(unused)}")
        if not binding.missing and not unused:
            notes.append("weights: every layer with parameters is matched"
                         + (" (the layers of unknown shape are not checked)" if skipped else ""))
        extra.update({"missing": binding.missing, "unused": unused})
    return {"rows": rows, "totals": totals, "notes": notes, "extra": extra, "graph": graph}


def _rows(net, graph, kept, skipped, batch):
    """One row per graph node, with the layers left out (skipped) in their places, in the net's order."""
    state = make_state(net, graph.phase, graph.state.level, list(graph.state.stage))
    included = [layer for layer in kept.layer if layer_included(layer, state)]
    groups = []  # per kept layer: its node, then the Splits the graph inserted after it
    for node in graph.nodes:
        k = len(groups)
        if k < len(included) and (node.name, node.type) == (included[k].name, included[k].type):
            groups.append([])
        if groups:
            groups[-1].append(_row(node, batch))
    groups = iter(groups)
    out = []
    for i, layer in enumerate(net.layer):
        if i in skipped:
            out.append({"name": layer.name, "type": layer.type, "bottoms": list(layer.bottom),
                        "tops": list(layer.top), "top_shapes": "?", "params": None, "weight_params": None,
                        "bias_params": None, "macs_per_image": None, "macs": None, "unknown": True})
        elif layer_included(layer, state):
            out += next(groups, [])
    for rest in groups:
        out += rest
    return out


def _row(node, batch):
    weight_params, bias_params = split_params(node)
    return {"name": node.name, "type": node.type, "bottoms": node.bottoms, "tops": node.tops,
            "top_shapes": [list(s) for s in node.top_shapes], "params": node.param_count,
            "weight_params": weight_params, "bias_params": bias_params,
            "macs_per_image": per_image(node.macs, batch), "macs": node.macs}


def _outputs(net, graph, skipped):
    """The net's outputs: the graph's, or, with layers left out, the blobs no later layer reads."""
    if not skipped:
        return graph.outputs
    readers = {}
    produced = []
    for layer in filter_net(net, graph.state).layer:
        for b in layer.bottom:
            readers[b] = readers.get(b, 0) + 1
        for t in layer.top:
            produced.append(t)
            readers[t] = 0
    return [b for b in dict.fromkeys(reversed(produced)) if not readers.get(b)][::-1]


def _names(names, limit=5):
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def fmt_shape(shape):
    if shape is None:
        return "?"
    return "x".join(str(d) for d in shape) if shape else "()"
