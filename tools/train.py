"""caffeish train: Caffe's `caffe train`, with a progress bar and the training curves.

  caffeish train --solver SOLVER.prototxt [--weights W.caffemodel[,W2...] | --snapshot S.solverstate]
                 [--gpu [ID]] [--level N] [--stage S[,S2]] [-o OUT] [--sigint-effect stop|snapshot|none]
                 [--sighup-effect snapshot|stop|none] [--no-curves]

Runs the solver as `caffe train` does (paths in the solver file are relative to the
current folder, as in Caffe), logging Caffe's lines on stderr, so that Caffe's log
parsers read them.  On a terminal a progress bar shows the iteration, the loss and
the time left.  OUT/curves.csv and OUT/curves.png (train loss, test outputs, lr;
OUT defaults to the snapshot folder) are rewritten as training runs.  Ctrl-C stops
after writing a snapshot; SIGHUP writes one and goes on.  The library side is
caffeish.apps.train (and caffeish.runtime.solver).
"""
from caffeish.apps import train
from caffeish.tools.options import add_gpu_option

EFFECTS = ("stop", "snapshot", "none")


def add_arguments(p):
    p.add_argument("--solver", required=True, metavar="SOLVER.prototxt", help="the solver definition")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--weights", metavar="W.caffemodel[,W2]",
                       help="start from these weights (comma-separated, later files override earlier ones), "
                            "loaded into the train and test nets by layer name")
    start.add_argument("--snapshot", metavar="S.solverstate",
                       help="resume from a solver state (ours or Caffe's): weights, history, iteration, lr step")
    add_gpu_option(p)
    p.add_argument("--level", type=int, default=0, help="the train net's state level (default 0)")
    p.add_argument("--stage", action="append", default=None,
                   help="a train net state stage (comma-separated or repeated)")
    p.add_argument("-o", "--out", metavar="OUT", default=None,
                   help="folder for curves.csv and curves.png (default: the snapshot folder)")
    p.add_argument("--no-curves", action="store_true", help="do not write curves.csv and curves.png")
    p.add_argument("--sigint-effect", choices=EFFECTS, default="stop",
                   help="what Ctrl-C does: stop (after a snapshot; default), snapshot (and go on) or none")
    p.add_argument("--sighup-effect", choices=EFFECTS, default="snapshot",
                   help="what SIGHUP does: snapshot (default), stop or none")


def run(args):
    train.run(args.solver, weights=args.weights, snapshot=args.snapshot, gpu=args.gpu, level=args.level,
              stages=args.stage, out=args.out, sigint=args.sigint_effect, sighup=args.sighup_effect,
              curves=not args.no_curves)
    return 0
