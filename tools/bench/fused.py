"""Fused decode-path ops: residual-add + RMSNorm, and RoPE + K/V cache write, vs the unfused torch ops.

fused_add_rmsnorm (cuda/fused_norm.cu) reads x, the residual stream and the weight and writes y and
the new stream: (4 T d + d) values. The baseline is the model's former path: `residual + x`, then
RMSNorm as separate torch ops (about six launches). rope_store_kv (cuda/rope_store_kv.cu) reads q, k,
v and each token's row of the model's cos/sin table (gathered at its position) and writes rotated q,
rotated k and the cache rows: T D (2 Hq + 5 Hkv + 1) values. Its baseline is the former path in torch
ops: the step's cos/sin rows computed from the positions (as a rotary-embedding module does, ~6 launches),
RoPE on q and k, then the store_kv kernel. At decode sizes both are latency-bound (a few KB per call),
so us/call is the figure that matters there; GB/s and the shares of the copy and read-only bandwidths
matter for prefill-sized T. Inputs rotate over > 4x L2, and every timed run passes over all of them.
"""
from __future__ import annotations

import argparse

import torch

from tinyinfer import ops
from tinyinfer.ops import reference
from tools.bench.common import (device_label, format_table, gbps, is_gpu, ratios, rotation_count, summary_row,
                                time_calls, yardstick_label, yardsticks)

NORM_CASES = [("norm decode b1, d4096", 1, 4096), ("norm decode b64, d4096", 64, 4096),
              ("norm prefill 2048, d4096", 2048, 4096)]
# name, T, Hq, Hkv, D: Llama-2-7B (MHA 32x128) and its GQA-8 variant.
ROPE_CASES = [("rope+store decode b1, 32/32x128", 1, 32, 32, 128),
              ("rope+store decode b64, 32/8x128", 64, 32, 8, 128),
              ("rope+store prefill 2048, 32/8x128", 2048, 32, 8, 128)]
MAX_POSITIONS = 4096  # rows of the cos/sin table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"],
                        help="activation and cache dtype")
    parser.add_argument("--runs", type=int, default=5, help="timed runs; the median is reported")


def _norm_case(case, dtype, device, runs) -> dict:
    name, T, d = case
    es = torch.empty((), dtype=dtype).element_size()
    n = rotation_count(2 * T * d * es, device)
    xs = torch.randn(n, T, d, device=device, dtype=dtype)          # one allocation, n input sets
    residuals = torch.randn(n, T, d, device=device, dtype=dtype)
    weight = torch.randn(d, device=device, dtype=dtype)

    def kernel(i: int) -> None:
        ops.fused_add_rmsnorm(xs[i], residuals[i], weight, 1e-5)

    def torch_baseline(i: int) -> None:
        reference.rms_norm(residuals[i] + xs[i], weight, 1e-5)

    return _timed(name, (4 * T * d + d) * es, kernel, torch_baseline, n, device, runs)


def _rope_case(case, dtype, device, runs, cache_bytes) -> dict:
    name, T, Hq, Hkv, D = case
    es = torch.empty((), dtype=dtype).element_size()
    BS = 16
    num_blocks = max(cache_bytes // (BS * Hkv * D * es), 2 * T // BS + 1)
    k_cache = torch.zeros(num_blocks, BS, Hkv, D, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    n = rotation_count(T * D * (Hq + 2 * Hkv + 1) * es, device)
    qkv = torch.randn(n, T, (Hq + 2 * Hkv) * D, device=device, dtype=dtype)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    freqs = torch.arange(MAX_POSITIONS, device=device, dtype=torch.float32)[:, None] * inv_freq
    table = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)             # (P, D): [cos | sin]
    positions = torch.randint(0, MAX_POSITIONS, (n, T), device=device)
    slots = torch.stack([torch.randperm(num_blocks * BS, device=device)[:T] for _ in range(n)])

    def split(i: int):
        q, k, v = qkv[i].split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        return q.view(T, Hq, D), k.view(T, Hkv, D), v.view(T, Hkv, D)

    def kernel(i: int) -> None:
        q, k, v = split(i)
        ops.rope_store_kv(q, k, v, table, positions[i], k_cache, v_cache, slots[i])

    def torch_baseline(i: int) -> None:
        q, k, v = split(i)
        emb = positions[i][:, None].float() * inv_freq[None, :]
        emb = torch.cat((emb, emb), dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        reference.apply_rotary(q, cos, sin)
        ops.store_kv(reference.apply_rotary(k, cos, sin), v, k_cache, v_cache, slots[i])

    moved = T * D * (2 * Hq + 5 * Hkv + 1) * es + 8 * T
    return _timed(name, moved, kernel, torch_baseline, n, device, runs)


def _timed(name, moved, kernel, torch_baseline, n, device, runs) -> dict:
    t_kernel = time_calls(kernel, device, n_inputs=n, runs=runs, graph=is_gpu(device))
    t_torch = time_calls(torch_baseline, device, n_inputs=n, runs=runs, graph=is_gpu(device))
    return {"case": name, "bytes_moved": moved, "input_sets": n, "kernel": t_kernel.to_dict(),
            "torch": t_torch.to_dict(), "us_per_call": t_kernel.median_s * 1e6,
            "torch_us": t_torch.median_s * 1e6, "kernel_gbps": gbps(moved, t_kernel.median_s),
            "vs_torch": t_torch.median_s / t_kernel.median_s}


def run(args: argparse.Namespace, device: torch.device) -> dict:
    dtype = getattr(torch, args.dtype)
    sticks = yardsticks(device)
    cache_bytes = (256 if is_gpu(device) else 32) << 20
    rows = [_norm_case(c, dtype, device, args.runs) for c in NORM_CASES]
    rows += [_rope_case(c, dtype, device, args.runs, cache_bytes) for c in ROPE_CASES]
    for r in rows:
        r.update(ratios(r["kernel_gbps"], sticks))
    print(f"{device_label(device)}; {yardstick_label(sticks)}; fused ops {args.dtype}")
    print(format_table(rows, ["case", "us_per_call", "torch_us", "vs_torch", "kernel_gbps", "vs_copy", "vs_read"]))
    summary = [summary_row(r["case"], r["us_per_call"], "us", vs_torch=r["vs_torch"], vs_copy=r["vs_copy"],
                           vs_read=r["vs_read"]) for r in rows]
    return {"yardsticks": sticks, "copy_gbps": sticks["copy"]["gbps"], "read_gbps": sticks["read"]["gbps"],
            "dtype": args.dtype, "cases": rows, "summary": summary}
