"""Shared test fixtures: the read-only ../shared folder beside the checkout, and the CPU/GPU modes."""
import importlib
import importlib.util
import logging
import os
import pathlib
import shutil
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("CAFFEISH_SHARED", ROOT.parent / "shared"))


def shared_path(*parts):
    """Path under ../shared, or skip the test with a clear reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test data not found: {p} (tests read ../shared beside the checkout)")
    return p


HAVE_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None or bool(os.environ.get("CI"))


@pytest.fixture(autouse=True)
def fresh_global_seed():
    """Each test starts with the global random stream unseeded, as a new process does: a solver
    with random_seed (or caffe.set_random_seed) seeds it for the whole process, as Caffe's does."""
    from caffeish.runtime import fillers

    saved = fillers.GlobalRNG.generator
    fillers.GlobalRNG.generator = None
    yield
    fillers.GlobalRNG.generator = saved


@pytest.fixture(params=["cpu", "gpu"] + (["cuda"] if importlib.util.find_spec("cupy") else []))
def mode(request, monkeypatch):
    """Run a test in pycaffe's CPU mode, then in GPU mode on the GPU code path: our CUDA kernels
    compiled for the CPU (the harness) with an array module that refuses what CuPy refuses (the
    strict backend), so that CI runs it without a GPU; and where CuPy is installed, on CuPy itself
    ("cuda", skipped when no GPU answers)."""
    import caffeish as caffe
    from caffeish.runtime import backend

    if request.param == "cuda":
        reason = backend.gpu_unavailable_reason()
        if reason:
            pytest.skip(f"needs a GPU with CuPy: {reason}")
        caffe.set_mode_gpu()
    elif request.param == "gpu":
        if not HAVE_CXX:
            pytest.skip("no C++ compiler for the kernel harness (g++ or $CXX)")
        real_get = backend.get
        monkeypatch.setattr(backend, "gpu_unavailable_reason", lambda: None)
        monkeypatch.setattr(backend, "get",
                            lambda name=None: real_get("strict" if name is None and backend.mode() == "gpu" else name))
        caffe.set_mode_gpu()
    else:
        caffe.set_mode_cpu()
    yield request.param
    caffe.set_mode_cpu()


@pytest.fixture(scope="module")
def ray():
    """A local Ray cluster of 2 CPUs on 127.0.0.1 for a module's tests (--ray uses the one running)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'caffeish[ray]'): --ray is not tested")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """write(name, source): a module on sys.path for this test only (Python layers' modules); it and
    any `caffe` alias a test made leave sys.modules afterwards."""
    folder = tmp_path / "modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    written = []
    saved = {k: sys.modules.get(k) for k in ("caffe", "caffe.io")}

    def write(name, source):
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        written.append(name)

    yield write
    for name in written:
        sys.modules.pop(name, None)
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module
