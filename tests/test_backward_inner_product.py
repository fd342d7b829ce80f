"""Backward of InnerProduct and Embed (training.md 10.3).

1. InnerProduct: the layer is linear in x and in W, so with L = <dy, top> the float32
   forward of a one-hot input (weight) gives dL/dx (dL/dW) exactly (finite differences
   with step 1, summed in float64); checked with and without transpose, for axis 1, 2,
   -1 and 0-free shapes, with and without bias;
2. Caffe's conventions: param diffs accumulate into what they held, None param diffs and
   propagate_down false compute nothing, the inputs are never written;
3. Embed: dW[int(x_m)] += dy[m] with repeated indices adding up (a float64 loop), db the
   sum of dy, no diff for the index bottom, and Caffe's CHECK when one is asked for;
4. both with the strict backend's xp (CuPy's API).
"""
import numpy as np
import pytest

from caffeish.errors import CaffeishError
from caffeish.kernels import strict
from caffeish.runtime.backend import to_numpy
from layer_checks import make, rel_err

TOL = 1e-5


def rand(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def one_hot(shape, i):
    e = np.zeros(int(np.prod(shape)), np.float32)
    e[i] = 1
    return e.reshape(shape)


def ip_setup(params, shape, seed=0):
    rng = np.random.default_rng(seed)
    lay = make(f'name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param {{ {params} }}')
    lay.reshape([shape])
    blobs = [rand(rng, s) for s in lay.param_shapes([shape])]
    x = rand(rng, shape)
    (y,) = lay.forward(np, [x], blobs)
    dy = rand(rng, y.shape)
    return lay, x, blobs, y, dy


def dot64(a, b):
    return float(np.dot(a.ravel().astype(np.float64), b.ravel().astype(np.float64)))


IP_CASES = [
    ("num_output: 5", (3, 4)),
    ("num_output: 5 transpose: true", (3, 2, 2, 3)),
    ("num_output: 3 axis: 2", (2, 3, 4, 2)),
    ("num_output: 4 axis: 2 transpose: true bias_term: false", (2, 2, 5)),
    ("num_output: 2 axis: -1", (2, 3, 4)),
    ("num_output: 6 bias_term: false", (1, 7)),
]


@pytest.mark.parametrize("params, shape", IP_CASES)
def test_inner_product_is_the_adjoint_of_its_forward(params, shape):
    lay, x, blobs, y, dy = ip_setup(params, shape)
    pd = [np.zeros_like(b) for b in blobs]
    (dx,) = lay.backward(np, [dy], [y], [x], blobs, [True], pd)
    zero = [np.zeros_like(b) for b in blobs]
    ref_dx = np.zeros(x.shape)
    for j in range(x.size):
        ref_dx.flat[j] = dot64(dy, lay.forward(np, [one_hot(x.shape, j)], [blobs[0]] + zero[1:])[0])
    ref_dw = np.zeros(blobs[0].shape)
    for j in range(blobs[0].size):
        ref_dw.flat[j] = dot64(dy, lay.forward(np, [x], [one_hot(blobs[0].shape, j)] + zero[1:])[0])
    assert dx.dtype == np.float32 and dx.shape == x.shape
    assert rel_err(dx, ref_dx) < TOL
    assert rel_err(pd[0], ref_dw) < TOL
    if len(blobs) > 1:
        ref_db = dy.astype(np.float64).reshape(-1, lay.num_output).sum(axis=0)
        assert rel_err(pd[1], ref_db) < TOL
    # The weight layout: (N, K), or (K, N) with transpose.
    k = int(np.prod(shape[lay.canonical_axis(lay.axis, len(shape)):]))
    assert pd[0].shape == ((k, lay.num_output) if lay.transpose else (lay.num_output, k))


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("m", [1, 2, 37, 300])
def test_inner_product_every_batch_size_and_diff_layout(m, transpose, monkeypatch):
    """The forward's two matmul orientations (batches 2..SMALL_BATCH go as (W x^T)^T, by blocks of
    WEIGHT_ROWS outputs: 7 here, the last block short) and the weight gradient added into the diff
    by BLAS (beta = 1), or through numpy where the diff is a view it cannot hand to BLAS, all
    against float64."""
    from caffeish.ops import inner_product

    assert 2 <= 37 <= inner_product.SMALL_BATCH < 300
    monkeypatch.setattr(inner_product, "WEIGHT_ROWS", 7)
    rng = np.random.default_rng(m)
    lay, x, blobs, y, dy = ip_setup(f"num_output: 24 transpose: {str(transpose).lower()}", (m, 3, 5, 4))
    x64, w64 = x.reshape(m, -1).astype(np.float64), blobs[0].astype(np.float64)
    w64 = w64 if transpose else w64.T  # (K, N)
    assert rel_err(y, x64 @ w64 + blobs[1]) < TOL
    dy64 = dy.astype(np.float64)
    ref_dw = x64.T @ dy64 if transpose else dy64.T @ x64
    for layout in ("contiguous", "strided"):
        start = rand(rng, blobs[0].shape)
        if layout == "strided":  # a view BLAS cannot take: numpy adds a temporary instead
            store = np.zeros(blobs[0].shape[:-1] + (2 * blobs[0].shape[-1],), np.float32)
            dw = store[..., ::2]
        else:
            dw = np.empty_like(start)
        dw[...] = start
        db = np.zeros_like(blobs[1])
        (dx,) = lay.backward(np, [dy], [y], [x], blobs, [True], [dw, db])
        assert rel_err(dw - start, ref_dw) < TOL, layout
        assert rel_err(db, dy64.sum(axis=0)) < TOL
        assert rel_err(dx.reshape(m, -1), dy64 @ w64.T) < TOL


def test_inner_product_conventions():
    lay, x, blobs, y, dy = ip_setup("num_output: 4", (3, 5), seed=1)
    fresh = [np.zeros_like(b) for b in blobs]
    (dx_all,) = lay.backward(np, [dy], [y], [x], blobs, [True], fresh)
    rng = np.random.default_rng(2)
    held = [rand(rng, b.shape) for b in blobs]
    start = [h.copy() for h in held]
    copies = [a.copy() for a in (x, y, dy, *blobs)]
    assert lay.backward(np, [dy], [y], [x], blobs, [False], held) == [None]
    for h, s, f in zip(held, start, fresh):
        np.testing.assert_allclose(h, s + f, rtol=1e-6, atol=1e-6)
    (dx,) = lay.backward(np, [dy], [y], [x], blobs, [True], [None, None])
    np.testing.assert_array_equal(dx, dx_all)
    for a, c in zip((x, y, dy, *blobs), copies):
        np.testing.assert_array_equal(a, c)


def embed_setup(params, shape, seed=0):
    rng = np.random.default_rng(seed)
    lay = make(f'name: "e" type: "Embed" bottom: "x" top: "y" embed_param {{ {params} }}')
    lay.reshape([shape])
    blobs = [rand(rng, s) for s in lay.param_shapes([shape])]
    x = rng.integers(0, lay.input_dim, size=shape).astype(np.float32)
    (y,) = lay.forward(np, [x], blobs)
    dy = rand(rng, y.shape)
    return lay, x, blobs, y, dy


def test_embed_weight_gradient_adds_repeated_indices():
    lay, x, blobs, y, dy = embed_setup("num_output: 3 input_dim: 4", (2, 5, 3))
    assert len(np.unique(x)) < x.size  # repeated indices
    rng = np.random.default_rng(3)
    held = [rand(rng, b.shape) for b in blobs]
    start = [h.copy() for h in held]
    assert lay.backward(np, [dy], [y], [x], blobs, [False], held) == [None]
    ref_dw = start[0].astype(np.float64)
    for m, idx in enumerate(x.ravel()):
        ref_dw[int(idx)] += dy.reshape(-1, 3)[m]
    ref_db = start[1] + dy.astype(np.float64).reshape(-1, 3).sum(axis=0)
    assert rel_err(held[0], ref_dw) < TOL
    assert rel_err(held[1], ref_db) < TOL
    # An index no input uses keeps its diff.
    unused = sorted(set(range(4)) - {int(v) for v in x.ravel()})
    for u in unused:
        np.testing.assert_array_equal(held[0][u], start[0][u])


def test_embed_without_bias_and_with_nothing_wanted():
    lay, x, blobs, y, dy = embed_setup("num_output: 2 input_dim: 3 bias_term: false", (7,), seed=4)
    dw = np.zeros_like(blobs[0])
    assert lay.backward(np, [dy], [y], [x], blobs, [False], [dw]) == [None]
    ref = np.zeros((3, 2))
    for m, idx in enumerate(x.ravel()):
        ref[int(idx)] += dy[m]
    assert rel_err(dw, ref) < TOL
    assert lay.backward(np, [dy], [y], [x], blobs, [False], [None]) == [None]


def test_embed_refuses_to_backpropagate_into_its_indices():
    lay, x, blobs, y, dy = embed_setup("num_output: 2 input_dim: 3", (4,))
    with pytest.raises(CaffeishError, match=r"layer 'e' \(Embed\).*input"):
        lay.backward(np, [dy], [y], [x], blobs, [True], [np.zeros_like(b) for b in blobs])


def test_inner_product_and_embed_on_the_strict_backend():
    xp = strict.XP
    for params, shape in IP_CASES[:3]:
        lay, x, blobs, y, dy = ip_setup(params, shape, seed=5)
        pd = [np.zeros_like(b) for b in blobs]
        (dx,) = lay.backward(np, [dy], [y], [x], blobs, [True], pd)
        pd_d = [xp.zeros(b.shape, dtype=np.float32) for b in blobs]
        (dx_d,) = lay.backward(xp, [xp.asarray(dy)], [xp.asarray(y)], [xp.asarray(x)],
                               [xp.asarray(b) for b in blobs], [True], pd_d)
        assert rel_err(to_numpy(dx_d), dx) < 1e-6
        for a, r in zip(pd_d, pd):
            assert rel_err(to_numpy(a), r) < 1e-6
    lay, x, blobs, y, dy = embed_setup("num_output: 3 input_dim: 4", (2, 6), seed=6)
    pd = [np.zeros_like(b) for b in blobs]
    lay.backward(np, [dy], [y], [x], blobs, [False], pd)
    pd_d = [xp.zeros(b.shape, dtype=np.float32) for b in blobs]
    lay.backward(xp, [xp.asarray(dy)], [xp.asarray(y)], [xp.asarray(x)], [xp.asarray(b) for b in blobs],
                 [False], pd_d)
    for a, r in zip(pd_d, pd):
        assert rel_err(to_numpy(a), r) < 1e-6
