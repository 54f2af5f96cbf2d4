"""`python -m tinyinfer.quantize`: convert a checkpoint to a self-describing INT4 .safetensors file.

    python -m tinyinfer.quantize --ckpt models/shakespeare-llama --out llama-int4.safetensors
    python -m tinyinfer.generate --ckpt llama-int4.safetensors --prompt "ROMEO:"

Every linear layer of the decoder becomes group-wise 4-bit (quant/quantizer.py: round-to-nearest with a per-group
clipping search) at --group-size, or the largest of 64 / 32 that divides a layer's input width (quant/
plan.py; a summary says how many took which); the embedding and lm_head stay in the checkpoint's dtype
unless --quantize-head (with tied embeddings: the head is quantized as a copy, the embedding stays).
A GGUF file's Q4_0 / Q4_1 linears keep their own 4-bit blocks (g32, exact); its other linears are
quantized. The output holds the model config, group size and format version in its metadata; the
tokenizer and generation config are copied beside it (a GGUF's tokenizer stays in the .gguf), so
`generate --ckpt OUT` needs nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Optional

from tinyinfer.config.model import ModelConfig, parse_dtype
from tinyinfer.loading import checkpoint as ckpt
from tinyinfer.loading.validate import resolve_device
from tinyinfer.loading.weights import load_model, stored_dtype
from tinyinfer.ops.int4_format import GROUP_SIZES
from tinyinfer.quant.io import save_int4
from tinyinfer.quant.plan import Int4Plan
from tinyinfer.quant.quantizer import quantize_model

SIDECARS = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tinyinfer.quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="Hugging Face model directory or .safetensors file")
    p.add_argument("--out", required=True, help="output .safetensors file (tokenizer copied beside it)")
    p.add_argument("--group-size", type=int, default=128, choices=GROUP_SIZES,
                   help="input channels sharing one scale and zero point (default 128)")
    p.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=True,
                   help="search each group's clipping range for the least error (default on; "
                        "--no-clip-search gives plain min/max round-to-nearest)")
    p.add_argument("--quantize-head", action=argparse.BooleanOptionalAction, default=False,
                   help="also quantize lm_head (default off: it stays in the model dtype)")
    p.add_argument("--device", default=None, help="where to run the quantizer (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="dtype of the unquantized tensors and scales' model "
                   "(default: the checkpoint's own)")
    return p


def quantize_checkpoint(path: str, out: str, group_size: int = 128, clip_search: bool = True,
                        quantize_head: bool = False, device: Optional[str] = None,
                        dtype: Optional[str] = None, progress: bool = True) -> Int4Plan:
    """Load `path`, quantize its linears, write `out` (+ tokenizer beside it); returns the plan
    (quant/plan.py: each linear's group size, those kept dense)."""
    if not out.endswith(".safetensors"):
        raise ValueError(f"--out {out!r} must end in .safetensors")
    files = ckpt.locate(path)
    if "quantization_config" in files.config:
        raise ValueError(f"{path} is already quantized ({files.config['quantization_config'].get('quant_method')}); "
                         "load it directly with tinyinfer.generate --ckpt")
    cfg = ModelConfig.from_hf(files.config, files.generation_config)
    dev = resolve_device(device)                  # ValueError: unknown or absent device
    dt = parse_dtype(dtype) if dtype else stored_dtype(cfg)
    model = load_model(files, cfg, dt, dev)
    plan = quantize_model(model, group_size, quantize_head, clip_search, progress=progress)
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    save_int4(model, out, files.config, group_size)
    if files.gguf is not None:
        write_gguf_tokenizer(files, out_dir)
        return plan
    for name in SIDECARS:
        src = os.path.join(files.tokenizer_dir, name)
        if os.path.exists(src) and os.path.abspath(os.path.dirname(src)) != out_dir:
            shutil.copy(src, os.path.join(out_dir, name))
    return plan


def write_gguf_tokenizer(files: ckpt.CheckpointFiles, out_dir: str) -> None:
    """A GGUF file's tokenizer as the Hugging Face files the INT4 file is read with: tokenizer.json
    (the vocabulary rebuilt by loading/gguf_tokenizer.py), tokenizer_config.json (BOS / EOS, whether
    BOS is added, the chat template) and generation_config.json (the stop tokens)."""
    tok = files.gguf.tokenizer()
    tok.tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    piece = tok.tokenizer.id_to_token
    config = {"add_bos_token": tok.add_bos, "add_eos_token": tok.add_eos,
              "bos_token": None if tok.bos_id is None else piece(tok.bos_id),
              "eos_token": None if tok.eos_id is None else piece(tok.eos_id)}
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    for name, content in (("tokenizer_config.json", config),
                          ("generation_config.json", files.generation_config or {})):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        plan = quantize_checkpoint(args.ckpt, args.out, args.group_size, args.clip_search,
                                   args.quantize_head, args.device, args.dtype)
    except (ckpt.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = os.path.getsize(args.out) / 2**20
    print(f"{plan.summary()}", file=sys.stderr)
    print(f"wrote {args.out}: {len(plan.names)} linears quantized "
          f"({'clip search' if args.clip_search else 'min/max RTN'}), {size:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
