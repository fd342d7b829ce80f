"""Shared test fixtures: the read-only ../shared folder beside the checkout."""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("CAFFEISH_SHARED", ROOT.parent / "shared"))


def shared_path(*parts):
    """Path under ../shared, or skip the test with a clear reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test data not found: {p} (tests read ../shared beside the checkout)")
    return p
