"""serve: the OpenAI server under Poisson load, against offline LLM.generate on the same requests.

Requests: prompts cut from the Shakespeare text in data/ (lengths uniform in input-len x [1 - r, 1 + r]),
fixed output lengths (output-len x [1 - r, 1 + r], ignore_eos), greedy. The bench starts
`python -m tinyinfer.serve` on a free loopback port (or measures --url), sends the requests at each
arrival rate and then all at once (saturation) with tools/loadgen.py (vLLM's serving-benchmark method),
and reports requests/s, output tokens/s, TTFT and TPOT p50/p99. Then, with the server stopped, the same
requests go through `LLM.generate` in this process: the ratio server / offline output tokens/s at
saturation is what HTTP, streaming and the engine thread cost. Needs the serve extra.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from tinyinfer.engine.llm import LLM
from tinyinfer.loading.tokenizer import Tokenizer
from tinyinfer.sampling.params import SamplingParams
from tools.bench.common import device_label, format_table, is_gpu, summary_row
from tools.loadgen import run_load, summarize

GPU_CHECK_ARGS: list[list[str]] = []        # needs the serve extra, which gpu-check does not install
REPO = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=str(REPO / "models" / "shakespeare-llama"), help="checkpoint")
    parser.add_argument("--url", default=None,
                        help="measure this running server (http://host:port/v1) instead of starting one")
    parser.add_argument("--num-requests", type=int, default=64, help="requests per arrival rate")
    parser.add_argument("--rates", default="4,16",
                        help="arrival rates in requests/s, comma-separated; a saturation run (all at "
                             "once) always follows")
    parser.add_argument("--input-len", type=int, default=64, help="mean prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="mean output tokens")
    parser.add_argument("--range-ratio", type=float, default=0.5,
                        help="lengths uniform in mean x [1 - r, 1 + r]")
    parser.add_argument("--dataset", default=str(REPO / "data" / "tinyshakespeare-val-slice.txt"),
                        help="text the prompts are cut from")
    parser.add_argument("--max-kv-tokens", type=int, default=32768, help="the KV pool of both engines")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads of the server and of the offline engine (0: default)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="saturation runs, each followed by an offline run (median ratio reported)")
    parser.add_argument("--seed", type=int, default=0, help="lengths, windows and arrival times")


def make_requests(args: argparse.Namespace) -> list[tuple[list[int], int]]:
    tok = Tokenizer.from_dir(args.ckpt)
    text_ids = tok.encode(Path(args.dataset).read_text(encoding="utf-8"), add_bos=False)
    rng = random.Random(args.seed)

    def length(mean: int) -> int:
        return max(1, round(mean * rng.uniform(1 - args.range_ratio, 1 + args.range_ratio)))

    out = []
    for _ in range(args.num_requests):
        n_in = min(length(args.input_len), len(text_ids) - 1)
        start = rng.randrange(0, len(text_ids) - n_in)
        bos = [tok.bos_id] if tok.add_bos else []
        out.append((bos + text_ids[start:start + n_in], length(args.output_len)))
    return out


def start_server(args: argparse.Namespace, device: torch.device) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "tinyinfer.serve", "--ckpt", args.ckpt, "--port", "0", "--device",
           str(device), "--max-kv-tokens", str(args.max_kv_tokens), "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    timer = threading.Timer(300, proc.kill)
    timer.start()
    try:
        for line in proc.stderr:
            if (m := re.search(r"at (http://\S+/v1)", line)):
                threading.Thread(target=proc.stderr.read, daemon=True).start()   # keep draining
                return proc, m.group(1)
        raise SystemExit(f"the server did not start (exit {proc.wait()}): {' '.join(cmd)}")
    finally:
        timer.cancel()


def offline_run(llm: LLM, requests: list) -> dict:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in requests], params)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"rate": "offline", "completed": len(outs), "duration_s": round(dt, 3), "output_tokens": tokens,
            "requests_per_s": round(len(requests) / dt, 3), "output_tokens_per_s": round(tokens / dt, 2)}


def run(args: argparse.Namespace, device: torch.device) -> dict:
    if args.threads > 0 and not is_gpu(device):
        torch.set_num_threads(args.threads)
    requests = make_requests(args)
    llm = LLM(args.ckpt, device=str(device), max_kv_tokens=args.max_kv_tokens)
    offline_run(llm, requests[:4])                                            # warm-up
    proc, url = (None, args.url) if args.url else start_server(args, device)
    runs, pairs = [], []
    try:
        run_load(url, requests[:4], math.inf, args.seed)                         # warm-up
        for rate in [float(r) for r in args.rates.split(",") if r.strip()]:
            runs.append({"rate": rate, **summarize(*run_load(url, requests, rate, args.seed))})
            print(f"rate {rate}/s: {runs[-1]}", flush=True)
        # Saturation, alternating with the offline engine (idle server), so each pair of runs
        # shares the machine's conditions; the pair with the median ratio is reported.
        for _ in range(args.repeats):
            sat = {"rate": "inf", **summarize(*run_load(url, requests, math.inf, args.seed))}
            off = offline_run(llm, requests)
            pairs.append((sat["output_tokens_per_s"] / off["output_tokens_per_s"], sat, off))
            print(f"saturation {sat}\noffline {off}", flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    ratio, sat, off = sorted(pairs, key=lambda p: p[0])[len(pairs) // 2]
    cols = ["rate", "completed", "requests_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
            "tpot_p50_ms", "tpot_p99_ms"]
    print(f"\nserve bench on {device_label(device)}: {len(requests)} requests, prompts ~{args.input_len}, "
          f"outputs ~{args.output_len} tokens")
    print(format_table(runs + [sat, off], cols))
    print(f"server / offline output tokens/s at saturation: {ratio:.3f} (median of "
          f"{[round(p[0], 3) for p in pairs]}; target >= 0.8)")
    return {"runs": runs + [sat], "offline": off, "saturation_vs_offline": round(ratio, 4),
            "saturation_ratios": [round(p[0], 4) for p in pairs],
            "summary": [summary_row("serve tokens/s at saturation", sat["output_tokens_per_s"], "tok/s",
                                    vs_offline=round(ratio, 3)),
                        *[summary_row(f"serve TTFT p50 at {r['rate']}/s", r["ttft_p50_ms"], "ms",
                                      tpot_p50_ms=r["tpot_p50_ms"]) for r in runs]]}


def figure(results: dict):
    """TTFT and TPOT p50 / p99 against the arrival rate; output tokens/s at each rate, at saturation and
    offline (LLM.generate on the same requests)."""
    from tools.bench.plot import Figure, Panel, Series
    paced = [r for r in results["runs"] if r["rate"] not in ("inf", "offline")]
    rates = [float(r["rate"]) for r in paced]
    latency = [Panel("arrival rate (requests/s)", f"{what} (ms)", [
        Series(f"{what} p50", rates, [r[f"{key}_p50_ms"] for r in paced]),
        Series(f"{what} p99", rates, [r[f"{key}_p99_ms"] for r in paced], dashed=True)], title=title)
        for what, key, title in (("TTFT", "ttft", "time to first token"),
                                 ("TPOT", "tpot", "time per output token"))]
    runs = results["runs"] + [results["offline"]]
    names = [f"{float(r['rate']):g}/s" if r["rate"] not in ("inf", "offline") else
             {"inf": "all at once", "offline": "offline"}[r["rate"]] for r in runs]
    throughput = Panel("arrival rate", "output tokens/s", [
        Series("server", names[:-1], [r["output_tokens_per_s"] for r in runs[:-1]]),
        Series("offline LLM.generate", names[-1:], [runs[-1]["output_tokens_per_s"]])], bars=True,
        title=f"throughput (saturation / offline {results['saturation_vs_offline']:.2f})")
    return Figure("bench serve: the OpenAI server under Poisson load", latency + [throughput])
