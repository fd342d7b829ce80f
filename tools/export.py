"""`caffeish export onnx`: write a Caffe net and its weights as an ONNX model.

    caffeish export onnx NET.prototxt [WEIGHTS.caffemodel|none] -o model.onnx [--opset N] [--dynamic-hw]
                         [--input-shape data=1,3,500,500] [--phase TEST] [--stage S] [--level L]

Every layer keeps Caffe's semantics (pooling's ceil rounding and clipped last
window, Crop offsets, Deconvolution groups, LRN, Softmax axis, in-place layers,
Splits); a layer ONNX cannot express is named in a one-line error and nothing
is written.  The model's inputs are the net's Input blobs and its outputs the
net's outputs, with the blobs' names.  --dynamic-hw makes the height and width
of every 4-D input symbolic, so that a fully convolutional net takes any size.
Needs the onnx package (pip install 'caffeish[onnx]').
"""
from caffeish.apps.export_onnx import DEFAULT_OPSET, MIN_OPSET, escaped, export_onnx
from caffeish.tools.options import add_net_state_options, int_arg


def _shape(info):
    dims = info.type.tensor_type.shape.dim
    return "x".join(escaped(d.dim_param) or str(d.dim_value) if (d.dim_param or d.HasField("dim_value")) else "?"
                    for d in dims) or "scalar"


def add_arguments(p):
    sub = p.add_subparsers(dest="export_format", metavar="FORMAT")
    sub.required = True
    onnx = sub.add_parser("onnx", help="an ONNX model (needs the onnx package)", description=__doc__,
                          formatter_class=p.formatter_class)
    onnx.add_argument("net", metavar="NET.prototxt", help="the net (a deploy prototxt with Input layers)")
    onnx.add_argument("weights", metavar="WEIGHTS", nargs="?", default=None,
                      help="the trained weights (.caffemodel); omitted or 'none': the layers' fillers")
    onnx.add_argument("-o", "--output", required=True, metavar="MODEL.onnx", help="where to write the model")
    onnx.add_argument("--opset", type=int_arg(MIN_OPSET), default=DEFAULT_OPSET,
                      help=f"ONNX opset version (default {DEFAULT_OPSET}; at least {MIN_OPSET})")
    onnx.add_argument("--dynamic-hw", action="store_true",
                      help="symbolic height and width for 4-D inputs (fully convolutional nets take any size)")
    add_net_state_options(onnx)
    onnx.set_defaults(run=run)


def run(args):
    weights = None if args.weights is None or args.weights.strip().lower() == "none" else args.weights
    result = export_onnx(args.net, weights, args.output, opset=args.opset, dynamic_hw=args.dynamic_hw,
                         phase=args.phase, level=args.level, stages=args.stage,
                         input_shapes=dict(args.input_shape) or None)
    graph = result.model.graph
    ins = ", ".join(f"{escaped(i.name)} {_shape(i)}" for i in graph.input)
    outs = ", ".join(f"{escaped(o.name)} {_shape(o)}" for o in graph.output)
    print(f"wrote {args.output}: ONNX opset {result.opset}, {len(graph.node)} nodes, "
          f"{len(graph.initializer)} initializers")
    print(f"inputs: {ins}")
    print(f"outputs: {outs}")
    if result.unread:
        print(f"note: left out input(s) no layer reads: {', '.join(escaped(n) for n in result.unread)}")
    if weights is None:
        print("note: no weights given: the parameters are the layers' fillers")
    return 0
