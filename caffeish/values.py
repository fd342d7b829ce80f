"""How people write values on command lines, in environment variables and in store readmes.

Shapes (1,3,500,500), sizes in bytes (16G, 512M) and image sizes (500x375, width
first): one parser for each, so every option and file that takes one reads it
the same way.  Errors are CaffeishError naming what was being read.  Every
stage may import this module; it imports nothing of caffeish but errors.
"""
import math

from caffeish.errors import CaffeishError, GraphError


def parse_shape(text):
    """'1,3,500,500' -> (1, 3, 500, 500)."""
    try:
        dims = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise GraphError(f"bad shape '{text}': expected comma-separated integers like 1,3,224,224") from None
    if not dims or any(d < 0 for d in dims):
        raise GraphError(f"bad shape '{text}': expected non-negative comma-separated integers")
    return dims


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
