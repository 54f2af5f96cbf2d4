"""`python -m tinyinfer.quantize`: convert a checkpoint to a self-contained INT4 checkpoint directory.

    python -m tinyinfer.quantize --ckpt models/shakespeare-llama --out llama-int4
    python -m tinyinfer.generate --ckpt llama-int4 --prompt "ROMEO:"

Every linear layer of the decoder becomes group-wise 4-bit (quant/quantizer.py: round-to-nearest with a per-group
clipping search) at --group-size, or the largest of 64 / 32 that divides a layer's input width (quant/
plan.py; a summary says how many took which); the embedding and lm_head stay in the checkpoint's dtype
unless --quantize-head (with tied embeddings: the head is quantized as a copy, the embedding stays).
A GGUF file's Q4_0 / Q4_1 linears keep their own 4-bit blocks (g32, exact); its other linears are
quantized.

--out DIR is a directory of its own, so outputs can sit side by side: model.safetensors (the INT4
weights; the model config, group size and format version in its metadata), config.json, and the
tokenizer: the checkpoint's tokenizer files, generation_config.json and chat template (chat_template.jinja
and additional_chat_templates/ where it has them) copied; for a GGUF file, its vocabulary rebuilt as
tokenizer.json, with tokenizer_config.json (BOS / EOS, the chat template) and generation_config.json.
`generate --ckpt DIR` needs nothing else. An existing non-empty DIR is refused unless --force, which
replaces the files named above. Files are written mode 0644.
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

from tinyinfer.cli import apply_threads
from tinyinfer.config.help import HelpFormatter

SIDECARS = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "chat_template.jinja")
WEIGHTS = "model.safetensors"
WRITES = (WEIGHTS, "config.json") + SIDECARS + ("additional_chat_templates",)


class _Help(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The module docstring as written, and every option's default."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tinyinfer.quantize", description=__doc__,
                                formatter_class=_Help)
    p.add_argument("--ckpt", required=True,
                   help="checkpoint: a Hugging Face directory, one .safetensors file, or a .gguf file")
    p.add_argument("--out", required=True,
                   help="output directory (created): weights, config and tokenizer, as above")
    p.add_argument("--force", action=argparse.BooleanOptionalAction, default=False,
                   help="replace the files of an earlier output in --out")
    p.add_argument("--group-size", type=int, default=128, choices=GROUP_SIZES,
                   help="input channels sharing one scale and zero point")
    p.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=True,
                   help="search each group's clipping range for the least error "
                        "(--no-clip-search: plain min/max round-to-nearest)")
    p.add_argument("--quantize-head", action=argparse.BooleanOptionalAction, default=False,
                   help="also quantize lm_head (off: it stays in the model dtype)")
    p.add_argument("--device", default=None, help="where to run the quantizer (default: cuda if available)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch's CPU threads (0: torch's default), one as generate uses: on a busy machine "
                        "more threads wait on each other")
    p.add_argument("--dtype", default=None, help="dtype of the unquantized tensors and scales' model "
                   "(default: the checkpoint's own)")
    return p


def prepare_out(out: str, force: bool) -> None:
    """Create `out`, or check that it may be written: refused if it is a file, or a non-empty
    directory without `force`; with `force` the files an earlier output wrote are removed first, so
    none of them is left stale (a tokenizer.model beside a new tokenizer.json, say)."""
    if out.endswith((".safetensors", ".gguf")):
        raise ValueError(f"--out {out!r}: give a directory; the output is one (weights, config and "
                         "tokenizer together), e.g. --out llama-int4")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file; give a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise ValueError(f"--out {out!r} exists and is not empty ({', '.join(sorted(os.listdir(out))[:4])}"
                             f"{', ...' if len(os.listdir(out)) > 4 else ''}); pass --force to replace "
                             "an earlier output there, or choose another directory")
        for name in WRITES:
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)


def quantize_checkpoint(path: str, out: str, group_size: int = 128, clip_search: bool = True,
                        quantize_head: bool = False, device: Optional[str] = None,
                        dtype: Optional[str] = None, progress: bool = True, force: bool = False
                        ) -> Int4Plan:
    """Load `path`, quantize its linears, write the directory `out` (module docstring); returns the
    plan (quant/plan.py: each linear's group size, those kept dense)."""
    files = ckpt.locate(path)
    if "quantization_config" in files.config:
        raise ValueError(f"{path} is already quantized ({files.config['quantization_config'].get('quant_method')}); "
                         "load it directly with tinyinfer.generate --ckpt")
    cfg = ModelConfig.from_hf(files.config, files.generation_config)
    dev = resolve_device(device)                  # ValueError: unknown or absent device
    dt = parse_dtype(dtype) if dtype else stored_dtype(cfg)
    prepare_out(out, force)                       # before the minutes of work, not after
    model = load_model(files, cfg, dt, dev, q8_head=False)
    plan = quantize_model(model, group_size, quantize_head, clip_search, progress=progress)
    save_int4(model, os.path.join(out, WEIGHTS), files.config, group_size)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(files.config, f, indent=2)
    if files.gguf is not None:
        write_gguf_tokenizer(files, out)
    else:
        for name in SIDECARS + ("additional_chat_templates",):
            src = os.path.join(files.tokenizer_dir, name)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(out, name))
            elif os.path.exists(src):
                shutil.copy(src, os.path.join(out, name))
    for root, dirs, names in os.walk(out):
        for name in names:
            os.chmod(os.path.join(root, name), 0o644)
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
        apply_threads(args)
        plan = quantize_checkpoint(args.ckpt, args.out, args.group_size, args.clip_search,
                                   args.quantize_head, args.device, args.dtype, force=args.force)
    except (ckpt.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(args.out) for n in ns)
    weights = os.path.getsize(os.path.join(args.out, WEIGHTS))
    print(f"{plan.summary()}", file=sys.stderr)
    print(f"wrote {args.out}/: {len(plan.names)} linears quantized "
          f"({'clip search' if args.clip_search else 'min/max RTN'}), {WEIGHTS} {weights / 2**20:.1f} MiB, "
          f"{size / 2**20:.1f} MiB in all, {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
