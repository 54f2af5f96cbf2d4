"""The MTP proposer: DeepSeek-V3's multi-token-prediction module (models/mtp.py) as a one-layer draft
on the target's own hidden states (DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024, section 5.4.3;
draft="mtp").

The module attends over its own paged cache: one more layer's worth of K/V, in a tensor of its own
with the target's number of blocks, addressed through the target's block tables -- so a sequence's
MTP rows live in the same blocks as its target rows, and preemption, rollback (BlockManager.truncate)
and the prefix cache need nothing more (vLLM keeps MTP layers in the target's pool the same way).
MTP row i needs h_i (the target's hidden state at position i) and the token t_(i+1), which exists
only once the step after i has sampled it; so each request keeps the hidden states of its positions
not yet fed to the module (`observe`, after every target pass; `accepted` drops rejected drafts'),
and each step the proposer

    catches up     one varlen pass over every request's pending positions m .. L-2 (tokens
                   t_(m+1) .. t_(L-1)): its cache rows become exact, and row L-2 predicts t_L = d_1;
    chains         d_2 .. d_k, one row per request per pass, feeding the module its own output g
                   in place of h (its cache rows past L-2 are rewritten by the next catch-up).

Drafts are drawn as the draft model's are (greedy: the argmax; sampled: from q with the draft noise
stream), and verified by the exact rejection sampler (engine/speculative.py): the output never
depends on the module's weights, only the acceptance does. Positions a request never computed itself
(a prefix-cache hit) keep whatever MTP rows their blocks hold -- written by the request that computed
them, from its own next token -- a draft-quality matter only. A row whose logits are not finite ends
that request's draft.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tinyinfer.engine.batch import StepBatch
from tinyinfer.engine.kv_cache import PagedKVCache
from tinyinfer.engine.model_runner import ModelRunner
from tinyinfer.engine.proposers import Proposal, draw_drafts
from tinyinfer.engine.sequence import Sequence
from tinyinfer.models.mtp import MTPLayer
from tinyinfer.models.transformer import Transformer
from tinyinfer.sampling.sampler import finite_rows


@dataclass
class _Pending:
    start: int          # MTP rows of positions < start are written (by this request or a cached block's)
    hidden: Tensor      # (n, hidden): the target's h at positions start .. start + n - 1, not yet fed

    @property
    def end(self) -> int:
        return self.start + self.hidden.shape[0]


class MTPProposer:
    """`Proposer` (engine/proposers.py) over the target's runner and its MTP module."""

    def __init__(self, runner: ModelRunner, mtp: MTPLayer):
        self.runner, self.mtp = runner, mtp
        k_dims, v_dims = Transformer.kv_dims(runner.config)
        self.kv = PagedKVCache(1, runner.num_blocks, runner.block_size, k_dims, v_dims, runner.dtype,
                               runner.device)
        self.pending: dict[str, _Pending] = {}
        runner.keep_hidden = True           # the runner keeps each pass's hidden states for observe

    def observe(self, seqs: list[Sequence], batch: StepBatch, hidden: Tensor) -> None:
        """A target pass fed `batch` (seqs in its order) and computed `hidden` (T, hidden)."""
        q = batch.query_start_loc
        for b, s in enumerate(seqs):
            p, rows = batch.positions[q[b]], hidden[q[b]:q[b + 1]]
            pend = self.pending.get(s.request_id)
            if pend is None or not pend.start <= p <= pend.end:
                self.pending[s.request_id] = _Pending(p, rows.clone())   # a prefix hit or a restart
            else:
                pend.hidden = torch.cat([pend.hidden[:p - pend.start], rows])

    def accepted(self, seqs: list[Sequence], lengths: list[int], num_accepted: list[int]) -> None:
        # The verify pass fed positions L-1 .. L-1+d; the target keeps L-1 .. L-1+n.
        for s, L, n in zip(seqs, lengths, num_accepted):
            pend = self.pending.get(s.request_id)
            if pend is not None:
                pend.hidden = pend.hidden[:max(0, L + n - pend.start)]

    def forget(self, seq: Sequence) -> None:
        self.pending.pop(seq.request_id, None)

    def _run(self, seqs: list[Sequence], starts: list[int], ids: list[list[int]], hidden: Tensor
             ) -> Tensor:
        """One module pass: sequence b feeds positions starts[b] .. + len(ids[b]) - 1; returns g at
        each sequence's last row, (B, hidden)."""
        bs, positions, slots, flat, q = self.runner.block_size, [], [], [], [0]
        for s, p0, t in zip(seqs, starts, ids):
            pos = range(p0, p0 + len(t))
            positions += pos
            slots += [s.block_table[p // bs] * bs + p % bs for p in pos]
            flat += t
            q.append(q[-1] + len(t))
        batch = StepBatch(flat, positions, slots, [p0 + len(t) for p0, t in zip(starts, ids)], q,
                          [s.block_table for s in seqs], prefill=all(p0 == 0 for p0 in starts))
        input_ids, pos_t, meta = batch.to_device(self.runner.device)
        rotary = self.runner.model.rotary
        g = self.mtp.draft_forward(input_ids, hidden, pos_t, rotary, meta, *self.kv.layers()[0][:2])
        return g[meta.query_start_loc[1:].long() - 1]

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], limits: list[int]) -> Proposal:
        act = []
        for b, (s, k) in enumerate(zip(seqs, limits)):
            pend = self.pending.get(s.request_id)
            # Drafts need h at L-2 and every pending row before it (a gap: no draft this step).
            if k > 0 and pend is not None and pend.start < len(s) - 1 == pend.end:
                act.append(b)
        kmax = max((limits[b] for b in act), default=0)
        V = self.mtp.cfg.vocab_size
        greedy = all(s.params.greedy for s in seqs)
        q = None if greedy else torch.zeros(len(seqs), kmax, V, device=self.runner.device)
        tokens: list[list[int]] = [[] for _ in seqs]
        if not act:
            return Proposal(tokens, q)
        pend = [self.pending[seqs[b].request_id] for b in act]
        g = self._run([seqs[b] for b in act], [p.start for p in pend],
                      [seqs[b].token_ids[p.start + 1:] for b, p in zip(act, pend)],
                      torch.cat([p.hidden for p in pend]))                          # (A, hidden)
        for b, p in zip(act, pend):
            p.start, p.hidden = len(seqs[b]) - 1, p.hidden[:0]
        for j in range(kmax):
            logits = self.mtp.compute_logits(g)                                       # (A, V)
            hist = [seqs[b].token_ids + tokens[b] for b in act]
            x, probs = draw_drafts(logits, [seqs[b] for b in act], hist, j, greedy)  # probs (A, V)
            ok = finite_rows(logits).tolist()
            keep = []
            for i, (b, t) in enumerate(zip(act, x)):
                if not ok[i]:
                    continue                        # a non-finite row: this draft ends here
                if q is not None:
                    q[b, j] = probs[i]
                tokens[b].append(t)
                if limits[b] > j + 1:
                    keep.append(i)
            if not keep:
                break
            act = [act[i] for i in keep]
            g = self._run([seqs[b] for b in act], [len(seqs[b]) - 1 + j for b in act],
                          [[tokens[b][j]] for b in act], g[keep])
        return Proposal(tokens, None if q is None else q[:, :max(map(len, tokens))])
