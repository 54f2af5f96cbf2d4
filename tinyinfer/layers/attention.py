"""Pluggable attention over the paged KV cache (Kwon et al., "PagedAttention", SOSP 2023).

`MultiHeadAttention` covers MHA, GQA and MQA through `num_kv_heads`: query heads are grouped, and each
group shares one K/V head, so the cache shrinks by num_heads / num_kv_heads (Ainslie et al., "GQA",
2023; Shazeer, "Fast Transformer Decoding", 2019). Family options: a bias on q/k/v (Qwen2) or on
q/k/v/o (`attention_bias`), and Qwen3's per-head RMSNorm of q and k before RoPE (QK-norm). The MLA
family plugs into the same interface (layers/mla.py). Every attention class provides:
    kv_dims(cfg)  -> ((Hkv, D), (Hkv, Dv) | None)   the per-token cache rows it stores
    forward(x, positions, rotary, meta, k_cache, v_cache) -> (T, hidden)
`attend` is the one dispatch of a step's queries: fresh prefill, paged decode / verify, long query
runs over a cached prefix, or a mixed step of decodes and prefill chunks (chunked prefill).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from tinyinfer import ops
from tinyinfer.config.model import ModelConfig
from tinyinfer.layers.linear import Linear
from tinyinfer.layers.norm import RMSNorm
from tinyinfer.layers.rotary import RotaryEmbedding
from tinyinfer.ops.kv_quant import roundtrip
from tinyinfer.ops.limits import MAX_KERNEL_Q_LEN


@dataclass(frozen=True)
class AttentionMetadata:
    """The flat, unpadded ("varlen") batch of one engine step; built once per step (engine/batch.py)."""
    slot_mapping: Tensor        # (T,) int64: cache slot of each new token, -1 = padding
    block_tables: Tensor        # (B, max_blocks) int32
    seq_lens: Tensor            # (B,) int32: cached tokens per sequence, the new ones included
    query_start_loc: Tensor     # (B+1,) int32: sequence b owns queries [qsl[b], qsl[b+1])
    max_q_len: int              # host-side: longest query run in this batch
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    prefill: bool               # no sequence has a cached prefix: attend over the fresh K/V
    num_decodes: int = 0        # host-side: leading sequences whose query runs are <= MAX_KERNEL_Q_LEN


def attend(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
           meta: AttentionMetadata, scale: float, k_scale: Optional[Tensor] = None,
           v_scale: Optional[Tensor] = None) -> Tensor:
    """Attention of the step's queries q (T, Hq, D); k, v are the fresh rows (already in the cache).
    k_scale / v_scale: a quantized cache's scales (ops/kv_quant.py), read by every path below."""
    if meta.prefill:
        # Fresh prompts: nothing cached before them, so attend over the new K/V directly (SDPA) -- as
        # a quantized cache gives them back, so that a prompt reads the same K/V whether its prefix
        # is computed now or found in the prefix cache.
        k, v = roundtrip(k, k_cache, k_scale), roundtrip(v, v_cache, v_scale)
        return ops.prefill_attention(q, k, v, meta.query_start_loc_host, scale)
    if meta.max_q_len <= MAX_KERNEL_Q_LEN:
        # Decode and draft verification: the paged-attention op (CUDA kernel on a GPU).
        return ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                   meta.query_start_loc, scale, k_scale, v_scale)
    # Long query runs over a cached prefix (a prompt after a shared prefix, a prefill chunk): gather +
    # SDPA per sequence. The decodes that lead a mixed step (chunked prefill) keep the paged op.
    d, qsl = meta.num_decodes, meta.query_start_loc_host
    t = qsl[d]
    out = ops.paged_prefill_attention(q[t:], k_cache, v_cache, meta.block_tables[d:],
                                      meta.seq_lens_host[d:], [x - t for x in qsl[d:]], scale,
                                      k_scale, v_scale)
    if d == 0:
        return out
    short = ops.paged_attention(q[:t], k_cache, v_cache, meta.block_tables[:d], meta.seq_lens[:d],
                                meta.query_start_loc[:d + 1], scale, k_scale, v_scale)  # (t, Hq, Dv)
    return torch.cat((short, out))


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        # Fused projection: one GEMV reads the q, k and v weights (concatenated at load).
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size,
                                  bias=cfg.attention_bias or cfg.qkv_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.splits = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        # Qwen3: RMSNorm over each head's q and k (weights (D,) shared by the heads), before RoPE.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    @staticmethod
    def kv_dims(cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
        return (cfg.num_kv_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim)

    def forward(self, x: Tensor, positions: Tensor, rotary: RotaryEmbedding,
                meta: AttentionMetadata, k_cache: Tensor, v_cache: Tensor,
                k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None) -> Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.splits, dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)              # (T, Hq, D)
        k = k.view(T, self.num_kv_heads, self.head_dim)           # (T, Hkv, D)
        v = v.view(T, self.num_kv_heads, self.head_dim)           # (T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # RoPE on q and k (rows of the rotary table gathered by position) and the K/V cache write in
        # one op (one kernel on a GPU); the rotated k comes back for fresh prefill, which attends over
        # it directly.
        q, k = ops.rope_store_kv(q, k, v, rotary.cos_sin_cache, positions, k_cache, v_cache,
                                 meta.slot_mapping, k_scale, v_scale)
        out = attend(q, k, v, k_cache, v_cache, meta, self.scale, k_scale, v_scale)  # (T, Hq, D)
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))
