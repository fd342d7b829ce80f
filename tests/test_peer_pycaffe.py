"""BVLC Caffe's own pycaffe unit tests, unchanged, pass on caffeish, solvers included.

The 52 tests of BVLC's python/caffe/test/*.py (../shared/peer/bvlc_pycaffe_tests, which
real Caffe passes in full) run in one subprocess through caffeish's compat wrapper
(`python -m caffeish.pycaffe.compat`, so that `import caffe` gives caffeish), from a
temporary tree laid out like Caffe's: TREE/python/caffe/test/*.py, with TREE/models and
TREE/examples pointing at ../shared/models/bvlc_caffe (test_draw.py walks them).  Each
peer test is one pytest case here.

The bar: every test passes.
"""
import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED, shared_path

PEER = SHARED / "peer" / "bvlc_pycaffe_tests"
BVLC = SHARED / "models" / "bvlc_caffe"
TIMEOUT = 240  # seconds for the whole peer run (it takes about 10 s)


# The peer runner: unittest discovery in the test folder (so that the tests import each
# other, and Python layers their own modules, by name), one JSON record per test.
RUNNER = r'''
import json, sys, time, traceback, unittest

test_dir, out_path = sys.argv[1], sys.argv[2]
results = {}


class Result(unittest.TestResult):
    def startTest(self, test):
        super().startTest(test)
        self.started = time.time()

    def put(self, test, status, message=""):
        seconds = round(time.time() - getattr(self, "started", time.time()), 3)
        results[test.id()] = {"status": status, "message": message, "seconds": seconds}

    def addSuccess(self, test):
        self.put(test, "pass")

    def addFailure(self, test, err):
        self.put(test, "fail", "".join(traceback.format_exception(*err))[-4000:])

    def addError(self, test, err):
        self.put(test, "error", "".join(traceback.format_exception(*err))[-4000:])

    def addSkip(self, test, reason):
        self.put(test, "skip", reason)

    def addExpectedFailure(self, test, err):
        self.put(test, "fail", "expectedFailure")

    def addUnexpectedSuccess(self, test):
        self.put(test, "pass")


suite = unittest.defaultTestLoader.discover(test_dir, pattern="test_*.py", top_level_dir=test_dir)
suite.run(Result())
with open(out_path, "w") as f:
    json.dump(results, f, indent=1)
'''


def peer_tests():
    """Every test id of the peer files (module.Class.method), read from their source."""
    if not PEER.is_dir():
        return []
    ids = []
    for path in sorted(PEER.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name.startswith("test"):
                        ids.append(f"{path.stem}.{node.name}.{item.name}")
    return ids


TESTS = peer_tests()


def make_tree(tmp):
    """TREE/python/caffe/test/*.py (copies: the tests write beside themselves), TREE/models, TREE/examples."""
    tree = tmp / "caffe_tree"
    test_dir = tree / "python" / "caffe" / "test"
    test_dir.mkdir(parents=True)
    for path in PEER.glob("*.py"):
        shutil.copy(path, test_dir / path.name)
    for name in ("models", "examples"):
        os.symlink(BVLC / name, tree / name)
    return tree, test_dir


@pytest.fixture(scope="module")
def peer_results(tmp_path_factory):
    shared_path("peer", "bvlc_pycaffe_tests")
    shared_path("models", "bvlc_caffe", "models")
    tmp = tmp_path_factory.mktemp("peer")
    tree, test_dir = make_tree(tmp)
    runner = tmp / "run_peer.py"
    runner.write_text(RUNNER)
    out = tmp / "results.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "caffeish.pycaffe.compat", str(runner), str(test_dir), str(out)],
        cwd=tree / "python", capture_output=True, text=True, env=env, timeout=TIMEOUT,
    )
    if not out.exists():
        pytest.fail(f"the peer run wrote no results (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text()), proc


def outcome(results, test_id):
    """(status, message) of a peer test; a module that did not import fails all its tests."""
    module = test_id.split(".")[0]
    failed_import = results.get(f"unittest.loader._FailedTest.{module}")
    if failed_import:
        return "error", f"test module {module} did not import:\n{failed_import['message']}"
    if test_id not in results:
        return "missing", "the peer run did not report this test (a setUpClass error, or a crash)"
    r = results[test_id]
    return r["status"], r["message"]


def test_six_is_installed():
    # BVLC's test_net.py, test_python_layer*.py and test_solver.py `import six` (pycaffe requires it).
    shared_path("peer", "bvlc_pycaffe_tests")
    try:
        import six  # noqa: F401
    except ImportError:
        pytest.fail("BVLC's pycaffe tests import six: pip install six (it is in caffeish's [test] extra)")


def test_the_peer_suite_is_the_one_real_caffe_passes():
    shared_path("peer", "bvlc_pycaffe_tests")
    assert len(TESTS) == 52, f"expected BVLC's 52 pycaffe tests, found {len(TESTS)}"


def test_every_peer_test_was_run(peer_results):
    results, _ = peer_results
    reported = {t for t in results if not t.startswith("unittest.loader._FailedTest.")}
    unknown = reported - set(TESTS)
    assert not unknown, f"the peer run reported tests this file does not know: {sorted(unknown)}"


def _param(test_id):
    return pytest.param(test_id, id=test_id)


@pytest.mark.parametrize("test_id", [_param(t) for t in TESTS] or
                         [pytest.param("none", marks=pytest.mark.skip(reason=f"{PEER} not found"))])
def test_peer(peer_results, test_id):
    results, _ = peer_results
    status, message = outcome(results, test_id)
    assert status == "pass", f"{test_id}: {status}\n{message}"
