"""`caffeish run SCRIPT.py [ARGS...]`: run an unchanged pycaffe script (`import caffe`) on caffeish.

For this process only, `caffe` and its submodules (caffe.io, caffe.proto.caffe_pb2,
caffe.net_spec, caffe.draw, caffe.coord_map, caffe.classifier, caffe.detector)
resolve to caffeish; nothing named caffe is installed.  The script runs as
`python SCRIPT.py ARGS` would: sys.argv, __name__ == '__main__', its folder first
on sys.path; its exit status and tracebacks pass through.  `-m MODULE` runs a
module instead (`caffeish run -m unittest discover -s tests`).  Everything after
the script (or module) goes to it, options included.  Same as
`python -m caffeish.pycaffe.compat SCRIPT.py ARGS`.
"""
import argparse

from caffeish.errors import CaffeishError
from caffeish.pycaffe import compat


def add_arguments(p):
    p.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="MODULE [ARGS]",
                   help="run a module (as python -m) instead of a script; what follows goes to it")
    p.add_argument("script", nargs="?", metavar="SCRIPT.py", help="the pycaffe script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the script's own arguments")


def run(args):
    if args.module is not None:
        if not args.module or args.script is not None:
            raise CaffeishError("give either a script or -m MODULE [ARGS...], the module first")
        return compat.run_module(args.module[0], args.module[1:])
    if args.script is None:
        raise CaffeishError("give a script to run (caffeish run SCRIPT.py [ARGS...]) or -m MODULE")
    return compat.run_path(args.script, args.args)
