"""Both cores for the numpy passes that BLAS does not thread (copies, padding, pooling, ReLU).

numpy releases the GIL inside its loops over big arrays, so a copy or an
elementwise pass split into slices along one axis runs on several cores from a
small pool of threads.  `split(xp, n, fn)` calls fn(lo, hi) over ranges that
cover [0, n); it runs them in the pool when xp is numpy, the work is big enough
and we are not already inside the pool, and calls fn(0, n) directly otherwise
(CuPy, the harness backends, small arrays).  The pool has as many threads as
OpenBLAS uses (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS, else the CPUs this
process may run on); CAFFEISH_THREADS overrides it, 1 turns it off.

Each slice writes its own part of the output, so the result is the same, bit
for bit, however it is split.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Below this many elements per call, a thread hand-off costs more than it saves.
MIN_ELEMENTS = 1 << 16

_pool = None
_pool_lock = threading.Lock()
_inside = threading.local()


def thread_count():
    for name in ("CAFFEISH_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _get_pool(workers):
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers != workers:
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="caffeish")
        return _pool


def _run_inside(fn, lo, hi):
    _inside.active = True
    try:
        return fn(lo, hi)
    finally:
        _inside.active = False


def split(xp, n, fn, elements=None, parts=None):
    """fn(lo, hi) over contiguous ranges covering [0, n), on the pool's threads where it pays.

    `elements`: how many array elements the whole call touches (default: n).
    """
    workers = thread_count() if parts is None else parts
    if elements is None:
        elements = n
    if (xp is not np or workers <= 1 or n < 2 or elements < MIN_ELEMENTS
            or getattr(_inside, "active", False)):
        if n > 0:
            fn(0, n)
        return
    parts = min(workers, n)
    bounds = [n * i // parts for i in range(parts + 1)]
    pool = _get_pool(workers)
    futures = [pool.submit(_run_inside, fn, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    try:
        _run_inside(fn, bounds[0], bounds[1])
    finally:
        for f in futures:
            f.result()


def copy(xp, dst, src):
    """dst[...] = src, split along the first axis long enough to share evenly (else the longest)."""
    if dst.ndim == 0:
        dst[...] = src
        return
    axis = next((i for i, s in enumerate(dst.shape) if s >= 8),
                max(range(dst.ndim), key=lambda i: dst.shape[i]))
    lead = (slice(None),) * axis
    src = xp.broadcast_to(src, dst.shape) if src.shape != dst.shape else src

    def part(lo, hi):
        dst[lead + (slice(lo, hi),)] = src[lead + (slice(lo, hi),)]

    split(xp, dst.shape[axis], part, elements=dst.size)
