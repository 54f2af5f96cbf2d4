"""int4: the INT4 linear (cuda/int4_mm.cuh: tensor-core GEMV for M <= 16, GEMM to M = 64) against the
yardsticks and torch fp16 F.linear (cuBLAS), with bf16 activations and fp16 scales as an INT4 model runs.

For the linears of one Llama-2-7B and one Llama-3-8B decoder layer: achieved GB/s per shape (bytes = packed
weight + scales + zeros + x + y) at M = 1 (decode), timed two ways --
  "model":   each INT4 call followed by one elementwise op on its output, as in the model where norms,
             RoPE and attention sit between linears (the pair's time minus the op's own time);
  "chained": INT4 calls back to back, each overlapping the next through programmatic dependent launch
             (what a stack of linears with nothing between them gets);
per layer the byte-weighted ratios to the copy and read-only bandwidths (target vs_copy >= 0.85) and the
speed-up over fp16 F.linear on the same shapes in the same run; then M = 2 .. 64 (the GEMM above 16),
with the fp16 comparison at M = 32 (target >= 2.5x); and torch's own int4 kernel
(aten._weight_int4pack_mm, the one gpt-fast uses) where this torch offers it. Weights rotate over more
than 4x the L2 size; calls are timed inside a CUDA graph (median of several runs). On a CPU the same
tables show the reference path (dequantize + matmul), as CPU figures: ratios only.
`--quality` adds the accuracy table on the demo checkpoint (KL, top-1 agreement, perplexity).
"""
from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn.functional as F

from tinyinfer import ops
from tools.bench import common
from tools.bench.common import (device_label, format_table, gbps, is_gpu, ratios, rotation_count, summary_row,
                                time_calls, yardstick_label, yardsticks)

# (name, N, K, how many of it one layer has)
LAYERS = {
    "llama2-7b": [("q,k,v,o", 4096, 4096, 4), ("gate,up", 11008, 4096, 2), ("down", 4096, 11008, 1)],
    "llama3-8b": [("qkv", 6144, 4096, 1), ("o", 4096, 4096, 1), ("gate,up", 14336, 4096, 2),
                  ("down", 4096, 14336, 1)],
}
FP16_MS = (1, 32)  # the batch sizes compared with fp16 F.linear


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"],
                        help="activation dtype (scales are fp16 either way, as in INT4 checkpoints)")
    parser.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128],
                        help="input channels per scale and zero point")
    parser.add_argument("--ms", default=None, help="batch sizes of the second table, e.g. 2,4,8,16,32,64 "
                        "(default: those on a GPU, none on a CPU)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs; the median is reported")
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


def bench_shape(n: int, k: int, m: int, g: int, sets: list, dtype: torch.dtype, device: torch.device,
                runs: int, fp16: bool) -> dict:
    x = torch.randn(m, k, dtype=dtype, device=device)
    nbytes = _nbytes(*sets[0]) + _nbytes(x) + m * n * x.element_size()
    gpu = is_gpu(device)
    t_chain = time_calls(lambda i: ops.int4_linear(x, *sets[i], g), device, n_inputs=len(sets), runs=runs, graph=gpu)
    # The model's view: an elementwise op on each output before the next linear breaks the PDL overlap.
    y = ops.int4_linear(x, *sets[0], g)
    z = torch.empty_like(y)
    t_op = time_calls(lambda i: torch.add(y, 1.0, out=z), device, n_inputs=len(sets), runs=runs, graph=gpu)
    t_pair = time_calls(lambda i: torch.add(ops.int4_linear(x, *sets[i], g), 1.0, out=z), device,
                        n_inputs=len(sets), runs=runs, graph=gpu)
    t_model = max(t_pair.median_s - t_op.median_s, 1e-9)
    row = {"N": n, "K": k, "M": m, "bytes": nbytes, "us": t_model * 1e6, "gbps": gbps(nbytes, t_model),
           "chained_us": t_chain.median_s * 1e6, "op_us": t_op.median_s * 1e6,
           "timing": {"chained": t_chain.to_dict(), "pair": t_pair.to_dict(), "op": t_op.to_dict()}}
    if fp16:
        w_bytes = n * k * 2
        ws = [torch.randn(n, k, device=device).half() for _ in range(rotation_count(w_bytes, device))]
        xh = x.half()
        t16 = time_calls(lambda i: F.linear(xh, ws[i]), device, n_inputs=len(ws), runs=runs, graph=gpu)
        row.update(fp16_us=t16.median_s * 1e6, vs_fp16=t16.median_s / t_model)
        del ws
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


def _layer(name: str, parts: list, rows: dict, sticks: dict) -> dict:
    """Byte-weighted figures of one decoder layer from per-shape rows {(N, K): row} at one M."""
    nbytes = sum(c * rows[(n, k)]["bytes"] for _, n, k, c in parts)
    t = sum(c * rows[(n, k)]["us"] for _, n, k, c in parts)
    layer = {"layer": name, "M": next(iter(rows.values()))["M"], "us": t, "gbps": nbytes / t / 1e3,
             "chained_us": sum(c * rows[(n, k)]["chained_us"] for _, n, k, c in parts),
             **ratios(nbytes / t / 1e3, sticks)}
    if all("fp16_us" in r for r in rows.values()):
        layer["fp16_us"] = sum(c * rows[(n, k)]["fp16_us"] for _, n, k, c in parts)
        layer["vs_fp16"] = layer["fp16_us"] / t
    return layer


def run(args: argparse.Namespace, device: torch.device) -> dict:
    dtype, g = getattr(torch, args.dtype), args.group_size
    sticks = yardsticks(device)
    print(f"{device_label(device)}; {yardstick_label(sticks)}; int4_linear g{g}, {args.dtype} activations, "
          "fp16 scales" + ("" if is_gpu(device) else " -- CPU: the reference path"))
    layers_of = {"quick": [("q", 256, 256, 1)]} if common.QUICK else LAYERS
    shapes = sorted({(n, k) for layer in layers_of.values() for _, n, k, _ in layer})
    ms = [int(v) for v in args.ms.split(",") if v] if args.ms is not None else (
        [2, 4, 8, 16, 32, 64] if is_gpu(device) else [])
    by_m: dict[int, dict] = {}
    for n, k in shapes:  # one set of rotated weights per shape, reused for every M
        one = _int4_set(n, k, g, device)
        sets = [one] + [_int4_set(n, k, g, device) for _ in range(rotation_count(_nbytes(*one), device) - 1)]
        for m in [1] + ms:
            row = bench_shape(n, k, m, g, sets, dtype, device, args.runs, fp16=m in FP16_MS)
            row.update(ratios(row["gbps"], sticks))
            if m == 1:
                row["aten_int4_us"] = _aten_int4pack(n, k, m, g, device, args.runs)
            by_m.setdefault(m, {})[(n, k)] = row
        del sets
    print("M = 1 (us: model-like, between other ops; chained_us: back to back)")
    print(format_table(list(by_m[1].values()), ["N", "K", "us", "chained_us", "gbps", "vs_copy", "vs_read",
                                                "fp16_us", "vs_fp16", "aten_int4_us"]))
    layers, summary = [], []
    for m in [1] + [m for m in ms if m in FP16_MS]:
        for name, parts in layers_of.items():
            layer = _layer(name, parts, by_m[m], sticks)
            layers.append(layer)
            summary.append(summary_row(f"int4 {name} layer M={m}", layer["gbps"], "GB/s", vs_copy=layer["vs_copy"],
                                       vs_read=layer["vs_read"], vs_torch=layer.get("vs_fp16")))
    print("one decoder layer, byte-weighted (targets: M=1 vs_copy >= 0.85; M=32 vs_fp16 >= 2.5)")
    print(format_table(layers, ["layer", "M", "us", "chained_us", "gbps", "vs_copy", "vs_read", "fp16_us",
                                "vs_fp16"]))
    batched = [r for m in ms for r in by_m[m].values()]
    if batched:
        print("M > 1 (GEMV-shaped to 16, GEMM-shaped to 64)")
        print(format_table(batched, ["M", "N", "K", "us", "chained_us", "gbps", "vs_copy", "vs_read", "vs_fp16"]))
    results = {"yardsticks": sticks, "copy_gbps": sticks["copy"]["gbps"], "read_gbps": sticks["read"]["gbps"],
               "group_size": g, "dtype": args.dtype, "m1": list(by_m[1].values()), "layers": layers,
               "batched": batched, "summary": summary}
    if args.quality:
        quality = quality_table()
        print("accuracy on held-out text, models/shakespeare-llama (CPU, float32)")
        print(format_table(quality, ["config", "kl", "top1", "ppl"]))
        results["quality"] = quality
    return results


def figure(results: dict):
    """Fraction of the copy and read-only bandwidths per weight shape at M = 1; with batched rows, the
    fraction of copy bandwidth against M per shape."""
    from tools.bench.plot import Figure, Panel, Series
    shapes = [f"{r['N']}x{r['K']}" for r in results["m1"]]
    panels = [Panel("weight shape N x K (M = 1)", "achieved / measured bandwidth", [
        Series("vs copy", shapes, [r["vs_copy"] for r in results["m1"]]),
        Series("vs read-only", shapes, [r["vs_read"] for r in results["m1"]])], bars=True, hline=1.0,
        title=f"decode GEMV, g{results['group_size']}, {results['dtype']} activations")]
    if results.get("batched"):
        rows = [r for r in results["m1"]] + results["batched"]
        panels.append(Panel("M (rows of x)", "achieved / copy bandwidth", [
            Series(f"{n}x{k}", [r["M"] for r in rows if (r["N"], r["K"]) == (n, k)],
                   [r["vs_copy"] for r in rows if (r["N"], r["K"]) == (n, k)])
            for n, k in dict.fromkeys((r["N"], r["K"]) for r in rows)], xlog=True, title="GEMV to GEMM"))
    return Figure(f"bench int4: INT4 linear bandwidth (copy {results['copy_gbps']:.0f} GB/s, "
                  f"read {results['read_gbps']:.0f} GB/s)", panels)
