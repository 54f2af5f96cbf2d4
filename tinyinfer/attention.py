"""Pluggable attention over the paged KV cache.

`MultiHeadAttention` covers MHA, GQA and MQA through `num_kv_heads`: query heads are grouped, and each
group shares one K/V head, so the cache shrinks by num_heads / num_kv_heads (Ainslie et al., "GQA",
2023; Shazeer, "Fast Transformer Decoding", 2019). The MLA family plugs into the same interface
(see mla.py). Every attention class provides:
    kv_dims(cfg)  -> ((Hkv, D), (Hkv, Dv) | None)   the per-token cache rows it stores
    rotary(cfg)   -> RotaryEmbedding                 shared by all layers, computed once per step
    forward(x, positions, rope, meta, k_cache, v_cache) -> (T, hidden)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from tinyinfer import ops
from tinyinfer.config import ModelConfig, rope_inv_freq

MAX_KERNEL_Q_LEN = 16      # the CUDA paged-attention kernel covers q_len 1..16 per sequence


@dataclass(frozen=True)
class AttentionMetadata:
    """The flat, unpadded ("varlen") batch of one engine step; built once per step."""
    slot_mapping: Tensor        # (T,) int64: cache slot of each new token, -1 = padding
    block_tables: Tensor        # (B, max_blocks) int32
    seq_lens: Tensor            # (B,) int32: cached tokens per sequence, the new ones included
    query_start_loc: Tensor     # (B+1,) int32: sequence b owns queries [qsl[b], qsl[b+1])
    max_q_len: int              # host-side: longest query run in this batch
    query_start_loc_host: list[int]
    prefill: bool               # no sequence has a cached prefix: attend over the fresh K/V


class RotaryEmbedding(nn.Module):
    """RoPE in the Hugging Face layout: dims [0, D/2) pair with [D/2, D) (rotate_half)."""

    def __init__(self, inv_freq: Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)   # (D/2,) float32
        self.attention_scaling = attention_scaling

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]        # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)                            # (T, D)
        return ((emb.cos() * self.attention_scaling).to(dtype),
                (emb.sin() * self.attention_scaling).to(dtype))


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x (T, H, D); cos, sin (T, D)
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def attend(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
           meta: AttentionMetadata, scale: float) -> Tensor:
    """Attention of the step's queries; k, v are the fresh rows (already stored in the cache)."""
    if meta.prefill:
        # Fresh prompts: nothing cached before them, so attend over the new K/V directly (SDPA).
        return ops.prefill_attention(q, k, v, meta.query_start_loc_host, scale)
    if meta.max_q_len <= MAX_KERNEL_Q_LEN:
        # Decode and draft verification: the paged-attention op (CUDA kernel on a GPU).
        return ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                   meta.query_start_loc, scale)
    # Long queries over a cached prefix (e.g. a prompt after a shared prefix): the reference path;
    # the kernel is sized for q_len <= 16.
    return ops.paged_attention_reference(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                         meta.query_start_loc, scale)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        # Fused projection: one GEMV reads the q, k and v weights (concatenated at load).
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.splits = [cfg.q_size, cfg.kv_size, cfg.kv_size]

    @staticmethod
    def kv_dims(cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
        return (cfg.num_kv_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim)

    @staticmethod
    def rotary(cfg: ModelConfig) -> RotaryEmbedding:
        return RotaryEmbedding(rope_inv_freq(cfg, cfg.head_dim))

    def forward(self, x: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor],
                meta: AttentionMetadata, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.splits, dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)              # (T, Hq, D)
        k = k.view(T, self.num_kv_heads, self.head_dim)           # (T, Hkv, D)
        v = v.view(T, self.num_kv_heads, self.head_dim)           # (T, Hkv, D)
        cos, sin = rope                                            # (T, D) each
        # RoPE on q and k and the K/V cache write in one op (one kernel on a GPU); the rotated k
        # comes back for fresh prefill, which attends over it directly.
        q, k = ops.rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping)
        out = attend(q, k, v, k_cache, v_cache, meta, self.scale)  # (T, Hq, D)
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))
