"""Forward of the routing layers (layers/routing.py) and the data layers (layers/data.py,
Python, recurrent): small hand-written references, and Caffe's recorded blobs
(golden cases `routing` and `misc`)."""
import itertools
import json

import numpy as np
import pytest

from caffeish.graph import registry
from caffeish.errors import ShapeError, UnsupportedError
from caffeish.graph.graph import Graph
from caffeish.formats.io import parse_text, read_prototxt
from caffeish.formats.schema import TEST, pb
from conftest import shared_path

ROUTING_TYPES = {
    "Concat", "Slice", "Split", "Flatten", "Reshape", "Tile", "Reduction", "ArgMax", "Eltwise",
    "Softmax", "Silence", "Filter", "BatchReindex", "Parameter", "DummyData",
}


def layer(text):
    return registry.create(parse_text(text, pb.LayerParameter()), TEST)


def run(text, *bottoms, blobs=()):
    """Build the layer, reshape it for the bottoms and run its forward."""
    lay = layer(text)
    shapes = lay.reshape([b.shape for b in bottoms])
    tops = lay.forward(np, list(bottoms), list(blobs))
    assert [t.shape for t in tops] == [tuple(s) for s in shapes] or lay.value_dependent_shape
    for t in tops:
        assert t.dtype == np.float32
    return tops


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- Concat / Slice / Split -----------------------------------------------------------------


def test_concat_axis_and_legacy_concat_dim():
    a, b = rand(2, 3, 4), rand(2, 5, 4, seed=1)
    (top,) = run('type: "Concat" bottom: "a" bottom: "b" top: "t"', a, b)
    np.testing.assert_array_equal(top[:, :3], a)
    np.testing.assert_array_equal(top[:, 3:], b)
    c = rand(2, 3, 2, seed=2)
    (top,) = run('type: "Concat" bottom: "a" bottom: "c" top: "t" concat_param { axis: -1 }', a, c)
    np.testing.assert_array_equal(top, np.concatenate([a, c], axis=2))
    (top,) = run('type: "Concat" bottom: "a" bottom: "c" top: "t" concat_param { concat_dim: 2 }', a, c)
    np.testing.assert_array_equal(top, np.concatenate([a, c], axis=2))


def test_concat_of_one_bottom_shares_it():
    a = rand(2, 3)
    (top,) = run('type: "Concat" bottom: "a" top: "t"', a)
    assert top is a


def test_slice_points_and_even_split():
    x = rand(2, 6, 3)
    tops = run('type: "Slice" bottom: "x" top: "a" top: "b" top: "c" slice_param { slice_point: 1 slice_point: 4 }', x)
    for t, (lo, hi) in zip(tops, [(0, 1), (1, 4), (4, 6)]):
        np.testing.assert_array_equal(t, x[:, lo:hi])
    tops = run('type: "Slice" bottom: "x" top: "a" top: "b" top: "c" slice_param { slice_dim: 1 }', x)
    for i, t in enumerate(tops):
        np.testing.assert_array_equal(t, x[:, 2 * i : 2 * i + 2])
    tops = run('type: "Slice" bottom: "x" top: "a" top: "b" slice_param { axis: -1 slice_point: 2 }', x)
    np.testing.assert_array_equal(tops[0], x[..., :2])
    np.testing.assert_array_equal(tops[1], x[..., 2:])


def test_split_gives_the_bottom_itself():
    x = rand(2, 3)
    tops = run('type: "Split" bottom: "x" top: "a" top: "b" top: "c"', x)
    assert len(tops) == 3 and all(t is x for t in tops)


# -- Flatten / Reshape / Tile -----------------------------------------------------------------


def test_flatten_and_reshape_are_views():
    x = rand(2, 3, 4, 5)
    (top,) = run('type: "Flatten" bottom: "x" top: "t"', x)
    assert top.shape == (2, 60) and np.shares_memory(top, x)
    np.testing.assert_array_equal(top.ravel(), x.ravel())
    (top,) = run('type: "Flatten" bottom: "x" top: "t" flatten_param { axis: 1 end_axis: 2 }', x)
    assert top.shape == (2, 12, 5)
    (top,) = run('type: "Reshape" bottom: "x" top: "t" reshape_param { shape { dim: 0 dim: -1 dim: 4 } }', x)
    assert top.shape == (2, 15, 4) and np.shares_memory(top, x)
    np.testing.assert_array_equal(top.ravel(), x.ravel())
    (top,) = run('type: "Reshape" bottom: "x" top: "t" '
                 'reshape_param { axis: 1 num_axes: 2 shape { dim: 12 } }', x)
    assert top.shape == (2, 12, 5)


def test_flatten_of_a_non_contiguous_bottom():
    x = rand(4, 3, 2).transpose(2, 1, 0)
    (top,) = run('type: "Flatten" bottom: "x" top: "t"', x)
    np.testing.assert_array_equal(top, np.ascontiguousarray(x).reshape(2, 12))


def test_tile_repeats_whole_axis_blocks():
    x = rand(2, 3, 2)
    (top,) = run('type: "Tile" bottom: "x" top: "t" tile_param { axis: 1 tiles: 3 }', x)
    want = np.empty((2, 9, 2), np.float32)
    for n, t, c in itertools.product(range(2), range(3), range(3)):
        want[n, t * 3 + c] = x[n, c]
    np.testing.assert_array_equal(top, want)


# -- Reduction --------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_reduction(op, axis):
    x = rand(2, 3, 4)
    text = f'type: "Reduction" bottom: "x" top: "t" reduction_param {{ operation: {op} axis: {axis} coeff: -1.5 }}'
    (top,) = run(text, x)
    a = axis % 3
    rows = x.reshape(int(np.prod(x.shape[:a])), -1).astype(np.float64)
    want = []
    for row in rows:
        value = {"SUM": sum(row), "ASUM": sum(abs(v) for v in row), "SUMSQ": sum(v * v for v in row),
                 "MEAN": sum(row) / len(row)}[op]
        want.append(-1.5 * value)
    assert top.shape == x.shape[:a]
    np.testing.assert_allclose(top.ravel(), want, rtol=1e-5)


# -- ArgMax -------------------------------------------------------------------------------------


def ranked(values, k):
    """Caffe: sort (value, index) pairs descending, so ties go to the larger index."""
    pairs = sorted(((float(v), j) for j, v in enumerate(values)), reverse=True)
    return pairs[:k]


TIES = np.array([[1, 3, 3, 2, 3, 0], [5, 5, 1, 5, 0, 2]], np.float32)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_flattened_with_ties(k, out_max_val):
    x = TIES.reshape(2, 3, 2)
    text = f'type: "ArgMax" bottom: "x" top: "t" argmax_param {{ top_k: {k} out_max_val: {str(out_max_val).lower()} }}'
    (top,) = run(text, x)
    assert top.shape == (2, 2 if out_max_val else 1, k)
    for n in range(2):
        pairs = ranked(x[n].ravel(), k)
        np.testing.assert_array_equal(top[n, 0], [j for _, j in pairs])
        if out_max_val:
            np.testing.assert_array_equal(top[n, 1], [v for v, _ in pairs])


@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_along_axis(out_max_val):
    x = np.round(rand(2, 5, 3) * 2)  # small integers: plenty of ties
    text = ('type: "ArgMax" bottom: "x" top: "t" argmax_param { axis: 1 top_k: 2 '
            f'out_max_val: {str(out_max_val).lower()} }}')
    (top,) = run(text, x)
    assert top.shape == (2, 2, 3)
    for n, w in itertools.product(range(2), range(3)):
        pairs = ranked(x[n, :, w], 2)
        want = [v for v, _ in pairs] if out_max_val else [j for _, j in pairs]
        np.testing.assert_array_equal(top[n, :, w], want)


def test_argmax_of_4d_bottom_without_axis():
    x = rand(2, 3, 4, 5)
    (top,) = run('type: "ArgMax" bottom: "x" top: "t"', x)
    assert top.shape == (2, 1, 1, 1)
    np.testing.assert_array_equal(top.ravel(), x.reshape(2, -1).argmax(axis=1))


# -- Eltwise / Softmax --------------------------------------------------------------------------


def test_eltwise_operations():
    a, b, c = rand(2, 3), rand(2, 3, seed=1), rand(2, 3, seed=2)
    (top,) = run('type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "t" '
                 'eltwise_param { coeff: 1 coeff: -0.5 coeff: 2 }', a, b, c)
    np.testing.assert_allclose(top, a - 0.5 * b + 2 * c, rtol=1e-6)
    (top,) = run('type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "t"', a, b, c)
    np.testing.assert_allclose(top, a + b + c, rtol=1e-6)
    assert top is not a and not np.shares_memory(top, a)
    (top,) = run('type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "t" eltwise_param { operation: PROD }',
                 a, b, c)
    np.testing.assert_allclose(top, a * b * c, rtol=1e-6)
    (top,) = run('type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "t" eltwise_param { operation: MAX }',
                 a, b, c)
    np.testing.assert_array_equal(top, np.maximum(a, np.maximum(b, c)))


def test_eltwise_never_writes_its_bottoms():
    a, b = rand(2, 3), rand(2, 3, seed=1)
    keep_a, keep_b = a.copy(), b.copy()
    for op in ("SUM", "PROD", "MAX"):
        run(f'type: "Eltwise" bottom: "a" bottom: "b" top: "t" eltwise_param {{ operation: {op} }}', a, b)
    np.testing.assert_array_equal(a, keep_a)
    np.testing.assert_array_equal(b, keep_b)


@pytest.mark.parametrize("axis", [1, 2, -1, 0])
def test_softmax(axis):
    x = rand(2, 3, 4) * 30 + 500  # large values: the max is subtracted first
    (top,) = run(f'type: "Softmax" bottom: "x" top: "t" softmax_param {{ axis: {axis} }}', x)
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=axis, keepdims=True))
    np.testing.assert_allclose(top, e / e.sum(axis=axis, keepdims=True), rtol=1e-5, atol=1e-7)


# -- Silence / Filter / BatchReindex / Parameter ------------------------------------------------


def test_silence_has_no_tops():
    assert run('type: "Silence" bottom: "a" bottom: "b"', rand(2), rand(3)) == []


def test_filter_keeps_selected_items():
    x, y = rand(4, 3, 2), rand(4, 5, seed=1)
    sel = np.array([0, 2, 0, -1], np.float32).reshape(4, 1)
    tops = run('type: "Filter" bottom: "x" bottom: "y" bottom: "s" top: "a" top: "b"', x, y, sel)
    np.testing.assert_array_equal(tops[0], x[[1, 3]])
    np.testing.assert_array_equal(tops[1], y[[1, 3]])
    tops = run('type: "Filter" bottom: "x" bottom: "s" top: "a"', x, np.zeros(4, np.float32))
    assert tops[0].shape == (0, 3, 2)


def test_batch_reindex_gathers_and_checks_indices():
    x = rand(4, 2, 3)
    idx = np.array([3, 0, 0, 2, 1], np.float32)
    (top,) = run('type: "BatchReindex" bottom: "x" bottom: "i" top: "t"', x, idx)
    np.testing.assert_array_equal(top, np.stack([x[3], x[0], x[0], x[2], x[1]]))
    for bad in ([4], [-1], [1.5]):
        with pytest.raises(ShapeError, match="not a whole number in \\[0, 4\\)"):
            run('type: "BatchReindex" bottom: "x" bottom: "i" top: "t"', x, np.array(bad, np.float32))


def test_parameter_top_is_its_blob():
    lay = layer('type: "Parameter" top: "p" parameter_param { shape { dim: 2 dim: 3 } }')
    assert lay.reshape([]) == [(2, 3)]
    assert lay.fillers() == [None]  # Caffe allocates without filling: zeros
    blob = rand(2, 3)
    (top,) = lay.forward(np, [], [blob])
    assert top is blob


# -- data layers ------------------------------------------------------------------------------


def test_input_gives_zeros_of_its_shapes():
    lay = layer('type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } shape { dim: 4 } }')
    lay.reshape([])
    a, b = lay.forward(np, [], [])
    assert a.shape == (2, 3) and b.shape == (4,) and not a.any() and not b.any()
    assert a.dtype == b.dtype == np.float32


def test_dummy_data_fillers_per_top_and_shared():
    tops = run('type: "DummyData" top: "a" top: "b" dummy_data_param { shape { dim: 2 dim: 3 } '
               'shape { dim: 4 } data_filler { type: "constant" value: 1.5 } '
               'data_filler { type: "constant" value: -2 } }')
    assert np.all(tops[0] == 1.5) and tops[0].shape == (2, 3)
    assert np.all(tops[1] == -2) and tops[1].shape == (4,)
    tops = run('type: "DummyData" top: "a" top: "b" dummy_data_param { num: 2 channels: 3 height: 1 width: 2 '
               'data_filler { type: "constant" value: 7 } }')
    assert all(t.shape == (2, 3, 1, 2) and np.all(t == 7) for t in tops)
    (top,) = run('type: "DummyData" top: "a" dummy_data_param { shape { dim: 3 } }')
    assert not top.any()


def test_dummy_data_random_filler_is_refilled():
    lay = layer('type: "DummyData" top: "a" dummy_data_param { shape { dim: 100 dim: 100 } '
                'data_filler { type: "uniform" min: 2 max: 3 } }')
    lay.reshape([])
    (first,) = lay.forward(np, [], [])
    (second,) = lay.forward(np, [], [])
    assert first.min() >= 2 and first.max() <= 3 and abs(first.mean() - 2.5) < 0.02
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("text, words", [
    ('type: "Data" top: "d" top: "l" data_param { source: "x" batch_size: 1 }', "Input layer"),
    ('type: "ImageData" top: "d" top: "l"', "Input layer"),
    ('type: "HDF5Data" top: "d"', "Input layer"),
    ('type: "WindowData" top: "d" top: "l"', "Input layer"),
    ('type: "MemoryData" top: "d" top: "l"', "Input layer"),
    ('type: "HDF5Output" bottom: "a" bottom: "b"', "HDF5 file"),
    ('type: "Python" top: "d" python_param { module: "m" layer: "L" }', "Python"),
    ('type: "RNN" bottom: "x" bottom: "c" top: "h"', "recurrent"),
    ('type: "LSTM" bottom: "x" bottom: "c" top: "h"', "recurrent"),
    ('type: "LSTMUnit" bottom: "a" bottom: "b" bottom: "c" top: "c2" top: "h"', "LSTMUnit"),
])
def test_layers_that_cannot_run_say_why(text, words):
    lay = layer(text)
    assert not lay.can_forward
    assert words in lay.unsupported_reason
    with pytest.raises(UnsupportedError, match=words):
        lay.forward(np, [], [])


def test_runnable_layers_can_forward():
    for t in ROUTING_TYPES | {"Input"}:
        assert registry.lookup(t).forward is not registry.Layer.forward, t


# -- golden: Caffe's recorded blobs -----------------------------------------------------------


def golden_layers(case, types):
    """(node, bottoms, expected tops, meta) for the layers of `types` in a golden case."""
    folder = shared_path("golden", case)
    meta = json.loads((folder / "meta.json").read_text())
    blobs = np.load(folder / "blobs.npz")
    graph = Graph(read_prototxt(folder / "net.prototxt")[0])
    found = []
    for node in graph.nodes:
        if node.type in types:
            found.append((node, [blobs[b] for b in node.bottoms], [blobs[t] for t in node.tops], meta))
    return found


def check_golden(node, bottoms, expected, meta):
    node.layer.reshape([b.shape for b in bottoms])
    tops = node.layer.forward(np, bottoms, [])
    assert len(tops) == len(expected)
    for name, top, want in zip(node.tops, tops, expected):
        assert top.dtype == np.float32, name
        assert top.shape == want.shape, (name, top.shape, want.shape)
        if name in meta["exact"]:
            np.testing.assert_array_equal(top, want, err_msg=name)
        else:
            err = np.abs(top - want).max() / (np.abs(want).max() + 1e-12) if want.size else 0.0
            assert err <= meta["tolerance"], (name, err)


@pytest.mark.parametrize("case", ["routing", "misc"])
def test_golden(case):
    # Each layer reads Caffe's recorded bottoms (final values of in-place blobs; none of
    # these layers' bottoms is rewritten in place in these nets).
    checked = set()
    for node, bottoms, expected, meta in golden_layers(case, ROUTING_TYPES):
        check_golden(node, bottoms, expected, meta)
        checked.add(node.type)
    want = {"routing": {"Concat", "Slice", "Split", "Flatten", "Reshape", "Tile", "Eltwise", "Softmax",
                        "ArgMax", "Reduction", "Silence"},
            "misc": {"DummyData", "BatchReindex", "Filter", "Split"}}[case]
    assert want <= checked
