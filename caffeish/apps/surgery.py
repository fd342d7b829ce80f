"""Net surgery: turn a classifier into a fully convolutional net, move weights between nets.

What the DIGITS 5 segmentation post and fcn.berkeleyvision.org's surgery.py do
by hand with pycaffe, as checked functions (the `caffeish surgery` commands):

* `convolutionalize(net, model)`: every InnerProduct becomes the equivalent
  Convolution.  One whose input is N x C x H x W gets an H x W kernel (AlexNet's
  fc6 on pool5's 256 x 6 x 6: a 6 x 6 kernel, 4096 x 256 x 6 x 6 weights, still
  37,752,832 parameters); one whose input is N x C (after another InnerProduct)
  a 1 x 1 kernel.  Caffe's InnerProduct flattens C, H, W in that order, which is
  the order of a Convolution weight's (C, kh, kw) axes, so the weight matrix is
  only reshaped (a view; a `transpose: true` weight is transposed first).  The
  name, bottoms, tops, param specs (lr_mult, decay_mult, name), bias_term and
  fillers are kept.  Flatten or Reshape layers that only fed InnerProducts are
  removed.  Then both nets run on the same random input and must agree
  (`verify`, on by default).
* `transplant(src, model, dst)`: copy parameters by layer name into another
  net; a blob whose element count matches but whose shape differs (fc -> conv)
  is reshaped; a count mismatch is an error naming the layer and both shapes
  (DIGITS' net_surgery.py copies `.flat` without checking).  Layers of the
  destination with no source keep their fillers, whose values are written; the
  report names them, and a Convolution, Deconvolution, InnerProduct or Embed
  whose weights stay at a constant filler (constant, a zero-width gaussian or
  uniform, or no filler: zeros) gets a warning (Report.warnings): its outputs
  would not depend on its input.
* `bilinear_weights(shape)` / `bilinear(net, model)`: bilinear upsampling
  weights for Deconvolution layers (Caffe's `bilinear` filler, or FCN's
  per-channel diagonal form for a dense deconvolution).

`caffeish.apps.surgery_fcn.build_fcn` chains these into a segmentation FCN.
Functions return new NetParameters and per-layer blob lists (aligned with the
net's layers, ready for `caffeish.formats.io.write_caffemodel`); inputs are never
modified.
"""
import fnmatch
import math
import os

import numpy as np

from caffeish.runtime import fillers
from caffeish.graph import geometry
from caffeish.formats import io
from caffeish.errors import CaffeishError, GraphError, ShapeError, UnsupportedError, WeightError
from caffeish.graph.graph import Graph, layer_included
from caffeish.data.metrics import relative_error
from caffeish.formats.schema import TEST, pb
from caffeish.formats.upgrade import upgrade_net
from caffeish.graph.weights import bind, shape_equals

TOLERANCE = 1e-5


class EquivalenceError(CaffeishError):
    """The converted net does not compute what the original computes."""


class Report:
    """What an operation did: table rows (dicts), the columns to show, totals and notes."""

    def __init__(self, columns, rows=None, totals=None, notes=None):
        self.columns = list(columns)
        self.rows = list(rows or [])
        self.totals = totals
        self.notes = list(notes or [])
        self.checks = []  # equivalence rows (see verify_equivalence)
        self.warnings = []  # lines for stderr: results that run but are probably not what was meant


# -- loading ------------------------------------------------------------------------------------------


def load_net(net):
    """An upgraded copy of a net given as a path (prototxt or caffemodel) or a pb.NetParameter."""
    if isinstance(net, pb.NetParameter):
        out = pb.NetParameter()
        out.CopyFrom(net)
        if len(out.layers) or len(out.input):
            out = upgrade_net(out)[0]
        return out
    return io.read_net(os.fspath(net), caffemodel=True)  # a caffemodel's own layer list is a net here


def load_model(model):
    """A caffeish.formats.io.Model from a path (V0/V1 files are upgraded), a Model, or None."""
    if model is None or isinstance(model, io.Model):
        return model
    return io.read_caffemodel(os.fspath(model))


def model_path(model):
    return getattr(model, "path", None) if model is not None else None


def graph_nodes(graph):
    """{layer name: Node} of the graph's own layers (Caffe's inserted Split layers left out)."""
    own = {l.name for l in graph.filtered.layer}
    return {n.name: n for n in graph.nodes if n.name in own}


def seeded_rng(seed):
    """numpy's random generator for `seed`; a negative or non-integer seed is a CaffeishError (numpy's
    seeds are non-negative integers)."""
    try:
        whole = not isinstance(seed, bool) and int(seed) == seed
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or seed < 0:
        raise CaffeishError(f"the seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(int(seed))


def count(shape):
    return int(math.prod(shape))


def blob_lists(net, arrays):
    """Blob lists aligned with net.layer from {layer name: [array or BlobRecord, ...]}."""
    return [list(arrays.get(layer.name, [])) for layer in net.layer]


# -- convolutionalize ---------------------------------------------------------------------------------


class _Conversion:
    """One InnerProduct to turn into a Convolution: its input C, H, W and the new shapes."""

    def __init__(self, node, channels, kernel, source):
        self.name = node.name
        self.channels = channels
        self.kernel = kernel  # (kh, kw)
        self.source = source  # the blob the Convolution reads (a removed Flatten's bottom, or the same)
        ip = node.param.inner_product_param
        self.num_output = ip.num_output
        self.transpose = ip.transpose
        self.old_shapes = list(node.param_shapes)
        self.new_shapes = [(self.num_output, channels) + tuple(kernel)] + self.old_shapes[1:]
        self.bottom_shape = tuple(node.bottom_shapes[0])

    def weights(self, arrays):
        """The Convolution's blobs from the InnerProduct's (weight reshaped, bias as is)."""
        w = np.asarray(arrays[0])
        if self.transpose:  # stored (K, N): y = x . W
            w = np.ascontiguousarray(w.reshape(self.old_shapes[0]).T)
        out = [w.reshape(self.new_shapes[0])]
        out += [np.asarray(a).reshape(s) for a, s in zip(arrays[1:], self.new_shapes[1:])]
        return out


def _flatten_like(node):
    """True when a Flatten/Reshape node turns N x C x H x W into N x (C*H*W), nothing else."""
    if node.type not in ("Flatten", "Reshape") or len(node.bottoms) != 1 or len(node.tops) != 1:
        return False
    b, t = tuple(node.bottom_shapes[0]), tuple(node.top_shapes[0])
    return len(b) == 4 and t == (b[0], count(b[1:]))


def _plan(graph):
    """(conversions by name, {removed Flatten/Reshape name: (its bottom, its top)})."""
    nodes = graph_nodes(graph)
    layers = list(graph.filtered.layer)
    consumers = {}
    for layer in layers:
        for b in layer.bottom:
            consumers.setdefault(b, []).append(layer)
    removed = {}
    for layer in layers:
        node = nodes.get(layer.name)
        if node is None or not _flatten_like(node):
            continue
        users = consumers.get(layer.top[0], [])
        if users and all(u.type == "InnerProduct" and _ip_axis(nodes[u.name]) == 1 for u in users):
            removed[layer.name] = (layer.bottom[0], layer.top[0])
    flat_tops = {top: (bottom, name) for name, (bottom, top) in removed.items()}
    conversions = {}
    producer = {}  # blob -> the layers that wrote it so far, in order (in-place layers add to the list)
    for layer in layers:
        if layer.type != "InnerProduct":
            for t in layer.top:
                producer.setdefault(t, []).append(layer)
            continue
        node = nodes[layer.name]
        axis = _ip_axis(node)
        shape = tuple(node.bottom_shapes[0])
        if axis != 1:
            raise UnsupportedError(
                f"layer '{layer.name}' (InnerProduct): axis is {layer.inner_product_param.axis} (axis {axis} of "
                f"a {len(shape)}-D input {shape}); only axis 1 (N x features) has an equivalent Convolution")
        source = layer.bottom[0]
        if source in flat_tops:
            source, flatten = flat_tops[source]
            shape = tuple(nodes[flatten].bottom_shapes[0])
        if len(shape) == 4:
            channels, kernel = shape[1], (shape[2], shape[3])
        elif len(shape) == 2:
            _check_vector_source(layer, producer)
            channels, kernel = shape[1], (1, 1)
        else:
            raise UnsupportedError(
                f"layer '{layer.name}' (InnerProduct): its input '{layer.bottom[0]}' is {len(shape)}-D {shape}; "
                f"only N x C x H x W or N x C inputs become a Convolution")
        conversions[layer.name] = _Conversion(node, channels, kernel, source)
        for t in layer.top:
            producer.setdefault(t, []).append(layer)
    return conversions, removed


def _check_vector_source(layer, producer):
    """An N x C input becomes N x C x 1 x 1 only when it comes from InnerProduct layers
    (through pointwise layers such as ReLU and Dropout); refuse anything else."""
    todo = [(layer.bottom[0], len(producer.get(layer.bottom[0], [])) - 1)]
    while todo:
        blob, k = todo.pop()
        history = producer.get(blob, [])
        p = history[k] if 0 <= k < len(history) else None
        if p is not None and p.type == "InnerProduct":
            continue
        if p is not None and p.bottom and p.type in geometry.POINTWISE_TYPES:
            # an in-place layer read the previous version of its blob
            todo += [(b, k - 1 if b == blob else len(producer.get(b, [])) - 1) for b in p.bottom]
            continue
        what = f"layer '{p.name}' ({p.type})" if p is not None else "the net's input"
        raise UnsupportedError(
            f"layer '{layer.name}' (InnerProduct): its N x C input '{layer.bottom[0]}' comes from {what}, "
            f"not from an InnerProduct, so it would not become N x C x 1 x 1; only InnerProducts on "
            f"N x C x H x W blobs or after other InnerProducts can be convolutionalized")


def _ip_axis(node):
    axis = node.param.inner_product_param.axis
    ndim = len(node.bottom_shapes[0])
    return axis + ndim if axis < 0 else axis


def _conv_layer(layer, conv):
    """The Convolution LayerParameter replacing InnerProduct `layer`."""
    new = pb.LayerParameter()
    new.CopyFrom(layer)
    new.type = "Convolution"
    new.ClearField("inner_product_param")
    del new.bottom[:]
    new.bottom.extend(conv.source if b == layer.bottom[0] else b for b in layer.bottom)
    ip, cp = layer.inner_product_param, new.convolution_param
    cp.num_output = ip.num_output
    if ip.HasField("bias_term"):
        cp.bias_term = ip.bias_term
    kh, kw = conv.kernel
    if kh == kw:
        cp.kernel_size.append(kh)
    else:
        cp.kernel_h, cp.kernel_w = kh, kw
    if ip.HasField("weight_filler"):
        cp.weight_filler.CopyFrom(ip.weight_filler)
    if ip.HasField("bias_filler"):
        cp.bias_filler.CopyFrom(ip.bias_filler)
    return new


def convolutionalize(net, model=None, input_shapes=None, verify=True, phase=TEST, seed=0, tolerance=TOLERANCE):
    """Replace every InnerProduct by the equivalent Convolution.

    net: a prototxt/caffemodel path or a NetParameter (V0/V1 upgraded).  model:
    a caffemodel path or caffeish.formats.io.Model (or None: only the net changes).
    input_shapes: {input blob: shape}, the classifier's input size (default:
    the net's own).  Returns (new net, blob lists aligned with its layers or
    None without a model, Report).  With verify, both nets run on the same
    random input (the model's weights, or random ones) and every output must
    agree within `tolerance` relative (EquivalenceError otherwise).
    """
    seeded_rng(seed)  # a bad seed fails before the work
    src = load_net(net)
    model = load_model(model)
    graph = Graph(src, phase, input_shapes=input_shapes)
    conversions, removed = _plan(graph)
    if not conversions:
        raise GraphError("the net has no InnerProduct layer to convolutionalize")
    binding = bind(graph, model, source=str(model_path(model) or "weights")) if model is not None else None

    out = pb.NetParameter()
    out.CopyFrom(src)
    del out.layer[:]
    for layer in src.layer:
        included = layer_included(layer, graph.state)
        if included and layer.name in removed:
            continue
        if included and layer.name in conversions:
            out.layer.add().CopyFrom(_conv_layer(layer, conversions[layer.name]))
        else:
            out.layer.add().CopyFrom(layer)

    blobs = None
    if model is not None:
        stored = model.layer_blobs()
        arrays = {}
        for layer in out.layer:
            if layer.name in conversions and layer.name in binding.arrays:
                arrays[layer.name] = conversions[layer.name].weights(binding.arrays[layer.name])
            elif layer.name in binding.arrays:  # in the net's shapes (a legacy 4-D bias becomes 1-D)
                arrays[layer.name] = binding.arrays[layer.name]
            elif layer.name in stored:
                arrays[layer.name] = stored[layer.name]
        blobs = blob_lists(out, arrays)

    new_graph = _check_converted(out, conversions, phase, input_shapes)
    report = _conv_report(graph, new_graph, conversions, removed, binding)
    if verify:
        verify_equivalence(src, out, binding.arrays if binding else None, conversions, report,
                           input_shapes=input_shapes, phase=phase, seed=seed, tolerance=tolerance)
    return out, blobs, report


def _check_converted(out, conversions, phase, input_shapes):
    """The converted net's graph; each new Convolution must give N x K x 1 x 1 at the classifier's size."""
    try:
        graph = Graph(out, phase, input_shapes=input_shapes)
    except CaffeishError as e:
        raise ShapeError(f"the convolutionalized net does not build: {e}") from None
    nodes = graph_nodes(graph)
    for name, conv in conversions.items():
        node = nodes[name]
        top = tuple(node.top_shapes[0])
        bottom = tuple(node.bottom_shapes[0])
        if len(bottom) != 4:
            raise UnsupportedError(
                f"layer '{name}' (InnerProduct): its input '{node.param.bottom[0]}' is {bottom}, not N x C x H x W, "
                f"after the conversion (it does not come from a convolutionalized layer), so no Convolution "
                f"can replace it")
        if top[2:] != (1, 1) or [tuple(s) for s in node.param_shapes] != conv.new_shapes:
            raise ShapeError(f"layer '{name}': the Convolution gives {top} with parameters {node.param_shapes}, "
                             f"expected N x {conv.num_output} x 1 x 1 with {conv.new_shapes}")
    return graph


def _conv_report(graph, new_graph, conversions, removed, binding):
    columns = [("layer", "layer"), ("input", "input"), ("kernel", "kernel"), ("old", "InnerProduct blobs"),
               ("new", "Convolution blobs"), ("params", "parameters")]
    rows = []
    for name, conv in conversions.items():
        rows.append({"layer": name, "input": list(conv.bottom_shape), "kernel": f"{conv.kernel[0]}x{conv.kernel[1]}",
                     "old": [list(s) for s in conv.old_shapes], "new": [list(s) for s in conv.new_shapes],
                     "params": sum(count(s) for s in conv.new_shapes)})
    before, after = graph.param_count, new_graph.param_count
    notes = [f"parameters: {before:,} before, {after:,} after"
             + (" (identical)" if before == after else " (DIFFERENT)")]
    notes += [f"removed {name} ({_node_type(graph, name)}): '{b}' -> '{t}' only fed InnerProduct layers"
              for name, (b, t) in removed.items()]
    if binding is not None and binding.missing:
        notes.append(f"layers missing from the weights (left to their fillers): {', '.join(binding.missing)}")
    if before != after:
        raise ShapeError(f"the parameter count changed from {before:,} to {after:,}")
    report = Report(columns, rows, totals={"layer": "total (net)", "params": after}, notes=notes)
    report.params_before, report.params_after = before, after
    return report


def _node_type(graph, name):
    return graph_nodes(graph)[name].type


# -- equivalence ------------------------------------------------------------------------------------


def random_params(graph, rng):
    """Random weights for the layers that hold them: N(0, 1/fan_in) weights and small biases
    for Convolution/InnerProduct/Deconvolution, the layer's fillers elsewhere (BatchNorm
    statistics must stay valid)."""
    out = {}
    for node in graph_nodes(graph).values():
        if not node.param_shapes:
            continue
        if node.type in ("Convolution", "InnerProduct", "Deconvolution"):
            arrays = []
            for i, shape in enumerate(node.param_shapes):
                if i == 0:
                    fan_in = fillers.fan_in_out(shape)[0]
                    if node.type == "InnerProduct" and node.param.inner_product_param.transpose:
                        fan_in = shape[0]
                    std = 1.0 / math.sqrt(max(fan_in, 1))
                else:
                    std = 0.1
                arrays.append((rng.standard_normal(shape, dtype=np.float32) * np.float32(std)))
            out[node.name] = arrays
        else:
            specs = node.layer.fillers()
            out[node.name] = [fillers.fill(specs[i] if i < len(specs) else None, s, rng)
                              for i, s in enumerate(node.param_shapes)]
    return out


def set_params(net, arrays):
    """Write {layer: [array, ...]} into a Net's live parameters."""
    for name, values in arrays.items():
        if name not in net._params:
            continue
        for target, value in zip(net.param_arrays(name), values):
            target[...] = as_array(value).reshape(target.shape)


def _share_params(net, arrays):
    """Make a Net use {layer: [array, ...]} as its parameters without copying them where they are
    already float32 and contiguous in the net's shape (the check only reads them)."""
    for name, values in arrays.items():
        if name not in net._params:
            continue
        current = net._params[name]
        for i, value in enumerate(values[:len(current)]):
            value = as_array(value)
            shape = tuple(current[i].shape)
            if value.dtype == np.float32 and value.flags.c_contiguous and net.xp is np:
                current[i] = value.reshape(shape)
            else:
                current[i][...] = value.reshape(shape)


def random_inputs(net, rng):
    """Random N(0, 1) arrays for a Net's image-like (4-D) inputs, zeros for the others (labels)."""
    out = {}
    for name in net.input_names:
        shape = tuple(net.blob_shape(name))
        out[name] = rng.standard_normal(shape, dtype=np.float32) if len(shape) == 4 else np.zeros(shape, np.float32)
    return out


def verify_equivalence(src, out, arrays, conversions, report, input_shapes=None, phase=TEST, seed=0,
                       tolerance=TOLERANCE):
    """Run the classifier and the converted net on one random input and compare.

    Compared: every net output, and the top of every converted layer (the
    classifier's N x K against the FCN's N x K x 1 x 1).  Adds rows to
    report.checks; raises EquivalenceError when any differs by more than
    `tolerance` relative.
    """
    from caffeish.runtime.net import Net  # the runtime imports layers; keep this module light to import

    rng = seeded_rng(seed)
    tops = [n for n in conversions]
    a = Net(src, phase=phase, input_shapes=input_shapes, seed=seed, keep=False)
    params = arrays if arrays is not None else random_params(a.graph, rng)
    _share_params(a, params)
    b = Net(out, phase=phase, input_shapes=input_shapes, seed=seed, keep=False)
    moved = {}
    for name in b._params:
        source = [np.asarray(x) for x in a.param_arrays(name)] if name in a._params else None
        if source is None:
            continue
        moved[name] = conversions[name].weights(source) if name in conversions else source
    _share_params(b, moved)
    watch = []
    for name in tops:
        layer_tops = [n.tops[0] for n in a.graph.nodes if n.name == name]
        watch += [t for t in layer_tops if t not in watch]
    inputs = random_inputs(a, rng)
    out_a = a.forward_outputs(inputs, blobs=[w for w in watch if w not in a.graph.outputs])
    out_b = b.forward_outputs({k: v for k, v in inputs.items() if k in b.input_names},
                              blobs=[w for w in watch if w not in b.graph.outputs])
    failures = []
    for name, va in out_a.items():
        if name not in out_b:
            continue
        vb = out_b[name]
        va_shape, vb_shape = tuple(va.shape), tuple(vb.shape)
        if vb_shape != va_shape:
            if vb_shape != va_shape + (1,) * (len(vb_shape) - len(va_shape)):
                failures.append(f"'{name}' is {va_shape} in the classifier but {vb_shape} after the conversion")
                report.checks.append({"blob": name, "classifier": list(va_shape), "converted": list(vb_shape),
                                      "rel_diff": None, "ok": False})
                continue
        d = relative_error(np.asarray(vb).reshape(va_shape), va)
        ok = d <= tolerance
        report.checks.append({"blob": name, "classifier": list(va_shape), "converted": list(vb_shape),
                              "rel_diff": d, "ok": ok})
        if not ok:
            failures.append(f"'{name}' differs by {d:.3g} relative (tolerance {tolerance:g})")
    if failures:
        raise EquivalenceError("the converted net does not compute what the classifier computes: "
                               + "; ".join(failures))
    where = ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items())
    report.notes.append(f"verified on random input ({where}, {'the given' if arrays is not None else 'random'} "
                        f"weights): every compared blob agrees within {tolerance:g} relative")


# -- transplant -------------------------------------------------------------------------------------


def as_array(value):
    """A blob value as a float32 array: an array as is, a BlobRecord in its declared shape."""
    return value.array() if isinstance(value, io.wire.BlobRecord) else np.asarray(value)


def _blob_shape(value):
    if isinstance(value, np.ndarray):
        return tuple(value.shape)
    return tuple(value.declared_shape)


def _blob_array(value):
    return value if isinstance(value, np.ndarray) else value.array()


def _same_shape(value, target):
    if isinstance(value, np.ndarray):
        return tuple(value.shape) == tuple(target)
    return shape_equals(value, target)


def parse_map(items):
    """['old=new', ...] -> {old: new} (--map)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise CaffeishError(f"--map expects OLD=NEW (a source layer name = a destination layer name), got '{item}'")
        old, new = (s.strip() for s in item.split("=", 1))
        if not old or not new:
            raise CaffeishError(f"--map expects OLD=NEW with both names, got '{item}'")
        if old in out:
            raise CaffeishError(f"--map names the source layer '{old}' twice")
        out[old] = new
    return out


def transplant(src_net, src_model, dst_net, mapping=None, allow_partial=False, phase=TEST, input_shapes=None,
               seed=0, src_input_shapes=None):
    """Copy parameters by layer name from a source model into a destination net.

    src_net: the source prototxt (None: the caffemodel's own layer list);
    src_model: its caffemodel; dst_net: the destination prototxt or NetParameter.
    mapping: {source layer: destination layer} for renamed layers.  Per blob:
    same shape -> copied, same element count -> reshaped, else WeightError naming
    the layer and both shapes (unless allow_partial: then the blob is skipped and
    keeps its filler).  Destination layers with no source get their fillers'
    values (seeded).  Returns (dst net, blob lists aligned with its layers, Report).
    """
    model = load_model(src_model)
    if model is None:
        raise CaffeishError("transplant needs the source weights (a caffemodel)")
    if src_net is not None:
        snet = load_net(src_net)
        sgraph = Graph(snet, phase, input_shapes=src_input_shapes)
        binding = bind(sgraph, model, source=str(model.path or "the source weights"))
        source = dict(binding.arrays)
    else:
        source = model.layer_blobs()
    dst = load_net(dst_net)
    graph = Graph(dst, phase, input_shapes=input_shapes)
    nodes = graph_nodes(graph)
    mapping = dict(mapping or {})
    for old, new in mapping.items():
        if old not in source:
            have = ", ".join(sorted(source)) or "none"
            raise CaffeishError(f"--map {old}={new}: the source has no layer '{old}' with parameters (it has: {have})")
        if new not in nodes or not nodes[new].param_shapes:
            raise CaffeishError(f"--map {old}={new}: the destination has no layer '{new}' with parameters")
    inverse = {new: old for old, new in mapping.items()}
    if len(inverse) != len(mapping):
        raise CaffeishError("--map sends two source layers to the same destination layer")

    rng = seeded_rng(seed)
    rows, arrays, errors = [], {}, []
    used = set()
    for name, node in nodes.items():
        if not node.param_shapes:
            continue
        src_name = inverse.get(name, None if name in mapping else name)
        specs = node.layer.fillers()
        values = []
        stored = source.get(src_name) if src_name is not None else None
        if stored is not None:
            used.add(src_name)
        for i, target in enumerate(node.param_shapes):
            target = tuple(target)
            row = {"layer": name, "blob": i, "source": src_name if stored is not None else "",
                   "from": None, "to": list(target)}
            value = None
            if stored is None:
                row["action"] = "filler"
            elif i >= len(stored):
                row["action"] = "filler"
                errors.append(f"layer '{name}': the destination has {len(node.param_shapes)} blobs "
                              f"{[tuple(s) for s in node.param_shapes]}, the source '{src_name}' has {len(stored)} "
                              f"{[_blob_shape(s) for s in stored]}")
            else:
                have = stored[i]
                row["from"] = list(_blob_shape(have))
                if _same_shape(have, target):
                    value, row["action"] = _blob_array(have).reshape(target), "copied"
                elif count(_blob_shape(have)) == count(target):
                    value, row["action"] = _blob_array(have).reshape(target), "reshaped"
                else:
                    row["action"] = "skipped (count mismatch)"
                    errors.append(f"layer '{name}' blob {i}: the source '{src_name}' has shape {_blob_shape(have)} "
                                  f"({count(_blob_shape(have)):,} values), the destination needs {target} "
                                  f"({count(target):,} values)")
            if value is None:
                spec = specs[i] if i < len(specs) else None
                value = fillers.fill(spec, target, rng, what=f"layer '{name}' blob {i}")
                if row["action"] == "filler":
                    row["action"] = f"filler ({spec.type if spec is not None else 'constant'})"
            values.append(value)
            rows.append(row)
        if stored is not None and len(stored) > len(node.param_shapes):
            errors.append(f"layer '{name}': the source '{src_name}' has {len(stored)} blobs "
                          f"{[_blob_shape(s) for s in stored]}, the destination {len(node.param_shapes)} "
                          f"{[tuple(s) for s in node.param_shapes]}")
            rows.append({"layer": name, "blob": len(node.param_shapes), "source": src_name,
                         "from": [list(_blob_shape(s)) for s in stored[len(node.param_shapes):]], "to": None,
                         "action": "skipped (no destination blob)"})
        arrays[name] = values
    if errors and not allow_partial:
        raise WeightError("transplant: element counts differ, nothing written (--allow-partial copies the rest "
                          "and leaves these at their fillers): " + "; ".join(errors))
    for name, stored in source.items():
        if name not in used:
            rows.append({"layer": "", "blob": None, "source": name, "from": [list(_blob_shape(s)) for s in stored],
                         "to": None, "action": "skipped (no match)"})
    columns = [("source", "source"), ("layer", "destination"), ("blob", "blob"), ("from", "source shape"),
               ("to", "destination shape"), ("action", "action")]
    summary = {}
    for r in rows:
        key = r["action"].split(" (")[0]
        summary[key] = summary.get(key, 0) + 1
    notes = ["; ".join(f"{k}: {v}" for k, v in summary.items())]
    filled = {r["layer"]: [] for r in rows if r["layer"]}
    for r in rows:
        if r["layer"] and r["to"] is not None:
            filled[r["layer"]].append(r["action"].startswith("filler") or r["action"].startswith("skipped"))
    empty = [name for name, flags in filled.items() if flags and all(flags)]
    if empty:
        notes.append(f"got nothing from the source, kept their fillers: {', '.join(empty)}")
    if errors:
        notes += [f"partial: {e}" for e in errors]
    report = Report(columns, rows, notes=notes)
    report.summary = summary
    report.empty = empty
    unused = {name: stored for name, stored in source.items() if name not in used}
    for name, flags in filled.items():
        how = fillers.constant_weights(nodes[name]) if flags and flags[0] else None
        if how is None:
            continue
        size = count(nodes[name].param_shapes[0])
        fits = [s for s, stored in unused.items() if stored and count(_blob_shape(stored[0])) == size]
        hint = (f"; the source's unused layer {fits[0]} has weights of that size: --map {fits[0]}={name}"
                if fits else f"; --map SOURCE={name} copies a source layer into it")
        report.warnings.append(
            f"layer '{name}' ({nodes[name].type}) got no weights from the source and keeps its filler ({how}): "
            f"its outputs do not depend on its input{hint}")
    return dst, blob_lists(dst, arrays), report


# -- bilinear upsampling ---------------------------------------------------------------------------

FORMS = ("auto", "caffe", "diagonal")


def bilinear_weights(shape, form="auto"):
    """Bilinear upsampling weights for a Deconvolution blob (C_in, O/group, K, K).

    w(y, x) = (1 - |x/f - c|) * (1 - |y/f - c|) with f = ceil(K/2), c = (K-1)/(2f)
    (Caffe's bilinear filler; FCN's upsample_filt gives the same kernel).
    form "caffe": the kernel in every (in, out) slot, as Caffe's filler does (a
    per-channel upsampling only with group = channels, where O/group = 1).
    "diagonal": FCN's interp: the kernel in the (i, i) slots, zeros elsewhere, for
    a dense (group 1) deconvolution with C_in = num_output (when O/group = 1, every
    slot).  "auto": "caffe" when O/group = 1, else "diagonal".
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) != 4:
        raise ShapeError(f"bilinear weights need a 4-D blob (C_in, O/group, K, K), got {shape}")
    cin, oper, kh, kw = shape
    if kh != kw:
        raise ShapeError(f"bilinear weights need a square kernel, got {kh}x{kw}")
    if form not in FORMS:
        raise CaffeishError(f"unknown bilinear form '{form}' (choose {', '.join(FORMS)})")
    if form == "auto":
        form = "caffe" if oper == 1 else "diagonal"
    kernel = fillers.bilinear_kernel(kh)
    if form == "caffe" or oper == 1:
        return np.ascontiguousarray(np.broadcast_to(kernel, shape))
    if cin != oper:
        raise ShapeError(f"the diagonal form needs as many input as output channels per group, got {shape}")
    out = np.zeros(shape, np.float32)
    idx = np.arange(cin)
    out[idx, idx] = kernel
    return out


def _deconv_form(node, form):
    """Check that `form` upsamples each channel on its own for this Deconvolution; returns the form used."""
    cp = node.param.convolution_param
    shape = tuple(node.param_shapes[0])
    cin, oper = shape[0], shape[1]
    group = cp.group
    if form == "auto":
        form = "caffe" if oper == 1 else "diagonal"
    if form == "caffe" and oper != 1:
        raise ShapeError(
            f"layer '{node.name}' (Deconvolution): the caffe form writes the kernel into every (in, out) slot, so "
            f"with group {group} each of its {cp.num_output} outputs would sum {oper} inputs; set group: "
            f"{cp.num_output} (= channels) in the prototxt, or use the diagonal form")
    if form == "diagonal" and oper != 1 and (group != 1 or cin != oper):
        raise ShapeError(
            f"layer '{node.name}' (Deconvolution): the diagonal form needs group 1 and as many outputs as inputs; "
            f"the blob is {shape} with group {group}")
    if tuple(shape[2:]) != (shape[2], shape[2]) or shape[2] != shape[3]:
        raise ShapeError(f"layer '{node.name}' (Deconvolution): bilinear weights need a square kernel, got {shape[2:]}")
    return form


def bilinear(net, model=None, layers=None, form="auto", phase=TEST, input_shapes=None):
    """Set the weights of Deconvolution layers to bilinear upsampling.

    layers: glob patterns (fnmatch) of layer names; None: every Deconvolution.
    Other layers keep the model's blobs (a layer the model lacks is written
    without blobs, so it keeps its filler when loaded).  A Deconvolution's bias,
    if it has one, is kept from the model or set to 0.  Returns (net, blob lists, Report).
    """
    dst = load_net(net)
    model = load_model(model)
    graph = Graph(dst, phase, input_shapes=input_shapes)
    nodes = graph_nodes(graph)
    deconvs = [n for n in nodes.values() if n.type == "Deconvolution"]
    if layers:
        chosen = [n for n in deconvs if any(fnmatch.fnmatchcase(n.name, p) for p in layers)]
        for p in layers:
            if not any(fnmatch.fnmatchcase(n.name, p) for n in deconvs):
                others = [name for name in nodes if fnmatch.fnmatchcase(name, p)]
                hint = f" (it matches {', '.join(others)}, not Deconvolution layers)" if others else ""
                raise CaffeishError(f"--layers '{p}' matches no Deconvolution layer{hint}; the net's Deconvolution "
                                    f"layers: {', '.join(n.name for n in deconvs) or 'none'}")
    else:
        chosen = deconvs
        if not chosen:
            raise CaffeishError("the net has no Deconvolution layer")
    arrays = {}
    if model is not None:
        stored = bind(graph, model, source=str(model.path or "weights"))
        arrays = {name: list(v) for name, v in model.layer_blobs().items()}
        arrays.update({name: list(v) for name, v in stored.arrays.items()})
    rows = []
    for node in chosen:
        used = _deconv_form(node, form)
        values = [bilinear_weights(node.param_shapes[0], used)]
        if len(node.param_shapes) > 1:
            old = arrays.get(node.name)
            values.append(np.asarray(old[1]).reshape(node.param_shapes[1]) if old and len(old) > 1
                          else np.zeros(node.param_shapes[1], np.float32))
        arrays[node.name] = values
        k = node.param_shapes[0][2]
        rows.append({"layer": node.name, "shape": list(node.param_shapes[0]), "kernel": k,
                     "factor": math.ceil(k / 2), "form": used, "group": node.param.convolution_param.group})
    columns = [("layer", "layer"), ("shape", "weight shape"), ("kernel", "kernel"), ("factor", "f = ceil(K/2)"),
               ("group", "group"), ("form", "form")]
    notes = []
    dropped = sorted(set(arrays) - {l.name for l in dst.layer})
    if dropped:
        notes.append(f"layers in the weights but not in the net (not written): {', '.join(dropped)}")
    return dst, blob_lists(dst, arrays), Report(columns, rows, notes=notes)
