"""Per-token log-probabilities (SamplingParams.logprobs) and min_tokens.

Logprobs must be those of the distribution the sampler drew from: checked against a float64
recomputation from one teacher-forced pass (temperature, top-k applied by hand), in plain and in
speculative decoding (the target's distribution at each emitted position, whatever was drafted)."""
from __future__ import annotations

import math

import pytest
import torch

from hf_util import DRAFT, LLAMA
from tinyinfer import LLM, SamplingParams

PROMPT = "ROMEO:\nBut, soft!"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=4096)


def reference(llm: LLM, prompt: list[int], out: list[int], temperature: float, top_k: int) -> torch.Tensor:
    """(len(out), V) float64 log-probabilities of softmax(top-k(logits / T)) at each output position."""
    logits = llm.logits(prompt + out[:-1]).double()[len(prompt) - 1:]              # (L, V)
    x = logits / temperature
    kth = x.topk(top_k, dim=-1).values[:, -1:]                                     # (L, 1)
    return x.masked_fill(x < kth, -math.inf).log_softmax(dim=-1)


def check(llm: LLM, out, temperature: float, top_k: int, n: int) -> None:
    ref = reference(llm, out.prompt_token_ids, out.token_ids, temperature, top_k)
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(ref[i, tok].item(), abs=1e-4)
        want = ref[i].topk(n)
        kept = [(t, v) for t, v in zip(want.indices.tolist(), want.values.tolist()) if v > -math.inf]
        assert [t for t, _ in lp.top] == [t for t, _ in kept], f"position {i}"
        assert [v for _, v in lp.top] == pytest.approx([v for _, v in kept], abs=1e-4)


def test_logprobs_are_those_of_the_sampled_distribution(llm):
    sp = SamplingParams(temperature=0.7, top_k=20, seed=3, max_tokens=12, ignore_eos=True, logprobs=5)
    check(llm, llm.generate(PROMPT, sp)[0], 0.7, 20, 5)


def test_filtered_tokens_are_never_listed_and_zero_lists_none(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_k=3, seed=1, max_tokens=6,
                                              ignore_eos=True, logprobs=5))[0]
    assert all(len(lp.top) == 3 for lp in out.logprobs)
    check(llm, out, 1.0, 3, 5)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=4, seed=1, ignore_eos=True, logprobs=0))[0]
    assert [lp.top for lp in out.logprobs] == [[]] * 4
    assert llm.generate(PROMPT, SamplingParams(max_tokens=4))[0].logprobs is None


def test_greedy_logprobs_rank_the_chosen_token_first(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                              logprobs=2))[0]
    assert all(lp.top[0][0] == lp.token_id for lp in out.logprobs)
    check(llm, out, 1.0, llm.config.vocab_size, 2)


@pytest.mark.parametrize("draft", ["ngram", DRAFT])
def test_speculative_logprobs_are_the_targets_at_each_emitted_position(llm, draft):
    spec = LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=4096, draft=draft, speculate_k=3)
    prompt = PROMPT + " " + PROMPT     # repeats: n-gram drafts get accepted
    sampled = SamplingParams(temperature=0.8, top_k=20, seed=5, max_tokens=16, ignore_eos=True,
                             logprobs=4)
    check(llm, spec.generate(prompt, sampled)[0], 0.8, 20, 4)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3)
    ours, plain = spec.generate(prompt, greedy)[0], llm.generate(prompt, greedy)[0]
    assert ours.token_ids == plain.token_ids
    assert [lp.logprob for lp in ours.logprobs] == pytest.approx([lp.logprob for lp in plain.logprobs],
                                                                 abs=1e-4)
    assert spec.figures()["tokens_per_target_step"] > 1      # drafts were really accepted


def test_min_tokens_ignores_stop_ids_until_reached(llm):
    base = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    toks = base.token_ids
    stop = toks[2]
    first = toks.index(stop)
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop])
    out = llm.generate(PROMPT, sp)[0]
    assert out.token_ids == toks[:first + 1] and out.finish_reason == "stop"
    sp.min_tokens = first + 2
    later = next((i for i in range(first + 1, 24) if toks[i] == stop and i + 1 >= sp.min_tokens), None)
    out = llm.generate(PROMPT, sp)[0]
    assert out.token_ids == (toks if later is None else toks[:later + 1])
    assert out.finish_reason == ("length" if later is None else "stop")


def test_min_tokens_ignores_stop_strings_until_reached(llm):
    base = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    stop = base.text[1:3]
    assert base.text.count(stop) == 1, "pick a stop string that occurs once"
    cut = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                              stop=stop))[0]
    assert cut.text == base.text[:1] and cut.finish_reason == "stop"
    whole = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                stop=stop, min_tokens=8))[0]
    assert whole.text == base.text and whole.finish_reason == "length"


@pytest.mark.parametrize("field, value", [("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0),
                                          ("min_tokens", -1), ("min_tokens", 17)])
def test_bad_logprobs_and_min_tokens_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(max_tokens=16, **{field: value})
