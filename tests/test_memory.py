"""`python -m tinyinfer.memory` reproduces hand-computed figures, and its parameter count matches the
tensors actually stored in checkpoints."""
import json
import os

import pytest
import torch

from tinyinfer.memory import (Shape, checkpoint_params, count_params, int4_bytes, kv_bytes_per_token,
                              kv_values_per_token_layer, shape_from_hf, weight_bytes)
from tinyinfer.memory.__main__ import main

MODELS = os.path.join(os.path.dirname(__file__), "..", "models")
LLAMA_7B_LIKE = Shape(num_layers=32, hidden_size=4096, num_heads=32)


def test_70b_model_is_140_gb_in_fp16_and_35_gb_in_int4():
    assert weight_bytes(70e9, bits=16) == 140e9
    packed, scales_and_zeros = int4_bytes(70e9, group_size=128)
    assert packed == 35e9
    # tinyinfer's format: one fp16 scale + one uint8 zero point per 128 weights (3 bytes / 128)
    assert scales_and_zeros == 70e9 / 128 * 3 == 1.640625e9
    # with an fp16 zero point as well (e.g. GPTQ's unpacked form): 4 bytes / 128
    assert int4_bytes(70e9, group_size=128, zero_bytes=2)[1] == 2.1875e9


def test_a_million_token_context_of_a_32_layer_4096_wide_model_needs_524_gb():
    per_token = kv_bytes_per_token(LLAMA_7B_LIKE, "mha", dtype_bytes=2)
    assert per_token * 1_000_000 == 32 * 4096 * 1_000_000 * 2 * 2 == 524_288_000_000


def test_mqa_divides_the_cache_by_the_head_count():
    mha = kv_bytes_per_token(LLAMA_7B_LIKE, "mha")
    assert kv_bytes_per_token(LLAMA_7B_LIKE, "mqa") * 32 == mha
    gqa = Shape(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8)
    assert kv_bytes_per_token(gqa, "gqa") * 4 == mha


def test_mla_caches_latent_plus_rope_key_per_token_per_layer():
    # DeepSeek-V2-Lite: 27 layers, 16 heads of 128 + 64 (nope + rope) key dims and 128 value dims
    lite = Shape(num_layers=27, hidden_size=2048, num_heads=16, head_dim=192, v_head_dim=128,
                 kv_lora_rank=512, qk_rope_head_dim=64)
    assert kv_values_per_token_layer(lite, "mla") == 512 + 64
    assert kv_bytes_per_token(lite, "mla") == 27 * 576 * 2
    assert kv_values_per_token_layer(lite, "mha") == 16 * (192 + 128)


@pytest.mark.parametrize("name", ["shakespeare-mla", "shakespeare-llama", "shakespeare-draft"])
def test_parameter_count_from_the_shape_matches_the_stored_tensors(name):
    path = os.path.join(MODELS, name)
    with open(os.path.join(path, "config.json")) as f:
        shape = shape_from_hf(json.load(f))
    assert count_params(shape) == checkpoint_params(path)[0]


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_parameter_count_of_a_deepseek_moe_checkpoint(tmp_path, version):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16,
                  qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=8, n_routed_experts=4,
                  n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1)
    if version == "v3":
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
            q_lora_rank=24, n_group=2, topk_group=1, **common))
    else:
        model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(q_lora_rank=None, **common))
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        shape = shape_from_hf(json.load(f))
    assert count_params(shape) == checkpoint_params(str(tmp_path))[0]


def test_cli_prints_the_hand_computed_figures(capsys):
    main(["--params", "70B", "--layers", "32", "--d-model", "4096", "--heads", "32",
          "--context", "1000000"])
    out = capsys.readouterr().out
    assert "140.00 GB" in out and "35.00 GB packed + 1.64 GB" in out
    mha_line = next(line for line in out.splitlines() if line.strip().startswith("MHA"))
    mqa_line = next(line for line in out.splitlines() if line.strip().startswith("MQA"))
    assert "524.29 GB" in mha_line and "16.38 GB" in mqa_line and "32.0x" in mqa_line


def test_cli_reads_a_checkpoint_and_marks_its_own_attention(capsys):
    main(["--ckpt", os.path.join(MODELS, "shakespeare-mla"), "--context", "1024"])
    out = capsys.readouterr().out
    mla_line = next(line for line in out.splitlines() if line.strip().startswith("MLA"))
    assert "576" in mla_line and "this model" in mla_line
    assert f"{4 * 576 * 2:,}" in mla_line          # 4 layers x 576 values x 2 bytes per token


def test_cli_reads_a_single_safetensors_file(capsys):
    main(["--ckpt", os.path.join(MODELS, "shakespeare-llama", "model.safetensors")])
    out = capsys.readouterr().out
    assert "3.67 M parameters (counted in the checkpoint's tensors" in out and "this model" in out
