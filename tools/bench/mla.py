"""mla: KV bytes per token of multi-head latent attention vs MHA, and decode speed naive vs absorbed.

Part 1 (arithmetic, no model run): KV-cache bytes per token per layer (bf16) for shakespeare-mla,
DeepSeek-V2-Lite's and DeepSeek-V3's shapes, next to what standard multi-head attention with the
same heads would store (K and V of every head).

Part 2 (measured): one decode step of an MLA checkpoint (default models/shakespeare-mla) at a 1k-token
context, batch 1 and batch 8, through the naive path (decompress K and V of every cached token for
every head, then attend) and the absorbed path (attend over the latent cache itself); tokens/s =
batch / step time. The step is the model's forward for one new token per sequence plus the logits,
without the engine's scheduling around it.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from tinyinfer.engine.batch import build_batch
from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.engine.kv_cache import PagedKVCache
from tinyinfer.engine.llm import LLM
from tinyinfer.engine.sequence import Sequence
from tinyinfer.layers.mla import set_mla_mode
from tinyinfer.memory import Shape, kv_bytes_per_token, kv_values_per_token_layer, shape_from_hf
from tinyinfer.models.transformer import Transformer
from tinyinfer.sampling.params import SamplingParams
from tools.bench.common import device_label, format_table, is_gpu, summary_row, time_calls

GPU_CHECK_ARGS = [[]]
DEFAULT_CKPT = os.path.join(os.path.dirname(__file__), "..", "..", "models", "shakespeare-mla")
# Published shapes (Hugging Face config.json of deepseek-ai/DeepSeek-V2-Lite and DeepSeek-V3)
KNOWN_SHAPES = {
    "DeepSeek-V2-Lite": Shape(num_layers=27, hidden_size=2048, num_heads=16, head_dim=128 + 64,
                              v_head_dim=128, kv_lora_rank=512, qk_rope_head_dim=64),
    "DeepSeek-V3": Shape(num_layers=61, hidden_size=7168, num_heads=128, head_dim=128 + 64,
                         v_head_dim=128, kv_lora_rank=512, qk_rope_head_dim=64, q_lora_rank=1536),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=DEFAULT_CKPT, help="MLA checkpoint for the decode timing "
                        "(default: models/shakespeare-mla)")
    parser.add_argument("--context", type=int, default=None,
                        help="cached tokens per sequence (default: the model's context less one, the "
                             "position of the decoded token)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--dtype", default=None, help="model dtype (default: float32 on a CPU, bf16 on a GPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads (0 = torch's default), one as generate uses")


def cache_table(ckpt: str) -> list[dict]:
    shapes = {}
    with open(os.path.join(ckpt, "config.json")) as f:
        shapes[os.path.basename(os.path.normpath(ckpt))] = shape_from_hf(json.load(f))
    shapes.update(KNOWN_SHAPES)
    rows = []
    for name, s in shapes.items():
        mla, mha = kv_bytes_per_token(s, "mla", 2), kv_bytes_per_token(s, "mha", 2)
        rows.append({"model": name, "layers": s.num_layers, "heads": s.num_heads,
                     "mla values/tok/layer": kv_values_per_token_layer(s, "mla"),
                     "mla bytes/tok/layer": mla // s.num_layers, "mha bytes/tok/layer": mha // s.num_layers,
                     "mha / mla": round(mha / mla, 2), "mla bytes/tok": mla, "mha bytes/tok": mha})
    return rows


def decode_step_timer(llm, batch: int, context: int):
    """Prefill `batch` sequences of `context` tokens into a fresh cache, then return fn() running one
    decode step (one new token per sequence at position `context`) and the cache it uses."""
    cfg, dev, bs = llm.config, llm.device, 16
    k_dims, v_dims = Transformer.kv_dims(cfg)
    blocks = BlockManager(batch * -(-(context + 1) // bs), bs)
    kv = PagedKVCache(cfg.num_layers, blocks.num_blocks, bs, k_dims, v_dims, llm.dtype, dev)
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for b in range(batch):
        ids = torch.randint(3, cfg.vocab_size, (context + 1,), generator=gen).tolist()
        seqs.append(Sequence(str(b), ids, SamplingParams(), 0))
        blocks.grow(seqs[-1], context + 1)

    def forward(num_new: int) -> torch.Tensor:
        ids, pos, meta = build_batch(seqs, [num_new] * batch, bs).to_device(dev)
        return llm.model.compute_logits(llm.model(ids, pos, meta, kv.layers()))

    with torch.inference_mode():
        forward(context)
    for s in seqs:
        s.num_cached = context
    step_batch = build_batch(seqs, [1] * batch, bs)

    @torch.inference_mode()
    def step(_: int) -> torch.Tensor:
        ids, pos, meta = step_batch.to_device(dev)
        return llm.model.compute_logits(llm.model(ids, pos, meta, kv.layers()))

    return step


def run(args: argparse.Namespace, device: torch.device) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = cache_table(args.ckpt)
    print("KV cache per token (bf16): multi-head latent attention vs MHA with the same heads")
    print(format_table(rows, ["model", "layers", "heads", "mla values/tok/layer", "mla bytes/tok/layer",
                              "mha bytes/tok/layer", "mha / mla"]))
    dtype = args.dtype or ("bfloat16" if is_gpu(device) else "float32")
    llm = LLM(args.ckpt, device=str(device), dtype=dtype, max_kv_tokens=64)
    if not llm.config.is_mla:
        raise SystemExit(f"--ckpt {args.ckpt} is not an MLA checkpoint (no kv_lora_rank in its config)")
    context = llm.config.max_context - 1 if args.context is None else args.context
    if not 0 < context < llm.config.max_context:
        raise SystemExit(f"--context {context}: give 1 .. {llm.config.max_context - 1} (the decoded token "
                         f"sits at position --context, inside the model's {llm.config.max_context})")
    args.context = context
    timing_rows, summary = [], []
    for batch in args.batch:
        step = decode_step_timer(llm, batch, args.context)
        per_mode = {}
        for mode in ("naive", "absorbed"):
            set_mla_mode(llm.model, mode)
            t = time_calls(step, device, runs=5, warmup=1, target_run_s=0.2)
            per_mode[mode] = batch / t.median_s
        set_mla_mode(llm.model, "auto")
        timing_rows.append({"batch": batch, "context": args.context,
                            "naive tok/s": per_mode["naive"], "absorbed tok/s": per_mode["absorbed"],
                            "absorbed / naive": per_mode["absorbed"] / per_mode["naive"]})
        summary.append(summary_row(f"mla decode b{batch} ctx{args.context} absorbed",
                                   per_mode["absorbed"], "tok/s",
                                   vs_naive=per_mode["absorbed"] / per_mode["naive"]))
    print(f"\nDecode step of {os.path.basename(os.path.normpath(args.ckpt))}, {dtype}, on "
          f"{device_label(device)}")
    print(format_table(timing_rows, ["batch", "context", "naive tok/s", "absorbed tok/s",
                                     "absorbed / naive"]))
    for r in rows[:2]:
        summary.append(summary_row(f"kv bytes/token/layer {r['model']}", r["mla bytes/tok/layer"], "B",
                                   mha=r["mha bytes/tok/layer"]))
    return {"cache": rows, "decode": timing_rows, "summary": summary}
