"""Benchmark: build a DIGITS segmentation dataset of N image/label pairs; pairs/s and peak memory.

    python benchmarks/dataset_build.py [--pairs 2000] [--size 500x375] [--encoding png] [--growth]

Generates N JPEG photos (smooth colour fields with noise, like real images
compress) and N palette PNG label maps of the given size in a temporary
folder (not timed), then runs `caffeish dataset segmentation` on them in a
child process and reports its wall time, pairs per second, peak resident
memory (the child's ru_maxrss) and the database sizes.  --growth also builds
from a quarter of the pairs, to show that peak memory does not grow with the
dataset (pairs stream one at a time into batched transactions).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image


def generate(folder, n, width, height, seed=0):
    """n photo-like JPEGs and palette label PNGs named 000000.jpg / 000000.png."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"))
    os.makedirs(os.path.join(folder, "labels"))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0] * (251 * 3)
    for i in range(n):
        fx, fy, phase = rng.uniform(0.005, 0.03, 2).tolist() + [rng.uniform(0, 6.28)]
        base = np.stack([np.sin(xx * fx + phase), np.cos(yy * fy), np.sin((xx + yy) * fx * 0.5)], axis=-1)
        img = (base * 90 + 128 + rng.normal(0, 12, (height, width, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, "images", f"{i:06d}.jpg"), quality=90)
        labels = ((np.sin(xx * fx + phase) > 0).astype(np.uint8) + 2 * (np.cos(yy * fy) > 0.3)).astype(np.uint8)
        labels[:2] = 255  # a VOC-style ignore border
        lab = Image.fromarray(labels, "P")
        lab.putpalette(palette)
        lab.save(os.path.join(folder, "labels", f"{i:06d}.png"))


BUILD = """
import json, resource, sys, time
from caffeish.apps.dataset import build_segmentation
start = time.perf_counter()
meta = build_segmentation(sys.argv[1], sys.argv[2], sys.argv[3], encoding=sys.argv[4], val_fraction=0.1)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "records": sum(s["records"] for s in meta["splits"].values())}))
"""


def folder_mb(path):
    total = 0
    for root, _, names in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, n)) for n in names)
    return total / 2**20


def build(src, n_pairs, encoding, work):
    """Build from the first n_pairs of src (linked into a folder of their own) in a child process."""
    sub = os.path.join(work, f"in_{n_pairs}")
    for part, ext in (("images", "jpg"), ("labels", "png")):
        os.makedirs(os.path.join(sub, part))
        for i in range(n_pairs):
            os.symlink(os.path.join(src, part, f"{i:06d}.{ext}"), os.path.join(sub, part, f"{i:06d}.{ext}"))
    out = os.path.join(work, f"ds_{n_pairs}")
    env = dict(os.environ, CAFFEISH_PROGRESS="0")
    done = subprocess.run([sys.executable, "-c", BUILD, os.path.join(sub, "images"), os.path.join(sub, "labels"),
                           out, encoding], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(done.stderr)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(pairs=n_pairs, pairs_per_s=n_pairs / result["seconds"], output_mb=folder_mb(out))
    shutil.rmtree(out)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the images (default 500x375)")
    p.add_argument("--encoding", choices=("png", "none"), default="png")
    p.add_argument("--growth", action="store_true", help="also build from a quarter of the pairs")
    p.add_argument("--workdir", help="where to generate (default: a temporary folder, removed after)")
    args = p.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    work = tempfile.mkdtemp(prefix="caffeish-dsbench-", dir=args.workdir)
    try:
        t = time.perf_counter()
        generate(os.path.join(work, "src"), args.pairs, width, height)
        print(f"generated {args.pairs} pairs of {width}x{height} in {time.perf_counter() - t:.1f} s", flush=True)
        sizes = ([max(1, args.pairs // 4)] if args.growth else []) + [args.pairs]
        for n in sizes:
            r = build(os.path.join(work, "src"), n, args.encoding, work)
            print(f"{r['pairs']:>6} pairs  {r['seconds']:7.1f} s  {r['pairs_per_s']:6.1f} pairs/s  "
                  f"peak RSS {r['peak_rss_mb']:6.1f} MB  dataset {r['output_mb']:7.1f} MB  "
                  f"(encoding {args.encoding})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
