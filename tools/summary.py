"""`caffeish summary`: one row per layer with shapes, parameter counts and MACs.

    caffeish summary NET.prototxt [WEIGHTS.caffemodel] [--input-shape data=1,3,500,500]
                     [--phase TRAIN|TEST] [--format table|markdown|json|csv]
"""
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
    ("macs", "MACs"),
]


def summarize(net_path, weights_path=None, phase="TEST", input_shapes=None, stages=(), level=0,
              max_blob_bytes=None):
    """Build the summary of a net: {'rows': [...], 'totals': {...}, 'notes': [...], ...}."""
    net = io.read_net(net_path)
    graph = Graph(net, phase=phase, level=level, stages=stages, input_shapes=input_shapes,
                  max_blob_bytes=max_blob_bytes)
    rows = []
    for node in graph.nodes:
        rows.append({
            "name": node.name,
            "type": node.type,
            "bottoms": node.bottoms,
            "tops": node.tops,
            "top_shapes": [list(s) for s in node.top_shapes],
            "params": node.param_count,
            "macs": node.macs,
        })
    totals = {"name": "total", "params": graph.param_count, "macs": graph.macs}
    notes = [
        f"inputs: {', '.join(f'{b} {_shape(graph.blob_shapes[b])}' for b in graph.sources) or '(none)'}",
        f"outputs: {', '.join(f'{b} {_shape(graph.blob_shapes[b])}' for b in graph.outputs) or '(none)'}",
    ]
    extra = {"inputs": graph.sources, "outputs": graph.outputs}
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
        columns.append(("weights", "weights"))
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
