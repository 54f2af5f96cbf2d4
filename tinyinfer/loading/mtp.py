"""A checkpoint's DeepSeek-V3 multi-token-prediction layer (models/mtp.py), loaded as a draft.

Layout (DeepSeek-V3's config.json and safetensors; transformers' DeepSeek-V3 model skips these
tensors): `num_nextn_predict_layers` MTP layers follow the decoder's, as `model.layers.N.*` for
N = num_hidden_layers .., each with `enorm`, `hnorm`, `eh_proj` ((hidden, 2 hidden)), `shared_head.norm`,
optionally `shared_head.head` and `embed_tokens` (else the target's are used), and an ordinary decoder
layer's tensors. The first MTP layer is the draft; further ones are not used (one layer chained on
itself drafts any k).
"""
from __future__ import annotations

import torch
from torch import nn

from tinyinfer.config.errors import ConfigError
from tinyinfer.config.model import ModelConfig
from tinyinfer.loading import checkpoint as ckpt
from tinyinfer.loading.weights import convert_for_cpu
from tinyinfer.models.mtp import MTPLayer
from tinyinfer.models.transformer import Transformer, _materialize


def _reader(files: ckpt.CheckpointFiles, cfg: ModelConfig) -> ckpt.TensorReader:
    where = files.weight_files[0]
    if files.gguf is not None:
        raise ValueError(f"draft='mtp' needs a safetensors checkpoint that keeps its MTP layer; {where} "
                         "is a GGUF file: use draft='suffix' or 'ngram'")
    if cfg.num_mtp_layers == 0:
        raise ValueError(f"draft='mtp': checkpoint {where} has no MTP layers (config.json's "
                         "num_nextn_predict_layers is 0 or absent); use a DeepSeek-V3-style checkpoint "
                         "that carries them, or draft='suffix' / 'ngram'")
    reader = ckpt.TensorReader(files.weight_files)
    name = f"model.layers.{cfg.num_layers}.eh_proj.weight"
    if name not in reader:
        raise ValueError(f"draft='mtp': config.json says num_nextn_predict_layers = "
                         f"{cfg.num_mtp_layers}, but checkpoint {where} has no {name} (its MTP layer was "
                         "left out when it was saved or converted); use draft='suffix' or 'ngram'")
    if cfg.is_moe_layer(cfg.num_layers):   # the MTP layer is the first MoE layer of some configs
        try:
            cfg._check_moe()
        except ConfigError as e:
            raise ConfigError(f"draft='mtp': the MTP layer (layer {cfg.num_layers}) is an MoE layer "
                              f"by config.json's rule, and {e}") from None
    return reader


def check_mtp(files: ckpt.CheckpointFiles, cfg: ModelConfig) -> None:
    """draft='mtp' can work with this checkpoint (ValueError naming what is missing); no weights read."""
    _reader(files, cfg)


def load_mtp(files: ckpt.CheckpointFiles, cfg: ModelConfig, target: Transformer, dtype: torch.dtype,
             device: torch.device) -> MTPLayer:
    """The checkpoint's first MTP layer on `device`, sharing `target`'s embedding / head where the
    checkpoint does not repeat them."""
    reader = _reader(files, cfg)
    prefix = f"model.layers.{cfg.num_layers}."
    with torch.device("meta"):
        layer = MTPLayer(cfg, own_embed=prefix + "embed_tokens.weight" in reader,
                         own_head=prefix + "shared_head.head.weight" in reader)
        holder = nn.Module()               # `layers.N.*`: the checkpoint's names (hf_name)
        holder.cfg, holder.layers = cfg, nn.ModuleDict({str(cfg.num_layers): layer})
    _materialize(holder, device, dtype)
    ckpt.fill_parameters(holder, reader, device)
    if device.type == "cpu":
        convert_for_cpu(holder)
    layer.share(target)
    return layer.eval()
