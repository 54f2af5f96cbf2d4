"""Test helpers: GPTQ and AWQ tensors packed from known integer levels by each format's documented
layout (not with the code under test), and the demo model written as a GPTQ checkpoint."""
from __future__ import annotations

import json
import shutil
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_util import LLAMA
from tinyinfer.quant import quantizer

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def int32(words: torch.Tensor) -> torch.Tensor:
    words = words.long()
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_gptq(q, z, scales, g_idx, v1):
    # q (N, K), z (ng, N); qweight (K/8, N): nibble j of word i is k = 8i + j; qzeros (ng, N/8):
    # nibble j of word c is n = 8c + j; v1 stores z - 1.
    n, k = q.shape
    qw = sum(q.T.long().reshape(k // 8, 8, n)[:, j] << (4 * j) for j in range(8))
    zs = ((z.long() - 1) & 0xF) if v1 else z.long()
    qz = sum(zs.reshape(-1, n // 8, 8)[..., j] << (4 * j) for j in range(8))
    return {"qweight": int32(qw).contiguous(), "qzeros": int32(qz).contiguous(), "scales": scales,
            "g_idx": g_idx.to(torch.int32)}


def pack_awq(q, z, scales):
    # qweight (K, N/8), qzeros (ng, N/8): nibble i of word c holds column 8c + AWQ_ORDER[i].
    def pack(t):                                    # t (R, N) -> (R, N/8)
        t = t.long().reshape(t.shape[0], -1, 8)
        return int32(sum(t[..., AWQ_ORDER[i]] << (4 * i) for i in range(8)))
    return {"qweight": pack(q.T).contiguous(), "qzeros": pack(z).contiguous(), "scales": scales}


def random_levels(n, k, g, gen, zmin=0):
    q = torch.randint(0, 16, (n, k), generator=gen)
    z = torch.randint(zmin, 16, (k // g, n), generator=gen)
    s = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.001).half()
    return q, z, s


def dequantized(q, z, s, g_idx) -> torch.Tensor:
    """W[n, k] = (q[n, k] - z[g_idx[k], n]) * s[g_idx[k], n], in float32: the GPTQ formula."""
    return (q.float() - z.float()[g_idx].T) * s.float()[g_idx].T


def gptq_checkpoint(tmp_path, group_size: int = 128,
                    g_idx_of: Optional[Callable[[str, int], torch.Tensor]] = None):
    """The demo model as a GPTQ (v2) directory; returns (dir, {module: levels}). Without `g_idx_of`
    each projection holds our RTN levels of its weight, levels[module] = (q, s, z) canonical; with
    it, random levels whose channel k lies in group g_idx_of(module, K)[k] (act-order), levels[module]
    = (q, z, s, g_idx) as packed."""
    out = tmp_path / "gptq"
    out.mkdir()
    with safe_open(f"{LLAMA}/model.safetensors", "pt") as f:
        dense = {name: f.get_tensor(name) for name in f.keys()}
    tensors, levels = {}, {}
    gen = torch.Generator().manual_seed(0)
    for name, w in dense.items():
        base = name[:-len(".weight")]
        if not name.endswith("proj.weight"):
            tensors[name] = w
        elif g_idx_of is None:
            q, s, z = quantizer.quantize_weight(w, group_size, clip_search=False)
            levels[base] = (q, s, z)
            t = pack_gptq(q, z.T, s.T.contiguous(), torch.arange(w.shape[1]) // group_size, v1=False)
            tensors.update({f"{base}.{k}": v for k, v in t.items()})
        else:
            q, z, s = random_levels(*w.shape, group_size, gen)
            g_idx = g_idx_of(base, w.shape[1])
            levels[base] = (q, z, s, g_idx)
            tensors.update({f"{base}.{k}": v for k, v in pack_gptq(q, z, s, g_idx, v1=False).items()})
    save_file(tensors, str(out / "model.safetensors"))
    config = json.load(open(f"{LLAMA}/config.json"))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                                     "desc_act": g_idx_of is not None, "sym": False,
                                     "checkpoint_format": "gptq_v2"}
    json.dump(config, open(out / "config.json", "w"))
    shutil.copy(f"{LLAMA}/tokenizer.model", out / "tokenizer.model")
    return out, levels
