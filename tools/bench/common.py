"""What every benchmark needs to report an honest figure.

- The yardsticks: `copy_bandwidth()` measures a device-to-device copy (1 GiB on a GPU), counting bytes
  read + written; `read_bandwidth()` a read-only stream (torch.sum over 1 GiB: every byte read once,
  one value written). A memory-bound kernel's achieved GB/s over each says how close to the card's
  practical limit it runs; kernels that mostly read (attention, GEMV) can exceed the copy figure
  (reads alone stream faster than a read/write mix), so benches report both ratios, vs_copy and
  vs_read (`ratios()`). A spec-sheet number would flatter nobody but the vendor.
- Timing: `time_calls()` times many calls between two CUDA events (or replays them from a CUDA graph,
  which strips launch overhead), takes the median of several runs, and cycles through input sets that
  together exceed 4x the L2 cache (`rotation_count()`): every run makes at least one full pass over
  all the sets, so no call finds its inputs already cached. A graph that cannot be captured is an
  error, never a silent switch to eager timing.
- CPU fallbacks: everything runs on a CPU too (perf_counter timing), and every result carries its
  device label; a CPU figure is only a ratio within one run, never a claim about a GPU.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

GiB = 1 << 30
CPU_CACHE_BYTES = 32 << 20  # stand-in "L2" for a CPU: larger than most last-level caches per core


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible here; use --device cpu")
    return device


def cpu_only(bench: str, device: torch.device, threads: int) -> None:
    """A CPU benchmark's set-up: refuse another device; torch's threads (0 = torch's default)."""
    if device.type != "cpu":
        raise SystemExit(f"{bench} measures the CPU path; run it with --device cpu")
    if threads > 0:
        torch.set_num_threads(threads)


def is_gpu(device: torch.device) -> bool:
    return device.type == "cuda"


def device_label(device: torch.device) -> str:
    if is_gpu(device):
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / GiB:.0f} GiB)"
    return (f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
            "threads) -- CPU figures are ratios only")


def l2_bytes(device: torch.device) -> int:
    if is_gpu(device):
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return CPU_CACHE_BYTES


def synchronize(device: torch.device) -> None:
    if is_gpu(device):
        torch.cuda.synchronize(device)


# --quick (tools/bench/__main__.py): a dry run for the test suite -- smallest sizes, one timed run, two
# input sets; it proves a bench runs to the end, its figures mean nothing.
QUICK = False


def set_quick(on: bool) -> None:
    global QUICK
    QUICK = on


def rotation_count(bytes_per_set: int, device: torch.device, factor: int = 4, cap_bytes: int = 4 * GiB) -> int:
    """How many distinct input sets to cycle through so that together they exceed factor x L2."""
    if QUICK:
        return 2
    need = math.ceil(factor * l2_bytes(device) / max(bytes_per_set, 1)) + 1
    return max(2, min(need, max(2, cap_bytes // max(bytes_per_set, 1))))


@dataclass
class Timing:
    median_s: float          # per call
    min_s: float
    max_s: float
    runs: int
    calls_per_run: int
    method: str              # "cuda-graph", "cuda-events" or "perf_counter"

    def to_dict(self) -> dict:
        return asdict(self)


def _choose_calls(fn: Callable[[int], Any], device: torch.device, target_s: float) -> int:
    # Calls per run so that one run lasts about target_s: timer resolution and launch jitter vanish.
    synchronize(device)
    start = time.perf_counter()
    for i in range(3):
        fn(i)
    synchronize(device)
    per_call = max((time.perf_counter() - start) / 3, 1e-7)
    return max(1, min(10_000, math.ceil(target_s / per_call)))


def time_calls(fn: Callable[[int], Any], device: torch.device, n_inputs: int = 1, runs: int = 10,
               warmup: int = 3, target_run_s: float = 2e-3, graph: bool = False) -> Timing:
    """Per-call time of fn(i), where i picks input set i % n_inputs. Median of `runs` runs; each run makes
    at least one full pass over the n_inputs sets (more passes when one pass is shorter than
    target_run_s). graph=True captures a run's calls in a CUDA graph and replays it; an op that cannot
    be captured (e.g. it synchronises) raises RuntimeError -- time it with graph=False instead."""
    if QUICK:
        runs, warmup, target_run_s = 1, min(warmup, 1), 0.0
    for i in range(warmup):
        fn(i % n_inputs)
    calls = _choose_calls(lambda i: fn(i % n_inputs), device, target_run_s)
    calls = math.ceil(max(calls, n_inputs) / n_inputs) * n_inputs  # whole passes over every input set
    if not is_gpu(device):
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            for i in range(calls):
                fn(i % n_inputs)
            samples.append((time.perf_counter() - start) / calls)
        return Timing(statistics.median(samples), min(samples), max(samples), runs, calls, "perf_counter")

    replay, method = None, "cuda-events"
    if graph:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn(0)  # warm-up on the capture stream, as graph capture requires
        torch.cuda.current_stream(device).wait_stream(stream)
        try:
            with torch.cuda.graph(g):
                for i in range(calls):
                    fn(i % n_inputs)
        except RuntimeError as err:
            raise RuntimeError(f"time_calls: the timed op cannot be captured in a CUDA graph ({err}); "
                               "time it with graph=False (eager launches, events) instead") from err
        replay, method = g.replay, "cuda-graph"

    def one_run() -> None:
        if replay is not None:
            replay()
        else:
            for i in range(calls):
                fn(i % n_inputs)

    one_run()  # warm the graph / allocator
    samples = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        one_run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    return Timing(statistics.median(samples), min(samples), max(samples), runs, calls, method)


def gbps(bytes_moved: int, seconds: float) -> float:
    return bytes_moved / seconds / 1e9


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, runs: int = 10) -> dict:
    """Measured device-to-device copy bandwidth: one copy of nbytes (1 GiB on a GPU, 256 MiB on a
    CPU) counts nbytes read + nbytes written."""
    nbytes = nbytes or (1 << 20 if QUICK else GiB if is_gpu(device) else 256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    timing = time_calls(lambda i: dst.copy_(src), device, runs=runs, warmup=2, target_run_s=0.0)
    equal = bool(torch.equal(src[:: max(1, nbytes // 4096)], dst[:: max(1, nbytes // 4096)]))
    return {"bytes": nbytes, "bytes_moved": 2 * nbytes, "gbps": gbps(2 * nbytes, timing.median_s),
            "timing": timing.to_dict(), "copy_correct": equal}


def read_bandwidth(device: torch.device, nbytes: Optional[int] = None, runs: int = 10) -> dict:
    """Measured read-only streaming bandwidth: torch.sum over nbytes of float32 (1 GiB on a GPU, 256 MiB on
    a CPU) reads every byte once and writes one value; the figure is nbytes / median time."""
    nbytes = nbytes or (1 << 20 if QUICK else GiB if is_gpu(device) else 256 << 20)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_(0.5, 1.5)  # never zeros
    out = torch.empty((), dtype=torch.float32, device=device)
    timing = time_calls(lambda i: torch.sum(x, dim=0, out=out), device, runs=runs, warmup=2, target_run_s=0.0)
    plausible = bool(abs(out.item() / x.numel() - 1.0) < 0.01)  # the mean of U(0.5, 1.5) is 1
    return {"bytes": nbytes, "bytes_moved": nbytes, "gbps": gbps(nbytes, timing.median_s),
            "timing": timing.to_dict(), "sum_correct": plausible}


def yardsticks(device: torch.device) -> dict:
    """Both yardsticks of this device: {"copy": copy_bandwidth, "read": read_bandwidth} results."""
    return {"copy": copy_bandwidth(device), "read": read_bandwidth(device)}


def ratios(achieved_gbps: float, sticks: dict) -> dict:
    """A kernel's achieved GB/s over both yardsticks."""
    return {"vs_copy": achieved_gbps / sticks["copy"]["gbps"], "vs_read": achieved_gbps / sticks["read"]["gbps"]}


def yardstick_label(sticks: dict) -> str:
    return f"copy {sticks['copy']['gbps']:.1f} GB/s (read + write), read-only {sticks['read']['gbps']:.1f} GB/s"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def summary_row(name: str, value: float, unit: str, **extra: Any) -> dict:
    """One line of a bench's headline figures: gpu-check's final table prints these rows
    (extra keys, e.g. vs_copy=0.83, vs_torch=2.1, become columns)."""
    return {"name": name, "value": value, "unit": unit, **extra}


def machine_name(device: torch.device) -> str:
    """The machine a figure came from, for plot titles: the GPU's name, else the CPU's model and cores."""
    if is_gpu(device):
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)
    except OSError:
        pass                                                   # not Linux: platform's name stands
    return f"{model}, {os.cpu_count()} cores"


def envelope(bench: str, device: torch.device, results: dict) -> dict:
    """The JSON every bench writes: what ran where (and how loaded the machine was at the end), and its
    results."""
    return {"bench": bench, "device": device_label(device), "machine": machine_name(device),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "is_gpu": is_gpu(device),
            "torch": torch.__version__, "cuda": torch.version.cuda, "commit": git_commit(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), **results}


def write_json(path: Optional[str], data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")


def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
