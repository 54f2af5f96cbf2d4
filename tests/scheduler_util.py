"""Test helpers for the scheduler's tests: sequences without a model, and one simulated engine step."""
from __future__ import annotations

from tinyinfer import SamplingParams
from tinyinfer.engine.scheduler import Scheduler
from tinyinfer.engine.sequence import Sequence


def seq(rid: str, n: int, first: int = 3) -> Sequence:
    return Sequence(rid, list(range(first, first + n)), SamplingParams(max_tokens=64), 0)


def advance(sched: Scheduler, step) -> None:
    """What the engine does after the model ran: count the new cached tokens, commit full blocks,
    and give every sequence whose prompt is now all cached its next token."""
    bs = sched.blocks.block_size
    for s, n in zip(step.seqs, step.num_new):
        assert n >= 1 and len(s.block_table) * bs >= s.num_cached + n, "no slot for a new token"
        s.num_cached += n
        sched.blocks.commit(s)
        if s.num_cached == len(s):
            s.token_ids.append(1000 + len(s))


def plan(step) -> tuple[list[str], list[tuple[str, int]]]:
    return [s.request_id for s in step.decodes], [(s.request_id, n) for s, n in zip(step.prefills,
                                                                                     step.chunks)]
