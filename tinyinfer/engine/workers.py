"""Tensor-parallel ranks: loading one rank's model runner, and the loop a spawned worker process runs.

Every rank (rank 0 in the engine's process, ranks 1..N-1 in worker processes started by
engine/tensor_parallel.py with torch.multiprocessing's spawn) builds its `ModelRunner` the same way,
`load_rank`: the checkpoint located from its path, that rank's shard read (loading/shard.py), the KV
cache sized to what every rank fits. A worker then runs `worker_main`'s loop: each step rank 0 sends
it the step's batch over its pipe (a `StepBatch` of plain host lists, a few kB pickled) and the worker
runs the very same model-runner call as rank 0, so both take the same path (eager or the same CUDA graph)
and meet in the same collectives; it sends nothing back -- rank 0 holds the gathered logits.

A worker never outlives its engine: it ignores Ctrl-C (the engine stops it), leaves its loop when the
pipe closes, exits when its parent process is gone (a watchdog polls the parent id), and any error
inside it is sent to rank 0 (which reports the rank) before the process exits.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Callable, Optional

import torch

from tinyinfer.config.model import ModelConfig, parse_dtype
from tinyinfer.engine.batch import StepBatch
from tinyinfer.engine.model_runner import ModelRunner
from tinyinfer.layers.parallel import ParallelGroup
from tinyinfer.loading import checkpoint as ckpt
from tinyinfer.loading.shard import Shard

# What rank 0 may ask a worker to run: the ModelRunner methods that run collectives.
OPS = ("execute", "execute_sampled", "enable_verify_graphs")
PARENT_POLL_S = 0.5


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank failed (died, raised, or timed out); the engine cannot continue."""

    def __init__(self, message: str, rank: Optional[int] = None, details: str = ""):
        super().__init__(message)
        self.rank, self.details = rank, details


class RankZeroFront:
    """ModelRunner's interface on rank 0 of a tensor-parallel group (the spawned workers'
    TensorParallelRunner, torchrun's TorchrunRunner): rank 0's shard `local` answers for the
    attributes; every step goes through `_run`, which hands it to the other ranks as well."""
    local: ModelRunner

    model = property(lambda self: self.local.model)
    kv = property(lambda self: self.local.kv)
    device = property(lambda self: self.local.device)
    dtype = property(lambda self: self.local.dtype)
    block_size = property(lambda self: self.local.block_size)
    num_blocks = property(lambda self: self.local.num_blocks)
    graphs = property(lambda self: self.local.graphs)
    graph_pool = property(lambda self: self.local.graph_pool)

    def execute(self, batch: StepBatch, all_logits: bool = False) -> torch.Tensor:
        return self._run("execute", batch, all_logits)

    def execute_sampled(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._run("execute_sampled", batch)

    def enable_verify_graphs(self, q_len: int) -> None:
        self._run("enable_verify_graphs", q_len)

    def _run(self, op: str, *args):
        raise NotImplementedError


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank needs to load its shard (picklable: sent to each worker at spawn)."""
    path: str                        # the checkpoint
    size: int                        # N ranks
    device: str                      # "cpu", or "cuda[:k]": rank r runs on cuda:(k + r)
    dtype: str
    quant: Optional[str]
    group_size: int
    kv_tokens: Optional[int]
    block_size: int
    cuda_graphs: bool
    store: str                       # the rendezvous file (torch FileStore)
    threads: int                     # torch CPU threads of each worker
    timeout_s: float                 # every collective fails after this long
    kv_memory: Optional[int] = None  # KV budget in bytes per rank (engine/kv_cache.py)
    max_num_seqs: int = 256
    kv_cache_dtype: str = "auto"     # "fp8" / "int8": a quantized cache (docs/kv-cache.md)

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"


GUARD_HINT = ("; a worker that exits before it starts is most often a script that builds the engine "
              "at its top level: spawned workers re-run the script, so put that code under "
              "`if __name__ == \"__main__\":` (docs/tensor-parallel.md)")


def refuse_spawn_bootstrap() -> None:
    """In a spawned child still re-running the parent's main script (multiprocessing marks it
    `_inheriting`), building an engine means the script lacks the __main__ guard: say so."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError("a tensor-parallel engine is being built while a worker process re-runs "
                           "the script that started it: the script builds the engine at its top "
                           "level. Put that code under `if __name__ == \"__main__\":` (spawned "
                           "workers import the main script; docs/tensor-parallel.md)")


def rendezvous_dir() -> str:
    """A fresh directory for the group's FileStore, named after this process; directories of
    engines whose process is gone (SIGKILL: no clean-up ran) are removed first. Workers also remove
    it when they see their parent die (engine/workers.py)."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        parts = name.split("-")
        if name.startswith("tinyinfer-tp-") and len(parts) >= 4 and parts[2].isdigit() \
                and not _alive(int(parts[2])):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"tinyinfer-tp-{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                         # someone else's process: alive
        return True
    return True


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r's device: the CPU, or the r-th GPU counted from the one `device` names."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    return torch.device("cuda", (dev.index or 0) + rank)


def load_rank(spec: RankSpec, rank: int, group: ParallelGroup,
              say: Callable[[str], None] = lambda msg: None,
              device: Optional[torch.device] = None) -> ModelRunner:
    """Rank `rank`'s model runner: its shard of the checkpoint and its KV cache (on `device`, by
    default the rank's own: engine/torchrun.py gives the node's local one)."""
    files = ckpt.locate(spec.path)
    cfg = ModelConfig.from_hf(files.config, files.generation_config)
    shard = Shard(rank, spec.size, cfg, group)
    device = device or rank_device(spec.device, rank)
    return ModelRunner.load(files, cfg, device, parse_dtype(spec.dtype),
                            spec.quant, spec.kv_tokens, spec.block_size, spec.cuda_graphs, say=say,
                            group_size=spec.group_size, shard=shard, kv_memory=spec.kv_memory,
                            max_num_seqs=spec.max_num_seqs, kv_cache_dtype=spec.kv_cache_dtype)


def _exit_with_parent(parent_pid: int, store: str) -> None:
    """Exit this process as soon as its parent is gone (reparented: the parent id changes), removing
    the rendezvous directory the parent could not (killed: no clean-up ran there)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        shutil.rmtree(os.path.dirname(store), ignore_errors=True)
        os._exit(3)
    threading.Thread(target=watch, name="tinyinfer-parent-watch", daemon=True).start()


def _send_error(conn: Connection, err: BaseException) -> None:
    try:
        conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc()))
    except (OSError, ValueError):            # the pipe is gone too: rank 0 sees the exit code
        pass


def run_steps(runner: ModelRunner, next_command: Callable[[], tuple]) -> None:
    """The worker loop, spawned or launched by torchrun: rank 0's commands -- from the pipe
    (spawned) or broadcast over the group (torchrun; engine/step_wire.py) -- run on this rank's
    shard until rank 0 says "close"."""
    while True:
        op, *args = next_command()
        if op == "close":
            return
        if op not in OPS:
            raise ValueError(f"unknown tensor-parallel command {op!r}")
        getattr(runner, op)(*args)


def _from_pipe(conn: Connection, store: str) -> Callable[[], tuple]:
    def next_command() -> tuple:
        try:
            return conn.recv()
        except EOFError:                             # the engine is gone: it could not clean up
            shutil.rmtree(os.path.dirname(store), ignore_errors=True)
            return ("close",)
    return next_command


def worker_main(spec: RankSpec, rank: int, conn: Connection, parent_pid: int) -> None:
    """A worker process: join the group, load rank `rank`'s shard, then run rank 0's steps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # Ctrl-C reaches the engine, which stops us
    _exit_with_parent(parent_pid, spec.store)
    torch.set_num_threads(spec.threads)
    try:
        device = rank_device(spec.device, rank)
        conn.send(("hello", os.getpid()))
        group = ParallelGroup.create(spec.backend, spec.store, rank, spec.size, spec.timeout_s, device)
        runner = load_rank(spec, rank, group)
        conn.send(("ready", runner.num_blocks))
        run_steps(runner, _from_pipe(conn, spec.store))
    except BaseException as err:                          # noqa: B036 -- reported, then exit
        _send_error(conn, err)
        conn.close()
        os._exit(1)
    conn.close()
    os._exit(0)       # skip interpreter teardown: nothing is left to flush, and the group may be gone
