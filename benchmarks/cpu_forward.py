"""Benchmark: caffeish's CPU forward pass against PyTorch eager and OpenCV DNN, same nets and weights.

    python benchmarks/cpu_forward.py [--repeat 5] [--rounds 3] [--nets fcn_alexnet,fcn8s,alexnet]
                                     [--threads N] [--input-size S] [--no-torch] [--no-opencv]
                                     [--compile]

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
  * PyTorch:  the same graph in torch.nn.functional (benchmarks/torch_graph.py, the
              weights aliasing the caffeish Net's arrays), under torch.no_grad(), with
              torch.set_num_threads(--threads) and the same glibc allocator tuning caffeish
              makes (without it PyTorch pays a page fault per fresh page of every blob);
              with --compile also torch.compile of that forward (a separate side);
  * OpenCV:   cv2.dnn.readNetFromCaffe(prototxt, caffemodel), setInput, forward,
              the same way, with cv2.setNumThreads(--threads).
All get the same random input (uniform in [0, 255)).  numpy's BLAS gets the
same thread count through OMP/OPENBLAS/MKL_NUM_THREADS.

Printed per net: the median forward time of each, their ratio, the peak
resident memory (RSS high-water mark, getrusage ru_maxrss of the subprocess:
interpreter + libraries + weights + forward; "after load" is the RSS before the
first forward, so peak - after load is what the forward itself adds), and the
maximum relative difference of the two outputs, max|a - b| / max|b|.
PyTorch (pip install torch) and OpenCV (opencv-python-headless<5) are optional,
benchmark-only dependencies: a side whose library is missing is left out.
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


def worker_torch(spec):
    import numpy as np

    from caffeish.runtime import backend

    backend.tune_allocator()  # the same mallopt settings caffeish's Net makes
    import torch
    from torch_graph import TorchNet

    from caffeish.runtime.net import Net

    torch.set_num_threads(spec["threads"])
    x = np.load(spec["input_file"])
    net = Net(spec["prototxt"], spec["weights"], input_shapes={spec["input"]: x.shape}, keep=False)
    tnet = TorchNet(net, device="cpu")
    net._arrays.clear()  # only the graph and the weights (aliased by tnet) are used
    xt = torch.from_numpy(x)
    forward = tnet
    if spec.get("compile"):
        forward = torch.compile(lambda t: tnet(t))
    after_load = _rss_kb()

    def run():
        with torch.no_grad():
            return forward(xt)

    times, outs = _time_forward(run, spec["repeat"])
    wanted = spec["compare"]
    missing = [b for b in wanted if b not in outs]
    if missing:  # an intermediate blob (AlexNet's fc8): run once more keeping the tops
        with torch.no_grad():
            tnet(xt, retain=True)
        owners = {top: tensors[i] for layer, tensors in tnet.tops.items()
                  for i, top in enumerate(next(n for n in net.nodes if n.name == layer).tops)}
        outs = dict(outs, **{b: owners[b] for b in missing})
    np.savez(spec["output_file"], *[outs[b].numpy() for b in wanted])
    return {"times": times, "peak_kb": _peak_kb(), "after_load_kb": after_load, "version": torch.__version__}


WORKERS = {"prepare": worker_prepare, "caffeish": worker_caffeish, "torch": worker_torch, "opencv": worker_opencv}


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
    if args.torch:
        sides.append(("torch", dict(common, output_file=str(folder / "torch.npz"))))
    if args.torch and args.compile:
        sides.append(("compile", dict(common, output_file=str(folder / "compile.npz"), compile=True)))
    if args.opencv:
        sides.append(("opencv", dict(common, output_file=str(folder / "opencv.npz"),
                                     compare_layers=[output_layer(str(prototxt), b) for b in common["compare"]])))
    # Rounds alternate the sides, so slow spells of a shared machine hit all alike.
    for _ in range(args.rounds):
        for side, side_spec in sides:
            res, err = run_worker("torch" if side == "compile" else side, side_spec, args.threads)
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
    row["diffs"] = {}
    for side, _ in sides[1:]:
        if not (row.get("caffeish") and row.get(side)):
            continue
        with np.load(folder / "caffeish.npz") as a, np.load(folder / f"{side}.npz") as b:
            pairs = [(a[f"arr_{i}"], b[f"arr_{i}"]) for i in range(len(common["compare"]))]
        diffs = {name: rel_diff(p, q) for name, (p, q) in zip(common["compare"], pairs)}
        known = [d for d in diffs.values() if d is not None]
        row["diffs"][side] = (max(known) if len(known) == len(pairs) else None, diffs,
                              {name: (p.shape, q.shape) for name, (p, q) in zip(common["compare"], pairs)})
    return row


SIDE_NAMES = {"torch": "PyTorch", "compile": "compiled", "opencv": "OpenCV"}


def report(rows, args, cv_version, torch_version):
    import numpy as np

    others = [k for k, on in (("torch", args.torch), ("compile", args.torch and args.compile),
                              ("opencv", args.opencv)) if on]
    names = ", ".join(SIDE_NAMES[k] for k in others) or "nothing"
    print(f"caffeish CPU forward vs {names}: median of {args.rounds} x {args.repeat} forward(s) "
          f"(rounds alternate the sides, each in a fresh process after 1 warm-up), {args.threads} thread(s)")
    print(f"python {platform.python_version()}, numpy {np.__version__}, "
          f"PyTorch {torch_version or ('not installed' if args.torch_wanted else 'not used')}, "
          f"OpenCV {cv_version or ('not installed' if args.opencv_wanted else 'not used')}, "
          f"{os.cpu_count()} CPU(s), {platform.machine()}")
    if not torch_version and args.torch_wanted:
        print("PyTorch is not installed (pip install torch): timing without it.")
    if not cv_version and args.opencv_wanted:
        print("OpenCV is not installed (pip install 'opencv-python-headless<5'): timing without it.")
    head = f"{'net':<12} {'input':<15} {'caffeish ms':>11}"
    for k in others:
        head += f" {SIDE_NAMES[k] + ' ms':>12} {'ratio':>6}"
    head += f" {'peak MiB':>8} {'load MiB':>8}" + "".join(f" {SIDE_NAMES[k][:7] + ' pk':>10}" for k in others)
    head += f" {'max rel diff':>12}"
    print(head)
    print("-" * len(head))
    problems = []
    for row in rows:
        shape = "x".join(map(str, row.get("shape", []))) or "-"
        if row.get("error"):
            print(f"{row['net']:<12} {shape:<15} error")
            problems.append(f"{row['net']}: {row['error']}")
            continue
        c = row.get("caffeish")
        c_ms = statistics.median(c["times"]) * 1000 if c else None
        line = f"{row['net']:<12} {shape:<15} {'-' if c_ms is None else f'{c_ms:.0f}':>11}"
        for k in others:
            o = row.get(k)
            o_ms = statistics.median(o["times"]) * 1000 if o else None
            ratio = f"{c_ms / o_ms:.2f}" if c_ms and o_ms else "-"
            line += f" {'-' if o_ms is None else f'{o_ms:.0f}':>12} {ratio:>6}"
        line += f" {mib(c['peak_kb']) if c else '-':>8} {mib(c['after_load_kb']) if c else '-':>8}"
        for k in others:
            o = row.get(k)
            line += f" {mib(o['peak_kb']) if o else '-':>10}"
        worst = None
        for k, (diff, diffs, shapes) in row.get("diffs", {}).items():
            if diff is None:
                problems.append(f"{row['net']}: output shapes (caffeish, {SIDE_NAMES[k]}) {shapes}")
                worst = float("inf")
                continue
            if diff > AGREE:
                problems.append(f"{row['net']}: caffeish and {SIDE_NAMES[k]} disagree: {diffs}")
            worst = diff if worst is None else max(worst, diff)
        verdict = "-" if worst is None else ("SHAPES DIFFER" if worst == float("inf")
                                             else f"{worst:.1e} {'ok' if worst <= AGREE else 'MISMATCH'}")
        print(line + f" {verdict:>12}")
        for side in ("caffeish", *others):
            if row.get(f"{side}_error"):
                problems.append(f"{row['net']}: {row[side + '_error']}")
    print()
    print("ratio: caffeish's median time / that side's (below 1: caffeish is faster).")
    print("peak MiB: caffeish subprocess RSS high-water mark (getrusage ru_maxrss): interpreter, numpy,")
    print("          the loaded weights and the forward's live blobs and scratch; load MiB: its RSS after")
    print("          Net(prototxt, caffemodel), before the first forward; '... pk': the other sides' high-water marks.")
    print(f"max rel diff: max|caffeish - other| / max|other| over the compared blobs, worst side; ok when <= {AGREE:g}.")
    print("weights: random (He-scaled gaussian), saved by caffeish's net.save and read by all.")
    for p in problems:
        print("problem:", p)
    return 1 if problems else 0


def torch_version():
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def checked_nets(ap, args, known):
    """The --nets list (each one of `known`), with --repeat, --rounds and --threads at least 1;
    argparse's error otherwise."""
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in nets if n not in known]
    if unknown:
        ap.error(f"unknown net(s) {unknown}; choose from {list(known)}")
    if args.repeat < 1 or args.threads < 1 or args.rounds < 1:
        ap.error("--repeat, --rounds and --threads must be at least 1")
    return nets


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed forwards per net (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating caffeish/OpenCV rounds per net, each a fresh process (default 3)")
    ap.add_argument("--nets", default=",".join(NETS), help=f"comma-separated subset of {','.join(NETS)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for numpy's BLAS and OpenCV")
    ap.add_argument("--input-size", type=int, default=None,
                    help="H = W of the fully convolutional nets (default 500); AlexNet stays 227")
    ap.add_argument("--no-opencv", dest="opencv", action="store_false", help="leave OpenCV out")
    ap.add_argument("--no-torch", dest="torch", action="store_false", help="leave PyTorch out")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of PyTorch's forward")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        result = WORKERS[args.worker](json.loads(args.spec))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    nets = checked_nets(ap, args, NETS)
    args.opencv_wanted = args.opencv
    cv_version = opencv_version() if args.opencv else None
    args.opencv = cv_version is not None
    args.torch_wanted = args.torch
    th_version = torch_version() if args.torch else None
    args.torch = th_version is not None
    with tempfile.TemporaryDirectory(prefix="caffeish_bench_") as tmp:
        rows = []
        for key in nets:
            t = time.perf_counter()
            rows.append(bench_net(key, args, tmp))
            print(f"[{key}: done in {time.perf_counter() - t:.0f} s]", flush=True)
    return report(rows, args, cv_version, th_version)


if __name__ == "__main__":
    sys.exit(main())
