"""The measurements of `make gpu-tune` (driver: tools/gpu_tune.py): the tuning spaces, fresh random
inputs, torch references, and L2-rotated CUDA-graph timing of each variant of the tuning library.

INT4 (cuda/int4_mm.cuh): per class of M (m-set count MS, M <= 8 MS), every tile configuration over one
Llama-3-8B decoder layer (byte-weighted time), bf16 activations, fp16 scales, uint8 zeros, G = 128; then
the split-K fill for the best tile. Each variant is first checked on a 48 x 8192 weight (three CTAs over
N, so the launcher splits K over clusters) against x @ W.T with W unpacked from the kernel layout by
ops/int4_format.py, normwise error <= 1e-2.

Attention (cuda/paged_attention.cuh): bf16, head dim 128, GQA 32/8, block size 16, shuffled blocks; every
tile configuration on the benchmark cases of its m-tile count, then the split fill and the minimum
partition for the best tile. Each variant is first checked on a small ragged batch against float64
softmax(q k^T s) v over the gathered keys (atol 2e-2).
"""
from __future__ import annotations

import ctypes
import math
import statistics
import time

import torch

from tinyinfer.ops.int4_format import TILE_K, dequantize_kernel_layout

# INT4: (WN, WK, R, KPS, STAGES) per m-set count MS; the first of each list is what cuda/tuned.cuh ships.
INT4_TILES = {
    1: [(1, 4, 2, 2, 4), (1, 4, 1, 2, 4), (1, 8, 1, 2, 3), (1, 2, 2, 4, 4), (2, 2, 1, 2, 4), (1, 4, 2, 2, 6)],
    2: [(1, 4, 4, 2, 4), (1, 4, 2, 2, 4), (2, 2, 2, 2, 4), (1, 2, 4, 4, 3), (4, 1, 1, 2, 4)],
    4: [(4, 1, 2, 2, 4), (2, 2, 2, 2, 4), (4, 1, 1, 2, 6), (2, 1, 4, 2, 4), (4, 2, 1, 2, 3)],
    8: [(4, 1, 2, 2, 4), (2, 2, 2, 2, 3), (4, 1, 1, 2, 4), (8, 1, 1, 2, 3)],
}
INT4_M = {1: 1, 2: 16, 4: 32, 8: 64}                                  # the M each class is timed at
LAYER = [(6144, 4096, 1), (4096, 4096, 1), (14336, 4096, 2), (4096, 14336, 1)]  # Llama-3-8B (N, K, count)
# Attention: (warps, keys per tile, stages); the first is what tuned.cuh ships. Cases: (name, B, L, q_len, MT).
ATTN_TILES = [(4, 64, 3), (4, 32, 4), (4, 64, 2), (8, 64, 3), (8, 128, 2), (8, 32, 4)]
ATTN_CASES = [("bs1 ctx32k", 1, 32768, 1, 1), ("bs32 ctx4k", 32, 4096, 1, 1),
              ("bs32 ctx4k q4", 32, 4096, 4, 1), ("bs8 ctx4k q16", 8, 4096, 16, 4)]
HQ, HKV, D, BS = 32, 8, 128, 16
FILLS, MIN_CHUNKS = (0.5, 1.0, 2.0, 4.0), (128, 256, 512)
VOID = ctypes.c_void_p
DEVICE = "cuda"  # where inputs are made; a dry run of the sweeps on a CPU (with a stand-in library) sets "cpu"


def int4_name(ms: int, tile: tuple) -> str:
    return f"int4_ms{ms}_" + "_".join(map(str, tile))


def attn_name(mt: int, tile: tuple) -> str:
    return f"attn_mt{mt}_" + "_".join(map(str, tile))


def ptr(t: torch.Tensor) -> VOID:
    return VOID(t.data_ptr())


def stream() -> VOID:
    return VOID(torch.cuda.current_stream().cuda_stream)


def checked(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what}: the tuning library returned {code} (a cudaError_t, or -1: workspace)")


def n_sets(bytes_per_set: int) -> int:
    """Input sets to rotate through so that together they exceed 4x the L2 cache (at most 4 GiB)."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(math.ceil(4 * l2 / bytes_per_set) + 1, (4 << 30) // bytes_per_set))


def time_per_call(call, sets: int, runs: int = 7) -> float:
    """Median seconds per call(i): each CUDA-graph replay makes >= 1 pass over every input set."""
    call(0)
    torch.cuda.synchronize()
    passes, graph = max(1, math.ceil(48 / sets)), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(passes):
            for i in range(sets):
                call(i)
    graph.replay()
    samples = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / (passes * sets))
    return statistics.median(samples)


def copy_gbps() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written over the median time."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE).random_(0, 256)
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_per_call(lambda i: dst.copy_(src), 1, runs=5) / 1e9


# ---- INT4 ---------------------------------------------------------------------------------------------

def int4_weights(n: int, k: int) -> tuple[torch.Tensor, ...]:
    nt = n // 16
    return (torch.randint(-2**31, 2**31 - 1, (nt, k // 64, 32, 4), dtype=torch.int32, device=DEVICE),
            (torch.rand(nt, k // 128, 16, device=DEVICE) * 0.02 + 0.002).half(),
            torch.randint(0, 16, (nt, k // 128, 16), dtype=torch.uint8, device=DEVICE))


def int4_reference(x: torch.Tensor, qw: torch.Tensor, sc: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """x @ W.T in float32, W = (q - z) s unpacked from the kernel layout (ops/int4_format.py)."""
    return x.float() @ dequantize_kernel_layout(qw, sc, zs, qw.shape[1] * TILE_K).T


def int4_row(lib, ms: int, tile: tuple, fill: float, x, sets: dict, copy: float, deadline: float) -> dict:
    row = {"tile": tile, "fill": fill}
    if time.perf_counter() > deadline:
        return {**row, "note": "not timed (budget)"}
    fn, m = getattr(lib, int4_name(ms, tile)), INT4_M[ms]
    qw, sc, zs = int4_weights(48, 8192)
    xs = torch.randn(m, 8192, device=DEVICE).bfloat16()
    y = torch.full((m, 48), float("nan"), device=DEVICE).bfloat16()
    checked(fn(ptr(xs), ptr(qw), ptr(sc), ptr(zs), ptr(y), m, 48, 8192, 0, ctypes.c_float(fill), stream()), "int4")
    ref = int4_reference(xs, qw, sc, zs)
    row["error"] = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    row["ok"] = row["error"] <= 1e-2
    total_t = total_b = 0
    for n, k, count in LAYER:
        y, ws = torch.empty(m, n, device=DEVICE).bfloat16(), sets[(n, k)]
        t = time_per_call(lambda i: checked(fn(ptr(x), *map(ptr, ws[i]), ptr(y), m, n, k, 0, ctypes.c_float(fill),
                                               stream()), "int4"), len(ws))
        row[f"{n}x{k}_us"] = t * 1e6
        total_t, total_b = total_t + count * t, total_b + count * (n * k // 2 + n * k // 128 * 3)
    return {**row, "layer_us": total_t * 1e6, "vs_copy": total_b / total_t / 1e9 / copy}


def tune_int4(lib, copy: float, deadline: float) -> dict:
    report = {}
    for ms, tiles in INT4_TILES.items():
        x = torch.randn(INT4_M[ms], max(k for _, k, _ in LAYER), device=DEVICE).bfloat16()
        sets = {(n, k): [int4_weights(n, k) for _ in range(n_sets(n * k // 2))] for n, k, _ in LAYER}
        rows = [int4_row(lib, ms, t, 1.0, x, sets, copy, deadline) for t in tiles]
        timed = [r for r in rows if r.get("ok")]
        best = min(timed, key=lambda r: r["layer_us"]) if timed else None
        sweep = [int4_row(lib, ms, best["tile"], f, x, sets, copy, deadline) for f in FILLS if f != 1.0] if best else []
        fill = min([best] + [r for r in sweep if r.get("ok")], key=lambda r: r["layer_us"])["fill"] if best else None
        report[ms] = {"M": INT4_M[ms], "rows": rows, "fill_sweep": sweep, "chosen": best, "fill": fill}
        del sets
        torch.cuda.empty_cache()
    return report


# ---- attention ----------------------------------------------------------------------------------------

def attn_data(b: int, length: int, q_len: int, sets: int) -> dict:
    """`sets` input sets sharing one pool of shuffled blocks: per set its own block tables and queries."""
    blocks = math.ceil(length / BS)
    pool = sets * b * blocks
    k, v = (torch.randn(pool, BS, HKV, D, device=DEVICE).bfloat16() for _ in range(2))
    tables = torch.randperm(pool, device=DEVICE).int().view(sets, b, blocks)
    return {"k": k, "v": v, "tables": tables, "q": [torch.randn(b * q_len, HQ, D, device=DEVICE).bfloat16()
                                                     for _ in range(sets)],
            "lens": torch.full((b,), length, dtype=torch.int32, device=DEVICE),
            "qsl": torch.arange(b + 1, dtype=torch.int32, device=DEVICE) * q_len, "q_len": q_len,
            "out": torch.empty(b * q_len, HQ, D, device=DEVICE).bfloat16(),
            "ws": torch.empty(b * q_len * HQ * (length // min(MIN_CHUNKS) + 1) * (D + 2), device=DEVICE)}


def attn_call(fn, d: dict, i: int, fill: float, min_chunk: int) -> int:
    b, mb, splits = d["lens"].numel(), d["tables"].shape[2], ctypes.c_int(0)
    checked(fn(ptr(d["q"][i]), ptr(d["k"]), ptr(d["v"]), ptr(d["tables"][i]), ptr(d["lens"]), ptr(d["qsl"]),
               ptr(d["out"]), ptr(d["ws"]), ctypes.c_longlong(d["ws"].numel()), d["out"].shape[0], b, mb, HQ, HKV,
               BS, ctypes.c_float(D ** -0.5), ctypes.c_float(fill), min_chunk, stream(), ctypes.byref(splits)),
            "attention")
    return splits.value


def attn_reference(d: dict) -> torch.Tensor:
    """float64 causal softmax(q k^T / sqrt(D)) v per sequence, keys gathered through the block table."""
    q_len, outs, dev = d["q_len"], [], d["k"].device
    for b, n in enumerate(d["lens"].tolist()):
        pos = torch.arange(n, device=dev)
        slots = d["tables"][0, b].long()[pos // BS] * BS + pos % BS
        k, v = (d[x].view(-1, HKV, D)[slots].double() for x in ("k", "v"))
        q = d["q"][0][b * q_len:(b + 1) * q_len].double().view(q_len, HKV, HQ // HKV, D)
        s = torch.einsum("qhgd,nhd->hgqn", q, k) * D ** -0.5
        s = s.masked_fill(pos > (n - q_len + torch.arange(q_len, device=dev))[:, None], float("-inf"))
        outs.append(torch.einsum("hgqn,nhd->qhgd", s.softmax(-1), v).reshape(q_len, HQ, D))
    return torch.cat(outs)


def attn_row(lib, tile: tuple, fill: float, min_chunk: int, data: dict, copy: float, deadline: float) -> dict:
    row = {"tile": tile, "fill": fill, "min_chunk": min_chunk}
    if time.perf_counter() > deadline:
        return {**row, "note": "not timed (budget)"}
    errors = []
    for mt, q_len in ((1, 1), (4, 16)):  # a ragged check batch per m-tile count
        check = attn_data(3, 1008, q_len, 1)
        check["lens"].copy_(torch.tensor([300, 17, 1000]))
        attn_call(getattr(lib, attn_name(mt, tile)), check, 0, fill, min_chunk)
        errors.append((check["out"].double() - attn_reference(check)).abs().max().item())
    row.update(error=max(errors), ok=max(errors) <= 2e-2, total_us=0.0)
    for name, b, length, q_len, mt in ATTN_CASES:
        d, fn = data[name], getattr(lib, attn_name(mt, tile))
        row[f"{name} splits"] = attn_call(fn, d, 0, fill, min_chunk)
        t = time_per_call(lambda i: attn_call(fn, d, i, fill, min_chunk), len(d["q"]))
        kv_bytes = 2 * b * length * HKV * D * 2
        row.update({f"{name} us": t * 1e6, f"{name} vs_copy": kv_bytes / t / 1e9 / copy})
        row["total_us"] += t * 1e6
    return row


def tune_attention(lib, copy: float, deadline: float) -> dict:
    data = {name: attn_data(b, length, q_len, n_sets(2 * b * length * HKV * D * 2))
            for name, b, length, q_len, _ in ATTN_CASES}
    rows = [attn_row(lib, t, 1.0, 256, data, copy, deadline) for t in ATTN_TILES]
    timed = [r for r in rows if r.get("ok")]
    best = min(timed, key=lambda r: r["total_us"]) if timed else None
    sweep = [attn_row(lib, best["tile"], f, 256, data, copy, deadline) for f in FILLS if f != 1.0] if best else []
    fill = min([best] + [r for r in sweep if r.get("ok")], key=lambda r: r["total_us"])["fill"] if best else None
    sweep += [attn_row(lib, best["tile"], fill, c, data, copy, deadline) for c in MIN_CHUNKS if c != 256] if best else []
    final = min([best] + [r for r in sweep if r.get("ok")], key=lambda r: r["total_us"]) if best else None
    return {"rows": rows, "sweep": sweep, "chosen": final}
