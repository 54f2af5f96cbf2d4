"""The architecture-specific fields of a Hugging Face config.json, per model family.

config/model.py reads what every family shares; this module reads what one family adds, as
transformers' classes of that family use it, and refuses by name what tinyinfer cannot run.
docs/formats.md has the table of families and the fields each adds.
"""
from __future__ import annotations

from typing import Any, Optional

from tinyinfer.config.errors import ConfigError
from tinyinfer.config.fields import MAX_COUNT, check_int, get, read_bool, read_int

LLAMA_LIKE = {"LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
              "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"}
MLA_ARCHITECTURES = {"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}
# rope_theta when config.json gives none (transformers' per-class default_theta)
DEFAULT_THETA = {"MixtralForCausalLM": 1_000_000.0}
LAYER_TYPES = ("full_attention", "sliding_attention")


def head_dim(cfg: dict[str, Any], arch: str) -> int:
    """The attention head size: config.json's head_dim, else the family's default."""
    if cfg.get("head_dim"):
        return cfg["head_dim"]
    if arch == "Qwen3ForCausalLM":
        return 128                                   # Qwen3Config's default, not hidden / heads
    return cfg["hidden_size"] // cfg["num_attention_heads"]


def _sliding_window(cfg: dict[str, Any], per_layer: bool) -> Optional[int]:
    """Qwen's window: only with use_sliding_window, and only if some layer uses it (layer_types, else
    layers from max_window_layers on when `per_layer`, else every layer)."""
    use = read_bool(cfg, "use_sliding_window")
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is not None:
        if (not isinstance(types, list) or len(types) != layers
                or any(t not in LAYER_TYPES for t in types)):
            raise ConfigError(f"config field layer_types must list one of {LAYER_TYPES} per layer "
                              f"({layers} layers), got {types!r}")
    window = cfg.get("sliding_window") if use else None
    if window is None:
        return None
    window = check_int("sliding_window", window)
    if types is not None:
        sliding = [t == "sliding_attention" for t in types]
    elif per_layer:
        first = read_int(cfg, "max_window_layers", 28, minimum=0)
        sliding = [i >= first for i in range(layers)]
    else:
        sliding = [True] * layers
    return window if any(sliding) else None


def _llama(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    return {"attention_bias": read_bool(cfg, "attention_bias"), "mlp_bias": read_bool(cfg, "mlp_bias")}


def _mistral(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    if any(t == "sliding_attention" for t in cfg.get("layer_types") or []):
        raise ConfigError("config field layer_types gives a Mistral model per-layer attention types "
                          "(a Ministral-style model); tinyinfer runs MistralForCausalLM with one "
                          "sliding_window for every layer")
    window = cfg.get("sliding_window", 4096)             # null: no window
    return {"sliding_window": None if window is None else check_int("sliding_window", window)}


def _mixtral(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    experts = read_int(cfg, "num_local_experts", cfg.get("num_experts", 8), maximum=MAX_COUNT)
    window = cfg.get("sliding_window")
    return {"sliding_window": None if window is None else check_int("sliding_window", window),
            "n_routed_experts": experts,
            "num_experts_per_tok": read_int(cfg, "num_experts_per_tok", 2),
            "moe_intermediate_size": read_int(cfg, "intermediate_size"),
            "norm_topk_prob": True,                   # Mixtral always renormalises the top k
            "sparse_layers": list(range(cfg["num_hidden_layers"]))}


def _qwen2(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    if cfg.get("attention_bias") is False:
        raise ConfigError("config field attention_bias is false, but Qwen2 projections q/k/v always "
                          "carry a bias; fix config.json")
    return {"qkv_bias": True, "sliding_window": _sliding_window(cfg, per_layer=True)}


def _qwen3(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    return {"qk_norm": True, "attention_bias": read_bool(cfg, "attention_bias"),
            "sliding_window": _sliding_window(cfg, per_layer=arch == "Qwen3ForCausalLM")}


def _qwen3_moe(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    out = _qwen3(cfg, arch)
    layers = cfg["num_hidden_layers"]
    experts = read_int(cfg, "num_experts", cfg.get("num_local_experts", 128), 0, MAX_COUNT)
    step = read_int(cfg, "decoder_sparse_step", 1)
    dense = cfg.get("mlp_only_layers") or []
    if not isinstance(dense, list) or any(not isinstance(i, int) or isinstance(i, bool)
                                          or not 0 <= i < layers for i in dense):
        raise ConfigError(f"config field mlp_only_layers must list layer indices in [0, {layers}), "
                          f"got {dense!r}")
    sparse = [i for i in range(layers) if experts > 0 and (i + 1) % step == 0 and i not in dense]
    out.update(n_routed_experts=experts, sparse_layers=sparse,
               num_experts_per_tok=read_int(cfg, "num_experts_per_tok", 8),
               moe_intermediate_size=read_int(cfg, "moe_intermediate_size", 768),
               norm_topk_prob=read_bool(cfg, "norm_topk_prob"))
    if "intermediate_size" not in cfg:
        if len(sparse) < layers:
            raise ConfigError("config field intermediate_size is missing; the dense MLP layers of "
                              "this Qwen3-MoE model need it")
        out["intermediate_size"] = out["moe_intermediate_size"]        # no dense layer uses it
    return out


def _deepseek(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    """MLA and MoE fields of a DeepSeek-V2/V3 config.json (HF or DeepSeek's own key names)."""
    qc = cfg.get("quantization_config") or {}
    if str(qc.get("quant_method", "")).lower() == "fp8":
        raise ConfigError("config field quantization_config.quant_method is 'fp8': block-quantized "
                          "FP8 weights (as DeepSeek-V3 is released) are not supported; convert the "
                          "checkpoint to bf16 first (DeepSeek's inference/fp8_cast_bf16.py) and drop "
                          "quantization_config from config.json")
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        check_int(key, cfg.get(key))                   # required for MLA: a positive integer
    v3 = arch == "DeepseekV3ForCausalLM"
    top_k = read_int(cfg, "num_experts_per_tok", 0, minimum=0)
    return dict(
        _llama(cfg, arch),
        head_dim=cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"],
        kv_lora_rank=cfg["kv_lora_rank"], q_lora_rank=cfg.get("q_lora_rank") or None,
        qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
        # HF's V2 code always pairs (2i, 2i+1); V3 does unless rope_interleave is false.
        rope_interleave=read_bool(cfg, "rope_interleave", True) if v3 else True,
        n_routed_experts=cfg.get("n_routed_experts") or 0,
        n_shared_experts=cfg.get("n_shared_experts") or 0,
        num_experts_per_tok=top_k,
        moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
        first_k_dense_replace=cfg.get("first_k_dense_replace") or 0,
        moe_layer_freq=cfg.get("moe_layer_freq") or 1,
        scoring_func=cfg.get("scoring_func", "sigmoid" if v3 else "softmax"),
        topk_method=cfg.get("topk_method", "noaux_tc" if v3 else "greedy"),
        n_group=cfg.get("n_group") or 1, topk_group=cfg.get("topk_group") or 1,
        # V2 renormalises the top-k weights only when k > 1 (and then does not scale them)
        norm_topk_prob=read_bool(cfg, "norm_topk_prob") and (v3 or top_k > 1),
        routed_scaling_factor=get(cfg, "routed_scaling_factor", 1.0),
        # DeepSeek-V3's multi-token-prediction layers follow the last layer in the checkpoint; the
        # model does not run them (as transformers does not), so their tensors are expected, unused.
        num_mtp_layers=read_int(cfg, "num_nextn_predict_layers", 0, minimum=0, maximum=MAX_COUNT))


_PARSERS = {"LlamaForCausalLM": _llama, "MistralForCausalLM": _mistral,
            "MixtralForCausalLM": _mixtral, "Qwen2ForCausalLM": _qwen2, "Qwen3ForCausalLM": _qwen3,
            "Qwen3MoeForCausalLM": _qwen3_moe,
            **dict.fromkeys(MLA_ARCHITECTURES, _deepseek)}
SUPPORTED_ARCHITECTURES = frozenset(_PARSERS)


def family_fields(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    """ModelConfig keyword arguments that architecture `arch` adds to the shared ones."""
    return _PARSERS[arch](cfg, arch)
