"""cpu_int4: INT4 against float32 decode on a CPU, in the same run: decode tokens/s at batch 1 and 16.

For each --ckpt (default: the demo model): "float32" is the dense model in float32 (a .gguf file's
weights dequantized, its INT4 layers turned back into dense linears); "int4" is what tinyinfer runs by
default for INT4 on a CPU -- bfloat16 activations through the CPU INT4 matmul (ops/cpu_matmul.py) --
with the file's own Q4 blocks for a .gguf, else quantized on the fly at --group-size; "hf" is
Hugging Face generate() on the float32 model (with transformers installed; --no-hf to skip). Greedy,
one torch thread, decode time = time(N tokens) - time(1 token), best of three (tools/bench/hf.py); the
*_cpu ratios use process CPU time per step, steadier on a busy machine. Also the bytes of the linear
weights each holds. CPU figures: ratios within this run only.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from tinyinfer.engine.llm import LLM
from tinyinfer.layers.linear import Int4Linear
from tinyinfer.sampling.params import SamplingParams
from tools.bench.common import cpu_only, device_label, format_table, summary_row
from tools.bench.hf import _decode_rate, _prompts, dequantized, hf_generate, hf_model

GPU_CHECK_ARGS: list[list[str]] = []          # a CPU benchmark: make gpu-check skips it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", action="append", default=None,
                        help="checkpoint (repeatable; default models/shakespeare-llama)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run")
    parser.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128],
                        help="on-the-fly INT4 group size for dense checkpoints (default 128)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                        help="also time Hugging Face generate() on the float32 model")


def _greedy(llm: LLM):
    def generate(prompts: list[list[int]], k: int) -> None:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True))
    return generate


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the weights of every linear (INT4: packed levels, scales, zeros)."""
    total = 0
    for m in model.modules():
        if isinstance(m, Int4Linear):
            total += sum(t.numel() * t.element_size() for t in (m.qweight, m.scales, m.zeros))
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def run(args: argparse.Namespace, device: torch.device) -> dict:
    cpu_only("cpu_int4", device, args.threads)
    rows = []
    for path in args.ckpt or ["models/shakespeare-llama"]:
        gguf = path.endswith(".gguf")
        fp32 = LLM(path, device="cpu", dtype="float32", max_kv_tokens=4096)
        fp32 = dequantized(fp32) if gguf else fp32
        int4 = LLM(path, device="cpu", max_kv_tokens=4096,
                   **({} if gguf else {"quant": "int4", "group_size": args.group_size}))
        engines = {name: _greedy(llm) for name, llm in (("float32", fp32), ("int4", int4))}
        if args.hf:
            eos = fp32.config.eos_token_ids
            engines["hf"] = hf_generate(hf_model(path, torch.float32).eval(), eos[0] if eos else 0,
                                        device)
        for batch in (1, 16):
            prompts = _prompts(fp32.tokenizer, batch)
            rate = {name: _decode_rate(gen, prompts, args.new_tokens) for name, gen in engines.items()}
            row = {"ckpt": path.rstrip("/").split("/")[-1], "batch": batch}
            row.update({f"{name}_tok_s": r[0] for name, r in rate.items()})
            for other in [n for n in ("float32", "hf") if n in rate]:
                row[f"int4_vs_{other}"] = rate["int4"][0] / rate[other][0]
                row[f"int4_vs_{other}_cpu"] = rate[other][1] / rate["int4"][1]
            row.update({"int4_dtype": str(int4.dtype).replace("torch.", ""),
                        "linear_MB_float32": linear_bytes(fp32.model) / 1e6,
                        "linear_MB_int4": linear_bytes(int4.model) / 1e6})
            rows.append(row)
    print(f"{device_label(device)}; greedy, {args.new_tokens} new tokens -- CPU figures: ratios "
          "within this run only")
    columns = [c for c in ("ckpt", "batch", "float32_tok_s", "int4_tok_s", "hf_tok_s",
                           "int4_vs_float32", "int4_vs_float32_cpu", "int4_vs_hf", "int4_vs_hf_cpu",
                           "int4_dtype", "linear_MB_float32", "linear_MB_int4") if c in rows[0]]
    print(format_table(rows, columns))
    print("int4_vs_X > 1: tinyinfer's INT4 decodes faster than X (wall clock; _cpu: CPU time)")
    summary = [summary_row(f"cpu int4 vs float32 {r['ckpt']} bs{r['batch']}", r["int4_tok_s"],
                           "tok/s", vs_torch=r["int4_vs_float32"]) for r in rows]
    return {"rows": rows, "new_tokens": args.new_tokens, "is_cpu_figure": True, "summary": summary}
