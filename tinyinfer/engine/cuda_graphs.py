"""CUDA graphs for decode: a whole decode step launched with one call (NVIDIA, "CUDA Graphs", CUDA C++
Programming Guide). At batch 1 each of a 7B step's ~320 kernels runs for microseconds, about as long as
launching it takes; a graph records the launches once and replays them. A graph replays fixed pointers
and shapes, hence:

- batches padded up to a bucket (1, 2, 4, ..., 64 sequences), one graph per bucket and block-table
  width (powers of two from 64 blocks), T = bucket x q_len rows (q_len 1 to decode, k+1 to verify);
- inputs in static buffers overwritten before each replay (engine/static_batch.py); padding follows
  the paged-attention contract (q_len 0 and seq_len 0 sequences, slot -1 rows);
- nothing host-synchronising inside (lm_head over all T rows; the caller picks its rows); a decode
  graph may also draw the tokens and check the logits are finite (sampling/sampler.py
  `sample_in_step`), so the host receives B token ids instead of B x vocab logits.

Larger batches, longer queries and host-synchronising models (MoE routing) run eagerly. On a CPU the same
padded path runs without capture, which is how padding and bucketing are tested without a GPU.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from tinyinfer import extensions
from tinyinfer.engine.batch import StepBatch
from tinyinfer.engine.kv_cache import PagedKVCache
from tinyinfer.engine.static_batch import StaticBatch
from tinyinfer.ops.cuda import CUDA_IMPLS
from tinyinfer.ops.limits import MAX_KERNEL_Q_LEN
from tinyinfer.sampling.sampler import sample_in_step

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MIN_TABLE_WIDTH = 64          # blocks: 1k tokens at block size 16


def graph_unsafe_reason(model: nn.Module) -> Optional[str]:
    """Why decode of `model` on CUDA cannot be captured, or None when it can. A captured step must not
    synchronise with the host, so every op in it needs its CUDA kernel (the references index with
    host-side values) and no layer may read values back (MoE routing does, to slice the batch)."""
    if extensions.extension() is None:
        return "the CUDA extension is not available (the reference ops synchronise with the host)"
    needed = ["store_kv", "rope_store_kv", "paged_attention"]
    if any(type(m).__name__ == "Int4Linear" for m in model.modules()):
        needed.append("int4_linear")
    missing = [op for op in needed if op not in CUDA_IMPLS]
    if missing:
        return f"no CUDA kernel is registered for {', '.join(missing)}"
    unsafe = sorted({type(m).__name__ for m in model.modules() if getattr(m, "graph_safe", True) is False})
    if unsafe:
        return f"{', '.join(unsafe)} synchronise with the host"
    return None


class GraphRunner:
    """Runs steps of `q_len` new tokens per sequence (1 = decode) through captured CUDA graphs.

    run() returns the float32 logits of every new token row, (T, vocab) with T = sum(num_new): a view
    of the graph's static output, valid until the next run(). With mode "greedy" or "sample" (q_len 1
    only) it returns (logits, tokens (B,), finite (B,)): the step's draws, from batch.sampling."""

    MODES = ("logits", "greedy", "sample")

    def __init__(self, model: nn.Module, kv: PagedKVCache, q_len: int = 1,
                 buckets: Sequence[int] = BUCKETS, max_context: Optional[int] = None,
                 capture: Optional[bool] = None, pool: Optional[tuple] = None):
        if not 1 <= q_len <= MAX_KERNEL_Q_LEN:
            raise ValueError(f"q_len={q_len}: graphs cover 1..{MAX_KERNEL_Q_LEN} new tokens per "
                             "sequence (the paged-attention kernel's range)")
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets={buckets!r}: give increasing positive batch sizes")
        self.model, self.kv, self.q_len, self.buckets = model, kv, q_len, tuple(buckets)
        self.device = kv.k_caches[0].device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the KV cache is on {self.device}")
        bs = kv.block_size
        context = max_context or model.cfg.max_context
        self.max_blocks = min(-(-context // bs), kv.num_blocks)
        self.widths = self._widths(self.max_blocks)
        self.batch = StaticBatch(self.buckets[-1], q_len, self.max_blocks, self.device)
        self.graphs: dict[tuple[int, int, str], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int, str], tuple[Tensor, ...]] = {}   # (logits[, tokens, finite])
        # One memory pool for every graph of this runner (and of runners given it: `pool=`); graphs
        # never replay concurrently, so their intermediates can share memory.
        self.pool = pool if pool is not None or not self.capture else torch.cuda.graph_pool_handle()
        self.disabled: Optional[str] = None                   # why graphs are off, once known
        if self.capture:
            self.disabled = graph_unsafe_reason(model)
            if self.disabled:
                warnings.warn(f"tinyinfer: CUDA graphs off, decode runs eagerly: {self.disabled}",
                              RuntimeWarning, stacklevel=2)

    @staticmethod
    def _widths(max_blocks: int) -> list[int]:
        widths, w = [], MIN_TABLE_WIDTH
        while w < max_blocks:
            widths.append(w)
            w *= 2
        return widths + [max_blocks]

    def bucket(self, num_seqs: int) -> Optional[int]:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def can_run(self, batch: StepBatch) -> bool:
        """True when this step fits a graph: at most the biggest bucket of sequences, 1..q_len new
        tokens each, block tables within the captured width."""
        return (self.disabled is None and 0 < batch.num_seqs <= self.buckets[-1]
                and all(1 <= n <= self.q_len for n in batch.num_new)
                and batch.max_blocks <= self.max_blocks)

    @torch.inference_mode()
    def run(self, batch: StepBatch, mode: str = "logits"):
        if mode != "logits" and (self.q_len != 1 or batch.sampling is None):
            raise ValueError(f"mode {mode!r} samples one token per sequence: it needs q_len 1 and "
                             "batch.sampling")
        bucket, width = self._shape(batch.num_seqs, batch.max_blocks)
        T = self.batch.fill(batch, bucket, width)
        key = (bucket, width, mode)
        if self.capture and not self.disabled and key not in self.graphs:
            try:
                self._capture(*key)
            except RuntimeError as err:         # an op that synchronises, a failed launch, ...
                self.disabled = f"capturing the step failed: {str(err).splitlines()[0]}"
                warnings.warn(f"tinyinfer: CUDA graphs off, decode runs eagerly: {self.disabled}",
                              RuntimeWarning, stacklevel=3)
        if key in self.graphs:
            self.graphs[key].replay()
            out = self.outputs[key]
        else:
            out = self._forward(*key)                          # padded, uncaptured (CPU tests)
        return out[0][:T] if mode == "logits" else tuple(t[:T] for t in out)

    def _forward(self, bucket: int, width: int, mode: str = "logits") -> tuple[Tensor, ...]:
        input_ids, positions, meta = self.batch.meta(bucket, width)
        hidden = self.model(input_ids, positions, meta, self.kv.layers())   # (T_bucket, hidden)
        logits = self.model.compute_logits(hidden)                           # (T_bucket, vocab)
        if mode == "logits":
            return (logits,)
        keys = None if mode == "greedy" else self.batch.sampling(bucket)
        return (logits, *sample_in_step(logits, keys, sync=False))

    def _capture(self, bucket: int, width: int, mode: str = "logits") -> None:
        # The static buffers hold the real step already; the warm-up runs (which do execute) would
        # write its K/V early, harmless since replay writes the same values, but an all-padding
        # batch writes nothing at all, so warm up and capture on that, then restore the step.
        saved_tokens, saved_seqs = self.batch.token_rows.clone(), self.batch.seq_rows.clone()
        self.batch.token_rows[2].fill_(-1)
        self.batch.seq_rows[:self.batch.table_off].zero_()
        try:
            self._capture_padded(bucket, width, mode)
        finally:
            self.batch.token_rows.copy_(saved_tokens)
            self.batch.seq_rows.copy_(saved_seqs)

    def _capture_padded(self, bucket: int, width: int, mode: str) -> None:
        # Warm up on a side stream (lazy initialisation: cuBLAS handles and workspaces, autotuning)
        # so that none of it lands in the graph.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(bucket, width, mode)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(bucket, width, mode)
        self.graphs[(bucket, width, mode)], self.outputs[(bucket, width, mode)] = graph, out

    def num_graphs(self) -> int:
        return len(self.graphs)

    def _shape(self, num_seqs: int, num_blocks: int) -> tuple[int, int]:
        return self.bucket(num_seqs), next(w for w in self.widths if w >= num_blocks)

    def graph_for(self, num_seqs: int, num_blocks: int, mode: str = "logits"
                  ) -> Optional[torch.cuda.CUDAGraph]:
        """The captured graph a step of `num_seqs` sequences with tables of `num_blocks` replays."""
        return self.graphs.get((*self._shape(num_seqs, num_blocks), mode))

    @torch.inference_mode()
    def forward_uncaptured(self, num_seqs: int, num_blocks: int) -> Tensor:
        """The same padded step the graph runs, launched eagerly on the current static buffers
        (benchmarks profile it when the profiler cannot see inside graph replays)."""
        return self._forward(*self._shape(num_seqs, num_blocks))[0]
