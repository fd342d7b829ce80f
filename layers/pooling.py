"""Pooling and SPP (spatial pyramid pooling): 4-D bottoms, windows sized by caffeish.geometry."""
from caffeish.errors import ShapeError
from caffeish.geometry import pool_params, reported_by, spp_pool_param
from caffeish.registry import Layer, register
from caffeish.schema import pb


def _check_4d(layer, shape):
    if len(shape) != 4:
        raise layer.error(
            f"the bottom must have 4 axes (num, channels, height, width), got shape {tuple(shape)}"
        )


@register("Pooling")
class Pooling(Layer):
    """Caffe's Pooling: (N, C, H, W) -> (N, C, pooled_h, pooled_w).

    MAX, AVE and STOCHASTIC pooling share the size rule (ceil by default, with the
    pad-only clip rule).  A second top, the argmax mask, is allowed only for MAX
    and has the same shape as the first.
    """

    exact_bottoms = 1
    min_tops = 1
    max_tops = 2

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.pool_param = param.pooling_param
        self.method = self.pool_param.pool
        # Set by reshape(), for the forward pass.
        self.geometry = None

    def reshape(self, bottom_shapes):
        bottom = tuple(bottom_shapes[0])
        _check_4d(self, bottom)
        n_tops = len(self.param.top)
        if n_tops > 1 and self.method != pb.PoolingParameter.MAX:
            method = pb.PoolingParameter.PoolMethod.Name(self.method)
            raise self.error(f"a second top (the max mask) is only allowed for MAX pooling, not {method}")
        n, c, h, w = bottom
        with reported_by(self):
            self.geometry = pool_params(self.pool_param, h, w)
        top = (n, c) + self.geometry.out
        return [top] * n_tops


@register("SPP")
class SPP(Layer):
    """Caffe's spatial pyramid pooling.

    Level l (0 <= l < pyramid_height) pools the input into 2**l x 2**l bins with
    the window chosen by geometry.spp_pool_param; each level's output is flattened
    and the levels are concatenated, so the top is (N, C * sum of the levels'
    pooled_h*pooled_w), normally (N, C * sum 4**l).  With pyramid_height 1 Caffe
    returns the single pooling's 4-D output (N, C, 1, 1) instead.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.pyramid_height = param.spp_param.pyramid_height
        # SPPParameter.PoolMethod has the same numbers as PoolingParameter.PoolMethod.
        self.method = param.spp_param.pool
        # Set by reshape(): the PoolGeometry of each level.
        self.levels = None

    def reshape(self, bottom_shapes):
        bottom = tuple(bottom_shapes[0])
        _check_4d(self, bottom)
        n, c, h, w = bottom
        if h <= 0 or w <= 0:
            raise self.error(f"input height and width must be positive, got {h}x{w}")
        if self.pyramid_height < 1:
            raise self.error("spp_param.pyramid_height must be at least 1")
        levels = []
        for level in range(self.pyramid_height):
            pp = spp_pool_param(level, h, w, self.method)
            try:
                levels.append(pool_params(pp, h, w))
            except ShapeError as exc:
                bins = 2 ** level
                raise self.error(
                    f"pyramid level {level} ({bins}x{bins} bins on a {h}x{w} input): {exc}"
                ) from None
        self.levels = levels
        if self.pyramid_height == 1:
            return [(n, c) + levels[0].out]
        return [(n, c * sum(g.out[0] * g.out[1] for g in levels))]
