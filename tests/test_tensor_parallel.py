"""Tensor parallelism on the CPU (gloo, N = 2) against the same model on one device: logits within
float32 tolerance and greedy tokens identical -- on shakespeare-llama, shakespeare-draft (tied
embeddings, one KV head replicated on both ranks), shakespeare-mla, random MoE
models (Qwen3-MoE with q/k/v/o biases and QK-norm; DeepSeek-V3 with MLA and shared experts), an INT4
model quantized on the fly and an INT4 file read slice by slice -- and with preemption, speculative
decoding (the draft model on rank 0) and seeded sampling inside the step. The bytes each step
all-reduces show the structure: one all-reduce per attention and per MLP of every layer, plus the
embedding's, and the gathered vocabulary.

One engine pair per model (module-scoped): each N = 2 engine spawns one worker process."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from hf_util import DRAFT, LLAMA, MLA, save_random, save_random_deepseek
from tinyinfer import LLM, LLMEngine, SamplingParams
from tinyinfer.config.model import ModelConfig
from tinyinfer.engine.model_runner import ModelRunner
from tinyinfer.engine.proposers import DraftModelProposer
from tinyinfer.loading import checkpoint as ckpt
from tinyinfer.quant.io import save_int4

POOL = 256                  # KV tokens: the preemption test's 6 requests must take turns
PROMPTS = ["ROMEO:", "JULIET: O Romeo, Romeo!", [5, 17, 300, 41, 9, 77, 512, 3, 600]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _qwen3_moe(tmp) -> str:
    transformers = pytest.importorskip("transformers")
    return save_random(tmp, transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                       vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[2],
                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)


def _deepseek_moe(tmp) -> str:
    """DeepSeek-V3: MLA with a low-rank query, sigmoid noaux_tc routing over 8 experts + a shared one."""
    return save_random_deepseek(tmp, "v3", routed_scaling_factor=2.5, norm_topk_prob=True)


def _int4_file(tmp) -> str:
    """shakespeare-llama quantized to INT4 g128 (on one device), written as a tinyinfer INT4 file."""
    one = LLM(LLAMA, device="cpu", dtype="float32", quant="int4", max_kv_tokens=16)
    path = os.path.join(str(tmp), "llama-int4.safetensors")
    save_int4(one.model, path, ckpt.locate(LLAMA).config, 128)
    shutil.copy(os.path.join(LLAMA, "tokenizer.model"), str(tmp))
    return path


# name -> (checkpoint path, or a function writing one into a temporary directory; LLM options)
MODELS = {
    "llama": (LLAMA, {}),
    "tied_one_kv_head": (DRAFT, {}),          # tied lm_head; 1 KV head replicated on both ranks
    "mla": (MLA, {}),
    "qwen3_moe": (_qwen3_moe, {"dtype": "float32"}),
    "deepseek_moe": (_deepseek_moe, {"dtype": "float32"}),
    "int4": (LLAMA, {"dtype": "float32", "quant": "int4"}),       # float32: the exact INT4 path
    "int4_file": (_int4_file, {"dtype": "float32"}),
}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, tmp_path_factory):
    """(the model on one device, the same model split over 2 ranks)."""
    path, options = MODELS[request.param]
    if callable(path):
        path = path(tmp_path_factory.mktemp(request.param))
    options = dict(device="cpu", max_kv_tokens=POOL, **options)
    one = LLM(path, **options)
    with LLM(path, tensor_parallel_size=2, **options) as two:
        yield one, two


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(prompts, params)]


def test_logits_match_one_device_and_each_layer_all_reduces_twice(pair):
    one, two = pair
    group, cfg = two.engine.runner.group, one.config
    for prompt in PROMPTS:
        ids = prompt if isinstance(prompt, list) else one.tokenizer.encode(prompt)
        before = (group.reduced_bytes, group.num_all_reduces, group.gathered_bytes)
        got, want = two.logits(ids), one.logits(ids)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        # embedding + (attention, MLP) per layer, each over T x hidden; the logits of the other
        # rank's half of the vocabulary gathered
        itemsize = two.dtype.itemsize
        assert group.num_all_reduces - before[1] == 2 * cfg.num_layers + 1
        assert group.reduced_bytes - before[0] == (2 * cfg.num_layers + 1) * len(ids) * cfg.hidden_size \
            * itemsize
        assert group.gathered_bytes - before[2] == len(ids) * cfg.vocab_size // 2 * itemsize


def test_greedy_tokens_match_one_device(pair):
    one, two = pair
    assert _tokens(two, PROMPTS, GREEDY) == _tokens(one, PROMPTS, GREEDY)


def test_greedy_tokens_match_under_preemption(pair):
    one, two = pair
    prompts = [[3 + i, 40 + i] + list(range(100 + 7 * i, 130 + 7 * i)) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    engine = LLMEngine.from_runner(two.engine.runner, two.tokenizer)
    got = _tokens(LLM.from_engine(engine), prompts, params)
    assert engine.stats["preemptions"] > 0, "the pool was meant to run out"
    assert got == [_tokens(one, [p], params)[0] for p in prompts]      # each alone: no preemption
    assert engine.stats["free_blocks"] == engine.stats["num_blocks"]


def test_speculative_greedy_with_a_draft_model_on_rank_0_matches_plain_greedy(pair):
    one, two = pair
    files = ckpt.locate(DRAFT)
    draft = ModelRunner.load(files, ModelConfig.from_hf(files.config, files.generation_config),
                             two.device, two.dtype, kv_tokens=POOL)
    engine = LLMEngine.from_runner(two.engine.runner, two.tokenizer)
    spec = engine.set_speculator(DraftModelProposer(draft), 3)
    assert _tokens(LLM.from_engine(engine), PROMPTS, GREEDY) == _tokens(one, PROMPTS, GREEDY)
    assert spec.steps > 0


def test_seeded_sampling_inside_the_step_matches_one_device(pair):
    one, two = pair
    params = [SamplingParams(temperature=0.8, seed=s, max_tokens=16, ignore_eos=True) for s in (1, 2, 3)]
    assert _tokens(two, PROMPTS, params) == _tokens(one, PROMPTS, params)


def test_a_rank_reads_only_its_slices_of_the_checkpoint(monkeypatch):
    """Rank r of 2 reads (lazily, slice by slice) half of every split tensor and whole replicated ones
    (the norms): its bytes read are half the checkpoint's, plus the norms."""
    from tinyinfer.loading.shard import Shard
    from tinyinfer.loading.weights import load_model
    read = {"get": 0, "get_slice": 0}
    get, get_slice = ckpt.TensorReader.get, ckpt.TensorReader.get_slice

    def counting(name, fn):
        def call(self, *args):
            t = fn(self, *args)
            read[name] += t.numel() * t.element_size()
            return t
        return call

    monkeypatch.setattr(ckpt.TensorReader, "get", counting("get", get))
    monkeypatch.setattr(ckpt.TensorReader, "get_slice", counting("get_slice", get_slice))
    files = ckpt.locate(LLAMA)
    cfg = ModelConfig.from_hf(files.config, files.generation_config)
    reader = ckpt.TensorReader(files.weight_files)
    total = sum(reader.get(n).numel() * reader.get(n).element_size() for n in reader.where)
    norms = sum(reader.get(n).numel() * reader.get(n).element_size() for n in reader.where
                if "norm" in n)
    for rank in range(2):
        read.update(get=0, get_slice=0)
        model = load_model(files, cfg, torch.bfloat16, torch.device("cpu"), shard=Shard(rank, 2, cfg))
        assert read["get"] == norms                          # whole: only the replicated norms
        assert read["get_slice"] == (total - norms) // 2     # everything else: this rank's half
        assert model.embed_tokens.weight.shape == (cfg.vocab_size // 2, cfg.hidden_size)
