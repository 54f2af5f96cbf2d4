"""Every bench subcommand and every command line, run for real in a quick mode: a CPU dry run on the
demo models with the smallest sizes, seconds each, so that none of them can rot unseen (issue 25).
The figures are not checked (timings never are in tests); that each runs to the end, is."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench import bench_names

REPO = Path(__file__).resolve().parents[1]
LLAMA, MLA = "models/shakespeare-llama", "models/shakespeare-mla"

QUICK = {   # bench -> its quick-mode arguments (after --device cpu --quick: tools/bench/__main__.py)
    "copy": ["--mib", "1", "--runs", "1"],
    "attention": ["--runs", "1"],
    "cpu_int4": ["--ckpt", LLAMA, "--new-tokens", "2", "--no-hf"],
    "cpu_int4_mm": ["--threads", "1"],
    "cpu_profile": ["--ckpt", LLAMA],
    "e2e": ["--ckpt", LLAMA, "--new-tokens", "2", "--quant", "bf16"],
    "fused": ["--runs", "1"],
    "hf": ["--ckpt", LLAMA, "--new-tokens", "2"],
    "hostile": ["--repeats", "1", "--seconds", "1"],
    "int4": ["--runs", "1"],
    "kvcache": ["--kv-memory", "4MiB"],               # --quick: the demo model, 128 tokens
    "llamacpp": ["--rounds", "1", "--new-tokens", "2", "--prompt-tokens", "8", "--threads", "1"],
    "load": ["--ckpt", LLAMA, "--repeats", "1"],
    "mla": ["--ckpt", MLA, "--batch", "1"],            # the default context: the model's less one
    "ops": ["--ckpt", LLAMA, "--batch", "1"],
    "prefix": ["--ckpt", LLAMA, "--system-tokens", "32", "--questions", "2", "--question-tokens", "8",
               "--decoders", "2", "--long-tokens", "64", "--budgets", "32", "--headline-budget", "32",
               "--repeats", "1"],
    "quality": ["--ckpt", LLAMA],
    "serve": ["--ckpt", LLAMA, "--num-requests", "2", "--rates", "8", "--input-len", "8",
              "--output-len", "4", "--repeats", "1", "--max-kv-tokens", "1024"],
    "spec": ["--k-max", "1", "--new-tokens", "4", "--alphas", "0.8"],
    "store_kv": ["--runs", "1", "--cache-mib", "1"],
    "structured": ["--models", LLAMA, "--limit", "2", "--max-tokens", "8", "--overhead-model", LLAMA,
                   "--batches", "1", "--decode-tokens", "2", "--repeats", "1"],
    "tp": ["--ckpt", LLAMA, "--sizes", "1", "--batch", "1", "--new-tokens", "2"],
    "tpwire": [],
}


def test_every_bench_has_a_quick_mode():
    assert set(QUICK) == set(bench_names()), "a bench without a quick mode here, or a stale entry"


@pytest.mark.parametrize("name", sorted(QUICK))
def test_bench_quick_mode(name, tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "tools.bench", name, "--device", "cpu", "--quick",
                        "--json", str(out), *QUICK[name]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert json.loads(out.read_text())["bench"] == name


@pytest.mark.parametrize("argv", [
    ["tinyinfer.generate", "--ckpt", LLAMA, "--prompt", "ROMEO:", "--max-tokens", "2", "--device", "cpu"],
    ["tinyinfer.memory", "--ckpt", LLAMA],
    ["tinyinfer.extensions", "info"],
], ids=lambda a: a[0])
def test_command_line_quick_mode(argv):
    # quantize and serve run end to end in test_quantize_out.py and test_serve_cli.py
    r = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_bench_help_is_whole_and_every_option_explained(capsys):
    import argparse
    from tools.bench.__main__ import build_parser
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            assert action.help, f"bench {name}: {action.option_strings} has no help"
        assert any("--quick" in a.option_strings for a in sub._actions), name
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    listing = " ".join(capsys.readouterr().out.split())
    # each listed summary is the docstring's first sentence, whole (not its first line)
    assert "prefix: prefix caching and chunked prefill -- prefill time saved, decode stall bounded." in listing
