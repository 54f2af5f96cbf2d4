"""Continuous batching over the paged KV cache, with preemption by recompute.

Each engine step is either a *prefill* step (admit waiting sequences, run their whole prompts) or a
*decode* step (one new token for every running sequence). Sequences join and leave between steps;
a finished sequence frees its blocks at once. When the block pool runs dry during decode, the newest
running sequences are preempted: their blocks are freed and they go back to the front of the queue,
to be prefilled again (prompt + generated tokens) once blocks are free -- nothing is lost, and since
the recomputed K/V are the same, so are the outputs. (Read more: Yu et al., "Orca", OSDI 2022;
Kwon et al., "vLLM", SOSP 2023.)
"""
from __future__ import annotations

from collections import deque
from typing import Optional

from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 256, max_prefill_tokens: int = 8192):
        self.blocks = blocks
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, lookahead: int = 0) -> tuple[list[Sequence], bool]:
        """Pick this step's batch. Returns (sequences, is_prefill). `lookahead` extra slots per
        decoding sequence are reserved too (speculative drafts)."""
        batch, tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if batch and tokens + len(seq) > self.max_prefill_tokens:
                break
            if not self.blocks.can_grow(seq, len(seq)):
                break
            self.waiting.popleft()
            self.blocks.grow(seq, len(seq))
            seq.status = Status.RUNNING
            batch.append(seq)
            tokens += len(seq)
        if batch:
            self.running += batch
            return batch, True
        # Decode: every running sequence needs slots for its next 1 + lookahead tokens.
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue                            # preempted below on behalf of an older one
            while not self.blocks.can_grow(seq, len(seq) + lookahead):
                victim = next(s for s in reversed(self.running) if s.status is Status.RUNNING)
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.grow(seq, len(seq) + lookahead)
        return [s for s in self.running if s.status is Status.RUNNING], False

    def preempt(self, seq: Sequence) -> None:
        """Free all of `seq`'s blocks; it will be prefilled again (prompt + outputs) later."""
        self.blocks.free(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, error: Optional[Exception] = None) -> None:
        """End `seq` (stop, length, error or abort) and free its blocks at once."""
        seq.status, seq.finish_reason, seq.error = Status.FINISHED, reason, error
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
