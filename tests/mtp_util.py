"""Test helper: a DeepSeek checkpoint given a random MTP layer (DeepSeek-V3's layout: the tensors of
`model.layers.N.*`, N = num_hidden_layers), written beside the model's own tensors."""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from tinyinfer.config.model import ModelConfig
from tinyinfer.loading.checkpoint import hf_sources
from tinyinfer.models.mtp import MTPLayer


def add_mtp_layer(src: str, dst: str, seed: int = 0, scale: float = 0.08, own_head: bool = False) -> str:
    """Copy checkpoint `src` to `dst` with a random MTP layer (and num_nextn_predict_layers = 1)."""
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(src, f), dst)
    cfg_json = json.load(open(os.path.join(src, "config.json")))
    cfg_json["num_nextn_predict_layers"] = 1
    json.dump(cfg_json, open(os.path.join(dst, "config.json"), "w"))
    cfg = ModelConfig.from_hf(cfg_json)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    layer = MTPLayer(cfg, own_embed=False, own_head=own_head)
    N = cfg.num_layers
    for name, p in layer.named_parameters():
        sources = hf_sources(f"layers.{N}.{name}", cfg.architecture)
        if p.dim() == 1:
            value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            value = scale * torch.randn(p.shape, generator=gen)
        for s, part in zip(sources, value.chunk(len(sources), dim=0)):
            tensors[s] = part.to(torch.bfloat16).contiguous()
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst
