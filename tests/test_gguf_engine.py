"""GGUF files through the whole engine (`LLM("file.gguf")`), on small synthetic files of each family:
Q4_0 / Q4_1 linears become exact INT4 (g32, Q4_1 with its float offsets), the rest dense, and the
logits equal those of Hugging Face transformers running a checkpoint of the same family holding the
values the file decodes to (written as safetensors, loaded with from_pretrained: transformers' own
modeling of each family, Mixtral included, whose GGUF files transformers cannot load)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from gguf_util import VOCAB, build
from hf_util import assert_logits_close, hf_logits, hf_model
from tinyinfer import LLM, SamplingParams
from tinyinfer.config.errors import CheckpointError
from tinyinfer.config.model import ModelConfig
from tinyinfer.generate import main as generate_main
from tinyinfer.layers.linear import Int4Linear
from tinyinfer.loading.checkpoint import locate
from tinyinfer.loading.weights import choose_dtype, has_int4_weights

pytest.importorskip("transformers")

CASES = [("llama", "Q4_0"), ("llama", "Q4_1"), ("qwen2", "Q4_1"), ("qwen3", "Q4_0"),
         ("qwen3moe", "Q4_1"), ("mixtral", "Q4_0"), ("mixtral", "Q8_0")]


def _hf_twin(tmp_path, ckpt_config: dict, want: dict) -> str:
    """A Hugging Face checkpoint holding exactly the values the GGUF file decodes to."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(ckpt_config))
    save_file({k: v.contiguous() for k, v in want.items()}, str(folder / "model.safetensors"))
    return str(folder)


@pytest.mark.parametrize("family,qtype", CASES, ids=[f"{f}-{q}" for f, q in CASES])
def test_gguf_model_matches_transformers(tmp_path, family, qtype):
    path, want = build(tmp_path, family, qtype=qtype)
    llm = LLM(path, device="cpu", dtype="float32", max_kv_tokens=512)
    int4 = [m for m in llm.model.modules() if isinstance(m, Int4Linear)]
    if qtype.startswith("Q4"):
        # every linear of the decoder and the head: fused qkv / gate_up, experts, lm_head
        assert int4 and not any(isinstance(m, torch.nn.Linear) for m in llm.model.modules())
        assert all(m.group_size == 32 for m in int4)
        assert all(m.zeros.is_floating_point() == (qtype == "Q4_1") for m in int4)
    else:
        assert not int4                                  # Q8_0 is dequantized to the model dtype
    hf = hf_model(_hf_twin(tmp_path, locate(path).config, want))
    ids = [(7 * i + 3) % VOCAB for i in range(20)]
    assert_logits_close(llm.logits(ids), hf_logits(hf, ids))


def test_generate_cli_reads_a_gguf_file(tmp_path, capsys):
    path, _ = build(tmp_path, "qwen2", qtype="Q4_1")
    assert generate_main(["--ckpt", path, "--prompt", "ab", "--max-new-tokens", "4", "--temperature",
                          "0", "--ignore-eos", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 4 and out["dtype"] == "torch.bfloat16"   # INT4 on a CPU: bf16


def test_int4_models_default_to_bfloat16_on_a_cpu(tmp_path):
    q4, _ = build(tmp_path, "llama", qtype="Q4_0")
    dense, _ = build(tmp_path, "qwen2", qtype="F32")
    for path, quant, want in ((q4, None, torch.bfloat16), (dense, None, torch.float32),
                              (dense, "int4", torch.bfloat16)):
        files = locate(path)
        assert has_int4_weights(files, quant) == (want == torch.bfloat16)
        cfg = ModelConfig.from_hf(files.config, files.generation_config)
        assert choose_dtype(cfg, torch.device("cpu"), None, has_int4_weights(files, quant)) == want
        assert choose_dtype(cfg, torch.device("cpu"), "float32", True) == torch.float32


def test_bfloat16_gguf_generation_runs_the_cpu_int4_kernel(tmp_path):
    path, _ = build(tmp_path, "qwen3moe", qtype="Q4_1")
    llm = LLM(path, device="cpu", max_kv_tokens=512)
    assert llm.dtype == torch.bfloat16
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert len(out[0].token_ids) == 8 and out[0].finish_reason == "length"


def test_a_bad_gguf_file_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 16)
    with pytest.raises(CheckpointError, match="model.gguf"):
        LLM(str(bad), device="cpu")
    assert os.path.exists(bad)
