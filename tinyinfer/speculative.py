"""Speculative decoding: a cheap proposer drafts up to k tokens, the target checks them in one pass.

One decode step for a batch (Leviathan et al., "Fast Inference from Transformers via Speculative
Decoding", 2023; Chen et al., "Accelerating LLM Decoding with Speculative Sampling", 2023):

    propose   d_b <= k draft tokens per sequence, with their distributions q (one-hot for n-gram drafts)
    verify    ONE target forward over [last token, d_1 .. d_db] per sequence (varlen, paged cache)
              -> target distributions p at the d_b + 1 positions
    accept    sampling.rejection_sample: keep d_i with probability min(1, p/q); at the first rejection
              draw from norm(max(0, p - q)); if all are kept draw a bonus token from p. The emitted
              tokens follow p exactly, so greedy output equals plain greedy decoding.
    rollback  Scheduler.truncate drops the rejected positions from the target cache (emptied blocks
              go back); the draft model's cache is cut to the accepted prefix and catches up next step.

Proposers: `DraftModelProposer` (a small model of the same vocabulary with its own paged cache) and
`NgramProposer` (prompt lookup, Saxena 2023: find the last n tokens earlier in the text and propose
what followed them -- no model at all). Both implement `Proposer`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Protocol

import torch

from tinyinfer import checkpoint as ckpt
from tinyinfer.config import ModelConfig
from tinyinfer.sampling import (STREAM_DRAFT, STREAM_SAMPLE, keyed_uniform, probabilities,
                                process_logits, rejection_sample)
from tinyinfer.scheduler import Sequence, Status

if TYPE_CHECKING:
    from tinyinfer.engine import LLM

MAX_K = 15      # verification feeds k + 1 <= 16 queries per sequence: the paged-attention kernel's range


def check_speculate_k(k: object) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ValueError(f"speculate_k={k!r} is invalid: use an integer from 1 to {MAX_K} "
                         f"(verification scores k + 1 <= 16 positions per sequence)")
    return k


def check_draft(draft: str, target: ModelConfig) -> None:
    """Validate a draft checkpoint before any weights load: it must exist and share the vocabulary."""
    if draft == "ngram":
        return
    files = ckpt.locate(draft)                   # CheckpointError if the path does not exist
    cfg = ModelConfig.from_hf(files.config, files.generation_config)
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(f"draft {draft!r} has a vocabulary of {cfg.vocab_size} tokens, the target "
                         f"{target.vocab_size}: a draft must use the target's tokenizer; pick a "
                         "draft from the same model family, or use draft='ngram'")


def _gumbel_argmax(probs: torch.Tensor, seeds: list[int], steps: list[int], stream: int) -> torch.Tensor:
    """(B,) draws from the rows of probs (B, V) with keyed noise; one-hot (greedy) rows give their argmax."""
    u = keyed_uniform(seeds, steps, stream, probs.shape[1], probs.device)          # (B, V)
    return (probs.log() - torch.log(-torch.log(u))).argmax(dim=1)


@dataclass
class Proposal:
    tokens: list[list[int]]             # per sequence, d_b <= k drafted tokens
    probs: Optional[torch.Tensor]       # (B, max d_b, V) draft distributions; None: deterministic


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], limits: list[int]) -> Proposal:
        """Draft at most limits[b] tokens after each sequence's current tokens."""

    def accepted(self, seqs: list[Sequence], lengths: list[int], num_accepted: list[int]) -> None:
        """The step is over: seqs[b] had lengths[b] tokens before it and kept num_accepted[b] drafts."""


class NgramProposer:
    """Prompt lookup: match the last n tokens (n = max_n .. 1) against the earlier text and propose
    the tokens that followed the most recent match. A deterministic draft: q is one-hot."""

    def __init__(self, max_n: int = 3):
        self.max_n = max_n

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        L = len(tokens)
        for n in range(min(self.max_n, L - 1), 0, -1):
            pattern = tokens[L - n:]
            # Most recent earlier occurrence whose continuation is non-empty (it ends before L).
            for start in range(L - n - 1, -1, -1):
                if tokens[start:start + n] == pattern:
                    return tokens[start + n:start + n + k]
        return []

    def propose(self, seqs: list[Sequence], limits: list[int]) -> Proposal:
        return Proposal([self.lookup(s.token_ids, k) if k > 0 else [] for s, k in zip(seqs, limits)],
                        None)

    def accepted(self, seqs: list[Sequence], lengths: list[int], num_accepted: list[int]) -> None:
        pass


class DraftModelProposer:
    """A small model run autoregressively k times. It keeps its own paged cache (an `LLM` of its own:
    model, allocator, block bookkeeping) with one shadow sequence per running target sequence."""

    def __init__(self, draft_llm: LLM):
        self.llm = draft_llm
        self.shadows: dict[int, Sequence] = {}      # target seq id -> its state in the draft cache

    def _release(self, seq_id: int) -> None:
        sh = self.shadows.pop(seq_id)
        self.llm.allocator.release(sh.block_table)

    def _sync(self, seqs: list[Sequence]) -> list[Sequence]:
        # Sequences outside this decode batch (finished, preempted, from an earlier call) give their
        # draft blocks back first; so the draft pool, as large as the target's, never runs dry.
        live = {s.id for s in seqs}
        for sid in [i for i in self.shadows if i not in live]:
            self._release(sid)
        out = []
        for s in seqs:
            sh = self.shadows.get(s.id)
            if sh is None:
                sh = self.shadows[s.id] = Sequence(s.prompt_ids, s.params, s.seed)
            sh.token_ids = list(s.token_ids)        # the cached prefix always agrees with s
            out.append(sh)
        return out

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], limits: list[int]) -> Proposal:
        shadows = self._sync(seqs)
        bs = self.llm.block_size
        for sh, k in zip(shadows, limits):
            if k > 0:                               # it will cache its tokens + drafts 1 .. k-1
                sh.block_table += self.llm.allocator.allocate(sh.blocks_needed(len(sh) + k - 1, bs))
        kmax = max(limits)
        V = self.llm.config.vocab_size
        # Greedy requests draft their argmax: q is one-hot, which verify() assumes when probs is None.
        greedy = all(s.params.greedy for s in seqs)
        q = None if greedy else torch.zeros(len(seqs), kmax, V, device=self.llm.device)  # (B, kmax, V)
        tokens: list[list[int]] = [[] for _ in seqs]
        for j in range(kmax):
            act = [b for b, k in enumerate(limits) if k > j]
            # First pass: catch up on everything not yet cached (the last accepted tokens, or the whole
            # prompt after a prefill / preemption); later passes: the previous draft token.
            num_new = [len(shadows[b]) - shadows[b].num_cached for b in act]
            logits = self.llm._forward([shadows[b] for b in act], num_new)         # (A, V)
            params, hist = [seqs[b].params for b in act], [shadows[b].token_ids for b in act]
            if greedy:
                x = process_logits(logits, params, hist).argmax(dim=1).tolist()
            else:
                probs = probabilities(logits, params, hist)                         # (A, V)
                x = _gumbel_argmax(probs, [seqs[b].seed for b in act],
                                   [seqs[b].num_outputs + j for b in act], STREAM_DRAFT).tolist()
                q[act, j] = probs
            for b, t in zip(act, x):
                tokens[b].append(t)
                shadows[b].token_ids.append(t)
        return Proposal(tokens, q)

    def accepted(self, seqs: list[Sequence], lengths: list[int], num_accepted: list[int]) -> None:
        for s, L, n in zip(seqs, lengths, num_accepted):
            if s.status is Status.FINISHED:
                self._release(s.id)
            else:                                   # keep the cached prefix that the target kept
                sh = self.shadows[s.id]
                self.llm.scheduler.truncate(sh, min(sh.num_cached, L + n))


class Speculator:
    """Runs the decode steps of an `LLM` speculatively (the engine still does the prefill)."""

    def __init__(self, llm: LLM, proposer: Proposer, k: int):
        self.llm, self.proposer, self.k = llm, proposer, check_speculate_k(k)
        self.graphs = None                          # GraphRunner for the verify step (CUDA only)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.proposed = self.accepted = self.emitted = self.seq_steps = self.steps = 0

    def figures(self) -> dict:
        return {"speculate_k": self.k,
                "acceptance_rate": round(self.accepted / max(1, self.proposed), 4),
                "tokens_per_target_step": round(self.emitted / max(1, self.seq_steps), 3)}

    def limits(self, seqs: list[Sequence]) -> list[int]:
        # Never draft past max_tokens: a step emits at most d + 1 tokens (this also keeps every
        # verified position inside the model's context, which _make_sequence checked).
        return [max(0, min(self.k, s.params.max_tokens - s.num_outputs - 1)) for s in seqs]

    def step(self, seqs: list[Sequence], on_token: Optional[Callable[[Sequence], None]]) -> None:
        llm = self.llm
        prop = self.proposer.propose(seqs, self.limits(seqs))
        d = [len(t) for t in prop.tokens]
        lengths = [len(s) for s in seqs]
        for s, t in zip(seqs, prop.tokens):
            s.token_ids.extend(t)                   # temporarily: the verify pass reads them
        try:
            logits = self._verify_forward(seqs, [n + 1 for n in d])                 # (T, V)
        finally:
            for s, L in zip(seqs, lengths):
                del s.token_ids[L:]
        accepted, tokens = self.verify(seqs, prop, logits)
        finite = self._finite_rows(logits, d)
        for b, s in enumerate(seqs):
            n = accepted[b]
            # The target cache keeps the sequence so far + the n accepted drafts; the token that ends
            # this run is new (not cached yet), exactly as after a plain decode step.
            llm.scheduler.truncate(s, lengths[b] + n)
            if not finite[b]:
                from tinyinfer.engine import RequestError
                llm.scheduler.finish(s, "error", RequestError(
                    f"request {s.id}: the model produced NaN/inf logits at output position "
                    f"{s.num_outputs}; the request was stopped (its KV blocks were freed)"))
                continue
            self.proposed, self.accepted, self.seq_steps = (self.proposed + d[b],
                                                            self.accepted + n, self.seq_steps + 1)
            for tok in tokens[b][:n + 1]:
                llm._append(s, tok)                 # checks eos / stop strings / max_tokens
                self.emitted += 1
                if on_token is not None:
                    on_token(s)
                if s.status is Status.FINISHED:     # nothing after a stop is emitted
                    break
        self.steps += 1
        self.proposer.accepted(seqs, lengths, accepted)

    def _verify_forward(self, seqs: list[Sequence], num_new: list[int]) -> torch.Tensor:
        # On a GPU the engine replays decode from CUDA graphs; verification gets graphs of its own,
        # k + 1 query rows per sequence (shorter drafts leave padding rows), sharing the memory pool.
        if self.llm.graph_runner is not None and self.graphs is None:
            from tinyinfer.cuda_graphs import GraphRunner
            self.graphs = GraphRunner(self.llm.model, self.llm.kv, q_len=self.k + 1,
                                      pool=self.llm.graph_runner.pool)
        if self.graphs is not None and self.graphs.can_run(seqs, num_new):
            logits = self.graphs.run(seqs, num_new)                                 # (T, V)
            for s, n in zip(seqs, num_new):
                s.num_cached += n
            return logits
        return self.llm._forward(seqs, num_new, all_logits=True)

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
            bonus = _gumbel_argmax(p_last, [seeds[b] for b in short],
                                   [steps[b] + d[b] for b in short], STREAM_SAMPLE).tolist()
            for b, t in zip(short, bonus):
                accepted[b] = d[b]
                tokens[b][d[b]] = t
        return accepted, tokens

    @staticmethod
    def _finite_rows(logits: torch.Tensor, d: list[int]) -> list[bool]:
        ok = torch.isfinite(logits).all(dim=1)                                        # (T,)
        sizes = torch.tensor([n + 1 for n in d], device=logits.device)
        seq_idx = torch.repeat_interleave(torch.arange(len(d), device=logits.device), sizes)
        bad = torch.zeros(len(d), dtype=torch.long, device=logits.device)
        return (bad.index_add_(0, seq_idx, (~ok).long()) == 0).tolist()


def build(llm: LLM, draft: str, k: int) -> Speculator:
    """The speculator for `llm`: n-gram lookup, or a draft model with a pool as large as the target's."""
    if draft == "ngram":
        return Speculator(llm, NgramProposer(), k)
    from tinyinfer.engine import LLM
    from tinyinfer.tokenizer import Tokenizer
    tok, mine = Tokenizer.from_dir(ckpt.locate(draft).tokenizer_dir), llm.tokenizer
    differ = next((i for i in range(min(tok.vocab_size, mine.vocab_size))
                   if tok.id_to_piece(i) != mine.id_to_piece(i)), None)
    if tok.vocab_size != mine.vocab_size or differ is not None:
        where = (f"{tok.vocab_size} vs {mine.vocab_size} pieces" if differ is None else
                 f"token {differ} is {tok.id_to_piece(differ)!r} vs {mine.id_to_piece(differ)!r}")
        raise ValueError(f"draft {draft!r} uses another tokenizer than the target ({where}); a "
                         "draft must share the target's vocabulary, or use draft='ngram'")
    draft_llm = LLM(draft, device=str(llm.device), dtype=llm.dtype, max_kv_tokens=llm.kv_tokens,
                    cuda_graphs=llm.graph_runner is not None,
                    block_size=llm.block_size)
    return Speculator(llm, DraftModelProposer(draft_llm), k)
