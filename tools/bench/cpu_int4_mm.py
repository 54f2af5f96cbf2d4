"""cpu_int4_mm: the C++ CPU INT4 matmul (cpu/int4_linear.h) against torch's `_weight_int4pack_mm_for_cpu`
(what ops.int4_linear ran on a CPU before, docs/cpu-performance.md) on one model's INT4 linears.

The shapes are SmolLM2-135M's (hidden 576, MLP 1536, 9 query / 3 KV heads of 64: qkv 832 x 576,
o 576 x 576, gate_up 3072 x 576, down 576 x 1536; --layers copies, random Q4_1-style weights at group
32 with float16 scales and offsets), so one pass over them reads what a decode step reads (~62 MiB at
30 layers: from memory, not cache). Each timed pass multiplies bfloat16 x of --rows rows by every
layer, once through each kernel; the two alternate within each round (which goes first alternates
too), so a change in the machine's load falls on both. Medians over --rounds of wall time and of
process CPU time (steadier on a shared machine); at each --threads count. CPU figures: ratios within
this run only, the load average printed beside them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from tinyinfer.extensions import cpu as cpu_kernels
from tinyinfer.ops import int4_format as qformat
from tinyinfer.ops.cpu_matmul import tinygemm_weights
from tools.bench import common
from tools.bench.common import cpu_only, device_label, format_table, summary_row

SHAPES = [("qkv", 832, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]   # (N, K)
GROUP = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=30, help="copies of the four linears (SmolLM2: 30)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16, 200], help="rows of x")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")


def _layers(count: int) -> list[tuple[int, tuple, tuple]]:
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(count):
        for _, n, k in SHAPES:
            q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
            s = (torch.rand(n, k // GROUP, generator=gen) * 0.02 + 1e-3).half()
            m = (-torch.rand(n, k // GROUP, generator=gen) * 0.1).half()
            kernel = qformat.to_kernel_layout(q, s, m, GROUP)
            layers.append((k, kernel, tinygemm_weights(*kernel, k)))
    return layers


def _pass(layers, xs, own: bool) -> tuple[float, float]:
    lib = torch.ops.tinyinfer_cpu
    wall, cpu = time.perf_counter(), time.process_time()
    for k, kernel, (packed, scale_and_zero) in layers:
        if own:
            lib.int4_linear(xs[k], *kernel, GROUP)
        else:
            torch.ops.aten._weight_int4pack_mm_for_cpu(xs[k], packed, GROUP, scale_and_zero)
    return time.perf_counter() - wall, time.process_time() - cpu


def run(args: argparse.Namespace, device: torch.device) -> dict:
    cpu_only("cpu_int4_mm", device, 0)
    if cpu_kernels.library() is None:
        raise SystemExit("cpu_int4_mm: the C++ CPU library could not be built here (see its warning)")
    layers_n, rows_list = (2, [1, 2]) if common.QUICK else (args.layers, args.rows)
    rounds = 1 if common.QUICK else args.rounds
    layers = _layers(layers_n)
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in rows_list:
            xs = {k: torch.randn(rows, k).bfloat16() for k in {k for _, _, k in SHAPES}}
            times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for own in (True, False):                                             # warm-up
                _pass(layers, xs, own)
            for r in range(rounds):
                for own in ((True, False) if r % 2 == 0 else (False, True)):
                    times[own].append(_pass(layers, xs, own))
            med = {own: [statistics.median(t[i] for t in times[own]) * 1e3 for i in (0, 1)]
                   for own in times}
            results.append({"threads": threads, "rows": rows, "own_ms": med[True][0], "torch_ms": med[False][0],
                            "vs_torch": med[False][0] / med[True][0], "own_cpu_ms": med[True][1],
                            "torch_cpu_ms": med[False][1], "vs_torch_cpu": med[False][1] / med[True][1],
                            "loadavg": " ".join(f"{v:.1f}" for v in os.getloadavg())})
    print(f"{device_label(device)}; SmolLM2-135M's INT4 linears x {layers_n}, group {GROUP}, bfloat16 x, "
          f"medians of {rounds} interleaved rounds")
    print(format_table(results, ["threads", "rows", "own_ms", "torch_ms", "vs_torch", "own_cpu_ms",
                                 "torch_cpu_ms", "vs_torch_cpu", "loadavg"]))
    print("vs_torch > 1: the C++ kernel is faster (wall; _cpu: process CPU time)")
    summary = [summary_row(f"cpu int4 matmul {r['rows']} rows, {r['threads']} threads", r["own_ms"], "ms",
                           vs_torch=r["vs_torch"]) for r in results]
    return {"rows": results, "is_cpu_figure": True, "summary": summary}
