"""The INT4 plan (quant/plan.py) and what follows it: a layer whose input width the requested group size
does not divide takes the largest of 128 / 64 / 32 that does (counted in the summary), one that fits
none stays dense and is named in a warning; on-the-fly INT4 at any group size; --quantize-head with
tied embeddings quantizes a copy of the head; `tinyinfer.memory` counts exactly the bytes
`tinyinfer.quantize` writes; INT4 files with GGUF Q4_1's float offsets are format_version 2."""
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gguf_util import build
from hf_util import LLAMA, save_random_llama
from tinyinfer import LLM, SamplingParams
from tinyinfer.generate import main as generate_main
from tinyinfer.layers.linear import Int4Linear
from tinyinfer.loading import checkpoint as ckpt
from tinyinfer.memory import planned_int4
from tinyinfer.memory.__main__ import _gb, main as memory_main
from tinyinfer.quant.quantizer import quantize_model
from tinyinfer.quantize import quantize_checkpoint

# hidden 96 (q/k/v, o, gate/up: K = 96, a multiple of 32 only), ffn 256 (down: K = 256)
ODD = dict(hidden_size=96, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=1024)


def _groups(model) -> dict[str, int]:
    return {n: m.group_size for n, m in model.named_modules() if isinstance(m, Int4Linear)}


def test_group_size_falls_back_per_layer_and_the_summary_counts_them(tmp_path):
    llm = LLM(save_random_llama(tmp_path, **ODD), device="cpu", dtype="float32")
    plan = quantize_model(llm.model, group_size=128, clip_search=False)
    assert _groups(llm.model) == plan.groups
    for i in range(2):
        assert plan.groups[f"layers.{i}.attn.qkv_proj"] == plan.groups[f"layers.{i}.attn.o_proj"] == 32
        assert plan.groups[f"layers.{i}.mlp.gate_up_proj"] == 32
        assert plan.groups[f"layers.{i}.mlp.down_proj"] == 128
    assert "(g128: 2, g32: 6)" in plan.summary()
    assert "6 took a smaller group size than g128" in plan.summary()
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4


def test_a_layer_no_group_size_fits_stays_dense_and_is_named(tmp_path):
    path = save_random_llama(tmp_path, **{**ODD, "intermediate_size": 200})   # down: K = 200
    llm = LLM(path, device="cpu", dtype="float32")
    with pytest.warns(RuntimeWarning, match=r"layers\.0\.mlp\.down_proj stays dense \(input width 200"):
        plan = quantize_model(llm.model, group_size=64, clip_search=False)
    assert isinstance(llm.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert "2 kept dense: layers.0.mlp.down_proj, layers.1.mlp.down_proj" in plan.summary()


def test_on_the_fly_int4_takes_a_group_size(tmp_path, capsys):
    path = save_random_llama(tmp_path, **ODD)
    llm = LLM(path, device="cpu", quant="int4", group_size=64)
    assert set(_groups(llm.model).values()) == {32, 64}       # K = 96 -> 32; K = 256 -> 64
    assert llm.dtype == torch.bfloat16                          # INT4 on a CPU
    with pytest.raises(ValueError, match="group_size=64.*quant='int4'"):
        LLM(path, device="cpu", group_size=64)
    with pytest.raises(ValueError, match="group_size=48"):
        LLM(path, device="cpu", quant="int4", group_size=48)
    assert generate_main(["--ckpt", LLAMA, "--quant", "int4", "--group-size", "32", "--prompt", "A",
                          "--max-new-tokens", "3", "--device", "cpu", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 3


def _file_bytes(path) -> tuple[int, dict]:
    """Bytes of every tensor in a safetensors file (its header's offsets) and its metadata."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    meta = header.pop("__metadata__", {})
    return sum(t["data_offsets"][1] - t["data_offsets"][0] for t in header.values()), meta


@pytest.mark.parametrize("case", ["demo_g128", "odd_g128", "tied_head", "tied_no_head"])
def test_memory_counts_exactly_what_quantize_writes(tmp_path, case, capsys):
    kw = {"demo_g128": {}, "odd_g128": ODD, "tied_head": dict(ODD, tie_word_embeddings=True),
          "tied_no_head": dict(ODD, tie_word_embeddings=True)}[case]
    src = LLAMA if case == "demo_g128" else save_random_llama(tmp_path / "src", **kw)
    head = case == "tied_head"
    out = tmp_path / "q" / "model.safetensors"
    plan = quantize_checkpoint(src, str(out.parent), 128, clip_search=False, quantize_head=head,
                               device="cpu", progress=False)
    with open(f"{src}/config.json") as f:
        cfg = json.load(f)
    planned = planned_int4(cfg, 128, head)
    assert planned[0].groups == plan.groups
    assert planned[1] + planned[2] == _file_bytes(out)[0]
    memory_main(["--ckpt", src] + (["--quantize-head"] if head else []))
    text = capsys.readouterr().out
    assert f"= {_gb(planned[1] + planned[2])}: what `python -m tinyinfer.quantize" in text


def test_quantize_head_with_tied_embeddings_quantizes_a_copy(tmp_path):
    src = save_random_llama(tmp_path / "src", **dict(ODD, tie_word_embeddings=True))
    out = tmp_path / "q" / "model.safetensors"
    plan = quantize_checkpoint(src, str(out.parent), 32, clip_search=False, quantize_head=True,
                               device="cpu", dtype="float32", progress=False)
    assert plan.head_copy and "lm_head" in plan.groups
    assert "lm_head quantized as a copy of the tied embedding" in plan.summary()
    with safe_open(str(out), "pt") as f:
        names = set(f.keys())
    assert {"lm_head.qweight", "embed_tokens.weight"} <= names and "lm_head.weight" not in names
    llm = LLM(str(out), device="cpu", dtype="float32")
    assert isinstance(llm.model.lm_head, Int4Linear)
    dense = LLM(src, device="cpu", dtype="float32")
    assert torch.equal(llm.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    # the head's INT4 copy is the embedding quantized at g32: within half a scale of it
    w, w_hat = dense.model.embed_tokens.weight, llm.model.lm_head.dequantize()
    s = llm.model.lm_head.canonical()[1].float().repeat_interleave(32, 1)
    assert bool(((w - w_hat).abs() <= s / 2 * (1 + 1e-3)).all())


def test_float_offset_int4_files_are_version_2_and_round_trip(tmp_path):
    gguf_path, _ = build(tmp_path, "qwen2", qtype="Q4_1")
    out = tmp_path / "q" / "model.safetensors"
    quantize_checkpoint(gguf_path, str(out.parent), 128, clip_search=False, device="cpu", dtype="float32",
                        progress=False)
    _, meta = _file_bytes(out)
    assert meta["format_version"] == "2"
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("layers.0.attn.qkv_proj.zeros").dtype == torch.float16
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    ids = [3, 9, 17, 40, 2, 11]
    gguf_llm, int4_llm = (LLM(p, device="cpu", dtype="float32") for p in (gguf_path, str(out)))
    assert torch.equal(int4_llm.logits(ids), gguf_llm.logits(ids))
    # the GGUF's tokenizer written beside the INT4 file (tokenizer.json + tokenizer_config.json)
    for text in ("abcab", "xyz 123", "ab</s>c"):
        assert int4_llm.tokenizer.encode(text) == gguf_llm.tokenizer.encode(text), text
    assert (int4_llm.tokenizer.bos_id, int4_llm.tokenizer.eos_id) == (gguf_llm.tokenizer.bos_id,
                                                                      gguf_llm.tokenizer.eos_id)
    save_file(tensors, str(out), metadata={**meta, "format_version": "1"})
    with pytest.raises(ckpt.CheckpointError, match="float-offset zeros.*version 1"):
        LLM(str(out), device="cpu")


def test_integer_zero_files_stay_version_1(tmp_path):
    out = tmp_path / "q" / "model.safetensors"
    quantize_checkpoint(LLAMA, str(out.parent), 64, clip_search=False, device="cpu", progress=False)
    assert _file_bytes(out)[1]["format_version"] == "1"
