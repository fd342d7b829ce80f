"""`caffeish store`: a model store of pretrained nets, like DIGITS 5's and Caffe's Model Zoo.

    caffeish store build DIR                    validate every model folder, write DIR/index.json
    caffeish store serve DIR [--port 8000]      serve the store over HTTP (range requests; localhost)
    caffeish store list URL|DIR [--format]      the models of a store
    caffeish store pull URL|DIR NAME -o OUTDIR  download, resume, verify (sha256/sha1), validate the net
    caffeish store verify DIR                   check files against index.json or readme.md's sha1

A store is untrusted input: a pull gives up (saying why) after --retries failed
attempts without new data, on a transfer slower than --min-rate or past
--max-time; the server closes connections idle for --timeout seconds and
serves at most --max-connections at once.  Checking a net runs no code from
it: a Python layer's module is imported only with --allow-python-layers.

A store is a directory with one folder per model (deploy.prototxt,
weights.caffemodel, optional train_val.prototxt, mean.binaryproto, labels.txt,
readme.md with the Model Zoo front matter) and the index.json that `build`
writes.  Serve it with `store serve` or any web server that honours ranges.
"""
import argparse
import sys

from caffeish.apps import download, store
from caffeish.tools import report
from caffeish.tools.options import add_allow_python_layers_option, bytes_arg, finite_float, int_arg
from caffeish.apps.store_server import MAX_CONNECTIONS, TIMEOUT, serve

LIST_COLUMNS = [("name", "name"), ("task", "task"), ("input_shape", "input"), ("classes", "classes"),
                ("size", "size"), ("license", "license"), ("description", "description")]
BUILD_COLUMNS = [("name", "model"), ("status", "status"), ("task", "task"), ("input_shape", "input"),
                 ("classes", "classes"), ("files", "files"), ("size", "size")]
VERIFY_COLUMNS = [("model", "model"), ("file", "file"), ("check", "check"), ("status", "status")]


def _log(message):
    print(store.shown(message, 2000), file=sys.stderr)


def _seconds(text):
    """An argparse type: a positive, finite number of seconds."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _rate(text):
    """An argparse type for --min-rate: a size (1k, 100k, 1M) per second, or 0 for no minimum."""
    return 0 if text.strip() in ("0", "none") else bytes_arg(text)


def _shown_rows(rows, keys):
    """Rows with their text cells escaped (names and descriptions come from a store: untrusted)."""
    return [{k: store.shown(v) if k in keys and isinstance(v, str) else v for k, v in r.items()} for r in rows]


def _size(entry):
    return store.human_size(sum(f["size"] for f in entry["files"]))


def _short(text, limit=60):
    text = text or ""
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------- commands


def build(args):
    index, failures = store.build_index(args.dir, allow_python_layers=args.allow_python_layers)
    rows = [{"name": m["name"], "status": "ok", "task": m["task"], "input_shape": m["input_shape"],
             "classes": m["classes"], "files": len(m["files"]), "size": _size(m)} for m in index["models"]]
    rows += [{"name": name, "status": "FAILED", "error": store.shown(message, 2000)} for name, message in failures]
    notes = [f"left out {name}: {store.shown(message, 2000)}" for name, message in failures]
    notes.append(f"wrote {args.dir.rstrip('/')}/{store.INDEX}: {len(index['models'])} model(s)"
                 + (f", {len(failures)} left out" if failures else ""))
    print(report.render(BUILD_COLUMNS, rows, args.format, notes=notes), end="")
    return 1 if failures else 0


def list_models(args):
    index = download.read_index(args.store, timeout=args.timeout, log=_log)
    if args.format == "json":
        print(report.render(LIST_COLUMNS, index["models"], "json"), end="")
        return 0
    rows = [dict(m, size=_size(m), description=_short(m.get("description")))
            for m in index["models"]]
    rows = _shown_rows(rows, ("name", "task", "license", "description"))
    print(report.render(LIST_COLUMNS, rows, args.format), end="")
    return 0


def pull(args):
    result = download.pull(args.store, args.name, args.output, force=args.force, retries=args.retries,
                           timeout=args.timeout, validate=not args.no_validate,
                           allow_python_layers=args.allow_python_layers, min_rate=args.min_rate,
                           max_time=args.max_time, log=_log)
    checks = "size, sha256" + (", sha1" if result["sha1"] else "")
    net = "; net validated (parses, shapes infer, weights bind)" if result["validated"] else ""
    if result["note"]:
        net = "; net not validated past parsing (Python layers: --allow-python-layers runs their code)"
    kept = f", {len(result['kept'])} already there" if result["kept"] else ""
    print(f"pulled '{store.shown(result['name'])}' into {result['outdir']}: {result['files']} files, "
          f"{store.human_size(result['size'])} ({store.human_size(result['bytes'])} transferred{kept}); "
          f"verified {checks}{net}")
    return 0


def verify(args):
    rows = _shown_rows(store.verify_folder(args.dir), ("model", "file", "status"))
    bad = [r for r in rows if r["status"] != "ok"]
    notes = [f"{len(rows) - len(bad)} of {len(rows)} file(s) ok"]
    print(report.render(VERIFY_COLUMNS, rows, args.format, notes=notes), end="")
    return 1 if bad else 0


def serve_store(args):
    store.read_index(args.dir)  # refuse a folder that is not a built store

    def ready(server):  # the port is bound: a port in use or an unknown host was an error before this
        print(f"serving {args.dir} at {server.url} (Ctrl-C to stop)", file=sys.stderr)

    serve(args.dir, args.host, args.port, log=None if args.quiet else sys.stderr, timeout=args.timeout,
          max_connections=args.max_connections, ready=ready)
    return 0


# ---------------------------------------------------------------------------- CLI


def add_arguments(p):
    sub = p.add_subparsers(dest="store_command", metavar="COMMAND")
    sub.required = True

    b = sub.add_parser("build", help="validate each model folder and write DIR/index.json")
    b.add_argument("dir", help="the store directory (one folder per model)")
    b.add_argument("--format", choices=report.FORMATS, default="table")
    add_allow_python_layers_option(b)
    b.set_defaults(store_run=build)

    s = sub.add_parser("serve", help="serve a store over HTTP with range requests")
    s.add_argument("dir", help="the store directory (with index.json)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 serves every interface)")
    s.add_argument("--port", type=int_arg(0, 65535), default=8000, help="port (default 8000; 0: any free port)")
    s.add_argument("--timeout", type=_seconds, default=TIMEOUT,
                   help=f"close a connection that sends or reads nothing for this long (default {TIMEOUT:g} s)")
    s.add_argument("--max-connections", type=int_arg(1), default=MAX_CONNECTIONS, metavar="N",
                   help=f"connections served at once; more get 503 at once (default {MAX_CONNECTIONS})")
    s.add_argument("--quiet", action="store_true", help="do not log requests")
    s.set_defaults(store_run=serve_store)

    ls = sub.add_parser("list", help="list the models of a store")
    ls.add_argument("store", metavar="URL|DIR", help="a store URL (http://host:port/) or directory")
    ls.add_argument("--format", choices=report.FORMATS, default="table")
    ls.add_argument("--timeout", type=_seconds, default=60.0, help="network timeout in seconds (default 60)")
    ls.set_defaults(store_run=list_models)

    pl = sub.add_parser("pull", help="download a model: resumable, verified, written atomically")
    pl.add_argument("store", metavar="URL|DIR", help="a store URL or directory")
    pl.add_argument("name", help="the model's name (see `store list`)")
    pl.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder to write the model's files into")
    pl.add_argument("--force", action="store_true", help="overwrite existing files that differ")
    pl.add_argument("--retries", type=int_arg(0), default=5,
                    help="retries of a dropped or failed transfer without new data (default 5; at most "
                         "4 x (retries + 1) failed attempts per file in all)")
    pl.add_argument("--timeout", type=_seconds, default=60.0,
                    help="seconds to wait for a connection, a response's headers or the next data (default 60)")
    pl.add_argument("--min-rate", type=_rate, default=download.MIN_RATE, metavar="SIZE",
                    help=f"give up on a transfer slower than SIZE bytes per second over "
                         f"{download.RATE_WINDOW:g} s (default {download.MIN_RATE}; 0: no minimum)")
    pl.add_argument("--max-time", type=_seconds, default=None, metavar="SECONDS",
                    help="give up when the whole pull takes longer (default: no limit)")
    pl.add_argument("--no-validate", action="store_true", help="skip re-validating the net after the download")
    add_allow_python_layers_option(pl)
    pl.set_defaults(store_run=pull)

    v = sub.add_parser("verify", help="check files against index.json or readme.md's sha1")
    v.add_argument("dir", help="a store, a pulled model folder or a Model Zoo folder")
    v.add_argument("--format", choices=report.FORMATS, default="table")
    v.set_defaults(store_run=verify)


def run(args):
    return args.store_run(args)
