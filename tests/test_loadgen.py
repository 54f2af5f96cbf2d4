"""The serving benchmark's load generator (tools/loadgen.py): Poisson arrivals at the asked rate,
percentiles as numpy computes them, and a real run against the server where every request gets its
fixed number of tokens and sensible timings."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from hf_util import LLAMA
from serve_util import ServerThread
from tinyinfer import LLMEngine
from tools.loadgen import arrival_times, percentile, run_load, summarize


def test_arrivals_are_a_poisson_process_at_the_rate():
    times = arrival_times(20000, rate=8.0, seed=1)
    gaps = np.diff(times)
    assert times[0] == 0 and np.all(gaps >= 0)
    assert statistics.fmean(gaps) == pytest.approx(1 / 8, rel=0.03)
    assert statistics.pstdev(gaps) == pytest.approx(1 / 8, rel=0.05)     # exponential: sd = mean
    assert arrival_times(5, math.inf, 0) == [0.0] * 5
    assert arrival_times(50, 3.0, 7) == arrival_times(50, 3.0, 7)


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    values = list(np.random.default_rng(0).exponential(size=37))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_a_run_against_the_server_gets_every_token():
    srv = ServerThread(LLMEngine(LLAMA, device="cpu", dtype="float32", max_kv_tokens=2048))
    try:
        requests = [([1, 5 + i, 6, 7], 5 + i) for i in range(8)]
        results, duration = run_load(srv.url + "/v1", requests, rate=50.0, seed=0, model="demo",
                                     timeout=60)
    finally:
        srv.stop()
    assert [r.error for r in results] == [None] * 8
    assert [r.tokens for r in results] == [n for _, n in requests]
    assert all(r.sent < r.first <= r.done for r in results)
    s = summarize(results, duration)
    assert s["completed"] == 8 and s["output_tokens"] == sum(n for _, n in requests)
    assert 0 < s["ttft_p50_ms"] <= s["ttft_p99_ms"] and 0 < s["tpot_p50_ms"] <= s["tpot_p99_ms"]
