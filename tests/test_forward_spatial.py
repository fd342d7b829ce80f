"""Forward passes of Convolution, Deconvolution, Im2col, Pooling, SPP and Crop.

Three kinds of check:
1. against slow, obviously-correct loop references on tiny random inputs;
2. the golden cases: every layer of the net run on Caffe's recorded bottoms,
   every top compared with Caffe's recorded blob (meta.json's tolerance);
3. the values of Caffe's own unit tests (test_vectors.json).
"""
import json
import math
import re
from fractions import Fraction

import numpy as np
import pytest
from google.protobuf import text_format

from caffeish.errors import UnsupportedError
from caffeish.runtime.fillers import fill
from caffeish.graph.graph import Graph
from caffeish.runtime.im2col import conv_forward, deconv_forward
from caffeish.formats.io import read_prototxt
from caffeish.graph.registry import create
from caffeish.formats.schema import TEST, TRAIN, pb
from conftest import SHARED, shared_path

FLT_MAX = float(np.finfo(np.float32).max)


def make(text, phase=TEST):
    return create(text_format.Parse(text, pb.LayerParameter()), phase)


def run(lay, bottoms, blobs=()):
    lay.reshape([b.shape for b in bottoms])
    tops = lay.forward(np, list(bottoms), list(blobs))
    assert len(tops) == len(lay.param.top)
    for t in tops:
        assert t.dtype == np.float32
    return tops


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(ours - ref)) / (np.max(np.abs(ref)) + 1e-12))


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# -- slow references -------------------------------------------------------------------


def ref_conv(x, w, b, stride, pad, dil, group):
    """Caffe's formula, one output position and one tap at a time (float64)."""
    n, c = x.shape[:2]
    o = w.shape[0]
    kernel = w.shape[2:]
    cg, og = c // group, o // group
    spatial = x.shape[2:]
    # C's truncating division: a window may stick out past the padded input.
    out = tuple(int((i + 2 * p - (d * (k - 1) + 1)) / s) + 1
                for i, k, s, p, d in zip(spatial, kernel, stride, pad, dil))
    y = np.zeros((n, o) + out)
    for pos in np.ndindex(*out):
        for q in np.ndindex(*kernel):
            src = [pi * s - p + qi * d for pi, s, p, qi, d in zip(pos, stride, pad, q, dil)]
            if not all(0 <= v < size for v, size in zip(src, spatial)):
                continue
            for g in range(group):
                xv = x[(slice(None), slice(g * cg, (g + 1) * cg)) + tuple(src)].astype(np.float64)  # (n, cg)
                wv = w[(slice(g * og, (g + 1) * og), slice(None)) + q].astype(np.float64)  # (og, cg)
                y[(slice(None), slice(g * og, (g + 1) * og)) + pos] += xv @ wv.T
    if b is not None:
        y += b.reshape((1, o) + (1,) * len(out))
    return y


def ref_deconv(x, w, b, stride, pad, dil, group):
    """Scatter every input position through every tap, dropping positions outside the output."""
    n, c = x.shape[:2]
    og = w.shape[1]
    o = og * group
    cg = c // group
    kernel = w.shape[2:]
    spatial = x.shape[2:]
    out = tuple(s * (i - 1) + d * (k - 1) + 1 - 2 * p
                for i, k, s, p, d in zip(spatial, kernel, stride, pad, dil))
    y = np.zeros((n, o) + out)
    for pos in np.ndindex(*spatial):
        for q in np.ndindex(*kernel):
            dst = [pi * s - p + qi * d for pi, s, p, qi, d in zip(pos, stride, pad, q, dil)]
            if not all(0 <= v < size for v, size in zip(dst, out)):
                continue
            for g in range(group):
                xv = x[(slice(None), slice(g * cg, (g + 1) * cg)) + pos].astype(np.float64)  # (n, cg)
                wv = w[(slice(g * cg, (g + 1) * cg), slice(None)) + q].astype(np.float64)  # (cg, og)
                y[(slice(None), slice(g * og, (g + 1) * og)) + tuple(dst)] += xv @ wv
    if b is not None:
        y += b.reshape((1, o) + (1,) * len(out))
    return y


def ref_pool(x, method, kernel, stride, pad, out):
    """Caffe's CPU pooling loops (and its GPU test-time STOCHASTIC), one window at a time."""
    n, c, h, w = x.shape
    top = np.zeros((n, c) + out, np.float32)
    mask = np.full((n, c) + out, -1.0, np.float32)
    for ni, ci, ph, pw in np.ndindex(n, c, *out):
        hs, ws = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
        if method == "AVE":
            he, we = min(hs + kernel[0], h + pad[0]), min(ws + kernel[1], w + pad[1])
            size = (he - hs) * (we - ws)
            total = np.float32(0)
            for hh in range(max(hs, 0), min(he, h)):
                for ww in range(max(ws, 0), min(we, w)):
                    total = np.float32(total + x[ni, ci, hh, ww])
            top[ni, ci, ph, pw] = total / np.float32(size)
            continue
        he, we = min(hs + kernel[0], h), min(ws + kernel[1], w)
        hs, ws = max(hs, 0), max(ws, 0)
        if method == "MAX":
            best, arg = np.float32(-FLT_MAX), -1
            for hh in range(hs, he):
                for ww in range(ws, we):
                    if x[ni, ci, hh, ww] > best:
                        best, arg = x[ni, ci, hh, ww], hh * w + ww
            top[ni, ci, ph, pw], mask[ni, ci, ph, pw] = best, arg
        else:  # STOCHASTIC at TEST
            s1 = s2 = np.float32(0)
            for hh in range(hs, he):
                for ww in range(ws, we):
                    v = x[ni, ci, hh, ww]
                    s1, s2 = np.float32(s1 + v), np.float32(s2 + v * v)
            top[ni, ci, ph, pw] = s2 / s1 if s1 > 0 else 0
    return top, mask


# -- convolution against the reference -----------------------------------------------


CONV_CASES = [
    # (bottom shape, convolution_param text)
    ((2, 3, 7, 8), "num_output: 4 kernel_size: 3"),
    ((2, 4, 9, 7), "num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2"),
    ((1, 3, 11, 10), "num_output: 2 kernel_size: 3 dilation: 2 pad: 1"),
    ((2, 2, 8, 9), "num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 2 pad_w: 0"),
    ((2, 5, 6, 6), "num_output: 4 kernel_size: 1 bias_term: false"),
    ((2, 4, 7, 9), "num_output: 6 kernel_size: 1 stride: 2"),
    ((2, 6, 7, 7), "num_output: 6 kernel_size: 3 pad: 1 group: 6"),  # depthwise
    ((1, 4, 7, 7), "num_output: 8 kernel_size: 3 group: 4 dilation: 2 pad: 2"),
    ((1, 2, 2, 5), "num_output: 2 kernel_size: 3 stride: 2"),  # window sticks out past the input
    ((2, 2, 3, 5, 4), "num_output: 3 kernel_size: 2 kernel_size: 3 kernel_size: 2 pad: 1 stride: 1 stride: 2 stride: 1"),
    ((2, 4, 4, 5, 4), "num_output: 4 kernel_size: 3 group: 2 dilation: 1 dilation: 2 dilation: 1 pad: 1"),
    ((3, 2, 4, 6, 5), "num_output: 3 kernel_size: 3 axis: 2"),  # N = 3*2, 2 spatial axes
]


def check_against_reference(kind, shape, params, reference, seed):
    """Run a Convolution/Deconvolution layer on random data and compare with the loop reference."""
    rng = np.random.default_rng(seed)
    lay = make(f'name: "c" type: "{kind}" bottom: "x" top: "y" convolution_param {{ {params} }}')
    x = rand(rng, *shape)
    top_shape = lay.reshape([shape])[0]
    blobs = [rand(rng, *s) for s in lay.param_shapes([shape])]
    (y,) = run(lay, [x], blobs)
    assert y.shape == top_shape
    axis = lay.channel_axis
    x4 = x.reshape((math.prod(shape[:axis]),) + shape[axis:])
    g = lay.geometry
    ref = reference(x4, blobs[0], blobs[1] if lay.bias_term else None, g.stride, g.pad, g.dilation, lay.group)
    assert rel_err(y, ref.reshape(top_shape)) < 1e-5


@pytest.mark.parametrize("shape,params", CONV_CASES)
def test_convolution_matches_reference(shape, params):
    check_against_reference("Convolution", shape, params, ref_conv, seed=0)


def test_convolution_chunked_columns_match_unchunked():
    """A tiny column budget forces bands of rows and single images: same numbers."""
    rng = np.random.default_rng(1)
    lay = make('name: "c" type: "Convolution" bottom: "x" top: "y" '
               'convolution_param { num_output: 5 kernel_size: 3 pad: 1 group: 1 }')
    x = rand(rng, 3, 4, 9, 8)
    lay.reshape([x.shape])
    w, b = rand(rng, 5, 4, 3, 3), rand(rng, 5)
    full = conv_forward(np, x, w, b, lay.geometry, 1, (9, 8))
    # 1: bands of rows, each padded on its own; 288: one image per chunk; 5184: all three at once.
    for budget in (1, 4 * 9 * 8, 4 * 9 * 8 * 9 * 2):
        chunked = conv_forward(np, x, w, b, lay.geometry, 1, (9, 8), budget=budget)
        assert rel_err(chunked, full) < 1e-6
    assert rel_err(full, ref_conv(x, w, b, (1, 1), (1, 1), (1, 1), 1)) < 1e-5


def test_convolution_several_bottoms_share_weights():
    rng = np.random.default_rng(2)
    lay = make('name: "c" type: "Convolution" bottom: "a" bottom: "b" top: "ya" top: "yb" '
               'convolution_param { num_output: 3 kernel_size: 2 }')
    a, b = rand(rng, 2, 2, 5, 5), rand(rng, 2, 2, 5, 5)
    lay.reshape([a.shape, b.shape])
    blobs = [rand(rng, 3, 2, 2, 2), rand(rng, 3)]
    ya, yb = run(lay, [a, b], blobs)
    assert rel_err(ya, ref_conv(a, *blobs, (1, 1), (0, 0), (1, 1), 1)) < 1e-5
    assert rel_err(yb, ref_conv(b, *blobs, (1, 1), (0, 0), (1, 1), 1)) < 1e-5


def test_convolution_does_not_write_its_inputs():
    rng = np.random.default_rng(3)
    lay = make('name: "c" type: "Convolution" bottom: "x" top: "y" '
               'convolution_param { num_output: 2 kernel_size: 1 }')
    x = rand(rng, 1, 2, 3, 3)
    blobs = [rand(rng, 2, 2, 1, 1), rand(rng, 2)]
    copies = [x.copy()] + [b.copy() for b in blobs]
    run(lay, [x], blobs)
    for before, after in zip(copies, [x] + blobs):
        assert np.array_equal(before, after)


def test_convolution_fillers_default_to_constant_zero():
    lay = make('name: "c" type: "Convolution" convolution_param { num_output: 2 kernel_size: 1 '
               'weight_filler { type: "xavier" } }')
    weight, bias = lay.fillers()
    assert weight.type == "xavier"
    assert bias.type == "constant" and bias.value == 0
    no_bias = make('name: "c" type: "Convolution" convolution_param { num_output: 2 kernel_size: 1 bias_term: false }')
    assert len(no_bias.fillers()) == 1


# -- deconvolution against the reference -------------------------------------------------


DECONV_CASES = [
    ((2, 3, 4, 5), "num_output: 2 kernel_size: 4 stride: 2"),
    ((2, 4, 3, 4), "num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2"),
    ((1, 3, 4, 4), "num_output: 3 kernel_size: 4 stride: 2 pad: 1 group: 3 bias_term: false"),
    ((2, 2, 3, 5), "num_output: 2 kernel_size: 3 dilation: 2 stride: 2 pad: 1"),
    ((1, 2, 4, 3), "num_output: 3 kernel_h: 2 kernel_w: 5 stride_h: 3 stride_w: 2 pad_h: 0 pad_w: 1"),
    ((1, 2, 3, 3), "num_output: 2 kernel_size: 2 stride: 3"),  # stride larger than kernel: gaps
    ((1, 2, 3, 4), "num_output: 2 kernel_size: 3 stride: 1"),
    ((2, 2, 3, 2, 3), "num_output: 2 kernel_size: 2 kernel_size: 3 kernel_size: 2 stride: 2 pad: 1"),
    ((2, 3, 3, 4), "num_output: 2 kernel_size: 3 stride: 2 axis: 2"),  # N = 2*3, 1 spatial axis
]


@pytest.mark.parametrize("shape,params", DECONV_CASES)
def test_deconvolution_matches_reference(shape, params):
    check_against_reference("Deconvolution", shape, params, ref_deconv, seed=4)


@pytest.mark.parametrize("dilation", [1, 2])
def test_deconvolution_chunked_matches_unchunked(dilation):
    rng = np.random.default_rng(5)
    lay = make(f'name: "d" type: "Deconvolution" bottom: "x" top: "y" '
               f'convolution_param {{ num_output: 3 kernel_size: 4 stride: 2 pad: 1 dilation: {dilation} }}')
    x = rand(rng, 3, 2, 5, 4)
    out = lay.reshape([x.shape])[0][2:]
    w, b = rand(rng, 2, 3, 4, 4), rand(rng, 3)
    full = deconv_forward(np, x, w, b, lay.geometry, 1, out)
    for budget in (1, 3 * 16 * 4 * 2):
        assert rel_err(deconv_forward(np, x, w, b, lay.geometry, 1, out, budget=budget), full) < 1e-6
    assert rel_err(full, ref_deconv(x, w, b, (2, 2), (1, 1), (dilation,) * 2, 1)) < 1e-5


def test_deconvolution_is_the_adjoint_of_convolution():
    """<conv(x), y> == <x, deconv(y)> with the same weight blob and geometry."""
    rng = np.random.default_rng(6)
    params = "num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 bias_term: false dilation: 1"
    conv = make(f'name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param {{ {params} }}')
    x = rand(rng, 2, 6, 9, 9)
    (yshape,) = conv.reshape([x.shape])
    # Conv weight (O=4, C/g=3, k, k) is the deconv weight of a deconv from 4 to 6 channels.
    w = rand(rng, 4, 3, 3, 3)
    (cx,) = run(conv, [x], [w])
    deconv = make(f'name: "d" type: "Deconvolution" bottom: "y" top: "z" '
                  f'convolution_param {{ {params.replace("num_output: 4", "num_output: 6")} }}')
    y = rand(rng, *yshape)
    deconv.reshape([y.shape])
    (dy,) = run(deconv, [y], [w])
    assert dy.shape == x.shape
    lhs = float(np.sum(cx.astype(np.float64) * y))
    rhs = float(np.sum(x.astype(np.float64) * dy))
    assert abs(lhs - rhs) <= 1e-4 * max(abs(lhs), 1.0)


# -- Im2col ----------------------------------------------------------------------------------


def test_im2col_layout_is_channel_then_tap():
    rng = np.random.default_rng(7)
    lay = make('name: "i" type: "Im2col" bottom: "x" top: "y" '
               'convolution_param { kernel_h: 2 kernel_w: 3 stride: 2 pad: 1 dilation: 2 }')
    x = rand(rng, 2, 3, 6, 7)
    (y,) = run(lay, [x])
    n, ck, oh, ow = y.shape
    assert ck == 3 * 6
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for c, i, j in np.ndindex(3, 2, 3):
        for ph, pw in np.ndindex(oh, ow):
            h, w = ph * 2 + i * 2, pw * 2 + j * 2
            expected = xp[:, c, h, w] if h < xp.shape[2] and w < xp.shape[3] else 0
            assert np.array_equal(y[:, c * 6 + i * 3 + j, ph, pw], expected)


def test_im2col_then_matmul_is_convolution():
    rng = np.random.default_rng(8)
    params = "kernel_size: 3 stride: 1 pad: 1"
    x = rand(rng, 1, 2, 3, 4, 5)  # 3-D spatial
    (cols,) = run(make(f'name: "i" type: "Im2col" bottom: "x" top: "y" convolution_param {{ {params} }}'), [x])
    w = rand(rng, 3, 2, 3, 3, 3)
    y = np.einsum("ok,nk...->no...", w.reshape(3, -1), cols)
    assert rel_err(y, ref_conv(x, w, None, (1,) * 3, (1,) * 3, (1,) * 3, 1)) < 1e-5


# -- pooling against the reference -------------------------------------------------------------


POOL_CASES = [
    # (bottom shape, pooling_param text)
    ((2, 3, 7, 9), "pool: MAX kernel_size: 3 stride: 2"),
    ((2, 2, 7, 8), "pool: MAX kernel_size: 3 stride: 2 pad: 1"),
    ((1, 2, 6, 7), "pool: MAX kernel_size: 2 stride: 2 pad: 1"),
    ((2, 2, 9, 9), "pool: AVE kernel_size: 3 stride: 2"),
    ((2, 2, 5, 5), "pool: AVE kernel_size: 2 stride: 2 pad: 1"),
    ((2, 2, 8, 7), "pool: AVE kernel_size: 3 stride: 2 pad: 1"),
    ((1, 2, 7, 6), "pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0"),
    ((2, 2, 8, 8), "pool: AVE kernel_size: 3 stride: 2 round_mode: FLOOR"),
    ((2, 3, 7, 9), "pool: STOCHASTIC kernel_size: 3 stride: 2"),
    ((2, 3, 6, 5), "pool: MAX global_pooling: true"),
    ((2, 3, 6, 5), "pool: AVE global_pooling: true"),
    ((1, 2, 5, 5), "pool: MAX kernel_size: 1 stride: 3"),  # last window starts past the input
    ((1, 2, 5, 5), "pool: AVE kernel_size: 2 stride: 3"),
]


@pytest.mark.parametrize("shape,params", POOL_CASES)
def test_pooling_matches_reference(shape, params):
    rng = np.random.default_rng(9)
    x = rand(rng, *shape)
    if "STOCHASTIC" in params:
        x[0, 0] = -np.abs(x[0, 0])  # a plane whose windows all sum below 0
        x[0, 1] = np.abs(x[0, 1])
    x = np.round(x, 1)  # ties for MAX
    with_mask = "MAX" in params
    tops = 'top: "y" top: "m"' if with_mask else 'top: "y"'
    lay = make(f'name: "p" type: "Pooling" bottom: "x" {tops} pooling_param {{ {params} }}')
    out = run(lay, [x])
    g = lay.geometry
    method = params.split()[1]
    top, mask = ref_pool(x, method, g.kernel, g.stride, g.pad, g.out)
    assert rel_err(out[0], top) < 1e-6
    if with_mask:
        assert np.array_equal(out[1], mask)


def test_max_pool_ties_first_wins_and_padding_never_wins():
    x = np.full((1, 1, 4, 4), -5.0, np.float32)  # all ties, all below the zero padding
    lay = make('name: "p" type: "Pooling" bottom: "x" top: "y" top: "m" '
               'pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }')
    top, mask = run(lay, [x])
    # 3x3 windows starting at -1, 1, 3 on each axis.
    assert np.array_equal(top, np.full((1, 1, 3, 3), -5.0, np.float32))
    # Each window's first real cell in row-major order wins.
    assert mask.reshape(-1).tolist() == [0.0, 1.0, 3.0, 4.0, 5.0, 7.0, 12.0, 13.0, 15.0]


def test_max_pool_nan_never_wins():
    x = np.array([[[[np.nan, 1.0], [3.0, np.nan]]]], np.float32)
    for params in ("pool: MAX kernel_size: 2", "pool: MAX global_pooling: true"):
        lay = make(f'name: "p" type: "Pooling" bottom: "x" top: "y" top: "m" pooling_param {{ {params} }}')
        top, mask = run(lay, [x])
        assert top.item() == 3.0 and mask.item() == 2.0
        (alone,) = run(make(f'name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param {{ {params} }}'), [x])
        assert alone.item() == 3.0


def test_ave_pool_semantics_example():
    """semantics.md: 5x5 ones, k2 s2: all 1; with pad 1: corners 0.25, edges 0.5."""
    x = np.ones((1, 1, 5, 5), np.float32)
    (plain,) = run(make('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: AVE kernel_size: 2 stride: 2 }'), [x])
    assert np.array_equal(plain, np.ones((1, 1, 3, 3), np.float32))
    (padded,) = run(make('name: "p" type: "Pooling" bottom: "x" top: "y" '
                         'pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 }'), [x])
    expected = np.array([[0.25, 0.5, 0.5], [0.5, 1, 1], [0.5, 1, 1]], np.float32)
    assert np.array_equal(padded[0, 0], expected)


def test_stochastic_pooling_refuses_train():
    lay = make('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: STOCHASTIC kernel_size: 2 }', TRAIN)
    x = np.ones((1, 1, 4, 4), np.float32)
    lay.reshape([x.shape])
    with pytest.raises(UnsupportedError, match="STOCHASTIC"):
        lay.forward(np, [x], [])


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("height", [1, 3])
def test_spp_is_concatenated_poolings(method, height):
    rng = np.random.default_rng(10)
    x = rand(rng, 2, 3, 7, 10)
    lay = make(f'name: "s" type: "SPP" bottom: "x" top: "y" spp_param {{ pool: {method} pyramid_height: {height} }}')
    (y,) = run(lay, [x])
    parts = []
    for g in lay.levels:
        top, _ = ref_pool(x, method, g.kernel, g.stride, g.pad, g.out)
        parts.append(top)
    if height == 1:
        assert rel_err(y, parts[0]) < 1e-6
    else:
        assert rel_err(y, np.concatenate([p.reshape(2, -1) for p in parts], axis=1)) < 1e-6


# -- crop ------------------------------------------------------------------------------------


def test_crop_takes_offset_window():
    x = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6)
    ref = np.zeros((1, 2, 3, 2), np.float32)
    lay = make('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { axis: 1 offset: 1 offset: 2 offset: 3 }')
    (y,) = run(lay, [x, ref])
    assert np.array_equal(y, x[:, 1:3, 2:5, 3:5])


# -- golden cases ------------------------------------------------------------------------------


def bilinear(shape):
    """semantics.md section 4: the same kernel in every (out, in) slot."""
    k = shape[-1]
    f = math.ceil(k / 2)
    c = (k - 1) / (2 * f)
    r = 1 - np.abs(np.arange(k) / f - c)
    return np.broadcast_to(np.outer(r, r), shape).astype(np.float32)


def golden_params(case, graph):
    meta = json.loads(shared_path("golden", case, "meta.json").read_text())
    params_file = shared_path("golden", case).joinpath("params.npz")
    stored = dict(np.load(params_file)) if params_file.exists() else {}
    params = {}
    for node in graph.nodes:
        if not node.param_shapes:
            continue
        keys = [f"{node.name}/{i}" for i in range(len(node.param_shapes))]
        if meta["weights"] is None:
            # No weights file: the blobs come from the fillers (bilinear here).
            blobs = []
            for filler, shape in zip(node.layer.fillers(), node.param_shapes):
                assert filler.type == "bilinear"
                blob = fill(filler, shape)
                assert np.array_equal(blob, bilinear(shape))
                blobs.append(blob)
            for key, blob in zip(keys, blobs):
                if key in stored:
                    assert np.array_equal(blob, stored[key]), key
            params[node.name] = blobs
        else:
            params[node.name] = [stored[k] for k in keys]
    return params


@pytest.mark.parametrize("case", ["conv", "deconv", "deconv_bilinear_filler", "pool", "crop"])
def test_golden_layer_by_layer(case):
    meta = json.loads(shared_path("golden", case, "meta.json").read_text())
    net, _ = read_prototxt(shared_path("golden", case, "net.prototxt"))
    recorded = dict(np.load(shared_path("golden", case, "blobs.npz")))
    recorded.update(np.load(shared_path("golden", case, "inputs.npz")))
    graph = Graph(net)
    params = golden_params(case, graph)
    checked = 0
    for node in graph.nodes:
        if node.type == "Input":
            continue
        bottoms = [recorded[b] for b in node.bottoms]
        tops = run(node.layer, bottoms, params.get(node.name, []))
        for name, top in zip(node.tops, tops):
            expected = recorded[name]
            if name in meta["exact"] or meta["tolerance"] == 0:
                assert np.array_equal(top, expected), (case, node.name, name)
            else:
                err = rel_err(top, expected)
                assert err <= meta["tolerance"], (case, node.name, name, err)
            checked += 1
    assert checked >= 1


# -- Caffe's unit-test vectors ------------------------------------------------------------------


def vectors(layer_type):
    """The entries for one layer type (read at collection: none when ../shared is absent,
    and pytest then skips the parametrized test for its empty parameter set)."""
    path = SHARED / "caffe" / "test_vectors.json"
    if not path.is_file():
        return []
    return [e for e in json.loads(path.read_text()) if e["layer"] == layer_type]


def vector_ids(entries):
    return [e["test"] for e in entries]


def _field_text(name, value):
    if isinstance(value, bool):
        return f"{name}: {'true' if value else 'false'}"
    if isinstance(value, list):
        return " ".join(_field_text(name, v) for v in value)
    if isinstance(value, dict):
        inner = " ".join(_field_text(k, v) for k, v in value.items())
        return f"{name} {{ {inner} }}"
    if isinstance(value, str) and not value.isupper():
        return f'{name}: "{value}"'
    return f"{name}: {value}"


def vector_layer(entry, params=None, n_bottoms=1, n_tops=1):
    params = entry.get("params", {}) if params is None else params
    kind = {"Pooling": "pooling_param", "Convolution": "convolution_param",
            "Deconvolution": "convolution_param", "Crop": "crop_param"}[entry["layer"]]
    # Filler names given as plain strings ("gaussian") are descriptions; the test fills blobs itself.
    fields = " ".join(_field_text(k, v) for k, v in params.items()
                      if not (k.endswith("_filler") and isinstance(v, str)))
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(n_bottoms))
    tops = " ".join(f'top: "t{i}"' for i in range(n_tops))
    return make(f'name: "v" type: "{entry["layer"]}" {bottoms} {tops} {kind} {{ {fields} }}')


def _number(v):
    return float(Fraction(v)) if isinstance(v, str) else float(v)


@pytest.mark.parametrize("entry", vectors("Pooling"), ids=vector_ids(vectors("Pooling")))
def test_vectors_pooling(entry):
    shape = tuple(entry["bottom_shape"])
    with_mask = "top_mask_plane" in entry
    lay = vector_layer(entry, n_tops=2 if with_mask else 1)
    if "bottom_plane" in entry:
        x = np.broadcast_to(np.array(entry["bottom_plane"], np.float32).reshape(shape[2:]), shape).copy()
    elif "bottom" in entry:
        x = np.array(entry["bottom"], np.float32).reshape(shape)
    else:
        x = np.random.default_rng(11).standard_normal(shape).astype(np.float32)
    tops = run(lay, [x])
    assert tops[0].shape == tuple(entry["top_shape"])
    tol = entry.get("tolerance", 0)
    if "top_plane" in entry:
        plane = np.array(entry["top_plane"], np.float32).reshape(entry["top_shape"][2:])
        np.testing.assert_allclose(tops[0], np.broadcast_to(plane, tops[0].shape), rtol=1e-6, atol=tol)
    if "top" in entry:
        expected = np.array([_number(v) for v in entry["top"]]).reshape(entry["top_shape"])
        np.testing.assert_allclose(tops[0], expected, rtol=1e-6, atol=tol)
    if with_mask:
        plane = np.array(entry["top_mask_plane"], np.float32).reshape(entry["top_shape"][2:])
        assert np.array_equal(tops[1], np.broadcast_to(plane, tops[1].shape))


def _fill_blobs(lay, shapes, rng):
    return [rng.standard_normal(s).astype(np.float32) for s in lay.param_shapes(shapes)]


@pytest.mark.parametrize("entry", vectors("Convolution") + vectors("Deconvolution"),
                         ids=vector_ids(vectors("Convolution") + vectors("Deconvolution")))
def test_vectors_convolution(entry):
    rng = np.random.default_rng(12)
    if "full" in entry:  # TestSobelConvolution: the full Sobel filter == its two separable steps.
        shape = tuple(entry["bottom_shape"])
        x = rng.standard_normal(shape).astype(np.float32)

        def step(part, bottom):
            lay = vector_layer(entry, entry[part]["params"])
            w = np.array(entry[part].get("weight") or entry[part]["weight_per_channel"], np.float32)
            w = np.broadcast_to(w.reshape((1, 1) + tuple(entry[part]["weight_shape"][2:])),
                                entry[part]["weight_shape"]).copy()
            return run(lay, [bottom], [w])[0]

        full = step("full", x)
        sep = step("separable_step2", step("separable_step1", x))
        assert full.shape == sep.shape == (2, 1, 2, 1)
        np.testing.assert_allclose(full, sep, atol=1e-4)
        return
    bottom_shapes = [tuple(s) for s in entry.get("bottoms", [entry.get("bottom_shape")])]
    expected_shapes = [tuple(s) for s in entry.get("tops", [entry.get("top_shape")])]
    lay = vector_layer(entry, n_bottoms=len(bottom_shapes), n_tops=len(bottom_shapes))
    if "bottom_value" in entry:
        bottoms = [np.full(s, entry["bottom_value"], np.float32) for s in bottom_shapes]
    else:
        bottoms = [rng.standard_normal(s).astype(np.float32) for s in bottom_shapes]
    fillers = entry["params"]
    if isinstance(fillers.get("weight_filler"), dict):  # constant fillers given in full
        blobs = [np.full(s, f.value, np.float32) for f, s in zip(lay.fillers(), lay.param_shapes(bottom_shapes))]
    else:
        blobs = _fill_blobs(lay, bottom_shapes, rng)
    tops = run(lay, bottoms, blobs)
    assert [t.shape for t in tops] == expected_shapes
    if "weight_shape" in entry:
        assert blobs[0].shape == tuple(entry["weight_shape"])
    if "weight_shape_derived" in entry:
        assert blobs[0].shape == tuple(entry["weight_shape_derived"])
    if entry["test"] == "Test0DConvolution":
        # An inner product over the last axis.
        x, (w, b) = bottoms[0], blobs
        expected = np.einsum("...k,dk->...d", x.astype(np.float64), w.astype(np.float64)) + b
        np.testing.assert_allclose(tops[0], expected, atol=entry["tolerance"])
    elif entry["test"] == "TestSimpleDeconvolution":
        n, c, h, w = expected_shapes[0]
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hov = (hh % 2 == 0) & (hh > 0) & (hh < 12)
        wov = (ww % 2 == 0) & (ww > 0) & (ww < 8)
        plane = 3.1 + np.where(hov & wov, 9, np.where(hov | wov, 3, 0))
        for top in tops:
            np.testing.assert_allclose(top, np.broadcast_to(plane, top.shape), atol=entry["tolerance"])


@pytest.mark.parametrize("entry", vectors("Crop"), ids=vector_ids(vectors("Crop")))
def test_vectors_crop(entry):
    shapes = [tuple(s) for s in entry["bottoms"]]
    lay = vector_layer(entry, n_bottoms=2)
    data = np.arange(math.prod(shapes[0]), dtype=np.float32).reshape(shapes[0])
    (top,) = run(lay, [data, np.zeros(shapes[1], np.float32)])
    assert top.shape == tuple(entry["top_shape"])
    if "mapping" in entry:
        # "top[n,c,h,w] = bottom0[n,c+1,h+1,w+2]": read each axis' offset from the text.
        index = re.search(r"bottom0\[(.*)\]", entry["mapping"]).group(1).split(",")
        offsets = [int(term.split("+")[1]) if "+" in term else 0 for term in index]
        expected = data[tuple(slice(o, o + n) for o, n in zip(offsets, top.shape))]
        assert np.array_equal(top, expected)
