"""The execute half of a plain (non-speculative) engine step: feed each sequence its new tokens through
the model runner, then draw one token for every sequence whose step reached the end of its tokens (a
prefill chunk short of the end draws nothing). Temperature-only requests are drawn inside the step (in
the decode CUDA graph on a GPU, `ModelRunner.execute_sampled`); the others through the full sampler on
the host, with their logprobs when asked. Both key the noise by (seed, output position), so a request
gets the same tokens either way (sampling/sampler.py). A structured request (engine/grammar.py) is
drawn on the host: its grammar's mask, computed while the forward runs, sets the logits of the tokens
it forbids to -inf before every other sampler step. `StepOutput` is what a step hands the engine per
sequence, here and in speculative decoding (engine/speculative.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tinyinfer.config.errors import RequestError
from tinyinfer.engine.batch import StepBatch, build_batch
from tinyinfer.engine.model_runner import ModelRunner
from tinyinfer.engine.sequence import Sequence
from tinyinfer.sampling.processors import Logprobs, process_logits, token_logprobs
from tinyinfer.sampling.sampler import finite_rows, in_step_sampling, sample


@dataclass
class StepOutput:
    """One sequence's result of a step."""
    tokens: list[int] = field(default_factory=list)   # new tokens; none for a prompt chunk short of its end
    logprobs: Optional[list[Logprobs]] = None          # one per token, where the request asks
    error: Optional[RequestError] = None               # non-finite logits: no token, the request ends


def nonfinite(seq: Sequence) -> StepOutput:
    return StepOutput(error=RequestError(
        f"request {seq.request_id}: the model produced NaN/inf logits at output position "
        f"{seq.num_outputs}; the request was stopped (its KV blocks were freed)"))


def run_step(runner: ModelRunner, seqs: list[Sequence], num_new: list[int]) -> list[StepOutput]:
    """Feed num_new[b] tokens each; sequences at their end draw one token (with its Logprobs where the
    request asks)."""
    batch = build_batch(seqs, num_new, runner.block_size)
    ends = [s.num_cached + n == len(s) for s, n in zip(seqs, num_new)]
    if any(ends) and all(in_step_sampling(s.params) and s.matcher is None
                         for s, e in zip(seqs, ends) if e):
        return _sample_in_step(runner, seqs, num_new, ends, batch)
    constrained = [b for b, (s, e) in enumerate(zip(seqs, ends)) if e and s.matcher is not None]
    masks = (seqs[constrained[0]].matcher.owner.start_masks([seqs[b].matcher for b in constrained])
             if constrained else None)                                            # during the forward
    logits = runner.execute(batch)                                                # (B, vocab)
    for s, n in zip(seqs, num_new):
        s.advance(n)
    out = [StepOutput() for _ in seqs]
    rows = [b for b, e in enumerate(ends) if e]
    if not rows:
        return out
    done = [seqs[b] for b in rows]
    logits = logits if len(rows) == len(seqs) else logits[rows]                    # (R, vocab)
    finite = finite_rows(logits).tolist()
    if masks is not None:                       # before every other sampler step (and the logprobs)
        logits = logits.clone() if len(rows) == len(seqs) else logits   # never a graph's own buffer
        masks.apply(logits, [rows.index(b) for b in constrained])
    params, hist = [s.params for s in done], [s.token_ids for s in done]
    tokens = sample(logits, params, hist, [s.seed for s in done],
                    [s.num_outputs for s in done]).tolist()
    for b, t, ok in zip(rows, tokens, finite):
        out[b] = StepOutput([t]) if ok else nonfinite(seqs[b])
    want = [i for i, s in enumerate(done) if s.params.logprobs is not None and finite[i]]
    if want:                                    # the distribution sample() drew from, again
        x = process_logits(logits[want], [params[i] for i in want], [hist[i] for i in want])
        lps = token_logprobs(x, [tokens[i] for i in want], [params[i].logprobs for i in want])
        for i, lp in zip(want, lps):
            out[rows[i]].logprobs = [lp]
    return out


def _sample_in_step(runner: ModelRunner, seqs: list[Sequence], num_new: list[int], ends: list[bool],
                    batch: StepBatch) -> list[StepOutput]:
    """The model runner draws the tokens (inside the decode graph on a GPU): temperature-only
    requests, keyed by (seed, output position) exactly as `sample` keys them."""
    batch.sampling = ([s.params.temperature if e else 0.0 for s, e in zip(seqs, ends)],
                      [s.seed for s in seqs], [s.num_outputs for s in seqs])
    _, tokens, finite = runner.execute_sampled(batch)
    for s, n in zip(seqs, num_new):
        s.advance(n)
    return [(StepOutput([t]) if ok else nonfinite(s)) if e else StepOutput()
            for s, t, ok, e in zip(seqs, tokens.tolist(), finite.tolist(), ends)]
