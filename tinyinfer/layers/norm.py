"""RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019), and the residual add that
precedes it fused into one op: each "+residual -> RMSNorm" pair of the decoder is `ops.fused_add_rmsnorm`
(one CUDA kernel on a GPU)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from tinyinfer import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # x (..., d). Normalise in float32 (as the reference implementations do), scale in the model dtype.
        return ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(norm(x + residual), x + residual): the residual add that precedes this norm, fused."""
        return ops.fused_add_rmsnorm(x, residual, self.weight, self.eps)
