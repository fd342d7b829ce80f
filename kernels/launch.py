"""Launchers for our CUDA kernels (kernels/*.cu): shapes in, arrays out.

`Kernels(xp, load_module)` binds the kernels to an array module and a module
loader: on the GPU, cupy and `cupy.RawModule` (caffeish.kernels.gpu_kernels);
in the tests, numpy and the CPU harness (caffeish.kernels.harness), whose
modules have the same `get_function(name)(grid, block, args)` face.  So the
code below, argument marshalling and launch sizes included, is what runs on the
device and what CI runs on the CPU.

Output sizes and crop offsets come from caffeish.graph.geometry (the layer's
geometry objects and `conv_output_shape`/`deconv_output_shape`); the launchers
only turn them into grid sizes.  Scalars are passed as numpy int32/float32,
exactly the C types of the kernel signatures (the harness checks this), and
every array a kernel reads or writes is C-contiguous float32.

Which parts are ours: im2col, col2im, the direct (tiled) convolution, the bias
add, pooling and crop are our kernels; the dense matrix products of the
convolution (im2col columns times the weights) and deconvolution (weights
times the input) are `xp.matmul`: cuBLAS SGEMM on the GPU (CuPy leaves TF32 off
unless CUPY_TF32=1), BLAS in the harness.
"""
import math

import numpy as np

from caffeish.errors import UnsupportedError
from caffeish.graph.geometry import conv_output_shape, deconv_output_shape, effective_kernel

F32 = np.float32
I32 = np.int32
INT_MAX = 2 ** 31 - 1

# Threads per block of the one-thread-per-element kernels, and the most blocks of
# a grid-stride launch (an H200 runs 132 SMs x 2048 threads = 1056 such blocks at once).
BLOCK = 256
MAX_BLOCKS = 16384
# conv.cu's CONV_TILE and CONV_MAX_PATCH.
CONV_TILE = 16
CONV_MAX_PATCH = 4096
# Direct (tiled) kernels instead of GEMMs for grouped layers with at most this many
# input and output channels per group (a GEMM per group would be tiny).
DIRECT_MAX_CHANNELS = 4
# crop.cu: outer axes after merging; runs at least this long get a block per row.
CROP_MAX_OUTER = 5
CROP_ROW_MIN = 32

MAX_POOL, AVE_POOL, STOCHASTIC_POOL = 0, 1, 2  # PoolingParameter.PoolMethod


def grid_for(total, block=BLOCK):
    """Blocks for a grid-stride loop over `total` items: enough to cover them, at most MAX_BLOCKS."""
    return max(1, min(-(-total // block), MAX_BLOCKS))


def _i32(*values):
    return tuple(I32(v) for v in values)


class Kernels:
    """Our kernels on one array module.

    xp: numpy or cupy; load_module(name) -> an object with get_function(kernel
    name) for kernels/<name>.cu.  col_budget: the most floats of an im2col or
    deconvolution column buffer; bigger work is done in chunks of images (and of
    output rows, for one huge image).
    """

    def __init__(self, xp, load_module, col_budget=1 << 27):
        self.xp = xp
        self._load_module = load_module
        self._modules = {}
        self._functions = {}
        self.col_budget = int(col_budget)

    # -- plumbing -----------------------------------------------------------------------
    def function(self, module, name):
        key = (module, name)
        fn = self._functions.get(key)
        if fn is None:
            mod = self._modules.get(module)
            if mod is None:
                mod = self._modules[module] = self._load_module(module)
            fn = self._functions[key] = mod.get_function(name)
        return fn

    def launch(self, module, name, grid, block, args):
        self.function(module, name)(tuple(grid), tuple(block), tuple(args))

    def _input(self, a):
        """a as a C-contiguous float32 array of this backend (no copy when it already is one)."""
        a = self.xp.ascontiguousarray(a, dtype=F32)
        if a.size > INT_MAX:
            raise UnsupportedError(
                f"an array of {a.size} elements (shape {tuple(a.shape)}) is too big for the GPU kernels, "
                f"which index with 32-bit integers; use a smaller batch")
        return a

    def _empty(self, shape):
        size = math.prod(shape)
        if size > INT_MAX:
            raise UnsupportedError(
                f"a result of {size} elements (shape {tuple(shape)}) is too big for the GPU kernels, "
                f"which index with 32-bit integers; use a smaller batch")
        return self.xp.empty(tuple(shape), dtype=F32)

    def add_bias(self, y, bias):
        """y (N, C, ...) += bias[c], in place."""
        n, c = y.shape[:2]
        positions = math.prod(y.shape[2:])
        total = y.size
        if total:
            self.launch("conv", "add_bias", (grid_for(total),), (BLOCK,),
                        (y, self._input(bias)) + _i32(total, c, positions))
        return y

    # -- convolution ------------------------------------------------------------------------
    def conv_method(self, c, o, group, geom):
        """"direct" for grouped layers with few channels per group whose input patch fits the
        kernel's shared memory, else "gemm" (im2col + matmul, or a plain matmul for 1x1)."""
        cg, og = c // group, o // group
        if group > 1 and cg <= DIRECT_MAX_CHANNELS and og <= DIRECT_MAX_CHANNELS \
                and self._patch(geom) is not None:
            return "direct"
        return "gemm"

    @staticmethod
    def _patch(geom):
        """The (h, w) input patch a CONV_TILE x CONV_TILE output tile reads, or None if too big."""
        ph, pw = ((CONV_TILE - 1) * s + effective_kernel(k, d)
                  for k, s, d in zip(geom.kernel, geom.stride, geom.dilation))
        return (ph, pw) if ph * pw <= CONV_MAX_PATCH else None

    def conv2d(self, x, weight, bias, geom, group, method="auto"):
        """Caffe's convolution of x (N, C, H, W) with weight (O, C/group, KH, KW) -> (N, O, OH, OW)."""
        n, c, h, w = x.shape
        o = weight.shape[0]
        oh, ow = conv_output_shape((h, w), geom)
        y = self._empty((n, o, oh, ow))
        if y.size == 0:
            return y
        x, weight = self._input(x), self._input(weight)
        if c == 0:
            y.fill(0)
        else:
            if method == "auto":
                method = self.conv_method(c, o, group, geom)
            if method == "direct":
                return self._conv_direct(x, weight, bias, geom, group, y)
            if method != "gemm":
                raise ValueError(f"unknown convolution method {method!r}")
            self._conv_gemm(x, weight, geom, group, y)
        if bias is not None:
            self.add_bias(y, bias)
        return y

    def _conv_direct(self, x, weight, bias, geom, group, y):
        n, c, h, w = x.shape
        _, o, oh, ow = y.shape
        patch = self._patch(geom)
        if patch is None:
            raise ValueError(f"the input patch of a {CONV_TILE}x{CONV_TILE} tile does not fit: {geom}")
        tiles = -(-oh // CONV_TILE) * -(-ow // CONV_TILE)
        grid = (min(tiles, MAX_BLOCKS), min(n * o, 65535))
        has_bias = bias is not None
        args = (x, weight, self._input(bias) if has_bias else weight, y) + _i32(
            n, c, h, w, o, group, oh, ow, *geom.kernel, *geom.stride, *geom.pad, *geom.dilation,
            *patch, has_bias)
        self.launch("conv", "conv_direct", grid, (CONV_TILE, CONV_TILE), args)
        return y

    def _conv_gemm(self, x, weight, geom, group, y):
        """y = W @ columns, per group: a plain matmul for 1x1 kernels without stride or pad,
        else im2col (ours) then matmul, chunk by chunk within col_budget."""
        xp = self.xp
        n, c, h, w = x.shape
        _, o, oh, ow = y.shape
        g = group
        cg, og = c // g, o // g
        kh, kw = geom.kernel
        taps = kh * kw
        wmat = weight.reshape(g, og, cg * taps)
        positions = oh * ow
        if taps == 1 and tuple(geom.stride) == (1, 1) and tuple(geom.pad) == (0, 0):
            xp.matmul(wmat, x.reshape(n, g, cg, h * w), out=y.reshape(n, g, og, positions))
            return
        per_image = c * taps * positions
        if per_image <= self.col_budget:
            m = min(n, max(1, self.col_budget // per_image))
            col = xp.empty(m * per_image, dtype=F32)
            for n0 in range(0, n, m):
                n1 = min(n, n0 + m)
                chunk = col[:(n1 - n0) * per_image]
                self._im2col(x[n0:n1], chunk, geom, ow, 0, oh)
                xp.matmul(wmat, chunk.reshape(n1 - n0, g, cg * taps, positions),
                          out=y[n0:n1].reshape(n1 - n0, g, og, positions))
            return
        # One image's columns exceed the budget: bands of output rows, each written into place.
        rows = max(1, self.col_budget // (c * taps * ow))
        col = xp.empty(c * taps * rows * ow, dtype=F32)
        for i in range(n):
            for r0 in range(0, oh, rows):
                r1 = min(oh, r0 + rows)
                chunk = col[:c * taps * (r1 - r0) * ow]
                self._im2col(x[i:i + 1], chunk, geom, ow, r0, r1 - r0)
                band = xp.matmul(wmat, chunk.reshape(g, cg * taps, (r1 - r0) * ow))
                y[i, :, r0:r1, :] = band.reshape(o, r1 - r0, ow)

    def _im2col(self, x, col, geom, out_w, row0, rows):
        m, c, h, w = x.shape
        total = m * c * rows * out_w
        self.launch("conv", "im2col", (grid_for(total),), (BLOCK,),
                    (x, col) + _i32(m, c, h, w, *geom.kernel, *geom.stride, *geom.pad, *geom.dilation,
                                    out_w, row0, rows))

    def im2col(self, x, geom):
        """Caffe's im2col of x (N, C, H, W): (N, C*KH*KW, OH, OW) (the Im2col layer)."""
        n, c, h, w = x.shape
        oh, ow = conv_output_shape((h, w), geom)
        cols = self._empty((n, c * geom.kernel[0] * geom.kernel[1], oh, ow))
        if cols.size:
            self._im2col(self._input(x), cols, geom, ow, 0, oh)
        return cols

    # -- deconvolution ----------------------------------------------------------------------
    def deconv2d(self, x, weight, bias, geom, group, method="auto"):
        """Caffe's deconvolution of x (N, C, H, W) with weight (C, O/group, KH, KW) -> (N, O, OH, OW).

        "gemm": columns = W^T x per image (matmul), then col2im (ours) gathers each output
        from its taps in Caffe's order and adds the bias; no atomics.  "direct": one kernel
        gathering straight from x, for grouped layers with few channels per group.
        """
        xp = self.xp
        n, c, ih, iw = x.shape
        og = weight.shape[1]
        o = og * group
        oh, ow = deconv_output_shape((ih, iw), geom)
        y = self._empty((n, o, oh, ow))
        if y.size == 0:
            return y
        x, weight = self._input(x), self._input(weight)
        has_bias = bias is not None
        bias = self._input(bias) if has_bias else weight
        if method == "auto":
            method = "direct" if group > 1 and c // group <= DIRECT_MAX_CHANNELS \
                and og <= DIRECT_MAX_CHANNELS else "gemm"
        geo = _i32(*geom.kernel, *geom.stride, *geom.pad, *geom.dilation, has_bias)
        if method == "direct" or c * ih * iw == 0:
            total = y.size
            self.launch("conv", "deconv_direct", (grid_for(total),), (BLOCK,),
                        (x, weight, bias, y) + _i32(n, c, ih, iw, o, group, oh, ow) + geo)
            return y
        if method != "gemm":
            raise ValueError(f"unknown deconvolution method {method!r}")
        g, cg = group, c // group
        taps = geom.kernel[0] * geom.kernel[1]
        positions = ih * iw
        wt = xp.ascontiguousarray(weight.reshape(g, cg, og * taps).transpose(0, 2, 1))
        per_image = o * taps * positions
        m = min(n, max(1, self.col_budget // per_image))
        col = xp.empty(m * per_image, dtype=F32)
        for n0 in range(0, n, m):
            n1 = min(n, n0 + m)
            chunk = col[:(n1 - n0) * per_image]
            xp.matmul(wt, x[n0:n1].reshape(n1 - n0, g, cg, positions),
                      out=chunk.reshape(n1 - n0, g, og * taps, positions))
            part = y[n0:n1]
            total = part.size
            self.launch("conv", "col2im", (grid_for(total),), (BLOCK,),
                        (chunk, bias, part) + _i32(n1 - n0, o, oh, ow, ih, iw) + geo)
        return y

    # -- pooling ------------------------------------------------------------------------------
    def pool(self, x, geom, method, want_mask=False):
        """Pool x (N, C, H, W) with a caffeish.graph.geometry.PoolGeometry; returns (top, mask or None)."""
        n, c, h, w = x.shape
        oh, ow = geom.out
        y = self._empty((n, c, oh, ow))
        mask = self._empty((n, c, oh, ow)) if want_mask else None
        total = y.size
        if total == 0:
            return y, mask
        x = self._input(x)
        sizes = _i32(n * c, h, w, oh, ow, *geom.kernel, *geom.stride)
        grid, block = (grid_for(total),), (BLOCK,)
        if method == MAX_POOL:
            self.launch("pooling", "max_pool", grid, block,
                        (x, y, mask if want_mask else y) + sizes + _i32(*geom.pad, want_mask))
        elif method == AVE_POOL:
            self.launch("pooling", "ave_pool", grid, block, (x, y) + sizes + _i32(*geom.pad))
        elif method == STOCHASTIC_POOL:
            if any(geom.pad):
                raise UnsupportedError("STOCHASTIC pooling takes no padding")
            self.launch("pooling", "stochastic_pool_test", grid, block, (x, y) + sizes)
        else:
            raise UnsupportedError(f"unknown pooling method {method}")
        return y, mask

    # -- crop ------------------------------------------------------------------------------------
    def crop(self, x, offsets, top_shape):
        """Caffe's Crop: top[idx] = x[idx + offsets], offsets and top shape from
        caffeish.graph.geometry.crop_offsets (one entry per axis)."""
        y = self._empty(top_shape)
        if y.size == 0:
            return y
        x = self._input(x)
        base, outer, run = crop_plan(x.shape, offsets, top_shape)
        if len(outer) > CROP_MAX_OUTER:  # more interleaved cropped axes than crop.cu takes
            y[...] = x[tuple(slice(o, o + t) for o, t in zip(offsets, top_shape))]
            return y
        outer = [(1, 0)] * (CROP_MAX_OUTER - len(outer)) + outer
        rows = math.prod(t for t, _ in outer)
        dims = _i32(rows, run, *(t for t, _ in outer[1:]), *(s for _, s in outer))
        src = x.reshape(-1)[base:]
        if run >= CROP_ROW_MIN:
            block = min(BLOCK, -(-run // 32) * 32)
            self.launch("crop", "crop_rows", (min(rows, MAX_BLOCKS * 4),), (block,), (src, y) + dims)
        else:
            self.launch("crop", "crop_flat", (grid_for(y.size),), (BLOCK,), (src, y) + dims)
        return y


def crop_plan(data_shape, offsets, top_shape):
    """(base, outer, run) for crop.cu: the element where the top starts in the data, the outer
    axes as (top size, data stride) pairs, and the length of the contiguous innermost run.

    An axis merges into its inner neighbour when that neighbour is copied whole (the
    top takes all of it), and an outer axis of top size 1 only adds its offset.
    """
    strides = [1] * len(data_shape)
    for i in range(len(data_shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * data_shape[i + 1]
    base = sum(o * s for o, s in zip(offsets, strides))
    if not data_shape:
        return base, [], 1
    # [top size, data size, stride] from the innermost axis out
    merged = [[top_shape[-1], data_shape[-1], strides[-1]]]
    for t, d, s in zip(reversed(top_shape[:-1]), reversed(data_shape[:-1]), reversed(strides[:-1])):
        it, idata, istride = merged[0]
        if it == idata and s == idata * istride:
            merged[0] = [t * it, d * idata, istride]
        elif t == 1:
            continue
        else:
            merged.insert(0, [t, d, s])
    run = merged[-1][0]
    return base, [(t, s) for t, _, s in merged[:-1]], run
