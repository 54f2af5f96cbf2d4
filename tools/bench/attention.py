"""attention: achieved bandwidth of paged attention alone (cuda/paged_attention.cuh) at long context.

Decode attention reads every cached K/V row of the batch once, so its floor is (K/V bytes) / bandwidth.
Reported per case: GB/s of K/V bytes read, that over the measured copy and read-only bandwidths (target
vs_copy >= 0.80 at batch 32 / 4k and >= 0.70 at batch 1 / 32k, GQA 32/8, head dim 128, bf16), and the
speed-up over torch SDPA on the same data laid out contiguously (B, Hkv, L, D) (target >= 1.0). The SDPA
baseline is the fastest backend that accepts the inputs (flash, memory-efficient, cuDNN, math: each
tried alone, the one used is logged); verification (q_len > 1) uses the lower-right causal bias
(torch.nn.attention.bias.causal_lower_right: query i of q_len sees keys 0 .. L - q_len + i), so the
fused kernels stay eligible. A short-context case behind a block table sized for 32k tokens times what
a decode step with a wide CUDA-graph bucket pays. Block tables are shuffled over a pool; inputs rotate
over > 4x L2; timing replays CUDA graphs, median of runs. On a CPU a small shape runs the reference op
and is labelled a CPU figure (ratios within one run only).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from tinyinfer import ops
from tools.bench.common import (device_label, format_table, gbps, is_gpu, ratios, rotation_count, summary_row,
                                time_calls, yardstick_label, yardsticks)

# name, batch, context (keys per sequence, new queries included), q_len, Hq, Hkv, D, block-table width in
# tokens (0: just the context)
GPU_CASES = [("bs1 ctx32k", 1, 32768, 1, 32, 8, 128, 0),
             ("bs32 ctx4k", 32, 4096, 1, 32, 8, 128, 0),
             ("bs32 ctx4k q4 (verify)", 32, 4096, 4, 32, 8, 128, 0),
             ("bs1 ctx128, 32k table", 1, 128, 1, 32, 8, 128, 32768)]
CPU_CASES = [("CPU bs2 ctx512", 2, 512, 1, 8, 2, 64, 0)]
BLOCK_SIZE = 16
SDPA_BACKENDS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="cache dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs; the median is reported")


def _input_sets(case, dtype, device, n_sets: int):
    """n_sets independent batches in one shuffled block pool, plus the same K/V contiguous for SDPA."""
    _, B, L, q_len, Hq, Hkv, D, width = case
    blocks_per_seq = math.ceil(L / BLOCK_SIZE)
    pool = n_sets * B * blocks_per_seq
    k_cache = torch.randn(pool, BLOCK_SIZE, Hkv, D, device=device, dtype=dtype)
    v_cache = torch.randn(pool, BLOCK_SIZE, Hkv, D, device=device, dtype=dtype)
    perm = torch.randperm(pool).to(torch.int32).view(n_sets, B, blocks_per_seq).to(device)
    seq_lens = torch.full((B,), L, dtype=torch.int32, device=device)
    qsl = torch.arange(0, B + 1, dtype=torch.int32, device=device) * q_len
    sets, pad = [], max(0, math.ceil(width / BLOCK_SIZE) - blocks_per_seq)  # table columns never read
    for s in range(n_sets):
        tables = torch.nn.functional.pad(perm[s], (0, pad), value=-1)
        q = torch.randn(B * q_len, Hq, D, device=device, dtype=dtype)
        # Contiguous copy of this set's K/V for SDPA: (B, Hkv, L, D).
        idx = perm[s].long()
        k_dense = k_cache[idx].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2).contiguous()
        v_dense = v_cache[idx].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2).contiguous()
        sets.append((q, tables, k_dense, v_dense))
    return k_cache, v_cache, seq_lens, qsl, sets


def _sdpa(q, k, v, q_len: int, L: int, scale: float, backend: str | None):
    """torch SDPA on (B, H, q_len, D) queries over contiguous (B, Hkv, L, D) K/V; the lower-right causal
    bias when verifying (q_len > 1); one backend only when given."""
    mask = causal_lower_right(q_len, L) if q_len > 1 else None
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def _bench_case(case, dtype, device, runs: int) -> dict:
    name, B, L, q_len, Hq, Hkv, D, _ = case
    es = torch.empty((), dtype=dtype).element_size()
    kv_bytes = 2 * B * L * Hkv * D * es  # K and V rows, each read once
    n = rotation_count(kv_bytes, device)
    torch.manual_seed(0)
    k_cache, v_cache, seq_lens, qsl, sets = _input_sets(case, dtype, device, n)
    scale = 1.0 / math.sqrt(D)

    def kernel(i: int) -> torch.Tensor:
        q, tables, _, _ = sets[i]
        return ops.paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale)

    def sdpa(i: int, backend: str | None) -> torch.Tensor:
        q, _, k, v = sets[i]
        return _sdpa(q.view(B, q_len, Hq, D).transpose(1, 2), k, v, q_len, L, scale, backend)

    ours = kernel(0).float().view(B, q_len, Hq, D).transpose(1, 2)
    t_kernel = time_calls(kernel, device, n_inputs=n, runs=runs, graph=is_gpu(device))
    backends = {}  # every backend that accepts these inputs: its time
    for backend in SDPA_BACKENDS if is_gpu(device) else [None]:
        try:
            diff = (ours - sdpa(0, backend).float()).abs().max().item()
            t = time_calls(lambda i: sdpa(i, backend), device, n_inputs=n, runs=runs, graph=is_gpu(device))
            backends[backend or "default"] = {"timing": t.to_dict(), "us": t.median_s * 1e6, "max_abs_diff": diff}
        except RuntimeError as err:  # not eligible for these shapes / dtype / mask on this build
            backends[backend] = {"unavailable": str(err).splitlines()[0][:200]}
    usable = {b: r for b, r in backends.items() if "us" in r}
    best = min(usable, key=lambda b: usable[b]["us"])
    t_sdpa = usable[best]["us"] / 1e6
    return {"case": name, "B": B, "context": L, "q_len": q_len, "Hq": Hq, "Hkv": Hkv, "D": D,
            "block_size": BLOCK_SIZE, "table_blocks": sets[0][1].shape[1], "kv_bytes": kv_bytes, "input_sets": n,
            "kernel": t_kernel.to_dict(), "sdpa_backends": backends, "sdpa_backend": best,
            "us_per_call": t_kernel.median_s * 1e6, "sdpa_us": t_sdpa * 1e6,
            "kernel_gbps": gbps(kv_bytes, t_kernel.median_s), "sdpa_gbps": gbps(kv_bytes, t_sdpa),
            "vs_sdpa": t_sdpa / t_kernel.median_s, "max_abs_diff_vs_sdpa": usable[best]["max_abs_diff"]}


def run(args: argparse.Namespace, device: torch.device) -> dict:
    dtype = getattr(torch, args.dtype or ("bfloat16" if is_gpu(device) else "float32"))
    sticks = yardsticks(device)
    cases = GPU_CASES if is_gpu(device) else CPU_CASES
    rows = []
    for case in cases:
        row = _bench_case(case, dtype, device, args.runs)
        row.update(ratios(row["kernel_gbps"], sticks))
        rows.append(row)
        if is_gpu(device):
            torch.cuda.empty_cache()  # each case's pool is freed before the next one is built
    where = "GPU" if is_gpu(device) else "CPU figure (reference op; ratios within this run only)"
    dtype_name = str(dtype).replace("torch.", "")
    print(f"{device_label(device)}; {yardstick_label(sticks)}; paged attention {dtype_name}, GQA, block size "
          f"{BLOCK_SIZE}; {where}")
    print(format_table(rows, ["case", "us_per_call", "kernel_gbps", "vs_copy", "vs_read", "sdpa_us", "sdpa_backend",
                              "vs_sdpa", "max_abs_diff_vs_sdpa"]))
    summary = [summary_row(f"paged_attention {r['case']}", r["kernel_gbps"], "GB/s", vs_copy=r["vs_copy"],
                           vs_read=r["vs_read"], vs_torch=r["vs_sdpa"]) for r in rows]
    return {"yardsticks": sticks, "copy_gbps": sticks["copy"]["gbps"], "read_gbps": sticks["read"]["gbps"],
            "dtype": dtype_name, "is_cpu_figure": not is_gpu(device), "cases": rows, "summary": summary}


def figure(results: dict):
    """Fraction of the copy and read-only bandwidths per case (batch, context, q_len)."""
    from tools.bench.plot import Figure, Panel, Series
    cases = [r["case"] for r in results["cases"]]
    panel = Panel("case", "achieved / measured bandwidth", [
        Series("vs copy", cases, [r["vs_copy"] for r in results["cases"]]),
        Series("vs read-only", cases, [r["vs_read"] for r in results["cases"]])], bars=True, hline=1.0,
        title=f"paged attention, K/V bytes read, {results['dtype']}")
    return Figure(f"bench attention: paged attention bandwidth (copy {results['copy_gbps']:.0f} GB/s, "
                  f"read {results['read_gbps']:.0f} GB/s)", [panel])
