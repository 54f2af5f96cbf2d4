"""INT4 on disk (tinyinfer/quant/io.py, tinyinfer/loading/gptq_awq.py, tinyinfer/quantize.py): our self-describing file, GPTQ and AWQ.

The GPTQ / AWQ tensors are built here from known integer weights following each format's documented
packing (not with the code under test), then imported and compared exactly.
"""
import os

import pytest
import torch
from safetensors.torch import save_file

from hf_util import assert_logits_close
from quant_util import dequantized, gptq_checkpoint, pack_awq, pack_gptq, random_levels
from tinyinfer import LLM
from tinyinfer.layers.linear import ConcatLinear, Int4Linear
from tinyinfer.loading import checkpoint as ckpt
from tinyinfer.loading import gptq_awq
from tinyinfer.quant import io as quant_io
from tinyinfer.quant import quantizer

LLAMA = "models/shakespeare-llama"


@pytest.mark.parametrize("v1", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_import_dequantizes_exactly(v1, act_order):
    gen = torch.Generator().manual_seed(0)
    n, k, g = 64, 256, 32
    q, z, s = random_levels(n, k, g, gen, zmin=1 if v1 else 0)
    g_idx = torch.arange(k) // g
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]             # groups scattered over K
    t = pack_gptq(q, z, s, g_idx, v1)
    qq, ss, zz, perm = gptq_awq.unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], v1)
    assert (perm is not None) == act_order
    layer = Int4Linear.from_quantized(qq, ss, zz, g, torch.float32, perm=perm)
    want = (q.float() - z.float()[g_idx].T) * s.float()[g_idx].T      # W[n, k] with k's own group
    assert torch.equal(layer.dequantize(), want)
    assert layer.scales.dtype == torch.float16                       # fp16 scales stay fp16


def test_gptq_v1_zero_point_zero_reads_as_sixteen():
    # v1 writes z - 1, so z = 0 is stored as 15 and every v1 reader dequantizes it with z = 16.
    q = torch.full((16, 32), 3)
    t = pack_gptq(q, torch.zeros(1, 16, dtype=torch.long), torch.ones(1, 16).half(),
                   torch.zeros(32, dtype=torch.long), v1=True)
    qq, ss, zz, _ = gptq_awq.unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], True)
    assert torch.equal(Int4Linear.from_quantized(qq, ss, zz, 32, torch.float32).dequantize(),
                       torch.full((16, 32), 3.0 - 16))


def test_gptq_act_order_with_uneven_groups_is_refused():
    gen = torch.Generator().manual_seed(1)
    q, z, s = random_levels(16, 64, 32, gen)
    g_idx = torch.zeros(64, dtype=torch.long)
    g_idx[:10] = 1                                                   # 54 + 10 channels, not 32 + 32
    t = pack_gptq(q, z, s, g_idx, False)
    with pytest.raises(ValueError, match="not the group size 32"):
        gptq_awq.unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], False)


def test_awq_import_dequantizes_exactly():
    gen = torch.Generator().manual_seed(2)
    n, k, g = 48, 256, 128
    q, z, s = random_levels(n, k, g, gen)
    t = pack_awq(q, z, s)
    qq, ss, zz = gptq_awq.unpack_awq(t["qweight"], t["qzeros"], t["scales"])
    layer = Int4Linear.from_quantized(qq, ss, zz, g, torch.float32)
    want = (q.float() - z.float().repeat_interleave(g, 0).T) * s.float().repeat_interleave(g, 0).T
    assert torch.equal(layer.dequantize(), want)


def test_gptq_directory_loads_and_matches_our_int4_of_the_same_levels(tmp_path):
    path, levels = gptq_checkpoint(tmp_path)
    llm = LLM(str(path), device="cpu", dtype="float32")      # INT4 models default to bf16 on a CPU
    assert isinstance(llm.model.layers[0].attn.qkv_proj, Int4Linear)
    # The same integer levels, put in place by hand (q, k, v fused along N), give the same logits.
    ref = LLM(LLAMA, device="cpu")
    for i, layer in enumerate(ref.model.layers):
        for ours, parts in (("attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                            ("attn.o_proj", ("o_proj",)), ("mlp.gate_up_proj", ("gate_proj", "up_proj")),
                            ("mlp.down_proj", ("down_proj",))):
            sub = "self_attn" if ours.startswith("attn") else "mlp"
            q, s, z = (torch.cat([levels[f"model.layers.{i}.{sub}.{p}"][j] for p in parts]) for j in range(3))
            parent, child = ours.split(".")
            setattr(getattr(layer, parent), child,
                    Int4Linear.from_quantized(q, s, z, 128, torch.float32))
    ids = llm.tokenizer.encode("ROMEO: But soft, what light")
    assert torch.equal(llm.logits(ids), ref.logits(ids))


def test_quantize_cli_save_load_round_trip_gives_identical_logits(tmp_path):
    from tinyinfer.quantize import main
    out = tmp_path / "llama-int4"
    assert main(["--ckpt", LLAMA, "--out", str(out), "--device", "cpu", "--no-clip-search"]) == 0
    assert (out / "tokenizer.model").exists()
    meta = ckpt.locate(str(out)).metadata
    assert meta["format"] == "tinyinfer-int4" and meta["group_size"] == "128"
    loaded = LLM(str(out), device="cpu", dtype="float32")    # INT4 models default to bf16 on a CPU
    converted = LLM(LLAMA, device="cpu")
    quantizer.quantize_model(converted.model, clip_search=False)
    ids = loaded.tokenizer.encode("JULIET: O Romeo, Romeo")
    assert torch.equal(loaded.logits(ids), converted.logits(ids))
    # 4 bits + fp16 scale + uint8 zero per 128 weights: the file is far smaller than bf16
    assert os.path.getsize(out / "model.safetensors") < 0.6 * os.path.getsize(f"{LLAMA}/model.safetensors")


def test_int4_file_with_unknown_version_or_bad_shape_is_refused(tmp_path):
    from tinyinfer.quantize import quantize_checkpoint
    out = tmp_path / "m" / "model.safetensors"
    quantize_checkpoint(LLAMA, str(out.parent), clip_search=False, device="cpu", progress=False)
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    save_file(tensors, str(out), metadata={**meta, "format_version": "99"})
    with pytest.raises(ckpt.CheckpointError, match="format_version '99'"):
        LLM(str(out), device="cpu")
    tensors["layers.0.attn.o_proj.scales"] = tensors["layers.0.attn.o_proj.scales"][:, :1].contiguous()
    save_file(tensors, str(out), metadata=meta)
    with pytest.raises(ckpt.CheckpointError, match="layers.0.attn.o_proj"):
        LLM(str(out), device="cpu")


def _act_order(shared: bool):
    """g_idx per module: a random act-order permutation of the groups, one per module, or one per
    layer and input width shared by its q / k / v and gate / up (`shared`)."""
    def g_idx_of(module: str, k: int) -> torch.Tensor:
        key = module.rsplit(".", 1)[0] if shared else module       # layer's attn / mlp, or the module
        gen = torch.Generator().manual_seed(sum(map(ord, key)) + k)
        return (torch.arange(k) // 128)[torch.randperm(k, generator=gen)]
    return g_idx_of


def test_gptq_parts_with_different_act_orders_load_unfused_and_dequantize_exactly(tmp_path):
    # issue 20, case 10: q / k / v (and gate / up) with their own permutations cannot share one weight
    path, levels = gptq_checkpoint(tmp_path, g_idx_of=_act_order(shared=False))
    llm = LLM(str(path), device="cpu", dtype="float32")
    dense = {}                                 # the dequantized weights, by the GPTQ formula
    for i, layer in enumerate(llm.model.layers):
        for ours, sub, parts in (("qkv_proj", "self_attn", ("q_proj", "k_proj", "v_proj")),
                                 ("gate_up_proj", "mlp", ("gate_proj", "up_proj"))):
            module = getattr(layer.attn if sub == "self_attn" else layer.mlp, ours)
            assert isinstance(module, ConcatLinear) and len(module.parts) == len(parts)
            for part, name in zip(module.parts, parts):
                q, z, s, g_idx = levels[f"model.layers.{i}.{sub}.{name}"]
                assert isinstance(part, Int4Linear) and part.perm is not None
                assert torch.equal(part.dequantize(), dequantized(q, z, s, g_idx))
        for sub, name in (("self_attn", "o_proj"), ("mlp", "down_proj")):
            q, z, s, g_idx = levels[f"model.layers.{i}.{sub}.{name}"]
            assert torch.equal(getattr(layer.attn if sub == "self_attn" else layer.mlp, name)
                               .dequantize(), dequantized(q, z, s, g_idx))
    for base, (q, z, s, g_idx) in levels.items():
        dense[f"{base}.weight"] = dequantized(q, z, s, g_idx)
    ref = LLM(LLAMA, device="cpu", dtype="float32")            # the same weights, dense
    ref_params = dict(ref.model.named_parameters())
    with torch.no_grad():
        for i in range(len(ref.model.layers)):
            pre = f"model.layers.{i}."
            cat = {"attn.qkv_proj": [dense[pre + f"self_attn.{p}_proj.weight"] for p in "qkv"],
                   "attn.o_proj": [dense[pre + "self_attn.o_proj.weight"]],
                   "mlp.gate_up_proj": [dense[pre + f"mlp.{p}_proj.weight"] for p in ("gate", "up")],
                   "mlp.down_proj": [dense[pre + "mlp.down_proj.weight"]]}
            for ours, ws in cat.items():
                ref_params[f"layers.{i}.{ours}.weight"].copy_(torch.cat(ws))
    ids = llm.tokenizer.encode("ROMEO: But soft, what light")
    assert_logits_close(llm.logits(ids), ref.logits(ids))


def test_gptq_parts_sharing_one_act_order_stay_fused(tmp_path):
    path, levels = gptq_checkpoint(tmp_path, g_idx_of=_act_order(shared=True))
    llm = LLM(str(path), device="cpu", dtype="float32")
    fused = llm.model.layers[0].attn.qkv_proj
    assert isinstance(fused, Int4Linear) and fused.perm is not None
    want = torch.cat([dequantized(*levels[f"model.layers.0.self_attn.{p}_proj"]) for p in "qkv"])
    assert torch.equal(fused.dequantize(), want)
