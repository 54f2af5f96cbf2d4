"""The SwiGLU feed-forward block (Shazeer, "GLU Variants Improve Transformer", 2020) of Llama-family
models: down(silu(gate(x)) * up(x)), with gate and up fused into one projection (concatenated at load),
so one GEMV reads both weights."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tinyinfer.layers.linear import Linear


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int, bias: bool = False):
        super().__init__()
        self.ffn = ffn
        self.gate_up_proj = Linear(hidden, 2 * ffn, bias=bias)      # fused: cat(gate, up) at load
        self.down_proj = Linear(ffn, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).split(self.ffn, dim=-1)     # (T, ffn) each
        return self.down_proj(F.silu(gate) * up)                    # (T, hidden)
