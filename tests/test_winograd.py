"""Winograd F(2x2, 3x3) (caffeish.runtime.winograd) against float64, forward and input gradient.

The path only takes deep 3x3 stride-1 convolutions on big images; here its
thresholds are lowered (and its band budget shrunk, so that images split into
several bands of tile rows) to run it on many small random cases: odd sizes
(half-empty tiles), pads 0 to 2 (and 3, where the input gradient falls back),
one-pixel images.
"""
import numpy as np
import pytest

from caffeish.graph.geometry import ConvGeometry
from caffeish.runtime import conv_grad, im2col, winograd
from conv_reference import random_case, reference


@pytest.fixture
def small_thresholds(monkeypatch):
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "BACKWARD_MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_TILES", 1)
    monkeypatch.setattr(winograd, "BAND_BUDGET", 300)


@pytest.mark.parametrize("seed", range(80))
def test_forward_and_input_gradient_match_float64(small_thresholds, monkeypatch, seed):
    if seed % 4 == 0:  # a budget that holds several whole images: chunks of images, not bands
        monkeypatch.setattr(winograd, "BAND_BUDGET", 1 << 22)
    rng = np.random.default_rng(seed)
    shape, group, o, geom, out = random_case(rng, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), group=1)
    x = rng.standard_normal(shape, dtype=np.float32)
    w = rng.standard_normal((o, shape[1], 3, 3), dtype=np.float32)
    b = rng.standard_normal(o, dtype=np.float32) if seed % 2 else None
    dy = rng.standard_normal((shape[0], o) + out, dtype=np.float32)
    assert winograd.applies(np, x, geom, 1, out)
    want_y, want_dx, want_dw = reference(x, w, b, geom, 1, out, dy)

    y = im2col.conv_forward(np, x, w, b, geom, 1, out)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    dw = np.zeros_like(w)
    dx = conv_grad.conv_backward(np, x, w, dy, geom, 1, True, dw, None)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


def test_the_paths_are_taken(small_thresholds, monkeypatch):
    """Forward and input gradient go through winograd.forward (pad <= 2; pad 3 falls back), the
    weight gradient through winograd.weight_gradient."""
    calls = []
    real = winograd.forward
    monkeypatch.setattr(winograd, "forward", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 6, 7), dtype=np.float32)
    w = rng.standard_normal((5, 4, 3, 3), dtype=np.float32)
    grads = []
    real_grad = winograd.weight_gradient
    monkeypatch.setattr(winograd, "weight_gradient", lambda *a, **k: grads.append(1) or real_grad(*a, **k))
    for pad, expected in ((1, 2), (3, 1)):
        calls.clear()
        grads.clear()
        geom = ConvGeometry((3, 3), (1, 1), (pad, pad), (1, 1))
        out = (6 + 2 * pad - 2, 7 + 2 * pad - 2)
        im2col.conv_forward(np, x, w, None, geom, 1, out)
        dw = np.zeros_like(w)
        conv_grad.conv_backward(np, x, w, np.ones((1, 5) + out, np.float32), geom, 1, True, dw, None)
        assert len(calls) == expected and len(grads) == 1


def test_weight_transform_is_g_g_gt():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 2, 3, 3), dtype=np.float32)
    g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    want = np.einsum("ai,ocij,bj->aboc", g, w.astype(np.float64), g).reshape(16, 3, 2)
    np.testing.assert_allclose(winograd.transform_weight(w), want, rtol=1e-6, atol=1e-6)


def test_shipped_thresholds():
    """VGG's conv4 (512 channels at 88x88) takes it; its conv1_2 (64 channels), AlexNet's 13x13
    layers, groups and strides do not."""
    geom = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    assert winograd.applies(np, np.zeros((1, 512, 88, 88), np.float32), geom, 1, (88, 88))
    assert not winograd.applies(np, np.zeros((1, 64, 88, 88), np.float32), geom, 1, (88, 88))
    assert not winograd.applies(np, np.zeros((10, 384, 13, 13), np.float32), geom, 1, (13, 13))
    assert not winograd.applies(np, np.zeros((1, 512, 88, 88), np.float32), geom, 2, (88, 88))
    strided = ConvGeometry((3, 3), (2, 2), (1, 1), (1, 1))
    assert not winograd.applies(np, np.zeros((1, 512, 88, 88), np.float32), strided, 1, (44, 44))
    # the backward from 128 channels on both sides
    assert winograd.applies(np, np.zeros((1, 128, 88, 88), np.float32), geom, 1, (88, 88),
                            min_channels=winograd.BACKWARD_MIN_CHANNELS)
