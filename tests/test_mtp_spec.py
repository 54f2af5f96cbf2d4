"""DeepSeek MTP as a draft (draft="mtp": models/mtp.py, loading/mtp.py, engine/mtp_proposer.py) on a
random DeepSeek-V3 model (MLA, MoE; its MTP layer an MoE layer too, random): greedy output identical
to plain greedy decoding (batch with shared prefixes, preemption, prefix caching off, k = 1 and 4),
sampled output distributed as the target's (chi-square, as test_speculative.py), the module's cache
rows after the incremental catch-up equal to one pass over the whole text, and a clear refusal for
checkpoints without MTP layers."""
from __future__ import annotations

import random

import pytest
import torch

from hf_util import LLAMA, MLA, save_random_deepseek
from mtp_util import add_mtp_layer
from stats_util import chi2_outcomes
from tinyinfer import LLM, SamplingParams

POOL, PREEMPT_POOL = 4096, 320
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> tuple[str, str]:
    plain = save_random_deepseek(tmp_path_factory.mktemp("ds3"), "v3", seed=1)
    return plain, add_mtp_layer(plain, str(tmp_path_factory.mktemp("ds3-mtp")), seed=2)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(0)
    base = [[rng.randrange(3, 1000) for _ in range(n)] for n in (2, 37, 9, 20)]
    return base + [base[1] + [5, 6, 7], base[1][:33]]         # prefixes shared with prompt 1


@pytest.fixture(scope="module")
def reference(paths, prompts) -> list[list[int]]:
    plain = LLM(paths[0], device="cpu", dtype="float32", max_kv_tokens=POOL)
    return [o.token_ids for o in plain.generate(prompts, GREEDY)]


@pytest.mark.parametrize("case, k", [("batch", 4), ("batch", 1), ("preempt", 4), ("no-prefix-cache", 4)])
def test_greedy_output_equals_plain_greedy(case, k, paths, prompts, reference):
    llm = LLM(paths[1], device="cpu", dtype="float32", draft="mtp", speculate_k=k,
              max_kv_tokens=PREEMPT_POOL if case == "preempt" else POOL,
              enable_prefix_caching=case != "no-prefix-cache")
    spec = llm.engine.speculator
    got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    for i, (g, w) in enumerate(zip(got, reference)):
        first = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), None)
        assert first is None, f"prompt {i}: first difference at output token {first}"
    assert spec.proposed > len(prompts) * 8                   # it really drafted
    if case == "preempt":
        assert llm.stats["preemptions"] > 0
    if case == "batch":
        assert llm.stats["prefix_cache_hits"] > 0
    assert llm.stats["free_blocks"] == llm.stats["num_blocks"]
    assert not spec.proposer.pending                          # every finished request forgotten


def test_catch_up_rows_equal_one_pass_over_the_text(paths, prompts):
    """After a request's steps, the module's cache rows of its accepted positions are those one
    module pass over its whole text writes (target hidden states from one teacher-forced pass)."""
    llm = LLM(paths[1], device="cpu", dtype="float32", draft="mtp", speculate_k=3, max_kv_tokens=POOL,
              enable_prefix_caching=False)
    eng, proposer = llm.engine, llm.engine.speculator.proposer
    tables = {}
    free = eng.blocks.free
    # At its end: its blocks, its tokens, and the rows the last catch-up made final (< start).
    eng.blocks.free = lambda seq: (tables.setdefault(seq.request_id, (
        list(seq.block_table), list(seq.token_ids), proposer.pending[seq.request_id].start)), free(seq))[1]
    llm.generate([prompts[1]], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    eng.blocks.free = free
    (table, ids, final), = tables.values()
    kv = proposer.kv.k_caches[0]
    bs = eng.block_size
    rows = lambda t, n: torch.stack([kv[t[p // bs], p % bs] for p in range(n)])       # noqa: E731
    assert final > len(prompts[1]) + 10
    got = rows(table, final).clone()
    with torch.inference_mode():
        eng.logits(ids[:-1])                      # the target's h at positions 0 .. L-2
        hidden = eng.runner.last_hidden
        from tinyinfer.engine.sequence import Sequence
        seq = Sequence("ref", ids, GREEDY, 0)
        eng.blocks.grow(seq, len(ids))
        try:
            proposer._run([seq], [0], [ids[1:]], hidden)
            want = rows(seq.block_table, final).clone()
        finally:
            eng.blocks.free(seq)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_sampled_triples_follow_the_target_distribution(paths):
    """Rejection sampling with the module's draws. Its random head would almost never be accepted,
    so its logits are shifted towards the target's first-token distribution: some drafts are kept,
    some rejected -- the catch-up, the chain and q are the module's own."""
    from test_speculative import exact_triples
    plain = LLM(paths[0], device="cpu", dtype="float32", max_kv_tokens=POOL)
    prompt = [7, 300, 41, 9, 77, 12]
    exact = exact_triples(plain, prompt, top_k=4)
    llm = LLM(paths[1], device="cpu", dtype="float32", draft="mtp", speculate_k=3, max_kv_tokens=POOL)
    mtp = llm.engine.speculator.proposer.mtp
    bias = plain.logits(prompt)[-1]
    head = mtp.compute_logits
    mtp.compute_logits = lambda g: head(g) * 0.1 + bias
    n = 1500
    params = [SamplingParams(temperature=1.0, top_k=4, max_tokens=3, seed=500 + i, ignore_eos=True)
              for i in range(n)]
    spec = llm.engine.speculator
    outs = llm.generate([prompt] * n, params)
    assert spec.proposed >= n and 0 < spec.accepted < spec.proposed, (spec.proposed, spec.accepted)
    stat, df, p_value = chi2_outcomes([tuple(o.token_ids) for o in outs], exact)
    assert p_value > 1e-3, f"chi-square {stat:.1f} on {df} degrees of freedom, p = {p_value:.2g}"


def test_a_checkpoint_without_mtp_layers_is_refused(paths):
    with pytest.raises(ValueError, match="no MTP layers .*num_nextn_predict_layers"):
        LLM(LLAMA, device="cpu", draft="mtp")
    # The demo DeepSeek model's config names one MTP layer, its file holds none.
    with pytest.raises(ValueError, match=r"num_nextn_predict_layers = 1, but .* no model\.layers\.4\.eh_proj"):
        LLM(MLA, device="cpu", draft="mtp")
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        LLM(paths[1], device="cpu", draft="mtp", tensor_parallel_size=2)
