"""Benchmark: one training step (forward + backward) of caffeish against PyTorch eager, same nets and weights.

    python benchmarks/train_step.py [--rounds 3] [--repeat 3] [--warmup 2] [--nets fcn_alexnet,fcn8s] [--threads 2]
                                    [--size S] [--batch B] [--no-profile] [--top 12] [--no-f64]
                                    [--gpu [--device N] | --cpu]

Nets (deploy prototxts from ../shared/models, beside the repository), each made
a training net: an Input `label` (N x 1 x H x W) and a SoftmaxWithLoss layer
(bottoms: the deploy net's output `score` and `label`; top `loss`) are added,
and the net is built at TRAIN, so Dropout is active:
  * fcn_alexnet  DIGITS' FCN-Alexnet, 1 x 3 x 500 x 500
  * fcn8s        FCN-8s (VGG-16),     1 x 3 x 384 x 384
--size S makes both S x S, --batch B their batch size.

A first subprocess builds the caffeish training net, gives every parameter
random values (as benchmarks/cpu_forward.py: He-scaled gaussians, std
sqrt(2 / fan_in); biases std 0.01) and saves them with net.save() to a
temporary caffemodel.  The input is uniform in [0, 255), the label map uniform
integers in [0, classes).  Then, --rounds times, alternating, each in its own
fresh subprocess (so that the slow spells of a shared machine hit both alike),
--warmup untimed steps (2 by default) and --repeat timed steps of
  * caffeish: Net(train prototxt, caffemodel, TRAIN), inputs set once through
    net.blobs[...].data[...]; a step is net.clear_param_diffs(); net.forward();
    net.backward();
  * PyTorch eager: the same graph in torch.nn.functional (benchmarks/torch_graph.py)
    with the same weights as leaf tensors (requires_grad where Caffe's lr_mult is
    not 0: FCN's fixed deconvolutions get no gradient on either side); a step is
    zero_grad(set_to_none=True), forward, loss.backward().
Both use --threads threads (torch.set_num_threads; OMP/OPENBLAS/MKL_NUM_THREADS
for numpy's BLAS) and the same glibc allocator tuning
(caffeish.runtime.backend.tune_allocator: freed memory stays in the process).
A training run is thousands of steps, and its step time is what follows a
process's first ones: those fill the heap (caffeish's first step makes every
diff; on the 2-core VM its first two steps took 16.8k and 2.7k page faults,
later ones none, and the second was 0.1-0.15 s slower than the rest), load
the caches and, on the GPU, run cuDNN's algorithm search.  Both sides get the
same --warmup; the line under the table gives each side's last warm-up step
(with --warmup 1, the process's second step is timed).

Correctness, printed beside the timings: the two losses of the steps (Dropout
masks differ, so they agree only roughly where the net has Dropout), and one
step of the same net built at TEST (Dropout is the identity) on each side: the
loss and the gradients of the first convolution's weights and of the last
learned convolution's weights, as max|caffeish - PyTorch| / max|PyTorch|, and
(unless --no-f64) both measured against the same step in float64 in PyTorch.
Differences of ~1e-4 in the first layers' gradients are float32 noise: FCNs
pad the input by 100, so max pooling windows in the padded border hold equal
(or 1-ulp apart) values, and which one takes the gradient flips with summation
order, on either side; the float64 column shows whose float32 flipped.

Memory: the peak resident set of each worker (getrusage ru_maxrss: interpreter,
libraries, weights, and the step's blobs, diffs and gradients), its RSS after
loading, and their difference (what the steps add).  The PyTorch worker also
builds the caffeish Net (never run) to read the graph; PyTorch's parameters
alias that Net's arrays, so the weights are held once.

Per-layer breakdown (unless --no-profile): a further caffeish worker times each
layer's forward and backward (wrapping node.layer.forward/backward) over
--repeat steps, keeps each one's least time (the least disturbed by other work)
and prints the layer types and the --top layers that take the most; a PyTorch
worker prints torch.profiler's top operators by self time for one step.

--gpu (automatic when CuPy sees a CUDA GPU unless --cpu): the same at batch 8
(unless --batch) on the GPU, caffeish (CuPy + our kernels) against PyTorch/cuDNN
(cudnn.benchmark on, TF32 off for matmul and convolution); memory is then the
GPU memory each side holds at its peak (CuPy's pool / PyTorch's caching
allocator, max reserved), besides the host RSS.
"""
import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = pathlib.Path(__file__).resolve().parent
SHARED = pathlib.Path(os.environ.get("CAFFEISH_SHARED", ROOT.parent / "shared"))

# key: (prototxt under ../shared, default input shape on the CPU)
NETS = {
    "fcn_alexnet": ("models/digits/examples/semantic-segmentation/fcn_alexnet.deploy.prototxt", (1, 3, 500, 500)),
    "fcn8s": ("models/fcn/voc-fcn8s/deploy.prototxt", (1, 3, 384, 384)),
}
GPU_BATCH = 8
AGREE = 1e-3  # gradient agreement accepted (float32, deep nets, different summation orders)
RATIO_TARGET = 1.0

sys.path.insert(0, str(BENCH))
# The worker plumbing and memory readings are cpu_forward.py's (one copy).
from cpu_forward import _peak_kb, _rss_kb, checked_nets, mib, rel_diff  # noqa: E402
from cpu_forward import run_worker as _run_worker  # noqa: E402


def run_worker(kind, spec, threads):
    """One of this file's workers in a fresh interpreter (see cpu_forward.run_worker)."""
    return _run_worker(kind, spec, threads, script=__file__, path=(str(BENCH),))


# ---------------------------------------------------------------------------- the training net


def training_net(prototxt, shape):
    """The deploy NetParameter with input shape `shape`, an Input `label` and a SoftmaxWithLoss `loss`."""
    from caffeish.formats import io

    net = io.read_net(str(prototxt))
    data = None
    for layer in net.layer:
        if layer.type == "Input" and "data" in layer.top:
            data = layer
    if data is None:
        raise ValueError(f"{prototxt}: no Input layer with top 'data'")
    del data.input_param.shape[:]
    for top in data.top:
        data.input_param.shape.add().dim.extend(shape)
    consumed = {b for layer in net.layer for b in layer.bottom}
    outputs = [t for layer in net.layer for t in layer.top if t not in consumed]
    if not outputs:
        raise ValueError(f"{prototxt}: no output blob")
    score = outputs[-1]
    label = net.layer.add(name="label", type="Input", top=["label"])
    label.input_param.shape.add().dim.extend([shape[0], 1, shape[2], shape[3]])
    net.layer.add(name="loss", type="SoftmaxWithLoss", bottom=[score, "label"], top=["loss"])
    return net, score


# ---------------------------------------------------------------------------- workers (subprocesses)






def _counts(spec):
    """(timed steps, warm-up steps) of a worker: one untimed step for the correctness check."""
    return (0, 1) if spec.get("check") else (spec["repeat"], spec["warmup"])


def _timed(step, repeat, warmup, sync):
    """(times of `repeat` steps after `warmup` untimed ones, their losses (the last warm-up's
    first), the warm-up steps' times) (see the module doc)."""
    warm, loss = [], None
    for _ in range(max(1, warmup)):  # first-touch allocations, caches, cuDNN's algorithm search
        t = time.perf_counter()
        loss = step()
        sync()
        warm.append(time.perf_counter() - t)
    times, losses = [], [loss]
    for _ in range(repeat):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
        losses.append(loss)
    return times, losses, warm


def _learned_convs(net):
    """Names of the first and the last Convolution with a learned (lr_mult != 0) weight."""
    convs = [n.name for n in net.nodes if n.type == "Convolution"
             and (not len(n.param.param) or n.param.param[0].lr_mult != 0)]
    return [convs[0], convs[-1]] if len(convs) > 1 else convs


def _caffeish_net(spec, phase=None):
    import numpy as np

    import caffeish

    phase = caffeish.TRAIN if phase is None else phase
    device = f"cuda:{spec['device']}" if spec["gpu"] else "cpu"
    net = caffeish.Net(spec["prototxt"], spec["weights"], phase, device=device)  # keep=True: backward needs blobs
    with np.load(spec["input_file"]) as f:
        net.blobs["data"].data[...] = f["data"]
        net.blobs["label"].data[...] = f["label"]
    return net


def _cupy_sync(spec):
    if not spec["gpu"]:
        return lambda: None
    import cupy

    return cupy.cuda.Device(spec["device"]).synchronize


def worker_prepare(spec):
    """Build the caffeish training net, randomize its parameters, save the caffemodel."""
    import numpy as np

    import caffeish

    net = caffeish.Net(spec["prototxt"], None, caffeish.TRAIN, keep=False)
    rng = np.random.default_rng(spec["seed"])
    for blobs in net.params.values():
        for blob in blobs:
            shape = blob.data.shape
            std = (2.0 / max(1, int(np.prod(shape[1:])))) ** 0.5 if len(shape) >= 2 else 0.01
            blob.data[...] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    net.save(spec["weights"])
    return {"classes": int(net.blobs[spec["score"]].shape[1]), "convs": _learned_convs(net),
            "dropout": any(n.type == "Dropout" for n in net.nodes)}


def worker_caffeish(spec):
    import caffeish

    net = _caffeish_net(spec, caffeish.TEST if spec.get("check") else None)
    after_load, load_peak = _rss_kb(), _peak_kb()

    def step():
        net.clear_param_diffs()
        loss = float(net.forward()["loss"])
        net.backward()
        return loss

    sync = _cupy_sync(spec)
    times, losses, warm = _timed(step, *_counts(spec), sync=sync)
    result = {"times": times, "losses": losses, "warm": warm, "peak_kb": _peak_kb(), "after_load_kb": after_load,
              "load_peak_kb": load_peak}
    if spec["gpu"]:
        import cupy

        result["gpu_peak_b"] = cupy.get_default_memory_pool().total_bytes()  # the pool never shrinks by itself
    if spec.get("check"):
        import numpy as np

        np.savez(spec["output_file"], **{c: np.asarray(net.params[c][0].diff) for c in spec["convs"]})
    return result


def _torch_setup(spec):
    """Allocator tuning and threads as caffeish's, then torch; returns (torch, device)."""
    from caffeish.runtime import backend

    backend.tune_allocator()  # the same mallopt settings caffeish's Net makes
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["gpu"]:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        return torch, f"cuda:{spec['device']}"
    return torch, "cpu"


def _torch_net(spec, torch, device, phase=None):
    import numpy as np
    from torch_graph import TorchNet

    import caffeish

    phase = caffeish.TRAIN if phase is None else phase
    # The graph and the weights come from a caffeish Net that never runs; on the CPU PyTorch's
    # parameters alias its arrays (no second copy); on the GPU they are copied to the device.
    net = caffeish.Net(spec["prototxt"], spec["weights"], phase)
    tnet = TorchNet(net, device=device, grad=True)
    with np.load(spec["input_file"]) as f:
        x = torch.from_numpy(f["data"]).to(device)
        label = torch.from_numpy(f["label"]).to(device)
    for name in net.input_names:  # the caffeish Net's own input arrays are not needed
        net._arrays.pop(name, None)
    if spec["gpu"] and not spec.get("check"):
        net._params.clear()  # copied to the device: the host copies are not needed
    return net, tnet, x, label


def _torch_step(tnet, x, label):
    def step():
        tnet.zero_grad()
        loss = tnet(data=x, label=label)["loss"]
        loss.backward()
        return float(loss.detach())
    return step


def worker_torch(spec):
    import caffeish

    torch, device = _torch_setup(spec)
    _net, tnet, x, label = _torch_net(spec, torch, device, caffeish.TEST if spec.get("check") else None)
    after_load, load_peak = _rss_kb(), _peak_kb()
    sync = torch.cuda.synchronize if spec["gpu"] else (lambda: None)
    times, losses, warm = _timed(_torch_step(tnet, x, label), *_counts(spec), sync=sync)
    result = {"times": times, "losses": losses, "warm": warm, "peak_kb": _peak_kb(), "after_load_kb": after_load,
              "load_peak_kb": load_peak, "version": torch.__version__, "threads": torch.get_num_threads()}
    if spec["gpu"]:
        result["gpu_peak_b"] = torch.cuda.max_memory_reserved()
        result["cudnn"] = torch.backends.cudnn.version()
    if spec.get("check"):
        import numpy as np
        from torch_graph import TorchNet

        saved = {c: g[0].detach().cpu().numpy() for c, g in tnet.grads().items() if c in spec["convs"]}
        if spec.get("f64"):  # the same step in float64: the reference both float32 results are measured against
            del tnet
            ref = TorchNet(_net, device=device, grad=True, dtype=torch.float64)
            loss = ref(data=x, label=label)["loss"]
            loss.backward()
            result["loss_f64"] = float(loss.detach())
            saved.update({c + "@f64": g[0].detach().cpu().numpy() for c, g in ref.grads().items()
                          if c in spec["convs"]})
        np.savez(spec["output_file"], **saved)
    return result


def worker_profile_caffeish(spec):
    """Per-layer forward and backward times of caffeish: the least over --repeat steps (after a warm-up),
    which is the least disturbed by other work on a shared machine."""
    net = _caffeish_net(spec)
    sync = _cupy_sync(spec)
    clock = time.perf_counter
    types = {n.name: n.type for n in net.nodes}
    current = {}  # (layer, 0 forward / 1 backward) -> seconds in the step being run
    active = [False]

    def wrap(node, attr, slot):
        fn = getattr(node.layer, attr)
        key = (node.name, slot)

        def timed(*args, **kwargs):
            if not active[0]:
                return fn(*args, **kwargs)
            sync()
            t = clock()
            out = fn(*args, **kwargs)
            sync()
            current[key] = current.get(key, 0.0) + clock() - t
            return out
        setattr(node.layer, attr, timed)  # an instance attribute shadows the method

    for node in net.nodes:
        wrap(node, "forward", 0)
        for attr in ("forward_in_place", "forward_relu"):  # forward_relu: the Net fuses a ReLU after it
            if getattr(node.layer, attr, None) is not None:
                wrap(node, attr, 0)
        wrap(node, "backward", 1)
    history = []

    def step():
        for part, fn in (("clear_param_diffs", net.clear_param_diffs), ("forward", net.forward),
                         ("backward", net.backward)):
            sync()
            t = clock()
            fn()
            sync()
            current[part] = clock() - t

    for _ in range(spec["warmup"]):
        step()
    active[0] = True
    for _ in range(spec["repeat"]):
        current.clear()
        step()
        history.append(dict(current))

    def least(key):
        return min(h.get(key, 0.0) for h in history)

    layers = [[name, typ, least((name, 0)), least((name, 1))] for name, typ in types.items()
              if any((name, s) in h for h in history for s in (0, 1))]
    parts = {k: least(k) for k in ("clear_param_diffs", "forward", "backward")}
    totals = [sum(h[k] for k in parts) for h in history]
    return {"layers": layers, "parts": parts, "steps": len(history), "step_min": min(totals),
            "step_median": statistics.median(totals)}


def worker_profile_torch(spec):
    """torch.profiler's operator table for one PyTorch step (after a warm-up)."""
    torch, device = _torch_setup(spec)
    _net, tnet, x, label = _torch_net(spec, torch, device)
    step = _torch_step(tnet, x, label)
    step()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec["gpu"] else [])
    with profile(activities=activities) as prof:
        step()
        if spec["gpu"]:
            torch.cuda.synchronize()
    events = prof.key_averages()
    table = None
    for key in (["self_device_time_total", "self_cuda_time_total"] if spec["gpu"] else []) + ["self_cpu_time_total"]:
        try:
            table = events.table(sort_by=key, row_limit=12)
            break
        except (KeyError, AttributeError, ValueError):  # PyTorch versions name the device column differently
            continue
    return {"table": table}


WORKERS = {"prepare": worker_prepare, "caffeish": worker_caffeish, "torch": worker_torch,
           "profile_caffeish": worker_profile_caffeish, "profile_torch": worker_profile_torch}




# ---------------------------------------------------------------------------- parent




def _fmt(v):
    return "-" if v is None else f"{v:.1e}"




def _merge(row, side, res):
    merged = row.get(side)
    if merged is None:
        row[side] = res
        return
    merged["times"] += res["times"]
    merged["warm"] = merged.get("warm", []) + res.get("warm", [])
    merged["losses"] += res["losses"]
    for k in ("peak_kb", "after_load_kb", "load_peak_kb", "gpu_peak_b"):
        if res.get(k) is not None:
            merged[k] = max(merged.get(k) or 0, res[k])


def bench_net(key, args, tmp):
    import numpy as np

    from caffeish.formats import io

    rel, shape = NETS[key]
    deploy = SHARED / rel
    if not deploy.exists():
        return {"net": key, "error": f"prototxt not found: {deploy}"}
    shape = list(shape)
    if args.batch:
        shape[0] = args.batch
    if args.size:
        shape[2] = shape[3] = args.size
    folder = pathlib.Path(tmp) / key
    folder.mkdir()
    net_param, score = training_net(deploy, shape)
    prototxt = str(folder / "train.prototxt")
    io.write_prototxt(prototxt, net_param)
    spec = {"prototxt": prototxt, "weights": str(folder / "weights.caffemodel"), "score": score, "seed": 1,
            "threads": args.threads, "repeat": args.repeat, "warmup": args.warmup, "gpu": args.gpu, "device": args.device}
    row = {"net": key, "shape": shape}
    prep, err = run_worker("prepare", spec, args.threads)
    if prep is None:
        return dict(row, error=err)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=shape).astype(np.float32)
    label = rng.integers(0, prep["classes"], size=(shape[0], 1, shape[2], shape[3])).astype(np.float32)
    spec["input_file"] = str(folder / "inputs.npz")
    np.savez(spec["input_file"], data=x, label=label)
    spec["convs"] = prep["convs"]
    row["dropout"] = prep["dropout"]
    sides = ("caffeish", "torch")
    # Rounds alternate the two sides, so slow spells of a shared machine hit both alike.
    for r in range(args.rounds):
        for side in sides:
            t = time.perf_counter()
            res, err = run_worker(side, spec, args.threads)
            row[f"{side}_error"] = row.get(f"{side}_error") or err
            if res is not None:
                _merge(row, side, res)
            print(f"  [{key} round {r + 1}/{args.rounds} {side}: {time.perf_counter() - t:.0f} s"
                  + (f", steps {', '.join(f'{s:.2f}' for s in res['times'])} s" if res else ", failed") + "]",
                  flush=True)
    # Correctness: one step at TEST (Dropout off) on each side, gradients compared.
    outs = {}
    for side in sides:
        t = time.perf_counter()
        out = str(folder / f"check_{side}.npz")
        res, err = run_worker(side, dict(spec, check=True, f64=args.f64, output_file=out), args.threads)
        print(f"  [{key} check {side}: {time.perf_counter() - t:.0f} s]", flush=True)
        if res is None:
            row[f"check_{side}_error"] = err
        else:
            outs[side] = (res["losses"][0], res.get("loss_f64"), out)
    if len(outs) == 2:
        (lc, _, fc), (lt, l64, ft) = outs["caffeish"], outs["torch"]
        row["check_loss"] = (lc, lt, l64)
        with np.load(fc) as a, np.load(ft) as b:
            row["check_grads"] = {c: rel_diff(a[c], b[c]) for c in spec["convs"]}
            if l64 is not None:
                row["check_f64"] = {c: (rel_diff(a[c], b[c + "@f64"]), rel_diff(b[c], b[c + "@f64"]))
                                    for c in spec["convs"]}
    if args.profile:
        for side in sides:
            t = time.perf_counter()
            res, err = run_worker(f"profile_{side}", spec, args.threads)
            row[f"profile_{side}"] = res
            if res is None:
                row[f"profile_{side}_error"] = err
            print(f"  [{key} profile {side}: {time.perf_counter() - t:.0f} s]", flush=True)
    return row


def _median_ms(side):
    return statistics.median(side["times"]) * 1000 if side and side["times"] else None


def report(rows, args):
    import numpy as np

    torch_version = next((r["torch"].get("version") for r in rows if r.get("torch")), None)
    where = f"GPU {args.device}" if args.gpu else f"CPU, {args.threads} thread(s)"
    print()
    print(f"caffeish training step (clear_param_diffs + forward + backward) vs PyTorch eager "
          f"(zero_grad + forward + loss.backward()), {where}: median of {args.rounds} x {args.repeat} step(s) "
          f"(rounds alternate the two, each in a fresh process after {args.warmup} warm-up step(s))")
    print(f"python {platform.python_version()}, numpy {np.__version__}, PyTorch {torch_version or '-'}"
          + (f", cuDNN {next((r['torch'].get('cudnn') for r in rows if r.get('torch')), '-')}, TF32 off "
             f"(CuPy: CUPY_TF32={os.environ.get('CUPY_TF32', 'unset')})" if args.gpu else "")
          + f", {os.cpu_count()} CPU(s), {platform.machine()}, load average before: {args.load_before}")
    mem = "GPU MiB" if args.gpu else "peak MiB"
    head = (f"{'net':<12} {'input':<14} {'caffeish ms':>11} {'PyTorch ms':>10} {'ratio':>6} {'best c / t':>13} "
            f"{'c ' + mem:>10} {'t ' + mem:>10} {'c step+':>8} {'t step+':>8} {'c load':>7} {'t load':>7} "
            f"{'loss c / t':>17}")
    print(head)
    print("-" * len(head))
    problems = []
    for row in rows:
        shape = "x".join(map(str, row.get("shape", []))) or "-"
        if row.get("error"):
            print(f"{row['net']:<12} {shape:<14} error")
            problems.append(f"{row['net']}: {row['error']}")
            continue
        c, t = row.get("caffeish"), row.get("torch")
        c_ms, t_ms = _median_ms(c), _median_ms(t)
        ratio = f"{c_ms / t_ms:.2f}" if c_ms and t_ms else "-"
        best = (f"{min(c['times']) * 1e3:.0f} / {min(t['times']) * 1e3:.0f}" if c_ms and t_ms else "-")

        def peak(side):
            if not side:
                return "-"
            return f"{side['gpu_peak_b'] / 2**20:.0f}" if args.gpu else mib(side["peak_kb"])

        def step_adds(side):
            return mib(side["peak_kb"] - side["after_load_kb"]) if side and side.get("after_load_kb") else "-"

        loss = (f"{statistics.median(c['losses']):.4g} / " if c else "- / ") + \
               (f"{statistics.median(t['losses']):.4g}" if t else "-")
        print(f"{row['net']:<12} {shape:<14} {'-' if c_ms is None else f'{c_ms:.0f}':>11} "
              f"{'-' if t_ms is None else f'{t_ms:.0f}':>10} {ratio:>6} {best:>13} {peak(c):>10} {peak(t):>10} "
              f"{step_adds(c):>8} {step_adds(t):>8} {mib(c['after_load_kb']) if c else '-':>7} "
              f"{mib(t['after_load_kb']) if t else '-':>7} {loss:>17}")
        for side in ("caffeish", "torch", "check_caffeish", "check_torch", "profile_caffeish", "profile_torch"):
            if row.get(f"{side}_error"):
                problems.append(f"{row['net']}: {row[side + '_error']}")
    print()
    print(f"{'c ' + mem}/{'t ' + mem}: " + (
        "GPU memory held at the peak: CuPy's memory pool (caffeish), torch.cuda.max_memory_reserved (PyTorch)."
        if args.gpu else
        "peak resident memory (getrusage ru_maxrss) of the caffeish / PyTorch worker: interpreter,\n"
        "          libraries, weights, blobs, diffs and gradients."))
    print("best c / t: the fastest step of each (ms), the least disturbed by other work on a shared machine.")
    for row in rows:
        c, t = row.get("caffeish"), row.get("torch")
        if c and t and c.get("warm") and t.get("warm"):
            per = args.warmup

            def steps(side):
                return " / ".join(", ".join(f"{w * 1e3:.0f}" for w in side["warm"][k:k + per])
                                  for k in range(0, len(side["warm"]), per))
            print(f"warm-up steps (ms, untimed, per round) of {row['net']}: caffeish {steps(c)}; "
                  f"PyTorch {steps(t)}")
    print("c/t step+: peak RSS minus the RSS after loading (what the steps themselves add); c/t load: RSS after load.")
    print("loss c / t: median loss of the steps (TRAIN: Dropout masks differ between the two sides).")
    print()
    print("Correctness, one step at TEST (Dropout off): the losses, and the weight gradients' max|a - b| / max|b|")
    print(f"(caffeish vs PyTorch; with the float64 reference: caffeish vs it and PyTorch float32 vs it; ok when "
          f"caffeish's error is <= {AGREE:g}):")
    for row in rows:
        if row.get("error"):
            continue
        grads = row.get("check_grads")
        if not grads:
            print(f"  {row['net']:<12} -")
            continue
        lc, lt, l64 = row["check_loss"]
        f64 = row.get("check_f64")
        errs = [v[0] for v in f64.values()] if f64 else list(grads.values())
        ok = all(v is not None for v in errs) and max(errs) <= AGREE
        each = "; ".join(f"{k} {_fmt(v)}" + (f" (vs float64: caffeish {_fmt(f64[k][0])}, PyTorch {_fmt(f64[k][1])})"
                                             if f64 else "") for k, v in grads.items())
        if not ok:
            problems.append(f"{row['net']}: gradients disagree: {each}")
        print(f"  {row['net']:<12} loss caffeish {lc:.7g}, PyTorch {lt:.7g}"
              + (f", float64 {l64:.7g}" if l64 is not None else "") + f"; gradients {each}: {'ok' if ok else 'MISMATCH'}")
    if args.profile:
        profile_report(rows, args)
    print()
    for row in rows:
        c, t = row.get("caffeish"), row.get("torch")
        c_ms, t_ms = _median_ms(c), _median_ms(t)
        if c_ms and t_ms:
            ratio = c_ms / t_ms
            if args.gpu:
                cm, tm = c["gpu_peak_b"] / 2**20, t["gpu_peak_b"] / 2**20
                extra = ""
            else:
                cm, tm = c["peak_kb"] / 1024, t["peak_kb"] / 1024
                extra = (f"; the steps add {(c['peak_kb'] - c['after_load_kb']) / 1024:.0f} vs "
                         f"{(t['peak_kb'] - t['after_load_kb']) / 1024:.0f} MiB")
            print(f"target {row['net']}: time {c_ms:.0f} vs {t_ms:.0f} ms = {ratio:.2f}x PyTorch (<= {RATIO_TARGET}: "
                  f"{'met' if ratio <= RATIO_TARGET else 'MISSED'}); memory {cm:.0f} vs {tm:.0f} MiB "
                  f"({'met' if cm <= tm else 'MISSED'}){extra}")
    for p in problems:
        print("problem:", p)
    return 1 if problems else 0


def profile_report(rows, args):
    for row in rows:
        prof = row.get("profile_caffeish")
        if prof:
            layers = prof["layers"]
            total = sum(prof["parts"].values())
            in_layers = sum(f + b for _, _, f, b in layers)
            print()
            print(f"{row['net']}: caffeish per layer, least of {prof['steps']} profiled step(s) (steps took "
                  f"{prof['step_min'] * 1e3:.0f} ms at best, median {prof['step_median'] * 1e3:.0f}; least per part: "
                  f"clear_param_diffs {prof['parts']['clear_param_diffs'] * 1e3:.0f}, forward "
                  f"{prof['parts']['forward'] * 1e3:.0f}, backward {prof['parts']['backward'] * 1e3:.0f}; "
                  f"outside the layers {max(0.0, total - in_layers) * 1e3:.0f} ms; share: of the least parts' sum)")
            by_type = {}
            for _, typ, f, b in layers:
                agg = by_type.setdefault(typ, [0.0, 0.0, 0])
                agg[0] += f
                agg[1] += b
                agg[2] += 1
            print(f"  {'layer type':<16} {'n':>3} {'forward ms':>10} {'backward ms':>11} {'share':>6}")
            for typ, (f, b, n) in sorted(by_type.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
                print(f"  {typ:<16} {n:>3} {f * 1e3:>10.1f} {b * 1e3:>11.1f} {100 * (f + b) / total:>5.1f}%")
            print(f"  {'top layers':<24} {'type':<16} {'forward ms':>10} {'backward ms':>11} {'share':>6}")
            for name, typ, f, b in sorted(layers, key=lambda r: -(r[2] + r[3]))[:args.top]:
                print(f"  {name:<24} {typ:<16} {f * 1e3:>10.1f} {b * 1e3:>11.1f} {100 * (f + b) / total:>5.1f}%")
        tprof = row.get("profile_torch")
        if tprof and tprof.get("table"):
            print()
            print(f"{row['net']}: PyTorch, torch.profiler over one step, top operators by self time:")
            print(tprof["table"].rstrip())


def gpu_available(device):
    try:
        from caffeish.runtime import backend

        backend.set_device(device)
        return backend.gpu_unavailable_reason() is None
    except (ImportError, RuntimeError, OSError):
        return False


def load_average():
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "-"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed steps per worker (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps per worker before the timed ones (at least 1; see the module doc)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating caffeish/PyTorch rounds per net, each a fresh process (default 3)")
    ap.add_argument("--nets", default=",".join(NETS), help=f"comma-separated subset of {','.join(NETS)}")
    ap.add_argument("--threads", type=int, default=2, help="threads for numpy's BLAS and PyTorch (default 2)")
    ap.add_argument("--size", type=int, default=None, help="H = W of the input (default: 500 FCN-Alexnet, 384 FCN-8s)")
    ap.add_argument("--batch", type=int, default=None, help=f"batch size (default 1 on the CPU, {GPU_BATCH} on the GPU)")
    ap.add_argument("--top", type=int, default=12, help="layers listed in the per-layer breakdown")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-layer breakdown")
    ap.add_argument("--no-f64", dest="f64", action="store_false",
                    help="skip the float64 PyTorch reference of the correctness check")
    gpu = ap.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", action="store_true", default=None,
                     help="run on the GPU (default: when CuPy sees a CUDA GPU)")
    gpu.add_argument("--cpu", dest="gpu", action="store_false", help="run on the CPU even with a GPU")
    ap.add_argument("--device", type=int, default=0, help="GPU index")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        sys.path.insert(0, str(BENCH))
        result = WORKERS[args.worker](json.loads(args.spec))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    nets = checked_nets(ap, args, NETS)
    if args.warmup < 1:
        ap.error("--warmup must be at least 1")
    sys.path.insert(0, str(ROOT))
    if args.gpu is None:
        args.gpu = gpu_available(args.device)
    elif args.gpu and not gpu_available(args.device):
        print("train_step: --gpu, but no usable GPU (CuPy and CUDA) here", file=sys.stderr)
        return 2
    if args.gpu and args.batch is None:
        args.batch = GPU_BATCH
    try:
        import torch  # noqa: F401  (the parent only checks it is there; workers import it)
    except ImportError:
        print("train_step: PyTorch is not installed; it is the reference this benchmark compares with",
              file=sys.stderr)
        return 2
    args.load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="caffeish_train_") as tmp:
        rows = []
        for key in nets:
            t = time.perf_counter()
            rows.append(bench_net(key, args, tmp))
            print(f"[{key}: done in {time.perf_counter() - t:.0f} s]", flush=True)
    return report(rows, args)


if __name__ == "__main__":
    sys.exit(main())
