"""The online engine (LLMEngine: add_request / step / abort): requests join a running batch between any
two steps and get exactly the tokens they get alone; aborts free every block and leave the other
requests' outputs unchanged, in every state a request can be in; preemption and speculative decoding
work when driven step by step; the deltas of a request concatenate to its whole output."""
from __future__ import annotations

import pytest

from hf_util import DRAFT, LLAMA
from tinyinfer import LLMEngine, RequestError, SamplingParams

PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo", "To be", "KING RICHARD III:\nNow is the winter",
           "First Citizen:\nBefore we proceed any further, hear me speak.", "MENENIUS:\nWhy"]


def params(i: int, max_tokens: int = 24) -> SamplingParams:
    if i % 2 == 0:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(temperature=0.9, top_k=40, seed=7 + i, max_tokens=max_tokens, ignore_eos=True)


def run(engine: LLMEngine, plan: dict[int, list[int]], abort_at: dict[int, list[str]] = {},
        max_steps: int = 500, stream: bool = True) -> dict[str, dict]:
    """Drive `engine` step by step: before step s, add the prompts plan[s] (as ids "p<i>") and abort
    the ids abort_at[s]. Returns per request its concatenated tokens, text (and the part of it that
    came before the final delta) and finish reason."""
    out: dict[str, dict] = {}
    for step in range(max_steps):
        for i in plan.get(step, []):
            rid = engine.add_request(PROMPTS[i], params(i), request_id=f"p{i}", stream=stream)
            out[rid] = {"tokens": [], "text": "", "early_text": "", "reason": None, "deltas": 0}
        for rid in abort_at.get(step, []):
            assert engine.abort(rid), f"{rid} should still be running at step {step}"
        if step > max(list(plan) + list(abort_at)) and not engine.has_unfinished():
            return out
        for d in engine.step():
            rec = out[d.request_id]
            assert rec["reason"] is None, f"{d.request_id} got a delta after it finished"
            rec["tokens"] += d.new_token_ids
            rec["text"] += d.new_text
            rec["early_text"] += "" if d.finished else d.new_text
            rec["deltas"] += 1
            if d.finished:
                rec["reason"] = d.finish_reason
    raise AssertionError("the engine did not finish in time")


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(LLAMA, device="cpu", dtype="float32", max_kv_tokens=4096)


@pytest.fixture(scope="module")
def alone(engine):
    """Each prompt run on its own: the reference every other schedule must reproduce."""
    return {f"p{i}": run(engine, {0: [i]})[f"p{i}"] for i in range(len(PROMPTS))}


def _assert_idle(engine: LLMEngine) -> None:
    stats = engine.stats
    assert stats["free_blocks"] == stats["num_blocks"], stats
    assert stats["running"] == stats["waiting"] == 0 and not engine.has_unfinished()


def test_requests_added_mid_run_produce_exactly_their_tokens_alone(engine, alone):
    got = run(engine, {0: [0, 1], 1: [2], 5: [3], 9: [4, 5]})
    for rid, want in alone.items():
        assert got[rid]["tokens"] == want["tokens"], rid
        assert got[rid]["text"] == want["text"] and got[rid]["reason"] == "length"
    assert all(r["deltas"] > 1 for r in got.values()), "output should arrive step by step"
    _assert_idle(engine)


@pytest.mark.parametrize("when", ["waiting", "after_prefill", "mid_decode"])
def test_abort_frees_blocks_and_leaves_the_others_unchanged(engine, alone, when):
    step = {"waiting": 3, "after_prefill": 4, "mid_decode": 12}[when]
    got = run(engine, {0: [0, 1], 3: [2]}, abort_at={step: ["p2"]})
    assert got["p2"]["reason"] == "abort"
    assert len(got["p2"]["tokens"]) == {"waiting": 0, "after_prefill": 1, "mid_decode": 9}[when]
    assert got["p2"]["tokens"] == alone["p2"]["tokens"][:len(got["p2"]["tokens"])]
    for rid in ("p0", "p1"):
        assert got[rid]["tokens"] == alone[rid]["tokens"]
    _assert_idle(engine)


@pytest.mark.parametrize("abort", [False, True], ids=["finish", "abort"])
def test_unstreamed_requests_get_the_streamed_text_whole_in_their_final_delta(engine, alone, abort):
    # stream=False (LLM.generate without on_token): text is decoded once, when a request ends --
    # the very text the streamed deltas add up to, aborted requests included.
    got = run(engine, {0: [0, 1], 3: [2]}, abort_at={12: ["p2"]} if abort else {}, stream=False)
    streamed = run(engine, {0: [0, 1], 3: [2]}, abort_at={12: ["p2"]} if abort else {})
    for rid, rec in got.items():
        assert rec["tokens"] == streamed[rid]["tokens"] and rec["reason"] == streamed[rid]["reason"]
        assert rec["text"] == streamed[rid]["text"] and rec["early_text"] == ""
        assert streamed[rid]["early_text"] and rec["deltas"] > 1, "tokens still arrive step by step"
    assert got["p2"]["reason"] == ("abort" if abort else "length")
    _assert_idle(engine)


def test_abort_of_an_unknown_or_finished_request_is_a_no_op(engine):
    assert engine.abort("no-such-request") is False
    run(engine, {0: [0]})
    assert engine.abort("p0") is False                  # finished and delivered
    assert engine.step() == []
    _assert_idle(engine)


def test_add_request_validates_now(engine):
    with pytest.raises(RequestError, match="empty prompt"):
        engine.add_request("")
    with pytest.raises(RequestError, match="exceeds the model's context"):
        engine.add_request("ROMEO:", SamplingParams(max_tokens=5000))
    rid = engine.add_request("ROMEO:", SamplingParams(max_tokens=2), request_id="dup")
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("JULIET:", request_id="dup")
    assert engine.abort(rid)
    assert [d.finish_reason for d in engine.step()] == ["abort"]
    _assert_idle(engine)


def test_preemption_driven_step_by_step_matches_an_ample_pool(alone):
    tiny = LLMEngine(LLAMA, device="cpu", dtype="float32", max_kv_tokens=10 * 16)
    got = run(tiny, {0: [0, 1, 2], 2: [3, 4], 6: [5]})
    assert tiny.stats["preemptions"] > 0, "the small pool should have forced preemption"
    for rid, want in alone.items():
        assert got[rid]["tokens"] == want["tokens"], rid
    _assert_idle(tiny)


def test_abort_while_preempted_frees_everything():
    tiny = LLMEngine(LLAMA, device="cpu", dtype="float32", max_kv_tokens=8 * 16)
    for i in range(4):
        tiny.add_request(PROMPTS[i], params(i, 40), request_id=f"p{i}")
    preempted = None
    for _ in range(200):
        tiny.step()
        preempted = next((s for s in tiny.scheduler.waiting if s.num_preemptions), None)
        if preempted is not None:
            break
    assert preempted is not None, "no request was preempted"
    assert tiny.abort(preempted.request_id)
    reasons = {}
    while tiny.has_unfinished():
        reasons.update({d.request_id: d.finish_reason for d in tiny.step() if d.finished})
    assert reasons.pop(preempted.request_id) == "abort"
    assert set(reasons.values()) == {"length"} and len(reasons) == 3
    _assert_idle(tiny)


@pytest.mark.parametrize("draft", ["ngram", DRAFT], ids=["ngram", "draft-model"])
def test_speculative_decoding_driven_step_by_step(alone, draft):
    spec = LLMEngine(LLAMA, device="cpu", dtype="float32", max_kv_tokens=4096, draft=draft,
                     speculate_k=3)
    greedy = [0, 2, 4]                                   # greedy requests: identical tokens
    got = run(spec, {0: [0], 2: [2], 3: [4]}, abort_at={})
    for i in greedy:
        assert got[f"p{i}"]["tokens"] == alone[f"p{i}"]["tokens"]
    # Abort in the middle of speculation: both pools (target and draft) get every block back.
    got = run(spec, {0: [0, 2]}, abort_at={4: ["p0"]})
    assert got["p0"]["reason"] == "abort" and got["p2"]["tokens"] == alone["p2"]["tokens"]
    _assert_idle(spec)
    proposer = spec.speculator.proposer
    if hasattr(proposer, "blocks"):
        assert proposer.blocks.num_free == proposer.blocks.num_blocks and not proposer.shadows


def test_stop_string_is_held_back_from_the_stream_until_resolved(engine):
    free = run(engine, {0: [0]})["p0"]["text"]
    stop = free[8:12]
    rid = engine.add_request(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]))
    streamed = ""
    while engine.has_unfinished():
        for d in engine.step():
            streamed += d.new_text
            assert stop not in streamed
            if d.finished:
                assert d.finish_reason == "stop" and d.request_id == rid
    assert streamed == free[:free.find(stop)]
    _assert_idle(engine)
