"""caffeish: a Caffe-compatible toolchain and runtime in Python."""
from caffeish.errors import CaffeishError  # noqa: F401
from caffeish.schema import TEST, TRAIN, pb  # noqa: F401

__version__ = "0.1.0"
