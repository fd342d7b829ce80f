"""Fuzz `caffeish train` with seeded mutations of the golden training runs.

    python benchmarks/fuzz_train.py [--seed 0] [--inputs 300 | --minutes M] [--timeout 20]

Each input copies one case of ../shared/golden_train/solver into a temp folder, mutates one of its
files with benchmarks/fuzz.py's mutations (the solver or the net prototxt, a snapshot's
.solverstate or .caffemodel, the initial weights) and runs `caffeish train` there in-process:
from the weights, or resumed from a (possibly damaged) solver state.  Every run must end with
status 0, or status 1 and exactly one `caffeish train: error:` line after Caffe's INFO log lines;
anything else (a traceback, a second message, a hang past --timeout: reported apart, as a
mutated max_iter can ask for millions of iterations) is listed with its seed, so that
`--seed S --inputs 1` reproduces it.
"""
import argparse
import collections
import contextlib
import io
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fuzz  # noqa: E402  (its mutations and Overtime)

GLOG = ("I", "W")


def cases(shared):
    root = os.path.join(shared, "golden_train", "solver")
    return sorted(os.path.join(root, d) for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "meta.json")))


def prepare(rng, case, scratch):
    """(folder, argv, what) of one mutated copy of `case`."""
    folder = tempfile.mkdtemp(dir=scratch)
    for name in os.listdir(case):
        if name in ("resumed", "caffe.log"):
            continue
        src, dst = os.path.join(case, name), os.path.join(folder, name)
        shutil.copytree(src, dst) if os.path.isdir(src) else shutil.copy(src, dst)
    for root, dirs, files in os.walk(folder):  # the golden tree is read-only
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
    snaps = os.path.join(folder, "snapshots")
    states = sorted(os.path.join("snapshots", n) for n in os.listdir(snaps) if n.endswith(".solverstate"))
    targets = ["solver.prototxt", "solver.prototxt", "train_val.prototxt", "init.caffemodel"]
    targets += states + sorted(os.path.join("snapshots", n) for n in os.listdir(snaps) if n.endswith(".caffemodel"))
    target = rng.choice(targets)
    path = os.path.join(folder, target)
    with open(path, "rb") as f:
        data = f.read()
    for _ in range(rng.choice([1, 1, 2])):
        data, what = fuzz.mutate(rng, data, path, [path])
    with open(path, "wb") as f:
        f.write(data)
    argv = ["train", "--solver", "solver.prototxt", "--no-curves"]
    if target.endswith(".solverstate"):
        argv += ["--snapshot", target]
    elif states and target.startswith("snapshots") or (states and rng.random() < 0.2):
        argv += ["--snapshot", states[0]]
    elif rng.random() < 0.9:
        argv += ["--weights", "init.caffemodel"]
    return folder, argv, f"{os.path.basename(case)}/{target}: {what}"


def run(argv, timeout):
    """(kind, detail): ok, error (one clean line), timeout or failure."""
    from caffeish.tools.cli import main

    err = io.StringIO()
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except fuzz.Overtime:
        return "timeout", ""
    except BaseException:
        return "failure", traceback.format_exc()[-1500:]
    finally:
        signal.alarm(0)
    messages = [line for line in err.getvalue().split("\n") if line.startswith("caffeish ")]
    if code == 0:
        return "ok", ""
    if code == 1 and len(messages) == 1 and messages[0].startswith("caffeish train: error: ") \
            and "Traceback" not in err.getvalue():
        return "error", messages[0][:300]
    return "failure", f"exit {code}: {err.getvalue()[-1500:]!r}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inputs", type=int, default=300)
    p.add_argument("--minutes", type=float, default=None, help="run until then instead of --inputs")
    p.add_argument("--timeout", type=int, default=20, help="seconds per input")
    p.add_argument("--shared", default=fuzz.DEFAULT_SHARED)
    args = p.parse_args(argv)
    found = cases(args.shared)
    if not found:
        sys.exit(f"no golden training runs under {args.shared}/golden_train/solver")

    def alarm(*_):
        raise fuzz.Overtime()

    signal.signal(signal.SIGALRM, alarm)
    os.environ["GLOG_minloglevel"] = "0"
    kinds, failures, slow = collections.Counter(), [], []
    start, here = time.monotonic(), os.getcwd()
    deadline = start + args.minutes * 60 if args.minutes else None
    with tempfile.TemporaryDirectory() as scratch:
        seed = args.seed
        while (deadline is None and seed < args.seed + args.inputs) or (deadline and time.monotonic() < deadline):
            rng = random.Random(seed)
            folder, command, what = prepare(rng, rng.choice(found), scratch)
            os.chdir(folder)
            try:
                kind, detail = run(command, args.timeout)
            finally:
                os.chdir(here)
                shutil.rmtree(folder, ignore_errors=True)
            kinds[kind] += 1
            if kind == "failure":
                failures.append((seed, what, " ".join(command), detail))
            elif kind == "timeout":
                slow.append(f"seed {seed}: {what}")
            seed += 1
    total = sum(kinds.values())
    print(f"{total} inputs in {time.monotonic() - start:.0f} s: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    if slow:
        print(f"over {args.timeout} s (a mutated max_iter, test_iter or batch size asks for that much work; "
              f"check that each is one):\n  " + "\n  ".join(slow))
    for seed, what, command, detail in failures:
        print(f"\nseed {seed}: {what}\n  caffeish {command}\n  {detail}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
