"""Checks at the loader's boundary, run before any memory is allocated for the model, so a checkpoint
whose config.json and tensors disagree is refused by name instead of loading garbage or dying in the
allocator:

  * the device exists (`resolve_device`);
  * the layers the checkpoint holds are exactly num_hidden_layers (plus DeepSeek-V3's unused
    multi-token-prediction layers): fewer in the config would silently drop layers, more would miss
    them -- a ConfigError naming num_hidden_layers;
  * every dense tensor the model reads is there (a missing bias or lm_head names the config field
    that asks for it), has the shape the config gives it (a CheckpointError naming the tensor, both
    shapes and the config fields that set that shape) and a floating-point dtype (an int8 or bool
    tensor would be cast to float silently: a CheckpointError naming tensor and dtype);
  * with tie_word_embeddings, no lm_head.weight that differs from the embedding;
  * the model fits the device's memory (a ConfigError naming its size and largest tensor).

The model is built on the meta device for this (shapes only, no memory). Tensors nothing reads are
reported once the model is filled (checkpoint.load_weights: unexpected tensors by name).
"""
from __future__ import annotations

import os
import re
from typing import Optional, Union

import torch

from tinyinfer.config.errors import CheckpointError

from tinyinfer.config.errors import ConfigError
from tinyinfer.config.model import ModelConfig
from tinyinfer.loading.checkpoint import TensorReader, hf_sources, mtp_layers
from tinyinfer.models.transformer import Transformer

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")         # safetensors dtype names the loader casts from
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# The config.json fields that set a parameter's shape, by a part of its name (first match wins).
_SHAPE_FIELDS = (
    ("embed_tokens", "vocab_size, hidden_size"), ("lm_head", "vocab_size, hidden_size"),
    ("shared_experts", "moe_intermediate_size, n_shared_experts, hidden_size"),
    ("experts", "moe_intermediate_size (Mixtral: intermediate_size), hidden_size"),
    ("mlp.gate.", "n_routed_experts (num_experts, num_local_experts), hidden_size"),
    ("mlp.", "intermediate_size, hidden_size"),
    ("qkv_proj", "num_attention_heads, num_key_value_heads, head_dim, hidden_size"),
    ("q_norm", "head_dim"), ("k_norm", "head_dim"),
    ("kv_a_", "kv_lora_rank, qk_rope_head_dim, hidden_size"),
    ("kv_b_proj", "kv_lora_rank, num_attention_heads, qk_nope_head_dim, v_head_dim"),
    ("q_a_", "q_lora_rank, hidden_size"),
    ("q_", "q_lora_rank, num_attention_heads, qk_nope_head_dim, qk_rope_head_dim, hidden_size"),
    ("o_proj", "num_attention_heads, head_dim (MLA: v_head_dim), hidden_size"),
    ("norm", "hidden_size"),
)


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """The device to run on: as asked (cpu, cuda, cuda:N), else cuda when available, else cpu.
    ValueError for a device type tinyinfer does not run on or a GPU that is not there."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported: use cpu or cuda (cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: torch sees "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_layers(cfg: ModelConfig, names: list[str]) -> None:
    """The checkpoint's layer indices are exactly 0 .. num_hidden_layers - 1 (+ MTP layers)."""
    n = cfg.num_layers
    mtp = mtp_layers(names, n, cfg.num_mtp_layers)
    layer_of = {name: int(m.group(1)) for name in names for m in [_LAYER.search(name)] if m}
    found = sorted(set(layer_of.values()) - mtp)
    extra = [i for i in found if i >= n]
    if extra:
        example = next(name for name, i in sorted(layer_of.items()) if i == extra[0])
        raise ConfigError(f"config field num_hidden_layers is {n}, but the checkpoint also holds "
                          f"layer(s) {', '.join(map(str, extra[:4]))}{' ...' if len(extra) > 4 else ''} "
                          f"(e.g. {example}); fix num_hidden_layers or drop those tensors")
    if found and found == list(range(len(found))) and len(found) < n:
        raise ConfigError(f"config field num_hidden_layers is {n}, but the checkpoint holds layers "
                          f"0..{len(found) - 1} only; fix config.json to match the weights")
    missing = sorted(set(range(n)) - set(found))
    if missing:
        raise CheckpointError(f"the checkpoint holds no tensor of layer {missing[0]} (num_hidden_layers "
                              f"is {n}); is it truncated or missing a shard?")


def _why(name: str) -> str:
    """For a missing tensor that a config field makes the model expect: that field."""
    if name.endswith(".bias"):
        return ": config.json's attention_bias / mlp_bias give the model biases the weights lack"
    if name.startswith("lm_head."):
        return ": config field tie_word_embeddings is false, so the model needs its own lm_head"
    return ""


def check_tied_head(cfg: ModelConfig, reader, our_names: bool = False) -> None:
    """With tie_word_embeddings the model's head is its embedding; a checkpoint that also holds a
    different lm_head.weight contradicts its config (the head would be dropped silently)."""
    embed = "embed_tokens.weight" if our_names else "model.embed_tokens.weight"
    if (cfg.tie_word_embeddings and "lm_head.weight" in reader and embed in reader
            and list(reader.shape("lm_head.weight")) == list(reader.shape(embed))
            and not torch.equal(reader.get("lm_head.weight"), reader.get(embed))):
        raise ConfigError("config field tie_word_embeddings is true, but the checkpoint's lm_head.weight "
                          f"differs from {embed}: set it to false, or drop lm_head.weight")


def _shape_fields(name: str) -> str:
    return next((fields for part, fields in _SHAPE_FIELDS if part in name), "its shape fields")


def check_tensors(model: Transformer, reader, our_names: bool = False) -> None:
    """Shapes and dtypes of the dense tensors the (meta) model will read. Tensors absent here (a
    packed GPTQ / INT4 linear, or a missing one) are left to the loaders, which name them."""
    arch = model.cfg.architecture
    for name, param in model.named_parameters():
        sources = [name] if our_names else hf_sources(name, arch)
        missing = [s for s in sources if s not in reader]
        if any(f"{s.removesuffix('weight')}qweight" in reader for s in missing):
            continue                             # a packed INT4 / GPTQ / AWQ linear: its loader checks
        if missing:
            raise CheckpointError(f"checkpoint lacks {missing[0]} (needed for {name}){_why(name)}")
        shapes = [list(reader.shape(s)) for s in sources]
        got = [sum(s[0] for s in shapes if s)] + shapes[0][1:] if len(shapes) > 1 else shapes[0]
        if got != list(param.shape):
            detail = ", ".join(f"{s} {shape}" for s, shape in zip(sources, shapes))
            raise CheckpointError(f"tensor {detail} gives {name} the shape {got}, but config.json asks "
                                  f"for {list(param.shape)}: its {_shape_fields(name)} disagree with "
                                  "the weights")
        if isinstance(reader, TensorReader):
            bad = next((s for s in sources if reader.dtype(s) not in FLOAT_DTYPES), None)
            if bad is not None:
                raise CheckpointError(f"tensor {bad} is stored as {reader.dtype(bad)}, not a float type "
                                      "(F16, BF16, F32): it would be cast to the model dtype as if it "
                                      "were weights; re-export the checkpoint in float (a quantized one "
                                      "needs its quantization_config)")


def memory_bytes(device: torch.device) -> Optional[int]:
    """The memory of `device` (physical RAM for the CPU); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_fits(model: Transformer, dtype: torch.dtype, device: torch.device) -> None:
    """ConfigError when the model's parameters alone exceed the device's memory."""
    total = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    limit = memory_bytes(device)
    if limit is not None and total > limit:
        name, big = max(model.named_parameters(), key=lambda kv: kv[1].numel())
        raise ConfigError(f"config.json describes a model of {_size(total)} in {dtype} (largest: "
                          f"{name} {list(big.shape)}, set by {_shape_fields(name)}), more than the "
                          f"{_size(limit)} of memory of {device}: check those fields")


def check_checkpoint(cfg: ModelConfig, reader, dtype: torch.dtype, device: torch.device,
                     our_names: bool = False, local: Optional[ModelConfig] = None) -> None:
    """Every check above, before the model is allocated. `reader`: a TensorReader or GGUFReader of
    the whole checkpoint; `our_names`: the tensors carry tinyinfer's module names (an INT4 file), not
    Hugging Face's; `local`: the config of the part this device holds (a tensor-parallel rank's
    shard, loading/shard.py), whose size must fit its memory."""
    check_layers(cfg, list(reader.where))
    check_tied_head(cfg, reader, our_names)
    with torch.device("meta"):
        model = Transformer(cfg)
    check_tensors(model, reader, our_names)
    if local is not None:
        with torch.device("meta"):
            model = Transformer(local)
    check_fits(model, dtype, device)

