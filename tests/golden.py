"""The golden cases of ../shared/golden: listing them, running one, comparing its blobs with Caffe's.

Tolerance per blob: max|ours - caffe| / (max|caffe| + 1e-12) <= meta.json's
`tolerance` (caffeish.data.metrics.relative_error); blobs listed in `exact`
(pooling masks, argmax indices) must be identical.
"""
import json
import os

import numpy as np

from conftest import SHARED

import caffeish
from caffeish.data.metrics import compare_blobs

GOLDEN = os.path.join(SHARED, "golden")


def cases():
    """The case folders (those with a meta.json); [] when ../shared is absent."""
    if not os.path.isdir(GOLDEN):
        return []
    return sorted(d for d in os.listdir(GOLDEN) if os.path.isfile(os.path.join(GOLDEN, d, "meta.json")))


def run_case(case, **net_options):
    """(net after one forward on the case's inputs, meta, folder); every blob kept."""
    folder = os.path.join(GOLDEN, case)
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    weights = meta.get("weights")
    net = caffeish.Net(os.path.join(folder, "net.prototxt"), os.path.join(folder, weights) if weights else None,
                       caffeish.TEST, keep=True, **net_options)
    net.forward(**dict(np.load(os.path.join(folder, "inputs.npz"))))
    return net, meta, folder


def blob_failures(net, meta, folder):
    """What differs from Caffe's recorded blobs, one line per blob (empty when all match)."""
    expected = np.load(os.path.join(folder, "blobs.npz"))
    get = lambda name: net.blobs[name].data if name in net.blobs else None  # noqa: E731
    return compare_blobs(get, expected, meta["tolerance"], set(meta.get("exact", [])))[1]
