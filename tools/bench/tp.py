"""tp: tensor parallelism -- bytes all-reduced per decode step and per token, and decode tokens/s for
N ranks against N = 1, in the same run (docs/tensor-parallel.md).

For each N of --sizes: the checkpoint (default: the demo model) loaded with tensor_parallel_size=N,
--batch prompts prefilled, then --new-tokens greedy tokens decoded; decode tokens/s counts the decode
steps only. Rank 0's ParallelGroup counts the bytes it all-reduces and all-gathers (eager steps: a
replayed CUDA graph does not pass through Python, so on a GPU only the formula is printed):

    all-reduced per token   (2 x num_layers + 1) x hidden x dtype bytes
                            (attention and MLP of every layer, and the vocabulary-parallel embedding)
    all-gathered per token  (N - 1) / N x vocab x dtype bytes received (the other ranks' logits)

CPU: every rank runs --threads-per-rank torch threads (default 1), as each GPU of a real run is a
device of its own: N ranks use N times the cores of N = 1. A CPU figure is only a ratio within this run.
On a small model the ranks' messages (gloo over loopback TCP, 2 x num_layers + 2 collectives per step,
each a wake-up of the other process) cost more than the halved matmuls save, so N = 2 is expected to be
slower there: the figure measures that overhead (ms_per_step). CUDA: N ranks need N GPUs; a size beyond
the visible GPUs is skipped with the reason (multi-GPU figures need a machine with several GPUs).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tinyinfer.engine.llm import LLM
from tinyinfer.sampling.params import SamplingParams
from tools.bench.common import device_label, format_table, is_gpu, summary_row

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ["N", "backend", "threads_per_rank", "ms_per_step", "decode_tok_s", "vs_N1", "reduced_B_per_step",
           "reduced_B_per_token", "formula_B_per_token", "gathered_B_per_token"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=str(ROOT / "models" / "shakespeare-llama"), help="checkpoint")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="tensor_parallel_size values")
    parser.add_argument("--batch", type=int, default=4, help="sequences decoded together")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per sequence")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="CPU: torch threads of each rank")


def _decode(llm: LLM, prompts: list[str], new_tokens: int) -> dict:
    """Prefill every prompt in one step, then time the decode steps; the bytes rank 0 moved."""
    engine, group = llm.engine, getattr(llm.engine.runner, "group", None)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    engine.step()                                            # prefill: the first token of each
    before = (group.reduced_bytes, group.gathered_bytes) if group is not None else (0, 0)
    steps = tokens = 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(d.new_token_ids) for d in engine.step())
        steps += 1
    seconds = time.perf_counter() - t0
    moved = ((group.reduced_bytes - before[0], group.gathered_bytes - before[1]) if group is not None
             else (0, 0))
    return {"seconds": seconds, "steps": steps, "tokens": tokens, "reduced": moved[0], "gathered": moved[1]}


def run(args: argparse.Namespace, device: torch.device) -> dict:
    threads = torch.get_num_threads()
    prompts = [f"{name}:" for name in ("ROMEO", "JULIET", "MERCUTIO", "NURSE", "TYBALT", "FRIAR")]
    prompts = (prompts * (args.batch // len(prompts) + 1))[:args.batch]
    rows, base = [], None
    for n in args.sizes:
        if is_gpu(device) and n > torch.cuda.device_count():
            print(f"N={n}: skipped, it needs {n} GPUs and torch sees {torch.cuda.device_count()} "
                  "(multi-GPU figures need a machine with several GPUs)")
            continue
        per_rank = args.threads_per_rank
        torch.set_num_threads(per_rank)                      # workers start with this count too
        with LLM(args.ckpt, device=str(device), tensor_parallel_size=n, max_kv_tokens=4096) as llm:
            _decode(llm, prompts[:1], 4)                     # warm-up
            m = _decode(llm, prompts, args.new_tokens)
            cfg, itemsize = llm.config, llm.dtype.itemsize
        tok_s = m["tokens"] / m["seconds"]
        base = tok_s if n == 1 else base
        eager = not is_gpu(device)
        rows.append({"N": n, "backend": "-" if n == 1 else ("nccl" if is_gpu(device) else "gloo"),
                     "threads_per_rank": per_rank if not is_gpu(device) else None,
                     "ms_per_step": 1e3 * m["seconds"] / m["steps"], "decode_tok_s": tok_s, "vs_N1": tok_s / base if base else None,
                     "reduced_B_per_step": m["reduced"] / m["steps"] if eager and n > 1 else None,
                     "reduced_B_per_token": m["reduced"] / m["tokens"] if eager and n > 1 else None,
                     "formula_B_per_token": (2 * cfg.num_layers + 1) * cfg.hidden_size * itemsize
                     if n > 1 else 0,
                     "gathered_B_per_token": m["gathered"] / m["tokens"] if eager and n > 1 else None})
    torch.set_num_threads(threads)
    print(f"tensor parallelism on {device_label(device)}: {Path(args.ckpt).name}, batch {args.batch}, "
          f"{args.new_tokens} greedy tokens each; decode steps only")
    print(format_table(rows, COLUMNS))
    summary = [summary_row(f"tp N={r['N']} decode", r["decode_tok_s"], "tok/s", vs_N1=r["vs_N1"])
               for r in rows]
    return {"rows": rows, "summary": summary}
