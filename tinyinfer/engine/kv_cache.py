"""The paged KV cache's storage: one K and one V tensor per layer in the FlashAttention / vLLM paged
layout (Kwon et al., "PagedAttention", SOSP 2023), and how many tokens of it fit in memory.

k_caches[i]: (num_blocks, block_size, n_kv_heads, head_dim)
v_caches[i]: (num_blocks, block_size, n_kv_heads, v_head_dim), or None when the attention keeps a single
             latent row per token (MLA), whose V is a view of K.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, k_dims: tuple[int, int],
                 v_dims: Optional[tuple[int, int]], dtype: torch.dtype, device: torch.device):
        self.block_size, self.num_blocks = block_size, num_blocks
        self.k_caches = [torch.zeros(num_blocks, block_size, *k_dims, dtype=dtype, device=device)
                         for _ in range(num_layers)]
        self.v_caches = [None if v_dims is None else
                         torch.zeros(num_blocks, block_size, *v_dims, dtype=dtype, device=device)
                         for _ in range(num_layers)]

    def layers(self) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        return list(zip(self.k_caches, self.v_caches))

    @staticmethod
    def bytes_per_token(num_layers: int, k_dims: tuple[int, int], v_dims: Optional[tuple[int, int]],
                        dtype: torch.dtype) -> int:
        per_layer = k_dims[0] * k_dims[1] + (0 if v_dims is None else v_dims[0] * v_dims[1])
        return num_layers * per_layer * dtype.itemsize


def default_kv_tokens(device: torch.device, per_token: int, max_context: int) -> int:
    """Tokens of KV cache to allocate when the user gives no limit: 80 % of the free GPU memory (the
    rest: activations, CUDA graphs, workspace); on a CPU a tenth of the available RAM, but no more
    than 64 full-context sequences need."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.80)
    else:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        budget = min(avail // 10, 64 * max_context * per_token)
    return budget // per_token
