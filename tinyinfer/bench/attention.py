"""attention: achieved bandwidth of paged attention alone (cuda/paged_attention.cu) at long context.

Decode attention reads every cached K/V row of the batch once, so its floor is (K/V bytes) / bandwidth.
Reported per case: GB/s of K/V bytes read, that over the measured copy bandwidth (target >= 0.85 at
batch 1 / 32k and batch 32 / 4k, GQA 32/8, head dim 128, bf16), and the speed-up over torch SDPA on
the same data laid out contiguously (B, Hkv, L, D) (target >= 1.0). Block tables are shuffled over
a pool; inputs rotate over > 4x L2; timing replays CUDA graphs, median of runs. On a CPU a small
shape runs the reference op and is labelled a CPU figure (ratios within one run only).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from tinyinfer import ops
from tinyinfer.bench.common import (copy_bandwidth, device_label, format_table, gbps, is_gpu,
                                    rotation_count, summary_row, time_calls)

# name, batch, context (keys per sequence, new queries included), q_len, Hq, Hkv, D
GPU_CASES = [("bs1 ctx32k", 1, 32768, 1, 32, 8, 128),
             ("bs32 ctx4k", 32, 4096, 1, 32, 8, 128),
             ("bs32 ctx4k q4 (verify)", 32, 4096, 4, 32, 8, 128)]
CPU_CASES = [("CPU bs2 ctx512", 2, 512, 1, 8, 2, 64)]
BLOCK_SIZE = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="cache dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--runs", type=int, default=10)


def _input_sets(case, dtype, device, n_sets: int):
    """n_sets independent batches in one shuffled block pool, plus the same K/V contiguous for SDPA."""
    _, B, L, q_len, Hq, Hkv, D = case
    blocks_per_seq = math.ceil(L / BLOCK_SIZE)
    pool = n_sets * B * blocks_per_seq
    k_cache = torch.randn(pool, BLOCK_SIZE, Hkv, D, device=device, dtype=dtype)
    v_cache = torch.randn(pool, BLOCK_SIZE, Hkv, D, device=device, dtype=dtype)
    perm = torch.randperm(pool).to(torch.int32).view(n_sets, B, blocks_per_seq).to(device)
    seq_lens = torch.full((B,), L, dtype=torch.int32, device=device)
    qsl = torch.arange(0, B + 1, dtype=torch.int32, device=device) * q_len
    sets = []
    for s in range(n_sets):
        tables = perm[s]
        q = torch.randn(B * q_len, Hq, D, device=device, dtype=dtype)
        # Contiguous copy of this set's K/V for SDPA: (B, Hkv, L, D).
        idx = tables.long()
        k_dense = k_cache[idx].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2).contiguous()
        v_dense = v_cache[idx].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2).contiguous()
        sets.append((q, tables, k_dense, v_dense))
    return k_cache, v_cache, seq_lens, qsl, sets


def _sdpa_mask(L: int, q_len: int, device) -> torch.Tensor | None:
    if q_len == 1:
        return None
    pos = torch.arange(L, device=device)
    q_pos = L - q_len + torch.arange(q_len, device=device)
    return (pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, q_len, L)


def _bench_case(case, dtype, device, runs: int) -> dict:
    name, B, L, q_len, Hq, Hkv, D = case
    es = torch.empty((), dtype=dtype).element_size()
    kv_bytes = 2 * B * L * Hkv * D * es  # K and V rows, each read once
    n = rotation_count(kv_bytes, device)
    torch.manual_seed(0)
    k_cache, v_cache, seq_lens, qsl, sets = _input_sets(case, dtype, device, n)
    scale = 1.0 / math.sqrt(D)
    mask = _sdpa_mask(L, q_len, device)

    def kernel(i: int) -> torch.Tensor:
        q, tables, _, _ = sets[i]
        return ops.paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale)

    def sdpa(i: int) -> torch.Tensor:
        q, _, k, v = sets[i]
        qb = q.view(B, q_len, Hq, D).transpose(1, 2)  # (B, Hq, q_len, D)
        return F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    ours = kernel(0).float().view(B, q_len, Hq, D).transpose(1, 2)
    max_diff = (ours - sdpa(0).float()).abs().max().item()
    t_kernel = time_calls(kernel, device, n_inputs=n, runs=runs, graph=is_gpu(device))
    t_sdpa = time_calls(sdpa, device, n_inputs=n, runs=runs, graph=is_gpu(device))
    return {"case": name, "B": B, "context": L, "q_len": q_len, "Hq": Hq, "Hkv": Hkv, "D": D,
            "block_size": BLOCK_SIZE, "kv_bytes": kv_bytes, "input_sets": n, "kernel": t_kernel.to_dict(),
            "sdpa": t_sdpa.to_dict(), "us_per_call": t_kernel.median_s * 1e6,
            "kernel_gbps": gbps(kv_bytes, t_kernel.median_s), "sdpa_gbps": gbps(kv_bytes, t_sdpa.median_s),
            "vs_sdpa": t_sdpa.median_s / t_kernel.median_s, "max_abs_diff_vs_sdpa": max_diff}


def run(args: argparse.Namespace, device: torch.device) -> dict:
    dtype = getattr(torch, args.dtype or ("bfloat16" if is_gpu(device) else "float32"))
    copy = copy_bandwidth(device)
    cases = GPU_CASES if is_gpu(device) else CPU_CASES
    rows = []
    for case in cases:
        row = _bench_case(case, dtype, device, args.runs)
        row["vs_copy"] = row["kernel_gbps"] / copy["gbps"]
        rows.append(row)
        if is_gpu(device):
            torch.cuda.empty_cache()  # each case's pool is freed before the next one is built
    where = "GPU" if is_gpu(device) else "CPU figure (reference op; ratios within this run only)"
    dtype_name = str(dtype).replace("torch.", "")
    print(f"{device_label(device)}; copy bandwidth {copy['gbps']:.1f} GB/s; paged attention "
          f"{dtype_name}, GQA, block size {BLOCK_SIZE}; {where}")
    print(format_table(rows, ["case", "us_per_call", "kernel_gbps", "vs_copy", "sdpa_gbps", "vs_sdpa",
                              "max_abs_diff_vs_sdpa"]))
    summary = [summary_row(f"paged_attention {r['case']}", r["kernel_gbps"], "GB/s", vs_copy=r["vs_copy"],
                           vs_torch=r["vs_sdpa"]) for r in rows]
    return {"copy_gbps": copy["gbps"], "dtype": dtype_name, "is_cpu_figure":
            not is_gpu(device), "cases": rows, "summary": summary}
