"""Multi-head latent attention and DeepSeek MoE against Hugging Face transformers (float32, CPU), the
naive and absorbed MLA paths against each other, and the latent cache's size.

The paged_attention op in MLA shape (576/512 view, one KV head) is covered by test_paged_attention.py
(reference vs float64 on the CPU; the CUDA kernel vs the reference on a GPU)."""
import json
import os

import pytest
import torch

import paged_util
from hf_util import (MLA, assert_greedy_matches_hf, assert_logits_close, hf_greedy, hf_logits, hf_model,
                     save_random_deepseek)
from tinyinfer import LLM, SamplingParams
from tinyinfer.config.errors import ConfigError
from tinyinfer.config.model import ModelConfig
from tinyinfer.engine.kv_cache import PagedKVCache
from tinyinfer.layers.mla import set_mla_mode
from tinyinfer.memory import kv_bytes_per_token, shape_from_hf
from tinyinfer.models.transformer import Transformer

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"
YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "mscale": 0.707,
        "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0}


# name: (version, save_random_deepseek overrides); seeds picked so HF's greedy run has no near-tie early
RANDOM_MODELS = {
    # V3 (sigmoid routing, noaux_tc groups, bias, normalised + scaled weights), low-rank query
    "v3_moe": ("v3", dict(routed_scaling_factor=2.5, norm_topk_prob=True)),
    # V3 without q_lora_rank, all layers dense, YaRN rope + mscale softmax correction
    "v3_dense_plain_q_yarn": ("v3", dict(q_lora_rank=None, first_k_dense_replace=3, rope_parameters=YARN)),
    # V3 with the rotate-half rope layout instead of interleaved pairs
    "v3_moe_rope_not_interleaved": ("v3", dict(rope_interleave=False, norm_topk_prob=False,
                                               routed_scaling_factor=1.5)),
    # V2 (softmax routing, group-limited greedy), low-rank query, YaRN
    "v2_moe_group_limited_yarn": ("v2", dict(topk_method="group_limited_greedy", routed_scaling_factor=1.5,
                                             rope_parameters=YARN)),
    # V2-Lite style: plain q_proj, greedy top-k, two shared experts
    "v2_lite_moe": ("v2", dict(seed=1, q_lora_rank=None, topk_method="greedy", n_shared_experts=2,
                               n_group=1, topk_group=1)),
}


def teacher_forced(llm: LLM, ids: list[int], prefix: int, mode: str) -> torch.Tensor:
    """paged_util.teacher_forced through MLA path `mode` (naive / absorbed)."""
    set_mla_mode(llm.model, mode)
    try:
        return paged_util.teacher_forced(llm, ids, prefix)
    finally:
        set_mla_mode(llm.model, "auto")


@pytest.fixture(scope="module")
def shakespeare():
    return LLM(MLA, device="cpu", dtype="float32"), hf_model(MLA)


@pytest.fixture(scope="module")
def shakespeare_steps(shakespeare):
    """HF's logits of PROMPT, and ours from a 5-token prefill + one decode step per token, per path."""
    llm, hf = shakespeare
    ids = llm.tokenizer.encode(PROMPT)
    return hf_logits(hf, ids), {m: teacher_forced(llm, ids, 5, m) for m in ("naive", "absorbed")}


def test_shakespeare_mla_matches_hf_logits_and_64_greedy_tokens(shakespeare):
    llm, hf = shakespeare
    ids = llm.tokenizer.encode(PROMPT)
    assert_logits_close(llm.logits(ids), hf_logits(hf, ids))
    ours = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))[0]
    theirs, _ = hf_greedy(hf, ids, 64)
    assert ours.token_ids == theirs


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_shakespeare_mla_decode_steps_match_hf_in_both_paths(shakespeare_steps, mode):
    ref, ours = shakespeare_steps
    assert_logits_close(ours[mode], ref)


def test_naive_and_absorbed_paths_agree(shakespeare, shakespeare_steps):
    _, ours = shakespeare_steps
    naive, absorbed = ours["naive"], ours["absorbed"]
    torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-5 * float(naive.abs().max()))
    llm, _ = shakespeare                  # and a whole prompt as one prefill, in each path
    ids = llm.tokenizer.encode(PROMPT)
    naive, absorbed = (teacher_forced(llm, ids, len(ids), m) for m in ("naive", "absorbed"))
    torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-5 * float(naive.abs().max()))


@pytest.mark.parametrize("name", list(RANDOM_MODELS))
def test_random_deepseek_matches_hf(tmp_path, name):
    version, overrides = RANDOM_MODELS[name]
    path = save_random_deepseek(tmp_path, version, **overrides)
    llm = LLM(path, device="cpu", dtype="float32")
    hf = hf_model(path)
    ids = list(range(3, 300, 7))          # 43 tokens: rope at larger positions, several experts hit
    ref = hf_logits(hf, ids)
    assert_logits_close(llm.logits(ids), ref)
    assert_logits_close(teacher_forced(llm, ids, prefix=30, mode="absorbed"), ref)
    assert_greedy_matches_hf(llm, hf, ids, 24, at_least=8)


def test_moe_model_naive_and_absorbed_agree_and_batching_is_exact(tmp_path):
    llm = LLM(save_random_deepseek(tmp_path, "v3"), device="cpu", dtype="float32")
    ids = list(range(5, 80, 3))
    naive, absorbed = (teacher_forced(llm, ids, 9, m) for m in ("naive", "absorbed"))
    torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-5 * float(naive.abs().max()))
    prompts = [list(range(5, 40)), [7], list(range(300, 380, 2))]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    together = llm.generate(prompts, params)
    for prompt, out in zip(prompts, together):
        assert out.token_ids == llm.generate([prompt], params)[0].token_ids
    assert llm.stats["free_blocks"] == llm.stats["num_blocks"]


def test_batched_generation_equals_each_prompt_alone_and_returns_all_blocks(shakespeare):
    llm, _ = shakespeare
    prompts = ["ROMEO:", "KING HENRY:\nNow, lords, to France", list(range(5, 60)), "O"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    together = llm.generate(prompts, params)
    for prompt, out in zip(prompts, together):
        alone = llm.generate([prompt], params)[0]
        assert out.token_ids == alone.token_ids and out.text == alone.text
    assert llm.stats["free_blocks"] == llm.stats["num_blocks"]


def test_latent_cache_holds_one_row_of_rank_plus_rope_per_token_per_layer(shakespeare):
    llm, _ = shakespeare
    cfg = llm.config
    for k_cache, v_cache in llm.engine.runner.kv.layers():
        assert k_cache.shape[1:] == (16, 1, 512 + 64) and v_cache is None
    # bytes per token, from the engine's own accounting and from the formula (tinyinfer/memory/)
    k_dims, v_dims = Transformer.kv_dims(cfg)
    with open(os.path.join(MLA, "config.json")) as f:
        shape = shape_from_hf(json.load(f))
    for dtype in (torch.bfloat16, torch.float32):
        engine = PagedKVCache.bytes_per_token(cfg.num_layers, k_dims, v_dims, dtype)
        assert engine == kv_bytes_per_token(shape, "mla", dtype.itemsize) == 4 * 576 * dtype.itemsize


def test_fp8_block_quantized_checkpoints_are_refused_clearly():
    with open(os.path.join(MLA, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    with pytest.raises(ConfigError, match="FP8.*not supported.*bf16"):
        ModelConfig.from_hf(cfg)


def test_impossible_expert_groups_are_refused():
    with open(os.path.join(MLA, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(first_k_dense_replace=1, n_routed_experts=6, n_group=4)      # 6 experts, 4 groups
    with pytest.raises(ConfigError, match="n_group"):
        ModelConfig.from_hf(cfg)


@pytest.mark.cuda
def test_cuda_absorbed_decode_through_the_kernel_matches_the_cpu_reference(cuda_extension):
    cpu = LLM(MLA, device="cpu", dtype="float32")
    gpu = LLM(MLA, device="cuda", dtype="bfloat16")
    ids = cpu.tokenizer.encode(PROMPT * 3)
    ref = teacher_forced(cpu, ids, 5, "naive")
    ours = teacher_forced(gpu, ids, 5, "absorbed")            # decode steps: the paged-attention kernel
    torch.testing.assert_close(ours, ref, rtol=0, atol=0.05 * float(ref.abs().max()))
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    eager = LLM(MLA, device="cuda", dtype="bfloat16", cuda_graphs=False)
    assert gpu.generate([ids], params)[0].token_ids == eager.generate([ids], params)[0].token_ids


def test_generate_figures_and_bench_report_kv_bytes_against_mha(shakespeare):
    from tools.bench.mla import cache_table
    from tinyinfer.memory import kv_figures
    llm, _ = shakespeare
    # shakespeare-mla: 4 layers x (512 + 64) values vs MHA's 4 heads x (128 + 64) (K and V), bf16
    assert kv_figures(llm.config, torch.bfloat16) == {
        "kv_bytes_per_token": 4 * 576 * 2, "kv_vs_mha": 0.75, "kv_mha_bytes_per_token": 4 * 4 * 192 * 2}
    rows = {r["model"]: r for r in cache_table(MLA)}
    lite = rows["DeepSeek-V2-Lite"]     # 16 heads x (192 + 128) values for MHA vs 576 for MLA
    assert (lite["mla bytes/tok/layer"], lite["mha bytes/tok/layer"]) == (1152, 16 * 320 * 2)


@pytest.mark.parametrize("q_len,num_new", [(1, [1, 1, 1]), (4, [4, 1, 3])])
def test_padded_graph_batch_with_latent_cache_equals_eager_step(shakespeare, q_len, num_new):
    # The CUDA-graph runner's padded batch (padding sequence of q_len 0, padding rows with slot -1),
    # run without capture on the CPU: the absorbed path gives the eager step's logits.
    from tinyinfer.engine.batch import build_batch
    from tinyinfer.engine.cuda_graphs import GraphRunner
    from tinyinfer.engine.sequence import Sequence
    llm, _ = shakespeare
    engine, bs = llm.engine, llm.engine.block_size
    gen = torch.Generator().manual_seed(1)
    seqs = []
    for i, (n, e) in enumerate(zip([9, 40, 70], num_new)):
        seq = Sequence(str(i), torch.randint(3, 1000, (n + e,), generator=gen).tolist(),
                       SamplingParams(max_tokens=1), 0)
        engine.blocks.grow(seq, n + e)
        engine.runner.execute(build_batch([seq], [n], bs))
        seq.num_cached = n
        seqs.append(seq)
    eager = engine.runner.execute(build_batch(seqs, num_new, bs), all_logits=True)
    padded = GraphRunner(llm.model, engine.runner.kv, q_len=q_len, capture=False).run(
        build_batch(seqs, num_new, bs))
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5 * float(eager.abs().max()))
    for s in seqs:
        engine.blocks.free(s)


def test_int4_reaches_mla_projections_and_experts_and_both_paths_still_agree(tmp_path):
    from tinyinfer.quant.quantizer import quantize_model
    llm = LLM(save_random_deepseek(tmp_path, "v3"), device="cpu", dtype="float32")
    names = quantize_model(llm.model, group_size=32, clip_search=False).names
    assert "layers.1.attn.kv_b_proj" in names and "layers.1.mlp.experts.7.gate_up_proj" in names
    assert "layers.1.mlp.shared_experts.down_proj" in names
    assert not any(".gate" == n[-5:] for n in names)              # the router stays dense, float32
    ids = list(range(5, 80, 3))
    naive, absorbed = (teacher_forced(llm, ids, 9, m) for m in ("naive", "absorbed"))
    torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-5 * float(naive.abs().max()))
