"""Every golden case through the plain pycaffe idiom, on the CPU and on the GPU code path.

    net = caffe.Net(prototxt, weights, caffe.TEST)
    net.blobs['data'].data[...] = x          # (reshaped first when the size differs)
    net.forward()
    for name, blob in net.blobs.items(): blob.data   # every blob readable, equal to Caffe's

No keep= or other caffeish option: what a pycaffe script does.  The GPU code
path is `caffe.set_mode_gpu()` with the GPU's array module stood in for by the
strict backend (our CUDA kernels compiled for the CPU, an array module that
refuses what CuPy refuses), so CI runs it without a GPU; on a machine with a GPU
and CuPy the same runs on CuPy itself.
"""
import os

import numpy as np
import pytest

from golden import GOLDEN, blob_failures, cases

import caffeish as caffe
from caffeish.runtime import backend

CASES = cases()


@pytest.mark.skipif(not CASES, reason=f"golden cases not found under {GOLDEN} (../shared is absent)")
@pytest.mark.parametrize("case", CASES or ["none"])
def test_golden_case_through_the_pycaffe_idiom(case, mode):
    import json

    folder = os.path.join(GOLDEN, case)
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    weights = meta.get("weights")
    args = [os.path.join(folder, "net.prototxt")] + ([os.path.join(folder, weights)] if weights else [])
    net = caffe.Net(*args, caffe.TEST)
    if mode != "cpu":
        assert backend.kernels_for(net.xp) is not None  # the layers' GPU branch runs
    for name, value in np.load(os.path.join(folder, "inputs.npz")).items():
        if tuple(net.blobs[name].data.shape) != value.shape:
            net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value
    net.forward()
    shapes = {name: tuple(blob.data.shape) for name, blob in net.blobs.items()}  # every blob readable
    for name, shape in meta["blob_shapes"].items():
        assert shapes.get(name) == tuple(shape), name
    failures = blob_failures(net, meta, folder)
    assert not failures, f"{case} ({mode}): " + "; ".join(failures)
