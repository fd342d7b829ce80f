"""caffe.draw (get_pydot_graph, draw_net, draw_net_to_file, labels) as pycaffe's draw.py.

pydot is the optional `caffeish[draw]` extra and pictures need Graphviz's dot: the
tests that need them skip, saying so, when they are missing; the labels need
neither, and a missing pydot must be one clear error.
"""
import os
import shutil
import sys

import pytest
from google.protobuf import text_format

import caffeish
from caffeish.errors import CaffeishError
from caffeish.formats.schema import pb
from caffeish.pycaffe import draw

from conftest import shared_path

try:
    import pydot
except ImportError:
    pydot = None

needs_pydot = pytest.mark.skipif(pydot is None, reason="pydot is not installed (pip install 'caffeish[draw]')")
needs_dot = pytest.mark.skipif(
    pydot is None or shutil.which("dot") is None,
    reason="pydot is not installed (pip install 'caffeish[draw]')" if pydot is None else
    "Graphviz's dot is not on PATH (apt-get install graphviz)")

NET = """
name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" data_param { source: "db" batch_size: 64 }
        include { phase: TRAIN } }
layer { name: "input" type: "Input" top: "data" top: "label" input_param { shape { dim: 1 dim: 1 dim: 28 dim: 28 } }
        include { phase: TEST } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 20 kernel_size: 5 stride: 2 pad: 1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1" inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" exclude { phase: TEST } }
"""


def tiny():
    return text_format.Parse(NET, pb.NetParameter())


def layer(name):
    return next(l for l in tiny().layer if l.name == name)


# -- labels: no pydot needed ------------------------------------------------------------------------


def test_layer_labels_as_pycaffe():
    assert draw.get_layer_label(layer("conv1"), "LR") == r'"conv1\n(Convolution)\nkernel size: 5\nstride: 2\npad: 1"'
    assert draw.get_layer_label(layer("conv1"), "TB") == '"conv1 (Convolution) kernel size: 5 stride: 2 pad: 1"'
    assert draw.get_layer_label(layer("conv1"), "BT", display_lrm=True) == (
        '"conv1 (Convolution) kernel size: 5 stride: 2 pad: 1 lr mult: 1.0, 2.0"')
    assert draw.get_layer_label(layer("pool1"), "TB") == '"pool1 (Pooling AVE) kernel size: 3 stride: 2 pad: 0"'
    assert draw.get_layer_label(layer("relu1"), "LR") == r'"relu1\n(ReLU)"'
    assert draw.get_layer_label(layer("ip1"), "LR", display_lrm=True) == r'"ip1\n(InnerProduct)\nlr mult: 1.0, 1.0"'


def test_edge_labels_colours_and_lr_mults():
    assert draw.get_edge_label(layer("data")) == "Batch 64"
    assert draw.get_edge_label(layer("conv1")) == "20"
    assert draw.get_edge_label(layer("ip1")) == "10"
    assert draw.get_edge_label(layer("relu1")) == '""'
    assert [draw.choose_color_by_layertype(t) for t in ("Convolution", "Deconvolution", "Pooling", "InnerProduct",
                                                        "ReLU")] == ["#FF5050", "#FF5050", "#FF9900", "#CC33FF",
                                                                     "#6495ED"]
    assert draw.get_pooling_types_dict() == {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}
    assert draw.get_layer_lr_mult(layer("conv1")) == (1.0, 2.0)
    assert draw.get_layer_lr_mult(layer("ip1")) == (1.0, 1.0)
    with pytest.raises(ValueError, match="ReLU layers do not have a learning rate multiplier") as e:
        draw.get_layer_lr_mult(layer("relu1"))
    assert isinstance(e.value, CaffeishError)
    three = layer("conv1")
    three.param.add()
    with pytest.raises(ValueError, match="could not parse the learning rate multiplier"):
        draw.get_layer_lr_mult(three)


def test_missing_pydot_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydot", None)  # `import pydot` fails, as when it is not installed
    monkeypatch.setitem(sys.modules, "pydotplus", None)
    for call in (lambda: draw.get_pydot_graph(tiny(), "LR"), lambda: draw.draw_net(tiny(), "LR"),
                 lambda: draw.draw_net_to_file(tiny(), "/nonexistent/net.png")):
        with pytest.raises(ImportError) as e:
            call()
        assert isinstance(e.value, draw.DrawDependencyError) and isinstance(e.value, CaffeishError)
        message = str(e.value)
        assert "\n" not in message
        assert message.startswith("drawing a net needs pydot, which is not installed: pip install 'caffeish[draw]'")
        assert "Graphviz" in message


# -- the graph: pydot needed ----------------------------------------------------------------------------


def nodes_and_edges(graph):
    nodes = {n.get_name(): n for n in graph.get_nodes()}
    edges = [(e.get_source(), e.get_destination(), e.get("label")) for e in graph.get_edges()]
    return nodes, edges


@needs_pydot
def test_graph_nodes_edges_and_styles():
    graph = draw.get_pydot_graph(tiny(), "LR")
    assert graph.get_name() == "tiny" and graph.get("rankdir") == "LR"
    nodes, edges = nodes_and_edges(graph)
    conv = r'"conv1\n(Convolution)\nkernel size: 5\nstride: 2\npad: 1"'
    relu = r'"relu1\n(ReLU)"'
    assert nodes[conv].get("fillcolor").strip('"') == "#FF5050" and nodes[conv].get("shape") == "record"
    assert nodes[relu].get("fillcolor").strip('"') == "#90EE90"  # in place
    assert nodes["data"].get("shape") == "octagon"
    assert ("data", conv, '""') in edges and (conv, "conv1", "20") in edges
    assert (relu, "pool1", '""') in edges
    # both phases' data layers, and the loss
    assert {'"data\\n(Data)"', '"input\\n(Input)"', '"loss\\n(SoftmaxWithLoss)"'} <= set(nodes)
    unlabelled = draw.get_pydot_graph(tiny(), "LR", label_edges=False)
    assert all(label == '""' for _, _, label in nodes_and_edges(unlabelled)[1])


@needs_pydot
def test_phase_keeps_that_phases_layers():
    test_nodes = set(nodes_and_edges(draw.get_pydot_graph(tiny(), "TB", phase=caffeish.TEST))[0])
    train_nodes = set(nodes_and_edges(draw.get_pydot_graph(tiny(), "TB", phase=pb.TRAIN))[0])
    assert '"input (Input)"' in test_nodes and '"data (Data)"' not in test_nodes
    assert '"loss (SoftmaxWithLoss)"' not in test_nodes
    assert '"data (Data)"' in train_nodes and '"loss (SoftmaxWithLoss)"' in train_nodes
    both = tiny()
    both.layer[2].include.add(phase=pb.TRAIN)
    both.layer[2].exclude.add(phase=pb.TEST)
    with pytest.raises(ValueError, match="layer conv1 has both include and exclude specified"):
        draw.get_pydot_graph(both, "LR", phase=caffeish.TEST)


@needs_pydot
def test_legacy_nets_are_upgraded_and_bad_arguments_refused():
    v1 = text_format.Parse("""name: "old" layers { name: "data" type: DATA top: "data" data_param { source: "x" } }
        layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
                 convolution_param { num_output: 2 kernel_size: 3 } }""", pb.NetParameter())
    nodes, _ = nodes_and_edges(draw.get_pydot_graph(v1, "TB"))
    assert '"conv (Convolution) kernel size: 3 stride: 1 pad: 0"' in nodes
    with pytest.raises(ValueError, match="rankdir must be one of LR, RL, TB, BT, got 'XY'"):
        draw.get_pydot_graph(tiny(), "XY")
    with pytest.raises(ValueError, match="expected a caffe NetParameter .* got str"):
        draw.get_pydot_graph("net.prototxt", "LR")
    with pytest.raises(ValueError, match="phase must be caffe.TRAIN, caffe.TEST or None"):
        draw.get_pydot_graph(tiny(), "LR", phase=5)


@needs_pydot
def test_raw_is_the_dot_text_without_graphviz(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot on PATH
    raw = draw.draw_net(tiny(), "LR", ext="raw")
    assert raw.startswith(b"digraph tiny {") and b"rankdir=LR" in raw
    target = tmp_path / "net.raw"
    draw.draw_net_to_file(tiny(), str(target))
    assert target.read_bytes() == raw
    with pytest.raises(ImportError) as e:
        draw.draw_net(tiny(), "LR", ext="png")
    assert isinstance(e.value, CaffeishError)
    assert str(e.value).startswith("drawing a net as 'png' needs Graphviz's dot program, which is not on PATH: "
                                   "install Graphviz (Debian/Ubuntu: apt-get install graphviz")


# -- pictures: Graphviz needed ---------------------------------------------------------------------------


@needs_dot
def test_png_and_svg(tmp_path):
    png = draw.draw_net(tiny(), "LR")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    target = tmp_path / "net.svg"
    draw.draw_net_to_file(tiny(), str(target), rankdir="TB", phase=caffeish.TEST, display_lrm=True)
    svg = target.read_text()
    assert "<svg" in svg and "lr mult: 1.0, 2.0" in svg and "SoftmaxWithLoss" not in svg
    assert [p.name for p in tmp_path.iterdir()] == ["net.svg"]  # no temp file left


@needs_dot
def test_unknown_format_and_no_extension(tmp_path):
    with pytest.raises(ValueError) as e:
        draw.draw_net_to_file(tiny(), str(tmp_path / "net.nope"))
    assert str(e.value) == "Graphviz's dot could not write format 'nope': Format: \"nope\" not recognized"
    with pytest.raises(ValueError, match="no extension to choose the picture format from"):
        draw.draw_net_to_file(tiny(), str(tmp_path / "net"))
    assert list(tmp_path.iterdir()) == []


@needs_dot
def test_bvlc_models_and_examples_draw():
    """BVLC's test_draw.py: every net prototxt of the Caffe tree draws (raw, and a few as PNG)."""
    root = shared_path("models", "bvlc_caffe")
    paths = sorted(p for folder in ("models", "examples") for p in (root / folder).rglob("*.prototxt")
                   if "solver" not in p.name)
    assert len(paths) >= 20
    for i, path in enumerate(paths):
        net = text_format.Parse(path.read_text(), pb.NetParameter())
        raw = draw.draw_net(net, "LR", ext="raw")
        assert raw.startswith(b"digraph ")
        for l in net.layer:
            assert draw.get_layer_label(l, "LR").encode() in raw, (path, l.name)
        if i % 7 == 0:
            assert draw.draw_net(net, "LR").startswith(b"\x89PNG"), os.fspath(path)
