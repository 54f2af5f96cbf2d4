"""GGUF loading on a real file -- SmolLM2-135M-Instruct, Q4_1 (210 Q4_1, 1 Q8_0, 61 F32 tensors) --
against Hugging Face transformers loading the same file (`from_pretrained(dir, gguf_file=...)`).

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
from tinyinfer.loading.gguf import load_gguf

pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def smollm2() -> str:
    return smollm2_gguf()


@pytest.fixture(scope="module")
def ckpt(smollm2):
    return load_gguf(smollm2)


def _hf_args(path: str) -> tuple[str, str]:
    return os.path.dirname(path), os.path.basename(path)


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


def test_every_tensor_equals_transformers(ckpt, smollm2):
    """Every tensor we yield, in float32, equals transformers' parameter of the same name; the INT4
    repack of the Q4_1 tensors decodes to exactly the same values as the dense path."""
    from transformers import AutoModelForCausalLM
    folder, name = _hf_args(smollm2)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
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
