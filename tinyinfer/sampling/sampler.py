"""Drawing tokens, in one place: greedy (argmax), keyed Gumbel-max sampling over the processed logits
(sampling/processors.py), the in-step variant for temperature-only requests (safe inside a CUDA graph),
draws from a given distribution (a draft model's proposals, a bonus token), the speculative acceptance
rule, and the check that a row of logits is finite.

Randomness is *keyed*, not stateful: the noise for a request is a pure function of (seed, output
position, stream, vocab index) computed by a counter-based integer hash (the idea behind Philox /
Random123, Salmon et al., SC'11), so a seeded request draws the same tokens alone, in any batch and after
preemption. `rejection_sample` is speculative decoding's acceptance rule (Leviathan et al. 2023, Chen et
al. 2023): accept draft token x with probability min(1, p(x)/q(x)); at the first rejection draw from
norm(max(0, p - q)); if all k are accepted draw a bonus token from p. The emitted tokens follow p exactly.
`rejection_sample_one_hot` is the same rule for deterministic drafts (q one-hot), from the logits alone.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from tinyinfer.sampling.params import SamplingParams
from tinyinfer.sampling.processors import greedy_mask, process_logits

# Streams of keyed randomness: one purpose each, so no two decisions at the same (seed, step) share noise.
STREAM_SAMPLE = 0    # plain sampling (and the bonus token of a fully accepted speculative run)
STREAM_DRAFT = 1     # the draft model sampling its proposals
STREAM_ACCEPT = 2    # the accept/reject uniform of each draft slot
STREAM_RESIDUAL = 3  # the draw from norm(max(0, p - q)) after a rejection

_MASK32 = 0xFFFFFFFF


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
    greedy = greedy_mask(params, x.device)
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


def sample_in_step(logits: torch.Tensor, keys: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   sync: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The token each row draws inside a model step, and whether its logits were finite: (tokens (B,)
    int64, finite (B,) bool). keys: `sample_rows`' (temperature, seeds, steps), or None when every row
    is greedy (decided on the host), which skips the noise. sync=False inside a CUDA graph."""
    tokens = logits.argmax(dim=-1) if keys is None else sample_rows(logits, *keys)
    return tokens, finite_rows(logits, sync)


def gumbel_argmax(probs: torch.Tensor, seeds: Sequence[int] | torch.Tensor,
                  steps: Sequence[int] | torch.Tensor, stream: int | torch.Tensor) -> torch.Tensor:
    """(B,) draws from the rows of a distribution probs (B, V): argmax(log p + keyed Gumbel noise) (a
    draft model's proposals, a bonus or corrected token); one-hot (greedy) rows give their argmax."""
    return (torch.log(probs) + _gumbel(seeds, steps, stream, probs.shape[1], probs.device)).argmax(dim=1)


def finite_rows(logits: torch.Tensor, sync: bool = True) -> torch.Tensor:
    """(B,) bool: which rows of logits (B, V) hold no NaN / inf -- a row that does draws no token. With
    sync (the host may wait) one sum first: a NaN or an inf anywhere makes it non-finite, so a finite sum
    settles every row (the common case) in one pass; sync=False for a CUDA graph."""
    if sync and bool(torch.isfinite(logits.sum())):
        return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    return torch.isfinite(logits).all(dim=-1)


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
    last = gumbel_argmax(residual, seeds, steps + n, stream)  # (B,)

    slots = torch.arange(k1, device=dev).unsqueeze(0)  # (1, k+1)
    tokens = torch.cat([x, torch.zeros(B, 1, dtype=torch.long, device=dev)], dim=1)  # (B, k+1)
    tokens = torch.where(slots == n.unsqueeze(1), last.unsqueeze(1), tokens)
    tokens = tokens.masked_fill(slots > n.unsqueeze(1), -1)
    return accepted, tokens


def rejection_sample_one_hot(x: torch.Tensor, starts: Sequence[int], drafts: Sequence[Sequence[int]],
                             greedy: Sequence[bool], seeds: Sequence[int], steps: Sequence[int]
                             ) -> tuple[list[int], list[list[int]]]:
    """`rejection_sample` for deterministic drafts (q one-hot: n-gram and suffix drafts), on the flat
    verify layout, without building p or q: x (T, V) processed logits, sequence b owning rows
    starts[b] .. starts[b] + len(drafts[b]). With q(x) = 1 the rule reads: keep draft x_j when
    u_j < p_j(x_j) = exp(x_j[x_j] - logsumexp(x_j)) (u_j the same keyed uniform, STREAM_ACCEPT, step
    steps[b] + j); after a rejection at n draw from norm(max(0, p_n - q_n)) = p_n without x_n (x_n's
    logit to -inf), else the bonus from p_n -- Gumbel-max over the logits themselves, which softmax
    does not change. Greedy rows keep the drafts equal to the argmax and end with the argmax. Returns
    per sequence the drafts kept and the tokens to emit (kept drafts + the corrected / bonus token)."""
    dev, V = x.device, x.shape[1]
    rows = [(b, j) for b, d in enumerate(drafts) for j in range(len(d))]
    best = x.argmax(dim=1).tolist() if any(greedy) else None                       # (T,)
    kept = [True] * len(rows)
    sampled = [i for i, (b, _) in enumerate(rows) if not greedy[b]]
    if sampled:
        r = torch.tensor([starts[rows[i][0]] + rows[i][1] for i in sampled], device=dev)
        tok = torch.tensor([drafts[rows[i][0]][rows[i][1]] for i in sampled], device=dev)
        p_x = (x[r, tok] - torch.logsumexp(x[r], dim=1)).exp()                   # (R,)
        u = keyed_uniform(_as_int64([seeds[rows[i][0]] for i in sampled], dev),
                          _as_int64([steps[rows[i][0]] + rows[i][1] for i in sampled], dev),
                          STREAM_ACCEPT, 1, dev).view(-1)
        for i, ok in zip(sampled, (u < p_x).tolist()):
            kept[i] = ok
    for i, (b, j) in enumerate(rows):
        if greedy[b]:
            kept[i] = drafts[b][j] == best[starts[b] + j]
    accepted = [0] * len(drafts)
    i = 0
    for b, d in enumerate(drafts):
        while accepted[b] < len(d) and kept[i + accepted[b]]:
            accepted[b] += 1
        i += len(d)
    tokens = [list(d[:n]) + [best[starts[b] + n] if greedy[b] else -1]
              for b, (d, n) in enumerate(zip(drafts, accepted))]
    draw = [b for b in range(len(drafts)) if not greedy[b]]
    if draw:
        last = x[[starts[b] + accepted[b] for b in draw]].float()                # (S, V)
        for i, b in enumerate(draw):
            if accepted[b] < len(drafts[b]):
                last[i, drafts[b][accepted[b]]] = -math.inf
        stream = _as_int64([STREAM_SAMPLE if accepted[b] == len(drafts[b]) else STREAM_RESIDUAL
                            for b in draw], dev)
        noise = _gumbel(_as_int64([seeds[b] for b in draw], dev),
                        _as_int64([steps[b] + accepted[b] for b in draw], dev), stream, V, dev)
        for b, t in zip(draw, (last + noise).argmax(dim=1).tolist()):
            tokens[b][-1] = t
    return accepted, tokens
