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

from tinyinfer.config.errors import ConfigError
from tinyinfer.config.families import (DEFAULT_THETA, MLA_ARCHITECTURES, SUPPORTED_ARCHITECTURES,
                                        family_fields, head_dim)
from tinyinfer.config.fields import (MAX_COUNT, MAX_DIM, MAX_POSITIONS, check_bool, check_int,
                                             check_number, get, read_bool, read_dict, read_int,
                                             read_token_ids, show)

__all__ = ["ConfigError", "ModelConfig", "parse_dtype"]
# Our field names that config.json spells differently.
HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads"}
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
    num_mtp_layers: int = 0                      # DeepSeek-V3's multi-token-prediction layers (unused)
    max_context: int = 0                         # usable context (derived: window-limited)
    notes: list[str] = field(default_factory=list)  # messages for the user (e.g. window limit)

    def __post_init__(self):
        # Every field by its config.json name, type and range (fields.py): refused by name.
        for name, maximum in (("vocab_size", MAX_DIM), ("hidden_size", MAX_DIM),
                              ("intermediate_size", MAX_DIM), ("num_layers", MAX_COUNT),
                              ("num_heads", MAX_COUNT), ("num_kv_heads", MAX_COUNT),
                              ("head_dim", MAX_DIM), ("max_position_embeddings", MAX_POSITIONS)):
            value = getattr(self, name)
            if value is None:
                raise ConfigError(f"config field {HF_NAMES.get(name, name)} is missing; config.json "
                                  "must give it")
            check_int(HF_NAMES.get(name, name), value, 1, maximum)
        for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_shared_experts",
                     "num_experts_per_tok", "moe_intermediate_size", "first_k_dense_replace",
                     "num_mtp_layers"):
            check_int(name, getattr(self, name), 0, MAX_DIM)
        check_int("n_routed_experts", self.n_routed_experts, 0, MAX_COUNT)
        for name in ("moe_layer_freq", "n_group", "topk_group"):
            check_int(name, getattr(self, name), 1, MAX_COUNT)
        for name in ("sliding_window", "kv_lora_rank", "q_lora_rank"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1, MAX_DIM)
        for name in ("tie_word_embeddings", "attention_bias", "qkv_bias", "qk_norm", "mlp_bias",
                     "rope_interleave", "norm_topk_prob"):
            check_bool(name, getattr(self, name))
        self.rms_norm_eps = check_number("rms_norm_eps", self.rms_norm_eps, 0.0, 1.0)
        self.rope_theta = check_number("rope_theta", self.rope_theta, 0.0)
        self.routed_scaling_factor = check_number("routed_scaling_factor", self.routed_scaling_factor, 0.0)
        self.eos_token_ids = read_token_ids("eos_token_id", self.eos_token_ids, self.vocab_size)
        read_token_ids("bos_token_id", self.bos_token_id, self.vocab_size)
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
        if not isinstance(cfg, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(cfg).__name__} "
                              f"{show(cfg)}")
        gen = generation_config if generation_config is not None else {}
        if not isinstance(gen, dict):
            raise ConfigError(f"generation_config.json must hold a JSON object, got {show(gen)}")
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        arch = archs[0] if isinstance(archs, list) else archs
        if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"config field 'architectures' is {show(arch)}; tinyinfer runs "
                              f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        # The fields the family parsers compute with, first: a wrong type is refused by name.
        vocab = read_int(cfg, "vocab_size")
        read_int(cfg, "hidden_size")
        read_int(cfg, "num_hidden_layers", maximum=MAX_COUNT)
        n_heads = read_int(cfg, "num_attention_heads", maximum=MAX_COUNT)
        rope = rope_parameters(cfg)
        theta = rope.get("rope_theta", get(cfg, "rope_theta", DEFAULT_THETA.get(arch, 10000.0)))
        rope_type = rope.get("rope_type", "default")
        check_rope(rope, rope_type, arch in MLA_ARCHITECTURES, get(cfg, "max_position_embeddings", 2048))
        extra = family_fields(cfg, arch)             # families.py: what this architecture adds
        extra.setdefault("head_dim", head_dim(cfg, arch))
        extra.setdefault("intermediate_size", cfg.get("intermediate_size"))
        eos = gen["eos_token_id"] if gen.get("eos_token_id") is not None else cfg.get("eos_token_id")
        bos = gen["bos_token_id"] if gen.get("bos_token_id") is not None else cfg.get("bos_token_id", 1)
        key = "dtype" if cfg.get("dtype") is not None else "torch_dtype"
        dtype = str(get(cfg, key, "bfloat16")).replace("torch.", "")
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise ConfigError(f"config field {key} must name a floating-point dtype (bfloat16, "
                              f"float16, float32), got {show(cfg.get(key))}")
        if get(cfg, "hidden_act", "silu") != "silu":
            raise ConfigError(f"config field hidden_act is {show(cfg['hidden_act'])}; only 'silu' "
                              "(SwiGLU) is supported")
        return ModelConfig(
            vocab_size=vocab, hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=n_heads, num_kv_heads=read_int(cfg, "num_key_value_heads", n_heads, maximum=MAX_COUNT),
            rms_norm_eps=get(cfg, "rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling=rope if rope_type != "default" else None,
            max_position_embeddings=get(cfg, "max_position_embeddings", 2048),
            tie_word_embeddings=read_bool(cfg, "tie_word_embeddings"), bos_token_id=bos,
            eos_token_ids=read_token_ids("eos_token_id", eos, vocab), dtype=dtype,
            architecture=arch, **extra)

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


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """RoPE parameters from transformers v5's rope_parameters and the legacy rope_scaling (v4, its type
    under "type" or "rope_type"), merged: the legacy field's scaling applies over v5's default
    parameters; a value the two give differently is a ConfigError, never one of them dropped."""
    rope, legacy = read_dict(cfg, "rope_parameters"), read_dict(cfg, "rope_scaling")
    for key, d in (("rope_parameters", rope), ("rope_scaling", legacy)):
        if "type" in d:
            kind = d.pop("type")
            if d.setdefault("rope_type", kind) != kind:
                raise ConfigError(f"config field {key} gives type {show(kind)} and rope_type "
                                  f"{show(d['rope_type'])}; keep one")
    if rope.get("rope_type") == "default" and legacy.get("rope_type", "default") != "default":
        del rope["rope_type"]                 # the legacy field scales v5's default parameters
    clash = next((k for k in legacy if k in rope and rope[k] != legacy[k]), None)
    if clash is not None:
        raise ConfigError(f"config fields rope_scaling and rope_parameters disagree on {clash} "
                          f"({show(legacy[clash])} vs {show(rope[clash])}); keep one of them")
    return {**rope, **legacy}


def check_rope(rope: dict[str, Any], rope_type: Any, mla: bool, max_positions: Any) -> None:
    """The RoPE variant is one tinyinfer runs and its parameters are in range (each by name)."""
    if rope_type not in ("default", "llama3") and not (mla and rope_type == "yarn"):
        raise ConfigError(f"config field rope_scaling.rope_type is {show(rope_type)}; tinyinfer "
                          "supports 'default' and 'llama3' for Llama-family models, 'default' "
                          "and 'yarn' for DeepSeek")
    need = {"llama3": ("factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings"), "yarn": ("factor",)}.get(rope_type, ())
    for key in need:
        if key not in rope:
            raise ConfigError(f"config field rope_scaling lacks {key!r} for rope_type {rope_type}")
    if rope_type == "yarn":
        rope.setdefault("original_max_position_embeddings", max_positions)
        for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
            if rope.get(key) is not None:
                check_number(f"rope_scaling.{key}", rope[key], 0.0, low_open=not key.startswith("mscale"))
    if rope_type in ("llama3", "yarn"):
        check_number("rope_scaling.factor", rope["factor"], 1.0, low_open=False)
        check_int("rope_scaling.original_max_position_embeddings",
                  rope["original_max_position_embeddings"], 1, MAX_POSITIONS)
    if rope_type == "llama3":                 # the blend divides by high - low and by low
        low = check_number("rope_scaling.low_freq_factor", rope["low_freq_factor"], 0.0)
        high = check_number("rope_scaling.high_freq_factor", rope["high_freq_factor"], 0.0)
        if high <= low:
            raise ConfigError(f"config fields rope_scaling.high_freq_factor ({high:g}) must exceed "
                              f"rope_scaling.low_freq_factor ({low:g}): Llama 3 scaling blends "
                              "between them")
