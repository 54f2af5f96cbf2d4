"""Model configuration: one dataclass built from a Hugging Face `config.json`.

Everything the model needs to know about its shape comes from here, derived once and validated with
messages that name the field (so a checkpoint we cannot run is refused before any weight is read).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "half": torch.float16, "float": torch.float32}


class ConfigError(ValueError):
    """A checkpoint's config.json asks for something tinyinfer cannot run (or is malformed)."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = str(name).replace("torch.", "")
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of float32, float16, bfloat16")
    return DTYPES[key]


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None          # {"rope_type": "llama3", ...} or None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: str = "bfloat16"                      # the checkpoint's own dtype
    architecture: str = "LlamaForCausalLM"
    sliding_window: Optional[int] = None
    attention_bias: bool = False
    mlp_bias: bool = False
    max_context: int = 0                         # usable context (derived: window-limited)
    notes: list[str] = field(default_factory=list)  # messages for the user (e.g. window limit)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        self.max_context = self.max_context or self.max_position_embeddings
        if self.sliding_window and self.sliding_window < self.max_context:
            self.notes.append(f"sliding_window {self.sliding_window} < context "
                              f"{self.max_context}: usable context limited to {self.sliding_window} "
                              "tokens (tinyinfer attends to the whole context, so beyond the window it "
                              "would differ from the model's own attention)")
            self.max_context = self.sliding_window

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @staticmethod
    def from_hf(cfg: dict[str, Any], generation_config: Optional[dict] = None) -> "ModelConfig":
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"config field 'architectures' is {arch!r}; tinyinfer runs "
                              f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        rope = dict(cfg.get("rope_parameters") or {})        # transformers v5 layout
        legacy = cfg.get("rope_scaling")
        if legacy:
            rope.update(legacy)
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ConfigError(f"config field rope_scaling.rope_type is {rope_type!r}; tinyinfer "
                              "supports 'default' and 'llama3' for Llama-family models")
        if rope_type == "llama3":
            for key in ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings"):
                if key not in rope:
                    raise ConfigError(f"config field rope_scaling lacks {key!r} for rope_type llama3")
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        eos = cfg.get("eos_token_id")
        if generation_config and generation_config.get("eos_token_id") is not None:
            eos = generation_config["eos_token_id"]
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16").replace("torch.", "")
        bos = cfg.get("bos_token_id", 1)
        if generation_config and generation_config.get("bos_token_id") is not None:
            bos = generation_config["bos_token_id"]
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config field hidden_act is {cfg['hidden_act']!r}; only 'silu' "
                              "(SwiGLU) is supported")
        return ModelConfig(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=n_heads, num_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=rope if rope_type != "default" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=bos, eos_token_ids=eos_ids, dtype=dtype, architecture=arch,
            sliding_window=cfg.get("sliding_window"),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)))

    @staticmethod
    def from_dir(path: str) -> "ModelConfig":
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        gen = None
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                gen = json.load(f)
        return ModelConfig.from_hf(cfg, gen)


def rope_inv_freq(cfg: ModelConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies for RoPE over `dim` dims, with Llama 3 scaling when configured."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = cfg.rope_scaling
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_ctx / low, inv_freq / factor,
                               torch.where(wavelen < old_ctx / high, inv_freq, blended))
    return inv_freq
