"""The whole engine with a quantized KV cache (kv_cache_dtype "fp8" / "int8", docs/kv-cache.md) on the demo
checkpoints: greedy tokens the same fresh, prefix-cached, under preemption (a pool too small for the
batch), with n-gram speculative decoding, and over two tensor-parallel ranks; MLA's latent cache; the
pool's tokens for the same memory; teacher-forced KL against the model-dtype
cache; bad input.
"""
from __future__ import annotations

import pytest
import torch

from hf_util import LLAMA, MLA
from tinyinfer import LLM, SamplingParams
from tinyinfer.engine.kv_cache import PagedKVCache

SHARED = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
PROMPTS = [SHARED + "First Citizen:\nYou", SHARED + "Second Citizen:\nOne word", "ROMEO:", "JULIET:\nO",
           SHARED + "MENENIUS:\nWhy", "KING RICHARD III:\nNow is the winter"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
KINDS = ["fp8", "int8"]


def tokens(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module", params=KINDS)
def ample(request):
    llm = LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=8192, kv_cache_dtype=request.param)
    return request.param, llm, tokens(llm)


def test_the_cache_holds_quantized_values_and_scales(ample):
    kind, llm, _ = ample
    k, v, ks, vs = llm.engine.runner.kv.layers()[0]
    assert k.dtype == v.dtype == {"fp8": torch.float8_e4m3fn, "int8": torch.int8}[kind]
    assert ks.dtype == vs.dtype == torch.float16
    assert ks.shape == vs.shape == k.shape[:3], "one scale per slot and head"
    assert llm.dtype == torch.float32, "the model keeps its dtype"


def test_prefix_cached_and_preempted_runs_equal_the_fresh_one(ample):
    kind, llm, fresh = ample
    hits = llm.stats["prefix_cache_hits"]
    assert tokens(llm) == fresh, "the same prompts again, their prefixes now cached"
    assert llm.stats["prefix_cache_hits"] > hits
    uncached = LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=8192, kv_cache_dtype=kind,
                   enable_prefix_caching=False)
    assert tokens(uncached) == fresh
    tiny = LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=12 * 16, kv_cache_dtype=kind)
    assert tokens(tiny) == fresh
    assert tiny.stats["preemptions"] > 0, "the small pool should have forced preemption"
    assert tiny.stats["free_blocks"] == tiny.stats["num_blocks"]


def test_speculative_decoding_keeps_the_greedy_tokens(ample):
    kind, _, fresh = ample
    spec = LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=8192, kv_cache_dtype=kind,
               draft="ngram", speculate_k=4)
    assert tokens(spec) == fresh


def test_teacher_forced_logits_stay_close_to_the_model_dtype_cache(ample):
    # One prompt continued by its own greedy tokens, decoded through the paged cache: mean KL to the
    # model-dtype cache's distribution, and the top-1 agreement (SmolLM2 at 2k context: README).
    kind, llm, fresh = ample
    base = LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=8192)
    ids = llm.tokenizer.encode(PROMPTS[0]) + fresh[0]
    want, got = base.logits(ids).log_softmax(-1), llm.logits(ids).log_softmax(-1)
    kl = (want.exp() * (want - got)).sum(-1)
    assert float(kl.mean()) < 0.01, f"{kind}: mean KL {float(kl.mean()):.4f}"
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_mla_latent_cache_fresh_and_prefix_cached(kind):
    llm = LLM(MLA, device="cpu", dtype="float32", max_kv_tokens=4096, kv_cache_dtype=kind)
    k, v, ks, vs = llm.engine.runner.kv.layers()[0]
    assert v is None and vs is ks, "V is the latent part of K's row, with K's scales"
    prompts, params = PROMPTS[:3], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    fresh = tokens(llm, prompts, params)
    assert tokens(llm, prompts, params) == fresh
    tiny = LLM(MLA, device="cpu", dtype="float32", max_kv_tokens=6 * 16, kv_cache_dtype=kind)
    assert tokens(tiny, prompts, params) == fresh


def test_the_pool_holds_about_twice_the_tokens_in_the_same_memory():
    # SmolLM2-135M's cache rows (30 layers, 3 KV heads of 64) in bfloat16, and the demo engine's pool.
    bf16 = PagedKVCache.bytes_per_token(30, (3, 64), (3, 64), torch.bfloat16)
    for kind in KINDS:
        assert bf16 / PagedKVCache.bytes_per_token(30, (3, 64), (3, 64), torch.bfloat16, kind) >= 1.9
    for kind in KINDS:                               # one byte a value, a float16 scale per head
        assert PagedKVCache.bytes_per_token(30, (3, 64), (3, 64), torch.bfloat16, kind) == 30 * 2 * 3 * 66
    pools = {kind: LLM(LLAMA, device="cpu", dtype="bfloat16", kv_cache_memory="4MiB",
                       kv_cache_dtype=kind).engine.kv_tokens for kind in ["auto"] + KINDS}
    for kind in KINDS:
        assert pools[kind] >= 1.9 * pools["auto"], pools


def test_an_unknown_kv_cache_dtype_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp4'.*'auto'.*'fp8'.*'int8'"):
        LLM(LLAMA, device="cpu", kv_cache_dtype="fp4")


def test_two_tensor_parallel_ranks_with_an_fp8_cache_match_one():
    options = dict(device="cpu", dtype="float32", max_kv_tokens=2048, kv_cache_dtype="fp8")
    one = tokens(LLM(LLAMA, **options), PROMPTS[:2])
    with LLM(LLAMA, tensor_parallel_size=2, **options) as two:
        assert tokens(two, PROMPTS[:2]) == one
