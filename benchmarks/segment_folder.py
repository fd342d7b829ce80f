"""Benchmark: `caffeish segment` over a folder of 500x375 images on DIGITS' FCN-Alexnet.

    python benchmarks/segment_folder.py [--images 50] [--size 500x375] [--threads N] [--keep DIR]

What it does:
  1. builds DIGITS' fcn_alexnet.deploy.prototxt (../shared/models/digits) as a
     caffeish Net, gives every parameter random values (He-scaled gaussians,
     std sqrt(2 / fan_in), biases std 0.01: the deploy prototxt has no fillers,
     and all-zero weights would make every score 0 and the PNGs trivially
     small); the upscore Deconvolution keeps its bilinear filler; saves the
     weights with net.save() to a temporary caffemodel;
  2. writes --images JPEG pictures of --size (W x H, VOC's usual 500x375) with
     some structure (gradients, blocks, noise);
  3. runs the real command in a subprocess,
        caffeish segment fcn_alexnet.deploy.prototxt weights.caffemodel DIR -o OUT --timings
     and reads its per-stage times: decode, preprocess, forward, argmax and
     write (palette PNG + overlay PNG).

Printed: images/s over the segmentation loop (and over the whole command,
net loading included), seconds per stage, and the overhead around the forward
pass, (decode + preprocess + argmax + write) / total, which should stay below
15% on CPU.
"""
import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("CAFFEISH_SHARED", ROOT.parent / "shared"))
PROTOTXT = SHARED / "models" / "digits" / "examples" / "semantic-segmentation" / "fcn_alexnet.deploy.prototxt"
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
OVERHEAD_BAR = 15.0


def random_weights(prototxt, path, seed=0):
    """Save He-scaled random weights for every parameter (the bilinear upscore keeps its filler)."""
    sys.path.insert(0, str(ROOT))
    import caffeish

    net = caffeish.Net(str(prototxt), caffeish.TEST, seed=seed)
    rng = np.random.default_rng(seed)
    for layer, params in net.params.items():
        if net.layers[list(net._layer_names).index(layer)].type == "Deconvolution":
            continue
        weight = params[0].data
        fan_in = int(np.prod(weight.shape[1:]))
        weight[...] = rng.standard_normal(weight.shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        if len(params) > 1:
            params[1].data[...] = rng.standard_normal(params[1].data.shape, dtype=np.float32) * np.float32(0.01)
    net.save(str(path))


def write_images(folder, n, size, seed=0):
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi, 3)
        block = rng.integers(16, 64)
        base = np.stack([
            127 + 100 * np.sin(xx / (40 + 7 * i % 30) + phase[0]),
            127 + 100 * np.cos(yy / (30 + 5 * i % 20) + phase[1]),
            ((xx // block + yy // block) % 2) * 200 + 20 * np.sin(phase[2]),
        ], axis=2)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i:03d}.jpg", quality=90)


def run_segment(prototxt, weights, folder, out, threads):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CAFFEISH_PROGRESS"] = "0"
    if threads:
        for var in THREAD_VARS:
            env[var] = str(threads)
    cmd = [sys.executable, "-m", "caffeish.tools.cli", "segment", str(prototxt), str(weights), str(folder),
           "-o", str(out), "--timings"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"caffeish segment failed ({p.returncode}):\n{p.stderr}")
    stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"^timing: (\w+) ([\d.]+) s", p.stderr, re.M)}
    return wall, stages


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=50, help="number of images (default 50)")
    ap.add_argument("--size", default="500x375", help="image size WxH (default 500x375)")
    ap.add_argument("--threads", type=int, default=0, help="BLAS threads (default: the library's choice)")
    ap.add_argument("--prototxt", default=str(PROTOTXT), help="FCN deploy prototxt (default DIGITS' FCN-Alexnet)")
    ap.add_argument("--keep", help="write the pictures to this folder instead of a temporary one")
    args = ap.parse_args(argv)
    if not os.path.exists(args.prototxt):
        sys.exit(f"{args.prototxt} not found (the benchmark reads ../shared beside the repository)")
    w, h = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="caffeish-segment-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "images").mkdir()
        t0 = time.perf_counter()
        random_weights(args.prototxt, tmp / "weights.caffemodel")
        write_images(tmp / "images", args.images, (w, h))
        print(f"set-up: random weights and {args.images} images of {w}x{h} in {time.perf_counter() - t0:.1f} s")
        out = pathlib.Path(args.keep) if args.keep else tmp / "out"
        wall, stages = run_segment(args.prototxt, tmp / "weights.caffemodel", tmp / "images", out, args.threads)
    loop = sum(stages[s] for s in ("decode", "preprocess", "forward", "argmax", "write"))
    overhead = loop - stages["forward"]
    print(f"caffeish segment, {args.images} images of {w}x{h}, FCN-Alexnet ({os.path.basename(args.prototxt)}):")
    print(f"  command wall time      {wall:8.2f} s  ({args.images / wall:.3f} images/s, net loading included)")
    print(f"  net build + weights    {stages.get('setup', 0.0):8.2f} s")
    print(f"  segmentation loop      {loop:8.2f} s  ({args.images / loop:.3f} images/s)")
    for s in ("decode", "preprocess", "forward", "argmax", "write"):
        print(f"    {s:<20} {stages[s]:8.3f} s  {100 * stages[s] / loop:5.1f}%  "
              f"({1000 * stages[s] / args.images:.1f} ms/image)")
    share = 100 * overhead / loop
    verdict = "below" if share < OVERHEAD_BAR else "ABOVE"
    print(f"  overhead around forward {share:.1f}% of the loop ({verdict} the {OVERHEAD_BAR:.0f}% bar)")
    return 0 if share < OVERHEAD_BAR else 1


if __name__ == "__main__":
    sys.exit(main())
