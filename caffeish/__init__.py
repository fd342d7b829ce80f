"""caffeish: a Caffe-compatible toolchain and runtime in Python."""
import os as _os

# setup.py maps the top-level folders proto/, layers/, kernels/ and tools/ into
# this package.  When the package is imported straight from a source checkout
# (e.g. `python -m pytest` puts the checkout first on sys.path), find them there.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "proto")) and _os.path.isfile(
    _os.path.join(_root, "proto", "caffe_pb2.py")
):
    __path__.append(_root)  # noqa: F821 (package __path__)

from caffeish.errors import CaffeishError  # noqa: E402,F401
from caffeish.schema import TEST, TRAIN, pb  # noqa: E402,F401

__version__ = "0.1.0"

# The runtime and pycaffe's module-level functions, so that `import caffeish as caffe` works.
from caffeish import io  # noqa: E402,F401  (caffe.io: formats, Transformer, load_image)
from caffeish.backend import set_device, set_mode_cpu, set_mode_gpu  # noqa: E402,F401


def __getattr__(name):
    # caffeish.Net loads the runtime (layers, fillers) only when first used.
    if name == "Net":
        from caffeish.net import Net

        return Net
    if name in ("classify", "segment"):  # inference on images (caffeish.inference), loaded when used
        from caffeish import inference

        return getattr(inference, name)
    if name == "Layer":  # pycaffe's caffe.Layer, the base class of Python layers
        from caffeish.pycaffe import PythonLayer

        return PythonLayer
    raise AttributeError(f"module 'caffeish' has no attribute {name!r}")
