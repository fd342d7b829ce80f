"""caffeish dataset (being written)."""
from caffeish.errors import UnsupportedError


def add_arguments(p):
    pass


def run(args):
    raise UnsupportedError("caffeish dataset is not finished yet")
