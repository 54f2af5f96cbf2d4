"""The suffix proposer: SuffixDecoding's drafts (Oliaro et al., arXiv:2411.04975) with an adaptive
speculation length -- no draft model.

Per request, a suffix automaton over its prompt + output (engine/suffix_automaton.py), extended by the
tokens each step emitted; across requests, a bounded `SuffixStore` over recent outputs. Each step a
request takes the longer of its two matches (the longest suffix of its text seen before, in its own
text or in the store) and drafts the most frequent continuation of it. A single path, not a tree:
the verifier (engine/speculative.py) checks one path per sequence in one varlen pass, and on this
project's targets one more verified token costs as much as one more branch would.

Adaptive length (the draft is verified by the exact rejection sampler, so this only decides speed):
the acceptance rate alpha of a draft token is learned online per (greedy or sampled, match-length
bucket) -- a long match of copied text keeps being accepted, a one-token match of ordinary prose
rarely is -- as decayed counts of accepted / tried draft tokens. The draft length d maximizes the
expected tokens per step over its cost, from the chapter's formula (Leviathan et al. 2023):

    E(d) = (1 - alpha^(d+1)) / (1 - alpha)        cost(d) = 1 + [d > 0] * overhead + d * per_token

(cost in plain decode steps: `overhead` is the verify path's extra work, `per_token` one more
verified row). d = 0 when no d pays off: the request decodes plainly, and a step where nobody
drafts runs as a plain step (engine/llm_engine.py), with no verify overhead. A bucket that chose 0
still drafts one token every `probe`-th time, so a text that starts to repeat is noticed.

Exactness does not depend on any of this, but the drafts (hence which of the equally distributed
draws a seeded sampled request makes) depend on the store, i.e. on other requests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tinyinfer.engine.proposers import Proposal
from tinyinfer.engine.sequence import Sequence
from tinyinfer.engine.suffix_automaton import SuffixAutomaton, SuffixStore

# Match lengths are grouped into buckets (lower bounds) that each learn their own alpha.
BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)
RESYNC = 64          # tokens re-matched against the store when it changed (longer matches are rare)


def bucket(matched: int) -> int:
    return max(i for i, b in enumerate(BUCKETS) if matched >= b)


def best_length(alpha: float, limit: int, overhead: float, per_token: float) -> int:
    """argmax over d in 0..limit of E(d) / cost(d) (module docstring); 0 wins ties."""
    best, best_rate = 0, 1.0
    expected = 1.0                                   # E(d), built up term by term
    for d in range(1, limit + 1):
        expected += alpha ** d
        rate = expected / (1.0 + overhead + d * per_token)
        if rate > best_rate + 1e-9:
            best, best_rate = d, rate
    return best


class AcceptanceModel:
    """Online alpha per key: decayed counts of accepted and tried draft tokens, Beta(1, 1) prior."""

    def __init__(self, decay: float = 0.995):
        self.decay = decay
        self.accepted: dict[tuple, float] = {}
        self.tried: dict[tuple, float] = {}
        self.skips: dict[tuple, int] = {}

    def alpha(self, key: tuple) -> float:
        return (self.accepted.get(key, 0.0) + 1.0) / (self.tried.get(key, 0.0) + 2.0)

    def update(self, key: tuple, drafted: int, kept: int) -> None:
        # Draft tokens are tried until the first rejection: `kept` successes, one failure unless all
        # were kept (the geometric model behind E(d)).
        tried = kept + (kept < drafted)
        self.accepted[key] = self.accepted.get(key, 0.0) * self.decay + kept
        self.tried[key] = self.tried.get(key, 0.0) * self.decay + tried


@dataclass
class _Request:
    sam: SuffixAutomaton                 # over the request's prompt + output
    store_state: int = 0                 # its longest match in the store ...
    store_matched: int = 0
    store_version: int = -1              # ... valid for this version of the store
    key: Optional[tuple] = None          # the last step's bucket and draft length, for accepted()
    drafted: int = 0


class SuffixProposer:
    """`Proposer` (engine/proposers.py): suffix-automaton drafts of adaptive length, one-hot q."""

    def __init__(self, store_tokens: int = 32768, overhead: float = 0.1, per_token: float = 0.15,
                 probe: int = 32, adaptive: bool = True):
        self.store = SuffixStore(store_tokens)
        self.model = AcceptanceModel()
        self.overhead, self.per_token, self.probe, self.adaptive = overhead, per_token, probe, adaptive
        self.requests: dict[str, _Request] = {}

    def _sync(self, seq: Sequence) -> _Request:
        """The request's index, caught up with its tokens (they only grow: rejected drafts never
        reach seq.token_ids)."""
        req = self.requests.get(seq.request_id)
        if req is None or len(req.sam) > len(seq.token_ids):
            req = self.requests[seq.request_id] = _Request(SuffixAutomaton(seq.token_ids))
            new = seq.token_ids[-RESYNC:]
            req.store_version = -1
        else:
            new = seq.token_ids[len(req.sam):]
            req.sam.extend_all(new)
        sam = self.store.sam
        if req.store_version != self.store.version:          # the store changed: match again
            req.store_state, req.store_matched = sam.match(seq.token_ids[-RESYNC:])
            req.store_version = self.store.version
        else:
            for c in new:
                req.store_state, req.store_matched = sam.step(req.store_state, req.store_matched, c)
        return req

    def draft(self, seq: Sequence, limit: int) -> list[int]:
        req = self._sync(seq)
        req.key, req.drafted = None, 0
        state, matched = req.sam.repeated_suffix()
        sam = req.sam
        if req.store_matched > matched:
            sam, state, matched = self.store.sam, req.store_state, req.store_matched
        if matched == 0 or limit <= 0:
            return []
        key = (seq.params.greedy, bucket(matched))
        d = limit
        if self.adaptive:
            d = best_length(self.model.alpha(key), limit, self.overhead, self.per_token)
            if d == 0:
                skips = self.model.skips[key] = self.model.skips.get(key, 0) + 1
                if skips % self.probe:
                    return []
                d = 1                                       # a probe: is this bucket still hopeless?
        tokens = sam.continuation(state, d)
        req.key, req.drafted = key, len(tokens)
        return tokens

    def propose(self, seqs: list[Sequence], limits: list[int]) -> Proposal:
        return Proposal([self.draft(s, k) for s, k in zip(seqs, limits)], None)

    def accepted(self, seqs: list[Sequence], lengths: list[int], num_accepted: list[int]) -> None:
        for s, n in zip(seqs, num_accepted):
            req = self.requests.get(s.request_id)
            if req is not None and req.key is not None and req.drafted:
                self.model.update(req.key, req.drafted, n)
                req.key = None

    def forget(self, seq: Sequence) -> None:
        """A request ended: its output joins the store (finished normally); its index goes. A preempted
        request keeps its index (its tokens are unchanged)."""
        self.requests.pop(seq.request_id, None)
        if seq.finish_reason in ("stop", "length") and seq.num_outputs > 0:
            self.store.add(seq.token_ids[len(seq.prompt_ids):])
