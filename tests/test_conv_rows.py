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

from caffeish.graph.geometry import ConvGeometry
from caffeish.runtime import blas, conv_grad, conv_rows, im2col
from conv_reference import random_case, reference

pytestmark = pytest.mark.skipif(not blas.have_sgemm(), reason="numpy's OpenBLAS is not reachable here")


@pytest.fixture
def small_thresholds(monkeypatch):
    monkeypatch.setattr(conv_rows, "MIN_COLUMNS", 1)
    monkeypatch.setattr(conv_rows, "MIN_DEPTH", 1)
    monkeypatch.setattr(conv_rows, "BAND_BUDGET", 600)


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
