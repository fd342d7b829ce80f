"""Segment, classify and evaluate on a Ray cluster (Ray Data): the library behind `--ray [ADDRESS]`.

The image list (or evaluation's image/label pairs) becomes a Ray Dataset;
`map_batches` runs it through a pool of actors, each holding one loaded Net: one
actor per GPU when the cluster has GPUs, else CPU actors of `threads` BLAS
threads each.  The prototxt and weights are read once on the driver and reach
the actors once, through Ray's object store (`ship_net`); each actor builds its
Net from them as `caffeish.apps.inference.open_net` does from the files.

Results are those of the single-machine run, byte for byte:
  segment   each actor writes an image's NAME.png / NAME_overlay.png / NAME.npy
            into OUTDIR (the names `caffeish.apps.segment.output_names` gives),
            every file renamed into place whole (`io.atomic_outputs`), so a killed
            run leaves only finished files and `resume` skips the images whose
            outputs all exist.  Unlike the single-machine run, which moves a
            staged OUTDIR into place at the end, files appear as images finish.
  classify  each row is one batch of `batch_size` images (the batches of the
            single-machine run, so that every forward pass is the same); the
            driver hands the top classes to the same ResultWriter in image order.
  evaluate  each actor returns its pairs' confusion matrix and counts; the
            driver sums them (`PairScoring.merge`): integer sums, so the metrics
            equal the single-machine ones exactly.
An image that cannot be read or run is named and skipped as without Ray; a
failure of the net stops the run (NetFailure), decided on the driver in image
order exactly as `caffeish.apps.segment` / `caffeish.apps.classify` decide it.

Faults: an actor that dies (a killed process, a lost node) is restarted and its
unfinished batches run again (Ray's actor restarts and task retries, up to
TASK_RETRIES times per batch).  Progress for the whole job shows on the driver;
`RunReport.lines()` is the summary: images, failures, images/s per worker.

Workers read the images (and --db / --images / --labels) by absolute path and
segment's actors write OUTDIR themselves: on a cluster of several machines these
must be on a file system every node mounts at the same path.  Ray is an optional
extra (`pip install 'caffeish[ray]'`); without it `--ray` says how to install it.
"""
import argparse
import contextlib
import inspect
import io as pyio
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional

import numpy as np

from caffeish.apps import progress
from caffeish.apps.classify import predict_each
from caffeish.apps.evaluate import PairScoring
from caffeish.apps.inference import (OUTPUT_MARKER, Classifier, NetFailure, Segmenter, class_colors, image_error,
                                     label_picture, open_net, same_failure, top_classes)
from caffeish.apps.segment import (MARKER_TEXT, STAGES, _check_inputs, _Clock, _holds_inputs, _prepare_one,
                                   _run_one, _save_png, check_outdir, many_classes_note, output_names, unfinished)
from caffeish.data import palette as palettes
from caffeish.errors import CaffeishError
from caffeish.formats import io

INSTALL = "pip install 'caffeish[ray]' (or: pip install 'ray[data]')"
TASK_RETRIES = 3  # runs of one batch after the actor running it died
SEGMENT_TASK = 8  # images per task at most (classify: one batch of --batch-size images per task)
EVALUATE_TASK = 32  # image/label pairs per task at most
LOCAL = "local"  # --ray without an address: start a cluster on this machine for the run
BACKEND_LOG_LEVEL = "RAY_BACKEND_LOG_LEVEL"


class Cluster(NamedTuple):
    """Where to run: `address` 'local' (a cluster started for the run on 127.0.0.1), 'auto' (the
    cluster this machine belongs to) or a Ray address (HOST:6379, ray://HOST:10001); `actors` (default:
    one per GPU of the cluster, else its CPUs / threads) and `threads` (BLAS threads of a CPU actor,
    default 1)."""

    address: str = LOCAL
    actors: Optional[int] = None
    threads: Optional[int] = None


def address_arg(text):
    """argparse type for --ray ADDRESS: 'local', 'auto', HOST:PORT or ray://HOST:PORT, so that an image or a
    folder taken for the address (`--ray photos/`) is refused rather than dialled."""
    address = text.strip()
    if address in (LOCAL, "auto") or re.fullmatch(r"ray://\S+|[\w.\-]+:\d+|\[[0-9a-fA-F:.]+\]:\d+", address):
        return address
    raise argparse.ArgumentTypeError(f"expected 'auto', HOST:PORT or ray://HOST:PORT, got '{text}' (an image or "
                                     f"folder? put --ray after them, or write --ray local)")


def import_ray():
    """The ray module (with Ray Data), or a one-line CaffeishError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the part we need)
    except ImportError:
        raise CaffeishError(f"--ray needs Ray (Ray Data), which is not installed: {INSTALL}") from None
    return ray


def _first_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


CORE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [IWE] \d+ \d+\] \S+:\d+: ")  # Ray's C++ info/warning/error lines


@contextlib.contextmanager
def _stderr_without(pattern):
    """While inside, what is written on file descriptor 2 (C++ logs too) is held back; on leaving it is
    written to sys.stderr without the lines `pattern` matches."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode("utf-8", "replace").splitlines():
                if not pattern.match(line):
                    print(line, file=sys.stderr)


@contextlib.contextmanager
def connect(cluster):
    """Ray, connected to `cluster` for the time inside.

    A Ray already initialised in this process (a test's, a notebook's) is used as it is; otherwise a
    local cluster is started (and stopped at the end) or the one at cluster.address joined.  Ray
    Data's own progress bars and logs are turned off (the driver shows one bar for the job), and what
    Ray prints on stdout while inside goes to stderr: stdout carries the results."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        quiet = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        # The driver's C++ core logs on stderr, and Ray Data's actor pools make it log an error about
        # constructor arguments in the object store (where Ray Data always puts them): only its fatal
        # lines show.  What it logs while connecting (the level it was given, retries of an address
        # that does not answer) is dropped: a failure is said in one line below.
        saved_level = os.environ.get(BACKEND_LOG_LEVEL)
        os.environ.setdefault(BACKEND_LOG_LEVEL, "fatal")
        try:
            with _stderr_without(CORE_LOG):
                if cluster.address == LOCAL:
                    ray.init(address="local", _node_ip_address="127.0.0.1", **quiet)
                else:
                    ray.init(address=cluster.address, **quiet)
        except Exception as e:  # ConnectionError, ValueError, RuntimeError, TimeoutError: all say the same
            what = "cannot start a local Ray cluster" if cluster.address == LOCAL else \
                f"cannot connect to the Ray cluster at {cluster.address}"
            raise CaffeishError(f"--ray: {what}: {_first_line(e)}") from None
        finally:
            if saved_level is None:
                os.environ.pop(BACKEND_LOG_LEVEL, None)
        started = True
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    data_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield ray
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved
        data_logger.setLevel(level)
        if started:
            ray.shutdown()


class Pool(NamedTuple):
    """The actor pool of a run: `actors` (at most; `start` of them at once), each `threads` CPUs, or one
    GPU each (`gpu`)."""

    actors: int
    start: int
    threads: int
    gpu: bool

    def describe(self):
        kind = "GPU actors" if self.gpu else f"CPU actors x {self.threads} thread{'s' if self.threads > 1 else ''}"
        return f"{self.actors} {kind}"

    def remote_args(self):
        """map_batches' resources for one actor and its BLAS threads (the fault settings: `_run`)."""
        threads = str(self.threads)
        args = {"num_cpus": 1 if self.gpu else self.threads,
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
                                             "MKL_NUM_THREADS": threads}}}
        if self.gpu:
            args["num_gpus"] = 1
        return args


def plan_pool(ray, cluster, gpu=None):
    """The Pool for `cluster` on the running Ray: one actor per GPU when it has GPUs (or `gpu` is
    True: then GPUs are required), else CPU actors.  Asking for more actors than fit now starts
    those that fit (a growing cluster gets the others); none fitting is an error, never a wait."""
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    use_gpu = bool(gpus) if gpu is None else gpu
    if use_gpu and not gpus:
        raise CaffeishError("--gpu with --ray: the Ray cluster has no GPUs")
    threads = cluster.threads or 1
    if use_gpu:
        actors = cluster.actors or gpus
        fit = min(gpus, cpus)
    else:
        actors = cluster.actors or max(1, cpus // threads)
        fit = cpus // threads
    if fit < 1:
        need = "a GPU and a CPU" if use_gpu else f"{threads} CPUs"
        raise CaffeishError(f"--ray: an actor needs {need}, and the Ray cluster has {cpus} CPUs and {gpus} GPUs")
    return Pool(actors, min(actors, fit), threads, use_gpu)


# ---------------------------------------------------------------------------- the net on the workers


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CaffeishError(f"{path}: cannot read the {what}: {e.strerror or e}") from None


def ship_net(ray, net_path, weights=None):
    """An ObjectRef of the prototxt's and the weights' bytes (weights None: the layers' fillers), put into
    the object store once for every actor of the run."""
    shipped = {"net": (os.path.basename(net_path), _read(net_path, "net"))}
    if weights is not None:
        shipped["weights"] = (os.path.basename(weights), _read(weights, "weights"))
    return ray.put(shipped)


@contextlib.contextmanager
def _unpacked(shipped):
    """(net path, weights path or None) of shipped files written to a private temporary folder, removed on
    leaving (the Net holds its weights in memory once built)."""
    with tempfile.TemporaryDirectory(prefix="caffeish-ray-") as folder:
        paths = {}
        for key, (name, data) in shipped.items():
            paths[key] = os.path.join(folder, key, name)
            os.makedirs(os.path.dirname(paths[key]))
            with open(paths[key], "wb") as f:
                f.write(data)
        yield paths.get("net"), paths.get("weights")


class _Worker:
    """What every actor has: its name (node:pid, for the summary) and its device."""

    def __init__(self, gpu):
        import ray

        self.ray = ray
        self.worker = f"{ray.util.get_node_ip_address()}:{os.getpid()}"
        self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.device = "cuda:0" if gpu else None  # Ray shows an actor only the GPU it was given

    def _open(self, shipped, seed):
        with _unpacked(self.ray.get(shipped[0])) as (net_path, weights):
            return open_net(net_path, weights, self.device, seed=seed)

    def _reply(self, batch, results, started):
        """The map_batches output: each row's index and its result as JSON (plus who ran it and how long)."""
        seconds = (time.perf_counter() - started) / max(1, len(results))
        for r in results:
            r.update(worker=self.worker, busy=seconds, restarted=self.restarted)
        return {"index": np.asarray(batch["index"]), "result": np.array([json.dumps(r) for r in results], object)}


def _in_message(error, path, shown):
    """The error's message with the absolute path a worker read replaced by the path the user gave."""
    return str(error).replace(path, shown) if path != shown else str(error)


# ---------------------------------------------------------------------------- running a dataset


class RunReport:
    """What a run did: items, failures, the time, and per worker its items and busy seconds."""

    def __init__(self, what, pool, address):
        self.what, self.pool, self.address = what, pool, address
        self.items = self.failed = 0
        self.workers = {}  # name -> [items, busy seconds]
        self.restarted = set()  # the workers that are restarted actors (their first process died)
        self.started = time.perf_counter()
        self.seconds = 0.0

    def add(self, worker, items, busy, restarted=False):
        self.items += items
        if restarted:
            self.restarted.add(worker)
        entry = self.workers.setdefault(worker, [0, 0.0])
        entry[0] += items
        entry[1] += busy * items

    def lost(self):
        """How many of the workers that ran something are restarted actors (their process died before)."""
        return len(self.restarted)

    def lines(self):
        where = "a local Ray cluster" if self.address == LOCAL else f"the Ray cluster at {self.address}"
        rate = self.items / self.seconds if self.seconds else 0.0
        out = [f"ray: {self.items} {self.what} in {self.seconds:.2f} s ({rate:.2f} {self.what}/s) on "
               f"{self.pool.describe()} of {where}; {self.failed} failed"]
        for name, (items, busy) in sorted(self.workers.items()):
            per = items / busy if busy else 0.0
            out.append(f"ray:   worker {name}: {items} {self.what}, {busy:.2f} s busy, {per:.2f} {self.what}/s")
        if self.lost():
            out.append(f"ray: {self.lost()} worker(s) died during the run and were restarted; their unfinished "
                       f"batches ran again")
        return out


class _InOrder:
    """Hands results to `handle(index, result)` in index order (0, 1, ...) as they arrive in any order."""

    def __init__(self, handle):
        self.handle, self.waiting, self.next = handle, {}, 0

    def add(self, index, result):
        self.waiting[index] = result
        while self.next in self.waiting:
            self.handle(self.next, self.waiting.pop(self.next))
            self.next += 1


def rows_per_task(n, pool, most):
    """Rows (images, pairs) per task: up to `most`, so that Ray's cost per task (a few ms on the driver,
    benchmarks/ray_segment.py) is shared, but at least 4 tasks per actor, so that the work stays spread."""
    return max(1, min(most, n // (4 * pool.actors)))


def _takes_remote_args(method):
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(method).parameters.values())


def _run(ray, pool, report, actor, kwargs, rows, batch_size, on_result, total, desc, items_of=lambda r: 1):
    """Run `rows` through a pool of `actor`s; `on_result(index, result)` for every row as it comes back."""
    ds = ray.data.from_items(rows)
    args = pool.remote_args()
    with warnings.catch_warnings():
        # An actor that dies is restarted, and each batch runs at most TASK_RETRIES times more: Ray Data's
        # default retries forever, so an image that kills its worker every time would never end the run.
        # Ray < 2.64 takes these actor options beside the named ones (deprecated); later ones retry forever.
        if _takes_remote_args(ds.map_batches):
            warnings.simplefilter("ignore", DeprecationWarning)
            args.update(max_restarts=-1, max_task_retries=TASK_RETRIES)
        ds = ds.map_batches(actor, batch_size=batch_size, batch_format="numpy", fn_constructor_kwargs=kwargs,
                            compute=ray.data.ActorPoolStrategy(min_size=pool.start, max_size=pool.actors), **args)
    results = ds.iter_rows()
    try:
        with progress.bar(total=total, desc=desc, unit="img") as bar:
            for row in results:
                result = json.loads(row["result"])
                n = items_of(result)
                report.add(result["worker"], n, result["busy"], result["restarted"])
                on_result(int(row["index"]), result)
                bar.update(n)
    except ray.exceptions.RayError as e:
        raise CaffeishError(f"ray: the run failed: {_first_line(e)}") from None
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
        report.seconds = time.perf_counter() - report.started


# ---------------------------------------------------------------------------- segment


class SegmentActor(_Worker):
    """One Net segmenting images into OUTDIR: decode, preprocess, forward, argmax, the pictures.  As in the
    single-machine run, one image's pictures are encoded and written in a writer thread while the next
    image is decoded and run (PNG encoding, numpy and the GPU release the GIL)."""

    def __init__(self, shipped, gpu, seed, spec, blob, tile, max_memory, outdir, colors_spec, base_colors, labels,
                 overlay, legend, npy):
        super().__init__(gpu)
        self.notes = []
        self.seg = Segmenter(self._open(shipped, seed), spec, blob, tile, max_memory, warn=self.notes.append)
        self.outdir, self.colors_spec, self.base_colors, self.labels = outdir, colors_spec, base_colors, labels
        self.overlay, self.legend, self.npy = overlay, legend, npy
        self.colors = None
        self.writer = ThreadPoolExecutor(max_workers=1)

    def __call__(self, batch):
        started = time.perf_counter()
        results, pending = [], None
        for path, shown, names in zip(batch["path"], batch["shown"], batch["names"]):
            result, write = self.one(str(path), str(shown), [str(n) for n in names])
            if pending is not None:
                self._finish(*pending)
            pending = (result, self.writer.submit(write)) if write is not None else None
            results.append(result)
        if pending is not None:
            self._finish(*pending)
        return self._reply(batch, results, started)

    @staticmethod
    def _finish(result, job):
        """Wait for an image's files: a write that failed (a palette too short for the classes, a full disk)
        stops the run."""
        try:
            result["seconds"]["write"] = job.result()
        except CaffeishError as e:
            result.clear()
            result["fatal"] = str(e)

    def one(self, path, shown, names):
        """(the image's result, a function writing its files, returning the seconds it took, or None)."""
        clock = _Clock()
        x = None
        try:
            picture, x = _prepare_one(self.seg, path, clock)
            classes, scores = _run_one(self.seg, x, self.npy, clock)
        except NetFailure as e:
            return {"fatal": _in_message(e, path, shown)}, None
        except CaffeishError as e:
            message = _in_message(e, path, shown)
            blank = x is not None and same_failure(self.seg.scores, np.zeros_like(x), e)
            return {"error": image_error(shown, message), "pattern": re.sub(r"\d+", "#", message) if blank else None,
                    "notes": self._notes()}, None
        n = self.seg.n_classes
        try:
            if self.colors is None:
                self.colors = class_colors(self.colors_spec, self.base_colors, n)
        except CaffeishError as e:  # a palette too short for the classes
            return {"fatal": str(e)}, None
        present = np.flatnonzero(np.bincount(classes.ravel(), minlength=n))
        result = {"size": f"{classes.shape[1]}x{classes.shape[0]}", "present": [int(c) for c in present],
                  "classes": n, "seconds": clock.seconds, "notes": self._notes()}

        def write():
            started = time.perf_counter()
            self._write(path, names, classes, picture, scores)
            return time.perf_counter() - started

        return result, write

    def _notes(self):
        notes, self.notes[:] = list(self.notes), []
        return notes

    def _write(self, path, names, classes, picture, scores):
        """The image's files, as caffeish.apps.segment._write_outputs encodes them, each renamed into place."""
        blobs = [_png(label_picture(classes, self.colors))]
        if self.overlay > 0:
            blobs.append(_png(palettes.overlay_image(picture, classes, self.colors, self.overlay, self.labels,
                                                     self.legend)))
        if self.npy:
            buf = pyio.BytesIO()
            np.save(buf, scores)
            blobs.append(buf.getvalue())
        targets = [os.path.join(self.outdir, n) for n in names]
        try:
            for target in targets:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            with io.atomic_outputs(targets, inputs=[path]) as files:
                for f, data in zip(files, blobs):
                    f.write(data)
        except OSError as e:
            raise CaffeishError(f"cannot write {e.filename or targets[0]}: {e.strerror or e}") from None


def _png(img):
    buf = pyio.BytesIO()
    _save_png(img, buf)
    return buf.getvalue()


def remove_stale_temps(outdir, plan):
    """Remove the temporary files a killed writer left beside the outputs of `plan` (hidden
    .NAME.XXXX.tmp files of io.atomic_outputs); returns how many."""
    wanted = {}
    for names in plan:
        for n in names:
            folder, base = os.path.split(os.path.join(outdir, n))
            wanted.setdefault(folder, set()).add("." + base + ".")
    removed = 0
    for folder, prefixes in wanted.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if name.startswith(".") and name.endswith(".tmp") and entry.is_file(follow_symlinks=False):
                prefix = name[:name.rfind(".", 0, len(name) - 4) + 1]
                if prefix in prefixes:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        removed += 1
    return removed


def segment_images(cluster, net_path, weights, seed, spec, blob, tile, max_memory, images, outdir,
                   colors_spec="pascal", labels=None, overlay=0.6, legend=False, npy=False, resume=False, warn=None,
                   gpu=None):
    """caffeish.apps.segment.segment_images on a Ray cluster: returns (rows, failed, seconds per stage
    summed over the workers, RunReport or None when nothing was left to run).

    net_path, weights (None: fillers from `seed`): the files, shipped to every actor once.  spec, blob,
    tile, max_memory: as for Segmenter.  The outputs are those of the single-machine run, file for file
    and byte for byte; each is renamed into place when written, and `resume` skips the images whose
    outputs all exist."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    plan = output_names(images, npy, overlay > 0)
    _check_inputs(images, plan, outdir)
    check_outdir(outdir)
    base_colors, dataset_labels = palettes.load_palette(colors_spec)
    labels = labels if labels is not None else dataset_labels
    holds_inputs = _holds_inputs(outdir, images)
    todo, todo_plan = images, plan
    if resume:
        remove_stale_temps(outdir, plan)
        todo, todo_plan = unfinished(images, plan, outdir, warn)
    os.makedirs(outdir, exist_ok=True)
    if not holds_inputs:  # as the single-machine run: an input folder written into stays an input folder
        with io.atomic_output(os.path.join(outdir, OUTPUT_MARKER)) as f:
            f.write(MARKER_TEXT.encode())
    seconds = dict.fromkeys(STAGES, 0.0)
    if not todo:
        return [], 0, seconds, None
    rows_out, state = {}, {"failed": 0, "blank": None, "ok": 0, "colors_noted": False}
    notes_seen = set()

    def handle(k, result):
        path = todo[k][0]
        for note in result.get("notes", ()):
            if note not in notes_seen:
                notes_seen.add(note)
                warn(f"caffeish segment: note: {note}")
        if "fatal" in result:
            raise NetFailure(result["fatal"])
        if "error" in result:
            pattern = result.get("pattern")
            if pattern is not None and not state["ok"]:
                if state["blank"] is not None and state["blank"][1] == pattern:
                    raise NetFailure(
                        f"{path} fails as {state['blank'][0]} did (above), and so does a blank image of their "
                        f"sizes: the net cannot run these images; stopped after {k + 1} of {len(todo)} images")
                state["blank"] = (path, pattern)
            state["failed"] += 1
            warn(f"caffeish segment: error: {result['error']}")
            return
        state["ok"] += 1
        n = result["classes"]
        if not state["colors_noted"]:
            state["colors_noted"] = True
            note = many_classes_note(n)
            if note:
                warn(note)
        for stage, s in result["seconds"].items():
            seconds[stage] += s
        rows_out[k] = {"image": path, "size": result["size"],
                       "classes": [labels[c] if labels is not None and c < len(labels) else int(c)
                                   for c in result["present"]],
                       "outputs": [os.path.join(outdir, n) for n in todo_plan[k]]}

    rows = [{"index": k, "path": os.path.abspath(path), "shown": path, "names": names}
            for k, ((path, _), names) in enumerate(zip(todo, todo_plan))]
    with connect(cluster) as ray:
        pool = plan_pool(ray, cluster, gpu)
        report = RunReport("images", pool, cluster.address)
        shipped = ship_net(ray, net_path, weights)
        kwargs = dict(shipped=[shipped], gpu=pool.gpu, seed=seed, spec=spec, blob=blob, tile=tile,
                      max_memory=max_memory, outdir=os.path.abspath(outdir), colors_spec=colors_spec,
                      base_colors=base_colors, labels=labels, overlay=overlay, legend=legend, npy=npy)
        order = _InOrder(handle)
        try:
            _run(ray, pool, report, SegmentActor, kwargs, rows, rows_per_task(len(rows), pool, SEGMENT_TASK),
                 order.add, len(rows), "segment")
        finally:
            remove_stale_temps(outdir, todo_plan)  # a killed worker's half-written files
    report.failed = state["failed"]
    return [rows_out[k] for k in sorted(rows_out)], state["failed"], seconds, report


# ---------------------------------------------------------------------------- classify


class ClassifyActor(_Worker):
    """One Net classifying batches of images: each row is one batch of the single-machine run."""

    def __init__(self, shipped, gpu, seed, spec, blob, oversample, top_k):
        super().__init__(gpu)
        self.clf = Classifier(self._open(shipped, seed), spec, blob, oversample)
        self.top_k = top_k

    def __call__(self, batch):
        started = time.perf_counter()
        results = [self.one([str(p) for p in paths], [str(s) for s in shown])
                   for paths, shown in zip(batch["paths"], batch["shown"])]
        return self._reply(batch, results, started)

    def one(self, paths, shown):
        """{"failures": [[position, message, blank fails too, ran before it]], "results": [[position, top,
        values]]}: the failures in the order classify_images meets them, then the results."""
        failures, prepared, positions = [], [], []
        for i, path in enumerate(paths):
            try:
                prepared.append(self.clf.prepare(path, self.clf.load(path)))
            except NetFailure as e:
                return {"fatal": image_error(shown[i], _in_message(e, path, shown[i])), "images": len(paths)}
            except CaffeishError as e:
                failures.append([i, image_error(shown[i], _in_message(e, path, shown[i])), False, 0])
                continue
            positions.append(i)

        def fail(i, error, x=None, ran=0):
            if isinstance(error, NetFailure):
                raise error
            blank = x is not None and not ran and same_failure(lambda b: self.clf.predict([b]), np.zeros_like(x),
                                                                 error)
            failures.append([i, image_error(shown[i], _in_message(error, paths[i], shown[i])), blank, ran])

        try:
            results = predict_each(self.clf, positions, prepared, fail)
        except NetFailure as e:
            return {"fatal": str(e), "images": len(paths)}
        out = []
        if results:
            top, values = top_classes(np.stack([row for _, row in results]), self.top_k)
            out = [[i, t.tolist(), v.tolist()] for (i, _), t, v in zip(results, top, values)]
        return {"failures": failures, "results": out, "images": len(paths)}


def classify_images(cluster, net_path, weights, seed, spec, blob, oversample, images, writer, batch_size=16,
                    top_k=5, warn=None, gpu=None):
    """caffeish.apps.classify.classify_images on a Ray cluster: returns (failed, RunReport).

    The batches are the single-machine run's (`batch_size` images each, in order), and `writer` gets
    the results in image order, so its output (JSON Lines, CSV, the table) is the same."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    state = {"failed": 0, "done": 0}

    def handle(k, result):
        chunk = images[k * batch_size:(k + 1) * batch_size]
        if "fatal" in result:
            raise NetFailure(result["fatal"])
        for i, message, blank, ran in result["failures"]:
            if blank and not (state["done"] or ran):
                raise NetFailure(f"{message} (a blank image fails the same way, so every image would: stopped "
                                 f"after {state['failed'] + 1} of {len(images)} images)")
            state["failed"] += 1
            warn(f"caffeish classify: error: {message}")
        for i, top, values in result["results"]:
            writer.write(chunk[i][0], top, values)
        state["done"] += len(result["results"])

    rows = []
    for k, start in enumerate(range(0, len(images), batch_size)):
        chunk = images[start:start + batch_size]
        rows.append({"index": k, "paths": [os.path.abspath(p) for p, _ in chunk], "shown": [p for p, _ in chunk]})
    with connect(cluster) as ray:
        pool = plan_pool(ray, cluster, gpu)
        report = RunReport("images", pool, cluster.address)
        kwargs = dict(shipped=[ship_net(ray, net_path, weights)], gpu=pool.gpu, seed=seed, spec=spec, blob=blob,
                      oversample=oversample, top_k=top_k)
        _run(ray, pool, report, ClassifyActor, kwargs, rows, 1, _InOrder(handle).add, len(images), "classify",
             items_of=lambda r: r["images"])
    report.failed = state["failed"]
    return state["failed"], report


# ---------------------------------------------------------------------------- evaluate segmentation




class EvaluateActor(_Worker):
    """One Net scoring image/label pairs; each batch returns its own counts (a batch run again after a
    worker died is counted once)."""

    def __init__(self, shipped, weights, gpu):
        super().__init__(gpu)
        self.scoring = self.ray.get(shipped[0])
        self.scoring.device = self.device
        self.weights = weights[0]

    def __call__(self, batch):
        started = time.perf_counter()
        refs = list(batch["key"]) if "key" in batch else list(zip(batch["image"], batch["label"]))
        refs = [bytes(r) if isinstance(r, (bytes, bytearray, np.bytes_)) else (str(r[0]), str(r[1])) for r in refs]
        try:
            with self.scoring.reader() as read:
                for ref in refs:
                    pair = read(ref)
                    if self.scoring.net is None:
                        self._build(pair)
                    self.scoring.add(*pair)
            hist, ignored, pixels, low, high, count = self.scoring.take_counts()
            result = {"hist": hist.tolist(), "ignored": ignored, "pixels": pixels, "low": low, "high": high,
                      "count": count}
        except CaffeishError as e:
            result = {"fatal": str(e), "count": len(refs)}
        results = [result] + [{"count": 0} for _ in refs[1:]]  # one row per pair in, the counts on the first
        return self._reply(batch, results, started)

    def _build(self, pair):
        feed, _ = self.scoring.prepare(*pair)
        if self.weights is None:
            self.scoring.build(feed)
            return
        with _unpacked(self.ray.get(self.weights)) as (_, weights):
            self.scoring.weights = weights
            self.scoring.build(feed)


def evaluate_segmentation(cluster, net_path, weights, db=None, images=None, labels=None, color_map=None,
                          ignore_label=None, score=None, label=None, stages=None, level=0, mean_value=None,
                          mean_file=None, scale=None, gpu=None):
    """caffeish.apps.evaluate.evaluate_segmentation on a Ray cluster, over --db or --images/--labels pairs:
    returns (the same result dict, RunReport).  The net is checked on the driver first (built at the
    first pair's shapes); the workers' confusion matrices are summed."""
    if not (db or images):
        raise CaffeishError("--ray scores image/label pairs: give --db DATASET or --images DIR --labels DIR "
                            "(a net reading its own Data layers runs without --ray)")
    absolute = [None if p is None else os.path.abspath(p) for p in (db, images, labels)]
    scoring = PairScoring(net_path, weights, *absolute, color_map, ignore_label, score, label, stages, level, None,
                          mean_value, mean_file, scale)
    refs = scoring.pair_refs()
    if not refs:
        raise CaffeishError("no image/label pairs to evaluate")
    with scoring.reader() as read:
        feed, _ = scoring.prepare(*read(refs[0]))
    scoring.build(feed)  # the net, the weights and the score blob checked here, before the cluster works
    if db:
        rows = [{"index": i, "key": key} for i, key in enumerate(refs)]
    else:
        rows = [{"index": i, "image": image, "label": lab} for i, (image, lab) in enumerate(refs)]

    def merge(index, result):
        if "fatal" in result:
            raise CaffeishError(result["fatal"])
        if "hist" in result:
            scoring.merge((np.asarray(result["hist"], np.int64), result["ignored"], result["pixels"],
                           result["low"], result["high"], result["count"]))

    with connect(cluster) as ray:
        pool = plan_pool(ray, cluster, gpu)
        report = RunReport("pairs", pool, cluster.address)
        shipped = ray.put(scoring)  # without its net (PairScoring.__getstate__)
        weights_ref = None if weights in (None, "none") else ray.put(
            {"weights": (os.path.basename(weights), _read(weights, "weights"))})
        kwargs = dict(shipped=[shipped], weights=[weights_ref], gpu=pool.gpu)
        _run(ray, pool, report, EvaluateActor, kwargs, rows, rows_per_task(len(rows), pool, EVALUATE_TASK), merge,
             len(rows), "evaluate")
    report.failed = 0
    return scoring.result(), report
