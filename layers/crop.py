"""Crop: cut the data bottom to the reference bottom's size from `axis` on."""
import numpy as np

from caffeish.runtime.backend import kernels_for
from caffeish.graph.geometry import crop_offsets, reported_by
from caffeish.graph.registry import Layer, register


def crop_backward(xp, dy, offsets, bottom_shape):
    """Caffe's Crop backward: zeros of bottom_shape with dy at the offsets (dx[idx + offset] = dy[idx]).

    offsets as the forward passes to the GPU crop (one per axis).  On the GPU one launch of our
    kernel (kernels/crop.cu)."""
    gpu = kernels_for(xp)
    if gpu is not None:
        return gpu.crop_backward(dy, offsets, bottom_shape)
    dx = xp.zeros(tuple(bottom_shape), dtype=np.float32)
    dx[tuple(slice(o, o + n) for o, n in zip(offsets, dy.shape))] = dy
    return dx


@register("Crop")
class Crop(Layer):
    """Caffe's Crop: bottoms (data, reference), top[idx] = data[idx + offset].

    Axes before crop_param.axis (default 2) keep the data's size; later axes take
    the reference's size.  The reference's values are never read.
    """

    exact_bottoms = 2
    exact_tops = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.crop_param = param.crop_param
        # Set by reshape(): the first cropped axis and the offset on every axis.
        self.start_axis = None
        self.offsets = None
        self.top_shape = None

    def reshape(self, bottom_shapes):
        data, ref = (tuple(s) for s in bottom_shapes)
        with reported_by(self):
            self.start_axis, self.offsets, top = crop_offsets(self.crop_param, data, ref)
        self.top_shape = top
        return [top]

    def forward(self, xp, bottoms, blobs):
        """A view of the data bottom (nobody writes into tops or bottoms).

        On the GPU, a contiguous copy made by our kernel (kernels/crop.cu), so that
        the next layers read contiguous memory."""
        gpu = kernels_for(xp)
        if gpu is not None:
            return [gpu.crop(bottoms[0], self.offsets, self.top_shape)]
        index = tuple(slice(o, o + n) for o, n in zip(self.offsets, self.top_shape))
        return [bottoms[0][index]]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """training.md 10.8: the data bottom gets dy at the offsets and zeros elsewhere; the
        reference bottom gets nothing."""
        dx = None
        if propagate_down[0]:
            dx = crop_backward(xp, top_diffs[0], self.offsets, tuple(bottoms[0].shape))
        return [dx, None]
