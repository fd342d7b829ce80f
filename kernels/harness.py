"""Run our CUDA kernels on the CPU: the test harness for kernels/*.cu.

Each `.cu` file compiles unchanged with the host C++ compiler (g++, or $CXX)
after a small shim header (harness_shim.h: __global__, threadIdx, blockIdx,
blockDim, gridDim, __shared__, __syncthreads) into a shared library, loaded
with ctypes.  harness_runner.cpp executes a launch: every block in turn, and
within a block every thread, as fibers that meet at each __syncthreads when
the kernel's body calls it (see the comments there).

`HarnessModule(name)` has the face of `cupy.RawModule`: `get_function(kernel)`
returns a callable `(grid, block, args)`, taking numpy arrays where CuPy takes
device arrays.  It checks each argument against the kernel's C signature
(pointers: C-contiguous numpy arrays of the pointed-to type; int: numpy.int32;
float: numpy.float32; long long: numpy.int64), so a launcher that would pass a
Python int or a strided view to the GPU fails here.  `kernels()` gives the
launchers (caffeish.kernels.launch.Kernels) on numpy with these modules, and
`XP` is numpy under another name, the array module of the "harness" backend:
`Net(..., backend="harness")` runs the GPU code path of the layers on the CPU.

Libraries are cached in the temp folder by a hash of the sources and the
compiler command, so each is compiled once (about a second) per machine.
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import types

import numpy as np

from caffeish import kernels as kernel_package
from caffeish.errors import UnsupportedError

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM = os.path.join(HERE, "harness_shim.h")
RUNNER = os.path.join(HERE, "harness_runner.cpp")
CXX_FLAGS = ("-std=c++17", "-O1", "-shared", "-fPIC", "-w")

_SIGNATURE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{')
_ERRORS = {
    1: "divergent __syncthreads: some threads of a block finished while others waited at a barrier",
    2: "__syncthreads was called from a kernel whose body does not call it (the harness ran it without fibers)",
    3: "bad launch configuration (a block needs 1 to 1024 threads, a grid at least 1 block per axis)",
}
_SCALARS = {"int": (ctypes.c_int32, np.int32), "float": (ctypes.c_float, np.float32),
            "long long": (ctypes.c_int64, np.int64), "unsigned int": (ctypes.c_uint32, np.uint32)}
_POINTEES = {"float": np.float32, "int": np.int32}
_lock = threading.Lock()
_modules = {}
_kernels = None


class HarnessError(UnsupportedError):
    """The harness cannot build or run a kernel."""


def source_path(name):
    """kernels/<name>.cu, or `name` itself when it is a path to a .cu file (the harness's own tests)."""
    return os.path.abspath(name) if name.endswith(".cu") else kernel_package.source_path(name)


def parse_kernels(source):
    """[(name, [(C type, parameter name), ...], calls __syncthreads)] for each extern "C" __global__ kernel."""
    found = []
    for m in _SIGNATURE.finditer(source):
        params = []
        for part in m.group(2).split(","):
            part = " ".join(part.replace("__restrict__", " ").split())
            if not part:
                continue
            ctype, _, pname = part.rpartition(" ")
            if "*" in pname:
                ctype, pname = ctype + "*" * pname.count("*"), pname.strip("*")
            params.append((" ".join(ctype.replace("*", " * ").split()).replace(" *", "*"), pname))
        depth, i = 1, m.end()
        while depth and i < len(source):
            depth += {"{": 1, "}": -1}.get(source[i], 0)
            i += 1
        found.append((m.group(1), params, "__syncthreads" in source[m.end():i]))
    return found


def _wrappers(cu_path, kernels):
    """C++ for one .cu: the source, then per kernel a body taking args as void** and a launch entry."""
    lines = [f'#include "{cu_path}"',
             'extern "C" int harness_launch(void (*)(void**), void**, unsigned, unsigned, unsigned,',
             '                              unsigned, unsigned, unsigned, int);']
    for name, params, barrier in kernels:
        call = ", ".join(f"*({ctype}*)a[{i}]" for i, (ctype, _) in enumerate(params))
        lines += [f"static void body_{name}(void** a) {{ {name}({call}); }}",
                  f'extern "C" int launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
                  f'unsigned by, unsigned bz, void** a) {{',
                  f"    return harness_launch(body_{name}, a, gx, gy, gz, bx, by, bz, {int(barrier)});", "}"]
    return "\n".join(lines) + "\n"


def compiler():
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise HarnessError(f"the kernel harness needs a C++ compiler: '{cxx}' was not found (set CXX)")
    return cxx


def build(name):
    """Compile kernels/<name>.cu for the CPU (cached); returns (library path, parsed kernels)."""
    cu = source_path(name)
    with open(cu) as f:
        source = f.read()
    kernels = parse_kernels(source)
    cxx = compiler()
    generated = _wrappers(cu, kernels)
    key = hashlib.sha256()
    for part in (source, generated, open(SHIM).read(), open(RUNNER).read(), cxx, " ".join(CXX_FLAGS)):
        key.update(part.encode())
    cache = os.path.join(tempfile.gettempdir(), f"caffeish-harness-{getattr(os, 'getuid', lambda: 0)()}")
    os.makedirs(cache, exist_ok=True)
    stem = os.path.splitext(os.path.basename(cu))[0]
    lib = os.path.join(cache, f"{stem}-{key.hexdigest()[:16]}.so")
    if not os.path.exists(lib):
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            gen = os.path.join(tmp, f"{stem}_harness.cpp")
            with open(gen, "w") as f:
                f.write(generated)
            out = os.path.join(tmp, "lib.so")
            cmd = [cxx, *CXX_FLAGS, "-include", SHIM, "-I", HERE, gen, RUNNER, "-o", out]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise HarnessError(f"compiling {cu} for the CPU harness failed:\n{proc.stderr.strip()}")
            os.replace(out, lib)
    return lib, kernels


class HarnessFunction:
    """One kernel: call it as CuPy's RawKernel, function(grid, block, args)."""

    def __init__(self, lib, name, params, barrier):
        self.name = name
        self.params = params
        self.uses_barrier = barrier
        self._entry = getattr(lib, f"launch_{name}")
        self._entry.restype = ctypes.c_int
        self._entry.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_void_p]

    def _convert(self, i, ctype, value):
        pname = self.params[i][1]
        where = f"kernel {self.name}, argument {i} ({ctype} {pname})"
        if ctype.endswith("*"):
            pointee = _POINTEES[ctype.replace("const ", "").rstrip("*").strip()]
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{where}: expected an array, got {type(value).__name__}")
            value = np.ndarray.view(value, np.ndarray)  # the strict backend's arrays hide flags and ctypes
            if value.dtype != pointee or not value.flags.c_contiguous:
                raise TypeError(f"{where}: expected a C-contiguous {np.dtype(pointee)} array, got "
                                f"{value.dtype} contiguous={value.flags.c_contiguous}")
            if not ctype.startswith("const") and not value.flags.writeable:
                raise TypeError(f"{where}: the array is read-only")
            return ctypes.c_void_p(value.ctypes.data)
        c_type, np_type = _SCALARS[ctype.replace("const ", "")]
        if type(value) is not np_type:
            raise TypeError(f"{where}: expected numpy.{np.dtype(np_type).name}, got {type(value).__name__}")
        return c_type(value)

    def __call__(self, grid, block, args, shared_mem=0):
        if shared_mem:
            raise HarnessError(f"kernel {self.name}: dynamic shared memory is not emulated (our kernels "
                               "declare __shared__ arrays statically)")
        if len(args) != len(self.params):
            raise TypeError(f"kernel {self.name} takes {len(self.params)} arguments, got {len(args)}")
        values = [self._convert(i, ctype, v) for i, ((ctype, _), v) in enumerate(zip(self.params, args))]
        argv = (ctypes.c_void_p * max(1, len(values)))(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        g = tuple(grid) + (1,) * (3 - len(grid))
        b = tuple(block) + (1,) * (3 - len(block))
        with _lock:
            rc = self._entry(*g, *b, argv)
        if rc:
            raise HarnessError(f"kernel {self.name} grid {g} block {b}: {_ERRORS.get(rc, f'error {rc}')}")


class HarnessModule:
    """kernels/<name>.cu (or a .cu path) compiled for the CPU, with cupy.RawModule's get_function()."""

    def __init__(self, name):
        path, kernels = build(name)
        self.name = name
        self._lib = ctypes.CDLL(path)
        self._kernels = {k[0]: k for k in kernels}

    def get_function(self, name):
        try:
            _, params, barrier = self._kernels[name]
        except KeyError:
            raise HarnessError(f"kernels/{self.name}.cu has no extern \"C\" __global__ kernel '{name}'") from None
        return HarnessFunction(self._lib, name, params, barrier)


def module(name):
    """The harness module of kernels/<name>.cu, built once per process."""
    mod = _modules.get(name)
    if mod is None:
        mod = _modules[name] = HarnessModule(name)
    return mod


class _NumpyAlias(types.ModuleType):
    """numpy under another identity, so that the layers take their GPU branch with numpy arrays."""

    def __getattr__(self, name):
        return getattr(np, name)


XP = _NumpyAlias("caffeish.kernels.harness.XP", "numpy, as the harness backend's array module")


def kernels(col_budget=1 << 20):
    """The launchers on numpy with the harness modules (one set per process)."""
    global _kernels
    from caffeish.kernels.launch import Kernels

    if _kernels is None:
        _kernels = Kernels(XP, module, col_budget)
    return _kernels
