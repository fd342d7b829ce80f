"""InnerProduct (fully connected) and Embed (a learned lookup table)."""
import math

import numpy as np

from caffeish.errors import InputValueError, UnsupportedError
from caffeish.graph.registry import Layer, register
from caffeish.ops.neuron import copy_filler
from caffeish.runtime import blas

# Batches of 2..SMALL_BATCH rows go through the weight as (W x^T)^T.  Measured on 2 cores (median
# ms, x W^T / (W x^T)^T): fc6 (4096 x 9216) at batch 2: 16.6 / 9.2, 10: 19.5 / 13.3, 64: 36.7 / 30.5,
# 256: 105.8 / 103.2; fc7 (4096 x 4096) at 10: 8.7 / 5.7; fc8 (1000 x 4096) at 10: 2.0 / 1.1; equal
# at batch 1.
SMALL_BATCH = 256
# Output rows per block there (fc6 at batch 10, blocks of 4096 / 2048 / 1024 / 512: 14.7 / 11.9 /
# 12.3 / 12.6 ms, 6 / 2 / 0 / 0 MiB of OpenBLAS packing buffer touched).
WEIGHT_ROWS = 1024


@register("InnerProduct")
class InnerProduct(Layer):
    """Caffe's InnerProduct layer: y = x . W^T + b over the axes from `axis` on.

    M = prod(shape[:axis]) rows of K = prod(shape[axis:]) inputs give
    top = shape[:axis] + (num_output,).  Blobs: weight (N, K), or (K, N) with
    transpose, and bias (N,) if bias_term (default true).
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = param.inner_product_param
        self.num_output, self.bias_term, self.transpose = p.num_output, p.bias_term, p.transpose
        self.axis = p.axis

    def _split(self, bottom):
        """(axis, M, K) for a bottom shape."""
        axis = self.canonical_axis(self.axis, len(bottom))
        return axis, math.prod(bottom[:axis]), math.prod(bottom[axis:])

    def reshape(self, bottom_shapes):
        self.check_counts(len(bottom_shapes), len(self.param.top))
        bottom = tuple(bottom_shapes[0])
        if self.num_output <= 0:
            # Caffe would build an empty weight that its fillers refuse.
            raise self.error("inner_product_param.num_output must be set to a positive value")
        axis, _, _ = self._split(bottom)
        return [bottom[:axis] + (self.num_output,)]

    def param_shapes(self, bottom_shapes):
        _, _, k = self._split(tuple(bottom_shapes[0]))
        n = self.num_output
        shapes = [(k, n) if self.transpose else (n, k)]
        if self.bias_term:
            shapes.append((n,))
        return shapes

    def macs(self, bottom_shapes, top_shapes):
        _, m, k = self._split(tuple(bottom_shapes[0]))
        return m * k * self.num_output

    def fillers(self):
        # weight_filler and bias_filler both default to constant 0.
        p = self.param.inner_product_param
        out = [copy_filler(p.weight_filler)]
        if self.bias_term:
            out.append(copy_filler(p.bias_filler))
        return out

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        axis, m, k = self._split(x.shape)
        weight = blobs[0]
        if weight.size != k * self.num_output:
            raise self.error(
                f"the weight blob has {weight.size} values, but {self.num_output} outputs of "
                f"{k} inputs (bottom shape {tuple(x.shape)}, axis {axis}) need {k * self.num_output}"
            )
        # One matmul: (M, K) x (K, N).  The weight is (N, K), or (K, N) with transpose.
        if self.transpose:
            w = xp.reshape(weight, (k, self.num_output))
        else:
            w = xp.reshape(weight, (self.num_output, k)).T
        x2 = xp.reshape(x, (m, k))
        if xp is np and 2 <= m <= SMALL_BATCH and x2.dtype == w.dtype == np.float32:
            # (W x^T)^T: OpenBLAS streams the weight faster with the batch as its M dimension
            # (AlexNet's fc6 at batch 10: 12 ms against 20; see SMALL_BATCH), by blocks of
            # WEIGHT_ROWS outputs (in one call it packed more of the weight at once: 7 MiB more
            # peak memory for AlexNet, and slower).
            y = np.empty((m, self.num_output), dtype=np.float32)
            wt, xt = w.T, x2.T
            for a in range(0, self.num_output, WEIGHT_ROWS):
                y[:, a:a + WEIGHT_ROWS] = np.matmul(wt[a:a + WEIGHT_ROWS], xt).T
        else:
            y = xp.matmul(x2, w)
        if self.bias_term:
            y += xp.reshape(blobs[1], (self.num_output,))
        return [xp.reshape(y, tuple(x.shape[:axis]) + (self.num_output,))]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """training.md 10.3, with x as (M, K) and dy as (M, N).

        W stored (N, K): dW += dy^T x, dx = dy W; with transpose, W stored (K, N):
        dW += x^T dy, dx = dy W^T.  db += the column sums of dy.
        """
        x = bottoms[0]
        _, m, k = self._split(x.shape)
        n = self.num_output
        dy = xp.reshape(top_diffs[0], (m, n))
        dweight = param_diffs[0] if param_diffs else None
        dbias = param_diffs[1] if self.bias_term and len(param_diffs) > 1 else None
        if dweight is not None:
            x2 = xp.reshape(x, (m, k))
            # Into the diff (BLAS with beta = 1, as Caffe): no weight-sized temporary (fc6's is 151 MB),
            # and at batch 10 a third of the time.
            shape = (k, n) if self.transpose else (n, k)
            added = xp is np and dweight.flags.c_contiguous and (
                blas.gemm_tn_add(x2, dy, dweight.reshape(shape)) if self.transpose
                else blas.gemm_tn_add(dy, x2, dweight.reshape(shape)))
            if not added:
                grad = xp.matmul(x2.T, dy) if self.transpose else xp.matmul(dy.T, x2)
                dweight += xp.reshape(grad, dweight.shape)
        if dbias is not None:
            # Caffe: a gemv of dy^T with a vector of ones.
            dbias += xp.reshape(xp.matmul(dy.T, xp.ones((m,), dtype=np.float32)), dbias.shape)
        if not propagate_down[0]:
            return [None]
        if self.transpose:
            w = xp.reshape(blobs[0], (k, n)).T
        else:
            w = xp.reshape(blobs[0], (n, k))
        return [xp.reshape(xp.matmul(dy, w), x.shape)]


@register("Embed")
class Embed(Layer):
    """Caffe's Embed layer: each bottom value is an index into a (input_dim, num_output) table.

    top = bottom.shape + (num_output,).  Blobs: weight (input_dim, num_output) and
    bias (num_output,) if bias_term.  Both sizes must be positive.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        p = param.embed_param
        self.num_output, self.input_dim, self.bias_term = p.num_output, p.input_dim, p.bias_term

    def reshape(self, bottom_shapes):
        self.check_counts(len(bottom_shapes), len(self.param.top))
        if self.num_output <= 0:
            raise self.error("embed_param.num_output must be positive")
        if self.input_dim <= 0:
            raise self.error("embed_param.input_dim must be positive")
        return [tuple(bottom_shapes[0]) + (self.num_output,)]

    def param_shapes(self, bottom_shapes):
        shapes = [(self.input_dim, self.num_output)]
        if self.bias_term:
            shapes.append((self.num_output,))
        return shapes

    def fillers(self):
        # weight_filler and bias_filler both default to constant 0.
        p = self.param.embed_param
        out = [copy_filler(p.weight_filler)]
        if self.bias_term:
            out.append(copy_filler(p.bias_filler))
        return out

    def forward(self, xp, bottoms, blobs):
        """top[i] = weight[int(bottom[i])] (+ bias).

        Caffe (in debug builds) checks that every bottom value is an integer in
        [0, input_dim); we always check, since anything else reads outside the table.
        """
        x = bottoms[0]
        flat = xp.reshape(x, (-1,))
        bad = (flat != xp.trunc(flat)) | (flat < 0) | (flat >= self.input_dim)
        if bool(xp.any(bad)):
            i = int(xp.argmax(bad))
            value = float(flat[i])
            where = tuple(int(d) for d in np.unravel_index(i, tuple(x.shape)))
            raise InputValueError(
                f"layer '{self.name}' ({self.type}): bottom value {value!r} at index {where} is not "
                f"an integer index in [0, {self.input_dim}) (embed_param.input_dim {self.input_dim})"
            )
        table = xp.reshape(blobs[0], (self.input_dim, self.num_output))
        y = xp.take(table, flat.astype(xp.int64), axis=0)
        if self.bias_term:
            y += xp.reshape(blobs[1], (self.num_output,))
        return [xp.reshape(y, tuple(x.shape) + (self.num_output,))]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """training.md 10.3: dW[int(x_m)] += dy[m] (repeated indices add up), db += sum of dy.

        Backpropagating into the index bottom fails Caffe's CHECK.
        """
        if propagate_down[0]:
            raise UnsupportedError(f"layer '{self.name}' ({self.type}): cannot backpropagate to its input "
                                   f"(the indices); Caffe: \"Can't backpropagate to EmbedLayer input.\"")
        dweight = param_diffs[0] if param_diffs else None
        dbias = param_diffs[1] if self.bias_term and len(param_diffs) > 1 else None
        n = self.num_output
        dy = xp.reshape(top_diffs[0], (-1, n))
        if dweight is not None and dy.shape[0]:
            index = xp.reshape(bottoms[0], (-1,)).astype(xp.int64)
            if dweight.flags.c_contiguous:
                table = xp.reshape(dweight, (self.input_dim, n))
                xp.add.at(table, index, dy)
            else:
                table = xp.zeros((self.input_dim, n), dtype=np.float32)
                xp.add.at(table, index, dy)
                dweight += xp.reshape(table, dweight.shape)
        if dbias is not None:
            dbias += xp.reshape(xp.matmul(dy.T, xp.ones((dy.shape[0],), dtype=np.float32)), dbias.shape)
        return [None]
