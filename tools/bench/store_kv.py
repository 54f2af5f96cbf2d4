"""store_kv: achieved bandwidth of writing new K/V rows into the paged cache (cuda/store_kv.cu).

A pure copy: each call reads T x Hkv x (D + Dv) values and writes as many into scattered cache slots,
so its GB/s (read + written) over the measured copy bandwidth is how close it gets to the card's limit
(the read-only ratio is printed beside it for comparison with the other benches).
The torch baseline is the best plain-PyTorch equivalent, index_copy_ into the flattened cache.
Inputs rotate over > 4x L2; slots are random rows of a cache far larger than L2.
"""
from __future__ import annotations

import argparse

import torch

from tinyinfer import ops
from tools.bench.common import (device_label, format_table, gbps, is_gpu, ratios, rotation_count, summary_row,
                                time_calls, yardstick_label, yardsticks)

# name, T, Hkv, D, Dv (0 = MLA latent, no V): Llama-2-7B's 32 kv heads x 128, DeepSeek's 512 + 64 latent.
CASES = [("decode b64, 32x128", 64, 32, 128, 128),
         ("prefill 2048, 32x128", 2048, 32, 128, 128),
         ("decode b64, MLA 576", 64, 1, 576, 0)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="cache dtype")
    parser.add_argument("--cache-mib", type=int, default=None,
                        help="size of each cache tensor (default: 512 MiB on a GPU, 64 MiB on a CPU)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs; the median is reported")


def _bench_case(case, dtype, cache_bytes, device, runs) -> dict:
    name, T, H, D, Dv = case
    es = torch.empty((), dtype=dtype).element_size()
    BS = 16
    num_blocks = max(cache_bytes // (BS * H * D * es), (2 * T) // BS + 1)
    k_cache = torch.zeros(num_blocks, BS, H, D, dtype=dtype, device=device)
    v_cache = torch.zeros(num_blocks, BS, H, Dv, dtype=dtype, device=device) if Dv else None
    row_bytes = T * H * (D + Dv) * es
    n = rotation_count(row_bytes, device)
    ks = [torch.randn(T, H, D, device=device, dtype=dtype) for _ in range(n)]
    vs = [torch.randn(T, H, Dv, device=device, dtype=dtype) if Dv else None for _ in range(n)]
    slots = [torch.randperm(num_blocks * BS, device=device)[:T] for _ in range(n)]

    def kernel(i: int) -> None:
        ops.store_kv(ks[i], vs[i], k_cache, v_cache, slots[i])

    flat_k = k_cache.view(-1, H, D)
    flat_v = v_cache.view(-1, H, Dv) if Dv else None

    def torch_baseline(i: int) -> None:
        flat_k.index_copy_(0, slots[i], ks[i])
        if flat_v is not None:
            flat_v.index_copy_(0, slots[i], vs[i])

    t_kernel = time_calls(kernel, device, n_inputs=n, runs=runs, graph=is_gpu(device))
    t_torch = time_calls(torch_baseline, device, n_inputs=n, runs=runs, graph=is_gpu(device))
    moved = 2 * row_bytes
    return {"case": name, "T": T, "Hkv": H, "D": D, "Dv": Dv, "bytes_moved": moved, "input_sets": n,
            "kernel": t_kernel.to_dict(), "torch": t_torch.to_dict(),
            "kernel_gbps": gbps(moved, t_kernel.median_s), "torch_gbps": gbps(moved, t_torch.median_s),
            "us_per_call": t_kernel.median_s * 1e6}


def run(args: argparse.Namespace, device: torch.device) -> dict:
    dtype = getattr(torch, args.dtype)
    cache_bytes = (args.cache_mib or (512 if is_gpu(device) else 64)) << 20
    sticks = yardsticks(device)
    rows = [_bench_case(case, dtype, cache_bytes, device, args.runs) for case in CASES]
    for r in rows:
        r.update(ratios(r["kernel_gbps"], sticks))
        r["vs_torch"] = r["torch"]["median_s"] / r["kernel"]["median_s"]
    print(f"{device_label(device)}; {yardstick_label(sticks)}; store_kv {args.dtype}")
    print(format_table(rows, ["case", "us_per_call", "kernel_gbps", "torch_gbps", "vs_copy", "vs_read", "vs_torch"]))
    summary = [summary_row(f"store_kv {r['case']}", r["kernel_gbps"], "GB/s", vs_copy=r["vs_copy"],
                           vs_read=r["vs_read"], vs_torch=r["vs_torch"]) for r in rows]
    return {"yardsticks": sticks, "copy_gbps": sticks["copy"]["gbps"], "read_gbps": sticks["read"]["gbps"],
            "dtype": args.dtype, "cases": rows, "summary": summary}
