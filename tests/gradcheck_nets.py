"""Finite-difference gradient checks for tests/test_gradcheck.py.

Two checkers, both comparing the analytic diffs of Backward with central differences of the objective

    L = sum over the net's outputs (or the layer's tops) of sum(top * dy)

where dy is a fixed random array for a plain output and the backward seed (the loss weight) for a
loss-weighted one, so that dL/dx is exactly what Backward computes for every input x and parameter:

* `net_check` builds a caffeish.Net from prototxt text (Input layers for the given arrays are
  prepended), runs forward and backward as a user would (`net.blobs[out].diff[...] = dy`,
  `net.backward()`), then perturbs a random sample of the elements of every input blob and
  parameter (`net.blobs[x].data`, `net.params[l][i].data`) and re-runs forward.  The runtime works
  in float32, so the step is 1e-2 of the value scale, L is accumulated in float64, the real step
  is the float32 difference actually made, and the tolerance is 5e-3 of the largest gradient of
  the array (the float32 errors of these nets stay below 5e-4).  A directional derivative along a random direction over the whole array is checked too.
* `layer_check64` runs one layer's forward and backward directly on float64 numpy arrays (where the
  layer keeps float64: otherwise the test skips with the reason), with a step of 1e-6 and a
  tolerance of ~1e-6.
"""
import itertools

import numpy as np
import pytest
from google.protobuf import text_format

import caffeish
from caffeish.formats.schema import TEST, TRAIN, pb
from caffeish.graph.registry import create

_COUNTER = itertools.count()


# -- input arrays away from kinks -----------------------------------------------------------------
def away(rng, shape, lo=0.1, hi=1.0):
    """Random values with lo <= |v| <= hi, either sign (ReLU, AbsVal, ... stay off their kink)."""
    return (rng.choice([-1.0, 1.0], size=shape) * rng.uniform(lo, hi, size=shape)).astype(np.float32)


def distinct(rng, shape, step=0.1):
    """A random permutation of evenly spaced values (MAX windows and ties stay apart by `step`)."""
    n = int(np.prod(shape))
    values = (np.arange(n) - (n - 1) / 2.0) * step
    return rng.permutation(values).reshape(shape).astype(np.float32)


def normal(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def uniform(rng, shape, lo, hi):
    return rng.uniform(lo, hi, size=shape).astype(np.float32)


# -- nets ----------------------------------------------------------------------------------------
def input_layers(inputs):
    lines = []
    for name, value in inputs.items():
        dims = " ".join(f"dim: {d}" for d in np.shape(value))
        lines.append(f'layer {{ name: "input_{name}" type: "Input" top: "{name}" '
                     f'input_param {{ shape {{ {dims} }} }} }}')
    return "\n".join(lines)


def build_net(tmp_path, layers, inputs, phase=TRAIN, force=True, seed=0, backend=None):
    """A Net of `inputs` (Input layers) followed by the prototxt text `layers`."""
    text = 'name: "gradcheck"\n' + ("force_backward: true\n" if force else "") + input_layers(inputs) \
        + "\n" + layers
    path = tmp_path / f"gradcheck_{next(_COUNTER)}.prototxt"
    path.write_text(text)
    return caffeish.Net(str(path), phase=phase, seed=seed, backend=backend)


def _set_inputs(net, inputs):
    for name, value in inputs.items():
        net.blobs[name].data[...] = value


def _objective(net, seeds):
    return sum(float(np.dot(np.asarray(net.blobs[o].data, np.float64).ravel(), d.ravel()))
               for o, d in seeds.items())


def seed_outputs(net, rng, randomize=(), ignore=()):
    """Give every plain output (and the loss-weighted ones named in `randomize`) a random diff; return
    {output: its diff as float64}, the dy of the objective.  Outputs in `ignore` get a zero diff and
    stay out of the objective (tops whose diff Caffe's backward never reads)."""
    weights = net.blob_loss_weights
    seeds = {}
    for out in net.outputs:
        diff = net.blobs[out].diff
        if out in ignore:
            diff[...] = 0
            continue
        if weights.get(out, 0) == 0 or out in randomize:
            diff[...] = rng.standard_normal(diff.shape)
        seeds[out] = np.array(diff, dtype=np.float64, copy=True)
    return seeds


def _compare(what, numeric, analytic, scale, rtol, atol):
    err = np.abs(numeric - analytic)
    tol = rtol * scale + atol
    if not np.all(err <= tol):
        k = int(np.argmax(err - tol))
        raise AssertionError(
            f"{what}: numeric {numeric[k]:.6g} vs analytic {analytic[k]:.6g} (error {err[k]:.3g} > tolerance "
            f"{tol:.3g}; largest |analytic| of the array {scale:.3g})\nnumeric  {np.round(numeric, 6)}\n"
            f"analytic {np.round(analytic, 6)}")


def net_check(tmp_path, layers, inputs, *, phase=TRAIN, force=True, fixed=(), skip_params=(), setup=None,
              randomize=(), ignore=(), samples=8, eps=1e-2, rtol=5e-3, atol=5e-5, seed=0, zero=(), backend=None):
    """Check every input blob not in `fixed` and every parameter of the layers not in `skip_params` by
    finite differences through the Net.  `setup(net)` may set parameter values before the forward.
    Names in `zero` must get an all-zero diff (their data does not reach the outputs).  backend: the
    Net's ("strict": the GPU code path on the CPU).
    Returns the net (after the analytic pass, with its diffs) and the output seeds."""
    rng = np.random.default_rng(seed + 1000)
    inputs = {k: np.asarray(v, np.float32) for k, v in inputs.items()}
    net = build_net(tmp_path, layers, inputs, phase, force, backend=backend)
    if setup is not None:
        setup(net)
    _set_inputs(net, inputs)
    net.forward()
    seeds = seed_outputs(net, rng, randomize, ignore)
    net.backward()

    # (label, getter of the array to perturb, analytic diff).  The getter is called anew around every
    # forward: on a GPU backend net.params[...].data is a host copy that a forward syncs and forgets.
    targets = []
    for name in inputs:
        if name in fixed:
            continue
        targets.append((f"input '{name}'", lambda name=name: inputs[name], np.array(net.blobs[name].diff,
                                                                                    np.float64)))
    for layer, blobs in net.params.items():
        if layer in skip_params:
            continue
        for i, blob in enumerate(blobs):
            targets.append((f"param {layer}/{i}", lambda blob=blob: blob.data, np.array(blob.diff, np.float64)))
    assert targets, "nothing to check"

    def objective():
        _set_inputs(net, inputs)
        net.forward()
        return _objective(net, seeds)

    for label, get, analytic in targets:
        base = np.array(get(), copy=True).reshape(-1)
        assert analytic.shape == get().shape, f"{label}: diff shape {analytic.shape} != data shape {get().shape}"
        assert np.all(np.isfinite(analytic)), f"{label}: non-finite diff {analytic}"

        def at(values, get=get):
            """L with the array set to `values` (float32), and the values it really got."""
            get().reshape(-1)[...] = values
            real = np.array(get(), np.float64).reshape(-1)
            return objective(), real

        count = base.size
        picks = rng.choice(count, size=min(samples, count), replace=False)
        numeric = []
        for k in picks:
            h = eps * max(1.0, abs(float(base[k])))
            up, down = base.copy(), base.copy()
            up[k] += h
            down[k] -= h
            l_up, real_up = at(up)
            l_down, real_down = at(down)
            numeric.append((l_up - l_down) / (real_up[k] - real_down[k]))
        at(base)
        numeric, chosen = np.array(numeric), analytic.reshape(-1)[picks]
        scale = max(float(np.max(np.abs(analytic))), float(np.max(np.abs(numeric))))
        _compare(f"{label} at flat indices {picks.tolist()}", numeric, chosen, scale, rtol, atol)
        # One directional derivative over the whole array.
        v = rng.standard_normal(count)
        h = eps * max(1.0, float(np.max(np.abs(base))))
        l_up, real_up = at(base + h * v)
        l_down, real_down = at(base - h * v)
        at(base)
        step = (real_up - real_down) / 2.0
        numeric_dir = (l_up - l_down) / 2.0
        analytic_dir = float(np.dot(analytic.reshape(-1), step))
        _compare(f"{label} along a random direction", np.array([numeric_dir]), np.array([analytic_dir]),
                 float(np.dot(np.abs(analytic.reshape(-1)), np.abs(step))), rtol, atol * h * np.sqrt(count))
    for name in zero:
        assert not np.any(np.asarray(net.blobs[name].diff)), f"'{name}' should get a zero diff"
    # The analytic pass left the net as it was: re-running forward leaves the objective unchanged.
    objective()
    return net, seeds


# -- one layer in float64 -----------------------------------------------------------------------
def make_layer(text, bottoms, tops, phase=TEST, name="L"):
    param = text_format.Parse(text, pb.LayerParameter())
    param.name = param.name or name
    if not len(param.bottom):
        param.bottom.extend(bottoms)
    if not len(param.top):
        param.top.extend(tops)
    return create(param, phase)


def layer_check64(text, bottoms, tops=("y",), blobs=(), *, phase=TEST, fixed=(), samples=12, eps=1e-6,
                  rtol=1e-6, atol=1e-9, seed=0, blob_diffs=True):
    """Check one layer (the inside of a `layer { }` block) on float64 arrays: bottoms {name: array},
    blobs its parameter arrays; `fixed` names bottoms that get no diff (labels).  blob_diffs False:
    the blobs are statistics that get no diff (BatchNorm); only the bottoms are checked."""
    rng = np.random.default_rng(seed + 2000)
    names = list(bottoms)
    xs = [np.array(v, dtype=np.float64) for v in bottoms.values()]
    ps = [np.array(b, dtype=np.float64) for b in blobs]
    layer = make_layer(text, names, list(tops), phase)
    layer.needs_backward = True
    layer.reshape([x.shape for x in xs])
    out = layer.forward(np, xs, ps)
    if out and np.asarray(out[0]).dtype != np.float64:  # (a MAX pooling mask top may stay float32)
        pytest.skip(f"{layer.type} computes in float32 (tops {[np.asarray(t).dtype.name for t in out]}); the "
                    f"float32 net check covers it")
    dys = [rng.standard_normal(np.shape(t)) for t in out]
    propagate = [n not in fixed for n in names]
    pdiffs = [np.zeros_like(p) if blob_diffs else None for p in ps]
    out = layer.forward(np, xs, ps)  # the forward whose state backward reads
    dxs = layer.backward(np, dys, out, xs, ps, propagate, pdiffs)
    assert len(dxs) == len(xs)

    def objective():
        tops_ = layer.forward(np, xs, ps)
        return sum(float(np.sum(np.asarray(t, np.float64) * d)) for t, d in zip(tops_, dys))

    targets = [(f"bottom '{n}'", x, dx) for n, x, dx in zip(names, xs, dxs) if n not in fixed]
    if blob_diffs:
        targets += [(f"blob {i}", p, d) for i, (p, d) in enumerate(zip(ps, pdiffs))]

    def numeric(flat, k, h):
        old = flat[k]
        flat[k] = old + h
        l_up = objective()
        flat[k] = old - h
        l_down = objective()
        flat[k] = old
        return (l_up - l_down) / (2 * h)

    # A layer that keeps float64 arrays but computes some of its values in float32 (a float32 mean,
    # a float32 constant array) is not smooth at a 1e-6 step: then only the float32 check applies.
    for label, data, _ in targets:
        flat = data.reshape(-1)
        for k in rng.choice(flat.size, size=min(2, flat.size), replace=False):
            fine, coarse = numeric(flat, k, eps), numeric(flat, k, 100 * eps)
            if abs(fine - coarse) > 1e-5 * max(abs(fine), abs(coarse), 1e-2):
                pytest.skip(f"{layer.type} keeps float64 arrays but computes in float32 inside (derivative "
                            f"{fine:.9g} at step {eps:g}, {coarse:.9g} at step {100 * eps:g}); the float32 net "
                            f"check covers it")
    for label, data, analytic in targets:
        assert analytic is not None, f"{label}: no diff"
        analytic = np.asarray(analytic, np.float64)
        assert analytic.shape == data.shape
        flat = data.reshape(-1)
        picks = rng.choice(flat.size, size=min(samples, flat.size), replace=False)
        numeric_ = np.array([numeric(flat, k, eps * max(1.0, abs(flat[k]))) for k in picks])
        chosen = analytic.reshape(-1)[picks]
        scale = max(float(np.max(np.abs(analytic))), float(np.max(np.abs(numeric_))))
        _compare(f"{layer.type} (float64) {label} at {picks.tolist()}", numeric_, chosen, scale, rtol, atol)
    return layer, dxs, pdiffs
