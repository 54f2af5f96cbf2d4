"""Logits processors: what a request's sampling parameters do to the logits before a token is drawn --
repetition penalty (Keskar et al., "CTRL", 2019), temperature, top-k, top-p (Holtzman et al., 2020),
min-p (Nguyen et al., 2024) -- each vectorised over the batch (per-row parameters become [B, 1]
tensors); the distribution they leave (`probabilities`) and the log-probabilities of what was drawn
(`token_logprobs`). Drawing the token itself is sampling/sampler.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import torch

from tinyinfer.sampling.params import SamplingParams


def _row_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)  # (B, 1)


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                   histories: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, V) logits -> (B, V) processed logits; filtered-out entries are -inf.

    Order: repetition penalty (over prompt + output tokens in `histories`), temperature, top-k, top-p,
    min-p. Greedy rows skip the temperature; the filters never remove the argmax, so greedy is unchanged.
    Ties at a top-k / top-p cut-off are all kept, so the result never depends on sort order.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(histories) != len(params):
        raise ValueError(f"process_logits: logits {tuple(logits.shape)} needs one row per request; "
                         f"got {len(params)} params and {len(histories)} histories")
    x = logits.float().clone()  # (B, V)
    B, V = x.shape

    pen_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if pen_rows:
        # seen[b, t] = token t occurs in row b's history; one scatter over the concatenated histories.
        row_ids = list(chain.from_iterable([i] * len(histories[i]) for i in pen_rows))
        tok_ids = list(chain.from_iterable(histories[i] for i in pen_rows))
        seen = torch.zeros(B, V, dtype=torch.bool, device=x.device)  # (B, V)
        if tok_ids:
            seen[torch.tensor(row_ids, device=x.device), torch.tensor(tok_ids, device=x.device)] = True
        pen = _row_tensor([p.repetition_penalty for p in params], x)  # (B, 1)
        # CTRL / HF rule: make a seen token less likely whatever its sign.
        x = torch.where(seen, torch.where(x > 0, x / pen, x * pen), x)

    if any(p.temperature not in (0.0, 1.0) for p in params):
        temp = _row_tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], x)  # (B, 1)
        x = x / temp

    use_k = any(p.top_k > 0 for p in params)
    use_p = any(p.top_p < 1.0 for p in params)
    if use_k and not use_p:
        # Top-k alone needs only the k-th largest value per row, not a full sort.
        ks = [p.top_k if 0 < p.top_k < V else V for p in params]
        top = torch.topk(x, max(ks), dim=-1).values  # (B, k_max) descending
        k = torch.tensor(ks, device=x.device)  # (B,)
        cutoff = top.gather(1, (k.clamp(max=top.shape[1]) - 1).unsqueeze(1))  # (B, 1)
        cutoff = cutoff.masked_fill((k >= V).unsqueeze(1), -math.inf)  # rows with top-k off
        x = x.masked_fill(x < cutoff, -math.inf)
    elif use_p:
        sorted_x, _ = torch.sort(x, dim=-1, descending=True)  # (B, V)
        k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=x.device)  # (B,)
        in_k = torch.arange(V, device=x.device).unsqueeze(0) < k.unsqueeze(1)  # (B, V)
        probs = torch.softmax(sorted_x.masked_fill(~in_k, -math.inf), dim=-1)  # (B, V) descending
        mass_before = torch.cumsum(probs, dim=-1) - probs
        top_p = _row_tensor([p.top_p for p in params], x)  # (B, 1)
        # Smallest prefix whose mass reaches top_p (the first token always stays).
        n_p = (in_k & (mass_before < top_p)).sum(dim=-1).clamp(min=1)  # (B,)
        off = torch.tensor([p.top_p >= 1.0 for p in params], device=x.device)  # p=1: rounding must not cut
        n_keep = torch.where(off, k, torch.minimum(n_p, k))
        cutoff = sorted_x.gather(1, (n_keep - 1).unsqueeze(1))  # (B, 1)
        x = x.masked_fill(x < cutoff, -math.inf)

    if any(p.min_p > 0.0 for p in params):
        # p(t) >= min_p * p_max  <=>  x_t >= x_max + log(min_p)
        log_min_p = _row_tensor([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params], x)
        x_max = x.max(dim=-1, keepdim=True).values  # (B, 1)
        x = x.masked_fill(x < x_max + log_min_p, -math.inf)
    return x


def greedy_mask(params: Sequence[SamplingParams], device: torch.device) -> torch.Tensor:
    return torch.tensor([p.temperature == 0.0 for p in params], device=device)  # (B,)


def probabilities(logits: torch.Tensor, params: Sequence[SamplingParams],
                  histories: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, V) distribution the sampler draws from: softmax of the processed logits; greedy rows one-hot."""
    x = process_logits(logits, params, histories)  # (B, V)
    probs = torch.softmax(x, dim=-1)
    if any(p.temperature == 0.0 for p in params):  # decided on the host: no device sync
        greedy = greedy_mask(params, x.device)
        one_hot = torch.zeros_like(probs).scatter_(1, x.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy.unsqueeze(1), one_hot, probs)
    return probs


@dataclass
class Logprobs:
    """One emitted token's log-probability and the N most likely tokens, under the distribution the
    sampler drew from: log-softmax of the processed logits (greedy rows: the same at temperature 1,
    whose argmax was taken). Tokens the filters removed (-inf) are never listed."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]        # (token id, logprob), most likely first; at most N entries


def token_logprobs(processed: torch.Tensor, tokens: Sequence[int], nums: Sequence[int]) -> list[Logprobs]:
    """processed (R, V) logits from `process_logits`, tokens (R,) emitted at those rows, nums (R,) the
    top-N each row wants -> one Logprobs per row."""
    logp = torch.log_softmax(processed.float(), dim=-1)                               # (R, V)
    idx = torch.as_tensor(list(tokens), dtype=torch.long, device=logp.device)       # (R,)
    chosen = logp.gather(1, idx.unsqueeze(1)).squeeze(1).tolist()                   # (R,)
    n_max = max(nums, default=0)
    top_v, top_i = logp.topk(min(n_max, logp.shape[1]), dim=-1) if n_max else (None, None)  # (R, N)
    out = []
    for r, (tok, n) in enumerate(zip(tokens, nums)):
        top = [] if not n else [(i, v) for i, v in zip(top_i[r, :n].tolist(), top_v[r, :n].tolist())
                                if v != -math.inf]
        out.append(Logprobs(int(tok), chosen[r], top))
    return out
