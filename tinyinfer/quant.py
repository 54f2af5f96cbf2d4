"""INT4 weight-only quantization: group-wise 4-bit weights, one scale and one zero point per group.

Decode reads every weight once per token, so it is bound by memory bandwidth: storing weights in 4 bits
instead of 16 reads ~4x fewer bytes. Activations stay fp16/bf16; each weight is dequantized on the fly
inside the GEMV kernel (cuda/int4_gemv.cu) as  w = (q - z) * s.

Canonical layout (what a tinyinfer INT4 file stores, see quant_io.py), for a linear W (N out, K in):
    qweight  uint8  (N, K/2)   byte b of row n holds k = 2b in its low nibble, k = 2b+1 in its high one
    scales   fp16   (N, K/G)   group g of row n covers k in [g*G, (g+1)*G); scales keep their own dtype
    zeros    uint8  (N, K/G)   integer zero point z (0..15 from our quantizer; up to 16 from GPTQ v1)
    W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]   (computed in fp32: exact)
Symmetric quantization is the case z = 8.

Kernel layout (what `ops.int4_linear` receives; built once at load by `to_kernel_layout`): the weight
is cut into tiles of 16 rows x 64 k. Each tile is 32 lanes x 4 int32 words (512 contiguous bytes, one
16-byte load per lane of a warp). Word j of lane l holds the 8 nibbles that lane feeds, as the A operand
of tensor-core instruction `mma.m16n8k16`, for the tile's k-slice j; see cuda/int4.cuh for the index
math (`nibble_row`, `nibble_k`). K is zero-padded to a multiple of 64 (only with G = 32).
    qweight  int32  (N/16, Kp/64, 32, 4)
    scales   dtype  (N/16, Kp/G, 16)      entry 2*r + h is row r + 8*h of the 16-row tile
    zeros    uint8  (N/16, Kp/G, 16)
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor, nn

from tinyinfer import ops

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


# ----------------------------------------------------------------------------------------------
# Quantizer: round-to-nearest per group, with an optional per-group clipping search
# ----------------------------------------------------------------------------------------------

def _round_up_to(scale: Tensor, dtype: torch.dtype) -> Tensor:
    # Rounding a scale *down* to its storage dtype would make (max - min) / s exceed 15 and clip the
    # extreme weights; rounding up keeps every in-range weight within s/2 of its level.
    s = scale.to(dtype)
    low = s.float() < scale                      # scales are positive: the next value is bits + 1
    bits = s.view(torch.int16) if dtype.itemsize == 2 else s.view(torch.int32)
    return torch.where(low, bits + 1, bits).view(dtype).float()


def _rtn(w: Tensor, lo: Tensor, hi: Tensor, ratio: float, scale_dtype: torch.dtype
         ) -> tuple[Tensor, Tensor, Tensor]:
    # w (R, ng, G) float32; lo <= 0 <= hi (R, ng, 1) its groups' min and max, shrunk by ratio
    # (1 = plain min/max). The range always holds 0 so that z is a valid 0..15 level.
    lo, hi = lo * ratio, hi * ratio
    tiny = torch.finfo(scale_dtype).tiny
    s = _round_up_to(((hi - lo) / 15).clamp(min=tiny), scale_dtype)      # (R, ng, 1)
    z = torch.round(-lo / s).clamp(0, 15)
    q = torch.round(w / s + z).clamp(0, 15)
    return q, s, z


def reconstruction_error(w: Tensor, w_hat: Tensor, power: int = 4) -> Tensor:
    """Per-group error sum |w - w_hat|^power over the last dim: what the clipping search minimizes."""
    d = (w_hat - w).abs()
    return (d.square().square() if power == 4 else d.pow(power)).sum(-1, keepdim=True)


def quantize_weight(w: Tensor, group_size: int = 128, clip_search: bool = True,
                    scale_dtype: torch.dtype = torch.float16, grid: int = 20,
                    min_ratio: float = 0.7, power: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize W (N, K) -> q uint8 (N, K) in 0..15, scales (N, K/G) scale_dtype, zeros uint8 (N, K/G).

    With clip_search, each group also tries shrinking its range to ratio * [min, max] for `grid`
    ratios down to `min_ratio` and keeps the one with the smallest reconstruction error
    sum |w - w_hat|^power; the ratio 1 (plain RTN) is among the candidates, so the search is never
    worse than RTN. Why power 4 and not the squared error: squared error clips too eagerly -- on the
    demo model it lowers the KL divergence from the bf16 model but raises perplexity by 3 %, because
    the few largest weights it clips matter more than their share of the squared error; the 4th power
    weighs those errors more and improves both (README, INT4 accuracy table)."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide K={k}")
    qs, ss, zs = [], [], []
    for rows in torch.split(w, max(1, (1 << 22) // k)):                   # bound the temporary memory
        wg = rows.float().reshape(rows.shape[0], -1, group_size)          # (R, ng, G)
        lo = wg.amin(-1, keepdim=True).clamp(max=0)
        hi = wg.amax(-1, keepdim=True).clamp(min=0)
        best = _rtn(wg, lo, hi, 1.0, scale_dtype)
        if clip_search:
            best_err = reconstruction_error(wg, (best[0] - best[2]) * best[1], power)
            for i in range(1, grid):
                q, s, z = _rtn(wg, lo, hi, 1 - (1 - min_ratio) * i / (grid - 1), scale_dtype)
                err = reconstruction_error(wg, (q - z) * s, power)
                better = err < best_err
                best = tuple(torch.where(better, new, old) for new, old in zip((q, s, z), best))
                best_err = torch.where(better, err, best_err)
        q, s, z = best
        qs.append(q.reshape(rows.shape[0], k).to(torch.uint8))
        ss.append(s.squeeze(-1).to(scale_dtype))
        zs.append(z.squeeze(-1).to(torch.uint8))
    return torch.cat(qs), torch.cat(ss), torch.cat(zs)


def dequantize(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """q (N, K) integer levels, scales/zeros (N, K/G) -> W (N, K) float32, exactly (q - z) * s."""
    n, k = q.shape
    qg = q.reshape(n, k // group_size, group_size).float()                 # (N, ng, G)
    return ((qg - zeros.float()[..., None]) * scales.float()[..., None]).reshape(n, k)


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
    q = torch.nn.functional.pad(q.to(torch.int64), (0, pad))
    scales = torch.nn.functional.pad(scales, (0, pad // group_size))
    zeros = torch.nn.functional.pad(zeros, (0, pad // group_size))
    nt, kb = n // TILE_N, kp // TILE_K
    nib = q.view(nt, 2, 8, kb, 2, 4, 2, 2, 2).permute(_perm(_DENSE_AXES, _PACKED_AXES))
    nib = nib.reshape(nt, kb, 32, 4, 8)
    shifts = torch.arange(0, 32, 4, device=q.device)
    words = (nib << shifts).sum(-1)                                    # (nt, kb, 32, 4) in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    ng = kp // group_size

    def pairs(t: Tensor) -> Tensor:                    # (N, ng) -> (N/16, ng, 16): entry 2*r + h
        return t.reshape(nt, 2, 8, ng).permute(0, 3, 2, 1).reshape(nt, ng, 16).contiguous()

    return words.contiguous(), pairs(scales), pairs(zeros.to(torch.uint8))


def from_kernel_layout(qweight: Tensor, scales: Tensor, zeros: Tensor, k: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `to_kernel_layout`: -> q (N, K) uint8, scales (N, K/G), zeros (N, K/G)."""
    nt, kb = qweight.shape[:2]
    ng = scales.shape[1]
    if sys.byteorder == "little":     # byte b of a word holds nibbles 2b (low) and 2b + 1 (high)
        by = qweight.contiguous().view(torch.uint8).view(nt, kb, 32, 4, 4)
        nib = torch.stack([by & 0xF, by >> 4], dim=-1)                     # (nt, kb, 32, 4, 4, 2)
    else:
        shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
        nib = (qweight.unsqueeze(-1) >> shifts) & 0xF                      # (nt, kb, 32, 4, 8)
    nib = nib.reshape(nt, kb, 8, 4, 2, 2, 2, 2, 2).permute(_perm(_PACKED_AXES, _DENSE_AXES))
    q = nib.reshape(nt * 16, kb * TILE_K)[:, :k].to(torch.uint8)
    group_size = kb * TILE_K // ng

    def unpairs(t: Tensor) -> Tensor:
        return t.reshape(nt, ng, 8, 2).permute(0, 3, 2, 1).reshape(nt * 16, ng)[:, :k // group_size]

    return q, unpairs(scales), unpairs(zeros)


def dequantize_kernel_layout(qweight: Tensor, scales: Tensor, zeros: Tensor, k: int) -> Tensor:
    """Kernel-layout tensors -> W (N, K) float32: what `int4_linear`'s reference multiplies by."""
    q, s, z = from_kernel_layout(qweight, scales, zeros, k)
    return dequantize(q, s, z, k // s.shape[1])


# ----------------------------------------------------------------------------------------------
# Int4Linear and model conversion
# ----------------------------------------------------------------------------------------------

class Int4Linear(nn.Module):
    """A linear layer y = x @ W.T (+ b) whose W is stored in 4 bits, in the kernel layout.

    `perm` (act-order GPTQ checkpoints): the input columns are gathered once per call, x[:, perm], so
    that each quantization group is a contiguous run of K."""

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype,
                 scale_dtype: torch.dtype = torch.float16, bias: bool = False,
                 act_order: bool = False, device: Optional[torch.device] = None):
        super().__init__()
        check_shape(out_features, in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.dtype = dtype                                   # activation / output dtype
        kp = -(-in_features // TILE_K) * TILE_K
        nt, ng = out_features // TILE_N, kp // group_size
        self.register_buffer("qweight", torch.zeros(nt, kp // TILE_K, 32, 4, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("scales", torch.zeros(nt, ng, 16, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", torch.zeros(nt, ng, 16, dtype=torch.uint8, device=device))
        self.register_buffer("perm", torch.arange(in_features, device=device) if act_order else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, q: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                       dtype: torch.dtype, bias: Optional[Tensor] = None,
                       perm: Optional[Tensor] = None) -> "Int4Linear":
        """From canonical levels q (N, K), scales/zeros (N, K/G); repacks once into the kernel layout."""
        n, k = q.shape
        if scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
            raise ValueError(f"INT4 scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not "
                             f"match weight ({n}, {k}) with group size {group_size}: expected "
                             f"({n}, {k // group_size})")
        layer = cls(k, n, group_size, dtype, scales.dtype, bias is not None, perm is not None,
                    device=q.device)
        layer.qweight, layer.scales, layer.zeros = to_kernel_layout(q, scales, zeros, group_size)
        if perm is not None:
            layer.perm = perm.to(device=q.device, dtype=torch.int64)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, clip_search: bool = True
                    ) -> "Int4Linear":
        w = linear.weight.detach()
        check_shape(w.shape[0], w.shape[1], group_size)
        q, s, z = quantize_weight(w, group_size, clip_search)
        b = None if linear.bias is None else linear.bias.detach()
        return cls.from_quantized(q, s, z, group_size, w.dtype, bias=b)

    def canonical(self) -> tuple[Tensor, Tensor, Tensor]:
        """-> (q (N, K) uint8, scales (N, K/G), zeros (N, K/G)) in the input's original column order
        for K (after `perm` is applied, i.e. the order the kernel reads)."""
        return from_kernel_layout(self.qweight, self.scales, self.zeros, self.in_features)

    def dequantize(self) -> Tensor:
        """W (N, K) in the layer's dtype, columns in the input's own order (un-permuted)."""
        w = dequantize_kernel_layout(self.qweight, self.scales, self.zeros, self.in_features)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        # x (..., K) -> (..., N)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        # The kernel takes fp16/bf16 activations; a float32 model runs the reference on any device.
        op = ops.int4_linear_reference if x2.dtype == torch.float32 else ops.int4_linear
        y = op(x2, self.qweight, self.scales, self.zeros, self.group_size)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, act_order={self.perm is not None}")


def quantizable(name: str, module: nn.Module, group_size: int, quantize_head: bool) -> bool:
    """Which linears become INT4: every nn.Linear whose shape the format allows, except the lm_head
    unless asked (embedding and router are not nn.Linear and stay in the model dtype)."""
    if not isinstance(module, nn.Linear) or (name.split(".")[-1] == "lm_head" and not quantize_head):
        return False
    n, k = module.weight.shape
    return k % group_size == 0 and n % TILE_N == 0


def quantize_model(model: nn.Module, group_size: int = 128, quantize_head: bool = False,
                   clip_search: bool = True, progress: bool = False) -> list[str]:
    """Replace the model's linears by Int4Linear in place; returns the names of the replaced modules.

    A tied lm_head shares the embedding's tensor and is never quantized (the embedding stays dense)."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"INT4 group size {group_size} is not supported; use one of {GROUP_SIZES}")
    tied = getattr(getattr(model, "cfg", None), "tie_word_embeddings", False)
    names = [n for n, m in model.named_modules()
             if quantizable(n, m, group_size, quantize_head and not tied)]
    bar = names
    if progress:
        from tqdm import tqdm
        bar = tqdm(names, desc=f"quantizing to INT4 g{group_size}", unit="linear")
    for name in bar:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int4Linear.from_linear(getattr(parent, child), group_size, clip_search))
    return names
