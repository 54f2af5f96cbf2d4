"""Test helpers: Hugging Face transformers as the independent reference (test-only dependency)."""
from __future__ import annotations

import os
import shutil

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "models")
LLAMA = os.path.join(MODELS, "shakespeare-llama")
DRAFT = os.path.join(MODELS, "shakespeare-draft")
MLA = os.path.join(MODELS, "shakespeare-mla")


def hf_model(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)
                 ).logits[0].float()


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens with HF's own KV cache; also the top-2 logit gap at each step. An explicit
    all-ones attention mask goes with every call (transformers otherwise guesses padding from the
    pad id, which some models share with EOS)."""
    out, gaps = [], []
    mask = torch.ones(1, len(ids), dtype=torch.long)
    res = model(torch.tensor([ids]), attention_mask=mask, use_cache=True)
    for _ in range(n):
        logits = res.logits[0, -1].float()
        top2 = logits.topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        tok = int(logits.argmax())
        out.append(tok)
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        res = model(torch.tensor([[tok]]), attention_mask=mask, past_key_values=res.past_key_values,
                    use_cache=True)
    return out, gaps


def save_random_llama(tmp_path, seed: int = 0, **overrides) -> str:
    """A random-weight LlamaForCausalLM written with save_pretrained, plus the demo tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    kw = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw)).to(torch.float32)
    with torch.no_grad():      # larger weights than the default init, so logits are not all near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    path = str(tmp_path)
    model.save_pretrained(path)
    shutil.copy(os.path.join(LLAMA, "tokenizer.model"), path)
    return path


def save_random(tmp_path, config_cls, model_cls, seed: int = 0, **kw) -> str:
    """A random-weight model of any transformers family (config_cls / model_cls), written with
    save_pretrained, plus the demo tokenizer (its vocabulary of 1024 fits vocab_size 1024)."""
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw)).to(torch.float32)
    with torch.no_grad():      # larger weights than the default init, so logits are not all near-ties
        for p in model.parameters():
            if p.dim() >= 2:                                 # linears, embeddings, stacked experts
                p.normal_(0, 0.08)
            else:                                            # biases (0) and norm weights (1): moved
                p.add_(torch.randn_like(p), alpha=0.05)
    path = str(tmp_path)
    model.save_pretrained(path)
    shutil.copy(os.path.join(LLAMA, "tokenizer.model"), path)
    return path


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def first_near_tie(gaps: list[float], eps: float = 1e-3) -> int:
    return next((i for i, g in enumerate(gaps) if g < eps), len(gaps))


def assert_greedy_matches_hf(llm, hf, ids: list[int], n: int, at_least: int) -> None:
    """n greedy tokens of ours equal HF's up to HF's first near-tie, which comes after `at_least`."""
    from tinyinfer import SamplingParams
    ours = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
    theirs, gaps = hf_greedy(hf, ids, n)
    agree = first_near_tie(gaps)
    assert ours.token_ids[:agree] == theirs[:agree]
    assert agree >= at_least, "random weights gave near-ties too early for a meaningful check"


def write_copy(tmp_path, src: str = LLAMA, tensors=None, edit_tensors=None, edit_config=None) -> str:
    """A copy of checkpoint directory `src` in tmp_path: its tensors (or `tensors`) edited in place by
    `edit_tensors`, its config.json by `edit_config`, and its tokenizer."""
    import json
    from safetensors.torch import load_file, save_file
    tensors = tensors if tensors is not None else load_file(os.path.join(src, "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    if edit_config:
        edit_config(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(os.path.join(src, "tokenizer.model"), tmp_path)
    return str(tmp_path)


def save_random_deepseek(tmp_path, version: str, seed: int = 0, **overrides) -> str:
    """A random-weight DeepseekV2/V3ForCausalLM written with save_pretrained (tiny shapes), with the
    demo tokenizer beside it. Weights larger than the default init (fewer near-ties), and a random
    e_score_correction_bias so V3's biased expert choice is exercised."""
    import transformers
    torch.manual_seed(seed)
    kw = dict(vocab_size=1024, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
              q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24,
              n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
              n_group=4, topk_group=2, max_position_embeddings=512, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    if version == "v3":
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**kw))
    else:
        model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    model.save_pretrained(str(tmp_path))
    shutil.copy(os.path.join(MLA, "tokenizer.model"), str(tmp_path))
    return str(tmp_path)
