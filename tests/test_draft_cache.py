"""The draft model's paged cache after speculative rollbacks (engine/proposers.py DraftModelProposer):
before every proposal, each shadow sequence's cached positions must hold exactly the K/V the draft model
computes for the target's tokens there -- a rollback that keeps a rejected draft token leaves that
token's K/V in the cache, which costs only acceptance (the target verifies every token), so only a
check of the cache's values catches it. The reference is the draft model run alone (prefill of the
same tokens in a cache of its own); layer 0 (a function of token and position only) must agree to
float32 rounding, the last layer (through attention over the cached prefix) closely."""
from __future__ import annotations

import pytest
import torch

from hf_util import DRAFT, LLAMA
from tinyinfer import LLM, SamplingParams
from tinyinfer.engine.batch import build_batch
from tinyinfer.engine.sequence import Sequence


def cached_k(runner, table: list[int], n: int, layer: int) -> torch.Tensor:
    """(n, Hkv, D): the K rows of positions 0..n of a sequence with block table `table`."""
    bs = runner.block_size
    k = runner.kv.k_caches[layer]
    return torch.stack([k[table[p // bs], p % bs] for p in range(n)])


@torch.inference_mode()
def reference_k(alone: LLM, tokens: list[int], layers: list[int]) -> list[torch.Tensor]:
    """The draft model's K rows for `tokens`, prefilled in one step in its own engine's cache."""
    engine = alone.engine
    seq = Sequence("ref", list(tokens), SamplingParams(max_tokens=1), 0)
    engine.blocks.grow(seq, len(seq))
    try:
        engine.runner.execute(build_batch([seq], [len(seq)], engine.block_size))
        return [cached_k(engine.runner, seq.block_table, len(seq), i).clone() for i in layers]
    finally:
        engine.blocks.free(seq)


@pytest.fixture(scope="module")
def alone() -> LLM:
    return LLM(DRAFT, device="cpu", dtype="float32", max_kv_tokens=1024)


@pytest.mark.parametrize("k", [2, 4])
def test_draft_cache_holds_the_targets_tokens_after_every_rollback(alone, k):
    spec = LLM(LLAMA, device="cpu", dtype="float32", draft=DRAFT, speculate_k=k, max_kv_tokens=2048)
    proposer = spec.engine.speculator.proposer
    runner = proposer.runner
    last = len(runner.kv.k_caches) - 1
    checked = {"positions": 0, "rollbacks": 0}
    propose, accepted = proposer.propose, proposer.accepted

    def check_then_propose(seqs, limits):
        for s in seqs:
            sh = proposer.shadows.get(s.request_id)
            if sh is None or sh.num_cached == 0:
                continue
            n = sh.num_cached
            assert n <= len(s.token_ids), "the draft cache holds more tokens than the target has"
            want0, want_last = reference_k(alone, s.token_ids[:n], [0, last])
            got0, got_last = (cached_k(runner, sh.block_table, n, i) for i in (0, last))
            torch.testing.assert_close(got0, want0, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_last, want_last, atol=1e-3, rtol=1e-3)
            checked["positions"] += n
        return propose(seqs, limits)

    def count_rollbacks(seqs, lengths, num_accepted):
        drafted = [len(proposer.shadows[s.request_id]) - L for s, L in zip(seqs, lengths)]
        checked["rollbacks"] += sum(a < d for a, d in zip(num_accepted, drafted))
        return accepted(seqs, lengths, num_accepted)

    proposer.propose, proposer.accepted = check_then_propose, count_rollbacks
    prompts = ["ROMEO:", "JULIET:\nO Romeo, Romeo", "First Citizen:\nBefore we proceed"]
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=40, seed=3, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)]
    outs = spec.generate(prompts, params)
    assert all(len(o.token_ids) == p.max_tokens for o, p in zip(outs, params))
    # The check ran, over rejected drafts (a draft this small is often wrong).
    assert checked["rollbacks"] >= 5 and checked["positions"] > 200, checked
