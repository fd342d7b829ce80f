"""caffeish.graph.geometry against semantics.md's worked examples and brute-force counts."""
import itertools
import math
from fractions import Fraction

import pytest
from google.protobuf import text_format

from caffeish.graph import geometry as g
from caffeish.errors import ShapeError
from caffeish.formats.schema import pb
from conftest import shared_path


# -- output sizes: semantics.md worked examples ----------------------------------------


def test_pool_examples_from_semantics():
    assert g.pool_out(5, 2, stride=2, pad=1) == 3  # not 4: the clip rule
    assert g.pool_out(112, 3, stride=2, pad=0) == 56
    assert g.pool_out(112, 3, stride=2, pad=0, ceil=False) == 55


def test_conv_truncating_division_examples():
    assert g.conv_out(2, 3, stride=2) == 1  # (2-3)/2 truncates to 0
    assert g.conv_out(2, 3, stride=1) == 0
    assert g.conv_out(224, 11, stride=4, pad=2) == 55
    assert g.conv_out(13, 3, pad=2, dilation=2) == 13


def test_effective_kernel():
    assert g.effective_kernel(3, 1) == 3
    assert g.effective_kernel(3, 2) == 5
    assert g.effective_kernel(1, 7) == 1


def test_zero_stride_refused():
    with pytest.raises(ShapeError, match="stride"):
        g.conv_out(5, 3, stride=0)
    with pytest.raises(ShapeError, match="stride"):
        g.pool_out(5, 3, stride=0)


# -- output sizes: brute force -----------------------------------------------------------


def count_conv_windows(size, kernel, stride, pad, dilation):
    """Window starts -pad, -pad+s, ... whose whole extent fits in the padded input."""
    ext = dilation * (kernel - 1) + 1
    count, start = 0, -pad
    while start + ext <= size + pad:
        count += 1
        start += stride
    return count


def test_conv_out_matches_window_count():
    for size, k, s, p, d in itertools.product(range(1, 12), range(1, 5), range(1, 4), range(0, 3), range(1, 3)):
        ext = d * (k - 1) + 1
        if size + 2 * p >= ext:  # non-negative numerator: plain window counting
            assert g.conv_out(size, k, s, p, d) == count_conv_windows(size, k, s, p, d), (size, k, s, p, d)
        else:  # Caffe's C division truncates toward zero
            assert g.conv_out(size, k, s, p, d) == int((size + 2 * p - ext) / s) + 1


def count_pool_windows(size, kernel, stride, pad, ceil, clip):
    """Caffe's pooling sizes described as window placement on the padded input.

    CEIL: place windows at 0, s, 2s, ... (padded coordinates) until one reaches the
    end of the padded input.  FLOOR: only windows that fit entirely.  Then, when the
    layer is padded, a last window that starts in the right padding is dropped.
    """
    padded = size + 2 * pad
    starts = [0]
    while starts[-1] + kernel < padded:
        starts.append(starts[-1] + stride)
    if not ceil:
        starts = [st for st in starts if st + kernel <= padded]
    if clip and starts[-1] >= size + pad:  # starts at or after the right padding begins
        starts.pop()
    return len(starts)


def test_pool_out_matches_window_placement():
    for size, k, s, p in itertools.product(range(1, 14), range(1, 5), range(1, 5), range(0, 3)):
        if p >= k or size + 2 * p < k:
            continue
        for ceil in (True, False):
            for clip in (p != 0, True):
                want = count_pool_windows(size, k, s, p, ceil, clip)
                got = g.pool_out(size, k, s, p, ceil=ceil, clip=clip)
                assert got == want, (size, k, s, p, ceil, clip)


def test_deconv_out_matches_scatter_extent():
    """Deconvolution scatters input i, tap q to i*s + q*d - pad; the canvas is cut by pad on both sides."""
    for size, k, s, p, d in itertools.product(range(1, 8), range(1, 6), range(1, 4), range(0, 3), range(1, 3)):
        canvas = max(i * s + q * d for i in range(size) for q in range(k)) + 1
        assert g.deconv_out(size, k, s, p, d) == canvas - 2 * p


def test_deconv_is_conv_transpose_in_size():
    for size, k, s, p, d in itertools.product(range(1, 10), range(1, 6), range(1, 5), range(0, 3), range(1, 3)):
        out = g.deconv_out(size, k, s, p, d)
        if out > 0:
            assert g.conv_out(out, k, s, p, d) == size


def test_bilinear_upsampling_recipe_gives_f_times_input():
    for f in range(1, 9):
        kernel, stride, pad = 2 * f - f % 2, f, math.ceil((f - 1) / 2)
        for size in range(1, 21):
            assert g.deconv_out(size, kernel, stride, pad) == f * size, (f, size)


# -- ConvolutionParameter parsing ----------------------------------------------------------------


def conv_param(text):
    return text_format.Parse(text, pb.ConvolutionParameter())


def test_conv_params_repeated_fields():
    geom = g.conv_params(conv_param("kernel_size: 3"), 2)
    assert geom == ((3, 3), (1, 1), (0, 0), (1, 1))
    geom = g.conv_params(conv_param("kernel_size: 3 kernel_size: 5 stride: 2 pad: 1 pad: 0 dilation: 2"), 2)
    assert geom == ((3, 5), (2, 2), (1, 0), (2, 2))
    geom = g.conv_params(conv_param("kernel_size: 1 kernel_size: 2 kernel_size: 3 stride: 3"), 3)
    assert geom.kernel == (1, 2, 3) and geom.stride == (3, 3, 3)
    assert g.conv_params(conv_param("kernel_size: 3 dilation: 2"), 2).extents() == (5, 5)


def test_conv_params_h_w_form():
    geom = g.conv_params(conv_param("kernel_h: 3 kernel_w: 5 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 2"), 2)
    assert geom == ((3, 5), (2, 1), (1, 2), (1, 1))
    # An unset pad_w reads as 0.
    assert g.conv_params(conv_param("kernel_size: 3 pad_h: 2"), 2).pad == (2, 0)


@pytest.mark.parametrize(
    "text, n_axes, fragment",
    [
        ("stride: 2", 2, "kernel_size is required"),
        ("kernel_size: 3 kernel_size: 3", 3, "given 2 times for 3 spatial axes"),
        ("kernel_size: 3 stride: 1 stride: 1 stride: 1", 2, "stride must be given once"),
        ("kernel_size: 3 pad: 1 pad: 1 pad: 1", 2, "pad must be given once"),
        ("kernel_size: 3 dilation: 1 dilation: 2 dilation: 2", 2, "dilation must be given once"),
        ("kernel_h: 3 kernel_w: 3", 3, "only be used with 2 spatial axes"),
        ("kernel_size: 3 stride_h: 2 stride_w: 2", 1, "only be used with 2 spatial axes"),
        ("kernel_size: 3 kernel_h: 3 kernel_w: 3", 2, "not both"),
        ("kernel_size: 3 pad: 1 pad_h: 1 pad_w: 1", 2, "not both"),
        ("kernel_size: 0", 2, "kernel size must be positive"),
        ("kernel_h: 3", 2, "kernel_h and kernel_w must both be set"),
        ("kernel_size: 3 stride: 0", 2, "stride must be positive"),
        ("kernel_size: 3 stride_h: 2", 2, "stride must be positive"),
    ],
)
def test_conv_params_errors(text, n_axes, fragment):
    with pytest.raises(ShapeError, match=fragment):
        g.conv_params(conv_param(text), n_axes)


def test_conv_output_shape_refuses_negative_sizes():
    geom = g.conv_params(conv_param("kernel_size: 5"), 2)
    with pytest.raises(ShapeError, match="output size would be -2"):
        g.conv_output_shape((2, 9), geom)
    geom = g.conv_params(conv_param("kernel_size: 1 pad: 1"), 1)
    with pytest.raises(ShapeError, match="output size would be -1"):
        g.deconv_output_shape((1,), geom)


# -- PoolingParameter parsing --------------------------------------------------------------------


def pool_param(text):
    return text_format.Parse(text, pb.PoolingParameter())


def test_pool_params_basic_and_rect():
    geom = g.pool_params(pool_param("pool: MAX kernel_size: 3 stride: 2"), 9, 12)
    assert geom.kernel == (3, 3) and geom.stride == (2, 2) and geom.pad == (0, 0)
    assert geom.out == (4, 6) and geom.ceil and not geom.global_pooling
    geom = g.pool_params(pool_param("kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0"), 9, 12)
    assert geom.kernel == (2, 3) and geom.stride == (1, 2) and geom.pad == (1, 0)
    geom = g.pool_params(pool_param("pool: AVE kernel_size: 3 stride: 2 round_mode: FLOOR"), 9, 12)
    assert geom.out == (4, 5) and not geom.ceil


def test_pool_clip_applies_to_both_axes_when_any_pad():
    # w alone: ceil((4-1)/2)+1 = 3 windows starting at 0, 2, 4; 4 >= W + pad_w, so with
    # pad_h != 0 Caffe drops it.  Without any pad the rule does not apply.
    padded = g.pool_params(pool_param("kernel_h: 2 kernel_w: 1 stride: 2 pad_h: 1 pad_w: 0"), 4, 4)
    assert padded.out == (3, 2)
    unpadded = g.pool_params(pool_param("kernel_h: 2 kernel_w: 1 stride: 2"), 4, 4)
    assert unpadded.out == (2, 3)


def test_pool_params_global():
    geom = g.pool_params(pool_param("pool: AVE global_pooling: true"), 7, 5)
    assert geom.kernel == (7, 5) and geom.out == (1, 1) and geom.global_pooling


def test_pool_params_ceil_can_exceed_floor():
    assert g.pool_params(pool_param("kernel_size: 3 stride: 2"), 112, 112).out == (56, 56)
    assert g.pool_params(pool_param("kernel_size: 3 stride: 2 round_mode: FLOOR"), 112, 112).out == (55, 55)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("global_pooling: true kernel_size: 2", "do not give a kernel"),
        ("global_pooling: true stride: 2", "global_pooling needs pad 0 and stride 1"),
        ("global_pooling: true pad: 1", "global_pooling needs pad 0 and stride 1"),
        ("pool: MAX", "a kernel size is required"),
        ("kernel_h: 3", "a kernel size is required"),
        ("kernel_size: 3 kernel_h: 3 kernel_w: 3", "not both"),
        ("kernel_size: 0", "kernel size must be positive"),
        ("kernel_size: 3 pad_h: 1", "pad or as both pad_h and pad_w"),
        ("kernel_size: 3 pad: 1 pad_h: 1 pad_w: 1", "pad or as both pad_h and pad_w"),
        ("kernel_size: 3 stride_w: 2", "stride or as both stride_h and stride_w"),
        ("kernel_size: 3 stride: 0", "stride must be positive"),
        ("kernel_size: 2 pad: 2", "pad_h 2 must be smaller than kernel_h 2"),
        ("pool: STOCHASTIC kernel_size: 3 pad: 1", "only for MAX and AVE"),
        ("kernel_size: 9", "pooled height would be -1"),
    ],
)
def test_pool_params_errors(text, fragment):
    with pytest.raises(ShapeError, match=fragment):
        g.pool_params(pool_param(text), 7, 9)


def test_stochastic_pooling_without_pad_is_fine():
    assert g.pool_params(pool_param("pool: STOCHASTIC kernel_size: 3 stride: 2"), 7, 9).out == (3, 4)


def test_spp_levels_cover_the_input_with_2_pow_l_bins():
    for h, w in itertools.product(range(1, 20), range(1, 20)):
        for level in range(4):
            bins = 2 ** level
            if bins > min(h, w):
                break
            pp = g.spp_pool_param(level, h, w)
            kh, kw = pp.kernel_h, pp.kernel_w
            assert (pp.stride_h, pp.stride_w) == (kh, kw)
            assert kh * bins >= h > (kh - 1) * bins and kw * bins >= w > (kw - 1) * bins
            try:
                geom = g.pool_params(pp, h, w)
            except ShapeError:
                # Caffe refuses levels whose pad reaches the kernel (pad < kernel).
                assert pp.pad_h >= kh or pp.pad_w >= kw
                continue
            assert geom.out == (bins, bins)
            # Every input row/column lies in some window.
            assert (geom.out[0] - 1) * kh - pp.pad_h + kh >= h
            assert (geom.out[1] - 1) * kw - pp.pad_w + kw >= w


def test_spp_level_worked_example():
    # H 4, W 5, level 1: kernel (2, 3), pad (0, 1) -> 2 x 2 bins (W: 3 windows, clipped to 2).
    pp = g.spp_pool_param(1, 4, 5)
    assert (pp.kernel_h, pp.kernel_w, pp.pad_h, pp.pad_w) == (2, 3, 0, 1)
    assert g.pool_params(pp, 4, 5).out == (2, 2)
    assert g.pool_params(g.spp_pool_param(0, 4, 5), 4, 5).out == (1, 1)


# -- CropParameter --------------------------------------------------------------------------------


def crop_param(text):
    return text_format.Parse(text, pb.CropParameter())


def test_crop_offsets():
    assert g.crop_offsets(crop_param(""), (2, 5, 9, 11), (1, 1, 4, 6)) == (2, (0, 0, 0, 0), (2, 5, 4, 6))
    assert g.crop_offsets(crop_param("axis: 1 offset: 1 offset: 2 offset: 4"), (2, 5, 9, 11), (1, 3, 5, 7)) == (
        1,
        (0, 1, 2, 4),
        (2, 3, 5, 7),
    )
    assert g.crop_offsets(crop_param("axis: -1 offset: 5"), (2, 5, 9, 11), (1, 1, 4, 6)) == (
        3,
        (0, 0, 0, 5),
        (2, 5, 9, 6),
    )
    # The reference may have more axes; only its first ones are read.
    assert g.crop_offsets(crop_param("axis: 0"), (4,), (3, 8)) == (0, (0,), (3,))


@pytest.mark.parametrize(
    "text, data, ref, fragment",
    [
        ("axis: 4", (2, 5, 9, 11), (2, 5, 9, 11), "axis 4 out of range"),
        ("axis: -5", (2, 5, 9, 11), (2, 5, 9, 11), "axis -5 out of range"),
        ("offset: 1 offset: 1 offset: 1", (2, 5, 9, 11), (1, 1, 4, 6), "3 offsets given for 2 cropped axes"),
        ("offset: 6", (2, 5, 9, 11), (1, 1, 3, 6), "axis 3 is out of bounds"),
        ("", (2, 5, 3, 11), (1, 1, 4, 6), "axis 2 is out of bounds"),
        ("", (2, 5, 9, 11), (4, 6), "reference bottom has 2 axes"),
    ],
)
def test_crop_offsets_errors(text, data, ref, fragment):
    with pytest.raises(ShapeError, match=fragment):
        g.crop_offsets(crop_param(text), data, ref)


# -- coordinate maps ---------------------------------------------------------------------------------


def chain(maps):
    """The map from the first layer's input to the last layer's output."""
    total = g.identity()
    for m in maps:
        total = g.compose(m, total)
    return total


def test_compose_and_inverse_algebra():
    m1, m2 = g.CoordMap(Fraction(1, 2), Fraction(3, 4)), g.CoordMap(Fraction(3), Fraction(-1))
    for x in range(-3, 4):
        assert g.compose(m1, m2)(x) == m1(m2(x))
        assert g.inverse(m1)(m1(x)) == x
    assert g.compose(g.inverse(m2), m2) == g.identity()
    assert g.crop_map(5)(7) == 2


def test_conv_map_sends_window_centres_to_outputs():
    for k, s, p, d in itertools.product(range(1, 6), range(1, 4), range(0, 3), range(1, 3)):
        m = g.conv_map(k, s, p, d)
        for y in range(4):
            centre = y * s - p + Fraction(d * (k - 1), 2)
            assert m(centre) == y
        # Deconvolution with the same parameters is the transpose: the inverse map.
        assert g.deconv_map(k, s, p, d) == g.inverse(m)


FCN_ALEXNET = [
    g.conv_map(11, 4, 100),  # conv1
    g.conv_map(3, 2),  # pool1
    g.conv_map(5, 1, 2),  # conv2
    g.conv_map(3, 2),  # pool2
    g.conv_map(3, 1, 1),  # conv3
    g.conv_map(3, 1, 1),  # conv4
    g.conv_map(3, 1, 1),  # conv5
    g.conv_map(3, 2),  # pool5
    g.conv_map(6),  # fc6
    g.conv_map(1),  # fc7
    g.conv_map(1),  # score_fr
    g.deconv_map(63, 32),  # upscore
]

VGG16_FCN32S = (
    [g.conv_map(3, 1, 100), g.conv_map(3, 1, 1), g.conv_map(2, 2)]  # conv1_x, pool1
    + [g.conv_map(3, 1, 1)] * 2 + [g.conv_map(2, 2)]  # conv2_x, pool2
    + ([g.conv_map(3, 1, 1)] * 3 + [g.conv_map(2, 2)]) * 3  # conv3_x..conv5_x with pools
    + [g.conv_map(7), g.conv_map(1), g.conv_map(1), g.deconv_map(64, 32)]  # fc6, fc7, score_fr, upscore
)


@pytest.mark.parametrize("layers, offset", [(FCN_ALEXNET, 18), (VGG16_FCN32S, 19)])
def test_fcn_crop_offsets(layers, offset):
    upscore_to_data = g.inverse(chain(layers))
    assert upscore_to_data == g.CoordMap(Fraction(1), Fraction(-offset))
    assert g.crop_offset_from_map(upscore_to_data) == offset


def layer_map(layer):
    """The coord map of one layer, the way pycaffe's coord_map reads its parameters."""
    if layer.type in ("Convolution", "Deconvolution"):
        cp = layer.convolution_param
        args = (cp.kernel_size[0], cp.stride[0] if cp.stride else 1, cp.pad[0] if cp.pad else 0)
        return (g.conv_map if layer.type == "Convolution" else g.deconv_map)(*args)
    if layer.type == "Pooling":
        pp = layer.pooling_param
        return g.conv_map(pp.kernel_size, pp.stride, pp.pad)
    assert layer.type in ("ReLU", "LRN", "Dropout"), layer.type
    return g.identity()


@pytest.mark.parametrize("net", ["voc-fcn-alexnet", "voc-fcn32s"])
def test_fcn_prototxt_crop_offset_is_reproduced(net):
    """Walk the real FCN prototxt from data to the crop and compare with its stored offset."""
    text = shared_path("models", "fcn", net, "val.prototxt").read_text()
    param = text_format.Parse(text, pb.NetParameter())
    crop = next(layer for layer in param.layer if layer.type == "Crop")
    maps, blob = [], crop.bottom[0]
    producers = {}
    for layer in param.layer:
        for top in layer.top:
            if top not in layer.bottom:  # in-place layers do not change the map's source
                producers[top] = layer
    while blob != crop.bottom[1]:
        layer = producers[blob]
        maps.append(layer_map(layer))
        # In-place layers on this blob are pass-through; follow the producer's bottom.
        blob = layer.bottom[0]
    total = chain(reversed(maps))  # data -> upscore
    assert g.crop_offset_from_map(g.inverse(total)) == crop.crop_param.offset[0]


def test_crop_offset_from_map_errors():
    with pytest.raises(ShapeError, match="scale mismatch"):
        g.crop_offset_from_map(g.CoordMap(Fraction(1, 2), Fraction(0)))
    with pytest.raises(ShapeError, match="negative offset"):
        g.crop_offset_from_map(g.CoordMap(Fraction(1), Fraction(3)))
    with pytest.raises(ShapeError, match="not an integer"):
        g.crop_offset_from_map(g.CoordMap(Fraction(1), Fraction(-1, 2)))


# -- centre crop (DataTransformer at TEST, pycaffe's Classifier / oversample) ----------------------


def test_center_crop_offsets_are_caffes_test_crop_and_pycaffes_centre():
    assert g.center_crop_offsets((256, 256), (227, 227)) == (14, 14)  # AlexNet: 29 // 2
    assert g.center_crop_offsets((375, 500), (227, 227)) == (74, 136)  # 148 // 2, 273 // 2
    assert g.center_crop_offsets((5, 4), (5, 4)) == (0, 0)
    for big_h, big_w, h, w in itertools.product(range(1, 8), repeat=4):
        if h <= big_h and w <= big_w:  # pycaffe: int(dims / 2.0 - crop / 2.0)
            want = (int(big_h / 2.0 - h / 2.0), int(big_w / 2.0 - w / 2.0))
            assert g.center_crop_offsets((big_h, big_w), (h, w)) == want
    with pytest.raises(ShapeError, match="cannot crop 5x4 out of 4x4"):
        g.center_crop_offsets((4, 4), (5, 4))
