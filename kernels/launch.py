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
add, pooling, crop, LRN and Softmax are our kernels; the dense matrix products of the
convolution (im2col columns times the weights) and deconvolution (weights
times the input) are `xp.matmul`: cuBLAS SGEMM on the GPU (CuPy leaves TF32 off
unless CUPY_TF32=1), BLAS in the harness.

The backward (gradients, training.md 10.1, 10.2, 10.8) reuses them: Convolution's
input gradient is a deconvolution of the top gradient, Deconvolution's a
convolution; the weight gradients are im2col + matmul; the Im2col layer's is
col2im; Pooling and Crop have gather kernels of their own (pooling.cu, crop.cu).
Every input gradient is a gather (each element written once, no atomics), so it
is deterministic; parameter gradients are added into the arrays given.
"""
import functools
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
# crop.cu: outer axes after merging (crop_rows copies each row; the threads per row follow its length).
CROP_MAX_OUTER = 5

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

    # -- LRN and Softmax (norm.cu) ----------------------------------------------------------
    # lrn_across: a thread walks `chunk` channels of one (n, h, w) column; chunks are as
    # short as leaves about LRN_THREADS threads per launch (an H200 holds 132 x 2048).
    LRN_THREADS = 1 << 18
    # softmax_rows (a block per row) from this many channels when the rows are not
    # contiguous-enough score maps (inner below SOFTMAX_MIN_INNER) or are few; else
    # softmax_columns (a thread per row).
    SOFTMAX_ROWS_MIN_CHANNELS = 64
    SOFTMAX_MIN_INNER = 32
    SOFTMAX_FEW_ROWS = 2048
    SOFTMAX_BLOCK = 256  # norm.cu's SOFTMAX_BLOCK

    def lrn(self, x, local_size, alpha, beta, k, within_channel, chunk=None):
        """Caffe's LRN of x (N, C, H, W), one launch: ACROSS_CHANNELS, or WITHIN_CHANNEL (k unused).

        The float32 constants are the numpy path's (caffeish.ops.norm): alpha/n rounded
        to float32, the n*n divisor.  ACROSS runs Caffe's CPU running sum and pow in double
        (bit-equal to the numpy path); WITHIN takes beta 0.75, 0.5 and 1 through square roots."""
        n, c, h, w = x.shape
        y = self._empty(x.shape)
        if y.size == 0:
            return y
        x = self._input(x)
        mode = {0.75: 1, 0.5: 2, 1.0: 3}.get(float(beta), 0)
        if within_channel:
            self.launch("norm", "lrn_within", (grid_for(y.size),), (BLOCK,),
                        (x, y) + _i32(n * c, h, w, local_size)
                        + (F32(local_size * local_size), F32(alpha), F32(beta), I32(mode)))
            return y
        if chunk is None:
            chunk = -(-y.size // self.LRN_THREADS)
        chunk = max(1, min(int(chunk), c))
        total = n * -(-c // chunk) * h * w
        self.launch("norm", "lrn_across", (grid_for(total),), (BLOCK,),
                    (x, y) + _i32(n, c, h * w, local_size, chunk)
                    + (F32(F32(alpha) / F32(local_size)), F32(k), F32(beta), I32(mode)))
        return y

    def softmax(self, x, axis, method="auto"):
        """Caffe's Softmax of x along `axis` (canonical), one launch: "rows" (a block per
        row, reductions in shared memory) or "columns" (a thread per row); "auto" picks."""
        shape = tuple(x.shape)
        y = self._empty(shape)
        if y.size == 0:
            return y
        x = self._input(x)
        outer, channels, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
        rows = outer * inner
        if method == "auto":
            method = "rows" if channels >= self.SOFTMAX_ROWS_MIN_CHANNELS and (
                inner < self.SOFTMAX_MIN_INNER or rows < self.SOFTMAX_FEW_ROWS) else "columns"
        if method == "rows":
            block = 32
            while block < self.SOFTMAX_BLOCK and block * 4 < channels:
                block *= 2
            self.launch("norm", "softmax_rows", (min(rows, MAX_BLOCKS * 4),), (block,),
                        (x, y) + _i32(rows, channels, inner))
        elif method == "columns":
            self.launch("norm", "softmax_columns", (grid_for(rows),), (BLOCK,),
                        (x, y) + _i32(outer, channels, inner))
        else:
            raise ValueError(f"unknown softmax method {method!r}")
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

    def _im2col(self, x, col, geom, out_w, row0, rows, side_by_side=False):
        """Columns of x's output rows [row0, row0 + rows) into col: Caffe's layout (image after
        image), or with side_by_side the images next to each other in every row, (C*KH*KW, m, rows*OW)."""
        m, c, h, w = x.shape
        positions = rows * out_w
        total = m * c * positions
        strides = (positions, m * positions) if side_by_side else \
            (c * geom.kernel[0] * geom.kernel[1] * positions, positions)
        self.launch("conv", "im2col", (grid_for(total),), (BLOCK,),
                    (x, col) + _i32(m, c, h, w, *geom.kernel, *geom.stride, *geom.pad, *geom.dilation,
                                    out_w, row0, rows, *strides))

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
        gathering straight from x, for grouped layers with few channels per group.  Both
        visit only the taps that land on each output (conv.cu's deconv_taps), on the grid
        of `deconv_grid`.
        """
        return self._deconv(x, weight, bias, geom, group, deconv_output_shape(x.shape[2:], geom), method)

    def _deconv(self, x, weight, bias, geom, group, out, method):
        """deconv2d into an output of `out` (OH, OW) positions: the deconvolution's own, or (the
        convolution's input gradient) the convolution's input size, which its truncating size
        formula may make larger: the gathers find the taps of any output position."""
        xp = self.xp
        n, c, ih, iw = x.shape
        og = weight.shape[1]
        o = og * group
        oh, ow = out
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
            self.launch("conv", "deconv_direct", self.deconv_grid(oh * ow, o, n), (BLOCK,),
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
            self.launch("conv", "col2im", self.deconv_grid(oh * ow, o, n1 - n0), (BLOCK,),
                        (chunk, bias, part) + _i32(n1 - n0, o, oh, ow, ih, iw) + geo)
        return y

    # Blocks wanted for a Deconvolution kernel: several waves of resident blocks (an H200
    # holds at most 1056 blocks of 256 threads), so that the last, partial wave costs little.
    DECONV_BLOCKS = 8192

    def deconv_grid(self, positions, channels, images):
        """The (x, y, z) grid of conv.cu's col2im and deconv_direct: x covers the output positions
        (h, w) as for any grid-stride loop; y, then z, split the channels and the images until
        about DECONV_BLOCKS blocks (each axis at most MAX_BLOCKS).  A thread finds the taps of its
        position once and reuses them for every channel and image it strides over."""
        gx = grid_for(positions)
        cap = min(MAX_BLOCKS, 65535)
        gy = max(1, min(channels, -(-self.DECONV_BLOCKS // gx), cap))
        gz = max(1, min(images, -(-self.DECONV_BLOCKS // (gx * gy)), cap))
        return gx, gy, gz

    # -- pooling ------------------------------------------------------------------------------
    def pool(self, x, geom, method, want_mask=False):
        """Pool x (N, C, H, W) with a caffeish.graph.geometry.PoolGeometry; returns (top, mask or None).

        The mask is computed and written only when asked for (a Pooling layer with a second
        top).  2x2 windows of stride 2 without padding on an even width take pooling.cu's
        vector kernels (float4 loads where W % 4 == 0 and the arrays are aligned, else
        float2); everything else the general ones."""
        n, c, h, w = x.shape
        oh, ow = geom.out
        y = self._empty((n, c, oh, ow))
        mask = self._empty((n, c, oh, ow)) if want_mask else None
        total = y.size
        if total == 0:
            return y, mask
        x = self._input(x)
        if method == STOCHASTIC_POOL:
            if any(geom.pad):
                raise UnsupportedError("STOCHASTIC pooling takes no padding")
            self.launch("pooling", "stochastic_pool_test", (grid_for(total),), (BLOCK,),
                        (x, y) + _i32(n * c, h, w, oh, ow, *geom.kernel, *geom.stride))
            return y, mask
        if method not in (MAX_POOL, AVE_POOL):
            raise UnsupportedError(f"unknown pooling method {method}")
        vec = _pool_2x2_vector(x, y, mask, geom, w)
        name, grid, args = _pool_launch(tuple(x.shape), tuple(geom.kernel), tuple(geom.stride), tuple(geom.pad),
                                        tuple(geom.out), method, bool(want_mask), vec)
        arrays = (x, y, mask if want_mask else y) if method == MAX_POOL else (x, y)
        self.launch("pooling", name, grid, (BLOCK,), arrays + args)
        return y, mask

    # -- crop ------------------------------------------------------------------------------------
    def crop(self, x, offsets, top_shape):
        """Caffe's Crop: top[idx] = x[idx + offsets], offsets and top shape from
        caffeish.graph.geometry.crop_offsets (one entry per axis).

        Row copies (crop_plan): float4 loads and stores (crop_rows4) when the runs are a
        multiple of 4 floats, every data stride too and both arrays 16-byte aligned (the
        data rows may start off a 16-byte boundary: the kernel funnels), else floats
        (crop_rows, packing short runs several to a warp)."""
        y = self._empty(top_shape)
        if y.size == 0:
            return y
        x = self._input(x)
        aligned = _address(x) % 16 == 0 and _address(y) % 16 == 0
        plan = _crop_launch(tuple(x.shape), tuple(offsets), tuple(top_shape), aligned, CROP_PART_STEPS)
        if plan is None:  # more interleaved cropped axes than crop.cu takes
            y[...] = x[tuple(slice(o, o + t) for o, t in zip(offsets, top_shape))]
            return y
        name, grid, args = plan
        self.launch("crop", name, grid, (BLOCK,), (x, y) + args)
        return y

    # -- backward ------------------------------------------------------------------------------
    # Caffe's Backward (training.md 10.1, 10.2, 10.8).  Input gradients are fresh arrays, every
    # element written once by a gather (no atomics: deterministic); parameter gradients are ADDED
    # into the arrays given (Caffe's param diffs accumulate).

    def conv2d_backward(self, x, weight, dy, geom, group, want_dx, dweight, dbias, method="auto"):
        """The gradients of conv2d(x, weight, bias, geom, group) for the top gradient dy (N, O, OH, OW).

        Adds db[o] = sum dy[:, o] into dbias and dW[o, c, q] = sum over n, p of dy[n, o, p] *
        x[n, g*Cg + c, p*s - pad + q*dil] into dweight (each when not None); returns dx (N, C, H, W)
        when want_dx, else None.  dW: im2col of x with the images side by side and one matmul per
        chunk of images (bounded by col_budget); dx = col2im(W^T dy): the deconvolution of dy with
        the same weight blob into the input's size (padding taps dropped, untouched pixels 0),
        through deconv2d's matmul + col2im gather or its direct gather (`method`; "auto" picks as
        deconv2d does, and the direct gather when one image's columns exceed col_budget)."""
        n, c, h, w = x.shape
        o = weight.shape[0]
        oh, ow = conv_output_shape((h, w), geom)
        _check_shape("the top gradient", dy.shape, (n, o, oh, ow))
        dy = self._input(dy)
        if dbias is not None and dy.size:
            dbias += dy.sum(axis=(0, 2, 3), dtype=F32)
        if dweight is not None and dy.size and x.size:
            self._weight_grad(dy, self._input(x), geom, group, dweight)
        if not want_dx:
            return None
        if dy.size == 0 or x.size == 0:
            return self.xp.zeros((n, c, h, w), dtype=F32)
        if method == "auto" and c * geom.kernel[0] * geom.kernel[1] * oh * ow > self.col_budget:
            method = "direct"
        return self._deconv(dy, weight, None, geom, group, (h, w), method)

    def deconv2d_backward(self, x, weight, dy, geom, group, want_dx, dweight, dbias, method="auto"):
        """The gradients of deconv2d(x, weight, bias, geom, group), weight (C, O/group, KH, KW), for
        the top gradient dy (N, O, OH, OW).

        Adds db[o] = sum dy[:, o] and dW[c, o, q] = sum over n, i of x[n, c, i] *
        dy[n, g*Og + o, i*s - pad + q*dil] (dy read as 0 outside the top): im2col of dy with the
        images side by side, one matmul per chunk; returns dx = conv2d(dy, weight) (no bias) when
        want_dx (`method` as conv2d's), else None."""
        n, c, ih, iw = x.shape
        o = weight.shape[1] * group
        oh, ow = deconv_output_shape((ih, iw), geom)
        _check_shape("the top gradient", dy.shape, (n, o, oh, ow))
        dy = self._input(dy)
        if dbias is not None and dy.size:
            dbias += dy.sum(axis=(0, 2, 3), dtype=F32)
        if dweight is not None and dy.size and x.size:
            self._weight_grad(self._input(x), dy, geom, group, dweight)
        if not want_dx:
            return None
        if dy.size == 0 or x.size == 0:
            return self.xp.zeros((n, c, ih, iw), dtype=F32)
        return self.conv2d(dy, weight, None, geom, group, method)

    def _weight_grad(self, a, src, geom, group, dweight):
        """dweight (R, S/group, KH, KW) += per group, the sum over images n of
        a[n, g] (R/group, P) @ columns(src[n], geom)[g] (S/group*KH*KW, P)^T, where the columns
        (im2col) of src (N, S, H, W) have the P = OH*OW positions of a (N, R, OH, OW).

        Several images per matmul: their columns side by side in every row (im2col's
        side_by_side layout, (S*KH*KW, m, P)) and a copy of their `a` laid out (group, m*P, R/group),
        both within col_budget; an image whose columns exceed it goes in bands of output rows.
        The matmul is columns (group, K, L) @ a^T (group, L, R/group): both operands C-contiguous,
        as CuPy's batched matmul wants them (it copies any other operand whole), and the small
        (group, K, R/group) product is transposed into dweight."""
        xp = self.xp
        n, rr, oh, ow = a.shape
        s = src.shape[1]
        if conv_output_shape(src.shape[2:], geom) != (oh, ow):
            raise ValueError(f"im2col of {tuple(src.shape)} with {geom} does not give {oh}x{ow} positions")
        g = group
        r, k = rr // g, (s // g) * geom.kernel[0] * geom.kernel[1]
        col_rows = s * geom.kernel[0] * geom.kernel[1]
        positions = oh * ow

        def product(chunk, at, cols):
            part = xp.matmul(chunk.reshape(g, k, cols), at.reshape(g, cols, r))  # (g, K, R/g)
            return part.transpose(0, 2, 1).reshape(dweight.shape)

        per_image = max(col_rows, rr) * positions
        if per_image <= self.col_budget:
            m = min(n, max(1, self.col_budget // per_image))
            col = xp.empty(m * col_rows * positions, dtype=F32)
            for n0 in range(0, n, m):
                n1 = min(n, n0 + m)
                chunk = col[:(n1 - n0) * col_rows * positions]
                self._im2col(src[n0:n1], chunk, geom, ow, 0, oh, side_by_side=True)
                at = xp.ascontiguousarray(a[n0:n1].reshape(n1 - n0, g, r, positions).transpose(1, 0, 3, 2))
                dweight += product(chunk, at, (n1 - n0) * positions)
            return
        rows = max(1, self.col_budget // (max(col_rows, rr) * ow))
        col = xp.empty(col_rows * min(rows, oh) * ow, dtype=F32)
        for i in range(n):
            for r0 in range(0, oh, rows):
                r1 = min(oh, r0 + rows)
                cols = (r1 - r0) * ow
                chunk = col[:col_rows * cols]
                self._im2col(src[i:i + 1], chunk, geom, ow, r0, r1 - r0)
                at = xp.ascontiguousarray(a[i, :, r0:r1, :].reshape(g, r, cols).transpose(0, 2, 1))
                dweight += product(chunk, at, cols)

    def _gradient_out(self, shape, incoming):
        """A gradient's output array of `shape`, and whether it is final already: when it is
        empty, or when the gradient flowing in (`incoming`) is, which leaves it all zeros."""
        out = self._empty(shape)
        if out.size and incoming.size == 0:
            out.fill(0)
        return out, out.size == 0 or incoming.size == 0

    def col2im(self, dcol, geom, x_shape):
        """The Im2col layer's backward: dx (N, C, H, W) = x_shape from the column gradient dcol
        (N, C*KH*KW, OH, OW) in Caffe's layout (row c*KH*KW + q): each pixel sums, in tap order,
        the entries whose tap lands on it (conv.cu's col2im gather, no bias); untouched pixels 0."""
        n, c, h, w = x_shape
        oh, ow = conv_output_shape((h, w), geom)
        _check_shape("the column gradient", dcol.shape, (n, c * geom.kernel[0] * geom.kernel[1], oh, ow))
        dx, done = self._gradient_out((n, c, h, w), dcol)
        if done:
            return dx
        dcol = self._input(dcol)
        self.launch("conv", "col2im", self.deconv_grid(h * w, c, n), (BLOCK,),
                    (dcol, dcol, dx) + _i32(n, c, h, w, oh, ow, *geom.kernel, *geom.stride, *geom.pad,
                                            *geom.dilation, 0))
        return dx

    def pool_backward(self, x, y, dy, geom, method):
        """dx (N, C, H, W) of a MAX or AVE pooling of x with top y and top gradient dy (pooling.cu).

        MAX: each output's gradient goes to the first cell of its window, in Caffe's scan order,
        that holds y (the first strict maximum; padding never wins; nowhere where y is -FLT_MAX),
        recomputed into an int32 buffer of the top's size (max_pool_argmax); then each cell sums
        the gradients of the covering outputs that chose it (max_pool_backward).  AVE: each
        in-image cell sums dy / pool_size over the covering outputs (ave_pool_backward)."""
        n, c, h, w = x.shape
        oh, ow = geom.out
        _check_shape("the top gradient", dy.shape, (n, c, oh, ow))
        if method not in (MAX_POOL, AVE_POOL):
            raise UnsupportedError("STOCHASTIC pooling has no backward here (Caffe's CPU build does not "
                                   "implement it)" if method == STOCHASTIC_POOL else
                                   f"unknown pooling method {method}")
        dx, done = self._gradient_out((n, c, h, w), dy)
        if done:
            return dx
        dy = self._input(dy)
        geo = _i32(n * c, h, w, oh, ow, *geom.kernel, *geom.stride, *geom.pad)
        if method == MAX_POOL:
            _check_shape("the top", y.shape, dy.shape)
            argmax = self.xp.empty(dy.shape, dtype=I32)
            self.launch("pooling", "max_pool_argmax", (grid_for(argmax.size),), (BLOCK,),
                        (self._input(x), self._input(y), argmax) + geo)
            self.launch("pooling", "max_pool_backward", (grid_for(dx.size),), (BLOCK,), (dy, argmax, dx) + geo)
        else:
            self.launch("pooling", "ave_pool_backward", (grid_for(dx.size),), (BLOCK,), (dy, dx) + geo)
        return dx

    def crop_backward(self, dy, offsets, bottom_shape):
        """Crop's backward: dx = zeros(bottom_shape) with dx[idx + offsets] = dy[idx] (offsets and
        dy's shape as crop() takes them): a zero fill, then crop.cu's rows copied back into place."""
        bottom_shape = tuple(int(v) for v in bottom_shape)
        dx = self._empty(bottom_shape)  # (checks the size)
        dx.fill(0)
        if dy.size == 0:
            return dx
        dy = self._input(dy)
        plan = _uncrop_launch(bottom_shape, tuple(int(v) for v in offsets), tuple(dy.shape), CROP_PART_STEPS)
        if plan is None:  # more interleaved cropped axes than crop.cu takes
            dx[tuple(slice(o, o + t) for o, t in zip(offsets, dy.shape))] = dy
            return dx
        name, grid, args = plan
        self.launch("crop", name, grid, (BLOCK,), (dy, dx) + args)
        return dx


def _check_shape(what, shape, expected):
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{what} has shape {tuple(shape)}, expected {tuple(expected)}")



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


# pooling.cu's POOL_UNROLL and crop.cu's CROP_UNROLL: the slots (items) a thread takes per step.
POOL_UNROLL = 4
CROP_UNROLL = 4
# The most steps (CROP_UNROLL items per thread) of a crop row's threads in one part of the row.
CROP_PART_STEPS = 8


def _address(a):
    """The address of a's first element: a numpy array's (harness, strict) or a CuPy array's."""
    if isinstance(a, np.ndarray):
        return np.ndarray.view(a, np.ndarray).ctypes.data
    return a.data.ptr


def _lanes_log2(items, unroll):
    """log2 of the threads per row for pooling.cu's and crop.cu's row kernels: the fewest
    (a power of two, at most a warp) that take a row of `items` in one step of `unroll` each."""
    need = -(-items // unroll)
    lanes_log2 = 0
    while lanes_log2 < 5 and (1 << lanes_log2) < need:
        lanes_log2 += 1
    return lanes_log2


@functools.lru_cache(maxsize=256)
def _pool_launch(shape, kernel, stride, pad, out, method, want_mask, vec):
    """(kernel name, grid, scalar arguments) of a MAX or AVE pooling (cached: the same layer
    runs again and again, and at a few hundred microseconds a kernel the Python counts)."""
    n, c, h, w = shape
    oh, ow = out
    rows = n * c * oh
    if vec:
        lanes_log2 = _lanes_log2(ow // (vec // 2), POOL_UNROLL)
        name = f"{'max' if method == MAX_POOL else 'ave'}_pool_2x2_f{vec}"
        args = _i32(rows, h, w, oh, ow)
    else:
        lanes_log2 = _lanes_log2(ow, POOL_UNROLL)
        name = "max_pool" if method == MAX_POOL else "ave_pool"
        args = _i32(rows, h, w, oh, ow, *kernel, *stride, *pad)
    args += _i32(want_mask, lanes_log2) if method == MAX_POOL else _i32(lanes_log2)
    return name, (-(-rows // (BLOCK >> lanes_log2)),), args


@functools.lru_cache(maxsize=256)
def _crop_launch(data_shape, offsets, top_shape, aligned, part_steps):
    """(kernel name, grid, scalar arguments) of a crop, or None when it has more outer axes
    than crop.cu takes; aligned: both arrays are 16-byte aligned (cached, as _pool_launch)."""
    base, outer, run = crop_plan(data_shape, offsets, top_shape)
    if len(outer) > CROP_MAX_OUTER:
        return None
    outer = [(1, 0)] * (CROP_MAX_OUTER - len(outer)) + outer
    rows = math.prod(t for t, _ in outer)
    shape = (*(t for t, _ in outer[1:]), *(s for _, s in outer))
    if aligned and run % 4 == 0 and all(s % 4 == 0 for _, s in outer):
        items, name, head = run // 4, "crop_rows4", (base, base % 4, rows, run // 4)
    else:
        items, name, head = run, "crop_rows", (base, rows, run)
    lanes_log2 = _lanes_log2(items, CROP_UNROLL)
    seg, parts = _row_parts(items, lanes_log2, part_steps)
    return name, (-(-rows // (BLOCK >> lanes_log2)), parts), _i32(*head, *shape, seg, lanes_log2)


@functools.lru_cache(maxsize=256)
def _uncrop_launch(data_shape, offsets, top_shape, part_steps):
    """(kernel name, grid, scalar arguments) of Crop's backward (crop_rows_backward: crop_rows'
    rows and layout, floats), or None when it has more outer axes than crop.cu takes."""
    base, outer, run = crop_plan(data_shape, offsets, top_shape)
    if len(outer) > CROP_MAX_OUTER:
        return None
    outer = [(1, 0)] * (CROP_MAX_OUTER - len(outer)) + outer
    rows = math.prod(t for t, _ in outer)
    shape = (*(t for t, _ in outer[1:]), *(s for _, s in outer))
    lanes_log2 = _lanes_log2(run, CROP_UNROLL)
    seg, parts = _row_parts(run, lanes_log2, part_steps)
    return "crop_rows_backward", (-(-rows // (BLOCK >> lanes_log2)), parts), _i32(base, rows, run, *shape, seg,
                                                                                   lanes_log2)


def _row_parts(items, lanes_log2, part_steps=None):
    """(seg, parts): crop.cu splits a row of `items` into `parts` parts (grid.y) of `seg` items,
    each at most part_steps (default CROP_PART_STEPS) steps of its threads, or more where 65535
    parts would not do."""
    step = CROP_UNROLL << lanes_log2
    per_part = -(-items // 65535)
    seg = max(step * (part_steps or CROP_PART_STEPS), -(-per_part // step) * step)
    return seg, -(-items // seg)


def _pool_2x2_vector(x, y, mask, geom, width):
    """The vector width of pooling.cu's 2x2 stride-2 kernels for this pooling (4: float4
    loads and float2 stores, 2: float2 loads), or 0 when they do not apply: another
    window, padding, an odd width, or arrays not aligned for the accesses."""
    if tuple(geom.kernel) != (2, 2) or tuple(geom.stride) != (2, 2) or tuple(geom.pad) != (0, 0) \
            or width % 2 or geom.out[1] * 2 != width:
        return 0
    if width % 4 == 0 and _address(x) % 16 == 0 and _address(y) % 8 == 0 \
            and (mask is None or _address(mask) % 8 == 0):
        return 4
    return 2 if _address(x) % 8 == 0 else 0
