"""Model configuration: one dataclass built from a Hugging Face `config.json`.

Everything the model needs to know about its shape comes from here, derived once and validated with
messages that name the field (so a checkpoint we cannot run is refused before any weight is read).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from tinyinfer.loading.errors import ConfigError
from tinyinfer.loading.families import (DEFAULT_THETA, MLA_ARCHITECTURES, SUPPORTED_ARCHITECTURES,
                                        family_fields, head_dim)

__all__ = ["ConfigError", "ModelConfig", "parse_dtype"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "half": torch.float16, "float": torch.float32}


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
    attention_bias: bool = False                 # bias on q/k/v and o_proj (Llama, Qwen3)
    qkv_bias: bool = False                       # bias on q/k/v only (Qwen2)
    qk_norm: bool = False                        # per-head RMSNorm of q and k before RoPE (Qwen3)
    mlp_bias: bool = False
    # Multi-head latent attention (DeepSeek-V2/V3, mla.py); kv_lora_rank None = standard attention.
    # For MLA, head_dim = qk_nope_head_dim + qk_rope_head_dim (the query/key head size).
    kv_lora_rank: Optional[int] = None
    q_lora_rank: Optional[int] = None            # None: a plain q_proj (DeepSeek-V2-Lite)
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False                # rope dims paired as (2i, 2i+1), DeepSeek's layout
    # Mixture of experts (DeepSeek, moe.py); n_routed_experts 0 = every MLP dense
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"                # V2 softmax, V3 sigmoid
    topk_method: str = "greedy"                  # greedy | group_limited_greedy (V2) | noaux_tc (V3)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    sparse_layers: Optional[list[int]] = None    # MoE layers listed (Qwen3-MoE, Mixtral), else the rule
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
        if any(self.is_moe_layer(i) for i in range(self.num_layers)):
            self._check_moe()
        self.max_context = self.max_context or self.max_position_embeddings
        if self.sliding_window and self.sliding_window < self.max_context:
            self.notes.append(f"sliding_window {self.sliding_window} < context "
                              f"{self.max_context}: usable context limited to {self.sliding_window} "
                              "tokens (tinyinfer attends to the whole context, so beyond the window it "
                              "would differ from the model's own attention)")
            self.max_context = self.sliding_window

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    def is_moe_layer(self, i: int) -> bool:
        if self.sparse_layers is not None:
            return self.n_routed_experts > 0 and i in self.sparse_layers
        return (self.n_routed_experts > 0 and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    def _check_moe(self) -> None:
        E, G, k = self.n_routed_experts, self.n_group, self.num_experts_per_tok
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ConfigError(f"config field scoring_func is {self.scoring_func!r}; use softmax or sigmoid")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ConfigError(f"config field topk_method is {self.topk_method!r}; tinyinfer supports "
                              "greedy, group_limited_greedy and noaux_tc")
        if self.moe_intermediate_size <= 0 or not 0 < k <= E:
            raise ConfigError(f"MoE layers need moe_intermediate_size > 0 and 1 <= num_experts_per_tok "
                              f"<= n_routed_experts, got {self.moe_intermediate_size}, {k}, {E}")
        if self.topk_method != "greedy":
            if G <= 0 or E % G or not 0 < self.topk_group <= G:
                raise ConfigError(f"n_routed_experts ({E}) must split into n_group ({G}) equal groups "
                                  f"and 1 <= topk_group ({self.topk_group}) <= n_group")
            if self.topk_group * (E // G) < k or (self.topk_method == "noaux_tc" and E // G < 2):
                raise ConfigError(f"topk_group {self.topk_group} x {E // G} experts per group cannot "
                                  f"supply num_experts_per_tok = {k} (noaux_tc also needs >= 2 per group)")

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
        theta = rope.get("rope_theta", cfg.get("rope_theta", DEFAULT_THETA.get(arch, 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        mla = arch in MLA_ARCHITECTURES
        if rope_type not in ("default", "llama3") and not (mla and rope_type == "yarn"):
            raise ConfigError(f"config field rope_scaling.rope_type is {rope_type!r}; tinyinfer "
                              "supports 'default' and 'llama3' for Llama-family models, 'default' "
                              "and 'yarn' for DeepSeek")
        if rope_type == "yarn":
            if "factor" not in rope:
                raise ConfigError("config field rope_scaling lacks 'factor' for rope_type yarn")
            rope.setdefault("original_max_position_embeddings",
                            cfg.get("max_position_embeddings", 2048))
        if rope_type == "llama3":
            for key in ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings"):
                if key not in rope:
                    raise ConfigError(f"config field rope_scaling lacks {key!r} for rope_type llama3")
        n_heads = cfg["num_attention_heads"]
        extra = family_fields(cfg, arch)             # families.py: what this architecture adds
        extra.setdefault("head_dim", head_dim(cfg, arch))
        extra.setdefault("intermediate_size", cfg.get("intermediate_size"))
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
            num_layers=cfg["num_hidden_layers"],
            num_heads=n_heads, num_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=rope if rope_type != "default" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=bos, eos_token_ids=eos_ids, dtype=dtype, architecture=arch, **extra)

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

