"""A float64 convolution by definition and random small geometries, for the fast paths' tests."""
import numpy as np

from caffeish.errors import ShapeError
from caffeish.graph.geometry import ConvGeometry, conv_output_shape


def taps(shape, geom, group, o, out):
    """(group slices of x's and y's channels, tap, output and input positions) of every product."""
    _, c, h, wd = shape
    cg, og = c // group, o // group
    for g in range(group):
        for qi in range(geom.kernel[0]):
            for qj in range(geom.kernel[1]):
                for p in range(out[0]):
                    r = p * geom.stride[0] - geom.pad[0] + qi * geom.dilation[0]
                    if not 0 <= r < h:
                        continue
                    for t in range(out[1]):
                        s = t * geom.stride[1] - geom.pad[1] + qj * geom.dilation[1]
                        if 0 <= s < wd:
                            yield slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og), qi, qj, p, t, r, s


def reference(x, w, b, geom, group, out, dy):
    """float64 convolution and its gradients by definition (loops over taps)."""
    x, w, dy = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    o = w.shape[0]
    y = np.zeros((x.shape[0], o) + out)
    dx, dw = np.zeros(x.shape), np.zeros(w.shape)
    for cs, os_, qi, qj, p, t, r, s in taps(x.shape, geom, group, o, out):
        y[:, os_, p, t] += x[:, cs, r, s] @ w[os_, :, qi, qj].T
        dx[:, cs, r, s] += dy[:, os_, p, t] @ w[os_, :, qi, qj]
        dw[os_, :, qi, qj] += dy[:, os_, p, t].T @ x[:, cs, r, s]
    if b is not None:
        y += b.reshape(1, o, 1, 1)
    return y, dx, dw


def random_case(rng, kernel=None, stride=None, dilation=None, group=None):
    """(x shape, group, output channels, geometry, output size) of a random small 2-D convolution;
    `kernel`, `stride`, `dilation`, `group` fix those."""
    group = int(rng.choice([1, 1, 2, 3])) if group is None else group
    cg, og = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    kernel = (int(rng.integers(2, 5)), int(rng.integers(1, 5))) if kernel is None else kernel
    dil = (int(rng.integers(1, 3)), int(rng.integers(1, 3))) if dilation is None else dilation
    pad = (int(rng.integers(0, 6)), int(rng.integers(0, 6)))
    stride = (1, int(rng.integers(1, 4))) if stride is None else stride
    geom = ConvGeometry(kernel, stride, pad, dil)
    while True:
        shape = (int(rng.integers(1, 3)), cg * group, int(rng.integers(1, 12)), int(rng.integers(1, 12)))
        try:
            out = tuple(conv_output_shape(shape[2:], geom))
        except ShapeError:
            continue
        if min(out) > 0:
            return shape, group, og * group, geom, out
