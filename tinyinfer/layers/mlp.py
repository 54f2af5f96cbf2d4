"""The SwiGLU feed-forward block (Shazeer, "GLU Variants Improve Transformer", 2020) of Llama-family
models: down(silu(gate(x)) * up(x)), with gate and up fused into one projection (concatenated at load),
so one GEMV reads both weights, and the activation in one op (`ops.silu_and_mul`: one kernel on a GPU)."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from tinyinfer import ops
from tinyinfer.layers.linear import Linear


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int, bias: bool = False):
        super().__init__()
        self.ffn = ffn
        self.gate_up_proj = Linear(hidden, 2 * ffn, bias=bias)      # fused: cat(gate, up) at load
        self.down_proj = Linear(ffn, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))   # (T, 2 ffn) -> (T, hidden)
