"""Checkpoint layouts: sharded directories, single files with config in their metadata, bad files."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_util import LLAMA, write_copy
from tinyinfer import LLM
from tinyinfer.config.errors import CheckpointError, ConfigError

IDS = [1, 45, 300, 12, 77, 501, 9]


@pytest.fixture(scope="module")
def reference_logits():
    return LLM(LLAMA, device="cpu", dtype="float32").logits(IDS)


def test_sharded_checkpoint_loads_to_the_same_logits(tmp_path, reference_logits):
    tensors = load_file(os.path.join(LLAMA, "model.safetensors"))
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in shard}, str(tmp_path / fname))
        weight_map.update({n: fname for n in shard})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for f in ("config.json", "tokenizer.model"):
        shutil.copy(os.path.join(LLAMA, f), tmp_path)
    torch.testing.assert_close(LLM(str(tmp_path), device="cpu").logits(IDS), reference_logits)


def test_single_file_with_config_in_metadata_loads_to_the_same_logits(tmp_path, reference_logits):
    tensors = load_file(os.path.join(LLAMA, "model.safetensors"))
    config = open(os.path.join(LLAMA, "config.json")).read()
    path = tmp_path / "llama.safetensors"
    save_file(tensors, str(path), metadata={"config": config})
    shutil.copy(os.path.join(LLAMA, "tokenizer.model"), tmp_path)
    torch.testing.assert_close(LLM(str(path), device="cpu").logits(IDS), reference_logits)


def _copy(tmp_path, tensors=None, config_edit=None):
    return write_copy(tmp_path, tensors=tensors, edit_config=config_edit)


def test_missing_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        LLM(str(tmp_path / "nope"), device="cpu")


def test_directory_without_weights_is_a_checkpoint_error(tmp_path):
    shutil.copy(os.path.join(LLAMA, "config.json"), tmp_path)
    with pytest.raises(CheckpointError, match="no .safetensors"):
        LLM(str(tmp_path), device="cpu")


def test_truncated_file_is_a_checkpoint_error(tmp_path):
    path = _copy(tmp_path)
    data = open(os.path.join(path, "model.safetensors"), "rb").read()
    open(os.path.join(path, "model.safetensors"), "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        LLM(path, device="cpu")


def test_missing_tensor_is_named(tmp_path):
    tensors = load_file(os.path.join(LLAMA, "model.safetensors"))
    del tensors["model.layers.3.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        LLM(_copy(tmp_path, tensors), device="cpu")


def test_misshaped_tensor_names_both_shapes(tmp_path):
    tensors = load_file(os.path.join(LLAMA, "model.safetensors"))
    tensors["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(256, 128, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"o_proj.*\[256, 128\].*\[256, 256\]"):
        LLM(_copy(tmp_path, tensors), device="cpu")


def test_unexpected_tensor_is_named(tmp_path):
    tensors = load_file(os.path.join(LLAMA, "model.safetensors"))
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match="extra_proj"):
        LLM(_copy(tmp_path, tensors), device="cpu")


def test_unsupported_architecture_names_the_field(tmp_path):
    def edit(cfg):
        cfg["architectures"] = ["GPT2LMHeadModel"]
    with pytest.raises(ConfigError, match="architectures.*GPT2LMHeadModel"):
        LLM(_copy(tmp_path, config_edit=edit), device="cpu")


def test_unknown_rope_type_names_the_field(tmp_path):
    def edit(cfg):
        cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="rope_type.*dynamic"):
        LLM(_copy(tmp_path, config_edit=edit), device="cpu")


def test_sliding_window_limits_the_context_with_a_message(tmp_path):
    def edit(cfg):             # a Mistral model (Llama's weights) with a window; Llama has none
        cfg["architectures"], cfg["sliding_window"] = ["MistralForCausalLM"], 128
    llm = LLM(_copy(tmp_path, config_edit=edit), device="cpu")
    assert llm.config.max_context == 128
    assert any("sliding_window" in n for n in llm.config.notes)
    out = llm.generate([list(range(3, 103))], __import__("tinyinfer").SamplingParams(max_tokens=50))[0]
    assert out.finish_reason == "error" and "context of 128" in str(out.error)
