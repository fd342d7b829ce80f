"""Command-line options and argparse types shared by the tools (net state, input shapes, --gpu, ranges).

One spelling per idea, for every subcommand: the mean is `--mean FILE` (also
spelled `--mean-file`; 'none' for no mean) or `--mean-value B,G,R`
(`add_mean_options`, `mean_from_args`), and the label a loss or metric
skips is `--ignore-label N|none` (-1 is also none: `ignore_label_arg`,
`add_ignore_label_option`).
"""
import argparse
import math
import os

import numpy as np

from caffeish.data import preprocess
from caffeish.errors import CaffeishError
from caffeish.values import parse_bytes, parse_shape, parse_wxh


def input_shape_arg(text):
    """argparse type for NAME=N,C,H,W -> (name, shape)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=N,C,H,W, got '{text}'")
    name, dims = text.split("=", 1)
    try:
        return name.strip(), parse_shape(dims)
    except CaffeishError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_net_state_options(p, input_help="shape of an input blob, e.g. data=1,3,500,500 (repeatable)"):
    """--phase, --stage, --level and --input-shape: the NetState and input shapes of the graph."""
    p.add_argument("--phase", default="TEST", type=str.upper, choices=["TRAIN", "TEST"],
                   help="net state phase used to filter layers (default TEST)")
    p.add_argument("--stage", action="append", default=[], help="net state stage (repeatable)")
    p.add_argument("--level", type=int, default=0, help="net state level (default 0)")
    p.add_argument("--input-shape", action="append", type=input_shape_arg, default=[], metavar="NAME=N,C,H,W",
                   help=input_help)


def add_images_argument(p, what="images"):
    """The IMAGE|DIR|@LIST|DATASET... arguments of segment and classify (caffeish.apps.inference.find_images)."""
    p.add_argument("images", metavar="IMAGE|DIR|@LIST|DATASET", nargs="+",
                   help=f"{what}: image files, folders of images, @LIST.txt (one image path a line, relative to "
                        "the list's folder; '#' comments) and LMDB datasets of `caffeish dataset` (a record each)")


def add_gpu_option(p):
    """--gpu [ID]: run on a GPU (the CuPy kernels); without it, the CPU (numpy)."""
    p.add_argument("--gpu", nargs="?", const=0, default=None, type=int, metavar="ID",
                   help="run on GPU ID (default 0) with caffeish's CUDA kernels; needs CuPy and a GPU")


def device_from_args(args):
    """The Net(device=...) value that --gpu asks for: None (CPU) or "cuda:ID"."""
    gpu = getattr(args, "gpu", None)
    return None if gpu is None else f"cuda:{gpu}"


def int_arg(minimum, maximum=None):
    """An argparse type: an integer in [minimum, maximum] (argparse names the option when refused)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"at least {minimum}" if value < minimum else f"at most {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def finite_float(text):
    """An argparse type: a finite float (nan and inf refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
    return value


def bytes_arg(text):
    """An argparse type for sizes (parse_bytes)."""
    try:
        return parse_bytes(text)
    except CaffeishError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def wxh_arg(text):
    """An argparse type for WIDTHxHEIGHT sizes (parse_wxh): (width, height)."""
    try:
        return parse_wxh(text)
    except CaffeishError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
NO_MEAN = "none"
IGNORE_LABEL_FROM_NET = object()  # add_ignore_label_option(default=...): not given, the net's or dataset's own


def add_mean_options(p, file_help=None, value_help=None):
    """--mean FILE (alias --mean-file; 'none': no mean) and --mean-value B,G,R, in every subcommand.

    Both stay text (args.mean, args.mean_value): mean_from_args reads them, so a bad value is a
    one-line error naming the option."""
    p.add_argument("--mean", "--mean-file", dest="mean", metavar="FILE",
                   help=file_help or "subtract this mean: FILE.binaryproto or FILE.npy ('none' for no mean; "
                                     "--mean-file is the same option)")
    p.add_argument("--mean-value", metavar="B,G,R",
                   help=value_help or "subtract these per-channel values, e.g. 104,117,123 (one value: every channel)")


def mean_from_args(args):
    """(mean file or None, mean values or None, no_mean) from --mean / --mean-value; both given is an error."""
    mean = getattr(args, "mean", None)
    values = getattr(args, "mean_value", None)
    no_mean = mean is not None and mean.strip().lower() == NO_MEAN
    if mean is not None and values is not None:
        raise CaffeishError("give the mean as --mean FILE or as --mean-value, not both")
    parsed = None if values is None else preprocess.parse_values(values, "--mean-value")
    return (None if no_mean else mean), parsed, no_mean


def ignore_label_arg(text):
    """argparse type for --ignore-label N|none: a 32-bit integer, or None for 'none' (and -1, its old spelling)."""
    if str(text).strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got '{text}'") from None
    if not INT32_MIN <= value <= INT32_MAX:
        raise argparse.ArgumentTypeError(f"Caffe's ignore_label is a 32-bit integer, got {value}")
    return None if value == -1 else value


def add_ignore_label_option(p, default=255, help=None):
    """--ignore-label N|none (-1: none).  `default`: 255, None (none), or IGNORE_LABEL_FROM_NET for
    "not given" (the command then takes the net's or the dataset's own)."""
    if help is None:
        shown = "none" if default is None else "the net's" if default is IGNORE_LABEL_FROM_NET else default
        help = f"a label value that is not a class and is not scored (default {shown}; 'none' for none, -1 too)"
    p.add_argument("--ignore-label", type=ignore_label_arg, default=default, metavar="N|none", help=help)


def add_preprocess_options(p, keep_size=False):
    """The preprocessing options every command shares."""
    g = p.add_argument_group("preprocessing (Caffe's defaults: BGR, 0..255 pixels)")
    add_mean_options(g)
    g.add_argument("--scale", type=finite_float, default=None,
                   help="multiply after the mean subtraction (transform_param.scale, e.g. 0.00390625)")
    g.add_argument("--raw-scale", type=finite_float, default=None,
                   help="value of a white pixel before the mean (default 255: the 8-bit values)")
    g.add_argument("--channel-swap", metavar="2,1,0", default=None,
                   help="channel order for color images (default 2,1,0: RGB -> BGR; 'none' keeps RGB)")
    g.add_argument("--grayscale", action="store_true", default=None,
                   help="load images as gray (the default for 1-channel nets)")
    g.add_argument("--crop", choices=preprocess.CROP_MODES, default=None,
                   help="'none': resize to the net input; 'center': resize (--resize, or the mean image's "
                        "size) then take the centre crop")
    if not keep_size:
        g.add_argument("--resize", metavar="WxH", default=None,
                       help="resize images to WIDTHxHEIGHT (e.g. 256x256) before the centre crop (with --crop center)")
    g.add_argument("--transform-from", metavar="TRAIN_VAL.prototxt",
                   help="read scale, mean and crop from the TEST data layer's transform_param of this net")


def preprocess_from_args(args, keep_size=False):
    """The Preprocess the command-line options ask for (explicit options win over --transform-from)."""
    over = {}
    mean_file, mean_value, no_mean = mean_from_args(args)
    if no_mean:
        over["mean"] = None  # also drops --transform-from's mean
    elif mean_file:
        over["mean"] = preprocess.load_mean(mean_file)
        over["mean_source"] = f"mean file {mean_file}"
    elif mean_value is not None:
        over["mean"] = np.array(mean_value, np.float32)
        over["mean_source"] = "--mean-value"
    if args.scale is not None:
        over["scale"] = args.scale
    if args.raw_scale is not None:
        over["raw_scale"] = args.raw_scale
    if args.channel_swap is not None:
        text = args.channel_swap.strip().lower()
        over["channel_swap"] = None if text in ("none", "") else preprocess.parse_values(text, "--channel-swap")
    if args.grayscale:
        over["grayscale"] = True
    if args.crop is not None:
        over["crop"] = args.crop
    if keep_size:
        over["resize"] = "keep"
    elif getattr(args, "resize", None):
        width, height = parse_wxh(args.resize, "--resize")
        over["resize"] = (height, width)
    if args.transform_from:
        tp = preprocess.transform_param_of(args.transform_from)
        if tp is None:
            raise CaffeishError(f"{args.transform_from}: no data layer with a transform_param at TEST")
        return preprocess.from_transform_param(tp, base_dir=os.path.dirname(os.path.abspath(args.transform_from)), **over)
    return preprocess.Preprocess(**over)


def add_ray_options(p, resume=False):
    """--ray [ADDRESS], --ray-actors N, --ray-threads N (caffeish.apps.distributed); with resume, --resume."""
    from caffeish.apps.distributed import address_arg

    g = p.add_argument_group("Ray cluster (pip install 'caffeish[ray]')")
    g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", type=address_arg,
                   help="run on a Ray cluster through Ray Data: without ADDRESS a local one started for the run, "
                        "'auto' the cluster this machine is part of, or HOST:6379 / ray://HOST:10001")
    g.add_argument("--ray-actors", type=int_arg(1), metavar="N", help="actors, each holding one loaded net "
                   "(default: one per GPU of the cluster, else its CPUs divided by --ray-threads)")
    g.add_argument("--ray-threads", type=int_arg(1), metavar="N", help="BLAS threads of a CPU actor (default 1)")
    if resume:
        p.add_argument("--resume", action="store_true",
                       help="skip the images whose outputs all exist in OUTDIR (a re-run after an interrupted one)")


def ray_from_args(args):
    """The caffeish.apps.distributed.Cluster that --ray asks for (None without it); without Ray installed,
    a one-line error saying how to install it, before any work."""
    from caffeish.apps.distributed import Cluster, import_ray

    if args.ray is None:
        for option in ("--ray-actors", "--ray-threads"):
            if getattr(args, option[2:].replace("-", "_")) is not None:
                raise CaffeishError(f"{option} needs --ray")
        return None
    import_ray()
    return Cluster(args.ray, args.ray_actors, args.ray_threads)


def add_allow_python_layers_option(p):
    """--allow-python-layers (args.allow_python_layers): commands that inspect or check a net (summary,
    offsets, store build, store pull's validation) import the module of a `type: "Python"` layer and run
    its setup/reshape only when it is given; without it they run no code from the files they read."""
    p.add_argument("--allow-python-layers", action="store_true",
                   help="import the modules that the net's Python layers name and run their setup/reshape "
                        "(off by default: looking at a net runs no code from it)")
