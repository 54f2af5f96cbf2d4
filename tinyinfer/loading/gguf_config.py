"""A Hugging Face config.json (as a dict) from a GGUF file's metadata.

A GGUF file carries no config.json, only llama.cpp's architecture-prefixed metadata keys; the rest of
the engine reads config.json, so this module rebuilds it. docs/formats.md has the architecture table,
where the result departs from transformers' GGUF loader, and how Llama 3 rope scaling is recovered.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import numpy as np
import torch

from tinyinfer.config.errors import ConfigError
from tinyinfer.layers.rotary import default_inv_freq, llama3_inv_freq
from tinyinfer.loading.gguf_file import GGUFError, Metadata

# GGUF architecture -> (HF architecture, HF model_type); llama with experts is handled apart (llama.cpp
# files Mixtral as llama). docs/formats.md: what each becomes, where transformers differs.
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
MIXTRAL = ("MixtralForCausalLM", "mixtral")
# Storage type of the file's float tensors -> the config's torch_dtype.
_FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16"}


def architecture(meta: Metadata) -> str:
    arch = meta.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{meta.path}: GGUF architecture {arch!r} is not supported; tinyinfer "
                        f"loads {', '.join(sorted(ARCHITECTURES))} GGUF files")
    return arch


def is_mixtral(meta: Metadata, arch: str) -> bool:
    return arch == "llama" and (meta.get("llama.expert_count") or 0) > 0


def _rope_scaling(meta: Metadata, arch: str) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    linear = meta.get(f"{arch}.rope.scale_linear")          # older key for linear scaling
    if kind == "none" and linear not in (None, 1.0):
        return {"rope_type": "linear", "factor": linear}
    if kind == "none":
        return None
    factor = meta.require(f"{arch}.rope.scaling.factor", f"rope scaling {kind!r}")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind != "yarn":
        raise GGUFError(f"{meta.path}: metadata {arch}.rope.scaling.type is {kind!r}; "
                        "supported: none, linear, yarn")
    rope = {"rope_type": "yarn", "factor": factor,
            "original_max_position_embeddings": meta.require(
                f"{arch}.rope.scaling.original_context_length", "yarn rope scaling")}
    for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if f"{arch}.rope.scaling.{key}" in meta:
            rope[hf_key] = meta.get(f"{arch}.rope.scaling.{key}")
    return rope


_ROPE_KEYS = {"type", "factor", "original_context_length", "finetuned", "yarn_beta_fast",
              "yarn_beta_slow"}


def _check_rope_keys(meta: Metadata, arch: str, keys: Iterable[str]) -> None:
    """Refuse rope scaling parameters we do not map (YaRN attention / extrapolation factors...)."""
    prefix = f"{arch}.rope.scaling."
    for key in keys:
        if key.startswith(prefix) and key[len(prefix):] not in _ROPE_KEYS:
            raise GGUFError(f"{meta.path}: metadata {key} = {meta.get(key)!r} is a rope scaling "
                            "parameter tinyinfer does not support")


def _torch_dtype(tensor_types: dict[str, str]) -> str:
    """bfloat16 / float16 if the file stores float tensors so, else float32 (the dequantized dtype)."""
    stored = set(tensor_types.values())
    for ggml, name in _FLOAT_DTYPES.items():
        if ggml in stored:
            return name
    return "float32"


def _attention(meta: Metadata, arch: str, hidden: int) -> dict[str, Any]:
    heads = meta.require(f"{arch}.attention.head_count", "num_attention_heads")
    if not isinstance(heads, int):
        raise GGUFError(f"{meta.path}: {arch}.attention.head_count is {heads!r}; per-layer head "
                        "counts are not supported")
    if heads <= 0:
        raise ConfigError(f"{meta.path}: {arch}.attention.head_count is {heads}; a model needs at "
                          "least one attention head (corrupt file?)")
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise ConfigError(f"{meta.path}: {arch}.attention.head_count_kv is {kv_heads!r}; it must be "
                          f"a positive divisor of head_count ({heads})")
    if f"{arch}.attention.key_length" not in meta and hidden % heads:
        raise ConfigError(f"{meta.path}: {arch}.embedding_length {hidden} is not a multiple of "
                          f"{arch}.attention.head_count {heads}, and no key_length gives the head size")
    # key_length first: qwen3's head size often differs from hidden / heads
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads)
    value_dim = meta.get(f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise GGUFError(f"{meta.path}: key_length {head_dim} != value_length {value_dim}; "
                        "attention with different key and value head sizes is not supported")
    rot = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if rot != head_dim:
        raise GGUFError(f"{meta.path}: {arch}.rope.dimension_count is {rot} but the head size is "
                        f"{head_dim}; partial rotary embeddings are not supported")
    return {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim}


def _experts(meta: Metadata, arch: str, moe: bool) -> dict[str, Any]:
    if not moe:
        return {}
    shared = meta.get(f"{arch}.expert_shared_count", 0)
    if shared:
        raise GGUFError(f"{meta.path}: {arch}.expert_shared_count is {shared}; shared experts "
                        f"are not part of the {arch} architecture tinyinfer loads")
    count = meta.require(f"{arch}.expert_count", "the number of experts")
    used = meta.require(f"{arch}.expert_used_count", "num_experts_per_tok")
    if arch == "llama":
        return {"num_local_experts": count, "num_experts_per_tok": used}
    gating = meta.get(f"{arch}.expert_gating_func", 1)
    if gating != 1:
        raise GGUFError(f"{meta.path}: {arch}.expert_gating_func is {gating}; {arch} routes with "
                        "a softmax (1)")
    return {"num_experts": count, "num_experts_per_tok": used,
            "moe_intermediate_size": meta.require(f"{arch}.expert_feed_forward_length",
                                                  "moe_intermediate_size"),
            # llama.cpp always renormalizes the top-k weights of qwen3moe
            "norm_topk_prob": bool(meta.get(f"{arch}.expert_weights_norm", True)),
            "decoder_sparse_step": 1, "mlp_only_layers": []}


def hf_config(meta: Metadata, tensor_types: dict[str, str], vocab_size: int,
              rope_freqs: Optional[np.ndarray] = None) -> dict[str, Any]:
    """config.json of the model in the file; `tensor_types` maps GGUF tensor names to their type
    names (e.g. "Q4_1"), `vocab_size` is the token count (metadata or token_embd rows),
    `rope_freqs` the values of the file's rope_freqs.weight, if any."""
    arch = architecture(meta)
    moe = arch == "qwen3moe" or is_mixtral(meta, arch)
    hf_arch, model_type = MIXTRAL if is_mixtral(meta, arch) else ARCHITECTURES[arch]
    hidden = meta.require(f"{arch}.embedding_length", "hidden_size")
    config: dict[str, Any] = {
        "architectures": [hf_arch], "model_type": model_type, "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": meta.require(f"{arch}.block_count", "num_hidden_layers"),
        "max_position_embeddings": meta.require(f"{arch}.context_length",
                                                "max_position_embeddings"),
        "rms_norm_eps": meta.require(f"{arch}.attention.layer_norm_rms_epsilon", "rms_norm_eps"),
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
        "hidden_act": "silu",
        # llama.cpp writes output.weight only when the head is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_types,
        "torch_dtype": _torch_dtype(tensor_types),
    }
    if arch != "qwen3moe":        # qwen3moe: optional (width of dense layers, none by default)
        config["intermediate_size"] = meta.require(f"{arch}.feed_forward_length",
                                                   "intermediate_size")
    elif f"{arch}.feed_forward_length" in meta:
        config["intermediate_size"] = meta.get(f"{arch}.feed_forward_length")
    config.update(_attention(meta, arch, hidden))
    config.update(_experts(meta, arch, moe))
    _check_rope_keys(meta, arch, meta.keys())
    if (rope := _rope_scaling(meta, arch)) is not None:
        config["rope_scaling"] = rope
    # Llama 3.x files have no rope scaling keys: the converter baked it into rope_freqs.weight
    if rope_freqs is not None:
        if arch != "llama" or rope is not None:
            raise GGUFError(f"{meta.path}: rope_freqs.weight (per-dimension RoPE factors) in a "
                            f"{arch} file{' that also sets rope scaling' if rope else ''}; only "
                            "Llama 3 files carry them, alone")
        if (rope := llama3_rope(rope_freqs, config["rope_theta"], config["head_dim"])) is None:
            raise GGUFError(f"{meta.path}: rope_freqs.weight holds per-dimension RoPE factors that "
                            "are not Llama 3 rope scaling; not supported")
        config["rope_scaling"] = rope
    if (window := meta.get(f"{arch}.attention.sliding_window")) is not None:
        config["sliding_window"] = window
    if arch == "llama":
        names = list(tensor_types)
        config["attention_bias"] = any(n.endswith(".attn_q.bias") for n in names)
        config["mlp_bias"] = any(n.endswith(".ffn_gate.bias") for n in names)
    if arch == "qwen3":
        config["attention_bias"] = False
    for key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                        ("padding", "pad_token_id"), ("unknown", "unk_token_id")):
        if (value := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None:
            config[hf_key] = value
    return config


def generation_config(meta: Metadata) -> dict[str, Any]:
    """generation_config.json's bos/eos: eos_token_id lists the end-of-generation tokens the file
    names (eos, then end-of-turn `eot` and end-of-message `eom` when distinct)."""
    gen: dict[str, Any] = {}
    if (bos := meta.get("tokenizer.ggml.bos_token_id")) is not None:
        gen["bos_token_id"] = bos
    eos = _unique(meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom"))
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if (pad := meta.get("tokenizer.ggml.padding_token_id")) is not None:
        gen["pad_token_id"] = pad
    return gen


def _unique(values: Iterable[Any]) -> list[int]:
    out: list[int] = []
    for v in values:
        if v is not None and v not in out:
            out.append(v)
    return out


def llama3_factors(rope: dict, theta: float, head_dim: int) -> np.ndarray:
    """The factor llama3 rope scaling divides each rotary frequency by (layers/rotary.py
    `llama3_inv_freq`, in float64): 1 for short wavelengths, `factor` for long ones, and
    1 / ((1 - s) / factor + s) between, s = (L / wavelength - low) / (high - low) clamped to [0, 1]."""
    inv_freq = default_inv_freq(theta, head_dim, torch.float64)
    return (inv_freq / llama3_inv_freq(inv_freq, rope)).numpy()


def llama3_rope(factors: np.ndarray, theta: float, head_dim: int) -> Optional[dict]:
    """The llama3 rope_scaling that produces `factors` (head_dim / 2 values), or None if none does.

    In the formula above s is linear in the frequency, s = a * inv_freq + b, and only (factor, a, b)
    matter: (low, high, L) enter through b = -low / (high - low) and a = L / (2 pi (high - low)).
    factor is the largest value; a and b are fitted on the blended entries; low = 1 (Meta's value)
    fixes the rest. The result is accepted only if it reproduces every factor (float32 rounding)."""
    f = np.asarray(factors, dtype=np.float64)
    if f.shape != (head_dim // 2,):
        return None
    factor = float(f.max())
    inv_freq = default_inv_freq(theta, head_dim, torch.float64).numpy()
    blended = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if factor <= 1 or blended.sum() < 2:
        return None
    s = (1 / f[blended] - 1 / factor) / (1 - 1 / factor)
    a, b = np.polyfit(inv_freq[blended], s, 1)
    if b >= 0 or a <= 0:
        return None
    span = -1 / b                                                     # high - low with low = 1
    rope = {"rope_type": "llama3", "factor": round(factor, 4), "low_freq_factor": 1.0,
            "high_freq_factor": round(1 + span, 4),
            "original_max_position_embeddings": int(round(2 * math.pi * a * span))}
    if np.allclose(llama3_factors(rope, theta, head_dim), f, rtol=1e-5, atol=0):
        return rope
    return None
