"""make gpu-check's decisions, checked on the CPU: no GPU -> a clear stop; skips and memory errors fail;
each plotting bench's figure drawn beside its JSON."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tools import gpu_check

FIXTURES = Path(__file__).resolve().parent / "data" / "bench"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU")
def test_without_a_gpu_it_says_so_and_stops(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main() == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert json.loads((tmp_path / "gpu-check.json").read_text())["result"] == "NO GPU"


def test_a_skipped_cuda_test_fails_the_check():
    ok, detail = gpu_check.tests_verdict(0, {"tests": 10, "failures": 0, "errors": 0, "skipped": 1})
    assert not ok and "9 passed" in detail and "skipped" in detail
    assert gpu_check.tests_verdict(0, {"tests": 10, "failures": 0, "errors": 0, "skipped": 0})[0]
    assert not gpu_check.tests_verdict(5, {"tests": 0})[0]  # nothing collected
    assert not gpu_check.tests_verdict(1, {"tests": 3, "failures": 1})[0]


def test_sanitizer_verdicts():
    clean = "3 passed in 40.1s\n========= ERROR SUMMARY: 0 errors\n"
    assert gpu_check.sanitizer_verdict(0, clean)[0] == "ok"
    bad = "========= Invalid __global__ write of size 16 bytes\n========= ERROR SUMMARY: 2 errors\n"
    status, _, failing = gpu_check.sanitizer_verdict(1, bad)
    assert status == "FAIL" and failing
    refused = "========= Error: Device not supported\n"
    status, detail, failing = gpu_check.sanitizer_verdict(1, refused)
    assert status == "unavailable" and not failing and "not supported" in detail
    assert gpu_check.sanitizer_verdict(None, "")[:1] == ("timeout",)


def test_a_bench_result_gets_its_figure_beside_it(tmp_path):
    pytest.importorskip("matplotlib")
    recorded = json.loads((FIXTURES / "attention.json").read_text())
    assert gpu_check.Check.plot(recorded, tmp_path / "attention.json") == " (plot attention.png)"
    assert (tmp_path / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert gpu_check.Check.plot({"bench": "store_kv"}, tmp_path / "store_kv.json") == ""   # draws no figure
    assert gpu_check.Check.plot({}, tmp_path / "none.json") == ""                          # no JSON written
    broken = gpu_check.Check.plot({"bench": "attention", "cases": []}, tmp_path / "broken.json")
    assert broken.startswith(" (no plot: ") and not (tmp_path / "broken.png").exists()
