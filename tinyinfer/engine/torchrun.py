"""Tensor parallelism launched by torchrun, on one machine or several: every process torchrun starts
builds the engine as usual; global rank 0 keeps it (scheduler, sampler, tokenizer, server) and every
other rank becomes a worker (engine/workers.py's loop) that never returns to the caller's code.

torchrun's environment names the group (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: the
`env://` convention of torch.distributed); its store (a TCPStore on node 0) is the rendezvous. Each step
travels as one broadcast over the group's gloo backend (engine/step_wire.py), within a node and across
nodes alike. Failures (docs/tensor-parallel.md, "Launching with torchrun"): every rank beats a counter
in the store every `BEAT_S`; rank 0 declares a rank lost, naming its host and pid, when its counter has
not moved for `LOST_S` (/health turns 503), and a step that fails (gloo reports a closed connection at
once) waits up to that long to name the rank. A worker leaves when rank 0's counter stops or the store
is gone, so no worker outlives rank 0; torchrun's agent stops the rest of a node's processes when one
of them fails, and a rank whose agent is gone (SIGKILL: no clean-up ran) stops too.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from tinyinfer.engine import step_wire
from tinyinfer.engine.workers import RankSpec, load_rank, run_steps
from tinyinfer.layers.parallel import ParallelGroup

BEAT_S = 0.5          # every rank's heartbeat period
LOST_S = 10.0         # a rank whose heartbeat stopped this long is lost
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """Where torchrun placed this process."""
    rank: int
    world: int
    local_rank: int
    master: str                      # MASTER_ADDR:MASTER_PORT, the store

    @property
    def loopback(self) -> bool:
        return self.master.rsplit(":", 1)[0] in ("127.0.0.1", "localhost", "::1")


def launched() -> Optional[Launch]:
    """This process's place in a torchrun launch, or None when not launched so (or alone)."""
    if not all(k in os.environ for k in ENV):
        return None
    try:
        launch = Launch(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                        int(os.environ["LOCAL_RANK"]),
                        f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
    except ValueError as err:
        raise ValueError(f"torchrun's environment is malformed ({err}): RANK, WORLD_SIZE and "
                         "LOCAL_RANK must be integers") from err
    return launch if launch.world > 1 else None


def check_size(launch: Launch, size: int) -> None:
    """The model is split over every process torchrun started, no more, no fewer."""
    if size != launch.world:
        raise ValueError(f"tensor_parallel_size={size}, but torchrun started WORLD_SIZE={launch.world} "
                         f"processes (--nnodes x --nproc-per-node): pass --tensor-parallel-size "
                         f"{launch.world}, or launch {size} processes in all")


def _where() -> str:
    return f"host {socket.gethostname()}, pid {os.getpid()}"


def join(spec: RankSpec, launch: Launch) -> tuple[ParallelGroup, object, torch.device]:
    """Rendezvous through torchrun's store and form the group; each rank leaves its host and pid."""
    timeout = datetime.timedelta(seconds=spec.timeout_s)
    store, _, _ = next(dist.rendezvous("env://", launch.rank, launch.world, timeout=timeout))
    store = dist.PrefixStore("tinyinfer", store)
    store.set(f"where/{launch.rank}", _where())
    device = torch.device("cpu")
    if spec.device.startswith("cuda"):
        device = torch.device("cuda", launch.local_rank)
    group = ParallelGroup.on_store(spec.backend, store, launch.rank, launch.world, spec.timeout_s,
                                   device, "127.0.0.1" if launch.loopback else None,
                                   os.environ.get("GLOO_SOCKET_IFNAME"))
    store.set_timeout(datetime.timedelta(seconds=LOST_S))   # from now on only heartbeats use it
    return group, store, device


class Beats:
    """Heartbeats in the store: this rank's, beaten every BEAT_S from a thread, and the others'
    as last seen (rank -> monotonic time its counter last moved)."""

    def __init__(self, store: object, rank: int, world: int, on_lost: Callable[[int, str], None]):
        self.store, self.rank, self.lock = store, rank, threading.Lock()
        watch = range(1, world) if rank == 0 else [0]      # rank 0 watches all; a worker, rank 0
        self.seen = {r: (-1, time.monotonic()) for r in watch}
        self.on_lost, self.stopped = on_lost, threading.Event()
        threading.Thread(target=self._run, name="tinyinfer-tp-beats", daemon=True).start()

    def _run(self) -> None:
        agent = os.getppid()                   # torchrun's agent: this process must not outlive it
        while not self.stopped.wait(BEAT_S):
            if os.getppid() != agent:
                print(f"tinyinfer: tensor-parallel rank {self.rank} stops: torchrun's agent (pid "
                      f"{agent}) is gone", file=sys.stderr, flush=True)
                if self.rank != 0:
                    os._exit(3)
                os.kill(os.getpid(), signal.SIGTERM)     # rank 0: the server's (or default) shutdown
                return
            try:
                with self.lock:
                    self.store.add(f"beat/{self.rank}", 1)
                    counts = {r: self.store.add(f"beat/{r}", 0) for r in self.seen}
            except Exception as err:                     # the store (node 0) is gone
                self.on_lost(0, f"the rendezvous store is unreachable ({err})")
                return
            now = time.monotonic()
            for r, n in counts.items():
                if n != self.seen[r][0]:
                    self.seen[r] = (n, now)
                elif now - self.seen[r][1] > LOST_S:
                    self.on_lost(r, f"sent no heartbeat for {LOST_S:.0f} s")
                    return

    def get(self, key: str, default: str = "") -> str:
        try:
            with self.lock:
                return self.store.get(key).decode() if self.store.check([key]) else default
        except Exception:                                  # noqa: BLE001 -- the store is gone
            return default


def worker(spec: RankSpec, launch: Launch) -> None:
    """A rank > 0: join, load its shard, run rank 0's steps until it says close; then exit the
    process (the caller's code after building the engine runs on rank 0 only)."""
    code, beats = 1, None
    try:
        group, store, device = join(spec, launch)

        def lost(rank: int, why: str) -> None:
            print(f"tinyinfer: tensor-parallel rank {launch.rank} stops: rank 0 {why}",
                  file=sys.stderr, flush=True)
            os._exit(3)
        beats = Beats(store, launch.rank, launch.world, lost)
        runner = load_rank(spec, launch.rank, group, device=device)
        run_steps(runner, lambda: step_wire.receive(group))
        code = 0
    except BaseException as err:                           # noqa: B036 -- said, then exit
        text = f"{type(err).__name__}: {err}"
        print(f"tinyinfer: tensor-parallel rank {launch.rank} ({_where()}) failed: {text}\n"
              f"{traceback.format_exc()}", file=sys.stderr, flush=True)
        if beats is not None:
            try:
                with beats.lock:
                    beats.store.set(f"error/{launch.rank}", text)
            except Exception:                              # noqa: BLE001 -- the store is gone
                pass
    sys.stdout.flush()
    os._exit(code)
