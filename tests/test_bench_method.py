"""The benchmark method (tools/bench/common.py): every timed run covers every rotated input set, and the
read-only yardstick sits beside the copy bandwidth with both ratios."""
from __future__ import annotations

import torch

from tools.bench.common import ratios, read_bandwidth, time_calls

CPU = torch.device("cpu")


def test_every_run_passes_over_every_input_set():
    # 50 input sets and a run target so short that one call would do: each run still calls all 50.
    seen: list[int] = []
    timing = time_calls(lambda i: seen.append(i), CPU, n_inputs=50, runs=2, warmup=0, target_run_s=0.0)
    assert timing.calls_per_run >= 50 and timing.calls_per_run % 50 == 0
    timed = seen[3:]  # after the 3 calls that size a run
    assert len(timed) == 2 * timing.calls_per_run
    assert all(set(timed[r * timing.calls_per_run:][:50]) == set(range(50)) for r in range(2))


def test_read_bandwidth_counts_bytes_read_once():
    result = read_bandwidth(CPU, nbytes=4 << 20, runs=3)
    assert result["sum_correct"] and result["bytes_moved"] == 4 << 20
    assert abs(result["gbps"] - (4 << 20) / result["timing"]["median_s"] / 1e9) < 1e-6 * result["gbps"]


def test_ratios_against_both_yardsticks():
    sticks = {"copy": {"gbps": 4000.0}, "read": {"gbps": 5000.0}}
    assert ratios(4000.0, sticks) == {"vs_copy": 1.0, "vs_read": 0.8}
