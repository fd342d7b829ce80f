"""One exception family for everything a user can get wrong.

Every message names the file, layer or blob involved and what was expected,
so that the CLI can print it as one line and exit non-zero.
"""


class CaffeishError(Exception):
    """Base class of every error caffeish raises on bad input."""


class ParseError(CaffeishError):
    """A prototxt or binary file that cannot be parsed (file:line:column in the message)."""


class ForkFieldError(ParseError):
    """A prototxt uses a field that exists only in a fork of Caffe, not in BVLC Caffe."""


class CorruptFileError(CaffeishError):
    """A truncated or corrupt binary file (caffemodel, binaryproto)."""


class UpgradeError(CaffeishError):
    """A legacy (V0/V1) net that cannot be upgraded the way Caffe would."""


class GraphError(CaffeishError):
    """A net whose wiring is invalid: missing bottom, a top produced twice, bad rules."""


class UnknownLayerTypeError(GraphError):
    """A layer type that is not a registered BVLC Caffe type."""


class ShapeError(CaffeishError):
    """Shape inference failed for a layer (bad parameters or incompatible bottoms)."""


class InputShapeRequired(ShapeError):
    """A data layer whose shape comes from a file that cannot be read here; give --input-shape."""


class MemoryCapError(ShapeError):
    """A declared blob would exceed the configured memory cap; refused before allocation."""


class WeightError(CaffeishError):
    """Weights that do not fit the net (count or shape mismatch)."""


class UnsupportedError(CaffeishError):
    """A feature that caffeish does not run, e.g. RNN/LSTM layers, HDF5Output, dynamic GPU shared memory."""


class FillerError(CaffeishError):
    """A FillerParameter that Caffe would refuse for this blob (unknown type, bad values)."""


class InputValueError(CaffeishError):
    """An input value a layer cannot use (an Embed index or a label out of range, ...)."""


# -- errors that are also the built-in exception pycaffe raises in the same place, so that
# scripts written for pycaffe (`except KeyError`, `except RuntimeError`, ...) catch them.


class UnknownLayerError(GraphError, ValueError):
    """A layer name the net does not have (pycaffe: list.index raises ValueError)."""


class UnknownBlobError(GraphError, KeyError):
    """A blob name the net does not have (pycaffe: net.blobs[name] raises KeyError)."""

    def __str__(self):  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class BlobShapeError(ShapeError, ValueError):
    """A blob shape that cannot be (negative or non-integer dimensions, too many axes, a shape
    that would change a layer's parameters)."""


class FileOpenError(CaffeishError, RuntimeError):
    """A net or weights file that cannot be opened (pycaffe: RuntimeError 'Could not open file')."""


class InputArrayError(CaffeishError, RuntimeError):
    """Arrays that set_input_arrays (MemoryData) refuses, as pycaffe's checks do (RuntimeError)."""


class ArgumentError(CaffeishError, TypeError, ValueError):
    """A bad argument to a pycaffe function (a seed that is not an unsigned 32-bit integer, ...)."""


class NCCLError(UnsupportedError, RuntimeError):
    """NCCL (multi-GPU training) is not available: caffeish is a single-process runtime."""


class MissingDependencyError(UnsupportedError, ImportError):
    """An optional Python package that a feature needs is not installed (h5py for HDF5 weights)."""


class LayerIndexError(GraphError, IndexError):
    """A layer index outside the net (pycaffe's net._forward(start, end) takes indices)."""
