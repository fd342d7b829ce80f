"""Command-line options and argparse types shared by the tools (net state, input shapes, --gpu, ranges)."""
import argparse
import math

from caffeish.errors import CaffeishError
from caffeish.graph import parse_shape


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


_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(value, what="size"):
    """Bytes from 4G, 512M, 100K, 2.5GiB, 8GB or a plain number (K, M, G, T are powers of 1024).

    Anything that is not a positive, finite size is a CaffeishError naming `what`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, mult = float(value), 1
    else:
        text = str(value).strip().upper()
        text = text[:-1] if text.endswith("B") else text
        text = text[:-1] if text.endswith("I") else text
        mult = _UNITS.get(text[-1:], 1)
        try:
            number = float(text[:-1] if text[-1:] in _UNITS else text)
        except ValueError:
            number = float("nan")
    if not math.isfinite(number) or number * mult < 1:
        raise CaffeishError(f"{what}: expected a positive size such as 8G, 512M or 1048576, got '{value}'")
    return int(number * mult)


def bytes_arg(text):
    """An argparse type for sizes (parse_bytes)."""
    try:
        return parse_bytes(text)
    except CaffeishError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def parse_wxh(text, what="size"):
    """An image size as people write it, width first: '500x375' -> (500, 375); '512' -> (512, 512).

    Every WxH option (dataset --resize, classify --resize, segment --tile) reads sizes this way."""
    parts = str(text).strip().lower().replace("*", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 1:
        raise CaffeishError(f"{what}: expected WIDTHxHEIGHT with positive sizes (e.g. 500x375), got '{text}'")
    return dims


def wxh_arg(text):
    """An argparse type for WIDTHxHEIGHT sizes (parse_wxh): (width, height)."""
    try:
        return parse_wxh(text)
    except CaffeishError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None

