"""Memory arithmetic as a tool: how many bytes the weights and the KV cache take.

    python -m tinyinfer.memory --ckpt models/shakespeare-mla --context 4096 --batch 8
    python -m tinyinfer.memory --layers 32 --d-model 4096 --heads 32 --context 1000000
    python -m tinyinfer.memory --params 70B        # the command line: memory/__main__.py

Weights: every parameter costs 2 bytes in fp16/bf16, half a byte in INT4, plus one scale (fp16) and one
zero point (uint8) per group of `group_size` weights (the overhead of group-wise quantization, in
tinyinfer's INT4 format, ops/int4_format.py). For a checkpoint, `planned_int4` counts exactly what
`python -m tinyinfer.quantize` writes: the same plan (quant/plan.py: which linears, which group size
each, the embedding and unquantized head in the checkpoint's dtype) applied to the model built on the
meta device (checkpoints the engine cannot build get the estimate: every parameter at group_size).
KV cache: per token and per layer, standard attention stores K and V for every head (2 x heads x
head_dim values); GQA/MQA store them for the KV heads only (MQA: divided by the head count); MLA
(DeepSeek-V2) stores one compressed latent of kv_lora_rank values plus one shared rope key of
qk_rope_head_dim values. Units: GB = 10^9 bytes. The shape is read from
config.json directly (not through ModelConfig), so the tool also sizes checkpoints the engine refuses
to run (e.g. FP8 DeepSeek-V3).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
from dataclasses import dataclass
from typing import Optional

import torch

from tinyinfer.config.errors import ConfigError
from tinyinfer.config.model import ModelConfig
from tinyinfer.engine.kv_cache import PagedKVCache
from tinyinfer.loading.gguf import GGUFError, is_gguf, load_gguf
from tinyinfer.loading.gguf_file import open_reader
from tinyinfer.loading.weights import stored_dtype
from tinyinfer.models.transformer import Transformer, build_model
from tinyinfer.quant.plan import Int4Plan, plan_int4, planned_bytes

GB = 1e9
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class Shape:
    """Just the numbers the arithmetic needs. head_dim is the key head size; v_head_dim defaults to it."""
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: Optional[int] = None           # None = num_heads (MHA)
    head_dim: Optional[int] = None               # None = hidden_size // num_heads
    v_head_dim: Optional[int] = None
    kv_lora_rank: Optional[int] = None           # set = the model itself uses MLA
    qk_rope_head_dim: Optional[int] = None
    q_lora_rank: Optional[int] = None
    intermediate_size: Optional[int] = None
    vocab_size: Optional[int] = None
    tie_word_embeddings: bool = False
    # MoE (DeepSeek): layers from first_k_dense_replace on hold routed + shared experts
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    router_bias: bool = False                    # V3's e_score_correction_bias

    @property
    def k_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def v_dim(self) -> int:
        return self.v_head_dim or self.k_dim

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

def weight_bytes(num_params: float, bits: int = 16) -> float:
    return num_params * bits / 8


def int4_bytes(num_params: float, group_size: int = 128, scale_bytes: int = 2, zero_bytes: int = 1
               ) -> tuple[float, float]:
    """(packed 4-bit weights, per-group scales + zero points) in bytes. Defaults: tinyinfer's format
    (ops/int4_format.py), an fp16 scale and a uint8 zero point per group."""
    return num_params / 2, num_params / group_size * (scale_bytes + zero_bytes)


def planned_int4(cfg: dict, group_size: int = 128, quantize_head: bool = False
                 ) -> Optional[tuple[Int4Plan, int, int, str]]:
    """(plan, INT4 bytes, bytes of the rest, their dtype) of what `tinyinfer.quantize` writes for the
    checkpoint whose config.json is `cfg`; None when tinyinfer cannot build that model."""
    try:
        mc = ModelConfig.from_hf(cfg)
    except (ConfigError, KeyError, TypeError):
        return None
    dtype = stored_dtype(mc)
    model = build_model(mc, dtype, torch.device("meta"))          # shapes only, no memory
    plan = plan_int4(model, group_size, quantize_head)
    return (plan, *planned_bytes(model, plan), str(dtype).replace("torch.", ""))


def count_params(s: Shape) -> int:
    """Parameters of a Llama- or DeepSeek-style decoder from its shape alone."""
    d, H = s.hidden_size, s.num_heads
    if s.is_mla:
        nope = s.k_dim - s.qk_rope_head_dim
        r, rope = s.kv_lora_rank, s.qk_rope_head_dim
        q = (d * s.q_lora_rank + s.q_lora_rank + s.q_lora_rank * H * s.k_dim if s.q_lora_rank
             else d * H * s.k_dim)
        attn = q + d * (r + rope) + r + r * H * (nope + s.v_dim) + H * s.v_dim * d
    else:
        attn = d * H * s.k_dim + 2 * d * s.kv_heads * s.k_dim + H * s.v_dim * d
    dense_mlp = 3 * d * (s.intermediate_size or 0)
    moe_mlp = (d * s.n_routed_experts + (s.n_routed_experts if s.router_bias else 0)
               + 3 * d * s.moe_intermediate_size * (s.n_routed_experts + s.n_shared_experts))
    n_dense = min(s.first_k_dense_replace, s.num_layers) if s.n_routed_experts else s.num_layers
    layers = s.num_layers * (attn + 2 * d) + n_dense * dense_mlp + (s.num_layers - n_dense) * moe_mlp
    embed = (s.vocab_size or 0) * d * (1 if s.tie_word_embeddings else 2)
    return layers + embed + d


def _headers(path: str) -> list[dict]:
    files = ([path] if path.endswith(".safetensors") else
             [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")])
    headers = []
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            headers.append(json.loads(fh.read(n)))
    return headers


def checkpoint_params(path: str) -> Optional[tuple[int, int]]:
    """(parameter count, bytes on disk) from the safetensors headers only (no tensor is read);
    None when the path holds no safetensors file, or packed integer (INT4) weights, whose element
    count is not the parameter count."""
    if is_gguf(path):                 # a GGUF file: its tensor table (quantized blocks' bytes)
        tensors = open_reader(path)[0].tensors
        return (sum(int(t.n_elements) for t in tensors), sum(int(t.n_bytes) for t in tensors))
    count = nbytes = 0
    headers = _headers(path)
    for header in headers:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"][0] in "IU":
                return None
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            count += numel
            nbytes += numel * DTYPE_BYTES.get(info["dtype"], 2)
    return (count, nbytes) if headers else None


def read_config(path: str) -> dict:
    """config.json of a checkpoint directory, a config.json itself, a .safetensors file's config
    (beside it, or in its metadata as tinyinfer's INT4 files carry it), or a GGUF file's metadata as a
    config.json (loading/gguf_config.py)."""
    if is_gguf(path):
        try:
            return load_gguf(path).config
        except GGUFError as e:
            raise ValueError(str(e)) from None
    if path.endswith(".json"):
        cfg_path = path
    elif path.endswith(".safetensors"):
        meta = _headers(path)[0].get("__metadata__") or {}
        if "config" in meta:
            return json.loads(meta["config"])
        cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    else:
        cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no config.json at {cfg_path}; pass a checkpoint directory, a "
                                ".safetensors file or a config.json")
    with open(cfg_path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------

def kv_values_per_token_layer(s: Shape, kind: str) -> int:
    """Cached values per token per layer for attention `kind` with this model's heads.
    'mha': K and V for every query head; 'gqa': for the model's KV heads; 'mqa': one KV head;
    'mla': the latent + rope key (for a non-MLA shape, DeepSeek-V2's proportions: kv_lora_rank =
    4 x head_dim, rope dims = head_dim / 2, see DeepSeek-V2 paper, section 2.1)."""
    if kind == "mha":
        return s.num_heads * (s.k_dim + s.v_dim)
    if kind == "gqa":
        return s.kv_heads * (s.k_dim + s.v_dim)
    if kind == "mqa":
        return s.k_dim + s.v_dim
    if kind == "mla":
        if s.is_mla:
            return s.kv_lora_rank + s.qk_rope_head_dim
        return 4 * s.k_dim + s.k_dim // 2
    raise ValueError(f"unknown attention kind {kind!r}; use mha, gqa, mqa or mla")


def kv_rows_per_token_layer(s: Shape, kind: str) -> int:
    """Cached rows (one head's K or V, or MLA's latent row) per token per layer: an int8 cache stores a
    float16 scale for each (docs/kv-cache.md)."""
    heads = {"mha": s.num_heads, "gqa": s.kv_heads, "mqa": 1}
    return 1 if kind == "mla" else 2 * heads[kind]


def kv_bytes_per_token(s: Shape, kind: str, dtype_bytes: int = 2, kv_cache_dtype: str = "auto") -> int:
    """KV bytes per token: values at dtype_bytes ("auto"), or one byte each (fp8 / int8) plus a
    float16 scale per row."""
    if kv_cache_dtype == "auto":
        return s.num_layers * kv_values_per_token_layer(s, kind) * dtype_bytes
    scales = 2 * kv_rows_per_token_layer(s, kind)
    return s.num_layers * (kv_values_per_token_layer(s, kind) + scales)


def own_kind(s: Shape) -> str:
    if s.is_mla:
        return "mla"
    return "mha" if s.kv_heads == s.num_heads else ("mqa" if s.kv_heads == 1 else "gqa")


def shape_from_config(cfg) -> Shape:
    """A Shape from tinyinfer's ModelConfig (a model the engine has loaded)."""
    return Shape(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                 num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                 v_head_dim=cfg.v_head_dim if cfg.is_mla else None, kv_lora_rank=cfg.kv_lora_rank,
                 qk_rope_head_dim=cfg.qk_rope_head_dim if cfg.is_mla else None)


def kv_figures(cfg, dtype, kv_cache_dtype: str = "auto") -> dict:
    """For generate's figures line: the KV bytes per token the engine's cache really holds, and the
    ratio to what standard multi-head attention with the same heads would store in the model dtype."""
    ours = PagedKVCache.bytes_per_token(cfg.num_layers, *Transformer.kv_dims(cfg), dtype, kv_cache_dtype)
    mha = kv_bytes_per_token(shape_from_config(cfg), "mha", dtype.itemsize)
    return {"kv_bytes_per_token": ours, "kv_vs_mha": round(ours / mha, 4),
            "kv_mha_bytes_per_token": mha}


# ----------------------------------------------------------------------------------------------
# Shapes from a checkpoint's config.json
# ----------------------------------------------------------------------------------------------

def shape_from_hf(cfg: dict) -> Shape:
    heads = cfg["num_attention_heads"]
    mla = cfg.get("kv_lora_rank") is not None
    experts = cfg.get("n_routed_experts") or 0
    head_dim = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"] if mla
                else cfg.get("head_dim") or cfg["hidden_size"] // heads)
    return Shape(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
        v_head_dim=cfg.get("v_head_dim") if mla else None,
        kv_lora_rank=cfg.get("kv_lora_rank"), qk_rope_head_dim=cfg.get("qk_rope_head_dim") if mla else None,
        q_lora_rank=cfg.get("q_lora_rank") if mla else None,
        intermediate_size=cfg.get("intermediate_size"), vocab_size=cfg.get("vocab_size"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        n_routed_experts=experts, n_shared_experts=cfg.get("n_shared_experts") or 0,
        moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
        first_k_dense_replace=cfg.get("first_k_dense_replace") or 0,
        router_bias=experts > 0 and cfg.get("model_type") == "deepseek_v3")


def parse_count(text: str) -> float:
    """'70B', '7.5e9', '405b', '1.3M' -> a number."""
    units = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    t = text.strip().upper()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a count; write e.g. 70B or 7e9"
                                         ) from None
