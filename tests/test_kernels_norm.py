"""kernels/norm.cu (LRN and Softmax), run on the CPU by the harness, against the numpy runtime.

The kernels are launched through the GPU's launchers (caffeish.kernels.launch.Kernels.lrn
and .softmax) with the harness modules in place of cupy.RawModule.  References are
the numpy layers (caffeish.ops.norm.LRN, caffeish.ops.routing.softmax), which match
Caffe on the golden cases; LRN across channels follows Caffe's CPU order on both (a
running sum over channels by fused multiply-adds, pow in double), LRN within a channel
is compared with its formula in numpy (`lrn_reference`: each window summed afresh,
square roots for beta 0.75, 0.5 and 1).  Each kernel runs on at least 200 randomized cases
(counted per kernel): LRN with local_size 1..9 (odd), alpha, beta (0.75, 0.5 and 1,
which take square roots, and others, which take powf), k, both regions, odd sizes,
channel chunks of every length, large and small values; Softmax along every axis
of 1- to 5-axis blobs (inner sizes above 1, as FCN score maps), up to 1100
channels, large, small and equal values, each kernel forced and chosen by the
launcher.  Some cases cap the grid at one block, so that every kernel's grid-stride
loop runs more than once.  Then the layers on the harness and strict backends
launch these kernels, and the golden nets that hold LRN, Softmax or
SoftmaxWithLoss match Caffe through them.

These tests need a C++ compiler (g++, or $CXX); they skip without one, except
under CI (the CI environment variable set), where a missing compiler fails.
"""
import collections
import os
import shutil

import numpy as np
import pytest

import golden
from conftest import shared_path

import caffeish
from caffeish.formats.schema import TEST, pb
from caffeish.graph import registry
from caffeish.runtime import backend

if shutil.which(os.environ.get("CXX", "g++")) is None and not os.environ.get("CI"):
    pytest.skip("no C++ compiler for the kernel harness (g++ or $CXX)", allow_module_level=True)

from caffeish.kernels import harness, launch  # noqa: E402
from caffeish.ops.routing import softmax  # noqa: E402

MIN_CASES = 200
NORM_KERNELS = {"lrn_across", "lrn_within", "softmax_rows", "softmax_columns"}
# ~1 float32 ulp from powf and expf (numpy's and the C library's); FLT_MIN absolute for results
# that underflow into denormals.
RTOL = 2e-6
ATOL = 1.2e-38
U = 2.0 ** -24  # float32's unit roundoff


def softmax_rtol(channels):
    """Softmax sums C exponentials in another order than numpy (a tree, or in sequence where numpy
    sums pairwise); either sum is off by about sqrt(C) roundoffs (2e-6 at C = 1000)."""
    return 1e-6 + 3 * np.sqrt(channels) * U


class CountingKernels(launch.Kernels):
    """The launchers on the harness, counting the launches of each kernel."""

    def __init__(self):
        super().__init__(harness.XP, harness.module)
        self.count = collections.Counter()

    def launch(self, module, name, grid, block, args):
        self.count[name] += 1
        super().launch(module, name, grid, block, args)


def mismatch(ours, ref, rtol=RTOL):
    """'' when ours matches ref elementwise (NaN and inf where ref has them), else a short reason."""
    if ours.dtype != np.float32 or ours.shape != ref.shape:
        return f"{ours.dtype}{ours.shape} vs {ref.dtype}{ref.shape}"
    finite = np.isfinite(ref)
    if not np.array_equal(ours[~finite], ref[~finite], equal_nan=True) or not np.isfinite(ours[finite]).all():
        return "non-finite values differ"
    a, b = ours[finite].astype(np.float64), ref[finite].astype(np.float64)
    excess = np.abs(a - b) - (rtol * np.abs(b) + ATOL)
    if excess.size and excess.max() > 0:
        i = int(np.argmax(excess))
        return f"{a[i]!r} vs {b[i]!r} (relative {abs(a[i] - b[i]) / max(abs(b[i]), 1e-45):.3g})"
    return ""


def values(rng, shape):
    """Random float32 data of one of several kinds: normal, tiny, huge, mixed magnitudes, few distinct."""
    kind = rng.integers(0, 6)
    x = rng.standard_normal(shape)
    if kind == 1:
        x *= 1e-3
    elif kind == 2:
        x *= 1e3
    elif kind == 3:  # magnitudes from 1e-6 to 1e6 side by side
        x *= 10.0 ** rng.integers(-6, 7, shape)
    elif kind == 4:
        x = rng.integers(-2, 3, shape).astype(np.float64)
    return x.astype(np.float32)


@pytest.fixture
def one_block(monkeypatch):
    """A function that caps every grid at one block (or lifts the cap), so that grid-stride loops repeat."""
    plain = launch.MAX_BLOCKS

    def cap(on):
        monkeypatch.setattr(launch, "MAX_BLOCKS", 1 if on else plain)
    return cap


# -- LRN -------------------------------------------------------------------------------------------


def lrn_layer(local_size, alpha, beta, k, within):
    lp = pb.LayerParameter(name="lrn", type="LRN", bottom=["x"], top=["y"])
    p = lp.lrn_param
    p.local_size, p.alpha, p.beta, p.k = local_size, alpha, beta, k
    if within:
        p.norm_region = pb.LRNParameter.WITHIN_CHANNEL
    return registry.create(lp, TEST)


def _power(scale, beta):
    """scale^beta as the kernel computes it: square roots for 0.75, 0.5 and 1, else powf."""
    if beta == 0.75:
        return np.sqrt(scale * np.sqrt(scale))
    if beta == 0.5:
        return np.sqrt(scale)
    return scale if beta == 1 else scale ** np.float32(beta)


def lrn_reference(x, local_size, alpha, beta, k, within):
    """norm.cu's LRN in float32 numpy: every window summed afresh (zero padded), then x / S^beta."""
    half = local_size // 2
    squares = x * x
    if within:
        h, w = x.shape[2:]
        padded = np.pad(squares, ((0, 0), (0, 0), (half, half), (0, 0)))
        rows = padded[:, :, 0:h].copy()
        for i in range(1, local_size):
            rows += padded[:, :, i:i + h]
        padded = np.pad(rows, ((0, 0), (0, 0), (0, 0), (half, half)))
        total = padded[:, :, :, 0:w].copy()
        for j in range(1, local_size):
            total += padded[:, :, :, j:j + w]
        total /= np.float32(local_size * local_size)
        scale = total * np.float32(alpha) + np.float32(1)
    else:
        c = x.shape[1]
        padded = np.pad(squares, ((0, 0), (half, half), (0, 0), (0, 0)))
        total = padded[:, 0:c].copy()
        for i in range(1, local_size):
            total += padded[:, i:i + c]
        scale = total * (np.float32(alpha) / np.float32(local_size)) + np.float32(k)
    return (x / _power(scale, beta)).astype(np.float32)


def numpy_lrn(x, local_size, alpha, beta, k):
    """The numpy LRN layer (ACROSS_CHANNELS) on x."""
    layer = lrn_layer(local_size, alpha, beta, k, False)
    layer.reshape([x.shape])
    return layer.forward(np, [x], [])[0]


def lrn_case(rng):
    local_size = int(rng.choice([1, 3, 5, 5, 7, 9]))
    alpha = float(np.float32(rng.choice([1.0, 1e-4, 0.1, 2.0, 0.0, rng.uniform(0, 3)])))
    beta = float(np.float32(rng.choice([0.75, 0.75, 0.5, 1.0, 0.0, rng.uniform(-1, 2)])))
    k = float(np.float32(rng.choice([1.0, 2.0, 0.5, rng.uniform(0.1, 4)])))
    shape = (int(rng.integers(1, 4)), int(rng.integers(1, 14)), int(rng.integers(1, 10)), int(rng.integers(1, 10)))
    return local_size, alpha, beta, k, values(rng, shape)


@pytest.mark.parametrize("within", [False, True], ids=["across", "within"])
def test_lrn_kernels_match_numpy(within, one_block):
    """lrn_across (every channel chunk length) and lrn_within against the numpy layer: 200+ cases each."""
    name = "lrn_within" if within else "lrn_across"
    rng = np.random.default_rng(11 + within)
    kern = CountingKernels()
    failures, cases = [], 0
    while kern.count[name] < MIN_CASES:
        local_size, alpha, beta, k, x = lrn_case(rng)
        ref = lrn_reference(x, local_size, alpha, beta, k, True) if within else \
            numpy_lrn(x, local_size, alpha, beta, k)
        chunk = [None, 1, int(rng.integers(1, x.shape[1] + 2))][cases % 3]
        one_block(rng.random() < 0.2)
        y = kern.lrn(x, local_size, alpha, beta, k, within, chunk=chunk)
        cases += 1
        bad = mismatch(y, ref)
        if bad:
            failures.append(f"x{x.shape} n={local_size} alpha={alpha} beta={beta} k={k} chunk={chunk}: {bad}")
    assert not failures, f"{len(failures)} of {cases} cases differ:\n" + "\n".join(failures[:10])


def test_lrn_alexnet_shapes_and_chunking():
    """AlexNet's norm1/norm2 at batch 1 (the launcher's own chunk choice), and chunks of 1 to C."""
    rng = np.random.default_rng(5)
    kern = CountingKernels()
    for shape in [(1, 96, 55, 55), (1, 256, 27, 27)]:
        x = (rng.standard_normal(shape) * 30).astype(np.float32)
        ref = numpy_lrn(x, 5, 1e-4, 0.75, 1.0)
        assert mismatch(kern.lrn(x, 5, 1e-4, 0.75, 1.0, False), ref) == ""
    x = values(rng, (2, 11, 3, 5))
    ref = numpy_lrn(x, 5, 0.5, 0.75, 1.0)
    for chunk in range(1, 13):
        assert mismatch(kern.lrn(x, 5, 0.5, 0.75, 1.0, False, chunk=chunk), ref) == "", chunk


def test_lrn_large_values_leaving_the_window_round_as_caffe():
    """Caffe slides its sum (adds the head, subtracts the tail), which leaves rounding noise behind
    once a large value has left the window; every chunk of channels replays that sum, so the
    noise is Caffe's whatever the chunking."""
    x = np.array([1e4, 1e4, 1e-2, 1e-2, 1e-2, 1e-2, 1e-2], np.float32).reshape(1, 7, 1, 1)
    ref = numpy_lrn(x, 3, 1.0, 0.75, 1e-6)
    exact = lrn_reference(x.astype(np.float64), 3, 1.0, 0.75, 1e-6, False)
    assert not np.allclose(ref[0, 4:], exact[0, 4:], rtol=1e-3)  # the slide's noise, as in Caffe
    for chunk in range(1, 8):
        assert mismatch(CountingKernels().lrn(x, 3, 1.0, 0.75, 1e-6, False, chunk=chunk), ref) == "", chunk


def test_lrn_empty_blobs_launch_nothing():
    kern = CountingKernels()
    for within in (False, True):
        y = kern.lrn(np.zeros((0, 3, 4, 4), np.float32), 5, 1.0, 0.75, 1.0, within)
        assert y.shape == (0, 3, 4, 4) and y.dtype == np.float32
    assert not kern.count


# -- Softmax ---------------------------------------------------------------------------------------


def softmax_case(rng):
    ndim = int(rng.integers(1, 6))
    axis = int(rng.integers(0, ndim))
    shape = [int(rng.integers(1, 5)) for _ in range(ndim)]
    if rng.random() < 0.3:  # a score map: few classes over many positions
        shape[axis] = int(rng.integers(2, 30))
        if axis + 1 < ndim:
            shape[-1] = int(rng.integers(8, 40))
    else:
        shape[axis] = int(rng.choice([1, 2, 3, 10, 63, 64, 65, 100, 257, 1000, 1100]))
        if shape[axis] > 100:  # keep the blob small
            shape = [1 if i != axis else s for i, s in enumerate(shape)]
            if ndim > 1 and rng.random() < 0.5:
                shape[int(rng.integers(0, ndim))] = int(rng.integers(1, 8))
    x = values(rng, tuple(shape))
    if rng.random() < 0.1:
        x *= np.float32(1e30)
    return x, axis


def test_softmax_kernels_match_numpy(one_block):
    """softmax_rows and softmax_columns, forced and chosen by the launcher: 200+ cases each."""
    rng = np.random.default_rng(21)
    kern = CountingKernels()
    failures, cases = [], 0
    while min(kern.count["softmax_rows"], kern.count["softmax_columns"]) < MIN_CASES:
        x, axis = softmax_case(rng)
        ref = softmax(np, x, axis)
        method = ("auto", "rows", "columns")[cases % 3]
        one_block(rng.random() < 0.2)
        y = kern.softmax(x, axis, method=method)
        cases += 1
        bad = mismatch(y, ref, softmax_rtol(x.shape[axis]))
        if bad:
            failures.append(f"{method} x{x.shape} axis {axis}: {bad}")
    assert not failures, f"{len(failures)} of {cases} cases differ:\n" + "\n".join(failures[:10])


def test_softmax_launcher_choice():
    """A block per row for classifier outputs, a thread per position for score maps and few classes."""
    kern = CountingKernels()
    rng = np.random.default_rng(3)
    for shape, axis, expected in [((8, 1000), 1, "softmax_rows"), ((1, 21, 40, 50), 1, "softmax_columns"),
                                  ((4096, 10), 1, "softmax_columns"), ((2, 1000, 2, 2), 1, "softmax_rows"),
                                  ((3, 5, 7), 2, "softmax_columns")]:
        kern.count.clear()
        x = values(rng, shape)
        assert mismatch(kern.softmax(x, axis), softmax(np, x, axis), softmax_rtol(shape[axis])) == ""
        assert dict(kern.count) == {expected: 1}, shape


def test_softmax_special_rows():
    """Equal values, one huge value, -inf and NaN give what the numpy path gives."""
    x = np.array([[1, 1, 1, 1], [0, 1e30, 0, 0], [-np.inf, 0, 1, 2], [0, np.nan, 1, 2],
                  [-np.inf] * 4, [np.inf, 0, 1, 2]], np.float32)
    kern = CountingKernels()
    with np.errstate(invalid="ignore"):
        ref = softmax(np, x, 1)
    for method in ("rows", "columns"):
        assert mismatch(kern.softmax(x, 1, method=method), ref) == "", method


# -- the layers on the GPU code path ---------------------------------------------------------------


def _net(layers):
    return ('name: "t"\nlayer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 7 dim: 5 '
            'dim: 6 } } }\nlayer { name: "t" type: "Input" top: "t" input_param { shape { dim: 2 dim: 5 '
            'dim: 6 } } }\n' + layers)


LAYER_NET = _net(
    'layer { name: "a" type: "LRN" bottom: "x" top: "a" lrn_param { local_size: 5 alpha: 0.3 beta: 0.75 } }\n'
    'layer { name: "b" type: "LRN" bottom: "x" top: "b" lrn_param { local_size: 3 alpha: 0.2 beta: 0.6 '
    'norm_region: WITHIN_CHANNEL } }\n'
    'layer { name: "c" type: "Softmax" bottom: "a" top: "c" }\n'
    'layer { name: "d" type: "Softmax" bottom: "b" top: "d" softmax_param { axis: -1 } }\n'
    'layer { name: "e" type: "SoftmaxWithLoss" bottom: "x" bottom: "t" top: "loss" top: "prob" }\n')


def _counting(monkeypatch, xp):
    """Count the launches of our kernels on the backend whose array module is xp."""
    kern = backend.kernels_for(xp)
    count = collections.Counter()
    plain = kern.launch

    def launch_(module, name, grid, block, args):
        count[name] += 1
        plain(module, name, grid, block, args)

    monkeypatch.setattr(kern, "launch", launch_)
    return count


@pytest.mark.parametrize("backend_name", ["harness", "strict"])
def test_layers_use_the_kernels_on_the_gpu_path(tmp_path, monkeypatch, backend_name):
    """LRN (both regions), Softmax (two axes) and SoftmaxWithLoss each take one launch; results as numpy."""
    path = tmp_path / "net.prototxt"
    path.write_text(LAYER_NET)
    rng = np.random.default_rng(8)
    inputs = {"x": rng.standard_normal((2, 7, 5, 6)).astype(np.float32),
              "t": rng.integers(0, 7, (2, 5, 6)).astype(np.float32)}
    ref = caffeish.Net(str(path), None, TEST, keep=True)
    ref.forward(**inputs)
    net = caffeish.Net(str(path), None, TEST, keep=True, backend=backend_name)
    count = _counting(monkeypatch, net.xp)
    net.forward(**inputs)
    assert dict(count) == {"lrn_across": 1, "lrn_within": 1, "softmax_columns": 3}
    for name in ("a", "b", "c", "d", "prob", "loss"):
        assert mismatch(np.asarray(net.blobs[name].data), np.asarray(ref.blobs[name].data), 1e-5) == "", name


# Golden cases (../shared/golden) with LRN, Softmax or SoftmaxWithLoss layers.
NORM_GOLDEN = ["alexnet_tiny", "fcn_alexnet_tiny", "googlenet_tiny", "lenet_real_weights", "losses",
               "mobilenet_tiny", "normalization", "resnet50_tiny", "routing", "squeezenet11_tiny"]


def test_norm_golden_list_is_complete():
    found = []
    for case in golden.cases():
        text = open(os.path.join(golden.GOLDEN, case, "net.prototxt")).read()
        if any(f'type: "{t}"' in text for t in ("LRN", "Softmax", "SoftmaxWithLoss")):
            found.append(case)
    assert not golden.cases() or found == NORM_GOLDEN


@pytest.mark.parametrize("case", NORM_GOLDEN)
def test_golden_nets_through_the_norm_kernels(case, monkeypatch):
    """Each golden net with LRN/Softmax layers matches Caffe on the harness backend, through norm.cu."""
    shared_path("golden", case)
    counts = collections.Counter()
    plain = launch.Kernels.launch

    def launch_(self, module, name, grid, block, args):
        counts[name] += 1
        plain(self, module, name, grid, block, args)

    monkeypatch.setattr(launch.Kernels, "launch", launch_)
    net, meta, folder = golden.run_case(case, backend="harness")
    assert NORM_KERNELS & set(counts), f"{case}: no norm.cu kernel ran ({dict(counts)})"
    failures = golden.blob_failures(net, meta, folder)
    assert not failures, f"{case}: " + "; ".join(failures)
