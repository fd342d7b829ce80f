"""The `caffeish` command: one entry point, one subcommand per tool.

Errors a user can act on (CaffeishError) are printed as one line on stderr
with exit status 1; no traceback.
"""
import argparse
import importlib
import sys

from caffeish.errors import CaffeishError
from caffeish.tools.options import add_net_state_options, bytes_arg
from caffeish.tools.report import FORMATS

# name -> (module in caffeish.tools, help).  Each module has add_arguments(parser) and run(args).
TOOLS = {
    "summary": ("summary", "one row per layer: shapes, parameters, multiply-accumulates"),
    "offsets": ("offsets", "per-layer coordinate offsets (Table 2 of DIGITS' FCN post); check or fix Crop offsets"),
    "upgrade": ("upgrade", "rewrite a legacy V0/V1 prototxt or caffemodel in the current format"),
    "surgery": ("surgery", "net surgery: convolutionalize, transplant weights, bilinear upsampling, build an FCN"),
    "classify": ("classify", "classify images (a file or folders) with a trained net"),
    "segment": ("segment", "segment images with a fully convolutional net; palette and overlay PNGs"),
    "dataset": ("dataset", "build and inspect DIGITS-style LMDB datasets (segmentation, classification)"),
    "train": ("train", "train a net with a Caffe solver, like `caffe train`: snapshots, resume, curves"),
    "evaluate": ("evaluate", "run a TEST-phase net like `caffe test`; segmentation metrics (mean IU, ...)"),
    "store": ("store", "model store: build, serve, list, pull and verify pretrained nets"),
    "run": ("run", "run an unchanged pycaffe script (`import caffe`) on caffeish"),
    "export": ("export", "export a net and its weights to another format (ONNX), Caffe's semantics kept"),
    "serve": ("serve", "a local web app over a workspace: models, inference, surgery, datasets (caffeish[web])"),
}
# Tools whose errors from a Python layer's own code reach the user as the script's own
# exceptions would (`run` executes a user's script: its exceptions pass through).
PASS_THROUGH = ("run",)


def _summary_options(p):
    add_net_state_options(p)
    p.add_argument("--max-blob-bytes", type=bytes_arg, default=None, metavar="SIZE",
                   help="refuse nets with a blob larger than this (e.g. 16G; default 8G or $CAFFEISH_MAX_BLOB_BYTES)")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")


def build_parser():
    parser = argparse.ArgumentParser(prog="caffeish", description="A Caffe-compatible toolchain.")
    sub = parser.add_subparsers(dest="tool", metavar="TOOL")
    sub.required = True
    for name, (module_name, help_text) in TOOLS.items():
        module = importlib.import_module(f"caffeish.tools.{module_name}")
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        if name == "summary":
            _summary_options(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if hasattr(args, "input_shape"):
        args.input_shape = dict(args.input_shape)
    try:
        if args.tool in PASS_THROUGH:
            return args.run(args)
        from caffeish.ops.python_layer import user_errors_as_caffeish

        with user_errors_as_caffeish():  # a Python layer's exception: one line naming the layer
            return args.run(args)
    except CaffeishError as e:
        from caffeish.formats.io import printable  # names from files: no newline or escape sequence gets through

        print(f"caffeish {args.tool}: error: {printable(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
