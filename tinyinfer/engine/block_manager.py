"""PagedAttention's memory manager: the KV cache cut into fixed-size blocks (Kwon et al., "Efficient
Memory Management for Large Language Model Serving with PagedAttention", SOSP 2023).

A sequence owns a *block table* (a list of block ids); token position p lives in block
table[p // block_size] at offset p % block_size. Blocks come from one free list shared by every
request, so sequences of any length share the memory without fragmentation, and a finished sequence
gives its blocks back at once. `BlockAllocator` keeps the block ids and their reference counts;
`BlockManager` is what the scheduler and speculative decoding call, one sequence at a time: grow a
table to cover more tokens, free it, or cut it back (speculative rollback).
"""
from __future__ import annotations

from collections import deque

from tinyinfer.engine.sequence import Sequence


class OutOfBlocks(RuntimeError):
    """The pool has no free block left (the scheduler preempts before this can happen)."""


class BlockAllocator:
    """Plain-Python bookkeeping of block ids; the storage lives in engine/kv_cache.py."""

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
        """Another sequence starts using `block`."""
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


class BlockManager:
    """Block tables of sequences over one allocator."""

    def __init__(self, num_blocks: int, block_size: int):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = block_size

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must gain for its table to cover `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend `seq`'s table to cover `num_tokens` tokens (OutOfBlocks if the pool is too small)."""
        seq.block_table += self.allocator.allocate(self.blocks_needed(seq, num_tokens))

    def free(self, seq: Sequence) -> None:
        """Give back all of `seq`'s blocks; nothing of it stays cached."""
        if seq.block_table:
            self.allocator.release(seq.block_table)
        seq.block_table, seq.num_cached = [], 0

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the first `num_tokens` tokens' cache slots (speculative rollback): blocks that
        become empty go back to the allocator."""
        keep = self.blocks_for(num_tokens)
        if keep < len(seq.block_table):
            self.allocator.release(seq.block_table[keep:])
            seq.block_table = seq.block_table[:keep]
        seq.num_cached = min(seq.num_cached, num_tokens)
