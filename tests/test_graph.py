"""The layer graph: rule filtering, split insertion, wiring, and shape inference against real Caffe."""
import json

import numpy as np
import pytest
from google.protobuf import text_format

from caffeish.formats import io
from caffeish.errors import CaffeishError, GraphError, MemoryCapError, ShapeError, UnknownLayerTypeError
from caffeish.graph.graph import Graph, insert_splits
from caffeish.formats.schema import TEST, TRAIN, pb
from conftest import SHARED, shared_path


def net(text):
    return text_format.Parse(text, pb.NetParameter())


def golden_cases():
    root = SHARED / "golden"
    return sorted(p.parent for p in root.glob("*/meta.json")) if root.exists() else []


@pytest.mark.parametrize("case", golden_cases(), ids=lambda p: p.name)
def test_golden_blob_shapes_equal_caffes(case):
    """Every blob shape Caffe recorded, split blobs included, for the golden inputs."""
    meta = json.loads((case / "meta.json").read_text())
    inputs = np.load(case / "inputs.npz")
    net_param, _ = io.read_prototxt(case / "net.prototxt")
    graph = Graph(net_param, phase=meta.get("phase", "TEST"),
                  input_shapes={k: inputs[k].shape for k in inputs.files})
    value_dependent = {t for n in graph.nodes if n.layer.value_dependent_shape for t in n.tops}
    expected = {k: tuple(v) for k, v in meta["blob_shapes"].items()}
    assert set(graph.blob_shapes) == set(expected)
    for blob, shape in expected.items():
        if blob in value_dependent:
            # Declared at setup as the full batch; Caffe's recorded shape is after selection.
            got = graph.blob_shapes[blob]
            assert got[1:] == shape[1:] and got[0] >= shape[0], blob
        else:
            assert graph.blob_shapes[blob] == shape, blob


def test_split_insertion_follows_caffe_names_and_in_place_producer():
    g = Graph(net("""
      layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
      layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
              convolution_param { num_output: 4 kernel_size: 1 } }
      layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
      layer { name: "a" type: "Pooling" bottom: "conv1" top: "a" pooling_param { kernel_size: 1 } }
      layer { name: "b" type: "Pooling" bottom: "conv1" top: "b" pooling_param { kernel_size: 1 } }
    """))
    names = [n.name for n in g.nodes]
    assert names == ["in", "conv1", "relu1", "conv1_relu1_0_split", "a", "b"]
    assert g.node("conv1_relu1_0_split").tops == ["conv1_relu1_0_split_0", "conv1_relu1_0_split_1"]
    assert g.node("a").bottoms == ["conv1_relu1_0_split_0"]
    assert g.node("b").bottoms == ["conv1_relu1_0_split_1"]
    assert g.node("relu1").in_place == [True]
    assert g.inputs == ["data"] and g.outputs == ["a", "b"]


def test_split_with_loss_weight():
    """A top with a loss weight and one consumer gets a split; split top 0 carries the weight."""
    n = insert_splits(net("""
      layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 2 dim: 3 } } }
      layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "l" }
      layer { name: "l2" type: "Power" bottom: "x" top: "p" loss_weight: 2 }
      layer { name: "use" type: "AbsVal" bottom: "p" top: "q" }
    """))
    split = [l for l in n.layer if l.type == "Split"]
    names = [s.name for s in split]
    assert "p_l2_0_split" in names
    s = split[names.index("p_l2_0_split")]
    assert list(s.top) == ["p_l2_0_split_0", "p_l2_0_split_1"]
    assert list(s.loss_weight) == [2.0, 0.0]
    l2 = [l for l in n.layer if l.name == "l2"][0]
    assert len(l2.loss_weight) == 0
    use = [l for l in n.layer if l.name == "use"][0]
    assert list(use.bottom) == ["p_l2_0_split_1"]


def test_in_place_only_at_the_same_index():
    with pytest.raises(GraphError, match="produced by multiple sources"):
        Graph(net("""
          layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 2 dim: 3 } } }
          layer { name: "s" type: "Eltwise" bottom: "x" bottom: "y" top: "y" }
        """))
    # A consumer before an in-place layer on the same blob: Caffe's split renames the
    # in-place bottom, and the top then re-produces the blob: an error in Caffe too.
    with pytest.raises(GraphError, match="multiple sources"):
        Graph(net("""
          layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
          layer { name: "a" type: "AbsVal" bottom: "x" top: "a" }
          layer { name: "r" type: "ReLU" bottom: "x" top: "x" }
        """))


def test_refuses_in_place_for_reshape_and_flatten():
    with pytest.raises(GraphError, match="in place"):
        Graph(net("""
          layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 } } }
          layer { name: "f" type: "Flatten" bottom: "x" top: "x" }
        """))


def test_missing_bottom_and_unknown_type_messages():
    with pytest.raises(GraphError, match=r"layer 'r' \(ReLU\): unknown bottom blob 'nope'"):
        Graph(net('layer { name: "r" type: "ReLU" bottom: "nope" top: "r" }'))
    with pytest.raises(UnknownLayerTypeError) as e:
        Graph(net("""
          layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
          layer { name: "bn1" type: "BatchNom" bottom: "x" top: "x" }
        """))
    assert "'bn1'" in str(e.value) and "'BatchNom'" in str(e.value) and "'BatchNorm'" in str(e.value)


def test_rules_phase_level_stage():
    text = """
      layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
      layer { name: "train_only" type: "AbsVal" bottom: "x" top: "t" include { phase: TRAIN } }
      layer { name: "test_only" type: "AbsVal" bottom: "x" top: "u" include { phase: TEST } }
      layer { name: "deploy" type: "AbsVal" bottom: "x" top: "d" include { stage: "deploy" } }
      layer { name: "not_deploy" type: "AbsVal" bottom: "x" top: "e" exclude { stage: "deploy" } }
      layer { name: "lvl" type: "AbsVal" bottom: "x" top: "f" include { min_level: 1 max_level: 2 } }
      layer { name: "ns" type: "AbsVal" bottom: "x" top: "g" include { not_stage: "deploy" } }
    """
    names = lambda g: [n.name for n in g.nodes if n.type == "AbsVal"]
    assert names(Graph(net(text))) == ["test_only", "not_deploy", "ns"]
    assert names(Graph(net(text), phase=TRAIN)) == ["train_only", "not_deploy", "ns"]
    assert names(Graph(net(text), phase="TEST", stages=["deploy"])) == ["test_only", "deploy"]
    assert names(Graph(net(text), level=1)) == ["test_only", "not_deploy", "lvl", "ns"]
    assert names(Graph(net(text), level=3)) == ["test_only", "not_deploy", "ns"]
    with pytest.raises(GraphError, match="both include and exclude"):
        Graph(net('layer { name: "a" type: "Input" top: "x" include { phase: TEST } exclude { phase: TRAIN } '
                  'input_param { shape { dim: 1 } } }'))


def test_train_val_net_picks_phase_layers():
    path = shared_path("models", "bvlc_caffe", "examples", "mnist", "lenet_train_test.prototxt")
    n, _ = io.read_prototxt(path)
    # The Data layers read LMDBs that are not here: the shape is given.
    g = Graph(n, phase=TEST, input_shapes={"data": (100, 1, 28, 28)})
    assert g.blob_shapes["label"] == (100,)
    assert g.blob_shapes["ip2"] == (100, 10)
    assert g.blob_shapes["accuracy"] == () and g.blob_shapes["loss"] == ()
    assert [n.name for n in g.nodes if n.type == "Data"] == ["mnist"]


def test_data_layer_without_shape_asks_for_input_shape():
    path = shared_path("models", "bvlc_caffe", "examples", "mnist", "lenet_train_test.prototxt")
    n, _ = io.read_prototxt(path)
    with pytest.raises(ShapeError, match="--input-shape"):
        Graph(n)


def test_input_shape_override_and_unknown_name():
    text = 'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }'
    assert Graph(net(text), input_shapes={"data": (2, 3, 5, 5)}).blob_shapes["data"] == (2, 3, 5, 5)
    with pytest.raises(GraphError, match="'dta'"):
        Graph(net(text), input_shapes={"dta": (2, 3, 5, 5)})


def test_memory_cap_refuses_before_allocating():
    huge = 'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 100000 dim: 3 dim: 1000 dim: 1000 } } }'
    with pytest.raises(MemoryCapError, match="layer 'in'.*data.*cap"):
        Graph(net(huge))
    small = 'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 100 dim: 100 } } }'
    Graph(net(small))
    with pytest.raises(MemoryCapError):
        Graph(net(small), max_blob_bytes=1000)


def test_memory_cap_from_the_environment(monkeypatch):
    small = 'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 100 dim: 100 } } }'
    monkeypatch.setenv("CAFFEISH_MAX_BLOB_BYTES", "100K")  # 120,000 bytes needed
    with pytest.raises(MemoryCapError, match="over the cap of 102,400 bytes"):
        Graph(net(small))
    monkeypatch.setenv("CAFFEISH_MAX_BLOB_BYTES", "1.5M")
    assert Graph(net(small)).max_blob_bytes == 1572864
    monkeypatch.setenv("CAFFEISH_MAX_BLOB_BYTES", "lots")
    with pytest.raises(CaffeishError, match="CAFFEISH_MAX_BLOB_BYTES: expected a positive size.*'lots'"):
        Graph(net(small))


def test_alexnet_fc6_parameters():
    path = shared_path("models", "bvlc_caffe", "models", "bvlc_alexnet", "deploy.prototxt")
    n, _ = io.read_prototxt(path)
    g = Graph(n)
    fc6 = g.node("fc6")
    assert fc6.param_count == 37_752_832
    assert fc6.macs == 10 * 4096 * 9216
    assert g.blob_shapes["prob"] == (10, 1000)
    # AlexNet's well-known total: 60,965,224 parameters.
    assert g.param_count == 60_965_224


def test_loss_layer_without_top_gets_an_automatic_one():
    """Caffe's AutoTopBlobs: the loss is computed into an anonymous top that is not a net output."""
    g = Graph(net("""
      layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 2 dim: 3 } } }
      layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "y" }
    """))
    assert g.node("loss").tops == ["(automatic)"] and g.node("loss").top_shapes == [()]
    assert g.outputs == [] and "(automatic)" not in g.blob_shapes


def test_a_layer_without_a_type_says_so():
    net = pb.NetParameter()
    text_format.Parse('layer { name: "a" top: "a" }', net)
    with pytest.raises(UnknownLayerTypeError, match="layer 'a' has no type"):
        Graph(net, TEST)
