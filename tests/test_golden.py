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

from golden import GOLDEN, blob_failures, cases, run_case

import caffeish

CASES = cases()


@pytest.mark.skipif(not CASES, reason=f"golden cases not found under {GOLDEN} (../shared is absent)")
@pytest.mark.parametrize("case", CASES or ["none"])
def test_golden_case_matches_caffe(case):
    net, meta, folder = run_case(case)
    failures = blob_failures(net, meta, folder)
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
        ours = caffeish.runtime.backend.to_numpy(net.params[layer][int(index)].data)
        np.testing.assert_array_equal(ours.reshape(params[key].shape), params[key], err_msg=key)
