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

import enum
import itertools
from collections import deque
from typing import Optional

from tinyinfer.kv_cache import BlockAllocator
from tinyinfer.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    """One request: its tokens, its block table and its sampling state."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, seed: int):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.token_ids = list(prompt_ids)          # prompt + generated
        self.params = params
        self.seed = seed
        self.block_table: list[int] = []
        self.num_cached = 0                        # tokens whose K/V are in the cache
        self.status = Status.WAITING
        self.finish_reason: Optional[str] = None   # "stop" | "length" | "error"
        self.error: Optional[Exception] = None
        self.text = ""                             # detokenized output (stop strings cut off)
        self.num_preemptions = 0

    # -- output text: incremental detokenization and stop conditions ---------------------------
    def attach_text(self, tokenizer, eos_ids: list[int]) -> None:
        from tinyinfer.tokenizer import IncrementalDetokenizer
        p = self.params
        self.detok = IncrementalDetokenizer(tokenizer, self.prompt_ids)
        self.stop_ids = set(p.stop_token_ids or []) | (set() if p.ignore_eos else set(eos_ids))
        self.stops = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
        self._checked = 0                          # text before this offset holds no stop string

    def detok_push(self, tok: int) -> None:
        if tok not in self.stop_ids:               # eos / stop ids end the text, unrendered
            self.text += self.detok.push(tok)

    def stop_hit(self) -> bool:
        """True if the text now contains a stop string; the text is cut where it starts."""
        for stop in self.stops:
            idx = self.text.find(stop, max(0, self._checked - len(stop) + 1))
            if idx >= 0:
                self.text = self.text[:idx]
                return True
        self._checked = len(self.text)
        return False

    def stream_len(self) -> int:
        """Length of the text safe to show: hold back a tail that may be the start of a stop string."""
        held = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:k]):
                    held = k
                    break
        return len(self.text) - held

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    def blocks_needed(self, num_tokens: int, block_size: int) -> int:
        return max(0, -(-num_tokens // block_size) - len(self.block_table))


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int = 256,
                 max_prefill_tokens: int = 8192):
        self.allocator, self.block_size = allocator, block_size
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        seq.block_table += self.allocator.allocate(seq.blocks_needed(num_tokens, self.block_size))

    def schedule(self, lookahead: int = 0) -> tuple[list[Sequence], bool]:
        """Pick this step's batch. Returns (sequences, is_prefill). `lookahead` extra slots per
        decoding sequence are reserved too (speculative drafts)."""
        batch, tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            need = seq.blocks_needed(len(seq), self.block_size)
            if batch and tokens + len(seq) > self.max_prefill_tokens:
                break
            if need > self.allocator.num_free:
                break
            self.waiting.popleft()
            self._grow(seq, len(seq))
            seq.status = Status.RUNNING
            batch.append(seq)
            tokens += len(seq)
        if batch:
            self.running += batch
            return batch, True
        # Decode: every running sequence needs slots for its next 1 + lookahead tokens.
        ordered = list(self.running)
        for seq in ordered:
            if seq.status is not Status.RUNNING:
                continue                            # preempted below on behalf of an older one
            need = seq.blocks_needed(len(seq) + lookahead, self.block_size)
            while need > self.allocator.num_free:
                victim = next(s for s in reversed(self.running) if s.status is Status.RUNNING)
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self._grow(seq, len(seq) + lookahead)
        return [s for s in self.running if s.status is Status.RUNNING], False

    def preempt(self, seq: Sequence) -> None:
        """Free all of `seq`'s blocks; it will be prefilled again (prompt + outputs) later."""
        self.allocator.release(seq.block_table)
        seq.block_table, seq.num_cached = [], 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, error: Optional[Exception] = None) -> None:
        seq.status, seq.finish_reason, seq.error = Status.FINISHED, reason, error
        if seq.block_table:
            self.allocator.release(seq.block_table)
            seq.block_table = []
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the first `num_tokens` tokens' cache slots (speculative rollback): blocks that
        become empty go back to the allocator."""
        keep = -(-num_tokens // self.block_size)
        if keep < len(seq.block_table):
            self.allocator.release(seq.block_table[keep:])
            seq.block_table = seq.block_table[:keep]
        seq.num_cached = min(seq.num_cached, num_tokens)
