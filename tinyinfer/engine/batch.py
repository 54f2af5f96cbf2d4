"""One engine step's batch, built in one place: the flat, unpadded ("varlen") batch of every scheduled
sequence's new tokens, in the layout FlashAttention's varlen API and vLLM use (Dao, "FlashAttention-2",
2023; Kwon et al., "PagedAttention", SOSP 2023).

`build_batch` turns sequences into a `StepBatch` of plain host lists (picklable: what a model runner in
another process receives); the eager path turns it into device tensors (`StepBatch.to_device`), the CUDA
graph path writes it into static buffers (engine/cuda_graphs.py). Sequence b feeds its tokens
[num_cached, num_cached + num_new[b]); its slot for position p is table[p // block_size] * block_size +
p % block_size.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Optional, Sequence as Seq

import torch
from torch import Tensor

from tinyinfer.engine.sequence import Sequence
from tinyinfer.layers.attention import AttentionMetadata
from tinyinfer.ops.limits import MAX_KERNEL_Q_LEN


@dataclass
class StepBatch:
    input_ids: list[int]             # (T,) the new tokens of every sequence, back to back
    positions: list[int]             # (T,)
    slot_mapping: list[int]          # (T,) cache slot of each new token
    seq_lens: list[int]              # (B,) cached tokens per sequence after this step
    query_start_loc: list[int]       # (B+1,) sequence b owns rows [qsl[b], qsl[b+1])
    block_tables: list[list[int]]    # B tables (unpadded; the sequences' own lists, read at once)
    prefill: bool                    # no sequence has a cached prefix
    # Sampling inside the step (ModelRunner.execute_sampled): per sequence its temperature (0: greedy),
    # seed and output position -- the key of its sampling noise (sampling/sampler.py).
    sampling: Optional[tuple[list[float], list[int], list[int]]] = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_new(self) -> list[int]:
        q = self.query_start_loc
        return [b - a for a, b in zip(q, q[1:])]

    @property
    def max_q_len(self) -> int:
        return max(self.num_new, default=0)

    @property
    def max_blocks(self) -> int:
        return max((len(t) for t in self.block_tables), default=0)

    def to_device(self, device: torch.device) -> tuple[Tensor, Tensor, AttentionMetadata]:
        """(input_ids (T,) int64, positions (T,) int64, metadata) on `device`: two host-to-device
        copies, one int64 and one int32 (the engine's own cost is what a small model's step is)."""
        B, T = self.num_seqs, len(self.input_ids)
        width = self.max_blocks
        # Packed through array buffers: no per-element Python conversion (torch.tensor(list) has one).
        flat = array("q", self.input_ids)
        flat.extend(self.positions)
        flat.extend(self.slot_mapping)
        small = array("i", self.seq_lens)
        small.extend(self.query_start_loc)
        for t in self.block_tables:
            small.extend(t)
            small.extend([-1] * (width - len(t)))
        flat = _tensor(flat, torch.int64).view(3, T).to(device)                     # (3, T)
        small = _tensor(small, torch.int32).to(device)               # (2B + 1 + B * width,)
        meta = AttentionMetadata(
            slot_mapping=flat[2], block_tables=small[2 * B + 1:].view(B, width),
            seq_lens=small[:B], query_start_loc=small[B:2 * B + 1], max_q_len=self.max_q_len,
            query_start_loc_host=self.query_start_loc, seq_lens_host=self.seq_lens,
            prefill=self.prefill,
            num_decodes=next((b for b, n in enumerate(self.num_new) if n > MAX_KERNEL_Q_LEN), B))
        return flat[0], flat[1], meta


def _tensor(values: array, dtype: torch.dtype) -> Tensor:
    # A tensor over the array's buffer (it keeps the array alive); frombuffer refuses an empty one.
    return torch.frombuffer(values, dtype=dtype) if len(values) else torch.empty(0, dtype=dtype)


def build_batch(seqs: Seq[Sequence], num_new: Seq[int], block_size: int) -> StepBatch:
    """The step of `seqs` where sequence b feeds num_new[b] tokens after its cached ones."""
    ids, positions, slots, seq_lens, qsl = [], [], [], [], [0]
    for s, n in zip(seqs, num_new):
        start, table = s.num_cached, s.block_table
        if n == 1:                                   # decode: the common case, no ranges
            ids.append(s.token_ids[start])
            positions.append(start)
            slots.append(table[start // block_size] * block_size + start % block_size)
        else:
            ids += s.token_ids[start:start + n]
            pos = range(start, start + n)
            positions += pos
            slots += [table[p // block_size] * block_size + p % block_size for p in pos]
        seq_lens.append(start + n)
        qsl.append(qsl[-1] + n)
    return StepBatch(ids, positions, slots, seq_lens, qsl, [s.block_table for s in seqs],
                     prefill=all(s.num_cached == 0 for s in seqs))
