"""pycaffe's face on caffeish.Net, so that `import caffeish as caffe` scripts run.

pycaffe exposes a net as ordered dicts of blobs and parameter lists, plus
`forward(**inputs)`.  Here they are thin views over the Net's arrays: a
`Blob.data` is the live array (writing into it changes the net), as in pycaffe.
Blobs that the runtime freed after their last use (the default; build the Net
with keep=True to keep them) say so instead of returning stale data.

`PythonLayer` (exported as `caffeish.Layer`, pycaffe's `caffe.Layer`) and
`ArrayBlob` are what a prototxt's Python layers see: their base class and
their bottom/top blobs (run by caffeish.ops.python_layer).
"""
from collections import OrderedDict

import numpy as np

from caffeish.errors import GraphError
from caffeish.graph.graph import AUTOMATIC


class Blob:
    """A named blob of a Net: `.data`, `.diff`, `.shape`, `.reshape(*shape)`."""

    def __init__(self, net, name):
        self._net = net
        self.name = name

    @property
    def data(self):
        net = self._net
        arrays = net._arrays
        net._provided.add(self.name)  # pycaffe fills inputs through .data[...]
        if self.name not in arrays:
            if self.name in net._freed:
                raise GraphError(
                    f"blob '{self.name}' was freed after its last use during forward (intermediate blobs "
                    f"are not kept by default): build the Net with keep=True, keep=['{self.name}'], or "
                    f"ask forward(blobs=['{self.name}'])"
                )
            arrays[self.name] = net.xp.zeros(self.shape, dtype="float32")
        return net.host_data(self.name)  # the live array on the CPU; a synced host copy on the GPU

    @property
    def diff(self):
        """Gradients are not computed by this runtime (inference only): zeros of the blob's shape."""
        return self._net.xp.zeros(self.shape, dtype="float32")

    @property
    def shape(self):
        return tuple(self._net.blob_shape(self.name))

    @property
    def count(self):
        n = 1
        for d in self.shape:
            n *= d
        return n

    def _legacy(self, i):
        shape = self.shape
        if len(shape) > 4:
            raise GraphError(f"blob '{self.name}' has {len(shape)} axes; num/channels/height/width need at most 4")
        return (tuple(shape) + (1,) * 4)[i] if i < len(shape) else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape):
        """Give the blob a new shape (zeros); call net.reshape() to propagate an input's new shape."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        net = self._net
        net._arrays[self.name] = net.xp.zeros(shape, dtype="float32")
        net._shapes[self.name] = shape
        net._freed.discard(self.name)

    def __repr__(self):
        return f"Blob({self.name!r}, shape={self.shape})"


class ParamBlob:
    """One parameter blob of a layer: `.data` is the live array, writable in place."""

    def __init__(self, net, layer, index):
        self._net = net
        self.layer = layer
        self.index = index

    @property
    def data(self):
        return self._net.host_param(self.layer, self.index)

    @property
    def diff(self):
        return self._net.xp.zeros(self.shape, dtype="float32")

    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def count(self):
        return int(self.data.size)

    num = property(lambda self: Blob._legacy(self, 0))
    channels = property(lambda self: Blob._legacy(self, 1))
    height = property(lambda self: Blob._legacy(self, 2))
    width = property(lambda self: Blob._legacy(self, 3))

    @property
    def name(self):
        return f"{self.layer}/{self.index}"

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        self._net._params[self.layer][self.index] = self._net.xp.zeros(tuple(int(d) for d in shape), "float32")

    def __repr__(self):
        return f"ParamBlob({self.layer!r}, {self.index}, shape={self.shape})"


class LayerView:
    """pycaffe's Layer: `.type`, `.name`, `.blobs` (its parameter blobs), `.bottom`/`.top` names."""

    def __init__(self, net, node):
        self._net = net
        self.name = node.name
        self.type = node.type
        self.bottom = list(node.bottoms)
        self.top = [t for t in node.tops if t != AUTOMATIC]
        self.blobs = [ParamBlob(net, node.name, i) for i in range(len(net._params.get(node.name, [])))]
        self.phase = net.phase

    def __repr__(self):
        return f"Layer({self.name!r}, {self.type!r})"


class PycaffeNetMixin:
    """The pycaffe attributes of a Net (mixed into caffeish.runtime.net.Net)."""

    @property
    def blobs(self):
        """OrderedDict of blob name -> Blob, in the order the layers produce them."""
        out = OrderedDict()
        for node in self.nodes:
            for t in node.tops:
                if t != AUTOMATIC and t not in out:
                    out[t] = Blob(self, t)
        return out

    @property
    def params(self):
        """OrderedDict of layer name -> [ParamBlob, ...] for the layers that own parameters."""
        return OrderedDict(
            (node.name, [ParamBlob(self, node.name, i) for i in range(len(self._params[node.name]))])
            for node in self.nodes if self._params.get(node.name)
        )

    @property
    def layers(self):
        return [LayerView(self, node) for node in self.nodes]

    @property
    def _layer_names(self):
        return [node.name for node in self.nodes]

    @property
    def layer_dict(self):
        return OrderedDict((view.name, view) for view in self.layers)

    @property
    def top_names(self):
        return OrderedDict((n.name, [t for t in n.tops if t != AUTOMATIC]) for n in self.nodes)

    @property
    def bottom_names(self):
        return OrderedDict((n.name, list(n.bottoms)) for n in self.nodes)

    @property
    def _blob_names(self):
        return list(self.blobs)

    @property
    def inputs(self):
        return list(self.input_names)

    @property
    def outputs(self):
        return [b for b in self.graph.outputs if b != AUTOMATIC]

    def forward(self, blobs=None, start=None, end=None, **kwargs):
        """pycaffe's forward: inputs as keyword arrays (or already in net.blobs[...].data).

        Returns an OrderedDict {output blob: array}; with `end`, the tops of
        that layer; `blobs` adds (and keeps) more blobs.  A new input shape
        reshapes the net, as `net.reshape()` would.
        """
        return self.forward_outputs(kwargs or None, start, end, blobs or ())

    def forward_all(self, blobs=None, **kwargs):
        """pycaffe's forward_all: run over inputs of any batch size, one net batch at a time."""
        import numpy as np

        if not kwargs:
            return self.forward(blobs=blobs)
        batch = self.blob_shape(self.inputs[0])[0]
        total = len(next(iter(kwargs.values())))
        results = {}
        for lo in range(0, total, batch):
            chunk = {k: np.asarray(v[lo:lo + batch]) for k, v in kwargs.items()}
            n = len(next(iter(chunk.values())))
            if n < batch:
                chunk = {k: np.concatenate([v, np.zeros((batch - n,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
            outs = self.forward(blobs=blobs, **chunk)
            for k, v in outs.items():
                results.setdefault(k, []).append(np.array(v[:n]))
        return OrderedDict((k, np.concatenate(v)) for k, v in results.items())


# ---------------------------------------------------------------------------- Python layers


def _shape_arg(shape):
    """pycaffe's reshape arguments: reshape(1, 3, H, W) (or one tuple), as a tuple of ints >= 0."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise GraphError(f"reshape{dims}: a blob dimension cannot be negative")
    return dims


class ArrayBlob:
    """A blob that holds its own arrays: the bottoms and tops pycaffe hands a Python layer.

    `.data` is a float32 numpy array that user code writes into
    (`top[0].data[...] = x`); `.reshape(*shape)` gives the blob a new shape (a
    fresh zero array when the shape changes; Caffe leaves the contents
    undefined then, and keeps them when it does not).  `.diff` is a zero array
    of the same shape (no backward pass runs here).  Unlike `Blob`, it belongs
    to no Net: the Python layer binds the arrays of its bottoms and returns its
    tops' arrays to the runtime.
    """

    def __init__(self, shape=(0,), name=""):
        self.name = name
        self._data = np.zeros(_shape_arg((shape,)), dtype=np.float32)
        self._diff = None

    def bind(self, array):
        """Make `array` (float32, any shape) this blob's data, without copying."""
        self._data = array
        self._diff = None

    @property
    def data(self):
        return self._data

    @property
    def diff(self):
        if self._diff is None or self._diff.shape != self._data.shape:
            self._diff = np.zeros(self._data.shape, dtype=np.float32)
        return self._diff

    @property
    def shape(self):
        return tuple(self._data.shape)

    @property
    def count(self):
        return int(self._data.size)

    num = property(lambda self: Blob._legacy(self, 0))
    channels = property(lambda self: Blob._legacy(self, 1))
    height = property(lambda self: Blob._legacy(self, 2))
    width = property(lambda self: Blob._legacy(self, 3))

    def reshape(self, *shape):
        shape = _shape_arg(shape)
        if shape != self.shape or not self._data.flags.writeable:
            self._data = np.zeros(shape, dtype=np.float32)
            self._diff = None

    def __repr__(self):
        return f"ArrayBlob({self.name!r}, shape={self.shape})"


class LayerBlobs(list):
    """pycaffe's `layer.blobs` of a Python layer: a list with `add_blob(*shape)`."""

    def add_blob(self, *shape):
        self.append(ArrayBlob(_shape_arg(shape)))


class PythonLayer:
    """pycaffe's `caffe.Layer` (here `caffeish.Layer`): the class a Python layer subclasses.

    Caffe builds the class named by `python_param { module layer }` with the
    LayerParameter, sets `param_str` (python_param.param_str) and `phase`
    (caffe.TRAIN = 0, caffe.TEST = 1), then calls `setup(bottom, top)` and
    `reshape(bottom, top)` when the net is built, and `reshape(bottom, top)`
    then `forward(bottom, top)` on every forward pass.  `bottom` and `top` are
    lists of blobs (`.data`, `.diff`, `.reshape(...)`, `.shape`, `.count`).
    `blobs` holds learnable parameters (`self.blobs.add_blob(...)`); caffeish
    runs only layers that keep it empty.  See caffeish.ops.python_layer.
    """

    param_str = ""
    phase = 1  # caffe.TEST until the runtime sets it

    def __init__(self, *args, **kwargs):
        # pycaffe constructs the layer with its LayerParameter; nothing to keep here.
        pass

    @property
    def blobs(self):
        blobs = self.__dict__.get("_blobs")
        if blobs is None:
            blobs = self.__dict__["_blobs"] = LayerBlobs()
        return blobs

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        raise NotImplementedError(f"{type(self).__name__} defines no forward(self, bottom, top)")

    def backward(self, top, propagate_down, bottom):
        pass
