"""Backward of Python layers, with pycaffe's semantics (layers/python_layer.py).

The user's `backward(top, propagate_down, bottom)` reads the top diffs from `top[i].diff` and the
current data from `top[i].data` / `bottom[i].data`, writes `bottom[i].diff`, and adds into its
parameters' `self.blobs[i].diff`, which are the Net's parameter diffs (they accumulate over passes
and show as `net.params[name][i].diff`).  Checked through real Nets (numpy and the strict GPU code
path) against gradients derived by hand in float64: a Python layer with parameters, one in place
(one blob: its diff holds the top diff on entry and the bottom diff on return), one that reads its
top's data, and a Python loss against the built-in EuclideanLoss with a loss weight.  Also: a layer
class without `backward` fails as in pycaffe (AttributeError) when Caffe would call it, and not
otherwise; an error raised in the user's backward reaches the caller; propagate_down reaches the
user's code, and a bottom diff the layer writes although not asked for is still returned.

Test modules are written into tmp_path and put on sys.path by the `user_modules` fixture (conftest.py), which
removes them (and any `caffe` alias) from sys.modules afterwards.
"""
import sys

import numpy as np
import pytest

import caffeish
from caffeish.runtime import backend as backends

OPS = """
    import caffe
    import numpy as np


    class Affine(caffe.Layer):
        \"\"\"top = w * x + b with its own parameters w (C,) and b (1,).\"\"\"
        calls = []

        def setup(self, bottom, top):
            self.blobs.add_blob(bottom[0].channels)
            self.blobs.add_blob(1)
            self.blobs[0].data[...] = [0.5, -2.0, 1.5]
            self.blobs[1].data[...] = 0.25

        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)

        def forward(self, bottom, top):
            top[0].data[...] = self.blobs[0].data.reshape(1, -1, 1, 1) * bottom[0].data + self.blobs[1].data[0]

        def backward(self, top, propagate_down, bottom):
            Affine.calls.append(list(propagate_down))
            dy = top[0].diff
            self.blobs[0].diff[...] += (dy * bottom[0].data).sum(axis=(0, 2, 3))
            self.blobs[1].diff[...] += dy.sum()
            if propagate_down[0]:
                bottom[0].diff[...] = self.blobs[0].data.reshape(1, -1, 1, 1) * dy


    class Triple(caffe.Layer):
        \"\"\"top = 3 * bottom, used in place: bottom[0] is top[0], one blob and one diff.\"\"\"
        seen = []

        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)

        def forward(self, bottom, top):
            top[0].data[...] = 3 * bottom[0].data

        def backward(self, top, propagate_down, bottom):
            Triple.seen.append((bottom[0] is top[0], top[0].diff.copy()))
            bottom[0].diff[...] = 3 * top[0].diff


    class Exp(caffe.Layer):
        \"\"\"top = exp(bottom); its backward reads the top's data: dx = dy * y.\"\"\"

        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)

        def forward(self, bottom, top):
            top[0].data[...] = np.exp(bottom[0].data)

        def backward(self, top, propagate_down, bottom):
            bottom[0].diff[...] = top[0].diff * top[0].data


    class EuclideanLoss(caffe.Layer):
        \"\"\"pycaffe's examples/pycaffe/layers/pyloss.py, scaled by the top's diff (the loss weight).\"\"\"

        def setup(self, bottom, top):
            if len(bottom) != 2:
                raise Exception("Need two inputs to compute distance.")

        def reshape(self, bottom, top):
            self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)
            top[0].reshape(1)

        def forward(self, bottom, top):
            self.diff[...] = bottom[0].data - bottom[1].data
            top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.

        def backward(self, top, propagate_down, bottom):
            for i in range(2):
                if not propagate_down[i]:
                    continue
                sign = 1 if i == 0 else -1
                bottom[i].diff[...] = sign * top[0].diff[0] * self.diff / bottom[i].num


    class Source(caffe.Layer):
        \"\"\"A data layer that defines no backward (as many do).\"\"\"

        def reshape(self, bottom, top):
            top[0].reshape(2, 3)

        def forward(self, bottom, top):
            top[0].data[...] = np.arange(6).reshape(2, 3)


    class Failing(caffe.Layer):
        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)

        def forward(self, bottom, top):
            top[0].data[...] = bottom[0].data

        def backward(self, top, propagate_down, bottom):
            raise ValueError("no gradient today")


    class Eager(caffe.Layer):
        \"\"\"Writes both bottom diffs whatever propagate_down says (Caffe's blob memory keeps them).\"\"\"

        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)

        def forward(self, bottom, top):
            top[0].data[...] = bottom[0].data + bottom[1].data

        def backward(self, top, propagate_down, bottom):
            bottom[0].diff[...] = top[0].diff
            bottom[1].diff[...] = 2 * top[0].diff
"""


def make_net(tmp_path, text, backend="numpy"):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return caffeish.Net(str(path), caffeish.TRAIN, backend=backend)


CHAIN = """
force_backward: true
layer { name: "in" type: "Input" top: "x" top: "t"
        input_param { shape { dim: 2 dim: 3 dim: 2 dim: 2 } shape { dim: 2 dim: 3 dim: 2 dim: 2 } } }
layer { name: "affine" type: "Python" bottom: "x" top: "y" python_param { module: "py_ops" layer: "Affine" } }
layer { name: "triple" type: "Python" bottom: "y" top: "y" python_param { module: "py_ops" layer: "Triple" } }
layer { name: "exp" type: "Python" bottom: "y" top: "e" python_param { module: "py_ops" layer: "Exp" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "e" bottom: "t" top: "loss" loss_weight: 2 }
"""


# "strict": the GPU code path (device arrays that refuse host ones); Python layers run on the host.
@pytest.mark.parametrize("backend", ["numpy", "strict"])
def test_python_layers_backward_through_a_net(tmp_path, user_modules, backend):
    user_modules("py_ops", OPS)
    net = make_net(tmp_path, CHAIN, backend)
    mod = sys.modules["py_ops"]
    mod.Affine.calls.clear()
    mod.Triple.seen.clear()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 2, 2)) * 0.3).astype(np.float32)
    t = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    net.forward(x=x, t=t)
    net.backward()
    # float64 by hand: y1 = w x + b, y2 = 3 y1, e = exp(y2), L = 2 * sum((e - t)^2) / (2 N)
    w, b = np.array([0.5, -2.0, 1.5]).reshape(1, 3, 1, 1), 0.25
    x64 = x.astype(np.float64)
    y1 = w * x64 + b
    e = np.exp(3 * y1)
    de = 2 * (e - t) / 2
    dy2 = de * e
    dy1 = 3 * dy2
    np.testing.assert_allclose(net.blobs["e"].diff, de, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.blobs["y"].diff, dy1, rtol=1e-5, atol=1e-6)  # the in-place chain's first input
    np.testing.assert_allclose(net.blobs["x"].diff, w * dy1, rtol=1e-5, atol=1e-6)
    dw = (dy1 * x64).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(net.params["affine"][0].diff, dw, rtol=1e-5)
    np.testing.assert_allclose(net.params["affine"][1].diff, [dy1.sum()], rtol=1e-5)
    layer = net.layers[1]
    assert mod.Affine.calls == [[True]]  # force_backward asks for x's diff
    same_blob, top_diff = mod.Triple.seen[0]
    assert same_blob  # in place: one blob, whose diff held the top diff on entry
    np.testing.assert_allclose(top_diff, dy2, rtol=1e-5, atol=1e-6)
    # Parameter diffs accumulate over backward passes, as the user's += does in Caffe.
    net.backward()
    np.testing.assert_allclose(net.params["affine"][0].diff, 2 * dw, rtol=1e-5)
    net.clear_param_diffs()
    assert not np.any(net.params["affine"][0].diff) and not np.any(layer.blobs[1].diff)


LOSSES = """
force_backward: true
layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 3 } } }
layer { name: "loss" type: "%s" bottom: "a" bottom: "b" top: "loss" loss_weight: 0.5 %s }
"""


def test_python_loss_matches_the_builtin_euclidean_loss(tmp_path, user_modules):
    user_modules("py_ops", OPS)
    python = make_net(tmp_path, LOSSES % ("Python", 'python_param { module: "py_ops" layer: "EuclideanLoss" }'))
    builtin = make_net(tmp_path, LOSSES % ("EuclideanLoss", ""))
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 4, 3)).astype(np.float32)
    for net in (python, builtin):
        net.forward(a=a, b=b)
        net.backward()
    want = 0.5 * (a.astype(np.float64) - b) / 4  # the loss weight reaches the layer as top[0].diff
    for name, sign in (("a", 1), ("b", -1)):
        np.testing.assert_allclose(python.blobs[name].diff, sign * want, rtol=1e-6)
        np.testing.assert_allclose(builtin.blobs[name].diff, sign * want, rtol=1e-6)


def test_a_layer_without_backward_fails_as_in_pycaffe_only_when_called(tmp_path, user_modules):
    user_modules("py_ops", OPS)
    text = """
layer { name: "src" type: "Python" top: "d" python_param { module: "py_ops" layer: "Source" } }
layer { name: "in" type: "Input" top: "t" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "d" bottom: "t" top: "loss" }
"""
    net = make_net(tmp_path, text)
    net.forward(t=np.zeros((2, 3), np.float32))
    net.backward()  # nothing upstream needs a diff: Caffe never calls the data layer's Backward
    assert not np.any(net.blobs["d"].diff)
    forced = make_net(tmp_path, "force_backward: true\n" + text)
    forced.forward(t=np.zeros((2, 3), np.float32))
    with pytest.raises(AttributeError, match="'Source' object has no attribute 'backward'") as info:
        forced.backward()  # force_backward calls every layer's Backward, the Python data layer's too
    assert any("layer 'src'" in note for note in getattr(info.value, "__notes__", []))


def test_an_error_in_the_users_backward_reaches_the_caller(tmp_path, user_modules):
    user_modules("py_ops", OPS)
    net = make_net(tmp_path, """
force_backward: true
layer { name: "in" type: "Input" top: "x" top: "t" input_param { shape { dim: 2 } shape { dim: 2 } } }
layer { name: "fail" type: "Python" bottom: "x" top: "y" python_param { module: "py_ops" layer: "Failing" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
""")
    net.forward(x=np.ones(2, np.float32), t=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="no gradient today") as info:
        net.backward()
    assert any("backward() of layer 'fail'" in note for note in getattr(info.value, "__notes__", []))


def test_bottom_diffs_the_layer_writes_unasked_are_kept(tmp_path, user_modules):
    """Layer level: propagate_down [True, False]; the layer still writes bottom 1's diff, which
    Caffe's blob memory would hold, so it is returned; the top diff given is never written."""
    user_modules("py_ops", OPS)
    net = make_net(tmp_path, """
layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 3 } shape { dim: 3 } } }
layer { name: "eager" type: "Python" bottom: "a" bottom: "b" top: "s" python_param { module: "py_ops" layer: "Eager" } }
""")
    a, b = np.ones(3, np.float32), np.full(3, 2, np.float32)
    net.forward(a=a, b=b)
    lay = net.graph.node("eager").layer
    dy = np.array([1, -2, 4], np.float32)
    before = dy.copy()
    da, db = lay.backward(np, [dy], [a + b], [a, b], [], [True, False], [])
    np.testing.assert_array_equal(da, dy)
    np.testing.assert_array_equal(db, 2 * dy)
    np.testing.assert_array_equal(dy, before)
    assert da is not dy


def test_backward_sees_the_tops_current_data(tmp_path, user_modules):
    """Caffe's top blob is memory a later in-place layer may change: the user's backward reads
    top[0].data as the runtime holds it at backward time, not the forward's copy."""
    user_modules("py_ops", OPS)
    net = make_net(tmp_path, """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 3 } } }
layer { name: "exp" type: "Python" bottom: "x" top: "e" python_param { module: "py_ops" layer: "Exp" } }
""")
    x = np.array([0, 1, -1], np.float32)
    net.forward(x=x)
    lay = net.graph.node("exp").layer
    changed = np.array([5, 6, 7], np.float32)
    dy = np.array([1, 2, 3], np.float32)
    (dx,) = lay.backward(np, [dy], [changed], [x], [], [True], [])
    np.testing.assert_array_equal(dx, dy * changed)
    net.forward(x=x)  # the layer's own top blob still works for the next pass
    np.testing.assert_allclose(net.blobs["e"].data, np.exp(x), rtol=1e-6)


@pytest.mark.parametrize("device", [False, True])
def test_parameter_diffs_held_elsewhere_receive_what_the_layer_adds(tmp_path, user_modules, device):
    """Layer level, with the Net's parameter diffs as arrays of their own (a device's, say): the layer's
    blobs show their values on entry, and what it adds there lands in them."""
    from caffeish.kernels import strict

    user_modules("py_ops", OPS)
    net = make_net(tmp_path, """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 dim: 1 dim: 2 } } }
layer { name: "affine" type: "Python" bottom: "x" top: "y" python_param { module: "py_ops" layer: "Affine" } }
""")
    x = np.arange(6, dtype=np.float32).reshape(1, 3, 1, 2)
    net.forward(x=x)
    lay = net.graph.node("affine").layer
    xp = strict.XP if device else np
    dw, db = xp.asarray(np.full(3, 10, np.float32)), xp.asarray(np.full(1, -1, np.float32))
    dy = np.ones((1, 3, 1, 2), np.float32)
    y = net.blobs["y"].data.copy()
    (dx,) = lay.backward(xp, [xp.asarray(dy)], [xp.asarray(y)], [xp.asarray(x)], [], [False], [dw, None])
    assert dx is None
    host = backends.to_numpy
    np.testing.assert_array_equal(host(dw), 10 + x.sum(axis=(0, 2, 3)))
    np.testing.assert_array_equal(host(db), [-1])  # not wanted (None): left alone
    assert type(dw) is (strict.StrictArray if device else np.ndarray)
