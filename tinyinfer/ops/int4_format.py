"""INT4 weight format: group-wise 4-bit weights with one scale and one zero point (or offset) per group.

Decode reads every weight once per token, so it is bound by memory bandwidth: storing weights in 4 bits
instead of 16 reads ~4x fewer bytes. Activations stay fp16/bf16; each weight is dequantized on the fly
inside the INT4 matmul kernel (cuda/int4_linear.cu, cuda/int4_mm.cuh). Group-wise quantization as in
GPTQ (Frantar et al., 2023) and AWQ (Lin et al., 2024); this module owns the layouts only (quantizer: quantizer.py, files: io.py).

Canonical layout (what a tinyinfer INT4 file stores, see io.py), for a linear W (N out, K in):
    qweight  uint8  (N, K/2)   byte b of row n holds k = 2b in its low nibble, k = 2b+1 in its high one
    scales   fp16   (N, K/G)   group g of row n covers k in [g*G, (g+1)*G); scales keep their own dtype
    zeros    uint8  (N, K/G)   integer zero point z (0..15 from our quantizer; up to 16 from GPTQ v1):
                               W[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]
          or float  (N, K/G)   a per-group offset m, the scales' dtype (GGUF Q4_1's minimum):
                               W[n, k] = q[n, k] * s[n, k // G] + m[n, k // G]
    (computed in fp32: exact.) Symmetric quantization is the case z = 8.

Kernel layout (what `ops.int4_linear` receives; built once at load by `to_kernel_layout`): the weight
is cut into tiles of 16 rows x 64 k. Each tile is 32 lanes x 4 int32 words (512 contiguous bytes, one
16-byte load per lane of a warp). Word j of lane l holds the 8 nibbles that lane feeds, as the A operand
of tensor-core instruction `mma.m16n8k16`, for the tile's k-slice j; see cuda/int4.cuh for the index
math (`nibble_row`, `nibble_k`). K is zero-padded to a multiple of 64 (only with G = 32).
    qweight  int32  (N/16, Kp/64, 32, 4)
    scales   dtype  (N/16, Kp/G, 16)      entry 2*r + h is row r + 8*h of the 16-row tile
    zeros    uint8 or the scales' dtype  (N/16, Kp/G, 16)
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

GROUP_SIZES = (32, 64, 128)
TILE_N, TILE_K = 16, 64


def check_shape(n: int, k: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"INT4 group size {group_size} is not supported; use one of {GROUP_SIZES}")
    if k % group_size:
        raise ValueError(f"INT4 group size {group_size} does not divide the input width K={k}; "
                         f"pick a group size that divides {k} or keep this layer unquantized")
    if n % TILE_N:
        raise ValueError(f"INT4 needs the output width N to be a multiple of {TILE_N}, got N={n}; "
                         "keep this layer unquantized")


def dequantize(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """q (N, K) integer levels, scales/zeros (N, K/G) -> W (N, K) float32, exactly: (q - z) * s for
    integer zeros, q * s + z for floating (offset) zeros."""
    n, k = q.shape
    qg = q.reshape(n, k // group_size, group_size).float()                 # (N, ng, G)
    s, z = scales.float()[..., None], zeros.float()[..., None]
    w = qg * s + z if zeros.is_floating_point() else (qg - z) * s
    return w.reshape(n, k)


# ----------------------------------------------------------------------------------------------
# Canonical packing (two nibbles per byte) and the kernel layout
# ----------------------------------------------------------------------------------------------

def pack_nibbles(q: Tensor) -> Tensor:
    """(N, K) uint8 levels 0..15 -> (N, K/2) uint8, even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 levels."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


# A kernel-layout nibble (tile nt, kb; lane = 4*g + t; word j = 2*jh + jl; nibble i = 4*i2 + 2*i1 + i0)
# is the weight at row nt*16 + 8*i0 + g and column kb*64 + 32*jh + 8*t + 4*jl + 2*i1 + i2
# (cuda/int4.cuh: nibble_row / nibble_k). These views name the axes in that order.
_PACKED_AXES = "nt kb g t jh jl i2 i1 i0"
_DENSE_AXES = "nt i0 g kb jh t jl i1 i2"


def _perm(src: str, dst: str) -> list[int]:
    s = src.split()
    return [s.index(a) for a in dst.split()]


def to_kernel_layout(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Canonical levels q (N, K) uint8, scales/zeros (N, K/G) -> the kernel layout (module doc)."""
    n, k = q.shape
    check_shape(n, k, group_size)
    kp = -(-k // TILE_K) * TILE_K
    pad = kp - k                                       # nonzero only for G = 32; padded weights are 0
    q = torch.nn.functional.pad(q.to(torch.uint8), (0, pad))
    scales = torch.nn.functional.pad(scales, (0, pad // group_size))
    zeros = torch.nn.functional.pad(zeros, (0, pad // group_size))
    nt, kb = n // TILE_N, kp // TILE_K
    if sys.byteorder == "little":
        # Whole int32 words move, not nibbles: byte b of a word holds nibbles 2b (low) and 2b + 1
        # (high), i.e. rows g and g + 8 (i0) of one column, and its 4 bytes are 4 adjacent columns
        # (i1, i2) in the order b = 2*i2 + i1. So pair the rows into bytes, order each run of 4 columns,
        # view the bytes as words and permute the word axes only.
        qq = q.view(nt, 2, 8, kp)                                         # row nt*16 + 8*i0 + g
        by = qq[:, 0] | (qq[:, 1] << 4)                                   # (nt, 8, kp): (g, column)
        by = by.view(nt, 8, kp // 4, 2, 2).transpose(-1, -2).contiguous()  # (.., i1, i2) -> (i2, i1)
        words = by.view(nt, 8, kp).view(torch.int32).view(nt, 8, kb, 2, 4, 2)  # (nt, g, kb, jh, t, jl)
        words = words.permute(0, 2, 1, 4, 3, 5).reshape(nt, kb, 32, 4)   # (nt, kb, 4g + t, 2jh + jl)
    else:                             # big-endian host: assemble each word's value from its nibbles
        nib = q.view(nt, 2, 8, kb, 2, 4, 2, 2, 2).permute(_perm(_DENSE_AXES, _PACKED_AXES))
        nib = nib.reshape(nt, kb, 32, 4, 8).to(torch.int64)
        words = (nib << torch.arange(0, 32, 4, device=q.device)).sum(-1)  # (nt, kb, 32, 4) < 2^32
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    ng = kp // group_size

    def pairs(t: Tensor) -> Tensor:                    # (N, ng) -> (N/16, ng, 16): entry 2*r + h
        return t.reshape(nt, 2, 8, ng).permute(0, 3, 2, 1).reshape(nt, ng, 16).contiguous()

    zeros = zeros if zeros.is_floating_point() else zeros.to(torch.uint8)
    return words.contiguous(), pairs(scales), pairs(zeros)


def from_kernel_layout(qweight: Tensor, scales: Tensor, zeros: Tensor, k: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `to_kernel_layout`: -> q (N, K) uint8, scales (N, K/G), zeros (N, K/G)."""
    nt, kb = qweight.shape[:2]
    ng = scales.shape[1]
    kp = kb * TILE_K
    if sys.byteorder == "little":     # to_kernel_layout's steps backwards: words move whole
        w = qweight.contiguous().view(nt, kb, 8, 4, 2, 2).permute(0, 2, 1, 4, 3, 5).contiguous()
        by = w.view(torch.uint8).view(nt, 8, kp // 4, 2, 2).transpose(-1, -2).reshape(nt, 8, kp)
        q = torch.stack([by & 0xF, by >> 4], dim=1).reshape(nt * 16, kp)[:, :k]  # rows g, g + 8
    else:
        shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
        nib = (qweight.unsqueeze(-1) >> shifts) & 0xF                      # (nt, kb, 32, 4, 8)
        nib = nib.reshape(nt, kb, 8, 4, 2, 2, 2, 2, 2).permute(_perm(_PACKED_AXES, _DENSE_AXES))
        q = nib.reshape(nt * 16, kp)[:, :k].to(torch.uint8)
    group_size = kb * TILE_K // ng

    def unpairs(t: Tensor) -> Tensor:
        return t.reshape(nt, ng, 8, 2).permute(0, 3, 2, 1).reshape(nt * 16, ng)[:, :k // group_size]

    return q, unpairs(scales), unpairs(zeros)


def dequantize_kernel_layout(qweight: Tensor, scales: Tensor, zeros: Tensor, k: int) -> Tensor:
    """Kernel-layout tensors -> W (N, K) float32: what `int4_linear`'s reference multiplies by."""
    q, s, z = from_kernel_layout(qweight, scales, zeros, k)
    return dequantize(q, s, z, k // s.shape[1])

