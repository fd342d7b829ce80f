"""The bars on real public files: every BVLC-parseable prototxt loads, deploy nets infer shapes,
every caffemodel loads and its weights bind to its net."""
import csv

import pytest

from caffeish.formats import io
from caffeish.graph import weights
from caffeish.errors import GraphError, InputShapeRequired, UnsupportedError
from caffeish.graph.graph import Graph
from caffeish.formats.schema import TEST, TRAIN
from conftest import SHARED

MODELS = SHARED / "models"


def parse_check():
    path = MODELS / "PARSE_CHECK.tsv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f, delimiter="\t")]


def net_rows(ok=True):
    return [r["local_path"] for r in parse_check()
            if r["message"] == "caffe.NetParameter" and (r["protoc_text_parse_with_BVLC_caffe.proto"] == "ok") == ok]


def solver_rows():
    return [r["local_path"] for r in parse_check()
            if r["message"] == "caffe.SolverParameter" and r["protoc_text_parse_with_BVLC_caffe.proto"] == "ok"]


def is_deploy(net, path):
    return "deploy" in path or any(l.type in ("Input", "MemoryData") for l in net.layer)


@pytest.mark.parametrize("rel", net_rows(), ids=str)
def test_bvlc_parseable_net_loads_and_deploy_nets_infer_shapes(rel):
    net, _ = io.read_prototxt(MODELS / rel)
    assert len(net.layer) and not len(net.layers)
    if is_deploy(net, rel):
        graph = Graph(net)
        assert graph.outputs and all(graph.blob_shapes[b] for b in graph.sources)
    else:
        # Train/val nets: shapes need their data files, which are not here. Either the
        # shapes infer, or the error says exactly what is missing; never anything else.
        for phase in (TRAIN, TEST):
            try:
                Graph(net, phase=phase)
            except InputShapeRequired as e:
                assert "--input-shape" in str(e)
            except UnsupportedError as e:
                assert "Python" in str(e)
            except GraphError as e:
                # e.g. DIGITS standard networks: DIGITS adds the data layers itself.
                assert "unknown bottom blob" in str(e)


@pytest.mark.parametrize("rel", solver_rows(), ids=str)
def test_solver_prototxts_parse(rel):
    from caffeish.formats.schema import pb
    from caffeish.formats.upgrade import upgrade_solver
    solver, _ = io.read_prototxt(MODELS / rel, message=pb.SolverParameter())
    solver, _ = upgrade_solver(solver)
    assert solver.type


# caffemodel -> the deploy prototxt it was trained for (same folder unless noted).
PAIRS = {
    "lenet_caffe_tensorflow/examples/mnist/lenet_iter_10000.caffemodel": "lenet.prototxt",
    "cifar10_quick_ikki/examples/cifar10/cifar10_quick_iter_5000.caffemodel":
        "../prediction_example/prediction_example.prototxt",
    "mtcnn/model/det1.caffemodel": "det1.prototxt",
    # In cholihao/mtcnn the prototxt names are swapped: det2.prototxt is "oNet" and
    # det3.prototxt "rNet", while det2.caffemodel holds rNet (its embedded net's name).
    "mtcnn/model/det2.caffemodel": "det3.prototxt",
    "mtcnn/model/det3.caffemodel": "det2.prototxt",
    "mtcnn/model/det4.caffemodel": "det4.prototxt",
    "caffe_onnx_htshinichi/caffemodel/test/test.caffemodel": "test.prototxt",
    "everpeace_caffe/examples/cifar10/cifar10_full_iter_70000.caffemodel": "cifar10_full.prototxt",
    "everpeace_caffe/examples/cifar10/cifar10_quick_iter_5000.caffemodel": "cifar10_quick.prototxt",
    "everpeace_caffe/examples/mnist/lenet_iter_10000.caffemodel": "lenet.prototxt",
}


def caffemodels():
    return sorted(str(p.relative_to(MODELS)) for p in MODELS.rglob("*.caffemodel")) if MODELS.exists() else []


@pytest.mark.parametrize("rel", caffemodels(), ids=str)
def test_caffemodel_loads_and_binds_to_its_net(rel):
    assert rel in PAIRS, f"new caffemodel {rel}: add its deploy prototxt to PAIRS"
    model = io.read_caffemodel(MODELS / rel)
    proto = (MODELS / rel).parent / PAIRS[rel]
    net, _ = io.read_prototxt(proto)
    graph = Graph(net)
    binding = weights.bind(graph, model, source=rel)
    with_params = [n.name for n in graph.nodes if n.param_shapes]
    assert with_params and binding.missing == []
    assert sorted(binding.arrays) == sorted(with_params)
    for name, arrays in binding.arrays.items():
        assert [a.shape for a in arrays] == graph.node(name).param_shapes


def test_swapped_mtcnn_files_are_caught_with_both_shapes():
    """Binding a caffemodel to the wrong net names the layer and both shapes."""
    model_path = MODELS / "mtcnn" / "model" / "det2.caffemodel"
    if not model_path.exists():
        pytest.skip(f"shared test data not found: {model_path}")
    net, _ = io.read_prototxt(MODELS / "mtcnn" / "model" / "det2.prototxt")
    model = io.read_caffemodel(model_path)
    assert model.net.name == "rNet" and net.name == "oNet"
    from caffeish.errors import WeightError
    with pytest.raises(WeightError, match=r"layer 'conv1'.*\(28, 3, 3, 3\).*\(32, 3, 3, 3\)"):
        weights.bind(Graph(net), model)


@pytest.mark.parametrize("rel", net_rows(ok=False), ids=str)
def test_fork_only_nets_name_their_field(rel):
    from caffeish.errors import ForkFieldError
    with pytest.raises(ForkFieldError, match="not a field of BVLC Caffe"):
        io.read_prototxt(MODELS / rel)


def test_missing_producer_filtered_out_by_state_is_explained():
    path = MODELS / "bvlc_caffe" / "examples" / "mnist" / "mnist_autoencoder.prototxt"
    if not path.exists():
        pytest.skip(f"shared test data not found: {path}")
    net, _ = io.read_prototxt(path)
    with pytest.raises(GraphError, match="--stage|--phase"):
        Graph(net, phase=TEST)
    g = Graph(net, phase=TEST, stages=["test-on-test"], input_shapes={"data": (100, 1, 28, 28)})
    assert g.blob_shapes["decode1neuron"] == (100, 784)
