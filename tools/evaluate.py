"""caffeish evaluate (being written)."""
from caffeish.errors import UnsupportedError


def add_arguments(p):
    pass


def run(args):
    raise UnsupportedError("caffeish evaluate is not finished yet")
