"""Shape inference of the routing/shape layers (layers/routing.py) and data layers (layers/data.py).

Golden: real Caffe's recorded blob shapes for the `routing` and `misc` cases.
Unit tests: Caffe's parameter checks, Reshape's 0/-1 rules, ArgMax's shapes,
and the data layers reading an LMDB database, an image list, or user shapes.
"""
import json

import numpy as np
import pytest
from conftest import shared_path
from google.protobuf import text_format

from caffeish.graph import registry
from caffeish.errors import InputShapeRequired, ShapeError, UnknownLayerTypeError
from caffeish.formats.schema import TEST, pb

ROUTING_TYPES = {
    "Concat", "Slice", "Split", "Flatten", "Reshape", "Tile", "Reduction", "ArgMax",
    "Eltwise", "Softmax", "Silence", "Filter", "BatchReindex", "Parameter",
}
DATA_TYPES = {
    "Input", "HDF5Output", "DummyData", "MemoryData", "Data", "ImageData", "WindowData", "HDF5Data",
}
MY_TYPES = ROUTING_TYPES | DATA_TYPES


def make(text, name="L"):
    """A layer built from LayerParameter text (name defaults to 'L', tops default to one)."""
    param = text_format.Parse(text, pb.LayerParameter())
    if not param.name:
        param.name = name
    return registry.create(param, TEST)


def shapes_of(text, *bottoms, input_shapes=None):
    layer = make(text)
    if input_shapes:
        layer.input_shapes = input_shapes
    return layer.reshape([tuple(b) for b in bottoms])


def test_every_type_registered():
    missing = MY_TYPES - set(registry.registered_types())
    assert not missing
    with open(shared_path("caffe", "layer_types.txt")) as f:
        caffe_types = {line.strip() for line in f if line.strip()}
    assert MY_TYPES <= caffe_types


# -- golden: real Caffe's shapes -------------------------------------------------------


@pytest.mark.parametrize("case", ["routing", "misc"])
def test_golden_blob_shapes(case):
    with open(shared_path("golden", case, "net.prototxt")) as f:
        net = text_format.Parse(f.read(), pb.NetParameter())
    with open(shared_path("golden", case, "meta.json")) as f:
        golden = {k: tuple(v) for k, v in json.load(f)["blob_shapes"].items()}
    shapes, checked = {}, set()
    for lp in net.layer:
        try:
            registry.lookup(lp.type, lp.name)
        except UnknownLayerTypeError:
            assert lp.type not in MY_TYPES, f"{lp.type} is not registered"
            continue  # another family's type, not written yet: its tops stay unknown
        if any(b not in shapes for b in lp.bottom):
            continue
        bottoms = [shapes[b] for b in lp.bottom]
        tops = registry.create(lp, TEST).reshape(bottoms)
        assert len(tops) == len(lp.top), lp.name
        for name, shape in zip(lp.top, tops):
            assert isinstance(shape, tuple) and all(type(d) is int for d in shape), (name, shape)
            if lp.type == "Filter":
                # Caffe's setup declares the full batch; its forward then keeps the
                # selected items, which is what the golden file recorded.
                assert shape == (bottoms[0][0],) + golden[name][1:], name
            else:
                assert shape == golden[name], (lp.name, name, shape, golden[name])
            shapes[name] = shape
        checked.add(lp.type)
    present = {lp.type for lp in net.layer} & MY_TYPES
    assert present <= checked


def test_golden_filter_first_dim_is_the_selected_count():
    inputs = np.load(shared_path("golden", "misc", "inputs.npz"))
    with open(shared_path("golden", "misc", "meta.json")) as f:
        golden = json.load(f)["blob_shapes"]
    assert golden["flt"][0] == np.count_nonzero(inputs["keep"]) < inputs["x"].shape[0]
    assert registry.lookup("Filter").value_dependent_shape
    assert not registry.lookup("BatchReindex").value_dependent_shape
    assert shapes_of('type: "Filter" bottom: "x" bottom: "k" top: "f"', inputs["x"].shape, (4,)) == [
        tuple(inputs["x"].shape)
    ]


# -- routing shapes computed by hand -------------------------------------------------


@pytest.mark.parametrize(
    "text, bottoms, expected",
    [
        ('type: "Concat" top: "t" concat_param { concat_dim: 0 }', [(2, 3), (5, 3)], [(7, 3)]),
        ('type: "Concat" top: "t" concat_param { axis: -1 }', [(2, 3), (2, 4), (2, 1)], [(2, 8)]),
        ('type: "Concat" top: "t"', [(2, 3, 4)], [(2, 3, 4)]),
        ('type: "Slice" top: "a" top: "b" slice_param { slice_dim: 0 slice_point: 3 }', [(5, 2)],
         [(3, 2), (2, 2)]),
        ('type: "Slice" top: "a" top: "b" top: "c" slice_param { axis: -1 }', [(2, 9)],
         [(2, 3), (2, 3), (2, 3)]),
        ('type: "Split" top: "a" top: "b" top: "c"', [(2, 3)], [(2, 3)] * 3),
        ('type: "Flatten" top: "t" flatten_param { axis: 1 end_axis: 2 }', [(2, 3, 4, 5)], [(2, 12, 5)]),
        ('type: "Flatten" top: "t" flatten_param { axis: 0 }', [(2, 3, 4)], [(24,)]),
        ('type: "Tile" top: "t" tile_param { axis: -1 tiles: 4 }', [(2, 3)], [(2, 12)]),
        ('type: "Reduction" top: "t" reduction_param { axis: -1 operation: ASUM }', [(2, 3, 4)], [(2, 3)]),
        ('type: "Reduction" top: "t"', [(7,)], [()]),
        ('type: "Eltwise" top: "t" eltwise_param { operation: MAX coeff: 1 coeff: 2 coeff: 3 }',
         [(2, 3)] * 3, [(2, 3)]),
        ('type: "Softmax" top: "t" softmax_param { axis: -1 }', [(2, 3, 4)], [(2, 3, 4)]),
        ('type: "Silence"', [(2, 3), (4,)], []),
        ('type: "Filter" top: "a" top: "b"', [(4, 3), (4, 2, 2), (4, 1)], [(4, 3), (4, 2, 2)]),
        ('type: "BatchReindex" top: "t"', [(5, 3, 2), (7,)], [(7, 3, 2)]),
        ('type: "Parameter" top: "t" parameter_param { shape { dim: 3 dim: 4 } }', [], [(3, 4)]),
    ],
)
def test_routing_shapes(text, bottoms, expected):
    assert shapes_of(text, *bottoms) == expected


def test_parameter_owns_one_blob_of_its_shape():
    layer = make('type: "Parameter" top: "w" parameter_param { shape { dim: 2 dim: 5 } }')
    assert layer.param_shapes([]) == [(2, 5)]
    assert layer.exact_bottoms == 0 and not layer.is_data


def test_in_place_refused_by_flatten_reshape_split():
    for t in ("Flatten", "Reshape", "Split"):
        assert registry.lookup(t).allows_in_place is False
    assert registry.lookup("Softmax").allows_in_place is True


@pytest.mark.parametrize(
    "shape_text, bottom, expected",
    [
        ("reshape_param { shape { dim: 0 dim: -1 } }", (2, 3, 6, 5), (2, 90)),
        ("reshape_param { shape { dim: 0 dim: 0 dim: 0 dim: 0 } }", (2, 3, 6, 5), (2, 3, 6, 5)),
        ("reshape_param { shape { dim: -1 } }", (2, 3, 6, 5), (180,)),
        ("reshape_param { shape { dim: 0 dim: -1 dim: 5 } }", (2, 3, 6, 5), (2, 18, 5)),
        ("reshape_param { shape { dim: 6 dim: 0 dim: -1 } }", (2, 3, 6, 5), (6, 3, 10)),
        # replace only axis 1 by (3, 1): start 1, end 2
        ("reshape_param { axis: 1 num_axes: 1 shape { dim: 3 dim: 1 } }", (2, 3, 6, 5), (2, 3, 1, 6, 5)),
        # 0 copies the bottom dim at start + i
        ("reshape_param { axis: 2 shape { dim: 0 dim: -1 } }", (2, 3, 6, 5), (2, 3, 6, 5)),
        ("reshape_param { axis: 1 num_axes: 2 shape { dim: -1 } }", (2, 3, 6, 5), (2, 18, 5)),
        # axis -1 means after the last axis, num_axes 0 inserts
        ("reshape_param { axis: -1 num_axes: 0 shape { dim: 1 } }", (2, 3, 6, 5), (2, 3, 6, 5, 1)),
        ("reshape_param { axis: 0 num_axes: 0 shape { dim: 1 dim: 1 } }", (2, 3), (1, 1, 2, 3)),
        # axis -3 of 3 axes: start 3 - 3 + 1 = 1
        ("reshape_param { axis: -3 num_axes: 1 shape { dim: 2 dim: -1 } }", (4, 6, 7), (4, 2, 3, 7)),
    ],
)
def test_reshape_rules(shape_text, bottom, expected):
    assert shapes_of(f'type: "Reshape" top: "t" {shape_text}', bottom) == [expected]


@pytest.mark.parametrize(
    "text, bottom, expected",
    [
        ("argmax_param { }", (2, 6, 4, 5), (2, 1, 1, 1)),
        ("argmax_param { top_k: 3 }", (2, 6), (2, 1, 3)),
        ("argmax_param { out_max_val: true top_k: 2 }", (5, 3), (5, 2, 2)),
        ("argmax_param { }", (5,), (5, 1, 1)),
        ("argmax_param { out_max_val: true }", (2, 3, 4, 5, 6), (2, 2, 1, 1, 1)),
        ("argmax_param { axis: 2 top_k: 3 }", (2, 6, 4, 5), (2, 6, 3, 5)),
        ("argmax_param { axis: -1 out_max_val: true top_k: 5 }", (2, 6, 4, 5), (2, 6, 4, 5)),
        ("argmax_param { axis: 0 }", (7, 2), (1, 2)),
    ],
)
def test_argmax_shapes(text, bottom, expected):
    assert shapes_of(f'type: "ArgMax" top: "t" {text}', bottom) == [expected]


# -- Caffe's checks: each bad parameter is a ShapeError naming the layer ---------------

BAD = [
    ('type: "Concat" top: "t" concat_param { axis: 1 concat_dim: 1 }', [(2, 3), (2, 3)], "not both"),
    ('type: "Concat" top: "t" concat_param { concat_dim: 2 }', [(2, 3), (2, 3)], "out of range"),
    ('type: "Concat" top: "t" concat_param { axis: -3 }', [(2, 3), (2, 3)], "out of range"),
    ('type: "Concat" top: "t"', [(2, 3, 4), (2, 3, 5)], "same shape except"),
    ('type: "Concat" top: "t"', [(2, 3), (2, 3, 1)], "same shape except"),
    ('type: "Concat" top: "t"', [()], "out of range"),
    ('type: "Slice" top: "a" top: "b" slice_param { axis: 1 slice_dim: 1 }', [(2, 4)], "not both"),
    ('type: "Slice" top: "a" top: "b" slice_param { slice_dim: 2 }', [(2, 4)], "out of range"),
    ('type: "Slice" top: "a" top: "b" top: "c"', [(2, 4)], "evenly divide"),
    ('type: "Slice" top: "a" top: "b" slice_param { slice_point: 1 slice_point: 2 }', [(2, 4)],
     "one fewer"),
    ('type: "Slice" top: "a" top: "b" top: "c" slice_param { slice_point: 2 slice_point: 2 }',
     [(2, 4)], "strictly increasing"),
    ('type: "Slice" top: "a" top: "b" slice_param { slice_point: 0 }', [(2, 4)], "strictly increasing"),
    ('type: "Slice" top: "a" top: "b" slice_param { slice_point: 5 }', [(2, 4)], "beyond"),
    ('type: "Slice" top: "a" top: "b" top: "c" slice_param { slice_point: 1 slice_point: 2 }',
     [(3, 2)], "cannot slice"),
    ('type: "Split" top: "a"', [(2,), (2,)], "exactly 1 bottom"),
    ('type: "Flatten" top: "t" flatten_param { axis: 2 end_axis: 0 }', [(2, 3, 4)], "before"),
    ('type: "Flatten" top: "t" flatten_param { axis: 4 }', [(2, 3, 4)], "out of range"),
    ('type: "Flatten" top: "t"', [(5,)], "out of range"),
    ('type: "Reshape" top: "t" reshape_param { shape { dim: -1 dim: -1 } }', [(2, 3)], "several -1"),
    ('type: "Reshape" top: "t" reshape_param { shape { dim: 7 } }', [(2, 3)], "has 6"),
    ('type: "Reshape" top: "t" reshape_param { shape { dim: 4 dim: -1 } }', [(2, 3)], "not divisible"),
    ('type: "Reshape" top: "t" reshape_param { shape { dim: -2 dim: -3 } }', [(2, 3)], "positive"),
    ('type: "Reshape" top: "t" reshape_param { axis: -1 num_axes: 0 shape { dim: 0 } }', [(2, 3)],
     "no axis 2"),
    ('type: "Reshape" top: "t" reshape_param { axis: 3 shape { dim: 1 } }', [(2, 3)], "out of range"),
    ('type: "Reshape" top: "t" reshape_param { axis: -4 shape { dim: 1 } }', [(2, 3)], "out of range"),
    ('type: "Reshape" top: "t" reshape_param { num_axes: -2 shape { dim: 6 } }', [(2, 3)], "num_axes"),
    ('type: "Reshape" top: "t" reshape_param { axis: 1 num_axes: 2 shape { dim: 6 } }', [(2, 3)],
     "beyond"),
    ('type: "Reshape" top: "t" reshape_param { shape { dim: 0 dim: -1 } }', [(0, 3)], "infer"),
    ('type: "Tile" top: "t" tile_param { axis: 1 }', [(2, 3)], "tiles"),
    ('type: "Tile" top: "t" tile_param { tiles: 0 }', [(2, 3)], "positive"),
    ('type: "Tile" top: "t" tile_param { tiles: 2 axis: 2 }', [(2, 3)], "out of range"),
    ('type: "Reduction" top: "t" reduction_param { axis: 2 }', [(2, 3)], "out of range"),
    ('type: "ArgMax" top: "t" argmax_param { top_k: 7 }', [(2, 3, 2)], "exceeds"),
    ('type: "ArgMax" top: "t" argmax_param { top_k: 0 }', [(2, 3)], "at least 1"),
    ('type: "ArgMax" top: "t" argmax_param { axis: 1 top_k: 4 }', [(2, 3)], "exceeds"),
    ('type: "ArgMax" top: "t" argmax_param { axis: 2 }', [(2, 3)], "out of range"),
    ('type: "Eltwise" top: "t"', [(2, 3)], "at least 2 bottom"),
    ('type: "Eltwise" top: "t"', [(2, 3), (3, 2)], "same shape"),
    ('type: "Eltwise" top: "t" eltwise_param { coeff: 1 }', [(2, 3), (2, 3)], "one per bottom"),
    ('type: "Eltwise" top: "t" eltwise_param { operation: PROD coeff: 1 coeff: 1 }', [(2, 3), (2, 3)],
     "PROD"),
    ('type: "Softmax" top: "t" softmax_param { axis: 3 }', [(2, 3)], "out of range"),
    ('type: "Silence" top: "t"', [(2, 3)], "exactly 0 top"),
    ('type: "Filter" top: "a" top: "b"', [(4, 3), (4,)], "one top per data bottom"),
    ('type: "Filter" top: "a"', [(4, 3), (4, 2)], "selector"),
    ('type: "Filter" top: "a"', [(5, 3), (4,)], "first dim"),
    ('type: "BatchReindex" top: "t"', [(5, 3), (4, 1)], "1-D"),
    ('type: "Parameter" top: "t" parameter_param { shape { dim: -1 } }', [], "negative"),
    ('type: "Parameter" top: "t"', [(2,)], "exactly 0 bottom"),
]


@pytest.mark.parametrize("text, bottoms, fragment", BAD)
def test_bad_parameters_raise_shape_error_naming_the_layer(text, bottoms, fragment):
    layer = make(text, name="bad_one")
    with pytest.raises(ShapeError) as err:
        layer.reshape(bottoms)
    message = str(err.value)
    assert "'bad_one'" in message and f"({layer.type})" in message
    assert fragment in message


# -- declared data shapes ------------------------------------------------------------------


def test_input_one_shape_for_all_tops_or_one_per_top():
    one = 'type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } }'
    assert shapes_of(one) == [(2, 3), (2, 3)]
    each = 'type: "Input" top: "a" top: "b" input_param { shape { dim: 2 } shape { dim: 4 dim: 1 } }'
    assert shapes_of(each) == [(2,), (4, 1)]
    # the user's shape wins over the declared one, top by top
    assert shapes_of(each, input_shapes={"b": (9, 9), "other": (1,)}) == [(2,), (9, 9)]


def test_input_checks():
    bad = 'type: "Input" top: "a" top: "b" top: "c" input_param { shape { dim: 2 } shape { dim: 4 } }'
    with pytest.raises(ShapeError, match="2 input_param.shape entries for 3 tops"):
        shapes_of(bad)
    bare = 'type: "Input" top: "a" top: "b"'
    with pytest.raises(InputShapeRequired) as err:
        shapes_of(bare, input_shapes={"a": (1, 2)})
    assert "--input-shape b=" in str(err.value) and "'a'" not in str(err.value).split(":", 1)[1]
    assert shapes_of(bare, input_shapes={"a": (1, 2), "b": (3,)}) == [(1, 2), (3,)]
    for bad_shape in [(1, 0), (), (2.5,), ("x",)]:
        with pytest.raises(ShapeError, match="positive integer"):
            shapes_of(bare, input_shapes={"a": bad_shape, "b": (3,)})
    with pytest.raises(ShapeError, match="at least 1 top"):
        shapes_of('type: "Input"')


def test_dummy_data_shapes():
    assert shapes_of('type: "DummyData" top: "a" top: "b" dummy_data_param { shape { dim: 2 dim: 3 } }') == [
        (2, 3), (2, 3)
    ]
    legacy = ('type: "DummyData" top: "a" top: "b" dummy_data_param { num: 5 channels: 3 channels: 1 '
              'height: 4 width: 6 width: 2 data_filler { type: "gaussian" } }')
    assert shapes_of(legacy) == [(5, 3, 4, 6), (5, 1, 4, 2)]


@pytest.mark.parametrize(
    "param, fragment",
    [
        ("shape { dim: 2 } num: 1 channels: 1 height: 1 width: 1", "not both"),
        ("num: 1 channels: 1 height: 1", "'width' given 0"),
        ("shape { dim: 2 } shape { dim: 2 } shape { dim: 2 }", "3 shape entries for 2 tops"),
        ("", "0 shape entries"),
        ("shape { dim: 2 } data_filler { } data_filler { } data_filler { }", "3 data_filler"),
        ('shape { dim: 2 } data_filler { type: "gausian" }', "unknown filler type 'gausian'"),
    ],
)
def test_dummy_data_checks(param, fragment):
    with pytest.raises(ShapeError, match=fragment):
        shapes_of(f'name: "dd" type: "DummyData" top: "a" top: "b" dummy_data_param {{ {param} }}')


def test_memory_data():
    text = 'type: "MemoryData" top: "d" top: "l" memory_data_param { batch_size: 8 channels: 1 height: 28 width: 28 }'
    assert shapes_of(text) == [(8, 1, 28, 28), (8,)]
    assert shapes_of(text, input_shapes={"d": (2, 1, 28, 28)}) == [(2, 1, 28, 28), (2,)]
    with pytest.raises(ShapeError, match="must all be positive"):
        shapes_of('type: "MemoryData" top: "d" top: "l" memory_data_param { batch_size: 8 channels: 1 height: 28 }')
    with pytest.raises(ShapeError, match="exactly 2 top"):
        shapes_of('type: "MemoryData" top: "d" memory_data_param { batch_size: 1 channels: 1 height: 1 width: 1 }')


def test_hdf5_output_has_no_tops_and_two_bottoms():
    layer = make('type: "HDF5Output" bottom: "d" bottom: "l" hdf5_output_param { file_name: "/nonexistent/out.h5" }')
    assert layer.reshape([(2, 3), (2,)]) == []
    with pytest.raises(ShapeError, match="exactly 2 bottom"):
        layer.reshape([(2, 3)])


# -- shapes read from files ----------------------------------------------------------------


def write_lmdb(path, records):
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for key, datum in records:
            txn.put(key, datum.SerializeToString())
    env.close()
    return str(path)


def raw_datum(c, h, w, label=0):
    return pb.Datum(channels=c, height=h, width=w, data=bytes(c * h * w), label=label)


def png_bytes(size, mode="RGB"):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def data_layer(source, batch=4, crop=0, backend="LMDB", tops=("data", "label"), extra=""):
    top_text = " ".join(f'top: "{t}"' for t in tops)
    crop_text = f"transform_param {{ crop_size: {crop} {extra} }}" if crop or extra else ""
    return (f'name: "db" type: "Data" {top_text} {crop_text} '
            f'data_param {{ source: "{source}" batch_size: {batch} backend: {backend} }}')


def test_data_lmdb_raw_datum(tmp_path):
    src = write_lmdb(tmp_path / "db", [(b"00000000", raw_datum(3, 5, 7)), (b"00000001", raw_datum(3, 5, 7, 1))])
    assert shapes_of(data_layer(src, batch=4, crop=3)) == [(4, 3, 3, 3), (4,)]
    assert shapes_of(data_layer(src, batch=2)) == [(2, 3, 5, 7), (2,)]
    assert shapes_of(data_layer(src, batch=2, tops=("data",))) == [(2, 3, 5, 7)]
    with pytest.raises(ShapeError, match="crop_size 6 is larger than the 5x7"):
        shapes_of(data_layer(src, crop=6))
    with pytest.raises(ShapeError, match="mean_file or mean_value"):
        shapes_of(data_layer(src, extra='mean_file: "m.binaryproto" mean_value: 1'))


def test_data_lmdb_reads_the_first_record_in_key_order(tmp_path):
    src = write_lmdb(tmp_path / "db", [(b"b", raw_datum(1, 2, 2)), (b"a", raw_datum(3, 5, 7))])
    assert shapes_of(data_layer(src, batch=1)) == [(1, 3, 5, 7), (1,)]


def test_data_lmdb_encoded_datum(tmp_path):
    colour = pb.Datum(encoded=True, data=png_bytes((9, 6), "RGB"))
    src = write_lmdb(tmp_path / "rgb", [(b"0", colour)])
    assert shapes_of(data_layer(src, batch=5)) == [(5, 3, 6, 9), (5,)]
    assert shapes_of(data_layer(src, batch=5, crop=4)) == [(5, 3, 4, 4), (5,)]
    grey = pb.Datum(encoded=True, data=png_bytes((8, 10), "L"))
    src = write_lmdb(tmp_path / "grey", [(b"0", grey)])
    assert shapes_of(data_layer(src, batch=2)) == [(2, 1, 10, 8), (2,)]
    assert shapes_of(data_layer(src, batch=2, extra="force_color: true")) == [(2, 3, 10, 8), (2,)]
    with pytest.raises(ShapeError, match="force_color and force_gray"):
        shapes_of(data_layer(src, extra="force_color: true force_gray: true"))


def test_data_needs_an_input_shape_when_the_database_cannot_be_read(tmp_path):
    leveldb = str(tmp_path / "train_leveldb")
    with pytest.raises(InputShapeRequired) as err:
        shapes_of(data_layer(leveldb, backend="LEVELDB"))
    message = str(err.value)
    assert "'db'" in message and leveldb in message and "LEVELDB" in message
    assert "--input-shape data=N,C,H,W" in message and "'label'" in message
    missing = str(tmp_path / "nope_lmdb")
    with pytest.raises(InputShapeRequired, match="does not exist.*--input-shape data=N,C,H,W"):
        shapes_of(data_layer(missing))
    # the real top name goes into the hint
    with pytest.raises(InputShapeRequired, match="--input-shape pixels=N,C,H,W"):
        shapes_of(data_layer(missing, tops=("pixels", "y")))
    with pytest.raises(InputShapeRequired, match="source is not set"):
        shapes_of(data_layer(""))
    empty = tmp_path / "empty_lmdb"
    write_lmdb(empty, [])
    with pytest.raises(InputShapeRequired, match="no records"):
        shapes_of(data_layer(str(empty)))


def test_data_user_shape_wins_and_gives_the_label(tmp_path):
    missing = str(tmp_path / "nope")
    assert shapes_of(data_layer(missing), input_shapes={"data": (2, 1, 28, 28)}) == [(2, 1, 28, 28), (2,)]
    assert shapes_of(data_layer(missing), input_shapes={"data": (2, 1, 28, 28), "label": (2,)}) == [
        (2, 1, 28, 28), (2,)
    ]
    with pytest.raises(ShapeError, match="label top 'label'"):
        shapes_of(data_layer(missing), input_shapes={"data": (2, 1, 28, 28), "label": (3,)})
    with pytest.raises(InputShapeRequired, match="not the data top.*--input-shape data="):
        shapes_of(data_layer(missing), input_shapes={"label": (2,)})


def image_data_layer(source, extra="", transform="", tops='top: "data" top: "label"'):
    return (f'name: "img" type: "ImageData" {tops} {transform} '
            f'image_data_param {{ source: "{source}" batch_size: 3 {extra} }}')


def test_image_data_reads_the_first_listed_image(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (11, 7)).save(tmp_path / "imgs" / "a b.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "imgs" / "c.png")
    listing = tmp_path / "list.txt"
    listing.write_text("a b.png 3\nc.png 1\n")
    root = f'root_folder: "{tmp_path}/imgs/"'
    assert shapes_of(image_data_layer(listing, root)) == [(3, 3, 7, 11), (3,)]
    assert shapes_of(image_data_layer(listing, root + " is_color: false")) == [(3, 1, 7, 11), (3,)]
    assert shapes_of(image_data_layer(listing, root, "transform_param { crop_size: 5 }")) == [
        (3, 3, 5, 5), (3,)
    ]


def test_image_data_without_reading_files(tmp_path):
    missing = tmp_path / "missing.txt"
    assert shapes_of(image_data_layer(missing, "new_height: 20 new_width: 30")) == [(3, 3, 20, 30), (3,)]
    assert shapes_of(image_data_layer(missing, "new_height: 20 new_width: 30", "transform_param { crop_size: 16 }")) == [
        (3, 3, 16, 16), (3,)
    ]
    assert shapes_of(image_data_layer(missing, "is_color: false", "transform_param { crop_size: 16 }")) == [
        (3, 1, 16, 16), (3,)
    ]
    with pytest.raises(ShapeError, match="crop_size 32 is larger than the 20x30"):
        shapes_of(image_data_layer(missing, "new_height: 20 new_width: 30", "transform_param { crop_size: 32 }"))
    with pytest.raises(ShapeError, match="set together"):
        shapes_of(image_data_layer(missing, "new_height: 20"))
    with pytest.raises(ShapeError, match="batch_size must be positive"):
        shapes_of(image_data_layer(missing, "batch_size: 0 new_height: 2 new_width: 2").replace("batch_size: 3", ""))


def test_image_data_needs_an_input_shape_when_files_are_missing(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(InputShapeRequired) as err:
        shapes_of(image_data_layer(missing))
    assert str(missing) in str(err.value) and "--input-shape data=N,C,H,W" in str(err.value)
    listing = tmp_path / "list.txt"
    listing.write_text("gone.jpg 0\n")
    with pytest.raises(InputShapeRequired, match="gone.jpg.*--input-shape data="):
        shapes_of(image_data_layer(listing))
    assert shapes_of(image_data_layer(listing), input_shapes={"data": (3, 3, 8, 8)}) == [(3, 3, 8, 8), (3,)]


def test_window_data():
    text = ('name: "win" type: "WindowData" top: "data" top: "label" transform_param { crop_size: 227 } '
            'window_data_param { source: "windows.txt" batch_size: 128 }')
    assert shapes_of(text) == [(128, 3, 227, 227), (128,)]
    no_crop = text.replace("transform_param { crop_size: 227 }", "")
    with pytest.raises(InputShapeRequired, match="crop_size.*--input-shape data=N,C,H,W"):
        shapes_of(no_crop)
    assert shapes_of(no_crop, input_shapes={"data": (4, 3, 9, 9)}) == [(4, 3, 9, 9), (4,)]


def test_hdf5_data_needs_every_top():
    text = ('name: "h5" type: "HDF5Data" top: "data" top: "label" top: "w" '
            'hdf5_data_param { source: "train_h5.txt" batch_size: 10 }')
    with pytest.raises(InputShapeRequired) as err:
        shapes_of(text, input_shapes={"data": (10, 4)})
    message = str(err.value)
    assert "'h5'" in message and "train_h5.txt" in message
    assert "--input-shape label=N," in message and "--input-shape w=N," in message
    assert "--input-shape data=" not in message
    shapes = {"data": (10, 4), "label": (10, 1), "w": (10,)}
    assert shapes_of(text, input_shapes=shapes) == [(10, 4), (10, 1), (10,)]


def test_data_layers_are_sources():
    for t in DATA_TYPES - {"HDF5Output"}:
        cls = registry.lookup(t)
        assert cls.is_data and cls.exact_bottoms == 0, t
    assert not registry.lookup("HDF5Output").is_data
