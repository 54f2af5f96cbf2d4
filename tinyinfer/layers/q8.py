"""A tied embedding and lm_head held in GGUF's Q8_0 (llama.cpp's 8-bit block format: 32 int8 levels and one
float16 scale per run of 32 weights of a row, w = d q), one copy for both.

A small model's tied embedding is its largest weight (SmolLM2-135M: 49152 x 576, 28 MiB as Q8_0 in the
file, 54 MiB in bfloat16) and its head reads it whole every step. On a CPU the loader keeps the file's
Q8_0 bytes (loading/gguf_weights.py): the embedding dequantizes the rows it looks up -- the values a
dense load gives, d q in float32 rounded to the model dtype -- and the head multiplies by the levels
through `ops.q8_linear` (cpu/q8_linear.h: integer dot products through AVX-512 VNNI, each run of 32
activations held as two int8 levels -- 15 bits, where llama.cpp's Q8_0 x Q8_0 keeps one level -- the
weight read once for all rows, float32 logits),
instead of a bfloat16 table plus its oneDNN-reordered copy (docs/cpu-performance.md: memory and quality).
The levels are held in that kernel's layout (`pack_q8`: 16 rows interleaved by 4 levels, stored + 128),
the table's only copy; a lookup gathers its rows from it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tinyinfer import ops
from tinyinfer.ops import reference

Q8_BLOCK = 32
Q8_COLS = 16            # rows of the table interleaved in one packed group (cpu/q8_linear.h)


def pack_q8(qs: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """GGUF's Q8_0 qs (N, K) int8, d (N, K/32) float16 -> the kernel's layout: packed (Np/16, K/4, 16, 4)
    uint8 holding q + 128 and scales (Np/16, K/32, 16), N padded to Np (a multiple of 16) with zero
    rows (ops/reference.py: q8_unpack reverses it)."""
    n, k = qs.shape
    pad = -n % Q8_COLS
    q = torch.cat([qs, qs.new_zeros(pad, k)]) if pad else qs
    s = torch.cat([d, d.new_zeros(pad, k // Q8_BLOCK)]) if pad else d
    g = (n + pad) // Q8_COLS
    packed = (q.view(g, Q8_COLS, k // 4, 4).permute(0, 2, 1, 3).contiguous().view(torch.uint8)
              .bitwise_xor_(0x80))                                          # q + 128 in two's complement
    return packed, s.view(g, Q8_COLS, k // Q8_BLOCK).permute(0, 2, 1).contiguous()


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
        packed, scales = pack_q8(qs, d)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)

    def levels(self) -> tuple[Tensor, Tensor]:
        """The table in GGUF's form, qs (N, K) int8 and d (N, K/32) (a copy: for tests and tools)."""
        return reference.q8_unpack(self.packed, self.scales, self.num_embeddings)

    def forward(self, ids: Tensor) -> Tensor:
        # ids (T,) -> (T, K) in the model dtype: d q of each looked-up row (exact in float32), rounded.
        flat = ids.reshape(-1)
        group, lane = flat // Q8_COLS, flat % Q8_COLS
        q = (self.packed[group, :, lane].int() - 128).float()                # (T, K/4, 4)
        d = self.scales[group, :, lane].float()                              # (T, K/32)
        rows = q.view(-1, self.embedding_dim // Q8_BLOCK, Q8_BLOCK) * d[..., None]
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
        y = ops.q8_linear(x.reshape(-1, self.in_features), emb.packed, emb.scales, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)
