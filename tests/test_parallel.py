"""caffeish.runtime.parallel: numpy passes split over threads give the same result as one pass."""
import threading

import numpy as np
import pytest

from caffeish.runtime import parallel


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setenv("CAFFEISH_THREADS", "2")
    monkeypatch.setattr(parallel, "MIN_ELEMENTS", 1)


def test_split_covers_every_index_once(two_threads):
    seen = []
    lock = threading.Lock()

    def fn(lo, hi):
        with lock:
            seen.append((lo, hi))

    parallel.split(np, 11, fn)
    assert len(seen) == 2
    covered = sorted(i for lo, hi in seen for i in range(lo, hi))
    assert covered == list(range(11))


def test_split_runs_on_another_thread(two_threads):
    names = set()
    parallel.split(np, 4, lambda lo, hi: names.add(threading.current_thread().name))
    assert len(names) == 2


def test_small_or_foreign_work_runs_inline(monkeypatch):
    monkeypatch.setenv("CAFFEISH_THREADS", "2")
    calls = []
    parallel.split(np, 100, lambda lo, hi: calls.append((lo, hi)))  # below MIN_ELEMENTS
    parallel.split(object(), 10 ** 7, lambda lo, hi: calls.append((lo, hi)))  # not numpy (CuPy, harness)
    parallel.split(np, 0, lambda lo, hi: calls.append((lo, hi)))  # nothing to do
    assert calls == [(0, 100), (0, 10 ** 7)]


def test_one_thread_turns_it_off(monkeypatch):
    monkeypatch.setenv("CAFFEISH_THREADS", "1")
    monkeypatch.setattr(parallel, "MIN_ELEMENTS", 1)
    calls = []
    parallel.split(np, 50, lambda lo, hi: calls.append((lo, hi)))
    assert calls == [(0, 50)]


def test_nested_calls_do_not_wait_on_the_pool(two_threads):
    out = np.zeros(64)

    def inner(lo, hi):
        out[lo:hi] += 1

    def outer(lo, hi):
        parallel.split(np, 64, inner)  # inside a worker: runs inline instead of deadlocking

    parallel.split(np, 8, outer)
    assert np.all(out == 2)


def test_errors_reach_the_caller(two_threads):
    def fn(lo, hi):
        if lo > 0:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        parallel.split(np, 10, fn)


@pytest.mark.parametrize("shape", [(3, 40, 5), (1, 1, 17), (9,), (2, 3)])
def test_copy_equals_assignment(two_threads, shape):
    rng = np.random.default_rng(0)
    src = rng.standard_normal(shape[::-1]).astype(np.float32).T  # a strided source
    dst = np.empty(shape, dtype=np.float32)
    parallel.copy(np, dst, src)
    np.testing.assert_array_equal(dst, src)
    parallel.copy(np, dst, np.float32(2.5))  # a broadcast source
    assert np.all(dst == 2.5)


# -- OpenBLAS's idle workers (caffeish.runtime.blas.tune_threads) ----------------------------


def test_blas_tuning_only_from_the_main_thread_and_when_asked(monkeypatch):
    from caffeish.runtime import blas

    monkeypatch.setitem(blas._threads, "tuned", False)
    result = []
    worker = threading.Thread(target=lambda: result.append(blas.tune_threads()))
    worker.start()
    worker.join()
    assert result == [False] and not blas._threads["tuned"]  # tried again from the main thread
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "25")  # the user's own setting wins
    assert blas.tune_threads() is False
    assert blas._threads["tuned"]
    monkeypatch.setitem(blas._threads, "tuned", False)
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT")
    monkeypatch.setenv("CAFFEISH_BLAS_TUNING", "0")
    assert blas.tune_threads() is False


def test_blas_still_multiplies_after_its_workers_restart(monkeypatch):
    from caffeish.runtime import blas

    if blas._library() is None:
        pytest.skip("numpy's OpenBLAS is not reachable here")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 200)).astype(np.float32)
    b = rng.standard_normal((200, 400)).astype(np.float32)
    before = a @ b
    monkeypatch.setitem(blas._threads, "tuned", False)
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    monkeypatch.delenv("CAFFEISH_BLAS_TUNING", raising=False)
    assert blas.tune_threads() is True
    assert "OPENBLAS_THREAD_TIMEOUT" not in __import__("os").environ  # children keep the default
    np.testing.assert_array_equal(a @ b, before)
