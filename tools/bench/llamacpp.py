"""llamacpp: tinyinfer against llama.cpp on the same GGUF file, on a CPU, side by side.

llama.cpp (github.com/ggml-org/llama.cpp) is what a person without a GPU runs a GGUF with, so it is
the yardstick for batch-1 decode on a CPU (docs/cpu-performance.md). This bench runs llama.cpp's own
benchmark, `llama-bench` (on PATH, or --llama-bench PATH; it skips, saying why, where there is none),
and tinyinfer in this process on the same file, in interleaved rounds (llama.cpp first in even rounds,
tinyinfer first in odd ones, so a change in the machine's load falls on both), and prints the medians:
  * decode, batch 1, at each --threads count: llama-bench's `tg` test (N tokens one at a time from an
    empty context, flash attention off) against tinyinfer's greedy decode of N tokens after a 4-token
    prompt (time(N tokens) - time(1 token)). Token ids: llama-bench draws its own; tinyinfer feeds a
    fixed text's ids. A step's cost does not depend on the ids at these context lengths.
  * prefill of --prompt-tokens tokens: llama-bench's `pp` test against tinyinfer's first token.
  * batch 16 (16 sequences decoding together): tinyinfer only; llama-bench has no such test.
  * memory: tinyinfer's RSS after load, after generation and peak, each in a fresh process (torch's
    import included) with a fixed --max-kv-tokens; llama.cpp's peak RSS (its process's maxrss).
--per-op adds tinyinfer with its fused decode step off (models/fused_cpu.py), in the same rounds.
llama-bench runs with `--repack 0`: its AMX repacking crashes on some CPUs with AMX (see the doc).
CPU figures: ratios within one run only; the load average is printed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch

from tools.bench.common import cpu_only, device_label, format_table, git_commit, summary_row
from tools.bench.hf import TEXT

GPU_CHECK_ARGS: list[list[str]] = []          # a CPU benchmark: make gpu-check skips it
DEFAULT_GGUF = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
MiB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", default=DEFAULT_GGUF,
                        help=f"GGUF file (default {DEFAULT_GGUF}; its Q4_0 form: python -m tools.gguf_files "
                             "--q4-0 .cache/models/SmolLM2-135M-Instruct.Q4_0.gguf)")
    parser.add_argument("--llama-bench", default=None, metavar="PATH",
                        help="llama.cpp's llama-bench binary (default: llama-bench on PATH)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode tokens per run")
    parser.add_argument("--prompt-tokens", type=int, default=500, help="prefill test length")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to test")
    parser.add_argument("--max-kv-tokens", type=int, default=2048, help="tinyinfer's KV pool, fixed")
    parser.add_argument("--per-op", action="store_true",
                        help="also time tinyinfer with the fused CPU decode step off (same rounds)")


def find_llama_tool(name: str, path: Optional[str]) -> tuple[Optional[str], str]:
    """llama.cpp's program `name` (llama-bench, llama-perplexity): the one given by --NAME PATH, else
    the one on PATH. -> (binary, "") or (None, why not)."""
    if path is not None:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return None, f"--{name} {path}: no executable file there"
        return path, ""
    found = shutil.which(name)
    if found is None:
        return None, (f"llama.cpp is not installed: no {name} on PATH (build its {name} target and "
                      f"pass --{name} PATH)")
    return found, ""


def find_llama_bench(path: Optional[str]) -> tuple[Optional[str], str]:
    return find_llama_tool("llama-bench", path)


# Runs argv[1:] and prints its peak RSS. A child's ru_maxrss starts from the RSS of the process it was
# forked from (Linux carries it across exec), so llama-bench is forked from this small launcher, not
# from the bench process that holds a loaded model.
_LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); "
             "_, st, ru = os.wait4(p.pid, 0); sys.stderr.write(f'\\nmaxrss_kib {ru.ru_maxrss}\\n'); "
             "sys.exit(os.waitstatus_to_exitcode(st))")


def run_llama_bench(binary: str, gguf: str, threads: int, prompt: int, gen: int) -> tuple[float, int]:
    """One llama-bench test (-p prompt -n gen, one repetition) -> (tokens/s, its peak RSS in bytes)."""
    cmd = [binary, "-m", gguf, "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", "1",
           "-fa", "0", "--repack", "0", "-o", "json"]
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    err = out.stderr.rstrip().rpartition("\n")
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {out.returncode}: {err[0].strip()[-500:]}")
    return float(json.loads(out.stdout)[0]["avg_ts"]), int(err[2].split()[-1]) * 1024


def rss_bytes() -> dict:
    """This process's RSS now and at its peak (VmHWM), from /proc (Linux)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


def memory_child(gguf: str, max_kv_tokens: int, new_tokens: int) -> dict:
    """In a fresh process: RSS after load, after a generation, and peak (printed as JSON)."""
    from tinyinfer.engine.llm import LLM
    from tinyinfer.sampling.params import SamplingParams
    torch.set_num_threads(1)
    llm = LLM(gguf, device="cpu", max_kv_tokens=max_kv_tokens)
    loaded = rss_bytes()["rss"]
    llm.generate([llm.tokenizer.encode(TEXT)[:16]],
                 SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))
    after = rss_bytes()
    return {"rss_after_load": loaded, "rss_after_generate": after["rss"], "rss_peak": after["peak"]}


def tinyinfer_memory(gguf: str, max_kv_tokens: int, new_tokens: int) -> dict:
    code = ("import json, sys; from tools.bench.llamacpp import memory_child; "
            f"print(json.dumps(memory_child({gguf!r}, {max_kv_tokens}, {new_tokens})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class Tinyinfer:
    """The engine under test, loaded once: timed decode and prefill, at a given thread count."""

    def __init__(self, gguf: str, max_kv_tokens: int):
        from tinyinfer.engine.llm import LLM
        from tinyinfer.sampling.params import SamplingParams
        # Prefix caching off: each round prefills the whole prompt again, as llama-bench does.
        self.llm = LLM(gguf, device="cpu", max_kv_tokens=max_kv_tokens, enable_prefix_caching=False)
        self.params = SamplingParams
        ids = self.llm.tokenizer.encode(TEXT)
        self.ids = (ids * (1 + 600 // len(ids)))[:600]

    def fused(self, on: bool) -> None:
        """The fused CPU decode step on or off (off: the per-op path it replaced)."""
        self.llm.engine.runner.model.fused_cpu_decode = on

    def _time(self, prompts: list[list[int]], tokens: int) -> float:
        t = time.perf_counter()
        self.llm.generate(prompts, self.params(temperature=0.0, max_tokens=tokens, ignore_eos=True))
        return time.perf_counter() - t

    def decode(self, threads: int, batch: int, n: int) -> float:
        """Decode tokens/s: time(n tokens) - time(1 token), after a warm-up."""
        torch.set_num_threads(threads)
        prompts = [self.ids[i:i + 4] for i in range(batch)]
        self._time(prompts, 2)
        return batch * (n - 1) / (self._time(prompts, n) - self._time(prompts, 1))

    def prefill(self, threads: int, length: int) -> float:
        torch.set_num_threads(threads)
        self._time([self.ids[:8]], 1)
        return length / self._time([self.ids[:length]], 1)


def _tests(args: argparse.Namespace) -> list[tuple[str, int, int, int, int]]:
    """(name, threads, batch, prompt tokens, new tokens) of each side-by-side figure."""
    tests = [(f"decode b1, {t} thread{'s' * (t > 1)}", t, 1, 0, args.new_tokens) for t in args.threads]
    tests += [(f"prefill {args.prompt_tokens}, {t} thread{'s' * (t > 1)}", t, 1, args.prompt_tokens, 0)
              for t in args.threads[:1]]
    tests += [(f"decode b16, {args.threads[0]} thread{'s' * (args.threads[0] > 1)}", args.threads[0], 16,
               0, args.new_tokens)]
    return tests


def run(args: argparse.Namespace, device: torch.device) -> dict:
    cpu_only("llamacpp", device, 1)
    binary, why = find_llama_bench(args.llama_bench)
    if binary is None:
        print(f"llamacpp: skipped -- {why}")
        return {"skipped": why, "is_cpu_figure": True}
    if not os.path.isfile(args.gguf):
        raise SystemExit(f"--gguf {args.gguf}: no such file (tests/gguf_util.py fetches SmolLM2's)")
    engine, tests = Tinyinfer(args.gguf, args.max_kv_tokens), _tests(args)
    ours: dict[str, list[float]] = {t[0]: [] for t in tests}
    per_op: dict[str, list[float]] = {t[0]: [] for t in tests}
    theirs: dict[str, list[float]] = {t[0]: [] for t in tests}
    sides = ("llama", "ours") + (("per-op",) if args.per_op else ())
    llama_peak = 0
    for r in range(args.rounds):
        for name, threads, batch, prompt, gen in tests:
            for side in (sides if r % 2 == 0 else sides[::-1]):
                if side in ("ours", "per-op"):
                    engine.fused(side == "ours")
                    (ours if side == "ours" else per_op)[name].append(
                        engine.prefill(threads, prompt) if prompt else engine.decode(threads, batch, gen))
                elif batch == 1:
                    rate, peak = run_llama_bench(binary, args.gguf, threads, prompt, gen)
                    theirs[name].append(rate)
                    llama_peak = max(llama_peak, peak)
    load = open("/proc/loadavg").read().split()[:3]
    rows = []
    for name, *_ in tests:
        mine = statistics.median(ours[name])
        other = statistics.median(theirs[name]) if theirs[name] else None
        rows.append({"figure": name, "tinyinfer_tok_s": mine, "llamacpp_tok_s": other or "n/a",
                     "ratio": mine / other if other else "n/a"})
        if args.per_op:
            rows[-1]["per_op_tok_s"] = statistics.median(per_op[name])
    mem = tinyinfer_memory(args.gguf, args.max_kv_tokens, args.new_tokens)
    rows.append({"figure": "RSS after load / after generate / peak (MiB)",
                 "tinyinfer_tok_s": f"{mem['rss_after_load'] / MiB:.0f} / "
                                    f"{mem['rss_after_generate'] / MiB:.0f} / {mem['rss_peak'] / MiB:.0f}",
                 "llamacpp_tok_s": f"peak {llama_peak / MiB:.0f}",
                 "ratio": mem["rss_after_load"] / llama_peak})
    print(f"{device_label(device)}; {args.gguf}; {args.rounds} interleaved rounds, medians; commit "
          f"{git_commit()}; loadavg {' '.join(load)}; llama.cpp: {binary}")
    print(format_table(rows, ["figure", "tinyinfer_tok_s", "llamacpp_tok_s", "ratio"]
                       + (["per_op_tok_s"] if args.per_op else [])))
    print("ratio > 1: tinyinfer faster (memory: tinyinfer's RSS over llama.cpp's); batch 16: "
          "llama-bench has no multi-sequence test")
    summary = [summary_row(f"vs llama.cpp {r['figure']}", r["ratio"], "x") for r in rows[:-1]
               if isinstance(r["ratio"], float)]
    return {"rows": rows, "loadavg": load, "memory": mem, "llamacpp_peak_rss": llama_peak,
            "is_cpu_figure": True, "summary": summary}
