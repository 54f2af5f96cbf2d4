"""prefix: prefix caching and chunked prefill -- prefill time saved, decode stall bounded.

1. Shared system prompt: a --system-tokens (768; several values: one run each, the prefill time
   against the shared-prefix length) system prompt + --questions (32) different --question-tokens
   (~50) questions, sent at once, one output token each: the total prefill time (wall time of the
   whole batch) with prefix caching vs without, each run on a fresh cache, median of --repeats, and
   the tokens that went through the model.
2. A long prompt admitted while --decoders (16) sequences decode: once they decode, a --long-tokens
   (900) prompt arrives; the longest engine step from its arrival to its first token is how long the
   decodes stall. With chunked prefill (max_num_batched_tokens = each of --budgets) vs without
   (the whole prompt in one step), with the long prompt's time to first token: the trade-off.
3. The attention of a prefill over a cached prefix (many queries over paged K/V), alternatives on the
   same data: gather + SDPA per sequence (ops.paged_prefill_attention, what the engine runs), the
   paged_attention reference (per-sequence gather, explicit scores) and the CPU attention's padding
   (ops/cpu_attention.py) as one group: every sequence padded to the longest query run and context.

Default model: the demo checkpoint (context 1024); --ckpt takes any other (e.g. a 4k-context one with
--long-tokens 4000). Text comes from data/tinyshakespeare-val-slice.txt, repeated as needed.
A CPU figure is a ratio within one run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

from tinyinfer import ops
from tinyinfer.engine.llm import LLM
from tinyinfer.engine.llm_engine import LLMEngine
from tinyinfer.ops import reference
from tinyinfer.ops.cpu_attention import attend_group, pad_group
from tinyinfer.sampling.params import SamplingParams
from tools.bench.common import device_label, format_table, is_gpu, summary_row, time_calls

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "data" / "tinyshakespeare-val-slice.txt"
ADMISSION_COLUMNS = ["prefill", "budget", "max_step_ms", "decode_step_ms", "stall/whole",
                     "long_ttft_ms", "steps"]
OP_COLUMNS = ["case", "gather+sdpa_ms", "reference_ms", "padded_batch_ms", "reference/gather",
              "padded/gather"]


def paged_attention_batched(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                            seq_lens: Tensor, query_start_loc: Tensor, scale: float) -> Tensor:
    """ops.paged_attention on a CPU with the whole batch as one padded group, whatever its lengths (what
    the length groups of ops/cpu_attention.py avoid; timed against them here)."""
    T, Hq, _ = q.shape
    out = q.new_zeros(T, Hq, v_cache.shape[-1])
    lens, starts = seq_lens.tolist(), query_start_loc.tolist()
    g = pad_group(block_tables, seq_lens, query_start_loc, lens, starts, k_cache.shape[1])
    if g is None:
        return out
    o = attend_group(g, q, k_cache, v_cache, scale).to(q.dtype)
    if g.decode:
        out[:g.B] = o
    else:
        out[g.q_index[0]] = o
    return out

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=str(ROOT / "models" / "shakespeare-llama"), help="checkpoint")
    parser.add_argument("--system-tokens", type=int, nargs="+", default=[768],
                        help="tokens of the system prompt every question shares (the cached prefix); several "
                             "values give one run each, the longest is the headline")
    parser.add_argument("--questions", type=int, default=32, help="requests sharing that prefix")
    parser.add_argument("--question-tokens", type=int, default=50, help="tokens of each question after it")
    parser.add_argument("--decoders", type=int, default=16,
                        help="requests decoding while the long prompt prefills (the stall case)")
    parser.add_argument("--long-tokens", type=int, default=900,
                        help="tokens of the long prompt that arrives among the decoders")
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512],
                        help="max_num_batched_tokens values of the chunked runs")
    parser.add_argument("--headline-budget", type=int, default=128,
                        help="the budget of the summary's stall ratio")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case; the median is kept")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads (0 = torch's default; 1 is steadiest on a busy box)")


def token_source(llm: LLM):
    ids = llm.tokenizer.encode(TEXT.read_text())

    def tokens(n: int, offset: int) -> list[int]:
        return [ids[(offset + i) % len(ids)] for i in range(n)]
    return tokens


def engine(llm: LLM, **options) -> LLMEngine:
    """A fresh engine (empty prefix cache) around the loaded model runner."""
    return LLMEngine.from_runner(llm.engine.runner, llm.tokenizer, **options)


# ------------------------------------------------------------------------------ 1: shared system prompt

def prefill_run(llm: LLM, prompts: list[list[int]], caching: bool) -> tuple[float, int]:
    """(seconds, tokens computed) of prefilling `prompts` (one output token each) on a fresh cache."""
    e = engine(llm, enable_prefix_caching=caching)
    t0 = time.perf_counter()
    LLM.from_engine(e).generate(prompts, SamplingParams(temperature=0.0, max_tokens=1))
    seconds = time.perf_counter() - t0                  # host-synchronous: sampling read the logits
    return seconds, sum(map(len, prompts)) - e.stats["prefix_cache_hits"]


def shared_system_prompt(llm: LLM, tokens, args, system_tokens: int) -> dict:
    system = tokens(system_tokens, 0)
    prompts = [system + tokens(args.question_tokens + i % 7 - 3, system_tokens + 64 * i)
               for i in range(args.questions)]
    prefill_run(llm, prompts[:4], True)                 # warm-up
    res = {}
    for caching in (False, True):
        runs = [prefill_run(llm, prompts, caching) for _ in range(args.repeats)]
        res[caching] = (statistics.median(r[0] for r in runs), runs[0][1])
    ratio = res[True][0] / res[False][0]
    print(f"shared system prompt: {args.questions} x ({system_tokens} + ~{args.question_tokens})"
          f" tokens, median of {args.repeats}")
    for caching in (False, True):
        print(f"  prefix caching {'on ' if caching else 'off'}: {res[caching][0] * 1e3:9.1f} ms, "
              f"{res[caching][1]} tokens computed")
    print(f"  cached / uncached prefill time: {ratio:.3f}  (target <= 0.3)")
    return {"system_tokens": system_tokens, "uncached_ms": res[False][0] * 1e3, "cached_ms": res[True][0] * 1e3,
            "uncached_tokens": res[False][1], "cached_tokens": res[True][1], "ratio": ratio}


# ------------------------------------------------------------------------------ 2: long prompt admitted

def admission(llm: LLM, tokens, args, budget: int | None) -> dict:
    """Steps from the long prompt's arrival to its first token, while args.decoders sequences decode
    (budget None: chunked prefill off, the whole prompt in one step)."""
    opts = (dict(enable_chunked_prefill=False) if budget is None else
            dict(max_num_batched_tokens=budget, max_num_seqs=min(budget, 256)))
    e = engine(llm, enable_prefix_caching=False, **opts)
    params = SamplingParams(temperature=0.0, max_tokens=llm.config.max_context - 64, ignore_eos=True)
    for i in range(args.decoders):
        e.add_request(tokens(16 + i % 5, 5000 + 97 * i), params, request_id=f"d{i}")
    while len(e.scheduler.running) < args.decoders or any(
            len(s) - s.num_cached > 1 for s in e.scheduler.running):
        e.step()                                        # until every decoder is decoding
    decode = []
    for _ in range(8):
        t0 = time.perf_counter()
        e.step()
        decode.append(time.perf_counter() - t0)
    e.add_request(tokens(args.long_tokens, 9000), SamplingParams(max_tokens=1), request_id="long")
    steps, t_arrival = [], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        got = {d.request_id for d in e.step()}
        steps.append(time.perf_counter() - t0)
        if "long" in got:
            break
    ttft = time.perf_counter() - t_arrival
    for i in range(args.decoders):
        e.abort(f"d{i}")
    while e.has_unfinished():
        e.step()
    return {"prefill": "whole" if budget is None else "chunked", "budget": budget,
            "max_step_ms": max(steps) * 1e3, "decode_step_ms": statistics.median(decode) * 1e3,
            "long_ttft_ms": ttft * 1e3, "steps": len(steps)}


def long_prompt_admission(llm: LLM, tokens, args) -> list[dict]:
    admission(llm, tokens, args, args.budgets[0])      # warm-up
    print(f"\na {args.long_tokens}-token prompt admitted while {args.decoders} sequences decode "
          f"(median of {args.repeats} runs each)")
    rows = []
    for budget in [None] + args.budgets:
        runs = [admission(llm, tokens, args, budget) for _ in range(args.repeats)]
        row = {k: (statistics.median(r[k] for r in runs) if isinstance(v, float) else v)
               for k, v in runs[0].items()}
        row["stall/whole"] = row["max_step_ms"] / rows[0]["max_step_ms"] if rows else 1.0
        rows.append(row)
    print(format_table(rows, ADMISSION_COLUMNS))
    return rows


# ------------------------------------------------------------------------------ 3: the attention op

def op_case(name: str, lens: list[int], q_lens: list[int], hq: int, hkv: int, d: int,
            dtype: torch.dtype, device: torch.device, bs: int = 16) -> dict:
    gen = torch.Generator(device).manual_seed(len(lens))
    nb = sum(-(-n // bs) for n in lens)
    k_cache = torch.randn(nb, bs, hkv, d, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(nb, bs, hkv, d, generator=gen, device=device).to(dtype)
    perm, tables = torch.randperm(nb, generator=gen, device=device).tolist(), []
    for n in lens:
        tables.append([perm.pop() for _ in range(-(-n // bs))])
    width = max(map(len, tables))
    bt = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], hq, d, generator=gen, device=device).to(dtype)
    sl, qs, scale = torch.tensor(lens, dtype=torch.int32, device=device), \
        torch.tensor(qsl, dtype=torch.int32, device=device), d ** -0.5
    impls = {"gather+sdpa_ms": lambda _: ops.paged_prefill_attention(q, k_cache, v_cache, bt, lens,
                                                                      qsl, scale),
             "reference_ms": lambda _: reference.paged_attention(q, k_cache, v_cache, bt, sl, qs, scale),
             "padded_batch_ms": lambda _: paged_attention_batched(q, k_cache, v_cache, bt, sl, qs, scale)}
    row = {"case": name}
    for key, fn in impls.items():
        row[key] = time_calls(fn, device, runs=5, warmup=1, target_run_s=0.05).median_s * 1e3
    row["reference/gather"] = row["reference_ms"] / row["gather+sdpa_ms"]
    row["padded/gather"] = row["padded_batch_ms"] / row["gather+sdpa_ms"]
    return row


def attention_alternatives(llm: LLM, args, device: torch.device) -> list[dict]:
    cfg, dtype = llm.config, llm.dtype
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    ctx = max(args.system_tokens) + args.question_tokens
    cases = [(f"{args.questions} x {args.question_tokens} q over {ctx}", [ctx] * args.questions,
              [args.question_tokens] * args.questions, hq, hkv, d, dtype),
             (f"chunks 16..{args.headline_budget} q over 64..{args.long_tokens}",
              [64 + (args.long_tokens - 64) * i // 7 for i in range(8)],
              [16 + (args.headline_budget - 16) * i // 7 for i in range(8)], hq, hkv, d, dtype)]
    if is_gpu(device):       # a 7B-shaped layer: GQA 32/8, head dim 128, bf16
        cases.append(("7B-shape 8 x 512 q over 4096", [4096] * 8, [512] * 8, 32, 8, 128,
                      torch.bfloat16))
    print(f"\nattention over a cached prefix ({dtype}):")
    rows = [op_case(*c, device=device) for c in cases]
    print(format_table(rows, OP_COLUMNS))
    return rows


def run(args: argparse.Namespace, device: torch.device) -> dict:
    if args.threads > 0 and not is_gpu(device):
        torch.set_num_threads(args.threads)
    print(device_label(device))
    llm = LLM(args.ckpt, device=str(device), max_kv_tokens=(args.questions + 2) * 1024 + 8192)
    tokens = token_source(llm)
    sweep = [shared_system_prompt(llm, tokens, args, n) for n in sorted(set(args.system_tokens))]
    shared = sweep[-1]
    rows = long_prompt_admission(llm, tokens, args)
    head = next(r for r in rows if r["budget"] == args.headline_budget)
    print(f"longest step while admitting, chunked (budget {args.headline_budget}) / whole: "
          f"{head['stall/whole']:.3f}  (target <= 0.3)")
    ops_rows = attention_alternatives(llm, args, device)
    summary = [summary_row("prefix: shared system prompt prefill, cached / uncached", shared["ratio"],
                           "x", cached_ms=round(shared["cached_ms"], 2),
                           uncached_ms=round(shared["uncached_ms"], 2)),
               summary_row(f"prefix: longest step admitting {args.long_tokens} tokens, chunked "
                           f"({args.headline_budget}) / whole", head["stall/whole"], "x",
                           chunked_ms=round(head["max_step_ms"], 2),
                           whole_ms=round(rows[0]["max_step_ms"], 2))]
    return {"ckpt": args.ckpt, "shared_system_prompt": shared, "shared_prefix_sweep": sweep, "admission": rows,
            "attention": ops_rows, "summary": summary}


def figure(results: dict):
    """Prefill time of the shared-system-prompt batch with and without the prefix cache against the
    shared prefix's length; the longest step and the long prompt's TTFT against the chunk budget."""
    from tools.bench.plot import Figure, Panel, Series
    sweep = results.get("shared_prefix_sweep") or [results["shared_system_prompt"]]
    x = [r["system_tokens"] for r in sweep]
    cache = Panel("shared prefix (tokens)", "prefill time of the batch (ms)", [
        Series("no prefix cache", x, [r["uncached_ms"] for r in sweep]),
        Series("prefix cache", x, [r["cached_ms"] for r in sweep])], title="shared system prompt")
    rows = results["admission"]
    names = ["whole prompt" if r["budget"] is None else f"chunks of {r['budget']}" for r in rows]
    chunked = Panel("prefill", "time (ms)", [
        Series("longest step (decodes stall)", names, [r["max_step_ms"] for r in rows]),
        Series("long prompt's TTFT", names, [r["long_ttft_ms"] for r in rows])],
        bars=True, title="a long prompt admitted while others decode")
    return Figure("bench prefix: prefix caching and chunked prefill", [cache, chunked])
