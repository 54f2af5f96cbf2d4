"""e2e: end-to-end decode tokens/s, against the bandwidth floor (synthetic 7B) or HF generate() (--ckpt).

Without --ckpt: a Llama-2-7B-shaped model (32 layers, hidden 4096, MLP 11008, 32 heads; MHA and a GQA
variant with 8 KV heads) with random weights built on the GPU, bf16 and INT4. Grid: batch 1 at
contexts 128 (decoding 128 -> 256), 1k, 8k, 32k; batch 8, 32, 64 at 1k. Per point: decode tokens/s
(the engine's step: metadata, replay of the graph that samples, read back; the median of 3 runs),
and at batch 1 the whole engine's `LLM.generate` decode rate (scheduler, sampler, detokenization
included); the bandwidth floor = (all linear
weights + lm_head + norms, not the embedding, + the K/V bytes the step reads) / measured copy
bandwidth; the achieved share of it; and a breakdown from the profiler: kernels per step, sum of kernel
time / step time, GB/s of the linears and of attention. On a CPU a small shape runs instead and
says it is a CPU figure.

With --ckpt: tinyinfer vs Hugging Face generate() on that checkpoint (tools/bench/hf.py).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from tinyinfer import extensions
from tinyinfer.config.model import ModelConfig
from tinyinfer.engine.batch import build_batch
from tinyinfer.engine.block_manager import BlockAllocator
from tinyinfer.engine.cuda_graphs import GraphRunner
from tinyinfer.engine.kv_cache import PagedKVCache
from tinyinfer.engine.llm import LLM
from tinyinfer.engine.llm_engine import LLMEngine
from tinyinfer.engine.model_runner import ModelRunner
from tinyinfer.engine.sequence import Sequence
from tinyinfer.loading.tokenizer import Tokenizer
from tinyinfer.models.transformer import Transformer, build_model
from tinyinfer.ops.cuda import CUDA_IMPLS
from tinyinfer.quant.quantizer import quantize_model
from tinyinfer.sampling.params import SamplingParams
from tools.bench.common import (GiB, copy_bandwidth, device_label, format_table, is_gpu, summary_row,
                                synchronize)
from tools.bench.hf import compare_with_hf

GPU_CHECK_ARGS = [[]]
GRID = [(1, 128, 128), (1, 1024, 32), (1, 8192, 32), (1, 32768, 32),     # (batch, context, steps)
        (8, 1024, 32), (32, 1024, 32), (64, 1024, 32)]
CPU_GRID = [(1, 128, 32), (1, 512, 16), (8, 128, 16)]
REPEATS = 3                   # timed runs per point; the figure is their median


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=None,
                        help="compare with HF generate() on this checkpoint instead of the synthetic grid")
    parser.add_argument("--new-tokens", type=int, default=32, help="--ckpt: tokens generated per run")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="decode through CUDA graphs (GPU); --no-cuda-graphs launches eagerly")
    parser.add_argument("--quant", choices=["bf16", "int4", "both"], default="both",
                        help="synthetic grid: weight formats to run")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads for both engines (0 = torch's default). A tiny model "
                             "gains nothing from intra-op threads, and on a busy machine they wait on "
                             "each other for longer than the step itself takes")


def run(args: argparse.Namespace, device: torch.device) -> dict:
    if args.threads > 0 and not is_gpu(device):
        torch.set_num_threads(args.threads)
    if args.ckpt:
        return compare_with_hf(args.ckpt, device, args.new_tokens, args.cuda_graphs)   # tools/bench/hf.py
    return synthetic_grid(device, args.quant, args.cuda_graphs)


# ------------------------------------------------------------------------------------------------
# Synthetic Llama-2-7B shape: tokens/s against the bandwidth floor
# ------------------------------------------------------------------------------------------------

def _config(gpu: bool, kv_heads: int):
    if gpu:
        return ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                           num_heads=32, num_kv_heads=kv_heads, head_dim=128,
                           max_position_embeddings=32768)
    return ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=4,
                       num_heads=8, num_kv_heads=max(1, kv_heads // 4), head_dim=64,
                       max_position_embeddings=1024)


def int4_unavailable() -> str | None:
    if "int4_linear" not in CUDA_IMPLS:
        return "INT4 not available (no int4_linear kernel)"
    if extensions.extension() is None:
        return "INT4 not available (the CUDA extension did not build; the reference would take hours)"
    return None


@torch.inference_mode()
def _random_model(cfg, dtype: torch.dtype, device: torch.device, int4: bool):
    model = build_model(cfg, dtype, device)
    gen = torch.Generator(device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    if int4:
        quantize_model(model, group_size=128, clip_search=False)
        gc.collect()
        torch.cuda.empty_cache() if is_gpu(device) else None
    return model


def _weight_bytes(model, cfg) -> int:
    """Bytes a decode step reads besides K/V: every linear (INT4: codes + scales + zeros), the
    lm_head and the norms; not the embedding table (one row per token is read)."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("embed_tokens") or "cos_sin_cache" in name or t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    if cfg.tie_word_embeddings:
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def _kernel_breakdown(fn, steps: int, device) -> dict:
    """Profile `steps` calls of one decode step: kernels per step, kernel time per class (us/step)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(device)
    times: dict[str, float] = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    count = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name.lower()
        count += 1
        kind = ("attention" if "attention" in name else
                "linear" if any(k in name for k in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "int4",
                                                    "splitk", "cublas")) else "other")
        times[kind] += e.time_range.elapsed_us()
    return {"kernels_per_step": count / steps, **{f"{k}_us": v / steps for k, v in times.items()}}


def _point(cfg, kv, alloc, runner, batch: int, context: int, steps: int, device,
           profile: bool = True) -> dict:
    """Decode `steps` tokens for `batch` sequences that start at `context` cached tokens (their K/V:
    the random pool contents). Times the engine's decode step as the engine runs it: metadata, replay
    of the graph that also samples (greedy), read-back of the B tokens; the median of REPEATS runs."""
    seqs = []
    for i in range(batch):
        seq = Sequence(str(i), [1] * (context + 1), SamplingParams(max_tokens=steps), 0)
        seq.block_table = alloc.allocate(_blocks(context, steps, kv.block_size))
        seq.num_cached = context
        seqs.append(seq)
    ones = [1] * batch

    def step():
        batch_ = build_batch(seqs, ones, kv.block_size)
        batch_.sampling = ([0.0] * batch, [0] * batch, [s.num_outputs for s in seqs])
        toks = runner.run(batch_, "greedy")[1].tolist()
        for s, t in zip(seqs, toks):
            s.num_cached += 1
            s.token_ids.append(t)

    try:
        for _ in range(3):
            step()                                                 # capture + warm-up
        times = []
        for _ in range(REPEATS):
            for s in seqs:                                         # rewind: time from `context`
                del s.token_ids[context + 1:]
                s.num_cached = context
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - t0) / steps)
        step_s = statistics.median(times)
        row = {"batch": batch, "context": context, "steps": steps, "tok_s": batch / step_s,
               "ms_step": step_s * 1e3}
        if is_gpu(device) and profile:
            graph = runner.graph_for(batch, len(seqs[0].block_table), "greedy")
            found = _kernel_breakdown(graph.replay, 3, device) if graph is not None else {}
            if not found.get("kernels_per_step"):                  # profiler blind to graph nodes
                found = _kernel_breakdown(lambda: runner.forward_uncaptured(
                    batch, len(seqs[0].block_table)), 3, device)
                found["profiled"] = "eager launch of the same step"
            row.update(found)
        return row
    finally:
        for s in seqs:
            alloc.release(s.block_table)


def _blocks(context: int, steps: int, block_size: int) -> int:
    return -(-(context + steps) // block_size)


def _generate_rate(model, kv, context: int, steps: int, device, cuda_graphs: bool) -> float:
    """Decode tokens/s of the whole engine, LLM.generate on one greedy request of `context` random
    prompt ids: scheduler, sampler, detokenization and all; time(steps tokens) - time(1 token)."""
    tokenizer = Tokenizer.from_dir(extensions.REPO_ROOT / "models" / "shakespeare-llama")
    runner = ModelRunner(model, kv, cuda_graphs=is_gpu(device) and cuda_graphs)
    llm = LLM.from_engine(LLMEngine.from_runner(runner, tokenizer, enable_prefix_caching=False))
    prompt = torch.randint(3, model.cfg.vocab_size, (context,)).tolist()

    def timed(n: int) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - t0

    timed(steps)                                                   # warm-up: graphs captured
    return statistics.median((steps - 1) / max(timed(steps) - timed(1), 1e-9) for _ in range(REPEATS))


def synthetic_grid(device: torch.device, quant: str, cuda_graphs: bool) -> dict:
    gpu = is_gpu(device)
    copy = copy_bandwidth(device)
    grid = GRID if gpu else CPU_GRID
    formats = [f for f in ("bf16", "int4") if quant in (f, "both")]
    dtype = torch.bfloat16 if gpu else torch.float32
    rows, skipped = [], []
    for kv_heads in (32, 8):
        for fmt in formats:
            label = f"{'MHA' if kv_heads == 32 else 'GQA'} {fmt if gpu else 'fp32'}"
            why = None if fmt == "bf16" else "INT4 runs on the GPU only" if not gpu else int4_unavailable()
            if why:
                skipped.append({"model": label, "reason": why})
                print(f"{label}: skipped: {skipped[-1]['reason']}")
                continue
            cfg = _config(gpu, kv_heads)
            model = _random_model(cfg, dtype, device, fmt == "int4")
            weights = _weight_bytes(model, cfg)
            k_dims, v_dims = Transformer.kv_dims(cfg)
            per_token = PagedKVCache.bytes_per_token(cfg.num_layers, k_dims, v_dims, dtype)
            # Contexts end at the model's limit at most (32k: 32768 - steps .. 32768).
            points = [(b, min(c, cfg.max_context - n), n) for b, c, n in grid]
            blocks = {p: p[0] * _blocks(p[1], p[2], 16) for p in points}
            free = torch.cuda.mem_get_info(device)[0] - 3 * GiB if gpu else 1 << 62
            fits = [p for p in points if blocks[p] * 16 * per_token <= free]
            for p in points:
                if p not in fits:
                    skipped.append({"model": label, "batch": p[0], "context": p[1],
                                    "reason": f"needs {blocks[p] * 16 * per_token / GiB:.1f} GiB of KV "
                                              f"cache, {free / GiB:.1f} GiB free"})
                    print(f"{label} batch {p[0]} context {p[1]}: skipped: {skipped[-1]['reason']}")
            if fits:
                num_blocks = max(blocks[p] for p in fits)
                kv = PagedKVCache(cfg.num_layers, num_blocks, 16, k_dims, v_dims, dtype, device)
                for t in kv.k_caches + kv.v_caches:
                    if t is not None:
                        t.normal_()                                # stands in for a prefilled context
                alloc = BlockAllocator(num_blocks)
                runner = GraphRunner(model, kv, capture=gpu and cuda_graphs)
                if runner.capture and runner.disabled:
                    print(f"{label}: CUDA graphs off: {runner.disabled}")
                    skipped.append({"model": label, "reason": f"CUDA graphs off: {runner.disabled}"})
                eager = GraphRunner(model, kv, capture=False)
                for batch, context, steps in fits:
                    row = {"model": label, **_point(cfg, kv, alloc, runner, batch, context, steps, device)}
                    if batch == 1 and context == min(c for _, c, _ in fits):
                        if gpu and cuda_graphs:
                            # The same step without graphs: what launch overhead costs at batch 1.
                            row["eager_tok_s"] = _point(cfg, kv, alloc, eager, batch, context, 32,
                                                        device, profile=False)["tok_s"]
                        row["generate_tok_s"] = _generate_rate(model, kv, context, steps, device,
                                                               cuda_graphs)
                    # K/V read per step: every cached token of every sequence, mid-run context.
                    row["kv_bytes"] = batch * (context + steps / 2 + 1) * per_token
                    floor_s = (weights + row["kv_bytes"]) / (copy["gbps"] * 1e9)
                    row.update(weight_gb=weights / 1e9, floor_tok_s=batch / floor_s,
                               vs_floor=row["tok_s"] * floor_s / batch)
                    if "kernels_per_step" in row:
                        kern = row["linear_us"] + row["attention_us"] + row["other_us"]
                        row.update(kernel_share=kern / (row["ms_step"] * 1e3),
                                   linear_gbps=weights / max(row["linear_us"], 1e-9) / 1e3,
                                   attention_gbps=row["kv_bytes"] / max(row["attention_us"], 1e-9) / 1e3)
                    rows.append(row)
                    extra = "".join(f", {k} {row[k]:.3g}" for k in ("eager_tok_s", "generate_tok_s",
                                    "kernels_per_step",
                                    "kernel_share", "linear_gbps", "attention_gbps") if k in row)
                    print(f"{label} batch {batch} context {context}: {row['tok_s']:.1f} tok/s, "
                          f"{row['vs_floor']:.2f} of the floor{extra}", flush=True)   # logged as it goes
                del kv, alloc, runner, eager
            del model
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
    print(f"\n{device_label(device)}; copy bandwidth {copy['gbps']:.1f} GB/s; CUDA graphs "
          f"{'on' if gpu and cuda_graphs else 'off'}; {'GPU' if gpu else 'CPU figure (small shape)'}")
    print(format_table(rows, ["model", "batch", "context", "tok_s", "ms_step", "floor_tok_s", "vs_floor",
                              "eager_tok_s", "generate_tok_s", "kernels_per_step", "kernel_share", "linear_gbps",
                              "attention_gbps"]))
    summary = [summary_row(f"e2e {r['model']} bs{r['batch']} ctx{r['context']}", r["tok_s"], "tok/s",
                           vs_floor=r["vs_floor"]) for r in rows]
    return {"copy_gbps": copy["gbps"], "is_cpu_figure": not gpu, "cuda_graphs": gpu and cuda_graphs,
            "rows": rows, "skipped": skipped, "summary": summary}
