"""Draft proposers for speculative decoding: who guesses the next k tokens cheaply.

`NgramProposer` is prompt lookup (Saxena, "Prompt Lookup Decoding", 2023): find the last n tokens
earlier in the text and propose what followed them -- no model at all. `DraftModelProposer` runs a small
model of the same vocabulary autoregressively (Leviathan et al., 2023; Chen et al., 2023) through its own
model runner and block manager: one shadow sequence per target sequence, whose cache catches up on
whatever the target accepted. Both implement `Proposer`; engine/speculative.py verifies the drafts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from tinyinfer.config.model import ModelConfig
from tinyinfer.engine.batch import build_batch
from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.engine.model_runner import ModelRunner
from tinyinfer.engine.sequence import Sequence
from tinyinfer.loading import checkpoint as ckpt
from tinyinfer.loading.tokenizer import Tokenizer
from tinyinfer.sampling.processors import probabilities, process_logits
from tinyinfer.sampling.sampler import STREAM_DRAFT, gumbel_argmax



def draw_drafts(logits: torch.Tensor, seqs: list[Sequence], hist: list[list[int]], j: int,
                greedy: bool) -> tuple[list[int], Optional[torch.Tensor]]:
    """Draft position j's tokens from a draft's logits (A, V), one row per sequence of `seqs` (with
    its history `hist`): the processed argmax when every request is greedy, else a Gumbel-max draw
    from the draft distribution on the request's draft stream. -> (tokens, probs (A, V) or None)."""
    params = [s.params for s in seqs]
    if greedy:
        return process_logits(logits, params, hist).argmax(dim=1).tolist(), None
    probs = probabilities(logits, params, hist)                                 # (A, V)
    return gumbel_argmax(probs, [s.seed for s in seqs], [s.num_outputs + j for s in seqs],
                         STREAM_DRAFT).tolist(), probs

@dataclass
class Proposal:
    tokens: list[list[int]]             # per sequence, d_b <= k drafted tokens
    probs: Optional[torch.Tensor]       # (B, max d_b, V) draft distributions; None: deterministic


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], limits: list[int]) -> Proposal:
        """Draft at most limits[b] tokens after each sequence's current tokens."""

    def accepted(self, seqs: list[Sequence], lengths: list[int], num_accepted: list[int]) -> None:
        """The step is over: seqs[b] had lengths[b] tokens before it and kept num_accepted[b] drafts."""

    def forget(self, seq: Sequence) -> None:
        """`seq` finished, was aborted or preempted: drop whatever the proposer keeps for it."""


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

    def forget(self, seq: Sequence) -> None:
        pass


class DraftModelProposer:
    """A small model run autoregressively k times, with its own paged cache (a model runner and a block
    manager of its own) holding one shadow sequence per running target sequence.

    The draft pool has as many blocks as the target's and is prefix-cached like it (shadows of
    requests with a common prompt share its blocks), yet it can still be shorter than the target's
    needs (the target shares blocks the draft has evicted). A sequence whose shadow cannot get its
    blocks is simply not drafted for that step -- a plain decode step for it, the target's output
    unchanged -- rather than an OutOfBlocks error (vLLM does the same)."""

    def __init__(self, runner: ModelRunner, enable_caching: bool = False):
        self.runner = runner
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, enable_caching)
        self.shadows: dict[str, Sequence] = {}      # target request id -> its state in the draft cache
        self.skipped = 0                            # sequence-steps not drafted for lack of blocks

    def forget(self, seq: Sequence) -> None:
        shadow = self.shadows.pop(seq.request_id, None)
        if shadow is not None:
            self.blocks.free(shadow)

    def _sync(self, seqs: list[Sequence]) -> list[Sequence]:
        # Sequences outside this decode batch (preempted, from an earlier call) give their draft
        # blocks back first; so the draft pool, as large as the target's, never runs dry.
        live = {s.request_id for s in seqs}
        for rid in [r for r in self.shadows if r not in live]:
            self.blocks.free(self.shadows.pop(rid))
        out = []
        for s in seqs:
            sh = self.shadows.get(s.request_id)
            if sh is None:
                sh = Sequence(s.request_id, s.prompt_ids, s.params, s.seed)
                sh.token_ids = list(s.token_ids)
                if not self.blocks.admit(sh, self.blocks.cached_prefix(sh), 0):
                    out.append(None)                # not even its cached prefix fits: no draft now
                    continue
                self.shadows[s.request_id] = sh
            sh.token_ids = list(s.token_ids)        # the cached prefix always agrees with s
            out.append(sh)
        return out

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], limits: list[int]) -> Proposal:
        found = self._sync(seqs)
        limits = list(limits)
        for b, (sh, k) in enumerate(zip(found, limits)):
            # It will cache its tokens + drafts 1 .. k-1; short of blocks: no draft this step.
            if k > 0 and (sh is None or not self.blocks.can_grow(sh, len(sh) + k - 1)):
                limits[b] = 0
                self.skipped += 1
            elif k > 0:
                self.blocks.grow(sh, len(sh) + k - 1)
        shadows = found
        kmax = max(limits, default=0)                # 0: nothing drafted, as near max_tokens
        V = self.runner.config.vocab_size
        # Greedy requests draft their argmax: q is one-hot, which verify() assumes when probs is None.
        greedy = all(s.params.greedy for s in seqs)
        q = None if greedy else torch.zeros(len(seqs), kmax, V, device=self.runner.device)
        tokens: list[list[int]] = [[] for _ in seqs]
        for j in range(kmax):
            act = [b for b, k in enumerate(limits) if k > j]
            # First pass: catch up on everything not yet cached (the last accepted tokens, or the whole
            # prompt after a prefill / preemption); later passes: the previous draft token.
            batch_seqs = [shadows[b] for b in act]
            num_new = [len(sh) - sh.num_cached for sh in batch_seqs]
            logits = self.runner.execute(build_batch(batch_seqs, num_new, self.runner.block_size))
            hist = [shadows[b].token_ids for b in act]
            x, probs = draw_drafts(logits, [seqs[b] for b in act], hist, j, greedy)
            if probs is not None:
                q[act, j] = probs
            for b, n, t in zip(act, num_new, x):
                tokens[b].append(t)
                shadows[b].advance(n, [t])          # its new tokens cached, the draft appended
        return Proposal(tokens, q)

    def accepted(self, seqs: list[Sequence], lengths: list[int], num_accepted: list[int]) -> None:
        for s, L, n in zip(seqs, lengths, num_accepted):
            sh = self.shadows.get(s.request_id)     # keep the cached prefix that the target kept
            if sh is None:
                continue
            self.blocks.truncate(sh, min(sh.num_cached, L + n))
            del sh.token_ids[L + n:]                # the rejected drafts: not final, never hashed
            self.blocks.commit(sh)


def check_draft(draft: str, target: ModelConfig) -> ModelConfig:
    """Validate a draft checkpoint before any weights load: it must exist and share the vocabulary."""
    files = ckpt.locate(draft)                   # CheckpointError if the path does not exist
    cfg = ModelConfig.from_hf(files.config, files.generation_config)
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(f"draft {draft!r} has a vocabulary of {cfg.vocab_size} tokens, the target "
                         f"{target.vocab_size}: a draft must use the target's tokenizer; pick a "
                         "draft from the same model family, or use draft='ngram'")
    return cfg


def check_same_tokenizer(draft: str, tok: Tokenizer, mine: Tokenizer) -> None:
    """The draft's pieces must be the target's, id for id."""
    differ = next((i for i in range(min(tok.vocab_size, mine.vocab_size))
                   if tok.id_to_piece(i) != mine.id_to_piece(i)), None)
    if tok.vocab_size != mine.vocab_size or differ is not None:
        where = (f"{tok.vocab_size} vs {mine.vocab_size} pieces" if differ is None else
                 f"token {differ} is {tok.id_to_piece(differ)!r} vs {mine.id_to_piece(differ)!r}")
        raise ValueError(f"draft {draft!r} uses another tokenizer than the target ({where}); a "
                         "draft must share the target's vocabulary, or use draft='ngram'")
