"""InnerProduct (fully connected) and Embed (a learned lookup table)."""
import math

from caffeish.registry import Layer, register


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
