"""The transformer: one readable decoder for Llama-family (and, through mla.py, DeepSeek) checkpoints.

    embed -> N x [RMSNorm -> Attention -> +residual -> RMSNorm -> MLP -> +residual] -> RMSNorm -> lm_head

Each "+residual -> RMSNorm" pair is one op (ops.fused_add_rmsnorm, one CUDA kernel): a layer hands
on its sublayer's raw output together with the residual stream, and the next norm adds them.

Built on the meta device (no memory touched), then allocated on the target device and filled from the
checkpoint by checkpoint.load_weights. Attention and MLP classes are chosen per layer by the config.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tinyinfer import ops
from tinyinfer.attention import AttentionMetadata, MultiHeadAttention
from tinyinfer.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 (as the reference implementations do), scale in the model dtype.
        return ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(norm(x + residual), x + residual): the residual add that precedes this norm, fused."""
        return ops.fused_add_rmsnorm(x, residual, self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int, bias: bool = False):
        super().__init__()
        self.ffn = ffn
        self.gate_up_proj = nn.Linear(hidden, 2 * ffn, bias=bias)   # fused: cat(gate, up) at load
        self.down_proj = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).split(self.ffn, dim=-1)     # (T, ffn) each
        return self.down_proj(F.silu(gate) * up)


def attention_class(cfg: ModelConfig):
    if cfg.is_mla:
        from tinyinfer.mla import MultiHeadLatentAttention    # mla.py builds on this module
        return MultiHeadLatentAttention
    return MultiHeadAttention


def make_mlp(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if cfg.is_moe_layer(layer_idx):
        from tinyinfer.moe import MoE                         # moe.py builds on this module
        return MoE(cfg)
    return SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = attention_class(cfg)(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = make_mlp(cfg, layer_idx)

    def forward(self, x: Tensor, residual: Tensor | None, positions: Tensor,
                rope: tuple[Tensor, Tensor], meta: AttentionMetadata, k_cache: Tensor,
                v_cache: Tensor | None) -> tuple[Tensor, Tensor]:
        # x (T, hidden): the previous layer's MLP output (the embeddings for layer 0, residual None);
        # residual (T, hidden): the stream x is still to be added to. Returns this layer's pair.
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.attn(h, positions, rope, meta, k_cache, v_cache)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = attention_class(cfg).rotary(cfg)

    @staticmethod
    def kv_dims(cfg: ModelConfig):
        return attention_class(cfg).kv_dims(cfg)

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[Tensor, Tensor | None]]) -> Tensor:
        # input_ids, positions (T,) -> hidden states (T, hidden)
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, rope, meta, k_cache, v_cache)
        return self.norm(x) if residual is None else self.norm.add_and_norm(x, residual)[0]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()                  # (n, vocab)


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> Transformer:
    """Allocate an (uninitialised) model on `device` without ever materialising it on the CPU first."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    for m in model.modules():        # e.g. the MoE router: near-equal scores pick experts, keep fp32
        if getattr(m, "keep_float32", False):
            m.float()
    if cfg.tie_word_embeddings:                  # to_empty allocates each module's tensors anew
        model.lm_head.weight = model.embed_tokens.weight
    # Buffers that are not in the checkpoint (RoPE frequencies) are recomputed on the device; they
    # stay float32 whatever the model dtype.
    model.rotary = attention_class(cfg).rotary(cfg).to(device)
    return model.eval()
