"""`python -m tinyinfer.memory`: the memory arithmetic of tinyinfer/memory/ as a command.

    python -m tinyinfer.memory --ckpt models/shakespeare-mla --context 4096 --batch 8
    python -m tinyinfer.memory --layers 32 --d-model 4096 --heads 32 --context 1000000
    python -m tinyinfer.memory --params 70B
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from tinyinfer.config.help import HelpFormatter

from tinyinfer.memory import (GB, Shape, checkpoint_params, count_params, int4_bytes, kv_bytes_per_token,
                              kv_values_per_token_layer, own_kind, parse_count, planned_int4,
                              read_config, shape_from_hf, weight_bytes)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def _gb(n: float) -> str:
    return f"{n / GB:,.2f} GB" if n >= GB else f"{n / 1e6:,.2f} MB" if n >= 1e6 else f"{n / 1e3:,.2f} kB"


def _count(n: float) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.2f} M"


def report(s: Optional[Shape], num_params: float, context: int, batch: int, dtype_bytes: int,
           group_size: int, params_source: str, planned: Optional[tuple] = None,
           kv_cache_dtype: str = "auto") -> str:
    lines = []
    if num_params:
        packed, extra = int4_bytes(num_params, group_size)
        lines += [f"weights: {_count(num_params)} parameters ({params_source})",
                  f"  fp16/bf16   {_gb(weight_bytes(num_params, 16))}"]
        if planned is None:          # every parameter at group_size: the estimate
            lines.append(f"  int4        {_gb(packed)} packed + {_gb(extra)} for scales and zero "
                         f"points (fp16 scale + uint8 zero per {group_size} weights: "
                         f"+{100 * extra / packed:.2f}%) = {_gb(packed + extra)} (estimate: every "
                         "parameter at this group size)")
    if planned is not None:          # exactly what python -m tinyinfer.quantize writes
        plan, int4, rest, dtype = planned
        lines += [f"  int4        {_gb(int4)} INT4 + {_gb(rest)} kept in {dtype} (embedding, norms"
                  f"{'' if plan.head_copy or 'lm_head' in plan.groups else ', lm_head'}) = "
                  f"{_gb(int4 + rest)}: what `python -m tinyinfer.quantize --group-size {group_size}` "
                  "writes", f"              {plan.summary()}"]
    if s is not None:
        tokens = context * batch
        mha = kv_bytes_per_token(s, "mha", dtype_bytes, kv_cache_dtype)
        values = (f"{dtype_bytes}-byte values" if kv_cache_dtype == "auto" else
                  f"{kv_cache_dtype} values (1 byte + a 2-byte scale per row)")
        lines.append(f"KV cache, {values}, {s.num_layers} layers, context "
                     f"{context:,} x batch {batch} = {tokens:,} tokens:")
        lines.append(f"  {'attention':<24}{'values/token/layer':>20}{'bytes/token':>14}"
                     f"{'for the context':>18}{'vs MHA':>9}")
        kinds = [("mha", f"MHA ({s.num_heads} KV heads)"),
                 ("gqa", f"GQA ({s.kv_heads} KV heads)"),
                 ("mqa", "MQA (1 KV head)"),
                 ("mla", "MLA (latent + rope)" if s.is_mla else "MLA (DeepSeek-V2 ratios)")]
        if s.kv_heads in (1, s.num_heads):
            kinds = [k for k in kinds if k[0] != "gqa"]
        for kind, label in kinds:
            per_tok = kv_bytes_per_token(s, kind, dtype_bytes, kv_cache_dtype)
            mark = "  <- this model" if kind == own_kind(s) else ""
            lines.append(f"  {label:<24}{kv_values_per_token_layer(s, kind):>20,}{per_tok:>14,}"
                         f"{_gb(per_tok * tokens):>18}{mha / per_tok:>8.1f}x{mark}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tinyinfer.memory", formatter_class=HelpFormatter, description=(
        "Weight and KV-cache memory of a model, from a checkpoint's config.json or a shape given on "
        "the command line (flags override the checkpoint's values)."))
    p.add_argument("--ckpt", help="checkpoint: a Hugging Face directory, one .safetensors file or a "
                   ".gguf file (its config; the file headers give the exact parameter count), or a "
                   "config.json")
    p.add_argument("--params", type=parse_count, help="parameter count, e.g. 70B (default: from the "
                   "checkpoint's tensors, else from the shape)")
    p.add_argument("--layers", type=int, help="number of layers")
    p.add_argument("--d-model", type=int, help="hidden size")
    p.add_argument("--heads", type=int, help="query heads")
    p.add_argument("--kv-heads", type=int, help="KV heads (default: = heads)")
    p.add_argument("--head-dim", type=int, help="key head size (default: d_model / heads)")
    p.add_argument("--v-head-dim", type=int, help="value head size (default: = head dim)")
    p.add_argument("--kv-lora-rank", type=int, help="MLA latent size (makes the model MLA)")
    p.add_argument("--rope-dim", type=int, help="MLA rope key size (qk_rope_head_dim)")
    p.add_argument("--context", type=parse_count, default=4096, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per cached value")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "int8"], default="auto",
                   help="the KV cache's values: auto (--dtype-bytes each), fp8 or int8 (1 byte each; "
                        "int8 adds a 2-byte scale per token and head; docs/kv-cache.md)")
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128],
                   help="INT4 group size")
    p.add_argument("--quantize-head", action="store_true",
                   help="count lm_head in INT4 too, as `tinyinfer.quantize --quantize-head` does")
    a = p.parse_args(argv)

    cfg, on_disk = {}, None
    if a.ckpt:
        if not os.path.exists(a.ckpt):
            p.error(f"--ckpt {a.ckpt}: no such file or directory")
        try:
            cfg = read_config(a.ckpt)
        except (FileNotFoundError, ValueError) as e:          # json.JSONDecodeError is a ValueError
            p.error(str(e))
        if not a.ckpt.endswith(".json"):
            on_disk = checkpoint_params(a.ckpt)
    shape = None
    if cfg or a.layers:
        if cfg:
            base = shape_from_hf(cfg)
        else:
            if not (a.d_model and a.heads):
                p.error("a shape needs --layers, --d-model and --heads")
            base = Shape(num_layers=a.layers, hidden_size=a.d_model, num_heads=a.heads)
        changes = {k: v for k, v in dict(
            num_layers=a.layers, hidden_size=a.d_model, num_heads=a.heads, num_kv_heads=a.kv_heads,
            head_dim=a.head_dim, v_head_dim=a.v_head_dim, kv_lora_rank=a.kv_lora_rank,
            qk_rope_head_dim=a.rope_dim).items() if v is not None}
        shape = Shape(**{**base.__dict__, **changes})
        if shape.is_mla and shape.qk_rope_head_dim is None:
            p.error("--kv-lora-rank needs --rope-dim (the rope key cached beside the latent)")
    if shape is None and not a.params:
        p.error("give --ckpt, a shape (--layers --d-model --heads ...) or --params")
    if a.params:
        n, source = a.params, "given"
    elif on_disk:
        n, source = on_disk[0], f"counted in the checkpoint's tensors, {_gb(on_disk[1])} on disk"
    elif shape.vocab_size and (shape.intermediate_size or shape.n_routed_experts):
        n, source = count_params(shape), "from the shape"
    else:
        n, source = 0, ""
    planned = planned_int4(cfg, a.group_size, a.quantize_head) if cfg else None
    print(report(shape, n, int(a.context), a.batch, a.dtype_bytes, a.group_size, source, planned,
                 a.kv_cache_dtype))


if __name__ == "__main__":
    main()
