"""pycaffe's solvers: `caffe.get_solver(file)`, `caffe.SGDSolver(file)` and the other five types.

Each is caffeish.runtime.solver.Solver with pycaffe's face: `net`, `test_nets`,
`iter`, `step(n)`, `solve([resume])`, `restore(file)`, `snapshot()`,
`apply_update()`, `add_callback(on_start, on_gradients)`, `share_weights(net)`
and `param`.  `caffe.SGDSolver(file)` builds an SGD solver whatever the file's
`type` says, as pycaffe's classes do; `get_solver` builds the file's type.
Nets are built on the device `caffe.set_mode_gpu()`/`set_device` chose.
The log lines are Caffe's, on stderr (glog's INFO; `GLOG_minloglevel=1` or
`caffe.init_log(1)` silences them).
"""
import logging

from caffeish.errors import ArgumentError
from caffeish.runtime import solver as _solver

logger = logging.getLogger("caffe")


def _log(message, where):
    if logger.level <= logging.INFO:  # NOTSET too: glog writes INFO to stderr until init_log(1) asks for less
        _solver.stderr_log(message, where)


class Solver(_solver.Solver):
    """A Caffe solver as pycaffe shows it (build one with get_solver or a typed class)."""

    solver_type = None  # None: the file's own type

    def __init__(self, filename, *args, **kwargs):
        if args or kwargs:
            raise ArgumentError(f"{type(self).__name__}(filename): takes the solver prototxt's path only")
        super().__init__(filename, log=_log, type_=self.solver_type)

    def solve(self, resume_file=None):
        """Train to max_iter (Caffe's Solve), first restoring `resume_file` when given."""
        super().solve(resume_file)

    def add_callback(self, on_start, on_gradients=None):
        """pycaffe's add_callback(on_start, on_gradients): called at the start of every iteration,
        and once its gradients are ready (before the update).  An object with on_start() and
        on_gradients_ready() methods is taken too."""
        if on_gradients is None and hasattr(on_start, "on_gradients_ready"):
            on_start, on_gradients = on_start.on_start, on_start.on_gradients_ready
        for what, f in (("on_start", on_start), ("on_gradients", on_gradients)):
            if not callable(f):
                raise ArgumentError(f"add_callback: {what} must be callable, got {type(f).__name__}")
        self.callbacks.append((on_start, on_gradients))

    def share_weights(self, net):
        """pycaffe's share_weights: `net` uses the train net's parameter arrays."""
        net.share_with(self.net)


def _typed(name, kind):
    cls = type(name, (Solver,), {"solver_type": kind, "__doc__": f"pycaffe's {name}: a {kind} solver."})
    cls.__module__ = __name__
    return cls


SGDSolver = _typed("SGDSolver", "SGD")
NesterovSolver = _typed("NesterovSolver", "Nesterov")
AdaGradSolver = _typed("AdaGradSolver", "AdaGrad")
RMSPropSolver = _typed("RMSPropSolver", "RMSProp")
AdaDeltaSolver = _typed("AdaDeltaSolver", "AdaDelta")
AdamSolver = _typed("AdamSolver", "Adam")


CLASSES = {cls.solver_type: cls for cls in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver,
                                              AdaDeltaSolver, AdamSolver)}


def get_solver(filename):
    """pycaffe's get_solver: a solver of the type the file names (`type`, or the old `solver_type`),
    an instance of that type's class (get_solver('adam.prototxt') is a caffe.AdamSolver)."""
    kind = _solver.read_solver(filename).type
    return CLASSES.get(kind, Solver)(filename)  # an unknown type: Solver refuses it, naming the six
