"""The row-shifted GEMM convolution (caffeish.runtime.conv_rows) against float64 and im2col.

The path only takes big 2-D convolutions with stride 1 down the rows; here its
thresholds are lowered (and its band budget shrunk, so that images split into
many bands whose stacked rows overlap) to run it on many small random
geometries: pads bigger than the kernel, dilation, column strides, groups,
outputs with an empty kernel column.  Forward, input and weight gradients must
agree with a float64 reference to float32 rounding, and with the im2col path.
"""
import numpy as np
import pytest

from caffeish.errors import ShapeError
from caffeish.graph.geometry import ConvGeometry, conv_output_shape
from caffeish.runtime import blas, conv_grad, conv_rows, im2col

pytestmark = pytest.mark.skipif(not blas.have_sgemm(), reason="numpy's OpenBLAS is not reachable here")


@pytest.fixture
def small_thresholds(monkeypatch):
    monkeypatch.setattr(conv_rows, "MIN_COLUMNS", 1)
    monkeypatch.setattr(conv_rows, "MIN_DEPTH", 1)
    monkeypatch.setattr(conv_rows, "BAND_BUDGET", 600)


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


def random_case(rng):
    group = int(rng.choice([1, 1, 2, 3]))
    cg, og = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    kernel = (int(rng.integers(2, 5)), int(rng.integers(1, 5)))
    dil = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    pad = (int(rng.integers(0, 6)), int(rng.integers(0, 6)))
    stride = (1, int(rng.integers(1, 4)))
    geom = ConvGeometry(kernel, stride, pad, dil)
    while True:
        shape = (int(rng.integers(1, 3)), cg * group, int(rng.integers(1, 12)), int(rng.integers(1, 12)))
        try:
            out = tuple(conv_output_shape(shape[2:], geom))
        except ShapeError:
            continue
        if min(out) > 0:
            return shape, group, og * group, geom, out


@pytest.mark.parametrize("seed", range(120))
def test_forward_and_backward_match_float64(small_thresholds, seed):
    rng = np.random.default_rng(seed)
    shape, group, o, geom, out = random_case(rng)
    x = rng.standard_normal(shape, dtype=np.float32)
    w = rng.standard_normal((o, shape[1] // group) + geom.kernel, dtype=np.float32)
    b = rng.standard_normal(o, dtype=np.float32) if seed % 3 else None
    assert conv_rows.applies(np, x, geom, group, out)

    dy = rng.standard_normal((shape[0], o) + out, dtype=np.float32)
    want_y, want_dx, want_dw = reference(x, w, b, geom, group, out, dy)
    y = im2col.conv_forward(np, x, w, b, geom, group, out)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    dw = np.full(w.shape, 0.5, dtype=np.float32)  # diffs accumulate into what is there
    dx = conv_grad.conv_backward(np, x, w, dy, geom, group, True, dw, None)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, want_dw + 0.5, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(40))
def test_agrees_with_im2col(small_thresholds, monkeypatch, seed):
    rng = np.random.default_rng(1000 + seed)
    shape, group, o, geom, out = random_case(rng)
    x = rng.standard_normal(shape, dtype=np.float32)
    w = rng.standard_normal((o, shape[1] // group) + geom.kernel, dtype=np.float32)
    b = rng.standard_normal(o, dtype=np.float32)
    dy = rng.standard_normal((shape[0], o) + out, dtype=np.float32)
    y = im2col.conv_forward(np, x, w, b, geom, group, out)
    dw = np.zeros_like(w)
    dx = conv_grad.conv_backward(np, x, w, dy, geom, group, True, dw, None)
    monkeypatch.setattr(conv_rows, "applies", lambda *a: False)
    y0 = im2col.conv_forward(np, x, w, b, geom, group, out)
    dw0 = np.zeros_like(w)
    dx0 = conv_grad.conv_backward(np, x, w, dy, geom, group, True, dw0, None)
    for ours, theirs in ((y, y0), (dx, dx0), (dw, dw0)):
        scale = max(1.0, float(np.abs(theirs).max()))
        assert float(np.abs(ours - theirs).max()) <= 1e-5 * scale


def test_only_weights_or_only_input(small_thresholds):
    rng = np.random.default_rng(7)
    geom = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    x = rng.standard_normal((2, 4, 9, 10), dtype=np.float32)
    w = rng.standard_normal((5, 4, 3, 3), dtype=np.float32)
    dy = rng.standard_normal((2, 5, 9, 10), dtype=np.float32)
    dw_both = np.zeros_like(w)
    dx_both = conv_grad.conv_backward(np, x, w, dy, geom, 1, True, dw_both, None)
    dw = np.zeros_like(w)
    assert conv_grad.conv_backward(np, x, w, dy, geom, 1, False, dw, None) is None
    dx = conv_grad.conv_backward(np, x, w, dy, geom, 1, True, None, None)
    np.testing.assert_array_equal(dw, dw_both)
    np.testing.assert_array_equal(dx, dx_both)


def test_big_layers_take_the_path():
    """The thresholds as shipped: VGG's 3x3 convolutions take it, conv1_1 (3 channels) does not."""
    geom = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    x = np.zeros((1, 64, 100, 100), dtype=np.float32)
    assert conv_rows.applies(np, x, geom, 1, (100, 100))
    assert not conv_rows.applies(np, np.zeros((1, 3, 100, 100), dtype=np.float32), geom, 1, (100, 100))
    assert not conv_rows.applies(np, x, ConvGeometry((3, 3), (2, 2), (1, 1), (1, 1)), 1, (50, 50))
