"""Benchmark: `caffeish segment --ray` (Ray Data, an actor pool) against the single-process command, and
an estimate of the throughput on N GPU nodes.

    python benchmarks/ray_segment.py [--images 40] [--size 500x375] [--gpu-forward-ms 1.89]

What it does (pip install 'caffeish[ray]' first; ../shared holds the net):
  1. DIGITS' FCN-Alexnet with random He-scaled weights and --images JPEGs of --size
     (benchmarks/segment_folder.py's set-up);
  2. runs the real command in subprocesses, each writing its own OUTDIR:
        single process       caffeish segment NET W DIR -o OUT --timings   (BLAS: 1 thread, then all cores)
        ray 1 actor x 2      ... --ray --ray-actors 1 --ray-threads 2
        ray 1 actor x 1      ... --ray --ray-actors 1 --ray-threads 1
        ray 2 actors x 1     ... --ray --ray-actors 2 --ray-threads 1
     and reads the wall time of the command (a local Ray cluster started and stopped in it), the
     job's images/s from the Ray summary (from the dataset's start: actor start-up included) and
     the per-worker images/s; checks that every run wrote the single-process run's class PNGs;
  3. measures Ray's own cost on this machine with an actor pool that does nothing: the time to
     the first result (actors starting) and the cost per task (one image is one task);
  4. prints an estimate for N GPU nodes: each GPU is one actor that spends, per image, the GPU
     forward (--gpu-forward-ms: FCN-Alexnet at 1x3x500x500 on an H200 took 1.89 ms,
     benchmarks/results/gpu_2026-12-04_kernels.txt), the CPU stages measured here on one thread
     (an actor's decode, preprocess and argmax, from the 1 actor x 1 thread run's --timings; its writer
     thread encodes and writes the previous image meanwhile) and Ray's per-task cost, shared by the
     images of a task.
"""
import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import segment_folder  # noqa: E402  (the same net, weights and pictures)
from caffeish.apps.distributed import SEGMENT_TASK  # noqa: E402

STAGES = ("decode", "preprocess", "forward", "argmax", "write")
THREAD_VARS = segment_folder.THREAD_VARS


def run(prototxt, weights, folder, out, extra=(), threads=None):
    """(wall seconds, stage seconds, Ray job images/s or None, [per-worker images/s]) of one command."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), CAFFEISH_PROGRESS="0")
    if threads:
        env.update({var: str(threads) for var in THREAD_VARS})
    cmd = [sys.executable, "-m", "caffeish.tools.cli", "segment", str(prototxt), str(weights), str(folder),
           "-o", str(out), "--timings", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"caffeish segment {' '.join(extra)} failed ({p.returncode}):\n{p.stderr}")
    stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"^timing: (\w+) ([\d.]+) s", p.stderr, re.M)}
    job = re.search(r"ray: \d+ images in ([\d.]+) s \(([\d.]+) images/s\)", p.stderr)
    workers = [float(v) for v in re.findall(r"ray:\s+worker \S+: \d+ images, [\d.]+ s busy, ([\d.]+) images/s",
                                            p.stderr)]
    return wall, stages, (float(job.group(2)) if job else None), workers


def class_pngs(folder):
    return {p.name: p.read_bytes() for p in pathlib.Path(folder).glob("*.png") if not p.name.endswith("_overlay.png")}


class Noop:
    def __init__(self):
        pass

    def __call__(self, batch):
        return batch


def ray_overhead(rows=400):
    """(seconds to the first result, seconds per task after it) of a 2-actor pool doing nothing."""
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ds = ray.data.from_items([{"index": i} for i in range(rows)])
        ds = ds.map_batches(Noop, batch_size=1, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1)
        t0 = time.perf_counter()
        first = None
        for _ in ds.iter_rows():
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
    finally:
        ray.shutdown()
    return first - t0, (end - first) / (rows - 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=40, help="number of images (default 40)")
    ap.add_argument("--size", default="500x375", help="image size WxH (default 500x375)")
    ap.add_argument("--prototxt", default=str(segment_folder.PROTOTXT), help="FCN deploy prototxt (FCN-Alexnet)")
    ap.add_argument("--gpu-forward-ms", type=float, default=1.89,
                    help="GPU forward time per image for the estimate (default: FCN-Alexnet, 500x500, H200)")
    args = ap.parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        sys.exit("Ray is not installed: pip install 'caffeish[ray]'")
    if not os.path.exists(args.prototxt):
        sys.exit(f"{args.prototxt} not found (the benchmark reads ../shared beside the repository)")
    w, h = (int(v) for v in args.size.lower().split("x"))
    n = args.images
    runs = [("single process (BLAS: all cores)", ()),
            ("ray: 1 actor x 2 threads", ("--ray", "--ray-actors", "1", "--ray-threads", "2")),
            ("ray: 1 actor x 1 thread", ("--ray", "--ray-actors", "1", "--ray-threads", "1")),
            ("ray: 2 actors x 1 thread", ("--ray", "--ray-actors", "2", "--ray-threads", "1"))]
    results = []
    with tempfile.TemporaryDirectory(prefix="caffeish-ray-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "images").mkdir()
        segment_folder.random_weights(args.prototxt, tmp / "weights.caffemodel")
        segment_folder.write_images(tmp / "images", n, (w, h))
        results.append(("single process, 1 BLAS thread",)
                       + run(args.prototxt, tmp / "weights.caffemodel", tmp / "images", tmp / "one", threads=1))
        out_bytes = sum(p.stat().st_size for p in (tmp / "one").iterdir()) / n
        for i, (name, extra) in enumerate(runs):
            out = tmp / f"out{i}"
            results.append((name,) + run(args.prototxt, tmp / "weights.caffemodel", tmp / "images", out, extra))
        # byte for byte the single-process run with as many BLAS threads as each actor has (BLAS sums in
        # another order with another thread count, which moves a class where two scores nearly tie)
        same = {name: class_pngs(tmp / f"out{i}") == class_pngs(tmp / ("out0" if "x 2" in name else "one"))
                for i, (name, _) in enumerate(runs) if "ray" in name}
        start, per_task = ray_overhead()

    print(f"caffeish segment, {n} images of {w}x{h}, FCN-Alexnet, on this machine ({os.cpu_count()} CPUs):")
    print(f"  {'run':<34} {'command':>9} {'images/s':>9} {'loop/job':>9}  per worker")
    for name, wall, stages, job, workers in results:
        loop = n / sum(stages[s] for s in STAGES) if job is None else job
        per = ", ".join(f"{v:.2f}" for v in workers) or "-"
        print(f"  {name:<34} {wall:8.1f}s {n / wall:9.2f} {loop:9.2f}  {per}")
    print("  class PNGs byte for byte those of the single process with as many BLAS threads: "
          + ", ".join(f"{name.split(': ')[-1]} {'yes' if ok else 'NO'}" for name, ok in same.items()))
    print("  command: the whole command's wall time (net loading, Ray start and stop included) and images/s over it;")
    print("  loop/job: images/s over the segmentation loop (single) or the Ray job (from the dataset's start, actor")
    print("  start-up included); per worker: each actor's images/s over its busy time.")
    actor = next(stages for name, _, stages, *_ in results if name.endswith("1 actor x 1 thread"))
    per_image = {s: actor[s] / n for s in STAGES}  # one actor, one thread; its writer thread's time as "write"
    cpu_side = sum(per_image[s] for s in ("decode", "preprocess", "argmax"))
    print("\n  an actor of one thread, per image: " + ", ".join(f"{s} {1000 * per_image[s]:.1f} ms" for s in STAGES))
    print(f"  Ray on this machine: {start:.2f} s to the first result of a 2-actor pool (actors starting), "
          f"{1000 * per_task:.2f} ms per task after it")

    per_task_images = SEGMENT_TASK  # a long run: distributed.rows_per_task gives each task this many images
    # an actor's main thread decodes, preprocesses, runs and takes the argmax of an image while its writer
    # thread encodes and writes the previous one: the slower of the two sets the pace
    main_thread = args.gpu_forward_ms / 1000 + cpu_side
    t_image = max(main_thread, per_image["write"]) + per_task / per_task_images
    ceiling = per_task_images / per_task
    print(f"\nEstimate for N GPU nodes (G GPUs each, one actor per GPU, {per_task_images} images per task): per "
          f"image an actor's main thread spends the GPU forward {args.gpu_forward_ms:.2f} ms + decode, preprocess "
          f"and argmax {1000 * cpu_side:.1f} ms = {1000 * main_thread:.1f} ms, while its writer thread encodes and "
          f"writes the previous image's PNGs in {1000 * per_image['write']:.1f} ms; with Ray's {1000 * per_task:.2f} "
          f"ms per task / {per_task_images}, {1000 * t_image:.1f} ms an image, {1 / t_image:.1f} images/s per GPU.  "
          f"One driver schedules every task: at {1000 * per_task:.2f} ms a task (as measured here, where it shares "
          f"2 cores with the actors) the job tops out near {ceiling:.0f} images/s, whatever the cluster:")
    for nodes, gpus in ((1, 1), (1, 8), (4, 8), (16, 8)):
        rate = min(nodes * gpus / t_image, ceiling)
        bound = "driver-bound" if rate == ceiling else "actor-bound"
        print(f"  {nodes:>2} node(s) x {gpus} GPU(s): {rate:7.0f} images/s ({bound}); SYNTHIA's 9,400 frames in "
              f"{9400 / rate:5.0f} s + {start:.0f} s of start-up")
    busy = 100 * args.gpu_forward_ms / 1000 / t_image
    print(f"  The GPU works {busy:.0f}% of the time: each GPU actor is bound by its CPU side (one core).  The actors "
          f"write {out_bytes / 1e6:.2f} MB per image (class PNG + overlay) to a file system every node mounts, "
          f"which must take images/s x {out_bytes / 1e6:.2f} MB/s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
