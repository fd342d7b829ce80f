"""NetSpec (`caffe.NetSpec`, `caffe.layers`, `caffe.params`, `caffe.to_proto`) as pycaffe's net_spec.py.

The bar: fcn.berkeleyvision.org's net.py for every FCN model in ../shared/models/fcn,
run with `caffe` resolving to caffeish, writes prototxts equal to the ones committed
beside it (parsed NetParameters; the Python layers' param_str compared as the dicts
they spell, since Python 2 wrote those dicts in hash order).
"""
import ast

import pytest
from google.protobuf import text_format

import caffeish
from caffeish.errors import CaffeishError
from caffeish.formats.schema import pb
from caffeish.graph.graph import Graph
from caffeish.pycaffe import net_spec
from caffeish.pycaffe.net_spec import NetSpec, Top, layers as L, params as P, to_proto

from conftest import shared_path
from test_fcn_scripts import py2to3, run_wrapped


def parse(text):
    return text_format.Parse(text, pb.NetParameter())


def lenet(batch_size):
    n = NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[batch_size, 1, 28, 28]), dict(dim=[batch_size, 1, 1, 1])],
                                  transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool1, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n.to_proto()


LENET = """
layer { name: "data" type: "DummyData" top: "data" top: "label"
  transform_param { scale: 0.00392156886 }
  dummy_data_param { shape { dim: 4 dim: 1 dim: 28 dim: 28 } shape { dim: 4 dim: 1 dim: 1 dim: 1 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def test_lenet_is_the_prototxt_pycaffe_writes():
    net = lenet(4)
    assert net == parse(LENET)
    # in place: the ReLU's top is its bottom
    assert net.layer[4].bottom == net.layer[4].top == ["ip1"]
    shapes = {n.name: n.top_shapes for n in Graph(net).nodes}
    assert shapes["ip2"] == [(4, 10)] and shapes["pool1"] == [(4, 20, 12, 12)]


def test_anonymous_tops_get_automatic_names():
    data, label = L.DummyData(shape=[dict(dim=[2, 1, 8, 8]), dict(dim=[2, 1, 1, 1])], ntop=2)
    conv = L.Convolution(data, kernel_size=3, num_output=4)
    relu = L.ReLU(conv, in_place=True)
    loss = L.SoftmaxWithLoss(L.InnerProduct(relu, num_output=3), label)
    net = loss.to_proto()
    assert [(l.name, l.type, list(l.bottom), list(l.top)) for l in net.layer] == [
        ("DummyData1", "DummyData", [], ["DummyData1", "DummyData2"]),
        ("Convolution1", "Convolution", ["DummyData1"], ["Convolution1"]),
        ("ReLU1", "ReLU", ["Convolution1"], ["Convolution1"]),
        ("InnerProduct1", "InnerProduct", ["Convolution1"], ["InnerProduct1"]),
        ("SoftmaxWithLoss1", "SoftmaxWithLoss", ["InnerProduct1", "DummyData2"], ["SoftmaxWithLoss1"]),
    ]
    assert to_proto(loss) == net
    # to_proto of several tops: every layer once, in first-needed order
    assert [l.name for l in to_proto(conv, loss).layer] == [l.name for l in net.layer]


def test_zero_and_multiple_tops():
    n = NetSpec()
    n.data, n.data2 = L.DummyData(shape=dict(dim=3), ntop=2)
    n.silence_data = L.Silence(n.data, ntop=0)
    silent = L.Silence(n.data2, ntop=0)
    assert isinstance(silent, net_spec.Function)
    n.silence_data2 = silent
    net = n.to_proto()
    assert net == parse("""
        layer { name: "data" type: "DummyData" top: "data" top: "data2" dummy_data_param { shape { dim: 3 } } }
        layer { name: "silence_data" type: "Silence" bottom: "data" }
        layer { name: "silence_data2" type: "Silence" bottom: "data2" }""")
    # an unnamed top-less layer is named after its type
    assert [l.name for l in to_proto(L.Silence(n.data, ntop=0)).layer] == ["DummyData1", "Silence1"]


def test_keywords_go_where_pycaffe_puts_them():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 10, 10]))
    n.conv = L.Convolution(n.data, num_output=8, kernel_size=[3, 5], pad=1, bias_term=False, loss_weight=0.5,
                           param=[dict(lr_mult=1, decay_mult=1)], include=dict(phase=caffeish.TRAIN),
                           weight_filler=pb.FillerParameter(type="msra"))
    n.up = L.Deconvolution(n.conv, convolution_param=dict(num_output=8, kernel_size=4, stride=2, bias_term=False,
                                                           weight_filler=dict(type="bilinear")),
                           param=[dict(lr_mult=0)])
    n.sum = L.Eltwise(n.up, n.up, operation=P.Eltwise.SUM, coeff=[0.5, 0.5])
    n.py = L.Python(n.sum, module="my_layers", layer="Thing", param_str=str(dict(a=1)))
    n.data_layer = L.Data(source="db", batch_size=2, backend=P.Data.LMDB, ntop=1)
    net = n.to_proto()
    assert net == parse("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 10 dim: 10 } } }
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" loss_weight: 0.5
          param { lr_mult: 1 decay_mult: 1 } include { phase: TRAIN }
          convolution_param { num_output: 8 bias_term: false pad: 1 kernel_size: 3 kernel_size: 5
                              weight_filler { type: "msra" } } }
        layer { name: "up" type: "Deconvolution" bottom: "conv" top: "up" param { lr_mult: 0 }
          convolution_param { num_output: 8 bias_term: false kernel_size: 4 stride: 2
                              weight_filler { type: "bilinear" } } }
        layer { name: "sum" type: "Eltwise" bottom: "up" bottom: "up" top: "sum"
          eltwise_param { operation: SUM coeff: 0.5 coeff: 0.5 } }
        layer { name: "py" type: "Python" bottom: "sum" top: "py"
          python_param { module: "my_layers" layer: "Thing" param_str: "{'a': 1}" } }
        layer { name: "data_layer" type: "Data" top: "data_layer"
          data_param { source: "db" batch_size: 2 backend: LMDB } }""")


def test_params_are_the_schema_constants():
    assert P.Pooling.MAX == pb.PoolingParameter.MAX
    assert P.Pooling.AVE == pb.PoolingParameter.AVE
    assert P.Eltwise.PROD == pb.EltwiseParameter.PROD
    assert P.Pooling.PoolMethod.Name(1) == "AVE"
    assert net_spec.param_name_dict()["Convolution"] == "convolution"
    assert net_spec.param_name_dict()["Python"] == "python"
    assert "Deconvolution" not in net_spec.param_name_dict()


def test_the_public_face_gives_these_objects():
    assert caffeish.NetSpec is NetSpec
    assert caffeish.layers is net_spec.layers and caffeish.params is net_spec.params
    assert caffeish.to_proto is to_proto


def test_netspec_mapping_methods():
    n = NetSpec()
    n["data"] = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    n.relu = L.ReLU(n["data"])
    assert n.keys() == ["data", "relu"] and n.vals() == [n.data, n.relu]
    n.update("relu", dict(negative_slope=0.1))
    assert n.to_proto().layer[1].relu_param.negative_slope == pytest.approx(0.1)
    del n["relu"]
    assert [l.name for l in n.to_proto().layer] == ["data"]


def test_assign_proto_as_pycaffe():
    layer = pb.LayerParameter()
    net_spec.assign_proto(layer, "bottom", "x")  # a single value fills a repeated field
    net_spec.assign_proto(layer, "param", [dict(lr_mult=2), dict(lr_mult=0)])
    net_spec.assign_proto(layer, "convolution_param", dict(kernel_size=3, weight_filler=dict(std=0.01)))
    assert layer == text_format.Parse("""bottom: "x" param { lr_mult: 2 } param { lr_mult: 0 }
        convolution_param { kernel_size: 3 weight_filler { std: 0.01 } }""", pb.LayerParameter())


# -- mistakes: one clear line, and the exception type pycaffe raises ------------------------------------


def test_a_layer_input_that_is_not_a_top_is_pycaffes_type_error():
    data = L.DummyData(ntop=2)
    with pytest.raises(TypeError, match=r"^Silence input 0 is not a Top \(type is <class 'tuple'>\)$") as e:
        L.Silence(data, ntop=0)
    assert isinstance(e.value, CaffeishError)
    L.Silence(*data, ntop=0)


@pytest.mark.parametrize("make, exc, message", [
    (lambda d: L.Convolution(d, kernel_sz=3), AttributeError,
     "layer 'Convolution1' (Convolution): neither ConvolutionParameter nor LayerParameter has a field "
     "'kernel_sz'; did you mean 'kernel_size'?"),
    (lambda d: L.ReLU(d, slope=0.1), AttributeError,
     "layer 'ReLU1' (ReLU): neither ReLUParameter nor LayerParameter has a field 'slope'"),
    (lambda d: L.Deconvolution(d, kernel_size=4), AttributeError,
     "layer 'Deconvolution1' (Deconvolution): LayerParameter has no field 'kernel_size'; it is a field of "
     "convolution_param=dict(kernel_size=...)"),
    (lambda d: L.Convolution(d, weight_filler=dict(tpye="xavier")), AttributeError,
     "convolution_param.weight_filler: FillerParameter has no field 'tpye'"),
    (lambda d: L.Convolution(d, param=[dict(lr_mul=1)]), AttributeError,
     "param[0]: ParamSpec has no field 'lr_mul'; did you mean 'lr_mult'?"),
    (lambda d: L.Convolution(d, kernel_size="3"), TypeError, "convolution_param.kernel_size[0]: cannot take '3'"),
    (lambda d: L.Convolution(d, num_output=-1), ValueError, "convolution_param.num_output: cannot take -1"),
    (lambda d: L.Convolution(d, weight_filler="xavier"), TypeError,
     "convolution_param.weight_filler: is a FillerParameter message; give a dict of its fields"),
    (lambda d: L.Convolution(d, bias_term=[True]), TypeError,
     "convolution_param.bias_term: is a bool field that takes one value, not a list"),
    (lambda d: L.Pooling(d, pool=7), ValueError, "pooling_param.pool: cannot take 7"),
    (lambda d: L.BN(d, bn_param=dict()), AttributeError, "LayerParameter has no field 'bn_param' (it comes from the "
                                                          "SegNet/ENet/PSPNet Caffe forks"),
])
def test_bad_fields_and_values_name_the_layer_and_the_field(make, exc, message):
    data = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    top = make(data)
    with pytest.raises(exc) as e:
        top.to_proto()
    assert isinstance(e.value, CaffeishError)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_netspec_misuse_is_a_clear_error():
    n = NetSpec()
    with pytest.raises(KeyError) as e:
        n.missing
    assert str(e.value) == "NetSpec has no top named 'missing'" and isinstance(e.value, CaffeishError)
    assert not hasattr(n, "missing") and not hasattr(n, "__deepcopy__")
    n.data = L.DummyData(ntop=2)
    with pytest.raises(TypeError, match=r"NetSpec 'data' holds a tuple of 2 tops .*n.a, n.b = L.DummyData"):
        n.to_proto()
    n.data = 3
    with pytest.raises(TypeError, match="NetSpec 'data' is a int, not a top"):
        n.to_proto()
    with pytest.raises(ValueError, match="ntop must be a whole number"):
        L.DummyData(ntop=-1)
    with pytest.raises(AttributeError, match=r"caffe.params.Pooling.MEAN: PoolingParameter has no constant 'MEAN' "
                                             r"\(its constants: MAX, AVE, STOCHASTIC"):
        P.Pooling.MEAN
    with pytest.raises(AttributeError, match="the Caffe schema has no NopeParameter message"):
        P.Nope.X


def test_tops_are_tops():
    top = L.Input(shape=dict(dim=[1]))
    assert isinstance(top, Top) and top.n == 0 and top.fn.type_name == "Input"


# -- fcn.berkeleyvision.org: every net.py writes the committed prototxts --------------------------------

FCN_MODELS = [
    "voc-fcn32s", "voc-fcn16s", "voc-fcn8s", "voc-fcn8s-atonce", "voc-fcn-alexnet",
    "pascalcontext-fcn32s", "pascalcontext-fcn16s", "pascalcontext-fcn8s",
    "nyud-fcn32s-color", "nyud-fcn32s-hha", "nyud-fcn32s-color-d", "nyud-fcn32s-color-hha",
    "siftflow-fcn32s", "siftflow-fcn16s", "siftflow-fcn8s",
]


def run_fcn_net(model, folder):
    """Run the model's net.py (Python 3 spelling, py2to3) in `folder` through `python -m caffeish.pycaffe.compat`.

    Returns {file name: NetParameter} of the prototxts it wrote.
    """
    converted = py2to3(shared_path("models", "fcn", model, "net.py").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "net.py").write_text(converted)
    run_wrapped(folder, "net.py")
    return {p.name: parse(p.read_text()) for p in sorted(folder.glob("*.prototxt"))}


def committed_nets(model):
    """The prototxts net.py writes, as committed beside it (not the solver, nor voc-fcn8s' hand-written deploy)."""
    folder = shared_path("models", "fcn", model)
    return {p.name: parse(p.read_text()) for p in sorted(folder.glob("*.prototxt"))
            if p.name not in ("solver.prototxt", "deploy.prototxt")}


def param_str_as_dict(net):
    """A copy with each Python layer's param_str rewritten as its dict, keys sorted."""
    out = pb.NetParameter()
    out.CopyFrom(net)
    for layer in out.layer:
        if layer.python_param.param_str:
            value = ast.literal_eval(layer.python_param.param_str)
            layer.python_param.param_str = repr(sorted(value.items()))
    return out


def test_every_fcn_model_is_covered():
    folder = shared_path("models", "fcn")
    assert sorted(p.parent.name for p in folder.glob("*/net.py")) == sorted(FCN_MODELS)


@pytest.mark.parametrize("model", FCN_MODELS)
def test_fcn_net_py_writes_the_committed_prototxts(model, tmp_path):
    written = run_fcn_net(model, tmp_path / model)
    committed = committed_nets(model)
    assert sorted(written) == sorted(committed) and len(written) == 2
    for name, net in written.items():
        ref = committed[name]
        assert param_str_as_dict(net) == param_str_as_dict(ref), f"{model}/{name} differs"
        # Apart from param_str's dict order, the nets are equal field for field.
        for mine, theirs in zip(net.layer, ref.layer):
            if mine != theirs:
                assert mine.type == "Python"
                mine.python_param.ClearField("param_str")
                theirs.python_param.ClearField("param_str")
                assert mine == theirs
        crops = [l for l in net.layer if l.type == "Crop"]
        assert crops and all(l.crop_param.axis == 2 for l in crops)
