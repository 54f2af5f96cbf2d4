"""Test helpers for the engine's cache-sharing tests: random prompts, and a guard that checks every
K/V write of every step against the block manager's rules."""
from __future__ import annotations

import torch

from tinyinfer import LLM, LLMEngine


def engine_for(llm: LLM, **options) -> LLMEngine:
    """A fresh engine (empty prefix cache, new counters) around an already loaded model runner."""
    return LLMEngine.from_runner(llm.engine.runner, llm.tokenizer, **options)


def random_ids(n: int, seed: int, vocab: int = 1024) -> list[int]:
    """n token ids drawn from [3, vocab): no BOS / EOS / padding ids."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


class WriteGuard:
    """Wraps the engine's model runner: before every step, each slot the step writes must lie in a
    block owned by exactly one sequence and not committed to the prefix cache (such blocks are
    read-only). Records each step's token count and new-token counts."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.steps = engine, []
        runner = engine.runner
        self._execute, self._execute_sampled = runner.execute, runner.execute_sampled
        runner.execute, runner.execute_sampled = self.execute, self.execute_sampled

    def _check(self, batch) -> None:
        alloc, bs = self.engine.blocks.allocator, self.engine.block_size
        for slot in batch.slot_mapping:
            b = slot // bs
            assert alloc.ref_counts[b] == 1, f"step writes block {b} shared by {alloc.ref_counts[b]}"
            assert alloc.hashes[b] is None, f"step writes block {b}, committed to the prefix cache"
        self.steps.append(batch.num_new)

    def execute(self, batch, all_logits: bool = False):
        self._check(batch)
        return self._execute(batch, all_logits)

    def execute_sampled(self, batch):
        # A step that samples in the runner checks here; its eager fallback calls execute, which
        # must not count the step twice.
        self._check(batch)
        runner = self.engine.runner
        runner.execute = self._execute
        try:
            return self._execute_sampled(batch)
        finally:
            runner.execute = self.execute

    def remove(self) -> None:
        del self.engine.runner.execute          # the instance attributes: back to the class methods
        del self.engine.runner.execute_sampled


def assert_all_free(engine: LLMEngine) -> None:
    """Idle engine: every block is free and every reference count is back to 0."""
    stats = engine.stats
    assert stats["free_blocks"] == stats["num_blocks"] and stats["running"] == stats["waiting"] == 0
    assert not any(engine.blocks.allocator.ref_counts)
