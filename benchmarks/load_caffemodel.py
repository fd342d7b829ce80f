"""Benchmark: load a >= 500 MB caffemodel into numpy, against reading its bytes.

    python benchmarks/load_caffemodel.py [--mb 520] [--repeat 5] [--keep PATH]

Writes a caffemodel with random weights (a VGG-16-sized classifier head plus a
few convolutions), then times, in the same run and with the page cache warm:
  * reading the file's bytes (open().read()),
  * caffeish.formats.io.read_caffemodel (layer definitions parsed, every blob a numpy array),
and prints the medians and their ratio.  The bar is ratio <= 1.5.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from caffeish.formats import io
from caffeish.formats.schema import pb


def build(path, target_mb, seed=0):
    rng = np.random.default_rng(seed)
    net = pb.NetParameter(name="bench")
    blobs = []
    specs = [("conv1", (64, 3, 3, 3)), ("conv2", (128, 64, 3, 3)), ("conv3", (256, 128, 3, 3)),
             ("fc6", (4096, 25088)), ("fc7", (4096, 4096)), ("fc8", (1000, 4096))]
    total = 0
    for name, shape in specs:
        layer = net.layer.add(name=name, type="InnerProduct" if name.startswith("fc") else "Convolution")
        w = rng.standard_normal(shape, dtype=np.float32)
        b = rng.standard_normal(shape[0], dtype=np.float32)
        blobs.append([w, b])
        total += w.nbytes + b.nbytes
    # Pad with extra fully connected layers until the target size is reached.
    i = 0
    while total < target_mb * 2**20:
        i += 1
        layer = net.layer.add(name=f"extra{i}", type="InnerProduct")
        w = rng.standard_normal((4096, 4096), dtype=np.float32)
        blobs.append([w, rng.standard_normal(4096, dtype=np.float32)])
        total += w.nbytes + 4096 * 4
    io.write_caffemodel(path, net, blobs)
    return blobs


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
        del result
    return statistics.median(times)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=520, help="model size in MiB (default 520)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", help="write the model here and keep it (default: a temp file, removed)")
    args = ap.parse_args(argv)

    path = args.keep or os.path.join(tempfile.mkdtemp(prefix="caffeish-bench-"), "bench.caffemodel")
    expected = build(path, args.mb)
    size = os.path.getsize(path)
    try:
        read_bytes(path)  # warm the page cache
        model = io.read_caffemodel(path)
        # Correctness before speed: every blob round-trips exactly.
        got = model.arrays()
        for layer, arrays in zip(model.net.layer, expected):
            for a, b in zip(got[layer.name], arrays):
                assert a.shape == b.shape and np.array_equal(a, b), layer.name
        del got, model

        t_bytes = median_time(lambda: read_bytes(path), args.repeat)
        t_load = median_time(lambda: io.read_caffemodel(path), args.repeat)
    finally:
        if not args.keep:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
    ratio = t_load / t_bytes
    print(f"caffemodel: {size / 2**20:.0f} MiB, {len(expected)} layers")
    print(f"read bytes:            {t_bytes * 1000:8.1f} ms  ({size / 2**30 / t_bytes:.2f} GiB/s)")
    print(f"caffeish.formats.io.read_caffemodel: {t_load * 1000:8.1f} ms  ({size / 2**30 / t_load:.2f} GiB/s)")
    print(f"ratio load/read: {ratio:.2f}  (bar: <= 1.5)  {'OK' if ratio <= 1.5 else 'OVER'}")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
