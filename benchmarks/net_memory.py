"""Benchmark: what keeping every blob (pycaffe's behaviour, caffeish.Net's default) costs in memory.

    python benchmarks/net_memory.py [--size 500] [--repeat 1]

FCN-8s (../shared/models/fcn/voc-fcn8s/deploy.prototxt, beside the repository),
built with weights=None and then given random weights in place (He-scaled
gaussians; the deploy net has no fillers), input 1 x 3 x S x S.  Each way runs
in its own fresh subprocess:

  * keep=True  (the default, as Caffe/pycaffe: every blob stays readable after forward)
  * keep=False (each intermediate blob is freed after its last use)

and does: build the Net, one forward, then --repeat - 1 more timed ones.
Printed for each: the peak resident memory of the subprocess (RSS high-water
mark, getrusage ru_maxrss: interpreter + libraries + weights + forward(s)),
the RSS after building the net (so peak - built is what the forwards add),
the sum of the blobs held after the last forward, and the forward time (the
first one, which pays the page faults of fresh memory, and the median of all).
With keep=True later forwards reuse the memory of the blobs they replace, but
a little of two passes overlaps: --repeat 3 peaks higher than --repeat 1.
"""
import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("CAFFEISH_SHARED", ROOT.parent / "shared"))
PROTOTXT = SHARED / "models" / "fcn" / "voc-fcn8s" / "deploy.prototxt"


def peak_rss_mb():
    """This process's RSS high-water mark in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def child(keep, size, repeat):
    """One way, in this (fresh) process: JSON on stdout."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    import caffeish

    net = caffeish.Net(str(PROTOTXT), caffeish.TEST, weights=None, keep=keep,
                       input_shapes={"data": (1, 3, size, size)})
    rng = np.random.default_rng(0)
    for params in net.params.values():  # in place: no second copy of the weights
        for p in params:
            w = p.data
            rng.standard_normal(w.shape, dtype=np.float32, out=w)
            w *= np.float32(np.sqrt(2.0 / max(1, w[0].size)) if w.ndim > 1 else 0.01)
    built = peak_rss_mb()
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, size, size)).astype(np.float32)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = net.forward(data=x)
        times.append(time.perf_counter() - start)
    kept = sum(a.nbytes for a in net._arrays.values()) / (1 << 20)
    print(json.dumps({"keep": keep, "built_mb": built, "peak_mb": peak_rss_mb(), "kept_blobs_mb": kept,
                      "first_s": times[0], "median_s": statistics.median(times), "blobs": len(net._arrays),
                      "output": list(out["score"].shape)}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=500, help="input height and width (default 500)")
    parser.add_argument("--repeat", type=int, default=1, help="forwards per way (default 1)")
    parser.add_argument("--child", choices=("True", "False"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child == "True", args.size, args.repeat)
    if not PROTOTXT.exists():
        print(f"net_memory: {PROTOTXT} not found (the shared models beside the repository)", file=sys.stderr)
        return 1
    print(f"FCN-8s, input 1x3x{args.size}x{args.size}, random weights, {args.repeat} forward(s) per way, "
          f"each way in a fresh process")
    print(f"{'way':<34} {'peak RSS':>10} {'after build':>12} {'blobs kept':>11} {'1st forward':>12} {'median':>8}")
    results = {}
    for keep in (True, False):
        run = subprocess.run([sys.executable, __file__, "--child", str(keep), "--size", str(args.size),
                              "--repeat", str(args.repeat)], capture_output=True, text=True)
        if run.returncode:
            print(run.stderr, file=sys.stderr)
            return 1
        r = json.loads(run.stdout.strip().splitlines()[-1])
        results[keep] = r
        label = "keep=True (default, as pycaffe)" if keep else "keep=False (free intermediates)"
        print(f"{label:<34} {r['peak_mb']:>7.0f} MiB {r['built_mb']:>8.0f} MiB {r['kept_blobs_mb']:>7.0f} MiB "
              f"{r['first_s']:>10.2f} s {r['median_s']:>6.2f} s")
    extra = results[True]["peak_mb"] - results[False]["peak_mb"]
    print(f"keeping every blob costs {extra:.0f} MiB more peak RSS "
          f"({results[True]['peak_mb'] / results[False]['peak_mb']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
