"""RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019), and the residual add that
precedes it fused into one op: each "+residual -> RMSNorm" pair of the decoder is `ops.fused_add_rmsnorm`
(one CUDA kernel on a GPU).

On a CPU the residual stream is float32 whatever the model dtype (`residual_stream`): each sublayer's
output is added in float32 and each norm rounds once, to the model dtype. Teacher-forced on SmolLM2 Q4_1 in
bfloat16 it halves the KL against the float32 model (docs/cpu-performance.md); the float32 stream costs
nothing measurable there (a 576-wide row). The GPU keeps the model-dtype stream of its fused kernel."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from tinyinfer import ops


def residual_stream(x: Tensor) -> Tensor:
    """The residual stream that starts at the embeddings x (T, hidden): float32 on a CPU where x is in
    half precision, else x itself."""
    return x.float() if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) else x


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
