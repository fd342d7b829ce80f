"""Benchmark: each CPU convolution path on the layers of the seed's nets, against PyTorch.

    python benchmarks/conv_layers.py [--layers conv1_2,conv4_2,...] [--repeat 5] [--backward]

For every layer shape (VGG-16 in FCN-8s at 500x500, AlexNet's at batch 10), the forward (and with
--backward the input and weight gradients) through each path of caffeish.runtime that can take it,
forced one at a time:
  * im2col   caffeish.runtime.im2col's column copies + one GEMM per chunk;
  * rows     caffeish.runtime.conv_rows (stride 1 down the rows: kernel-row GEMMs);
  * winograd caffeish.runtime.winograd (3x3 stride 1: F(2x2, 3x3));
  * auto     what conv_forward / conv_backward choose with the shipped thresholds;
and torch.nn.functional.conv2d (autograd for the backward), interleaved in one process, median
of --repeat runs, 2 threads each (OPENBLAS_NUM_THREADS / torch.set_num_threads).  The thresholds
in conv_rows.py and winograd.py were chosen from this table.  PyTorch is a benchmark-only
dependency.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: (batch, C, O, H (input = output, pad (k-1)/2), kernel, group)
LAYERS = {
    "conv1_2": (1, 64, 64, 698, 3, 1),
    "conv2_1": (1, 64, 128, 349, 3, 1),
    "conv2_2": (1, 128, 128, 349, 3, 1),
    "conv3_1": (1, 128, 256, 175, 3, 1),
    "conv3_2": (1, 256, 256, 175, 3, 1),
    "conv4_2": (1, 512, 512, 88, 3, 1),
    "conv5_2": (1, 512, 512, 44, 3, 1),
    "alex_conv2": (10, 96, 256, 27, 5, 2),
    "alex_conv3": (10, 256, 384, 13, 3, 1),
    "alex_conv4": (10, 384, 384, 13, 3, 2),
}


def median_ms(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated subset of " + ",".join(LAYERS))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backward", action="store_true", help="also the input and weight gradients")
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    from caffeish.graph.geometry import ConvGeometry
    from caffeish.runtime import backend, blas, conv_grad, conv_rows, im2col, winograd

    backend.tune_allocator()
    blas.tune_threads()
    try:
        import torch
    except ImportError:
        torch = None
    else:
        torch.set_num_threads(args.threads)

    def forced(path):
        """Context values for conv_rows / winograd thresholds that force `path` (None: as shipped)."""
        off, on = 10 ** 9, 1
        return {"im2col": (off, off, off), "rows": (on, off, off), "winograd": (off, on, on)}.get(path)

    def run(path, fn):
        saved = (conv_rows.MIN_COLUMNS, winograd.MIN_CHANNELS, winograd.BACKWARD_MIN_CHANNELS)
        values = forced(path)
        if values is not None:
            conv_rows.MIN_COLUMNS, winograd.MIN_CHANNELS, winograd.BACKWARD_MIN_CHANNELS = values
        try:
            return median_ms(fn, args.repeat)
        finally:
            conv_rows.MIN_COLUMNS, winograd.MIN_CHANNELS, winograd.BACKWARD_MIN_CHANNELS = saved

    rng = np.random.default_rng(0)
    paths = ("im2col", "rows", "winograd", "auto")
    print(f"ms, median of {args.repeat}, {args.threads} threads; '-' where the path does not apply")
    print(f"{'layer':<11} {'pass':<9}" + "".join(f"{p:>10}" for p in paths) + f"{'PyTorch':>10}")
    for name in [n.strip() for n in args.layers.split(",") if n.strip()]:
        n, c, o, h, k, g = LAYERS[name]
        pad = (k - 1) // 2
        geom = ConvGeometry((k, k), (1, 1), (pad, pad), (1, 1))
        x = rng.standard_normal((n, c, h, h), dtype=np.float32)
        w = rng.standard_normal((o, c // g, k, k), dtype=np.float32) * np.float32((2 / (c // g * k * k)) ** 0.5)
        b = rng.standard_normal(o, dtype=np.float32) * np.float32(0.01)
        dy = rng.standard_normal((n, o, h, h), dtype=np.float32)
        out = (h, h)
        applies = {"im2col": True, "rows": conv_rows.applies(np, x, geom, g, out) or None,
                   "winograd": winograd.applies(np, x, geom, g, out, min_channels=1) or None, "auto": True}
        rows = [("forward", lambda: im2col.conv_forward(np, x, w, b, geom, g, out))]
        if args.backward:
            dw = np.zeros_like(w)
            rows.append(("backward", lambda: conv_grad.conv_backward(np, x, w, dy, geom, g, True, dw, None)))
        for label, fn in rows:
            line = f"{name:<11} {label:<9}"
            for p in paths:
                line += f"{run(p, fn):>10.1f}" if applies[p] else f"{'-':>10}"
            if torch is not None:
                xt, wt, bt = (torch.from_numpy(a) for a in (x, w, b))
                if label == "forward":
                    with torch.no_grad():
                        t_ms = median_ms(lambda: torch.nn.functional.conv2d(xt, wt, bt, padding=pad, groups=g), args.repeat)
                else:
                    xg, wg = xt.clone().requires_grad_(), wt.clone().requires_grad_()
                    y = torch.nn.functional.conv2d(xg, wg, None, padding=pad, groups=g)
                    dyt = torch.from_numpy(dy)
                    t_ms = median_ms(lambda: torch.autograd.grad(y, (xg, wg), dyt, retain_graph=True), args.repeat)
                line += f"{t_ms:>10.1f}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
