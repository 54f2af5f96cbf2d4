"""bench llamacpp (tools/bench/llamacpp.py): it skips with its reason where llama.cpp is absent,
and reads llama-bench's JSON and its own peak RSS (not the bench process's, which a forked child's
maxrss starts from) (a stand-in llama-bench script here; the
real one is built by hand, never in CI: docs/cpu-performance.md)."""
from __future__ import annotations

import json
import stat

import pytest
import torch

from tools.bench.__main__ import main
from tools.bench.llamacpp import find_llama_bench, run_llama_bench


def test_skips_with_the_reason_when_llama_bench_is_absent(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))                 # no llama-bench anywhere
    out = tmp_path / "r.json"
    assert main(["llamacpp", "--device", "cpu", "--json", str(out)]) == 0
    assert "skipped -- llama.cpp is not installed" in capsys.readouterr().out
    assert "no llama-bench on PATH" in json.loads(out.read_text())["skipped"]
    binary, why = find_llama_bench(str(tmp_path / "nope"))
    assert binary is None and "nope" in why and "no executable" in why


def _fake_llama_bench(tmp_path, body: str) -> str:
    path = tmp_path / "llama-bench"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_reads_the_rate_and_passes_the_test_and_repack_flags(tmp_path):
    args_file = tmp_path / "args"
    fake = _fake_llama_bench(tmp_path, f'echo "$@" > {args_file}\n'
                             'echo \'[{"avg_ts": 123.5, "n_prompt": 0, "n_gen": 32}]\'\n')
    held = torch.ones(256 << 20, dtype=torch.uint8)       # this process is large; the child is not
    rate, peak = run_llama_bench(fake, "m.gguf", 2, 0, 32)
    assert rate == 123.5 and 0 < peak < 64 << 20 and held[0] == 1
    args = args_file.read_text().split()
    for flag, value in (("-m", "m.gguf"), ("-t", "2"), ("-p", "0"), ("-n", "32"), ("--repack", "0"),
                        ("-fa", "0"), ("-o", "json")):
        assert args[args.index(flag) + 1] == value


def test_a_failing_llama_bench_is_an_error_with_its_stderr(tmp_path):
    fake = _fake_llama_bench(tmp_path, 'echo "unknown argument: --repack" >&2\nexit 1\n')
    with pytest.raises(RuntimeError, match="exited with 1: unknown argument: --repack"):
        run_llama_bench(fake, "m.gguf", 1, 0, 8)

