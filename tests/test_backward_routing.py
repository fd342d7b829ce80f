"""Backward of the routing and shape layers (layers/routing.py; ../shared/caffe/training.md 10.4, 10.5, 10.8).

* Concat, Slice, Tile, Reduction (every op, axis and coeff), Eltwise (SUM with coeffs, PROD, MAX)
  and Softmax against float64 central differences of their forward (run on float64 inputs where
  the forward keeps the dtype, else float32 with a matching tolerance).
* Caffe's quirks, by hand: Eltwise MAX's tie rule (bottom 1 beats bottom 0 on ties, later bottoms
  only when strictly greater) and its mask kept from the forward; PROD with stable_prod_grad exact
  with zeros, without it NaN/inf at zeros; in-place Eltwise, whose bottom-0 diff is the top diff's
  memory; Softmax written even with propagate_down false; ASUM's sign 0 at 0.
* Split adds its top diffs in order (float32 rounding shows the order); one top is a copy.
* Diff sharing: Flatten, Reshape, Concat of one bottom and Slice of one top return views of dy.
* Silence gives zeros, BatchReindex adds repeated indices, Filter routes kept rows, Parameter's
  param diff becomes the top diff; backpropagating into the index/selector bottoms and ArgMax is
  fatal.
* Every backward here runs under the strict backend's xp (CuPy's rules) and equals numpy.
"""
import numpy as np
import pytest

from caffeish.errors import UnsupportedError
from caffeish.formats.io import parse_text
from caffeish.formats.schema import TEST, pb
from caffeish.graph import registry
from caffeish.kernels import strict
from caffeish.runtime import backend

F = np.float32


def layer(text):
    return registry.create(parse_text(text, pb.LayerParameter()), TEST)


def rand(*shape, seed=0, dtype=F):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def forward(text, bottoms, blobs=(), xp=np, needs_backward=True):
    lay = layer(text)
    lay.reshape([b.shape for b in bottoms])
    lay.needs_backward = needs_backward
    return lay, lay.forward(xp, list(bottoms), list(blobs))


def numeric_grads(f, bottoms, rs, eps):
    """float64 central differences of sum_j sum(f(bottoms)[j] * rs[j]) with respect to each bottom."""
    def loss(bs):
        return sum(np.sum(np.asarray(t, np.float64) * r) for t, r in zip(f(bs), rs))

    grads = []
    for k, b in enumerate(bottoms):
        g = np.zeros(b.shape, np.float64)
        for i in np.ndindex(*b.shape):
            up = [v.copy() for v in bottoms]
            down = [v.copy() for v in bottoms]
            up[k][i] += eps
            down[k][i] -= eps
            g[i] = (loss(up) - loss(down)) / (np.float64(up[k][i]) - np.float64(down[k][i]))
        grads.append(g)
    return grads


def check_gradients(text, bottoms, eps=1e-6, rtol=1e-6, atol=1e-9, propagate=None, seed=1):
    """The layer's backward against central differences of its forward, for every bottom."""
    lay, tops = forward(text, bottoms)
    rng = np.random.default_rng(seed)
    rs = [rng.standard_normal(t.shape) for t in tops]
    dys = [r.astype(bottoms[0].dtype) for r in rs]
    propagate = propagate or [True] * len(bottoms)
    diffs = lay.backward(np, dys, tops, list(bottoms), [], propagate, [])
    nums = numeric_grads(lambda bs: forward(text, bs)[1], bottoms, rs, eps)
    for k, (d, num) in enumerate(zip(diffs, nums)):
        if not propagate[k]:
            assert d is None
            continue
        assert d.shape == bottoms[k].shape
        np.testing.assert_allclose(d, num, rtol=rtol, atol=atol, err_msg=f"bottom {k}")
    return lay, tops, diffs


# -- Concat, Slice, Split, Flatten, Reshape, Tile -----------------------------------------------------


def test_concat_gives_each_bottom_its_slice():
    a, b = rand(2, 3, 4, dtype=np.float64), rand(2, 5, 4, seed=1, dtype=np.float64)
    check_gradients('type: "Concat" bottom: "a" bottom: "b" top: "t"', [a, b])
    check_gradients('type: "Concat" bottom: "a" bottom: "b" top: "t" concat_param { axis: 0 }',
                    [a, rand(3, 3, 4, seed=2, dtype=np.float64)], propagate=[False, True])
    lay, (top,) = forward('type: "Concat" bottom: "a" bottom: "b" top: "t" concat_param { axis: 0 }',
                          [a, rand(3, 3, 4, seed=2, dtype=np.float64)])
    dy = rand(*top.shape)
    da, db = lay.backward(np, [dy], [top], [a, a], [], [True, True], [])
    assert not np.shares_memory(da, dy) and not np.shares_memory(db, dy)  # Caffe copies


def test_concat_of_one_bottom_and_slice_of_one_top_share_the_diff():
    a = rand(2, 3)
    dy = rand(2, 3, seed=1)
    for text in ('type: "Concat" bottom: "a" top: "t"', 'type: "Slice" bottom: "a" top: "t"'):
        lay, (top,) = forward(text, [a])
        for wanted in (True, False):  # shared memory: propagate_down cannot stop it
            (dx,) = lay.backward(np, [dy], [top], [a], [], [wanted], [])
            assert dx is dy


def test_slice_assembles_the_bottom_from_all_tops():
    x = rand(2, 6, 3, dtype=np.float64)
    check_gradients('type: "Slice" bottom: "x" top: "a" top: "b" top: "c" slice_param { slice_point: 1 slice_point: 4 }',
                    [x])
    check_gradients('type: "Slice" bottom: "x" top: "a" top: "b" slice_param { axis: -1 slice_point: 2 }', [x])
    lay, tops = forward('type: "Slice" bottom: "x" top: "a" top: "b"', [x])
    assert lay.backward(np, [t.copy() for t in tops], tops, [x], [], [False], []) == [None]


def test_split_adds_its_top_diffs_in_order():
    x = np.zeros(3, F)
    lay, tops = forward('type: "Split" bottom: "x" top: "a" top: "b" top: "c"', [x])
    big = F(2 ** 25)
    d0, d1, d2 = np.full(3, big, F), np.ones(3, F), np.full(3, -big, F)
    (dx,) = lay.backward(np, [d0, d1, d2], tops, [x], [], [True], [])
    # (2^25 + 1) rounds back to 2^25 in float32, so in order the sum is 0; (d0 + d2) + d1 would be 1.
    np.testing.assert_array_equal(dx, np.zeros(3, F))
    (dx,) = lay.backward(np, [d0, d2, d1], tops, [x], [], [True], [])
    np.testing.assert_array_equal(dx, np.ones(3, F))
    assert lay.backward(np, [d0, d1, d2], tops, [x], [], [False], []) == [None]
    lay, tops = forward('type: "Split" bottom: "x" top: "a"', [x])
    (dx,) = lay.backward(np, [d1], tops, [x], [], [True], [])
    np.testing.assert_array_equal(dx, d1)
    assert not np.shares_memory(dx, d1)


@pytest.mark.parametrize("text", [
    'type: "Flatten" bottom: "x" top: "t"',
    'type: "Flatten" bottom: "x" top: "t" flatten_param { axis: 2 }',
    'type: "Reshape" bottom: "x" top: "t" reshape_param { shape { dim: 0 dim: -1 } }',
])
def test_flatten_and_reshape_hand_back_a_view_of_the_top_diff(text):
    x = rand(2, 3, 4, 5)
    lay, (top,) = forward(text, [x])
    dy = rand(*top.shape, seed=1)
    (dx,) = lay.backward(np, [dy], [top], [x], [], [True], [])
    assert dx.shape == x.shape and np.shares_memory(dx, dy)
    np.testing.assert_array_equal(dx.reshape(-1), dy.reshape(-1))


def test_tile_sums_the_tiles_in_order():
    x = rand(2, 3, 2, dtype=np.float64)
    check_gradients('type: "Tile" bottom: "x" top: "t" tile_param { tiles: 3 }', [x])
    check_gradients('type: "Tile" bottom: "x" top: "t" tile_param { axis: 2 tiles: 2 }', [x])
    check_gradients('type: "Tile" bottom: "x" top: "t" tile_param { axis: 0 tiles: 4 }', [x])
    # Order: tiles (2^25, 1, -2^25) add to 0 in float32.
    x = np.zeros((1, 1), F)
    lay, (top,) = forward('type: "Tile" bottom: "x" top: "t" tile_param { tiles: 3 }', [x])
    dy = np.array([[2 ** 25, 1, -2 ** 25]], F)
    np.testing.assert_array_equal(lay.backward(np, [dy], [top], [x], [], [True], [])[0], [[0]])


# -- Reduction ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis,coeff", [(0, 1.0), (1, -0.5), (-1, 3.0), (2, 0.25)])
def test_reduction_matches_finite_differences(op, axis, coeff):
    text = f'type: "Reduction" bottom: "x" top: "t" reduction_param {{ operation: {op} axis: {axis} coeff: {coeff} }}'
    # Values kept away from 0 so that ASUM is differentiable; the forward sums in float32.
    x = rand(2, 3, 4) + np.sign(rand(2, 3, 4, seed=9)).astype(F) * F(0.5)
    check_gradients(text, [x], eps=1e-2, rtol=2e-3, atol=1e-3)


def test_reduction_by_hand():
    x = np.array([[0.0, -2.0, 3.0], [1.0, 0.0, -1.0]], F)
    dy = np.array([2.0, -1.0], F)
    expect = {
        "SUM": np.array([[3, 3, 3], [-1.5, -1.5, -1.5]], F),  # coeff 1.5
        "MEAN": np.array([[1, 1, 1], [-0.5, -0.5, -0.5]], F),  # 1.5 / 3
        "ASUM": np.array([[0, -3, 3], [-1.5, 0, 1.5]], F),  # sign(0) = 0
        "SUMSQ": np.array([[0, -12, 18], [-3, 0, 3]], F),  # 2 * 1.5 * dy * x
    }
    for op, want in expect.items():
        text = f'type: "Reduction" bottom: "x" top: "t" reduction_param {{ operation: {op} axis: 1 coeff: 1.5 }}'
        lay, (top,) = forward(text, [x])
        (dx,) = lay.backward(np, [dy], [top], [x], [], [True], [])
        np.testing.assert_array_equal(dx, want, err_msg=op)
        assert lay.backward(np, [dy], [top], [x], [], [False], []) == [None]


# -- Eltwise --------------------------------------------------------------------------------------------

ELT = 'type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "t" eltwise_param {{ {p} }}'


@pytest.mark.parametrize("params", [
    "operation: SUM", "operation: SUM coeff: 0.5 coeff: -2 coeff: 3", "operation: PROD",
    "operation: PROD stable_prod_grad: false", "operation: MAX",
])
def test_eltwise_matches_finite_differences(params):
    bottoms = [rand(2, 3, 4, seed=s, dtype=np.float64) for s in range(3)]
    check_gradients(ELT.format(p=params), bottoms)
    check_gradients(ELT.format(p=params), bottoms, propagate=[True, False, True])


def test_eltwise_max_ties():
    a = np.array([1, 2, 5, 5, 0], F)
    b = np.array([1, 3, 5, 4, 0], F)
    c = np.array([1, 1, 5, 5, 7], F)
    lay, (top,) = forward(ELT.format(p="operation: MAX"), [a, b, c])
    dy = np.array([10, 20, 30, 40, 50], F)
    da, db, dc = lay.backward(np, [dy], [top], [a, b, c], [], [True] * 3, [])
    # ties of a and b go to b; c wins only where strictly greater than the running max
    np.testing.assert_array_equal(da, [0, 0, 0, 40, 0])
    np.testing.assert_array_equal(db, [10, 20, 30, 0, 0])
    np.testing.assert_array_equal(dc, [0, 0, 0, 0, 50])
    # The forward's choice is kept: bottoms changed after the forward do not move it.
    a[:] = 100
    np.testing.assert_array_equal(lay.backward(np, [dy], [top], [a, b, c], [], [True] * 3, [])[0],
                                  [0, 0, 0, 40, 0])
    # Without needs_backward nothing is kept and the mask is recomputed from the bottoms.
    lay, _ = forward(ELT.format(p="operation: MAX"), [b, b, c], needs_backward=False)
    assert lay.max_index is None
    db, dc = lay.backward(np, [dy], [top], [b, b, c], [], [True] * 3, [])[1:]
    np.testing.assert_array_equal(db, [10, 20, 30, 0, 0])  # b ties with itself: bottom 1 wins
    np.testing.assert_array_equal(dc, [0, 0, 0, 40, 50])


def test_eltwise_prod_with_zeros():
    a = np.array([0.0, 2.0, 0.0], F)
    b = np.array([3.0, 0.0, 0.0], F)
    c = np.array([5.0, 7.0, 2.0], F)
    dy = np.array([1.0, 1.0, 1.0], F)
    lay, (top,) = forward(ELT.format(p="operation: PROD"), [a, b, c])
    da, db, dc = lay.backward(np, [dy], [top], [a, b, c], [], [True] * 3, [])
    np.testing.assert_array_equal(da, [15, 0, 0])
    np.testing.assert_array_equal(db, [0, 14, 0])
    np.testing.assert_array_equal(dc, [0, 0, 0])
    lay, (top,) = forward(ELT.format(p="operation: PROD stable_prod_grad: false"), [a, b, c])
    with np.errstate(divide="ignore", invalid="ignore"):
        da, db, dc = lay.backward(np, [dy], [top], [a, b, c], [], [True] * 3, [])
    assert np.isnan(da[0]) and da[1] == 0 and np.isnan(da[2])  # 0/0; y = 0 at index 1
    assert np.isnan(db[1]) and np.isnan(db[2]) and db[0] == 0
    np.testing.assert_array_equal(dc, [0, 0, 0])


def test_eltwise_in_place_shares_bottom_zeros_diff_with_the_top():
    """Caffe's bottom 0 diff is the top diff's memory: bottom 0's result replaces dy for the later
    bottoms, and PROD squares bottom 0's own gradient."""
    a, b = rand(5, seed=1), rand(5, seed=2)
    dy = rand(5, seed=3)
    text = 'type: "Eltwise" bottom: "a" bottom: "b" top: "a" eltwise_param { %s }'
    lay, (top,) = forward(text % "operation: SUM coeff: 2 coeff: 3", [a, b])
    da, db = lay.backward(np, [dy], [top], [top, b], [], [True, True], [])
    np.testing.assert_array_equal(da, dy * F(2))
    np.testing.assert_array_equal(db, (dy * F(2)) * F(3))
    lay, (top,) = forward(text % "operation: PROD", [a, b])
    da, db = lay.backward(np, [dy], [top], [top, b], [], [True, True], [])
    np.testing.assert_array_equal(da, b * b)
    np.testing.assert_array_equal(db, top * da)
    lay, (top,) = forward(text % "operation: MAX", [a, b])
    da, db = lay.backward(np, [dy], [top], [top, b], [], [True, True], [])
    np.testing.assert_array_equal(da, np.where(a > b, dy, 0))
    np.testing.assert_array_equal(db, np.zeros(5, F))
    # Without bottom 0's diff, dy reaches bottom 1 unchanged.
    da, db = lay.backward(np, [dy], [top], [top, b], [], [False, True], [])
    assert da is None
    np.testing.assert_array_equal(db, np.where(a > b, 0, dy))


# -- Softmax ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [1, 0, -1])
def test_softmax_matches_finite_differences_and_ignores_propagate_down(axis):
    x = rand(2, 3, 4, dtype=np.float64)
    text = f'type: "Softmax" bottom: "x" top: "t" softmax_param {{ axis: {axis} }}'
    lay, (top,) = forward(text, [x])
    dy = rand(*top.shape, seed=1, dtype=np.float64)
    (dx,) = lay.backward(np, [dy], [top], [x], [], [False], [])
    (num,) = numeric_grads(lambda bs: forward(text, bs)[1], [x], [dy], 1e-6)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-9)
    # float32, in place (bottom and top the same array): dx = y * (dy - sum(dy * y)).
    x32 = rand(2, 3, 4)
    lay, (y,) = forward(text, [x32])
    dy32 = rand(2, 3, 4, seed=1)
    (dx,) = lay.backward(np, [dy32], [y], [y], [], [True], [])
    ax = axis % 3
    np.testing.assert_allclose(dx, y * (dy32 - np.sum(dy32 * y, axis=ax, keepdims=True)), rtol=1e-6, atol=1e-7)
    assert dx.dtype == F


# -- Silence, BatchReindex, Filter, Parameter, ArgMax -------------------------------------------------


def test_silence_gives_zeros():
    a, b = rand(2, 3), rand(4)
    lay, tops = forward('type: "Silence" bottom: "a" bottom: "b"', [a, b])
    da, db = lay.backward(np, [], tops, [a, b], [], [True, False], [])
    np.testing.assert_array_equal(da, np.zeros((2, 3), F))
    assert db is None


def test_batch_reindex_adds_repeated_indices():
    x = rand(4, 3)
    index = np.array([2, 0, 2, 2], F)
    lay, (top,) = forward('type: "BatchReindex" bottom: "x" bottom: "i" top: "t"', [x, index])
    dy = np.arange(12, dtype=F).reshape(4, 3)
    dx, di = lay.backward(np, [dy], [top], [x, index], [], [True, False], [])
    assert di is None
    np.testing.assert_array_equal(dx, [[3, 4, 5], [0, 0, 0], [0 + 6 + 9, 1 + 7 + 10, 2 + 8 + 11], [0, 0, 0]])
    with pytest.raises(UnsupportedError, match="index"):
        lay.backward(np, [dy], [top], [x, index], [], [True, True], [])
    with pytest.raises(UnsupportedError, match="index"):
        lay.backward(np, [dy], [top], [x, index], [], [False, True], [])
    assert lay.backward(np, [dy], [top], [x, index], [], [False, False], []) == [None, None]


def test_filter_routes_kept_rows_and_refuses_the_selector():
    a, b = rand(4, 2), rand(4, 3, 1, seed=1)
    sel = np.array([0, 1, 0, 1], F)
    text = 'type: "Filter" bottom: "a" bottom: "b" bottom: "s" top: "ta" top: "tb"'
    lay, tops = forward(text, [a, b, sel])
    dys = [rand(*t.shape, seed=5) for t in tops]
    da, db, ds = lay.backward(np, dys, tops, [a, b, sel], [], [True, True, False], [])
    assert ds is None
    np.testing.assert_array_equal(da, np.stack([np.zeros(2, F), dys[0][0], np.zeros(2, F), dys[0][1]]))
    np.testing.assert_array_equal(db[[0, 2]], 0)
    np.testing.assert_array_equal(db[[1, 3]], dys[1])
    assert lay.backward(np, dys, tops, [a, b, sel], [], [False, True, False], [])[0] is None
    with pytest.raises(UnsupportedError, match="selector"):
        lay.backward(np, dys, tops, [a, b, sel], [], [True, True, True], [])
    # Nothing kept: zeros.
    lay, tops = forward(text, [a, b, np.zeros(4, F)])
    da, db, _ = lay.backward(np, [t.copy() for t in tops], tops, [a, b, np.zeros(4, F)], [], [True, True, False], [])
    assert not da.any() and da.shape == a.shape and not db.any()


def test_parameter_param_diff_becomes_the_top_diff():
    lay = layer('type: "Parameter" top: "p" parameter_param { shape { dim: 2 dim: 3 } }')
    lay.reshape([])
    w = rand(2, 3)
    (top,) = lay.forward(np, [], [w])
    diff = np.full((2, 3), 7, F)  # overwritten (=), not added to
    dy = rand(2, 3, seed=1)
    assert lay.backward(np, [dy], [top], [], [w], [], [diff]) == []
    np.testing.assert_array_equal(diff, dy)
    assert lay.backward(np, [dy], [top], [], [w], [], [None]) == []


def test_argmax_cannot_backpropagate():
    x = rand(2, 5)
    lay, (top,) = forward('type: "ArgMax" bottom: "x" top: "t"', [x])
    with pytest.raises(UnsupportedError, match="does not backpropagate"):
        lay.backward(np, [np.ones_like(top)], [top], [x], [], [True], [])


# -- the strict backend (CuPy's rules) -------------------------------------------------------------------

STRICT_CASES = [  # (layer text, bottom shapes, extra bottoms (index/selector), propagate_down)
    ('type: "Concat" bottom: "a" bottom: "b" top: "t" concat_param { axis: 2 }', [(2, 3, 4), (2, 3, 2)], [], None),
    ('type: "Slice" bottom: "x" top: "a" top: "b" slice_param { slice_point: 1 }', [(2, 3, 4)], [], None),
    ('type: "Split" bottom: "x" top: "a" top: "b" top: "c"', [(2, 3)], [], None),
    ('type: "Flatten" bottom: "x" top: "t"', [(2, 3, 4)], [], None),
    ('type: "Reshape" bottom: "x" top: "t" reshape_param { shape { dim: -1 } }', [(2, 3)], [], None),
    ('type: "Tile" bottom: "x" top: "t" tile_param { tiles: 3 }', [(2, 3, 2)], [], None),
    ('type: "Reduction" bottom: "x" top: "t" reduction_param { operation: ASUM axis: 1 coeff: 2 }', [(2, 3, 4)], [], None),
    ('type: "Reduction" bottom: "x" top: "t" reduction_param { operation: SUMSQ }', [(2, 3)], [], None),
    ('type: "Reduction" bottom: "x" top: "t" reduction_param { operation: MEAN axis: 1 }', [(2, 3)], [], None),
    (ELT.format(p="operation: SUM coeff: 1 coeff: -2 coeff: 0.5"), [(2, 3)] * 3, [], None),
    (ELT.format(p="operation: PROD"), [(2, 3)] * 3, [], None),
    (ELT.format(p="operation: PROD stable_prod_grad: false"), [(2, 3)] * 3, [], None),
    (ELT.format(p="operation: MAX"), [(2, 3)] * 3, [], None),
    ('type: "Softmax" bottom: "x" top: "t"', [(2, 3, 4)], [], None),
    ('type: "Silence" bottom: "x"', [(2, 3)], [], None),
    ('type: "BatchReindex" bottom: "x" bottom: "i" top: "t"', [(3, 2)], [np.array([2, 0, 2, 1], F)], [True, False]),
    ('type: "Filter" bottom: "x" bottom: "s" top: "t"', [(4, 2)], [np.array([1, 0, 1, 1], F)], [True, False]),
]


def run_case(xp, text, shapes, extra, propagate):
    bottoms = [xp.asarray(rand(*s, seed=i)) for i, s in enumerate(shapes)] + [xp.asarray(e) for e in extra]
    lay, tops = forward(text, bottoms, xp=xp)
    rng = np.random.default_rng(11)
    dys = [xp.asarray(rng.standard_normal(tuple(t.shape)).astype(F)) for t in tops]
    propagate = propagate or [True] * len(bottoms)
    return [None if d is None else backend.to_numpy(d)
            for d in lay.backward(xp, dys, tops, bottoms, [], propagate, [])]


@pytest.mark.parametrize("case", STRICT_CASES, ids=[f"case{i}" for i in range(len(STRICT_CASES))])
def test_backward_under_strict_xp(case):
    got = run_case(strict.XP, *case)
    want = run_case(np, *case)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_parameter_under_strict_xp():
    xp = strict.XP
    lay = layer('type: "Parameter" top: "p" parameter_param { shape { dim: 2 } }')
    lay.reshape([])
    diff = xp.zeros(2, dtype=F)
    lay.backward(xp, [xp.asarray(np.array([1, 2], F))], [xp.zeros(2, dtype=F)], [], [xp.zeros(2, dtype=F)], [], [diff])
    assert backend.to_numpy(diff).tolist() == [1, 2]
