"""Our CUDA kernels (the GPU runtime) and how they are loaded.

kernels/*.cu are plain CUDA C++ (no headers) with extern "C" __global__
kernels: conv.cu (im2col, col2im, bias, direct grouped convolution and
deconvolution visiting only the taps that land on each output; the backward of
Convolution, Deconvolution and Im2col is made of them too), pooling.cu (MAX with
mask, AVE, STOCHASTIC at TEST, and the MAX and AVE backward gathers), crop.cu
(N-D crop and its backward) and norm.cu (LRN in both regions and Softmax, one
fused kernel each).  caffeish.kernels.launch drives them; on the GPU each file
becomes one `cupy.RawModule`, compiled by NVRTC the first time a kernel of it is needed
and kept for the process (CuPy also caches the binary on disk).  In the tests
the same files run on the CPU through caffeish.kernels.harness.

Importing this package does not import CuPy.
"""
import os

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = ("conv", "pooling", "crop", "norm")
# NVRTC options: C++14 is enough for the kernels.
NVRTC_OPTIONS = ("--std=c++14",)

_gpu_kernels = None


def source_path(name):
    """kernels/<name>.cu (installed as package data of caffeish.kernels)."""
    return os.path.join(HERE, f"{name}.cu")


def read_source(name):
    with open(source_path(name)) as f:
        return f.read()


def raw_module(name):
    """kernels/<name>.cu as a cupy.RawModule (compiled lazily by CuPy, on first use)."""
    import cupy

    return cupy.RawModule(code=read_source(name), options=NVRTC_OPTIONS)


def default_col_budget(free_bytes):
    """The im2col column budget (floats) on a GPU with `free_bytes` free: 2 GiB, at most 1/8 of what is free.

    2 GiB holds one 698x698 FCN-8s image's conv1_2 columns (576 x 487204 floats), so the
    biggest VGG layers need one matmul per image and no band copies.
    """
    return max(1 << 20, min(1 << 29, free_bytes // 32))


def gpu_kernels():
    """The launchers on CuPy (one set per process; call after the device is chosen)."""
    global _gpu_kernels
    if _gpu_kernels is None:
        import cupy

        from caffeish.kernels.launch import Kernels

        free, _ = cupy.cuda.runtime.memGetInfo()
        _gpu_kernels = Kernels(cupy, raw_module, default_col_budget(free))
    return _gpu_kernels
