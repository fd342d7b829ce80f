"""`caffe train`, as `caffeish train` runs it: the solver file's rewrites, weights or a snapshot
to resume, signals, and what we add to Caffe's log (a progress bar, the training curves).

`prepare(...)` reads the solver as caffe.cpp does (training.md 14): the old
`solver_type` upgraded, `snapshot_prefix` rewritten (unset: the solver's path
without its extension; an existing folder: `<folder>/<solver stem>`),
`train_state.level` set to --level and the --stage values appended,
--weights replacing the solver's `weights` and --snapshot clearing them.
`Training(...)` builds the solver and runs it; `run(...)` is the whole tool.

Signals (as `caffe train`'s --sigint_effect and --sighup_effect): SIGINT (Ctrl-C)
stops after a snapshot by default, SIGHUP takes a snapshot and goes on.  They
are polled after each update and before each test forward, as in Caffe; a
second Ctrl-C while stopping ends the process at once (the snapshot files are
written atomically, so none is left half-written).
"""
import os
import signal
import sys
import time

from caffeish.apps import progress
from caffeish.errors import CaffeishError
from caffeish.formats.schema import pb
from caffeish.runtime import solver as solvers

EFFECTS = (solvers.STOP, solvers.SNAPSHOT, solvers.NONE)


def rewrite_prefix(param, solver_path):
    """caffe.cpp's snapshot_prefix rewrite: unset -> the solver path without its extension; an
    existing folder -> <folder>/<solver stem>."""
    stem = os.path.splitext(os.path.basename(solver_path))[0]
    if not param.snapshot_prefix:
        param.snapshot_prefix = os.path.splitext(solver_path)[0]
    elif os.path.isdir(param.snapshot_prefix):
        param.snapshot_prefix = os.path.join(param.snapshot_prefix, stem)


def prepare(solver_path, weights=None, snapshot=None, level=0, stages=None):
    """The SolverParameter `caffe train` would run: read, upgraded, rewritten and checked."""
    if weights and snapshot:
        raise CaffeishError("give --weights or --snapshot, not both (--weights starts from trained weights, "
                            "--snapshot resumes a run with its solver state)")
    param = solvers.read_solver(solver_path)
    rewrite_prefix(param, solver_path)
    param.train_state.level = int(level)
    for stage in stages or ():
        param.train_state.stage.extend(s.strip() for s in stage.split(","))
    if snapshot:
        del param.weights[:]
    elif weights:
        del param.weights[:]
        param.weights.append(weights)
    solvers.check_solver(param, solver_path)
    solvers.check_lr_policy(param, solver_path)
    for entry in param.weights:
        for path in (p.strip() for p in entry.split(",")):
            if path and not os.path.isfile(path):
                raise CaffeishError(f"--weights: '{path}' does not exist")
    if snapshot and not os.path.isfile(snapshot):
        raise CaffeishError(f"--snapshot: '{snapshot}' does not exist")
    return param


def device_for(param, gpu):
    """The device `caffe train` trains on: --gpu ID, else an explicit `solver_mode: GPU` (device_id;
    without a usable GPU, Training warns and uses the CPU, as set_mode_gpu() does for pycaffe scripts),
    else None: the process's mode (the CPU, unless a Python caller chose caffeish.set_mode_gpu())."""
    if gpu is not None:
        return f"cuda:{gpu}"
    if param.HasField("solver_mode") and param.solver_mode == pb.SolverParameter.GPU:
        return f"cuda:{param.device_id}"
    return None


class Signals:
    """SIGINT/SIGHUP -> the solver's actions while installed (Caffe's SignalHandler)."""

    def __init__(self, sigint=solvers.STOP, sighup=solvers.SNAPSHOT):
        self.effects = {signal.SIGINT: sigint}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup
        self.pending = []
        self.stopping = False
        self.previous = {}

    def _handle(self, signum, frame):
        effect = self.effects.get(signum, solvers.NONE)
        if signum == signal.SIGINT and self.stopping:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if effect == solvers.STOP:
            self.stopping = True
        if effect != solvers.NONE:
            self.pending.append(effect)

    def action(self):
        """The next requested action (Caffe's GetRequestedAction): stop before snapshot."""
        if not self.pending:
            return solvers.NONE
        effect = solvers.STOP if solvers.STOP in self.pending else self.pending[0]
        self.pending.clear() if effect == solvers.STOP else self.pending.remove(effect)
        return effect

    def __enter__(self):
        for signum in self.effects:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class ProgressBar:
    """A bar over the iterations with the smoothed loss and an ETA (on a terminal only)."""

    def __init__(self, start, total):
        self.bar = progress.bar(total=total, initial=start, desc="train", unit="iter")
        self.loss = None

    @property
    def shown(self):
        return not self.bar.disable

    def write(self, line):
        if self.shown:
            self.bar.write(line, file=self.bar.fp)

    def on_start(self, it):
        """The iteration training starts from (after --snapshot): the rate and ETA count from there."""
        self.bar.initial = self.bar.n = it
        self.bar.refresh()

    def on_train(self, it, loss, outputs):
        self.loss = loss
        self.bar.set_postfix_str(f"loss {solvers.fmt(loss)}", refresh=False)

    def on_lr(self, it, rate):
        self.bar.n = it + 1
        self.bar.refresh()

    def close(self):
        self.bar.close()


class Training:
    """One `caffe train` run: the solver, its curves and its progress bar."""

    def __init__(self, param, solver_path, snapshot=None, gpu=None, out=None, log=None, curves=True):
        self.param = param
        self.snapshot = snapshot
        self.out = out if out is not None else (os.path.dirname(param.snapshot_prefix) or ".")
        self.log = log or solvers.stderr_log
        self.bar = None
        device = device_for(param, gpu)
        if device is not None and device.startswith("cuda"):
            from caffeish.runtime import backend

            reason = backend.gpu_unavailable_reason()
            if reason and gpu is None:  # the file's solver_mode: GPU (BVLC's and DIGITS' solvers say it)
                sys.stderr.write(f"caffeish train: warning: the solver asks for solver_mode: GPU, but {reason}; "
                                 f"training on the CPU (--gpu makes a missing GPU an error)\n")
                device = None
            elif reason:
                raise CaffeishError(f"cannot train on the GPU: {reason}")
        if device is not None and device.startswith("cuda"):
            self.log(f"Use GPU with device ID {device.partition(':')[2] or 0}", "caffe.cpp:204")
        else:
            self.log("Use CPU.", "caffe.cpp:197")
        solvers.check_snapshot_prefix(param, solver_path)  # before the nets are built, which can take a while
        self.solver = solvers.Solver(param, log=self._log, where=solver_path, device=device)
        self.curves = None
        if curves:
            from caffeish.apps.curves import Curves

            os.makedirs(self.out, exist_ok=True)
            self.curves = Curves(self.out, title=self.solver.net.name)
            self.solver.listeners.append(_CurvesListener(self.curves, resumed=snapshot is not None))

    def _log(self, message, where):
        if self.bar is not None and self.bar.shown:
            stamp = time.strftime("%m%d %H:%M:%S")
            self.bar.write(f"I{stamp} {os.getpid()} {where}] {message}")
        else:
            self.log(message, where)

    def run(self, sigint=solvers.STOP, sighup=solvers.SNAPSHOT, stop_requested=None):
        """Solve; stop_requested(): whether a stop came before the signal handlers were installed (a
        caller's own handler while the nets were built): then the run stops at its first chance."""
        solver = self.solver
        self._log("Starting Optimization", "caffe.cpp:239")
        with Signals(sigint, sighup) as signals:
            if stop_requested is not None and stop_requested():
                signals.pending.append(solvers.STOP)
            solver.action = signals.action
            self.bar = ProgressBar(0, self.param.max_iter)
            solver.listeners.append(self.bar)
            try:
                solver.solve(self.snapshot)
            finally:
                self.bar.close()
                self.bar = None
                if self.curves is not None:
                    self.curves.close()
        return solver


class _CurvesListener:
    """Feeds the curves; the CSV is rewritten (and synced) at most every `interval` seconds, after
    each test pass and at each snapshot, so that a fast run does not spend its time writing it."""

    def __init__(self, curves, interval=2.0, resumed=False):
        self.curves = curves
        self.interval = interval
        self.last = None
        self.resumed = resumed

    def on_start(self, it):
        """A resumed run goes on with the curves its first part wrote there (rows before `it`)."""
        if self.resumed:
            from caffeish.apps.curves import read_csv

            try:
                read_csv(self.curves.csv_path, self.curves, before=it)
            except CaffeishError as e:  # the plot must never stop a run: start its curves again
                self.curves.clear()
                sys.stderr.write(f"caffeish train: warning: {e}; the curves start again at iteration {it}\n")

    def _flush(self, force=False):
        now = time.monotonic()
        if force or self.last is None or now - self.last >= self.interval:
            self.curves.flush()
            self.last = now

    def on_train(self, it, loss, outputs):
        self.curves.train(it, loss, outputs={k: v for k, v in outputs.items() if k != "loss"} or None)
        self._flush()

    def on_lr(self, it, rate):
        self.curves.lr(it, rate)

    def on_test(self, it, index, outputs):
        self.curves.test(it, outputs, net_index=index)
        self._flush(force=True)

    def on_snapshot(self, it, files):
        self._flush(force=True)


def run(solver_path, weights=None, snapshot=None, gpu=None, level=0, stages=None, out=None,
        sigint=solvers.STOP, sighup=solvers.SNAPSHOT, curves=True, log=None):
    """The whole of `caffeish train`; returns the finished Solver."""
    param = prepare(solver_path, weights, snapshot, level, stages)
    training = Training(param, solver_path, snapshot=snapshot, gpu=gpu, out=out, log=log, curves=curves)
    return training.run(sigint, sighup)
