"""Sampling: request parameters, logits processors, keyed randomness, speculative acceptance, and the
log-probabilities of what was sampled (`token_logprobs`).

The chapter's idea: turning logits into the next token is a pipeline of processors (repetition penalty,
temperature, top-k, top-p, min-p) followed by one draw. Two choices make it an engine part rather than a
loop over requests:

- every processor is vectorised over the batch (per-row parameters become small [B, 1] tensors);
- randomness is *keyed*, not stateful: the noise for a request is a pure function of
  (seed, step, stream, vocab index) computed by a counter-based integer hash (the idea behind Philox /
  Random123, Salmon et al., SC'11). A seeded request therefore draws the same tokens alone, in any batch,
  and after preemption, because nothing depends on the order in which rows were sampled.

`rejection_sample` is the speculative-decoding acceptance rule (Leviathan et al. 2023, Chen et al. 2023):
accept draft token x with probability min(1, p(x)/q(x)); at the first rejection draw from
norm(max(0, p - q)); if all k are accepted draw a bonus token from p. The emitted tokens follow p exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import torch

from tinyinfer.sampling.params import SamplingParams

# Streams of keyed randomness: one purpose each, so no two decisions at the same (seed, step) share noise.
STREAM_SAMPLE = 0    # plain sampling (and the bonus token of a fully accepted speculative run)
STREAM_DRAFT = 1     # the draft model sampling its proposals
STREAM_ACCEPT = 2    # the accept/reject uniform of each draft slot
STREAM_RESIDUAL = 3  # the draw from norm(max(0, p - q)) after a rejection

_MASK32 = 0xFFFFFFFF


# --- logits processors ----------------------------------------------------------------------------

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


def _greedy_mask(params: Sequence[SamplingParams], device: torch.device) -> torch.Tensor:
    return torch.tensor([p.temperature == 0.0 for p in params], device=device)  # (B,)


def probabilities(logits: torch.Tensor, params: Sequence[SamplingParams],
                  histories: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, V) distribution the sampler draws from: softmax of the processed logits; greedy rows one-hot."""
    x = process_logits(logits, params, histories)  # (B, V)
    probs = torch.softmax(x, dim=-1)
    if any(p.temperature == 0.0 for p in params):  # decided on the host: no device sync
        greedy = _greedy_mask(params, x.device)
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


# --- keyed randomness -----------------------------------------------------------------------------

def _mul32_(h: torch.Tensor, c: int) -> torch.Tensor:
    # In place: h = (h * c) mod 2^32 for 0 <= h < 2^32, without an int64 product overflowing (signed
    # overflow is not something to rely on): for c >= 2^31 multiply by 2^32 - c and negate instead.
    if c < 1 << 31:
        return h.mul_(c).bitwise_and_(_MASK32)
    return h.mul_((1 << 32) - c).neg_().bitwise_and_(_MASK32)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # MurmurHash3's 32-bit finalizer: a bijection on [0, 2^32) with full avalanche.
    h = h ^ (h >> 16)
    _mul32_(h, 0x85EBCA6B)
    h ^= h >> 13
    _mul32_(h, 0xC2B2AE35)
    h ^= h >> 16
    return h


def _as_int64(values: Sequence[int] | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int64).to(device)


def keyed_uniform(seeds: torch.Tensor, steps: torch.Tensor, stream: int | torch.Tensor, n: int,
                  device: torch.device | str) -> torch.Tensor:
    """(B, n) float32 uniforms in (0, 1), a pure function of (seed, step, stream, index).

    seeds are any int64; steps (output positions) and streams count modulo 2^32; stream may be one int
    or a (B,) tensor.
    """
    seeds = _as_int64(seeds, device)  # (B,)
    steps = _as_int64(steps, device)  # (B,)
    stream = _as_int64(stream, device)  # () or (B,)
    # Row key: chain the 32-bit halves of the seed, then the step, then the stream, through the mixer.
    key = _fmix32((seeds & _MASK32) ^ 0x9E3779B9)
    key = _fmix32(key ^ ((seeds >> 32) & _MASK32))
    key = _fmix32(key ^ (steps & _MASK32))
    key = _fmix32(key ^ (stream & _MASK32))  # (B,)
    index = _fmix32(_mul32_(torch.arange(n, device=device, dtype=torch.int64), 0x9E3779B9) ^ 0x7F4A7C15)
    h = _fmix32(key.unsqueeze(1) ^ index.unsqueeze(0))  # (B, n) in [0, 2^32)
    # Top 23 bits -> (k + 0.5) / 2^23: exactly representable in float32, never 0 or 1.
    return (h >> 9).to(torch.float32).add_(0.5).mul_(1.0 / (1 << 23))


def _gumbel(seeds: torch.Tensor, steps: torch.Tensor, stream: int | torch.Tensor, n: int,
            device: torch.device) -> torch.Tensor:
    # Gumbel(0, 1) = -log(-log U); its largest value here is about 16.6 (U <= 1 - 2^-24).
    return keyed_uniform(seeds, steps, stream, n, device).log_().neg_().log_().neg_()  # (B, n)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]],
           seeds: Sequence[int] | torch.Tensor, steps: Sequence[int] | torch.Tensor,
           stream: int = STREAM_SAMPLE) -> torch.Tensor:
    """(B,) int64 next tokens. Greedy rows: argmax; others: Gumbel-max over the processed logits,
    with noise keyed by (seed, step = output position, stream), so argmax(x + g) ~ softmax(x)."""
    x = process_logits(logits, params, histories)  # (B, V)
    if all(p.temperature == 0.0 for p in params):
        return x.argmax(dim=-1)
    greedy = _greedy_mask(params, x.device)
    noise = _gumbel(seeds, steps, stream, x.shape[1], x.device)  # (B, V)
    noisy = torch.where(greedy.unsqueeze(1), x, x + noise)
    return noisy.argmax(dim=-1)


def in_step_sampling(params: SamplingParams) -> bool:
    """True when temperature is the request's only processor (no top-k / top-p / min-p / penalty, no
    logprobs): its token can then be drawn inside the model step, `sample_rows`, without host values."""
    return (params.top_k == 0 and params.top_p >= 1.0 and params.min_p == 0.0
            and params.repetition_penalty == 1.0 and getattr(params, "logprobs", None) is None)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                steps: torch.Tensor) -> torch.Tensor:
    """`sample` for rows whose only processor is the temperature, in tensor ops alone (no host values,
    fixed shapes: safe inside a CUDA graph). logits (B, V); temperature (B,) float32, 0 = greedy;
    seeds, steps (B,) int64. Bit for bit what `sample` draws for the same rows."""
    greedy = temperature == 0                                                   # (B,)
    x = logits.float() / torch.where(greedy, 1.0, temperature).unsqueeze(1)     # /1 is exact
    noise = _gumbel(seeds, steps, STREAM_SAMPLE, x.shape[1], x.device)          # (B, V)
    return torch.where(greedy.unsqueeze(1), x, x + noise).argmax(dim=-1)


# --- speculative acceptance -----------------------------------------------------------------------

def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                     seeds: Sequence[int] | torch.Tensor, steps: Sequence[int] | torch.Tensor,
                     num_drafts: Sequence[int] | torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify k drafted tokens per row against the target.

    target_probs (B, k+1, V) and draft_probs (B, k, V) are the distributions *after* each request's
    processors (`probabilities`), draft_tokens (B, k). Slot i of row b is output step steps[b] + i; its
    noise is keyed by that step, so verification is reproducible and independent of the batch.
    Returns (accepted (B,) int64 = draft tokens kept, tokens (B, k+1) int64 = the kept drafts then one
    corrected or bonus token, padded with -1). Greedy rows (one-hot p) reduce to the longest prefix equal
    to the target's argmax plus the target's next token; a one-hot q (n-gram drafts) needs nothing special.
    `num_drafts` (B,) lets row b use only its first num_drafts[b] <= k slots (the rest is padding): if
    it keeps them all, its bonus token comes from p at slot num_drafts[b].
    """
    B, k1, V = target_probs.shape
    k = k1 - 1
    if draft_probs.shape != (B, k, V) or draft_tokens.shape != (B, k):
        raise ValueError(f"rejection_sample: target_probs {tuple(target_probs.shape)} needs draft_probs "
                         f"{(B, k, V)} and draft_tokens {(B, k)}; got {tuple(draft_probs.shape)}, "
                         f"{tuple(draft_tokens.shape)}")
    dev = target_probs.device
    p = target_probs.float()
    q = draft_probs.float()
    seeds = _as_int64(seeds, dev)  # (B,)
    steps = _as_int64(steps, dev)  # (B,)
    slot_seeds = seeds.repeat_interleave(k)  # (B*k,) row-major: b, then slot
    slot_steps = (steps.unsqueeze(1) + torch.arange(k, device=dev)).reshape(-1)

    x = draft_tokens.long()  # (B, k)
    p_x = p[:, :k].gather(2, x.unsqueeze(2)).squeeze(2)  # (B, k)
    q_x = q.gather(2, x.unsqueeze(2)).squeeze(2)  # (B, k)
    # min(1, p/q); q(x) = 0 with p(x) > 0 cannot come from sampling q, but accepting is the limit.
    ratio = torch.where(q_x > 0, p_x / q_x.clamp(min=1e-38), torch.where(p_x > 0, math.inf, 0.0))
    u = keyed_uniform(slot_seeds, slot_steps, STREAM_ACCEPT, 1, dev).view(B, k)  # (B, k)
    accept = u < ratio  # u in (0, 1): p(x) >= q(x) always accepts, p(x) = 0 never does
    lens = torch.full((B,), k, device=dev) if num_drafts is None else _as_int64(num_drafts, dev)  # (B,)
    accept &= torch.arange(k, device=dev).unsqueeze(0) < lens.unsqueeze(1)  # padding slots never accept
    accepted = torch.cumprod(accept.long(), dim=1).sum(dim=1)  # (B,) leading accepts

    # The token after the accepted prefix: after a rejection at slot n, a draw from
    # norm(max(0, p_n - q_n)); after all of the row's drafts, a bonus draw from p_n.
    n = accepted
    bonus = n == lens  # (B,)
    p_n = p.gather(1, n.view(B, 1, 1).expand(B, 1, V)).squeeze(1)  # (B, V)
    q_pad = torch.cat([q, torch.zeros(B, 1, V, device=dev)], dim=1)  # (B, k+1, V)
    q_n = q_pad.gather(1, n.view(B, 1, 1).expand(B, 1, V)).squeeze(1)  # (B, V)
    residual = torch.where(bonus.unsqueeze(1), p_n, (p_n - q_n).clamp(min=0.0))
    # All-zero residual only if p == q up to rounding, where rejection had probability ~0: fall back to p.
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p_n)
    # The bonus token is an ordinary draw at its step, so it uses the plain sampling stream.
    stream = torch.where(bonus, STREAM_SAMPLE, STREAM_RESIDUAL)  # (B,)
    noise = _gumbel(seeds, steps + n, stream, V, dev)  # (B, V)
    last = (torch.log(residual) + noise).argmax(dim=1)  # (B,)

    slots = torch.arange(k1, device=dev).unsqueeze(0)  # (1, k+1)
    tokens = torch.cat([x, torch.zeros(B, 1, dtype=torch.long, device=dev)], dim=1)  # (B, k+1)
    tokens = torch.where(slots == n.unsqueeze(1), last.unsqueeze(1), tokens)
    tokens = tokens.masked_fill(slots > n.unsqueeze(1), -1)
    return accepted, tokens
