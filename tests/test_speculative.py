"""Speculative decoding: greedy output identical to plain greedy decoding (draft model and n-gram
proposers, k = 1, 2, 4, 8, batch 1 and 8, under preemption), sampled output distributed exactly as
the target's own (chi-square against the distribution computed from the target's logits; also for the
suffix proposer, adaptive and fixed length -- its other tests are test_suffix_spec.py), stop
conditions inside an accepted run, and clear errors for bad configurations.

The rejection sampler itself is tested in test_sampling.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tinyinfer import LLM, SamplingParams
from tinyinfer.config.errors import CheckpointError
from tinyinfer.engine.proposers import NgramProposer
from tinyinfer.engine.suffix_proposer import SuffixProposer
from stats_util import chi2_outcomes

ROOT = Path(__file__).resolve().parent.parent
TARGET = str(ROOT / "models" / "shakespeare-llama")
DRAFT = str(ROOT / "models" / "shakespeare-draft")
TEXT = (ROOT / "data" / "tinyshakespeare-val-slice.txt").read_text()
GREEDY = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
KS = [1, 2, 4, 8]
POOL = 8192                 # tokens: ample for every test, small enough to allocate in no time
PREEMPT_POOL = 768          # tokens: 8 sequences of up to ~200 tokens each must take turns


@pytest.fixture(scope="module")
def plain() -> LLM:
    return LLM(TARGET, device="cpu", dtype="float32", max_kv_tokens=POOL)


@pytest.fixture(scope="module")
def prompts(plain) -> list[list[int]]:
    # 8 prompts of mixed length (2 to 60 tokens), cut from held-out text at line starts.
    ids = plain.tokenizer.encode(TEXT[:4000])
    lengths, starts = [2, 60, 7, 33, 14, 48, 3, 21], [0, 97, 211, 340, 452, 601, 733, 866]
    return [ids[s:s + n] for s, n in zip(starts, lengths)]


@pytest.fixture(scope="module")
def reference(plain, prompts) -> dict[str, list[list[int]]]:
    """Plain greedy decoding: the batch of 8, and the first prompt alone."""
    return {"batch": [o.token_ids for o in plain.generate(prompts, GREEDY)],
            "single": [plain.generate([prompts[0]], GREEDY)[0].token_ids]}


_cache: dict[tuple, LLM] = {}


def speculative_llm(draft: str, k: int, pool: int | None = None) -> LLM:
    key = (draft, k, pool)
    if key not in _cache:
        _cache[key] = LLM(TARGET, device="cpu", dtype="float32", draft=draft, speculate_k=k,
                          max_kv_tokens=pool or POOL)
    return _cache[key]


@pytest.fixture(scope="module", autouse=True)
def _drop_cache():
    yield
    _cache.clear()


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("draft", ["model", "ngram"])
@pytest.mark.parametrize("case", ["single", "batch", "preempt"])
def test_greedy_output_equals_plain_greedy(case, draft, k, prompts, reference):
    llm = speculative_llm(DRAFT if draft == "model" else "ngram", k,
                          PREEMPT_POOL if case == "preempt" else None)
    batch = prompts[:1] if case == "single" else prompts
    before = llm.stats["preemptions"]
    out = llm.generate(batch, GREEDY)
    got = [o.token_ids for o in out]
    want = reference["single" if case == "single" else "batch"]
    assert all(len(g) == 128 for g in got)
    for i, (g, w) in enumerate(zip(got, want)):
        first = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), None)
        assert first is None, f"prompt {i}: first difference at output token {first}"
    if case == "preempt":
        assert llm.stats["preemptions"] > before, "the small pool should have forced preemption"
    # Every block went back: to the target's pool and to the draft model's.
    assert llm.stats["free_blocks"] == llm.stats["num_blocks"]


def test_verify_through_padded_graph_batches_matches_plain_greedy(prompts, reference):
    # The GPU path: verification through GraphRunner's static, padded batch (k + 1 query rows per
    # sequence, n-gram drafts of varying length leave padding rows), run uncaptured on the CPU.
    from tinyinfer.engine.cuda_graphs import GraphRunner
    llm = LLM(TARGET, device="cpu", dtype="float32", draft="ngram", speculate_k=4, max_kv_tokens=POOL)
    runner = llm.engine.runner
    runner.graphs[5] = GraphRunner(llm.model, runner.kv, q_len=5, capture=False)
    out = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in out] == reference["batch"]


def test_draft_identical_to_target_accepts_everything(prompts):
    llm = LLM(TARGET, device="cpu", dtype="float32", draft=TARGET, speculate_k=4, max_kv_tokens=POOL)
    llm.generate(prompts[:3], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    fig = llm.figures()
    assert fig["acceptance_rate"] == 1.0
    assert fig["tokens_per_target_step"] > 4.0          # k + 1 per step, except near max_tokens


def test_rejected_blocks_return_to_both_pools(prompts):
    llm = speculative_llm(DRAFT, 8)
    llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=40, seed=3))
    draft = llm.engine.speculator.proposer
    assert llm.stats["free_blocks"] == llm.stats["num_blocks"]
    assert draft.blocks.num_free == draft.blocks.num_blocks and not draft.shadows


def test_a_tiny_pool_with_repeated_prompts_drafts_less_but_never_runs_dry(plain):
    """Draft model + prefix caching with a 256-token pool and 8 copies of a 140-token prompt: the
    target shares the prompt's blocks; the draft pool (prefix-cached too) shares them where it can
    and skips drafting for a sequence it cannot hold -- no OutOfBlocks, plain greedy's output."""
    prompt = "ROMEO: " * 20
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm = speculative_llm(DRAFT, 4, pool=256)
    draft = llm.engine.speculator.proposer
    got = llm.generate([prompt] * 8, sp)
    small = LLM(TARGET, device="cpu", dtype="float32", max_kv_tokens=256)
    assert [o.token_ids for o in got] == [o.token_ids for o in small.generate([prompt] * 8, sp)]
    assert all(o.finish_reason == "length" for o in got)
    assert draft.blocks.hits > 0                    # the shadows shared the prompt's blocks
    assert draft.blocks.num_free == draft.blocks.num_blocks and not draft.shadows
    # A draft pool with 2 blocks left: most sequences are not drafted, the output is the same.
    taken = draft.blocks.allocator.allocate(draft.blocks.num_free - 2)
    try:
        assert [o.token_ids for o in llm.generate([prompt] * 8, sp)] == [o.token_ids for o in got]
    finally:
        draft.blocks.allocator.release(taken)
    assert draft.skipped > 0


# ---------------------------------------------------------------------------------------------- sampling

def exact_triples(plain: LLM, prompt: list[int], top_k: int) -> dict[tuple[int, int, int], float]:
    """P(t1, t2, t3) at temperature 1 with top-k, from the target's teacher-forced logits."""
    def dist(logits: torch.Tensor) -> dict[int, float]:
        vals, idx = logits.double().topk(top_k)
        return dict(zip(idx.tolist(), torch.softmax(vals, 0).tolist()))

    out = {}
    for t1, p1 in dist(plain.logits(prompt)[-1]).items():
        for t2, p2 in dist(plain.logits(prompt + [t1])[-1]).items():
            for t3, p3 in dist(plain.logits(prompt + [t1, t2])[-1]).items():
                out[(t1, t2, t3)] = p1 * p2 * p3
    return out


# The n-gram proposer drafts only when the text so far repeats: a prompt that repeats itself, so that
# its drafts are made, and some accepted, some rejected.
TRIPLE_PROMPTS = {"model": "KING RICHARD III:\nNow is the",
                  "ngram": "First Citizen:\nWe are accounted poor citizens.\n\nSecond Citizen:\nWould you "
                           "proceed?\n\nFirst Citizen:\nWe are accounted poor citizens.\n\nSecond Citizen:\n"}
TRIPLE_PROMPTS["suffix"] = TRIPLE_PROMPTS["suffix-fixed"] = TRIPLE_PROMPTS["ngram"]


@pytest.mark.parametrize("draft", ["model", "ngram", "suffix", "suffix-fixed"])
def test_sampled_triples_follow_the_target_distribution(draft, plain):
    # suffix: the adaptive length (d varies per step and request, down to 0) and drafts from the
    # store of earlier requests' outputs; suffix-fixed: always up to k.
    prompt = plain.tokenizer.encode(TRIPLE_PROMPTS[draft])
    exact = exact_triples(plain, prompt, top_k=4)
    n = 2000
    if draft == "suffix-fixed":
        llm = LLM(TARGET, device="cpu", dtype="float32", max_kv_tokens=POOL)
        llm.engine.set_speculator(SuffixProposer(adaptive=False), 4)
    else:
        llm = speculative_llm({"model": DRAFT}.get(draft, draft), 4)
    params = [SamplingParams(temperature=1.0, top_k=4, max_tokens=3, seed=1000 + i, ignore_eos=True)
              for i in range(n)]
    spec = llm.engine.speculator
    spec.reset_stats()
    outs = llm.generate([prompt] * n, params)
    # the speculative path must really have run: drafts proposed, some accepted and some rejected
    assert spec.proposed >= n // 10 and 0 < spec.accepted < spec.proposed, (spec.proposed, spec.accepted)
    if draft == "model":
        assert 0.05 < llm.figures()["acceptance_rate"] < 0.95
    triples = [tuple(o.token_ids) for o in outs]
    assert len(triples) == n and all(len(t) == 3 for t in triples)
    stat, df, p_value = chi2_outcomes(triples, exact)
    assert p_value > 1e-3, f"chi-square {stat:.1f} on {df} degrees of freedom, p = {p_value:.2g}"


def test_seeded_sampling_is_batch_independent(prompts):
    llm = speculative_llm(DRAFT, 4)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=32, seed=7, ignore_eos=True)
    alone = llm.generate([prompts[1]], params)[0].token_ids
    batch = llm.generate(prompts, [params if i == 1 else
                                   SamplingParams(temperature=0.8, max_tokens=32, seed=i)
                                   for i in range(len(prompts))])
    assert batch[1].token_ids == alone


# ---------------------------------------------------------------------------------------------- stops

def test_stops_inside_an_accepted_run_emit_nothing_after(plain, prompts):
    llm = LLM(TARGET, device="cpu", dtype="float32", draft=TARGET, speculate_k=8,   # accepts all
              max_kv_tokens=POOL)
    base = plain.generate([prompts[2]], SamplingParams(temperature=0.0, max_tokens=40,
                                                       ignore_eos=True))[0]
    stop_tok = base.token_ids[12]
    cut = base.token_ids.index(stop_tok)
    for params in [SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop_tok]),
                   SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True),
                   SamplingParams(temperature=0.0, max_tokens=40, stop=[base.text[25:31]])]:
        want = plain.generate([prompts[2]], params)[0]
        got = llm.generate([prompts[2]], params)[0]
        assert (got.token_ids, got.text, got.finish_reason) == \
               (want.token_ids, want.text, want.finish_reason)
    assert llm.generate([prompts[2]], SamplingParams(
        temperature=0.0, max_tokens=40, stop_token_ids=[stop_tok]))[0].token_ids == \
        base.token_ids[:cut + 1]


def test_ngram_lookup_proposes_what_followed_the_latest_match():
    ng = NgramProposer(max_n=3)
    assert ng.lookup([5, 6, 7, 8, 9, 1, 6, 7], 3) == [8, 9, 1]
    assert ng.lookup([1, 2, 3, 9, 2, 3, 4, 2, 3], 2) == [4, 2]      # most recent match of (2, 3)
    assert ng.lookup([1, 2, 3, 4], 4) == []                          # nothing repeats
    assert ng.lookup([4, 4, 4], 5) == [4]                            # continuation stops at the end


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("k", [0, 16])
def test_speculate_k_out_of_range_is_rejected(k):
    with pytest.raises(ValueError, match=f"speculate_k={k}"):
        LLM(TARGET, device="cpu", draft=DRAFT, speculate_k=k)


def test_missing_draft_path_is_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        LLM(TARGET, device="cpu", draft=str(tmp_path / "no-such-draft"))


def test_draft_with_another_vocabulary_is_rejected(tmp_path):
    bad = tmp_path / "draft"
    bad.mkdir()
    for name in os.listdir(DRAFT):
        if name != "config.json":
            os.symlink(os.path.join(DRAFT, name), bad / name)
    cfg = json.loads(Path(DRAFT, "config.json").read_text())
    cfg["vocab_size"] = 2048
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vocabulary of 2048 tokens"):
        LLM(TARGET, device="cpu", draft=str(bad))


@pytest.mark.cuda
@pytest.mark.parametrize("draft", [DRAFT, "ngram"], ids=["draft-model", "ngram"])
def test_on_gpu_speculative_greedy_equals_plain_greedy(cuda_extension, draft):
    # float32 on the GPU: verifying k+1 rows and decoding one row then round alike, so a near-tie
    # cannot flip between the two runs (bf16 could). fp32 attention takes the reference path, which
    # cannot be captured, so both runs are eager (graph == eager is tested in test_cuda_graphs.py).
    prompts = ["ROMEO:", "KING HENRY:\nNow, lords, to France", "To be, or not to be"]
    params = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
    plain = LLM(TARGET, device="cuda", dtype="float32", cuda_graphs=False).generate(prompts, params)
    spec = LLM(TARGET, device="cuda", dtype="float32", cuda_graphs=False, draft=draft, speculate_k=4)
    outs = spec.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert spec.stats["free_blocks"] == spec.stats["num_blocks"]
