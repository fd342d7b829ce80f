"""Benchmark: caffeish's numpy Pooling (forward and backward) against PyTorch on the CPU.

    python benchmarks/pool_layers.py [--nets fcn8s,alexnet] [--batches 1,10] [--methods max,ave]
                                     [--repeat 5] [--threads 2] [--pooling-module FILE]

Shapes: the pooling layers of FCN-8s (VGG-16 with conv1_1's pad 100) at a
384 x 384 input (pool1 2x2/2 over 64 x 582 x 582, ..., pool5 over 512 x 37 x 37:
odd sizes, so Caffe's ceil rounding adds a clipped last window) and of AlexNet
at 227 x 227 (3x3/2, overlapping windows), each with batch 1 and 10 (--batches).
Every layer runs as MAX and as AVE (--methods), whatever the real net uses.

The input is relu(gaussian), as after a ReLU: about half the cells are 0, so MAX
windows hold ties (the first maximum in Caffe's scan order takes the gradient).
The top gradient is gaussian.  Timed, each the least of --repeat runs after a
warm-up (the least disturbed by other work on a shared machine):
  * caffeish: caffeish.ops.pooling (layers/pooling.py) pool_forward(numpy, x, geometry, method) and
    pool_backward(numpy, x, y, dy, geometry, method), what the Pooling layer runs
    (its forward also copies the top for the backward: not timed here);
  * PyTorch:  torch.nn.functional.max_pool2d / avg_pool2d with ceil_mode=True
    (Caffe's output size; count_include_pad, Caffe's AVE divisor) on a leaf
    tensor that requires grad (the forward keeps the argmax indices), and
    y.backward(dy) with x.grad cleared first.
Both use --threads threads (torch.set_num_threads; caffeish.runtime.parallel
through CAFFEISH_THREADS) and the glibc allocator tuning of caffeish's Net.
The last columns check the two agree: max|y - y_torch| and max|dx - dx_torch|
(0 expected: PyTorch's CPU kernels also take the first maximum; AVE may differ
in the last bits from its summation order).

--pooling-module FILE times the pool_forward/pool_backward of another copy of
layers/pooling.py (e.g. an older version) in the same run, as a further column.
"""
import argparse
import importlib.util
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (layer, channels, height, width, kernel, stride, pad) per net at its benchmark input size.
NETS = {
    "fcn8s": [  # FCN-8s / VGG-16 at 384 x 384 (conv1_1 pads by 100: 582 x 582)
        ("pool1", 64, 582, 582, 2, 2, 0),
        ("pool2", 128, 291, 291, 2, 2, 0),
        ("pool3", 256, 146, 146, 2, 2, 0),
        ("pool4", 512, 73, 73, 2, 2, 0),
        ("pool5", 512, 37, 37, 2, 2, 0),
    ],
    "alexnet": [  # AlexNet / CaffeNet at 227 x 227
        ("pool1", 96, 55, 55, 3, 2, 0),
        ("pool2", 256, 27, 27, 3, 2, 0),
        ("pool5", 256, 13, 13, 3, 2, 0),
    ],
}


def _best(fn, repeat):
    fn()  # warm-up
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3, out


def _load_module(path):
    """Another copy of layers/pooling.py, its layer classes left unregistered (the types are taken)."""
    from caffeish.graph import registry

    spec = importlib.util.spec_from_file_location("pooling_alt", path)
    module = importlib.util.module_from_spec(spec)
    register = registry.register
    registry.register = lambda *names: (lambda cls: cls)
    try:
        spec.loader.exec_module(module)
    finally:
        registry.register = register
    return module


def _time_layer(np, torch, pooling, alt, x, dy, geom, method, torch_pool, repeat):
    """(ms: caffeish fwd, torch fwd, caffeish bwd, torch bwd, alt fwd, alt bwd), max|y - y_torch|,
    max|dx - dx_torch|."""
    f_ms, y = _best(lambda: pooling.pool_forward(np, x, geom, method)[0], repeat)
    b_ms, dx = _best(lambda: pooling.pool_backward(np, x, y, dy, geom, method), repeat)
    af_ms = ab_ms = 0.0
    if alt is not None:
        af_ms, _ = _best(lambda: alt.pool_forward(np, x, geom, method)[0], repeat)
        ab_ms, _ = _best(lambda: alt.pool_backward(np, x, y, dy, geom, method), repeat)
    xt = torch.from_numpy(x).requires_grad_(True)
    dyt = torch.from_numpy(dy)
    tf_ms, yt = _best(lambda: torch_pool(xt), repeat)

    def backward():
        xt.grad = None
        yt.backward(dyt, retain_graph=True)
        return xt.grad

    tb_ms, dxt = _best(backward, repeat)
    ydiff = float(np.abs(y - yt.detach().numpy()).max())
    dxdiff = float(np.abs(dx - dxt.numpy()).max())
    return (f_ms, tf_ms, b_ms, tb_ms, af_ms, ab_ms), ydiff, dxdiff


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default="fcn8s,alexnet")
    ap.add_argument("--batches", default="1,10")
    ap.add_argument("--methods", default="max,ave")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pooling-module", help="another copy of layers/pooling.py to time as well")
    args = ap.parse_args(argv)

    os.environ["CAFFEISH_THREADS"] = str(args.threads)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, str(ROOT))  # the checkout, not an installed copy
    import numpy as np
    import torch
    import torch.nn.functional as F

    from caffeish.formats.schema import pb
    from caffeish.graph.geometry import pool_params
    from caffeish.runtime import backend
    from caffeish.ops import pooling

    backend.tune_allocator()
    torch.set_num_threads(args.threads)
    alt = _load_module(args.pooling_module) if args.pooling_module else None
    methods = {"max": pb.PoolingParameter.MAX, "ave": pb.PoolingParameter.AVE}
    rng = np.random.default_rng(0)

    head = (f"{'net':8} {'N':>3} {'method':6} {'layer':6} {'input (C,H,W)':>16} {'k/s/p':>6} | "
            f"{'fwd ms':>8} {'torch':>8} {'ratio':>6} | {'bwd ms':>8} {'torch':>8} {'ratio':>6} |"
            + (f" {'alt fwd':>8} {'alt bwd':>8} |" if alt else "") + f" {'y diff':>7} {'dx diff':>7}")
    print(f"numpy {np.__version__}, torch {torch.__version__}, {args.threads} threads, "
          f"least of {args.repeat} runs")
    print(head)
    print("-" * len(head))
    for net in args.nets.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for mname in args.methods.split(","):
                method = methods[mname]
                totals = [0.0] * 6
                for name, c, h, w, k, s, p in NETS[net]:
                    pp = pb.PoolingParameter(pool=method, kernel_size=k, stride=s, pad=p)
                    geom = pool_params(pp, h, w)
                    x = np.maximum(rng.standard_normal((batch, c, h, w), dtype=np.float32), np.float32(0))
                    dy = rng.standard_normal((batch, c) + geom.out, dtype=np.float32)
                    if mname == "max":
                        def torch_pool(t, k=k, s=s, p=p):
                            return F.max_pool2d(t, k, s, p, ceil_mode=True)
                    else:
                        def torch_pool(t, k=k, s=s, p=p):
                            return F.avg_pool2d(t, k, s, p, ceil_mode=True, count_include_pad=True)
                    ms, ydiff, dxdiff = _time_layer(np, torch, pooling, alt, x, dy, geom, method, torch_pool,
                                                    args.repeat)
                    x = dy = None
                    totals = [a + b for a, b in zip(totals, ms)]
                    f_ms, tf_ms, b_ms, tb_ms, af_ms, ab_ms = ms
                    print(f"{net:8} {batch:>3} {mname:6} {name:6} {f'{c},{h},{w}':>16} {f'{k}/{s}/{p}':>6} | "
                          f"{f_ms:8.2f} {tf_ms:8.2f} {f_ms / tf_ms:6.2f} | {b_ms:8.2f} {tb_ms:8.2f} "
                          f"{b_ms / tb_ms:6.2f} |" + (f" {af_ms:8.2f} {ab_ms:8.2f} |" if alt else "")
                          + f" {ydiff:7.1e} {dxdiff:7.1e}", flush=True)
                f_ms, tf_ms, b_ms, tb_ms, af_ms, ab_ms = totals
                print(f"{net:8} {batch:>3} {mname:6} {'total':6} {'':>16} {'':>6} | "
                      f"{f_ms:8.2f} {tf_ms:8.2f} {f_ms / tf_ms:6.2f} | {b_ms:8.2f} {tb_ms:8.2f} "
                      f"{b_ms / tb_ms:6.2f} |" + (f" {af_ms:8.2f} {ab_ms:8.2f} |" if alt else ""), flush=True)
                print("-" * len(head))


if __name__ == "__main__":
    main()
