"""Shared checks of the per-family backward tests: a layer from its text, finite differences,
relative error."""
import numpy as np
from google.protobuf import text_format

from caffeish.formats.schema import TRAIN, pb
from caffeish.graph.registry import create


def make(text, phase=TRAIN):
    """The layer a LayerParameter text describes."""
    return create(text_format.Parse(text, pb.LayerParameter()), phase)


def rel_err(ours, ref):
    """max |ours - ref| / max |ref| (0 for empty arrays); the shapes must agree."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(ours - ref)) / (np.max(np.abs(ref)) + 1e-12))


def numeric(f, x, dy, h=1e-6):
    """d sum(f(x) * dy) / dx by central differences, in float64."""
    g = np.zeros(x.shape, np.float64)
    for idx in np.ndindex(*x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += h
        minus[idx] -= h
        g[idx] = (np.sum(f(plus) * dy) - np.sum(f(minus) * dy)) / (2 * h)
    return g


def assert_close(ours, ref, tol=1e-6):
    err = rel_err(ours, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol}"
