"""pycaffe's Net surface (caffeish.Net as `caffe.Net`): blobs kept after forward, blob_loss_weights,
layer_dict, indexes, hooks, set_input_arrays, share_with, HDF5 weights, the exception types pycaffe
users catch, and `net.save` without the prototxt it was built from."""
import importlib.util
import os
from collections import OrderedDict

import numpy as np
import pytest

import caffeish

NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 }
                            bias_filler { type: "constant" value: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    return str(path)


def test_save_after_the_prototxt_was_deleted_and_over_an_existing_file(tmp_path, net_file):
    net = caffeish.Net(net_file, caffeish.TEST)
    out = tmp_path / "w.caffemodel"
    net.save(str(out))  # out exists from now on
    os.remove(net_file)
    net.params["ip"][1].data[...] = 7
    net.save(str(out))
    again = caffeish.Net(caffeish.formats.io.parse_text(NET, caffeish.pb.NetParameter()), str(out))
    np.testing.assert_array_equal(again.params["ip"][1].data, np.full(5, 7, np.float32))


def test_save_refuses_to_overwrite_the_prototxt(tmp_path, net_file):
    net = caffeish.Net(net_file, caffeish.TEST)
    saves = [net.save] + ([net.save_hdf5] if importlib.util.find_spec("h5py") else [])
    for save in saves:
        with pytest.raises(caffeish.CaffeishError, match=r"refusing to overwrite an input file \(the net's prototxt\)"):
            save(net_file)
    assert (tmp_path / "net.prototxt").read_text() == NET and os.listdir(tmp_path) == ["net.prototxt"]


def build(text, **kw):
    return caffeish.Net(caffeish.formats.io.parse_text(text, caffeish.pb.NetParameter()), **kw)


@pytest.fixture
def x():
    return np.random.default_rng(3).standard_normal((2, 3, 6, 6)).astype(np.float32)


# -- blobs, layers and their indexes ---------------------------------------------------------------

LOSSES = """
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 2 dim: 4 } shape { dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "pw" type: "Power" bottom: "ip" top: "pw" loss_weight: 0.5 power_param { shift: 1 } }
layer { name: "relu" type: "ReLU" bottom: "pw" top: "r" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" top: "prob"
        loss_weight: 2 loss_weight: 0 }
layer { name: "eu" type: "EuclideanLoss" bottom: "r" bottom: "r" top: "eu" }
"""


def test_blob_loss_weights_as_caffe_records_them():
    net = build(LOSSES)
    # pw has a loss weight and a consumer: Caffe's InsertSplits moves the weight to the split's first top.
    assert net.blob_loss_weights == OrderedDict([
        ("data", 0.0), ("label", 0.0), ("ip", 0.0), ("ip_ip_0_split_0", 0.0), ("ip_ip_0_split_1", 0.0),
        ("pw", 0.0), ("pw_pw_0_split_0", 0.5), ("pw_pw_0_split_1", 0.0), ("r", 0.0), ("r_relu_0_split_0", 0.0),
        ("r_relu_0_split_1", 0.0), ("loss", 2.0), ("prob", 0.0), ("eu", 1.0)])
    assert list(net.blob_loss_weights) == list(net.blobs) == net._blob_names
    assert net._blob_loss_weights == list(net.blob_loss_weights.values())
    out = net.forward(data=np.ones((2, 4), np.float32), label=np.array([0, 2], np.float32))
    total = net._forward(0, len(net.layers) - 1)  # Caffe's ForwardFromTo returns the weighted loss
    expected = 0.5 * net.blobs["pw_pw_0_split_0"].data.sum() + 2 * out["loss"] + out["eu"]
    assert total == pytest.approx(float(expected), rel=1e-6)


def test_layer_dict_and_the_index_lists(net_file):
    net = caffeish.Net(net_file, caffeish.TEST, level=0, stages=None, weights=None)  # pycaffe's defaults
    assert list(net.layer_dict) == net._layer_names == ["data", "conv", "relu", "ip", "prob"]
    assert [layer.type for layer in net.layer_dict.values()] == [layer.type for layer in net.layers]
    assert net._blob_names == ["data", "conv", "ip", "prob"]
    assert [b.name for b in net._blobs] == net._blob_names
    assert net._inputs == [0] and net._outputs == [3]
    assert [net._top_ids(i) for i in range(5)] == [[0], [1], [1], [2], [3]]  # relu works in place
    assert [net._bottom_ids(i) for i in range(5)] == [[], [0], [1], [1], [2]]
    assert list(net.params) == ["conv", "ip"] and len(net.params["conv"]) == 2


def test_diffs_are_kept_per_blob(net_file):
    net = caffeish.Net(net_file, caffeish.TEST)
    net.blobs["ip"].diff[...] = 3
    net.params["conv"][0].diff[0] = 1
    assert (net.blobs["ip"].diff == 3).all() and net.blobs["ip"].diff.shape == (2, 5)
    assert net.params["conv"][0].diff[0].min() == 1 and net.params["conv"][0].diff[1:].max() == 0
    assert not net.blobs["conv"].diff.any()


def test_forward_all_pads_the_last_batch_and_drops_the_padding(net_file):
    net = caffeish.Net(net_file, caffeish.TEST)
    items = np.random.default_rng(1).standard_normal((5, 3, 6, 6)).astype(np.float32)
    out = net.forward_all(data=items, blobs=["ip"])
    assert out["prob"].shape == (5, 5) and out["ip"].shape == (5, 5)
    for i in range(5):
        single = net.forward(data=np.stack([items[i], items[i]]))
        np.testing.assert_allclose(out["prob"][i], single["prob"][0], rtol=1e-5, atol=1e-7)


# -- hooks --------------------------------------------------------------------------------------------


def test_before_and_after_forward_hooks_get_each_layer_index(net_file, x):
    net = caffeish.Net(net_file, caffeish.TEST)
    calls = []
    net.before_forward(lambda i: calls.append(("before", i)))
    net.after_forward(lambda i: calls.append(("after", i, net.blobs[net.top_names[net._layer_names[i]][0]].data.copy())))
    out = net.forward(data=x)
    assert [c[:2] for c in calls] == [(w, i) for i in range(5) for w in ("before", "after")]
    np.testing.assert_array_equal(calls[1][2], x)  # the Input layer's top
    np.testing.assert_array_equal(calls[-1][2], out["prob"])
    assert calls[5][2].min() >= 0 and calls[3][2].min() < 0  # conv after its ReLU ran in place, and before
    calls.clear()
    net.forward(start="ip")
    assert [c[:2] for c in calls] == [("before", 3), ("after", 3), ("before", 4), ("after", 4)]


def test_a_before_forward_hook_may_write_the_input_and_its_errors_pass_through(net_file, x):
    net = caffeish.Net(net_file, caffeish.TEST)
    expected = net.forward(data=x)["prob"].copy()

    def feed(i):
        if i == 1:
            net.blobs["data"].data[...] = x

    net.before_forward(feed)
    np.testing.assert_array_equal(net.forward(data=np.zeros_like(x))["prob"], expected)
    error = KeyError("mine")

    def fail(i):
        raise error

    net.after_forward(fail)
    with pytest.raises(KeyError) as info:
        net.forward()
    assert info.value is error
    with pytest.raises(TypeError, match="callable"):
        net.before_forward(3)


# -- MemoryData and set_input_arrays ------------------------------------------------------------------

MEMORY = """
layer { name: "mem" type: "MemoryData" top: "data" top: "label"
        memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_set_input_arrays_serves_batches_in_turn_and_wraps():
    net = build(MEMORY)
    data = np.arange(6 * 6, dtype=np.float32).reshape(6, 1, 2, 3)
    labels = np.array([0, 1, 1, 0, 1, 1], np.float32)
    net.set_input_arrays(data, labels)  # 1-D labels are made (N, 1, 1, 1), as pycaffe does
    for batch in (0, 1, 2, 0):
        out = net.forward(blobs=["data", "label"])
        np.testing.assert_array_equal(out["data"], data[2 * batch:2 * batch + 2])
        np.testing.assert_array_equal(out["label"], labels[2 * batch:2 * batch + 2])
        w, b = (p.data for p in net.params["ip"])
        scores = data[2 * batch:2 * batch + 2].reshape(2, -1) @ w.T + b
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        expected = -np.log(p[[0, 1], labels[2 * batch:2 * batch + 2].astype(int)]).mean()
        assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-5)


def test_set_input_arrays_checks_as_pycaffe(net_file):
    net = build(MEMORY)
    good = np.zeros((4, 1, 2, 3), np.float32)
    labels = np.zeros(4, np.float32)
    cases = [
        (good[:, :, :, ::-1], labels, "data array must be C contiguous"),
        (good.reshape(4, 6), labels, "data array must be 4-d"),
        (good.astype(np.float64), labels, "data array must be float32"),
        (np.zeros((4, 2, 2, 3), np.float32), labels, "data array has wrong number of channels"),
        (np.zeros((4, 1, 3, 3), np.float32), labels, "data array has wrong height"),
        (np.zeros((4, 1, 2, 4), np.float32), labels, "data array has wrong width"),
        (good, labels.astype(np.int64), "labels array must be float32"),
        (good, np.zeros((4, 2), np.float32), "labels array must be 4-d"),
        (good, labels[:2], "same first dimension"),
        (np.zeros((3, 1, 2, 3), np.float32), labels[:3], "multiple of batch size"),
        (good.tolist(), labels, "data array must be a numpy array"),
    ]
    for data, lab, message in cases:
        with pytest.raises(RuntimeError, match=message):
            net.set_input_arrays(data, lab)
    with pytest.raises(RuntimeError, match="first layer is a MemoryDataLayer"):
        caffeish.Net(net_file).set_input_arrays(good, labels)
    with pytest.raises(caffeish.CaffeishError, match="give the data-layer input"):
        net.forward()  # nothing was set


def test_memory_data_tops_can_still_be_fed_as_inputs():
    net = build(MEMORY)
    data = np.ones((2, 1, 2, 3), np.float32)
    out = net.forward(data=data, label=np.zeros(2, np.float32), blobs=["data"])
    np.testing.assert_array_equal(out["data"], data)


# -- share_with ---------------------------------------------------------------------------------------


def test_share_with_makes_the_parameters_one(net_file, x):
    a = caffeish.Net(net_file, seed=1)
    b = caffeish.Net(net_file, seed=2)
    assert not np.array_equal(a.params["ip"][0].data, b.params["ip"][0].data)
    b.share_with(a)
    np.testing.assert_array_equal(b.forward(data=x)["prob"], a.forward(data=x)["prob"])
    a.params["conv"][1].data[...] = 9
    assert (b.params["conv"][1].data == 9).all()
    smaller = NET.replace("num_output: 5", "num_output: 4")
    c = build(smaller)
    with pytest.raises(caffeish.CaffeishError, match="parameter 0 of layer 'ip': shape mismatch"):
        c.share_with(a)
    fewer = NET.replace('bias_filler { type: "constant" value: 0.5 }', "bias_term: false")
    with pytest.raises(caffeish.CaffeishError, match="layer 'conv' has 2 parameter blob.* and 1 here"):
        build(fewer).share_with(a)
    only_ip = build(NET.replace('layer { name: "conv"', 'layer { name: "conv2"'))
    only_ip.share_with(a)  # layers of `a` missing here are ignored
    assert only_ip.params["ip"][0].data is a.params["ip"][0].data


# -- HDF5 weights -------------------------------------------------------------------------------------

SHARED_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 } } }
layer { name: "f1" type: "InnerProduct" bottom: "data" top: "f1"
        param { name: "w" } inner_product_param { num_output: 4 weight_filler { type: "gaussian" } } }
layer { name: "f2" type: "InnerProduct" bottom: "f1" top: "f2"
        param { name: "w" } inner_product_param { num_output: 4 bias_filler { type: "constant" value: 3 } } }
"""


def test_save_hdf5_writes_caffes_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    net = build(SHARED_NET, seed=4)
    path = tmp_path / "w.caffemodel.h5"
    path.write_bytes(b"old")
    net.save_hdf5(str(path))  # replaced atomically: no temp file left, the mode a plain open() gives
    umask = os.umask(0)
    os.umask(umask)
    assert os.listdir(tmp_path) == ["w.caffemodel.h5"] and os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    with h5py.File(path, "r") as f:
        assert list(f) == ["data"] and sorted(f["data"]) == ["data", "f1", "f2"]
        assert len(f["data/data"]) == 0
        assert sorted(f["data/f1"]) == ["0", "1"] and list(f["data/f2"]) == ["1"]  # f2's weight is f1's
        assert f["data/f1/0"].dtype == np.float32 and f["data/f1/0"].shape == (4, 4)
        np.testing.assert_array_equal(f["data/f1/0"][()], net.params["f1"][0].data)
        np.testing.assert_array_equal(f["data/f2/1"][()], np.full(4, 3, np.float32))


def test_hdf5_round_trip_and_copy_from_judges_by_content(tmp_path, net_file, x):
    pytest.importorskip("h5py")
    a = caffeish.Net(net_file, seed=1)
    path = str(tmp_path / "weights.anything")
    a.save_hdf5(path)
    b = caffeish.Net(net_file, seed=2)
    b.load_hdf5(path)
    for name in a.params:
        for p, q in zip(a.params[name], b.params[name]):
            np.testing.assert_array_equal(p.data, q.data)
    c = caffeish.Net(net_file, seed=3)
    c.copy_from(path)  # Caffe's CopyTrainedLayersFrom reads HDF5 by content
    d = caffeish.Net(net_file, caffeish.TEST, weights=path)
    for net in (c, d):
        np.testing.assert_array_equal(net.forward(data=x)["prob"], a.forward(data=x)["prob"])
    shared = build(SHARED_NET, seed=5)
    shared.save_hdf5(str(tmp_path / "s.h5"))
    other = build(SHARED_NET, seed=6)
    other.load_hdf5(str(tmp_path / "s.h5"))  # f2's missing weight is fine: it shares f1's
    np.testing.assert_array_equal(other.params["f2"][0].data, shared.params["f1"][0].data)


def test_load_hdf5_refuses_what_caffe_refuses(tmp_path, net_file):
    h5py = pytest.importorskip("h5py")
    net = caffeish.Net(net_file)
    cases = {
        "shape": {"data/ip/0": np.zeros((5, 63), np.float32), "data/ip/1": np.zeros(5, np.float32)},
        "count": {"data/ip/0": np.zeros((5, 64), np.float32), "data/ip/1": np.zeros(5, np.float32),
                  "data/ip/2": np.zeros(1, np.float32)},
        "missing": {"data/ip/0": np.zeros((5, 64), np.float32)},
        "nodata": {"weights/ip/0": np.zeros((5, 64), np.float32)},
    }
    messages = {"shape": r"blob 0 has shape \(5, 63\) in the file, but the net expects \(5, 64\)",
                "count": "holds 3 blob", "missing": "blob 1 is missing", "nodata": "no group 'data'"}
    before = net.params["ip"][0].data.copy()
    for case, datasets in cases.items():
        path = tmp_path / f"{case}.h5"
        with h5py.File(path, "w") as f:
            for key, value in datasets.items():
                f[key] = value
            if "data" in f:
                f.create_group("data/unknown_layer")  # ignored, as in Caffe
        with pytest.raises(caffeish.CaffeishError, match=messages[case]):
            net.load_hdf5(str(path))
    np.testing.assert_array_equal(net.params["ip"][0].data, before)  # nothing was written
    with pytest.raises(RuntimeError, match="cannot read as HDF5"):
        net.load_hdf5(net_file)


def test_save_hdf5_refuses_layer_names_hdf5_cannot_hold(tmp_path):
    pytest.importorskip("h5py")
    net = build(NET.replace('name: "conv"', 'name: "inception/conv"'))
    with pytest.raises(caffeish.CaffeishError, match="'inception/conv' cannot be an HDF5 group name"):
        net.save_hdf5(str(tmp_path / "w.h5"))
    assert os.listdir(tmp_path) == []


def test_hdf5_without_h5py_says_what_to_install(tmp_path, net_file, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)
    net = caffeish.Net(net_file)
    for call in (net.save_hdf5, net.load_hdf5):
        with pytest.raises(caffeish.CaffeishError, match="need the h5py package.*pip install h5py"):
            call(str(tmp_path / "w.h5"))


# -- the exceptions pycaffe users catch ---------------------------------------------------------------


def test_errors_are_the_builtin_types_pycaffe_raises(tmp_path, net_file, x):
    from caffeish.errors import CaffeishError

    net = caffeish.Net(net_file, caffeish.TEST)
    plain = [  # pycaffe's dicts and lists: the built-in errors themselves
        (KeyError, lambda: net.blobs["nope"]),
        (KeyError, lambda: net.params["relu"]),
        (IndexError, lambda: net.layers[9]),
    ]
    ours = [  # where pycaffe raises a built-in error, ours are CaffeishErrors of that type too
        (KeyError, lambda: net.forward(data=x, blobs=["nope"])),
        (ValueError, lambda: net.forward(start="nope")),
        (ValueError, lambda: net.forward(end="nope")),
        (IndexError, lambda: net._forward(0, 5)),
        (ValueError, lambda: net.blobs["data"].reshape(2, -3, 6, 6)),
        (ValueError, lambda: net.blobs["data"].reshape(2, 3.5, 6, 6)),
        (ValueError, lambda: net.forward(data=np.zeros((2, 3, 8, 8), np.float32))),  # ip's weights do not fit
        (RuntimeError, lambda: caffeish.Net(str(tmp_path / "missing.prototxt"), caffeish.TEST)),
        (RuntimeError, lambda: caffeish.Net(net_file, str(tmp_path / "missing.caffemodel"), caffeish.TEST)),
        (RuntimeError, lambda: net.copy_from(str(tmp_path / "missing.caffemodel"))),
    ]
    for kind, call in plain + ours:
        with pytest.raises(kind) as info:
            call()
        assert isinstance(info.value, CaffeishError) == ((kind, call) in ours)
    with pytest.raises(KeyError) as info:
        net.forward(data=x, blobs=["nope"])
    assert str(info.value) == "forward: unknown blob(s) ['nope']"  # one line, not KeyError's quoted form


# -- caffe.set_random_seed and _caffe's functions ------------------------------------------------------


@pytest.fixture
def global_seed():
    from caffeish.runtime.fillers import GlobalRNG

    saved = GlobalRNG.generator
    yield
    GlobalRNG.generator = saved


RANDOM = """
layer { name: "data" type: "DummyData" top: "data" dummy_data_param { shape { dim: 2 dim: 3 }
        data_filler { type: "gaussian" std: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
"""


def test_set_random_seed_makes_nets_reproducible_as_caffes_global_rng(global_seed):
    def run():
        caffeish.set_random_seed(1701)
        first, second = build(RANDOM), build(RANDOM)
        return [first.params["ip"][0].data.copy(), second.params["ip"][0].data.copy(),
                first.forward()["ip"].copy(), first.forward()["ip"].copy()]

    a, b = run(), run()
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p, q)
    assert not np.array_equal(a[0], a[1])  # one stream: the second net draws after the first
    assert not np.array_equal(a[2], a[3])  # DummyData's gaussian is drawn anew each forward
    caffeish.set_random_seed(1702)
    assert not np.array_equal(build(RANDOM).params["ip"][0].data, a[0])
    np.testing.assert_array_equal(build(RANDOM, seed=5).params["ip"][0].data,
                                  build(RANDOM, seed=5).params["ip"][0].data)  # seed= wins
    for bad in (-1, 2 ** 32, 1.5, "7"):
        with pytest.raises((ValueError, TypeError), match="seed"):
            caffeish.set_random_seed(bad)


def test_layer_type_list_is_caffes_registry():
    from conftest import shared_path

    types = caffeish.layer_type_list()
    assert "Python" in types and "Convolution" in types and "Data" in types
    assert types == sorted(types)
    expected = shared_path("caffe", "layer_types.txt").read_text().split()
    assert types == expected


def test_single_process_functions_timer_and_no_nccl():
    from caffeish.pycaffe import _caffe

    assert caffeish.has_nccl() is False
    with pytest.raises(RuntimeError, match="NCCL"):
        caffeish.NCCL(None, "uid")
    with pytest.raises(RuntimeError, match="NCCL"):
        caffeish.NCCL.new_uid()
    assert (caffeish.solver_count(), caffeish.solver_rank()) == (1, 0)
    try:
        caffeish.set_solver_count(4)
        caffeish.set_solver_rank(2)
        caffeish.set_multiprocess(True)
        assert (caffeish.solver_count(), caffeish.solver_rank(), _caffe.multiprocess()) == (4, 2, True)
    finally:
        caffeish.set_solver_count(1)
        caffeish.set_solver_rank(0)
        caffeish.set_multiprocess(False)
    timer = caffeish.Timer()
    assert timer.ms == 0
    timer.start()
    import time

    time.sleep(0.02)
    timer.stop()
    stopped = timer.ms
    assert 15 < stopped < 2000 and timer.seconds == pytest.approx(stopped / 1e3)
    time.sleep(0.01)
    assert timer.ms == stopped  # stopped: the time stays


def test_init_log_and_log(caplog):
    import logging

    caffeish.init_log()
    with caplog.at_level(logging.INFO, logger="caffe"):
        caffeish.log("hello from pycaffe")
    assert "hello from pycaffe" in caplog.text
    caffeish.init_log(2)
    assert logging.getLogger("caffe").level == logging.ERROR
    with pytest.raises(ValueError, match="level"):
        caffeish.init_log(7)
    caffeish.init_log(0)


# -- the same on the GPU code path (the "strict" backend: numpy that refuses what CuPy refuses) ---------


def test_gpu_path_hooks_memory_data_sharing_and_hdf5(tmp_path, net_file, x):
    """Device nets: a hook's write into net.blobs[...].data reaches the device, MemoryData batches
    are copied to it, share_with and HDF5 weights work on device arrays."""
    cpu = caffeish.Net(net_file, seed=1)
    dev = caffeish.Net(net_file, backend="strict", seed=2)
    assert dev.xp is not np
    dev.share_with(caffeish.Net(net_file, backend="strict", seed=1))
    expected = cpu.forward(data=x)["prob"]
    np.testing.assert_allclose(dev.forward(data=x)["prob"], expected, rtol=1e-5, atol=1e-7)

    def feed(i):
        if i == 1:
            dev.blobs["data"].data[...] = x

    dev.before_forward(feed)
    np.testing.assert_allclose(dev.forward(data=np.zeros_like(x))["prob"], expected, rtol=1e-5, atol=1e-7)
    if importlib.util.find_spec("h5py"):
        dev.save_hdf5(str(tmp_path / "d.h5"))
        back = caffeish.Net(net_file, backend="strict", seed=3)
        back.load_hdf5(str(tmp_path / "d.h5"))
        np.testing.assert_array_equal(back.params["ip"][0].data, cpu.params["ip"][0].data)
    mem = build(MEMORY, backend="strict")
    data = np.arange(24, dtype=np.float32).reshape(4, 1, 2, 3)
    mem.set_input_arrays(data, np.array([0, 1, 1, 0], np.float32))
    mem.forward()
    np.testing.assert_array_equal(mem.forward(blobs=["data"])["data"], data[2:])


def test_dummy_data_fills_constant_tops_once_as_caffe(tmp_path):
    # Caffe fills a constant DummyData top once: labels a script writes into it stay; gaussian tops refill.
    path = tmp_path / "dummy.prototxt"
    path.write_text('''
layer { name: "data" type: "DummyData" top: "label" top: "noise"
        dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: "constant" value: 1 }
                           data_filler { type: "gaussian" std: 1 } } }
layer { name: "double" type: "Power" bottom: "label" top: "double" power_param { scale: 2 } }
''')
    net = caffeish.Net(str(path), caffeish.TEST)
    net.forward()
    assert (net.blobs["double"].data == 2).all()
    net.blobs["label"].data[...] = 5
    first_noise = net.blobs["noise"].data.copy()
    net.forward()
    assert (net.blobs["label"].data == 5).all() and (net.blobs["double"].data == 10).all()
    assert not np.array_equal(first_noise, net.blobs["noise"].data)
