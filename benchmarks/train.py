"""Benchmark: whole training iterations of `caffeish train` (Solver.step) against the same loop in PyTorch eager.

    python benchmarks/train.py [--iterations 5] [--warmup 2] [--rounds 3] [--batch 1] [--size 500]
                               [--images N] [--threads 2] [--base-lr 1e-10] [--no-check] [--save]
                               [--gpu [--device N]]

FCN-Alexnet, trained as `caffeish train` trains it (DIGITS' recipe), built in a
temporary folder (not timed):
  * --images photo-like images of --size x --size (benchmarks/dataset_build.py's
    generator; default max(4, --batch)) and label maps of 21 classes (blocks of
    random classes, a 255 ignore border), plus one validation pair;
  * `caffeish dataset segmentation` makes the DIGITS-style LMDB dataset
    (train_db/{features,labels}, PNG-encoded records, mean.binaryproto);
  * `caffeish surgery fcn bvlc_alexnet/train_val.prototxt none --classes 21
    --dataset DS --batch-size B` makes the FCN-Alexnet train/val net (Data
    layers on the dataset with its mean file; SoftmaxWithLoss normalize false,
    ignore_label 255; lr_mult 1/2, decay_mult 1/0 from AlexNet; the bilinear
    upscore fixed) and its random weights (the layers' fillers, seed 0);
  * a solver: SGD, lr_policy fixed, base_lr --base-lr (tiny, because the loss
    is a sum over 250k pixels: FCN's unnormalised recipe), momentum 0.9,
    weight_decay 5e-4, display 1.

Then, --rounds times, alternating, each in a fresh child process (peak RSS per
side; slow spells of a shared machine hit both alike), --warmup untimed and
--iterations timed iterations of
  * caffeish: the solver as `caffeish train --solver S --weights W --no-curves`
    builds it (caffeish.apps.train.prepare + Training, log lines collected),
    each iteration `solver.step(1)`: clear_param_diffs, the Data layers read
    the next batch (LMDB, PNG decode, mean subtraction; read ahead in their
    prefetch thread), forward, backward, display, apply_update (Caffe's SGD:
    decay, momentum, lr_mult, data -= update);
  * PyTorch eager: the same graph (benchmarks/torch_graph.py, the same weights)
    with torch.optim.SGD(momentum 0.9, weight_decay 5e-4 x decay_mult, lr
    base_lr x lr_mult: one param group per (lr_mult, decay_mult)); each
    iteration zero_grad(), the next batch from numpy arrays PRELOADED in the
    child (the same records decoded from the same LMDB by the parent, in key
    order, uint8) moved to a tensor and mean-subtracted in torch, forward,
    F.cross_entropy(score, label, reduction='sum', ignore_index=255) (/ batch:
    Caffe's normalize false), backward, optimizer.step(), float(loss).
So PyTorch does no LMDB reading or PNG decoding: the data phase is caffeish's
alone, and the comparison is strict on it.

Per side: the median time per iteration (ms) over the timed ones, iterations/s,
the fastest iteration, and the child's peak RSS (ru_maxrss: interpreter,
libraries, weights, momentum history, blobs, diffs); with --gpu the GPU memory
held at the peak too.  Per phase (median ms of each over the timed iterations):
zero (clear_param_diffs / zero_grad), data (caffeish: the Data layers'
forward, i.e. waiting for the prefetched batch and copying it in; PyTorch:
batch to tensor, mean), forward (the rest of the forward, the loss included),
backward, update (Solver.apply_update / optimizer.step), other (the rest of
the iteration: display, loss smoothing, listeners).  The caffeish solver's own
"Iteration N (R iter/s ...)" log lines are parsed as a cross-check.

The machine may be shared: for every round the parent measures the CPU that
other processes took while the worker ran (/proc/stat's busy time minus the
worker's own CPU time), prints it, and when some rounds had more than 0.25 of
a CPU taken, also the medians of the undisturbed rounds alone.  (On 2 cores,
another process at 100% slows both sides 2.5-3.5x, PyTorch more.)

Correctness (unless --no-check), one more child per side: 3 iterations of the
net without its Dropout layers (the masks would differ) and with weight_decay
1e4, so that decay is a visible share of each update (at 5e-4 it is ~1e-7 of
it): the loss of every iteration, the last batch (the caffeish data and label
blobs against PyTorch's batch), and the last update of the first and last
learned convolutions' weights and biases (caffeish: the param diffs after
apply_update, which hold the update; PyTorch: lr x momentum_buffer), as
max|caffeish - PyTorch| / max|PyTorch|.  caffeish sums the loss as Caffe's CPU
SoftmaxWithLoss does, a float32 running sum over the pixels, which over 250k
pixels is ~1e-4 below the float64 sum; PyTorch sums pairwise (~1e-8).  So the
caffeish loss is held to PyTorch's per-pixel losses summed in Caffe's order
(or to float64), within 1e-5.

--gpu: caffeish on CuPy (our kernels) against PyTorch CUDA with cuDNN
(cudnn.benchmark on, TF32 off), batch 8 unless --batch; both sides synchronise
the device around each phase.  Without a usable GPU it stops with a message.
--save writes the output to benchmarks/results/{cpu|gpu}_<date>_train.txt.
"""
import argparse
import contextlib
import io as _io
import json
import os
import pathlib
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
# Workers, timing, memory and the GPU set-up are train_step.py's (one copy).
from train_step import (AGREE, GPU_BATCH, RATIO_TARGET, ROOT, SHARED, _cupy_sync, _learned_convs,  # noqa: E402
                        _merge, _peak_kb, _rss_kb, _run_worker, _timed, _torch_setup, gpu_available, load_average,
                        mib, rel_diff)

ALEXNET = "models/bvlc_caffe/models/bvlc_alexnet/train_val.prototxt"
CLASSES = 21
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
CHECK_DECAY, CHECK_ITERATIONS = 1e4, 3
LOSS_AGREE = 1e-5  # relative: the same sum, float32 noise of the terms
QUIET = 0.25  # CPUs taken by other processes below which a round counts as undisturbed
PHASES = ("zero", "data", "forward", "backward", "update", "other")


def run_worker(kind, spec, threads):
    """One of this file's workers in a fresh interpreter (see cpu_forward.run_worker)."""
    return _run_worker(kind, spec, threads, script=__file__, path=(str(BENCH),))


# ---------------------------------------------------------------------------- workers (subprocesses)


def _phase_timer(sync):
    """(seconds per phase of the current iteration, wrap(obj, attr, phase)): wrap times obj.attr
    (an instance attribute shadows the method) into that phase."""
    current = {}

    def wrap(obj, attr, phase):
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            sync()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            current[phase] = current.get(phase, 0.0) + time.perf_counter() - t
            return out
        setattr(obj, attr, timed)
    return current, wrap


def _caffeish_training(spec, solver_path):
    """The solver as `caffeish train --solver S --weights W --no-curves` builds it; its log lines."""
    from caffeish.apps import train

    lines = []
    param = train.prepare(solver_path, weights=spec["weights"])
    training = train.Training(param, solver_path, gpu=spec["device"] if spec["gpu"] else None, curves=False,
                              log=lambda message, where: lines.append(message))
    return training.solver, lines


class _Losses:
    """A solver listener keeping the (smoothed; average_loss 1: the iteration's) loss of every iteration."""

    def __init__(self):
        self.values = []

    def on_train(self, it, loss, outputs):
        self.values.append(loss)


def worker_caffeish(spec):
    import numpy as np

    from caffeish.runtime import backend

    check = spec.get("check")
    solver, lines = _caffeish_training(spec, spec["check_solver" if check else "solver"])
    net = solver.net
    after_load, load_peak = _rss_kb(), _peak_kb()
    losses = _Losses()
    solver.listeners.append(losses)
    sync = _cupy_sync(spec)
    current, wrap = _phase_timer(sync)
    wrap(net, "clear_param_diffs", "zero")
    wrap(net, "_forward", "forward")
    for node in net.nodes:
        if node.type == "Data":
            wrap(node.layer, "forward", "data")
    wrap(net, "backward_from_to", "backward")
    wrap(solver, "apply_update", "update")
    phases = []

    def step():
        current.clear()
        solver.step(1)
        phases.append(dict(current))
        return losses.values[-1]

    if check:
        for _ in range(CHECK_ITERATIONS):
            step()
        saved = {"data": backend.to_numpy(net.blobs["data"].data), "label": backend.to_numpy(net.blobs["label"].data)}
        for conv in spec["convs"]:
            for j in range(len(net.params[conv])):
                saved[f"{conv}:{j}"] = backend.to_numpy(net.param_diff(conv, j))  # the last update
        np.savez(spec["output_file"], **saved)
        return {"losses": losses.values}
    times, _, warm = _timed(step, spec["repeat"], spec["warmup"], sync=sync)
    rates = [float(m.group(1)) for m in (re.match(r"Iteration \d+ \(([0-9.e+-]+) iter/s", line) for line in lines)
             if m]
    result = {"times": times, "losses": losses.values, "warm": warm, "phases": phases[len(warm):],
              "log_rates": rates[len(warm) + 1:], "peak_kb": _peak_kb(), "after_load_kb": after_load,
              "load_peak_kb": load_peak, "iter": solver.iter}
    if spec["gpu"]:
        import cupy

        result["gpu_peak_b"] = cupy.get_default_memory_pool().total_bytes()  # the pool never shrinks by itself
    return result


def _torch_training(spec, torch, device):
    """(caffeish Net, TorchNet, optimizer) of the PyTorch side: the graph and weights of the caffeish
    Net (never run), SGD with one param group per (lr_mult, decay_mult)."""
    from torch_graph import TorchNet, _lr_mult

    import caffeish

    check = spec.get("check")
    net = caffeish.Net(spec["check_torch_prototxt" if check else "torch_prototxt"], spec["weights"], caffeish.TRAIN)
    tnet = TorchNet(net, device=device, grad=True)
    for name in net.input_names:  # the caffeish Net's own input arrays are not needed
        net._arrays.pop(name, None)
    groups = {}
    for node in net.nodes:
        for j, t in enumerate(tnet.params.get(node.name, [])):
            if t.requires_grad:
                specs = node.param.param
                decay = specs[j].decay_mult if j < len(specs) else 1.0
                groups.setdefault((_lr_mult(node, j), decay), []).append(t)
    base, decay = spec["base_lr"], CHECK_DECAY if check else WEIGHT_DECAY
    optimizer = torch.optim.SGD([{"params": ts, "lr": base * lr_mult, "weight_decay": decay * decay_mult}
                                 for (lr_mult, decay_mult), ts in groups.items()],
                                lr=base, momentum=MOMENTUM, weight_decay=decay)
    if spec["gpu"] and not check:
        net._params.clear()  # copied to the device: the host copies are not needed
    return net, tnet, optimizer


def worker_torch(spec):
    import numpy as np

    torch, device = _torch_setup(spec)
    F = torch.nn.functional
    check = spec.get("check")
    net, tnet, optimizer = _torch_training(spec, torch, device)
    with np.load(spec["data_file"]) as f:  # preloaded: the LMDB's records, decoded by the parent
        images, labels, mean = f["images"], f["labels"], torch.from_numpy(f["mean"]).to(device)
    after_load, load_peak = _rss_kb(), _peak_kb()
    batch, count, ignore, norm = spec["batch"], len(images), spec["ignore_label"], spec["loss_norm"]
    sync = torch.cuda.synchronize if spec["gpu"] else (lambda: None)
    clock = time.perf_counter
    position, phases, losses, last, references = [0], [], [], {}, []

    def divisor(y):  # Caffe's normalization of SoftmaxWithLoss
        if norm == "batch":
            return batch
        if norm == "valid":
            return max(1, int((y != ignore).sum()))
        return y.numel() if norm == "full" else 1

    def step():
        current = {}
        sync()
        t = clock()
        optimizer.zero_grad()
        sync()
        current["zero"], t = clock() - t, clock()
        idx = [(position[0] + k) % count for k in range(batch)]  # Caffe's cursor: key order, wrapping
        position[0] = (position[0] + batch) % count
        x = torch.from_numpy(images[idx]).to(device).float() - mean
        y = torch.from_numpy(labels[idx]).to(device).long()
        sync()
        current["data"], t = clock() - t, clock()
        score = tnet(data=x)["score"]
        loss = F.cross_entropy(score, y, reduction="sum", ignore_index=ignore) / divisor(y)
        sync()
        current["forward"], t = clock() - t, clock()
        loss.backward()
        sync()
        current["backward"], t = clock() - t, clock()
        optimizer.step()
        sync()
        current["update"] = clock() - t
        phases.append(current)
        losses.append(float(loss.detach()))
        last.update(x=x, y=y)
        if check:  # the loss summed in Caffe's order (a float32 running sum, as its CPU loop) and in float64
            with torch.no_grad():
                nll = F.cross_entropy(score, y, reduction="none", ignore_index=ignore).flatten().cpu().numpy()
                d = divisor(y)
                references.append((float(np.cumsum(nll, dtype=np.float32)[-1] / np.float32(d)),
                                   float(F.cross_entropy(score.double(), y, reduction="sum", ignore_index=ignore)) / d))
        return losses[-1]

    if check:
        for _ in range(CHECK_ITERATIONS):
            step()
        saved = {"data": last["x"].cpu().numpy(), "label": last["y"].cpu().numpy()}
        lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        for conv in spec["convs"]:
            for j, p in enumerate(tnet.params[conv]):
                if p.requires_grad:
                    saved[f"{conv}:{j}"] = (lr[id(p)] * optimizer.state[p]["momentum_buffer"]).cpu().numpy()
        np.savez(spec["output_file"], **saved)
        return {"losses": losses, "references": references}
    times, _, warm = _timed(step, spec["repeat"], spec["warmup"], sync=sync)
    result = {"times": times, "losses": losses, "warm": warm, "phases": phases[len(warm):], "peak_kb": _peak_kb(),
              "after_load_kb": after_load, "load_peak_kb": load_peak, "version": torch.__version__,
              "threads": torch.get_num_threads()}
    if spec["gpu"]:
        result["gpu_peak_b"] = torch.cuda.max_memory_reserved()
        result["cudnn"] = torch.backends.cudnn.version()
    return result


WORKERS = {"caffeish": worker_caffeish, "torch": worker_torch}


# ---------------------------------------------------------------------------- set-up (parent)


def caffeish_cli(*argv):
    """Run a `caffeish` command in a child process; its output if it fails."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "caffeish.tools.cli", *map(str, argv)], capture_output=True,
                          text=True, env=env, cwd=str(ROOT))
    if done.returncode:
        raise RuntimeError(f"caffeish {' '.join(map(str, argv[:2]))} failed (exit {done.returncode}): "
                           + " | ".join((done.stderr or done.stdout).strip().splitlines()[-6:]))


def write_pairs(folder, n, size, seed):
    """n photo-like images (dataset_build.py's) and greyscale label maps of CLASSES classes: blocks of
    random classes, a 255 ignore border (as VOC's)."""
    import numpy as np
    from dataset_build import generate
    from PIL import Image

    generate(folder, n, size, size, seed=seed)
    rng = np.random.default_rng(seed)
    block = max(1, size // 10)
    for i in range(n):
        labels = rng.integers(0, CLASSES, (size // block + 1, size // block + 1), dtype=np.uint8)
        labels = labels.repeat(block, 0).repeat(block, 1)[:size, :size]
        labels[:3] = 255
        Image.fromarray(labels, "L").save(os.path.join(folder, "labels", f"{i:06d}.png"))


def edit_net(src, dst, drop_types=(), data_input=None):
    """Write the train/val net `src` to `dst` without the layers of `drop_types`; with data_input (a
    shape) its Data layers become one Input `data` of that shape (the label is the loop's)."""
    from caffeish.formats import io

    net = io.read_net(str(src))
    keep = [layer for layer in net.layer if layer.type not in drop_types
            and not (data_input and layer.type == "Data")]
    del net.layer[:]
    if data_input:
        inp = net.layer.add(name="data", type="Input", top=["data"])
        inp.input_param.shape.add().dim.extend(data_input)
    for layer in keep:
        net.layer.add().CopyFrom(layer)
    io.write_prototxt(str(dst), net)


def write_solver(path, net, base_lr, weight_decay):
    with open(path, "w") as f:
        f.write(f'net: "{net}"\nbase_lr: {base_lr!r}\nlr_policy: "fixed"\nmomentum: {MOMENTUM}\n'
                f'weight_decay: {weight_decay!r}\ndisplay: 1\nmax_iter: 1000000\nsnapshot: 0\n'
                f'snapshot_after_train: false\ntype: "SGD"\n')


def prepare(args, tmp):
    """Dataset, FCN-Alexnet train/val net and weights, solvers, the PyTorch nets and the preloaded
    batches; returns the workers' spec."""
    import numpy as np

    from caffeish.formats import io
    from caffeish.formats.datum import LmdbReader, datum_array
    from caffeish.formats.schema import TRAIN

    tmp = pathlib.Path(tmp)
    t = time.perf_counter()
    write_pairs(tmp / "pairs", args.images, args.size, seed=0)
    write_pairs(tmp / "val", 1, args.size, seed=1)
    ds = tmp / "dataset"
    caffeish_cli("dataset", "segmentation", "--images", tmp / "pairs" / "images", "--labels", tmp / "pairs" / "labels",
                 "--val-images", tmp / "val" / "images", "--val-labels", tmp / "val" / "labels", "-o", ds)
    alexnet = SHARED / ALEXNET
    deploy, train_val, weights = tmp / "fcn_alexnet.deploy.prototxt", tmp / "fcn_alexnet.train_val.prototxt", \
        tmp / "fcn_alexnet.caffemodel"
    caffeish_cli("surgery", "fcn", alexnet, "none", "--classes", CLASSES, "-o", deploy, weights,
                 "--train-val", train_val, "--dataset", ds, "--batch-size", args.batch,
                 "--input-shape", "data=1,3,227,227")
    net = io.read_net(str(train_val))
    data, label = (next(layer for layer in net.layer if layer.type == "Data" and top in layer.top
                        and any(r.phase == TRAIN for r in layer.include)) for top in ("data", "label"))
    loss = next(layer for layer in net.layer if layer.type == "SoftmaxWithLoss")
    tp = data.transform_param
    if tp.crop_size or tp.mirror or tp.scale != 1 or len(tp.mean_value) or not tp.mean_file:
        raise RuntimeError(f"{train_val}: the PyTorch side subtracts the mean file only; transform_param is {tp}")
    lp = loss.loss_param
    if lp.HasField("normalization"):
        norm = {lp.VALID: "valid", lp.BATCH_SIZE: "batch", lp.NONE: "none"}.get(lp.normalization, "full")
    else:
        norm = "valid" if lp.normalize else "batch"
    # The records in key order (Caffe's cursor), decoded: the PyTorch side's preloaded batches.
    with LmdbReader(data.data_param.source) as reader:
        images = np.stack([datum_array(d) for _, d in reader.datums()])
    with LmdbReader(label.data_param.source) as reader:
        labels = np.stack([datum_array(d)[0] for _, d in reader.datums()])
    mean = io.read_binaryproto(tp.mean_file).reshape(images.shape[1:]).astype(np.float32)
    data_file = tmp / "preloaded.npz"
    np.savez(data_file, images=images, labels=labels, mean=mean)
    shape = [args.batch, images.shape[1], images.shape[2], images.shape[3]]
    nodrop = tmp / "fcn_alexnet.train_val.nodropout.prototxt"
    edit_net(train_val, nodrop, drop_types=("Dropout",))
    torch_net, torch_check = tmp / "fcn_alexnet.torch.prototxt", tmp / "fcn_alexnet.torch.nodropout.prototxt"
    edit_net(train_val, torch_net, drop_types=("SoftmaxWithLoss", "Accuracy"), data_input=shape)
    edit_net(train_val, torch_check, drop_types=("SoftmaxWithLoss", "Accuracy", "Dropout"), data_input=shape)
    write_solver(tmp / "solver.prototxt", train_val, args.base_lr, WEIGHT_DECAY)
    write_solver(tmp / "check_solver.prototxt", nodrop, args.base_lr, CHECK_DECAY)
    print(f"[set-up: {len(images)} training records of {'x'.join(map(str, images.shape[1:]))}, "
          f"{time.perf_counter() - t:.0f} s]", flush=True)
    return {"solver": str(tmp / "solver.prototxt"), "check_solver": str(tmp / "check_solver.prototxt"),
            "weights": str(weights), "torch_prototxt": str(torch_net), "check_torch_prototxt": str(torch_check),
            "data_file": str(data_file), "batch": args.batch, "shape": shape, "base_lr": args.base_lr,
            "ignore_label": int(lp.ignore_label) if lp.HasField("ignore_label") else -100, "loss_norm": norm,
            "threads": args.threads, "repeat": args.iterations, "warmup": args.warmup, "gpu": args.gpu,
            "device": args.device, "records": len(images)}


def _cpu_seconds():
    """(CPU seconds the whole machine has been busy, CPU seconds of this process's finished children)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = None
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, children.ru_utime + children.ru_stime


def run_measured(side, spec, threads):
    """run_worker, and the CPU (in cores, averaged over its run) that other processes used meanwhile."""
    (busy0, own0), t = _cpu_seconds(), time.perf_counter()
    res, err = run_worker(side, spec, threads)
    (busy1, own1), wall = _cpu_seconds(), time.perf_counter() - t
    foreign = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    return res, err, wall, foreign


def learned_convs(prototxt):
    import caffeish

    return _learned_convs(caffeish.Net(prototxt, caffeish.TRAIN, keep=False))


def bench(args, tmp):
    import numpy as np

    spec = prepare(args, tmp)
    row = {"shape": spec["shape"], "records": spec["records"]}
    sides = ("caffeish", "torch")
    for r in range(args.rounds):  # alternating, so that slow spells of a shared machine hit both alike
        for side in sides:
            res, err, wall, foreign = run_measured(side, spec, args.threads)
            row[f"{side}_error"] = row.get(f"{side}_error") or err
            if res is not None:
                row.setdefault(f"{side}_phases", []).extend(res.pop("phases"))
                row.setdefault(f"{side}_log_rates", []).extend(res.pop("log_rates", []))
                row.setdefault(f"{side}_rounds", []).append((foreign, list(res["times"])))  # _merge extends res's
                _merge(row, side, res)
            print(f"  [round {r + 1}/{args.rounds} {side}: {wall:.0f} s"
                  + (f", iterations {', '.join(f'{s:.2f}' for s in res['times'])} s" if res else ", failed")
                  + ("" if foreign is None else f"; other processes: {foreign:.2f} CPU(s)") + "]", flush=True)
    if args.check:
        spec["convs"] = learned_convs(spec["check_torch_prototxt"])
        outs = {}
        for side in sides:
            t = time.perf_counter()
            out = str(pathlib.Path(tmp) / f"check_{side}.npz")
            res, err = run_worker(side, dict(spec, check=True, output_file=out), args.threads)
            print(f"  [check {side}: {time.perf_counter() - t:.0f} s]", flush=True)
            if res is None:
                row[f"check_{side}_error"] = err
            else:
                outs[side] = (res["losses"], out, res.get("references"))
        if len(outs) == 2:
            (lc, fc, _), (lt, ft, refs) = outs["caffeish"], outs["torch"]
            row["check_losses"] = [(c, t, seq, f64) for c, t, (seq, f64) in zip(lc, lt, refs)]
            with np.load(fc) as a, np.load(ft) as b:
                row["check_data"] = float(np.abs(a["data"] - b["data"]).max())
                row["check_label"] = bool(np.array_equal(a["label"].reshape(b["label"].shape), b["label"]))
                row["check_updates"] = {k: rel_diff(a[k], b[k]) for k in b.files if ":" in k}
    return row


# ---------------------------------------------------------------------------- report


def _median(values):
    return statistics.median(values) if values else None


def phase_medians(phases, times):
    """Median ms of each phase over the timed iterations ('forward' without the data layers; 'other'
    the iteration's time not in a phase)."""
    rows = []
    for p, total in zip(phases, times):
        p = dict(p)
        p["forward"] = p.get("forward", 0.0) - p.get("data", 0.0)
        p["other"] = total - sum(p.get(k, 0.0) for k in PHASES if k != "other")
        rows.append(p)
    return {k: _median([r.get(k, 0.0) * 1e3 for r in rows]) for k in PHASES}


def quiet_note(row):
    """On a shared machine: how much CPU other processes took during the rounds, and the medians of the
    rounds where they took little."""
    rounds = {side: row.get(f"{side}_rounds") or [] for side in ("caffeish", "torch")}
    loads = [f for side in rounds.values() for f, _ in side if f is not None]
    if not loads:
        return
    print(f"other processes during the rounds (CPUs, mean over each worker's run): caffeish "
          f"{', '.join(f'{f:.2f}' for f, _ in rounds['caffeish'])}; PyTorch "
          f"{', '.join(f'{f:.2f}' for f, _ in rounds['torch'])}")
    if max(loads) <= QUIET:
        return
    quiet = {side: [t for f, ts in r if f is not None and f <= QUIET for t in ts] for side, r in rounds.items()}
    if quiet["caffeish"] and quiet["torch"]:
        c, t = _median(quiet["caffeish"]) * 1e3, _median(quiet["torch"]) * 1e3
        print(f"  rounds with other processes at <= {QUIET} CPU only: caffeish {c:.0f} ms/iter "
              f"({len(quiet['caffeish'])} iterations), PyTorch {t:.0f} ms/iter ({len(quiet['torch'])}) = "
              f"{c / t:.2f}x")
    else:
        print(f"  no round of {'caffeish' if not quiet['caffeish'] else 'PyTorch'} ran with other processes at <= "
              f"{QUIET} CPU: the figures above are those of a busy machine")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(row, args):
    c, t = row.get("caffeish"), row.get("torch")
    where = f"GPU {args.device}" if args.gpu else f"CPU, {args.threads} thread(s)"
    torch_version = t.get("version") if t else "-"
    print()
    print(f"FCN-Alexnet training iterations, {'x'.join(map(str, row['shape']))} ({row['records']} training records, "
          f"SGD momentum {MOMENTUM}, weight_decay {WEIGHT_DECAY:g}, base_lr {args.base_lr:g}), {where}: "
          f"median of {args.rounds} round(s) x {args.iterations} iteration(s), each round a fresh process per side "
          f"after {args.warmup} warm-up iteration(s)")
    print(f"python {platform.python_version()}, PyTorch {torch_version}"
          + (f", cuDNN {t.get('cudnn')}, TF32 off" if args.gpu and t else "")
          + f", {os.cpu_count()} CPU(s) ({cpu_name()}), load average before: {args.load_before}")
    print("caffeish: Solver.step(1) as `caffeish train` runs it (LMDB Data layers, forward, backward, SGD update);")
    print("PyTorch:  eager, batches from preloaded numpy arrays (the same LMDB records), cross_entropy(sum), "
          "torch.optim.SGD")
    mem = "GPU MiB" if args.gpu else "peak MiB"
    head = (f"{'side':<9} {'ms/iter':>8} {'iter/s':>7} {'best ms':>8} {'peak MiB':>9} "
            + (f"{'GPU MiB':>8} " if args.gpu else "") + f"{'load MiB':>9} {'iter+ MiB':>9} {'loss (median)':>14}")
    print(head)
    print("-" * len(head))
    for name, side in (("caffeish", c), ("PyTorch", t)):
        if not side or not side.get("times"):
            print(f"{name:<9} failed")
            continue
        ms = _median(side["times"]) * 1e3
        print(f"{name:<9} {ms:>8.0f} {1e3 / ms:>7.3f} {min(side['times']) * 1e3:>8.0f} {mib(side['peak_kb']):>9} "
              + (f"{side['gpu_peak_b'] / 2**20:>8.0f} " if args.gpu else "")
              + f"{mib(side['after_load_kb']):>9} {mib(side['peak_kb'] - side['after_load_kb']):>9} "
              f"{_median(side['losses']):>14.7g}")
    problems = [row[k] for k in ("caffeish_error", "torch_error", "check_caffeish_error", "check_torch_error")
                if row.get(k)]
    c_ms = _median(c["times"]) * 1e3 if c and c.get("times") else None
    t_ms = _median(t["times"]) * 1e3 if t and t.get("times") else None
    print(f"{mem}: peak resident memory (ru_maxrss) of each side's child" if not args.gpu else
          "peak MiB: host ru_maxrss; GPU MiB: CuPy's pool (caffeish) / torch.cuda.max_memory_reserved (PyTorch)")
    print("load MiB: RSS once the net, weights and optimizer are built; iter+ MiB: what the iterations add to it.")
    print("loss: median of the iterations' losses (Dropout masks differ between the sides).")
    if c and t:
        print(f"warm-up iterations (ms, untimed): caffeish {', '.join(f'{w * 1e3:.0f}' for w in c['warm'])}; "
              f"PyTorch {', '.join(f'{w * 1e3:.0f}' for w in t['warm'])}")
    quiet_note(row)
    rates = row.get("caffeish_log_rates")
    if rates:
        print(f"caffeish solver's own log ('Iteration N (R iter/s, ...)', timed iterations): median "
              f"{_median(rates):.4g} iter/s = {1e3 / _median(rates):.0f} ms/iter (includes the phase timers)")
    if c_ms and t_ms:
        pc = phase_medians(row["caffeish_phases"], c["times"])
        pt = phase_medians(row["torch_phases"], t["times"])
        print()
        sync = ", the device synchronised around each" if args.gpu else ""
        print(f"Per phase (median ms over the timed iterations{sync}):")
        print(f"  {'phase':<9} {'caffeish':>9} {'PyTorch':>9} {'c - t':>8}   what")
        what = {"zero": "clear_param_diffs / zero_grad()",
                "data": "Data layers (prefetched LMDB batch, copy in) / preloaded batch to tensor, minus mean",
                "forward": "forward without the data layers, loss included",
                "backward": "backward_from_to / loss.backward()",
                "update": "Solver.apply_update() / optimizer.step()",
                "other": "the rest: display, loss smoothing, listeners / float(loss)"}
        for k in PHASES:
            print(f"  {k:<9} {pc[k]:>9.1f} {pt[k]:>9.1f} {pc[k] - pt[k]:>+8.1f}   {what[k]}")
        print(f"  {'sum':<9} {sum(pc.values()):>9.1f} {sum(pt.values()):>9.1f} "
              f"{sum(pc.values()) - sum(pt.values()):>+8.1f}   (of medians; the iteration's median is above)")
    if args.check:
        print()
        print(f"Correctness: {CHECK_ITERATIONS} iterations without Dropout, weight_decay {CHECK_DECAY:g} (so that "
              f"decay shows in the update):")
        if row.get("check_losses"):
            def rel(a, b):
                return abs(a - b) / max(abs(b), 1e-30)
            # caffeish sums the loss as Caffe's CPU loop does (a float32 running sum), PyTorch pairwise:
            # over 250k pixels they differ by ~1e-4; each is held to its own order and to float64.
            worst = max(min(rel(c, seq), rel(c, f64)) for c, _, seq, f64 in row["check_losses"])
            ok_loss = worst <= LOSS_AGREE
            print("  losses, caffeish / PyTorch / PyTorch's values summed in Caffe's order (float32 running sum) / "
                  "float64: " + "; ".join(f"{c:.7g} / {t:.7g} / {seq:.7g} / {f64:.7g}"
                                          for c, t, seq, f64 in row["check_losses"]))
            print(f"    caffeish vs Caffe's order: max rel {max(rel(c, s) for c, _, s, _ in row['check_losses']):.1e}, "
                  f"vs float64 {max(rel(c, f) for c, _, _, f in row['check_losses']):.1e}; PyTorch vs float64 "
                  f"{max(rel(t, f) for _, t, _, f in row['check_losses']):.1e} "
                  f"({'ok' if ok_loss else 'MISMATCH'}: caffeish within {LOSS_AGREE:g} of one of the two)")
            ok_data = row["check_data"] <= 1e-3 and row["check_label"]
            print(f"  last batch: data max|diff| {row['check_data']:.2g}, labels "
                  f"{'equal' if row['check_label'] else 'DIFFER'} ({'ok' if ok_data else 'MISMATCH'})")
            ups = row["check_updates"]
            ok_up = all(v is not None and v <= AGREE for v in ups.values())
            print("  last update (caffeish param diff vs PyTorch lr x momentum_buffer), max|a - b| / max|b|: "
                  + "; ".join(f"{k} {'-' if v is None else f'{v:.1e}'}" for k, v in ups.items())
                  + f" ({'ok' if ok_up else 'MISMATCH'}, <= {AGREE:g})")
            for ok, what in ((ok_loss, "losses"), (ok_data, "batches"), (ok_up, "updates")):
                if not ok:
                    problems.append(f"correctness: the {what} of caffeish and PyTorch disagree")
        else:
            print("  - (a check worker failed)")
    print()
    if c_ms and t_ms:
        key, scale = ("gpu_peak_b", 2**20) if args.gpu else ("peak_kb", 1024)
        print(f"target: {c_ms:.0f} vs {t_ms:.0f} ms/iter ({1e3 / c_ms:.3f} vs {1e3 / t_ms:.3f} iter/s) = "
              f"{c_ms / t_ms:.2f}x PyTorch (<= {RATIO_TARGET}: {'met' if c_ms / t_ms <= RATIO_TARGET else 'MISSED'}); "
              f"{mem} {c[key] / scale:.0f} vs {t[key] / scale:.0f}")
    print("".join(f"problem: {p}\n" for p in problems), end="")
    return int(bool(problems))


# ---------------------------------------------------------------------------- main


def _serve(kind, spec):
    print("RESULT " + json.dumps(WORKERS[kind](json.loads(spec))), flush=True)
    return 0


class _Tee(_io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=5, help="timed iterations per worker (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations per worker first (at least 1; default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating caffeish/PyTorch rounds, each a fresh process")
    ap.add_argument("--batch", type=int, default=None, help=f"batch size (default 1; {GPU_BATCH} with --gpu)")
    ap.add_argument("--size", type=int, default=500, help="H = W of the generated images (default 500)")
    ap.add_argument("--images", type=int, default=None, help="training images (default max(4, batch))")
    ap.add_argument("--threads", type=int, default=2, help="threads for numpy's BLAS and PyTorch (default 2)")
    ap.add_argument("--base-lr", type=float, default=1e-10, help="the solver's base_lr (default 1e-10)")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness check")
    ap.add_argument("--gpu", action="store_true", help="caffeish on CuPy vs PyTorch CUDA/cuDNN (needs a GPU)")
    ap.add_argument("--device", type=int, default=0, help="GPU index")
    ap.add_argument("--save", action="store_true",
                    help="also write the output to benchmarks/results/{cpu|gpu}_<date>_train.txt")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # a child of run_worker: its result on one line
        return _serve(args.worker, args.spec)
    if args.warmup < 1 or args.iterations < 1 or args.rounds < 1:
        ap.error("--warmup, --iterations and --rounds must be at least 1")
    sys.path.insert(0, str(ROOT))
    if args.gpu and not gpu_available(args.device):
        print(f"train: --gpu, but no usable GPU here (CuPy and a CUDA device {args.device} are needed); "
              f"run without --gpu for the CPU comparison", file=sys.stderr)
        return 2
    args.batch = args.batch or (GPU_BATCH if args.gpu else 1)
    args.images = args.images or max(4, args.batch)
    try:
        import torch  # noqa: F401  (the parent only checks it is there; workers import it)
    except ImportError:
        print("train: PyTorch is not installed; it is the reference this benchmark compares with", file=sys.stderr)
        return 2
    if not (SHARED / ALEXNET).exists():
        print(f"train: {SHARED / ALEXNET} not found (set CAFFEISH_SHARED)", file=sys.stderr)
        return 2
    args.load_before = load_average()
    out = _io.StringIO()
    command = "python benchmarks/train.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    with contextlib.redirect_stdout(_Tee(sys.stdout, out)) if args.save else contextlib.nullcontext():
        with tempfile.TemporaryDirectory(prefix="caffeish_train_") as tmp:
            try:
                row = bench(args, tmp)
            except RuntimeError as e:
                print(f"train: {e}", file=sys.stderr)
                return 1
        rc = report(row, args)
    if args.save:
        path = BENCH / "results" / f"{'gpu' if args.gpu else 'cpu'}_{time.strftime('%Y-%m-%d')}_train.txt"
        header = f"# {command}   ({cpu_name()}, {os.cpu_count()} CPU(s), {time.strftime('%Y-%m-%d')})\n"
        path.write_text(header + out.getvalue())
        print(f"wrote {path.relative_to(ROOT)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
