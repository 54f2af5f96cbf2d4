"""Linear layers: `Linear`, the dense nn.Linear the checkpoint fills, run through `ops.linear` (torch's
matmul on a GPU, oneDNN on a reordered weight on a CPU: ops/cpu_matmul.py), and `Int4Linear`, a
weight-only INT4 linear whose weights stay 4-bit in memory and are dequantized inside the matmul
(`ops.int4_linear`: the tensor-core GEMV on a GPU). Weight-only quantization as in GPTQ (Frantar et
al., 2023) and AWQ (Lin et al., 2024); the format and its layouts are tinyinfer/ops/int4_format.py.
`ConcatLinear` keeps a fused projection (qkv_proj, gate_up_proj) as its separate parts when they
cannot share one weight.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from tinyinfer import ops
from tinyinfer.ops.int4_format import (TILE_K, TILE_N, check_shape, dequantize_kernel_layout,
                                    from_kernel_layout, to_kernel_layout)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) whose product is `ops.linear`."""

    def forward(self, x: Tensor) -> Tensor:
        # x (..., in_features) -> (..., out_features)
        return ops.linear(x, self.weight, self.bias)


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
        y = ops.int4_linear(x2, self.qweight, self.scales, self.zeros, self.group_size)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, act_order={self.perm is not None}")


class ConcatLinear(nn.Module):
    """A fused projection kept as its parts: y = cat(part_0(x), part_1(x), ...) (+ bias), the same
    output as one linear over the concatenated weights. Used when the parts cannot be concatenated --
    GPTQ act-order q / k / v (or gate / up) with different input permutations, each an Int4Linear
    gathering x by its own `perm` (quant/io.py). `bias` covers the concatenated output (N,)."""

    def __init__(self, parts: list[nn.Module], bias: Optional[Tensor] = None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([part(x) for part in self.parts], dim=-1)      # (..., N)
        return y if self.bias is None else y + self.bias
