"""pycaffe's caffe.draw: a NetParameter as a Graphviz picture, through pydot.

    import caffeish.pycaffe.draw as draw             # `import caffe.draw` with caffe = caffeish
    draw.draw_net_to_file(net, "net.png", rankdir="LR", phase=caffeish.TEST)

An optional extra: `pip install 'caffeish[draw]'` installs pydot, and pictures (png,
svg, pdf, ...) need Graphviz's `dot` program on PATH (Debian: apt-get install graphviz).
The `.raw` extension writes the DOT text itself, without Graphviz.  When either is
missing the functions raise DrawDependencyError (a CaffeishError and an ImportError)
saying what to install; the labels and colours (get_layer_label, get_edge_label, ...)
need neither.

As pycaffe: one box per layer (label: name, type, kernel/stride/pad for spatial
layers, optionally the lr_mult values), coloured by type, in-place layers in green,
one octagon per blob, edges labelled with the output count.  `phase` keeps the layers
whose include/exclude rules admit that phase (None: all layers).  Unlike pycaffe, a
V0/V1 (legacy) net is upgraded first rather than drawn empty.
"""
import contextlib
import io as pyio
import os
import re
import shutil

from caffeish.errors import CaffeishError
from caffeish.formats import io
from caffeish.formats.schema import pb
from caffeish.formats.upgrade import needs_upgrade, upgrade_net

__all__ = ["get_pydot_graph", "draw_net", "draw_net_to_file", "get_layer_label", "get_edge_label",
           "get_layer_lr_mult", "get_pooling_types_dict", "choose_color_by_layertype",
           "DrawDependencyError", "DrawError", "LAYER_STYLE_DEFAULT", "NEURON_LAYER_STYLE", "BLOB_STYLE"]

LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}

RANKDIRS = ("LR", "RL", "TB", "BT")
INSTALL_PYDOT = "pip install 'caffeish[draw]' (or: pip install pydot)"
INSTALL_GRAPHVIZ = "install Graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz)"


class DrawDependencyError(CaffeishError, ImportError):
    """pydot or Graphviz is not installed."""


class DrawError(CaffeishError, ValueError):
    """A net or an argument that cannot be drawn as asked."""


def _pydot():
    """The pydot module (or pydotplus, which pycaffe also accepts)."""
    try:
        import pydot
    except ImportError:
        try:
            import pydotplus as pydot
        except ImportError:
            raise DrawDependencyError(f"drawing a net needs pydot, which is not installed: {INSTALL_PYDOT}; "
                                      f"PNG and SVG pictures also need Graphviz's dot program: {INSTALL_GRAPHVIZ}") from None
    return pydot


# -- labels and colours ------------------------------------------------------------------------


def get_pooling_types_dict():
    """{pool method number: name}: {0: 'MAX', 1: 'AVE', 2: 'STOCHASTIC'}."""
    return {v.number: v.name for v in pb.PoolingParameter.PoolMethod.DESCRIPTOR.values}


def get_edge_label(layer):
    """The label of a layer's output edges: the batch size (Data) or the output count."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return '""'


def get_layer_lr_mult(layer):
    """(weights lr_mult, bias lr_mult) of a Convolution, Deconvolution or InnerProduct layer (1.0 unset)."""
    if layer.type not in ("Convolution", "Deconvolution", "InnerProduct"):
        raise DrawError(f"{layer.type} layers do not have a learning rate multiplier")
    specs = list(layer.param)
    if len(specs) > 2:
        raise DrawError(f"layer '{layer.name}': could not parse the learning rate multiplier "
                        f"({len(specs)} param specs, expected at most 2)")
    mults = [spec.lr_mult for spec in specs] + [1.0] * (2 - len(specs))
    return tuple(mults)


def get_layer_label(layer, rankdir, display_lrm=False):
    """A layer's node label: name, (type), kernel/stride/pad, lr mults; quoted for DOT.

    Words are separated by spaces in a vertical layout (TB, BT) and by line breaks
    in a horizontal one.
    """
    separator = " " if rankdir in ("TB", "BT") else r"\n"
    parts = [layer.name]
    if layer.type == "Pooling":
        method = get_pooling_types_dict().get(layer.pooling_param.pool, str(layer.pooling_param.pool))
        parts.append(f"({layer.type} {method})")
    else:
        parts.append(f"({layer.type})")
    if layer.type in ("Convolution", "Deconvolution", "Pooling"):
        if layer.type == "Pooling":
            pp = layer.pooling_param
            kernel, stride, pad = pp.kernel_size, pp.stride, pp.pad
        else:
            cp = layer.convolution_param
            kernel = cp.kernel_size[0] if len(cp.kernel_size) else 1
            stride = cp.stride[0] if len(cp.stride) else 1
            pad = cp.pad[0] if len(cp.pad) else 0
        parts.append(separator.join([f"kernel size: {kernel}", f"stride: {stride}", f"pad: {pad}"]))
    if display_lrm and layer.type in ("Convolution", "Deconvolution", "InnerProduct"):
        lrm0, lrm1 = get_layer_lr_mult(layer)
        if lrm0 or lrm1:
            parts.append(f"lr mult: {lrm0:.1f}, {lrm1:.1f}")
    # Outer double quotes, or DOT misreads the colons.
    return f'"{separator.join(parts)}"'


def choose_color_by_layertype(layertype):
    """A node colour per layer type (convolutions red, pooling orange, inner products purple)."""
    if layertype in ("Convolution", "Deconvolution"):
        return "#FF5050"
    if layertype == "Pooling":
        return "#FF9900"
    if layertype == "InnerProduct":
        return "#CC33FF"
    return "#6495ED"


# -- the graph -------------------------------------------------------------------------------------------


def _as_net(caffe_net):
    """A current-format caffeish NetParameter from any caffe.NetParameter message."""
    if not isinstance(caffe_net, pb.NetParameter):
        descriptor = getattr(caffe_net, "DESCRIPTOR", None)
        if getattr(descriptor, "full_name", None) != "caffe.NetParameter":
            raise DrawError(f"expected a caffe NetParameter (read one with caffeish.io.read_net or "
                            f"text_format.Merge), got {type(caffe_net).__name__}")
        caffe_net = pb.NetParameter.FromString(caffe_net.SerializeToString())
    if needs_upgrade(caffe_net):
        caffe_net = upgrade_net(caffe_net)[0]
    return caffe_net


def _phase_value(phase):
    if phase is None:
        return None
    if isinstance(phase, str) and phase.upper() in ("TRAIN", "TEST"):
        return pb.Phase.Value(phase.upper())
    if phase in (pb.TRAIN, pb.TEST) and not isinstance(phase, bool):
        return int(phase)
    raise DrawError(f"phase must be caffe.TRAIN, caffe.TEST or None, got {phase!r}")


def _included(layer, phase):
    """Whether the layer's include/exclude rules admit `phase` (a rule without a phase admits any)."""
    if len(layer.include) and len(layer.exclude):
        raise DrawError(f"layer {layer.name} has both include and exclude specified.")
    if len(layer.include):
        return any(not r.HasField("phase") or r.phase == phase for r in layer.include)
    return not any(r.HasField("phase") and r.phase == phase for r in layer.exclude)


def _check_rankdir(rankdir):
    if rankdir not in RANKDIRS:
        raise DrawError(f"rankdir must be one of {', '.join(RANKDIRS)}, got {rankdir!r}")


def get_pydot_graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    """A pydot.Dot of the net: layer boxes, blob octagons, edges bottom -> layer -> top."""
    _check_rankdir(rankdir)
    net = _as_net(caffe_net)
    phase = _phase_value(phase)
    pydot = _pydot()
    graph = pydot.Dot(net.name or "Net", graph_type="digraph", rankdir=rankdir)
    nodes = {}
    edges = []
    for layer in net.layer:
        if phase is not None and not _included(layer, phase):
            continue
        label = get_layer_label(layer, rankdir, display_lrm=display_lrm)
        node_name = f"{layer.name}_{layer.type}"
        if len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]:
            style = NEURON_LAYER_STYLE  # an in-place layer
        else:
            style = dict(LAYER_STYLE_DEFAULT, fillcolor=choose_color_by_layertype(layer.type))
        nodes[node_name] = pydot.Node(label, **style)
        for bottom in layer.bottom:
            nodes[f"{bottom}_blob"] = pydot.Node(f"{bottom}", **BLOB_STYLE)
            edges.append((f"{bottom}_blob", node_name, '""'))
        for top in layer.top:
            nodes[f"{top}_blob"] = pydot.Node(f"{top}")
            edges.append((node_name, f"{top}_blob", get_edge_label(layer) if label_edges else '""'))
    for node in nodes.values():
        graph.add_node(node)
    for src, dst, label in edges:
        graph.add_edge(pydot.Edge(nodes[src], nodes[dst], label=label))
    return graph


def draw_net(caffe_net, rankdir, ext="png", phase=None, display_lrm=False):
    """The picture of the net as bytes in format `ext` (png, svg, pdf, ...; 'raw': the DOT text)."""
    graph = get_pydot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    return render(graph, ext)


def render(graph, ext="png"):
    """A pydot graph as bytes in format `ext` through Graphviz's dot ('raw': the DOT text); also draws
    the web app's layer graph (caffeish.web.pictures)."""
    if ext == "raw":
        return graph.to_string().encode("utf-8")
    if shutil.which("dot") is None:
        raise DrawDependencyError(f"drawing a net as '{ext}' needs Graphviz's dot program, which is not on "
                                  f"PATH: {INSTALL_GRAPHVIZ}; the '.raw' extension writes the DOT text without it")
    said = pyio.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # pydot prints dot's complaints
            return graph.create(format=ext)
    except AssertionError:
        found = re.search(r'Format: "[^"]*" not recognized', said.getvalue())
        detail = found.group(0) if found else "dot failed (run dot -T? for the formats it knows)"
        raise DrawError(f"Graphviz's dot could not write format '{ext}': {detail}") from None
    except OSError as e:
        raise DrawDependencyError(f"running Graphviz's dot failed ({e}): {INSTALL_GRAPHVIZ}") from None


def draw_net_to_file(caffe_net, filename, rankdir="LR", phase=None, display_lrm=False):
    """Draw the net into `filename`, in the format its extension names ('.raw': the DOT text).

    The file is written whole or not at all (a temp file renamed into place).
    """
    filename = os.fspath(filename)
    ext = filename[filename.rfind(".") + 1:] if "." in os.path.basename(filename) else ""
    if not ext:
        raise DrawError(f"{filename}: no extension to choose the picture format from (.png, .svg, .pdf, .raw)")
    data = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    with io.atomic_output(filename) as f:
        f.write(data)
