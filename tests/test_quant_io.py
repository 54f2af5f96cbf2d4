"""INT4 on disk (tinyinfer/quant/io.py, tinyinfer/quantize.py): our self-describing file, GPTQ and AWQ.

The GPTQ / AWQ tensors are built here from known integer weights following each format's documented
packing (not with the code under test), then imported and compared exactly.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tinyinfer import LLM
from tinyinfer.quant import io as quant_io
from tinyinfer.loading import checkpoint as ckpt
from tinyinfer.quant import quantizer
from tinyinfer.layers.linear import Int4Linear

LLAMA = "models/shakespeare-llama"
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _int32(words: torch.Tensor) -> torch.Tensor:
    words = words.long()
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_gptq(q, z, scales, g_idx, v1):
    # q (N, K), z (ng, N); qweight (K/8, N): nibble j of word i is k = 8i + j; qzeros (ng, N/8):
    # nibble j of word c is n = 8c + j; v1 stores z - 1.
    n, k = q.shape
    qw = sum(q.T.long().reshape(k // 8, 8, n)[:, j] << (4 * j) for j in range(8))
    zs = ((z.long() - 1) & 0xF) if v1 else z.long()
    qz = sum(zs.reshape(-1, n // 8, 8)[..., j] << (4 * j) for j in range(8))
    return {"qweight": _int32(qw).contiguous(), "qzeros": _int32(qz).contiguous(), "scales": scales,
            "g_idx": g_idx.to(torch.int32)}


def _pack_awq(q, z, scales):
    # qweight (K, N/8), qzeros (ng, N/8): nibble i of word c holds column 8c + AWQ_ORDER[i].
    def pack(t):                                    # t (R, N) -> (R, N/8)
        t = t.long().reshape(t.shape[0], -1, 8)
        return _int32(sum(t[..., AWQ_ORDER[i]] << (4 * i) for i in range(8)))
    return {"qweight": pack(q.T).contiguous(), "qzeros": pack(z).contiguous(), "scales": scales}


def _random(n, k, g, gen, zmin=0):
    q = torch.randint(0, 16, (n, k), generator=gen)
    z = torch.randint(zmin, 16, (k // g, n), generator=gen)
    s = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.001).half()
    return q, z, s


@pytest.mark.parametrize("v1", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_import_dequantizes_exactly(v1, act_order):
    gen = torch.Generator().manual_seed(0)
    n, k, g = 64, 256, 32
    q, z, s = _random(n, k, g, gen, zmin=1 if v1 else 0)
    g_idx = torch.arange(k) // g
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]             # groups scattered over K
    t = _pack_gptq(q, z, s, g_idx, v1)
    qq, ss, zz, perm = quant_io.unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], v1)
    assert (perm is not None) == act_order
    layer = Int4Linear.from_quantized(qq, ss, zz, g, torch.float32, perm=perm)
    want = (q.float() - z.float()[g_idx].T) * s.float()[g_idx].T      # W[n, k] with k's own group
    assert torch.equal(layer.dequantize(), want)
    assert layer.scales.dtype == torch.float16                       # fp16 scales stay fp16


def test_gptq_v1_zero_point_zero_reads_as_sixteen():
    # v1 writes z - 1, so z = 0 is stored as 15 and every v1 reader dequantizes it with z = 16.
    q = torch.full((16, 32), 3)
    t = _pack_gptq(q, torch.zeros(1, 16, dtype=torch.long), torch.ones(1, 16).half(),
                   torch.zeros(32, dtype=torch.long), v1=True)
    qq, ss, zz, _ = quant_io.unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], True)
    assert torch.equal(Int4Linear.from_quantized(qq, ss, zz, 32, torch.float32).dequantize(),
                       torch.full((16, 32), 3.0 - 16))


def test_gptq_act_order_with_uneven_groups_is_refused():
    gen = torch.Generator().manual_seed(1)
    q, z, s = _random(16, 64, 32, gen)
    g_idx = torch.zeros(64, dtype=torch.long)
    g_idx[:10] = 1                                                   # 54 + 10 channels, not 32 + 32
    t = _pack_gptq(q, z, s, g_idx, False)
    with pytest.raises(ValueError, match="not the group size 32"):
        quant_io.unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], False)


def test_awq_import_dequantizes_exactly():
    gen = torch.Generator().manual_seed(2)
    n, k, g = 48, 256, 128
    q, z, s = _random(n, k, g, gen)
    t = _pack_awq(q, z, s)
    qq, ss, zz = quant_io.unpack_awq(t["qweight"], t["qzeros"], t["scales"])
    layer = Int4Linear.from_quantized(qq, ss, zz, g, torch.float32)
    want = (q.float() - z.float().repeat_interleave(g, 0).T) * s.float().repeat_interleave(g, 0).T
    assert torch.equal(layer.dequantize(), want)


def _gptq_checkpoint(tmp_path, group_size=128):
    """The demo model as a GPTQ (v2) directory, from our own RTN levels; returns (dir, levels)."""
    out = tmp_path / "gptq"
    out.mkdir()
    dense = {}
    from safetensors import safe_open
    with safe_open(f"{LLAMA}/model.safetensors", "pt") as f:
        for name in f.keys():
            dense[name] = f.get_tensor(name)
    tensors, levels = {}, {}
    for name, w in dense.items():
        base = name[:-len(".weight")]
        if name.endswith("proj.weight"):
            q, s, z = quantizer.quantize_weight(w, group_size, clip_search=False)
            levels[base] = (q, s, z)
            t = _pack_gptq(q, z.T, s.T.contiguous(), torch.arange(w.shape[1]) // group_size, v1=False)
            tensors.update({f"{base}.{k}": v for k, v in t.items()})
        else:
            tensors[name] = w
    save_file(tensors, str(out / "model.safetensors"))
    config = json.load(open(f"{LLAMA}/config.json"))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                                     "desc_act": False, "sym": False, "checkpoint_format": "gptq_v2"}
    json.dump(config, open(out / "config.json", "w"))
    shutil.copy(f"{LLAMA}/tokenizer.model", out / "tokenizer.model")
    return out, levels


def test_gptq_directory_loads_and_matches_our_int4_of_the_same_levels(tmp_path):
    path, levels = _gptq_checkpoint(tmp_path)
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
    out = tmp_path / "llama-int4.safetensors"
    assert main(["--ckpt", LLAMA, "--out", str(out), "--device", "cpu", "--no-clip-search"]) == 0
    assert (tmp_path / "tokenizer.model").exists()
    meta = ckpt.locate(str(out)).metadata
    assert meta["format"] == "tinyinfer-int4" and meta["group_size"] == "128"
    loaded = LLM(str(out), device="cpu", dtype="float32")    # INT4 models default to bf16 on a CPU
    converted = LLM(LLAMA, device="cpu")
    quantizer.quantize_model(converted.model, clip_search=False)
    ids = loaded.tokenizer.encode("JULIET: O Romeo, Romeo")
    assert torch.equal(loaded.logits(ids), converted.logits(ids))
    # 4 bits + fp16 scale + uint8 zero per 128 weights: the file is far smaller than bf16
    assert os.path.getsize(out) < 0.6 * os.path.getsize(f"{LLAMA}/model.safetensors")


def test_int4_file_with_unknown_version_or_bad_shape_is_refused(tmp_path):
    from tinyinfer.quantize import quantize_checkpoint
    out = tmp_path / "m.safetensors"
    quantize_checkpoint(LLAMA, str(out), clip_search=False, device="cpu", progress=False)
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
