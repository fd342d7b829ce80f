"""caffeish surgery (being written)."""
from caffeish.errors import UnsupportedError


def add_arguments(p):
    pass


def run(args):
    raise UnsupportedError("caffeish surgery is not finished yet")
