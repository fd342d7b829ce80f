"""pycaffe's face on caffeish.Net, so that `import caffeish as caffe` scripts run.

pycaffe exposes a net as ordered dicts of blobs and parameter lists, plus
`forward(**inputs)`.  Here they are thin views over the Net's arrays: a
`Blob.data` is the live array (writing into it changes the net), as in pycaffe.
A Net keeps every blob, as Caffe does; one built with keep=False (or a list of
names) frees intermediates after their last use, and their Blobs say so
instead of returning stale data.  `.diff` is the blob's diff array (caffeish.runtime.backward),
live on the CPU, a synced host copy on the GPU, like `.data`.

A Python layer's parameter blobs (`self.blobs.add_blob(...)` in its setup) are
its own ArrayBlobs: `net.params[name]` and `net.layers[i].blobs` are that very
list, and `net.layers[i]` is the layer object itself, as in pycaffe.

`PythonLayer` (exported as `caffeish.Layer`, pycaffe's `caffe.Layer`) and
`ArrayBlob` are what a prototxt's Python layers see: their base class and
their bottom/top blobs (run by caffeish.ops.python_layer).
"""
from collections import OrderedDict

import numpy as np

from caffeish.errors import BlobShapeError, GraphError
from caffeish.graph.graph import AUTOMATIC, MAX_BLOB_AXES



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
                    f"blob '{self.name}' was freed after its last use during forward (this Net was built "
                    f"with keep=False or a list of names, to save memory): build it with keep=True (the "
                    f"default), keep=['{self.name}'], or ask forward(blobs=['{self.name}'])"
                )
            arrays[self.name] = net.xp.zeros(self.shape, dtype="float32")
        return net.host_data(self.name)  # the live array on the CPU; a synced host copy on the GPU

    @property
    def diff(self):
        """The blob's diff (writable, like .data): zeros until a backward writes it, the loss weight
        for a loss-weighted top (Caffe's backward seed)."""
        return self._net.host_diff(self.name)

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
            raise BlobShapeError(
                f"blob '{self.name}' has {len(shape)} axes; num/channels/height/width need at most 4 (use .shape)")
        return (tuple(shape) + (1,) * 4)[i] if i < len(shape) else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape):
        """Give the blob a new shape (zeros); call net.reshape() to propagate an input's new shape."""
        shape = _shape_arg(shape, f"blob '{self.name}'")
        net = self._net
        net._host.pop(("blob", self.name), None)  # a GPU net's host copy of the old shape is stale
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
        return self._net.host_param_diff(self.layer, self.index)

    @property
    def shape(self):
        return tuple(self._net._params[self.layer][self.index].shape)

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
        shape = _shape_arg(shape, f"parameter {self.index} of layer '{self.layer}'")
        self._net._params[self.layer][self.index] = self._net.xp.zeros(shape, "float32")

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
        self.blobs = net._param_blobs(node.name)
        self.phase = net.phase

    def __repr__(self):
        return f"Layer({self.name!r}, {self.type!r})"


class PycaffeNetMixin:
    """The pycaffe attributes of a Net (mixed into caffeish.runtime.net.Net)."""

    # -- blobs, layers and parameters, in Caffe's orders ------------------------------
    @property
    def _blob_names(self):
        """Every blob name, in the order Caffe's Net creates them (a layer's new tops, layer by layer)."""
        names = {}
        for node in self.nodes:
            for t in node.tops:
                if t != AUTOMATIC:
                    names.setdefault(t, None)
        return list(names)

    @property
    def _blobs(self):
        return [Blob(self, name) for name in self._blob_names]

    @property
    def blobs(self):
        """OrderedDict of blob name -> Blob, in the order the layers produce them."""
        return OrderedDict(zip(self._blob_names, self._blobs))

    @property
    def _blob_loss_weights(self):
        """The loss weight of each blob (in _blob_names order), as Caffe's Net records them: a
        layer's loss_weight for each top, 1 for a loss layer's first top when none is given, 0
        otherwise; a later in-place layer's value replaces an earlier one's."""
        weights = {}
        for node in self.nodes:
            for j, t in enumerate(node.tops):
                if t != AUTOMATIC:
                    weights[t] = self._loss_weight(node, j)
        return [weights[name] for name in self._blob_names]

    @property
    def blob_loss_weights(self):
        """OrderedDict of blob name -> loss weight (pycaffe's net.blob_loss_weights)."""
        return OrderedDict(zip(self._blob_names, self._blob_loss_weights))

    def _param_blobs(self, layer):
        """A layer's parameter blobs as pycaffe shows them (a Python layer's own list)."""
        own = self._python_blobs.get(layer)
        if own is not None:
            return own
        return [ParamBlob(self, layer, i) for i in range(len(self._params.get(layer, [])))]

    @property
    def params(self):
        """OrderedDict of layer name -> [param blob, ...] for the layers that own parameters."""
        self._sync_python_params()
        out = OrderedDict()
        for node in self.nodes:
            blobs = self._param_blobs(node.name)
            if len(blobs):
                out[node.name] = blobs
        return out

    @property
    def layers(self):
        """One object per layer (pycaffe's net.layers): a Python layer's own object, else a view."""
        self._sync_python_params()
        out = []
        for node in self.nodes:
            instance = getattr(node.layer, "instance", None) if node.type == "Python" else None
            out.append(instance if instance is not None else LayerView(self, node))
        return out

    @property
    def _layer_names(self):
        return [node.name for node in self.nodes]

    @property
    def layer_dict(self):
        """OrderedDict of layer name -> layer (pycaffe's net.layer_dict)."""
        return OrderedDict(zip(self._layer_names, self.layers))

    @property
    def top_names(self):
        return OrderedDict((n.name, [t for t in n.tops if t != AUTOMATIC]) for n in self.nodes)

    @property
    def bottom_names(self):
        return OrderedDict((n.name, list(n.bottoms)) for n in self.nodes)

    def _blob_index(self):
        return {name: i for i, name in enumerate(self._blob_names)}

    def _top_ids(self, i):
        """The blob indices of layer i's tops (pycaffe's net._top_ids)."""
        index = self._blob_index()
        return [index[t] for t in self.nodes[i].tops if t != AUTOMATIC]

    def _bottom_ids(self, i):
        """The blob indices of layer i's bottoms (pycaffe's net._bottom_ids)."""
        index = self._blob_index()
        return [index[b] for b in self.nodes[i].bottoms]

    @property
    def inputs(self):
        return list(self.input_names)

    @property
    def outputs(self):
        return [b for b in self.graph.outputs if b != AUTOMATIC]

    @property
    def _inputs(self):
        """The blob indices of net.inputs."""
        index = self._blob_index()
        return [index[name] for name in self.inputs]

    @property
    def _outputs(self):
        """The blob indices of net.outputs."""
        index = self._blob_index()
        return [index[name] for name in self.outputs]

    # -- forward -------------------------------------------------------------------------
    def forward(self, blobs=None, start=None, end=None, **kwargs):
        """pycaffe's forward: inputs as keyword arrays (or already in net.blobs[...].data).

        Returns an OrderedDict {output blob: array}; with `end`, the tops of
        that layer; `blobs` adds (and keeps) more blobs.  A new input shape
        reshapes the net, as `net.reshape()` would.
        """
        return self.forward_outputs(kwargs or None, start, end, blobs or ())

    def forward_all(self, blobs=None, **kwargs):
        """pycaffe's forward_all: run over inputs of any batch size, one net batch at a time.

        The last batch is padded with zeros and the padding dropped from the
        results, as pycaffe does; the batch size is the net's first blob's."""
        if not kwargs:
            return self.forward(blobs=blobs)
        total = len(next(iter(kwargs.values())))
        results = {}
        for chunk in self._batches(kwargs):
            for k, v in self.forward(blobs=blobs, **chunk).items():
                results.setdefault(k, []).append(np.array(v))
        return OrderedDict((k, np.concatenate(v)[:total]) for k, v in results.items())

    # -- MemoryData --------------------------------------------------------------------
    def set_input_arrays(self, data, labels):
        """pycaffe's set_input_arrays: hand a MemoryData layer (the net's first layer) its arrays.

        data: float32, C-contiguous, (N, channels, height, width); labels:
        float32, (N,) or (N, 1, 1, 1); N a multiple of the layer's batch_size.
        Each forward then takes the next batch_size items (wrapping around),
        without copying them: the arrays must stay unchanged while in use.
        """
        if isinstance(labels, np.ndarray) and labels.ndim == 1:
            labels = np.ascontiguousarray(labels[:, np.newaxis, np.newaxis, np.newaxis])
        return self._set_input_arrays(data, labels)


# ---------------------------------------------------------------------------- Python layers


def _shape_arg(shape, what="blob"):
    """pycaffe's reshape arguments: reshape(1, 3, H, W) (or one tuple), as a tuple of ints >= 0
    (BlobShapeError, a ValueError, otherwise)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, np.ndarray)):
        shape = tuple(shape[0])
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise BlobShapeError(f"{what}: reshape{tuple(shape)}: dimensions must be integers, got {d!r}")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise BlobShapeError(f"{what}: reshape{dims}: a blob dimension cannot be negative")
    if len(dims) > MAX_BLOB_AXES:
        raise BlobShapeError(f"{what}: reshape to {len(dims)} axes; Caffe's blobs have at most {MAX_BLOB_AXES}")
    return dims


class ArrayBlob:
    """A blob that holds its own arrays: the bottoms and tops pycaffe hands a Python layer.

    `.data` is a float32 numpy array that user code writes into
    (`top[0].data[...] = x`); `.reshape(*shape)` gives the blob a new shape (a
    fresh zero array when the shape changes; Caffe leaves the contents
    undefined then, and keeps them when it does not).  `.diff` is a zero array
    of the same shape.  Unlike `Blob`, it belongs
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
    """pycaffe's `layer.blobs` of a Python layer: a list with `add_blob(*shape)` (a zero blob)."""

    def add_blob(self, *shape):
        self.append(ArrayBlob(_shape_arg(shape, "add_blob")))


class PythonLayer:
    """pycaffe's `caffe.Layer` (here `caffeish.Layer`): the class a Python layer subclasses.

    Caffe builds the class named by `python_param { module layer }` with the
    LayerParameter, sets `param_str` (python_param.param_str) and `phase`
    (caffe.TRAIN = 0, caffe.TEST = 1), then calls `setup(bottom, top)` and
    `reshape(bottom, top)` when the net is built, and `reshape(bottom, top)`
    then `forward(bottom, top)` on every forward pass.  `bottom` and `top` are
    lists of blobs (`.data`, `.diff`, `.reshape(...)`, `.shape`, `.count`).
    `blobs` holds the layer's own parameters (`self.blobs.add_blob(...)` in
    setup): they are the Net's `params[name]`, loaded and saved like any
    layer's.  See caffeish.ops.python_layer.
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

    @property
    def type(self):
        return "Python"

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        raise NotImplementedError(f"{type(self).__name__} defines no forward(self, bottom, top)")
