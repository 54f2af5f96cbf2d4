"""INT4 checkpoints on disk: tinyinfer's own self-describing file.

tinyinfer INT4 file: one .safetensors holding, under our module names (`layers.0.attn.qkv_proj`, ...),
for each quantized linear the canonical tensors of ops/int4_format.py (`.qweight` uint8 (N, K/2), `.scales`
(N, K/G), `.zeros` (N, K/G), optionally `.perm` int64 (K) and `.bias`), and every other parameter as is
(`embed_tokens.weight`, norms, `lm_head.weight`). Metadata: format "tinyinfer-int4", format_version,
group_size (the one asked for; each layer's own is K / scales' columns: 128, 64 or 32, see
quant/plan.py), the Hugging Face config JSON under "config" and the quantized module names; so the file
alone rebuilds the model (the tokenizer sits beside it). Versions:
    1   integer zero points: `.zeros` uint8, W = (q - z) * s
    2   also float offsets: `.zeros` in the scales' dtype, W = q * s + z (GGUF Q4_1); written only
        by files that hold such a layer, so version-1 readers keep reading the others

The GPTQ / AWQ imports, repacked into this format: loading/gptq_awq.py.
"""
from __future__ import annotations

import json
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from tinyinfer.config.errors import CheckpointError
from tinyinfer.layers.linear import Int4Linear
from tinyinfer.ops.int4_format import GROUP_SIZES, pack_nibbles, unpack_nibbles

FORMAT = "tinyinfer-int4"
FORMAT_VERSION = 1                 # integer zero points only
FLOAT_ZEROS_VERSION = 2            # float-offset zeros (W = q * s + z) in some layer
READ_VERSIONS = (FORMAT_VERSION, FLOAT_ZEROS_VERSION)
_PARTS = (".qweight", ".scales", ".zeros", ".perm", ".bias")


def is_int4_file(metadata: dict) -> bool:
    return metadata.get("format") == FORMAT


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ----------------------------------------------------------------------------------------------
# tinyinfer INT4 file
# ----------------------------------------------------------------------------------------------

def save_int4(model: nn.Module, path: str, hf_config: dict, group_size: int) -> None:
    """Write a model converted by quant.quantize_model (or imported) as one self-describing file."""
    tensors: dict[str, Tensor] = {}
    quantized = []
    version = FORMAT_VERSION
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            quantized.append(name)
            q, s, z = module.canonical()
            if z.is_floating_point():
                version = FLOAT_ZEROS_VERSION
            tensors.update({f"{name}.qweight": pack_nibbles(q), f"{name}.scales": s, f"{name}.zeros": z})
            if module.perm is not None:
                tensors[f"{name}.perm"] = module.perm
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.data
    for name, p in model.named_parameters():                 # tied weights appear once
        if not any(name.startswith(q + ".") for q in quantized):
            tensors[name] = p.data
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "format_version": str(version), "group_size": str(group_size),
            "config": json.dumps(hf_config), "quantized": json.dumps(quantized)}
    save_file(tensors, path, metadata=meta)


def load_int4(model: nn.Module, reader, metadata: dict, dtype: torch.dtype,
              device: torch.device) -> None:
    """Fill `model` (built from the file's config) from a tinyinfer INT4 file, in place. `reader`: the
    checkpoint's tensors by name (`get`, `in`, `where`; loading/checkpoint.py TensorReader)."""
    version = metadata.get("format_version")
    if version not in [str(v) for v in READ_VERSIONS]:
        raise CheckpointError(f"INT4 file has format_version {version!r}; this tinyinfer reads "
                              f"versions {READ_VERSIONS} (re-quantize with python -m tinyinfer.quantize)")
    try:
        quantized = json.loads(metadata.get("quantized", "[]"))
    except ValueError as e:
        raise CheckpointError(f"INT4 file metadata is malformed: {e}") from None
    used = set()
    for name in quantized:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"INT4 file quantizes {name}, which this model does not have "
                                  "(config and weights disagree?)") from None
        q = unpack_nibbles(reader.get(f"{name}.qweight"))
        s, z = reader.get(f"{name}.scales"), reader.get(f"{name}.zeros")
        n, k = old.weight.shape
        if tuple(q.shape) != (n, k) or s.shape[0] != n or k % max(s.shape[1], 1):
            raise CheckpointError(f"INT4 tensors of {name} unpack to {tuple(q.shape)} with scales "
                                  f"{tuple(s.shape)}; the model expects weight ({n}, {k})")
        group_size = k // s.shape[1]
        if group_size not in GROUP_SIZES or z.shape != s.shape:
            raise CheckpointError(f"{name} has {s.shape[1]} scale groups and zeros "
                                  f"{tuple(z.shape)} for K={k}: group size {group_size} is not "
                                  f"one of {GROUP_SIZES}, or zeros do not match the scales")
        if z.is_floating_point() and version == str(FORMAT_VERSION):
            raise CheckpointError(f"{name} holds float-offset zeros, a format_version "
                                  f"{FLOAT_ZEROS_VERSION} feature, in a version {version} file")
        perm = reader.get(f"{name}.perm") if f"{name}.perm" in reader else None
        bias = reader.get(f"{name}.bias") if f"{name}.bias" in reader else None
        layer = Int4Linear.from_quantized(q.to(device), s.to(device), z.to(device), group_size, dtype,
                                          bias=None if bias is None else bias.to(device, dtype),
                                          perm=None if perm is None else perm.to(device))
        replace_module(model, name, layer)
        used.update(f"{name}{p}" for p in _PARTS)
    for name, p in model.named_parameters():
        if name in used:
            continue
        t = reader.get(name)
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, model expects "
                                  f"{tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t.to(device=device, dtype=dtype))
        used.add(name)
    extra = sorted(n for n in reader.where if n not in used)
    if extra:
        raise CheckpointError(f"INT4 file holds {len(extra)} tensor(s) the model does not use, "
                              f"e.g. {extra[0]}")
