"""GPU check: correctness against Caffe and speed against PyTorch/cuDNN, in one run.

    python benchmarks/gpu_check.py [--device 0] [--repeat 10] [--batch 8] [--size 500]
                                   [--nets fcn8s,fcn_alexnet,alexnet] [--skip-golden] [--skip-speed]
                                   [--skip-kernels]

Needs CuPy and a CUDA GPU; PyTorch (with cuDNN) for the comparison.  Without a
usable GPU it prints one line saying so and exits 0.

1. Correctness: every golden case in ../shared/golden runs on the GPU
   (Net(device="cuda:N"), fp32) and each blob must match Caffe's within the
   case's meta.json tolerance (max|ours - Caffe| / max|Caffe|); the `exact` blobs
   (pooling masks, ArgMax) must be identical.  Exit status 1 if any case fails.
2. Speed: median forward time (after warm-up) of FCN-8s at BATCH x 3 x SIZE x
   SIZE (default 8 x 3 x 500 x 500), FCN-Alexnet at the same size and AlexNet
   at BATCH x 3 x 227 x 227, random He-scaled weights, against the same nets
   built from the same weights in PyTorch (cuDNN, cudnn.benchmark on, TF32 off
   for matmul and convolution; CuPy's cuBLAS uses no TF32 unless CUPY_TF32=1).
   Also the largest relative difference of the two outputs.
3. Kernels alone: the device-to-device copy bandwidth, then pooling (MAX with
   mask, AVE) and crop in GB/s (bytes read + written) and as a share of the copy
   bandwidth, and convolution layers of FCN-8s in TFLOP/s (2 x multiply-adds),
   with the same layer in PyTorch/cuDNN beside them.
Targets printed at the end: FCN-8s forward <= 1.0x PyTorch/cuDNN; pooling and
crop >= 80% of the copy bandwidth.
"""
import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("CAFFEISH_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from torch_graph import TorchNet  # the Caffe graph in PyTorch (benchmarks/torch_graph.py, shared with train_step.py)

import caffeish  # noqa: E402
from caffeish.runtime import backend  # noqa: E402
from caffeish.data.metrics import compare_blobs, relative_error  # noqa: E402

NETS = {
    "fcn8s": ("models/fcn/voc-fcn8s/deploy.prototxt", "fcn"),
    "fcn_alexnet": ("models/digits/examples/semantic-segmentation/fcn_alexnet.deploy.prototxt", "fcn"),
    "alexnet": ("models/bvlc_caffe/models/bvlc_alexnet/deploy.prototxt", "classifier"),
}
COPY_SHARE_TARGET = 0.80
FCN8S_RATIO_TARGET = 1.0


def say(*parts):
    print(*parts, flush=True)


# ---------------------------------------------------------------------------- timing


def median_ms(fn, sync, repeat, warmup=2):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------- 1. golden nets


def check_golden(device):
    golden = SHARED / "golden"
    cases = sorted(d.name for d in golden.iterdir() if (d / "meta.json").is_file()) if golden.is_dir() else []
    if not cases:
        say(f"golden: no cases under {golden}")
        return True
    say(f"== 1. golden nets on cuda:{device} (fp32) against Caffe ==")
    ok_all = True
    for case in cases:
        folder = golden / case
        meta = json.loads((folder / "meta.json").read_text())
        weights = meta.get("weights")
        try:
            net = caffeish.Net(str(folder / "net.prototxt"), str(folder / weights) if weights else None,
                               caffeish.TEST, keep=True, device=f"cuda:{device}")
            net.forward(**dict(np.load(folder / "inputs.npz")))
            expected = np.load(folder / "blobs.npz")
            get = lambda name: net._arrays.get(name)  # noqa: E731 (device arrays; compare_blobs copies them)
            worst, bad = compare_blobs(get, expected, meta["tolerance"], set(meta.get("exact", [])))
            status = "ok" if not bad else "FAIL"
            say(f"  {case:24s} {status:4s} worst {worst:.2e} (tolerance {meta['tolerance']:g})"
                + ("" if not bad else ": " + "; ".join(bad[:4])))
            ok_all &= not bad
        except Exception as exc:  # report and go on: one broken case must not hide the others
            say(f"  {case:24s} FAIL {type(exc).__name__}: {exc}")
            ok_all = False
    return ok_all


# ---------------------------------------------------------------------------- 2. whole nets


def build_net(key, batch, size, device, seed=0):
    """The caffeish Net on the GPU with random He-scaled weights, and its input on the device."""
    import cupy

    path, kind = NETS[key]
    side = 227 if kind == "classifier" else size
    shape = (batch, 3, side, side)
    net = caffeish.Net(str(SHARED / path), None, caffeish.TEST, input_shapes={"data": shape},
                       device=f"cuda:{device}", keep=False)  # as segment/classify run nets
    rs = cupy.random.RandomState(seed)
    for layer, arrays in net._params.items():
        for i, arr in enumerate(arrays):
            if i == 0:
                fan_in = max(1, arr[0].size if net.graph.node(layer).type != "Deconvolution" else arr.shape[0])
                arr[...] = rs.standard_normal(arr.shape, dtype=np.float32) * np.float32(math.sqrt(2.0 / fan_in))
            else:
                arr[...] = rs.standard_normal(arr.shape, dtype=np.float32) * np.float32(0.01)
    x = rs.uniform(0, 255, shape, dtype=np.float32)
    return net, x


def time_nets(keys, batch, size, device, repeat):
    import cupy

    sync = cupy.cuda.Device(device).synchronize
    results = {}
    say(f"== 2. forward time, median of {repeat} after warm-up (ms) ==")
    for key in keys:
        try:
            net, x = build_net(key, batch, size, device)
            ours_ms = median_ms(lambda: net.run({"data": x}), sync, repeat)
            ours = {k: backend.to_numpy(v) for k, v in net.forward_outputs({"data": x}, host=False).items()}
        except Exception as exc:
            say(f"  {key}: caffeish failed: {type(exc).__name__}: {exc}")
            continue
        line = f"  {key:12s} {tuple(x.shape)}  caffeish {ours_ms:9.2f}"
        torch_ms = None
        try:
            import torch

            tnet = TorchNet(net, device="cuda")  # the same weights (shared), forward only
            tx = torch.as_tensor(x, device="cuda")
            with torch.no_grad():
                torch_ms = median_ms(lambda: tnet(tx), torch.cuda.synchronize, repeat)
                theirs = {k: v.float().cpu().numpy() for k, v in tnet(tx).items()}
            diff = max(relative_error(ours[k], theirs[k]) for k in ours)
            line += f"  PyTorch/cuDNN {torch_ms:9.2f}  ratio {ours_ms / torch_ms:5.2f}x  max rel diff {diff:.1e}"
        except Exception as exc:
            line += f"  PyTorch: {type(exc).__name__}: {exc}"
        say(line)
        results[key] = (ours_ms, torch_ms)
        del net
        cupy.get_default_memory_pool().free_all_blocks()
    return results


# ---------------------------------------------------------------------------- 3. kernels alone


def time_kernels(batch, size, device, repeat):
    import cupy

    from caffeish.graph.geometry import ConvGeometry, pool_params
    from caffeish.kernels import gpu_kernels
    from caffeish.formats.schema import pb

    backend.get("cupy")
    k = gpu_kernels()
    sync = cupy.cuda.Device(device).synchronize
    rs = cupy.random.RandomState(1)
    say("== 3. kernels alone (median ms) ==")
    shares = {}

    big = rs.standard_normal(1 << 28, dtype=np.float32)  # 1 GiB
    dst = cupy.empty_like(big)
    t_copy = median_ms(lambda: cupy.cuda.runtime.memcpyAsync(dst.data.ptr, big.data.ptr, big.nbytes, 3, 0),
                       sync, repeat)
    t_elem = median_ms(lambda: cupy.copyto(dst, big), sync, repeat)
    copy_gbs = 2 * big.nbytes / min(t_copy, t_elem) / 1e6
    say(f"  copy 1 GiB: cudaMemcpy {t_copy:.3f} ms, cupy.copyto {t_elem:.3f} ms -> {copy_gbs:.0f} GB/s")
    del big, dst

    pad = 100 if size >= 100 else 0
    side = size + 2 * pad - 2  # FCN-8s conv1_2's output: 698 for 500
    x = rs.standard_normal((batch, 64, side, side), dtype=np.float32)
    for method, name in ((pb.PoolingParameter.MAX, "max pool 2x2/2 + mask"), (pb.PoolingParameter.AVE, "ave pool 2x2/2")):
        geom = pool_params(pb.PoolingParameter(pool=method, kernel_size=2, stride=2), side, side)
        mask = method == pb.PoolingParameter.MAX
        ms = median_ms(lambda: k.pool(x, geom, method, mask), sync, repeat)
        out_bytes = x.nbytes // 4 * (2 if mask else 1)
        gbs = (x.nbytes + out_bytes) / ms / 1e6
        shares[name] = gbs / copy_gbs
        say(f"  {name:28s} {tuple(x.shape)} {ms:8.3f} ms {gbs:7.0f} GB/s = {100 * gbs / copy_gbs:4.0f}% of copy")
    del x
    score = rs.standard_normal((batch, 21, size + 68, size + 68), dtype=np.float32)
    offsets, top = (0, 0, 19, 19), (batch, 21, size, size)
    ms = median_ms(lambda: k.crop(score, offsets, top), sync, repeat)
    gbs = 2 * math.prod(top) * 4 / ms / 1e6
    shares["crop"] = gbs / copy_gbs
    say(f"  {'crop 19,19':28s} {tuple(score.shape)} {ms:8.3f} ms {gbs:7.0f} GB/s = {100 * gbs / copy_gbs:4.0f}% of copy")
    del score

    try:
        import torch
        F = torch.nn.functional
    except ImportError:
        torch = None

    def against_torch(name, shape, ms, torch_fn, gb):
        line = f"  {name:28s} {str(shape):22s} {ms:8.3f} ms {gb / ms * 1e3:7.0f} GB/s"
        if torch is not None:
            with torch.no_grad():
                tms = median_ms(torch_fn, torch.cuda.synchronize, repeat)
            line += f"   PyTorch {tms:8.3f} ms  ratio {ms / tms:5.2f}x"
        say(line)

    # Deconvolutions of the seed's FCNs: bilinear upsampling (one channel per group) and dense.
    deconvs = [  # name, input (N, C, H, W), outputs, kernel, stride, group
        ("upscore k63/32 g21 (fcn-alexnet)", (batch, 21, 16, 16), 21, 63, 32, 21),
        ("upscore8 k16/8 (fcn-8s)", (batch, 21, 70, 70), 21, 16, 8, 1),
    ]
    for name, shape, o, kk, s, g in deconvs:
        xin = rs.standard_normal(shape, dtype=np.float32)
        w = rs.standard_normal((shape[1], o // g, kk, kk), dtype=np.float32)
        geom = ConvGeometry((kk, kk), (s, s), (0, 0), (1, 1))
        y = k.deconv2d(xin, w, None, geom, g)
        ms = median_ms(lambda: k.deconv2d(xin, w, None, geom, g), sync, repeat)
        tx, tw = ((torch.as_tensor(a, device="cuda") for a in (xin, w)) if torch is not None else (None, None))
        against_torch(name, tuple(y.shape), ms, lambda: F.conv_transpose2d(tx, tw, stride=s, groups=g),
                      (xin.nbytes + y.nbytes) / 1e9)
        del xin, w, y
    # LRN (AlexNet's norm1, norm2) and Softmax over AlexNet's classes: one fused kernel each.
    for name, shape in (("lrn 5 across (norm1)", (batch, 96, 55, 55)), ("lrn 5 across (norm2)", (batch, 256, 27, 27))):
        xin = rs.standard_normal(shape, dtype=np.float32)
        ms = median_ms(lambda: k.lrn(xin, 5, 1e-4, 0.75, 1.0, False), sync, repeat)
        tx = torch.as_tensor(xin, device="cuda") if torch is not None else None
        against_torch(name, shape, ms, lambda: F.local_response_norm(tx, 5, 1e-4, 0.75, 1.0), 2 * xin.nbytes / 1e9)
        del xin
    xin = rs.standard_normal((batch, 1000), dtype=np.float32)
    ms = median_ms(lambda: k.softmax(xin, 1), sync, repeat)
    tx = torch.as_tensor(xin, device="cuda") if torch is not None else None
    against_torch("softmax (alexnet prob)", (batch, 1000), ms, lambda: F.softmax(tx, 1), 2 * xin.nbytes / 1e9)
    del xin
    layers = [  # name, input shape, outputs, kernel, pad, group
        ("conv1_2 3x3", (batch, 64, side, side), 64, 3, 1, 1),
        ("conv3_1 3x3", (batch, 128, side // 4, side // 4), 256, 3, 1, 1),
        ("conv5_1 3x3", (batch, 512, side // 16, side // 16), 512, 3, 1, 1),
        ("fc6 7x7", (batch, 512, side // 32, side // 32), 4096, 7, 0, 1),
        ("fc7 1x1", (batch, 4096, side // 32 - 6, side // 32 - 6), 4096, 1, 0, 1),
        ("grouped 3x3 g=2 (alexnet conv4)", (batch, 384, 13, 13), 384, 3, 1, 2),
        ("depthwise 3x3", (batch, 256, 56, 56), 256, 3, 1, 256),
    ]
    for name, shape, o, kk, p, g in layers:
        xin = rs.standard_normal(shape, dtype=np.float32)
        w = rs.standard_normal((o, shape[1] // g, kk, kk), dtype=np.float32)
        b = rs.standard_normal(o, dtype=np.float32)
        geom = ConvGeometry((kk, kk), (1, 1), (p, p), (1, 1))
        y = k.conv2d(xin, w, b, geom, g)
        macs = y.size * (shape[1] // g) * kk * kk
        ms = median_ms(lambda: k.conv2d(xin, w, b, geom, g), sync, repeat)
        line = f"  {name:32s} {k.conv_method(shape[1], o, g, geom):6s} {ms:8.3f} ms {2 * macs / ms / 1e9:6.1f} TFLOP/s"
        if torch is not None:
            tx, tw, tb = (torch.as_tensor(a, device="cuda") for a in (xin, w, b))
            with torch.no_grad():
                tms = median_ms(lambda: F.conv2d(tx, tw, tb, padding=p, groups=g), torch.cuda.synchronize, repeat)
            line += f"   cuDNN {tms:8.3f} ms {2 * macs / tms / 1e9:6.1f} TFLOP/s  ratio {ms / tms:5.2f}x"
        say(line)
        del xin, w, b, y
        cupy.get_default_memory_pool().free_all_blocks()
    return shares


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=500)
    ap.add_argument("--nets", default="fcn8s,fcn_alexnet,alexnet")
    ap.add_argument("--skip-golden", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    args = ap.parse_args(argv)

    backend.set_device(args.device)
    reason = backend.gpu_unavailable_reason()
    if reason:
        say(f"gpu_check: no GPU present: {reason}")
        return 0
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(args.device)
    say(f"device {args.device}: {props['name'].decode()}, CuPy {cupy.__version__}, "
        f"CUPY_TF32={os.environ.get('CUPY_TF32', 'unset')}")
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        say(f"PyTorch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, TF32 off")
    except ImportError:
        say("PyTorch not installed: caffeish alone is timed")
    start = time.perf_counter()
    ok = True if args.skip_golden else check_golden(args.device)
    nets, shares = {}, {}
    if not args.skip_speed:
        nets = time_nets([n for n in args.nets.split(",") if n], args.batch, args.size, args.device, args.repeat)
    if not args.skip_kernels:
        try:
            shares = time_kernels(args.batch, args.size, args.device, args.repeat)
        except Exception as exc:
            say(f"kernels: {type(exc).__name__}: {exc}")
    say("== targets ==")
    if not args.skip_golden:
        say(f"  golden nets within Caffe's tolerances: {'yes' if ok else 'NO'}")
    if "fcn8s" in nets and nets["fcn8s"][1]:
        ratio = nets["fcn8s"][0] / nets["fcn8s"][1]
        say(f"  FCN-8s forward {ratio:.2f}x PyTorch/cuDNN (target <= {FCN8S_RATIO_TARGET}): "
            f"{'met' if ratio <= FCN8S_RATIO_TARGET else 'MISSED'}")
    for name, share in shares.items():
        say(f"  {name}: {100 * share:.0f}% of copy bandwidth (target >= {100 * COPY_SHARE_TARGET:.0f}%): "
            f"{'met' if share >= COPY_SHARE_TARGET else 'MISSED'}")
    say(f"total {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
