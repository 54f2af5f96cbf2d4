"""A request as the scheduler and the model runner see it: its token ids, its block table in the paged
KV cache, how many of its tokens are cached (and which blocks are in the prefix cache), and its
sampling state -- no text (output processing, engine/output.py, owns the text). Continuous batching
moves sequences between WAITING, RUNNING and FINISHED between steps (Yu et al., "Orca", OSDI 2022).
"""
from __future__ import annotations

import enum
from typing import Iterable, Optional

from tinyinfer.sampling.params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request's tokens (prompt + generated), block table and sampling state."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, seed: int,
                 eos_ids: tuple[int, ...] = ()):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.token_ids = list(prompt_ids)          # prompt + generated
        self.params = params
        self.seed = seed                           # keys the sampler's randomness (sampling/sampler.py)
        # Token ids that end the request (they are kept in token_ids, never rendered as text).
        self.stop_ids = set(params.stop_token_ids or []) | (set() if params.ignore_eos else set(eos_ids))
        self.block_table: list[int] = []
        self.num_cached = 0                        # tokens whose K/V are in the cache
        # Prefix cache (engine/block_manager.py): keys of the full blocks of token_ids, and how many
        # leading blocks of the table are committed (registered, never written again).
        self.block_hashes: list[bytes] = []
        self.num_committed = 0
        self.status = Status.WAITING
        self.finish_reason: Optional[str] = None   # "stop" | "length" | "error" | "abort"
        self.error: Optional[Exception] = None
        self.num_preemptions = 0
        # Structured output (engine/grammar.py): the grammar matcher over the output tokens so far. It
        # lives as long as the sequence, so a preempted sequence keeps it across recompute.
        self.matcher = None

    def advance(self, computed: int = 0, tokens: Iterable[int] = ()) -> None:
        """The one way a sequence moves forward: a step computed the K/V of `computed` more of its
        tokens (now cached), and `tokens` join its tokens (drawn by the sampler; for a draft model's
        shadow sequence, its drafts). Rollback is BlockManager.truncate's."""
        self.num_cached += computed
        self.token_ids.extend(tokens)

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {len(self.prompt_ids)} prompt + {self.num_outputs} "
                f"output tokens, {self.num_cached} cached, {self.status.value})")
