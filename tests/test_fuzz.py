"""Fuzzed adapter files (issue 17): per method, byte-level and structural mutations of a valid file
(bench/fuzz_files.py) go through the loader, the header-only check, the rebuild for each layer and
the weight change. Every one is refused with an AdapterFileError naming the file or accepted with
finite values only: 0 crashes, 0 non-finite weights accepted, the two checks never disagree, and
neither memory nor time per file runs away. ``TLORA_FUZZ_CASES`` sets the mutations per kind
(default 1000: ~30 s of CPU); the documented 10,000-case run is ``python bench/fuzz_files.py``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from bench import fuzz_files
from bench.fuzz_files import METHODS, SCRATCH, fuzz_method, peak_rss_mb

CASES = int(os.environ.get("TLORA_FUZZ_CASES", "1000"))
MAX_PEAK_GROWTH_MB = 200  # over the whole fuzz of a method: a memory bomb costs gigabytes
MAX_CASE_SECONDS = 5.0  # the report saw up to 29 s per module; a busy machine can pause a case ~1 s


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(dir=SCRATCH) as folder:
        yield Path(folder)


@pytest.mark.parametrize("method", METHODS)
def test_hostile_files_are_refused_or_finite(method, scratch):
    before = peak_rss_mb()
    tally = fuzz_method(method, CASES, seed=0, folder=scratch)
    assert tally.count("crash") == tally.count("non-finite") == tally.count("disagreement") == 0, tally.crashes
    assert tally.count("refused", "byte") > 0.8 * CASES  # nearly every damaged byte shows (the checksum)
    assert tally.count("refused", "structural") > 0.5 * CASES
    assert tally.count("accepted") > 0  # harmless mutations (a float64 copy, no alpha) still load
    assert peak_rss_mb() - before < MAX_PEAK_GROWTH_MB
    assert tally.slowest_s < MAX_CASE_SECONDS


def test_the_fuzz_finds_what_an_unchecked_loader_lets_through(scratch, monkeypatch):
    """Without the group checks, the same mutations crash the rebuild or pass NaN: the fuzz
    has the power to fail."""
    from tlora import format as file_format

    monkeypatch.setattr(
        file_format, "check_group", lambda group, shape=None, where="": file_format.adapter_class(group)
    )
    monkeypatch.setattr(file_format, "check_finite", lambda tensors, where="": None)
    monkeypatch.setattr(fuzz_files, "inspect_adapter_file", fuzz_files.load_adapter_file)  # no disagreement noise
    tally = fuzz_method("tlora", 150, seed=1, folder=scratch)
    assert tally.count("crash") + tally.count("non-finite") > 10
