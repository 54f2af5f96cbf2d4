"""Checkpoints whose config.json and tensors disagree, or whose fields are out of range, are refused by
name before the model is allocated (issue 20, cases 3, 5, 6, 8): the layer count exactly, numeric
fields by name and range, weight dtypes, legacy RoPE scaling, sharded duplicates -- for safetensors,
GGUF and GPTQ checkpoints alike."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import gguf_util
from hf_util import LLAMA, MLA, write_copy
from quant_util import gptq_checkpoint
from tinyinfer import LLM
from tinyinfer.config.errors import CheckpointError, ConfigError
from tinyinfer.config.model import ModelConfig
from tinyinfer.loading import validate

IDS = [1, 45, 300, 12, 77]


def write(tmp_path, src: str = LLAMA, edit_tensors=None, edit_config=None) -> str:
    return write_copy(tmp_path, src, edit_tensors=edit_tensors, edit_config=edit_config)


def setter(key: str, value):
    def edit(d):
        d[key] = value
    return edit


# ------------------------------------------------------------------------------- case 3: layers

@pytest.mark.parametrize("value, words", [(2, "also holds layer(s) 2, 3"), (True, "integer"),
                                          (6, "holds layers 0..3 only")])
def test_num_hidden_layers_must_match_the_weights(tmp_path, value, words):
    with pytest.raises(ConfigError, match="num_hidden_layers") as err:
        LLM(write(tmp_path, edit_config=setter("num_hidden_layers", value)), device="cpu")
    assert words in str(err.value)


def test_a_tensor_of_a_layer_past_the_last_is_reported(tmp_path):
    def add(t):
        t["model.layers.7.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].clone()
    with pytest.raises(ConfigError, match=r"layer\(s\) 7 \(e\.g\. model\.layers\.7\.mlp\.up_proj"):
        LLM(write(tmp_path, edit_tensors=add), device="cpu")


def test_deepseek_mtp_layers_are_expected_but_other_extra_layers_are_not(tmp_path):
    mtp = {"eh_proj.weight": (256, 512), "enorm.weight": (256,), "hnorm.weight": (256,)}
    ref = LLM(MLA, device="cpu", dtype="float32").logits(IDS)

    def add(names):
        def edit(t):
            for n, shape in names.items():
                t[f"model.layers.4.{n}"] = torch.ones(shape, dtype=torch.bfloat16)
        return edit
    torch.testing.assert_close(LLM(write(tmp_path, MLA, add(mtp)), device="cpu", dtype="float32")
                               .logits(IDS), ref)          # num_nextn_predict_layers: 1
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ConfigError, match=r"layer\(s\) 4 \(e\.g\. model\.layers\.4\.input_layernorm"):
        LLM(write(other, MLA, add({"input_layernorm.weight": (256,)})), device="cpu")


def test_gguf_block_count_must_match_its_tensors(tmp_path, monkeypatch):
    meta = gguf_util.base_meta
    monkeypatch.setattr(gguf_util, "base_meta",
                        lambda arch, **kw: {**meta(arch, **kw), f"{arch}.block_count": 1})
    path, _ = gguf_util.build(tmp_path, "llama")            # 2 layers of tensors, block_count 1
    with pytest.raises(ConfigError, match=r"num_hidden_layers is 1.*layer\(s\) 1"):
        LLM(path, device="cpu")


def test_gptq_layer_count_must_match_its_tensors(tmp_path):
    path, _ = gptq_checkpoint(tmp_path)
    cfg = json.load(open(path / "config.json"))
    cfg["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"num_hidden_layers is 3.*layer\(s\) 3 \(e\.g\. model\.layers\.3"):
        LLM(str(path), device="cpu")


# ------------------------------------------------------------------- case 5: numeric fields, dtypes

RANGE = {  # config edit -> the field its error must name
    "rope_theta_zero": (setter("rope_parameters", {"rope_type": "default", "rope_theta": 0.0}), "rope_theta"),
    "rope_theta_negative": (setter("rope_parameters", {"rope_type": "default", "rope_theta": -5.0}),
                            "rope_theta"),
    "rms_norm_eps_negative": (setter("rms_norm_eps", -1e-5), "rms_norm_eps"),
    "rms_norm_eps_string": (setter("rms_norm_eps", "1e-5"), "rms_norm_eps"),
    "vocab_size_huge": (setter("vocab_size", 10**9), "vocab_size"),
    "vocab_size_off_by_one": (setter("vocab_size", 1025), "vocab_size"),
    "intermediate_size_wrong": (setter("intermediate_size", 769), "intermediate_size"),
    "head_dim_wrong": (setter("head_dim", 48), "head_dim"),
    "kv_heads_zero": (setter("num_key_value_heads", 0), "num_key_value_heads"),
    "bos_outside_vocab": (setter("bos_token_id", 5000), "bos_token_id"),
    "tied_is_a_string": (setter("tie_word_embeddings", "yes"), "tie_word_embeddings"),
    "max_positions_huge": (setter("max_position_embeddings", 10**12), "max_position_embeddings"),
    "dtype_not_a_float": (setter("dtype", "int8"), "dtype"),
}


@pytest.mark.parametrize("name", list(RANGE))
def test_out_of_range_config_fields_are_refused_by_name(tmp_path, name):
    edit, field = RANGE[name]
    with pytest.raises((ConfigError, CheckpointError), match=field):
        LLM(write(tmp_path, edit_config=edit), device="cpu")


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 500000.0}


@pytest.mark.parametrize("key, value", [("factor", 0.5), ("factor", "8"), ("low_freq_factor", 0.0),
                                        ("high_freq_factor", 1.0), ("original_max_position_embeddings", 0),
                                        ("original_max_position_embeddings", 64.5)])
def test_llama3_rope_parameters_are_checked_by_name(key, value):
    cfg = json.load(open(os.path.join(LLAMA, "config.json")))
    cfg["rope_parameters"] = {**LLAMA3, key: value}
    with pytest.raises(ConfigError, match=rf"rope_scaling\.{key}"):
        ModelConfig.from_hf(cfg)


def test_sliding_window_out_of_range_is_refused_by_name(tmp_path):
    def edit(cfg):
        cfg["architectures"], cfg["sliding_window"] = ["MistralForCausalLM"], -1
    with pytest.raises(ConfigError, match="sliding_window"):
        LLM(write(tmp_path, edit_config=edit), device="cpu")
    good = ModelConfig.from_hf(json.load(open(os.path.join(LLAMA, "config.json"))))
    fields = {k: v for k, v in vars(good).items() if k not in ("max_context", "notes")}
    with pytest.raises(ConfigError, match="sliding_window"):       # built directly, too
        ModelConfig(**{**fields, "sliding_window": -1})


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8, torch.bool])
def test_an_integer_weight_in_a_float_checkpoint_is_refused_by_name(tmp_path, dtype):
    def recast(t):
        t["model.layers.2.mlp.down_proj.weight"] = t["model.layers.2.mlp.down_proj.weight"].to(dtype)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.down_proj\.weight is stored as"):
        LLM(write(tmp_path, edit_tensors=recast), device="cpu")


def test_a_model_larger_than_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "memory_bytes", lambda device: 1 << 20)       # a 1 MiB machine
    with pytest.raises(ConfigError, match=r"model of 14\.0 MiB in torch\.float32 .largest: layers\.0\.mlp\.gate_up_proj"
                                          r".*intermediate_size.*more than the 1\.0 MiB"):
        LLM(LLAMA, device="cpu")


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    tensors = load_file(os.path.join(LLAMA, "model.safetensors"))
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:20]}, str(tmp_path / "a.safetensors"))
    save_file({n: tensors[n] for n in names[19:]}, str(tmp_path / "b.safetensors"))
    for f in ("config.json", "tokenizer.model"):
        shutil.copy(os.path.join(LLAMA, f), tmp_path)
    with pytest.raises(CheckpointError, match=rf"{names[19]} is in both .*a.safetensors and .*b.safetensors"):
        LLM(str(tmp_path), device="cpu")


# ----------------------------------------------------------------- case 6: malformed config.json

@pytest.mark.parametrize("text, words", [("[1, 2]", "JSON object"), ("null", "JSON object")])
def test_a_config_that_is_not_an_object_is_a_config_error(tmp_path, text, words):
    path = write(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=words):
        LLM(path, device="cpu")


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "num_hidden_layers",
                                   "num_attention_heads", "intermediate_size"])
def test_a_missing_required_field_is_named(tmp_path, field):
    with pytest.raises(ConfigError, match=f"{field} is missing"):
        LLM(write(tmp_path, edit_config=lambda c: c.pop(field)), device="cpu")


# --------------------------------------------------------------- case 8: legacy rope_scaling

def test_legacy_dynamic_rope_scaling_beside_rope_parameters_is_refused(tmp_path):
    def edit(cfg):                        # rope_parameters (v5) says default; rope_scaling (v4) dynamic
        cfg["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    with pytest.raises(ConfigError, match="rope_type is 'dynamic'"):
        LLM(write(tmp_path, edit_config=edit), device="cpu")


def test_legacy_llama3_rope_scaling_beside_rope_parameters_is_honoured():
    cfg = json.load(open(os.path.join(LLAMA, "config.json")))
    cfg["rope_scaling"] = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    parsed = ModelConfig.from_hf(cfg)
    assert parsed.rope_scaling["rope_type"] == "llama3" and parsed.rope_scaling["factor"] == 8.0
    assert parsed.rope_theta == 10000.0                     # from rope_parameters


def test_rope_scaling_and_rope_parameters_that_disagree_are_refused():
    cfg = json.load(open(os.path.join(LLAMA, "config.json")))
    cfg["rope_parameters"] = dict(LLAMA3)
    cfg["rope_scaling"] = {"type": "llama3", "factor": 4.0}
    with pytest.raises(ConfigError, match=r"disagree on factor \(4\.0 vs 8\.0\)"):
        ModelConfig.from_hf(cfg)


def test_a_config_json_nested_100000_deep_is_a_config_error(tmp_path):
    path = write(tmp_path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match="config.json nests its JSON deeper"):
        LLM(path, device="cpu")
