"""The fused CPU decode step (tinyinfer/models/fused_cpu.py, cpu/decode_step.h): a decode or verify step
of every layer in one C++ call. It must compute the per-op path's bits -- hidden states and the K/V it
writes -- on the demo model (float32, dense, GQA), a random MQA Llama in INT4 / bfloat16 and SmolLM2
(INT4 from the GGUF, 9 query heads over 3 KV heads), with context lengths on, before and after block
boundaries; agree with the per-op path run in float64; give the same greedy tokens end to end, with
the model-dtype cache and with FP8 / INT8 caches (docs/kv-cache.md); and step aside (the per-op path
runs) where it does not apply: prefill, a KV cache in another dtype that is not a quantized one.
"""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

from gguf_util import smollm2_gguf
from hf_util import LLAMA, save_random_llama
from tinyinfer import LLM, SamplingParams
from tinyinfer.engine.kv_cache import PagedKVCache
from tinyinfer.extensions import cpu as cpu_kernels
from tinyinfer.extensions import host_cxx
from tinyinfer.layers.attention import AttentionMetadata
from tinyinfer.models import fused_cpu
from tinyinfer.models.transformer import Transformer

# Where a compiler exists the library must build (a broken build would otherwise only skip these tests).
if cpu_kernels.library() is None and shutil.which(host_cxx()) is not None:
    pytest.fail(f"the CPU kernels did not build: {cpu_kernels._load()[1]}", pytrace=False)
pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C++ compiler: no CPU kernel library")
BS = 16


def _step(cfg, ctx_lens: list[int], q_lens: list[int], seed: int):
    """A decode / verify step: sequence b has ctx_lens[b] tokens cached and q_lens[b] new ones, its
    blocks shuffled over the pool. -> (input_ids, positions, meta, number of blocks)."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(c + q) // BS) for c, q in zip(ctx_lens, q_lens)]
    n_blocks = sum(need) + 2
    order = torch.randperm(n_blocks, generator=gen).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(order[at:at + n] + [0] * (max(need) - n))
        at += n
    positions, slots, qsl = [], [], [0]
    for b, (c, q) in enumerate(zip(ctx_lens, q_lens)):
        for p in range(c, c + q):
            positions.append(p)
            slots.append(tables[b][p // BS] * BS + p % BS)
        qsl.append(qsl[-1] + q)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor(tables, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), max_q_len=max(q_lens),
        query_start_loc_host=qsl, seq_lens_host=seq_lens, prefill=False, num_decodes=len(q_lens))
    ids = torch.randint(0, cfg.vocab_size, (qsl[-1],), generator=gen)
    return ids, torch.tensor(positions), meta, n_blocks


def _caches(cfg, n_blocks: int, dtype, seed: int, kv_cache_dtype: str = "auto") -> PagedKVCache:
    """Random caches; fp8 / int8 ones with random bytes and scales (every slot's, written or not)."""
    k_dims, v_dims = Transformer.kv_dims(cfg)
    kv = PagedKVCache(cfg.num_layers, n_blocks, BS, k_dims, v_dims, dtype, torch.device("cpu"),
                      kv_cache_dtype)
    gen = torch.Generator().manual_seed(seed)
    for k, v, *scales in kv.layers():
        for c in (k, v):
            c.copy_(torch.randint(-127, 128, c.shape, generator=gen) if c.dtype == torch.int8
                    else torch.randn(c.shape, generator=gen) * (16 if c.dtype != dtype else 1))
        for s in scales:
            s.copy_(torch.rand(s.shape, generator=gen) * 0.05 + 0.01)
    return kv


def _per_op(model, ids, positions, meta, kv):
    model.fused_cpu_decode = False
    try:
        return model(ids, positions, meta, kv.layers())
    finally:
        del model.fused_cpu_decode


def _check_bits(model, cfg, dtype, ctx_lens, q_lens, seed, kv_cache_dtype="auto"):
    ids, positions, meta, n_blocks = _step(cfg, ctx_lens, q_lens, seed)
    kv_fused = _caches(cfg, n_blocks, dtype, seed, kv_cache_dtype)
    kv_ref = _caches(cfg, n_blocks, dtype, seed, kv_cache_dtype)
    with torch.inference_mode():
        fused = fused_cpu.decode_step(model, ids, positions, meta, kv_fused.layers())
        ref = _per_op(model, ids, positions, meta, kv_ref)
    assert fused is not None, "the fused path did not run"
    assert torch.equal(fused, ref)
    for fused_layer, ref_layer in zip(kv_fused.layers(), kv_ref.layers()):   # caches (and scales)
        assert all(torch.equal(f.view(torch.uint8) if f.dtype == torch.float8_e4m3fn else f,
                               r.view(torch.uint8) if r.dtype == torch.float8_e4m3fn else r)
                   for f, r in zip(fused_layer, ref_layer))
    return fused, ids, positions, meta, n_blocks


STEPS = [([5], [1]), ([15, 16, 33, 1], [1, 1, 1, 1]), ([31, 2, 47], [2, 1, 4])]


@pytest.fixture(scope="module")
def demo():
    return LLM(LLAMA, device="cpu", max_kv_tokens=256)


@pytest.mark.parametrize("ctx_lens,q_lens", STEPS, ids=["one-row", "decode-4", "verify-3"])
def test_fused_step_is_the_per_op_step_bit_for_bit_and_near_float64_on_the_demo(demo, ctx_lens, q_lens):
    model, cfg = demo.engine.runner.model, demo.config
    fused, ids, positions, meta, n_blocks = _check_bits(model, cfg, torch.float32, ctx_lens, q_lens, 1)
    model64 = copy.deepcopy(model).double()          # the per-op path on its float64 references
    model64.fused_cpu_decode = False
    kv64 = _caches(cfg, n_blocks, torch.float32, 1)
    with torch.inference_mode():
        layers64 = [(k.double(), v.double()) for k, v, *_ in kv64.layers()]
        ref64 = model64(ids, positions, meta, layers64)
    err = (fused.double() - ref64).abs().max().item()
    assert err <= 1e-4 * ref64.abs().max().item(), err


def test_fused_int4_bfloat16_mqa_step_is_the_per_op_step_bit_for_bit(tmp_path):
    path = save_random_llama(tmp_path, num_key_value_heads=1, num_hidden_layers=3)
    llm = LLM(path, device="cpu", quant="int4", dtype="bfloat16", max_kv_tokens=256)
    model = llm.engine.runner.model
    assert type(model.layers[0].attn.qkv_proj).__name__ == "Int4Linear"
    for i, (ctx_lens, q_lens) in enumerate(STEPS):
        _check_bits(model, llm.config, torch.bfloat16, ctx_lens, q_lens, 10 + i)


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_fused_step_over_a_quantized_cache_is_the_per_op_step_bit_for_bit(tmp_path, kind):
    """The K/V write quantizes and attention dequantizes with the per-op path's kernels: the same
    hidden states, cache bytes and int8 scales, on a bfloat16 INT4 GQA model and the demo's float32."""
    path = save_random_llama(tmp_path, num_key_value_heads=2, num_hidden_layers=2)
    llm = LLM(path, device="cpu", quant="int4", dtype="bfloat16", max_kv_tokens=256)
    for i, (ctx_lens, q_lens) in enumerate(STEPS):
        _check_bits(llm.engine.runner.model, llm.config, torch.bfloat16, ctx_lens, q_lens, 20 + i, kind)


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_fused_greedy_tokens_over_a_quantized_cache_equal_the_per_op_path(kind):
    llm = LLM(LLAMA, device="cpu", max_kv_tokens=256, kv_cache_dtype=kind)
    model, cfg = llm.engine.runner.model, llm.config
    _check_bits(model, cfg, torch.float32, [31, 2, 47], [2, 1, 4], 30, kind)
    assert _greedy(llm, True) == _greedy(llm, False)


def test_fused_path_steps_aside_for_prefill_another_cache_dtype_and_cache_scales(demo):
    model, cfg = demo.engine.runner.model, demo.config
    ids, positions, meta, n_blocks = _step(cfg, [3], [1], 2)
    other = _caches(cfg, n_blocks, torch.bfloat16, 2)          # e.g. a cache stored in 8 bits
    prefill = AttentionMetadata(**{**meta.__dict__, "prefill": True})
    with torch.inference_mode():
        assert fused_cpu.decode_step(model, ids, positions, meta, other.layers()) is None
        assert fused_cpu.decode_step(model, ids, positions, prefill,
                                     _caches(cfg, n_blocks, torch.float32, 2).layers()) is None
        plain = _caches(cfg, n_blocks, torch.float32, 2).layers()
        scaled = [(k, v, torch.ones(1), torch.ones(1)) for k, v, *_ in plain]   # a quantized cache's
        assert fused_cpu.decode_step(model, ids, positions, meta, scaled) is None
        assert fused_cpu.decode_step(model, ids, positions, meta, plain) is not None


def _greedy(llm, fused: bool) -> list[list[int]]:
    Transformer.fused_cpu_decode = fused
    try:
        outs = llm.generate(["To be, or not to be", "O Romeo, Romeo", "Now is the winter"],
                            SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    finally:
        Transformer.fused_cpu_decode = True
    return [o.token_ids for o in outs]


def test_fused_greedy_tokens_equal_the_per_op_path_on_the_demo(demo):
    assert _greedy(demo, True) == _greedy(demo, False)


def test_fused_smollm2_step_and_greedy_tokens_equal_the_per_op_path():
    llm = LLM(smollm2_gguf(), device="cpu", max_kv_tokens=512)
    model = llm.engine.runner.model
    assert model.layers[0].attn.num_kv_heads < model.layers[0].attn.num_heads
    _check_bits(model, llm.config, llm.dtype, [15, 40], [1, 1], 3)
    _check_bits(model, llm.config, llm.dtype, [17], [1], 4)
    assert _greedy(llm, True) == _greedy(llm, False)
