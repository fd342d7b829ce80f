"""Routing and shape layers: they copy, join, cut, select or relabel data.

Concat, Slice, Split, Flatten, Reshape, Tile, Reduction, ArgMax, Eltwise,
Softmax, Silence, Filter, BatchReindex and Parameter.  None does matrix work
(macs 0); only Parameter owns a blob.  `reshape` repeats the checks of Caffe's
LayerSetUp and Reshape (its fatal CHECKs become ShapeErrors naming the layer)
and keeps the parsed state that `forward` uses.

Forward returns views of the bottom where Caffe shares the data (Split,
Flatten, Reshape, Concat of one bottom, Slice pieces); nobody writes into them.

Backward (../shared/caffe/training.md 10.4, 10.5, 10.8) returns views of the top
diff where Caffe shares the diff memory (Flatten, Reshape, Concat of one bottom,
Slice of one top: whatever propagate_down says, as the memory is shared) and
fresh arrays elsewhere.
"""
from math import prod

import numpy as np

from caffeish.ops.data import declared_shape
from caffeish.graph.graph import MAX_BLOB_AXES
from caffeish.errors import UnsupportedError
from caffeish.graph.registry import Layer, register
from caffeish.formats.schema import pb
from caffeish.runtime import parallel
from caffeish.runtime.backend import kernels_for



def f32(value):
    """A float32 scalar: Caffe keeps its per-layer constants in Dtype (float)."""
    return np.float32(value)


def softmax(xp, x, axis):
    """Caffe's Softmax along `axis`: subtract the max, exponentiate, divide by the sum (float32).

    On the GPU one launch of our kernel (kernels/norm.cu); SoftmaxWithLoss and InfogainLoss
    take their probabilities from here too."""
    gpu = kernels_for(xp)
    if gpu is not None:
        return gpu.softmax(x, axis)
    if xp is np and x.ndim:
        # Each position's classes apart from the others: split the positions over the cores.
        axis = axis % x.ndim
        outer, inner = prod(x.shape[:axis]), prod(x.shape[axis + 1:])
        x3 = np.reshape(x, (outer, x.shape[axis], inner))
        out = np.empty(x3.shape, dtype=np.result_type(x.dtype, np.float32))
        along = 2 if inner > 1 else 0

        def part(lo, hi):
            at = (slice(None), slice(None), slice(lo, hi)) if along == 2 else (slice(lo, hi),)
            xs, o = x3[at], out[at]
            np.subtract(xs, xs.max(axis=1, keepdims=True), out=o)
            np.exp(o, out=o)
            o /= o.sum(axis=1, keepdims=True)

        parallel.split(np, x3.shape[along], part, elements=x3.size)
        return out.reshape(x.shape)
    out = x - xp.max(x, axis=axis, keepdims=True)
    xp.exp(out, out=out)
    out /= xp.sum(out, axis=axis, keepdims=True)
    return out


def _stable_argsort(xp, x):
    """Ascending argsort along the last axis that keeps equal values in index order."""
    if xp is np:
        return np.argsort(x, axis=-1, kind="stable")
    return xp.argsort(x, axis=-1)  # CuPy sorts with a stable radix sort


def top_k_indices(xp, x, k):
    """Indices of the k largest values along the last axis, largest first.

    Caffe sorts (value, index) pairs in descending order, so among equal values
    the larger index comes first.
    """
    n = x.shape[-1]
    if k == 1:
        # argmax returns the first maximum; searching the reversed axis finds the last.
        return (n - 1 - xp.argmax(x[..., ::-1], axis=-1))[..., None]
    return _stable_argsort(xp, x)[..., ::-1][..., :k]


class RoutingLayer(Layer):
    """Checks the blob counts, then asks `top_shapes` for the tops (kept in `out_shapes`)."""

    out_shapes = None

    def reshape(self, bottom_shapes):
        self.check_counts(len(bottom_shapes), len(self.param.top))
        self.out_shapes = self.top_shapes([tuple(s) for s in bottom_shapes])
        return self.out_shapes

    def top_shapes(self, bottoms):
        raise NotImplementedError

    def legacy_axis(self, name, value, shape):
        """A legacy uint axis field (concat_dim, slice_dim): no negatives, must exist."""
        if value >= len(shape):
            raise self.error(f"{name} {value} out of range for a {len(shape)}-axis bottom {shape}")
        return value


@register("Concat")
class Concat(RoutingLayer):
    """Joins its bottoms along `axis` (default 1; legacy `concat_dim`).

    Every other axis must match.  With one bottom the top shares its data.
    """

    min_bottoms = 1
    exact_tops = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.concat_param = param.concat_param
        self.axis = None  # canonical axis, set by reshape

    def top_shapes(self, bottoms):
        p = self.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise self.error("give either concat_param.axis or the legacy concat_dim, not both")
        first = bottoms[0]
        if p.HasField("concat_dim"):
            self.axis = self.legacy_axis("concat_dim", p.concat_dim, first)
        else:
            self.axis = self.canonical_axis(p.axis, len(first))
        top = list(first)
        for i, shape in enumerate(bottoms[1:], 1):
            if len(shape) != len(first) or any(
                a != b for j, (a, b) in enumerate(zip(first, shape)) if j != self.axis
            ):
                raise self.error(
                    f"bottoms must have the same shape except on the concat axis {self.axis}: "
                    f"bottom 0 is {first}, bottom {i} is {shape}"
                )
            top[self.axis] += shape[self.axis]
        return [tuple(top)]

    def forward(self, xp, bottoms, blobs):
        if len(bottoms) == 1:
            return [bottoms[0]]
        return [xp.concatenate(bottoms, axis=self.axis)]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """Each bottom gets its slice of dy; one bottom shares the top's diff."""
        dy = top_diffs[0]
        if len(bottoms) == 1:
            return [dy]
        lead = (slice(None),) * self.axis
        diffs, start = [], 0
        for b, wanted in zip(bottoms, propagate_down):
            size = b.shape[self.axis]
            diffs.append(dy[lead + (slice(start, start + size),)].copy() if wanted else None)
            start += size
        return diffs


@register("Slice")
class Slice(RoutingLayer):
    """Cuts its bottom along `axis` (default 1; legacy `slice_dim`) into the tops.

    With `slice_point` (strictly increasing, one fewer than the tops) the pieces
    are the gaps between the points; without, the axis is split evenly.
    """

    exact_bottoms = 1
    min_tops = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.slice_param = param.slice_param
        self.axis = None
        self.sizes = None  # the size of each piece along the axis, set by reshape

    def top_shapes(self, bottoms):
        p = self.slice_param
        shape = bottoms[0]
        n_tops = len(self.param.top)
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise self.error("give either slice_param.axis or the legacy slice_dim, not both")
        if p.HasField("slice_dim"):
            self.axis = self.legacy_axis("slice_dim", p.slice_dim, shape)
        else:
            self.axis = self.canonical_axis(p.axis, len(shape))
        dim = shape[self.axis]
        points = list(p.slice_point)
        if points:
            if len(points) != n_tops - 1:
                raise self.error(
                    f"{len(points)} slice_point value(s) for {n_tops} tops; give exactly "
                    f"{n_tops - 1} (one fewer than the tops) or none for an even split"
                )
            if n_tops > dim:
                raise self.error(f"{n_tops} tops cannot slice axis {self.axis} of size {dim}")
            bounds = [0] + points
            if any(b <= a for a, b in zip(bounds, points)):
                raise self.error(f"slice_point must be strictly increasing and above 0, got {points}")
            if points[-1] > dim:
                raise self.error(
                    f"slice_point {points[-1]} lies beyond axis {self.axis} of size {dim} ({shape})"
                )
            self.sizes = [b - a for a, b in zip(bounds, points + [dim])]
        else:
            if dim % n_tops:
                raise self.error(
                    f"{n_tops} tops do not evenly divide axis {self.axis} of size {dim}; "
                    f"give slice_point values"
                )
            self.sizes = [dim // n_tops] * n_tops
        return [shape[: self.axis] + (s,) + shape[self.axis + 1 :] for s in self.sizes]

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        lead = (slice(None),) * self.axis
        tops, start = [], 0
        for size in self.sizes:
            tops.append(x[lead + (slice(start, start + size),)])
            start += size
        return tops

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """The top diffs joined along the axis; one top shares the bottom's diff."""
        if len(top_diffs) == 1:
            return [top_diffs[0]]
        if not propagate_down[0]:
            return [None]
        return [xp.concatenate(top_diffs, axis=self.axis)]


@register("Split")
class Split(RoutingLayer):
    """Gives every top the bottom's data (Caffe inserts these for shared blobs).

    Caffe's SplitLayer::Reshape refuses in-place use (a top named like the bottom).
    """

    exact_bottoms = 1
    min_tops = 1
    allows_in_place = False

    def top_shapes(self, bottoms):
        return [bottoms[0]] * len(self.param.top)

    def forward(self, xp, bottoms, blobs):
        return [bottoms[0]] * len(self.param.top)

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = dy0 + dy1 (+ dy2 ...), added in top order; one top: a copy of its diff."""
        if not propagate_down[0]:
            return [None]
        if len(top_diffs) == 1:
            return [top_diffs[0].copy()]
        dx = top_diffs[0] + top_diffs[1]
        for d in top_diffs[2:]:
            dx += d
        return [dx]


@register("Flatten")
class Flatten(RoutingLayer):
    """Merges axes axis..end_axis (defaults 1 and -1) into one; refuses in-place use."""

    exact_bottoms = 1
    exact_tops = 1
    allows_in_place = False

    def top_shapes(self, bottoms):
        shape = bottoms[0]
        p = self.param.flatten_param
        start = self.canonical_axis(p.axis, len(shape))
        end = self.canonical_axis(p.end_axis, len(shape))
        if end + 1 < start:
            raise self.error(
                f"end_axis {p.end_axis} (axis {end}) comes before axis {p.axis} (axis {start}) "
                f"of the bottom {shape}"
            )
        return [shape[:start] + (prod(shape[start : end + 1]),) + shape[end + 1 :]]

    def forward(self, xp, bottoms, blobs):
        return [xp.reshape(bottoms[0], self.out_shapes[0])]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """The bottom adopts the top's diff (a view, reshaped; Caffe's ShareDiff)."""
        return [xp.reshape(top_diffs[0], tuple(bottoms[0].shape))]


@register("Reshape")
class Reshape(RoutingLayer):
    """Replaces bottom axes [start, end) with reshape_param.shape; refuses in-place use.

    start = axis if axis >= 0 else num_axes + axis + 1 (so -1 appends);
    end = num_axes of the bottom if num_axes == -1 else start + num_axes.
    A dim of 0 copies the bottom's dim at the same position, at most one -1 is
    inferred from the count, and the count must be preserved.
    """

    exact_bottoms = 1
    exact_tops = 1
    allows_in_place = False

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.reshape_param = param.reshape_param

    def top_shapes(self, bottoms):
        shape = bottoms[0]
        p = self.reshape_param
        dims = list(p.shape.dim)
        if any(d < -1 for d in dims):
            raise self.error(f"reshape_param.shape {dims}: a dim must be positive, 0 (copy) or -1 (infer)")
        if dims.count(-1) > 1:
            raise self.error(f"reshape_param.shape {dims} has several -1 dims; at most one may be inferred")
        n = len(shape)
        start = p.axis if p.axis >= 0 else n + p.axis + 1
        if not 0 <= start <= n:
            raise self.error(f"axis {p.axis} out of range for a {n}-axis bottom {shape}")
        if p.num_axes < -1:
            raise self.error(f"num_axes {p.num_axes}: must be >= 0, or -1 for all remaining axes")
        end = n if p.num_axes == -1 else start + p.num_axes
        if end > n:
            raise self.error(
                f"axis {p.axis} + num_axes {p.num_axes} = {end} is beyond the {n}-axis bottom {shape}"
            )
        new = []
        for i, d in enumerate(dims):
            if d == 0:
                if start + i >= n:
                    raise self.error(
                        f"reshape_param.shape {dims}: dim {i} is 0 (copy) but the bottom {shape} has "
                        f"no axis {start + i} to copy"
                    )
                d = shape[start + i]
            new.append(d)
        top = list(shape[:start]) + new + list(shape[end:])
        count = prod(shape)
        if -1 in new:
            known = prod(d for d in top if d != -1)
            if known == 0 or count % known:
                raise self.error(
                    f"cannot infer the -1 dim: the bottom count {count} ({shape}) is not divisible "
                    f"by the product {known} of the other dims {tuple(top)}"
                )
            top[top.index(-1)] = count // known
        if len(top) > MAX_BLOB_AXES:
            raise self.error(f"the top would have {len(top)} axes; Caffe allows at most {MAX_BLOB_AXES}")
        if prod(top) != count:
            raise self.error(
                f"reshape_param.shape {dims} gives the top {tuple(top)} of {prod(top)} elements, "
                f"but the bottom {shape} has {count}"
            )
        return [tuple(top)]

    def forward(self, xp, bottoms, blobs):
        return [xp.reshape(bottoms[0], self.out_shapes[0])]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """The top shares the bottom's diff: a view of dy in the bottom's shape."""
        return [xp.reshape(top_diffs[0], tuple(bottoms[0].shape))]


@register("Tile")
class Tile(RoutingLayer):
    """Repeats the bottom `tiles` times along `axis` (default 1): top[axis] = tiles * bottom[axis]."""

    exact_bottoms = 1
    exact_tops = 1

    def top_shapes(self, bottoms):
        shape = bottoms[0]
        p = self.param.tile_param
        axis = self.canonical_axis(p.axis, len(shape))
        if not p.HasField("tiles"):
            raise self.error("tile_param.tiles (the number of copies) must be given")
        if p.tiles <= 0:
            raise self.error(f"tile_param.tiles must be positive, got {p.tiles}")
        self.axis, self.tiles = axis, p.tiles
        return [shape[:axis] + (shape[axis] * p.tiles,) + shape[axis + 1 :]]

    def forward(self, xp, bottoms, blobs):
        x = bottoms[0]
        reps = [1] * x.ndim
        reps[self.axis] = self.tiles
        return [xp.tile(x, reps)]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = the sum of the tiles, added in tile order (Caffe: copy the first, then axpy)."""
        if not propagate_down[0]:
            return [None]
        shape = tuple(bottoms[0].shape)
        outer, inner = prod(shape[:self.axis]), prod(shape[self.axis:])
        tiles = xp.reshape(top_diffs[0], (outer, self.tiles, inner))
        dx = tiles[:, 0].copy()
        for t in range(1, self.tiles):
            dx += tiles[:, t]
        return [xp.reshape(dx, shape)]


@register("Reduction")
class Reduction(RoutingLayer):
    """Reduces all axes from `axis` (default 0) on with SUM, ASUM, SUMSQ or MEAN, times coeff.

    The top keeps the axes before `axis`: axis 0 gives a scalar, shape ().
    """

    exact_bottoms = 1
    exact_tops = 1
    OPERATIONS = (
        pb.ReductionParameter.SUM,
        pb.ReductionParameter.ASUM,
        pb.ReductionParameter.SUMSQ,
        pb.ReductionParameter.MEAN,
    )

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.reduction_param = param.reduction_param

    def top_shapes(self, bottoms):
        shape = bottoms[0]
        p = self.reduction_param
        if p.operation not in self.OPERATIONS:
            raise self.error(f"unknown reduction operation {p.operation}")
        axis = self.canonical_axis(p.axis, len(shape))
        self.axis = axis
        return [shape[:axis]]

    def forward(self, xp, bottoms, blobs):
        """Per leading position: SUM, ASUM (sum of |x|), SUMSQ or MEAN of the rest, times coeff.

        Caffe folds MEAN into the coefficient: coeff / dim, in float.
        """
        x = bottoms[0]
        p = self.reduction_param
        outer = prod(x.shape[: self.axis])
        rows = xp.reshape(x, (outer, -1))
        dim = rows.shape[1]
        op = p.operation
        if op == pb.ReductionParameter.ASUM:
            out = xp.sum(xp.abs(rows), axis=1, dtype=xp.float32)
        elif op == pb.ReductionParameter.SUMSQ:
            out = xp.einsum("ij,ij->i", rows, rows)
        else:
            out = xp.sum(rows, axis=1, dtype=xp.float32)
        coeff = f32(p.coeff)
        if op == pb.ReductionParameter.MEAN and dim:
            coeff = coeff / f32(dim)
        if coeff != 1:
            out = out * coeff
        return [xp.reshape(out.astype(xp.float32, copy=False), self.out_shapes[0])]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """Per leading position i, g = dy_i * c (c = coeff, or coeff/dim for MEAN, in float32):
        SUM/MEAN dx = g, ASUM dx = g * sign(x) (sign 0 at 0 and NaN), SUMSQ dx = (2g) * x."""
        if not propagate_down[0]:
            return [None]
        x = bottoms[0]
        p = self.reduction_param
        op = p.operation
        outer = prod(x.shape[: self.axis])
        rows = xp.reshape(x, (outer, -1))
        dim = rows.shape[1]
        coeff = f32(p.coeff)
        if op == pb.ReductionParameter.MEAN and dim:
            coeff = coeff / f32(dim)
        g = xp.reshape(top_diffs[0], (outer, 1)) * coeff
        if op == pb.ReductionParameter.ASUM:
            dx = (rows > 0).astype(np.float32)
            dx -= rows < 0
            dx *= g
        elif op == pb.ReductionParameter.SUMSQ:
            dx = rows * (g * f32(2))
        else:
            dx = xp.empty((outer, dim), dtype=np.float32)
            dx[...] = g
        return [xp.reshape(dx, tuple(x.shape))]


@register("ArgMax")
class ArgMax(RoutingLayer):
    """The top_k largest values per item (ties go to the larger index).

    Without `axis`, each item n is flattened; the top has max(3, A) axes, all 1
    except [0] = N, [2] = top_k and [1] = 2 with out_max_val (indices, values).
    With `axis`, the top is the bottom with shape[axis] = top_k (values only
    when out_max_val, indices otherwise).
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.argmax_param = param.argmax_param

    def top_shapes(self, bottoms):
        shape = bottoms[0]
        p = self.argmax_param
        k = p.top_k
        if k < 1:
            raise self.error(f"top_k must be at least 1, got {k}")
        self.axis = None
        if p.HasField("axis"):
            axis = self.canonical_axis(p.axis, len(shape))
            self.axis = axis
            if k > shape[axis]:
                raise self.error(f"top_k {k} exceeds the size {shape[axis]} of axis {axis} of {shape}")
            return [shape[:axis] + (k,) + shape[axis + 1 :]]
        if not shape:
            raise self.error("the bottom is a scalar (0 axes); ArgMax needs an item axis 0")
        per_item = prod(shape[1:])
        if k > per_item:
            raise self.error(f"top_k {k} exceeds the {per_item} values per item of the bottom {shape}")
        top = [1] * max(3, len(shape))
        top[0], top[2] = shape[0], k
        if p.out_max_val:
            top[1] = 2
        return [tuple(top)]

    def forward(self, xp, bottoms, blobs):
        """Indices (as float32) and/or values of the top_k largest entries; ties to the larger index."""
        x = bottoms[0]
        p = self.argmax_param
        k = p.top_k
        if self.axis is None:
            rows = xp.reshape(x, (x.shape[0], -1))
            idx = top_k_indices(xp, rows, k)
            out = idx.astype(xp.float32)
            if p.out_max_val:
                values = xp.take_along_axis(rows, idx, axis=-1)
                out = xp.stack([out, values], axis=1)
            return [xp.reshape(out, self.out_shapes[0])]
        last = xp.moveaxis(x, self.axis, -1)
        idx = top_k_indices(xp, last, k)
        if p.out_max_val:
            out = xp.take_along_axis(last, idx, axis=-1)
        else:
            out = idx.astype(xp.float32)
        return [xp.ascontiguousarray(xp.moveaxis(out, -1, self.axis))]


@register("Eltwise")
class Eltwise(RoutingLayer):
    """Elementwise PROD, SUM (default; coeff: none or one per bottom) or MAX of identical shapes."""

    min_bottoms = 2
    exact_tops = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.eltwise_param = param.eltwise_param

    def top_shapes(self, bottoms):
        p = self.eltwise_param
        n_coeff = len(p.coeff)
        if n_coeff not in (0, len(bottoms)):
            raise self.error(
                f"{n_coeff} coeff value(s) for {len(bottoms)} bottoms; give one per bottom or none"
            )
        if p.operation == pb.EltwiseParameter.PROD and n_coeff:
            raise self.error("coeff is only allowed for SUM, not PROD")
        for i, shape in enumerate(bottoms[1:], 1):
            if shape != bottoms[0]:
                raise self.error(
                    f"all bottoms must have the same shape: bottom 0 is {bottoms[0]}, bottom {i} is {shape}"
                )
        return [bottoms[0]]

    # MAX's choice per element (Caffe's max_idx_), kept when the backward will run.
    max_index = None

    def forward(self, xp, bottoms, blobs):
        """PROD: product; MAX: elementwise max; SUM: sum of coeff_i * bottom_i (float32 coeffs)."""
        p = self.eltwise_param
        first, rest = bottoms[0], bottoms[1:]
        self.max_index = None
        if p.operation == pb.EltwiseParameter.MAX and self.needs_backward:
            out, self.max_index = self._max_with_index(xp, bottoms)
            return [out]
        if p.operation == pb.EltwiseParameter.PROD:
            out = first * rest[0]
            for b in rest[1:]:
                out *= b
            return [out]
        if p.operation == pb.EltwiseParameter.MAX:
            out = xp.maximum(first, rest[0])
            for b in rest[1:]:
                xp.maximum(out, b, out=out)
            return [out]
        coeffs = [f32(c) for c in p.coeff] or [f32(1)] * len(bottoms)
        out = first * coeffs[0] if coeffs[0] != 1 else first.copy()
        for c, b in zip(coeffs[1:], rest):
            if c == 1:
                out += b
            else:
                out += c * b
        return [out]

    @staticmethod
    def _max_with_index(xp, bottoms):
        """Caffe's MAX loop with its mask: bottom 0 wins over bottom 1 only if strictly greater
        (so bottom 1 takes ties), and each later bottom only if strictly greater than the
        running maximum."""
        a, b = bottoms[0], bottoms[1]
        index_type = np.int8 if len(bottoms) <= 127 else np.int32
        take_a = a > b
        out = xp.where(take_a, a, b)
        index = (~take_a).astype(index_type)
        for k, x in enumerate(bottoms[2:], 2):
            greater = x > out
            out = xp.where(greater, x, out)
            index = xp.where(greater, index_type(k), index)
        return out, index

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """training.md 10.4.  SUM: dx_i = coeff_i * dy.  MAX: dy where the forward chose bottom i.
        PROD: stable_prod_grad (default) dy * (product of the other bottoms, in order), else
        dy * (y / x_i): NaN or inf where x_i = 0.

        In place (top 0 is bottom 0) Caffe's bottom 0 diff is the top diff's memory, so bottom 0's
        result replaces dy for the bottoms after it, and its own PROD gradient squares (Caffe
        writes the product into dy before multiplying by dy)."""
        p = self.eltwise_param
        op = p.operation
        dy = top_diffs[0]
        in_place = bottoms[0] is tops[0]
        n = len(bottoms)
        coeffs = [f32(c) for c in p.coeff] or [f32(1)] * n
        if op == pb.EltwiseParameter.MAX:
            index = self.max_index
            if index is None:
                _, index = self._max_with_index(xp, bottoms)
        diffs = []
        for i, x in enumerate(bottoms):
            if not propagate_down[i]:
                diffs.append(None)
                continue
            shared = in_place and i == 0  # dx_0 is written into dy's memory
            if op == pb.EltwiseParameter.PROD:
                if p.stable_prod_grad:
                    others = [bottoms[j] for j in range(n) if j != i]
                    dx = others[0].copy()
                    for other in others[1:]:
                        dx *= other
                else:
                    dx = tops[0] / x
                dx *= dx if shared else dy
            elif op == pb.EltwiseParameter.MAX:
                dx = xp.where(index == i, dy, f32(0))
            else:
                dx = dy * coeffs[i]
            if shared:
                dy = dx
            diffs.append(dx)
        return diffs


@register("Softmax")
class Softmax(RoutingLayer):
    """Softmax along `axis` (default 1); the top has the bottom's shape."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.axis = None  # canonical axis, set by reshape

    def top_shapes(self, bottoms):
        self.axis = self.canonical_axis(self.param.softmax_param.axis, len(bottoms[0]))
        return [bottoms[0]]

    def forward(self, xp, bottoms, blobs):
        return [softmax(xp, bottoms[0], self.axis)]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = y * (dy - sum over the axis of dy * y); written whatever propagate_down says (Caffe)."""
        dy, y = top_diffs[0], tops[0]
        dx = dy * y
        dot = xp.sum(dx, axis=self.axis, keepdims=True)
        xp.subtract(dy, dot, out=dx)
        dx *= y
        return [dx]


@register("Silence")
class Silence(RoutingLayer):
    """Consumes its bottoms so that they are not net outputs; no tops."""

    min_bottoms = 1
    exact_tops = 0

    def top_shapes(self, bottoms):
        return []

    def forward(self, xp, bottoms, blobs):
        return []

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """Zeros for every bottom asked for (reached only under force_backward)."""
        return [xp.zeros(b.shape, dtype=np.float32) if wanted else None
                for b, wanted in zip(bottoms, propagate_down)]


@register("Filter")
class Filter(RoutingLayer):
    """Keeps the items whose selector (last bottom) is non-zero; one top per data bottom.

    The number of kept items is only known from the selector's values at run
    time.  Caffe's first Reshape (at net setup) declares the full batch N, and
    every Forward reshapes to the selected count.  Shape inference reports the
    setup shape, N; the real first dim is at most N.
    """

    min_bottoms = 2
    min_tops = 1
    value_dependent_shape = True

    def top_shapes(self, bottoms):
        *data, selector = bottoms
        if len(self.param.top) != len(data):
            raise self.error(
                f"needs one top per data bottom (all bottoms but the last, the selector): "
                f"{len(data)} data bottom(s), {len(self.param.top)} top(s)"
            )
        if not selector or any(d != 1 for d in selector[1:]):
            raise self.error(f"the selector (last bottom) must have shape (N,) or (N, 1, ...), got {selector}")
        for i, shape in enumerate(data):
            if not shape or shape[0] != selector[0]:
                raise self.error(
                    f"bottom {i} {shape} must have the selector's first dim {selector[0]}"
                )
        return list(data)

    def forward(self, xp, bottoms, blobs):
        """Each data bottom's items where the selector is non-zero, in order (possibly none)."""
        *data, selector = bottoms
        keep = xp.flatnonzero(xp.reshape(selector, (-1,)) != 0)
        self.kept = keep if self.needs_backward else None
        return [xp.take(b, keep, axis=0) for b in data]

    # The indices of the items the forward kept (Caffe's indices_to_forward_), for backward.
    kept = None

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """A kept item gets its top row's diff, a dropped one 0; the selector is fatal (Caffe)."""
        if propagate_down[-1]:
            raise UnsupportedError(
                f"layer '{self.name}' ({self.type}): cannot backpropagate to the selector (its last "
                f"bottom); Caffe: \"Layer cannot backpropagate to filter index inputs\"")
        keep = self.kept
        if keep is None:
            keep = xp.flatnonzero(xp.reshape(bottoms[-1], (-1,)) != 0)
        diffs = []
        for b, dy, wanted in zip(bottoms[:-1], top_diffs, propagate_down):
            if not wanted:
                diffs.append(None)
                continue
            dx = xp.zeros(b.shape, dtype=np.float32)
            if keep.size:
                dx[keep] = dy
            diffs.append(dx)
        return diffs + [None]


@register("BatchReindex")
class BatchReindex(RoutingLayer):
    """Gathers items of bottom 0 by the indices in bottom 1, shape (N',): top = (N',) + data[1:]."""

    exact_bottoms = 2
    exact_tops = 1

    def top_shapes(self, bottoms):
        data, index = bottoms
        if len(index) != 1:
            raise self.error(f"the index bottom (bottom 1) must be 1-D, got shape {index}")
        return [index + data[1:]]

    def forward(self, xp, bottoms, blobs):
        """top[i] = data[index[i]].  The indices must be whole numbers in [0, N).

        (Caffe checks 0 <= index < N and truncates the float; a fractional
        index is refused here as a certain mistake.)
        """
        data, index = bottoms
        n = data.shape[0]
        bad = (index < 0) | (index >= n) | (index != xp.trunc(index))
        if bool(xp.any(bad)):
            pos = int(xp.flatnonzero(bad)[0])
            raise self.error(
                f"index {float(index[pos])!r} at position {pos} of bottom 1 is not a whole number in "
                f"[0, {n}) (bottom 0 has {n} items)"
            )
        return [xp.take(data, index.astype(xp.int64), axis=0)]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """Zero, then dx[int(index[n])] += dy[n] in order; the index bottom is fatal (Caffe's CHECK)."""
        if propagate_down[1]:
            raise UnsupportedError(
                f"layer '{self.name}' ({self.type}): cannot backpropagate to the index bottom "
                f"(bottom 1); Caffe: \"Cannot backprop to index.\"")
        if not propagate_down[0]:
            return [None, None]
        data, index = bottoms
        dx = xp.zeros(data.shape, dtype=np.float32)
        if index.size:
            xp.add.at(dx, xp.reshape(index, (-1,)).astype(xp.int64), top_diffs[0])
        return [dx, None]


@register("Parameter")
class Parameter(RoutingLayer):
    """Exposes one learned blob of parameter_param.shape as its top; no bottoms."""

    exact_bottoms = 0
    exact_tops = 1

    def shape(self):
        return declared_shape(self, self.param.parameter_param.shape, "parameter_param.shape")

    def top_shapes(self, bottoms):
        return [self.shape()]

    def param_shapes(self, bottom_shapes):
        return [self.shape()]

    def fillers(self):
        # Caffe allocates the blob without filling it: zeros.
        return [None]

    def forward(self, xp, bottoms, blobs):
        return [blobs[0]]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """The top shares the parameter's diff: the param diff becomes the top diff (=, not +=)."""
        if param_diffs and param_diffs[0] is not None:
            param_diffs[0][...] = top_diffs[0]
        return []
