"""The strict backend: numpy that refuses what CuPy refuses, so CI (no GPU) catches numpy-only
calls on the GPU code path.

1. The strict array module itself (caffeish.kernels.strict): each rule CuPy enforces, and its
   table of CuPy's names and signatures (checked against an installed CuPy where there is one).
2. Every layer type that runs, in its variants, as a one-layer net on the strict backend
   against the numpy backend: the GPU code path (our kernels on the CPU, every other layer's
   `xp` calls through the strict module).  On a machine with a GPU the same nets also run on
   CuPy itself.
3. The bug that made this backend: the in-place leaky ReLU called
   `xp.multiply(x, slope, out=x, where=x < 0)`, which CuPy refuses, so every net with an
   in-place leaky ReLU failed on a real GPU while CI passed.
"""
import os
import shutil

import numpy as np
import pytest
from google.protobuf import text_format

import caffeish
from caffeish.formats.schema import TEST, TRAIN, pb
from caffeish.graph import registry
from caffeish.kernels import cupy_api, strict
from caffeish.ops.neuron import ReLU
from caffeish.runtime import backend

xp = strict.XP
HAVE_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None or bool(os.environ.get("CI"))
needs_cxx = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the kernel harness (g++ or $CXX)")
GPU_REASON = backend.gpu_unavailable_reason()


def dev(a):
    return xp.asarray(np.asarray(a, dtype=np.float32))


# -- 1. the strict module ---------------------------------------------------------------------------


def test_ufuncs_refuse_where_as_cupy_does():
    x = dev([-1.0, 2.0, -3.0])
    with pytest.raises(TypeError, match=r"Wrong arguments \['where'\]"):
        xp.multiply(x, np.float32(0.5), out=x, where=x < 0)
    with pytest.raises(TypeError, match="where"):
        np.multiply(x, 2, where=x < 0)  # numpy's ufunc on a device array: CuPy's __array_ufunc__ refuses too
    for bad in ({"order": "C"}, {"subok": True}, {"signature": None}):
        with pytest.raises(TypeError, match="Wrong arguments"):
            xp.add(x, x, **bad)
    y = xp.empty(3, dtype=np.float32)
    assert xp.add(x, x, out=y, dtype=np.float32, casting="same_kind") is y
    assert y.tolist() == [-2.0, 4.0, -6.0]


def test_ufunc_methods_only_where_cupy_has_them():
    a = xp.zeros(4, dtype=np.float32)
    xp.add.at(a, xp.asarray(np.array([0, 0, 2])), np.float32(1))  # CuPy: add.at, maximum.at, minimum.at...
    assert a.tolist() == [2.0, 0.0, 1.0, 0.0]
    with pytest.raises(NotImplementedError, match="multiply.at.*scatter_add"):
        xp.multiply.at(a, xp.asarray(np.array([0])), np.float32(2))
    with pytest.raises(NotImplementedError, match="maximum.reduce"):
        xp.maximum.reduce(a)
    assert float(xp.add.reduce(a)) == 3.0
    with pytest.raises(NotImplementedError, match="multiply.at"):
        np.multiply.at(a, [0], 2)  # numpy's ufunc method on a device array: CuPy's __array_ufunc__


def test_names_and_arguments_cupy_lacks_are_refused():
    with pytest.raises(AttributeError, match="no attribute 'errstate'"):
        xp.errstate  # noqa: B018
    a = dev(np.arange(6).reshape(2, 3))
    with pytest.raises(TypeError, match="where"):
        xp.sum(a, where=a > 1)
    with pytest.raises(TypeError, match="order"):
        xp.argsort(a, order="x")
    assert xp.argsort(a, axis=-1, kind="stable").shape == (2, 3)
    view = xp.reshape(a, (3, 2), copy=False)  # CuPy 14 has reshape(copy=)
    assert np.shares_memory(strict._base(view), strict._base(a))
    assert xp.lib.stride_tricks.as_strided(a, shape=(2, 2), strides=(12, 4)).shape == (2, 2)
    with pytest.raises(AttributeError):
        xp.lib.stride_tricks.broadcast_arrays  # noqa: B018  (numpy has it there, CuPy does not)
    assert xp.float32 is np.float32 and xp.pi == np.pi and xp.ndarray is strict.StrictArray


def test_methods_take_cupys_arguments_only():
    a = dev(np.arange(6).reshape(2, 3))
    with pytest.raises(TypeError, match="where"):
        a.sum(where=a > 1)
    with pytest.raises(TypeError, match="initial"):
        a.max(initial=0)
    assert float(a.sum(axis=1, dtype=np.float32, keepdims=True)[1, 0]) == 12.0
    assert a.astype(np.float32, copy=False) is a
    for name in ("ctypes", "resize", "setflags", "__array_interface__"):
        with pytest.raises(AttributeError):
            getattr(a, name)
    with pytest.raises(AttributeError):
        a.flags.writeable  # noqa: B018
    assert a.flags.c_contiguous and a.flags["C_CONTIGUOUS"]


def test_host_arrays_must_be_moved_to_the_device():
    a = dev([1.0, 2.0])
    host = np.ones(2, np.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        a + host
    with pytest.raises(TypeError, match="Unsupported type"):
        host * a
    with pytest.raises(TypeError, match="Unsupported type"):
        xp.maximum(a, host)
    with pytest.raises(TypeError, match="Unsupported type"):
        xp.concatenate([a, host])
    with pytest.raises(TypeError, match="device array"):
        xp.add(a, a, out=host)
    moved = xp.asarray(host)  # host to device: a copy, never an alias
    moved[0] = 5
    assert host[0] == 1 and type(moved) is strict.StrictArray
    assert (a + np.float32(1)).tolist() == [2.0, 3.0] and (a * 2.0).dtype == np.float32


def test_no_object_or_string_arrays():
    with pytest.raises(TypeError, match="object"):
        xp.zeros(3, dtype=object)
    with pytest.raises(TypeError, match="object"):
        dev([1.0]).astype(object)
    with pytest.raises(TypeError, match="str"):
        xp.array(["a", "b"])


def test_results_are_device_arrays_as_cupy_gives_them():
    a = dev([[1.0, 5.0], [3.0, 2.0]])
    total = xp.sum(a)
    assert type(total) is strict.StrictArray and total.shape == ()  # a 0-d array, not a numpy scalar
    assert type(a[0, 1]) is strict.StrictArray and float(a[0, 1]) == 5.0
    assert [type(r) for r in a] == [strict.StrictArray] * 2
    with pytest.raises(TypeError, match="__index__"):
        range(xp.argmax(a))
    assert int(xp.argmax(a)) == 1
    assert type(np.sum(a)) is strict.StrictArray  # numpy's function on device arrays: CuPy's __array_function__
    v = a.reshape(4)[1:]
    assert v.base is strict._base(a).base and v.base is a.base  # one level: the owner of the memory
    host = backend.to_numpy(v)
    assert type(host) is np.ndarray and host.tolist() == [5.0, 3.0, 2.0]
    host[0] = 0
    assert float(v[0]) == 5.0  # a copy, as cupy's .get()


def test_numpy_functions_cupy_lacks_are_refused_on_device_arrays():
    assert "nanpercentile" not in cupy_api.NAMESPACES[""] and "insert" not in cupy_api.NAMESPACES[""]
    with pytest.raises(TypeError, match="no implementation found for 'numpy.nanpercentile'"):
        np.nanpercentile(dev([1.0, 2.0]), 50)
    with pytest.raises(TypeError, match="no implementation"):
        np.insert(dev([1.0, 2.0]), 1, 5.0)


def test_the_table_covers_what_the_layers_call():
    """The table is CuPy's namespace: it has what the layers use and lacks numpy-only names."""
    names = cupy_api.NAMESPACES[""]
    for name in ("where", "multiply", "maximum", "take_along_axis", "einsum", "pad", "bincount", "flatnonzero",
                 "moveaxis", "ascontiguousarray", "cumsum", "matmul", "float32"):
        assert name in names, name
    for name in ("errstate", "seterr", "nditer", "frompyfunc", "insert", "object_", "longdouble"):
        assert name not in names, name
    assert "at" in names["add"][3] and "at" not in names["multiply"][3]


def test_signature_tokens_parse_cython_signatures():
    assert strict.tokens_from_text("self, _ndarray_base b, int axis=-1, *, copy=None") == ["b", "axis=", "*", "copy="]
    assert strict.tokens_from_text("a, newshape, order='C', *shape, **kwargs") == \
        ["a", "newshape", "order=", "*shape", "**kwargs"]
    sig = strict.signature(["x", "/", "out=", "*", "dtype="])
    sig.bind(1, out=2, dtype=3)
    with pytest.raises(TypeError):
        sig.bind(x=1)


def test_table_matches_the_installed_cupy():
    """Where CuPy imports (no GPU needed), the stored table is what describe() reads from it."""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 (not installed, or a broken CUDA install)
        pytest.skip(f"CuPy does not import here ({type(exc).__name__}); the table is cupy-cuda13x "
                    f"{cupy_api.VERSION}'s")
    if cupy.__version__ != cupy_api.VERSION:
        pytest.skip(f"CuPy {cupy.__version__} here, the table is {cupy_api.VERSION}'s: regenerate it with "
                    f"python -m caffeish.kernels.strict --write")
    assert strict.render(strict.describe(cupy)) == strict.render(strict.stored_description())


# -- 2. every layer on the GPU code path ----------------------------------------------------------

F = "weight_filler { type: 'gaussian' std: 0.5 } bias_filler { type: 'gaussian' }"
X = {"x": (2, 3, 6, 7)}
POS = {"x": ((2, 3, 4, 5), "positive")}


def L(type_, params="", bottoms=("x",), tops=("y",), name="l"):
    """One layer's prototxt."""
    b = " ".join(f'bottom: "{v}"' for v in bottoms)
    t = " ".join(f'top: "{v}"' for v in tops)
    return f'layer {{ name: "{name}" type: "{type_}" {b} {t} {params} }}'


def in_place(type_, params=""):
    """A layer writing into a blob the net computed (a Power layer's fresh top), so that it runs in place."""
    return L("Power", "power_param { scale: 1.5 shift: -0.2 }", name="p") + L(type_, params, ("y",), ("y",))


# (id, inputs {name: shape or (shape, kind)}, layers' prototxt, phase)
CASES = [
    ("ReLU", X, L("ReLU"), TEST),
    ("ReLU leaky", X, L("ReLU", "relu_param { negative_slope: 0.1 }"), TEST),
    ("ReLU in place", X, in_place("ReLU"), TEST),
    ("ReLU leaky in place", X, in_place("ReLU", "relu_param { negative_slope: 0.1 }"), TEST),
    ("ELU", X, L("ELU", "elu_param { alpha: 0.7 }"), TEST),
    ("Sigmoid", X, L("Sigmoid"), TEST),
    ("TanH", X, L("TanH"), TEST),
    ("AbsVal", X, L("AbsVal"), TEST),
    ("BNLL", X, L("BNLL"), TEST),
    ("Threshold", X, L("Threshold", "threshold_param { threshold: 0.2 }"), TEST),
    ("Clip", X, L("Clip", "clip_param { min: -0.5 max: 0.75 }"), TEST),
    ("Swish", X, L("Swish", "swish_param { beta: 1.3 }"), TEST),
    ("Power", X, L("Power", "power_param { power: 2 scale: 0.5 shift: 0.1 }"), TEST),
    ("Power constant", X, L("Power", "power_param { power: 3 scale: 0 shift: 2 }"), TEST),
    ("Exp base 2", X, L("Exp", "exp_param { base: 2 scale: 0.5 shift: 0.1 }"), TEST),
    ("Exp e shift", X, L("Exp", "exp_param { shift: 0.3 scale: -1.5 }"), TEST),
    ("Log base 10", POS, L("Log", "log_param { base: 10 scale: 2 shift: 0.5 }"), TEST),
    ("Dropout TEST", X, L("Dropout", "dropout_param { dropout_ratio: 0.3 }"), TEST),
    ("Dropout TRAIN", X, L("Dropout", "dropout_param { dropout_ratio: 0.3 }"), TRAIN),
    ("PReLU", X, L("PReLU", "prelu_param { filler { type: 'gaussian' } }"), TEST),
    ("PReLU shared", X, L("PReLU", "prelu_param { channel_shared: true }"), TEST),
    ("LRN across 0.75", POS, L("LRN", "lrn_param { local_size: 5 alpha: 0.1 beta: 0.75 }"), TEST),
    ("LRN within 0.5", POS, L("LRN", "lrn_param { local_size: 3 alpha: 0.1 beta: 0.5 norm_region: WITHIN_CHANNEL }"),
     TEST),
    ("LRN beta 1", POS, L("LRN", "lrn_param { local_size: 3 beta: 1 k: 2 }"), TEST),
    ("LRN beta 0.6", POS, L("LRN", "lrn_param { local_size: 3 beta: 0.6 }"), TEST),
    ("MVN", X, L("MVN"), TEST),
    ("MVN across, mean only", X, L("MVN", "mvn_param { across_channels: true normalize_variance: false }"), TEST),
    ("BatchNorm global stats", X,
     L("BatchNorm", "batch_norm_param { use_global_stats: true } param { lr_mult: 0 } param { lr_mult: 0 } "
                    "param { lr_mult: 0 }"), TEST),
    ("BatchNorm batch stats", X, L("BatchNorm"), TRAIN),
    ("Scale with bias", X, L("Scale", "scale_param { bias_term: true filler { type: 'gaussian' } "
                                      "bias_filler { type: 'gaussian' } }"), TEST),
    ("Scale two bottoms", {"x": (2, 3, 4, 5), "s": (3, 4)}, L("Scale", "scale_param { axis: 1 }", ("x", "s")), TEST),
    ("Bias", X, L("Bias", "bias_param { filler { type: 'gaussian' } }"), TEST),
    ("Bias two bottoms", {"x": (2, 3, 4, 5), "b": (3,)}, L("Bias", "", ("x", "b")), TEST),
    ("InnerProduct", X, L("InnerProduct", f"inner_product_param {{ num_output: 7 {F} }}"), TEST),
    ("InnerProduct transpose axis 2", X,
     L("InnerProduct", f"inner_product_param {{ num_output: 5 axis: 2 transpose: true {F} }}"), TEST),
    ("Embed", {"x": ((2, 3), "labels:10")},
     L("Embed", f"embed_param {{ num_output: 4 input_dim: 10 {F} }}"), TEST),
    ("Convolution", X, L("Convolution", f"convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 stride: 2 "
                                        f"dilation: 1 {F} }}"), TEST),
    ("Convolution grouped dilated", {"x": (2, 4, 9, 8)},
     L("Convolution", f"convolution_param {{ num_output: 6 kernel_size: 3 group: 2 dilation: 2 pad: 2 {F} }}"), TEST),
    ("Convolution 1x1", X, L("Convolution", f"convolution_param {{ num_output: 5 kernel_size: 1 {F} }}"), TEST),
    ("Convolution depthwise", X,
     L("Convolution", f"convolution_param {{ num_output: 3 group: 3 kernel_size: 3 pad: 1 {F} }}"), TEST),
    ("Convolution 3-D", {"x": (1, 2, 5, 6, 7)},
     L("Convolution", f"convolution_param {{ num_output: 4 kernel_size: 3 kernel_size: 2 kernel_size: 3 pad: 1 {F} }}"),
     TEST),
    ("Convolution 3-D 1x1x1 depthwise", {"x": (1, 2, 3, 4, 5)},
     L("Convolution", f"convolution_param {{ num_output: 2 group: 2 kernel_size: 1 {F} }}"), TEST),
    ("Deconvolution", X, L("Deconvolution", f"convolution_param {{ num_output: 4 kernel_size: 4 stride: 2 pad: 1 {F} }}"),
     TEST),
    ("Deconvolution grouped", X,
     L("Deconvolution", f"convolution_param {{ num_output: 3 group: 3 kernel_size: 3 stride: 2 {F} }}"), TEST),
    ("Deconvolution 3-D", {"x": (1, 2, 3, 4, 3)},
     L("Deconvolution", f"convolution_param {{ num_output: 3 kernel_size: 3 stride: 2 dilation: 2 {F} }}"), TEST),
    ("Im2col", X, L("Im2col", "convolution_param { kernel_size: 3 stride: 2 pad: 1 }"), TEST),
    ("Im2col 3-D", {"x": (1, 2, 4, 5, 3)}, L("Im2col", "convolution_param { kernel_size: 2 }"), TEST),
    ("Pooling MAX with mask", X, L("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }",
                                   tops=("y", "mask")), TEST),
    ("Pooling AVE", X, L("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }"), TEST),
    ("Pooling STOCHASTIC", POS, L("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }"), TEST),
    ("Pooling global MAX", X, L("Pooling", "pooling_param { pool: MAX global_pooling: true }", tops=("y", "mask")),
     TEST),
    ("SPP", X, L("SPP", "spp_param { pyramid_height: 2 pool: MAX }"), TEST),
    ("Crop", {"x": (2, 3, 8, 9), "r": (2, 3, 5, 6)}, L("Crop", "crop_param { axis: 2 offset: 1 offset: 2 }", ("x", "r")),
     TEST),
    ("Crop all axes", {"x": (3, 4, 5, 6), "r": (2, 2, 3, 4)}, L("Crop", "crop_param { axis: 0 offset: 1 }", ("x", "r")),
     TEST),
    ("Concat", {"a": (2, 3, 4), "b": (2, 5, 4)}, L("Concat", "", ("a", "b")), TEST),
    ("Slice", X, L("Slice", "slice_param { axis: 1 slice_point: 1 }", tops=("y", "z")), TEST),
    ("Split", X, L("Power", "power_param { scale: 2 }", name="p") + L("Split", "", ("y",), ("s1", "s2"), "sp"), TEST),
    ("Flatten", X, L("Flatten"), TEST),
    ("Reshape", X, L("Reshape", "reshape_param { shape { dim: 0 dim: -1 dim: 7 } }"), TEST),
    ("Tile", X, L("Tile", "tile_param { axis: 1 tiles: 2 }"), TEST),
    ("Reduction SUM", X, L("Reduction", "reduction_param { axis: 1 coeff: 2 }"), TEST),
    ("Reduction ASUM", X, L("Reduction", "reduction_param { operation: ASUM axis: 2 }"), TEST),
    ("Reduction SUMSQ", X, L("Reduction", "reduction_param { operation: SUMSQ }"), TEST),
    ("Reduction MEAN", X, L("Reduction", "reduction_param { operation: MEAN axis: -1 coeff: -0.5 }"), TEST),
    ("ArgMax", {"x": ((3, 4, 2, 2), "ties")}, L("ArgMax"), TEST),
    ("ArgMax top 3 with values", {"x": ((3, 4, 2, 2), "ties")},
     L("ArgMax", "argmax_param { top_k: 3 out_max_val: true }"), TEST),
    ("ArgMax axis", {"x": ((3, 5, 2, 2), "ties")}, L("ArgMax", "argmax_param { top_k: 2 axis: 1 }"), TEST),
    ("ArgMax axis values", X, L("ArgMax", "argmax_param { axis: -1 out_max_val: true }"), TEST),
    ("Eltwise SUM", {"a": (2, 3, 4), "b": (2, 3, 4), "c": (2, 3, 4)},
     L("Eltwise", "eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }", ("a", "b", "c")), TEST),
    ("Eltwise PROD", {"a": (2, 3, 4), "b": (2, 3, 4), "c": (2, 3, 4)},
     L("Eltwise", "eltwise_param { operation: PROD }", ("a", "b", "c")), TEST),
    ("Eltwise MAX", {"a": (2, 3, 4), "b": (2, 3, 4), "c": (2, 3, 4)},
     L("Eltwise", "eltwise_param { operation: MAX }", ("a", "b", "c")), TEST),
    ("Softmax", X, L("Softmax", "softmax_param { axis: 2 }"), TEST),
    ("Filter", {"x": (4, 3, 2), "s": ((4, 1), "binary")}, L("Filter", "", ("x", "s")), TEST),
    ("BatchReindex", {"x": (4, 3, 2), "i": ((6,), "labels:4")}, L("BatchReindex", "", ("x", "i")), TEST),
    ("Parameter", {}, L("Parameter", "parameter_param { shape { dim: 2 dim: 3 } }", bottoms=()), TEST),
    ("Silence", X, L("Power", "power_param { scale: 2 }", name="p") + L("Silence", "", ("y",), (), "s"), TEST),
    ("SoftmaxWithLoss", {"x": (2, 4, 3, 5), "t": ((2, 3, 5), "labels:4")},
     L("SoftmaxWithLoss", "loss_param { ignore_label: 2 }", ("x", "t"), ("loss", "prob")), TEST),
    ("SoftmaxWithLoss FULL", {"x": (2, 4, 3), "t": ((2, 3), "labels:4")},
     L("SoftmaxWithLoss", "loss_param { normalization: FULL }", ("x", "t"), ("loss",)), TEST),
    ("InfogainLoss", {"x": (3, 4, 2), "t": ((3, 2), "labels:4"), "h": ((4, 4), "positive")},
     L("InfogainLoss", "loss_param { ignore_label: 1 }", ("x", "t", "h"), ("loss", "prob")), TEST),
    ("MultinomialLogisticLoss", {"x": ((4, 5, 1, 1), "positive"), "t": ((4,), "labels:5")},
     L("MultinomialLogisticLoss", "", ("x", "t"), ("loss",)), TEST),
    ("EuclideanLoss", {"a": (4, 3, 2), "b": (4, 3, 2)}, L("EuclideanLoss", "", ("a", "b"), ("loss",)), TEST),
    ("SigmoidCrossEntropyLoss", {"x": (4, 3), "t": ((4, 3), "binary")},
     L("SigmoidCrossEntropyLoss", "loss_param { ignore_label: 1 }", ("x", "t"), ("loss",)), TEST),
    ("HingeLoss L1", {"x": (4, 5), "t": ((4,), "labels:5")}, L("HingeLoss", "", ("x", "t"), ("loss",)), TEST),
    ("HingeLoss L2", {"x": (4, 5), "t": ((4,), "labels:5")},
     L("HingeLoss", "hinge_loss_param { norm: L2 }", ("x", "t"), ("loss",)), TEST),
    ("ContrastiveLoss", {"a": (4, 3, 1, 1), "b": (4, 3, 1, 1), "s": ((4, 1, 1, 1), "binary")},
     L("ContrastiveLoss", "contrastive_loss_param { margin: 2 }", ("a", "b", "s"), ("loss",)), TEST),
    ("ContrastiveLoss legacy", {"a": (4, 3, 1, 1), "b": (4, 3, 1, 1), "s": ((4, 1, 1, 1), "binary")},
     L("ContrastiveLoss", "contrastive_loss_param { margin: 2 legacy_version: true }", ("a", "b", "s"), ("loss",)),
     TEST),
    ("Accuracy", {"x": (6, 5), "t": ((6,), "labels:5")},
     L("Accuracy", "accuracy_param { top_k: 2 ignore_label: 3 }", ("x", "t"), ("acc", "per_class")), TEST),
    ("Accuracy spatial", {"x": (2, 4, 3), "t": ((2, 3), "labels:4")}, L("Accuracy", "", ("x", "t"), ("acc",)), TEST),
    ("DummyData", {}, L("DummyData", "dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 4 } "
                                     "data_filler { type: 'constant' value: 1.5 } data_filler { type: 'gaussian' } }",
                        bottoms=(), tops=("d1", "d2")), TEST),
]
KERNEL_TYPES = {"Convolution", "Deconvolution", "Im2col", "Pooling", "SPP", "Crop", "LRN", "Softmax", "SoftmaxWithLoss",
                "InfogainLoss"}


def case_net(inputs, layers, phase):
    text = "".join(f'layer {{ name: "in_{name}" type: "Input" top: "{name}" input_param {{ shape {{ '
                   + " ".join(f"dim: {d}" for d in (spec[0] if isinstance(spec[0], tuple) else spec)) + " } } }"
                   for name, spec in inputs.items()) + layers
    net_param = text_format.Parse(text, pb.NetParameter())
    for layer in net_param.layer:
        if layer.type != "Input":
            layer.phase = phase  # the phase the case's layer runs in (Dropout, BatchNorm at TRAIN)
    return net_param


def case_inputs(inputs, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in inputs.items():
        shape, kind = (spec, "normal") if not isinstance(spec[0], tuple) else spec
        if kind == "normal":
            value = rng.standard_normal(shape)
        elif kind == "positive":
            value = rng.uniform(0.1, 2.0, shape)
        elif kind == "binary":
            value = rng.integers(0, 2, shape)
        elif kind == "ties":  # few distinct values: ArgMax's tie rule matters
            value = rng.integers(0, 3, shape)
        else:  # labels:K
            value = rng.integers(0, int(kind.split(":")[1]), shape)
        out[name] = value.astype(np.float32)
    return out


def run_case(case, backend_name):
    """{blob: host array} after one forward of the case's net on a backend (every blob kept)."""
    _, inputs, layers, phase = case
    net = caffeish.Net(case_net(inputs, layers, phase), None, TEST, keep=True, backend=backend_name, seed=7)
    net.forward(**case_inputs(inputs))
    return {name: np.array(net.host_data(name)) for name in net._arrays}


def compare(case, backend_name, tol):
    ref = run_case(case, "numpy")
    got = run_case(case, backend_name)
    assert set(got) == set(ref)
    bad = []
    for name, want in ref.items():
        have = got[name]
        if have.dtype != np.float32 or have.shape != want.shape:
            bad.append(f"{name}: {have.dtype}{have.shape} vs float32{want.shape}")
            continue
        scale = float(np.abs(want).max()) if want.size else 0.0
        err = float(np.abs(have.astype(np.float64) - want).max()) / (scale + 1e-12) if want.size else 0.0
        if not err <= tol:
            bad.append(f"{name}: relative error {err:.3g} > {tol}")
    return bad


def _marks(case):
    types_ = {line.split('type: "')[1].split('"')[0] for line in case[2].split("layer {")[1:]}
    return [needs_cxx] if types_ & KERNEL_TYPES else []


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=_marks(c)) for c in CASES])
def test_layer_on_the_strict_gpu_path(case):
    """The case's net on the strict backend (the GPU code path, CuPy's rules) matches numpy."""
    bad = compare(case, "strict", 1e-5)
    assert not bad, f"{case[0]}: " + "; ".join(bad)


def test_every_runnable_layer_type_is_in_the_sweep():
    """A new layer type must join CASES, so that its GPU path is checked against CuPy's rules."""
    covered = {line.split('type: "')[1].split('"')[0] for c in CASES for line in c[2].split("layer {")[1:]}
    runnable = set()
    for type_ in registry.registered_types():
        try:
            layer = registry.create(pb.LayerParameter(name="l", type=type_), TEST)
        except Exception:  # noqa: BLE001 (types that need parameters to exist run in CASES anyway)
            continue
        if layer.can_forward and type_ != "Input":
            runnable.add(type_)
    assert runnable - covered == set()


@pytest.mark.skipif(GPU_REASON is not None, reason=f"needs a GPU with CuPy: {GPU_REASON}")
def test_every_layer_on_a_real_gpu():
    """On a GPU machine: the same nets on CuPy itself (cuBLAS, CuPy's reductions: 1e-4)."""
    failures = {}
    for case in CASES:
        try:
            bad = compare(case, "cupy", 1e-4)
        except Exception as exc:  # noqa: BLE001 (report every case, not the first)
            bad = [f"{type(exc).__name__}: {exc}"]
        if bad:
            failures[case[0]] = bad
    assert not failures, failures


# -- 3. the in-place leaky ReLU (found on an H200) -------------------------------------------------


def test_in_place_leaky_relu_runs_on_the_gpu_path(monkeypatch):
    """Conv -> ReLU(negative_slope, in place): the runtime takes forward_in_place (asserted), and on the
    strict backend it must use only what CuPy accepts.  The former `xp.multiply(x, slope, out=x,
    where=x < 0)` fails here with "Wrong arguments ['where']", as it did on the GPU."""
    calls = []
    original = ReLU.forward_in_place
    monkeypatch.setattr(ReLU, "forward_in_place", lambda self, xp_, x, blobs: calls.append(xp_) or
                        original(self, xp_, x, blobs))
    text = (L("Input", "input_param { shape { dim: 2 dim: 3 dim: 9 dim: 8 } }", (), ("x",), "in")
            + L("Convolution", f"convolution_param {{ num_output: 4 kernel_size: 3 {F} }}", tops=("c",), name="conv")
            + L("ReLU", "relu_param { negative_slope: 0.1 }", ("c",), ("c",), "relu"))
    net_param = text_format.Parse(text, pb.NetParameter())
    x = np.random.default_rng(3).standard_normal((2, 3, 9, 8)).astype(np.float32)
    want = caffeish.Net(net_param, None, TEST, seed=1).forward(x=x)["c"]
    backends = ["strict"] + (["cupy"] if GPU_REASON is None else [])
    for name in backends:
        if name == "strict" and not HAVE_CXX:
            continue
        calls.clear()
        got = caffeish.Net(net_param, None, TEST, backend=name, seed=1).forward(x=x)["c"]
        assert calls and calls[0] is not np, f"{name}: the in-place path did not run"
        assert type(got) is np.ndarray
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (want < 0).any()


def test_leaky_relu_in_place_equals_multiplying_the_negatives():
    """Bit for bit what numpy's `multiply(..., where=x < 0)` gave, NaN, infinities and signed zeros too."""
    layer = registry.create(text_format.Parse('name: "r" type: "ReLU" bottom: "x" top: "x" '
                                              "relu_param { negative_slope: 0.1 }", pb.LayerParameter()), TEST)
    x = np.array([-1.5, -0.0, 0.0, 2.0, np.nan, -np.inf, np.inf, -1e-45, 3e38, -3e38], np.float32)
    want = x.copy()
    np.multiply(want, np.float32(0.1), out=want, where=want < 0)
    for module in (np, xp):
        arr = module.asarray(x.copy())
        out = layer.forward_in_place(module, arr, [])[0]
        assert out is arr
        assert backend.to_numpy(out).tobytes() == want.tobytes()


def test_host_values_and_indices_as_cupy_takes_them():
    """Seen on CuPy 14.2: `dev[...] = host` is refused, host index arrays are taken (indexing, take)."""
    a = dev([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
        a[...] = np.zeros(3, np.float32)
    a[...] = np.float32(4)
    assert a[np.array([0, 2])].tolist() == [4.0, 4.0]
    assert xp.take(a, np.array([0, 4])).tolist() == [4.0, 4.0]  # CuPy's take wraps out-of-range indices
    with pytest.raises(TypeError, match="Unsupported type"):
        xp.take(np.zeros(3, np.float32), xp.asarray(np.array([0])))
    assert xp.argsort(dev(np.tile([1.0, 0.0], 50))).tolist()[:3] == [1, 3, 5]  # always stable, as CuPy's
    with pytest.raises(ValueError, match="stable"):
        xp.argsort(a, kind="quicksort")


def test_is_host_tells_device_arrays_from_host_ones():
    a = dev([1.0])
    assert isinstance(a, np.ndarray)  # why isinstance cannot tell them apart
    assert not backend.is_host(a) and backend.is_host(np.zeros(1)) and backend.is_host(np.zeros((1, 1)).view(np.matrix))
    assert backend.to_numpy(a).tolist() == [1.0]
