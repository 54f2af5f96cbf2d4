"""Qwen2 / Qwen2.5, Qwen3, Qwen3-MoE and Mixtral against Hugging Face transformers: small random-weight
checkpoints of each family written with save_pretrained, float32 on the CPU -- logits within rtol 1e-4,
64 greedy tokens identical (up to the first near-tie) -- and the config fields each family uses,
compared with what transformers' own config classes derive from them (sliding-window layers)."""
import pytest

from hf_util import assert_greedy_matches_hf, assert_logits_close, hf_logits, hf_model, save_random
from tinyinfer import LLM
from tinyinfer.config.errors import ConfigError
from tinyinfer.config.model import ModelConfig

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2)
FAMILIES = {
    "qwen2": ("Qwen2", dict(BASE)),
    "qwen2_window": ("Qwen2", dict(BASE, use_sliding_window=True, sliding_window=128,
                                   max_window_layers=1)),
    "qwen2_tied": ("Qwen2", dict(BASE, tie_word_embeddings=True)),
    "qwen3": ("Qwen3", dict(BASE, head_dim=32)),            # head_dim != hidden / heads
    "qwen3_bias": ("Qwen3", dict(BASE, head_dim=16, attention_bias=True)),
    "qwen3_moe": ("Qwen3Moe", dict(BASE, **MOE, head_dim=16, num_experts=8, moe_intermediate_size=32,
                                   norm_topk_prob=True)),
    "qwen3_moe_mixed": ("Qwen3Moe", dict(BASE, **MOE, num_hidden_layers=3, num_experts=4,
                                         moe_intermediate_size=32, norm_topk_prob=False,
                                         decoder_sparse_step=2, mlp_only_layers=[2])),
    "qwen3_moe_top1": ("Qwen3Moe", dict(BASE, num_experts_per_tok=1, num_experts=4,
                                        moe_intermediate_size=32, norm_topk_prob=True)),
    "mixtral": ("Mixtral", dict(BASE, **MOE, num_local_experts=4, sliding_window=256)),
}
GREEDY = 64


def _save(tmp_path, family: str, **kw) -> str:
    cls = getattr(transformers, f"{family}ForCausalLM")
    return save_random(tmp_path, getattr(transformers, f"{family}Config"), cls, **kw)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_matches_hf_logits_and_greedy_tokens(tmp_path, name):
    family, kw = FAMILIES[name]
    path = _save(tmp_path, family, **kw)
    llm = LLM(path, device="cpu", dtype="float32")
    hf = hf_model(path)
    ids = list(range(3, 200, 7))          # 29 tokens: RoPE at larger positions, routing varies
    assert_logits_close(llm.logits(ids), hf_logits(hf, ids))
    assert_greedy_matches_hf(llm, hf, ids, GREEDY, at_least=16)


def test_moe_layers_follow_decoder_sparse_step_and_mlp_only_layers(tmp_path):
    path = _save(tmp_path, "Qwen3Moe", **FAMILIES["qwen3_moe_mixed"][1])
    llm = LLM(path, device="cpu", dtype="float32")
    kinds = [type(layer.mlp).__name__ for layer in llm.model.layers]
    # (i + 1) % 2 == 0 -> layer 1 sparse; layer 2 listed in mlp_only_layers stays dense
    assert kinds == ["SwiGLU", "MoE", "SwiGLU"]


WINDOWS = [
    ("Qwen2", dict(use_sliding_window=False, sliding_window=64)),
    ("Qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=4)),
    ("Qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=2)),
    ("Qwen2", dict(use_sliding_window=True, sliding_window=64,
                   layer_types=["full_attention"] * 4)),
    ("Qwen3", dict(use_sliding_window=True, sliding_window=64, max_window_layers=1)),
    ("Qwen3Moe", dict(use_sliding_window=True, sliding_window=64, num_experts=4, **MOE,
                      moe_intermediate_size=32)),
    ("Mixtral", dict(sliding_window=64)),
    ("Mixtral", dict(sliding_window=None)),
    ("Mistral", dict(sliding_window=64)),
]


@pytest.mark.parametrize("family,kw", WINDOWS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(WINDOWS)])
def test_sliding_window_fields_as_transformers_reads_them(family, kw):
    """Our usable context is the window exactly when transformers gives some layer a window."""
    hf = getattr(transformers, f"{family}Config")(**dict(BASE, num_hidden_layers=4, **kw))
    cfg = ModelConfig.from_hf({**hf.to_dict(), "architectures": [f"{family}ForCausalLM"]})
    types = getattr(hf, "layer_types", None)
    windowed = hf.sliding_window is not None and (types is None or "sliding_attention" in types)
    assert cfg.max_context == (hf.sliding_window if windowed else BASE["max_position_embeddings"])


def test_bad_family_fields_are_refused_by_name():
    qwen2 = {**BASE, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
             "sliding_window": 64}
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig.from_hf({**qwen2, "layer_types": ["full_attention"]})
    with pytest.raises(ConfigError, match="attention_bias"):
        ModelConfig.from_hf({**qwen2, "attention_bias": False})
    moe = {**BASE, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4,
           "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        ModelConfig.from_hf({**moe, "mlp_only_layers": [7]})
    with pytest.raises(ConfigError, match="decoder_sparse_step"):
        ModelConfig.from_hf({**moe, "decoder_sparse_step": 0})
    no_ffn = {k: v for k, v in moe.items() if k != "intermediate_size"}
    assert ModelConfig.from_hf(no_ffn).intermediate_size == 32          # no dense layer needs it
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelConfig.from_hf({**no_ffn, "mlp_only_layers": [0]})
    with pytest.raises(ConfigError, match="rope_type.*yarn"):
        ModelConfig.from_hf({**qwen2, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
