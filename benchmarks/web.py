"""`caffeish serve`: time to first paint of a model page, and one segmentation request against the CLI.

    python benchmarks/web.py [--page-net fcn8s] [--segment-net fcn-alexnet] [--repeat 3]

A workspace in a temp folder holds FCN-8s (fcn.berkeleyvision.org's voc-fcn8s deploy net) and
FCN-Alexnet (DIGITS' fcn_alexnet.deploy.prototxt) from ../shared/models, without weights (the layers'
fillers, seed 0: the same work as real weights).  The app runs under uvicorn on 127.0.0.1.

* Page: headless Chromium (Selenium, Debian's chromium and chromedriver) opens /models/NET; the first
  contentful paint from the browser's paint timing, cold (the summary computed for this request) and
  warm (cached), and when the network picture (Graphviz) is in the page.  Without Chromium: the time
  to the page's HTML over HTTP.
* Segmentation: one 500x375 image uploaded to /models/NET/infer, the task polled until done and the
  result page fetched, first request (the net built, as the CLI builds it) and warm (median of
  --repeat); against `caffeish segment NET none IMAGE -o OUT` run as a command (wall time: Python's
  start, imports, the net, one image, its PNGs).  Target: the web request within 1.2x of the CLI.
* Training job (--job-iters, 0 skips it): a segmentation dataset of 8 synthetic 500x375 images (21
  classes) built with `caffeish dataset`'s code, and a job of --job-net on it from the fillers, posted
  to /jobs: the wait from the POST to the job's first curve point on its status, then its seconds per
  iteration from its log, against `caffeish train` on the job's own solver and net files run as a
  command (the same code; the job runs at nice 5 beside the server, polled every 2 s as its page does).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("CAFFEISH_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
NETS = {
    "fcn8s": os.path.join(SHARED, "models", "fcn", "voc-fcn8s", "deploy.prototxt"),
    "fcn-alexnet": os.path.join(SHARED, "models", "digits", "examples", "semantic-segmentation",
                                "fcn_alexnet.deploy.prototxt"),
}
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def workspace(folder):
    for name, path in NETS.items():
        if not os.path.isfile(path):
            sys.exit(f"missing {path} (the benchmark reads ../shared/models)")
        os.makedirs(os.path.join(folder, "models", name))
        shutil.copyfile(path, os.path.join(folder, "models", name, "deploy.prototxt"))


def image(path, hw=(375, 500)):
    rng = np.random.default_rng(0)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, ((xx // 25 + yy // 25) % 2) * 255], axis=2)
    Image.fromarray(np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)).save(path)


def first_paint(url, net):
    """{cold, warm, picture} seconds in Chromium, or None without it."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="caffeish-bench-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        out = {}
        for visit in ("cold", "warm"):
            driver.get(f"{url}/models/{net}")
            t0 = time.time()
            paint = None
            while paint is None and time.time() - t0 < 5:  # the paint entry can come after the load event
                paint = driver.execute_script(
                    "const p = performance.getEntriesByName('first-contentful-paint')[0]; return p ? p.startTime : null")
                time.sleep(0.02)
            if paint is None:  # no paint timing in this Chromium: the DOM ready time instead
                paint = driver.execute_script("return performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd")
            t0 = time.time()
            while not driver.execute_script("return !!document.querySelector('#net-picture svg')"):
                if time.time() - t0 > 120:
                    break
                time.sleep(0.02)
            picture = driver.execute_script("return performance.now()")
            out[visit] = paint / 1000 if paint is not None else None
            out[f"{visit}_picture"] = picture / 1000
        return out
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def html_time(url, net):
    import httpx

    t0 = time.perf_counter()
    r = httpx.get(f"{url}/models/{net}", timeout=300)
    r.raise_for_status()
    return time.perf_counter() - t0


def segment_request(url, net, path):
    import httpx

    t0 = time.perf_counter()
    with open(path, "rb") as f:
        r = httpx.post(f"{url}/models/{net}/infer", files={"images": (os.path.basename(path), f, "image/png")},
                       timeout=300)
    assert r.status_code == 303, r.text[:300]
    task = r.headers["location"]
    while True:
        t = httpx.get(f"{url}{task}.json", timeout=60).json()
        if t["state"] in ("done", "failed"):
            break
        time.sleep(0.01)
    if t["state"] != "done":
        sys.exit(f"segmentation failed: {t['message']}")
    page = httpx.get(f"{url}{t['next']}", timeout=60)
    page.raise_for_status()
    return time.perf_counter() - t0


def segment_cli(folder, net, path):
    out = tempfile.mkdtemp(prefix="caffeish-bench-seg-", dir=folder)
    os.rmdir(out)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "caffeish.tools.cli", "segment",
                    os.path.join(folder, "models", net, "deploy.prototxt"), "none", path, "-o", out],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def job_dataset(folder, n=8, hw=(375, 500), classes=21):
    from caffeish.apps import dataset as datasets

    rng = np.random.default_rng(1)
    for sub in ("job_images", "job_labels"):
        os.makedirs(os.path.join(folder, sub))
    h, w = hw
    for k in range(n):
        image(os.path.join(folder, "job_images", f"{k}.png"), hw)
        label = np.zeros((h, w), np.uint8)
        for _ in range(6):
            y, x = rng.integers(0, h - 60), rng.integers(0, w - 60)
            label[y:y + rng.integers(30, 200), x:x + rng.integers(30, 200)] = rng.integers(1, classes)
        Image.fromarray(label).save(os.path.join(folder, "job_labels", f"{k}.png"))
    os.makedirs(os.path.join(folder, "datasets"))
    datasets.build_segmentation(os.path.join(folder, "job_images"), os.path.join(folder, "job_labels"),
                                os.path.join(folder, "datasets", "streets"), val_fraction=0.25,
                                class_names=None, allow_extra_classes=True)


def seconds_per_iteration(log_text):
    """Median seconds per iteration from Caffe's display lines (`Iteration N (X iter/s, ...)`), the first left out."""
    import re

    rates = [float(r) for r in re.findall(r"\] Iteration \d+ \(([0-9.]+) iter/s", log_text)][1:]
    return 1 / statistics.median(rates) if rates else float("nan")


def job_run(url, folder, net, iters):
    import httpx

    data = {"name": "bench", "network": net, "dataset": "streets", "weights": "", "type": "SGD",
            "base_lr": "1e-4", "max_iter": str(iters), "lr_policy": "fixed", "display": "1", "snapshot": "0",
            "test_interval": str(iters), "random_seed": "1", "extra": "test_initialization: false snapshot_after_train: false"}
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/jobs", data=data, timeout=300)
    assert r.status_code == 303, r.text[-500:]
    first = None
    while True:
        s = httpx.get(f"{url}/jobs/bench/status.json", timeout=60).json()
        if first is None and s["points"]:
            first = time.perf_counter() - t0
        if s["state"] not in ("running", "starting"):
            break
        time.sleep(2.0)  # as the job's page polls
    if s["state"] != "done":
        sys.exit(f"the job ended {s['state']}: {s['message']}")
    job = os.path.join(folder, "jobs", "bench")
    with open(os.path.join(job, "log.txt"), encoding="utf-8") as f:
        job_s = seconds_per_iteration(f.read())
    cli = os.path.join(folder, "cli")
    os.makedirs(cli)
    for name in ("solver.prototxt", "train_val.prototxt"):
        shutil.copyfile(os.path.join(job, name), os.path.join(cli, name))
    done = subprocess.run([sys.executable, "-m", "caffeish.tools.cli", "train", "--solver", "solver.prototxt",
                           "--no-curves"], cwd=cli, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    return first, job_s, seconds_per_iteration(done.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--page-net", choices=sorted(NETS), default="fcn8s")
    p.add_argument("--segment-net", choices=sorted(NETS), default="fcn-alexnet")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--job-net", choices=sorted(NETS), default="fcn-alexnet")
    p.add_argument("--job-iters", type=int, default=12, help="iterations of the training job (0: no job)")
    args = p.parse_args()
    from caffeish.web.app import Background, create_app

    folder = tempfile.mkdtemp(prefix="caffeish-bench-web-")
    try:
        workspace(folder)
        path = os.path.join(folder, "street_500x375.png")
        image(path)
        with Background(create_app(folder)) as served:
            paint = first_paint(served.url, args.page_net)
            if paint is None:
                print(f"model page {args.page_net}: HTML in {html_time(served.url, args.page_net):.3f} s cold, "
                      f"{html_time(served.url, args.page_net):.3f} s warm (no Chromium: no paint timing)")
            else:
                print(f"model page {args.page_net}: first contentful paint {paint['cold']:.3f} s cold (summary "
                      f"computed), {paint['warm']:.3f} s warm; network picture in at {paint['cold_picture']:.3f} s "
                      f"cold, {paint['warm_picture']:.3f} s warm")
            cli = [segment_cli(folder, args.segment_net, path) for _ in range(args.repeat)]
            first = segment_request(served.url, args.segment_net, path)
            warm = [segment_request(served.url, args.segment_net, path) for _ in range(args.repeat)]
            c, w = statistics.median(cli), statistics.median(warm)
            print(f"segmentation of one 500x375 image with {args.segment_net}: CLI {c:.3f} s (median of {len(cli)}, "
                  f"a new process each); web request {first:.3f} s the first time (net built) = {first / c:.2f}x the "
                  f"CLI, {w:.3f} s warm (median of {len(warm)}) = {w / c:.2f}x (target <= 1.2x)")
            if args.job_iters:
                job_dataset(folder)
                started, job_s, cli_s = job_run(served.url, folder, args.job_net, args.job_iters)
                print(f"training job of {args.job_net} (batch 1, 500x375, {args.job_iters} iterations): first curve "
                      f"point on its status {started:.2f} s after the POST; {job_s:.3f} s/iteration in the job against "
                      f"{cli_s:.3f} s/iteration for `caffeish train` on the same files = {job_s / cli_s:.2f}x")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
