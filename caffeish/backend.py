"""Array backends: numpy on the CPU; cupy on the GPU (the GPU runtime issue).

Layers compute with the array module they are given (`xp`), so the same
forward code runs on either.  pycaffe's `set_mode_cpu()`, `set_mode_gpu()` and
`set_device()` choose the default backend of the Nets built afterwards.
"""
import ctypes
import os
import sys
import warnings

import numpy as np

from caffeish.errors import UnsupportedError

_state = {"mode": "cpu", "device": 0, "allocator_tuned": False}

# glibc mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_allocator():
    """Keep freed blob memory in the process instead of handing it back to the OS.

    A forward pass allocates each top afresh and frees blobs after their last
    use.  glibc serves big blocks with mmap and returns them on free, so every
    new blob pays page faults on first touch: on a 2-core VM, `x * x` on a
    (10, 96, 55, 55) array took 38 ms that way and 4 ms from reused memory, and
    AlexNet's forward ran 15-20% faster with reuse.  This raises glibc's mmap
    and trim thresholds once per process (Linux with glibc only).  The peak
    memory is unchanged (it is set by the blobs alive at once); memory freed
    after the peak stays with the process for the next forward.  Set
    CAFFEISH_MALLOC_TUNING=0 to leave the allocator alone.
    """
    if _state["allocator_tuned"] or os.environ.get("CAFFEISH_MALLOC_TUNING", "1") == "0":
        return False
    _state["allocator_tuned"] = True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, ...): nothing to tune
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1 and ok
    return ok


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


def for_device(device):
    """The backend name for a device string: "cpu" -> numpy; "cuda" or "cuda:N" -> cupy on GPU N."""
    text = str(device).strip().lower()
    if text == "cpu":
        return "numpy"
    kind, _, index = text.partition(":")
    if kind in ("cuda", "gpu") and (index == "" or index.isdigit()):
        if index:
            set_device(int(index))
        return "cupy"
    raise UnsupportedError(f"unknown device '{device}': use 'cpu', 'cuda' or 'cuda:N'")


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
