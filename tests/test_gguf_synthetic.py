"""GGUF loading on small synthetic files written with gguf.GGUFWriter: every tensor type, the name and
config mapping of each architecture (checked against transformers where it loads the file), the
q/k row permutation round trip, INT4 repack of experts and permuted rows. Errors and rope scaling:
test_gguf_metadata.py."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gguf_util import (EXPERTS, F, H, HEAD_DIM, HEADS, KV, LAYERS, MOE_F, VOCAB, base_meta, build,
                       int4_to_float, llama_cpp_permute, quantize, stored_values, write_gguf)
from tinyinfer.loading.gguf import load_gguf


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2", "qwen3", "qwen3moe"])
def test_names_values_and_config(tmp_path, family):
    """Every tensor under its Hugging Face name and shape, with the values written (llama / mixtral
    q/k: written permuted as llama.cpp does, read back in Hugging Face order)."""
    path, want = build(tmp_path, family)
    ckpt = load_gguf(path)
    assert set(ckpt.tensors) == set(want)
    for name, values in want.items():
        assert ckpt.tensors[name].shape == tuple(values.shape), name
        assert torch.equal(ckpt.tensors[name].dense(), values), name
    cfg = ckpt.config
    arch = {"llama": "Llama", "mixtral": "Mixtral", "qwen2": "Qwen2", "qwen3": "Qwen3",
            "qwen3moe": "Qwen3Moe"}[family]
    assert cfg["architectures"] == [f"{arch}ForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (H, LAYERS, HEADS, KV, VOCAB)
    assert cfg["head_dim"] == HEAD_DIM.get(family, H // HEADS)
    assert (cfg["rms_norm_eps"], cfg["rope_theta"], cfg["max_position_embeddings"]) == (1e-6, 1e4, 256)
    assert not cfg["tie_word_embeddings"]
    if family == "mixtral":
        assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (EXPERTS, 2)
        assert cfg["intermediate_size"] == F
    if family == "qwen3moe":
        assert (cfg["num_experts"], cfg["num_experts_per_tok"]) == (EXPERTS, 2)
        assert cfg["moe_intermediate_size"] == MOE_F
        assert cfg["norm_topk_prob"] is True


def test_mixtral_per_expert_tensors(tmp_path):
    """Older Mixtral files store each expert apart (blk.N.ffn_gate.E.weight): same names."""
    path, want = build(tmp_path, "mixtral", legacy_experts=True)
    ckpt = load_gguf(path)
    assert set(ckpt.tensors) == set(want)
    assert all(torch.equal(ckpt.tensors[n].dense(), v) for n, v in want.items())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3moe"])
def test_matches_transformers(tmp_path, family):
    """Config and every tensor against transformers loading the same file (it has no Mixtral GGUF
    support). llama: q/k in Q4_0, so the un-permutation is also checked on a quantized tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path, _ = build(tmp_path, family, qtype="Q4_0" if family == "llama" else "F32")
    ckpt = load_gguf(path)
    folder, name = os.path.dirname(path), os.path.basename(path)
    hf_cfg = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "norm_topk_prob"):
        assert ckpt.config.get(key) == hf_cfg.get(key), key
    assert np.float32(ckpt.config["rms_norm_eps"]) == np.float32(hf_cfg["rms_norm_eps"])
    assert ckpt.config["rope_theta"] == hf_cfg["rope_parameters"]["rope_theta"]
    state = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).state_dict()
    ours = {n: t.dense() for n, t in ckpt.tensors.items()}
    if family == "qwen3moe":      # transformers fuses the experts: gate_up (E, 2I, H), down (E, H, I)
        for i in range(LAYERS):
            p = f"model.layers.{i}.mlp.experts."
            for fused, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
                stacked = torch.stack([torch.cat([ours.pop(f"{p}{e}.{part}.weight") for part in parts])
                                       for e in range(EXPERTS)])
                ours[p + fused] = stacked
    assert set(ours) == set(state)
    for n, values in ours.items():
        assert torch.equal(values, state[n]), n


QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
          "Q5_K", "Q6_K"]


@pytest.mark.parametrize("qtype", QTYPES)
def test_tensor_types(tmp_path, qtype):
    """Each storage type decodes to gguf's own values (K-quants: random blocks, gguf has no
    K-quant quantizer); Q4_0 / Q4_1 also repack exactly into INT4 g32; types with a quantizer are
    close to the weights they quantized."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 256)).astype(np.float32)        # K = 256: one K-quant super-block
    stored = quantize(w, qtype, rng)
    meta = base_meta("llama", layers=1, hidden=256, heads=2, kv_heads=2)
    tensors = {"token_embd.weight": (rng.standard_normal((VOCAB, 256)).astype(np.float32), "F32"),
               "blk.0.ffn_gate.weight": (stored, qtype),
               "blk.0.attn_k.weight": (llama_cpp_permute(stored, 2), qtype)}
    ckpt = load_gguf(write_gguf(str(tmp_path / f"{qtype}.gguf"), "llama", meta, tensors))
    gate = ckpt.tensors["model.layers.0.mlp.gate_proj.weight"]
    k = ckpt.tensors["model.layers.0.self_attn.k_proj.weight"]
    assert gate.ggml_type == qtype and gate.shape == (32, 256)
    want = torch.from_numpy(stored_values(stored, qtype).reshape(32, 256))
    assert torch.equal(gate.dense(), want) and torch.equal(k.dense(), want)
    if qtype in ("F16", "BF16"):            # stored values come back in their own dtype unchanged
        dt = getattr(torch, {"F16": "float16", "BF16": "bfloat16"}[qtype])
        assert torch.equal(gate.dense(dt), torch.from_numpy(w).to(dt))
    if qtype not in ("F32", "F16", "BF16", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        tol = {"Q8_0": 0.01, "Q5_0": 0.07, "Q5_1": 0.07, "Q4_0": 0.15, "Q4_1": 0.15}[qtype]
        assert float((gate.dense() - torch.from_numpy(w)).abs().max()) < tol * float(np.abs(w).max())
    assert gate.is_int4 == (qtype in ("Q4_0", "Q4_1"))
    if gate.is_int4:
        for t in (gate, k):
            q, s, z = t.int4()
            assert q.dtype == torch.uint8 and q.shape == (32, 256) and int(q.max()) <= 15
            assert s.dtype == torch.float16 and s.shape == (32, 8)
            assert z.dtype == (torch.uint8 if qtype == "Q4_0" else torch.float16) and z.shape == (32, 8)
            if qtype == "Q4_0":
                assert bool((z == 8).all())
            assert torch.equal(int4_to_float(q, s, z), want)


@pytest.mark.parametrize("family,qtype", [("mixtral", "Q4_0"), ("qwen3moe", "Q4_1"), ("llama", "Q4_1")])
def test_int4_on_experts_and_permuted_rows(tmp_path, family, qtype):
    """INT4 repack of stacked experts (one per expert) and of permuted q/k rows is exact too."""
    path, want = build(tmp_path, family, qtype=qtype)
    ckpt = load_gguf(path)
    int4 = [t for t in ckpt.tensors.values() if t.is_int4]
    assert any(".experts." in t.name for t in int4) == (family != "llama")
    assert any("q_proj" in t.name for t in int4)
    for t in int4:
        assert torch.equal(int4_to_float(*t.int4()), want[t.name]), t.name
