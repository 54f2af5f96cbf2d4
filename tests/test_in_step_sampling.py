"""Sampling inside the model step (the decode CUDA graph on a GPU): for temperature-only requests the
runner draws the tokens with `sample_rows`, which must be bit for bit what the host sampler `sample`
draws -- so a request gets the same tokens whichever path a step takes."""
from __future__ import annotations

import pytest
import torch

from hf_util import LLAMA
from tinyinfer import LLM, SamplingParams
from tinyinfer.engine.batch import build_batch
from tinyinfer.engine.cuda_graphs import GraphRunner
from tinyinfer.engine.sequence import Sequence
from tinyinfer.sampling.sampler import in_step_sampling, sample, sample_rows


@pytest.mark.parametrize("temps", [[0.0] * 5, [1.0] * 5, [0.0, 0.7, 1.0, 1.3, 0.0], [2.5, 0.1, 0.0, 1.0, 0.9]])
def test_sample_rows_is_the_host_sampler_bit_for_bit(temps):
    gen = torch.Generator().manual_seed(len(temps) + int(sum(temps) * 10))
    for trial in range(20):
        logits = torch.randn(len(temps), 300, generator=gen) * 3
        seeds = torch.randint(0, 2**62, (len(temps),), generator=gen).tolist()
        steps = torch.randint(0, 1000, (len(temps),), generator=gen).tolist()
        params = [SamplingParams(temperature=t) for t in temps]
        want = sample(logits, params, [[] for _ in temps], seeds, steps)
        got = sample_rows(logits, torch.tensor(temps), torch.tensor(seeds), torch.tensor(steps))
        assert torch.equal(got, want), f"trial {trial}"


def test_only_temperature_only_requests_are_drawn_in_the_step():
    assert in_step_sampling(SamplingParams(temperature=0.0))
    assert in_step_sampling(SamplingParams(temperature=0.8, seed=3))
    for kw in (dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1), dict(repetition_penalty=1.1),
               dict(logprobs=0)):
        assert not in_step_sampling(SamplingParams(**kw)), kw


@pytest.fixture(scope="module")
def llm():
    return LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=4096)


def test_seeded_requests_draw_the_same_tokens_in_the_step_and_on_the_host(llm):
    # logprobs=0 sends a request through the host sampler (it needs the processed distribution);
    # the tokens must not change.
    prompts = ["ROMEO:", "JULIET:\nO Romeo", "To be", "A"]
    in_step = [SamplingParams(temperature=t, seed=40 + i, max_tokens=24, ignore_eos=True)
               for i, t in enumerate((0.0, 0.8, 1.0, 1.4))]
    host = [SamplingParams(temperature=p.temperature, seed=p.seed, max_tokens=24, ignore_eos=True,
                           logprobs=0) for p in in_step]
    a = [o.token_ids for o in llm.generate(prompts, in_step)]
    b = [o.token_ids for o in llm.generate(prompts, host)]
    assert a == b
    assert len(set(map(tuple, a))) == 4


def _decode_batch(llm, temps):
    engine, bs = llm.engine, llm.engine.block_size
    gen = torch.Generator().manual_seed(7)
    seqs = []
    for i, n in enumerate((5, 37, 70)):
        seq = Sequence(f"s{i}", torch.randint(3, 1000, (n + 1,), generator=gen).tolist(),
                       SamplingParams(), 0)
        engine.blocks.grow(seq, n + 1)
        engine.runner.execute(build_batch([seq], [n], bs))
        seq.num_cached = n
        seqs.append(seq)
    batch = build_batch(seqs, [1, 1, 1], bs)
    batch.sampling = (temps, [11, 2**40, 5], [0, 3, 9])
    return seqs, batch


@pytest.mark.parametrize("temps", [[0.0, 0.0, 0.0], [0.9, 0.0, 1.2]], ids=["greedy", "sample"])
def test_padded_graph_batch_samples_what_the_eager_step_samples(llm, temps):
    # The graph runner's padded path (bucket 4: a padding sequence), run uncaptured on the CPU.
    seqs, batch = _decode_batch(llm, temps)
    runner = llm.engine.runner
    logits, tokens, finite = runner.execute_sampled(batch)                       # eager
    graphs = GraphRunner(llm.model, runner.kv, capture=False)
    g_logits, g_tokens, g_finite = graphs.run(batch, "greedy" if not any(temps) else "sample")
    torch.testing.assert_close(g_logits, logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(g_tokens, tokens) and g_finite.all() and finite.all()
    assert g_tokens.shape == (3,)
    for s in seqs:
        llm.engine.blocks.free(s)


@pytest.mark.cuda
@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sample"])
def test_on_gpu_graph_sampling_equals_host_sampling(cuda_extension, temperature):
    # The graph's draws equal the host sampler's: the run with logprobs=0 takes the decode graph's
    # logits to the host sampler, the other draws inside the graph from the same logits.
    llm = LLM(LLAMA, device="cuda", dtype="bfloat16", max_kv_tokens=8192)
    prompts = ["ROMEO:", "KING HENRY:\nNow, lords", "To be"]
    params = [SamplingParams(temperature=temperature, seed=5 + i, max_tokens=32, ignore_eos=True)
              for i in range(3)]
    host = [SamplingParams(temperature=temperature, seed=5 + i, max_tokens=32, ignore_eos=True,
                           logprobs=0) for i in range(3)]
    assert [o.token_ids for o in llm.generate(prompts, params)] == \
        [o.token_ids for o in llm.generate(prompts, host)]
    graphs = llm.engine.runner.graphs[1]
    mode = "greedy" if temperature == 0 else "sample"
    assert any(key[2] == mode for key in graphs.graphs), "the decode steps did not sample in a graph"
