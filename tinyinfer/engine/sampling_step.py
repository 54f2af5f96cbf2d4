"""The sampling half of a plain (non-speculative) engine step: feed each sequence its new tokens through
the model runner, then draw one token for every sequence whose step reached the end of its tokens
(a prefill chunk short of the end draws nothing). Temperature-only requests are drawn inside the step
(in the decode CUDA graph on a GPU, `ModelRunner.execute_sampled`); the others through the full sampler
on the host, with their logprobs when asked. Both key the noise by (seed, output position), so a request
gets the same tokens either way (sampling/sampler.py; keyed randomness after Salmon et al., SC'11).
"""
from __future__ import annotations

import torch

from tinyinfer.engine.batch import StepBatch, build_batch
from tinyinfer.engine.model_runner import ModelRunner
from tinyinfer.engine.sequence import Sequence
from tinyinfer.sampling.sampler import in_step_sampling, process_logits, sample, token_logprobs


def run_step(runner: ModelRunner, seqs: list[Sequence], num_new: list[int]
             ) -> tuple[list[list[int] | None], list]:
    """Feed num_new[b] tokens each; sequences at their end sample one token (None: non-finite
    logits) and, where the request asks, get its Logprobs (a one-item list)."""
    batch = build_batch(seqs, num_new, runner.block_size)
    ends = [s.num_cached + n == len(s) for s, n in zip(seqs, num_new)]
    if any(ends) and all(in_step_sampling(s.params) for s, e in zip(seqs, ends) if e):
        return _sample_in_step(runner, seqs, num_new, ends, batch)
    logits = runner.execute(batch)                                                # (B, vocab)
    for s, n in zip(seqs, num_new):
        s.num_cached += n
    rows = [b for b, e in enumerate(ends) if e]
    out: list[list[int] | None] = [[] for _ in seqs]
    if not rows:
        return out, [None] * len(seqs)
    done = [seqs[b] for b in rows]
    logits = logits if len(rows) == len(seqs) else logits[rows]                    # (R, vocab)
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    params, hist = [s.params for s in done], [s.token_ids for s in done]
    tokens = sample(logits, params, hist, [s.seed for s in done],
                    [s.num_outputs for s in done]).tolist()
    logprobs: list = [None] * len(seqs)
    want = [i for i, s in enumerate(done) if s.params.logprobs is not None and finite[i]]
    if want:                                    # the distribution sample() drew from, again
        x = process_logits(logits[want], [params[i] for i in want], [hist[i] for i in want])
        lps = token_logprobs(x, [tokens[i] for i in want], [params[i].logprobs for i in want])
        for i, lp in zip(want, lps):
            logprobs[rows[i]] = [lp]
    for b, t, ok in zip(rows, tokens, finite):
        out[b] = [t] if ok else None
    return out, logprobs


def _sample_in_step(runner: ModelRunner, seqs: list[Sequence], num_new: list[int], ends: list[bool],
                    batch: StepBatch) -> tuple[list[list[int] | None], list]:
    """The model runner draws the tokens (inside the decode graph on a GPU): temperature-only
    requests, keyed by (seed, output position) exactly as `sample` keys them."""
    batch.sampling = ([s.params.temperature if e else 0.0 for s, e in zip(seqs, ends)],
                      [s.seed for s in seqs], [s.num_outputs for s in seqs])
    _, tokens, finite = runner.execute_sampled(batch)
    for s, n in zip(seqs, num_new):
        s.num_cached += n
    out = [([t] if ok else None) if e else []
           for t, ok, e in zip(tokens.tolist(), finite.tolist(), ends)]
    return out, [None] * len(seqs)
