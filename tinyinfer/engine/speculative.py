"""Speculative decoding: a cheap proposer drafts up to k tokens, the target checks them in one pass.

One decode step for a batch (Leviathan et al., "Fast Inference from Transformers via Speculative
Decoding", 2023; Chen et al., "Accelerating LLM Decoding with Speculative Sampling", 2023):

    propose   d_b <= k draft tokens per sequence, with their distributions q (one-hot for n-gram drafts)
    verify    ONE target forward over [last token, d_1 .. d_db] per sequence (varlen, paged cache)
              -> target distributions p at the d_b + 1 positions
    accept    sampling/sampler.rejection_sample: keep d_i with probability min(1, p/q); at the first
              rejection draw from norm(max(0, p - q)); if all are kept draw a bonus token from p. The
              emitted tokens follow p exactly, so greedy output equals plain greedy decoding.
    rollback  BlockManager.truncate drops the rejected positions from the target cache (emptied blocks
              go back); the draft model's cache is cut to the accepted prefix and catches up next step.

The speculator uses the target's model runner and block manager, never the engine; it returns the
tokens each sequence emits, and the engine appends them one by one (stop conditions included).
Proposers: engine/proposers.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from tinyinfer.config.model import ModelConfig

from tinyinfer.engine.batch import build_batch
from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.engine.model_runner import ModelRunner
from tinyinfer.engine.mtp_proposer import MTPProposer
from tinyinfer.engine.proposers import (DraftModelProposer, NgramProposer, Proposal, Proposer,
                                        check_draft, check_same_tokenizer)
from tinyinfer.engine.sampling_step import StepOutput, nonfinite, run_step
from tinyinfer.engine.scheduler import ScheduledStep
from tinyinfer.engine.sequence import Sequence
from tinyinfer.engine.suffix_proposer import SuffixProposer
from tinyinfer.loading import checkpoint as ckpt
from tinyinfer.loading.mtp import check_mtp, load_mtp
from tinyinfer.loading.tokenizer import Tokenizer
from tinyinfer.ops.limits import MAX_SPECULATE_K
from tinyinfer.sampling.processors import probabilities, process_logits, token_logprobs
from tinyinfer.sampling.sampler import (STREAM_SAMPLE, finite_rows, gumbel_argmax, rejection_sample,
                                        rejection_sample_one_hot)


def make_proposer(draft: str, engine, use_graphs: bool, files: ckpt.CheckpointFiles) -> Proposer:
    """The proposer `draft` names for `engine` (an LLMEngine, set up, loaded from `files`): "ngram",
    "suffix", "mtp", or a draft checkpoint's path. (The engine keeps no CheckpointFiles: a GGUF's
    would keep the whole file mapped, ~95 MiB of RSS for SmolLM2.)"""
    if draft == "ngram":
        return NgramProposer()
    if draft == "suffix":           # a verified token costs little beside a step on a GPU
        return SuffixProposer(per_token=0.15 if engine.device.type == "cpu" else 0.02)
    if draft == "mtp":              # the target's own MTP layer; its passes run eagerly (the CUDA
        engine.runner.graphs.clear()    # graphs do not hand out the hidden states it reads)
        return MTPProposer(engine.runner, load_mtp(files, engine.config, engine.runner.model,
                                                   engine.dtype, engine.device))
    files = ckpt.locate(draft)                      # the draft's own files from here on
    check_same_tokenizer(draft, Tokenizer.for_checkpoint(files), engine.tokenizer)
    cfg = ModelConfig.from_hf(files.config, files.generation_config)
    # The draft's pool is as large as the target's and prefix-cached as it is; when it is still
    # short, a sequence is not drafted for that step (engine/proposers.py).
    runner = ModelRunner.load(files, cfg, engine.device, engine.dtype, None, engine.kv_tokens,
                              engine.block_size, use_graphs, engine.runner.graph_pool,
                              kv_cache_dtype=engine.kv_cache_dtype)
    return DraftModelProposer(runner, engine.blocks.enable_caching)


def check_draft_option(draft: Optional[str], files: ckpt.CheckpointFiles, cfg: ModelConfig,
                       tensor_parallel_size: int = 1) -> None:
    """Refuse a draft that cannot work, before any weights load: a draft checkpoint that is missing or
    has another vocabulary, or draft="mtp" for a checkpoint without MTP layers or across ranks."""
    if draft == "mtp":
        if tensor_parallel_size != 1:
            raise ValueError("draft='mtp' runs on one device: use tensor_parallel_size=1, or another draft")
        check_mtp(files, cfg)
    elif draft not in (None, "ngram", "suffix"):
        check_draft(draft, cfg)


def check_speculate_k(k: object) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATE_K:
        raise ValueError(f"speculate_k={k!r} is invalid: use an integer from 1 to {MAX_SPECULATE_K} "
                         f"(verification scores k + 1 <= {MAX_SPECULATE_K + 1} positions per sequence)")
    return k


class Speculator:
    """Runs the decode steps of an engine speculatively (the engine still does the prefill)."""

    def __init__(self, runner: ModelRunner, blocks: BlockManager, proposer: Proposer, k: int):
        self.runner, self.blocks, self.proposer, self.k = runner, blocks, proposer, check_speculate_k(k)
        # On a GPU, verification replays graphs of k + 1 query rows per sequence (shorter drafts
        # leave padding rows), sharing the decode graphs' memory pool.
        runner.enable_verify_graphs(k + 1)
        self.drafted_total = self.accepted_total = 0    # since creation (reset_stats keeps them)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.proposed = self.accepted = self.emitted = self.seq_steps = self.steps = 0
        self.drafts: dict[int, int] = {}            # draft length d -> sequence-steps that drafted d

    def figures(self) -> dict:
        return {"speculate_k": self.k,
                "acceptance_rate": round(self.accepted / max(1, self.proposed), 4),
                "tokens_per_target_step": round(self.emitted / max(1, self.seq_steps), 3)}

    def limits(self, seqs: list[Sequence]) -> list[int]:
        # Never draft past max_tokens: a step emits at most d + 1 tokens (this also keeps every
        # verified position inside the model's context, which add_request checked).
        return [max(0, min(self.k, s.params.max_tokens - s.num_outputs - 1)) for s in seqs]

    def counts(self) -> dict:
        """Draft tokens proposed and accepted since creation (the engine's stats, /metrics)."""
        return {"spec_draft_tokens": self.drafted_total, "spec_accepted_tokens": self.accepted_total}

    def forget(self, seq: Sequence) -> None:
        self.proposer.forget(seq)

    def propose(self, seqs: list[Sequence]) -> Proposal:
        """This step's drafts. When nobody drafts (an adaptive proposer chose d = 0 for all) the engine
        runs a plain step instead of a verify pass, and reports it with `plain_step`."""
        return self.proposer.propose(seqs, self.limits(seqs))

    def plain_step(self, seqs: list[Sequence]) -> None:
        self.seq_steps, self.emitted, self.steps = (self.seq_steps + len(seqs),
                                                    self.emitted + len(seqs), self.steps + 1)
        self.drafts[0] = self.drafts.get(0, 0) + len(seqs)

    def execute(self, work: ScheduledStep) -> list[StepOutput]:
        """One engine step's execute half, in work.seqs' order: the decodes' drafts verified in one
        varlen pass, the prefill chunks in another; when nobody drafts (an adaptive proposer chose
        d = 0 for all), one plain step for all of them, with no verify pass."""
        prop = self.propose(work.decodes) if work.decodes else None
        if prop is None or not any(prop.tokens):
            if work.decodes:
                self.plain_step(work.decodes)
            return self._observed(work.seqs, run_step(self.runner, work.seqs, work.num_new))
        out = self.step(work.decodes, prop)
        if work.prefills:
            out += self._observed(work.prefills, run_step(self.runner, work.prefills, work.chunks))
        return out

    def _observed(self, seqs: list[Sequence], out: list[StepOutput]) -> list[StepOutput]:
        """Hand a proposer that reads the target's hidden states (MTP) those of the pass just run."""
        observe = getattr(self.proposer, "observe", None)
        if observe is not None:
            observe(seqs, self.runner.last_batch, self.runner.last_hidden)
        return out

    def step(self, seqs: list[Sequence], prop: Optional[Proposal] = None) -> list[StepOutput]:
        """One speculative decode step (a sequence without drafts is a verify of 0 drafts): per
        sequence, the tokens to emit (the kept drafts, then the corrected or bonus token) with their
        Logprobs where the request asks, or the error where the target's logits were not finite."""
        prop = self.propose(seqs) if prop is None else prop
        d = [len(t) for t in prop.tokens]
        lengths = [len(s) for s in seqs]
        num_new = [n + 1 for n in d]
        for s, t in zip(seqs, prop.tokens):
            s.token_ids.extend(t)                   # temporarily: the verify pass reads them
        try:
            batch = build_batch(seqs, num_new, self.runner.block_size)
        finally:
            for s, L in zip(seqs, lengths):
                del s.token_ids[L:]
        logits = self.runner.execute(batch, all_logits=True)                         # (T, V)
        self._observed(seqs, [])
        for s, n in zip(seqs, num_new):
            s.advance(n)
        accepted, tokens = self.verify(seqs, prop, logits)
        finite = self._finite_seqs(logits, d)
        out: list[StepOutput] = []
        for b, s in enumerate(seqs):
            n = accepted[b]
            # The target cache keeps the sequence so far + the n accepted drafts; the token that ends
            # this run is new (not cached yet), exactly as after a plain decode step.
            self.blocks.truncate(s, lengths[b] + n)
            if not finite[b]:
                out.append(nonfinite(s))
                continue
            self.proposed, self.accepted, self.seq_steps = (self.proposed + d[b],
                                                            self.accepted + n, self.seq_steps + 1)
            self.emitted += n + 1
            self.drafted_total, self.accepted_total = self.drafted_total + d[b], self.accepted_total + n
            self.drafts[d[b]] = self.drafts.get(d[b], 0) + 1
            out.append(StepOutput(tokens[b][:n + 1]))
        self.steps += 1
        self.proposer.accepted(seqs, lengths, accepted)
        self.logprobs(seqs, prop, logits, out)
        return out

    @staticmethod
    def logprobs(seqs: list[Sequence], prop: Proposal, logits: torch.Tensor, out: list[StepOutput]) -> None:
        """Fill in the Logprobs of each emitted token under the target's processed distribution at its
        position (row j of sequence b: after its tokens + drafts 1..j), for the requests that ask."""
        want = [b for b, s in enumerate(seqs) if s.params.logprobs is not None and out[b].error is None]
        if not want:
            return
        starts = [0]
        for t in prop.tokens:
            starts.append(starts[-1] + len(t) + 1)
        rows = [(b, j) for b in want for j in range(len(out[b].tokens))]
        x = process_logits(logits[[starts[b] + j for b, j in rows]], [seqs[b].params for b, _ in rows],
                           [seqs[b].token_ids + prop.tokens[b][:j] for b, j in rows])   # (R, V)
        lps = token_logprobs(x, [out[b].tokens[j] for b, j in rows],
                             [seqs[b].params.logprobs for b, _ in rows])
        for (b, _), lp in zip(rows, lps):
            out[b].logprobs = (out[b].logprobs or []) + [lp]

    def verify(self, seqs: list[Sequence], prop: Proposal, logits: torch.Tensor
               ) -> tuple[list[int], list[list[int]]]:
        """Acceptance by rejection sampling. Returns per sequence the number of drafts kept and the
        tokens to emit (kept drafts, then the corrected or bonus token)."""
        dev = logits.device
        d = [len(t) for t in prop.tokens]
        B, kmax, V = len(seqs), max(d), logits.shape[1]
        starts = [0]
        for n in d:
            starts.append(starts[-1] + n + 1)
        # Slot j of sequence b is the distribution after its tokens + drafts 1..j; the repetition
        # penalty needs that history, other requests skip building it.
        rows = [(b, j) for b in range(B) for j in range(d[b] + 1)]
        params = [seqs[b].params for b, _ in rows]
        hist = [seqs[b].token_ids + prop.tokens[b][:j] if seqs[b].params.repetition_penalty != 1.0
                else [] for b, j in rows]
        if all(p.greedy for p in params):
            # One-hot p: rejection sampling reduces to the longest prefix equal to the target's argmax
            # plus the target's next token -- no distributions, no noise.
            best = process_logits(logits, params, hist).argmax(dim=1).tolist()        # (T,)
            accepted, tokens = [], []
            for b, drafts in enumerate(prop.tokens):
                row, n = best[starts[b]:starts[b + 1]], 0
                while n < d[b] and drafts[n] == row[n]:
                    n += 1
                accepted.append(n)
                tokens.append(drafts[:n] + [row[n]])
            return accepted, tokens
        if prop.probs is None:      # deterministic drafts: the one-hot rule, no p or q tensors built
            return rejection_sample_one_hot(process_logits(logits, params, hist), starts[:-1], prop.tokens,
                                            [s.params.greedy for s in seqs], [s.seed for s in seqs],
                                            [s.num_outputs for s in seqs])
        p_flat = probabilities(logits, params, hist)                                  # (T, V)
        idx = [[starts[b] + min(j, d[b]) for j in range(kmax + 1)] for b in range(B)]
        p = p_flat[torch.tensor(idx, device=dev)]                                     # (B, kmax+1, V)
        x = torch.tensor([t + [0] * (kmax - len(t)) for t in prop.tokens], dtype=torch.long,
                         device=dev).view(B, kmax)                                    # (B, kmax)
        q = prop.probs if prop.probs is not None else \
            torch.nn.functional.one_hot(x, V).float()                                 # (B, kmax, V)
        seeds = [s.seed for s in seqs]
        steps = [s.num_outputs for s in seqs]
        acc, toks = rejection_sample(p, q, x, seeds, steps)
        accepted, tokens = acc.tolist(), toks.tolist()
        # Rows that drafted fewer than kmax and kept them all end with a bonus token from p at slot
        # d_b, drawn with the noise rejection_sample uses for a bonus at that step.
        short = [b for b in range(B) if d[b] < kmax and accepted[b] >= d[b]]
        if short:
            p_last = p[short, [d[b] for b in short]]                                  # (S, V)
            bonus = gumbel_argmax(p_last, [seeds[b] for b in short],
                                  [steps[b] + d[b] for b in short], STREAM_SAMPLE).tolist()
            for b, t in zip(short, bonus):
                accepted[b] = d[b]
                tokens[b][d[b]] = t
        return accepted, tokens

    @staticmethod
    def _finite_seqs(logits: torch.Tensor, d: list[int]) -> list[bool]:
        """Per sequence: all d_b + 1 of its rows finite."""
        ok = finite_rows(logits)                                                      # (T,)
        sizes = torch.tensor([n + 1 for n in d], device=logits.device)
        seq_idx = torch.repeat_interleave(torch.arange(len(d), device=logits.device), sizes)
        bad = torch.zeros(len(d), dtype=torch.long, device=logits.device)
        return (bad.index_add_(0, seq_idx, (~ok).long()) == 0).tolist()
