"""tpwire: what carrying a tensor-parallel step to the workers costs -- the StepBatch pickled down a pipe
(the spawn path, one machine) against one broadcast of its words over the group's gloo backend
(engine/step_wire.py: the torchrun path, any number of machines) -- on one machine, two processes
(rank 0 here, rank 1 spawned), gloo over loopback.

Each timed step: rank 0 hands the step's batch over (pipe or broadcast), the worker decodes it, and both
meet in one all-reduce of a (B, 256) float32 row block (the first collective of a real step, where rank 0
would first wait for the worker). "none" is that all-reduce alone: a mode's cost per step is its median
minus none's. Modes interleave round by round; medians over rounds. A decode step of B sequences, each
with a block table of 8 blocks, and a prefill chunk of 512 tokens.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

from tinyinfer.engine import step_wire
from tinyinfer.engine.batch import StepBatch
from tinyinfer.layers.parallel import ParallelGroup
from tools.bench import common
from tools.bench.common import cpu_only, summary_row

MODES = ("none", "pipe", "broadcast")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=200, help="steps per mode and round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (modes interleaved in each)")


def make_batch(B: int, q: int) -> StepBatch:
    """B sequences of q new tokens each after 100 cached, block tables of 8 blocks."""
    ids = list(range(B * q))
    pos = [100 + i % q for i in range(B * q)]
    seq_lens = [100 + q] * B
    qsl = [b * q for b in range(B + 1)]
    tables = [list(range(8 * b, 8 * b + 8)) for b in range(B)]
    return StepBatch(ids, pos, list(range(B * q)), seq_lens, qsl, tables, prefill=False,
                     sampling=([0.7] * B, list(range(B)), [5] * B))


def _worker(store: str, conn) -> None:
    torch.set_num_threads(1)
    group = ParallelGroup.create("gloo", store, 1, 2, 60.0)
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            return
        _, mode, steps, rows = cmd
        x = torch.zeros(rows, 256)
        group.all_reduce(x)                               # both sides ready
        for _ in range(steps - 1):
            if mode == "pipe":
                conn.recv()
            elif mode == "broadcast":
                step_wire.receive(group)
            group.all_reduce(x)


def _time(group: ParallelGroup, conn, mode: str, batch: StepBatch, steps: int) -> float:
    x = torch.zeros(batch.num_seqs, 256)
    conn.send(("round", mode, steps, batch.num_seqs))
    group.all_reduce(x)                                   # both sides ready
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        if mode == "pipe":
            conn.send(("execute", batch))
        elif mode == "broadcast":
            done = step_wire.send(group, "execute", batch)
        group.all_reduce(x)
        if mode == "broadcast":
            done()
    return (time.perf_counter() - t0) / (steps - 1)


def run(args: argparse.Namespace, device: torch.device) -> dict:
    cpu_only("tpwire", device, 1)
    steps, rounds = (5, 1) if common.QUICK else (args.steps, args.rounds)
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    store_dir = tempfile.mkdtemp(prefix=f"tinyinfer-tp-{os.getpid()}-")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(f"{store_dir}/store", theirs), daemon=True)
    proc.start()
    results = {}
    try:
        group = ParallelGroup.create("gloo", f"{store_dir}/store", 0, 2, 60.0)
        cases = {"decode B=4": make_batch(4, 1), "decode B=64": make_batch(64, 1),
                 "prefill 512 tokens": make_batch(1, 512)}
        for name, batch in cases.items():
            times = {m: [] for m in MODES}
            for _ in range(rounds):
                for mode in MODES:
                    times[mode].append(_time(group, mine, mode, batch, steps))
            med = {m: statistics.median(v) for m, v in times.items()}
            words = len(step_wire.encode("execute", batch))
            results[name] = {"median_step_s": med, "words": words,
                             "cost_us": {m: (med[m] - med["none"]) * 1e6 for m in ("pipe", "broadcast")}}
            print(f"{name:20s} ({words} words): all-reduce alone {med['none'] * 1e6:7.1f} us; "
                  f"+ pipe {results[name]['cost_us']['pipe']:7.1f} us, "
                  f"+ broadcast {results[name]['cost_us']['broadcast']:7.1f} us per step "
                  f"(broadcast / pipe step time {med['broadcast'] / med['pipe']:.2f})")
        mine.send(("stop",))
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.kill()
        shutil.rmtree(store_dir, ignore_errors=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"load average {load}; {steps} steps x {rounds} rounds per mode, medians")
    results["load_average"] = float(load)
    results["summary"] = [summary_row(f"step transport {n}: broadcast / pipe", r["median_step_s"]["broadcast"]
                                      / r["median_step_s"]["pipe"], "x")
                          for n, r in results.items() if isinstance(r, dict)]
    return results
