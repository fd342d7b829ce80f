"""pycaffe's `_caffe` module-level functions, as a CPU_ONLY Caffe built without NCCL has them.

`import caffeish as caffe` resolves these names here (caffeish/__init__.py's _LAZY table):

* layer_type_list(): the registered layer types, sorted as Caffe's registry lists them.
* has_nccl(): False.  NCCL: multi-GPU training is not available; building one
  (or NCCL.new_uid()) raises NCCLError, a RuntimeError.
* set_random_seed(seed): seeds the global random stream (Caffe's global RNG): Nets
  built afterwards without their own seed= draw their fillers and random layers
  from it (caffeish.runtime.fillers).
* init_log(), init_log(level), init_log(level, stderr), log(message): glog's
  setup and LOG(INFO), through Python's logging (logger "caffe").  Levels are
  glog's: 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL.
* solver_count/set_solver_count, solver_rank/set_solver_rank, set_multiprocess:
  the process-wide values Caffe keeps for multi-GPU training (1, 0, False in a
  single process); setting them changes nothing else here.
* Timer: pycaffe's Timer: start(), stop(), ms (milliseconds of the last
  start..stop, or up to now while running), plus seconds.

Imports errors, the graph's layer registry and the runtime.
"""
import logging
import time

from caffeish.errors import ArgumentError, NCCLError
from caffeish.graph.registry import registered_types
from caffeish.runtime import fillers

logger = logging.getLogger("caffe")

# glog's severities -> Python's logging levels
_GLOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}

_state = {"solver_count": 1, "solver_rank": 0, "multiprocess": False}


def layer_type_list():
    """The registered layer types (Caffe's LayerRegistry::LayerTypeList: sorted by name)."""
    return registered_types()


def has_nccl():
    """Whether Caffe was built with NCCL (multi-GPU training): never here."""
    return False


def set_random_seed(seed):
    """Seed Caffe's global random stream: Nets built afterwards without seed= draw from it."""
    fillers.set_global_seed(seed)


def _int(value, what):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{what}: expected an integer, got {value!r}")
    return value


def init_log(level=0, stderr=True):
    """glog's InitGoogleLogging with FLAGS_minloglevel = level (0 INFO .. 3 FATAL), to stderr."""
    level = _int(level, "init_log")
    if level not in _GLOG_LEVELS:
        raise ArgumentError(f"init_log: level must be 0 (INFO), 1 (WARNING), 2 (ERROR) or 3 (FATAL), got {level}")
    logger.setLevel(_GLOG_LEVELS[level])
    if stderr and not any(getattr(h, "_caffeish", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname).1s%(asctime)s %(message)s", "%m%d %H:%M:%S"))
        handler._caffeish = True
        logger.addHandler(handler)


def log(message):
    """LOG(INFO) << message."""
    logger.info("%s", message)


def solver_count():
    return _state["solver_count"]


def set_solver_count(count):
    _state["solver_count"] = _int(count, "set_solver_count")


def solver_rank():
    return _state["solver_rank"]


def set_solver_rank(rank):
    _state["solver_rank"] = _int(rank, "set_solver_rank")


def multiprocess():
    return _state["multiprocess"]


def set_multiprocess(value):
    _state["multiprocess"] = bool(value)


class Timer:
    """pycaffe's Timer (Caffe's CPU timer): start(), stop(), ms; seconds as Caffe's Seconds()."""

    def __init__(self):
        self._running = False
        self._start = self._stop = None

    def start(self):
        if not self._running:
            self._start = time.perf_counter()
            self._running = True

    def stop(self):
        if self._running:
            self._stop = time.perf_counter()
            self._running = False

    def _elapsed(self):
        if self._start is None:
            return 0.0
        end = time.perf_counter() if self._running else self._stop
        return end - self._start

    @property
    def ms(self):
        """Milliseconds from the last start() to stop() (to now while running; 0 before a start)."""
        return self._elapsed() * 1e3

    @property
    def seconds(self):
        return self._elapsed()


_NO_NCCL = ("NCCL (multi-GPU training) is not available: caffeish runs in one process on one device "
            "(caffe.has_nccl() is False)")


class NCCL:
    """pycaffe's NCCL, which caffeish does not have: building one raises NCCLError."""

    def __init__(self, *args, **kwargs):
        raise NCCLError(_NO_NCCL)

    @staticmethod
    def new_uid():
        raise NCCLError(_NO_NCCL)
