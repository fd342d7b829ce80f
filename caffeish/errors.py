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
