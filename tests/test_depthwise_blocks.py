"""Depthwise convolutions with big strides by s x s blocks (im2col._conv_depthwise_blocks), as the
adjoint of FCN's upsampling Deconvolutions computes them, against float64 by definition."""
import numpy as np
import pytest

from caffeish.errors import ShapeError
from caffeish.graph.geometry import ConvGeometry, conv_output_shape
from caffeish.runtime import im2col
from conv_reference import reference


@pytest.mark.parametrize("seed", range(40))
def test_matches_float64(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(1, 4))
    s = (int(rng.integers(4, 9)), int(rng.integers(4, 9)))
    k = (int(rng.integers(1, 3 * s[0])), int(rng.integers(1, 3 * s[1])))
    pad = (int(rng.integers(0, k[0])), int(rng.integers(0, k[1])))
    geom = ConvGeometry(k, s, pad, (1, 1))
    while True:
        shape = (int(rng.integers(1, 3)), c, int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        try:
            out = tuple(conv_output_shape(shape[2:], geom))
        except ShapeError:
            continue
        if min(out) > 0:
            break
    x = rng.standard_normal(shape, dtype=np.float32)
    w = rng.standard_normal((c, 1) + k, dtype=np.float32)
    calls = []
    real = im2col._conv_depthwise_blocks
    monkeypatch.setattr(im2col, "_conv_depthwise_blocks", lambda *a: calls.append(1) or real(*a))
    y = im2col.conv_forward(np, x, w, None, geom, c, out)
    assert calls
    want, _, _ = reference(x, w, None, geom, c, out, np.zeros((shape[0], c) + out, np.float32))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def test_small_strides_keep_the_tap_loop():
    assert not im2col._strided_blocks(ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1)))
    assert not im2col._strided_blocks(ConvGeometry((16, 16), (8, 8), (0, 0), (2, 2)))
    assert im2col._strided_blocks(ConvGeometry((63, 63), (32, 32), (0, 0), (1, 1)))
