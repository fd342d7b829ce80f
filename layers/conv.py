"""Convolution, Deconvolution and Im2col: layers configured by a ConvolutionParameter.

The channel axis is `convolution_param.axis` (default 1); every axis after it is
spatial, so N-D convolution works the same way as 2-D.  The arithmetic lives in
caffeish.graph.geometry.
"""
import math

from caffeish.runtime.backend import kernels_for
from caffeish.graph.geometry import conv_output_shape, conv_params, deconv_output_shape, reported_by
from caffeish.runtime.conv_grad import col2im, conv_backward, deconv_backward
from caffeish.runtime.im2col import conv_forward, deconv_forward, im2col
from caffeish.graph.registry import Layer, register


class _ConvGeometryLayer(Layer):
    """Shared setup: the channel axis, the per-axis geometry and the channel count."""

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.conv_param = param.convolution_param
        # Set by reshape(), for the forward pass.
        self.channel_axis = None
        self.geometry = None
        self.channels = None

    def _setup(self, bottom_shape):
        """Parse the geometry for this bottom; returns (channel_axis, spatial input sizes)."""
        axis = self.canonical_axis(self.conv_param.axis, len(bottom_shape))
        spatial = tuple(bottom_shape[axis + 1:])
        with reported_by(self):
            self.geometry = conv_params(self.conv_param, len(spatial))
        self.channel_axis = axis
        self.channels = bottom_shape[axis]
        return axis, spatial

    def _as_ncs(self, xp, x):
        """View x as (N, C, *spatial): the axes before the channel axis fold into N."""
        axis = self.channel_axis
        return xp.reshape(x, (math.prod(x.shape[:axis]),) + tuple(x.shape[axis:]))

    def _restore(self, y, bottom_shape):
        """(N, C', *out) back to bottom_shape[:axis] + (C', *out)."""
        return y.reshape(tuple(bottom_shape[:self.channel_axis]) + tuple(y.shape[1:]))


@register("Convolution")
class Convolution(_ConvGeometryLayer):
    """Caffe's Convolution: top = bottom[:axis] + (num_output,) + out, per bottom.

    Several bottoms are allowed; they must have identical shapes and each gives
    one top, all using the same weight (num_output, C/group, k...) and bias
    (num_output,) blobs.
    """

    min_bottoms = 1
    min_tops = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.num_output = self.conv_param.num_output
        self.group = self.conv_param.group
        self.bias_term = self.conv_param.bias_term

    def _spatial_out(self, spatial_in):
        return conv_output_shape(spatial_in, self.geometry)

    def reshape(self, bottom_shapes):
        n_tops = len(self.param.top)
        if not bottom_shapes:
            raise self.error("needs at least one bottom")
        if len(bottom_shapes) != n_tops:
            raise self.error(
                f"needs one top per bottom: {len(bottom_shapes)} bottom(s), {n_tops} top(s)"
            )
        first = tuple(bottom_shapes[0])
        for i, shape in enumerate(bottom_shapes[1:], 1):
            if tuple(shape) != first:
                raise self.error(
                    f"all bottoms must have the same shape: bottom 0 is {first}, bottom {i} is {tuple(shape)}"
                )
        axis, spatial = self._setup(first)
        if self.num_output <= 0:
            raise self.error("num_output must be positive (it is required)")
        if self.group <= 0:
            raise self.error(f"group must be positive, got {self.group}")
        if self.channels % self.group:
            raise self.error(
                f"the input channel count {self.channels} (axis {axis}) is not a multiple of group {self.group}"
            )
        if self.num_output % self.group:
            raise self.error(f"num_output {self.num_output} is not a multiple of group {self.group}")
        with reported_by(self):
            out = self._spatial_out(spatial)
        top = first[:axis] + (self.num_output,) + out
        return [top] * n_tops

    def _weight_shape(self):
        return (self.num_output, self.channels // self.group) + self.geometry.kernel

    def param_shapes(self, bottom_shapes):
        self.reshape(bottom_shapes)
        shapes = [self._weight_shape()]
        if self.bias_term:
            shapes.append((self.num_output,))
        return shapes

    def fillers(self):
        """weight_filler, then bias_filler when bias_term (both default to constant 0)."""
        fillers = [self.conv_param.weight_filler]
        if self.bias_term:
            fillers.append(self.conv_param.bias_filler)
        return fillers

    _kernel = staticmethod(conv_forward)
    _gpu_kernel = "conv2d"  # caffeish.kernels.launch.Kernels method for 2-D on the GPU

    def forward(self, xp, bottoms, blobs):
        """Each bottom with the shared weight (and bias) blobs; see caffeish.runtime.im2col.

        On the GPU, 2-D convolutions run our CUDA kernels (kernels/conv.cu); other
        spatial ranks use the array code of caffeish.runtime.im2col with the GPU's `xp`.
        """
        weight = blobs[0]
        bias = blobs[1] if self.bias_term else None
        gpu = kernels_for(xp) if len(self.geometry.kernel) == 2 else None
        tops = []
        for x in bottoms:
            if gpu is not None:
                y = getattr(gpu, self._gpu_kernel)(self._as_ncs(xp, x), weight, bias, self.geometry, self.group)
            else:
                spatial = tuple(x.shape[self.channel_axis + 1:])
                out = self._spatial_out(spatial)
                y = self._kernel(xp, self._as_ncs(xp, x), weight, bias, self.geometry, self.group, out)
            tops.append(self._restore(y, x.shape))
        return tops

    def forward_relu(self, xp, bottoms, blobs):
        """forward, then max(top, 0): the work of an in-place ReLU right after this layer, done
        while each part of the output is still in cache (the Net offers this on the CPU only, see
        Net.run).  One bottom."""
        x = bottoms[0]
        spatial = tuple(x.shape[self.channel_axis + 1:])
        y = conv_forward(xp, self._as_ncs(xp, x), blobs[0], blobs[1] if self.bias_term else None,
                         self.geometry, self.group, self._spatial_out(spatial), relu=True)
        return [self._restore(y, x.shape)]

    _backward = staticmethod(conv_backward)
    _gpu_backward = "conv2d_backward"

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """training.md 10.1: each bottom/top pair in turn; dW and db add up over the pairs.

        On the GPU, 2-D convolutions run our CUDA kernels; other spatial ranks the array code
        of caffeish.runtime.conv_grad with the GPU's `xp`.
        """
        weight = blobs[0]
        dweight = param_diffs[0] if param_diffs else None
        dbias = param_diffs[1] if self.bias_term and len(param_diffs) > 1 else None
        gpu = kernels_for(xp) if len(self.geometry.kernel) == 2 else None
        dxs = []
        for x, dy, want_dx in zip(bottoms, top_diffs, propagate_down):
            want_dx = bool(want_dx)
            if not want_dx and dweight is None and dbias is None:
                dxs.append(None)
                continue
            xn, dyn = self._as_ncs(xp, x), self._as_ncs(xp, dy)
            if gpu is not None:
                dx = getattr(gpu, self._gpu_backward)(xn, weight, dyn, self.geometry, self.group,
                                                      want_dx, dweight, dbias)
            else:
                dx = self._backward(xp, xn, weight, dyn, self.geometry, self.group, want_dx, dweight, dbias)
            dxs.append(self._restore(dx, x.shape) if want_dx else None)
        return dxs

    def macs(self, bottom_shapes, top_shapes):
        """N * prod(out) * num_output * (C/group) * prod(kernel), per bottom."""
        axis, _ = self._setup(tuple(bottom_shapes[0]))
        top = top_shapes[0]
        n = math.prod(top[:axis])
        per_position = self.num_output * (self.channels // self.group) * math.prod(self.geometry.kernel)
        return len(bottom_shapes) * n * math.prod(top[axis + 1:]) * per_position


@register("Deconvolution")
class Deconvolution(Convolution):
    """Caffe's Deconvolution: the transpose of Convolution.

    out = stride*(in-1) + extent - 2*pad; the weight blob is (C_in, num_output/group, k...).
    """

    forward_relu = None  # Convolution's fused ReLU is not offered here

    def _spatial_out(self, spatial_in):
        return deconv_output_shape(spatial_in, self.geometry)

    def _weight_shape(self):
        return (self.channels, self.num_output // self.group) + self.geometry.kernel

    _kernel = staticmethod(deconv_forward)
    _gpu_kernel = "deconv2d"
    _backward = staticmethod(deconv_backward)
    _gpu_backward = "deconv2d_backward"

    def macs(self, bottom_shapes, top_shapes):
        """N * prod(in) * C_in * (num_output/group) * prod(kernel), per bottom."""
        bottom = tuple(bottom_shapes[0])
        axis, spatial = self._setup(bottom)
        n = math.prod(bottom[:axis])
        per_position = self.channels * (self.num_output // self.group) * math.prod(self.geometry.kernel)
        return len(bottom_shapes) * n * math.prod(spatial) * per_position


@register("Im2col")
class Im2col(_ConvGeometryLayer):
    """Caffe's Im2col: unfolds each convolution window into the channel axis.

    top = bottom[:axis] + (C * prod(kernel),) + out, with out as for Convolution.
    """

    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom_shapes):
        bottom = tuple(bottom_shapes[0])
        axis, spatial = self._setup(bottom)
        with reported_by(self):
            out = conv_output_shape(spatial, self.geometry)
        return [bottom[:axis] + (self.channels * math.prod(self.geometry.kernel),) + out]

    def forward(self, xp, bottoms, blobs):
        """Caffe's column layout: channel index c*prod(kernel) + q, q the row-major tap index."""
        x = bottoms[0]
        gpu = kernels_for(xp) if len(self.geometry.kernel) == 2 else None
        if gpu is not None:
            return [self._restore(gpu.im2col(self._as_ncs(xp, x), self.geometry), x.shape)]
        out = conv_output_shape(tuple(x.shape[self.channel_axis + 1:]), self.geometry)
        y = im2col(xp, self._as_ncs(xp, x), self.geometry, out)
        return [self._restore(y, x.shape)]

    def backward(self, xp, top_diffs, tops, bottoms, blobs, propagate_down, param_diffs):
        """dx = col2im(dy) (training.md 10.1); Caffe writes it whatever propagate_down says."""
        x, dy = bottoms[0], top_diffs[0]
        xn = self._as_ncs(xp, x)
        dyn = self._as_ncs(xp, dy)
        gpu = kernels_for(xp) if len(self.geometry.kernel) == 2 else None
        if gpu is not None:
            dx = gpu.col2im(dyn, self.geometry, tuple(xn.shape))
        else:
            dx = col2im(xp, dyn, self.geometry, tuple(xn.shape))
        return [self._restore(dx, x.shape)]
