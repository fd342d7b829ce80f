"""`caffeish serve`: a local web app over a workspace folder (models, datasets, training jobs).

    caffeish serve [--root DIR] [--host 127.0.0.1] [--port 5000] [--store URL ...]
                   [--max-upload 64M] [--max-pixels 64000000] [--jobs 1]

The workspace (default: the current folder) holds models/NAME/ (a deploy prototxt, weights,
labels.txt, mean.binaryproto), datasets/NAME/ (from `caffeish dataset`), jobs/NAME/ (training
jobs), stores.txt (model store URLs, one a line) and the image and label folders datasets are built
from.  Pages: the models (summary table, network picture, offsets and Crop checks, weight
histograms, conv1's filters, inference, surgery), imports from stores, datasets (build, browse),
training jobs (start from a model and a dataset, live curves and log, stop, resume, test an image
with a snapshot, make a model of it; each job trains in its own process, see caffeish.web.jobs).
Nothing a request names leaves the workspace, and no symbolic link is followed.  Stopping the
server stops its running jobs after a snapshot (resume them from their pages).

Localhost only by default; `--host 0.0.0.0` serves every interface, with a warning: anyone who can
reach the port can read and write the workspace through the app.  Needs `pip install 'caffeish[web]'`.
"""
import sys

from caffeish.errors import CaffeishError
from caffeish.runtime import blas
from caffeish.tools.options import bytes_arg, int_arg

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(p):
    p.add_argument("--root", default=".", metavar="DIR", help="the workspace folder (default: the current folder)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 serves every interface, with a warning)")
    p.add_argument("--port", type=int_arg(0, 65535), default=5000, help="port (default 5000)")
    p.add_argument("--store", action="append", default=[], metavar="URL",
                   help="a model store (URL or folder) to list and import from (repeatable; also ROOT/stores.txt)")
    p.add_argument("--max-upload", type=bytes_arg, default=64 << 20, metavar="SIZE",
                   help="largest request body, uploads included (default 64M)")
    p.add_argument("--max-pixels", type=int_arg(1), default=64_000_000, metavar="N",
                   help="largest uploaded image in pixels, checked before decoding (default 64000000)")
    p.add_argument("--jobs", type=int_arg(1, 64), default=1, metavar="N",
                   help="training jobs that may run at once (default 1; another start is refused)")


def run(args):
    try:
        import uvicorn

        from caffeish.web.app import create_app
    except ImportError as e:
        raise CaffeishError(f"caffeish serve needs the web extra ({e.name} is missing): "
                            f"pip install 'caffeish[web]'") from None
    local = args.host in LOOPBACK
    if not local:
        print(f"caffeish serve: warning: serving on {args.host}: anyone who can reach port {args.port} can "
              f"read the workspace, run its models and write into it; there is no login", file=sys.stderr)
    hosts = None
    if local:  # a page elsewhere cannot reach the app through a DNS name that points here
        hosts = ["127.0.0.1", "localhost", "[::1]", "::1"]
    app = create_app(args.root, stores=args.store, max_upload=args.max_upload, max_pixels=args.max_pixels,
                     allowed_hosts=hosts, max_jobs=args.jobs)
    print(f"caffeish serve: {app.state.web['ws'].root} at http://{'[' + args.host + ']' if ':' in args.host else args.host}"
          f":{args.port}/ (Ctrl-C to stop)", file=sys.stderr)
    blas.tune_threads()  # here, on the main thread: the pages build their nets in worker threads
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except SystemExit as e:  # uvicorn exits when the port cannot be bound
        if e.code:
            raise CaffeishError(f"cannot serve on {args.host}:{args.port} (in use, or not an address of this "
                                f"machine)") from None
        raise
    return 0
