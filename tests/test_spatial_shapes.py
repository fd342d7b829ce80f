"""Shape inference of Convolution, Deconvolution, Im2col, Pooling, SPP and Crop.

Top shapes are compared with the shapes real Caffe recorded in the golden cases'
meta.json; weight shapes with their params.npz; everything else with hand
computations.
"""
import json
import math

import numpy as np
import pytest
from google.protobuf import text_format

from caffeish.errors import ShapeError
from caffeish.graph.registry import create
from caffeish.formats.schema import TEST, pb
from conftest import SHARED, shared_path

SPATIAL_TYPES = {"Convolution", "Deconvolution", "Im2col", "Pooling", "SPP", "Crop"}


def layer(text):
    return text_format.Parse(text, pb.LayerParameter())


def make(text):
    return create(layer(text), TEST)


def tops_of(lay, bottom_shapes):
    lay.check_counts(len(bottom_shapes), len(lay.param.top))
    return lay.reshape([tuple(s) for s in bottom_shapes])


def load_case(case):
    net = text_format.Parse(shared_path("golden", case, "net.prototxt").read_text(), pb.NetParameter())
    meta = json.loads(shared_path("golden", case, "meta.json").read_text())
    recorded = {name: tuple(shape) for name, shape in meta["blob_shapes"].items()}
    return net, recorded


# -- golden cases, walked from their Input layers ----------------------------------------------


@pytest.mark.parametrize("case", ["conv", "deconv", "pool", "crop", "routing"])
def test_golden_walk_from_inputs(case):
    net, recorded = load_case(case)
    shapes, checked = {}, 0
    for lp in net.layer:
        if lp.type == "Input":
            for top, shape in zip(lp.top, lp.input_param.shape):
                shapes[top] = tuple(shape.dim)
            continue
        if lp.type not in SPATIAL_TYPES or not all(b in shapes for b in lp.bottom):
            continue
        tops = tops_of(create(lp, TEST), [shapes[b] for b in lp.bottom])
        assert len(tops) == len(lp.top)
        for name, shape in zip(lp.top, tops):
            assert shape == recorded[name], (lp.name, name)
            shapes[name] = shape
            checked += 1
    assert checked >= {"routing": 2}.get(case, 4)


def spatial_cases(need_params=False):
    """Golden cases whose net has at least one spatial layer (and params.npz if asked)."""
    root = SHARED / "golden"
    if not root.exists():
        return []
    cases = []
    for case in sorted(p for p in root.iterdir() if (p / "meta.json").exists()):
        text = (case / "net.prototxt").read_text()
        if any(f'type: "{t}"' in text for t in SPATIAL_TYPES):
            if not need_params or (case / "params.npz").exists():
                cases.append(case.name)
    return cases


@pytest.mark.parametrize("case", spatial_cases())
def test_every_golden_spatial_layer(case):
    """Each spatial layer of every golden net, fed Caffe's recorded bottom shapes."""
    net, recorded = load_case(case)
    for lp in net.layer:
        if lp.type not in SPATIAL_TYPES:
            continue
        tops = tops_of(create(lp, TEST), [recorded[b] for b in lp.bottom])
        assert tops == [recorded[t] for t in lp.top], lp.name


@pytest.mark.parametrize("case", spatial_cases(need_params=True))
def test_golden_param_shapes(case):
    net, recorded = load_case(case)
    params = np.load(shared_path("golden", case, "params.npz"))
    for lp in net.layer:
        if lp.type not in SPATIAL_TYPES:
            continue
        shapes = create(lp, TEST).param_shapes([recorded[b] for b in lp.bottom])
        stored = [params[f"{lp.name}/{i}"].shape for i in range(len(shapes)) if f"{lp.name}/{i}" in params]
        assert len(stored) == len(shapes) and f"{lp.name}/{len(shapes)}" not in params, lp.name
        assert [tuple(s) for s in shapes] == stored, lp.name


# -- hand computations -------------------------------------------------------------------------------


def test_conv_nd_and_axis():
    conv3d = make('name: "c3" type: "Convolution" bottom: "x" top: "y" '
                  "convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 }")
    # (5+2-3)/2+1 = 3, (6+2-3)/2+1 = 3, (7+2-3)/2+1 = 4
    assert tops_of(conv3d, [(2, 3, 5, 6, 7)]) == [(2, 8, 3, 3, 4)]
    assert conv3d.param_shapes([(2, 3, 5, 6, 7)]) == [(8, 3, 3, 3, 3), (8,)]
    assert conv3d.macs([(2, 3, 5, 6, 7)], [(2, 8, 3, 3, 4)]) == 2 * 36 * 8 * 3 * 27

    per_axis = make('name: "c" type: "Convolution" bottom: "x" top: "y" '
                    "convolution_param { num_output: 4 axis: 2 kernel_size: 1 kernel_size: 3 dilation: 2 }")
    # Channel axis 2 (C = 6); spatial axes 3 and 4: 9 - 1 + 1 = 9, 10 - 5 + 1 = 6.
    assert tops_of(per_axis, [(2, 3, 6, 9, 10)]) == [(2, 3, 4, 9, 6)]
    assert per_axis.param_shapes([(2, 3, 6, 9, 10)]) == [(4, 6, 1, 3), (4,)]
    assert per_axis.macs([(2, 3, 6, 9, 10)], [(2, 3, 4, 9, 6)]) == 6 * 54 * 4 * 6 * 3


def test_conv_several_bottoms_share_weights():
    conv = make('name: "c" type: "Convolution" bottom: "a" bottom: "b" top: "ya" top: "yb" '
                "convolution_param { num_output: 6 kernel_size: 3 group: 3 bias_term: false }")
    bottoms = [(1, 9, 8, 8)] * 2
    assert tops_of(conv, bottoms) == [(1, 6, 6, 6)] * 2
    assert conv.param_shapes(bottoms) == [(6, 3, 3, 3)]
    assert conv.macs(bottoms, [(1, 6, 6, 6)] * 2) == 2 * 36 * 6 * 3 * 9


def test_deconv_weights_and_macs():
    deconv = make('name: "up" type: "Deconvolution" bottom: "x" top: "y" '
                  "convolution_param { num_output: 6 kernel_size: 4 stride: 2 pad: 1 group: 2 }")
    # 2*(5-1) + 4 - 2 = 10
    assert tops_of(deconv, [(3, 4, 5, 5)]) == [(3, 6, 10, 10)]
    assert deconv.param_shapes([(3, 4, 5, 5)]) == [(4, 3, 4, 4), (6,)]
    assert deconv.macs([(3, 4, 5, 5)], [(3, 6, 10, 10)]) == 3 * 25 * 4 * 3 * 16


def test_bilinear_upsampling_layer():
    up = make('name: "up" type: "Deconvolution" bottom: "x" top: "y" convolution_param '
              '{ num_output: 5 group: 5 kernel_size: 8 stride: 4 pad: 2 bias_term: false '
              'weight_filler { type: "bilinear" } }')
    assert tops_of(up, [(1, 5, 7, 9)]) == [(1, 5, 28, 36)]
    assert up.param_shapes([(1, 5, 7, 9)]) == [(5, 1, 8, 8)]


def test_im2col():
    i2c = make('name: "i" type: "Im2col" bottom: "x" top: "y" convolution_param { kernel_h: 2 kernel_w: 3 stride: 2 }')
    # C * 2*3 = 18; (7-2)/2+1 = 3, (8-3)/2+1 = 3
    assert tops_of(i2c, [(2, 3, 7, 8)]) == [(2, 18, 3, 3)]
    assert i2c.macs([(2, 3, 7, 8)], [(2, 18, 3, 3)]) == 0


def test_pooling_tops_and_no_params():
    pool = make('name: "p" type: "Pooling" bottom: "x" top: "y" top: "mask" '
                "pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 }")
    assert tops_of(pool, [(1, 2, 5, 5)]) == [(1, 2, 3, 3)] * 2
    assert pool.param_shapes([(1, 2, 5, 5)]) == []
    stochastic = make('name: "s" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: STOCHASTIC kernel_size: 2 }')
    assert tops_of(stochastic, [(1, 2, 5, 5)]) == [(1, 2, 4, 4)]


def test_spp_levels():
    one = make('name: "s" type: "SPP" bottom: "x" top: "y" spp_param { pyramid_height: 1 }')
    assert tops_of(one, [(2, 6, 4, 5)]) == [(2, 6, 1, 1)]
    three = make('name: "s" type: "SPP" bottom: "x" top: "y" spp_param { pyramid_height: 3 pool: AVE }')
    assert tops_of(three, [(2, 3, 13, 9)]) == [(2, 3 * (1 + 4 + 16))]


# -- errors name the layer -------------------------------------------------------------------------------


BAD = [
    ('type: "Convolution" convolution_param { kernel_size: 3 }', [(1, 3, 8, 8)], "num_output"),
    ('type: "Convolution" convolution_param { num_output: 4 }', [(1, 3, 8, 8)], "kernel_size is required"),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 group: 2 }', [(1, 3, 8, 8)],
     "3 .* not a multiple of group 2"),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 group: 3 }', [(1, 6, 8, 8)],
     "num_output 4 is not a multiple of group 3"),
    ('type: "Convolution" convolution_param { num_output: 5 kernel_size: 3 group: 5 }', [(1, 10, 8, 8)], None),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 group: 0 }', [(1, 3, 8, 8)], "group"),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 stride: 0 }', [(1, 3, 8, 8)],
     "stride must be positive"),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_h: 3 kernel_w: 3 }', [(1, 3, 8, 8, 8)],
     "2 spatial axes"),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 9 }', [(1, 3, 5, 5)],
     "output size would be -3"),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 axis: 4 }', [(1, 3, 8, 8)],
     "axis 4 out of range"),
    ('type: "Convolution" bottom: "b" top: "z" convolution_param { num_output: 4 kernel_size: 3 }',
     [(1, 3, 8, 8), (1, 3, 8, 9)], "same shape"),
    ('type: "Deconvolution" convolution_param { num_output: 4 kernel_size: 0 }', [(1, 3, 8, 8)],
     "kernel size must be positive"),
    ('type: "Im2col" convolution_param { kernel_size: 3 kernel_size: 3 kernel_size: 3 }', [(1, 3, 8, 8)],
     "given 3 times for 2 spatial axes"),
    ('type: "Pooling" pooling_param { kernel_size: 3 }', [(1, 3, 8)], "4 axes"),
    ('type: "Pooling" top: "mask" pooling_param { pool: AVE kernel_size: 3 }', [(1, 3, 8, 8)], "only allowed for MAX"),
    ('type: "Pooling" pooling_param { kernel_size: 3 pad: 3 }', [(1, 3, 8, 8)], "smaller than kernel"),
    ('type: "Pooling" pooling_param { global_pooling: true kernel_size: 3 }', [(1, 3, 8, 8)], "do not give a kernel"),
    ('type: "SPP" spp_param { }', [(1, 3, 8, 8)], "pyramid_height"),
    ('type: "SPP" spp_param { pyramid_height: 3 }', [(1, 3, 4, 5)], "pyramid level 2"),
    ('type: "SPP" spp_param { pyramid_height: 2 }', [(1, 3, 8)], "4 axes"),
    ('type: "Crop" bottom: "ref" crop_param { offset: 3 }', [(1, 3, 8, 8), (1, 3, 6, 6)], "out of bounds"),
    ('type: "Crop" bottom: "ref" crop_param { offset: 1 offset: 1 offset: 1 }', [(1, 3, 8, 8), (1, 3, 6, 6)],
     "3 offsets given for 2 cropped axes"),
    ('type: "Crop" bottom: "ref" crop_param { axis: 4 }', [(1, 3, 8, 8), (1, 3, 6, 6)], "out of range"),
]


@pytest.mark.parametrize("text, bottoms, fragment", BAD)
def test_bad_parameters_name_the_layer(text, bottoms, fragment):
    lay = make(f'name: "culprit" bottom: "x" top: "y" {text}')
    if fragment is None:  # a valid variant of its neighbour, to show the check is not too eager
        assert tops_of(lay, bottoms)
        return
    with pytest.raises(ShapeError, match=fragment) as info:
        tops_of(lay, bottoms)
    assert "'culprit'" in str(info.value)


def test_counts_are_checked():
    conv = make('name: "c" type: "Convolution" bottom: "x" top: "y" top: "z" '
                "convolution_param { num_output: 2 kernel_size: 1 }")
    with pytest.raises(ShapeError, match="one top per bottom"):
        conv.reshape([(1, 1, 2, 2)])
    crop = make('name: "c" type: "Crop" bottom: "x" top: "y"')
    with pytest.raises(ShapeError, match="exactly 2 bottom"):
        crop.check_counts(1, 1)
    pool = make('name: "p" type: "Pooling" bottom: "x" top: "y" top: "m" top: "n" pooling_param { kernel_size: 2 }')
    with pytest.raises(ShapeError, match="at most 2 top"):
        pool.check_counts(1, 3)
    assert math.prod(tops_of(make('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y"'),
                             [(1, 2, 5, 5), (1, 1, 3, 4)])[0]) == 24
