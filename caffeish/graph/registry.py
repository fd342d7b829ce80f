"""Layer registry: Caffe type name -> layer class.

Each family module in `caffeish.ops` (the layers/ folder) decorates its classes with
`@register("TypeName")`.  `create(layer_param, phase)` instantiates the class for
a LayerParameter, or raises UnknownLayerTypeError naming the layer, the type and
the closest registered type.
"""
import difflib
import importlib

from caffeish.errors import ShapeError, UnknownLayerTypeError, UnsupportedError

_REGISTRY = {}

# Types from well-known Caffe forks, and the BVLC type that comes closest.
FORK_TYPES = {
    "BN": "BatchNorm",
    "Upsample": "Deconvolution",
    "Interp": "Deconvolution",
    "Permute": "Reshape",
    "Normalize": "MVN",
    "DenseImageData": "ImageData",
    "L1Loss": "EuclideanLoss",
    "PriorBox": "Input",
    "DetectionOutput": "ArgMax",
    "ROIPooling": "Pooling",
    "ShuffleChannel": "Reshape",
    "DepthwiseConvolution": "Convolution",
    "ConvolutionDepthwise": "Convolution",
}


def register(*type_names):
    """Class decorator: register a Layer subclass under one or more Caffe type names."""

    def deco(cls):
        for name in type_names:
            if name in _REGISTRY:
                raise RuntimeError(f"layer type {name!r} registered twice")
            _REGISTRY[name] = cls
        if not getattr(cls, "type", None):
            cls.type = type_names[0]
        return cls

    return deco


def registered_types():
    _load_families()
    return sorted(_REGISTRY)


def closest_type(type_name):
    """The registered type a user most likely meant."""
    if type_name in FORK_TYPES:
        return FORK_TYPES[type_name]
    types = registered_types()
    lower = {t.lower(): t for t in types}
    if type_name.lower() in lower:
        return lower[type_name.lower()]
    match = difflib.get_close_matches(type_name, types, n=1, cutoff=0.0)
    return match[0] if match else None


def lookup(type_name, layer_name="?"):
    _load_families()
    cls = _REGISTRY.get(type_name)
    if cls is None and not type_name:
        raise UnknownLayerTypeError(f"layer '{layer_name}' has no type (every layer needs `type: \"...\"`)")
    if cls is None:
        close = closest_type(type_name)
        msg = f"layer '{layer_name}': unknown layer type '{type_name}'"
        if type_name in FORK_TYPES:
            msg += " (a Caffe fork's type, not BVLC Caffe)"
        if close:
            msg += f"; closest supported type: '{close}'"
        raise UnknownLayerTypeError(msg)
    return cls


def create(layer_param, phase):
    """Instantiate the layer class for a LayerParameter."""
    return lookup(layer_param.type, layer_param.name)(layer_param, phase)


# The layer families (the top-level layers/ folder, installed as caffeish.ops) register
# their classes here when imported.  They run on the runtime (backends, im2col, our
# kernels), which comes after the graph, so the graph loads them by name the first time a
# type is looked up: the one import against the flow, a plug-in load (tests/test_imports.py).
FAMILIES = "caffeish.ops"


def _load_families():
    importlib.import_module(FAMILIES)


class Layer:
    """Base class of every layer.

    A layer is built from its LayerParameter and the net's phase.  Shape
    inference calls `reshape(bottom_shapes)`, which returns the top shapes.
    `param_shapes(bottom_shapes)` lists the shapes of the blobs the layer owns
    (weights, biases, statistics) in Caffe's blob order, and `macs(...)` counts
    multiply-accumulates for the summary.

    The runtime calls `reshape(bottom_shapes)` with the current shapes whenever
    they change, then `forward(xp, bottoms, blobs)`: `xp` is the array module
    (numpy, or cupy on the GPU), `bottoms` the bottom arrays in order, `blobs`
    the layer's parameter arrays (in `param_shapes` order).  It returns a list
    with one array per top (float32), never writing into its bottoms or blobs.
    `fillers()` gives the FillerParameter (or None: zeros) of each parameter
    blob, used when no weights are loaded for the layer.

    Class attributes constrain the number of bottoms and tops the way Caffe's
    ExactNum/MinNum/MaxNum checks do (None means unconstrained).
    """

    type = None
    exact_bottoms = None
    min_bottoms = None
    max_bottoms = None
    exact_tops = None
    min_tops = None
    max_tops = None
    # True for layers that produce net inputs (Input, Data, ...): no bottoms needed.
    is_data = False
    # False for layers that refuse in-place use (Reshape, Flatten, ...).
    allows_in_place = True
    # True when the top shapes depend on the bottoms' values (Filter): reshape()
    # then gives Caffe's setup-time shape and the runtime settles the real one.
    value_dependent_shape = False

    def __init__(self, param, phase):
        self.param = param
        self.name = param.name
        self.phase = phase
        # Shapes given by the user for data-layer tops (--input-shape NAME=...),
        # set by the graph before reshape() is called.
        self.input_shapes = {}

    # -- helpers for subclasses -------------------------------------------------
    def error(self, message):
        """A ShapeError naming this layer and its type."""
        return ShapeError(f"layer '{self.name}' ({self.type}): {message}")

    def check_counts(self, n_bottoms, n_tops):
        def check(n, exact, lo, hi, what):
            if exact is not None and n != exact:
                raise self.error(f"takes exactly {exact} {what} blob(s), got {n}")
            if lo is not None and n < lo:
                raise self.error(f"takes at least {lo} {what} blob(s), got {n}")
            if hi is not None and n > hi:
                raise self.error(f"takes at most {hi} {what} blob(s), got {n}")

        check(n_bottoms, self.exact_bottoms, self.min_bottoms, self.max_bottoms, "bottom")
        check(n_tops, self.exact_tops, self.min_tops, self.max_tops, "top")

    def auto_tops(self, n_tops):
        """How many anonymous tops Caffe adds to this layer given n_tops (AutoTopBlobs: loss layers
        make the tops they need but were not given)."""
        needed = max(self.min_tops or 0, self.exact_tops or 0)
        return needed - n_tops if getattr(self, "auto_top_blobs", False) and n_tops < needed else 0

    def canonical_axis(self, axis, num_axes):
        """Caffe's CanonicalAxisIndex: a in [-A, A) -> a mod A, anything else is an error."""
        if not -num_axes <= axis < num_axes:
            raise self.error(f"axis {axis} out of range for a {num_axes}-axis blob")
        return axis % num_axes

    # -- the interface ------------------------------------------------------------
    def reshape(self, bottom_shapes):
        raise NotImplementedError

    def param_shapes(self, bottom_shapes):
        return []

    def fillers(self):
        """One FillerParameter (None: zeros) per parameter blob; missing entries are zeros."""
        return []

    # Optional `forward_in_place(xp, x, blobs) -> [x]`: the forward of a one-bottom,
    # one-top layer written into its bottom.  The runtime uses it for an in-place
    # layer (top name == bottom name) only when no other blob shares that array.
    forward_in_place = None

    # Why forward is unavailable, for layers that cannot run (data readers, Python, ...).
    unsupported_reason = "its forward pass is not implemented"

    @property
    def can_forward(self):
        return type(self).forward is not Layer.forward

    def forward(self, xp, bottoms, blobs):
        raise UnsupportedError(f"layer '{self.name}' ({self.type}): cannot run: {self.unsupported_reason}")

    # -- backward (caffeish.runtime.backward runs it; ../shared/caffe/training.md sections 9-10) ---------
    # Set by the Net before a forward: True when this layer's backward will run after it.  A layer
    # that needs state from its forward (Dropout's mask, BatchNorm's normalised input, Scale's copy
    # of an in-place input) keeps it only then, so inference pays nothing for it.
    needs_backward = False

    def allow_force_backward(self, bottom_index):
        """Caffe's AllowForceBackward: whether force_backward may make this bottom need a diff
        (loss layers refuse their labels)."""
        return True

    @property
    def can_backward(self):
        return type(self).backward is not Layer.backward

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """Caffe's Backward_cpu/gpu.

        top_diffs: one array per top (never None; a top nobody wrote holds zeros, a loss-weighted one
        its seed).  tops/bottoms: the data arrays; for an in-place layer (top j named as bottom j) both
        are the blob's current value, the same object (`bottoms[j] is tops[j]`), which is what Caffe's
        in-place layers read.  blobs: the parameter arrays.  propagate_down: one bool per bottom.
        param_diffs: one entry per parameter blob, an array of the parameter's shape to add its
        gradient into (+=, in place; Caffe's param diffs accumulate), or None when it is not wanted.

        Returns one entry per bottom: its diff (a fresh array, or a view of a top diff where Caffe shares
        the memory), or None where it is not computed.  Never writes into top_diffs, tops or bottoms.
        """
        raise UnsupportedError(f"layer '{self.name}' ({self.type}) does not backpropagate (Caffe: Backward "
                               f"is not implemented for this layer type)")

    def macs(self, bottom_shapes, top_shapes):
        return 0
