"""Python layers run as pycaffe runs them: fcn.berkeleyvision.org's voc-fcn8s val net as written,
Python layers with bottoms (checked against built-in layers and numpy), and the refusals.

Test modules are written into tmp_path and put on sys.path; the `user_modules` fixture
removes them (and any `caffe` alias) from sys.modules afterwards.
"""
import importlib
import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path

import caffeish
from caffeish.tools.cli import main as cli
from caffeish.errors import CaffeishError, ShapeError, UnsupportedError
from caffeish.ops.python_layer import PythonLayerError

FLT_MIN = np.finfo(np.float32).tiny
VOC_MEAN = (104.00699, 116.66877, 122.67892)  # the mean in voc-fcn8s/val.prototxt's param_str


# -- fcn.berkeleyvision.org's voc-fcn8s val.prototxt ------------------------------------------------

# A data layer in the style of fcn.berkeleyvision.org's voc_layers.VOCSegDataLayer (what its
# val.prototxt names): one image and its label per forward pass, each in its own size.
VOC_LAYERS = """
    import caffe

    import numpy as np
    from PIL import Image


    class VOCSegDataLayer(caffe.Layer):
        calls = []

        def setup(self, bottom, top):
            params = eval(self.param_str)
            self.voc_dir = params["voc_dir"]
            self.split = params["split"]
            self.mean = np.array(params["mean"])
            self.seen = (self.param_str, self.phase)
            if len(top) != 2:
                raise Exception("Need to define two tops: data and label.")
            if len(bottom) != 0:
                raise Exception("Do not define a bottom.")
            with open("{}/ImageSets/Segmentation/{}.txt".format(self.voc_dir, self.split)) as f:
                self.indices = f.read().splitlines()
            self.idx = 0
            self.calls.append("setup")

        def reshape(self, bottom, top):
            self.data = self.load_image(self.indices[self.idx])
            self.label = self.load_label(self.indices[self.idx])
            top[0].reshape(1, *self.data.shape)
            top[1].reshape(1, *self.label.shape)
            self.calls.append("reshape")

        def forward(self, bottom, top):
            top[0].data[...] = self.data
            top[1].data[...] = self.label
            self.idx = (self.idx + 1) % len(self.indices)
            self.calls.append("forward")

        def backward(self, top, propagate_down, bottom):
            pass

        def load_image(self, name):
            im = Image.open("{}/JPEGImages/{}.jpg".format(self.voc_dir, name))
            in_ = np.array(im, dtype=np.float32)[:, :, ::-1]
            in_ -= self.mean
            return in_.transpose((2, 0, 1))

        def load_label(self, name):
            im = Image.open("{}/SegmentationClass/{}.png".format(self.voc_dir, name))
            return np.array(im, dtype=np.uint8)[np.newaxis, ...]
"""

VOC_IMAGES = (("2011_000001", 40, 56), ("2011_000002", 48, 36))  # name, height, width


def make_voc(root):
    """A tiny VOC2011-style folder: JPEGImages, SegmentationClass (palette PNGs), the seg11valid split."""
    rng = np.random.default_rng(7)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for name, h, w in VOC_IMAGES:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        label = rng.integers(0, 21, (h, w)).astype(np.uint8)
        label[:3] = 255  # VOC's 'void' border, ignored by the loss
        label[-1, :5] = 0
        png = Image.fromarray(label, "P")
        png.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        png.save(root / "SegmentationClass" / f"{name}.png")
    split = root / "ImageSets" / "Segmentation" / "seg11valid.txt"
    split.write_text("".join(f"{name}\n" for name, _, _ in VOC_IMAGES))


def expected_pair(root, name):
    """The data/label tops fcn's layer gives for `name`, computed here with PIL and numpy."""
    image = np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg"), dtype=np.float64)
    data = (image[:, :, ::-1] - np.array(VOC_MEAN)).transpose(2, 0, 1)[np.newaxis]
    label = np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png"))[np.newaxis, np.newaxis]
    return data, label


def softmax_loss(score, label, ignore=255):
    """Caffe's SoftmaxWithLoss with normalize: false (sum over kept pixels / N), in float64."""
    s = score.astype(np.float64)
    s -= s.max(axis=1, keepdims=True)
    prob = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)
    lab = label[:, 0].astype(np.int64)
    keep = lab != ignore
    n, h, w = np.nonzero(keep)
    picked = prob[n, lab[keep], h, w]
    return -np.log(np.maximum(picked, FLT_MIN)).sum() / score.shape[0]


def randomize(net, rng):
    """Random weights (He-scaled, so that VGG's activations stay O(1)); the prototxt has no fillers."""
    for name, params in net.params.items():
        w = params[0].data
        std = np.float32(np.sqrt(2.0 / w[0].size))
        if name == "fc6":  # 4096x512x7x7: only the centre tap, to keep the test fast
            w[...] = 0
            w[:, :, 3, 3] = rng.standard_normal(w.shape[:2], dtype=np.float32) * np.float32(np.sqrt(2.0 / 512))
        else:
            w[...] = rng.standard_normal(w.shape, dtype=np.float32) * std
        if name == "upscore8":
            w *= np.float32(0.05)  # scores of a few units: no probability underflows
        if len(params) > 1:
            params[1].data[...] = rng.standard_normal(params[1].data.shape, dtype=np.float32) * np.float32(0.1)


@pytest.fixture
def voc(tmp_path, user_modules, monkeypatch):
    """fcn's val.prototxt, with voc_layers importable and its relative voc_dir
    ('../data/pascal/VOC2011') present beside the working directory."""
    val = shared_path("models", "fcn", "voc-fcn8s", "val.prototxt")
    user_modules("voc_layers", VOC_LAYERS)
    root = tmp_path / "data" / "pascal" / "VOC2011"
    make_voc(root)
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    return str(val), root


def test_fcn8s_val_net_runs_its_voc_data_layer_as_written(voc):
    val, root = voc
    net = caffeish.Net(val, phase=caffeish.TEST, seed=0)
    layer = net.nodes[0].layer.instance
    assert net.inputs == [] and type(layer).__name__ == "VOCSegDataLayer"
    assert layer.seen == (net.nodes[0].param.python_param.param_str, caffeish.TEST)
    assert layer.calls == ["setup", "reshape"]  # Caffe's Layer::SetUp when the net is built
    h0, w0 = VOC_IMAGES[0][1:]
    assert net.blobs["score"].shape == (1, 21, h0, w0)  # shape inference read the first image
    randomize(net, np.random.default_rng(0))
    for k, (name, h, w) in enumerate(VOC_IMAGES + VOC_IMAGES[:1]):  # the split wraps around
        out = net.forward(blobs=["data", "label", "score"])
        data, label = expected_pair(root, name)
        np.testing.assert_allclose(out["data"], data, atol=1e-4)
        np.testing.assert_array_equal(out["label"], label)
        assert out["score"].shape == (1, 21, h, w) and out["score"].dtype == np.float32
        expected = softmax_loss(out["score"], out["label"])
        assert abs(float(out["loss"]) - expected) <= 1e-4 * expected
        kept = int((label != 255).sum())
        assert abs(expected - kept * np.log(21)) > 0.05 * expected  # the weights mattered
    assert layer.calls == ["setup", "reshape"] + ["reshape", "forward"] * 3


def test_evaluate_segmentation_reads_the_python_data_layer(voc, tmp_path, capsys):
    val, root = voc
    confusion = tmp_path / "confusion.csv"
    assert cli(["evaluate", "segmentation", val, "none", "--iterations", "2", "--format", "json",
                "--confusion", str(confusion)]) == 0
    result = json.loads(capsys.readouterr().out)
    # No weights: every score is 0, so every pixel is predicted class 0 (argmax of a tie).
    counts = np.zeros(21, np.int64)
    for name, _, _ in VOC_IMAGES:
        label = expected_pair(root, name)[1].ravel()
        counts += np.bincount(label[label != 255], minlength=21)
    assert result["images"] == 2 and result["label"] == "label"
    assert [c["pixels"] for c in result["classes"]] == counts.tolist()
    assert result["pixel_accuracy"] == pytest.approx(counts[0] / counts.sum())
    rows = confusion.read_text().splitlines()[1:]
    assert [int(r.split(",")[1]) for r in rows] == counts.tolist()


# -- Python layers with bottoms -----------------------------------------------------------------------

OPS = """
    import caffe
    import numpy as np


    class ScaleShift(caffe.Layer):
        \"\"\"top0 = scale * x + shift; top1 = the sum over channels (N, 1, H, W).\"\"\"

        def setup(self, bottom, top):
            params = eval(self.param_str)
            self.scale, self.shift = params["scale"], params["shift"]

        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)
            top[1].reshape(bottom[0].num, 1, bottom[0].height, bottom[0].width)

        def forward(self, bottom, top):
            top[0].data[...] = self.scale * bottom[0].data + self.shift
            top[1].data[...] = bottom[0].data.sum(axis=1, keepdims=True)


    class TripleInPlace(caffe.Layer):
        \"\"\"In place: Caffe hands the same blob as bottom 0 and top 0.\"\"\"

        def reshape(self, bottom, top):
            assert bottom[0] is top[0]

        def forward(self, bottom, top):
            bottom[0].data[...] *= 3


    class EuclideanLoss(caffe.Layer):
        \"\"\"The loss of Caffe's examples/pycaffe/layers/pyloss.py: sum((a - b)^2) / N / 2.\"\"\"

        def setup(self, bottom, top):
            if len(bottom) != 2:
                raise Exception("Need two inputs to compute distance.")

        def reshape(self, bottom, top):
            if bottom[0].count != bottom[1].count:
                raise Exception("Inputs must have the same dimension.")
            self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)
            top[0].reshape(1)

        def forward(self, bottom, top):
            self.diff[...] = bottom[0].data - bottom[1].data
            top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.0
"""

OPS_NET = """
layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 }
        shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }
layer { name: "ss" type: "Python" bottom: "x" top: "a" top: "s"
        python_param { module: "user_ops" layer: "ScaleShift" param_str: "{'scale': 2.0, 'shift': -1.0}" } }
layer { name: "relu" type: "ReLU" bottom: "a" top: "r" }
layer { name: "triple" type: "Python" bottom: "r" top: "r" python_param { module: "user_ops" layer: "TripleInPlace" } }
layer { name: "pyloss" type: "Python" bottom: "r" bottom: "y" top: "pyloss" loss_weight: 1
        python_param { module: "user_ops" layer: "EuclideanLoss" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "r" bottom: "y" top: "loss" }
"""


# "harness": the GPU backend's code path (bottoms copied to the host, tops back) with numpy arrays.
@pytest.mark.parametrize("backend", ["numpy", "harness"])
def test_python_layers_with_bottoms_match_numpy_and_builtin_layers(tmp_path, user_modules, backend):
    user_modules("user_ops", OPS)
    path = tmp_path / "ops.prototxt"
    path.write_text(OPS_NET)
    net = caffeish.Net(str(path), phase=caffeish.TEST, backend=backend)
    assert (net.xp is np) == (backend == "numpy")
    assert net.blobs["s"].shape == (2, 1, 4, 5) and net.blobs["pyloss"].shape == (1,)
    rng = np.random.default_rng(3)
    for shape in ((2, 3, 4, 5), (1, 3, 6, 2)):  # a new input shape reshapes the Python layers too
        x = rng.standard_normal(shape).astype(np.float32)
        y = rng.standard_normal(shape).astype(np.float32)
        x_before = x.copy()
        out = net.forward(x=x, y=y, blobs=["s", "r"])
        r = 3 * np.maximum(2 * x.astype(np.float64) - 1, 0)
        np.testing.assert_allclose(out["r"], r, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out["s"], x.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-5)
        expected = ((r - y) ** 2).sum() / shape[0] / 2
        assert out["pyloss"].shape == (1,)
        assert float(out["pyloss"][0]) == pytest.approx(expected, rel=1e-5)
        assert float(out["pyloss"][0]) == pytest.approx(float(out["loss"]), rel=1e-6)
        np.testing.assert_array_equal(x, x_before)  # the caller's input is untouched
    first = net.forward(x=x, y=y)["pyloss"]
    again = first.copy()
    net.forward(x=x + 1, y=y)
    np.testing.assert_array_equal(first, again)  # an output returned earlier does not change later


# -- refusals and errors ------------------------------------------------------------------------------

DATA_LAYER = 'layer {{ name: "data" type: "Python" top: "data" top: "label" python_param {{ {} }} }}'


def build(tmp_path, python_param, rest="", **kw):
    path = tmp_path / "net.prototxt"
    path.write_text(DATA_LAYER.format(python_param) + rest)
    return caffeish.Net(str(path), phase=caffeish.TEST, **kw)


def test_missing_module_names_the_layer_the_module_and_pythonpath(tmp_path):
    with pytest.raises(UnsupportedError) as err:
        build(tmp_path, 'module: "no_such_voc_layers" layer: "VOCSegDataLayer"')
    msg = str(err.value)
    for words in ("layer 'data'", "module 'no_such_voc_layers'", "No module named 'no_such_voc_layers'",
                  "PYTHONPATH", "--input-shape data=", "--input-shape label="):
        assert words in msg


def test_a_module_that_fails_to_import_names_what_it_imports(tmp_path, user_modules):
    user_modules("needs_scipy_like", "import no_such_dependency_xyz\n")
    with pytest.raises(UnsupportedError, match="'needs_scipy_like'.*No module named 'no_such_dependency_xyz'"
                                               ".*install what needs_scipy_like imports"):
        build(tmp_path, 'module: "needs_scipy_like" layer: "L"')


def test_only_layer_subclasses_are_instantiated(tmp_path, user_modules):
    with pytest.raises(UnsupportedError, match="'subprocess.Popen' is not a Python layer class"):
        build(tmp_path, 'module: "subprocess" layer: "Popen"')
    user_modules("not_layers", """
        built = []

        class Plain:
            def __init__(self, *args):
                built.append(args)

        def make(*args):
            built.append(args)
    """)
    for name in ("Plain", "make"):
        with pytest.raises(UnsupportedError, match=f"'not_layers.{name}' is not a Python layer class"):
            build(tmp_path, f'module: "not_layers" layer: "{name}"')
    assert sys.modules["not_layers"].built == []


def test_a_layer_of_an_already_imported_caffe_is_refused_with_the_reason(tmp_path, user_modules, monkeypatch):
    real = types.ModuleType("caffe")
    real.Layer = type("Layer", (), {"__module__": "caffe"})
    monkeypatch.setitem(sys.modules, "caffe", real)  # `import caffe` ran before caffeish loaded the module
    user_modules("real_caffe_layers", """
        import caffe

        class Data(caffe.Layer):
            pass
    """)
    with pytest.raises(UnsupportedError, match="subclasses caffe.Layer: another Caffe's.*import caffeish as caffe"):
        build(tmp_path, 'module: "real_caffe_layers" layer: "Data"')
    assert sys.modules["caffe"] is real


def test_missing_class_lists_the_modules_layers(tmp_path, user_modules):
    user_modules("some_layers", """
        import caffe

        class DataA(caffe.Layer):
            pass
    """)
    with pytest.raises(UnsupportedError, match="module 'some_layers' .* has no 'DataB'; its Python layer classes: DataA"):
        build(tmp_path, 'module: "some_layers" layer: "DataB"')


BROKEN_LAYERS = """
    import caffe

    class Raises(caffe.Layer):
        def setup(self, bottom, top):
            open("/no/such/dir/seg11valid.txt")

    class RaisesInForward(caffe.Layer):
        error = RuntimeError("forward failed")

        def reshape(self, bottom, top):
            top[0].reshape(1)
            top[1].reshape(1)

        def forward(self, bottom, top):
            raise self.error
"""


def test_errors_in_user_code_reach_the_caller_unchanged(tmp_path, user_modules):
    """As in pycaffe: the user's exception itself (same type, same object), with a note naming the layer."""
    user_modules("broken_layers", BROKEN_LAYERS)
    with pytest.raises(FileNotFoundError) as err:
        build(tmp_path, 'module: "broken_layers" layer: "Raises"')
    assert type(err.value) is FileNotFoundError and "seg11valid" in str(err.value)
    if sys.version_info >= (3, 11):  # add_note: the note names the layer, the method and the line
        assert any("layer 'data'" in note and "setup()" in note and "broken_layers.py:6" in note
                   for note in err.value.__notes__)
    net = build(tmp_path, 'module: "broken_layers" layer: "RaisesInForward"')
    with pytest.raises(RuntimeError) as err:
        net.forward()
    assert err.value is sys.modules["broken_layers"].RaisesInForward.error


def test_errors_in_user_code_become_one_line_for_the_cli(tmp_path, user_modules, capsys):
    from caffeish.ops.python_layer import user_errors_as_caffeish

    user_modules("broken_layers", BROKEN_LAYERS)
    with user_errors_as_caffeish():
        with pytest.raises(PythonLayerError, match=r"layer 'data'.*setup\(\) raised FileNotFoundError.*"
                                                   r"seg11valid.*broken_layers\.py:6\).*--input-shape data="):
            build(tmp_path, 'module: "broken_layers" layer: "Raises"')
        net = build(tmp_path, 'module: "broken_layers" layer: "RaisesInForward"')
        with pytest.raises(PythonLayerError, match=r"forward\(\) raised RuntimeError: forward failed"):
            net.forward()
    # The CLI wraps every tool but `run` in user_errors_as_caffeish itself.
    path = tmp_path / "net.prototxt"
    path.write_text(DATA_LAYER.format('module: "broken_layers" layer: "Raises"'))
    assert cli(["summary", "--allow-python-layers", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "setup() raised FileNotFoundError" in err


PARAM_LAYERS = """
    import caffe
    import numpy as np


    class Affine(caffe.Layer):
        \"\"\"top = w * x + b, with its own parameters: w (C,) and b (1,).\"\"\"

        def setup(self, bottom, top):
            self.blobs.add_blob(bottom[0].channels)
            self.blobs.add_blob(1)
            self.blobs[0].data[...] = 2
            self.blobs[1].data[...] = 0.5

        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)

        def forward(self, bottom, top):
            w = self.blobs[0].data.reshape(1, -1, 1, 1)
            top[0].data[...] = w * bottom[0].data + self.blobs[1].data[0]
"""

PARAM_NET = """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 2 dim: 2 } } }
layer { name: "affine" type: "Python" bottom: "x" top: "y" python_param { module: "param_layers" layer: "Affine" } }
layer { name: "ip" type: "InnerProduct" bottom: "y" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
"""


# "strict": the GPU code path, whose device arrays refuse host ones; a Python layer's parameters stay on the host.
@pytest.mark.parametrize("backend", ["numpy", "strict"])
def test_python_layers_with_parameters_are_read_written_loaded_and_saved(tmp_path, user_modules, backend):
    user_modules("param_layers", PARAM_LAYERS)
    path = tmp_path / "params.prototxt"
    path.write_text(PARAM_NET)
    net = caffeish.Net(str(path), caffeish.TEST, backend=backend)
    layer = net.layers[1]
    assert type(layer).__name__ == "Affine" and layer.type == "Python"  # pycaffe gives the layer object itself
    assert list(net.params) == ["affine", "ip"] and net.params["affine"] is layer.blobs
    assert net.graph.node("affine").param_shapes == [(3,), (1,)]
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    np.testing.assert_array_equal(net.forward(x=x)["ip"], net.forward(x=x)["ip"])
    np.testing.assert_allclose(net.blobs["y"].data, 2 * x + 0.5)
    net.params["affine"][0].data[...] = [1, -1, 3]  # written from outside: the layer sees it
    net.forward(x=x)
    np.testing.assert_allclose(net.blobs["y"].data, np.array([1, -1, 3]).reshape(1, 3, 1, 1) * x + 0.5)
    # Saved with the net and loaded into another one (its setup's values replaced).
    weights = tmp_path / "params.caffemodel"
    net.save(str(weights))
    other = caffeish.Net(str(path), caffeish.TEST, weights=str(weights), backend=backend)
    np.testing.assert_array_equal(other.params["affine"][0].data, [1, -1, 3])
    np.testing.assert_array_equal(other.forward(x=x)["ip"], net.forward(x=x)["ip"])
    layer.blobs[0].data[...] = 0
    net.copy_from(str(weights))
    np.testing.assert_array_equal(layer.blobs[0].data, [1, -1, 3])
    # share_with: the other net's layer now reads this net's arrays.
    third = caffeish.Net(str(path), caffeish.TEST, backend=backend)
    third.share_with(net)
    layer.blobs[1].data[...] = 7
    assert third.layers[1].blobs[1].data[0] == 7 and third.params["affine"][1].data[0] == 7
    np.testing.assert_allclose(third.forward(x=x)["ip"], net.forward(x=x)["ip"])


def test_python_layer_parameters_must_fit_the_weights(tmp_path, user_modules):
    from caffeish.errors import WeightError

    user_modules("param_layers", PARAM_LAYERS)
    path = tmp_path / "params.prototxt"
    path.write_text(PARAM_NET)
    wide = tmp_path / "wide.prototxt"
    wide.write_text(PARAM_NET.replace("dim: 3", "dim: 4"))
    caffeish.Net(str(wide)).save(str(tmp_path / "wide.caffemodel"))
    with pytest.raises(WeightError, match="layer 'affine' \\(Python\\): blob 0 has shape \\(4,\\)"):
        caffeish.Net(str(path), weights=str(tmp_path / "wide.caffemodel"))


def test_given_top_shapes_make_a_python_data_layer_an_input(tmp_path):
    rest = 'layer { name: "relu" type: "ReLU" bottom: "data" top: "out" }'
    net = build(tmp_path, 'module: "no_such_voc_layers" layer: "L"', rest,
                input_shapes={"data": (1, 3, 4, 4), "label": (1, 1, 4, 4)})
    assert net.inputs == ["data", "label"]
    x = np.linspace(-1, 1, 48, dtype=np.float32).reshape(1, 3, 4, 4)
    np.testing.assert_array_equal(net.forward(data=x, label=np.zeros((1, 1, 4, 4)))["out"], np.maximum(x, 0))
    with pytest.raises(ShapeError, match="gives \\['data'\\] but not \\['label'\\]"):
        build(tmp_path, 'module: "no_such_voc_layers" layer: "L"', rest, input_shapes={"data": (1, 3, 4, 4)})


def test_cli_prints_one_line_for_a_missing_module(tmp_path, capsys):
    path = tmp_path / "net.prototxt"
    path.write_text(DATA_LAYER.format('module: "no_such_voc_layers" layer: "L"'))
    assert cli(["summary", "--allow-python-layers", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no_such_voc_layers" in err and "PYTHONPATH" in err


# -- `import caffe` inside the user's module ----------------------------------------------------------

SEES_CAFFE = """
    import caffe
    import caffe.io
    from caffe.io import Transformer

    class Const(caffe.Layer):
        def setup(self, bottom, top):
            self.value = float(self.param_str)
            self.caffe_module = caffe
            self.transformer = caffe.io.Transformer
            self.imported_transformer = Transformer

        def reshape(self, bottom, top):
            top[0].reshape(2, 3)
            top[1].reshape(1)

        def forward(self, bottom, top):
            top[0].data[...] = self.value
            top[1].data[...] = self.phase == caffe.TEST
"""


def test_import_caffe_resolves_to_caffeish(tmp_path, user_modules, monkeypatch):
    monkeypatch.delitem(sys.modules, "caffe", raising=False)
    monkeypatch.delitem(sys.modules, "caffe.io", raising=False)
    other_caffe = importlib.util.find_spec("caffe") is not None
    user_modules("sees_caffe", SEES_CAFFE)
    net = build(tmp_path, 'module: "sees_caffe" layer: "Const" param_str: "2.5"')
    out = net.forward()
    np.testing.assert_array_equal(out["data"], np.full((2, 3), 2.5, np.float32))
    np.testing.assert_array_equal(out["label"], [1.0])
    layer = net.nodes[0].layer.instance
    assert layer.caffe_module is caffeish and layer.transformer is caffeish.io.Transformer
    assert layer.imported_transformer is caffeish.io.Transformer  # `from caffe.io import ...` too
    # With no other `caffe` to import, the alias stays (for imports inside the layer's methods).
    assert (sys.modules.get("caffe") is caffeish) == (not other_caffe)


def test_a_caffe_on_the_path_is_not_shadowed_afterwards(tmp_path, user_modules, monkeypatch):
    # A Caffe source tree without its compiled _caffe: `import caffe` would fail.
    fake = tmp_path / "caffe_tree" / "caffe"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named caffe._caffe')\n")
    monkeypatch.syspath_prepend(str(fake.parent))
    monkeypatch.delitem(sys.modules, "caffe", raising=False)
    monkeypatch.delitem(sys.modules, "caffe.io", raising=False)
    user_modules("sees_caffe", SEES_CAFFE)
    net = build(tmp_path, 'module: "sees_caffe" layer: "Const" param_str: "1"')
    assert net.nodes[0].layer.instance.caffe_module is caffeish
    assert "caffe" not in sys.modules and "caffe.io" not in sys.modules
    with pytest.raises(ImportError, match="caffe._caffe"):
        importlib.import_module("caffe")


def test_layer_base_class_and_blobs():
    from caffeish.runtime.blobs import ArrayBlob

    assert caffeish.Layer.__name__ == "PythonLayer"
    b = ArrayBlob()
    b.reshape(2, 3, 4, 5)
    b.data[...] = 1.5
    assert b.shape == (2, 3, 4, 5) and b.count == 120 and (b.num, b.channels, b.height, b.width) == (2, 3, 4, 5)
    assert b.data.dtype == np.float32 and b.diff.shape == (2, 3, 4, 5) and not b.diff.any()
    b.reshape((2, 3, 4, 5))
    assert b.data[0, 0, 0, 0] == 1.5  # same shape: the data stays, as in Caffe
    b.reshape(6)
    assert b.shape == (6,) and (b.num, b.channels) == (6, 1)
    with pytest.raises(CaffeishError, match="negative"):
        b.reshape(2, -1)
