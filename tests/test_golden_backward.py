"""Every case of ../shared/golden_train/backward: one TRAIN forward and backward, against real Caffe.

Through the pycaffe face, as a user's script would do it:

    net = caffe.Net(prototxt, weights, caffe.TRAIN)
    net.blobs[name].data[...] = x            # inputs.npz
    net.forward()
    net.blobs[top].diff[...] = d             # top_diffs.npz (loss tops keep their weight)
    net.backward()

then every blob's diff (diffs.npz), every parameter's diff (param_diffs.npz, 'layer/i'), every
blob's value (blobs.npz) and the parameters the forward changed (params_after.npz: BatchNorm's
running statistics) must equal Caffe's within the case's meta.json tolerance, on the CPU and on
the GPU code path (our CUDA kernels on the CPU harness, with an array module that refuses what
CuPy refuses; CuPy itself where there is a GPU).  New case folders are picked up without changes.
"""
import json
import os

import numpy as np
import pytest

from conftest import SHARED

import caffeish as caffe
from caffeish.data.metrics import compare_blobs

ROOT = os.path.join(SHARED, "golden_train", "backward")
CASES = sorted(d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "meta.json"))) \
    if os.path.isdir(ROOT) else []


def run_backward(folder):
    """The net after the case's forward and backward, and its meta."""
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    weights = os.path.join(folder, "weights.caffemodel")
    net = caffe.Net(os.path.join(folder, "net.prototxt"), weights if os.path.exists(weights) else None, caffe.TRAIN)
    for name, value in np.load(os.path.join(folder, "inputs.npz")).items():
        if tuple(net.blobs[name].data.shape) != value.shape:
            net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value
    net.forward()
    for name, value in np.load(os.path.join(folder, "top_diffs.npz")).items():
        net.blobs[name].diff[...] = value
    net.backward()
    return net, meta


def param_getter(net, attribute):
    def get(key):
        layer, index = key.rsplit("/", 1)
        blobs = net.params.get(layer)
        if blobs is None or int(index) >= len(blobs):
            return None
        return getattr(blobs[int(index)], attribute)
    return get


@pytest.mark.skipif(not CASES, reason=f"golden training cases not found under {ROOT} (../shared is absent)")
@pytest.mark.parametrize("case", CASES or ["none"])
def test_backward_matches_caffe(case, mode):
    folder = os.path.join(ROOT, case)
    net, meta = run_backward(folder)
    tolerance = meta["tolerance"]
    failures = []
    blob = lambda attribute: lambda name: getattr(net.blobs[name], attribute) if name in net.blobs else None  # noqa: E731
    for what, get, npz in (("value", blob("data"), "blobs.npz"), ("diff", blob("diff"), "diffs.npz"),
                           ("param diff", param_getter(net, "diff"), "param_diffs.npz"),
                           ("param after forward", param_getter(net, "data"), "params_after.npz")):
        path = os.path.join(folder, npz)
        if not os.path.exists(path):
            continue
        _, bad = compare_blobs(get, np.load(path), tolerance)
        failures += [f"{what} {line}" for line in bad]
    assert not failures, f"{case} ({mode}): " + "; ".join(failures)


@pytest.mark.skipif(not CASES, reason=f"golden training cases not found under {ROOT} (../shared is absent)")
def test_param_diffs_accumulate_until_cleared():
    """Two backward passes without clear_param_diffs give twice Caffe's gradient; clearing zeroes them."""
    folder = os.path.join(ROOT, "conv" if "conv" in CASES else CASES[0])
    net, meta = run_backward(folder)
    once = {k: np.array(v) for k, v in np.load(os.path.join(folder, "param_diffs.npz")).items()}
    net.backward()
    get = param_getter(net, "diff")
    for key, value in once.items():
        np.testing.assert_allclose(get(key), 2 * value, rtol=0, atol=2 * meta["tolerance"] * np.abs(value).max() + 1e-12)
    net.clear_param_diffs()
    for key in once:
        assert not np.any(get(key)), key
