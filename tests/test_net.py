"""The Net runtime's mechanics: weights, fillers, keeping/freeing blobs, in-place, splits, reshape, start/end, save."""
import numpy as np
import pytest

import caffeish
from caffeish.errors import CaffeishError, GraphError, ShapeError, UnsupportedError, WeightError
from caffeish.formats.io import parse_text
from caffeish.formats.schema import pb

NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1
          weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "a" type: "Power" bottom: "pool" top: "a" power_param { scale: 2 } }
layer { name: "b" type: "Power" bottom: "pool" top: "b" power_param { shift: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }
layer { name: "ip" type: "InnerProduct" bottom: "sum" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def net_param(text=NET):
    return parse_text(text, pb.NetParameter())


def reference(net, x):
    """The same computation written out with numpy, from the net's own parameters."""
    w, b = (p.data for p in net.params["conv"])
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # n c h w kh kw
    conv = np.einsum("nchwij,ocij->nohw", windows, w) + b[None, :, None, None]
    conv = np.maximum(conv, 0)
    pool = conv.reshape(2, 4, 4, 2, 4, 2).max(axis=(3, 5))
    s = 2 * pool + (pool + 1)
    wi, bi = (p.data for p in net.params["ip"])
    ip = s.reshape(2, -1) @ wi.T + bi
    e = np.exp(ip - ip.max(axis=1, keepdims=True))
    return conv, e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def x():
    return np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)


def test_forward_matches_a_numpy_reference(x):
    net = caffeish.Net(net_param(), keep=True)
    out = net.forward(data=x)
    conv, prob = reference(net, x)
    assert list(out) == ["prob"]
    np.testing.assert_allclose(out["prob"], prob, rtol=1e-5, atol=1e-6)
    # In place: the blob 'conv' holds the ReLU's result, as in Caffe.
    np.testing.assert_allclose(net.blobs["conv"].data, conv, rtol=1e-5, atol=1e-5)
    # The split Caffe inserts for 'pool' (two consumers) is there and equals its source.
    assert "pool_pool_0_split_0" in net.blobs
    np.testing.assert_array_equal(net.blobs["pool_pool_0_split_1"].data, net.blobs["pool"].data)


def test_fillers_are_used_and_reproducible():
    a = caffeish.Net(net_param())
    b = caffeish.Net(net_param())
    c = caffeish.Net(net_param(), seed=1)
    w = a.params["conv"][0].data
    assert w.dtype == np.float32 and 0.05 < w.std() < 0.2
    np.testing.assert_array_equal(a.params["conv"][1].data, np.full(4, 0.5, np.float32))
    np.testing.assert_array_equal(w, b.params["conv"][0].data)
    assert not np.array_equal(w, c.params["conv"][0].data)


def test_every_blob_is_kept_by_default_as_in_caffe(x):
    net = caffeish.Net(net_param())
    net.forward(data=x)
    assert set(net._arrays) == set(net.blobs)
    conv, prob = reference(net, x)
    np.testing.assert_allclose(net.blobs["conv"].data, conv, rtol=1e-5, atol=1e-5)
    for name, blob in net.blobs.items():  # pycaffe scripts walk every blob after forward
        assert blob.data.shape == blob.shape
    np.testing.assert_allclose(net.blobs["pool"].data, conv.reshape(2, 4, 4, 2, 4, 2).max(axis=(3, 5)),
                               rtol=1e-5, atol=1e-5)


def test_intermediates_are_freed_with_keep_false_or_a_list(x):
    net = caffeish.Net(net_param(), keep=False)
    net.forward(data=x)
    assert set(net._arrays) == {"data", "prob"}
    with pytest.raises(GraphError, match="keep=True"):
        net.blobs["pool"].data
    kept = caffeish.Net(net_param(), keep=["pool"])
    kept.forward(data=x)
    assert set(kept._arrays) == {"data", "pool", "prob"}
    asked = net.forward(data=x, blobs=["sum"])
    assert list(asked) == ["prob", "sum"]


def test_params_are_live_and_writable(x):
    net = caffeish.Net(net_param())
    net.params["ip"][0].data[...] = 0
    net.params["ip"][1].data[...] = 0
    out = net.forward(data=x)
    np.testing.assert_allclose(out["prob"], np.full((2, 5), 0.2), rtol=1e-6)


def test_reshape_explicit_and_implicit(x):
    net = caffeish.Net(net_param(), keep=True)
    with pytest.raises(ShapeError, match="'ip'.*parameter shapes"):
        net.forward(data=np.zeros((1, 3, 16, 16), np.float32))
    net = caffeish.Net(net_param())
    out = net.forward(data=x[:1])
    assert out["prob"].shape == (1, 5)
    net.blobs["data"].reshape(3, 3, 8, 8)
    net.reshape()
    assert net.blobs["prob"].shape == (3, 5)
    net.reshape(data=(2, 3, 8, 8))
    assert net.blobs["data"].data.shape == (2, 3, 8, 8)
    assert net.forward(data=x)["prob"].shape == (2, 5)


def test_start_and_end(x):
    net = caffeish.Net(net_param(), keep=True)
    full = net.forward(data=x)["prob"].copy()
    out = net.forward(end="pool")
    assert list(out) == ["pool"]
    again = net.forward(start="a")
    np.testing.assert_array_equal(again["prob"], full)
    lean = caffeish.Net(net_param(), keep=False)
    lean.forward(data=x)
    with pytest.raises(GraphError, match="freed"):
        lean.forward(start="ip")
    with pytest.raises(GraphError, match="no layer named 'nope'"):
        net.forward(end="nope")


def test_save_and_copy_from_round_trip(tmp_path, x):
    net = caffeish.Net(net_param(), seed=7)
    path = tmp_path / "small.caffemodel"
    net.save(str(path))
    other = caffeish.Net(net_param(), seed=8)
    other.copy_from(str(path))
    for name in ("conv", "ip"):
        for p, q in zip(net.params[name], other.params[name]):
            np.testing.assert_array_equal(p.data, q.data)
    np.testing.assert_array_equal(net.forward(data=x)["prob"], other.forward(data=x)["prob"])
    # The weights in the pycaffe constructor.
    third = caffeish.Net(net_param(), str(path), caffeish.TEST)
    np.testing.assert_array_equal(third.params["ip"][0].data, net.params["ip"][0].data)


def test_pycaffe_constructor_forms(tmp_path):
    path = tmp_path / "n.prototxt"
    path.write_text(NET)
    caffeish.Net(net_param()).save(str(tmp_path / "w.caffemodel"))
    w = str(tmp_path / "w.caffemodel")
    for net in (caffeish.Net(str(path), caffeish.TEST), caffeish.Net(str(path), w, caffeish.TEST),
                caffeish.Net(str(path), caffeish.TEST, weights=w),
                caffeish.Net(network_file=str(path), phase=caffeish.TEST, weights=w)):
        assert net.phase == caffeish.TEST
        assert net.inputs == ["data"] and net.outputs == ["prob"]
    assert [l.type for l in net.layers][:3] == ["Input", "Convolution", "ReLU"]
    assert len(net.layers[1].blobs) == 2
    assert net._layer_names[0] == "data"


def test_wrong_weights_name_the_layer(tmp_path):
    other = NET.replace("num_output: 4", "num_output: 6")
    caffeish.Net(net_param(other)).save(str(tmp_path / "w.caffemodel"))
    with pytest.raises(WeightError, match="layer 'conv'"):
        caffeish.Net(net_param(), str(tmp_path / "w.caffemodel"))


def test_unknown_input_and_unsupported_layers(x):
    net = caffeish.Net(net_param())
    with pytest.raises(GraphError, match="not an input"):
        net.forward(label=x)
    text = 'layer { name: "d" type: "Data" top: "data" top: "label" data_param { source: "x" batch_size: 1 } }'
    with pytest.raises((UnsupportedError, CaffeishError)) as info:
        caffeish.Net(net_param(text))
    assert "'d'" in str(info.value)


def test_shared_parameters_alias_their_owner(x):
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 } } }
    layer { name: "f1" type: "InnerProduct" bottom: "data" top: "f1"
            param { name: "w" } inner_product_param { num_output: 4 bias_term: false weight_filler { type: "gaussian" } } }
    layer { name: "f2" type: "InnerProduct" bottom: "f1" top: "f2"
            param { name: "w" } inner_product_param { num_output: 4 bias_term: false } }
    """
    net = caffeish.Net(net_param(text))
    w = net.params["f1"][0].data
    assert net.params["f2"][0].data is w
    v = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(net.forward(data=v)["f2"], v @ w.T @ w.T, rtol=1e-5)


def test_inputs_are_copied_not_modified(x):
    net = caffeish.Net(net_param())
    before = x.copy()
    net.forward(data=x)
    np.testing.assert_array_equal(x, before)
    assert net.blobs["data"].data is not x


def test_in_place_relu_never_overwrites_shared_memory():
    """ReLU writes into its bottom only when no other blob, parameter or input uses that memory."""
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 } } }
    layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 2 dim: 6 } } }
    layer { name: "prelu" type: "ReLU" bottom: "p" top: "p" }
    layer { name: "drelu" type: "ReLU" bottom: "data" top: "data" }
    layer { name: "f" type: "Flatten" bottom: "data" top: "f" }
    layer { name: "r" type: "Reshape" bottom: "f" top: "r" reshape_param { shape { dim: 3 dim: 4 } } }
    layer { name: "rrelu" type: "ReLU" bottom: "r" top: "r" }
    """
    net = caffeish.Net(net_param(text), keep=True)
    weight = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
    net.params["p"][0].data[...] = weight
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(2, 6)
    net.forward(data=x)
    np.testing.assert_array_equal(net.params["p"][0].data, weight)  # the parameter is untouched
    np.testing.assert_array_equal(net.blobs["p"].data, np.maximum(weight, 0))
    np.testing.assert_array_equal(net.blobs["data"].data, np.maximum(x, 0))
    np.testing.assert_array_equal(x, np.linspace(-2, 2, 12, dtype=np.float32).reshape(2, 6))
    # 'f' is kept (keep=True) and 'r' is a view of it: ReLU on 'r' must not change 'f'.
    assert net.blobs["f"].data.min() == 0  # the data ReLU ran before Flatten
    np.testing.assert_array_equal(net.blobs["r"].data, np.maximum(x, 0).reshape(3, 4))


class _DeviceLikeArray:
    """An array as cupy shows itself to the runtime: flags without `writeable`."""

    class _Flags:
        c_contiguous, f_contiguous, owndata = True, False, True

    def __init__(self):
        self.base, self.flags = None, self._Flags()


def test_in_place_check_accepts_device_arrays_whose_flags_lack_writeable():
    net = caffeish.Net(net_param("""
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }
    layer { name: "e" type: "Power" bottom: "data" top: "e" }
    layer { name: "relu" type: "ReLU" bottom: "e" top: "e" }
    """))
    net.forward(data=np.ones((1, 3), np.float32))
    device_array = _DeviceLikeArray()
    assert net._exclusive("e", device_array) is True
    assert net._exclusive("data", device_array) is False  # inputs stay as given


def test_in_place_relu_writes_an_unshared_blob():
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 4 dim: 4 } } }
    layer { name: "c" type: "Convolution" bottom: "data" top: "c"
            convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "constant" value: -1 } } }
    layer { name: "relu" type: "ReLU" bottom: "c" top: "c" relu_param { negative_slope: 0.5 } }
    layer { name: "s" type: "Power" bottom: "c" top: "s" }
    """
    net = caffeish.Net(net_param(text))
    seen = {}
    forward = net.nodes[1].layer.forward

    def spy(xp, bottoms, blobs):
        tops = forward(xp, bottoms, blobs)
        seen["conv"] = tops[0]
        return tops

    net.nodes[1].layer.forward = spy
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4) - 8
    out = net.forward(data=x)["s"]
    want = np.where(-x > 0, -x, 0.5 * -x)
    np.testing.assert_array_equal(out[0, 0], want[0, 0])
    np.testing.assert_array_equal(seen["conv"][0, 0], want[0, 0])  # written in place


TRAIN_VAL = """
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }
        data_param { source: "mnist_test_lmdb" batch_size: 4 backend: LMDB } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_train_val_net_runs_on_given_arrays():
    """A Data layer's tops become inputs the caller feeds; losses and accuracy come out."""
    net = caffeish.Net(net_param(TRAIN_VAL), input_shapes={"data": (4, 1, 2, 3), "label": (4,)})
    assert net.inputs == ["data", "label"]
    x = np.random.default_rng(5).standard_normal((4, 1, 2, 3)).astype(np.float32)
    label = np.array([0, 2, 1, 2], np.float32)
    with pytest.raises(GraphError, match=r"give the data-layer input\(s\) \['data', 'label'\]"):
        net.forward()
    out = net.forward(data=x, label=label)
    w, b = (p.data for p in net.params["ip"])
    scores = x.reshape(4, -1) @ w.T + b
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out["loss"], -np.log(p[np.arange(4), label.astype(int)]).mean(), rtol=1e-5)
    np.testing.assert_allclose(out["accuracy"], np.mean(scores.argmax(axis=1) == label), rtol=1e-6)


def test_allocator_tuning_runs_once_and_can_be_turned_off():
    import subprocess
    import sys

    code = ("import caffeish.runtime.backend as b; first = b.tune_allocator(); "
            "print(first, b.tune_allocator())")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = on.stdout.split()
    assert second == "False"  # once per process
    if sys.platform.startswith("linux"):
        import platform

        if platform.libc_ver()[0] == "glibc":
            assert first == "True"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "CAFFEISH_MALLOC_TUNING": "0"})
    assert off.stdout.split() == ["False", "False"]
