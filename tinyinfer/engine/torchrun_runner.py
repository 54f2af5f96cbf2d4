"""Rank 0 of a torchrun launch: the engine's model runner (ModelRunner's interface) when torchrun started
the processes (engine/torchrun.py), on one machine or several.

Each call broadcasts the command over the group (engine/step_wire.py; the broadcast overlaps rank 0's
own share of the step), then runs rank 0's shard; the ranks meet in the model's collectives. A failed
step names the rank at fault: the one that reported an error in the store, or the one whose heartbeat
stopped (killed, its machine gone), waiting up to `LOST_S` for it. After a failure every later call
raises the same `TensorParallelError`, and rank 0 stops its heartbeat so the workers leave.
"""
from __future__ import annotations

import time
import weakref
from typing import Callable, Optional

import torch

from tinyinfer.config.model import ModelConfig
from tinyinfer.engine import step_wire
from tinyinfer.engine.torchrun import BEAT_S, LOST_S, Beats, Launch, check_size, join, worker
from tinyinfer.engine.workers import RankSpec, RankZeroFront, TensorParallelError, load_rank
from tinyinfer.loading.checkpoint import CheckpointFiles
from tinyinfer.loading.shard import check_files, check_int4_shards, check_shardable


def _farewell(group, beats: Beats, state: dict) -> None:
    """Tell the workers to leave (they exit) unless the group already failed; stop rank 0's
    heartbeat (a worker that missed the word leaves when it stops)."""
    if not state["failed"]:
        try:
            step_wire.send(group, "close")()
        except RuntimeError:
            pass
    beats.stopped.set()


class TorchrunRunner(RankZeroFront):
    """Global rank 0 of a torchrun launch, behind ModelRunner's interface."""

    def __init__(self, spec: RankSpec, launch: Launch, cfg: ModelConfig,
                 say: Callable[[str], None] = lambda msg: None):
        self.config, self.size, self.broken, self.lost = cfg, launch.world, None, None
        self._state = {"failed": False}          # shared with the finalizer: no farewell after a failure
        self.group, store, device = join(spec, launch)
        self.beats = Beats(store, 0, launch.world, self._lost)
        self.where = {r: self.beats.get(f"where/{r}", "host ?") for r in range(1, launch.world)}
        self._farewell = weakref.finalize(self, _farewell, self.group, self.beats, self._state)
        try:
            self.local = load_rank(spec, 0, self.group, say, device)
        except BaseException as err:
            raise self._stop(err) from err
        say(f"tensor parallel under torchrun: {launch.world} ranks ({spec.backend}, store "
            f"{launch.master}), rank 0 here; " +
            "; ".join(f"rank {r}: {w}" for r, w in self.where.items()))


    def failure(self) -> Optional[str]:
        """Why the group cannot step (it failed, or a rank's heartbeat stopped), None while it can."""
        return self.broken or self.lost

    def close(self) -> None:
        """The workers leave (their processes exit); rank 0's shard is released."""
        self._farewell()
        self.broken = self.broken or "the tensor-parallel engine was closed"
        self.local = None

    def _lost(self, rank: int, why: str) -> None:
        self._state["failed"] = True
        self.lost_rank = rank
        self.lost = (f"tensor-parallel rank {rank} ({self.where.get(rank, 'host ?')}) {why}: the "
                     "engine stopped; restart the torchrun job")

    def _run(self, op: str, *args):
        if self.broken:
            raise TensorParallelError(self.broken)
        if self.lost:
            self.broken = self.lost
            self.beats.stopped.set()
            self._state["failed"] = True
            raise TensorParallelError(self.broken, self.lost_rank)
        try:
            done = step_wire.send(self.group, op, *args)
            out = getattr(self.local, op)(*args)
            done()
            return out
        except BaseException as err:       # a rank failed, or Ctrl-C inside a step: the group is lost
            stopped = self._stop(err)
            if stopped is err:
                raise
            raise stopped from err

    def _stop(self, err: BaseException) -> BaseException:
        """Name the rank at fault -- one that reported an error, else one whose heartbeat stopped --
        waiting up to LOST_S + 2 beats; then stop rank 0's heartbeat (the workers leave)."""
        # /health says so at once; the rank at fault is named once known
        self.broken = (f"a tensor-parallel step failed ({type(err).__name__}: {err}); finding the rank "
                       "at fault")
        deadline = time.monotonic() + (0.0 if isinstance(err, KeyboardInterrupt) else LOST_S + 2 * BEAT_S)
        raised: dict[int, str] = {}
        while not raised and not self.lost:
            raised = {r: e for r in self.where if (e := self.beats.get(f"error/{r}"))}
            if raised or time.monotonic() >= deadline:
                break
            time.sleep(BEAT_S / 2)
        self.beats.stopped.set()
        self._state["failed"] = True
        if raised:
            rank = min(raised)
            self.broken = (f"tensor-parallel rank {rank} ({self.where[rank]}) raised {raised[rank]}; "
                           "the engine stopped: restart the torchrun job")
            return TensorParallelError(self.broken, rank)
        if self.lost:
            self.broken = self.lost
            return TensorParallelError(self.broken, self.lost_rank)
        self.broken = (f"tensor-parallel rank 0 ({type(err).__name__}: {err}); the engine stopped: "
                       "restart the torchrun job")
        return err


def load(path: str, files: CheckpointFiles, cfg: ModelConfig, size: int, launch: Launch,
         device: torch.device, dtype: torch.dtype, quant: Optional[str], kv_tokens: Optional[int],
         block_size: int, cuda_graphs: bool, group_size: int, say: Callable[[str], None],
         kv_memory: Optional[int], max_num_seqs: int, timeout_s: float) -> TorchrunRunner:
    """Rank 0's runner; on any other rank, the worker loop, then the process exits."""
    check_size(launch, size)
    check_shardable(cfg, size)
    check_files(files, size)
    if quant == "int4":
        check_int4_shards(cfg, size, group_size)
    if device.type == "cuda" and launch.local_rank >= torch.cuda.device_count():
        raise ValueError(f"torchrun's LOCAL_RANK={launch.local_rank} needs GPU cuda:{launch.local_rank}, "
                         f"torch sees {torch.cuda.device_count()}: give --nproc-per-node at most that")
    dev = "cuda" if device.type == "cuda" else "cpu"
    spec = RankSpec(path, size, dev, str(dtype).replace("torch.", ""), quant, group_size, kv_tokens,
                    block_size, cuda_graphs, f"torchrun {launch.master}", torch.get_num_threads(),
                    timeout_s, kv_memory, max_num_seqs)
    if launch.rank != 0:
        worker(spec, launch)                 # never returns: the process exits
    return TorchrunRunner(spec, launch, cfg, say)
