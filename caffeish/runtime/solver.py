"""Caffe's solvers: the training loop, the update rules, the lr policies, snapshots and restore.

Our restatement of Caffe's `solver.cpp` and `sgd_solver.cpp` and friends, as
../shared/caffe/training.md sections 11 and 12 describe them:

* `read_solver(path)`: a solver prototxt, the old `solver_type` enum upgraded.
* `check_solver(param)`: what Caffe refuses (when it builds the solver, or at the
  first update), refused here up front, each message naming the field.
* `Solver(param)`: builds the train net and the test nets (NetState merging,
  `weights`, `random_seed`), and runs Caffe's loop: `step(n)`, `solve()`,
  `test_all()`, `apply_update()`, `snapshot()`, `restore(path)`.  The arithmetic
  of an update is float32 in Caffe's order (clip, ÷iter_size, weight decay, the
  rule, data -= Δ), on the net's backend (numpy or CuPy: history lives beside
  the parameters).
* Snapshots are `<prefix>_iter_<it>.caffemodel` and `.solverstate` (or `.h5`
  forms), written atomically, byte-compatible with Caffe's both ways.

The solver reports through `log(message, where)` (Caffe's LOG(INFO) lines, with
the source position glog prints: `solver.cpp:239`) and through `listeners`
(objects with any of `on_start(it)` (solve, after a restore), `on_train(it, loss, outputs)`, `on_lr(it, rate)`,
`on_test(it, index, outputs)`, `on_snapshot(it, files)`), which the `train`
tool uses for its progress bar and curves.
"""
import math
import os
import sys
import time

import numpy as np
from google.protobuf import text_format

from caffeish.errors import CaffeishError
from caffeish.formats import io, wire
from caffeish.formats.schema import pb
from caffeish.formats.upgrade import upgrade_solver
from caffeish.runtime import backend as backends
from caffeish.runtime import blas, fillers

TRAIN, TEST = pb.TRAIN, pb.TEST
SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
# history blobs per learnable parameter
HISTORY_SETS = {"SGD": 1, "Nesterov": 1, "AdaGrad": 1, "RMSProp": 1, "AdaDelta": 2, "Adam": 2}

# Signal actions (Caffe's SolverAction).
NONE, STOP, SNAPSHOT = "none", "stop", "snapshot"

# SolverState field numbers (caffe.proto).
STATE_ITER, STATE_LEARNED_NET, STATE_HISTORY, STATE_CURRENT_STEP = 1, 2, 3, 4


class SolverError(CaffeishError):
    """A solver definition Caffe refuses, or a solverstate that does not fit."""


# -- reading and checking -------------------------------------------------------------------------
def read_solver(path):
    """The SolverParameter of a solver prototxt, with the old `solver_type` enum upgraded to `type`."""
    param, _ = io.read_prototxt(os.fspath(path), upgrade=False, message=pb.SolverParameter())
    param, _ = upgrade_solver(param)
    return param


def _where(param, where):
    return f"{where}: " if where else ""


def check_solver(param, where=""):
    """Refuse (SolverError, naming the field) a solver Caffe refuses when it builds the solver."""
    at = _where(param, where)
    if param.type not in SOLVER_TYPES:
        raise SolverError(f"{at}type '{param.type}' is not a solver type; Caffe has "
                          f"{', '.join(SOLVER_TYPES)}")
    if param.average_loss < 1:
        raise SolverError(f"{at}average_loss must be at least 1, got {param.average_loss}")
    if param.iter_size < 1:
        raise SolverError(f"{at}iter_size must be at least 1, got {param.iter_size}")
    if param.snapshot < 0:
        raise SolverError(f"{at}snapshot must be 0 (off) or positive, got {param.snapshot}")
    if param.snapshot > 0 and not param.snapshot_prefix:
        raise SolverError(f"{at}snapshot is {param.snapshot} but snapshot_prefix is not set "
                          f"(Caffe: In solver params, snapshot is specified but snapshot_prefix is not)")
    if param.max_iter < 0:
        raise SolverError(f"{at}max_iter must not be negative, got {param.max_iter}")
    if param.display < 0 or param.test_interval < 0:
        field = "display" if param.display < 0 else "test_interval"
        raise SolverError(f"{at}{field} must not be negative, got {getattr(param, field)}")
    if any(n < 0 for n in param.test_iter):
        raise SolverError(f"{at}test_iter must not be negative, got {list(param.test_iter)}")
    nets = [f for f in ("net", "net_param", "train_net", "train_net_param") if param.HasField(f)]
    if len(nets) != 1:
        raise SolverError(
            f"{at}give exactly one of net, net_param, train_net, train_net_param "
            f"({'none is' if not nets else ', '.join(nets) + ' are'} set)")
    if param.type in ("AdaGrad", "RMSProp") and param.momentum != 0:
        raise SolverError(f"{at}momentum must be 0 for {param.type} (Caffe: Momentum cannot be used with "
                          f"{param.type}), got {param.momentum:g}")
    if param.type == "RMSProp" and not 0 <= param.rms_decay < 1:
        raise SolverError(f"{at}rms_decay must be in [0, 1) for RMSProp, got {param.rms_decay:g}")
    if param.weight_decay != 0 and param.regularization_type not in ("L1", "L2"):
        raise SolverError(f"{at}regularization_type '{param.regularization_type}' is not L1 or L2 (Caffe: "
                          f"Unknown regularization type)")
    if param.snapshot_format == pb.SolverParameter.HDF5:
        pass  # needs h5py: refused when the first snapshot is written, with the package to install


def check_lr_policy(param, where=""):
    """Refuse an lr_policy Caffe refuses at the first update (an unknown one, or its checks)."""
    at = _where(param, where)
    policy = param.lr_policy
    if policy not in LR_POLICIES:
        raise SolverError(f"{at}lr_policy {policy!r} is not a learning rate policy; Caffe has "
                          f"{', '.join(LR_POLICIES)}" + ("" if policy else " (lr_policy is not set)"))
    if policy in ("step", "exp", "inv", "multistep", "sigmoid") and param.gamma < 0:
        raise SolverError(f"{at}gamma must be at least 0 for lr_policy '{policy}', got {param.gamma:g}")
    if policy in ("step", "sigmoid") and param.stepsize <= 0:
        raise SolverError(f"{at}stepsize must be positive for lr_policy '{policy}', got {param.stepsize}")


def check_snapshot_prefix(param, where=""):
    """Caffe's probe when it builds a solver: the snapshot folder must take a file (one is written, then
    removed), so that a run does not fail at its first snapshot."""
    at = _where(param, where)
    if not param.snapshot_prefix:
        return
    probe = f"{param.snapshot_prefix}_iter_0.tempfile"
    if "\0" in probe:
        raise SolverError(f"{at}snapshot_prefix {param.snapshot_prefix!r} holds a NUL byte, which no file name can")
    try:
        with open(probe, "xb"):
            pass
        os.unlink(probe)
    except FileExistsError:
        pass
    except OSError as e:
        raise SolverError(f"{at}cannot write snapshots with snapshot_prefix '{io.printable(param.snapshot_prefix)}': "
                          f"{e.strerror or e} (Caffe: Cannot write to snapshot prefix)") from None


def merged_state(phase, net_state, extra):
    """Caffe's NetState merging: {phase}, then the net's own state, then the solver's."""
    state = pb.NetState()
    state.phase = phase
    state.MergeFrom(net_state)
    state.MergeFrom(extra)
    return state


# -- lr policies (training.md 11.5) ----------------------------------------------------------------
def learning_rate(param, it, current_step, log=None):
    """(rate as float32, current_step) of update `it` under param's lr_policy."""
    policy = param.lr_policy
    base = float(np.float32(param.base_lr))
    gamma = float(np.float32(param.gamma))
    power = np.float32(param.power)
    if policy == "fixed":
        rate = base
    elif policy == "step":
        current_step = it // param.stepsize
        rate = base * _pow(gamma, current_step)
    elif policy == "exp":
        rate = base * _pow(gamma, it)
    elif policy == "inv":  # pow(float, float) in Caffe's C++: float
        rate = base * float(np.power(np.float32(1) + np.float32(gamma) * np.float32(it), -power))
    elif policy == "multistep":
        if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
            current_step += 1
            if log is not None:
                log(f"MultiStep Status: Iteration {it}, step = {current_step}", "sgd_solver.cpp:61")
        rate = base * _pow(gamma, current_step)
    elif policy == "poly":  # float arithmetic throughout
        frac = np.float32(1) - np.float32(it) / np.float32(param.max_iter)
        rate = float(np.float32(base) * np.power(frac, power, dtype=np.float32))
    elif policy == "sigmoid":
        e = np.exp(np.float32(-gamma) * (np.float32(it) - np.float32(param.stepsize)), dtype=np.float32)
        rate = float(np.float32(base) * (np.float32(1) / (np.float32(1) + e)))
    else:
        check_lr_policy(param)
        raise AssertionError(policy)
    return np.float32(rate), current_step


def _pow(x, n):
    """C++'s pow in double: inf or 0 where Python's ** would raise OverflowError."""
    with np.errstate(all="ignore"):
        return float(np.power(np.float64(x), n))


def fmt(value):
    """A number as C++'s ostream prints it by default (6 significant digits)."""
    value = float(value)
    if math.isnan(value):
        return "nan" if math.copysign(1, value) > 0 else "-nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:g}"


def stderr_log(message, where="solver.cpp:0"):
    """Caffe's LOG(INFO) line on stderr, with glog's prefix (read by Caffe's parse_log.py).  The
    solver escapes the names from files it puts in messages (io.printable)."""
    if os.environ.get("GLOG_minloglevel", "0").strip() not in ("", "0"):
        return
    now = time.time()
    stamp = time.strftime("%m%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1e6):06d}"
    sys.stderr.write(f"I{stamp} {os.getpid()} {where}] {message}\n")
    sys.stderr.flush()


class Learnable:
    """One learnable parameter (Caffe's learnable_params_ entry): its owner's (layer, index),
    lr_mult and decay_mult."""

    __slots__ = ("layer", "index", "lr_mult", "decay_mult", "has_lr", "has_decay")

    def __init__(self, layer, index, spec):
        self.layer, self.index = layer, index
        self.lr_mult, self.decay_mult = float(spec.lr_mult), float(spec.decay_mult)
        self.has_lr, self.has_decay = spec.HasField("lr_mult"), spec.HasField("decay_mult")


def learnable_params(net):
    """The Net's learnable parameters in Caffe's order, shared ones once (by their owner),
    lr_mult and decay_mult from the owner or the first sharer that sets them (Net::AppendParam)."""
    out, by_owner = [], {}
    for node in net.nodes:
        count = len(net._params.get(node.name, []))
        for j in range(count):
            spec = pb.ParamSpec()
            if j < len(node.param.param):
                spec.CopyFrom(node.param.param[j])
            elif node.type == "BatchNorm":  # BatchNorm adds lr_mult 0 for its statistics
                spec.lr_mult = 0
            owner = net._param_owner.get((node.name, j))
            if owner is None or owner == (node.name, j):
                entry = Learnable(node.name, j, spec)
                by_owner[(node.name, j)] = entry
                out.append(entry)
                continue
            entry = by_owner[owner]
            for has, value, mult in (("has_lr", "lr_mult", spec.HasField("lr_mult")),
                                     ("has_decay", "decay_mult", spec.HasField("decay_mult"))):
                if not mult:
                    continue
                mine = float(getattr(spec, value))
                if getattr(entry, has):
                    if getattr(entry, value) != mine:
                        raise SolverError(
                            f"layer '{node.name}': parameter {j} shares '{node.param.param[j].name}' but sets "
                            f"{value} {mine:g} where its owner's is {getattr(entry, value):g} (Caffe: Shared "
                            f"param has mismatched {value})")
                else:
                    setattr(entry, has, True)
                    setattr(entry, value, mine)
    return out


# -- the solver --------------------------------------------------------------------------------------
class Solver:
    """Caffe's Solver and SGDSolver family over caffeish Nets.

    param: a SolverParameter (or a path to a solver prototxt).  weights: extra
    caffemodel paths (the `--weights` list) loaded into the train and test
    nets after the solver's own `weights`.  backend: "numpy"/"cupy"/None
    (caffeish.set_mode_gpu decides), or device: "cpu"/"cuda:N".
    log: callable(message, where) for Caffe's INFO lines (default: stderr,
    glog-style).  type_: the solver type to build (pycaffe's SGDSolver(...)
    builds an SGD solver whatever the file says); default param.type.
    """

    def __init__(self, param, weights=(), backend=None, log=None, type_=None, where=None, device=None):
        if not isinstance(param, pb.SolverParameter):
            where = where or os.fspath(param)
            param = read_solver(param)
        self.where = where or "solver"
        if type_ is not None and type_ != param.type:  # the caller's message stays as it was
            param = type(param).FromString(param.SerializeToString())
            param.type = type_
        self.param = param
        check_solver(param, self.where)
        self.type = param.type
        self.log = log or stderr_log
        self.listeners = []
        self.callbacks = []  # pycaffe's add_callback: (on_start, on_gradients)
        self.action = lambda: NONE  # polled for signals (the train tool sets it)
        self.requested_early_exit = False
        self.log("Initializing solver from parameters: \n" + text_format.MessageToString(param).rstrip("\n"),
                 "solver.cpp:45")
        if param.random_seed >= 0:
            fillers.set_global_seed(int(param.random_seed) & 0xFFFFFFFF)
        self.backend, self.device = backend, device
        self.net = self._train_net()
        self.test_nets = self._test_nets()
        for path in [w.strip() for entry in list(param.weights) + list(weights or ()) for w in entry.split(",")]:
            if not path:
                continue
            self.log(f"Finetuning from {io.printable(path)}", "solver.cpp:72")
            for net in [self.net] + self.test_nets:
                net.copy_from(path)
        self.xp = self.net.xp
        self.iter = 0
        self.current_step = 0
        self.learnable = learnable_params(self.net)
        self.history = [self.xp.zeros(self._param(p).shape, dtype=np.float32)
                        for _ in range(HISTORY_SETS[self.type]) for p in self.learnable]
        self._losses, self._smoothed, self._start = [], 0.0, 0
        self._last_display = None
        self.log("Solver scaffolding done.", "solver.cpp:57")

    # -- nets --------------------------------------------------------------------------
    def _build(self, source, phase, extra, what):
        from caffeish.runtime.net import Net

        if isinstance(source, pb.NetParameter):
            net_param = pb.NetParameter()
            net_param.CopyFrom(source)
            if not len(net_param.layer) and not len(net_param.layers):
                raise SolverError(f"{self.where}: the {what.split(' ')[0]} net given in the solver defines no layers")
        else:
            net_param = io.read_net(source)  # a prototxt (Caffe reads the net file as text) with layers
        state = merged_state(phase, net_param.state, extra)
        net_param.ClearField("state")
        self.log(f"Creating {io.printable(what)}", "solver.cpp:102")
        return Net(net_param, phase=state.phase, level=state.level, stages=list(state.stage),
                   backend=self.backend, device=self.device)

    def _train_net(self):
        p = self.param
        state = p.train_state
        if p.HasField("train_net_param"):
            return self._build(p.train_net_param, TRAIN, state, "training net specified in train_net_param.")
        if p.HasField("train_net"):
            return self._build(p.train_net, TRAIN, state, f"training net from train_net file: {p.train_net}")
        if p.HasField("net_param"):
            return self._build(p.net_param, TRAIN, state, "training net specified in net_param.")
        return self._build(p.net, TRAIN, state, f"training net from net file: {p.net}")

    def _test_nets(self):
        p = self.param
        generic = p.HasField("net") or p.HasField("net_param")
        sources = [(s, "test net specified in test_net_param") for s in p.test_net_param]
        sources += [(s, f"test net from test_net file: {s}") for s in p.test_net]
        extra = len(p.test_iter) - len(sources)
        if generic and extra > 0:
            generic_source = p.net_param if p.HasField("net_param") else p.net
            sources += [(generic_source, f"test net (#{len(sources) + k}) specified by net "
                                         f"{'param' if p.HasField('net_param') else 'file: ' + p.net}")
                        for k in range(extra)]
        if len(p.test_iter) != len(sources):
            raise SolverError(f"{self.where}: test_iter must be given once per test net: {len(sources)} test "
                              f"net(s), {len(p.test_iter)} test_iter value(s)")
        if len(p.test_state) and len(p.test_state) != len(sources):
            raise SolverError(f"{self.where}: test_state must be unspecified or given once per test net "
                              f"({len(sources)}), got {len(p.test_state)}")
        if sources and p.test_interval <= 0:
            raise SolverError(f"{self.where}: test_interval must be positive when there are test nets "
                              f"(test_iter is given), got {p.test_interval}")
        nets = []
        for i, (source, what) in enumerate(sources):
            state = p.test_state[i] if len(p.test_state) else pb.NetState()
            nets.append(self._build(source, TEST, state, what))
        return nets

    def _param(self, entry):
        return self.net._params[entry.layer][entry.index]

    def _diff(self, entry):
        return self.net.param_diff(entry.layer, entry.index)

    # -- the loop (training.md 11.2) -----------------------------------------------------
    def _notify(self, event, *args):
        for listener in self.listeners:
            f = getattr(listener, event, None)
            if f is not None:
                f(*args)

    def _poll(self):
        action = self.action()
        return action if action in (STOP, SNAPSHOT) else NONE

    def forward_backward(self):
        """One ForwardBackward of the train net: its loss (the sum of the loss-weighted tops)."""
        net = self.net
        loss = net._forward(0, len(net.nodes) - 1)
        net.backward_from_to(len(net.nodes) - 1, 0)
        return loss

    def _smooth(self, loss):
        size = self.param.average_loss
        if len(self._losses) < size:
            self._losses.append(loss)
            k = len(self._losses)
            self._smoothed = np.float32((self._smoothed * (k - 1) + loss) / k)
        else:
            idx = (self.iter - self._start) % size
            self._smoothed = np.float32(self._smoothed + (loss - self._losses[idx]) / size)
            self._losses[idx] = loss

    def step(self, iters):
        """Caffe's Solver::Step: `iters` more updates (tests, display, snapshots on the way)."""
        p = self.param
        self._start = start = self.iter
        stop = start + int(iters)
        self._losses, self._smoothed = [], np.float32(0)
        if self._last_display is None:
            self._last_display = (time.perf_counter(), self.iter)
        while self.iter < stop:
            self.net.clear_param_diffs()
            if p.test_interval and self.iter % p.test_interval == 0 and (self.iter > 0 or p.test_initialization):
                self.test_all()
                if self.requested_early_exit:
                    break
            for on_start, _ in self.callbacks:
                on_start()
            display = p.display and self.iter % p.display == 0
            loss = np.float32(0)
            for _ in range(p.iter_size):
                loss = np.float32(loss + np.float32(self.forward_backward()))
            loss = np.float32(loss / np.float32(p.iter_size))
            self._smooth(loss)
            outputs = None
            if display:
                now = time.perf_counter()
                then, last_it = self._last_display
                lapse = now - then
                per_s = (self.iter - last_it) / lapse if lapse > 0 and self.iter > last_it else 0.0
                self.log(f"Iteration {self.iter} ({fmt(per_s)} iter/s, {fmt(lapse)}s/{p.display} iters), "
                         f"loss = {fmt(self._smoothed)}", "solver.cpp:239")
                self._last_display = (now, self.iter)
                outputs = self._log_outputs(self.net, "Train", "solver.cpp:258")
            self._notify("on_train", self.iter, float(self._smoothed), outputs or {})
            for _, on_gradients in self.callbacks:
                on_gradients()
            self.apply_update()
            action = self._poll()
            if (p.snapshot and self.iter % p.snapshot == 0) or action == SNAPSHOT:
                self.snapshot()
            if action == STOP:
                self.requested_early_exit = True
                break

    def _output_values(self, net):
        """[(blob, loss weight, float32 values)] of the net's outputs, sorted by name as Caffe lists them."""
        weights = net.blob_loss_weights
        out = []
        for name in sorted(net.outputs):
            values = np.asarray(backends.to_numpy(net._arrays[name]), dtype=np.float32).reshape(-1)
            out.append((name, weights.get(name, 0.0), values))
        return out

    def _log_outputs(self, net, what, where, values=None):
        """Log `what` net output #k lines; returns {blob or blob[i]: value}."""
        result = {}
        k = 0
        for name, weight, vals in (values if values is not None else self._output_values(net)):
            for i, v in enumerate(vals):
                line = f"    {what} net output #{k}: {io.printable(name)} = {fmt(v)}"
                if weight:
                    line += f" (* {fmt(weight)} = {fmt(np.float32(weight) * v)} loss)"
                self.log(line, where)
                result[name if len(vals) == 1 else f"{name}[{i}]"] = float(v)
                k += 1
        return result

    def solve(self, resume_file=None):
        """Caffe's Solver::Solve: [restore], step to max_iter, the final snapshot, display and test."""
        p = self.param
        self.log(f"Solving {io.printable(self.net.name)}", "solver.cpp:289")
        self.log(f"Learning Rate Policy: {io.printable(p.lr_policy)}", "solver.cpp:290")
        self.requested_early_exit = False
        if resume_file:
            self.log(f"Restoring previous solver status from {io.printable(resume_file)}", "solver.cpp:294")
            self.restore(resume_file)
        self._notify("on_start", self.iter)
        self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        elif self.requested_early_exit and not (p.snapshot and self.iter % p.snapshot == 0):
            self.snapshot()  # stopped by a signal: always leave a snapshot to resume from
        if self.requested_early_exit:
            self.log("Optimization stopped early.", "solver.cpp:311")
            return
        if p.display and self.iter % p.display == 0:
            loss = np.float32(self.net._forward(0, len(self.net.nodes) - 1))
            self._smooth(loss)
            self.log(f"Iteration {self.iter}, loss = {fmt(self._smoothed)}", "solver.cpp:321")
            self._notify("on_train", self.iter, float(self._smoothed), {})
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        self.log("Optimization Done.", "solver.cpp:326")

    # -- testing (11.3) ---------------------------------------------------------------------
    def test_all(self):
        """Every test net once (Caffe's TestAll); returns [{output: mean}, ...]."""
        results = []
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            results.append(self.test(i))
        return results

    def test(self, index=0):
        """Test net `index`: test_iter forwards on the train net's current weights; the mean of
        every output element, logged as Caffe does.  Returns {output: mean}."""
        p = self.param
        self.log(f"Iteration {self.iter}, Testing net (#{index})", "solver.cpp:347")
        net = self.test_nets[index]
        net.share_with(self.net)
        scores, loss = None, np.float32(0)
        iters = p.test_iter[index]
        for _ in range(iters):
            action = self._poll()
            if action == SNAPSHOT:
                self.snapshot()
            elif action == STOP:
                self.requested_early_exit = True
                break
            iter_loss = net._forward(0, len(net.nodes) - 1)
            if p.test_compute_loss:
                loss = np.float32(loss + np.float32(iter_loss))
            values = self._output_values(net)
            if scores is None:
                scores = [(name, w, v.copy()) for name, w, v in values]
            else:
                for (_, _, acc), (_, _, v) in zip(scores, values):
                    acc += v
        if self.requested_early_exit:
            self.log("Test interrupted.", "solver.cpp:380")
            return {}
        if p.test_compute_loss:
            self.log(f"Test loss: {fmt(loss / np.float32(iters))}", "solver.cpp:385")
        means = [(name, w, acc / np.float32(iters)) for name, w, acc in (scores or [])]
        result = self._log_outputs(net, "Test", "solver.cpp:414", means)
        self._notify("on_test", self.iter, index, result)
        return result

    # -- ApplyUpdate (11.4, 11.6) ---------------------------------------------------------
    def apply_update(self):
        """One update from the param diffs as they are: clip, normalize, decay, the rule, data -= Δ;
        then iter += 1 (Caffe's SGDSolver::ApplyUpdate)."""
        check_lr_policy(self.param, self.where)
        rate, self.current_step = learning_rate(self.param, self.iter, self.current_step, self.log)
        p = self.param
        if p.display and self.iter % p.display == 0:
            self.log(f"Iteration {self.iter}, lr = {fmt(rate)}", "sgd_solver.cpp:112")
        self._notify("on_lr", self.iter, float(rate))
        self._clip()
        for i, entry in enumerate(self.learnable):
            self._normalize(entry)
            self._regularize(entry)
            self._compute_update(i, entry, rate)
        self.net._sync_host()
        for entry in self.learnable:  # Net::Update: data -= diff
            data, diff = self._param(entry), self._diff(entry)
            self._axpy(-1.0, diff, data)
        self.iter += 1

    def _axpy(self, a, x, y):
        if self.xp is np:
            blas.axpy(a, x, y)
        else:
            y += self.xp.float32(a) * x

    def _axpby(self, a, x, b, y):
        """y = a*x + b*y (Caffe's caffe_cpu_axpby: one pass of cblas_saxpby on the CPU)."""
        if self.xp is np:
            blas.axpby(a, x, b, y)
        else:
            y *= self.xp.float32(b)
            y += self.xp.float32(a) * x

    def _clip(self):
        clip = np.float32(self.param.clip_gradients)
        if clip < 0:
            return
        xp = self.xp
        sumsq = np.float32(0)
        for entry in self.learnable:
            d = self._diff(entry).reshape(-1)
            sumsq = np.float32(sumsq + np.float32(float(xp.dot(d, d))))
        norm = np.float32(np.sqrt(sumsq))
        if norm > clip:
            scale = np.float32(clip / norm)
            self.log(f"Gradient clipping: scaling down gradients (L2 norm {fmt(norm)} > {fmt(clip)}) by scale "
                     f"factor {fmt(scale)}", "sgd_solver.cpp:136")
            for entry in self.learnable:
                self._diff(entry)[...] *= scale

    def _normalize(self, entry):
        if self.param.iter_size != 1:
            self._diff(entry)[...] *= np.float32(1.0 / self.param.iter_size)

    def _regularize(self, entry):
        decay = np.float32(np.float32(self.param.weight_decay) * np.float32(entry.decay_mult))
        if decay == 0:
            return
        data, diff = self._param(entry), self._diff(entry)
        if self.param.regularization_type == "L2":
            self._axpy(decay, data, diff)
        elif self.param.regularization_type == "L1":
            self._axpy(decay, self.xp.sign(data), diff)
        else:
            check_solver(self.param, self.where)

    def _compute_update(self, i, entry, rate):
        xp = self.xp
        g = self._diff(entry)
        alpha = np.float32(rate * np.float32(entry.lr_mult))
        mu = np.float32(self.param.momentum)
        delta = np.float32(self.param.delta)
        h = self.history[i]
        kind = self.type
        if kind == "SGD":
            self._axpby(alpha, g, mu, h)
            g[...] = h
        elif kind == "Nesterov":
            previous = h.copy()
            self._axpby(alpha, g, mu, h)
            self._axpby(np.float32(1 + mu), h, -mu, previous)
            g[...] = previous
        elif kind == "AdaGrad":
            h += g * g
            update = xp.sqrt(h)
            update += delta
            xp.divide(g, update, out=g)
            g *= alpha
        elif kind == "RMSProp":
            rho = np.float32(self.param.rms_decay)
            self._axpby(np.float32(1) - rho, g * g, rho, h)
            update = xp.sqrt(h)
            update += delta
            xp.divide(g, update, out=g)
            g *= alpha
        elif kind == "AdaDelta":
            h2 = self.history[i + len(self.learnable)]
            self._axpby(np.float32(1) - mu, g * g, mu, h)
            update = h2 + delta
            update /= h + delta
            xp.sqrt(update, out=update)
            g *= update
            self._axpby(np.float32(1) - mu, g * g, mu, h2)
            g *= alpha
        elif kind == "Adam":
            v = self.history[i + len(self.learnable)]
            beta1, beta2 = mu, np.float32(self.param.momentum2)
            t = self.iter + 1
            with np.errstate(all="ignore"):  # C++'s pow and sqrt: out-of-range betas give inf or NaN, not errors
                correction = np.float32(np.sqrt(1.0 - np.power(np.float64(beta2), t))
                                        / (1.0 - np.power(np.float64(beta1), t)))
            self._axpby(np.float32(1) - beta1, g, beta1, h)
            self._axpby(np.float32(1) - beta2, g * g, beta2, v)
            update = xp.sqrt(v)
            update += delta
            xp.divide(h, update, out=update)
            g[...] = update
            g *= np.float32(alpha * correction)
        else:
            raise SolverError(f"{self.where}: type '{kind}' is not a solver type")

    # -- snapshots (12) -------------------------------------------------------------------
    @property
    def hdf5(self):
        return self.param.snapshot_format == pb.SolverParameter.HDF5

    def snapshot_names(self, it=None):
        """(model file, state file) of a snapshot at iteration `it` (default: now)."""
        base = f"{self.param.snapshot_prefix}_iter_{self.iter if it is None else it}"
        ext = (".caffemodel.h5", ".solverstate.h5") if self.hdf5 else (".caffemodel", ".solverstate")
        return base + ext[0], base + ext[1]

    def check_snapshot_folder(self):
        """Caffe's probe at construction (check_snapshot_prefix)."""
        check_snapshot_prefix(self.param, self.where)

    def snapshot(self):
        """Write the model and the solver state for the current iteration (atomically); returns the names.
        Without a snapshot_prefix they are `_iter_N.*` in the current folder, as Caffe writes them."""
        model, state = self.snapshot_names()
        folder = os.path.dirname(model)
        if folder and not os.path.isdir(folder):
            raise SolverError(f"cannot write the snapshot '{model}': the folder '{folder}' does not exist")
        if self.hdf5:
            self.log(f"Snapshotting to HDF5 file {io.printable(model)}", "solver.cpp:475")
            self.net.save_hdf5(model, diff=self.param.snapshot_diff)
            self.log(f"Snapshotting solver state to HDF5 file {io.printable(state)}", "sgd_solver.cpp:300")
            self._write_state_hdf5(state, model)
        else:
            self.log(f"Snapshotting to binary proto file {io.printable(model)}", "solver.cpp:464")
            self._write_model(model)
            self.log(f"Snapshotting solver state to binary proto file {io.printable(state)}", "sgd_solver.cpp:284")
            self._write_state(state, model)
        self._notify("on_snapshot", self.iter, (model, state))
        return model, state

    def _write_model(self, path):
        net = self.net
        net._sync_host()
        net._sync_python_params()
        blobs = []
        for node in net.nodes:
            records = []
            for j, a in enumerate(net._params.get(node.name, [])):
                record = wire.BlobRecord.from_array(backends.to_numpy(a))
                if self.param.snapshot_diff:
                    record.diff = np.ascontiguousarray(backends.to_numpy(net.param_diff(node.name, j)),
                                                       dtype=np.float32).reshape(-1)
                records.append(record)
            blobs.append(records)
        io.write_caffemodel(path, net.to_proto(), blobs)

    def state_chunks(self, learned_net):
        """The SolverState message's bytes, as chunks (Caffe's field order: iter, learned_net,
        history, current_step)."""
        chunks = [wire.tag(STATE_ITER, wire.VARINT), wire.encode_varint(self.iter)]
        name = learned_net.encode("utf-8", "surrogateescape")
        chunks += [wire.tag(STATE_LEARNED_NET, wire.LENGTH), wire.encode_varint(len(name)), name]
        for h in self.history:
            enc = wire.encode_blob(wire.BlobRecord.from_array(backends.to_numpy(h)))
            chunks += [wire.tag(STATE_HISTORY, wire.LENGTH), wire.encode_varint(wire.chunks_size(enc))] + enc
        chunks += [wire.tag(STATE_CURRENT_STEP, wire.VARINT), wire.encode_varint(self.current_step)]
        return chunks

    def _write_state(self, path, learned_net):
        with io.atomic_output(path) as f:
            for c in self.state_chunks(learned_net):
                f.write(c)

    def _write_state_hdf5(self, path, learned_net):
        import h5py

        with io.atomic_output(path) as out:
            with open(out.fileno(), "r+b", closefd=False) as rw, h5py.File(rw, "w") as f:
                f.create_dataset("iter", data=np.int32(self.iter))
                f.create_dataset("learned_net", data=np.bytes_(learned_net.encode()))
                f.create_dataset("current_step", data=np.int32(self.current_step))
                group = f.create_group("history")
                for i, h in enumerate(self.history):
                    group.create_dataset(str(i), data=np.asarray(backends.to_numpy(h), dtype=np.float32))

    # -- restore ------------------------------------------------------------------------
    def restore(self, path):
        """Caffe's Restore: iter, current_step and the history from a .solverstate (binary or .h5);
        the weights it names go into the train net only."""
        path = os.fsdecode(path)
        if not os.path.isfile(path):
            raise SolverError(f"{path}: the solver state to resume from does not exist")
        if path.endswith(".h5"):
            it, learned, step, history = read_state_hdf5(path)
        else:
            it, learned, step, history = read_state(path)
        if len(history) != len(self.history):
            raise SolverError(
                f"{path}: holds {len(history)} history blob(s), but this {self.type} solver over this net has "
                f"{len(self.history)} (Caffe: Incorrect length of history blobs); was it written for another "
                f"net or solver type?")
        for i, (h, record) in enumerate(zip(self.history, history)):
            io.check_dims(record, path, f"history blob {i}")
            if record.data.size != record.count:
                raise SolverError(f"{path}: history blob {i} declares shape {tuple(record.declared_shape)} but "
                                  f"holds {record.data.size} values (a damaged or truncated solver state)")
            if record.count != h.size:
                entry = self.learnable[i % len(self.learnable)]
                raise SolverError(f"{path}: history blob {i} holds {record.count} values, but parameter "
                                  f"{entry.index} of layer '{io.printable(entry.layer)}' has shape {tuple(h.shape)}")
        if learned:
            self.net.copy_from(learned)
        self.iter, self.current_step = it, step
        for i, record in enumerate(history):
            self.history[i] = self.xp.asarray(np.array(record.array(), dtype=np.float32, order="C", copy=True)
                                              .reshape(self.history[i].shape))


def read_state(path):
    """(iter, learned_net, current_step, [BlobRecord]) of a binary .solverstate."""
    with open(path, "rb") as f:
        buf = f.read()
    it, learned, step, history = 0, "", 0, []
    try:
        for field, wire_type, _, start, end in wire.iter_fields(buf, 0, len(buf)):
            if field == STATE_ITER and wire_type == wire.VARINT:
                it = wire.signed32(wire.read_varint(buf, start, end)[0])
            elif field == STATE_CURRENT_STEP and wire_type == wire.VARINT:
                step = wire.signed32(wire.read_varint(buf, start, end)[0])
            elif field == STATE_LEARNED_NET and wire_type == wire.LENGTH:
                learned = bytes(buf[start:end]).decode("utf-8", "surrogateescape")
            elif field == STATE_HISTORY and wire_type == wire.LENGTH:
                history.append(wire.decode_blob(buf, start, end))
            else:
                raise wire.Truncated(f"field {field} (wire type {wire_type}) is not part of a SolverState")
    except wire.Truncated as e:
        raise SolverError(f"{path}: not a Caffe solver state (.solverstate): {e}") from None
    return it, learned, step, history


def read_state_hdf5(path):
    """(iter, learned_net, current_step, [BlobRecord]) of an HDF5 .solverstate.h5."""
    try:
        import h5py
    except ImportError:
        raise SolverError(f"{path}: reading an HDF5 solver state needs h5py (pip install h5py)") from None
    try:
        with h5py.File(path, "r") as f:
            it = int(f["iter"][()])
            learned = f["learned_net"][()] if "learned_net" in f else b""
            learned = learned.decode() if isinstance(learned, bytes) else str(learned)
            step = int(f["current_step"][()]) if "current_step" in f else 0
            group = f["history"]
            history = [wire.BlobRecord.from_array(np.asarray(group[str(i)][()], dtype=np.float32))
                       for i in range(len(group))]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise SolverError(f"{path}: not a Caffe HDF5 solver state: {e}") from None
    return it, learned, step, history
