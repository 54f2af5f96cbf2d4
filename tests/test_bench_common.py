"""The benchmark harness (tools/bench): registry, timing, the copy yardstick, and CPU labelling."""
from __future__ import annotations

import json

import torch

from tools.bench import bench_names, load_bench
from tools.bench.__main__ import main
from tools.bench.common import (copy_bandwidth, format_table, l2_bytes, rotation_count, time_calls)

CPU = torch.device("cpu")


def test_registry_runs_copy_first_and_e2e_last():
    names = bench_names()
    assert names[0] == "copy" and "store_kv" in names and "common" not in names
    if "e2e" in names:
        assert names[-1] == "e2e"
    for name in names:
        assert callable(load_bench(name).run)


def test_rotation_exceeds_four_times_the_cache():
    per_set = 3 << 20
    n = rotation_count(per_set, CPU)
    assert n * per_set > 4 * l2_bytes(CPU) and n >= 2
    assert rotation_count(10 * l2_bytes(CPU), CPU) == 2  # big inputs: two sets already miss the cache


def test_time_calls_cycles_through_every_input_set():
    seen = []
    timing = time_calls(lambda i: seen.append(i), CPU, n_inputs=3, runs=3, warmup=0, target_run_s=1e-4)
    assert timing.method == "perf_counter" and 0 < timing.min_s <= timing.median_s <= timing.max_s
    assert set(seen) == {0, 1, 2}


def test_copy_bandwidth_counts_read_plus_write():
    result = copy_bandwidth(CPU, nbytes=4 << 20, runs=3)
    assert result["copy_correct"] and result["bytes_moved"] == 8 << 20
    assert abs(result["gbps"] - 8 * 2**20 / result["timing"]["median_s"] / 1e9) < 1e-6 * result["gbps"]


def test_bench_copy_writes_json_labelled_as_cpu(tmp_path, capsys):
    out = tmp_path / "copy.json"
    assert main(["copy", "--device", "cpu", "--mib", "4", "--runs", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["bench"] == "copy" and data["is_gpu"] is False and "CPU" in data["device"]
    assert data["summary"][0]["unit"] == "GB/s" and data["summary"][0]["value"] > 0
    assert "GB/s" in capsys.readouterr().out


def test_format_table_aligns_columns():
    text = format_table([{"a": 1.23456, "b": "x"}, {"a": 10.0, "b": None}], ["a", "b"])
    lines = text.splitlines()
    assert lines[1].startswith("1.235") and lines[0].index("b") == lines[1].index("x") == len("1.235  ")


def test_ops_bench_counts_each_custom_op_once_and_no_views():
    from hf_util import LLAMA
    from tools.bench.ops import count_decode_step
    from tinyinfer.engine.llm_engine import LLMEngine
    engine = LLMEngine(LLAMA, device="cpu", dtype="float32", max_kv_tokens=1024)
    fused = count_decode_step(engine, batch=3)         # the fused CPU step (models/fused_cpu.py)
    assert fused["tinyinfer_cpu.decode_layers"] == 1 and "tinyinfer.paged_attention" not in fused
    engine.runner.model.fused_cpu_decode = False       # the per-op path it replaces
    counts = count_decode_step(engine, batch=3)
    layers = engine.config.num_layers
    for op in ("tinyinfer.paged_attention", "tinyinfer.rope_store_kv", "tinyinfer.silu_and_mul"):
        assert counts[op] == layers, (op, counts)
    assert counts["tinyinfer.fused_add_rmsnorm"] == 2 * layers
    assert counts["tinyinfer.linear"] == 4 * layers + 1       # qkv, o, gate_up, down; the lm_head
    assert not {"view", "slice", "unsqueeze"} & set(counts)
    assert engine.stats["free_blocks"] == engine.stats["num_blocks"]
