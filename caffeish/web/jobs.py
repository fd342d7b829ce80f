"""Training jobs of `caffeish serve` (DIGITS' "train a model" pages), kept on disk.

    ROOT/jobs/NAME/job.json            what the job was made from (model, dataset, weights, settings)
                   solver.prototxt     the solver (net: train_val.prototxt, snapshot_prefix: snapshot)
                   train_val.prototxt  caffeish.apps.train_val around the model's deploy net
                   deploy.prototxt     the model's deploy net, as it was (snapshots run with it)
                   labels.txt, palette.txt, mean.binaryproto   the dataset's, when it has them
                   log.txt             Caffe's log of every run of the job, appended
                   curves.csv, .png    caffeish.apps.curves, written as it trains
                   snapshot_iter_N.caffemodel / .solverstate
                   state.json          running, done, stopped, failed; pid, times, iteration, message
                   lock                held (flock) by the running job's process

A job runs in its own process (`python -m caffeish.web.jobs JOBDIR`, in its own session, in the
job folder, at a lower priority): `caffeish train`'s code (caffeish.apps.train) with its log on
log.txt.  It holds `lock` while it runs, so any server (this one, or one started later over the
same workspace) knows a running job from a dead one: state.json says running while the lock is free
-> interrupted (killed, or the machine went down).  Stop is Caffe's SIGINT: a snapshot, then the
end; resume is `caffe train --snapshot` of the newest solverstate (curves and log go on).

A job reads the workspace only: its net is built here from a workspace model's deploy net (no data,
file or Python layers in it) and a workspace dataset, every path it will read is checked to be
inside the workspace with no symbolic link on the way, and it writes only into its own folder.
At most `max_running` jobs run at once (serve --jobs, default 1); another start is refused.
"""
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

from caffeish.errors import CaffeishError
from caffeish.formats import io, staging
from caffeish.formats.io import printable
from caffeish.runtime.solver import LR_POLICIES, SOLVER_TYPES
from caffeish.web.workspace import WorkspaceError, check_name

JOBS = "jobs"
RUNNING, STARTING, DONE, STOPPED, FAILED, INTERRUPTED = "running", "starting", "done", "stopped", "failed", "interrupted"
# Solver fields a job sets itself: they name files, or the net (the extra text may not give them).
OWN_FIELDS = ("net", "net_param", "train_net", "train_net_param", "test_net", "test_net_param", "snapshot_prefix",
              "weights", "snapshot_format")
SNAPSHOT_PREFIX = "snapshot"
LOG_TAIL_BYTES = 24 << 10
MAX_EXTRA = 8 << 10


class JobError(CaffeishError):
    """A request about a job that cannot be done now (running, not running, nothing to resume)."""


# ---------------------------------------------------------------------------- settings from a form


def _number(form, key, kind, default=None, low=None, high=None, what=None):
    text = str(form.get(key, "") or "").strip()
    what = what or key.replace("_", " ")
    if not text:
        if default is None:
            raise CaffeishError(f"{what}: required")
        return default
    try:
        value = kind(text)
    except ValueError:
        raise CaffeishError(f"{what}: {'a whole number' if kind is int else 'a number'}, not "
                            f"'{printable(text)[:40]}'") from None
    if kind is float and not math.isfinite(value):
        raise CaffeishError(f"{what}: a finite number, not '{printable(text)[:40]}'")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise CaffeishError(f"{what}: {bounds}, not {text}")
    return value


def settings_from_form(form):
    """The solver and data settings of a new-job form (values checked; blanks: automatic)."""
    s = {}
    s["type"] = str(form.get("type", "SGD"))
    if s["type"] not in SOLVER_TYPES:
        raise CaffeishError(f"solver type '{printable(s['type'])[:40]}': one of {', '.join(SOLVER_TYPES)}")
    s["lr_policy"] = str(form.get("lr_policy", "fixed"))
    if s["lr_policy"] not in LR_POLICIES:
        raise CaffeishError(f"lr policy '{printable(s['lr_policy'])[:40]}': one of {', '.join(LR_POLICIES)}")
    s["base_lr"] = _number(form, "base_lr", float, low=0.0, what="base learning rate")
    s["max_iter"] = _number(form, "max_iter", int, low=1, high=2**31 - 1, what="iterations")
    s["batch_size"] = _number(form, "batch_size", int, 1, 1, 1 << 16, "batch size")
    s["val_batch_size"] = _number(form, "val_batch_size", int, s["batch_size"], 1, 1 << 16, "val batch size")
    s["iter_size"] = _number(form, "iter_size", int, 1, 1, 1 << 16, "batch accumulation")
    for key, default in (("gamma", 0.1), ("power", 0.75), ("momentum", 0.9), ("weight_decay", 0.0005),
                         ("momentum2", 0.999), ("delta", 1e-6 if s["type"] == "AdaDelta" else 1e-8),
                         ("rms_decay", 0.99)):
        s[key] = _number(form, key, float, default, what=key.replace("_", " "))
    s["stepsize"] = _number(form, "stepsize", int, 0, 0, 2**31 - 1, "step size")
    stepvalue = str(form.get("stepvalue", "") or "").replace(",", " ").split()
    try:
        s["stepvalue"] = [int(v) for v in stepvalue]
    except ValueError:
        raise CaffeishError(f"step values: whole numbers separated by commas, not '{printable(' '.join(stepvalue))[:60]}'") from None
    s["test_interval"] = _number(form, "test_interval", int, 0, 0, 2**31 - 1, "validation interval")
    s["snapshot"] = _number(form, "snapshot", int, 0, 0, 2**31 - 1, "snapshot interval")
    s["display"] = _number(form, "display", int, 0, 0, 2**31 - 1, "display interval")
    seed = str(form.get("random_seed", "") or "").strip()
    s["random_seed"] = _number(form, "random_seed", int, -1, -1, 2**63 - 1, "random seed") if seed else None
    s["crop_size"] = _number(form, "crop_size", int, 0, 0, 1 << 16, "crop size")
    device = str(form.get("device", "cpu") or "cpu")
    if device == "cpu":
        s["gpu"] = None
    elif device.startswith("gpu") and device[3:].isdigit():
        s["gpu"] = int(device[3:])
    else:
        raise CaffeishError(f"device '{printable(device)[:20]}': cpu, or gpu0, gpu1, ...")
    s["mirror"] = form.get("mirror") in ("on", "1", "true")
    s["normalize"] = form.get("normalize", "on") in ("on", "1", "true")
    extra = str(form.get("extra", "") or "")
    if len(extra) > MAX_EXTRA:
        raise CaffeishError(f"extra solver fields: at most {MAX_EXTRA} characters")
    s["extra"] = extra
    return s


def build_solver(s, train_records, val_records):
    """The SolverParameter of the settings (automatic values filled in), checked as `caffe train` checks."""
    from google.protobuf import text_format

    from caffeish.formats.schema import pb
    from caffeish.runtime import solver as solvers

    p = pb.SolverParameter()
    p.net = "train_val.prototxt"
    p.type = s["type"]
    p.base_lr = s["base_lr"]
    p.lr_policy = s["lr_policy"]
    p.max_iter = s["max_iter"]
    p.iter_size = s["iter_size"]
    if s["lr_policy"] in ("step", "exp", "inv", "multistep", "sigmoid"):
        p.gamma = s["gamma"]
    if s["lr_policy"] in ("inv", "poly"):
        p.power = s["power"]
    if s["lr_policy"] in ("step", "sigmoid"):
        p.stepsize = s["stepsize"] or max(1, s["max_iter"] // 3)
    if s["lr_policy"] == "multistep":
        p.stepvalue.extend(s["stepvalue"])
    if s["type"] in ("SGD", "Nesterov", "AdaDelta", "Adam"):
        p.momentum = s["momentum"]
    if s["type"] == "Adam":
        p.momentum2 = s["momentum2"]
    if s["type"] in ("AdaGrad", "AdaDelta", "Adam", "RMSProp"):
        p.delta = s["delta"]
    if s["type"] == "RMSProp":
        p.rms_decay = s["rms_decay"]
    p.weight_decay = s["weight_decay"]
    per_iter = s["batch_size"] * s["iter_size"]
    epoch = max(1, -(-int(train_records or 1) // per_iter))
    p.test_iter.append(max(1, -(-int(val_records or 1) // s["val_batch_size"])))
    p.test_interval = s["test_interval"] or min(epoch, s["max_iter"])
    p.snapshot = s["snapshot"] or 0  # 0: the one after the last iteration (snapshot_after_train)
    p.display = s["display"] or max(1, min(20, s["max_iter"] // 50))
    p.snapshot_prefix = SNAPSHOT_PREFIX
    if s["random_seed"] is not None:
        p.random_seed = s["random_seed"]
    if s["extra"].strip():
        extra = pb.SolverParameter()
        try:
            text_format.Parse(s["extra"], extra)
        except text_format.ParseError as e:
            raise CaffeishError(f"extra solver fields: {printable(str(e))}") from None
        own = [f for f in OWN_FIELDS if f in [d.name for d, _ in extra.ListFields()]]
        if own:
            raise CaffeishError(f"extra solver fields: {', '.join(own)} is set by the job (its files live in the "
                                f"job's folder); leave it out")
        for d, value in extra.ListFields():
            if hasattr(value, "extend"):  # a repeated field (test_iter, stepvalue): the extra text's replace ours
                p.ClearField(d.name)
        p.MergeFrom(extra)
    where = "the job's solver"
    solvers.check_solver(p, where)
    solvers.check_lr_policy(p, where)
    return p


# ---------------------------------------------------------------------------- one job


class JobModel:
    """A job's snapshot seen as a model (caffeish.web.pages runs inference with it)."""

    def __init__(self, job, iteration, weights):
        self.name = job.name
        self.title = f"{job.name} @ iteration {iteration}"
        self.folder = job.folder
        self.deploy = job.file("deploy.prototxt")
        self.weights = weights
        self.labels = job.file("labels.txt")
        self.mean = job.file("mean.binaryproto")
        self.palette = job.file("palette.txt")
        self.problem = None if self.deploy else "the job has no deploy.prototxt"
        self.meta, self.readme = {}, ""

    def stamp(self):
        from caffeish.web.workspace import _stamp

        return tuple(_stamp(p) for p in (self.deploy, self.weights, self.labels, self.mean, self.palette))


class Job:
    def __init__(self, name, folder):
        self.name, self.folder = name, folder

    def file(self, name):
        """folder/name when it is a regular file (no link), else None."""
        path = os.path.join(self.folder, name)
        try:
            return path if stat.S_ISREG(os.lstat(path).st_mode) else None
        except OSError:
            return None

    def _json(self, name):
        path = self.file(name)
        if path is None:
            return {}
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    @property
    def config(self):
        return self._json("job.json")

    def write_state(self, **fields):
        state = self._json("state.json")
        state.update(fields)
        with io.atomic_output(os.path.join(self.folder, "state.json")) as f:
            f.write(json.dumps(state, indent=1).encode())
        return state

    def locked(self):
        """Whether a process holds the job's lock (it is running)."""
        import fcntl

        path = self.file("lock")
        if path is None:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def state(self, child_alive=False):
        """state.json with the liveness check: a job whose process is gone is interrupted."""
        s = self._json("state.json")
        state = s.get("state", INTERRUPTED)
        if state in (RUNNING, STARTING):
            if self.locked():
                state = RUNNING
            elif child_alive:
                state = STARTING
            else:
                state = INTERRUPTED
                s.setdefault("message", "")
                s["message"] = s["message"] or "its process ended without saying how (killed, or the machine " \
                                               "stopped); resume goes on from the newest snapshot"
        s["state"] = state
        return s

    def snapshots(self):
        """[(iteration, caffemodel path, solverstate path or None)], by iteration."""
        found = {}
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        for name in names:
            for ext in (".caffemodel", ".solverstate", ".caffemodel.h5", ".solverstate.h5"):
                stem = f"{SNAPSHOT_PREFIX}_iter_"
                if name.startswith(stem) and name.endswith(ext) and name[len(stem):-len(ext)].isdigit():
                    if self.file(name):
                        kind = "model" if "caffemodel" in ext else "state"
                        found.setdefault(int(name[len(stem):-len(ext)]), {})[kind] = os.path.join(self.folder, name)
        return [(it, f["model"], f.get("state")) for it, f in sorted(found.items()) if "model" in f]

    def snapshot_model(self, iteration):
        for it, model, _ in self.snapshots():
            if it == iteration:
                return JobModel(self, it, model)
        raise WorkspaceError(f"job '{self.name}' has no snapshot at iteration {iteration}")

    def max_iter(self):
        from caffeish.runtime import solver as solvers

        try:
            return solvers.read_solver(os.path.join(self.folder, "solver.prototxt")).max_iter
        except CaffeishError:
            return self.config.get("settings", {}).get("max_iter")

    def log_tail(self, size=LOG_TAIL_BYTES):
        path = self.file("log.txt")
        if path is None:
            return ""
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read(size)
        text = data.decode("utf-8", errors="replace")
        if end > size:
            text = text.split("\n", 1)[-1]
        return text

    def curves(self):
        from caffeish.apps.curves import Curves, read_csv

        return read_csv(os.path.join(self.folder, "curves.csv"), Curves(None, title=self.config.get("network")))

    def curves_stamp(self, name="curves.csv"):
        path = self.file(name)
        if path is None:
            return None
        st = os.stat(path)
        return (path, st.st_mtime_ns, st.st_size)

    def picture(self, running, render):
        """The curves as PNG bytes: while the job runs, the curves.png its process draws (at most every
        5 s, so that watching costs the training nothing); else that file when it is as new as
        curves.csv, or `render(stamp)` of the CSV (a run killed between two pictures)."""
        png, csv = self.curves_stamp("curves.png"), self.curves_stamp("curves.csv")
        if png is not None and (running or csv is None or png[1] >= csv[1]):
            with open(png[0], "rb") as f:
                return f.read()
        return render(csv)


def latest_values(curves):
    """The newest iteration, loss, lr and test outputs of a job's curves."""
    out = {"iteration": None, "loss": None, "lr": None, "test": {}, "test_iteration": None, "points": len(curves)}
    for column, key in (("train_loss", "loss"), ("lr", "lr")):
        iters, values = curves.series(column)
        if iters:
            out[key] = values[-1]
            out["iteration"] = max(out["iteration"] or 0, iters[-1] + (1 if column == "lr" else 0))
    passes = curves.test_passes(0)
    if passes:
        out["test"], out["test_iteration"] = passes[-1]["outputs"], passes[-1]["iteration"]
    return out


# ---------------------------------------------------------------------------- the jobs of a workspace


class Jobs:
    """The jobs of a workspace: made, started, stopped and resumed from the pages."""

    def __init__(self, ws, max_running=1):
        self.ws = ws
        self.max_running = max(1, int(max_running))
        self._children = {}  # name -> Popen (the jobs this server started)
        self._stopping = set()
        self._lock = threading.RLock()  # held from the check of the running jobs to a new job's start

    # -- finding --------------------------------------------------------------------------------------
    def names(self):
        return [n for n in self.ws._names(JOBS) if os.path.isfile(os.path.join(self.ws.root, JOBS, n, "job.json"))]

    def get(self, name):
        check_name(name, "job")
        folder = self.ws.resolve(f"{JOBS}/{name}", kind="dir")
        if not os.path.isfile(os.path.join(folder, "job.json")):
            raise WorkspaceError(f"job '{name}' has no job.json")
        return Job(name, folder)

    def _alive(self, name):
        p = self._children.get(name)
        return p is not None and p.poll() is None

    def state(self, job):
        s = job.state(self._alive(job.name))
        if s["state"] in (RUNNING, STARTING) and job.name in self._stopping:
            s["stopping"] = True
        return s

    def running(self):
        return [n for n in self.names() if self.state(self.get(n))["state"] in (RUNNING, STARTING)]

    def summary(self, job):
        """One row of the jobs page."""
        s = self.state(job)
        cfg = job.config
        try:
            values = latest_values(job.curves())
        except CaffeishError:
            values = {"iteration": None, "loss": None, "test": {}}
        return {"name": job.name, "state": s["state"], "stopping": s.get("stopping", False),
                "network": cfg.get("network"), "dataset": cfg.get("dataset"),
                "iteration": values["iteration"] if values["iteration"] is not None else s.get("iteration"),
                "max_iter": job.max_iter(), "loss": values.get("loss"),
                "accuracy": values["test"].get("accuracy"), "created": cfg.get("created"),
                "message": s.get("message", "")}

    # -- making ---------------------------------------------------------------------------------------
    def weights_choices(self):
        """[(value, label)] of the weights a job can start from: models' weights, jobs' snapshots."""
        out = [("", "none: the layers' fillers (from scratch)")]
        for m in self.ws.models():
            if m.weights:
                out.append((f"model:{m.name}", f"model {m.name}: {os.path.basename(m.weights)}"))
        for n in self.names():
            for it, _, _ in self.get(n).snapshots():
                out.append((f"job:{n}:{it}", f"job {n}: snapshot at iteration {it}"))
        return out

    def _weights_path(self, choice):
        choice = (choice or "").strip()
        if not choice:
            return None
        kind, _, rest = choice.partition(":")
        if kind == "model":
            model = self.ws.model(rest)
            if model.weights is None:
                raise CaffeishError(f"model '{rest}' has no weights")
            return model.weights
        if kind == "job":
            name, _, it = rest.rpartition(":")
            if not it.isdigit():
                raise CaffeishError(f"weights '{printable(choice)[:60]}': job:NAME:ITERATION")
            return self.get(name).snapshot_model(int(it)).weights
        raise CaffeishError(f"weights '{printable(choice)[:60]}': none, model:NAME or job:NAME:ITERATION")

    def _inside(self, path, what):
        """path, when it lies inside the workspace with no symbolic link on the way (else an error)."""
        real = os.path.abspath(path)
        if os.path.commonpath([real, self.ws.root]) != self.ws.root:
            raise CaffeishError(f"{what} '{printable(path)}' is outside the workspace; a job reads the workspace only")
        self.ws.resolve(self.ws.relative(real))
        return real

    def _no_links_in(self, folder):
        """The files of a database folder (data.mdb, lock.mdb) are its own, not links elsewhere."""
        for entry in os.scandir(folder):
            if entry.is_symlink():
                raise CaffeishError(f"'{printable(self.ws.relative(entry.path))}': a symbolic link; a job reads "
                                    f"the workspace only and follows none")

    def create(self, name, network, dataset_name, weights, settings):
        """Check everything, write ROOT/jobs/NAME whole, and start it; returns the Job."""
        from caffeish.apps import train_val

        check_name(name, "job")
        self._refuse_when_full()  # at once (checked again under the lock before anything is written)
        model = self.ws.model(network)
        if model.deploy is None:
            raise CaffeishError(f"model '{network}': {model.problem}")
        dataset = train_val.Dataset(self.ws.dataset(dataset_name))
        weights_path = self._weights_path(weights)
        deploy = io.read_net(model.deploy)
        net, notes, score = train_val.from_deploy(
            deploy, dataset, settings["batch_size"], settings["val_batch_size"], settings["normalize"],
            settings["crop_size"], settings["mirror"])
        for layer in net.layer:
            if layer.type == "Data":
                layer.data_param.source = self._inside(layer.data_param.source, "data source")
                self._no_links_in(layer.data_param.source)
                if layer.transform_param.mean_file:
                    layer.transform_param.mean_file = self._inside(layer.transform_param.mean_file, "mean file")
        if settings.get("gpu") is not None:
            from caffeish.runtime import backend

            reason = backend.gpu_unavailable_reason()
            if reason:
                raise CaffeishError(f"cannot train on GPU {settings['gpu']}: {reason}; choose the CPU")
        _check_kind(deploy, score, dataset, network)
        _check_shapes(net, dataset, settings, score)
        solver = build_solver(settings, dataset.records("train"), dataset.records("val"))
        with self._lock:  # two requests at once: one job starts, the other is refused before writing
            self._refuse_when_full()
            return self._write_and_start(name, network, dataset_name, dataset, model, weights, weights_path,
                                         settings, net, notes, solver)

    def _write_and_start(self, name, network, dataset_name, dataset, model, weights, weights_path, settings, net,
                         notes, solver):
        from google.protobuf import text_format

        target = self.ws._new_path(JOBS, name, "job")

        def write(tmp):
            with open(os.path.join(tmp, "train_val.prototxt"), "w", encoding="utf-8") as f:
                f.write(text_format.MessageToString(net))
            with open(os.path.join(tmp, "solver.prototxt"), "w", encoding="utf-8") as f:
                f.write(text_format.MessageToString(solver))
            shutil.copyfile(model.deploy, os.path.join(tmp, "deploy.prototxt"), follow_symlinks=False)
            meta = dataset.meta
            if meta.names:
                with open(os.path.join(tmp, "labels.txt"), "w", encoding="utf-8") as f:
                    f.write("".join(f"{n}\n" for n in meta.names))
            for src, dst in ((os.path.join(dataset.root, "palette.txt"), "palette.txt"),
                             (meta.mean_file, "mean.binaryproto")):
                if src and os.path.isfile(src) and not os.path.islink(src):
                    shutil.copyfile(self._inside(src, dst), os.path.join(tmp, dst), follow_symlinks=False)
            config = {"name": name, "network": network, "dataset": dataset_name, "dataset_type": dataset.kind,
                      "weights": weights or "", "weights_path": weights_path, "settings": settings,
                      "notes": notes, "created": time.time()}
            with open(os.path.join(tmp, "job.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=1)
            with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
                json.dump({"state": STARTING, "runs": 0}, f)
            open(os.path.join(tmp, "lock"), "w").close()

        staging.write_folder(target, write)
        job = Job(name, target)
        self.start(job)
        return job


    def _refuse_when_full(self, but=None):
        running = [n for n in self.running() if n != but]
        if len(running) >= self.max_running:
            raise JobError(f"job '{running[0]}' is running and this server runs {self.max_running} at a time "
                           f"(serve --jobs); stop it or wait for it to finish")

    # -- running ----------------------------------------------------------------------------------------
    def start(self, job, snapshot=None):
        """Start (or resume from `snapshot`, a solverstate path) the job's process."""
        with self._lock:
            s = self.state(job)
            if s["state"] in (RUNNING, STARTING):
                raise JobError(f"job '{job.name}' is running already")
            self._refuse_when_full(but=job.name)
            runs = int(s.get("runs", 0) or 0) + 1
            job.write_state(state=STARTING, runs=runs, message="", requested=time.time(), finished=None,
                            resumed_from=snapshot and os.path.basename(snapshot))
            args = [sys.executable, "-m", "caffeish.web.jobs", job.folder]
            if snapshot:  # named as Caffe's log names it: relative to the job's folder, where it runs
                args += ["--snapshot", os.path.relpath(snapshot, job.folder)]
            log = open(os.path.join(job.folder, "log.txt"), "ab")
            try:
                env = dict(os.environ, PYTHONUNBUFFERED="1", CAFFEISH_JOB="1")
                env.pop("GLOG_minloglevel", None)
                p = subprocess.Popen(args, cwd=job.folder, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True, env=env)
            finally:
                log.close()
            self._children[job.name] = p
            self._stopping.discard(job.name)
            threading.Thread(target=p.wait, name=f"caffeish-job-{job.name}", daemon=True).start()
        return p

    def stop(self, job, wait=15.0):
        """Caffe's SIGINT: the job takes a snapshot and ends (a second stop is not sent twice).  A job
        still starting is signalled once its process holds the lock (its handler is in place then)."""
        end = time.time() + wait
        while True:
            with self._lock:
                s = self.state(job)
                if s["state"] not in (RUNNING, STARTING):
                    raise JobError(f"job '{job.name}' is not running ({s['state']})")
                if job.name in self._stopping:
                    return
                pid = self._pid(job, s) if s["state"] == RUNNING else None
                if pid is not None:
                    os.kill(pid, signal.SIGINT)
                    self._stopping.add(job.name)
                    return
            if time.time() > end:
                raise JobError(f"job '{job.name}' is still starting; stop it again in a moment")
            time.sleep(0.05)

    def _pid(self, job, s):
        p = self._children.get(job.name)
        if p is not None and p.poll() is None:
            return p.pid
        if job.locked() and isinstance(s.get("pid"), int):
            return s["pid"]  # started by an earlier server over this workspace; it holds the lock
        return None

    def resume(self, job, max_iter=None):
        """Go on from the newest snapshot (or start again when there is none), optionally to a new max_iter."""
        s = self.state(job)
        if s["state"] in (RUNNING, STARTING):
            raise JobError(f"job '{job.name}' is running already")
        snaps = [(it, state) for it, _, state in job.snapshots() if state]
        current = job.max_iter()
        if max_iter is not None and max_iter != current:
            self._set_max_iter(job, max_iter)
            current = max_iter
        newest = snaps[-1] if snaps else None
        if newest and current is not None and newest[0] >= current:
            raise JobError(f"job '{job.name}' has trained its {current} iterations; give more iterations to go on")
        return self.start(job, newest[1] if newest else None)

    @staticmethod
    def _set_max_iter(job, max_iter):
        from google.protobuf import text_format

        from caffeish.runtime import solver as solvers

        path = os.path.join(job.folder, "solver.prototxt")
        p = solvers.read_solver(path)
        p.max_iter = int(max_iter)
        with io.atomic_output(path) as f:
            f.write(text_format.MessageToString(p).encode())

    def delete(self, job):
        if self.state(job)["state"] in (RUNNING, STARTING):
            raise JobError(f"job '{job.name}' is running; stop it first")
        shutil.rmtree(job.folder)

    def shutdown(self, wait=30.0):
        """The server stops: its running jobs get Caffe's SIGINT (a snapshot, then the end)."""
        children = [(n, p) for n, p in self._children.items() if p.poll() is None]
        for name, _ in children:
            sys.stderr.write(f"caffeish serve: stopping job '{name}' after a snapshot (resume it from its page)\n")
            try:
                self.stop(self.get(name), wait=min(wait, 10.0))
            except CaffeishError:
                pass  # it ended meanwhile, or never got going
        end = time.time() + wait
        for _, p in children:
            try:
                p.wait(max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                pass  # it finishes its snapshot on its own, and writes its state


def _check_kind(deploy, score, dataset, network):
    """A classifier (its score N x K) on a segmentation dataset: refused with what to do instead."""
    from caffeish.formats.schema import TEST
    from caffeish.graph.graph import Graph

    try:
        shape = Graph(deploy, TEST).blob_shapes.get(score)
    except CaffeishError:
        return  # shapes that need the dataset's: _check_shapes says what does not fit
    if dataset.kind == "segmentation" and shape is not None and len(shape) == 2:
        raise CaffeishError(f"model '{network}' is a classifier (its output '{printable(score)}' is "
                            f"{'x'.join(map(str, shape))}, one score per image) and the dataset is a segmentation "
                            f"dataset: make a fully convolutional net of it first (Build FCN on the model's page)")


def _check_shapes(net, dataset, settings, score):
    """Build both phases with the dataset's image size, when it has one: a net that does not fit the
    dataset is refused here, before a process starts; and the score's classes against the labels."""
    from caffeish.formats.schema import TEST, TRAIN
    from caffeish.graph.graph import Graph

    hw = dataset.image_hw("train")
    if hw is None:
        return
    crop = settings["crop_size"]
    if crop and crop > min(hw):
        raise CaffeishError(f"crop size {crop} is larger than the dataset's {hw[1]}x{hw[0]} images (WxH); "
                            f"Caffe crops inside the image")
    h, w = (crop, crop) if crop else hw
    channels = dataset.channels or 3
    data_blob = next(layer.top[0] for layer in net.layer if layer.type == "Data")
    for phase, n in ((TRAIN, settings["batch_size"]), (TEST, settings["val_batch_size"])):
        sizes = {data_blob: (n, channels, h, w),
                 "label": (n, 1, h, w) if dataset.kind == "segmentation" else (n,)}
        try:
            graph = Graph(net, phase, input_shapes=sizes)
        except CaffeishError as e:
            raise CaffeishError(f"the network does not fit the dataset's {w}x{h} images (WxH): "
                                f"{printable(str(e))}") from None
        shape = graph.blob_shapes.get(score)
        classes = dataset.meta.classes
        if shape is not None and len(shape) >= 2 and classes and classes > shape[1]:
            raise CaffeishError(f"the network scores {shape[1]} classes ('{printable(score)}' is "
                                f"{'x'.join(map(str, shape))}) but the dataset has {classes}; "
                                f"build the network with {classes} classes (surgery's classes)")


# ---------------------------------------------------------------------------- the job's process


def run_job(folder, snapshot=None):
    """The job's process: hold the lock, train with `caffeish train`'s code, write the state (0: done or
    stopped, 1: failed, 3: another process holds the job)."""
    import fcntl

    from caffeish.apps import train
    from caffeish.runtime import solver as solvers

    job = Job(os.path.basename(folder), folder)
    stop = []  # a SIGINT before training's own handlers are in place (while the nets are built)
    signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    fd = os.open(os.path.join(folder, "lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.stderr.write("caffeish job: this job is running in another process already\n")
        return 3
    try:
        os.nice(5)  # the server's pages stay quick while it trains
    except OSError:
        pass
    cfg = job.config
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    what = f"resumed from {os.path.basename(snapshot)}" if snapshot else "started"
    sys.stderr.write(f"caffeish job {job.name}: {what} at {stamp}\n")
    job.write_state(state=RUNNING, pid=os.getpid(), started=time.time(), message="")
    state, message, solver = FAILED, "", None
    try:
        param = train.prepare("solver.prototxt", weights=None if snapshot else cfg.get("weights_path"),
                              snapshot=snapshot)
        training = train.Training(param, "solver.prototxt", snapshot=snapshot, out=".",
                                  gpu=cfg.get("settings", {}).get("gpu"))
        solver = training.solver
        training.run(solvers.STOP, solvers.SNAPSHOT, stop_requested=lambda: bool(stop))
        done = solver.iter >= solver.param.max_iter
        state = DONE if done else STOPPED
        message = "" if done else f"stopped at iteration {solver.iter}"
    except KeyboardInterrupt:
        state, message = STOPPED, "stopped at once (no snapshot of the last iterations)"
    except CaffeishError as e:
        state, message = FAILED, printable(str(e))
    except Exception as e:  # a bug: its traceback in the log, one line on the page
        import traceback

        traceback.print_exc()
        state, message = FAILED, printable(f"{type(e).__name__}: {e}")
    finally:
        iteration = solver.iter if solver is not None else None
        sys.stderr.write(f"caffeish job {job.name}: {state}{': ' + message if message else ''}\n")
        job.write_state(state=state, message=message, finished=time.time(), iteration=iteration)
        os.close(fd)
    return 0 if state in (DONE, STOPPED) else 1


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m caffeish.web.jobs", description="run one training job of caffeish serve")
    p.add_argument("folder")
    p.add_argument("--snapshot")
    args = p.parse_args(argv)
    return run_job(os.path.abspath(args.folder), args.snapshot)


if __name__ == "__main__":
    sys.exit(main())
