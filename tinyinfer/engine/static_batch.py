"""The static input buffers of captured CUDA graphs, and the code that fills them for one step.

A CUDA graph replays fixed device pointers (NVIDIA, "CUDA Graphs", CUDA C++ Programming Guide), so every
input of a captured step lives in a buffer allocated once and overwritten in place before each replay:
the host fills pinned mirrors and one copy per buffer moves them. Padding follows the paged-attention
contract (engine/cuda_graphs.py). Decode graphs that sample inside the graph also read each row's
temperature and its sampling key (seed, output position) from here (sampling/sampler.py `sample_rows`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tinyinfer.engine.batch import StepBatch
from tinyinfer.layers.attention import AttentionMetadata


class StaticBatch:
    """The static input buffers shared by all graphs of one runner, and the code that fills them.

    Device buffers (their views are what the graphs read), each with a pinned host mirror (`*_host`):
        token_rows int64 (5, T_max): input ids | positions | slot mapping | sampling seeds | steps
        seq_rows int32 (table_off + B_max * MB_max,): seq lens | query_start_loc | (gap) | block tables
        temperatures float32 (T_max,): each row's sampling temperature (0: greedy)
    A graph for (bucket b, table width mb) reads views of their prefixes: ids token_rows[0, :b*q_len],
    ..., block tables seq_rows[off : off + b*mb].view(b, mb). One copy per buffer moves a step."""

    def __init__(self, max_seqs: int, q_len: int, max_blocks: int, device: torch.device):
        self.max_seqs, self.q_len, self.max_blocks = max_seqs, q_len, max_blocks
        self.device = device
        self.table_off = -(-(2 * max_seqs + 1) // 32) * 32    # tables start 128-byte aligned
        n32 = self.table_off + max_seqs * max_blocks
        self.token_rows = torch.zeros(5, max_seqs * q_len, dtype=torch.int64, device=device)
        self.seq_rows = torch.zeros(n32, dtype=torch.int32, device=device)
        self.temperatures = torch.zeros(max_seqs * q_len, dtype=torch.float32, device=device)
        pin = device.type == "cuda"
        self.token_rows_host = torch.zeros(self.token_rows.shape, dtype=torch.int64, pin_memory=pin)
        self.seq_rows_host = torch.zeros(n32, dtype=torch.int32, pin_memory=pin)
        self.temperatures_host = torch.zeros(self.temperatures.shape, dtype=torch.float32, pin_memory=pin)
        self.width = 0                        # table row stride of the last fill (0: none yet)
        self.rows: list[Optional[list[int]]] = [None] * max_seqs  # table each host row holds now
        self.copied = torch.cuda.Event() if pin else None        # the last host->device copy

    def meta(self, bucket: int, width: int) -> tuple[Tensor, Tensor, AttentionMetadata]:
        """(input_ids, positions, metadata) as views of the static buffers for one graph shape."""
        T, B, off = bucket * self.q_len, bucket, self.table_off
        meta = AttentionMetadata(
            slot_mapping=self.token_rows[2, :T],
            block_tables=self.seq_rows[off:off + B * width].view(B, width), seq_lens=self.seq_rows[:B],
            query_start_loc=self.seq_rows[self.max_seqs:self.max_seqs + B + 1],
            max_q_len=self.q_len, query_start_loc_host=[0] * (B + 1), seq_lens_host=[0] * B,
            prefill=False)
        return self.token_rows[0, :T], self.token_rows[1, :T], meta

    def sampling(self, bucket: int) -> tuple[Tensor, Tensor, Tensor]:
        """(temperature (B,) float32, seeds (B,) int64, steps (B,) int64) views for a bucket of q_len 1
        rows."""
        return self.temperatures[:bucket], self.token_rows[3, :bucket], self.token_rows[4, :bucket]

    def fill(self, batch: StepBatch, bucket: int, width: int) -> int:
        """Write `batch` padded to `bucket` sequences with tables `width` wide; returns the real row
        count T."""
        if self.copied is not None:
            self.copied.synchronize()         # the previous copy may still be reading the mirrors
        q = self.q_len
        ids, positions, slots = batch.input_ids, batch.positions, batch.slot_mapping
        seq_lens, qsl, n = batch.seq_lens, batch.query_start_loc, batch.num_seqs
        T, pad = len(ids), bucket * q - len(ids)
        # Padding rows: token 0 at position 0, slot -1 (never stored); padding sequences own no
        # query rows (query_start_loc stays at T) and no cached tokens.
        self.token_rows_host[:3, :bucket * q] = torch.tensor([ids + [0] * pad, positions + [0] * pad,
                                                              slots + [-1] * pad])
        if batch.sampling is not None:        # padding rows: greedy, key (0, 0)
            temps, seeds, steps = batch.sampling
            self.token_rows_host[3:, :bucket] = torch.tensor([seeds + [0] * (bucket - n),
                                                              steps + [0] * (bucket - n)])
            self.temperatures_host[:bucket] = torch.tensor(temps + [0.0] * (bucket - n),
                                                           dtype=torch.float32)
            self.temperatures.copy_(self.temperatures_host, non_blocking=True)
        nb = bucket - n
        self.seq_rows_host[:bucket] = torch.tensor(seq_lens + [0] * nb, dtype=torch.int32)
        self.seq_rows_host[self.max_seqs:self.max_seqs + bucket + 1] = torch.tensor(qsl + [T] * nb,
                                                                                  dtype=torch.int32)
        self._fill_tables(batch.block_tables, width)
        # Entries past a sequence's last block (and padding rows) keep stale values: the contract
        # says they are never read.
        self.token_rows.copy_(self.token_rows_host, non_blocking=True)     # small: 5 x T_max int64
        end = self.table_off + bucket * width
        self.seq_rows[:end].copy_(self.seq_rows_host[:end], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        return T

    def _fill_tables(self, block_tables: list[list[int]], width: int) -> None:
        # Block tables change only when a sequence gains a block (every block_size steps) or the batch
        # changes, so each host row remembers the table it holds and is rewritten only if it differs
        # (a list comparison runs in C).
        if width != self.width:
            self.width, self.rows = width, [None] * self.max_seqs
        tables = self.seq_rows_host[self.table_off:self.table_off + self.max_seqs * width].view(-1, width)
        for i, table in enumerate(block_tables):
            if self.rows[i] != table:
                tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
                self.rows[i] = list(table)
