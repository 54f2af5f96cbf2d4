"""A tensor-parallel step on the wire: rank 0's command (a model-runner call and its `StepBatch`) packed
into one int64 tensor and broadcast over the group's control backend (gloo, CPU tensors), so the same
code carries it between processes of one machine and between machines (the approach of SGLang's
`broadcast_pyobj` and Megatron's `broadcast_data`: metadata over torch.distributed, not a side channel).

Layout (int64 words):
    [0] length of what follows   [1] op   [2] T   [3] B   [4] flags   [5] q_len
    input_ids (T) positions (T) slot_mapping (T) seq_lens (B) query_start_loc (B + 1)
    table lengths (B) block tables, back to back
    with sampling: temperatures (B, float64 bits) seeds (B) output positions (B)
The first broadcast is a fixed `FIRST` words (a decode step of 100-200 sequences fits); a
longer command (a prefill chunk) follows in a second broadcast of the rest. So a decode step costs one
collective. The first broadcast waits `IDLE_TIMEOUT_S` (a worker waits there between requests), the
second the group's collective timeout.
"""
from __future__ import annotations

from array import array
from typing import Callable, Optional

import torch
from torch import Tensor

from tinyinfer.engine.batch import StepBatch
from tinyinfer.layers.parallel import ParallelGroup

# The commands rank 0 sends: the ModelRunner methods that run collectives, and "close".
OPS = ("close", "execute", "execute_sampled", "enable_verify_graphs")
FIRST = 2048                    # words in the first broadcast (16 KiB)
IDLE_TIMEOUT_S = 365 * 24 * 3600.0   # a worker waits this long for the next step (an idle server)
_PREFILL, _ALL_LOGITS, _SAMPLING = 1, 2, 4
HEAD = 6


def encode(op: str, *args) -> array:
    """The command as int64 words (header included)."""
    words = array("q", [0, OPS.index(op), 0, 0, 0, 0])
    if op == "enable_verify_graphs":
        words[5] = int(args[0])
    elif op in ("execute", "execute_sampled"):
        batch: StepBatch = args[0]
        T, B = len(batch.input_ids), batch.num_seqs
        words[2], words[3] = T, B
        words[4] = (_PREFILL * batch.prefill | _ALL_LOGITS * bool(args[1:] and args[1])
                    | _SAMPLING * (batch.sampling is not None))
        for part in (batch.input_ids, batch.positions, batch.slot_mapping, batch.seq_lens,
                     batch.query_start_loc):
            words.extend(part)
        words.extend(len(t) for t in batch.block_tables)
        for t in batch.block_tables:
            words.extend(t)
        if batch.sampling is not None:
            temps, seeds, steps = batch.sampling
            words.frombytes(array("d", temps).tobytes())
            words.extend(seeds)
            words.extend(steps)
    words[0] = len(words) - 1
    return words


def decode(words: Tensor) -> tuple:
    """(op, *args) from the words `encode` made (a 1-D int64 tensor, header included)."""
    w = words.tolist()
    if not 0 <= w[1] < len(OPS):
        raise ValueError(f"unknown tensor-parallel command {w[1]} (known: {', '.join(OPS)})")
    op, T, B, flags, q_len = OPS[w[1]], w[2], w[3], w[4], w[5]
    if op == "enable_verify_graphs":
        return op, q_len
    if op == "close":
        return (op,)
    at = HEAD

    def take(n: int) -> list[int]:
        nonlocal at
        at += n
        return w[at - n:at]
    ids, positions, slots, seq_lens, qsl = take(T), take(T), take(T), take(B), take(B + 1)
    tables = [take(n) for n in take(B)]
    sampling = None
    if flags & _SAMPLING:
        temps = array("d", array("q", take(B)).tobytes()).tolist()
        sampling = (temps, take(B), take(B))
    batch = StepBatch(ids, positions, slots, seq_lens, qsl, tables, prefill=bool(flags & _PREFILL),
                      sampling=sampling)
    return (op, batch, True) if flags & _ALL_LOGITS else (op, batch)


def send(group: ParallelGroup, op: str, *args) -> Callable[[], None]:
    """Rank 0: start broadcasting the command to every rank; returns what ends it (call it after
    rank 0's own share of the step: the sending overlaps it, as a pipe's did)."""
    words = encode(op, *args)
    first = torch.zeros(FIRST, dtype=torch.int64)
    n = min(len(words), FIRST)
    first[:n] = torch.frombuffer(words, dtype=torch.int64, count=n)
    works = [group.broadcast(first, wait=False)]
    if len(words) > FIRST:
        rest = torch.frombuffer(words, dtype=torch.int64, offset=8 * FIRST).clone()
        works.append(group.broadcast(rest, wait=False))

    def finish() -> None:
        for w in works:
            w.wait()
    return finish


def receive(group: ParallelGroup, idle_timeout_s: Optional[float] = IDLE_TIMEOUT_S) -> tuple:
    """A worker: the next command from rank 0, (op, *args)."""
    first = group.broadcast(torch.empty(FIRST, dtype=torch.int64), idle_timeout_s)
    total = int(first[0]) + 1
    if total <= FIRST:
        return decode(first[:total])
    rest = group.broadcast(torch.empty(total - FIRST, dtype=torch.int64))
    return decode(torch.cat([first, rest]))
