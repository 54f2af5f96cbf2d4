"""The continuous-batching scheduler (engine/scheduler.py) on its own, without a model: a step is
simulated by advancing each scheduled sequence's cached count (and appending a token once its prompt
is in). Checked exactly: decodes first at one token each, then prefill chunks in what is left of the
token budget; max_num_seqs caps the running batch; whole-prompt mode (no chunking) never mixes a
prefill with decodes and takes the first prompt even past the budget; speculative lookahead costs
1 + k budget and reserves k slots; an exhausted pool preempts the newest running sequence to the front
of the queue; a waiting prompt whose next block is being computed waits one step and hits it."""
from __future__ import annotations

import pytest

from scheduler_util import advance, plan, seq
from tinyinfer import SamplingParams
from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.engine.scheduler import Scheduler, check_limits
from tinyinfer.engine.sequence import Sequence, Status


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, None])
def test_limits_must_be_positive_integers(bad):
    for name, args in (("max_num_seqs", (bad, 8, True)), ("max_num_batched_tokens", (4, bad, True))):
        with pytest.raises(ValueError) as err:
            check_limits(*args)
        assert str(err.value) == f"{name}={bad!r} is invalid: give a positive integer"


def test_the_budget_must_fit_one_token_of_every_running_sequence_when_chunking():
    check_limits(8, 8, True)
    check_limits(9, 8, False)
    Scheduler(BlockManager(4, 4), 9, 8, chunked_prefill=False)
    with pytest.raises(ValueError) as err:
        check_limits(9, 8, True)
    assert str(err.value) == ("max_num_batched_tokens=8 is smaller than max_num_seqs=9: a step must fit "
                              "one token of every running sequence; raise max_num_batched_tokens or "
                              "lower max_num_seqs")
    with pytest.raises(ValueError, match="max_num_batched_tokens=8 is smaller than max_num_seqs=9"):
        Scheduler(BlockManager(4, 4), 9, 8)


def test_decodes_first_then_prefill_chunks_in_the_rest_of_the_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b, c = seq("a", 3), seq("b", 25), seq("c", 4)
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()
    assert plan(step) == ([], [("a", 3), ("b", 7)])            # c waits: the budget is spent
    advance(sched, step)
    step = sched.schedule()
    assert plan(step) == (["a"], [("b", 9)])                    # 1 decode + 9 of b's 18 left
    advance(sched, step)
    step = sched.schedule()
    assert plan(step) == (["a"], [("b", 9)])
    advance(sched, step)
    step = sched.schedule()
    assert plan(step) == (["a", "b"], [("c", 4)])
    assert [len(s.block_table) for s in (a, b, c)] == [2, 7, 1]   # a: 6 tokens, b: 26, c: 4
    assert sched.blocks.num_free == 64 - 10 and not sched.waiting


def test_max_num_seqs_caps_the_running_batch():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(4):
        sched.add(seq(f"s{i}", 2))
    step = sched.schedule()
    assert plan(step) == ([], [("s0", 2), ("s1", 2)]) and len(sched.waiting) == 2
    advance(sched, step)
    sched.finish(sched.running[0], "length")
    step = sched.schedule()
    assert plan(step) == (["s1"], [("s2", 2)])
    assert [s.request_id for s in sched.waiting] == ["s3"]


def test_whole_prompts_never_mix_with_decodes_and_the_first_may_pass_the_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=8,
                      chunked_prefill=False)
    a, b, c = seq("a", 12), seq("b", 5), seq("c", 3)
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()
    assert plan(step) == ([], [("a", 12)])                       # alone, past the budget of 8
    advance(sched, step)
    step = sched.schedule()
    assert plan(step) == ([], [("b", 5), ("c", 3)])             # 5 + 3 = 8: exactly the budget
    advance(sched, step)
    step = sched.schedule()
    assert plan(step) == (["a", "b", "c"], [])
    sched.add(seq("d", 9))
    advance(sched, step)
    assert plan(sched.schedule()) == ([], [("d", 9)])           # a waiting prompt goes first


def test_lookahead_costs_budget_and_reserves_slots_for_drafts():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = seq("a", 3), seq("b", 20)
    sched.add(a)
    advance(sched, sched.schedule())                             # a: 4 tokens, 3 cached
    sched.add(b)
    step = sched.schedule(lookahead=3)
    assert plan(step) == (["a"], [("b", 6)])                     # the decode costs 1 + 3
    assert len(a.block_table) == 2                               # 4 tokens + 3 drafts: 7 slots


def test_an_exhausted_pool_preempts_the_newest_to_the_front_of_the_queue():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c = seq("a", 4), seq("b", 4), seq("c", 4)
    for s in (a, b):
        sched.add(s)
    advance(sched, sched.schedule())                             # a, b: 5 tokens, 2 blocks left
    sched.add(c)
    step = sched.schedule()
    assert plan(step) == (["a", "b"], [])                        # c does not fit beside them
    advance(sched, step)                                         # a, b: 6 tokens, no block left
    sched.finish(b, "stop")
    assert bm.num_free == 2 and b.block_table == []
    sched.add(d := seq("d", 8))
    step = sched.schedule()
    assert plan(step) == (["a"], [("c", 4)])                     # d waits behind c
    advance(sched, step)
    for _ in range(3):                              # a and c decode; a's 9th token finds no block
        step = sched.schedule()
        advance(sched, step)
    assert c.status is Status.WAITING and c.num_preemptions == 1 and sched.num_preemptions == 1
    assert [s.request_id for s in sched.waiting] == ["c", "d"] and c.block_table == []
    assert c.num_cached == 0 and c.num_outputs == 3             # recomputed later, its tokens kept
    assert plan(step) == (["a"], [])
    # Preempted again once readmitted: the counts add up, per sequence and in all.
    sched.finish(a, "length")
    step = sched.schedule()
    assert plan(step) == ([], [("c", 7), ("d", 8)])
    sched.preempt(c)
    assert c.num_preemptions == 2 and sched.num_preemptions == 2


def test_a_prompt_whose_next_block_is_being_computed_waits_and_then_hits_it():
    bm = BlockManager(16, 4, enable_caching=True)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=6)
    shared = list(range(10, 18))                                 # 2 full blocks
    a = Sequence("a", shared + [1], SamplingParams(), 0)
    b = Sequence("b", shared + [2, 3], SamplingParams(), 0)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert plan(step) == ([], [("a", 6)])                        # b would compute a's blocks again
    advance(sched, step)
    step = sched.schedule()
    assert plan(step) == ([], [("a", 3)])                        # still pending: block 1
    advance(sched, step)
    step = sched.schedule()
    assert plan(step) == (["a"], [("b", 2)])                     # both blocks hit, 2 tokens left
    assert b.num_cached == 8 and b.block_table[:2] == a.block_table[:2]
    assert bm.hits == 8


def test_finish_frees_a_waiting_or_running_sequence():
    bm = BlockManager(8, 4)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=16)
    a, b = seq("a", 5), seq("b", 5)
    sched.add(a)
    sched.add(b)
    advance(sched, sched.schedule())
    sched.finish(b, "abort")
    assert list(sched.waiting) == [] and b.finish_reason == "abort" and b.status is Status.FINISHED
    sched.finish(a, "error", RuntimeError("x"))
    assert not sched.has_work() and bm.num_free == 8 and isinstance(a.error, RuntimeError)
