"""Export a Caffe net to ONNX, with Caffe's semantics kept (`caffeish export onnx`).

    export_onnx("deploy.prototxt", "weights.caffemodel", "model.onnx", opset=21, dynamic_hw=False)

The net is read and filtered as caffeish.Net reads it (TEST phase by default),
its weights are the Net's (stored blobs, fillers for the layers the weights
lack), and each layer of the built graph (caffeish.graph.graph: Splits inserted,
in-place tops resolved, shapes inferred) becomes a few ONNX nodes.  A layer that
ONNX cannot express, or that we cannot write exactly, is refused with an
ExportError naming the layer and its type; nothing is written then.

Where Caffe differs from ONNX's operators, the export spells out Caffe's rule:

* Pooling: Caffe's output size (ceil rounding by default, the last window
  dropped when it would start in the padding; caffeish.graph.geometry) is
  reached with explicit end padding (or a trim of the never-read input cells)
  and ceil_mode 0, so no runtime's ceil_mode rule matters.  MAX pads with
  "never wins" cells; AVE sums over a zero-padded input and divides by Caffe's
  divisor (the window clipped to [-pad, size + pad)), a constant map, or one
  computed in the graph with --dynamic-hw.  The MAX mask top is h*W + w per
  plane, -1 where nothing beat -FLT_MAX.  STOCHASTIC (TEST) is
  sum(x^2)/sum(x) per window, 0 where the sum is not positive.
* Deconvolution: ConvTranspose (weight layout and groups are Caffe's).
* Crop: a Slice at the prototxt's offsets, ends taken from the reference's
  shape (in the graph with --dynamic-hw, followed by a Reshape to the
  reference's size so that an input too small for the crop is a runtime error,
  as in Caffe, not a silently smaller blob).
* LRN: ACROSS_CHANNELS is ONNX's LRN (the same alpha/size rule);
  WITHIN_CHANNEL is x * (1 + alpha * mean of x^2 over the zero-padded n x n
  window)^-beta.
* InnerProduct: Flatten at its axis, then Gemm (transB unless transpose).
* BatchNorm: (x - mean) / sqrt(var + eps) with Caffe's scale factor folded
  into constants, as caffeish computes them; batch statistics in the graph when
  use_global_stats is false.
* ArgMax: TopK on the reversed axis, so that ties go to the larger index as in
  Caffe; indices are float32 blobs, as Caffe's.
* Softmax: the axis as is (opset >= 13 semantics: one axis).
* In-place layers and Split: ONNX values are written once, so the last write of
  each Caffe blob carries the blob's name and earlier ones get unique names.
  Dropout at TEST is the identity.
* Loss layers and Accuracy: their TEST-time values (loss_weight scales only
  gradients), with Caffe's normalization, ignore_label and tie rules.

The graph's inputs are the Input (and MemoryData) layers' tops that some layer
reads (batch and channels fixed; with dynamic_hw the last two axes of every 4-D
input are symbolic, `<blob>_height` and `<blob>_width`), its outputs the net's
outputs (blobs no layer consumes), named as the blobs.  A net whose
InnerProduct (or SPP) reads spatial axes is not fully convolutional;
dynamic_hw refuses it, naming the layer.  Data layers that read files or
databases (Data, ImageData, WindowData, HDF5Data) are refused: export the
deploy net.

onnx is an optional dependency (`pip install 'caffeish[onnx]'`); onnxruntime
is not needed to export (the tests use it to run the exported models).
"""
import math
import os

import numpy as np

from caffeish.errors import CaffeishError, MissingDependencyError, UnsupportedError
from caffeish.formats import io
from caffeish.formats.schema import TEST, TRAIN, pb
from caffeish.graph.graph import AUTOMATIC, filter_net, make_state, phase_value
from caffeish.runtime import fillers

DEFAULT_OPSET = 21
MIN_OPSET = 13  # Softmax over one axis, Split/Squeeze/Unsqueeze/ReduceSum axes as inputs
INT64_MAX = 2**63 - 1
FLT_MAX = float(np.finfo(np.float32).max)
MAX, AVE, STOCHASTIC = pb.PoolingParameter.MAX, pb.PoolingParameter.AVE, pb.PoolingParameter.STOCHASTIC

# Layer types ONNX cannot hold (or that we cannot write exactly), with the reason.
_DATA = ("reads its data from files or a database inside Caffe; an ONNX model takes tensors: "
         "export the deploy net, whose Input layers become the model's inputs")
REFUSED = {
    "Data": _DATA, "ImageData": _DATA, "WindowData": _DATA, "HDF5Data": _DATA,
    "Python": "runs Python code named by the prototxt, which an ONNX model cannot hold",
    "HDF5Output": "writes HDF5 files; ONNX has no file output",
    "RNN": "Caffe's recurrent layers restart their state wherever the cont input is 0, which ONNX's "
           "RNN operator cannot do (and caffeish does not run them, so no export could be checked)",
    "LSTM": "Caffe's recurrent layers restart their state wherever the cont input is 0, which ONNX's "
            "LSTM operator cannot do (and caffeish does not run them, so no export could be checked)",
    "LSTMUnit": "caffeish does not run LSTMUnit, so an export of it could not be checked",
}


class ExportError(UnsupportedError):
    """A net or layer that cannot be written as ONNX (the message names the layer and its type)."""


def load_onnx():
    """The onnx module, or a one-line error saying how to install it."""
    try:
        import onnx
        import onnx.numpy_helper  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "exporting to ONNX needs the onnx package, which is not installed: pip install 'caffeish[onnx]' "
            "(or pip install onnx)") from None
    return onnx


def escaped(name):
    """A name from a file with its control characters escaped (one line, no terminal escapes)."""
    text = str(name)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def shown(name):
    """A name from a file as a message shows it: quoted and escaped."""
    return f"'{escaped(name)}'"


def _f32(value):
    return np.float32(value)


class Export:
    """The result: `model` (onnx.ModelProto), `inputs` (names), `outputs` ({blob: ONNX output name}),
    `opset`, `dynamic_hw`, and `unread`: the net's input blobs that no layer reads, left out."""

    def __init__(self, model, inputs, outputs, opset, dynamic_hw, unread=()):
        self.model, self.inputs, self.outputs = model, inputs, outputs
        self.opset, self.dynamic_hw, self.unread = opset, dynamic_hw, list(unread)


# ------------------------------------------------------------------------------ the builder


class Builder:
    """ONNX nodes, initializers and names for one net; dims are ints (static) or int64[1] values."""

    def __init__(self, onnx, opset, blob_names):
        self.onnx, self.opset = onnx, opset
        self.nodes, self.inits, self.graph_inputs = [], [], []
        self.used = set(blob_names)  # generated names never take a Caffe blob's name
        self.taken = set()  # names in use as ONNX values
        self.mask, self.example = {}, {}  # ONNX value -> dynamic flag per axis, shape in the Caffe graph
        self._consts, self._shape_nodes, self._dims = {}, {}, {}
        self.layer = None
        self.layer_start = 0
        self.made_here = set()  # values the current layer's nodes made (renamable to its tops' names)
        self.bottoms = []  # the current layer's bottoms, as ONNX values

    # -- names, constants, nodes ------------------------------------------------------
    def fresh(self, base):
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        self.taken.add(name)
        return name

    def const(self, array, base="const"):
        array = np.asarray(array)
        array = array.astype(np.int64 if array.dtype.kind in "iub" else np.float32, copy=False)
        key = None
        if array.size <= 16:
            key = (array.dtype.str, array.shape, array.tobytes())
            if key in self._consts:
                return self._consts[key]
        name = self.fresh(base)
        # (np.ascontiguousarray would make a 0-d array 1-d)
        array = array if array.flags.c_contiguous else np.array(array, order="C")
        self.inits.append(self.onnx.numpy_helper.from_array(array, name))
        if key is not None:
            self._consts[key] = name
        return name

    def op(self, op_type, inputs, n_out=1, **attrs):
        where = self.layer.name if self.layer is not None else "graph"
        outs = [self.fresh(f"{where}/{op_type}") for _ in range(n_out)]
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        self.made_here.update(outs)
        return outs[0] if n_out == 1 else outs

    def error(self, reason):
        layer = self.layer
        return ExportError(f"layer {shown(layer.name)} ({layer.type}): cannot export to ONNX: {reason}")

    # -- the current layer's bottoms -------------------------------------------------
    def x(self, j=0):
        return self.bottoms[j]

    def m(self, j=0):
        return self.mask[self.bottoms[j]]

    def ndim(self, j=0):
        return len(self.example[self.bottoms[j]])

    def ndim_of(self, name):
        return len(self.example[name])

    # -- integer dims: an int when static, else an int64[1] value computed in the graph --
    def dim(self, name, axis):
        if not self.mask[name][axis]:
            return int(self.example[name][axis])
        key = (name, axis)
        if key not in self._dims:
            if name not in self._shape_nodes:
                self._shape_nodes[name] = self.op("Shape", [name])
            self._dims[key] = self.op("Gather", [self._shape_nodes[name], self.const([axis])], axis=0)
        return self._dims[key]

    def ival(self, v):
        return self.const([v]) if isinstance(v, (int, np.integer)) else v

    def _iop(self, op_type, fold, a, b):
        if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
            return int(fold(int(a), int(b)))
        return self.op(op_type, [self.ival(a), self.ival(b)])

    def iadd(self, a, b):
        return a if isinstance(b, int) and b == 0 else self._iop("Add", lambda p, q: p + q, a, b)

    def isub(self, a, b):
        return a if isinstance(b, int) and b == 0 else self._iop("Sub", lambda p, q: p - q, a, b)

    def imul(self, a, b):
        return a if isinstance(b, int) and b == 1 else self._iop("Mul", lambda p, q: p * q, a, b)

    def idiv(self, a, b):
        """Division of non-negative numbers (ONNX truncates, Python floors: equal there)."""
        return a if isinstance(b, int) and b == 1 else self._iop("Div", lambda p, q: p // q, a, b)

    def ige(self, a, b):
        """1 where a >= b, else 0."""
        if isinstance(a, int) and isinstance(b, int):
            return int(a >= b)
        return self.op("Cast", [self.op("GreaterOrEqual", [self.ival(a), self.ival(b)])],
                       to=self.onnx.TensorProto.INT64)

    def ivec(self, dims):
        """An int64 shape vector from ints and int64[1] values."""
        if all(isinstance(d, (int, np.integer)) for d in dims):
            return self.const(np.array([int(d) for d in dims], np.int64))
        parts, run = [], []
        for d in dims:
            if isinstance(d, (int, np.integer)):
                run.append(int(d))
                continue
            if run:
                parts.append(self.const(np.array(run, np.int64)))
                run = []
            parts.append(d)
        if run:
            parts.append(self.const(np.array(run, np.int64)))
        return parts[0] if len(parts) == 1 else self.op("Concat", parts, axis=0)

    # -- common node patterns ------------------------------------------------------------
    def fconst(self, value):
        return self.const(np.array(value, np.float32))

    def mul(self, x, value):
        return x if value == 1 else self.op("Mul", [x, self.fconst(_f32(value))])

    def add(self, x, value):
        return x if value == 0 else self.op("Add", [x, self.fconst(_f32(value))])

    def reduce(self, op_type, x, axes, keepdims):
        """ReduceX over `axes`: axes an input from opset 18 (ReduceSum: 13), an attribute before."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.const(np.array(axes, np.int64))], keepdims=int(keepdims))
        return self.op(op_type, [x], axes=list(axes), keepdims=int(keepdims))

    def slice(self, x, starts, ends, axes, steps=None):
        inputs = [x, self.ivec(starts), self.ivec(ends), self.const(np.array(axes, np.int64))]
        if steps is not None:
            inputs.append(self.const(np.array(steps, np.int64)))
        return self.op("Slice", inputs)

    def unsqueeze(self, x, axes):
        return self.op("Unsqueeze", [x, self.const(np.array(axes, np.int64))]) if axes else x

    def reshape(self, x, dims):
        return self.op("Reshape", [x, self.ivec(dims)])

    def to_float(self, x):
        return self.op("Cast", [x], to=self.onnx.TensorProto.FLOAT)


# ------------------------------------------------------------------------------ converters

CONVERTERS = {}


def converts(*types):
    def register(fn):
        for t in types:
            CONVERTERS[t] = fn
        return fn
    return register


def _same(b, y, j=0):
    """One top with bottom j's dynamic axes."""
    return [(y, b.m(j))]


# Layers whose tops are the model's inputs.  MemoryData's tops are the arrays pycaffe hands to
# set_input_arrays (Caffe's Reset path applies no transform_param), so they are inputs too.
SOURCES = ("Input", "MemoryData")


@converts(*SOURCES)
def _input(b, node, params):
    raise AssertionError("handled by build_model: the tops become graph inputs")


@converts("Split")
def _split(b, node, params):
    return [(b.x(), b.m())] * len(node.tops)


@converts("Dropout")
def _dropout(b, node, params):
    if node.layer.train:
        raise b.error("Dropout at TRAIN draws a random mask every forward; export the TEST phase")
    return _same(b, b.x())


@converts("Silence")
def _silence(b, node, params):
    return []


@converts("ReLU")
def _relu(b, node, params):
    slope = node.layer.negative_slope
    if slope == 0:
        return _same(b, b.op("Relu", [b.x()]))
    return _same(b, b.op("LeakyRelu", [b.x()], alpha=float(_f32(slope))))


@converts("PReLU")
def _prelu(b, node, params):
    slope = params[0].reshape(-1) if node.layer.channel_shared else params[0].reshape((-1,) + (1,) * (b.ndim() - 2))
    return _same(b, b.op("PRelu", [b.x(), b.const(slope, f"{node.name}/slope")]))


@converts("ELU")
def _elu(b, node, params):
    return _same(b, b.op("Elu", [b.x()], alpha=float(_f32(node.layer.alpha))))


@converts("Sigmoid", "TanH", "AbsVal", "BNLL")
def _unary(b, node, params):
    onnx_op = {"Sigmoid": "Sigmoid", "TanH": "Tanh", "AbsVal": "Abs", "BNLL": "Softplus"}[node.type]
    return _same(b, b.op(onnx_op, [b.x()]))


@converts("Threshold")
def _threshold(b, node, params):
    return _same(b, b.to_float(b.op("Greater", [b.x(), b.fconst(_f32(node.layer.threshold))])))


@converts("Clip")
def _clip(b, node, params):
    lo, hi = b.fconst(_f32(node.layer.min)), b.fconst(_f32(node.layer.max))
    if node.layer.min <= node.layer.max:
        return _same(b, b.op("Clip", [b.x(), lo, hi]))
    # Caffe's max(min, min(x, max)): every value becomes min
    return _same(b, b.op("Max", [b.op("Min", [b.x(), hi]), lo]))


@converts("Swish")
def _swish(b, node, params):
    return _same(b, b.op("Mul", [b.x(), b.op("Sigmoid", [b.mul(b.x(), node.layer.beta)])]))


@converts("Power")
def _power(b, node, params):
    layer = node.layer
    if layer.power * layer.scale == 0:  # Caffe fills the top with a constant
        value = _f32(1) if layer.power == 0 else _f32(layer.shift) ** _f32(layer.power)
        fill = b.onnx.numpy_helper.from_array(np.array([value], np.float32), "value")
        return _same(b, b.op("ConstantOfShape", [b.op("Shape", [b.x()])], value=fill))
    y = b.add(b.mul(b.x(), layer.scale), layer.shift)
    if layer.power != 1:
        y = b.op("Pow", [y, b.fconst(_f32(layer.power))])
    return _same(b, b.op("Identity", [y]) if y == b.x() else y)


@converts("Exp")
def _exp(b, node, params):
    inner, outer = node.layer.scales()
    return _same(b, b.mul(b.op("Exp", [b.mul(b.x(), inner)]), outer))


@converts("Log")
def _log(b, node, params):
    layer = node.layer
    y = b.op("Log", [b.add(b.mul(b.x(), layer.scale), layer.shift)])
    return _same(b, b.mul(y, layer.base_scale()))


def _channel_const(b, values, ndim, axis=1, base="const"):
    """Per-channel values shaped to broadcast along `axis` of an ndim-axis tensor."""
    return b.const(np.asarray(values, np.float32).reshape((-1,) + (1,) * (ndim - axis - 1)), base)


@converts("BatchNorm")
def _batch_norm(b, node, params):
    layer, x, nd = node.layer, b.x(), b.ndim()
    if layer.use_global_stats:
        s = _f32(float(params[2].reshape(-1)[0]))
        factor = _f32(0) if s == 0 else _f32(1) / s
        mean = params[0].reshape(-1) * factor
        std = np.sqrt(params[1].reshape(-1) * factor + _f32(layer.eps))
        centred = b.op("Sub", [x, _channel_const(b, mean, nd, base=f"{node.name}/mean")])
        return _same(b, b.op("Div", [centred, _channel_const(b, std, nd, base=f"{node.name}/std")]))
    axes = [0] + list(range(2, nd))
    centred = b.op("Sub", [x, b.reduce("ReduceMean", x, axes, True)])
    var = b.reduce("ReduceMean", b.op("Mul", [centred, centred]), axes, True)
    return _same(b, b.op("Div", [centred, b.op("Sqrt", [b.add(var, layer.eps)])]))


def _operand(b, node, values, j_operand):
    """Scale/Bias operand shaped to broadcast: a constant, or bottom 1 with trailing axes added."""
    layer = node.layer
    bottom = b.example[b.x()]
    axis = layer.operand_axis
    if values is not None:
        shape = tuple(values.shape)
        return b.const(values.reshape(shape + (1,) * (len(bottom) - axis - len(shape))), f"{node.name}/{layer.operand}")
    op = b.x(j_operand)
    rank = b.ndim(j_operand)
    return b.unsqueeze(op, list(range(rank, rank + len(bottom) - axis - rank))) if rank else op


@converts("Scale")
def _scale(b, node, params):
    two = len(node.bottoms) == 2
    y = b.op("Mul", [b.x(), _operand(b, node, None if two else params[0], 1)])
    if node.layer.bias_term:
        bias = params[0] if two else params[1]
        y = b.op("Add", [y, _operand(b, node, bias, None)])
    return _same(b, y)


@converts("Bias")
def _bias(b, node, params):
    two = len(node.bottoms) == 2
    return _same(b, b.op("Add", [b.x(), _operand(b, node, None if two else params[0], 1)]))


@converts("LRN")
def _lrn(b, node, params):
    layer, x = node.layer, b.x()
    n = layer.local_size
    if not layer.within_channel:
        return _same(b, b.op("LRN", [x], size=n, alpha=float(layer.alpha), beta=float(layer.beta),
                             bias=float(layer.k)))
    half = (n - 1) // 2
    squares = b.op("Pad", [b.op("Mul", [x, x]), b.const(np.array([0, 0, half, half, 0, 0, half, half], np.int64))])
    mean = b.op("AveragePool", [squares], kernel_shape=[n, n], strides=[1, 1])
    scale = b.add(b.mul(mean, layer.alpha), 1.0)
    return _same(b, b.op("Mul", [b.op("Pow", [scale, b.fconst(_f32(-layer.beta))]), x]))


@converts("MVN")
def _mvn(b, node, params):
    layer, x, nd = node.layer, b.x(), b.ndim()
    x4 = b.unsqueeze(x, list(range(nd, 4)))
    axes = [1, 2, 3] if layer.across_channels else [2, 3]
    y = b.op("Sub", [x4, b.reduce("ReduceMean", x4, axes, True)])
    if layer.normalize_variance:
        std = b.op("Sqrt", [b.reduce("ReduceMean", b.op("Mul", [y, y]), axes, True)])
        y = b.op("Div", [y, b.add(std, layer.eps)])
    return [(y, tuple(b.m()) + (False,) * (4 - nd))]


@converts("Softmax")
def _softmax(b, node, params):
    return _same(b, b.op("Softmax", [b.x()], axis=node.layer.axis))


@converts("Eltwise")
def _eltwise(b, node, params):
    p = node.param.eltwise_param
    xs = list(b.bottoms)
    mask = tuple(any(d) for d in zip(*(b.mask[x] for x in xs)))
    if p.operation == pb.EltwiseParameter.MAX:
        return [(b.op("Max", xs), mask)]
    if p.operation == pb.EltwiseParameter.PROD:
        y = b.op("Mul", xs[:2])
        for x in xs[2:]:
            y = b.op("Mul", [y, x])
        return [(y, mask)]
    coeffs = list(p.coeff) or [1.0] * len(xs)
    y = b.mul(xs[0], coeffs[0])
    for c, x in zip(coeffs[1:], xs[1:]):
        y = b.op("Add", [y, b.mul(x, c)])
    return [(y, mask)]


@converts("Concat")
def _concat(b, node, params):
    axis = node.layer.axis
    if len(b.bottoms) == 1:
        return _same(b, b.x())
    masks = [b.mask[x] for x in b.bottoms]
    mask = tuple(any(d) if i == axis else masks[0][i] for i, d in enumerate(zip(*masks)))
    return [(b.op("Concat", list(b.bottoms), axis=axis), mask)]


@converts("Slice")
def _slice(b, node, params):
    layer, x = node.layer, b.x()
    axis, sizes = layer.axis, layer.sizes
    m = b.m()
    if len(sizes) == 1:
        return _same(b, x)
    if not m[axis]:
        outs = b.op("Split", [x, b.const(np.array(sizes, np.int64))], n_out=len(sizes), axis=axis)
        return [(y, m) for y in outs]
    points = list(node.param.slice_param.slice_point)
    if not points:  # an even split of a dynamic axis
        attrs = {"num_outputs": len(sizes)} if b.opset >= 18 else {}
        outs = b.op("Split", [x], n_out=len(sizes), axis=axis, **attrs)
        return [(y, m) for y in outs]
    bounds = [0] + points + [INT64_MAX]
    static = tuple(False if i == axis else d for i, d in enumerate(m))
    return [(b.slice(x, [lo], [hi], [axis]), m if hi == INT64_MAX else static)
            for lo, hi in zip(bounds, bounds[1:])]


@converts("Flatten")
def _flatten(b, node, params):
    x, m, nd = b.x(), b.m(), b.ndim()
    p = node.param.flatten_param
    start, end = node.layer.canonical_axis(p.axis, nd), node.layer.canonical_axis(p.end_axis, nd)
    tail = [b.dim(x, i) for i in range(end + 1, nd)]
    mask = m[:start] + (any(m[start:end + 1]),) + m[end + 1:]
    return [(b.reshape(x, [0] * start + [-1] + tail), mask)]


@converts("Reshape")
def _reshape(b, node, params):
    x, m, nd = b.x(), b.m(), b.ndim()
    p = node.param.reshape_param
    start = p.axis if p.axis >= 0 else nd + p.axis + 1
    end = nd if p.num_axes == -1 else start + p.num_axes
    dims, mask = [0] * start, list(m[:start])
    for i, d in enumerate(p.shape.dim):
        dims.append(int(d))
        mask.append(m[start + i] if d == 0 else (d == -1 and any(m)))
    dims += [b.dim(x, i) for i in range(end, nd)]
    mask += m[end:]
    if -1 not in dims and not any(mask):  # every dim known: the graph's own top shape
        dims = list(node.top_shapes[0])
    return [(b.reshape(x, dims), tuple(mask))]


@converts("Tile")
def _tile(b, node, params):
    reps = [1] * b.ndim()
    reps[node.layer.axis] = node.layer.tiles
    return _same(b, b.op("Tile", [b.x(), b.const(np.array(reps, np.int64))]))


@converts("Reduction")
def _reduction(b, node, params):
    layer, x, nd = node.layer, b.x(), b.ndim()
    p = layer.reduction_param
    axes = list(range(layer.axis, nd))
    R = pb.ReductionParameter
    coeff = _f32(p.coeff)
    if p.operation == R.MEAN:
        dims = [b.dim(x, i) for i in axes]
        if all(isinstance(d, int) for d in dims):  # Caffe folds MEAN into the coefficient: coeff / dim
            y = b.reduce("ReduceSum", x, axes, False)
            if math.prod(dims):
                coeff = coeff / _f32(math.prod(dims))
        else:
            y = b.reduce("ReduceMean", x, axes, False)
    else:
        onnx_op = {R.SUM: "ReduceSum", R.ASUM: "ReduceL1", R.SUMSQ: "ReduceSumSquare"}[p.operation]
        y = b.reduce(onnx_op, x, axes, False)
    return [(b.mul(y, coeff), b.m()[:layer.axis])]


@converts("ArgMax")
def _argmax(b, node, params):
    layer, x, m = node.layer, b.x(), b.m()
    p = layer.argmax_param
    k = b.const(np.array([p.top_k], np.int64))
    if layer.axis is None:
        rows, axis, size = b.reshape(x, [0, -1]), 1, 1
        for i in range(1, b.ndim()):
            size = b.imul(size, b.dim(x, i))
    else:
        rows, axis, size = x, layer.axis, b.dim(x, layer.axis)
    # Caffe sorts (value, index) pairs, largest first: ties go to the larger index.  TopK puts the
    # lower index first, so it runs on the reversed axis and the indices are mapped back.
    reversed_rows = b.slice(rows, [-1], [-INT64_MAX], [axis], [-1])
    values, idx = b.op("TopK", [reversed_rows, k], n_out=2, axis=axis, largest=1, sorted=1)
    index = b.to_float(b.op("Sub", [b.ival(b.isub(size, 1)), idx]))
    if layer.axis is not None:
        return [(values if p.out_max_val else index, m[:axis] + (False,) + m[axis + 1:])]
    if p.out_max_val:
        index = b.op("Concat", [b.unsqueeze(index, [1]), b.unsqueeze(values, [1])], axis=1)
    top = node.top_shapes[0]
    return [(b.reshape(index, [0] + list(top[1:])), m[:1] + (False,) * (len(top) - 1))]


@converts("InnerProduct")
def _inner_product(b, node, params):
    layer, x, m, nd = node.layer, b.x(), b.m(), b.ndim()
    axis = layer.canonical_axis(layer.axis, nd)
    if any(m[axis:]):
        raise b.error(f"it reads axes {axis}.. of its bottom, whose size changes with the input: the net is not "
                      "fully convolutional (export without --dynamic-hw, or turn InnerProduct into Convolution "
                      "with `caffeish surgery convolutionalize`)")
    rows = x if (nd == 2 and axis == 1) else b.op("Flatten", [x], axis=axis)
    inputs = [rows, b.const(params[0], f"{node.name}/weight")]
    if layer.bias_term:
        inputs.append(b.const(params[1].reshape(-1), f"{node.name}/bias"))
    y = b.op("Gemm", inputs, transB=0 if layer.transpose else 1)
    if axis != 1:
        y = b.reshape(y, [b.dim(x, i) for i in range(axis)] + [layer.num_output])
    return [(y, m[:axis] + (False,))]


@converts("Embed")
def _embed(b, node, params):
    layer = node.layer
    index = b.op("Cast", [b.x()], to=b.onnx.TensorProto.INT64)  # Caffe: static_cast<int>, toward zero
    y = b.op("Gather", [b.const(params[0], f"{node.name}/weight"), index], axis=0)
    if layer.bias_term:
        y = b.op("Add", [y, b.const(params[1].reshape(-1), f"{node.name}/bias")])
    return [(y, b.m() + (False,))]


@converts("BatchReindex")
def _batch_reindex(b, node, params):
    index = b.op("Cast", [b.x(1)], to=b.onnx.TensorProto.INT64)
    return [(b.op("Gather", [b.x(0), index], axis=0), b.m(1)[:1] + b.m(0)[1:])]


@converts("Filter")
def _filter(b, node, params):
    keep = b.op("Cast", [b.reshape(b.x(len(b.bottoms) - 1), [-1])], to=b.onnx.TensorProto.BOOL)
    return [(b.op("Compress", [x, keep], axis=0), (True,) + b.mask[x][1:]) for x in b.bottoms[:-1]]


@converts("Parameter")
def _parameter(b, node, params):
    return [(b.const(params[0], node.name), (False,) * len(node.top_shapes[0]))]


@converts("DummyData")
def _dummy_data(b, node, params):
    specs = list(node.param.dummy_data_param.data_filler)
    out = []
    for i, shape in enumerate(node.top_shapes):
        spec = specs[0 if len(specs) == 1 else i] if specs else None
        if spec is not None and not (spec.type == "constant" and spec.sparse == -1):
            raise b.error(f"its {spec.type} filler draws new random values every forward; only constant "
                          "DummyData tops can be exported")
        value = fillers.fill(spec, shape, np.random.default_rng(0), what=f"layer {shown(node.name)}")
        out.append((b.const(np.asarray(value, np.float32), node.tops[i]), (False,) * len(shape)))
    return out


@converts("Crop")
def _crop(b, node, params):
    layer, x, ref = node.layer, b.x(0), b.x(1)
    start = layer.start_axis
    axes = list(range(start, b.ndim()))
    ends = [b.iadd(b.dim(ref, a), layer.offsets[a]) for a in axes]
    mask = b.m(0)[:start] + b.m(1)[start:b.ndim()]
    keep = [i for i, a in enumerate(axes)
            if layer.offsets[a] or b.m(0)[a] or b.m(1)[a] or ends[i] != b.example[x][a]]
    if not keep:
        return [(x, mask)]
    y = b.slice(x, [layer.offsets[axes[i]] for i in keep], [ends[i] for i in keep], [axes[i] for i in keep])
    if any(mask):  # a data blob too small for the crop: an error at run time, as in Caffe
        y = b.reshape(y, [b.dim(x, a) for a in range(start)] + [b.dim(ref, a) for a in axes])
    return [(y, mask)]


# -- convolution family ------------------------------------------------------------------------


def _nc_view(b, x, axis):
    """x with the axes before `axis` folded into one (ONNX's N), and how to restore them."""
    if axis == 1:
        return x, None
    prefix = [b.dim(x, i) for i in range(axis)]
    rest = [b.dim(x, i) for i in range(axis, b.ndim())]
    return b.reshape(x, [-1] + rest), prefix


def _restore(b, y, prefix):
    """(M, C', spatial...) back to prefix + (C', spatial...)."""
    if prefix is None:
        return y
    tail = b.slice(b.op("Shape", [y]), [1], [INT64_MAX], [0])
    return b.op("Reshape", [y, b.op("Concat", [b.ivec(prefix), tail], axis=0)])


@converts("Convolution", "Deconvolution")
def _conv(b, node, params):
    layer = node.layer
    geom, axis = layer.geometry, layer.channel_axis
    rank = len(geom.kernel)
    if rank == 0:
        raise b.error("it has no spatial axis (ONNX's Conv needs at least one)")
    if 0 in geom.dilation:
        raise b.error("dilation 0 (an extent of 1 whatever the kernel) has no ONNX equivalent")
    attrs = dict(kernel_shape=list(geom.kernel), strides=list(geom.stride), pads=list(geom.pad) * 2,
                 dilations=list(geom.dilation), group=layer.group)
    weight = b.const(params[0], f"{node.name}/weight")
    bias = [b.const(params[1].reshape(-1), f"{node.name}/bias")] if layer.bias_term else []
    onnx_op = "ConvTranspose" if node.type == "Deconvolution" else "Conv"
    out = []
    for j in range(len(b.bottoms)):
        x, m = b.x(j), b.m(j)
        xn, prefix = _nc_view(b, x, axis)
        y = b.op(onnx_op, [xn, weight] + bias, **attrs)
        out.append((_restore(b, y, prefix), m[:axis] + (False,) + m[axis + 1:]))
    return out


@converts("Im2col")
def _im2col(b, node, params):
    """Caffe's column layout: channel c*prod(kernel) + q, q the row-major tap index."""
    layer = node.layer
    geom, axis = layer.geometry, layer.channel_axis
    x, m = b.x(), b.m()
    if axis != b.ndim() - 3:
        raise b.error("only 2 spatial axes after the channel axis are exported")
    xn, prefix = _nc_view(b, x, axis)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geom.kernel, geom.stride, geom.pad, geom.dilation
    # output sizes: the graph's (geometry.conv_out), or conv_out's formula in the graph for symbolic axes
    outs = [b.iadd(b.idiv(b.isub(b.iadd(b.dim(x, axis + 1 + i), 2 * p), e), s), 1) if m[axis + 1 + i]
            else node.top_shapes[0][axis + 1 + i] for i, (p, e, s) in enumerate(zip((ph, pw), geom.extents(), (sh, sw)))]
    padded = b.op("Pad", [xn, b.const(np.array([0, 0, ph, pw, 0, 0, ph, pw], np.int64))]) if (ph or pw) else xn
    taps = []
    for i in range(kh):
        for j in range(kw):
            ends = [b.iadd(b.imul(b.isub(o, 1), s), t + 1) for o, s, t in zip(outs, (sh, sw), (i * dh, j * dw))]
            tap = b.slice(padded, [i * dh, j * dw], ends, [2, 3], [sh, sw])
            taps.append(b.unsqueeze(tap, [2]))
    stacked = b.op("Concat", taps, axis=2) if len(taps) > 1 else taps[0]  # (N, C, taps, oh, ow)
    y = b.reshape(stacked, [0, -1] + outs)  # merging axes 1 and 2: channel c*taps + q
    return [(_restore(b, y, prefix), m[:axis] + (False,) + m[axis + 1:])]


# -- pooling -----------------------------------------------------------------------------------


def pooled_size(b, size, kernel, stride, pad, ceil, clip):
    """geometry.pool_out as ints (static) or graph values (dynamic): ceil or floor((size + 2 pad -
    kernel) / stride) + 1, minus 1 when clipping and the last window starts at or past size + pad."""
    span = b.isub(b.iadd(size, 2 * pad), kernel)
    out = b.iadd(b.idiv(b.iadd(span, stride - 1) if ceil else span, stride), 1)
    if clip:
        out = b.isub(out, b.ige(b.imul(b.isub(out, 1), stride), b.iadd(size, pad)))
    return out


def _window_sizes(b, out, size, kernel, stride, pad):
    """Caffe's AVE divisor along one axis: each window clipped to [-pad, size + pad), as float32."""
    if isinstance(out, int) and isinstance(size, int):
        start = np.arange(out) * stride - pad
        return (np.minimum(start + kernel, size + pad) - start).astype(np.float32)
    scalar = [b.reshape(b.ival(v), []) for v in (0, out, 1)]
    start = b.op("Sub", [b.op("Mul", [b.op("Range", scalar), b.ival(stride)]), b.ival(pad)])
    end = b.op("Min", [b.op("Add", [start, b.ival(kernel)]), b.ival(b.iadd(size, pad))])
    return b.to_float(b.op("Sub", [end, start]))


def _ave_scale(b, outs, sizes, geom):
    """kernel_h*kernel_w / Caffe's divisor per output cell: None where it is 1 everywhere."""
    kh, kw = geom.kernel
    dh, dw = (_window_sizes(b, o, s, k, st, p) for o, s, k, st, p in zip(outs, sizes, geom.kernel, geom.stride, geom.pad))
    if isinstance(dh, np.ndarray) and isinstance(dw, np.ndarray):
        scale = _f32(kh * kw) / (dh[:, None] * dw[None, :])
        return None if np.all(scale == 1) else b.const(scale.astype(np.float32))
    dh = b.const(dh) if isinstance(dh, np.ndarray) else dh
    dw = b.const(dw) if isinstance(dw, np.ndarray) else dw
    divisor = b.op("Mul", [b.unsqueeze(dh, [1]), b.unsqueeze(dw, [0])])
    return b.op("Div", [b.fconst(_f32(kh * kw)), divisor])


def _global_pool(b, x, method, want_mask):
    if method == MAX:
        y = b.op("GlobalMaxPool", [x])
        if not want_mask:
            return y, None
        plane = b.reshape(x, [0, 0, -1])
        index = b.reshape(b.to_float(b.op("ArgMax", [plane], axis=2, keepdims=1)), [0, 0, 1, 1])
        return y, _no_winner(b, y, index)
    if method == AVE:
        return b.op("GlobalAveragePool", [x]), None
    first = b.op("GlobalAveragePool", [x])
    return _stochastic(b, first, b.op("GlobalAveragePool", [b.op("Mul", [x, x])])), None


def _stochastic(b, mean, mean_squares):
    """Caffe's test-time STOCHASTIC pooling: sum(x^2)/sum(x) (the means' ratio), 0 where sum(x) <= 0."""
    zero = b.fconst(_f32(0))
    return b.op("Where", [b.op("Greater", [mean, zero]), b.op("Div", [mean_squares, mean]), zero])


def _no_winner(b, y, index):
    """Caffe's mask is -1 where no cell beat -FLT_MAX."""
    return b.op("Where", [b.op("Greater", [y, b.fconst(_f32(-FLT_MAX))]), index, b.fconst(_f32(-1))])


def pool(b, x, geom, method, want_mask):
    """Pool x (N, C, H, W) as Caffe: returns (top, mask top or None)."""
    if geom.global_pooling:
        return _global_pool(b, x, method, want_mask)
    k, s, p = geom.kernel, geom.stride, geom.pad
    clip = p != (0, 0)
    static = not any(b.mask[x][2:4])
    # (with dynamic sizes these are graph values, made only where something reads them)
    sizes = [b.dim(x, 2), b.dim(x, 3)] if static else None
    outs = [pooled_size(b, size, k[i], s[i], p[i], geom.ceil, clip) for i, size in enumerate(sizes)] \
        if static else None
    if static and tuple(outs) != tuple(geom.out):
        raise CaffeishError(f"internal error: pooled size {outs} differs from the graph's {geom.out}")
    need_slice = not static and clip and geom.ceil
    if not static and (need_slice or want_mask or method == AVE):
        sizes = [b.dim(x, 2), b.dim(x, 3)]
        outs = [pooled_size(b, size, k[i], s[i], p[i], geom.ceil, clip) for i, size in enumerate(sizes)]
    # End padding so that floor-mode windows land where Caffe's are: exact when the sizes are
    # known (negative: trailing cells no window reads, trimmed), else enough for the ceil overhang
    # and a Slice to Caffe's count afterwards.
    if static:
        ends = [(o - 1) * st + kk - size - pp for o, st, kk, size, pp in zip(outs, s, k, sizes, p)]
    else:
        ends = [pp + (st - 1 if geom.ceil else 0) for st, pp in zip(s, p)]
    cut = [i for i in range(2) if ends[i] < 0]
    src, src_sizes = x, list(sizes or ())
    if cut:
        src = b.slice(x, [0] * len(cut), [sizes[i] + ends[i] for i in cut], [2 + i for i in cut])
        for i in cut:
            src_sizes[i], ends[i] = sizes[i] + ends[i], 0
    pads = [0, 0, p[0], p[1], 0, 0, ends[0], ends[1]]
    window = dict(kernel_shape=list(k), strides=list(s))
    index, n_out = None, 2 if want_mask else 1
    if method == MAX:
        if all(e < kk for e, kk in zip(ends, k)):  # ONNX Runtime wants pads below the kernel
            offsets = (0, 0)
            y = b.op("MaxPool", [src], n_out=n_out, pads=[p[0], p[1], ends[0], ends[1]], ceil_mode=0, **window)
        else:
            offsets = p
            if want_mask:
                src_sizes = [b.iadd(src_sizes[i], p[i] + ends[i]) for i in range(2)]
            padded = b.op("Pad", [src, b.const(np.array(pads, np.int64)), b.fconst(_f32(-FLT_MAX))])
            y = b.op("MaxPool", [padded], n_out=n_out, ceil_mode=0, **window)
        if want_mask:
            y, idx = y  # flat index over (N, C, h, w) of the pooled input -> h*W + w of the bottom
            width = src_sizes[1]
            plane = b.op("Mod", [idx, b.ival(b.imul(src_sizes[0], width))])
            row = b.isub(b.op("Div", [plane, b.ival(width)]), offsets[0])
            col = b.isub(b.op("Mod", [plane, b.ival(width)]), offsets[1])
            index = b.op("Add", [b.op("Mul", [row, b.ival(sizes[1])]), col])
    else:
        padded = b.op("Pad", [src, b.const(np.array(pads, np.int64))]) if any(pads) else src
        y = b.op("AveragePool", [padded], **window)  # whole windows: the window sum / (kh*kw)
        if method == STOCHASTIC:
            y = _stochastic(b, y, b.op("AveragePool", [b.op("Mul", [padded, padded])], **window))
    if need_slice:
        y = b.slice(y, [0, 0], outs, [2, 3])
        index = b.slice(index, [0, 0], outs, [2, 3]) if index is not None else None
    if method == AVE:
        scale = _ave_scale(b, outs, sizes, geom)
        y = b.op("Mul", [y, scale]) if scale is not None else y
    if index is not None:
        index = _no_winner(b, y, b.to_float(index))
    return y, index


@converts("Pooling")
def _pooling(b, node, params):
    layer = node.layer
    if layer.method == STOCHASTIC and layer.phase == TRAIN:
        raise b.error("STOCHASTIC pooling samples at random at TRAIN; export the TEST phase")
    want_mask = len(node.tops) > 1
    y, index = pool(b, b.x(), layer.geometry, layer.method, want_mask)
    mask = b.m()[:2] + ((False, False) if layer.geometry.global_pooling else b.m()[2:])
    return [(y, mask)] + ([(index, mask)] if want_mask else [])


@converts("SPP")
def _spp(b, node, params):
    layer, x, m = node.layer, b.x(), b.m()
    if any(m[2:]):
        raise b.error("its pooling windows are sized from the input's height and width, which ONNX needs "
                      "fixed: export without --dynamic-hw")
    pooled = [pool(b, x, g, layer.method, False)[0] for g in layer.levels]
    if layer.pyramid_height == 1:
        return [(pooled[0], m)]
    flat = [b.reshape(y, [0, -1]) for y in pooled]
    return [(b.op("Concat", flat, axis=1), m[:1] + (False,))]


# -- losses and accuracy (their TEST-time values; loss_weight scales only gradients) --------------


def _span(b, x, start, end=None):
    """The product of x's dims [start, end): an int, or a graph value."""
    size = 1
    for i in range(start, b.ndim_of(x) if end is None else end):
        size = b.imul(size, b.dim(x, i))
    return size


def _float(b, v):
    """An int or int64[1] graph value as a float32 scalar-broadcastable value."""
    return b.fconst(_f32(v)) if isinstance(v, int) else b.to_float(v)


def _labels(b, label, shape):
    """Caffe's static_cast<int> labels (toward zero), reshaped."""
    return b.op("Cast", [b.reshape(label, shape)], to=b.onnx.TensorProto.INT64)


def _counted(b, labels, ignore_label):
    """(True where a label counts, labels with the ignored ones set to 0), or (None, labels)."""
    if ignore_label is None:
        return None, labels
    valid = b.op("Not", [b.op("Equal", [labels, b.ival(int(ignore_label))])])
    return valid, b.op("Where", [valid, labels, b.ival(0)])


def _sum_all(b, x, rank):
    return b.reduce("ReduceSum", x, list(range(rank)), False)


def _normalized(b, loss, mode, outer, inner, valid):
    """loss / Caffe's normalizer (FULL, VALID, BATCH_SIZE or NONE; never below 1)."""
    from caffeish.ops.loss import Norm

    if mode == Norm.VALID and valid is not None:
        count = _sum_all(b, b.to_float(valid), 2)
    else:
        n = {Norm.FULL: b.imul(outer, inner), Norm.VALID: b.imul(outer, inner), Norm.BATCH_SIZE: outer}.get(mode, 1)
        if isinstance(n, int):
            return b.op("Div", [loss, b.fconst(_f32(max(1.0, float(n))))])
        count = b.reshape(b.to_float(n), [])
    return b.op("Div", [loss, b.op("Max", [count, b.fconst(_f32(1))])])


def _class_split(b, node, axis_field):
    x = b.x(0)
    axis = node.layer.canonical_axis(axis_field, b.ndim())
    outer, inner = _span(b, x, 0, axis), _span(b, x, axis + 1)
    return axis, outer, b.dim(x, axis), inner


def _picked_log(b, node, probabilities, axis_field, ignore_label, clamp, infogain=None):
    """Per counted position: log(max(p[label], clamp)) (or, with an infogain matrix H,
    sum_l H[label, l] log(max(p_l, clamp))); (values (outer, inner) zeroed where ignored, valid, outer, inner)."""
    axis, outer, classes, inner = _class_split(b, node, axis_field)
    prob3 = b.reshape(probabilities, [outer, classes, inner])
    labels = _labels(b, b.x(1), [outer, inner])
    valid, safe = _counted(b, labels, ignore_label)
    if infogain is None:
        picked = b.op("GatherElements", [prob3, b.unsqueeze(safe, [1])], axis=1)
        values = b.reshape(b.op("Log", [b.op("Max", [picked, b.fconst(clamp)])]), [outer, inner])
    else:
        logp = b.op("Transpose", [b.op("Log", [b.op("Max", [prob3, b.fconst(clamp)])])], perm=[0, 2, 1])
        rows = b.op("Gather", [infogain, safe], axis=0)  # (outer, inner, classes): H[label, :]
        values = b.reduce("ReduceSum", b.op("Mul", [rows, logp]), [2], False)
    if valid is not None:
        values = b.op("Where", [valid, values, b.fconst(_f32(0))])
    return values, valid, outer, inner


def _loss_tops(b, node, loss, prob=None):
    tops = [(loss, ())]
    if len(node.tops) > 1:
        tops.append((prob, b.m(0)))
    return tops


@converts("SoftmaxWithLoss")
def _softmax_loss(b, node, params):
    from caffeish.ops.loss import FLT_MIN, Norm, normalization_mode

    layer = node.layer
    prob = b.op("Softmax", [b.x(0)], axis=layer.canonical)
    logs, valid, outer, inner = _picked_log(b, node, prob, layer.axis, layer.ignore_label, FLT_MIN)
    loss = b.op("Neg", [_sum_all(b, logs, 2)])
    mode = normalization_mode(node.param.loss_param, Norm.VALID)
    return _loss_tops(b, node, _normalized(b, loss, mode, outer, inner, valid), prob)


@converts("InfogainLoss")
def _infogain_loss(b, node, params):
    from caffeish.ops.loss import LOG_THRESHOLD

    layer = node.layer
    axis, _, classes, _ = _class_split(b, node, layer.axis)
    if len(b.bottoms) > 2:
        infogain = b.reshape(b.x(2), [classes, classes])
    else:
        matrix = io.read_binaryproto(layer.source).astype(np.float32)
        if matrix.size != classes * classes:
            raise b.error(f"the infogain matrix in {shown(layer.source)} has {matrix.size} values; bottom 0 has "
                          f"{classes} labels, so it needs {classes * classes}")
        infogain = b.const(matrix.reshape(classes, classes), f"{node.name}/infogain")
    prob = b.op("Softmax", [b.x(0)], axis=axis)
    values, valid, outer, inner = _picked_log(b, node, prob, layer.axis, layer.ignore_label, LOG_THRESHOLD,
                                              infogain)
    loss = b.op("Neg", [_sum_all(b, values, 2)])
    return _loss_tops(b, node, _normalized(b, loss, node.param.loss_param.normalization, outer, inner, valid),
                      prob)


@converts("EuclideanLoss")
def _euclidean_loss(b, node, params):
    diff = b.op("Sub", [b.reshape(b.x(0), [-1]), b.reshape(b.x(1), [-1])])
    total = b.reduce("ReduceSumSquare", diff, [0], False)
    return [(b.op("Div", [b.op("Div", [total, _float(b, b.dim(b.x(0), 0))]), b.fconst(_f32(2))]), ())]


@converts("SigmoidCrossEntropyLoss")
def _sigmoid_cross_entropy_loss(b, node, params):
    from caffeish.ops.loss import Norm, normalization_mode

    layer = node.layer
    x, t = b.reshape(b.x(0), [-1]), b.reshape(b.x(1), [-1])
    positive = b.to_float(b.op("GreaterOrEqual", [x, b.fconst(_f32(0))]))
    exponent = b.op("Sub", [x, b.op("Mul", [b.mul(x, 2.0), positive])])
    softplus = b.op("Log", [b.add(b.op("Exp", [exponent]), 1.0)])
    terms = b.op("Sub", [b.op("Mul", [x, b.op("Sub", [t, positive])]), softplus])
    valid, _ = _counted(b, b.op("Cast", [t], to=b.onnx.TensorProto.INT64), layer.ignore_label)
    if valid is not None:
        terms = b.op("Where", [valid, terms, b.fconst(_f32(0))])
    loss = b.op("Neg", [_sum_all(b, terms, 1)])
    outer = b.dim(b.x(0), 0)
    count = _span(b, b.x(0), 0)
    inner = b.idiv(count, outer) if isinstance(count, int) and outer else _span(b, b.x(0), 1)
    mode = normalization_mode(node.param.loss_param, Norm.BATCH_SIZE)
    if valid is not None:
        valid = b.unsqueeze(valid, [0])
    return [(_normalized(b, loss, mode, outer, inner, valid), ())]


def _rows(b, j=0):
    """(bottom j as (N, D), N, D)."""
    x = b.x(j)
    n, d = b.dim(x, 0), _span(b, x, 1)
    return b.reshape(x, [n, d]), n, d


def _item_labels(b, n, j=1):
    """The first N values of bottom j as int labels (N,)."""
    return b.slice(_labels(b, b.x(j), [-1]), [0], [n], [0])


@converts("HingeLoss")
def _hinge_loss(b, node, params):
    rows, n, d = _rows(b)
    classes = b.op("Range", [b.reshape(b.ival(v), []) for v in (0, d, 1)])
    at_label = b.op("Equal", [b.unsqueeze(_item_labels(b, n), [1]), classes])
    signed = b.op("Where", [at_label, b.op("Neg", [rows]), rows])
    margins = b.op("Max", [b.add(signed, 1.0), b.fconst(_f32(0))])
    if node.param.hinge_loss_param.norm == pb.HingeLossParameter.L2:
        total = b.reduce("ReduceSumSquare", margins, [0, 1], False)
    else:
        total = _sum_all(b, margins, 2)
    return [(b.op("Div", [total, _float(b, n)]), ())]


@converts("MultinomialLogisticLoss")
def _multinomial_logistic_loss(b, node, params):
    from caffeish.ops.loss import LOG_THRESHOLD

    rows, n, _ = _rows(b)
    picked = b.op("GatherElements", [rows, b.unsqueeze(_item_labels(b, n), [1])], axis=1)
    logs = b.op("Log", [b.op("Max", [picked, b.fconst(LOG_THRESHOLD)])])
    return [(b.op("Div", [b.op("Neg", [_sum_all(b, logs, 2)]), _float(b, n)]), ())]


@converts("ContrastiveLoss")
def _contrastive_loss(b, node, params):
    layer = node.layer
    a, n, _ = _rows(b, 0)
    diff = b.op("Sub", [a, _rows(b, 1)[0]])
    dist_sq = b.reduce("ReduceSumSquare", diff, [1], False)
    margin = b.fconst(_f32(layer.margin))
    zero = b.fconst(_f32(0))
    if layer.legacy_version:
        apart = b.op("Max", [b.op("Sub", [margin, dist_sq]), zero])
    else:
        gap = b.op("Max", [b.op("Sub", [margin, b.op("Sqrt", [dist_sq])]), zero])
        apart = b.op("Mul", [gap, gap])
    similar = b.op("Not", [b.op("Equal", [_item_labels(b, n, 2), b.ival(0)])])
    total = _sum_all(b, b.op("Where", [similar, dist_sq, apart]), 1)
    return [(b.op("Div", [b.op("Div", [total, _float(b, n)]), b.fconst(_f32(2))]), ())]


@converts("Accuracy")
def _accuracy(b, node, params):
    layer = node.layer
    axis, outer, classes, inner = _class_split(b, node, layer.axis)
    scores3 = b.reshape(b.x(0), [outer, classes, inner])
    valid, safe = _counted(b, _labels(b, b.x(1), [outer, inner]), layer.ignore_label)
    true_score = b.op("GatherElements", [scores3, b.unsqueeze(safe, [1])], axis=1)
    # found: at most top_k scores are >= the true class's (Caffe's rule: a tie counts against it)
    at_least = b.reduce("ReduceSum", b.to_float(b.op("GreaterOrEqual", [scores3, true_score])), [1], False)
    found = b.op("LessOrEqual", [at_least, b.fconst(_f32(layer.top_k))])
    if valid is not None:
        found = b.op("And", [found, valid])
    zero, one = b.fconst(_f32(0)), b.fconst(_f32(1))
    hits = _sum_all(b, b.to_float(found), 2)
    count = _sum_all(b, b.to_float(valid), 2) if valid is not None else b.reshape(_float(b, b.imul(outer, inner)), [])
    accuracy = b.op("Where", [b.op("Greater", [count, zero]), b.op("Div", [hits, b.op("Max", [count, one])]), zero])
    tops = [(accuracy, ())]
    if len(node.tops) > 1:  # per true class: hits / labels of that class, 0 for an absent class
        labels = b.op("Range", [b.reshape(b.ival(v), []) for v in (0, classes, 1)])
        of_class = b.op("Equal", [b.unsqueeze(safe, [2]), labels])  # (outer, inner, classes)
        counted = of_class if valid is None else b.op("And", [of_class, b.unsqueeze(valid, [2])])
        per_class = b.reduce("ReduceSum", b.to_float(counted), [0, 1], False)
        per_hit = b.reduce("ReduceSum", b.to_float(b.op("And", [counted, b.unsqueeze(found, [2])])), [0, 1], False)
        ratio = b.op("Div", [per_hit, b.op("Max", [per_class, one])])
        tops.append((b.op("Where", [b.op("Equal", [per_class, zero]), zero, ratio]), (False,)))
    return tops


# ------------------------------------------------------------------------------ the export


def check_opset(opset, onnx=None):
    onnx = onnx or load_onnx()
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= int(opset) <= newest:
        raise ExportError(f"ONNX opset {opset} is not supported: give one from {MIN_OPSET} (Softmax over one "
                          f"axis) to {newest} (the newest the installed onnx {onnx.__version__} knows)")
    return int(opset)


def _prescan(net, phase, level, stages):
    """Refuse layer types ONNX cannot hold before the graph is built (a Python layer would run)."""
    filtered = filter_net(net, make_state(net, phase, level, stages))
    for layer in filtered.layer:
        reason = REFUSED.get(layer.type)
        if reason is None and layer.type not in CONVERTERS:
            reason = "no ONNX conversion exists for this layer type"
        if reason is not None:
            raise ExportError(f"layer {shown(layer.name)} ({layer.type}): cannot export to ONNX: {reason}")


def _load(network, weights, phase, level, stages, input_shapes, max_blob_bytes):
    """(the Net, the name of its source), every layer type checked to be exportable first."""
    from caffeish.runtime.net import Net

    if isinstance(network, pb.NetParameter):
        net, source = network, "<NetParameter>"
        if len(net.layers):
            from caffeish.formats.upgrade import upgrade_net
            net = upgrade_net(net)[0]
    else:
        source = os.fspath(network)
        net = io.read_net(source)
    _prescan(net, phase, level, stages)
    runnable = Net(net, weights=weights, backend="numpy", phase=phase, level=level, stages=stages, keep=False,
                   input_shapes=input_shapes, max_blob_bytes=max_blob_bytes, seed=0)
    return runnable, source


def _value_info(onnx, name, shape, mask, input_dims=None):
    dims = []
    for axis, (d, dyn) in enumerate(zip(shape, mask)):
        dims.append((input_dims or {}).get(axis) if dyn else int(d))
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims)


def build_model(network, weights=None, opset=DEFAULT_OPSET, dynamic_hw=False, phase=TEST, level=0, stages=(),
                input_shapes=None, outputs=None, max_blob_bytes=None, check=True):
    """The ONNX model of a net, as an Export (nothing written).

    network: prototxt path or NetParameter; weights: caffemodel path or None (fillers).
    outputs: extra blobs to expose as graph outputs (a list, or "all": every blob, e.g. for tests).
    check: run onnx's checker on the model (check_serialized does it on bytes already made).
    """
    onnx = load_onnx()
    opset = check_opset(opset, onnx)
    phase = phase_value(phase)
    stages = tuple(stages or ())
    net, source = _load(network, weights, phase, level, stages, input_shapes, max_blob_bytes)
    graph = net.graph
    blobs = set(graph.blob_shapes)
    for node in graph.nodes:
        blobs.update(node.tops)
        blobs.update(node.bottoms)
    b = Builder(onnx, opset, blobs)
    writes = {}
    for node in graph.nodes:
        for top in node.tops:
            writes[top] = writes.get(top, 0) + 1
    value = {}
    read = {blob for node in graph.nodes for blob in node.bottoms}
    requested = set() if outputs == "all" else set(outputs or ())
    unread = []  # inputs no layer reads (MemoryData's label in a deploy net): left out of the model
    for node in graph.nodes:
        b.layer, b.layer_start, b.made_here = node, len(b.nodes), set()
        if node.type in SOURCES:
            for top, shape in zip(node.tops, node.top_shapes):
                mask = (False, False, True, True) if dynamic_hw and len(shape) == 4 else (False,) * len(shape)
                dims = {2: f"{top}_height", 3: f"{top}_width"}
                if top not in read and top not in requested and outputs != "all":
                    unread.append(top)
                else:
                    b.graph_inputs.append(_value_info(onnx, top, shape, mask, dims))
                b.used.add(top)
                b.taken.add(top)
                b.mask[top], b.example[top] = mask, tuple(shape)
                value[top] = top
                writes[top] -= 1
            continue
        b.bottoms = [value[x] for x in node.bottoms]
        params = [np.asarray(a, dtype=np.float32) for a in net.param_arrays(node.name)] if node.param_shapes else []
        results = CONVERTERS[node.type](b, node, params)
        for (name, mask), top, shape in zip(results, node.tops, node.top_shapes):
            if top == AUTOMATIC:
                continue
            writes[top] -= 1
            if writes[top] == 0 and name in b.made_here and top not in b.taken:
                _rename(b, name, top)
                name = top
            b.mask[name], b.example[name] = tuple(mask), tuple(shape)
            value[top] = name
    net = params = None  # the weights live on in the initializers
    wanted = [o for o in graph.outputs if o != AUTOMATIC and o not in unread]
    if outputs == "all":
        wanted += [blob for blob in value if blob not in wanted]
    else:
        wanted += [blob for blob in (outputs or ()) if blob not in wanted]
    if not wanted:
        raise ExportError("the net has no outputs to export (no layer computes anything from its inputs)")
    unknown = [o for o in wanted if o not in value]
    if unknown:
        raise CaffeishError(f"outputs: no blob named {', '.join(shown(o) for o in unknown)} in the net")
    b.layer = None
    out_names, out_infos = {}, []
    inputs = {i.name for i in b.graph_inputs}
    for blob in wanted:
        name = value[blob]
        if name != blob or name in inputs:
            target = blob if blob not in b.taken else b.fresh(f"{blob}_out")
            b.taken.add(target)
            b.nodes.append(onnx.helper.make_node("Identity", [name], [target], name=f"output {target}"))
            b.mask[target], b.example[target] = b.mask[name], b.example[name]
            name = target
        out_names[blob] = name
        out_infos.append(_value_info(onnx, name, b.example[name], b.mask[name]))
    model = _make_model(onnx, b, out_infos, graph, source, opset)
    if check:
        check_serialized(model.SerializeToString(), onnx)
    return Export(model, [i.name for i in b.graph_inputs], out_names, opset, dynamic_hw, unread)


def _rename(b, old, new):
    """Give a value made by the current layer its blob's name (in this layer's nodes)."""
    for node in b.nodes[b.layer_start:]:
        for seq in (node.input, node.output):
            for i, n in enumerate(seq):
                if n == old:
                    seq[i] = new
        if node.name == old:
            node.name = new
    b.taken.add(new)


def _make_model(onnx, b, out_infos, graph, source, opset):
    size = sum(len(t.raw_data) for t in b.inits)
    if size >= 2**31 - 2**24:
        raise ExportError(f"the weights take {size:,} bytes; an ONNX file is a protobuf, limited to 2 GiB")
    g = onnx.helper.make_graph(b.nodes, graph.name or "caffe_net", b.graph_inputs, out_infos, initializer=b.inits,
                               doc_string=f"exported by caffeish from {source}")
    opsets = [onnx.helper.make_opsetid("", opset)]
    model = onnx.helper.make_model(g, opset_imports=opsets, producer_name="caffeish")
    model.ir_version = onnx.helper.find_min_ir_version_for(opsets)
    return model


def check_serialized(data, onnx=None):
    """onnx's checker on a serialized model (a failure is a bug of ours, not of the user's net)."""
    onnx = onnx or load_onnx()
    try:
        onnx.checker.check_model(data)
    except onnx.checker.ValidationError as e:
        raise CaffeishError(f"internal error: the exported model fails onnx's checker: "
                            f"{str(e).splitlines()[0]}") from None


def export_onnx(network, weights=None, output=None, opset=DEFAULT_OPSET, dynamic_hw=False, phase=TEST, level=0,
                stages=(), input_shapes=None, outputs=None, max_blob_bytes=None):
    """Export a net to ONNX; writes `output` atomically when given (never over an input).  Returns an Export."""
    if output is not None:
        io.check_outputs([("-o", output)], inputs=[p for p in (network, weights) if isinstance(p, (str, os.PathLike))])
    result = build_model(network, weights, opset, dynamic_hw, phase, level, stages, input_shapes, outputs,
                         max_blob_bytes, check=output is None)
    if output is not None:
        data = result.model.SerializeToString()
        check_serialized(data)
        inputs = [p for p in (network, weights) if isinstance(p, (str, os.PathLike))]
        with io.atomic_output(output, inputs) as f:
            f.write(data)
    return result
