"""Every golden case in ../shared/golden, run end to end, against what real Caffe computed.

Each folder holds a net, its weights (or none: fillers), inputs and every blob
after one Caffe forward pass.  The test walks the folders, so a new case is
picked up without changes here.  Tolerance per blob: max|ours - caffe| /
(max|caffe| + 1e-12) <= meta.json's `tolerance`; blobs listed in `exact`
(pooling masks, argmax indices) must be identical.
"""
import json
import os

import numpy as np
import pytest

from conftest import SHARED

import caffeish
from caffeish.metrics import relative_error

GOLDEN = os.path.join(SHARED, "golden")


def _cases():
    if not os.path.isdir(GOLDEN):
        return []
    return sorted(d for d in os.listdir(GOLDEN) if os.path.isfile(os.path.join(GOLDEN, d, "meta.json")))


CASES = _cases()


def run_case(case):
    folder = os.path.join(GOLDEN, case)
    meta = json.load(open(os.path.join(folder, "meta.json")))
    weights = meta.get("weights")
    net = caffeish.Net(
        os.path.join(folder, "net.prototxt"),
        os.path.join(folder, weights) if weights else None,
        caffeish.TEST,
        keep=True,
    )
    inputs = dict(np.load(os.path.join(folder, "inputs.npz")))
    net.forward(**inputs)
    return net, meta, folder


@pytest.mark.skipif(not CASES, reason=f"golden cases not found under {GOLDEN} (../shared is absent)")
@pytest.mark.parametrize("case", CASES or ["none"])
def test_golden_case_matches_caffe(case):
    net, meta, folder = run_case(case)
    expected = np.load(os.path.join(folder, "blobs.npz"))
    tolerance = meta["tolerance"]
    exact = set(meta.get("exact", []))
    failures = []
    for name in expected.files:
        theirs = expected[name]
        if name not in net.blobs:
            failures.append(f"{name}: missing from our net")
            continue
        ours = caffeish.backend.to_numpy(net.blobs[name].data)
        if tuple(ours.shape) != tuple(theirs.shape):
            failures.append(f"{name}: shape {tuple(ours.shape)} != Caffe's {tuple(theirs.shape)}")
            continue
        if name in exact:
            if not np.array_equal(ours, theirs):
                failures.append(f"{name}: must match exactly; {int(np.sum(ours != theirs))} element(s) differ")
            continue
        err = relative_error(ours, theirs)
        if not err <= tolerance:
            failures.append(f"{name}: relative error {err:.3g} > {tolerance:g}")
    assert not failures, f"{case}: " + "; ".join(failures)
    # Every blob Caffe recorded has the shape Caffe gave it.
    for name, shape in meta["blob_shapes"].items():
        assert tuple(net.blobs[name].shape) == tuple(shape), name


@pytest.mark.skipif(not CASES, reason=f"golden cases not found under {GOLDEN} (../shared is absent)")
@pytest.mark.parametrize("case", [c for c in CASES if os.path.isfile(os.path.join(GOLDEN, c, "params.npz"))] or ["none"])
def test_golden_parameters_match_caffe(case):
    """Loaded (or, with no weights file, filled) parameters equal Caffe's."""
    folder = os.path.join(GOLDEN, case)
    meta = json.load(open(os.path.join(folder, "meta.json")))
    weights = meta.get("weights")
    net = caffeish.Net(os.path.join(folder, "net.prototxt"),
                       os.path.join(folder, weights) if weights else None, caffeish.TEST)
    params = np.load(os.path.join(folder, "params.npz"))
    for key in params.files:
        layer, index = key.rsplit("/", 1)
        ours = caffeish.backend.to_numpy(net.params[layer][int(index)].data)
        np.testing.assert_array_equal(ours.reshape(params[key].shape), params[key], err_msg=key)
