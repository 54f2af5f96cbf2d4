"""Chunked prefill and the attention over a cached prefix: the gather + SDPA op, the mixed-step
dispatch and the CPU op on very unequal contexts against float64 attention; a step never exceeds max_num_batched_tokens; running decodes get
a token every step while a long prompt is admitted in chunks (without chunking they stall for its
whole prefill); outputs are identical with chunking on and off, with speculative decoding too; decode-
only steps take the CUDA-graph runner and mixed steps run eagerly."""
from __future__ import annotations

import pytest
import torch

from engine_util import WriteGuard, assert_all_free, engine_for, random_ids
from hf_util import DRAFT, LLAMA
from paged_util import dense_float64, make_batch
from tinyinfer import LLM, LLMEngine, SamplingParams, ops
from tinyinfer.engine.batch import build_batch
from tinyinfer.engine.cuda_graphs import GraphRunner
from tinyinfer.engine.proposers import DraftModelProposer, NgramProposer
from tinyinfer.engine.sequence import Sequence
from tinyinfer.layers.attention import AttentionMetadata, attend
from tinyinfer.ops import reference
from tinyinfer.ops.cpu_attention import length_groups

CASES = {   # name: (seq_lens, q_lens, hq, hkv, d, dv, bs, mla, num_decodes)
    "prefix_gqa": ([70, 33, 120], [40, 33, 17], 8, 2, 16, 16, 8, False, 0),
    "prefix_mla_latent": ([90, 51], [30, 51], 16, 1, 576, 512, 16, True, 0),
    "decodes_then_chunks": ([37, 5, 64, 90, 40], [1, 1, 1, 30, 40], 4, 2, 16, 16, 4, False, 3),
    "short_run_after_a_chunk": ([37, 5, 90, 9, 40], [1, 2, 30, 2, 40], 4, 1, 16, 16, 4, False, 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_prefix_attention_and_mixed_dispatch_match_float64(name):
    seq_lens, q_lens, hq, hkv, d, dv, bs, mla, nd = CASES[name]
    b = make_batch(seq_lens, q_lens, hq, hkv, d, dv, bs, torch.float32, mla=mla, seed=len(name))
    want = dense_float64(b)
    qsl = b.query_start_loc.tolist()
    if nd == 0:
        got = reference.paged_prefill_attention(b.q, b.k_cache, b.v_cache, b.block_tables, seq_lens,
                                                qsl, b.scale)
    else:
        meta = AttentionMetadata(
            slot_mapping=torch.full((b.q.shape[0],), -1), block_tables=b.block_tables,
            seq_lens=b.seq_lens, query_start_loc=b.query_start_loc, max_q_len=max(q_lens),
            query_start_loc_host=qsl, seq_lens_host=seq_lens, prefill=False, num_decodes=nd)
        got = attend(b.q, None, None, b.k_cache, b.v_cache, meta, b.scale)
    assert got.shape == want.shape and not got.isnan().any(), "an unused (NaN) cache slot was read"
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("seq_lens,q_lens", [([400, 3, 17, 1, 150, 9], [1] * 6),
                                              ([400, 3, 17, 0, 150, 9], [4, 1, 1, 0, 16, 1])])
def test_cpu_op_splits_very_unequal_contexts_and_matches_float64(seq_lens, q_lens):
    assert [len(g) for g in length_groups(seq_lens)] == [4, 1, 1]
    b = make_batch(seq_lens, q_lens, 4, 2, 16, 16, 8, torch.float32, seed=len(q_lens))
    got = ops.paged_attention(*b.args())                    # the op's CPU kernel
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), dense_float64(b), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ engines

@pytest.fixture(scope="module")
def llama():
    return LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=4096)


@pytest.fixture(scope="module")
def draft_runner():
    return LLM(DRAFT, device="cpu", dtype="float32", max_kv_tokens=4096).engine.runner



GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def test_budget_must_fit_one_token_of_every_sequence(llama):
    with pytest.raises(ValueError, match="max_num_batched_tokens=8 is smaller than max_num_seqs=16"):
        engine_for(llama, max_num_batched_tokens=8, max_num_seqs=16)
    with pytest.raises(ValueError, match="max_num_batched_tokens=0 is invalid"):
        engine_for(llama, max_num_batched_tokens=0)


def _admit_long_prompt_while_4_decode(engine: LLMEngine, long: list[int]):
    """4 short requests decode; then a long prompt arrives. Returns, per step until the long one's
    first token: the tokens each request got, and the step's batches (new tokens per sequence)."""
    for i in range(4):
        engine.add_request(random_ids(5 + i, 60 + i), GREEDY, request_id=f"d{i}")
    engine.step()                                            # their prefill
    engine.step()
    guard = WriteGuard(engine)
    engine.add_request(long, GREEDY, request_id="long")
    steps = []
    while True:
        got = {d.request_id: len(d.new_token_ids) for d in engine.step()}
        steps.append((got, guard.steps[-1] if guard.steps else None))
        guard.steps.clear()
        if "long" in got:
            break
    guard.remove()
    while engine.has_unfinished():                           # finish the run
        engine.step()
    assert_all_free(engine)
    return steps


def test_decodes_get_a_token_every_step_while_a_long_prompt_prefills_in_chunks(llama):
    long = random_ids(300, 7)
    steps = _admit_long_prompt_while_4_decode(engine_for(llama, max_num_batched_tokens=32,
                                                         max_num_seqs=8), long)
    # 4 decodes + 28 prompt tokens per step: ceil(300 / 28) = 11 steps, each within the budget.
    assert len(steps) == 11
    for got, num_new in steps:
        assert all(got.get(f"d{i}") == 1 for i in range(4)), got
        assert num_new[:4] == [1, 1, 1, 1] and sum(num_new) <= 32
    assert [n[4] for _, n in steps] == [28] * 10 + [20]
    # Without chunking the whole prompt is one step, and the decodes get nothing in it.
    steps = _admit_long_prompt_while_4_decode(engine_for(llama, enable_chunked_prefill=False), long)
    assert len(steps) == 1 and steps[0][1] == [300] and set(steps[0][0]) == {"long"}


def test_chunk_by_chunk_prompt_gets_the_tokens_it_gets_whole(llama):
    prompts = [random_ids(n, 70 + n) for n in (300, 17, 129, 64)]
    want = [o.token_ids for o in LLM.from_engine(engine_for(
        llama, enable_chunked_prefill=False, enable_prefix_caching=False)).generate(prompts, GREEDY)]
    for budget in (8, 37, 128):
        engine = engine_for(llama, max_num_batched_tokens=budget, max_num_seqs=4)
        assert [o.token_ids for o in LLM.from_engine(engine).generate(prompts, GREEDY)] == want
        assert_all_free(engine)


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_speculative_decoding_stays_exact_with_chunks_and_cached_prefixes(llama, draft_runner,
                                                                         proposer):
    system = random_ids(70, 3)
    prompts = [system + random_ids(4 + 9 * i, 80 + i) for i in range(6)] + [random_ids(150, 4)]
    params = [GREEDY if i % 2 == 0 else
              SamplingParams(temperature=0.8, seed=i, max_tokens=40, ignore_eos=True)
              for i in range(len(prompts))]

    def spec_engine(**options) -> LLMEngine:
        engine = engine_for(llama, **options)
        engine.set_speculator(NgramProposer() if proposer == "ngram" else
                              DraftModelProposer(draft_runner), 3)
        return engine

    plain = [o.token_ids for o in LLM.from_engine(engine_for(
        llama, enable_chunked_prefill=False, enable_prefix_caching=False)).generate(prompts, params)]
    spec_plain = spec_engine(enable_chunked_prefill=False, enable_prefix_caching=False)
    want = [o.token_ids for o in LLM.from_engine(spec_plain).generate(prompts, params)]
    assert [want[i] for i in range(0, 7, 2)] == [plain[i] for i in range(0, 7, 2)]   # greedy: exact
    # 7 decodes x (1 + 3) = 28 of the 48 budget tokens; prompt chunks get the other 20.
    engine = spec_engine(max_num_batched_tokens=48, max_num_seqs=8)
    guard = WriteGuard(engine)
    for _ in range(2):                                       # the second round hits the cache
        assert [o.token_ids for o in LLM.from_engine(engine).generate(prompts, params)] == want
    guard.remove()
    assert engine.stats["prefix_cache_hits"] > 0
    assert any(max(n) == 4 for n in guard.steps) and any(max(n) > 4 for n in guard.steps)
    assert_all_free(engine)
    if proposer == "draft":
        blocks = engine.speculator.proposer.blocks
        assert blocks.num_free == blocks.num_blocks


def test_decode_only_steps_take_the_graph_runner_and_mixed_steps_run_eagerly(llama):
    runner = llama.engine.runner
    prompts = [random_ids(20 + 30 * i, 90 + i) for i in range(5)]
    want = [o.token_ids for o in LLM.from_engine(engine_for(
        llama, enable_chunked_prefill=False, enable_prefix_caching=False)).generate(prompts, GREEDY)]
    graphs = GraphRunner(llama.model, runner.kv, capture=False)       # the padded path, uncaptured
    replayed = []
    graphs.run = lambda batch, *mode, run=graphs.run: replayed.append(batch.num_new) or run(batch, *mode)
    runner.graphs[1] = graphs
    try:
        engine = engine_for(llama, max_num_batched_tokens=40, max_num_seqs=8)
        guard = WriteGuard(engine)
        assert [o.token_ids for o in LLM.from_engine(engine).generate(prompts, GREEDY)] == want
        guard.remove()
    finally:
        runner.graphs.clear()
    mixed = [n for n in guard.steps if max(n) > 1 and min(n) == 1]
    assert replayed and all(set(n) == {1} for n in replayed)
    assert mixed and len(replayed) == sum(1 for n in guard.steps if set(n) == {1})


# ------------------------------------------------------------------------------------------ on a GPU

@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_gpu_prefill_over_a_cached_prefix_matches_a_fresh_prefill(cuda_extension, dtype, tol):
    llm = LLM(LLAMA, device="cuda", dtype=dtype, max_kv_tokens=8192)
    ids = random_ids(300, 5)
    fresh = llm.logits(ids)                                  # (300, V): one fresh prefill
    engine = llm.engine
    seq = Sequence("gpu", ids, SamplingParams(max_tokens=1), 0)
    engine.blocks.grow(seq, len(ids))
    try:
        engine.runner.execute(build_batch([seq], [200], engine.block_size))
        seq.num_cached = 200                                 # 100 queries over 200 cached tokens
        tail = engine.runner.execute(build_batch([seq], [100], engine.block_size), all_logits=True)
    finally:
        engine.blocks.free(seq)
    scale = fresh.abs().max().item()
    torch.testing.assert_close(tail, fresh[200:], atol=tol * scale, rtol=0)


@pytest.mark.cuda
def test_gpu_engine_with_caching_chunks_and_graphs(cuda_extension):
    prompts = [random_ids(60, 6) + random_ids(5 + 7 * i, 110 + i) for i in range(6)]
    prompts.append(random_ids(400, 7))
    fp32 = LLM(LLAMA, device="cuda", dtype="float32", max_kv_tokens=8192)
    want = [o.token_ids for o in LLM.from_engine(engine_for(
        fp32, enable_chunked_prefill=False, enable_prefix_caching=False)).generate(prompts, GREEDY)]
    engine = engine_for(fp32, max_num_batched_tokens=32, max_num_seqs=8)
    for _ in range(2):
        assert [o.token_ids for o in LLM.from_engine(engine).generate(prompts, GREEDY)] == want
    assert engine.stats["prefix_cache_hits"] > 0
    assert_all_free(engine)
    half = LLM(LLAMA, device="cuda", max_kv_tokens=8192)     # bf16: decode steps replay graphs
    engine = engine_for(half, max_num_batched_tokens=32, max_num_seqs=8)
    guard = WriteGuard(engine)
    outs = LLM.from_engine(engine).generate(prompts, GREEDY)
    guard.remove()
    assert all(len(o.token_ids) == 40 for o in outs)
    assert half.engine.runner.graphs[1].num_graphs() > 0
    assert any(max(n) > 1 and min(n) == 1 for n in guard.steps)          # mixed steps ran eagerly
    assert_all_free(engine)
