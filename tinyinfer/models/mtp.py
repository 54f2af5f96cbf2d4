"""DeepSeek-V3's multi-token-prediction (MTP) module, run as a one-layer draft (DeepSeek-AI,
"DeepSeek-V3 Technical Report", 2024, section 2.2; its use for speculative decoding: section 5.4.3).

A checkpoint with num_nextn_predict_layers > 0 stores the module as layer N = num_hidden_layers:
`model.layers.N.{enorm, hnorm, eh_proj, shared_head.norm, shared_head.head, embed_tokens}` beside an
ordinary decoder layer's tensors (`self_attn.*`, `mlp.*`, the two layernorms; an MoE MLP where the
config's rule makes layer N one). At position i it combines the target's hidden state h_i (after the
final norm, as the target hands it to its head) with the embedding of the next token t_(i+1):

    x = eh_proj(cat(enorm(embed(t_(i+1))), hnorm(h_i)))        (T, 2 hidden) -> (T, hidden)
    g = DecoderLayer(x)  (+ its residual)                      attends over its own paged cache
    logits = head(shared_head.norm(g))                         a guess of t_(i+2)

(the embedding at position 0 is zeroed, as vLLM's DeepSeek MTP does). Chained on its own output g in
place of h, the one module drafts k > 1 tokens (engine/mtp_proposer.py). `embed_tokens` and
`shared_head.head` are the target's own when the checkpoint does not repeat them (they are shared in
DeepSeek-V3's design).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from tinyinfer.config.model import ModelConfig
from tinyinfer.layers.attention import AttentionMetadata
from tinyinfer.layers.linear import Linear
from tinyinfer.layers.norm import RMSNorm
from tinyinfer.layers.rotary import RotaryEmbedding
from tinyinfer.models.transformer import DecoderLayer


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig, own_head: bool):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if own_head else None


class MTPLayer(DecoderLayer):
    """Layer N of the checkpoint: a decoder layer (its tensors under the same names) plus the MTP
    projections. Parameter names match the checkpoint's `model.layers.N.*` under a `layers.N` parent."""

    def __init__(self, cfg: ModelConfig, own_embed: bool, own_head: bool):
        super().__init__(cfg, cfg.num_layers)
        self.cfg = cfg
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg, own_head)
        self.embed_tokens = (nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                          _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
                             if own_embed else None)
        self._target: tuple = ()       # (the Transformer whose embedding / head it may share,); not a submodule

    @property
    def target(self) -> nn.Module:
        return self._target[0]

    def share(self, target: nn.Module) -> None:
        self._target = (target,)

    def embed(self, ids: Tensor) -> Tensor:
        table = self.embed_tokens if self.embed_tokens is not None else self.target.embed_tokens
        return table(ids)

    def draft_forward(self, ids: Tensor, hidden: Tensor, positions: Tensor, rotary: RotaryEmbedding,
                      meta: AttentionMetadata, k_cache: Tensor, v_cache: Optional[Tensor]) -> Tensor:
        # ids, positions (T,): t_(i+1) and i; hidden (T, hidden): h_i -> g (T, hidden), before the norm
        e = self.embed(ids) * (positions != 0).to(hidden.dtype)[:, None]
        x = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(hidden)], dim=-1))
        out, residual = self.forward(x, None, positions, rotary, meta, k_cache, v_cache)
        return out + residual

    def compute_logits(self, g: Tensor) -> Tensor:
        # g (n, hidden) -> (n, vocab) float32
        h = self.shared_head.norm(g)
        if self.shared_head.head is not None:
            return self.shared_head.head(h).float()
        return self.target.compute_logits(h)
