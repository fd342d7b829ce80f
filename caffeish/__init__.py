"""caffeish: a Caffe-compatible toolchain and runtime in Python.

The package is laid out by stage; each stage imports only the ones before it
(README's layout section, checked by tests/test_imports.py):

    errors, values -> formats -> graph -> runtime (+ ops, kernels) -> pycaffe -> data -> apps -> tools

This module is the public face over all of them, as pycaffe's `caffe` module:
`import caffeish as caffe` gives Net, TEST/TRAIN, set_mode_cpu/gpu, Layer
and caffe.io.
"""
import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys

# Top-level folders of the repository that setup.py installs inside this package
# (its package_dir): import name under caffeish -> folder.  layers/ is `caffeish.ops`,
# because pycaffe's `caffe.layers` is NetSpec's layer factory.
FOLDERS = {"proto": "proto", "ops": "layers", "kernels": "kernels", "tools": "tools"}

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)


class _CheckoutFolders(_abc.MetaPathFinder):
    """Finds caffeish.proto/ops/kernels/tools in a source checkout, where they are top-level folders.

    Installed, they are real subpackages and this finder is not used.  Only the
    names in FOLDERS are mapped, so nothing else at the top level (tests/,
    benchmarks/) becomes importable as part of the package.
    """

    def find_spec(self, fullname, path=None, target=None):
        parent, _, leaf = fullname.rpartition(".")
        if parent != __name__ or leaf not in FOLDERS:
            return None
        folder = _os.path.join(_root, FOLDERS[leaf])
        return _util.spec_from_file_location(fullname, _os.path.join(folder, "__init__.py"),
                                             submodule_search_locations=[folder])


if not _os.path.isdir(_os.path.join(_here, "proto")) and _os.path.isfile(
    _os.path.join(_root, "proto", "caffe_pb2.py")
):
    _sys.meta_path.insert(0, _CheckoutFolders())

from caffeish.errors import CaffeishError  # noqa: E402,F401
from caffeish.formats.schema import TEST, TRAIN, pb  # noqa: E402,F401

__version__ = "0.1.0"

# The runtime and pycaffe's module-level functions, so that `import caffeish as caffe` works.
from caffeish.pycaffe import io  # noqa: E402,F401  (caffe.io: formats, Transformer, load_image)
from caffeish.runtime.backend import set_device, set_mode_cpu, set_mode_gpu  # noqa: E402,F401

# `import caffeish.io` / `from caffeish.io import read_prototxt` keep working: caffeish.io is pycaffe's caffe.io.
_sys.modules[__name__ + ".io"] = io


# pycaffe's `caffe` module names that load part of the library, resolved when first used
# so that `import caffeish` stays light: name -> (module, attribute).
_LAZY = {
    "Net": ("caffeish.runtime.net", "Net"),
    "Layer": ("caffeish.runtime.blobs", "PythonLayer"),  # caffe.Layer, the base class of Python layers
    "classify": ("caffeish.apps.inference", "classify"),
    "segment": ("caffeish.apps.inference", "segment"),
    # NetSpec: `from caffe import layers as L, params as P` (not our layer families: caffeish.ops)
    "NetSpec": ("caffeish.pycaffe.net_spec", "NetSpec"),
    "layers": ("caffeish.pycaffe.net_spec", "layers"),
    "params": ("caffeish.pycaffe.net_spec", "params"),
    "to_proto": ("caffeish.pycaffe.net_spec", "to_proto"),
    "Classifier": ("caffeish.pycaffe.classifier", "Classifier"),
    "Detector": ("caffeish.pycaffe.detector", "Detector"),
}
# pycaffe's solvers (caffeish.pycaffe.solver)
for _name in ("get_solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
              "AdamSolver"):
    _LAZY[_name] = ("caffeish.pycaffe.solver", _name)
# pycaffe's module-level functions from its `_caffe` extension (caffeish.pycaffe._caffe).
for _name in ("layer_type_list", "has_nccl", "set_random_seed", "init_log", "log", "solver_count",
              "set_solver_count", "solver_rank", "set_solver_rank", "set_multiprocess", "Timer", "NCCL"):
    _LAZY[_name] = ("caffeish.pycaffe._caffe", _name)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'caffeish' has no attribute {name!r}")
