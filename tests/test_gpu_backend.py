"""The GPU backend without a GPU: clear errors, no CuPy import, and the GPU code path on the CPU.

The "strict" backend runs the layers' GPU branch (our CUDA kernels, compiled
for the CPU by caffeish.kernels.harness) with an array module that refuses what
CuPy refuses (caffeish.kernels.strict), so a whole net through that path is
checked against Caffe's recorded blobs here, and a numpy-only call on it fails
as it would on a GPU.  On a machine with a GPU the golden nets also run on CuPy
itself (as benchmarks/gpu_check.py does).
"""
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import golden
from conftest import ROOT, shared_path

import caffeish
from caffeish.runtime import backend
from caffeish.errors import UnsupportedError

HAVE_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None or bool(os.environ.get("CI"))
needs_cxx = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the kernel harness (g++ or $CXX)")
LENET = str(ROOT / "examples" / "lenet_deploy.prototxt")


def _run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))


def test_import_never_imports_cupy():
    code = ("import sys, numpy as np, caffeish, caffeish.kernels, caffeish.kernels.launch\n"
            f"net = caffeish.Net({LENET!r}, None, caffeish.TEST)\n"
            "net.forward(data=np.zeros(net.blobs['data'].shape, np.float32))\n"
            "print('cupy' in sys.modules)")
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.fixture
def no_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    monkeypatch.setitem(backend._state, "mode", "cpu")


def _fake_cupy(monkeypatch, count=None, error=None):
    runtime = types.SimpleNamespace()

    def get_device_count():
        if error:
            raise error
        return count

    runtime.getDeviceCount = get_device_count
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=runtime)
    monkeypatch.setitem(sys.modules, "cupy", fake)


def test_missing_cupy_is_a_clear_error(no_cupy):
    reason = backend.gpu_unavailable_reason()
    assert "CuPy is not installed" in reason and "caffeish[gpu]" in reason
    with pytest.raises(UnsupportedError, match="cannot run on the GPU: CuPy is not installed"):
        caffeish.Net(LENET, None, caffeish.TEST, device="cuda:0")
    with pytest.raises(UnsupportedError, match="CuPy is not installed"):
        backend.get("cupy")


def test_no_gpu_is_a_clear_error(monkeypatch):
    _fake_cupy(monkeypatch, count=0)
    assert backend.gpu_unavailable_reason() == "no CUDA GPU is present"
    _fake_cupy(monkeypatch, error=RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected"))
    assert "no usable CUDA GPU" in backend.gpu_unavailable_reason()
    _fake_cupy(monkeypatch, count=2)
    monkeypatch.setitem(backend._state, "device", 5)
    assert backend.gpu_unavailable_reason() == "GPU 5 does not exist: this machine has 2 (0 to 1)"


def test_set_mode_gpu_warns_and_stays_on_the_cpu(no_cupy):
    with pytest.warns(UserWarning, match="running on the CPU"):
        caffeish.set_mode_gpu()
    assert backend.mode() == "cpu"
    net = caffeish.Net(LENET, None, caffeish.TEST)
    assert net.xp is np


def test_cli_gpu_flag_without_gpu_prints_one_line(no_cupy, tmp_path, capsys):
    from PIL import Image

    from caffeish.tools import cli

    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    code = cli.main(["classify", LENET, "none", str(image), "--gpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "cannot run on the GPU" in err and "CuPy is not installed" in err


def test_unknown_device_and_backend_names():
    with pytest.raises(UnsupportedError, match="unknown device 'tpu'"):
        caffeish.Net(LENET, None, caffeish.TEST, device="tpu")
    with pytest.raises(UnsupportedError, match="unknown backend"):
        backend.get("opencl")


def test_gpu_check_reports_no_gpu_and_exits_cleanly():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = "import sys; sys.modules['cupy'] = None; sys.argv = ['gpu_check']; import runpy; " \
           "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("gpu_check: no GPU present: CuPy is not installed")


# -- the GPU code path on the CPU (strict backend) -------------------------------------------


# Every golden case (../shared/golden), the single-family ones too (activations, losses, ...).
GOLDEN_CASES = ["activations", "alexnet_tiny", "conv", "crop", "deconv", "deconv_bilinear_filler", "fcn8s_tiny",
                "fcn_alexnet_tiny", "googlenet_tiny", "inner_product", "lenet_real_weights", "losses", "misc",
                "mobilenet_tiny", "normalization", "pool", "resnet50_tiny", "routing", "squeezenet11_tiny"]
GPU_REASON = backend.gpu_unavailable_reason()


def test_golden_case_list_is_complete():
    assert not golden.cases() or sorted(golden.cases()) == GOLDEN_CASES


@needs_cxx
@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_nets_through_the_gpu_code_path(case):
    """Each layer's GPU branch (our kernels for Convolution, Deconvolution, Pooling, Crop, LRN, Softmax;
    CuPy's rules for every other layer's array calls) matches Caffe."""
    shared_path("golden", case)  # skips with a clear reason when ../shared is absent
    net, meta, folder = golden.run_case(case, backend="strict")
    assert backend.kernels_for(net.xp) is not None
    failures = golden.blob_failures(net, meta, folder)
    assert not failures, f"{case}: " + "; ".join(failures)


@pytest.mark.skipif(GPU_REASON is not None, reason=f"needs a GPU with CuPy: {GPU_REASON}")
def test_golden_nets_on_a_real_gpu():
    """On a GPU machine: every golden case on CuPy itself matches Caffe."""
    shared_path("golden")
    failures = {}
    for case in GOLDEN_CASES:
        try:
            net, meta, folder = golden.run_case(case, device="cuda")
            bad = golden.blob_failures(net, meta, folder)
        except Exception as exc:  # noqa: BLE001 (report every case, not the first)
            bad = [f"{type(exc).__name__}: {exc}"]
        if bad:
            failures[case] = bad
    assert not failures, failures


@needs_cxx
def test_device_net_returns_host_outputs_and_syncs_host_copies(tmp_path):
    """forward() hands back numpy arrays; host copies of inputs and params written by the
    caller reach the device before the next forward (pycaffe's .data semantics)."""
    net = caffeish.Net(LENET, None, caffeish.TEST, backend="strict", seed=3)
    cpu = caffeish.Net(LENET, None, caffeish.TEST, seed=3)
    x = np.random.default_rng(0).random(net.blob_shape("data"), dtype=np.float32)
    out = net.forward(data=x)
    assert all(type(v) is np.ndarray for v in out.values())
    np.testing.assert_allclose(out["prob"], cpu.forward(data=x)["prob"], rtol=1e-5, atol=1e-7)

    host = net.host_data("data")
    assert host is not net._arrays["data"]
    host[...] = x[::-1]  # pycaffe: net.blobs["data"].data[...] = image
    w = net.host_param("ip2", 0)
    w *= 0.5  # net surgery on a host copy
    cpu.params["ip2"][0].data[...] *= 0.5
    got = net.forward()["prob"]
    np.testing.assert_allclose(got, cpu.forward(data=x[::-1])["prob"], rtol=1e-5, atol=1e-7)
    assert not net._host  # copies are handed back once synced
    np.testing.assert_array_equal(backend.to_numpy(net._params["ip2"][0]), cpu.params["ip2"][0].data)

    net.host_param("ip1", 1)[...] = 7.0  # synced by save()
    path = tmp_path / "w.caffemodel"
    net.save(str(path))
    reloaded = caffeish.Net(LENET, str(path), caffeish.TEST)
    assert np.all(reloaded.params["ip1"][1].data == 7.0)


@needs_cxx
def test_device_path_handles_nd_convolution_and_several_bottoms():
    """3-D convolutions fall back to the array code with the device's xp; shared weights serve each bottom."""
    from caffeish.formats.schema import pb

    net_param = pb.NetParameter()
    inp = net_param.layer.add(name="in", type="Input", top=["a", "b"])
    inp.input_param.shape.add(dim=[1, 2, 5, 6, 7])
    inp.input_param.shape.add(dim=[1, 2, 5, 6, 7])
    conv = net_param.layer.add(name="c", type="Convolution", bottom=["a", "b"], top=["ya", "yb"])
    cp = conv.convolution_param
    cp.num_output = 4
    cp.kernel_size.extend([3, 2, 3])
    cp.pad.append(1)
    cp.weight_filler.type = "gaussian"
    cp.bias_filler.type = "gaussian"
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((1, 2, 5, 6, 7)).astype(np.float32) for _ in range(2))
    dev = caffeish.Net(net_param, None, caffeish.TEST, backend="strict", seed=1).forward(a=a, b=b)
    cpu = caffeish.Net(net_param, None, caffeish.TEST, seed=1).forward(a=a, b=b)
    for name in ("ya", "yb"):
        np.testing.assert_allclose(dev[name], cpu[name], rtol=1e-5, atol=1e-5)
