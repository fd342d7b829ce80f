"""Pull time and peak memory of `caffeish store pull` for a 50 MB and a 500 MB model.

    python benchmarks/store_pull.py [--sizes 50,500] [--dir /tmp/somewhere] [--keep]

For each size it writes a store model (an Input and one InnerProduct layer
whose weight makes the caffemodel SIZE MB; the caffemodel is written in 8 MiB
pieces, never from one big array), builds the index, serves the store on
loopback with caffeish's server (a thread of this process), and pulls it in a
child process: `python -m caffeish.tools.cli store pull URL NAME -o OUT` (download,
sha256, re-validation of the net).  The child's peak resident memory comes from
os.wait4's rusage (ru_maxrss), the same number `/usr/bin/time -v` reports.  A
`store list` child gives the baseline (interpreter, numpy, caffeish imported).
Memory that does not grow from 50 MB to 500 MB shows the pull streams.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from caffeish.formats import wire
from caffeish.formats.schema import pb
from caffeish.apps.store import build_index
from caffeish.apps.store_server import StoreServer

PIECE = 8 << 20
OUTPUTS = 1000


def _field(number, payload):
    return wire.tag(number, wire.LENGTH) + wire.encode_varint(len(payload)) + payload


def write_big_model(folder, megabytes, seed=0):
    """deploy.prototxt + weights.caffemodel (~megabytes MB) for Input(1, K) -> InnerProduct(1000)."""
    os.makedirs(folder, exist_ok=True)
    inputs = max(1, int(megabytes * 1e6) // (4 * OUTPUTS))
    deploy = (
        f'name: "big{megabytes}"\n'
        f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: {inputs} }} }} }}\n'
        f'layer {{ name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
        f'inner_product_param {{ num_output: {OUTPUTS} }} }}\n'
        f'layer {{ name: "prob" type: "Softmax" bottom: "fc" top: "prob" }}\n')
    with open(os.path.join(folder, "deploy.prototxt"), "w") as f:
        f.write(deploy)

    data_layer = pb.LayerParameter(name="data", type="Input", top=["data"])
    data_layer.input_param.shape.add(dim=[1, inputs])
    fc = pb.LayerParameter(name="fc", type="InnerProduct", bottom=["data"], top=["fc"])
    fc.inner_product_param.num_output = OUTPUTS

    def shape(*dims):
        dims_bytes = b"".join(wire.encode_varint(d) for d in dims)
        return _field(wire.BLOB_SHAPE, _field(1, dims_bytes))

    weight_bytes = OUTPUTS * inputs * 4
    weight_tail = shape(OUTPUTS, inputs)
    weight_blob_len = len(wire.tag(wire.BLOB_DATA, wire.LENGTH) + wire.encode_varint(weight_bytes)) \
        + weight_bytes + len(weight_tail)
    rng = np.random.default_rng(seed)
    bias_blob = _field(wire.BLOB_DATA, rng.standard_normal(OUTPUTS).astype("<f4").tobytes()) + shape(OUTPUTS)
    head = fc.SerializeToString()
    weight_head = (wire.tag(7, wire.LENGTH) + wire.encode_varint(weight_blob_len)
                   + wire.tag(wire.BLOB_DATA, wire.LENGTH) + wire.encode_varint(weight_bytes))
    tail = weight_tail + _field(7, bias_blob)
    layer_len = len(head) + len(weight_head) + weight_bytes + len(tail)
    piece = (rng.standard_normal(PIECE // 4) * 0.01).astype("<f4").tobytes()
    with open(os.path.join(folder, "weights.caffemodel"), "wb") as f:
        f.write(_field(1, f"big{megabytes}".encode()))
        f.write(_field(100, data_layer.SerializeToString()))
        f.write(wire.tag(100, wire.LENGTH) + wire.encode_varint(layer_len) + head + weight_head)
        left = weight_bytes
        while left:
            n = min(left, len(piece))
            f.write(piece[:n])
            left -= n
        f.write(tail)
    return os.path.getsize(os.path.join(folder, "weights.caffemodel"))


def run_child(argv):
    """(wall seconds, peak RSS in MB, return code) of a child process."""
    env = dict(os.environ, CAFFEISH_PROGRESS="0")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{out}{err}")
    return wall, usage.ru_maxrss / 1024, out  # ru_maxrss is in KiB on Linux


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50,500", help="model sizes in MB (default 50,500)")
    ap.add_argument("--dir", help="work folder (default: a temp folder, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.dir or tempfile.mkdtemp(prefix="caffeish-store-bench-")
    root = os.path.join(work, "store")
    cli = [sys.executable, "-m", "caffeish.tools.cli", "store"]
    try:
        for mb in sizes:
            t0 = time.perf_counter()
            size = write_big_model(os.path.join(root, f"big{mb}"), mb)
            print(f"wrote big{mb}/weights.caffemodel: {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        index, failures = build_index(root)
        assert not failures, failures
        print(f"store build (sha256 + validation of every model): {time.perf_counter() - t0:.1f} s")
        rows = []
        with StoreServer(root, port=0) as server:
            wall, rss, _ = run_child(cli + ["list", server.url])
            print(f"baseline `store list` child: peak RSS {rss:.0f} MB")
            for mb in sizes:
                for validate in (True, False):
                    out = os.path.join(work, f"out{mb}{'' if validate else '-novalidate'}")
                    extra = [] if validate else ["--no-validate"]
                    wall, rss, _ = run_child(cli + ["pull", server.url, f"big{mb}", "-o", out] + extra)
                    size = sum(f["size"] for m in index["models"] if m["name"] == f"big{mb}" for f in m["files"])
                    rows.append((size / 1e6, validate, wall, size / 1e6 / wall, rss))
                    shutil.rmtree(out)
        print()
        print(f"{'model MB':>9}  {'validate':>8}  {'wall s':>7}  {'MB/s':>6}  {'peak RSS MB':>11}")
        for size, validate, wall, rate, rss in rows:
            print(f"{size:9.1f}  {'yes' if validate else 'no':>8}  {wall:7.2f}  {rate:6.0f}  {rss:11.0f}")
    finally:
        if args.keep or args.dir:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
