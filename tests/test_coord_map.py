"""caffe.coord_map (coord_map_from_to, crop) as pycaffe's, computed with caffeish.graph.geometry.

Its Crop offsets must be those of our offsets tool (caffeish.apps.offsets.crop_offsets)
on every fcn.berkeleyvision.org net and on random conv/pool/deconv nets.
"""
import random
import sys
import types

import numpy as np
import pytest

import caffeish
from caffeish.apps.offsets import crop_offsets
from caffeish.errors import CaffeishError
from caffeish.graph import geometry
from caffeish.pycaffe import coord_map as cm
from caffeish.pycaffe.coord_map import coord_map_from_to, crop
from caffeish.pycaffe.net_spec import NetSpec, layers as L, params as P

from conftest import shared_path
from test_fcn_scripts import py2to3
from test_net_spec import FCN_MODELS


def coord_net_spec(ks=3, stride=1, pad=0, pool=2, dstride=2, dpad=0, proto=False):
    """BVLC's test net: conv, pool, deconv (flat keywords, as pycaffe's test writes them).

    proto=True gives the Deconvolution its convolution_param, so that to_proto works.
    """
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 100, 100]))
    n.aux = L.Input(shape=dict(dim=[2, 1, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=ks, stride=stride, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool, pad=0)
    deconv_ks = [s * 2 for s in dstride] if isinstance(dstride, list) else dstride * 2
    spec = dict(num_output=10, kernel_size=deconv_ks, stride=dstride, pad=dpad)
    n.deconv = L.Deconvolution(n.pool, **(dict(convolution_param=spec) if proto else spec))
    return n


# -- BVLC's test_coord_map.py expectations ---------------------------------------------------------------


def test_conv_pool_deconv():
    n = coord_net_spec()
    assert coord_map_from_to(n.deconv, n.data) == (1, [1.0], [0.0])
    n = coord_net_spec(pool=4, dstride=4)
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert (ax, a.tolist(), b.tolist()) == (1, [1.0], [-1.0])
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)


def test_pass_through_and_1x1_conv_are_identities():
    n = coord_net_spec()
    base = coord_map_from_to(n.deconv, n.data)
    n.relu = L.ReLU(n.deconv)
    n.conv1x1 = L.Convolution(n.relu, num_output=10, kernel_size=1, stride=1, pad=0)
    for top in (n.relu, n.conv1x1):
        assert coord_map_from_to(top, n.data) == base


@pytest.mark.parametrize("pad", [0, 1, 4, 10])
def test_padding(pad):
    n = coord_net_spec()
    _, a, b = coord_map_from_to(n.deconv, n.data)
    n = coord_net_spec(pad=pad)
    assert coord_map_from_to(n.deconv, n.data)[1:] == (a, b - pad)
    n = coord_net_spec(dpad=pad)
    assert coord_map_from_to(n.deconv, n.data)[1:] == (a, b + pad)
    n = coord_net_spec(pad=pad, dpad=pad)
    assert coord_map_from_to(n.deconv, n.data)[1:] == (a, b)


def test_multi_bottom_conv_maps_each_alike():
    n = coord_net_spec()
    n.conv_data, n.conv_aux = L.Convolution(n.data, n.aux, ntop=2, num_output=10, kernel_size=5, stride=2, pad=0)
    assert coord_map_from_to(n.conv_data, n.data) == coord_map_from_to(n.conv_aux, n.aux)
    assert coord_map_from_to(n.conv_data, n.data) == (1, [2.0], [2.0])  # data x = 2 * conv x + 2


def test_rect():
    n3x3 = coord_net_spec(ks=3, stride=1, pad=0)
    n5x5 = coord_net_spec(ks=5, stride=2, pad=10)
    n3x5 = coord_net_spec(ks=[3, 5], stride=[1, 2], pad=[0, 10])
    ax3, a3, b3 = coord_map_from_to(n3x3.deconv, n3x3.data)
    ax5, a5, b5 = coord_map_from_to(n5x5.deconv, n5x5.data)
    ax35, a35, b35 = coord_map_from_to(n3x5.deconv, n3x5.data)
    assert ax3 == ax5 == ax35 == 1
    assert (a35[0], b35[0], a35[1], b35[1]) == (a3[0], b3[0], a5[0], b5[0])


def test_nd_conv():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 100, 100, 100]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=[3, 3, 3], stride=[1, 1, 1], pad=[0, 1, 2])
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2, pad=0)
    n.deconv = L.Deconvolution(n.pool, num_output=10, kernel_size=4, stride=2, pad=0)
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert ax == 1 and len(a) == len(b) == 3 and np.all(a == 1)
    assert b[0] - 1 == b[1] and b[1] - 1 == b[2]


@pytest.mark.parametrize("offset", [0, 3, 10])
def test_crop_of_crop(offset):
    n = coord_net_spec()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    n.crop = L.Crop(n.deconv, n.data, axis=2, offset=offset)
    assert coord_map_from_to(n.crop, n.data) == (ax, a, b + offset)


def test_crop_helper_makes_the_crop_layer():
    n = coord_net_spec(ks=5, pad=4, proto=True)  # 3 more than the identity of ks=3, pad=0: crop 3
    n.crop = crop(n.deconv, n.data)
    layer = n.to_proto().layer[-1]
    assert (layer.type, list(layer.bottom), layer.crop_param.axis, list(layer.crop_param.offset)) == (
        "Crop", ["deconv", "data"], 2, [3])


def test_unconnected_tops_are_a_runtime_error():
    n = coord_net_spec()
    n.ip = L.InnerProduct(n.deconv, num_output=10)
    with pytest.raises(RuntimeError, match="Could not compute map between tops; are they connected by spatial"):
        coord_map_from_to(n.ip, n.data)


@pytest.mark.parametrize("kwargs, message", [
    (dict(pool=3, dstride=2), "scale mismatch: the map scales coordinates by 3/2, cannot crop"),
    (dict(dpad=10), "cannot crop a negative offset (-10)"),
    (dict(pad=1, ks=2), "the crop offset 3/2 is not an integer"),
])
def test_impossible_crops_are_assertion_errors(kwargs, message):
    n = coord_net_spec(**kwargs)
    with pytest.raises(AssertionError) as e:
        crop(n.deconv, n.data)
    assert isinstance(e.value, CaffeishError)
    assert str(e.value) == f"crop(Deconvolution layer top, Input layer top): {message}"


# -- beyond BVLC's tests -----------------------------------------------------------------------------------


def test_maps_come_from_geometry(monkeypatch):
    """One source of truth: change geometry's convolution map and coord_map follows."""
    n = coord_net_spec(ks=5, pad=4)
    assert coord_map_from_to(n.deconv, n.data)[1:] == ([1.0], [-3.0])
    real = geometry.conv_map
    monkeypatch.setattr(geometry, "conv_map", lambda k, s=1, p=0, d=1: geometry.compose(
        geometry.CoordMap(1, 1), real(k, s, p, d)))  # every window's output shifts one pixel
    # the conv's shift reaches the deconv's output x1 (pool 1/2, deconv 2), the pool's x2
    assert coord_map_from_to(n.deconv, n.data)[1:] == ([1.0], [-3.0 - 1 - 2])


def test_parameter_forms_pycaffe_refuses_are_read_too():
    flat = coord_net_spec(ks=5, stride=2, pad=3)
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 100, 100]))
    n.conv = L.Convolution(n.data, convolution_param=dict(num_output=10, kernel_h=5, kernel_w=5, stride_h=2,
                                                          stride_w=2, pad_h=3, pad_w=3))
    n.pool = L.Pooling(n.conv, pooling_param=dict(pool=P.Pooling.MAX, kernel_size=2, stride=2))
    n.deconv = L.Deconvolution(n.pool, convolution_param=dict(num_output=10, kernel_size=4, stride=2))
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    _, fa, fb = coord_map_from_to(flat.deconv, flat.data)
    assert ax == 1 and a.tolist() == [fa[0]] * 2 and b.tolist() == [fb[0]] * 2


def test_layers_without_a_map_end_the_walk():
    n = NetSpec()
    n.data, n.label = L.Python(module="m", layer="Data", ntop=2)
    n.conv = L.Convolution(n.data, kernel_size=3, num_output=2)
    n.gpool = L.Pooling(n.conv, kernel_size=1, global_pooling=False, pool=P.Pooling.AVE)
    n.glob = L.Pooling(n.conv, global_pooling=True)
    with pytest.raises(RuntimeError):
        coord_map_from_to(n.glob, n.data)
    with pytest.raises(RuntimeError):
        coord_map_from_to(n.data, n.label)  # tops of one Python layer: no map between them
    assert coord_map_from_to(n.gpool, n.data) == (1, [1.0], [1.0])


def test_concat_over_channels_keeps_coordinates_over_space_it_does_not():
    n = NetSpec()
    n.a = L.Input(shape=dict(dim=[1, 3, 50, 50]))
    n.b = L.Input(shape=dict(dim=[1, 3, 50, 50]))
    n.cat = L.Concat(n.a, n.b)
    n.conv = L.Convolution(n.cat, kernel_size=3, num_output=2, pad=0)
    assert coord_map_from_to(n.conv, n.b) == (1, [1.0], [1.0])
    n.side = L.Concat(n.a, n.b, axis=3)
    n.conv2 = L.Convolution(n.side, kernel_size=3, num_output=2)
    with pytest.raises(RuntimeError):
        coord_map_from_to(n.conv2, n.b)
    assert coord_map_from_to(n.conv2, n.side) == (1, [1.0], [1.0])


def test_branches_that_disagree_are_named():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 64, 64]))
    n.small = L.Pooling(n.data, kernel_size=2, stride=2)
    n.up = L.Deconvolution(n.small, convolution_param=dict(num_output=1, kernel_size=4, stride=2))
    n.conv = L.Convolution(n.data, kernel_size=3, num_output=1)
    n.sum = L.Eltwise(n.up, n.conv)  # data x lands at x + 1 through up, at x - 1 through conv
    n.out = L.Convolution(n.sum, kernel_size=1, num_output=1)
    with pytest.raises(RuntimeError) as e:
        coord_map_from_to(n.out, n.data)
    assert str(e.value) == (
        "Could not compute map between tops: the branches through the Convolution and the Pooling layers "
        "place the pixels of the Input top differently (x -> x - 1 vs x -> x + 1, to the first top's "
        "coordinates)")
    # ...but a blob below the disagreement still relates
    assert coord_map_from_to(n.out, n.sum) == (1, [1.0], [0.0])


def test_axis_mismatch():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 8, 8, 8]))
    n.c1 = L.Convolution(n.data, kernel_size=3, num_output=1, axis=1)
    n.c2 = L.Convolution(n.c1, kernel_size=3, num_output=1, axis=2)
    with pytest.raises(cm.AxisMismatchException, match="the maps start at different axes"):
        coord_map_from_to(n.c2, n.data)


def test_bad_parameters_are_clear_errors():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 8, 8]))
    n.nokernel = L.Convolution(n.data, num_output=1)
    with pytest.raises(KeyError) as e:
        coord_map_from_to(n.nokernel, n.data)
    assert str(e.value) == "Convolution layer: no kernel_size to compute coordinates from"
    n.zero = L.Convolution(n.data, num_output=1, kernel_size=3, stride=0)
    with pytest.raises(CaffeishError, match="Convolution layer: stride must be positive"):
        coord_map_from_to(n.zero, n.data)
    n.mix = L.Convolution(n.data, num_output=1, kernel_size=[3, 3], pad=[1, 1, 1])
    with pytest.raises(CaffeishError, match="Convolution layer: kernel_size must be given once or once per spatial"):
        coord_map_from_to(n.mix, n.data)
    with pytest.raises(TypeError, match="top_from must be a Top"):
        coord_map_from_to("data", n.data)


def test_public_helpers_as_pycaffe():
    n = coord_net_spec(ks=5, stride=2, pad=1)
    assert cm.coord_map(n.conv.fn) == (1, [0.5], [-0.5])
    assert cm.coord_map(n.deconv.fn) == (1, [2.0], [1.5])
    assert cm.coord_map(L.ReLU(n.conv).fn) == (None, 1, 0)
    with pytest.raises(cm.UndefinedMapException):
        cm.coord_map(L.InnerProduct(n.conv, num_output=2).fn)
    assert cm.compose((1, 2.0, 1.0), (None, 0.5, -1.0)) == (1, 1.0, -1.0)
    assert cm.inverse((1, 2.0, 1.0)) == (1, 0.5, -0.5)
    ax, a, b = cm.compose((1, np.array([2.0, 1.0]), np.array([0.0, 1.0])), (1, 0.5, 3.0))
    assert (ax, a.tolist(), b.tolist()) == (1, [1.0, 0.5], [6.0, 4.0])
    ax, stride, extent, pad = cm.conv_params(L.Convolution(n.data, kernel_size=3, dilation=2, pad=[1, 2]).fn)
    assert (ax, stride.tolist(), extent.tolist(), pad.tolist()) == (1, [1, 1], [5, 5], [1, 2])
    axis, offset = cm.crop_params(L.Crop(n.deconv, n.data).fn)
    assert (axis, offset.tolist()) == (2, [0])
    assert "ReLU" in cm.PASS_THROUGH_LAYERS and "InnerProduct" not in cm.PASS_THROUGH_LAYERS


# -- the same offsets as the offsets tool -------------------------------------------------------------


def random_net(rng):
    """A NetSpec: data, a random chain of conv/pool (downsampling), deconvs back up, crop to the data."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 200, 200]))
    top, scale = n.data, 1
    for i in range(rng.randint(1, 4)):
        if rng.random() < 0.5:
            ks, s = rng.choice([(3, 1), (5, 1), (3, 2), (7, 2), (1, 1)])
            top = L.Convolution(top, num_output=4, kernel_size=ks, stride=s, pad=rng.randint(0, ks),
                                dilation=rng.choice([1, 1, 2]))
        else:
            ks, s = rng.choice([(2, 2), (3, 2), (2, 1)])
            top = L.Pooling(top, pool=P.Pooling.MAX, kernel_size=ks, stride=s, pad=rng.randint(0, ks - 1))
        scale *= s
        n[f"layer{i}"] = top
    if scale > 1:
        top = L.Deconvolution(top, convolution_param=dict(num_output=4, kernel_size=2 * scale, stride=scale,
                                                          pad=rng.randint(0, scale // 2)))
        n.up = top
    return n, top


def test_random_nets_crop_where_the_offsets_tool_says():
    rng = random.Random(15)
    checked = 0
    for _ in range(300):
        n, top = random_net(rng)
        try:
            n.score = crop(top, n.data)
        except AssertionError:
            continue  # a negative or fractional offset: nothing to compare
        net = n.to_proto()
        layer = net.layer[-1]
        computed = crop_offsets(net)[layer.name]
        assert set(computed) == {layer.crop_param.offset[0]}, net
        checked += 1
    assert checked >= 50


@pytest.mark.parametrize("model", FCN_MODELS)
def test_fcn_crops_equal_the_offsets_tool(model, tmp_path, monkeypatch):
    """Run the model's net.py in this process (caffe -> caffeish), recording every crop() call."""
    source = py2to3(shared_path("models", "fcn", model, "net.py").read_text())
    calls = []

    def recording_crop(top_from, top_to):
        ax, a, b = coord_map_from_to(top_from, top_to)
        out = crop(top_from, top_to)
        calls.append((out, ax, a, b))
        return out

    fake = types.ModuleType("caffe.coord_map")
    fake.crop = recording_crop
    monkeypatch.setitem(sys.modules, "caffe", caffeish)
    monkeypatch.setitem(sys.modules, "caffe.coord_map", fake)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "fcn_net", "__file__": str(tmp_path / "net.py")}
    exec(compile(source, f"{model}/net.py", "exec"), namespace)
    namespace["make_net"]()
    nets = sorted(tmp_path.glob("*.prototxt"))
    assert len(nets) == 2 and calls
    for path in nets:
        net = caffeish.io.read_net(str(path))
        computed = crop_offsets(net)
        written = {l.name: list(l.crop_param.offset) for l in net.layer if l.type == "Crop"}
        assert written and set(written) == set(computed)
        for name, offsets in written.items():
            assert len(offsets) == 1 and set(computed[name]) == {offsets[0]}, (model, name)
    for out, ax, a, b in calls:
        assert ax == 1 and np.all(a == 1)
        assert out.fn.params["crop_param"] == dict(axis=2, offset=[int(-x) for x in b])
