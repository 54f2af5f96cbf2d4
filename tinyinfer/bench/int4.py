"""int4: the INT4 dequant-GEMV (cuda/int4_gemv.cu) against the copy bandwidth and torch fp16 F.linear.

For the linears of one Llama-2-7B and one Llama-3-8B decoder layer, at M = 1 (decode): achieved GB/s
per shape (bytes = packed weight + scales + zeros + x + y), and per layer the byte-weighted total's
ratio to the measured copy bandwidth (target >= 0.85) and its speedup over fp16 F.linear on the same
shapes in the same run (target >= 3.3x); then M = 2, 4, 8, 16; and torch's own int4 kernel
(aten._weight_int4pack_mm, the one gpt-fast uses) where this torch offers it. Weights rotate over more
than 4x the L2 size; calls are timed inside a CUDA graph (median of several runs).
On a CPU the same table shows the reference path (dequantize + matmul), as CPU figures: ratios only.
`--quality` adds the accuracy table on the demo checkpoint (KL, top-1 agreement, perplexity).
"""
from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn.functional as F

from tinyinfer import ops
from tinyinfer.bench.common import (copy_bandwidth, device_label, format_table, gbps, is_gpu,
                                    rotation_count, summary_row, time_calls)

# (name, N, K, how many of it one layer has)
LAYERS = {
    "llama2-7b": [("q,k,v,o", 4096, 4096, 4), ("gate,up", 11008, 4096, 2), ("down", 4096, 11008, 1)],
    "llama3-8b": [("qkv", 6144, 4096, 1), ("o", 4096, 4096, 1), ("gate,up", 14336, 4096, 2),
                  ("down", 4096, 14336, 1)],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                        help="activation dtype (scales are fp16 either way)")
    parser.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128])
    parser.add_argument("--ms", default=None, help="batch sizes of the second table, e.g. 2,4,8,16 "
                        "(default: 2,4,8,16 on a GPU, none on a CPU)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quality", action=argparse.BooleanOptionalAction, default=False,
                        help="also print the accuracy table on models/shakespeare-llama")


def _int4_set(n: int, k: int, g: int, device: torch.device) -> tuple:
    # Random packed weights straight in the kernel layout: the kernel's speed does not depend on values.
    kp = -(-k // 64) * 64
    qw = torch.randint(-2**31, 2**31 - 1, (n // 16, kp // 64, 32, 4), dtype=torch.int32, device=device)
    sc = (torch.rand(n // 16, kp // g, 16, device=device) * 0.01 + 0.001).half()
    zs = torch.randint(0, 16, (n // 16, kp // g, 16), dtype=torch.uint8, device=device)
    return qw, sc, zs


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_shape(n: int, k: int, m: int, g: int, dtype: torch.dtype, device: torch.device, runs: int,
                baselines: bool) -> dict:
    one = _int4_set(n, k, g, device)
    x = torch.randn(m, k, dtype=dtype, device=device)
    int4_bytes = _nbytes(*one) + _nbytes(x) + m * n * x.element_size()
    sets = [one] + [_int4_set(n, k, g, device) for _ in range(rotation_count(int4_bytes, device) - 1)]
    t_int4 = time_calls(lambda i: ops.int4_linear(x, *sets[i], g), device, n_inputs=len(sets),
                        runs=runs, graph=is_gpu(device))
    row = {"N": n, "K": k, "M": m, "bytes": int4_bytes, "us": t_int4.median_s * 1e6,
           "gbps": gbps(int4_bytes, t_int4.median_s), "timing": t_int4.to_dict()}
    if baselines:
        w_bytes = n * k * 2
        ws = [torch.randn(n, k, device=device).half() for _ in range(rotation_count(w_bytes, device))]
        xh = x.half()
        t_fp16 = time_calls(lambda i: F.linear(xh, ws[i]), device, n_inputs=len(ws), runs=runs,
                            graph=is_gpu(device))
        row.update(fp16_us=t_fp16.median_s * 1e6, vs_fp16=t_fp16.median_s / t_int4.median_s,
                   fp16_gbps=gbps(w_bytes + _nbytes(xh) + m * n * 2, t_fp16.median_s))
        del ws
        row["aten_int4_us"] = _aten_int4pack(n, k, m, g, device, runs)
    return row


def _aten_int4pack(n: int, k: int, m: int, g: int, device: torch.device, runs: int):
    """torch's tinygemm int4 kernel on the same shape (bf16 activations), or None where unavailable."""
    if not is_gpu(device):
        return None
    try:
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
        packed = torch.ops.aten._convert_weight_to_int4pack(w, 8)
        sz = torch.rand(k // g, n, 2, device=device).bfloat16()
        xb = torch.randn(m, k, device=device).bfloat16()
        sets = [packed] + [packed.clone() for _ in range(rotation_count(_nbytes(packed), device) - 1)]
        t = time_calls(lambda i: torch.ops.aten._weight_int4pack_mm(xb, sets[i], g, sz), device,
                       n_inputs=len(sets), runs=runs, graph=True)
        return t.median_s * 1e6
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


def quality_table(ckpt: str = "models/shakespeare-llama", text_path: str = "data/tinyshakespeare-val-slice.txt",
                  window: int = 256) -> list[dict]:
    """KL(base || int4), top-1 agreement and perplexity on held-out text, per group size / clipping."""
    from tinyinfer import LLM
    from tinyinfer.quant.quantizer import quantize_model
    llm = LLM(ckpt, device="cpu", dtype="float32")
    ids = llm.tokenizer.encode(open(text_path).read())
    windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]

    def evaluate() -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.cat([llm.logits(w)[:-1].log_softmax(-1) for w in windows])
        targets = torch.cat([torch.tensor(w[1:]) for w in windows])
        return logp, targets

    base_model = llm.model
    base, targets = evaluate()
    rows = [{"config": "unquantized (bf16 weights)", "kl": 0.0, "top1": 1.0,
             "ppl": math.exp(-base.gather(1, targets[:, None]).mean().item())}]
    for g in (32, 64, 128):
        for clip in (False, True):
            llm.model = copy.deepcopy(base_model)
            quantize_model(llm.model, group_size=g, clip_search=clip)
            q, _ = evaluate()
            kl = (base.exp() * (base - q)).sum(-1).mean().item()
            rows.append({"config": f"g{g} {'clip search' if clip else 'RTN min/max'}", "kl": kl,
                         "top1": (base.argmax(-1) == q.argmax(-1)).float().mean().item(),
                         "ppl": math.exp(-q.gather(1, targets[:, None]).mean().item())})
    llm.model = base_model
    return rows


def run(args: argparse.Namespace, device: torch.device) -> dict:
    dtype = getattr(torch, args.dtype)
    g = args.group_size
    copy_bw = copy_bandwidth(device)
    print(f"{device_label(device)}; copy bandwidth {copy_bw['gbps']:.1f} GB/s; int4_linear g{g}, "
          f"{args.dtype} activations" + ("" if is_gpu(device) else " -- CPU: the reference path"))
    shapes = sorted({(n, k) for layer in LAYERS.values() for _, n, k, _ in layer})
    m1 = {(n, k): bench_shape(n, k, 1, g, dtype, device, args.runs, baselines=True) for n, k in shapes}
    rows = list(m1.values())
    for r in rows:
        r["vs_copy"] = r["gbps"] / copy_bw["gbps"]
    print("M = 1")
    print(format_table(rows, ["N", "K", "us", "gbps", "vs_copy", "fp16_us", "vs_fp16", "aten_int4_us"]))

    layers, summary = [], []
    for name, parts in LAYERS.items():
        nbytes = sum(c * m1[(n, k)]["bytes"] for _, n, k, c in parts)
        t = sum(c * m1[(n, k)]["us"] for _, n, k, c in parts)
        t16 = sum(c * m1[(n, k)]["fp16_us"] for _, n, k, c in parts)
        layer = {"layer": name, "us": t, "gbps": nbytes / t / 1e3, "vs_copy": nbytes / t / 1e3 / copy_bw["gbps"],
                 "fp16_us": t16, "vs_fp16": t16 / t}
        layers.append(layer)
        summary.append(summary_row(f"int4 gemv {name} layer M=1", layer["gbps"], "GB/s",
                                   vs_copy=layer["vs_copy"], vs_torch=layer["vs_fp16"]))
    print("one decoder layer, byte-weighted (targets: vs_copy >= 0.85, vs_fp16 >= 3.3)")
    print(format_table(layers, ["layer", "us", "gbps", "vs_copy", "fp16_us", "vs_fp16"]))

    ms = [int(v) for v in args.ms.split(",") if v] if args.ms is not None else (
        [2, 4, 8, 16] if is_gpu(device) else [])
    batched = []
    for m in ms:
        for n, k in shapes:
            r = bench_shape(n, k, m, g, dtype, device, args.runs, baselines=False)
            r["vs_copy"] = r["gbps"] / copy_bw["gbps"]
            batched.append(r)
    if batched:
        print("M > 1")
        print(format_table(batched, ["M", "N", "K", "us", "gbps", "vs_copy"]))
    results = {"copy_gbps": copy_bw["gbps"], "group_size": g, "dtype": args.dtype, "m1": rows,
               "layers": layers, "batched": batched, "summary": summary}
    if args.quality:
        quality = quality_table()
        print("accuracy on held-out text, models/shakespeare-llama (CPU, float32)")
        print(format_table(quality, ["config", "kl", "top1", "ppl"]))
        results["quality"] = quality
    return results
