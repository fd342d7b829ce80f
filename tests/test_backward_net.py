"""The Net-level backward: Caffe's rules for which layers and bottoms get diffs, and pycaffe's face.

training.md 9: loss weights as the backward seed (kept in the loss top's diff),
the need-backward passes (frozen prefixes, layers that do not contribute to a
loss, propagate_down switching producers off, force_backward and the bottoms
that refuse it), Split accumulation, in-place chains sharing one diff, shared
parameters adding into their owner's diff, param diffs accumulating until
clear_param_diffs; and pycaffe's backward(**diffs), backward(start=, end=),
diffs=[...], _backward and forward_backward_all.
"""
import numpy as np
import pytest
from google.protobuf import text_format

import caffeish as caffe
from caffeish.errors import CaffeishError
from caffeish.formats.schema import pb


def make_net(tmp_path, text, phase=caffe.TRAIN, **options):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return caffe.Net(str(path), phase, **options)


def needs(net):
    """{layer name: (runs backward, [bottom flags], [param flags])}."""
    return {node.name: (net._plan.layer[i], list(net._plan.bottoms[i]), list(net._plan.params[i]))
            for i, node in enumerate(net.nodes)}


CLASSIFIER = """
name: "c"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } shape { dim: 2 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" %s
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" %s
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" %s }
"""


def classifier(tmp_path, conv="", ip="", loss="", head="", **options):
    return make_net(tmp_path, head + CLASSIFIER % (conv, ip, loss), **options)


def test_frozen_prefix_does_not_run_backward(tmp_path):
    net = classifier(tmp_path, conv="param { lr_mult: 0 } param { lr_mult: 0 }")
    plan = needs(net)
    assert plan["conv"] == (False, [False], [False, False])
    assert plan["relu"][0] is False
    assert plan["ip"] == (True, [False], [True, True])
    assert plan["loss"] == (True, [True, False], [])
    assert net.layers[list(net._layer_names).index("conv")] is not None
    assert [n.layer.needs_backward for n in net.nodes] == [False, False, False, True, True]


def test_learning_prefix_runs_backward_but_the_data_gets_no_diff(tmp_path):
    plan = needs(classifier(tmp_path))
    assert plan["conv"] == (True, [False], [True, True])
    assert plan["relu"] == (True, [True], [])
    assert plan["data"][0] is False


def test_propagate_down_false_switches_the_producer_off(tmp_path):
    """propagate_down: false on ip's bottom does not stop ip, but conv's top is then skipped."""
    plan = needs(classifier(tmp_path, ip="propagate_down: false"))
    assert plan["ip"] == (True, [False], [True, True])
    assert plan["relu"][0] is False and plan["conv"][0] is False


def test_layers_that_feed_no_loss_do_not_run_backward(tmp_path):
    text = CLASSIFIER % ("", "", "") + """
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""
    plan = needs(make_net(tmp_path, text))
    assert plan["acc"][0] is False and plan["prob"][0] is False
    assert plan["ip"][0] is True
    assert plan["ip_split"][0] is True if "ip_split" in plan else True


def test_force_backward_reaches_everything_but_labels(tmp_path):
    net = classifier(tmp_path, conv="param { lr_mult: 0 } param { lr_mult: 0 }", head="force_backward: true\n")
    plan = needs(net)
    assert all(flag for flag, _, _ in plan.values())
    assert plan["conv"] == (True, [True], [True, True])  # lr_mult 0 params get diffs too
    assert plan["loss"][1] == [True, False]  # never into the labels


def test_propagate_down_needs_one_entry_per_bottom(tmp_path):
    with pytest.raises(CaffeishError, match="propagate_down has 1 entries for 2 bottom"):
        classifier(tmp_path, loss="propagate_down: true")


def test_loss_weight_is_the_seed_kept_in_the_top_diff(tmp_path):
    net = classifier(tmp_path, loss="loss_weight: 2.5")
    assert net.blob_loss_weights["loss"] == 2.5
    assert net.blobs["loss"].diff.tolist() == 2.5  # a scalar blob, as Caffe's loss tops
    net.forward()
    net.backward()
    assert float(net.blobs["loss"].diff.reshape(-1)[0]) == 2.5  # never reset


def _fill(net, seed=0):
    rng = np.random.default_rng(seed)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].data.shape)
    net.blobs["label"].data[...] = rng.integers(0, 3, net.blobs["label"].data.shape)


def test_loss_weight_scales_every_gradient(tmp_path):
    one, two = classifier(tmp_path), classifier(tmp_path, loss="loss_weight: 2")
    grads = []
    for net in (one, two):
        _fill(net)
        net.forward()
        net.backward()
        grads.append((net.params["conv"][0].diff.copy(), net.params["ip"][1].diff.copy()))
    for a, b in zip(*grads):
        np.testing.assert_allclose(b, 2 * a, rtol=1e-5, atol=1e-7)
        assert np.any(a)


def test_param_diffs_accumulate_until_cleared(tmp_path):
    net = classifier(tmp_path)
    _fill(net)
    net.forward()
    net.backward()
    once = net.params["conv"][0].diff.copy()
    net.backward()
    np.testing.assert_allclose(net.params["conv"][0].diff, 2 * once, rtol=1e-6)
    net.clear_param_diffs()
    assert not np.any(net.params["conv"][0].diff) and not np.any(net.params["ip"][0].diff)


SHARED = """
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 } } }
layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "b" type: "InnerProduct" bottom: "data" top: "b" param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 3 } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" eltwise_param { coeff: 1 coeff: 3 } }
"""


def test_shared_params_add_into_the_owners_diff(tmp_path):
    net = make_net(tmp_path, SHARED)
    assert net.params["a"][0].diff is net.params["b"][0].diff
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    net.forward(data=x)
    net.backward(sum=dy)
    # a's gradient plus b's: (1 + 3) * dy^T x, and the data's diff from the split: (1 + 3) * dy W
    np.testing.assert_allclose(net.params["a"][0].diff, 4 * dy.T @ x, rtol=1e-5)
    np.testing.assert_allclose(net.params["b"][1].diff, 4 * dy.sum(0), rtol=1e-5)
    w = net.params["a"][0].data
    np.testing.assert_allclose(net.blobs["data"].diff, 4 * dy @ w, rtol=1e-5)
    split_diffs = [net.blobs[n].diff for n in net.blobs if "_split_" in n]
    assert len(split_diffs) == 2
    np.testing.assert_allclose(split_diffs[0] + split_diffs[1], net.blobs["data"].diff, rtol=1e-6)


def test_an_in_place_chain_ends_with_the_diff_of_its_first_input(tmp_path):
    text = """
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 5
        weight_filler { type: "gaussian" std: 1 } } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "scale" type: "Power" bottom: "ip" top: "ip" power_param { scale: 3 } }
"""
    net = make_net(tmp_path, text)
    x = np.random.default_rng(3).standard_normal((2, 6)).astype(np.float32)
    out = net.forward(data=x)["ip"].copy()
    dy = np.ones((2, 5), np.float32)
    diffs = net.backward(ip=dy)
    # Power (power 1, scale 3) in place sets the shared diff to 3, then multiplies it by itself: Caffe
    # gives 9, not 3 (training.md 9.3); ReLU saw its own output (in place): it passes where that is > 0
    np.testing.assert_array_equal(net.blobs["ip"].diff, np.where(out > 0, 9.0, 0.0).astype(np.float32))
    assert set(diffs) == {"data"}
    np.testing.assert_allclose(diffs["data"], net.blobs["ip"].diff @ net.params["ip"][0].data, rtol=1e-5)


def test_pycaffe_backward_checks_its_arguments(tmp_path):
    net = make_net(tmp_path, SHARED)
    net.forward(data=np.ones((2, 4), np.float32))
    with pytest.raises(CaffeishError, match="do not match the net's outputs"):
        net.backward(nope=np.ones((2, 3)))
    with pytest.raises(CaffeishError, match="batch size"):
        net.backward(sum=np.ones((3, 3)))
    got = net.backward(diffs=["a"], sum=np.ones((2, 3)))
    assert set(got) == {"data", "a"}
    got = net.backward(start="sum", end="a")
    assert set(got) == set(net.bottom_names["a"]) == {"data_data_0_split_0"}  # pycaffe: the end layer's bottoms
    with pytest.raises(CaffeishError):
        net._backward(0, 99)


def test_backward_after_keep_false_says_what_to_do(tmp_path):
    net = classifier(tmp_path, keep=False)
    _fill(net)
    net.forward()
    with pytest.raises(CaffeishError, match="keep=True"):
        net.backward()


def test_forward_backward_all_batches_and_drops_the_padding(tmp_path):
    net = make_net(tmp_path, SHARED)
    x = np.random.default_rng(4).standard_normal((5, 4)).astype(np.float32)
    dy = np.random.default_rng(5).standard_normal((5, 3)).astype(np.float32)
    outs, diffs = net.forward_backward_all(data=x, sum=dy)
    assert outs["sum"].shape == (5, 3) and diffs["data"].shape == (5, 4)
    w = net.params["a"][0].data
    np.testing.assert_allclose(diffs["data"], 4 * dy @ w, rtol=1e-5)
    np.testing.assert_allclose(outs["sum"], 4 * (x @ w.T + net.params["a"][1].data), rtol=1e-5, atol=1e-6)


def test_batchnorm_statistics_cannot_be_learned(tmp_path):
    text = """
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 2 dim: 2 } } }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" param { lr_mult: 1 } }
"""
    with pytest.raises(CaffeishError, match="statistics"):
        make_net(tmp_path, text)


def test_blob_diff_is_writable_and_live(tmp_path):
    net = classifier(tmp_path)
    d = net.blobs["ip"].diff
    d[...] = 7
    assert np.all(net.blobs["ip"].diff == 7)
    p = net.params["ip"][0].diff
    p[...] = 1
    assert np.all(net.params["ip"][0].diff == 1)
    net.clear_param_diffs()
    assert not np.any(p)


def test_plan_reads_the_nets_own_param_specs():
    net = pb.NetParameter()
    text_format.Parse(CLASSIFIER % ("", "", ""), net)
    built = caffe.Net(net, caffe.TRAIN)
    assert needs(built)["conv"][2] == [True, True]


def test_a_second_backward_needs_no_more_memory_than_the_first(tmp_path):
    """Each bottom's old diff is let go before its layer makes the new one, so the backwards after
    the first never hold two diffs of a blob at once (tracemalloc sees numpy's allocations)."""
    import tracemalloc

    text = """
    layer { name: "data" type: "Input" top: "data" top: "label"
            input_param { shape { dim: 2 dim: 4 dim: 48 dim: 48 } shape { dim: 2 dim: 1 dim: 48 dim: 48 } } }
    layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
            convolution_param { num_output: 16 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
    layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
    layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2"
            convolution_param { num_output: 16 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
    layer { name: "r2" type: "ReLU" bottom: "c2" top: "c2" }
    layer { name: "c3" type: "Convolution" bottom: "c2" top: "c3"
            convolution_param { num_output: 3 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "c3" bottom: "label" top: "loss" }
    """
    net = make_net(tmp_path, "force_backward: true\n" + text)
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].data.shape)
    net.blobs["label"].data[...] = rng.integers(0, 3, net.blobs["label"].data.shape)
    peaks = []
    tracemalloc.start()
    try:
        for _ in range(3):
            net.forward()
            tracemalloc.reset_peak()
            net.backward()
            peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    diffs = sum(net.blobs[b].diff.nbytes for b in ("data", "c1", "c2", "c3"))
    assert max(peaks[1:]) <= peaks[0] + diffs // 4, (peaks, diffs)
