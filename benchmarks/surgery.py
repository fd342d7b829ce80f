"""Benchmark: `caffeish surgery` on full-size AlexNet (61M parameters, a 244 MB caffemodel).

    python benchmarks/surgery.py [--net PATH/deploy.prototxt] [--keep DIR]

Writes BVLC AlexNet's deploy net with random weights (or uses --net), then, each
step in a fresh process (so that peak memory is its own):
  * convolutionalize --no-verify (read, reshape fc6/fc7/fc8, write prototxt + caffemodel),
  * convolutionalize with the equivalence check (both nets run at 10x3x227x227),
  * fcn --classes 21 (convolutionalize + check, score_fr, upscore, crop, both nets, weights),
and prints wall time and peak resident memory per step, next to the time to
copy the caffemodel's bytes (the floor for any read + write of the weights).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_NET = os.path.join(ROOT, "..", "shared", "models", "bvlc_caffe", "models", "bvlc_alexnet", "deploy.prototxt")


def random_weights(net_path, out, seed=0):
    """A caffemodel for `net_path` with N(0, 1/fan_in) weights (so activations stay in range)."""
    from caffeish.formats import io
    from caffeish.apps import surgery
    from caffeish.graph.graph import Graph

    net = io.read_net(net_path)
    graph = Graph(net)
    arrays = surgery.random_params(graph, np.random.default_rng(seed))
    io.write_caffemodel(out, net, surgery.blob_lists(net, arrays))


WRAPPER = ("import resource, sys; from caffeish.tools.cli import main; rc = main(sys.argv[1:]); "
           "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def timed(argv):
    """(seconds, peak RSS in MiB) of `caffeish ARGV` run in a fresh process."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *argv], check=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t
    peak = [line for line in done.stderr.splitlines() if line.startswith("peak ")][-1]
    return seconds, int(peak.split()[1]) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", default=DEFAULT_NET)
    ap.add_argument("--keep", default=None, help="folder for the files (default: a temp folder, removed)")
    args = ap.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="caffeish-surgery-bench-")
    os.makedirs(folder, exist_ok=True)
    weights = os.path.join(folder, "alexnet.caffemodel")
    try:
        if not os.path.exists(weights):
            random_weights(args.net, weights)
        size = os.path.getsize(weights)
        t = time.perf_counter()
        shutil.copyfile(weights, os.path.join(folder, "copy.caffemodel"))
        copy_s = time.perf_counter() - t
        cli = ["surgery"]
        steps = [
            ("convolutionalize --no-verify", cli + ["convolutionalize", args.net, weights, "-o",
                                                    os.path.join(folder, "a.prototxt"), "--no-verify"]),
            ("convolutionalize (verified)", cli + ["convolutionalize", args.net, weights, "-o",
                                                   os.path.join(folder, "b.prototxt")]),
            ("fcn --classes 21 (verified)", cli + ["fcn", args.net, weights, "--classes", "21", "-o",
                                                   os.path.join(folder, "fcn.prototxt")]),
        ]
        print(f"caffemodel: {size / 2**20:.0f} MiB; copying its bytes: {copy_s:.2f} s")
        for label, cmd in steps:
            seconds, peak = timed(cmd)
            print(f"{label:32s} {seconds:6.2f} s   peak RSS {peak:6.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
