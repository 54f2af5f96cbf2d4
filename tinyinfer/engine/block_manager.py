"""PagedAttention's memory manager with automatic prefix caching: the KV cache cut into fixed-size
blocks (Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention", SOSP 2023), and full blocks reused across requests by content (the hashed-block
prefix cache of vLLM's automatic prefix caching; SGLang's RadixAttention, Zheng et al. 2024, keeps
the same prefixes in a radix tree instead).

A sequence owns a *block table* (a list of block ids); token position p lives in block
table[p // block_size] at offset p % block_size. Blocks come from one pool shared by every request.
`BlockAllocator` keeps block ids, reference counts and the cache index; `BlockManager` is what the
scheduler and speculative decoding call, one sequence at a time.

Prefix caching: a *full* block whose K/V are computed from final tokens is identified by
    h_i = sha256(h_{i-1} || token ids of block i)        (h_{-1} = b"")
so equal hashes mean equal token prefixes, position by position. `commit` registers such blocks;
`cached_prefix` finds the leading registered blocks of a new sequence and `admit` takes them over
(ref count + 1), so only the rest is prefilled. A block whose ref count drops to 0 keeps its contents
and stays findable: it is free (counted in `num_free`) but evicted only when no empty block is left,
least recently freed first. Registered blocks are never written again (a sequence writes only at
positions >= its cached count), so blocks shared by running sequences are read-only.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Optional

from tinyinfer.engine.sequence import Sequence


class OutOfBlocks(RuntimeError):
    """The pool has no free block left (the scheduler preempts before this can happen)."""


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The prefix-cache key of a full block: sha256 of the parent block's key and the token ids."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockAllocator:
    """Plain-Python bookkeeping of block ids; the storage lives in engine/kv_cache.py.

    Free blocks are either empty (nothing worth keeping) or cached (a registered hash, evictable,
    least recently freed first); allocation takes empty blocks first."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.empty: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()     # free and cached, LRU first
        self.ref_counts = [0] * num_blocks
        self.hashes: list[Optional[bytes]] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}                           # block hash -> block id
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.empty) + len(self.evictable)

    def allocate(self, n: int = 1) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} KV blocks, only {self.num_free} of "
                              f"{self.num_blocks} are free")
        blocks = []
        for _ in range(n):
            if self.empty:
                b = self.empty.popleft()
            else:                                     # evict the least recently freed cached block
                b, _ = self.evictable.popitem(last=False)
                del self.cached[self.hashes[b]]
                self.hashes[b] = None
                self.evictions += 1
            self.ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def share(self, block: int) -> None:
        """Another sequence starts using `block` (allocated, or free but still cached)."""
        if self.ref_counts[block] == 0:
            if block not in self.evictable:
                raise ValueError(f"cannot share block {block}: it is not allocated")
            del self.evictable[block]
        self.ref_counts[block] += 1

    def register(self, block: int, key: bytes) -> None:
        """`block` holds the final K/V of the prefix `key` names: make it findable. A prefix already
        cached in another block keeps that block (this one stays unregistered)."""
        if key not in self.cached and self.hashes[block] is None:
            self.cached[key] = block
            self.hashes[block] = key

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block id {b} out of range [0, {self.num_blocks})")
            if self.ref_counts[b] <= 0:
                raise ValueError(f"double free of KV block {b}")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self.hashes[b] is None:
                    self.empty.append(b)
                else:
                    self.evictable[b] = None          # most recently freed: evicted last


class BlockManager:
    """Block tables of sequences over one allocator; `enable_caching` turns prefix caching on."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.queries = self.hits = 0          # tokens looked up at admission / found in the cache

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

    # ------------------------------------------------------------------ prefix cache
    def _hashes(self, seq: Sequence, n: int) -> list[bytes]:
        """seq.block_hashes extended to its first n full blocks (tokens only grow, so they stay)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < n:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if i else b"", seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding `seq`'s leading full blocks. The block of its last token is never
        taken, even when cached: the last token must run through the model for its logits."""
        if not self.enable_caching:
            return []
        hit = []
        for key in self._hashes(seq, (len(seq) - 1) // self.block_size):
            b = self.allocator.cached.get(key)
            if b is None:
                break
            hit.append(b)
        return hit

    def pending(self, seqs: list[Sequence]) -> set[bytes]:
        """Keys of full blocks that these (running) sequences will compute but have not committed:
        a waiting sequence whose next block is among them should wait and hit it instead."""
        return {h for s in seqs for h in s.block_hashes[s.num_committed:]}

    def admit(self, seq: Sequence, hit: list[int], num_tokens: int) -> bool:
        """Start `seq` (no table yet): take over the cached blocks `hit` (from cached_prefix) and
        allocate the rest of `num_tokens` tokens. False, changing nothing, if the pool is too small."""
        reclaimed = sum(1 for b in hit if self.allocator.ref_counts[b] == 0)   # free, cached blocks
        new = max(0, self.blocks_for(num_tokens) - len(hit))
        if new + reclaimed > self.num_free:
            return False
        for b in hit:
            self.allocator.share(b)
        seq.block_table = hit + self.allocator.allocate(new)
        seq.num_committed = len(hit)
        seq.advance(len(hit) * self.block_size)                # the hit blocks' K/V are cached
        if self.enable_caching:
            self.queries += len(seq)
            self.hits += seq.num_cached
            self._hashes(seq, len(seq) // self.block_size)     # what it will compute: pending()
        return True

    def commit(self, seq: Sequence) -> None:
        """Register `seq`'s full blocks whose K/V are computed from final tokens (call once a step's
        tokens are settled: after a speculative rollback, not before)."""
        if not self.enable_caching:
            return
        full = min(seq.num_cached, len(seq.token_ids)) // self.block_size
        if full <= seq.num_committed:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_committed, full):
            self.allocator.register(seq.block_table[i], hashes[i])
        seq.num_committed = full

    # ------------------------------------------------------------------ giving blocks back
    def free(self, seq: Sequence) -> None:
        """Give back all of `seq`'s blocks. Committed blocks stay cached until evicted; the table is
        released last block first, so a shared prefix outlives the tails that follow it."""
        if seq.block_table:
            self.allocator.release(seq.block_table[::-1])
        seq.block_table, seq.num_cached, seq.num_committed = [], 0, 0

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the first `num_tokens` tokens' cache slots (speculative rollback): blocks that
        become empty go back to the allocator. Never cuts into committed blocks."""
        if num_tokens < seq.num_committed * self.block_size:
            raise ValueError(f"cannot truncate to {num_tokens} tokens: the first "
                             f"{seq.num_committed} blocks are committed to the prefix cache")
        keep = self.blocks_for(num_tokens)
        if keep < len(seq.block_table):
            self.allocator.release(seq.block_table[keep:])
            seq.block_table = seq.block_table[:keep]
        seq.num_cached = min(seq.num_cached, num_tokens)
