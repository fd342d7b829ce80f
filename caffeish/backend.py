"""Array backends: numpy on the CPU; cupy on the GPU (the GPU runtime issue).

Layers compute with the array module they are given (`xp`), so the same
forward code runs on either.  pycaffe's `set_mode_cpu()`, `set_mode_gpu()` and
`set_device()` choose the default backend of the Nets built afterwards.
"""
import warnings

import numpy as np

from caffeish.errors import UnsupportedError

_state = {"mode": "cpu", "device": 0}


def set_mode_cpu():
    _state["mode"] = "cpu"


def set_mode_gpu():
    """Ask for the GPU.  Without a usable GPU backend, warn and stay on the CPU."""
    reason = gpu_unavailable_reason()
    if reason:
        warnings.warn(f"caffeish: set_mode_gpu(): {reason}; running on the CPU (numpy)", stacklevel=2)
        _state["mode"] = "cpu"
        return
    _state["mode"] = "gpu"


def set_device(device_id):
    _state["device"] = int(device_id)


def mode():
    return _state["mode"]


def gpu_unavailable_reason():
    """None when the GPU backend can run, else why not (in words)."""
    return "the GPU backend (CuPy kernels) is not part of this version of caffeish"


def get(name=None):
    """The array module for a backend name ("numpy", "cupy") or, given None, the current mode."""
    if name is None:
        name = "cupy" if _state["mode"] == "gpu" else "numpy"
    if name in ("numpy", "cpu"):
        return np
    if name in ("cupy", "gpu"):
        reason = gpu_unavailable_reason()
        if reason:
            raise UnsupportedError(f"backend '{name}': {reason}")
    raise UnsupportedError(f"unknown backend '{name}': use 'numpy' or 'cupy'")


def to_numpy(array):
    """A numpy array for any backend's array (a no-op for numpy arrays)."""
    if isinstance(array, np.ndarray):
        return array
    get_host = getattr(array, "get", None)
    return get_host() if get_host is not None else np.asarray(array)
