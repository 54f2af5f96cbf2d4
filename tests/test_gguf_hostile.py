"""Hostile GGUF files (tests/gguf_hostile.py: memory bombs in the metadata, lying counts and lengths,
invalid UTF-8, misaligned or overlapping tensors, zero or inconsistent head counts, a corrupt merge)
are each refused with their specific error, naming the file and the key or tensor -- in a process
of their own, so that each refusal's time (under 5 s) and the memory it adds to the process's peak
(under 256 MB) are what loading these files costs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from gguf_hostile import CASES
from hf_util import REPO


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("hostile")
    run = subprocess.run([sys.executable, os.path.join(REPO, "tests", "gguf_hostile.py"), str(root)],
                         capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert run.returncode == 0, run.stderr[-3000:]
    return {r["case"]: r for r in map(json.loads, run.stdout.splitlines())}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_gguf_file_is_refused_by_name_in_bounded_time_and_memory(results, case):
    got, (_, error, words) = results[case], CASES[case]
    assert got["error"] == error and re.search(words, got["message"]), got
    assert f"{case}.gguf" in got["message"], got            # names the file
    # The refusal's own cost: the peak RSS over the peak once warmed up (torch alone is ~700 MB).
    assert got["seconds"] < 5 and got["peak_mb"] - got["base_mb"] < 256, got


def test_a_big_endian_file_is_refused_as_such(tmp_path):
    from tinyinfer.loading.gguf_file import GGUFError, open_reader
    path = tmp_path / "be.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "big") + bytes(16))   # version 3, written big-endian
    with pytest.raises(GGUFError, match=r"be\.gguf is a big-endian GGUF file"):
        open_reader(str(path))
