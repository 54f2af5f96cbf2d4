"""The scheduler (engine/scheduler.py) at its edges, without a model -- each test pins a behaviour a
mutation run (docs/mutation-testing.md) found unchecked: has_work, the budget's last token (at admission
and for a running prefill), no empty chunk when speculative lookahead spends the budget, a step that
preempts admits nobody (also after a sequence preempts itself) and preempts as often as it must, prompts
behind one that waits for a pending block are admitted; and random workloads run to completion."""
from __future__ import annotations

import random

import pytest

from scheduler_util import advance, plan, seq
from tinyinfer import SamplingParams
from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.engine.scheduler import Scheduler
from tinyinfer.engine.sequence import Sequence, Status


def test_has_work_while_anything_waits_or_runs():
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=8)
    assert not sched.has_work()
    sched.add(a := seq("a", 3))
    assert sched.has_work()
    advance(sched, sched.schedule())
    assert sched.has_work() and not sched.waiting
    sched.finish(a, "stop")
    assert not sched.has_work()


def test_the_last_token_of_the_budget_is_used():
    # 9 of 10 tokens go to a's prompt: the 1 left starts b (admission) and, next step, continues
    # b's prefill by exactly the 1 token the decodes leave.
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=9, max_num_batched_tokens=10)
    for s in (seq("a", 9), seq("b", 30)):
        sched.add(s)
    step = sched.schedule()
    assert plan(step) == ([], [("a", 9), ("b", 1)])
    advance(sched, step)
    for i in range(8):
        sched.add(seq(f"c{i}", 1))
    step = sched.schedule()                                      # a decodes, b takes 9, no room for c
    assert plan(step) == (["a"], [("b", 9)])
    advance(sched, step)
    assert plan(step := sched.schedule()) == (["a"], [("b", 9)])
    advance(sched, step)
    assert plan(step := sched.schedule()) == (["a"], [("b", 9)])
    advance(sched, step)
    assert plan(step := sched.schedule()) == (["a"], [("b", 2), ("c0", 1), ("c1", 1), ("c2", 1),
                                                       ("c3", 1), ("c4", 1), ("c5", 1), ("c6", 1)])


def test_a_prefill_gets_no_empty_chunk_when_lookahead_spends_the_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=3, max_num_batched_tokens=5)
    a, b = seq("a", 1), seq("b", 40)
    sched.add(a)
    advance(sched, sched.schedule())
    sched.add(b)
    advance(sched, sched.schedule())                             # a decodes, b starts: 4 tokens
    step = sched.schedule(lookahead=4)                           # a's decode costs all 5
    assert plan(step) == (["a"], [])


def test_a_preemption_step_admits_nobody_and_preempts_as_often_as_needed():
    bm = BlockManager(6, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c = seq("a", 8), seq("b", 4), seq("c", 4)
    for s in (a, b, c):
        sched.add(s)
    advance(sched, sched.schedule())                             # a: 2 blocks, b and c: 1 each
    sched.add(d := seq("d", 2))
    # a's decode with 8 drafts needs 17 slots (5 blocks): c then b are preempted, and d, which would
    # fit in what is left, waits: blocks are short this step.
    step = sched.schedule(lookahead=8)
    assert plan(step) == (["a"], []) and len(a.block_table) == 5
    assert [s.request_id for s in sched.waiting] == ["b", "c", "d"] and sched.num_preemptions == 2


def test_the_newest_sequence_preempts_itself_when_nothing_newer_is_left():
    bm = BlockManager(3, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq("a", 4), seq("b", 7)
    for s in (a, b):
        sched.add(s)
    advance(sched, sched.schedule())                             # a: 1 block (5 tokens), b: 2 (8)
    step = sched.schedule()                                      # a takes the last block
    assert plan(step) == (["a"], []) and b.status is Status.WAITING and b.num_preemptions == 1
    # b, preempted on its own behalf, came back to the front of the queue with its tokens.
    assert list(sched.waiting) == [b] and len(b) == 8 and bm.num_free == 1


def test_waiting_prompts_behind_one_that_waits_for_a_pending_block_are_admitted():
    bm = BlockManager(32, 4, enable_caching=True)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=4)
    shared = list(range(10, 18))
    a = Sequence("a", shared + [1], SamplingParams(), 0)
    sched.add(a)
    advance(sched, sched.schedule())                             # a: block 0 computed, 1 pending
    b1, b2 = (Sequence(r, shared + [2], SamplingParams(), 0) for r in ("b1", "b2"))
    c, d = seq("c", 1, first=50), seq("d", 1, first=60)
    for s in (b1, c, b2, d):
        sched.add(s)
    sched.max_num_batched_tokens = 8
    step = sched.schedule()
    assert plan(step) == ([], [("a", 5), ("c", 1), ("d", 1)])
    assert [s.request_id for s in sched.waiting] == ["b1", "b2"]


def test_a_prefill_continues_by_a_single_token_when_one_is_left():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=2, max_num_batched_tokens=2)
    sched.add(seq("a", 1))
    sched.add(seq("b", 9))
    step = sched.schedule()
    assert plan(step) == ([], [("a", 1), ("b", 1)])
    advance(sched, step)
    assert plan(sched.schedule()) == (["a"], [("b", 1)])


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_finish_and_no_step_that_preempts_admits(seed):
    rng = random.Random(seed)
    bm = BlockManager(rng.randint(6, 12), 4, enable_caching=rng.random() < 0.5)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=rng.choice([4, 6, 16]),
                      chunked_prefill=rng.random() < 0.7)
    seqs = [seq(f"s{i}", rng.randint(1, 12), first=rng.choice([3, 50])) for i in range(8)]
    for s in seqs:
        sched.add(s)
    target = {s.request_id: len(s) + rng.randint(1, 6) for s in seqs}
    for _ in range(500):
        if not sched.has_work():
            break
        waiting, before = set(map(id, sched.waiting)), sched.num_preemptions
        step = sched.schedule()
        assert step, "work left but nothing scheduled"
        if sched.num_preemptions > before:
            assert not any(id(s) in waiting for s in step.prefills), "admitted while preempting"
        advance(sched, step)
        for s in list(sched.running):
            if s.num_cached == len(s) - 1 and len(s) >= target[s.request_id]:
                sched.finish(s, "length")
    assert not sched.has_work() and all(len(s) >= target[s.request_id] for s in seqs)
    assert bm.num_free == bm.num_blocks


def test_a_sequence_that_preempts_itself_is_not_readmitted_in_that_step():
    # a (4 tokens) and b (9) decode in a full pool of 3 blocks; b needs a third block and is the
    # newest: it preempts itself. One token of budget is left, and a 1-token chunk of b would fit in
    # the blocks b just gave back -- but a step that preempts admits nobody.
    bm = BlockManager(3, 4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=2)
    a, b = seq("a", 3), seq("b", 8)
    for s in (a, b):
        assert bm.admit(s, [], len(s))
        s.num_cached, s.status = len(s), Status.RUNNING
        s.token_ids.append(7)
        sched.running.append(s)
    step = sched.schedule()
    assert plan(step) == (["a"], []) and list(sched.waiting) == [b] and bm.num_free == 2
