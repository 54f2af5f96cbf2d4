"""What the hand-written CUDA kernels cover: every kernel limit the rest of the engine consults, in one
place. Outside these limits an op still runs (its CUDA impl takes the reference path, with a warning
where that is a surprise); inside them the kernel runs.

Paged attention (cuda/paged_attention.cu): (K head dim, V head dim) pairs, query rows per sequence,
power-of-two block sizes, fp16/bf16. Speculative decoding verifies k drafts with k + 1 query rows per
sequence, so its largest k follows from the kernel's q_len range (Leviathan et al. 2023).
"""
from __future__ import annotations

import torch

# Query rows per sequence the paged-attention kernel handles in one launch (decode = 1, verify = k + 1).
MAX_KERNEL_Q_LEN = 16
# (K head dim, V head dim): Llama-family heads, and MLA's latent row (512 + 64 rope) with V = its 512.
PAGED_ATTENTION_DIMS = frozenset({(64, 64), (128, 128), (576, 512)})
CUDA_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# Speculative decoding: k drafts + the last token are scored in one pass of <= MAX_KERNEL_Q_LEN rows.
MAX_SPECULATE_K = MAX_KERNEL_Q_LEN - 1


def paged_attention_kernel_covers(dtype: torch.dtype, k_dim: int, v_dim: int, block_size: int) -> bool:
    """True when the CUDA paged-attention kernel runs for these shapes (else the reference does)."""
    return (dtype in CUDA_KERNEL_DTYPES and (k_dim, v_dim) in PAGED_ATTENTION_DIMS
            and block_size > 0 and block_size & (block_size - 1) == 0)
