"""GGUF loading on a real file -- SmolLM2-135M-Instruct, Q4_1 (210 Q4_1, 1 Q8_0, 61 F32 tensors) --
against Hugging Face transformers loading the same file (`from_pretrained(dir, gguf_file=...)`): the
tensors, and the whole engine (`LLM("file.gguf")`, float32: its 120 INT4 linears give the reference's
exact values): logits within 1e-3 of max |logit| and 32 greedy tokens identical on a few prompts.

Tensors are compared EXACTLY (torch.equal), not within a tolerance: both sides compute the same float32
operations -- gguf's dequantize for transformers, and for our INT4 repack q * s + z with s, z fp16 (a
product of an fp16 scale and a 4-bit level is exact in float32, then one rounded add, as gguf does).
The q/k row un-permutation is checked by the same comparison: it is a pure reordering.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gguf_util import int4_to_float, smollm2_gguf
from hf_util import hf_greedy, hf_logits
from tinyinfer import LLM, SamplingParams
from tinyinfer.layers.linear import Int4Linear
from tinyinfer.layers.q8 import Q8Embedding
from tinyinfer.loading.gguf import load_gguf
from tinyinfer.ops import reference

pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def smollm2() -> str:
    return smollm2_gguf()


@pytest.fixture(scope="module")
def ckpt(smollm2):
    return load_gguf(smollm2)


def _hf_args(path: str) -> tuple[str, str]:
    return os.path.dirname(path), os.path.basename(path)


@pytest.fixture(scope="module")
def hf(smollm2):
    from transformers import AutoModelForCausalLM
    folder, name = _hf_args(smollm2)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(smollm2):
    return LLM(smollm2, device="cpu", dtype="float32", max_kv_tokens=1024)


def test_config_matches_transformers(ckpt, smollm2):
    from transformers import AutoConfig
    folder, name = _hf_args(smollm2)
    hf = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    ours = ckpt.config
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["model_type"] == hf["model_type"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                "attention_bias", "mlp_bias", "hidden_act"):
        assert ours[key] == hf[key], key
    # Both are the file's float32; ours is its shortest decimal (SmolLM2's config.json says 1e-05).
    assert ours["rms_norm_eps"] == 1e-05
    assert np.float32(ours["rms_norm_eps"]) == np.float32(hf["rms_norm_eps"])
    assert ours["rope_theta"] == hf["rope_parameters"]["rope_theta"] == 100000.0
    assert hf["rope_parameters"]["rope_type"] == "default" and "rope_scaling" not in ours
    assert ckpt.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert ckpt.chat_template.startswith("{% for message in messages %}")
    assert "<|im_start|>" in ckpt.chat_template


def test_tensor_types_and_names(ckpt):
    types = {t.ggml_type for t in ckpt.tensors.values()}
    assert types == {"Q4_1", "Q8_0", "F32"}
    assert "lm_head.weight" not in ckpt.tensors          # tied: the file has no output.weight
    q = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q.gguf_name == "blk.0.attn_q.weight" and q.shape == (576, 576) and q.is_int4
    k = ckpt.tensors["model.layers.0.self_attn.k_proj.weight"]
    assert k.shape == (192, 576)                         # 3 kv heads x 64
    assert ckpt.tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert ckpt.tensors["model.embed_tokens.weight"].ggml_type == "Q8_0"
    with pytest.raises(ValueError, match="only Q4_0 and Q4_1 repack"):
        ckpt.tensors["model.embed_tokens.weight"].int4()


def test_int4_layout(ckpt):
    q, s, z = ckpt.tensors["model.layers.3.mlp.up_proj.weight"].int4()
    assert q.dtype == torch.uint8 and q.shape == (1536, 576) and int(q.max()) <= 15
    assert s.dtype == torch.float16 and s.shape == (1536, 18)
    assert z.dtype == torch.float16 and z.shape == (1536, 18)        # Q4_1: the float offset m


def test_every_tensor_equals_transformers(ckpt, hf):
    """Every tensor we yield, in float32, equals transformers' parameter of the same name; the INT4
    repack of the Q4_1 tensors decodes to exactly the same values as the dense path."""
    state = hf.state_dict()
    assert set(ckpt.tensors) == set(state) - {"lm_head.weight"}
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    for hf_name, tensor in ckpt.tensors.items():
        dense = tensor.dense(torch.float32)
        assert dense.shape == tensor.shape
        if tensor.is_int4:
            assert torch.equal(int4_to_float(*tensor.int4()), dense), hf_name
        assert torch.equal(dense, state[hf_name]), hf_name
    # dtype conversion happens after dequantization (one rounding)
    q = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q.dense(torch.bfloat16), state[q.name].to(torch.bfloat16))


def test_engine_holds_the_files_q4_blocks_as_int4(llm, hf):
    """Every linear of the decoder is INT4 g32 with float offsets (Q4_1), fused q/k/v and gate/up
    decoding to transformers' weights exactly; the tied head and the embedding share the file's Q8_0
    bytes (on a CPU: layers/q8.py), which decode to transformers' embedding exactly."""
    int4 = {n: m for n, m in llm.model.named_modules() if isinstance(m, Int4Linear)}
    assert len(int4) == 30 * 4                    # qkv, o, gate_up, down per layer
    assert all(m.group_size == 32 and m.zeros.dtype == torch.float16 for m in int4.values())
    state = hf.state_dict()
    p = "model.layers.7."
    qkv = torch.cat([state[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(int4["layers.7.attn.qkv_proj"].dequantize(), qkv)
    gate_up = torch.cat([state[f"{p}mlp.{x}_proj.weight"] for x in ("gate", "up")])
    assert torch.equal(int4["layers.7.mlp.gate_up_proj"].dequantize(), gate_up)
    emb = llm.model.embed_tokens
    assert isinstance(emb, Q8Embedding) and llm.model.lm_head.embedding[0] is emb
    assert torch.equal(reference.q8_dequantize(*emb.levels()), state["model.embed_tokens.weight"])


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.mark.parametrize("prompt", PROMPTS, ids=["text", "code", "chat"])
def test_logits_and_greedy_tokens_match_transformers(llm, hf, prompt):
    # The same prompt ids for both (our tokenizer's; test_gguf_tokenizer.py compares tokenizers).
    ids = llm.tokenizer.encode(prompt)
    ours, ref = llm.logits(ids), hf_logits(hf, ids)
    assert float((ours - ref).abs().max()) <= 1e-3 * float(ref.abs().max())
    greedy = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))[0]
    theirs, _ = hf_greedy(hf, ids, 32)
    assert greedy.token_ids == theirs


def test_engine_tokenizer_is_the_files(llm, ckpt):
    """LLM's tokenizer wraps the one built from the file's vocabulary: same ids, BOS / EOS and chat
    template from the metadata; special tokens dropped from the text unless asked for."""
    tok, ref = llm.tokenizer, ckpt.tokenizer()
    for text in ["Hello, world!", "emoji 😀👍🏽 and 漢字", "x =  42\n\tdone", "<|im_start|>hi<|im_end|>"]:
        assert tok.encode(text) == ref.tokenizer.encode(text).ids, text
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.chat_template == ckpt.chat_template
    assert llm.config.eos_token_ids == [2]


CONVERSATIONS = [
    [{"role": "user", "content": "Hello! Who wrote Hamlet?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one, in French: élan vital 🙂"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "multi-turn"])
def test_chat_rendering_from_the_file_matches_transformers(llm, smollm2, messages):
    # The file's template rendered by loading/chat.py vs transformers' apply_chat_template on the
    # tokenizer it builds from the same file: the same text, and (no digits next to spaces here,
    # where the two tokenizers differ by design: test_gguf_tokenizer.py) the same ids.
    from transformers import AutoTokenizer
    from tinyinfer.loading.chat import apply_chat_template, choose_template, render
    folder, name = _hf_args(smollm2)
    hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    want_text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tok = llm.tokenizer
    assert render(choose_template(tok), messages, True, special_tokens=tok.special_tokens) == want_text
    want_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
    assert apply_chat_template(tok, messages) == list(want_ids)
