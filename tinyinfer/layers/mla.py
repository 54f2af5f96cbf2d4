"""Multi-head Latent Attention (DeepSeek-V2/V3): cache one compressed latent per token, not K and V.

Each token's hidden state x is compressed to a latent c = RMSNorm(W_DKV x) of kv_lora_rank values
plus one rope key k_pe of qk_rope_head_dim values shared by all heads; that row of
kv_lora_rank + qk_rope_head_dim values is all the cache holds (one KV "head"). Per head h,
    k_h = [W_UK_h c ; k_pe]      v_h = W_UV_h c        (W_UK, W_UV: the two halves of kv_b_proj)
Two ways to attend:
  * naive: decompress k_h, v_h for every cached token and run ordinary multi-head attention. Readable,
    and the cheap way to prefill (the fresh tokens are decompressed once, then SDPA).
  * absorbed: q_h . k_h = (W_UK_h^T q_nope_h) . c + q_pe_h . k_pe, so fold W_UK into the query and attend
    over the cached rows directly, with V = the latent part of the same row; then apply W_UV to the
    attention output. Nothing is decompressed, so decode reads only the small latent cache.
Both give the same numbers (tests/test_mla.py checks it). Read more: DeepSeek-AI, "DeepSeek-V2", 2024,
section 2.1 (MLA) and appendix C (absorption); its YaRN rope lives in layers/rotary.py.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
from torch import Tensor

from tinyinfer import ops
from tinyinfer.config.model import ModelConfig
from tinyinfer.layers.attention import AttentionMetadata, attend
from tinyinfer.layers.linear import Linear
from tinyinfer.layers.norm import RMSNorm
from tinyinfer.layers.rotary import RotaryEmbedding, apply_rope, yarn_mscale
from tinyinfer.ops.kv_quant import gather_dequantized, is_quantized, roundtrip

MODES = ("auto", "naive", "absorbed")
LATENT_NORM_EPS = 1e-6      # DeepSeek's q_a_layernorm / kv_a_layernorm use their own eps, not rms_norm_eps


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk head dim), times mscale(factor, mscale_all_dim)^2 under YaRN: stretched positions
    flatten the attention logits, and DeepSeek compensates in the softmax temperature."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rs = cfg.rope_scaling
    if rs and rs.get("mscale_all_dim"):
        m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
        scale *= m * m
    return scale



class MultiHeadLatentAttention(nn.Module):
    """Same interface as attention.MultiHeadAttention. `mode`: 'auto' (naive for fresh prefill,
    absorbed whenever a cache is read), or force 'naive' / 'absorbed' everywhere (tests, benchmarks)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, d = cfg.num_heads, cfg.hidden_size
        self.num_heads, self.kv_lora_rank = H, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.interleaved = cfg.rope_interleave
        self.scale = softmax_scale(cfg)
        self.mode = "auto"
        qk = self.nope + self.rope
        if cfg.q_lora_rank:                     # V2 / V3: the query is low-rank too
            self.q_a_proj = Linear(d, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * qk, bias=False)
        else:                                   # V2-Lite: a plain query projection
            self.q_proj = Linear(d, H * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, cfg.kv_lora_rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, d, bias=cfg.attention_bias)

    @staticmethod
    def kv_dims(cfg: ModelConfig) -> tuple[tuple[int, int], None]:
        # One row per token: [latent (kv_lora_rank) | rope key (qk_rope_head_dim)]; V is a view of it.
        return (1, cfg.kv_lora_rank + cfg.qk_rope_head_dim), None

    def _kv_b_weight(self) -> Tensor:
        """kv_b_proj's weight as (H, nope + v, kv_lora_rank): rows [:nope] are W_UK_h, [nope:] W_UV_h.
        The absorbed path multiplies by slices of it, which an INT4 layer cannot do, so a quantized
        kv_b_proj is dequantized once and kept (it is small: kv_lora_rank x H x (nope + v))."""
        lin = self.kv_b_proj
        if isinstance(lin, nn.Linear):
            w = lin.weight
        else:
            if getattr(self, "_kv_b_dense", None) is None:
                self._kv_b_dense = lin.dequantize()
            w = self._kv_b_dense
        return w.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)

    def forward(self, x: Tensor, positions: Tensor, rotary: RotaryEmbedding,
                meta: AttentionMetadata, k_cache: Tensor, v_cache: Tensor | None = None,
                k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> Tensor:
        # A quantized latent cache (ops/kv_quant.py): one scale per token (int8) or per layer (fp8)
        # covers the whole row, latent and RoPE parts; V, the latent part, reads the same scales.
        T, H, r = x.shape[0], self.num_heads, self.kv_lora_rank
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(T, H, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([r, self.rope], dim=-1)   # (T, r), (T, rope)
        latent = self.kv_a_layernorm(latent)
        cos, sin = rotary.cos_sin(positions)                                      # (T, rope) each
        q_pe = apply_rope(q_pe, cos, sin, self.interleaved)                       # (T, H, rope)
        k_pe = apply_rope(k_pe[:, None, :], cos, sin, self.interleaved)           # (T, 1, rope)
        row = torch.cat((latent[:, None, :], k_pe), dim=-1)                       # (T, 1, r + rope)
        ops.store_kv(row, None, k_cache, None, meta.slot_mapping, k_scale)
        row = roundtrip(row, k_cache, k_scale)          # what the cache holds (fresh prefill reads it)
        naive = self.mode == "naive" or (self.mode == "auto" and meta.prefill)
        if naive:
            out = self._naive(q_nope, q_pe, row, k_cache, meta, k_scale)
        else:
            out = self._absorbed(q_nope, q_pe, row, k_cache, meta, k_scale)       # (T, H, v)
        return self.o_proj(out.reshape(T, H * self.v_dim))

    def _decompress(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        # rows (..., r + rope) -> k (..., H, nope + rope), v (..., H, v)
        latent, k_pe = rows.split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(latent).unflatten(-1, (self.num_heads, self.nope + self.v_dim))
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_pe = k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], self.rope)
        return torch.cat((k_nope, k_pe), dim=-1), v

    def _naive(self, q_nope: Tensor, q_pe: Tensor, row: Tensor, k_cache: Tensor,
               meta: AttentionMetadata, k_scale: Tensor | None = None) -> Tensor:
        q = torch.cat((q_nope, q_pe), dim=-1)                                     # (T, H, nope + rope)
        if meta.prefill:
            k, v = self._decompress(row[:, 0])                                    # (T, H, .)
            return ops.prefill_attention(q, k, v, meta.query_start_loc_host, self.scale)
        # Decompress every cache block this batch reads into ordinary per-head K/V blocks, renumber
        # the block tables to match, and run ordinary paged attention over them.
        BS = k_cache.shape[1]
        n_blocks = (meta.seq_lens.long() + BS - 1) // BS                          # (B,)
        read = torch.arange(meta.block_tables.shape[1], device=q.device)[None, :] < n_blocks[:, None]
        used = meta.block_tables[read].long().unique()                            # (U,)
        local = torch.zeros(k_cache.shape[0], dtype=torch.int32, device=q.device)
        local[used] = torch.arange(used.numel(), dtype=torch.int32, device=q.device)
        tables = torch.where(read, local[meta.block_tables.long().clamp(min=0)], -1).int()
        rows = k_cache[used, :, 0]                                                # (U, BS, r + rope)
        if is_quantized(k_cache):
            rows = gather_dequantized(k_cache, k_scale, (used,))[:, :, 0].to(row.dtype)
        k_blocks, v_blocks = self._decompress(rows)                               # (U, BS, H, .)
        return attend(q, None, None, k_blocks, v_blocks, replace(meta, block_tables=tables),
                      self.scale)

    def _absorbed(self, q_nope: Tensor, q_pe: Tensor, row: Tensor, k_cache: Tensor,
                  meta: AttentionMetadata, k_scale: Tensor | None = None) -> Tensor:
        w = self._kv_b_weight()
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]                           # (H, nope|v, r)
        # q_h . (W_UK_h c) = (W_UK_h^T q_h) . c: the query moves into latent space.
        q_latent = torch.einsum("thn,hnr->thr", q_nope, w_uk)                    # (T, H, r)
        q_abs = torch.cat((q_latent, q_pe), dim=-1)                               # (T, H, r + rope)
        # One KV head for all H query heads; V is the latent part of the same cached row.
        r = self.kv_lora_rank
        if meta.prefill:      # row as the cache holds it, V its latent part (not quantized twice)
            out = ops.prefill_attention(q_abs, row, row[..., :r], meta.query_start_loc_host, self.scale)
        else:
            out = attend(q_abs, row, row[..., :r], k_cache, k_cache[..., :r], meta, self.scale,
                         k_scale, k_scale)                                        # (T, H, r)
        return torch.einsum("thr,hvr->thv", out, w_uv)                            # (T, H, v)


def set_mla_mode(model: nn.Module, mode: str) -> None:
    """Pick the MLA path of every layer: 'auto' (default), 'naive' or 'absorbed'."""
    if mode not in MODES:
        raise ValueError(f"MLA mode {mode!r} unknown; use one of {', '.join(MODES)}")
    for m in model.modules():
        if isinstance(m, MultiHeadLatentAttention):
            m.mode = mode
