"""PagedAttention's memory manager: the KV cache cut into fixed-size blocks.

A sequence owns a *block table* (a list of block ids); token position p lives in block
table[p // block_size] at offset p % block_size. Blocks come from one free list shared by every
request, so sequences of any length share the memory without fragmentation, and a finished sequence
gives its blocks back at once. Ref counts let several sequences share the full blocks of a common
prefix. Read more: Kwon et al., "Efficient Memory Management for LLM Serving with PagedAttention", 2023.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import torch


class OutOfBlocks(RuntimeError):
    """The pool has no free block left (the scheduler preempts before this can happen)."""


class BlockAllocator:
    """Plain-Python bookkeeping of block ids; the storage lives in `PagedKVCache`."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int = 1) -> list[int]:
        if n > len(self.free):
            raise OutOfBlocks(f"asked for {n} KV blocks, only {len(self.free)} of "
                              f"{self.num_blocks} are free")
        blocks = [self.free.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def share(self, block: int) -> None:
        """Another sequence starts using `block` (e.g. a common prompt prefix)."""
        if self.ref_counts[block] <= 0:
            raise ValueError(f"cannot share block {block}: it is not allocated")
        self.ref_counts[block] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block id {b} out of range [0, {self.num_blocks})")
            if self.ref_counts[b] <= 0:
                raise ValueError(f"double free of KV block {b}")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free.append(b)


class PagedKVCache:
    """Per-layer storage tensors in the FlashAttention paged layout.

    k_caches[i]: (num_blocks, block_size, n_kv_heads, head_dim)
    v_caches[i]: (num_blocks, block_size, n_kv_heads, v_head_dim), or None when the attention keeps a
                 single latent row per token (MLA), whose V is a view of K.
    """

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
        return num_layers * per_layer * torch.tensor([], dtype=dtype).element_size()
