"""Array backends: numpy on the CPU; cupy on the GPU with our CUDA kernels (caffeish.kernels).

Layers compute with the array module they are given (`xp`), so the same
forward code runs on either.  pycaffe's `set_mode_cpu()`, `set_mode_gpu()` and
`set_device()` choose the default backend of the Nets built afterwards.
Convolution, Deconvolution, Pooling, Crop, LRN and Softmax (SoftmaxWithLoss and
InfogainLoss through it) ask `kernels_for(xp)` for our CUDA kernels and use them
when there are some (cupy, and the CPU "harness" and "strict" backends that test
them); every other layer is written with `xp` array operations, which must be
ones CuPy has: the "strict" backend (caffeish.kernels.strict) refuses the
numpy-only ones.
"""
import ctypes
import os
import sys
import warnings

import numpy as np

from caffeish.errors import UnsupportedError

_state = {"mode": "cpu", "device": 0, "allocator_tuned": False}

# glibc mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def tune_allocator():
    """Keep freed blob memory in the process instead of handing it back to the OS.

    A forward pass allocates each top afresh and frees blobs after their last
    use.  glibc serves big blocks with mmap and returns them on free, so every
    new blob pays page faults on first touch: on a 2-core VM, `x * x` on a
    (10, 96, 55, 55) array took 38 ms that way and 4 ms from reused memory, and
    AlexNet's forward ran 15-20% faster with reuse.  This raises glibc's mmap
    and trim thresholds once per process (Linux with glibc only).  The peak
    memory is unchanged (it is set by the blobs alive at once); memory freed
    after the peak stays with the process for the next forward.  Threads
    (caffeish.runtime.parallel's pool, the web app's tasks) allocate from the
    main arena too: glibc would give each its own, whose freed memory no other
    thread reuses (AlexNet's forward peaked 41 MiB higher so) and whose heaps
    stop at 64 MiB (big blobs mapped and page-faulted afresh).  Set
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
    ok = mallopt(_M_ARENA_MAX, 1) == 1 and ok
    return ok


def set_mode_cpu():
    _state["mode"] = "cpu"


def set_mode_gpu():
    """pycaffe's set_mode_gpu(): later Nets run on the GPU (CuPy and our CUDA kernels).

    pycaffe scripts call it unconditionally, so without a usable GPU it warns
    and stays on the CPU; `Net(device="cuda")` and `--gpu` are errors instead.
    """
    reason = gpu_unavailable_reason()
    if reason:
        warnings.warn(f"caffeish: set_mode_gpu(): {reason}; running on the CPU (numpy)", stacklevel=2)
        _state["mode"] = "cpu"
        return
    _state["mode"] = "gpu"


def set_device(device_id):
    """pycaffe's set_device(i): the GPU that later GPU Nets use."""
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


def _import_cupy():
    """cupy, or (None, why not).  Only called when a GPU is asked for: `import caffeish` never imports it."""
    try:
        import cupy
    except ImportError as exc:
        return None, f"CuPy is not installed ({exc}); install the GPU extra: pip install 'caffeish[gpu]'"
    except Exception as exc:  # a broken CUDA installation can fail at import
        return None, f"CuPy could not be imported: {type(exc).__name__}: {exc}"
    return cupy, None


def gpu_unavailable_reason():
    """None when the GPU backend can run, else why not (in words)."""
    cupy, reason = _import_cupy()
    if cupy is None:
        return reason
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, no device
        return f"no usable CUDA GPU ({type(exc).__name__}: {exc})"
    if count == 0:
        return "no CUDA GPU is present"
    if not 0 <= _state["device"] < count:
        return f"GPU {_state['device']} does not exist: this machine has {count} (0 to {count - 1})"
    return None


def get(name=None):
    """The array module for a backend name ("numpy", "cupy", "harness", "strict") or, given None, the current mode.

    "cupy" selects the GPU set by set_device() (or Net(device="cuda:N")) and
    binds our CUDA kernels to it.  "harness" is numpy with the GPU code path:
    the layers call our CUDA kernels compiled for the CPU (caffeish.kernels.harness;
    needs a C++ compiler, slow, for testing the GPU runtime without a GPU).
    "strict" is the harness with an array module that refuses what CuPy refuses
    (caffeish.kernels.strict: ufunc where=, functions and arguments CuPy lacks,
    host arrays mixed with device ones, object arrays), so that the tests catch
    numpy-only calls on the GPU path; its arrays come back to the host with
    to_numpy(), as CuPy's do.
    """
    if name is None:
        name = "cupy" if _state["mode"] == "gpu" else "numpy"
    if name in ("numpy", "cpu"):
        return np
    if name in ("cupy", "gpu"):
        reason = gpu_unavailable_reason()
        if reason:
            raise UnsupportedError(f"cannot run on the GPU: {reason}")
        import cupy

        cupy.cuda.Device(_state["device"]).use()
        from caffeish.kernels import gpu_kernels

        _kernel_sets[id(cupy)] = gpu_kernels()
        return cupy
    if name == "harness":
        from caffeish.kernels import harness

        _kernel_sets[id(harness.XP)] = harness.kernels()
        return harness.XP
    if name == "strict":
        from caffeish.kernels import strict

        _kernel_sets[id(strict.XP)] = strict.kernels()
        return strict.XP
    raise UnsupportedError(f"unknown backend '{name}': use 'numpy' or 'cupy'")


# id(array module) -> caffeish.kernels.launch.Kernels, for the modules whose layers use our kernels.
_kernel_sets = {}


def kernels_for(xp):
    """Our CUDA kernels bound to the array module `xp`, or None (numpy: the layers' own code)."""
    if xp is np:
        return None
    return _kernel_sets.get(id(xp))


def is_host(array):
    """Whether `array` is a host (numpy) array.  CuPy's arrays are not, and neither are the strict
    backend's: a numpy subclass standing for device arrays, so `isinstance(a, np.ndarray)` cannot
    tell host from device (it is true for them); their `.get()` copies them to the host."""
    return isinstance(array, np.ndarray) and not callable(getattr(array, "get", None))


def to_numpy(array):
    """A numpy array for any backend's array (a no-op for host arrays; cupy's and the strict
    backend's device arrays are copied with .get())."""
    if is_host(array):
        return array
    get_host = getattr(array, "get", None)
    return get_host() if get_host is not None else np.asarray(array)
