"""Tensor parallelism, the engine side: one model split over N ranks that step together (Megatron-style,
Shoeybi et al., "Megatron-LM", 2019; the sharding: layers/parallel.py, loading/shard.py,
docs/tensor-parallel.md).

`TensorParallelRunner` is what the engine holds instead of a `ModelRunner`, with the same interface:
the scheduler, sampler and tokenizer stay in the engine's process, once. Rank 0 runs in-process; ranks
1..N-1 are worker processes (torch.multiprocessing spawn; engine/workers.py). Each step rank 0 sends
the step's batch down every worker's pipe, then runs its own shard; the ranks meet in the collectives
(gloo on CPUs, NCCL on GPUs) and rank 0 ends with the gathered logits (and, for in-step sampling, the
tokens it drew from them: the same draws as one device makes from the same logits).

Failures stop the engine and say which rank: a worker that died (checked before each step, and seen at
once by the collective it leaves: gloo reports the closed connection), one that raised (it sends its
error before exiting), or one that hangs (every collective times out). The group cannot continue after a
rank is lost, so every worker is then stopped and each later call raises the same error. `close()` --
also run when the runner is garbage-collected and at interpreter exit -- asks the workers to leave and
kills those that do not within a few seconds; workers exit by themselves when the engine's process dies.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
import weakref
from multiprocessing.connection import Connection
from typing import Callable, Optional

import torch
import torch.multiprocessing as mp

from tinyinfer.config.model import ModelConfig
from tinyinfer.engine import torchrun, torchrun_runner
from tinyinfer.engine.model_runner import ModelRunner
from tinyinfer.engine.workers import (GUARD_HINT, RankSpec, RankZeroFront,  # noqa: F401
                                      TensorParallelError, load_rank, rank_device,
                                      refuse_spawn_bootstrap, rendezvous_dir, worker_main)
from tinyinfer.layers.parallel import ParallelGroup
from tinyinfer.loading.checkpoint import CheckpointFiles
from tinyinfer.loading.shard import check_files, check_int4_shards, check_shardable

TIMEOUT_S = 600.0          # a collective, or a worker's start, that takes longer fails
REPORT_WAIT_S = 3.0        # how long a failure waits for the workers' own reports
CLOSE_WAIT_S = 5.0         # how long close() waits for workers to leave before killing them


def check_devices(device: torch.device, size: int) -> None:
    """N ranks on CUDA need N GPUs from the one `device` names."""
    if device.type != "cuda":
        return
    first, count = device.index or 0, torch.cuda.device_count()
    if first + size > count:
        raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs (cuda:{first}..cuda:"
                         f"{first + size - 1}), torch sees {count}; use a smaller size, or device='cpu'")


def _how_it_ended(exitcode: Optional[int]) -> str:
    if exitcode is None:
        return "stopped responding"
    if exitcode < 0:
        return f"was killed by signal {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def _lost_peer(text: str) -> bool:
    """Whether an error only says that another rank went away (gloo's words for a closed socket)."""
    return any(m in text for m in ("Connection closed", "Connection reset", "Broken pipe",
                                   "Connection refused"))


def _shutdown(procs: list, conns: list[Connection], store_dir: str, wait_s: float) -> None:
    """Ask every worker to leave, kill the ones still there after wait_s, remove the rendezvous."""
    for conn in conns:
        try:
            conn.send(("close",))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)
    for conn in conns:
        conn.close()
    shutil.rmtree(store_dir, ignore_errors=True)


class TensorParallelRunner(RankZeroFront):
    """N model-runner ranks behind ModelRunner's interface (execute, execute_sampled, ...)."""

    def __init__(self, path: str, files: CheckpointFiles, cfg: ModelConfig, size: int,
                 device: torch.device, dtype: torch.dtype, quant: Optional[str] = None,
                 kv_tokens: Optional[int] = None, block_size: int = 16, cuda_graphs: bool = False,
                 group_size: int = 128, say: Callable[[str], None] = lambda msg: None,
                 timeout_s: float = TIMEOUT_S, kv_memory: Optional[int] = None,
                 max_num_seqs: int = 256, kv_cache_dtype: str = "auto"):
        check_shardable(cfg, size)
        check_files(files, size)
        check_devices(device, size)
        if quant == "int4":
            check_int4_shards(cfg, size, group_size)
        self.config, self.size, self.broken = cfg, size, None
        self._errors: dict[int, tuple] = {}        # rank -> its error message, once received
        refuse_spawn_bootstrap()
        store_dir = rendezvous_dir()
        dev = str(device) if device.type == "cuda" else "cpu"
        self.spec = RankSpec(path, size, dev, str(dtype).replace("torch.", ""), quant, group_size,
                             kv_tokens, block_size, cuda_graphs, f"{store_dir}/store",
                             torch.get_num_threads(), timeout_s, kv_memory, max_num_seqs,
                             kv_cache_dtype)
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        self._close = weakref.finalize(self, _shutdown, self.procs, self.conns, store_dir, CLOSE_WAIT_S)
        for rank in range(1, size):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(self.spec, rank, theirs, os.getpid()),
                               name=f"tinyinfer-tp-rank{rank}", daemon=True)
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(mine)
        try:
            self._wait_for("hello", timeout_s)
            self.group = ParallelGroup.create(self.spec.backend, self.spec.store, 0, size, timeout_s,
                                              rank_device(dev, 0))
            self.local = load_rank(self.spec, 0, self.group, say)
            self._wait_for("ready", timeout_s)
        except BaseException as err:
            stopped = self._stop(err)
            if stopped is err:
                raise
            raise stopped from err
        say(f"tensor parallel: {size} ranks ({self.spec.backend}), rank 0 in this process, workers "
            f"{', '.join(str(p.pid) for p in self.procs)}; the model, its KV heads and vocabulary "
            f"split {size} ways")

    worker_pids = property(lambda self: [p.pid for p in self.procs])

    def failure(self) -> Optional[str]:
        """Why the group cannot step (it failed, or a worker is gone), None while it can."""
        if self.broken:
            return self.broken
        dead = next(((r, p) for r, p in enumerate(self.procs, start=1) if not p.is_alive()), None)
        if dead is not None:
            return (f"tensor-parallel worker rank {dead[0]} (pid {dead[1].pid}) "
                    f"{_how_it_ended(dead[1].exitcode)}")
        return None

    def close(self) -> None:
        """Stop the workers (no process is left) and release rank 0's shard."""
        self._close()
        self.broken = self.broken or "the tensor-parallel engine was closed"
        self.local = self.group = None

    def _run(self, op: str, *args):
        if self.broken:
            raise TensorParallelError(self.broken)
        if not all(p.is_alive() for p in self.procs):
            raise self._stop(None)
        try:
            for conn in self.conns:
                conn.send((op, *args))
            return getattr(self.local, op)(*args)
        except BaseException as err:       # a rank failed, or Ctrl-C inside a step: the group is lost
            stopped = self._stop(err)
            if stopped is err:
                raise
            raise stopped from err

    def _wait_for(self, what: str, timeout_s: float) -> None:
        """Each worker's next message must be `what` (its start-up stages: "hello", "ready")."""
        deadline = time.monotonic() + timeout_s
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while not conn.poll(0.05):
                if not proc.is_alive():
                    err = self._stop(None)
                    if what == "hello" and isinstance(err, TensorParallelError):
                        self.broken = str(err) + GUARD_HINT
                        err = TensorParallelError(self.broken, err.rank, err.details)
                    raise err
                if time.monotonic() > deadline:
                    self._stop(None)
                    self.broken = (f"tensor-parallel rank {rank} (pid {proc.pid}) sent no '{what}' "
                                   f"within {timeout_s:.0f} s; the workers were stopped")
                    raise TensorParallelError(self.broken, rank)
            msg = conn.recv()
            if msg[0] != what:                     # its error: _stop reports it
                self._errors[rank] = msg
                raise self._stop(None)

    def _reports(self, wait_s: float) -> dict[int, tuple[str, str, bool]]:
        """rank -> (what happened, traceback, whether it raised) for every worker that failed,
        waiting up to wait_s for those on their way out (a lost peer fails every rank's collective)."""
        found: dict[int, tuple[str, str, bool]] = {}
        deadline = time.monotonic() + wait_s
        while True:                                  # at least one look at every worker
            for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
                if rank in found:
                    continue
                msg = self._errors.get(rank)
                try:
                    msg = msg or (conn.recv() if conn.poll() else None)
                except (EOFError, OSError):
                    pass
                if msg is not None and msg[0] == "error":
                    found[rank] = (f"raised {msg[1]}", msg[2], True)
                elif not proc.is_alive():
                    found[rank] = (_how_it_ended(proc.exitcode), "", False)
            if len(found) == len(self.procs) or time.monotonic() >= deadline:
                return found
            time.sleep(0.02)

    def _stop(self, err: Optional[BaseException]) -> BaseException:
        """Diagnose a failure, stop every worker, and return the error to raise. The cause, in order:
        a worker that died without a word (a signal, the OOM killer), rank 0's own error, a worker
        that raised; a rank that only lost its peer (gloo's closed connection) is a consequence."""
        # Ctrl-C is rank 0's own: do not wait for reports that will not come.
        found = self._reports(0.0 if isinstance(err, KeyboardInterrupt) else REPORT_WAIT_S)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        self._close()
        crashed = [r for r in sorted(found) if not found[r][2]]
        raised = [r for r in sorted(found) if found[r][2] and not _lost_peer(found[r][0])]
        if not crashed and err is not None and not _lost_peer(str(err)):
            self.broken = (f"tensor-parallel rank 0 failed ({type(err).__name__}: {err}); the workers "
                           "were stopped: create a new engine")
            return err
        order = crashed + raised + [r for r in sorted(found) if r not in crashed + raised]
        if not order:
            self.broken = f"tensor-parallel rank 0 lost its workers ({err}); create a new engine"
            return TensorParallelError(self.broken, 0)
        parts = [f"rank {r} (pid {self.procs[r - 1].pid}) {found[r][0]}" for r in order]
        self.broken = (f"tensor-parallel worker {parts[0]}; the engine stopped and its workers were "
                       f"shut down" + (f" (also {'; '.join(parts[1:])})" if parts[1:] else "") +
                       ": create a new engine")
        return TensorParallelError(self.broken, order[0], found[order[0]][1])


def load_runner(path: str, files: CheckpointFiles, cfg: ModelConfig, size: int, device: torch.device,
                dtype: torch.dtype, quant: Optional[str], kv_tokens: Optional[int], block_size: int,
                cuda_graphs: bool, group_size: int, say: Callable[[str], None],
                kv_memory: Optional[int] = None, max_num_seqs: int = 256,
                kv_cache_dtype: str = "auto") -> ModelRunner | TensorParallelRunner:
    """The engine's model runner: a ModelRunner on one device (size 1), else N ranks: spawned here,
    or launched by torchrun (engine/torchrun.py; on ranks other than 0 this call never returns)."""
    launch = torchrun.launched()
    if launch is not None:
        return torchrun_runner.load(path, files, cfg, size, launch, device, dtype, quant, kv_tokens,
                                    block_size, cuda_graphs, group_size, say, kv_memory, max_num_seqs,
                                    TIMEOUT_S)
    if size == 1:
        return ModelRunner.load(files, cfg, device, dtype, quant, kv_tokens, block_size, cuda_graphs,
                                say=say, group_size=group_size, kv_memory=kv_memory,
                                max_num_seqs=max_num_seqs, kv_cache_dtype=kv_cache_dtype)
    return TensorParallelRunner(path, files, cfg, size, device, dtype, quant, kv_tokens, block_size,
                                cuda_graphs, group_size, say, kv_memory=kv_memory,
                                max_num_seqs=max_num_seqs, kv_cache_dtype=kv_cache_dtype)
