"""Continuous batching over the paged KV cache: chunked prefill, prefix-cache-aware admission, and
preemption by recompute.

Every step has a token budget, `max_num_batched_tokens`. With chunked prefill (the default) a step
carries every running decode (one token each, plus `lookahead` reserved slots for speculative drafts)
and, in what is left of the budget, prefill chunks: first of prompts already being prefilled, then of
newly admitted ones. A long prompt is prefilled over several steps while the decodes keep going, so
it stalls them for one chunk at a time instead of for its whole length (Agrawal et al., "Taming
Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve", OSDI 2024). Without chunking a step
is either a prefill step (whole prompts of admitted sequences) or a decode step, as in Orca / vLLM.

Admission asks the block manager for the cached prefix of a sequence (engine/block_manager.py) and
prefills only the rest; a waiting sequence whose next block is being computed right now by a running
sequence waits for it (and then hits it) instead of computing it a second time. When the block pool
runs dry, the newest running sequences are preempted: their blocks are freed (committed ones stay
cached) and they go back to the front of the queue, to be prefilled again (prompt + generated tokens)
later -- nothing is lost, and since the recomputed K/V are the same, so are the outputs. (Read more:
Yu et al., "Orca", OSDI 2022; Kwon et al., "vLLM", SOSP 2023.)
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.engine.sequence import Sequence, Status


@dataclass
class ScheduledStep:
    """One step's work: decodes first (one uncached token each), then prefill chunks."""
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[Sequence] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)         # new tokens of each prefill

    @property
    def seqs(self) -> list[Sequence]:
        return self.decodes + self.prefills

    @property
    def num_new(self) -> list[int]:
        return [1] * len(self.decodes) + self.chunks

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


def check_positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: give a positive integer")
    return value


def check_limits(max_num_seqs: object, max_num_batched_tokens: object, chunked_prefill: bool) -> None:
    """The scheduler's limits, checked before anything loads."""
    check_positive("max_num_seqs", max_num_seqs)
    check_positive("max_num_batched_tokens", max_num_batched_tokens)
    if chunked_prefill and max_num_batched_tokens < max_num_seqs:
        raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} is smaller than "
                         f"max_num_seqs={max_num_seqs}: a step must fit one token of every running "
                         "sequence; raise max_num_batched_tokens or lower max_num_seqs")


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 512, chunked_prefill: bool = True):
        check_limits(max_num_seqs, max_num_batched_tokens, chunked_prefill)
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, lookahead: int = 0) -> ScheduledStep:
        """Pick this step's work. `lookahead` extra slots per decoding sequence are reserved too
        (speculative drafts), and each decode counts 1 + lookahead tokens of the budget."""
        step = ScheduledStep()
        budget = self.max_num_batched_tokens
        if not self.chunked_prefill:
            self._admit(step, budget, whole=True)
            if not step:
                self._schedule_running(step, budget, lookahead)
            return step
        budget, preempted = self._schedule_running(step, budget, lookahead)
        if not preempted:                     # blocks are short: admit nobody this step
            self._admit(step, budget, whole=False)
        return step

    def _schedule_running(self, step: ScheduledStep, budget: int, lookahead: int
                          ) -> tuple[int, bool]:
        preempted = False
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue                            # preempted below on behalf of an older one
            todo = len(seq) - seq.num_cached
            if todo == 1:                           # decode: its last sampled token (+ drafts)
                n, cost, reserve = 1, 1 + lookahead, len(seq) + lookahead
            else:                                   # a prompt prefilled in chunks
                n = min(todo, budget)
                if n <= 0:
                    continue
                cost, reserve = n, seq.num_cached + n
            while not self.blocks.can_grow(seq, reserve):
                victim = next(s for s in reversed(self.running) if s.status is Status.RUNNING)
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.grow(seq, reserve)
            if todo == 1:
                step.decodes.append(seq)
            else:
                step.prefills.append(seq)
                step.chunks.append(n)
            budget -= cost
        return budget, preempted

    def _admit(self, step: ScheduledStep, budget: int, whole: bool) -> None:
        """Admit waiting sequences in order while the budget, the pool and max_num_seqs allow; with
        `whole`, each takes its whole prompt (the first one even past the budget)."""
        bs = self.blocks.block_size
        pending = self.blocks.pending(self.running) if self.blocks.enable_caching else set()
        i = 0
        while i < len(self.waiting) and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[i]
            hit = self.blocks.cached_prefix(seq)
            if len(hit) < len(seq.block_hashes) and seq.block_hashes[len(hit)] in pending:
                i += 1                              # its next block is being computed: wait for it
                continue
            todo = len(seq) - len(hit) * bs
            n = todo if whole else min(todo, budget)
            if whole and step.prefills and n > budget:
                break
            if not self.blocks.admit(seq, hit, len(hit) * bs + n):
                break
            del self.waiting[i]
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.prefills.append(seq)
            step.chunks.append(n)
            budget -= n
            pending.update(seq.block_hashes[seq.num_committed:])

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
