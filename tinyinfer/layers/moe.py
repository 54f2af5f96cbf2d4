"""Mixture of experts (DeepSeek-V2/V3, Qwen3-MoE, Mixtral): each token runs through k of many small
SwiGLU experts.

A router scores every routed expert for each token and keeps the top k; the layer's output is the
weighted sum of those k experts plus the always-on shared experts. Only k + n_shared of the experts'
weights are read per token, which is how DeepSeek-V3 holds 671B parameters but reads ~37B per token.
Routing rules (DeepSeek-V2 paper section 2.2; DeepSeek-V3 paper section 2.1.2):
  V2: softmax scores; 'greedy' top-k, or 'group_limited_greedy' (keep the topk_group groups whose best
      expert scores highest, then top-k inside them).
  V3: sigmoid scores; a learned per-expert bias (e_score_correction_bias) shifts the *choice* only
      ('noaux_tc': groups ranked by the sum of their two best biased scores); the weights are the
      unbiased scores of the chosen experts, normalised to sum to 1 when norm_topk_prob.
  Both scale the weights by routed_scaling_factor (V2 only when it does not normalise: the config
  parser, config/families.py, folds V2's "normalise only if k > 1" into norm_topk_prob).
  Qwen3-MoE (Qwen team, "Qwen3 Technical Report", 2025) and Mixtral (Jiang et al., "Mixtral of
  Experts", 2024) route as V2 'greedy' with softmax scores, no shared experts and no scaling: the top-k
  weights renormalised (always for Mixtral, if norm_topk_prob for Qwen3-MoE).
Experts are ordinary SwiGLU modules of nn.Linear, so INT4 quantization applies to them unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tinyinfer.config.model import ModelConfig
from tinyinfer.layers.mlp import SwiGLU


class Router(nn.Module):
    """Scores -> (weights (T, k) float32, expert ids (T, k)). Kept in float32 (see keep_float32):
    near-equal scores decide which experts run, so they are computed at full precision."""
    keep_float32 = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.n_routed_experts
        self.top_k, self.num_experts = cfg.num_experts_per_tok, E
        self.scoring, self.method = cfg.scoring_func, cfg.topk_method
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.scale_after_norm = cfg.scoring_func == "sigmoid"
        # Not an nn.Linear on purpose: weight-only quantization must not touch the router.
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size), requires_grad=False)   # (E, d)
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(E), requires_grad=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = F.linear(x.float(), self.weight.float())                         # (T, E)
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores
        if self.method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.float()
        if self.method in ("group_limited_greedy", "noaux_tc"):
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)   # (T, G, E/G)
            if self.method == "noaux_tc":
                group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)          # (T, G)
            else:
                group_score = grouped.max(dim=-1).values
            keep_groups = group_score.topk(self.topk_group, dim=-1).indices        # (T, topk_group)
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep_groups, True)
            choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1),
                                        float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices                              # (T, k)
        weights = scores.gather(1, ids)                                            # (T, k)
        if self.norm_topk_prob:                    # renormalise the k weights to sum to 1
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            if self.scale_after_norm:              # V3: then scale; V2 normalises instead
                weights = weights * self.scaling
        else:
            weights = weights * self.scaling
        return weights, ids


class MoE(nn.Module):
    """Routed + shared experts. Runs eagerly, never inside a CUDA graph: how many tokens each expert
    gets is data-dependent (read back to the host to slice the batch), so the shapes change per step."""
    graph_safe = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size, cfg.mlp_bias)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
                                      cfg.mlp_bias) if cfg.n_shared_experts else None)

    def forward(self, x: Tensor) -> Tensor:
        # x (T, d)
        T, k = x.shape[0], self.gate.top_k
        weights, ids = self.gate(x)                                                # (T, k) each
        # Gather tokens per expert: sort the T*k (token, expert) assignments by expert, so each
        # expert sees one contiguous slice and runs one batched matmul over its tokens.
        flat = ids.flatten()                                                       # (T*k,)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()      # host sync
        token = order // k                                                         # (T*k,) token ids
        w = weights.flatten()[order, None]                                         # (T*k, 1)
        routed = torch.zeros_like(x)
        start = 0
        for expert, n in zip(self.experts, counts):                                # loop over experts
            if n:
                sl = slice(start, start + n)
                y = expert(x[token[sl]])                                           # (n, d)
                routed.index_add_(0, token[sl], (y.float() * w[sl]).to(x.dtype))
                start += n
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(x)
        return routed
