"""The BLAS under numpy, called directly where Caffe's numbers depend on it.

Caffe's CPU layers call OpenBLAS (cblas_saxpy, cblas_sgemm) and libm's pow.
numpy exposes neither a fused multiply-add nor a GEMM that accumulates into
its output (beta = 1), and its float32 power is a vectorised approximation.
Where Caffe's rounding decides what later layers see (a ReLU gate at 4e-6 in a
GoogLeNet, ../shared/golden_train), we call the same routines Caffe calls:

* `axpy(a, x, y)` and `axpby(a, x, b, y)`: y += a * x with cblas_saxpy (and
  y = a * x + b * y with cblas_saxpby, the solvers' calls) from the OpenBLAS that numpy
  itself links (its wheels bundle one, the symbols prefixed `scipy_` and
  suffixed `64_`).  Without such a library (another BLAS), numpy's y += a * x
  (one rounding more).
* `powx(xp, a, b)`: Caffe's caffe_powx, i.e. pow evaluated in double and
  rounded to float (what the reference build computed: bit-equal on the
  goldens, where numpy's float32 power is not).

Nothing here is needed for correctness beyond Caffe's last bit; the fallbacks
are within float32 rounding of it.
"""
import ctypes
import glob
import os
import threading

import numpy as np

_lib = None
_searched = False


def _library():
    """(ctypes library, symbol prefix, suffix, int type) of numpy's OpenBLAS, or None."""
    global _lib, _searched
    if _searched:
        return _lib
    _searched = True
    if os.environ.get("CAFFEISH_NO_BLAS"):
        return None
    here = os.path.dirname(np.__file__)
    candidates = sorted(glob.glob(os.path.join(here, "..", "numpy.libs", "lib*openblas*.so*")))
    candidates += sorted(glob.glob(os.path.join(here, ".dylibs", "lib*openblas*.dylib")))
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix, int_type in (("scipy_", "64_", ctypes.c_int64), ("", "64_", ctypes.c_int64),
                                         ("scipy_", "", ctypes.c_int), ("", "", ctypes.c_int)):
            try:
                getattr(lib, f"{prefix}cblas_saxpy{suffix}")
            except AttributeError:
                continue
            _lib = (lib, prefix, suffix, int_type)
            return _lib
    return None


_functions = {}
INT = object()  # stands for the library's integer type in an argument list


def _function(name, argtypes):
    """cblas_NAME from numpy's OpenBLAS with these argument types (INT: its int, 32 or 64 bits), or
    False when there is no such library or function."""
    if name not in _functions:
        found = _library()
        f = False
        if found is not None:
            lib, prefix, suffix, int_type = found
            try:
                f = getattr(lib, f"{prefix}cblas_{name}{suffix}")
            except AttributeError:
                f = False
            else:
                f.argtypes = [int_type if t is INT else t for t in argtypes]
                f.restype = None
        _functions[name] = f
    return _functions[name]


def _saxpy_function():
    return _function("saxpy", [INT, ctypes.c_float, ctypes.c_void_p, INT, ctypes.c_void_p, INT])


def _saxpby_function():
    return _function("saxpby", [INT, ctypes.c_float, ctypes.c_void_p, INT, ctypes.c_float, ctypes.c_void_p, INT])


def _sgemm_function():
    return _function("sgemm", [ctypes.c_int, ctypes.c_int, ctypes.c_int, INT, INT, INT, ctypes.c_float,
                               ctypes.c_void_p, INT, ctypes.c_void_p, INT, ctypes.c_float, ctypes.c_void_p, INT])


def axpy(a, x, y):
    """y += a * x (float32, C-contiguous numpy arrays of one size) as Caffe's caffe_axpy."""
    f = _saxpy_function()
    if f and x.flags.c_contiguous and y.flags.c_contiguous and x.dtype == y.dtype == np.float32:
        f(x.size, float(a), x.ctypes.data, 1, y.ctypes.data, 1)
    else:
        y += np.float32(a) * x


def axpby(a, x, b, y):
    """y = a * x + b * y in one pass (float32 numpy arrays of one size), as Caffe's caffe_cpu_axpby
    (cblas_saxpby: the solvers' momentum and running averages)."""
    f = _saxpby_function()
    if f and x.flags.c_contiguous and y.flags.c_contiguous and x.dtype == y.dtype == np.float32:
        f(x.size, float(a), x.ctypes.data, 1, float(b), y.ctypes.data, 1)
    else:
        y *= np.float32(b)
        y += np.float32(a) * x


def _gemm_ready(*arrays):
    return all(isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 2 and a.flags.c_contiguous
               for a in arrays)


def gemm_nt_add(a, b, c):
    """c += a @ b.T for float32 C-contiguous 2-D numpy arrays, in place, without a temporary of c's
    size (Caffe's weight gradients: caffe_cpu_gemm(NoTrans, Trans, ..., beta = 1)).  Returns False
    (and does nothing) where OpenBLAS is not reachable or the arrays do not fit; the caller then
    uses numpy."""
    return _gemm_add(a, b, c, trans_a=False)


def gemm_tn_add(a, b, c):
    """c += a.T @ b for float32 C-contiguous 2-D numpy arrays a (k, m), b (k, n), c (m, n), in place
    (InnerProduct's weight gradients: Caffe's caffe_cpu_gemm(Trans, NoTrans, ..., beta = 1)).
    False (and nothing done) as gemm_nt_add."""
    return _gemm_add(a, b, c, trans_a=True)


def _gemm_add(a, b, c, trans_a):
    """c += a @ b.T (trans_a false) or a.T @ b (trans_a true) by row-major cblas_sgemm, beta = 1."""
    f = _sgemm_function()
    if not f or not _gemm_ready(a, b, c) or not c.flags.writeable:
        return False
    (k, m), n = (a.shape, b.shape[1]) if trans_a else (a.shape[::-1], b.shape[0])
    if (b.shape[0] if trans_a else b.shape[1]) != k or c.shape != (m, n):
        return False
    if m and n:
        f(101, 112 if trans_a else 111, 111 if trans_a else 112, m, n, k, 1.0, a.ctypes.data,
          max(a.shape[1], 1), b.ctypes.data, max(b.shape[1], 1), 1.0, c.ctypes.data, max(n, 1))
    return True


def sgemm_raw(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc):
    """C = A @ B + beta * C on raw float32 pointers, row-major, OpenBLAS's cblas_sgemm (alpha 1).

    A is (m, k) (stored (k, m) when `trans_a`), B (k, n) (stored (n, k) when `trans_b`);
    lda, ldb, ldc are row strides in elements, so any submatrix of a C-contiguous array
    with unit column stride is a valid operand.  The caller checks bounds and keeps the
    arrays alive.  Returns False (and does nothing) where OpenBLAS is not reachable.
    """
    f = _sgemm_function()
    if not f:
        return False
    if m and n:
        f(101, 112 if trans_a else 111, 112 if trans_b else 111, m, n, k, 1.0, a, max(lda, 1), b,
          max(ldb, 1), float(beta), c, max(ldc, 1))
    return True


def have_sgemm():
    return bool(_sgemm_function())


# OpenBLAS's worker threads spin for 2**SPIN_EXPONENT cycles after each call before they sleep
# (its default, 2**28, is about 0.1 s).  While they spin they hold a core that caffeish's own
# threads (caffeish.runtime.parallel: copies, transforms, pooling between the GEMMs) need: on 2
# cores FCN-8s's forward took 2238 ms so and 1732 ms with 2**18 (benchmarks/cpu_forward.py).
SPIN_EXPONENT = 18
_threads = {"tuned": False}
_threads_lock = threading.Lock()


def tune_threads():
    """Make OpenBLAS's idle worker threads sleep after ~0.1 ms instead of spinning ~0.1 s.

    Done once per process, from the main thread (the workers are restarted: nothing else
    may be inside OpenBLAS then), through OpenBLAS's own entry points: openblas_read_env
    re-reads OPENBLAS_THREAD_TIMEOUT, blas_thread_shutdown_ and blas_thread_init restart the
    workers with it.  Left alone where the user set OPENBLAS_THREAD_TIMEOUT, with
    CAFFEISH_BLAS_TUNING=0, and without numpy's OpenBLAS.  Returns whether it changed it."""
    with _threads_lock:
        if _threads["tuned"] or threading.current_thread() is not threading.main_thread():
            return False
        _threads["tuned"] = True
        if os.environ.get("CAFFEISH_BLAS_TUNING", "1") == "0" or "OPENBLAS_THREAD_TIMEOUT" in os.environ:
            return False
        found = _library()
        if found is None:
            return False
        lib = found[0]
        try:
            read_env, shutdown, init = lib.openblas_read_env, lib.blas_thread_shutdown_, lib.blas_thread_init
        except AttributeError:
            return False
        for f in (read_env, shutdown, init):
            f.argtypes = []
            f.restype = ctypes.c_int if f is not read_env else None
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(SPIN_EXPONENT)
        try:
            read_env()
        finally:
            del os.environ["OPENBLAS_THREAD_TIMEOUT"]  # read; children keep their own default
        shutdown()
        init()
        return True


def powx(xp, a, b, out=None):
    """Caffe's caffe_powx: a ** b for float32 `a`, evaluated in double and rounded to float32."""
    if xp is not np:
        return xp.power(a, xp.float32(b), out=out)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf and NaN as Caffe's
        result = np.power(a, float(b), dtype=np.float64)
    if out is None:
        return result.astype(np.result_type(a.dtype, np.float32))
    out[...] = result
    return out
