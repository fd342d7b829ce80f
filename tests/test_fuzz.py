"""The CI fuzz test: a few hundred seeded mutations of ../shared/models files (and of a small dataset's
LMDBs) through `caffeish summary`, `offsets`, `upgrade`, `dataset show` and the caffeish.io readers, in a
worker process under an address-space limit.  Any traceback, error of more than one line, signal or input
running past its time fails it.  The generator and the harness are benchmarks/fuzz.py's (which runs a
longer campaign: `python benchmarks/fuzz.py --minutes 20`)."""
import importlib.util
import os

import pytest

from conftest import ROOT, shared_path

INPUTS = 300
TIMEOUT = 10  # seconds per input (each runs up to 7 commands and readers)
MEMORY = 3 << 30


def fuzz_module():
    spec = importlib.util.spec_from_file_location("caffeish_fuzz", os.path.join(ROOT, "benchmarks", "fuzz.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz():
    return fuzz_module()


def test_seeded_mutations_of_the_shared_models_give_only_successes_and_clean_errors(fuzz, tmp_path):
    files = fuzz.corpus(str(shared_path("models").parent))
    assert len(files) > 50
    c = fuzz.campaign(files, range(INPUTS), str(tmp_path), timeout=TIMEOUT, memory=MEMORY, lmdb_every=10,
                      thorough=False)
    report = "\n".join(f"seed {f['seed']} ({os.path.relpath(f['source'], str(shared_path('models')))}: "
                       f"{f['mutation']}): {f['failed']}" for f in c.failures)
    assert c.counts["failures"] == 0, report
    assert c.counts["inputs"] == INPUTS
    # the mutations reach past the parsers: some inputs still summarize, most are refused with one line
    assert c.counts["successes"] >= INPUTS // 20 and c.counts["clean errors"] >= INPUTS // 2, c.counts


def test_the_harness_sees_every_kind_of_failure(fuzz, tmp_path):
    files = fuzz.corpus(str(shared_path("models").parent))
    c = fuzz.Campaign(files, str(tmp_path), timeout=2, memory=MEMORY)
    try:
        kinds = ["signal", "traceback", "overtime", "memory", "two lines"]
        outcomes = [c.run(i, canary=kind) for i, kind in enumerate(kinds)]
        after = c.run(len(kinds))  # a normal input after a dead worker: a fresh one runs it
    finally:
        c.close()
    assert outcomes == ["failure"] * len(kinds)
    details = [f["failed"][0][1] for f in c.failures]
    assert "signal SIGBUS" in details[0] and "KeyError" in details[1] and "over 2" in details[2]
    assert "MemoryError" in details[3] and "2 line(s)" in details[4]
    assert after in ("success", "clean error")
