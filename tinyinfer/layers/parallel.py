"""Tensor parallelism, the model side: the group of ranks that share one model, and the two collectives
a Megatron-style sharded transformer needs (Shoeybi et al., "Megatron-LM", 2019, section 3).

Every rank holds 1/N of each layer: the column-parallel projections (qkv, gate_up) a slice of their
output rows, the row-parallel ones (o_proj, down_proj) the matching slice of their input columns. A
rank's o_proj / down_proj output is then a partial sum, and one all-reduce per sublayer completes it
(`DecoderLayer` calls `all_reduce`). The vocabulary is split too: `VocabParallelEmbedding` looks up the
ids of its own rows (zeros for the others) and one all-reduce sums the ranks' rows; the lm_head's logits
of each rank's rows are all-gathered into the full vocabulary (`gather_vocab`). Which slice each rank
reads from a checkpoint: loading/shard.py; the processes and their life: engine/tensor_parallel.py.

The collectives run on a torch.distributed backend object of this group only (gloo on CPUs, NCCL on
GPUs, inside the captured CUDA graph there), never on the default process group, so several engines --
and a user's own torch.distributed program -- can live in one process. `ParallelGroup` counts the bytes
it moves (benchmarks; eager calls only: a replayed CUDA graph does not pass through Python).
"""
from __future__ import annotations

import datetime
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class ParallelGroup:
    """The N ranks (0 .. N-1) that hold one model's shards; this process is `rank`."""

    def __init__(self, backend: object, rank: int, size: int):
        self.backend, self.rank, self.size = backend, rank, size
        self.reduced_bytes = 0          # bytes this rank contributed to all-reduces (eager calls)
        self.gathered_bytes = 0         # bytes this rank received from all-gathers (eager calls)
        self.num_all_reduces = 0
        self.control = backend          # the backend the steps travel on (on_store sets it)

    @classmethod
    def create(cls, kind: str, store_path: str, rank: int, size: int, timeout_s: float,
               device: Optional[torch.device] = None) -> "ParallelGroup":
        """Join the group: every rank calls this with the same store file (a torch FileStore, the
        rendezvous) and returns once all `size` ranks have joined; the ranks live on this machine."""
        store = dist.FileStore(store_path, size)
        return cls.on_store(kind, store, rank, size, timeout_s, device, "127.0.0.1")

    @classmethod
    def on_store(cls, kind: str, store: object, rank: int, size: int, timeout_s: float,
                 device: Optional[torch.device] = None, hostname: Optional[str] = None,
                 interface: Optional[str] = None) -> "ParallelGroup":
        """Join the group through `store` (a FileStore on one machine, torchrun's TCPStore across
        machines). kind "gloo" (CPU tensors) or "nccl" (CUDA tensors on `device`); gloo listens on
        `interface` (a network interface name), else on `hostname`'s address, else on the address the
        machine's name resolves to. Every collective fails after `timeout_s` instead of waiting for a
        rank that never comes. Beside the model's backend the group has a gloo one on CPU tensors,
        `control`, that carries the steps (engine/step_wire.py): the same backend on CPUs."""
        timeout = datetime.timedelta(seconds=timeout_s)
        if kind not in ("gloo", "nccl"):
            raise ValueError(f"unknown collective backend {kind!r}; use gloo (CPU) or nccl (CUDA)")
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        if interface:
            opts._devices = [dist.ProcessGroupGloo.create_device(interface=interface)]
        elif hostname:
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=hostname)]
        else:
            opts._devices = [dist.ProcessGroupGloo.create_default_device()]
        if kind == "gloo":
            backend = control = dist.ProcessGroupGloo(dist.PrefixStore("model", store), rank, size, opts)
        else:
            control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, opts)
            torch.cuda.set_device(device)
            nccl = dist.ProcessGroupNCCL.Options()
            nccl._timeout = timeout
            backend = dist.ProcessGroupNCCL(dist.PrefixStore("model", store), rank, size, nccl)
        group = cls(backend, rank, size)
        group.control = control
        return group

    def broadcast(self, x: Tensor, timeout_s: Optional[float] = None, wait: bool = True):
        """x (a CPU tensor) from rank 0 to every rank, in place, on the control backend; timeout_s
        replaces the group's timeout for this call (a worker waiting for the next step may wait long).
        wait=False returns the pending work (its .wait() ends it) instead of x."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        if timeout_s is not None:
            opts.timeout = datetime.timedelta(seconds=timeout_s)
        work = self.control.broadcast([x], opts)
        if not wait:
            return work
        work.wait()
        return x

    def all_reduce(self, x: Tensor) -> Tensor:
        """x summed over the ranks, in place (every rank gets the same bits)."""
        self.backend.allreduce([x]).wait()
        self.reduced_bytes += x.numel() * x.element_size()
        self.num_all_reduces += 1
        return x

    def all_gather(self, x: Tensor) -> Tensor:
        """(rows, cols) on each rank -> (size * rows, cols): rank r's rows at [r * rows, (r+1) * rows)."""
        x = x.contiguous()
        out = x.new_empty(self.size * x.shape[0], *x.shape[1:])
        self.backend._allgather_base(out, x).wait()
        self.gathered_bytes += (self.size - 1) * x.numel() * x.element_size()
        return out

    def min(self, value: int, device: torch.device) -> int:
        """The smallest of the ranks' `value` (what every rank can afford, e.g. KV blocks)."""
        t = torch.tensor([value], dtype=torch.int64, device=device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.backend.allreduce([t], opts).wait()
        return int(t.item())


def all_reduce(x: Tensor, group: Optional[ParallelGroup]) -> Tensor:
    """The sum of a row-parallel sublayer's partial outputs over the ranks (x itself without a group)."""
    return x if group is None else group.all_reduce(x)


def gather_vocab(logits: Tensor, group: Optional[ParallelGroup]) -> Tensor:
    """Logits of this rank's vocabulary rows (T, V/N) -> every rank's, in vocabulary order (T, V)."""
    if group is None:
        return logits
    T = logits.shape[0]
    parts = group.all_gather(logits)                                     # (N * T, V/N)
    return parts.view(group.size, T, -1).transpose(0, 1).reshape(T, -1)  # (T, V)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [rank * n, (rank + 1) * n) of the embedding table (n = V / N). A token outside them looks
    up zeros; the all-reduce adds the one rank's row that holds it, so the result is exact."""

    def __init__(self, num_local: int, dim: int, group: ParallelGroup):
        super().__init__(num_local, dim, _weight=torch.empty(num_local, dim))  # filled by the loader
        self.group, self.start = group, group.rank * num_local

    def forward(self, ids: Tensor) -> Tensor:
        # ids (T,) global token ids -> (T, dim)
        local = ids - self.start
        inside = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(local.masked_fill(~inside, 0), self.weight)
        return self.group.all_reduce(x.masked_fill(~inside[:, None], 0))

    def extra_repr(self) -> str:
        return f"rows {self.start}..{self.start + self.num_embeddings - 1} of the vocabulary, " + \
            super().extra_repr()
