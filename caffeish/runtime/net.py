"""The Net runtime: allocate blobs, bind weights, run forward layer by layer.

`Net(prototxt, weights=None, phase=TEST)` builds the graph (caffeish.graph.graph),
binds stored weights by layer name (caffeish.graph.weights; layers missing from the
weights get their fillers), and runs each layer's `forward(xp, bottoms, blobs)`
on a backend (caffeish.runtime.backend: numpy, or cupy for the GPU).

Blobs are names bound to arrays.  A layer returns fresh arrays (or views of its
bottoms where Caffe shares data) and never writes into its inputs, so in-place
layers simply rebind their top name, and the tops of a Split all name the same
array, which is Caffe's semantics without copies.  Every blob is kept after a
forward, as in Caffe (`net.blobs['conv1'].data`).  `keep=False` saves memory
instead: an intermediate blob is dropped as soon as no later layer reads it, so
peak memory is about the largest few live blobs, not the sum of all (a list of
names keeps those too); inputs and outputs are always kept.  The tools that own
their nets (classify, segment, evaluate, surgery's check) use keep=False.

The pycaffe-compatible face (`net.blobs`, `net.params`, `net.layers`, ...) is
in caffeish.runtime.blobs and is mixed into this class; the rest of pycaffe's
Net is here: forward hooks (`before_forward`/`after_forward`), `_forward`,
`share_with`, `save_hdf5`/`load_hdf5` (h5py, optional), `_set_input_arrays`
(MemoryData), and the parameter blobs of Python layers.
"""
import os
from collections import OrderedDict

import numpy as np

from caffeish.runtime import backend as backends
from caffeish.runtime import blas, fillers
from caffeish.formats import io
from caffeish.errors import (ArgumentError, BlobShapeError, CaffeishError, FileOpenError, GraphError,
                             InputArrayError, LayerIndexError, MissingDependencyError, ShapeError,
                             UnknownBlobError, UnknownLayerError, UnsupportedError, WeightError)
from caffeish.graph.graph import AUTOMATIC, Graph, phase_value
from caffeish.runtime.backward import BackwardMixin
from caffeish.runtime.blobs import PycaffeNetMixin
from caffeish.formats.schema import TEST, pb
from caffeish.graph.weights import bind


def _load_net(network):
    """A NetParameter from a path (prototxt or binary) or a NetParameter (copied)."""
    if isinstance(network, pb.NetParameter):
        if len(network.layers):
            from caffeish.formats.upgrade import upgrade_net

            network, _, _ = upgrade_net(network)
        copy = pb.NetParameter()
        copy.CopyFrom(network)
        return copy, "<NetParameter>"
    if isinstance(network, bytes):
        network = network.decode()
    network = os.fspath(network)
    check_file(network)
    net = io.read_net(network)
    return net, network


def check_file(path):
    """pycaffe's CheckFile: a file that cannot be opened is a RuntimeError (FileOpenError)."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise FileOpenError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError:  # a NUL byte in the name
        raise FileOpenError(f"{path!r}: cannot read: a file name cannot hold a NUL byte") from None


def is_hdf5(path):
    """Whether `path` (a readable file: check_file first) holds HDF5 (Caffe's .caffemodel.h5), judged by
    content as Caffe does."""
    return io.file_kind(path)[0] == "hdf5"


def _h5py(what):
    try:
        import h5py
    except ImportError:
        raise MissingDependencyError(
            f"{what}: HDF5 weights need the h5py package, which is not installed (pip install h5py); "
            f"net.save / binary .caffemodel files need nothing more") from None
    return h5py


def _root(array):
    """The array that owns the memory of `array` (numpy and cupy keep one level of base)."""
    return array if array.base is None else array.base


class Net(PycaffeNetMixin, BackwardMixin):
    """A runnable Caffe net.

    network: prototxt path (or a NetParameter).  weights: caffemodel path(s)
    (binary or HDF5; or None: every parameter comes from its filler).  phase:
    TEST or TRAIN.  keep: True (keep every blob, as Caffe: the default), False
    (free intermediates after their last use) or a list of names to keep.
    input_shapes: {input blob: shape} overriding the prototxt's shapes.
    backend: "numpy", "cupy" or None (caffeish.set_mode_cpu/gpu decides).
    device: "cpu", "cuda" or "cuda:N" (overrides backend; N selects the GPU).
    seed: the random seed of the fillers and random layers, so that an
    unweighted net is reproducible.  None: the global stream when
    caffeish.set_random_seed was called (pycaffe's), else 0.

    pycaffe's positional forms work too: Net(proto, TEST), Net(proto, weights,
    TEST), Net(proto, TEST, weights=...), Net(network_file=..., phase=...).
    """

    def __init__(self, network=None, *args, weights=None, phase=None, level=0, stages=(), keep=True,
                 input_shapes=None, backend=None, seed=None, max_blob_bytes=None, network_file=None,
                 device=None):
        if network is None:
            network = network_file
        if network is None:
            raise CaffeishError("Net needs a network: Net('deploy.prototxt', 'weights.caffemodel', caffeish.TEST)")
        # pycaffe's positional forms: (weights, phase), (phase,), (weights,)
        if len(args) > 2:
            raise CaffeishError("Net(network, [weights], [phase]): too many positional arguments")
        for arg in args:
            if isinstance(arg, int) and not isinstance(arg, bool):
                phase = arg
            elif weights is None:
                weights = arg
            else:
                raise CaffeishError(f"Net: weights given twice ({weights!r} and {arg!r})")
        self.phase = phase_value(TEST if phase is None else phase)
        net, self.source = _load_net(network)
        self.graph = Graph(net, self.phase, level, () if stages is None else stages, input_shapes, max_blob_bytes)
        self.name = self.graph.name
        if device is not None:
            backend = backends.for_device(device)
        self.xp = backends.get(backend)
        backends.tune_allocator()
        blas.tune_threads()
        self.nodes = self.graph.nodes
        # Input layers, and bottomless layers that cannot run here (HDF5Data, MemoryData, a Data
        # layer whose source is missing, a Python data layer whose module does not import, or any
        # data layer whose tops were given shapes): their tops are fed by the caller, so a
        # train/val net can also be evaluated on arrays.
        self._host = {}  # GPU nets: host copies handed out by host_data()/host_param(), see there
        self._fed_nodes = {n.name for n in self.nodes
                           if n.type == "Input" or (not n.bottoms and not n.layer.can_forward and n.tops)}
        self.input_names = [t for n in self.nodes if n.name in self._fed_nodes for t in n.tops
                            if t != AUTOMATIC]
        self._data_inputs = [t for n in self.nodes if n.name in self._fed_nodes and n.type != "Input"
                             for t in n.tops]
        self._provided = set()  # data-layer tops the caller has given values (or touched .data)
        self._check_runnable()
        self._keep_all = keep is True or keep is None
        self._keep = set() if keep in (True, False, None) else set(keep)
        unknown = self._keep - set(self.graph.blob_shapes)
        if unknown:
            raise UnknownBlobError(f"keep names unknown blob(s) {sorted(unknown)}")
        self.rng = np.random.default_rng(seed) if seed is not None else (fillers.global_rng()
                                                                           or np.random.default_rng(0))
        for node in self.nodes:  # random layers (DummyData fillers, Dropout at TRAIN) draw from the Net's seed
            if hasattr(node.layer, "rng"):
                node.layer.rng = self.rng
        self._params = OrderedDict()  # layer name -> [array, ...]
        self._sharers = set()  # (layer, index) of parameters that share another layer's (ParamSpec.name)
        # Python layers' own parameter lists (self.blobs in their setup): their arrays are the Net's.
        self._python_blobs = {n.name: n.layer.instance.blobs for n in self.nodes
                              if n.type == "Python" and getattr(n.layer, "instance", None) is not None}
        self._before_forward, self._after_forward = [], []
        self._memory = {}  # MemoryData layers that set_input_arrays gave arrays: name -> layer
        self._relu_fusion = {}  # layer index -> whether a ReLU after it runs fused (_relu_follows)
        paths = [weights] if isinstance(weights, (str, bytes)) or hasattr(weights, "__fspath__") else list(weights or [])
        paths = [os.fsdecode(p) for p in paths]
        for path in paths:
            check_file(path)
        self.missing_weights, self.unused_weights = [], []
        binding = self._bind(paths[0]) if paths and not is_hdf5(paths[0]) else None
        self._init_params(binding.arrays if binding else None)
        self._init_backward()
        self._shapes = dict(self.graph.blob_shapes)
        self._arrays = {}
        self._freed = set()  # blobs dropped after their last use in the latest forward
        self._node_index = {n.name: i for i, n in enumerate(self.nodes)}
        self._last_use = self._compute_last_use()
        self._alloc_inputs()
        for path in paths[0 if paths and binding is None else 1:]:
            self.copy_from(path)

    # -- construction ----------------------------------------------------------------
    def _check_runnable(self):
        for node in self.nodes:
            if node.name not in self._fed_nodes and not node.layer.can_forward:
                raise UnsupportedError(
                    f"layer '{node.name}' ({node.type}): cannot run: {node.layer.unsupported_reason}"
                )

    def _init_params(self, loaded=None):
        """Give every parameter blob its value: the loaded weights where there are some,
        else its filler.  Shared params (ParamSpec.name)
        alias their owner's array; a sharer's loaded weights overwrite it, as in Caffe."""
        loaded = loaded or {}
        owners = {}  # param name -> (array, layer name, index)
        self._param_owner = {}  # (layer, index) of a sharer -> (layer, index) of the owner
        for node in self.nodes:
            if not node.param_shapes:
                continue
            specs = node.layer.fillers()
            stored = loaded.get(node.name)
            python = self._python_blobs.get(node.name)  # the layer's own blobs hold its values
            arrays = []
            for i, shape in enumerate(node.param_shapes):
                spec_name = node.param.param[i].name if i < len(node.param.param) else ""
                if spec_name and spec_name in owners:
                    arr = self._shared(node, i, shape, spec_name, owners[spec_name])
                    if python is not None:
                        if not backends.is_host(arr):
                            raise UnsupportedError(
                                f"layer '{node.name}' (Python): parameter {i} shares '{spec_name}' with a layer "
                                f"on the GPU; a Python layer's parameters live on the host")
                        python[i].bind(arr)
                    if stored is not None:
                        self._write_param(arr, stored[i])
                    arrays.append(arr)
                    self._sharers.add((node.name, i))
                    self._param_owner[(node.name, i)] = owners[spec_name][1:]
                    continue
                if python is not None:
                    arr = python[i].data
                    if stored is not None:
                        self._write_param(arr, stored[i])
                elif stored is not None:
                    arr = self._own(stored[i])
                else:
                    filler = specs[i] if i < len(specs) else None
                    arr = self.xp.asarray(fillers.fill(filler, shape, self.rng, what=f"layer '{node.name}' blob {i}"))
                arrays.append(arr)
                if spec_name:
                    owners[spec_name] = (arr, node.name, i)
            self._params[node.name] = arrays

    def _write_param(self, target, value):
        """Copy `value` into the parameter array `target` (a host array for a Python layer's)."""
        if self.xp is np or backends.is_host(target):
            target[...] = np.asarray(backends.to_numpy(value)).reshape(target.shape)
        else:
            target[...] = self.xp.asarray(value).reshape(target.shape)

    def _sync_python_params(self):
        """Python layers' parameter arrays, as their blobs hold them now (a blob the layer
        reshaped, or that share_with bound, has a new array)."""
        for name, blobs in self._python_blobs.items():
            if len(blobs) or name in self._params:
                self._params[name] = [blob.data for blob in blobs]

    def _own(self, array):
        """A loaded weight as an aligned, writable float32 array of this backend that only
        this net holds.  caffeish.formats.io gives each blob its own aligned array, which is used
        as is; anything else (a float64 blob, a view) is copied, since unaligned arrays
        halve BLAS speed."""
        if (self.xp is np and array.dtype == np.float32 and _root(array).flags.owndata
                and array.flags.aligned and array.flags.writeable and array.flags.c_contiguous):
            return array
        return self.xp.array(array, dtype=np.float32, order="C", copy=True)

    def _shared(self, node, i, shape, spec_name, owner):
        arr, owner_layer, _ = owner
        mode = node.param.param[i].share_mode
        if tuple(arr.shape) == tuple(shape):
            return arr
        if mode == pb.ParamSpec.PERMISSIVE and arr.size == int(np.prod(shape)):
            return arr.reshape(shape)
        raise ShapeError(
            f"layer '{node.name}' ({node.type}): parameter {i} shares '{spec_name}' with layer "
            f"'{owner_layer}', whose shape is {tuple(arr.shape)}, but this layer needs {tuple(shape)}"
        )

    def _compute_last_use(self):
        last = {}
        for i, node in enumerate(self.nodes):
            for b in node.bottoms:
                last[b] = i
        return last

    def _alloc_inputs(self):
        for name in self.input_names:
            self._arrays[name] = self.xp.zeros(self._shapes[name], dtype=np.float32)

    # -- weights -----------------------------------------------------------------------
    def _bind(self, path):
        if isinstance(path, bytes):
            path = path.decode()
        model = io.read_caffemodel(str(path))
        binding = bind(self.graph, model, source=str(path))
        self.missing_weights = binding.missing
        self.unused_weights = binding.unused
        return binding

    def copy_from(self, path):
        """Load weights into the matching layers (by name), as Caffe's CopyTrainedLayersFrom: a
        binary caffemodel, or HDF5 (judged by content, as Caffe does; see load_hdf5)."""
        path = os.fsdecode(path)
        check_file(path)
        if is_hdf5(path):
            return self.load_hdf5(path)
        self._sync_host()
        self._sync_python_params()
        binding = self._bind(path)
        for name, arrays in binding.arrays.items():
            targets = self._params.get(name)
            if targets is None:
                continue
            for target, arr in zip(targets, arrays):
                self._write_param(target, arr)
        return binding

    def param_arrays(self, layer):
        """The parameter arrays of a layer (the live ones: writing them changes the net)."""
        self._sync_python_params()
        return self._params[layer]

    def share_with(self, other):
        """pycaffe's share_with (Caffe's ShareTrainedLayersWith): every layer of `other` whose
        name this net has must have as many parameter blobs, each of exactly the same shape;
        this net's blobs then use the other's arrays (writing one changes both).  Layers of
        `other` missing here are ignored.  Checked in full before anything is shared."""
        if not isinstance(other, Net):
            raise ArgumentError(f"share_with: expected a Net, got {type(other).__name__}")
        if other.xp is not self.xp:
            raise UnsupportedError("share_with: both nets must run on the same device (CPU or GPU)")
        for net in (self, other):
            net._sync_host()
            net._sync_python_params()
        pairs = []
        for node in other.nodes:
            if node.name not in self._node_index:
                continue
            source, target = other._params.get(node.name, []), self._params.get(node.name, [])
            if len(source) != len(target):
                raise WeightError(
                    f"share_with: layer '{node.name}' has {len(source)} parameter blob(s) in the other net and "
                    f"{len(target)} here (Caffe: Incompatible number of blobs)")
            for j, (s, t) in enumerate(zip(source, target)):
                if tuple(s.shape) != tuple(t.shape):
                    raise WeightError(
                        f"share_with: cannot share parameter {j} of layer '{node.name}': shape mismatch, "
                        f"{tuple(s.shape)} in the other net, {tuple(t.shape)} here")
                pairs.append((node.name, j, s))
        for name, j, array in pairs:
            python = self._python_blobs.get(name)
            if python is not None:
                python[j].bind(array if backends.is_host(array) else backends.to_numpy(array))
            self._params[name][j] = array
        self._sync_python_params()

    # -- shapes --------------------------------------------------------------------------
    def reshape(self, **shapes):
        """Propagate new input shapes (net.reshape(data=(1,3,H,W))), or the current inputs' shapes."""
        self._sync_host()
        for name, shape in shapes.items():
            if name not in self.input_names:
                raise UnknownBlobError(
                    f"reshape: '{name}' is not an input of this net; inputs are {self.input_names}")
            shape = tuple(int(d) for d in shape)
            if tuple(self._arrays[name].shape) != shape:
                self._arrays[name] = self.xp.zeros(shape, dtype=np.float32)
        self._propagate({name: tuple(self._arrays[name].shape) for name in self.input_names})

    def _propagate(self, input_shapes):
        """Shape inference from new input shapes, keeping parameter shapes fixed (as Caffe's Reshape)."""
        shapes = dict(input_shapes)
        for node in self.nodes:
            if node.name in self._fed_nodes:
                tops = [shapes[t] for t in node.tops]
            else:
                bottoms = [shapes[b] for b in node.bottoms]
                tops = [tuple(int(d) for d in s) for s in node.layer.reshape(bottoms)]
                node.bottom_shapes = bottoms
                self._check_params(node, bottoms)
            for t, s in zip(node.tops, tops):
                self.graph._check_size(node, t, s)
                if t != AUTOMATIC:
                    shapes[t] = s
            node.top_shapes = tops
        self._shapes = shapes
        # Intermediate values of the old shapes are stale now.
        for name in list(self._arrays):
            if name not in self.input_names:
                del self._arrays[name]

    def _check_params(self, node, bottom_shapes):
        if not node.param_shapes or node.type == "Python":  # a Python layer's blobs are its own business
            return
        now = [tuple(int(d) for d in s) for s in node.layer.param_shapes(bottom_shapes)]
        if now != node.param_shapes:
            raise BlobShapeError(
                f"layer '{node.name}' ({node.type}): the new input shape {bottom_shapes} would change "
                f"its parameter shapes from {node.param_shapes} to {now}; Caffe refuses this "
                f"(an InnerProduct's input size is fixed by its weights)"
            )

    def blob_shape(self, name):
        if name in self._arrays:
            return tuple(self._arrays[name].shape)
        return self._shapes[name]

    # -- forward -------------------------------------------------------------------------
    def _set_inputs(self, inputs):
        for name, value in inputs.items():
            if name not in self.input_names:
                raise UnknownBlobError(
                    f"forward: '{name}' is not an input of this net; inputs are {self.input_names}")
            arr = self.xp.array(value, dtype=np.float32, order="C", copy=True)
            self._arrays[name] = arr
            self._provided.add(name)
        current = {name: tuple(self._arrays[name].shape) for name in self.input_names}
        if any(current[n] != self._shapes.get(n) for n in current):
            self._propagate(current)

    def _kept(self, extra=()):
        if self._keep_all:
            return None  # everything
        return self._keep | set(self.input_names) | set(self.graph.outputs) | set(extra)

    def run(self, inputs=None, start=None, end=None, keep=()):
        """Forward from layer `start` to layer `end` (names, inclusive); returns the blob dict.

        On the GPU the blobs stay device arrays; nothing comes back to the host here."""
        first = 0 if start is None else self._layer_index(start)
        last = len(self.nodes) - 1 if end is None else self._layer_index(end)
        if self._host:
            self._sync_host(skip={t for n in self.nodes[first:last + 1] if n.name not in self._fed_nodes
                                  for t in n.tops})
        if inputs:
            self._set_inputs(inputs)
        if first > last:
            raise GraphError(f"forward: start layer '{start}' comes after end layer '{end}'")
        missing = [t for t in self._data_inputs if t not in self._provided]
        if missing and first == 0:
            raise GraphError(
                f"forward: give the data-layer input(s) {missing} (e.g. net.forward({missing[0]}=array)); "
                f"this runtime does not read the files their layers name"
            )
        kept = self._kept(keep)
        self._freed.clear()
        xp = self.xp
        arrays = self._arrays
        given = set(inputs or ())
        hooks = bool(self._before_forward or self._after_forward)
        fused = None  # a ReLU whose work the Convolution before it did
        for i in range(first, last + 1):
            node = self.nodes[i]
            if hooks:
                self._run_hooks(self._before_forward, i)
            if node.name in self._fed_nodes:
                if node.name in self._memory and not given.intersection(node.tops):
                    self._serve_memory(node)
                if hooks:
                    self._run_hooks(self._after_forward, i)
                continue
            try:
                bottoms = [arrays[b] for b in node.bottoms]
            except KeyError as e:
                raise GraphError(
                    f"layer '{node.name}' ({node.type}): bottom blob {e} is not available: it was freed "
                    f"after its last use (keep=False) or never computed; build the Net with keep=True "
                    f"(the default) to run from a middle layer"
                ) from None
            for t in node.tops:  # the previous pass's value is not needed: let its memory go first
                if t not in node.bottoms:
                    arrays.pop(t, None)
            shapes = [tuple(b.shape) for b in bottoms]
            if shapes != node.bottom_shapes:
                node.top_shapes = [tuple(s) for s in node.layer.reshape(shapes)]
                self._check_params(node, shapes)
                node.bottom_shapes = shapes
            if i == fused:
                tops = [bottoms[0]]  # the Convolution before already applied it
            elif not hooks and i < last and xp is np and self._relu_follows(i):
                tops = node.layer.forward_relu(xp, bottoms, self._params.get(node.name, []))
                fused = i + 1
            elif node.layer.forward_in_place is not None and node.in_place == [True] and \
                    self._exclusive(node.bottoms[0], bottoms[0]):
                tops = node.layer.forward_in_place(xp, bottoms[0], self._params.get(node.name, []))
            else:
                tops = node.layer.forward(xp, bottoms, self._params.get(node.name, []))
            if len(tops) != len(node.tops):
                raise ShapeError(
                    f"layer '{node.name}' ({node.type}): forward gave {len(tops)} tops for {len(node.tops)}"
                )
            for name, arr in zip(node.tops, tops):
                if name != AUTOMATIC:
                    self._freed.discard(name)
                    arrays[name] = arr
                    self._shapes[name] = tuple(arr.shape)
            if kept is not None:
                for b in node.bottoms:
                    if self._last_use.get(b) == i and b not in kept and b not in node.tops:
                        arrays.pop(b, None)
                        self._freed.add(b)
            if hooks:
                self._run_hooks(self._after_forward, i)
        return arrays

    # -- pycaffe's forward hooks ---------------------------------------------------------
    def before_forward(self, callback):
        """pycaffe's before_forward: call `callback(i)` before layer i runs, on every forward."""
        if not callable(callback):
            raise ArgumentError(f"before_forward: expected a callable, got {type(callback).__name__}")
        self._before_forward.append(callback)

    def after_forward(self, callback):
        """pycaffe's after_forward: call `callback(i)` after layer i ran, on every forward."""
        if not callable(callback):
            raise ArgumentError(f"after_forward: expected a callable, got {type(callback).__name__}")
        self._after_forward.append(callback)

    def _run_hooks(self, callbacks, i):
        for callback in callbacks:
            callback(i)
        if self._host:  # on the GPU: what a hook wrote into net.blobs[...].data reaches the device
            self._sync_host()

    def _forward(self, start, end):
        """pycaffe's net._forward(start, end): run layers start..end (indices, inclusive) and
        return the loss, the sum of each loss-weighted top times its weight (Caffe's ForwardFromTo)."""
        count = len(self.nodes)
        for what, i in (("start", start), ("end", end)):
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < count:
                raise LayerIndexError(f"_forward: {what} {i!r} is not a layer index (0..{count - 1})")
        arrays = self.run(start=self.nodes[start].name, end=self.nodes[end].name)
        loss = 0.0
        for node in self.nodes[start:end + 1]:
            for j, top in enumerate(node.tops):
                weight = self._loss_weight(node, j)
                if weight and top in arrays:
                    loss += weight * float(backends.to_numpy(arrays[top]).sum(dtype=np.float64))
        return loss

    def _loss_weight(self, node, j):
        """Caffe's loss weight of top j of `node`: its loss_weight entry, or 1 for a loss layer's
        first top when the layer gives none, else 0."""
        weights = node.param.loss_weight
        if len(weights):
            return float(weights[j]) if j < len(weights) else 0.0
        from caffeish.ops.loss import LossLayer

        return 1.0 if j == 0 and isinstance(node.layer, LossLayer) else 0.0

    # -- MemoryData ----------------------------------------------------------------------
    def _set_input_arrays(self, data, labels):
        """pycaffe's _set_input_arrays: checks as pycaffe's (RuntimeError: InputArrayError), then
        the net's first layer, a MemoryData, serves batch_size items of them per forward."""
        if not self.nodes or self.nodes[0].type != "MemoryData":
            raise InputArrayError("set_input_arrays may only be called if the first layer is a MemoryDataLayer")
        node = self.nodes[0]
        p = node.param.memory_data_param
        for name, array, dims in (("data array", data, (p.channels, p.height, p.width)),
                                  ("labels array", labels, (1, 1, 1))):
            if not isinstance(array, np.ndarray):
                raise InputArrayError(f"{name} must be a numpy array, got {type(array).__name__}")
            if not array.flags.c_contiguous:
                raise InputArrayError(f"{name} must be C contiguous (np.ascontiguousarray)")
            if array.ndim != 4:
                raise InputArrayError(f"{name} must be 4-d, got shape {array.shape}")
            if array.dtype != np.float32:
                raise InputArrayError(f"{name} must be float32, got {array.dtype}")
            for axis, what in ((1, "number of channels"), (2, "height"), (3, "width")):
                if array.shape[axis] != dims[axis - 1]:
                    raise InputArrayError(
                        f"{name} has wrong {what}: {array.shape[axis]}, the layer '{node.name}' "
                        f"(memory_data_param) has {dims[axis - 1]}")
        if data.shape[0] != labels.shape[0]:
            raise InputArrayError(
                f"data and labels must have the same first dimension, got {data.shape[0]} and {labels.shape[0]}")
        if data.shape[0] % p.batch_size != 0:
            raise InputArrayError(
                f"first dimensions of input arrays must be a multiple of batch size ({p.batch_size}), "
                f"got {data.shape[0]}")
        node.layer.reset(data, labels)
        self._memory[node.name] = node.layer
        self._provided.update(t for t in node.tops if t != AUTOMATIC)

    def _serve_memory(self, node):
        for name, array in zip(node.tops, node.layer.next_batch()):
            if name != AUTOMATIC:
                self._arrays[name] = array if self.xp is np else self.xp.asarray(array)
                self._shapes[name] = tuple(array.shape)
                self._freed.discard(name)

    def _relu_follows(self, i):
        """Whether layer i offers forward_relu (Convolution does), has one bottom, and the next
        layer, a plain ReLU (negative_slope 0), rewrites its one top in place: the layer may then
        apply max(., 0) while its output is in cache, and the ReLU's pass is skipped.  Nothing can
        read the top in between (no hooks: checked by the caller), so every blob ends as Caffe's."""
        found = self._relu_fusion.get(i)
        if found is None:
            node = self.nodes[i]
            nxt = self.nodes[i + 1] if i + 1 < len(self.nodes) else None
            found = (getattr(node.layer, "forward_relu", None) is not None
                     and len(node.bottoms) == 1 and len(node.tops) == 1 and nxt is not None
                     and nxt.type == "ReLU" and getattr(nxt.layer, "negative_slope", None) == 0
                     and nxt.in_place == [True] and list(nxt.bottoms) == list(node.tops)
                     and nxt.name not in self._fed_nodes and node.tops[0] not in self.input_names)
            self._relu_fusion[i] = found
        return found

    def _exclusive(self, name, array):
        """True when `array` (the blob `name`) may be overwritten: its memory belongs to
        no other live blob, no parameter and no net input (inputs stay as given)."""
        # cupy's flags have no `writeable` (device arrays always are).
        if name in self.input_names or not getattr(array.flags, "writeable", True):
            return False
        root = _root(array)
        if not hasattr(root, "flags"):  # a view of raw bytes (a file buffer), not an array
            return False
        for other, a in self._arrays.items():
            if other != name and _root(a) is root:
                return False
        return not any(_root(p) is root for params in self._params.values() for p in params)

    def forward_outputs(self, inputs=None, start=None, end=None, blobs=(), host=True):
        """Run and return {blob: array} for the outputs (or the tops of layer `end`) and `blobs`.

        host: on a GPU net, copy those arrays to the host (numpy), as pycaffe's forward
        returns them; host=False leaves them on the device."""
        blobs = list(blobs or ())
        unknown = [b for b in blobs if b not in self._shapes]
        if unknown:
            raise UnknownBlobError(f"forward: unknown blob(s) {unknown}")
        arrays = self.run(inputs, start, end, keep=blobs)
        names = self.graph.outputs if end is None else [t for t in self.nodes[self._layer_index(end)].tops
                                                         if t != AUTOMATIC]
        wanted = list(names) + [b for b in blobs if b not in names]
        if host and self.xp is not np:
            return OrderedDict((n, backends.to_numpy(arrays[n])) for n in wanted)
        return OrderedDict((n, arrays[n]) for n in wanted)

    def _layer_index(self, name):
        try:
            return self._node_index[name]
        except (KeyError, TypeError):
            raise UnknownLayerError(f"no layer named {name!r} in net '{self.name}'") from None

    # -- saving ---------------------------------------------------------------------------
    def to_proto(self):
        """The NetParameter Caffe's Net::ToProto writes (every layer, splits included, phase set)."""
        from caffeish.ops.loss import LossLayer

        net = pb.NetParameter()
        net.name = self.graph.net.name
        for node in self.nodes:
            layer = net.layer.add()
            layer.CopyFrom(node.param)
            real_tops = [t for t in layer.top if t != AUTOMATIC]
            del layer.top[:]
            layer.top.extend(real_tops)
            del layer.blobs[:]
            if not layer.HasField("phase"):
                layer.phase = self.phase
            # What Caffe's layers add to their own LayerParameter when set up, which ToProto writes:
            # a loss layer's loss_weight 1, BatchNorm's lr_mult 0 for each statistic.
            if not len(layer.loss_weight) and isinstance(node.layer, LossLayer):
                layer.loss_weight.append(1.0)
            if node.type == "BatchNorm":
                while len(layer.param) < len(node.param_shapes or ()):
                    layer.param.add().lr_mult = 0
        return net

    def save(self, path):
        """Write the weights as a caffemodel (atomically), as pycaffe's net.save.

        Needs nothing but the net itself (the prototxt it was built from may be gone);
        refuses only to overwrite that prototxt while it exists."""
        path = os.fsdecode(path)
        self._sync_host()
        self._sync_python_params()
        self._refuse_source(path)
        net = self.to_proto()
        blobs = [[backends.to_numpy(a) for a in self._params.get(node.name, [])] for node in self.nodes]
        io.write_caffemodel(path, net, blobs)

    def _refuse_source(self, path):
        source = self.source
        if source and not source.startswith("<") and os.path.exists(source) and io.same_file(path, source):
            raise CaffeishError(
                f"{path}: refusing to overwrite an input file (the net's prototxt); choose another output path")

    def save_hdf5(self, path, diff=False):
        """pycaffe's save_hdf5 (Caffe's Net::ToHDF5): a group /data/<layer> for every layer, holding
        one float32 dataset per parameter blob the layer owns, named by its index ('0', '1').
        Parameters shared by name (ParamSpec.name) are written by their owner only.  diff (the
        solvers' snapshot_diff): also /diff/<layer>/<index> for every parameter.  Needs h5py;
        written atomically."""
        h5py = _h5py("save_hdf5")
        path = os.fsdecode(path)
        self._sync_host()
        self._sync_python_params()
        self._refuse_source(path)
        seen = set()
        for node in self.nodes:
            if "/" in node.name or node.name in (".", ""):
                raise UnsupportedError(
                    f"save_hdf5: layer name {node.name!r} cannot be an HDF5 group name (Caffe's ToHDF5 fails on "
                    f"it too); save a binary caffemodel with net.save")
            if node.name in seen:
                raise UnsupportedError(f"save_hdf5: two layers are named '{node.name}'; HDF5 groups need unique names")
            seen.add(node.name)
        with io.atomic_output(path) as out:
            # HDF5 reads back what it wrote: hand h5py a read-write object over the temp file's descriptor.
            with open(out.fileno(), "r+b", closefd=False) as rw, h5py.File(rw, "w") as f:
                data = f.create_group("data")
                diffs = f.create_group("diff") if diff else None
                for node in self.nodes:
                    group = data.create_group(node.name)
                    dgroup = diffs.create_group(node.name) if diff else None
                    for j, array in enumerate(self._params.get(node.name, [])):
                        if (node.name, j) not in self._sharers:
                            group.create_dataset(str(j), data=np.asarray(backends.to_numpy(array), dtype=np.float32))
                        if diff:
                            dgroup.create_dataset(str(j), data=np.asarray(
                                backends.to_numpy(self.param_diff(node.name, j)), dtype=np.float32))

    def load_hdf5(self, path):
        """pycaffe's load_hdf5 (Caffe's CopyTrainedLayersFromHDF5): for each group /data/<layer> whose
        layer this net has, dataset '<j>' goes into parameter j; the shape must be the same, a group
        may not hold more blobs than the layer has, and only a parameter shared by name may be
        absent.  Groups of other layers are ignored.  Checked in full before anything is written."""
        h5py = _h5py("load_hdf5")
        path = os.fsdecode(path)
        check_file(path)
        self._sync_host()
        self._sync_python_params()
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise FileOpenError(f"{path}: cannot read as HDF5 weights: {e}") from None
        updates = []
        with f:
            data = f.get("data")
            if not isinstance(data, h5py.Group):
                raise WeightError(f"{path}: no group 'data'; Caffe's HDF5 weights hold /data/<layer>/<index>")
            for name in data:
                if name not in self._node_index:
                    continue
                group = data[name]
                targets = self._params.get(name, [])
                if not isinstance(group, h5py.Group) or len(group) > len(targets):
                    held = len(group) if isinstance(group, h5py.Group) else "no group but"
                    raise WeightError(
                        f"{path}: layer '{name}': the file holds {held} blob(s), the net's layer has "
                        f"{len(targets)} (Caffe: Incompatible number of blobs)")
                for j, target in enumerate(targets):
                    dataset = group.get(str(j))
                    if dataset is None:
                        if (name, j) in self._sharers:
                            continue
                        raise WeightError(f"{path}: layer '{name}': blob {j} is missing (Caffe: Incompatible "
                                          f"number of blobs)")
                    if not isinstance(dataset, h5py.Dataset) or dataset.dtype.kind not in "fiu":
                        raise WeightError(f"{path}: /data/{name}/{j} is not a float or integer dataset")
                    if tuple(dataset.shape) != tuple(target.shape):
                        raise WeightError(
                            f"{path}: layer '{name}': blob {j} has shape {tuple(dataset.shape)} in the file, but "
                            f"the net expects {tuple(target.shape)}")
                    updates.append((target, np.asarray(dataset[()], dtype=np.float32)))
        for target, array in updates:
            self._write_param(target, array)

    # -- host copies (GPU nets) ----------------------------------------------------------
    def host_data(self, name):
        """Blob `name` as a numpy array.

        On the CPU the live array.  On the GPU a host copy, made on first read
        and kept until the net next runs (or reshapes, loads or saves), which
        first copies it back to the device, so writing into it (pycaffe's
        `net.blobs["data"].data[...] = image`) reaches the net, as Caffe's
        SyncedMemory does for pycaffe.  A blob the next forward recomputes is
        not copied back.
        """
        if self.xp is np:
            return self._arrays[name]
        key = ("blob", name)
        if key not in self._host:
            self._host[key] = np.array(backends.to_numpy(self._arrays[name]), dtype=np.float32, copy=True)
        return self._host[key]

    def host_param(self, layer, index):
        """Parameter blob `index` of `layer` as a numpy array (a host copy on the GPU, as host_data)."""
        arr = self._params[layer][index]
        if self.xp is np or backends.is_host(arr):  # a Python layer's parameters live on the host
            return arr
        key = ("param", layer, index)
        if key not in self._host:
            self._host[key] = np.array(backends.to_numpy(arr), dtype=np.float32, copy=True)
        return self._host[key]

    def _sync_host(self, skip=()):
        """Copy the host copies handed out back to the device (except the blobs in `skip`,
        which are about to be recomputed), then forget them."""
        if not self._host:
            return
        xp = self.xp
        for key, host in self._host.items():
            kind = key[0]
            if kind == "param":
                target = self._params[key[1]][key[2]]
            elif kind == "pdiff":
                target = self.param_diff(key[1], key[2])
            elif kind == "bdiff":
                target = self._bdiffs.get(key[1])
            else:
                if key[1] in skip and key[1] not in self.input_names:
                    continue
                target = self._arrays.get(key[1])
            if target is None or tuple(target.shape) != host.shape:
                continue  # freed or reshaped since the copy was made: the copy is stale
            if kind != "blob" or getattr(target.flags, "writeable", True):
                target[...] = xp.asarray(host)
            else:
                self._arrays[key[1]] = xp.array(host, dtype=np.float32, copy=True)
        self._host.clear()
