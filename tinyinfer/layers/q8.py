"""A tied embedding and lm_head held in GGUF's Q8_0 (llama.cpp's 8-bit block format: 32 int8 levels and one
float16 scale per run of 32 weights of a row, w = d q), one copy for both.

A small model's tied embedding is its largest weight (SmolLM2-135M: 49152 x 576, 28 MiB as Q8_0 in the
file, 54 MiB in bfloat16) and its head reads it whole every step. On a CPU the loader keeps the file's
Q8_0 bytes (loading/gguf_weights.py): the embedding dequantizes the rows it looks up -- the values a
dense load gives, d q in float32 rounded to the model dtype -- and the head multiplies by the levels
through `ops.q8_linear` (cpu/q8_linear.h: the weight read once for all rows, float32 logits), instead
of a bfloat16 table plus its oneDNN-reordered copy (docs/cpu-performance.md: memory and quality).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tinyinfer import ops

Q8_BLOCK = 32


class Q8Embedding(nn.Module):
    """nn.Embedding's lookup over a Q8_0 table: qs (N, K) int8, d (N, K/32) float16."""

    def __init__(self, qs: Tensor, d: Tensor, dtype: torch.dtype):
        super().__init__()
        n, k = qs.shape
        if qs.dtype != torch.int8 or d.dtype != torch.float16 or k % Q8_BLOCK or d.shape != (n, k // Q8_BLOCK):
            raise ValueError(f"a Q8_0 table needs int8 levels (N, K) with K a multiple of {Q8_BLOCK} and "
                             f"float16 scales (N, K/{Q8_BLOCK}); got {qs.dtype} {tuple(qs.shape)} and "
                             f"{d.dtype} {tuple(d.shape)}")
        self.num_embeddings, self.embedding_dim, self.dtype = n, k, dtype
        self.register_buffer("qs", qs)
        self.register_buffer("d", d)

    def forward(self, ids: Tensor) -> Tensor:
        # ids (T,) -> (T, K) in the model dtype: d q of each looked-up row (exact in float32), rounded.
        q, d = self.qs[ids], self.d[ids]                                    # (T, K), (T, K/32)
        rows = q.float().view(*ids.shape, -1, Q8_BLOCK) * d.float()[..., None]
        return rows.view(*ids.shape, self.embedding_dim).to(self.dtype)


class Q8Head(nn.Module):
    """The lm_head over a Q8Embedding's own levels and scales (tied weights: no second copy)."""

    def __init__(self, embedding: Q8Embedding):
        super().__init__()
        self.embedding = [embedding]          # a plain list: not a submodule (no second registration)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, x: Tensor) -> Tensor:
        # x (..., K) -> float32 logits (..., N)
        emb = self.embedding[0]
        y = ops.q8_linear(x.reshape(-1, self.in_features), emb.qs, emb.d)
        return y.view(*x.shape[:-1], self.out_features)
