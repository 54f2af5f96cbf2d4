"""Rotary position embeddings (RoPE, Su et al., "RoFormer", 2021) and every frequency variant tinyinfer
runs, in one place: the default geometric frequencies, Llama 3.1's frequency scaling (Meta, "The Llama 3
Herd of Models", 2024), and YaRN (Peng et al., "YaRN", 2023) with its attention-scaling factor.

`RotaryEmbedding` holds one table for the whole usable context, built once on the device in the model
dtype: row p = [cos(p f_0 .. p f_{D/2-1}) | sin(...)] x attention scaling, so a step gathers its rows by
position (inside the fused RoPE + K/V-write kernel on a GPU) instead of recomputing cos/sin. The rotation
itself is part of the op contract (ops/reference.py: `apply_rotary`, the rotate-half layout); DeepSeek's
interleaved pairs are permuted into that layout (`apply_rope_pairs`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from tinyinfer.config.model import ModelConfig
from tinyinfer.ops.reference import apply_rotary, rope_rows


def default_inv_freq(theta: float, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(dim/2,): f_i = theta^(-2i/dim)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype) / dim))


def llama3_inv_freq(inv_freq: Tensor, rs: dict) -> Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend linearly in between."""
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > old_ctx / low, inv_freq / factor,
                       torch.where(wavelen < old_ctx / high, inv_freq, blended))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(theta: float, dim: int, rs: dict) -> tuple[Tensor, float]:
    """YaRN: high-frequency dims keep their frequency, low-frequency dims are interpolated by `factor`,
    a linear ramp between; returns (inv_freq, attention scaling = mscale / mscale_all_dim)."""
    factor, old_ctx = rs["factor"], rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def dim_for_rotations(n: float) -> float:      # the dim whose wavelength fits n times in old_ctx
        return dim * math.log(old_ctx / (n * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = default_inv_freq(theta, dim)
    inv_freq = extrapolated / factor * ramp + extrapolated * (1 - ramp)
    scaling = rs.get("attention_factor")
    if scaling is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        scaling = (yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all
                   else yarn_mscale(factor))
    return inv_freq, float(scaling)


def rope_parameters(cfg: ModelConfig) -> tuple[int, Tensor, float]:
    """(rotary dim, inv_freq (dim/2,), attention scaling) for a model: MLA rotates its rope dims only."""
    dim = cfg.qk_rope_head_dim if cfg.is_mla else cfg.head_dim
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "yarn":
        return (dim, *yarn_inv_freq(cfg.rope_theta, dim, rs))
    inv_freq = default_inv_freq(cfg.rope_theta, dim)
    return dim, (llama3_inv_freq(inv_freq, rs) if kind == "llama3" else inv_freq), 1.0


class RotaryEmbedding(nn.Module):
    """The cos/sin table of every position of the usable context, in the model dtype (module doc)."""

    def __init__(self, inv_freq: Tensor, max_positions: int, dtype: torch.dtype,
                 device: torch.device, attention_scaling: float = 1.0):
        super().__init__()
        positions = torch.arange(max_positions, dtype=torch.float32, device=device)
        freqs = positions[:, None] * inv_freq.to(device)[None, :]                # (P, D/2) float32
        table = torch.cat((freqs.cos() * attention_scaling, freqs.sin() * attention_scaling), -1)
        self.register_buffer("cos_sin_cache", table.to(dtype), persistent=False)  # (P, D)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (T,) -> cos, sin (T, D) in the rotate-half layout."""
        return rope_rows(self.cos_sin_cache, positions)

    @staticmethod
    def for_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> "RotaryEmbedding":
        _, inv_freq, scaling = rope_parameters(cfg)
        return RotaryEmbedding(inv_freq, cfg.max_context, dtype, device, scaling)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """x (T, H, R); cos, sin (T, R) -> x rotated: rotate-half layout, or DeepSeek's interleaved pairs."""
    return apply_rope_pairs(x, cos, sin) if interleaved else apply_rotary(x, cos, sin)


def apply_rope_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on DeepSeek's layout, where dims (2i, 2i+1) form pair i. x (T, H, R); cos, sin (T, R) in
    the cat(freqs, freqs) layout. The pairs' first members, then their second members, are rotated in
    the rotate-half layout (`apply_rotary`): a fixed permutation of the dims, the same for q and k, so
    q . k is unchanged and the cached rope key is in the order Hugging Face's DeepSeek-V3 code gives."""
    return apply_rotary(torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1), cos, sin)
