"""A Convolution followed by an in-place plain ReLU runs fused on the CPU (Net.run): the same blobs,
bit for bit, as the two layers run one after the other, on every convolution path."""
import numpy as np
import pytest

import caffeish as caffe
from caffeish.runtime import conv_rows, winograd
from caffeish.graph import registry

CONV = """
force_backward: true
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: {c} dim: 12 dim: 13 }} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param {{ num_output: {o} kernel_size: {k} pad: {pad} group: {group} bias_term: {bias}
                            weight_filler {{ type: "gaussian" std: 0.5 }} bias_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "{relu_top}" }}
layer {{ name: "pool" type: "Pooling" bottom: "{relu_top}" top: "pool" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
"""

PATHS = {  # name: (c, o, k, pad, group)
    "im2col": (3, 5, 3, 1, 1),
    "1x1": (4, 6, 1, 0, 1),
    "depthwise": (4, 4, 3, 1, 4),
    "grouped": (4, 6, 3, 0, 2),
    "rows": (4, 5, 3, 1, 1),
    "winograd": (5, 4, 3, 1, 1),
}


@pytest.fixture
def small_thresholds(monkeypatch):
    monkeypatch.setattr(conv_rows, "MIN_COLUMNS", 1)
    monkeypatch.setattr(conv_rows, "MIN_DEPTH", 1)
    monkeypatch.setattr(winograd, "MIN_TILES", 1)
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "BACKWARD_MIN_CHANNELS", 1)


def build(tmp_path, name, in_place, bias=True):
    c, o, k, pad, group = PATHS[name]
    text = CONV.format(c=c, o=o, k=k, pad=pad, group=group, bias=str(bias).lower(),
                       relu_top="conv" if in_place else "relu")
    path = tmp_path / f"{name}_{in_place}.prototxt"
    path.write_text(text)
    return caffe.Net(str(path), caffe.TEST, seed=5)  # the same weights in both nets; no global state


def count_fused(monkeypatch):
    calls = []
    convolution = registry.lookup("Convolution")
    real = convolution.forward_relu
    monkeypatch.setattr(convolution, "forward_relu", lambda self, *a: calls.append(self) or real(self, *a))
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", sorted(PATHS))
def test_fused_equals_separate(tmp_path, monkeypatch, small_thresholds, name, bias):
    if name == "winograd":
        monkeypatch.setattr(conv_rows, "MIN_COLUMNS", 10 ** 9)  # winograd is tried first anyway
    calls = count_fused(monkeypatch)
    fused, separate = build(tmp_path, name, True, bias), build(tmp_path, name, False, bias)
    x = np.random.default_rng(1).standard_normal(fused.blobs["data"].data.shape).astype(np.float32)
    a = fused.forward(data=x)
    assert len(calls) == 1
    b = separate.forward(data=x)
    assert len(calls) == 1  # not in place: nothing to fuse
    np.testing.assert_array_equal(fused.blobs["conv"].data, separate.blobs["relu"].data)
    np.testing.assert_array_equal(a["pool"], b["pool"])
    assert (fused.blobs["conv"].data >= 0).all() and (separate.blobs["conv"].data < 0).any()


def test_stopping_at_the_convolution_leaves_its_output_unrectified(tmp_path, monkeypatch):
    calls = count_fused(monkeypatch)
    net, ref = build(tmp_path, "im2col", True), build(tmp_path, "im2col", False)
    x = np.random.default_rng(2).standard_normal(net.blobs["data"].data.shape).astype(np.float32)
    net.forward(data=x, end="conv")
    ref.forward(data=x, end="conv")
    assert not calls
    np.testing.assert_array_equal(net.blobs["conv"].data, ref.blobs["conv"].data)
    assert (net.blobs["conv"].data < 0).any()
    net.forward(start="relu")  # the ReLU alone still runs
    np.testing.assert_array_equal(net.blobs["conv"].data, np.maximum(ref.blobs["conv"].data, 0))


def test_hooks_see_the_convolution_output_before_the_relu(tmp_path, monkeypatch):
    calls = count_fused(monkeypatch)
    net = build(tmp_path, "im2col", True)
    seen = []
    net.after_forward(lambda i: seen.append((i, float(net.blobs["conv"].data.min()))) if i == 1 else None)
    x = np.random.default_rng(3).standard_normal(net.blobs["data"].data.shape).astype(np.float32)
    net.forward(data=x)
    assert not calls
    assert seen and seen[0][1] < 0  # pycaffe's hook after the Convolution reads its raw output
    assert net.blobs["conv"].data.min() >= 0


def test_backward_through_the_fused_pair(tmp_path):
    fused, separate = build(tmp_path, "rows", True), build(tmp_path, "rows", False)
    x = np.random.default_rng(4).standard_normal(fused.blobs["data"].data.shape).astype(np.float32)
    fused.forward(data=x)
    separate.forward(data=x)
    dy = np.random.default_rng(5).standard_normal(fused.blobs["pool"].data.shape).astype(np.float32)
    ga = fused.backward(pool=dy)
    gb = separate.backward(pool=dy)
    np.testing.assert_array_equal(fused.params["conv"][0].diff, separate.params["conv"][0].diff)
    np.testing.assert_array_equal(ga["data"], gb["data"])
    assert np.abs(ga["data"]).max() > 0
