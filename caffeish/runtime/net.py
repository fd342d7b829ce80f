"""The Net runtime: allocate blobs, bind weights, run forward layer by layer.

`Net(prototxt, weights=None, phase=TEST)` builds the graph (caffeish.graph.graph),
binds stored weights by layer name (caffeish.graph.weights; layers missing from the
weights get their fillers), and runs each layer's `forward(xp, bottoms, blobs)`
on a backend (caffeish.runtime.backend: numpy, or cupy for the GPU).

Blobs are names bound to arrays.  A layer returns fresh arrays (or views of its
bottoms where Caffe shares data) and never writes into its inputs, so in-place
layers simply rebind their top name, and the tops of a Split all name the same
array, which is Caffe's semantics without copies.  By default an intermediate
blob is dropped as soon as no later layer reads it, so peak memory is about the
largest few live blobs, not the sum of all; `keep=True` (or a list of names)
retains them for inspection.  Inputs and outputs are always kept.

The pycaffe-compatible face (`net.blobs`, `net.params`, `net.layers`, ...) is
in caffeish.runtime.blobs and is mixed into this class.
"""
from collections import OrderedDict

import numpy as np

from caffeish.runtime import backend as backends
from caffeish.runtime import fillers
from caffeish.formats import io
from caffeish.errors import CaffeishError, GraphError, ShapeError, UnsupportedError
from caffeish.graph.graph import AUTOMATIC, Graph, phase_value
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
    net = io.read_net(str(network))
    return net, str(network)


def _root(array):
    """The array that owns the memory of `array` (numpy and cupy keep one level of base)."""
    return array if array.base is None else array.base


class Net(PycaffeNetMixin):
    """A runnable Caffe net.

    network: prototxt path (or a NetParameter).  weights: caffemodel path(s)
    (or None: every parameter comes from its filler).  phase: TEST or TRAIN.
    keep: False (free intermediates), True (keep every blob) or a list of names.
    input_shapes: {input blob: shape} overriding the prototxt's shapes.
    backend: "numpy", "cupy" or None (caffeish.set_mode_cpu/gpu decides).
    device: "cpu", "cuda" or "cuda:N" (overrides backend; N selects the GPU).
    seed: the fillers' random seed, so that an unweighted net is reproducible.

    pycaffe's positional forms work too: Net(proto, TEST), Net(proto, weights,
    TEST), Net(proto, TEST, weights=...), Net(network_file=..., phase=...).
    """

    def __init__(self, network=None, *args, weights=None, phase=None, level=0, stages=(), keep=False,
                 input_shapes=None, backend=None, seed=0, max_blob_bytes=None, network_file=None,
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
        self.graph = Graph(net, self.phase, level, stages, input_shapes, max_blob_bytes)
        self.name = self.graph.name
        if device is not None:
            backend = backends.for_device(device)
        self.xp = backends.get(backend)
        backends.tune_allocator()
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
        self._keep_all = keep is True
        self._keep = set() if keep in (True, False, None) else set(keep)
        unknown = self._keep - set(self.graph.blob_shapes)
        if unknown:
            raise GraphError(f"keep names unknown blob(s) {sorted(unknown)}")
        self.rng = np.random.default_rng(seed)
        for node in self.nodes:  # random layers (DummyData fillers, Dropout at TRAIN) draw from the Net's seed
            if hasattr(node.layer, "rng"):
                node.layer.rng = self.rng
        self._params = OrderedDict()  # layer name -> [array, ...]
        paths = [weights] if isinstance(weights, (str, bytes)) or hasattr(weights, "__fspath__") else list(weights or [])
        self.missing_weights, self.unused_weights = [], []
        binding = self._bind(paths[0]) if paths else None
        self._init_params(binding.arrays if binding else None)
        self._shapes = dict(self.graph.blob_shapes)
        self._arrays = {}
        self._freed = set()  # blobs dropped after their last use in the latest forward
        self._node_index = {n.name: i for i, n in enumerate(self.nodes)}
        self._last_use = self._compute_last_use()
        self._alloc_inputs()
        for path in paths[1:]:
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
        owners = {}  # param name -> (array, layer name)
        for node in self.nodes:
            if not node.param_shapes:
                continue
            specs = node.layer.fillers()
            stored = loaded.get(node.name)
            arrays = []
            for i, shape in enumerate(node.param_shapes):
                spec_name = node.param.param[i].name if i < len(node.param.param) else ""
                if spec_name and spec_name in owners:
                    arr = self._shared(node, i, shape, spec_name, owners[spec_name])
                    if stored is not None:
                        arr[...] = self.xp.asarray(stored[i]).reshape(arr.shape)
                    arrays.append(arr)
                    continue
                if stored is not None:
                    arr = self._own(stored[i])
                else:
                    filler = specs[i] if i < len(specs) else None
                    arr = self.xp.asarray(fillers.fill(filler, shape, self.rng, what=f"layer '{node.name}' blob {i}"))
                arrays.append(arr)
                if spec_name:
                    owners[spec_name] = (arr, node.name)
            self._params[node.name] = arrays

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
        arr, owner_layer = owner
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
        """Load a caffemodel into the matching layers (by name), as Caffe's CopyTrainedLayersFrom."""
        self._sync_host()
        binding = self._bind(path)
        for name, arrays in binding.arrays.items():
            targets = self._params.get(name)
            if targets is None:
                continue
            for target, arr in zip(targets, arrays):
                target[...] = self.xp.asarray(arr)
        return binding

    def param_arrays(self, layer):
        """The parameter arrays of a layer (the live ones: writing them changes the net)."""
        return self._params[layer]

    # -- shapes --------------------------------------------------------------------------
    def reshape(self, **shapes):
        """Propagate new input shapes (net.reshape(data=(1,3,H,W))), or the current inputs' shapes."""
        self._sync_host()
        for name, shape in shapes.items():
            if name not in self.input_names:
                raise GraphError(f"reshape: '{name}' is not an input of this net; inputs are {self.input_names}")
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
        if not node.param_shapes:
            return
        now = [tuple(int(d) for d in s) for s in node.layer.param_shapes(bottom_shapes)]
        if now != node.param_shapes:
            raise ShapeError(
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
                raise GraphError(f"forward: '{name}' is not an input of this net; inputs are {self.input_names}")
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
        for i in range(first, last + 1):
            node = self.nodes[i]
            if node.name in self._fed_nodes:
                continue
            try:
                bottoms = [arrays[b] for b in node.bottoms]
            except KeyError as e:
                raise GraphError(
                    f"layer '{node.name}' ({node.type}): bottom blob {e} is not available: it was freed "
                    f"after its last use or never computed; build the Net with keep=True to run from "
                    f"a middle layer"
                ) from None
            shapes = [tuple(b.shape) for b in bottoms]
            if shapes != node.bottom_shapes:
                node.top_shapes = [tuple(s) for s in node.layer.reshape(shapes)]
                self._check_params(node, shapes)
                node.bottom_shapes = shapes
            if node.layer.forward_in_place is not None and node.in_place == [True] and \
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
        return arrays

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
            raise GraphError(f"forward: unknown blob(s) {unknown}")
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
        except KeyError:
            raise GraphError(f"no layer named '{name}' in net '{self.name}'") from None

    # -- saving ---------------------------------------------------------------------------
    def to_proto(self):
        """The NetParameter Caffe's Net::ToProto writes (every layer, splits included, phase set)."""
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
        return net

    def save(self, path):
        """Write the weights as a caffemodel (atomically), as pycaffe's net.save."""
        self._sync_host()
        net = self.to_proto()
        blobs = [[backends.to_numpy(a) for a in self._params.get(node.name, [])] for node in self.nodes]
        inputs = [self.source] if self.source and not self.source.startswith("<") else []
        io.write_caffemodel(str(path), net, blobs, inputs=inputs)

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
        if self.xp is np:
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
            if key[0] == "param":
                target = self._params[key[1]][key[2]]
            else:
                if key[1] in skip and key[1] not in self.input_names:
                    continue
                target = self._arrays.get(key[1])
            if target is None or tuple(target.shape) != host.shape:
                continue  # freed or reshaped since the copy was made: the copy is stale
            if key[0] == "param" or getattr(target.flags, "writeable", True):
                target[...] = xp.asarray(host)
            else:
                self._arrays[key[1]] = xp.array(host, dtype=np.float32, copy=True)
        self._host.clear()
