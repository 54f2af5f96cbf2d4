"""load: how long a checkpoint takes to load -- tinyinfer's LLM() against transformers'
from_pretrained on the same file (a GGUF file: `gguf_file=`), each in a fresh process, interleaved.

A load is timed inside its process, after the imports (torch, transformers: the same for any model):
the checkpoint read, any conversion (GGUF's Q4 blocks to tinyinfer's INT4 layout; transformers
dequantizes a GGUF to float32), validation, and for tinyinfer the KV pool's allocation. The warm-up
(first call of each layer, which generate runs before its clock) is timed apart for tinyinfer. Medians
of --repeats runs; CPU figures are ratios within this run only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from tools.bench.common import device_label, format_table, summary_row

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GPU_CHECK_ARGS: list[list[str]] = []      # a CPU comparison: gpu-check does not run it

_TINYINFER = """
import json, sys, time, torch
torch.set_num_threads({threads})
from tinyinfer import LLM, SamplingParams
t = time.perf_counter(); llm = LLM({ckpt!r}, device="cpu"); load = time.perf_counter() - t
t = time.perf_counter(); llm.generate(["Hello there"], SamplingParams(max_tokens=2)); warm = time.perf_counter() - t
print(json.dumps({{"load_s": load, "warmup_s": warm}}))
"""
_HF = """
import json, os, sys, time, torch
torch.set_num_threads({threads})
from transformers import AutoModelForCausalLM
path = {ckpt!r}
kw = dict(gguf_file=os.path.basename(path)) if path.endswith(".gguf") else {{}}
t = time.perf_counter()
AutoModelForCausalLM.from_pretrained(os.path.dirname(path) if kw else path, **kw)
print(json.dumps({{"load_s": time.perf_counter() - t}}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=os.path.join(ROOT, ".cache", "models",
                                                       "SmolLM2-135M-Instruct.Q4_1.gguf"),
                        help="checkpoint (make test fetches SmolLM2's GGUF into .cache/models/)")
    parser.add_argument("--repeats", type=int, default=3, help="loads of each; medians are reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of both (0 = torch's default), one as generate uses")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                        help="also time transformers (needs the test extra)")


def _one(script: str, ckpt: str, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", script.format(ckpt=os.path.abspath(ckpt), threads=threads)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"the load failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, device: torch.device) -> dict:
    if device.type != "cpu":
        raise SystemExit("bench load compares CPU loads; run it with --device cpu")
    if not os.path.exists(args.ckpt):
        raise SystemExit(f"--ckpt {args.ckpt} does not exist (make test fetches SmolLM2's GGUF)")
    runs: dict[str, list[dict]] = {"tinyinfer": [], "transformers": []}
    for _ in range(max(1, args.repeats)):                 # interleaved: the load average hits both
        runs["tinyinfer"].append(_one(_TINYINFER, args.ckpt, args.threads))
        if args.hf:
            runs["transformers"].append(_one(_HF, args.ckpt, args.threads))
    med = {k: statistics.median(r["load_s"] for r in v) for k, v in runs.items() if v}
    warm = statistics.median(r["warmup_s"] for r in runs["tinyinfer"])
    rows = [{"engine": k, "load_s": v, "runs": [round(r["load_s"], 2) for r in runs[k]]} for k, v in med.items()]
    rows[0]["warmup_s"] = warm
    load = os.getloadavg()[0]
    print(f"{device_label(device)}; load average {load:.2f}; {os.path.basename(args.ckpt)}, "
          f"{args.threads} torch thread(s), median of {args.repeats}")
    print(format_table(rows, ["engine", "load_s", "warmup_s", "runs"]))
    summary = [summary_row("tinyinfer load", med["tinyinfer"], "s", warmup_s=warm)]
    if "transformers" in med:
        ratio = med["transformers"] / med["tinyinfer"]
        print(f"transformers / tinyinfer load time: {ratio:.2f}x")
        summary.append(summary_row("transformers load", med["transformers"], "s", vs_tinyinfer=ratio))
    return {"ckpt": args.ckpt, "loadavg": load, "rows": rows, "summary": summary}
