"""Benchmark: caffeish's CPU forward pass against OpenCV DNN on the same nets and weights.

    python benchmarks/cpu_forward.py [--repeat 5] [--rounds 3] [--nets fcn_alexnet,fcn8s,alexnet]
                                     [--threads N] [--input-size S]

Nets (prototxts from ../shared/models, beside the repository):
  * fcn_alexnet  DIGITS' FCN-Alexnet deploy net, 1 x 3 x 500 x 500
  * fcn8s        FCN-8s (VGG-16) deploy net,     1 x 3 x 500 x 500
  * alexnet      BVLC AlexNet deploy net,        10 x 3 x 227 x 227
--input-size S makes the two fully convolutional nets S x S (AlexNet's fully
connected layers fix it at 227).

The deploy prototxts carry no fillers, so their weights would all be 0.  For
each net a first subprocess builds the caffeish Net, gives every parameter
random values (He-scaled gaussians, std sqrt(2 / fan_in), so that activations
keep their magnitude through 16 layers and the comparison means something;
biases gaussian with std 0.01), and saves them with net.save() to a temporary
caffemodel.  Then, --rounds times, alternating, each in its own fresh subprocess
(so that the slow spells of a shared machine hit both sides alike):
  * caffeish: Net(prototxt, caffemodel), one warm-up forward, then --repeat timed ones;
  * OpenCV:   cv2.dnn.readNetFromCaffe(prototxt, caffemodel), setInput, forward,
              the same way, with cv2.setNumThreads(--threads).
Both get the same random input (uniform in [0, 255)).  numpy's BLAS gets the
same thread count through OMP/OPENBLAS/MKL_NUM_THREADS.

Printed per net: the median forward time of each, their ratio, the peak
resident memory (RSS high-water mark, getrusage ru_maxrss of the subprocess:
interpreter + libraries + weights + forward; "after load" is the RSS before the
first forward, so peak - after load is what the forward itself adds), and the
maximum relative difference of the two outputs, max|a - b| / max|b|.
OpenCV (opencv-python-headless<5) is optional: without it, caffeish alone is timed.
"""
import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("CAFFEISH_SHARED", ROOT.parent / "shared"))

# key: (prototxt under ../shared, input shape, fully convolutional, extra blobs to compare)
NETS = {
    "fcn_alexnet": ("models/digits/examples/semantic-segmentation/fcn_alexnet.deploy.prototxt",
                    (1, 3, 500, 500), True, ()),
    "fcn8s": ("models/fcn/voc-fcn8s/deploy.prototxt", (1, 3, 500, 500), True, ()),
    # With random weights the softmax saturates (prob is 0 or 1), so the logits are compared too.
    "alexnet": ("models/bvlc_caffe/models/bvlc_alexnet/deploy.prototxt", (10, 3, 227, 227), False, ("fc8",)),
}

AGREE = 1e-4  # max relative difference accepted between the two outputs (float32, different summation orders)
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


# ---------------------------------------------------------------------------- workers (subprocesses)


def _rss_kb():
    """Current resident set size in KiB (Linux /proc), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_kb():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def _time_forward(run, repeat):
    run()  # warm-up: first-touch allocations, caches
    times = []
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t)
    return times, out


def worker_prepare(spec):
    """Build the caffeish Net, randomize its parameters, save the caffemodel; report the output blob."""
    import numpy as np

    from caffeish.runtime.net import Net

    net = Net(spec["prototxt"], input_shapes={spec["input"]: tuple(spec["shape"])}, keep=False)
    rng = np.random.default_rng(spec["seed"])
    for layer, blobs in net.params.items():
        for blob in blobs:
            shape = blob.data.shape
            if len(shape) >= 2:
                std = (2.0 / max(1, int(np.prod(shape[1:])))) ** 0.5
            else:
                std = 0.01
            blob.data[...] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    net.save(spec["weights"])
    return {"outputs": list(net.outputs), "inputs": list(net.inputs)}


def worker_caffeish(spec):
    import numpy as np

    from caffeish.runtime.net import Net

    x = np.load(spec["input_file"])
    net = Net(spec["prototxt"], spec["weights"], input_shapes={spec["input"]: x.shape}, keep=False)  # as the tools run nets
    after_load, load_peak = _rss_kb(), _peak_kb()
    extra = spec["compare"][1:]
    times, out = _time_forward(lambda: net.forward(blobs=extra, **{spec["input"]: x}), spec["repeat"])
    np.savez(spec["output_file"], *[np.asarray(out[b], dtype=np.float32) for b in spec["compare"]])
    return {"times": times, "peak_kb": _peak_kb(), "after_load_kb": after_load, "load_peak_kb": load_peak}


def worker_opencv(spec):
    import cv2
    import numpy as np

    cv2.setNumThreads(spec["threads"])
    x = np.load(spec["input_file"])
    net = cv2.dnn.readNetFromCaffe(spec["prototxt"], spec["weights"])
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    after_load = _rss_kb()

    def run():
        net.setInput(x)
        return net.forward(spec["compare_layers"])

    times, outs = _time_forward(run, spec["repeat"])
    np.savez(spec["output_file"], *[np.asarray(o, dtype=np.float32) for o in outs])
    return {"times": times, "peak_kb": _peak_kb(), "after_load_kb": after_load,
            "version": cv2.__version__}


WORKERS = {"prepare": worker_prepare, "caffeish": worker_caffeish, "opencv": worker_opencv}


def run_worker(kind, spec, threads, script=__file__, path=()):
    """Run one worker of `script` (this file, or another benchmark's) in a fresh interpreter with
    `threads` BLAS/OpenMP threads; returns (result dict or None, error text)."""
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), *path, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", kind, "--spec", json.dumps(spec)],
        capture_output=True, text=True, env=env, cwd=str(ROOT),
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), ""
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return None, f"{kind} worker failed (exit {proc.returncode}): " + " | ".join(tail)


# ---------------------------------------------------------------------------- parent


def output_layer(prototxt, blob):
    """The name of the last layer that writes `blob` (OpenCV's forward() takes layer names)."""
    from caffeish.formats import io

    net, _ = io.read_prototxt(prototxt)
    name = blob
    for layer in net.layer:
        if blob in layer.top:
            name = layer.name
    return name


def opencv_version():
    try:
        import cv2
    except ImportError:
        return None
    return cv2.__version__


def rel_diff(a, b):
    import numpy as np

    if a.shape != b.shape:
        return None
    return float(np.abs(a.astype(np.float64) - b).max() / (np.abs(b).max() + 1e-12))


def mib(kb):
    return f"{kb / 1024:.0f}" if kb is not None else "-"


def bench_net(key, args, tmp):
    import numpy as np

    rel, shape, fully_conv, extra = NETS[key]
    prototxt = SHARED / rel
    if not prototxt.exists():
        return {"net": key, "error": f"prototxt not found: {prototxt}"}
    shape = list(shape)
    if args.input_size and fully_conv:
        shape[2] = shape[3] = args.input_size
    folder = pathlib.Path(tmp) / key
    folder.mkdir()
    weights = str(folder / "weights.caffemodel")
    input_name = "data"
    spec = {"prototxt": str(prototxt), "input": input_name, "shape": shape, "seed": 1, "weights": weights}
    prep, err = run_worker("prepare", spec, args.threads)
    if prep is None:
        return {"net": key, "shape": shape, "error": err}
    input_name = prep["inputs"][0]
    output = prep["outputs"][0]
    x = np.random.default_rng(0).uniform(0, 255, size=shape).astype(np.float32)
    input_file = str(folder / "input.npy")
    np.save(input_file, x)
    common = dict(spec, input=input_name, input_file=input_file, repeat=args.repeat,
                  threads=args.threads, compare=[output, *extra])
    row = {"net": key, "shape": shape, "compare": common["compare"]}
    sides = [("caffeish", dict(common, output_file=str(folder / "caffeish.npz")))]
    if args.opencv:
        sides.append(("opencv", dict(common, output_file=str(folder / "opencv.npz"),
                                     compare_layers=[output_layer(str(prototxt), b) for b in common["compare"]])))
    # Rounds alternate the two sides, so slow spells of a shared machine hit both alike.
    for _ in range(args.rounds):
        for side, side_spec in sides:
            res, err = run_worker(side, side_spec, args.threads)
            row[f"{side}_error"] = row.get(f"{side}_error") or err
            if res is None:
                continue
            merged = row.get(side)
            if merged is None:
                row[side] = res
            else:
                merged["times"] += res["times"]
                for k in ("peak_kb", "after_load_kb", "load_peak_kb"):
                    if k in res and res[k] is not None:
                        merged[k] = max(merged.get(k) or 0, res[k])
    if row.get("caffeish") and row.get("opencv"):
        with np.load(folder / "caffeish.npz") as a, np.load(folder / "opencv.npz") as b:
            pairs = [(a[f"arr_{i}"], b[f"arr_{i}"]) for i in range(len(common["compare"]))]
        row["diffs"] = {name: rel_diff(p, q) for name, (p, q) in zip(common["compare"], pairs)}
        row["out_shapes"] = {name: (p.shape, q.shape) for name, (p, q) in zip(common["compare"], pairs)}
        known = [d for d in row["diffs"].values() if d is not None]
        row["rel_diff"] = max(known) if len(known) == len(pairs) else None
    return row


def report(rows, args, cv_version):
    import numpy as np

    print(f"caffeish CPU forward vs OpenCV DNN: median of {args.rounds} x {args.repeat} forward(s) "
          f"(rounds alternate caffeish and OpenCV, each in a fresh process after 1 warm-up), "
          f"{args.threads} thread(s)")
    print(f"python {platform.python_version()}, numpy {np.__version__}, "
          f"OpenCV {cv_version or ('not installed' if args.opencv_wanted else 'not used')}, {os.cpu_count()} CPU(s), {platform.machine()}")
    if not cv_version and args.opencv_wanted:
        print("OpenCV is not installed (pip install 'opencv-python-headless<5'): timing caffeish only.")
    head = (f"{'net':<12} {'input':<15} {'caffeish ms':>11} {'OpenCV ms':>10} {'ratio':>6} "
            f"{'peak MiB':>8} {'load MiB':>8} {'ld peak':>8} {'cv peak':>8} {'max rel diff':>12}")
    print(head)
    print("-" * len(head))
    problems = []
    for row in rows:
        shape = "x".join(map(str, row.get("shape", []))) or "-"
        if row.get("error"):
            print(f"{row['net']:<12} {shape:<15} error")
            problems.append(f"{row['net']}: {row['error']}")
            continue
        c, o = row.get("caffeish"), row.get("opencv")
        c_ms = statistics.median(c["times"]) * 1000 if c else None
        o_ms = statistics.median(o["times"]) * 1000 if o else None
        ratio = f"{c_ms / o_ms:.2f}" if c_ms and o_ms else "-"
        diff = row.get("rel_diff")
        if c and o and diff is None:
            verdict = "SHAPES DIFFER"
            problems.append(f"{row['net']}: output shapes (caffeish, OpenCV) {row['out_shapes']}")
        elif diff is None:
            verdict = "-"
        else:
            verdict = f"{diff:.1e} {'ok' if diff <= AGREE else 'MISMATCH'}"
            if diff > AGREE:
                problems.append(f"{row['net']}: outputs disagree: {row['diffs']}")
        print(f"{row['net']:<12} {shape:<15} {'-' if c_ms is None else f'{c_ms:.0f}':>11} "
              f"{'-' if o_ms is None else f'{o_ms:.0f}':>10} {ratio:>6} "
              f"{mib(c['peak_kb']) if c else '-':>8} {mib(c['after_load_kb']) if c else '-':>8} "
              f"{mib(c['load_peak_kb']) if c else '-':>8} "
              f"{mib(o['peak_kb']) if o else '-':>8} {verdict:>12}")
        for side in ("caffeish", "opencv"):
            if row.get(f"{side}_error"):
                problems.append(f"{row['net']}: {row[side + '_error']}")
    print()
    print("peak MiB: caffeish subprocess RSS high-water mark (getrusage ru_maxrss): interpreter, numpy,")
    print("          the loaded weights and the forward's live blobs and scratch; load MiB: its RSS after")
    print("          Net(prototxt, caffemodel), before the first forward; ld peak: its high-water mark at that")
    print("          point (peak > ld peak: the forward set the peak); cv peak: OpenCV subprocess's high-water mark.")
    print(f"max rel diff: max|caffeish - OpenCV| / max|OpenCV| over the output blob; ok when <= {AGREE:g}.")
    for row in rows:
        if len(row.get("diffs") or ()) > 1:
            each = ", ".join(f"{k} {'-' if v is None else f'{v:.1e}'}" for k, v in row["diffs"].items())
            print(f"              {row['net']}: worst of {each}")
    print("weights: random (He-scaled gaussian), saved by caffeish's net.save and read by both.")
    for p in problems:
        print("problem:", p)
    return 1 if problems else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed forwards per net (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating caffeish/OpenCV rounds per net, each a fresh process (default 3)")
    ap.add_argument("--nets", default=",".join(NETS), help=f"comma-separated subset of {','.join(NETS)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for numpy's BLAS and OpenCV")
    ap.add_argument("--input-size", type=int, default=None,
                    help="H = W of the fully convolutional nets (default 500); AlexNet stays 227")
    ap.add_argument("--no-opencv", dest="opencv", action="store_false", help="time caffeish only")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        result = WORKERS[args.worker](json.loads(args.spec))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in nets if n not in NETS]
    if unknown:
        ap.error(f"unknown net(s) {unknown}; choose from {list(NETS)}")
    if args.repeat < 1 or args.threads < 1 or args.rounds < 1:
        ap.error("--repeat, --rounds and --threads must be at least 1")
    args.opencv_wanted = args.opencv
    cv_version = opencv_version() if args.opencv else None
    args.opencv = cv_version is not None
    with tempfile.TemporaryDirectory(prefix="caffeish_bench_") as tmp:
        rows = []
        for key in nets:
            t = time.perf_counter()
            rows.append(bench_net(key, args, tmp))
            print(f"[{key}: done in {time.perf_counter() - t:.0f} s]", flush=True)
    return report(rows, args, cv_version)


if __name__ == "__main__":
    sys.exit(main())
