"""hf: tinyinfer vs Hugging Face generate() on a checkpoint: decode tokens/s at batch 1 and batch 16
(prompts of mixed length), greedy, one run each, same process; decode time = time(N tokens) - time(1
token), so prefill is left out of both. On a CPU a tiny model is overhead-bound: this measures each
engine's own cost. Also what `python -m tools.bench e2e --ckpt PATH` runs (and `make bench`, on the
demo model and SmolLM2: docs/cpu-performance.md). A .gguf checkpoint is read by transformers with
`from_pretrained(dir, gguf_file=...)`, its Q4 tensors dequantized into dense float32 linears; tinyinfer
runs the same dense float32 model (`dequantized`: its INT4 layers turned into dense linears of the
same values), like with like. (Kept as INT4, tinyinfer's float32 path multiplies by the same values
with torch's own matmul, bit for bit the op's reference: ops/cpu_matmul.py.)
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from tinyinfer.engine.llm import LLM
from tinyinfer.layers.linear import Int4Linear, Linear
from tinyinfer.sampling.params import SamplingParams
from tools.bench.common import device_label, format_table, git_commit, is_gpu, summary_row

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First "
        "Citizen: You are all resolved rather to die than to famish? All: Resolved. resolved. First "
        "Citizen: First, you know Caius Marcius is chief enemy to the people. All: We know't, we "
        "know't. First Citizen: Let us kill him, and we'll have corn at our own price.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default="models/shakespeare-llama", help="checkpoint to compare on")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="decode through CUDA graphs (GPU); --no-cuda-graphs launches eagerly")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads for both engines (0 = torch's default)")
    parser.add_argument("--batches", default="1,16",
                        help="batch sizes, comma-separated (prompts of mixed length above 1)")
    parser.add_argument("--equal-lengths", action="store_true",
                        help="every prompt 16 tokens (HF pads nothing: its best case at batch > 1)")


def run(args: argparse.Namespace, device: torch.device) -> dict:
    if args.threads > 0 and not is_gpu(device):
        torch.set_num_threads(args.threads)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--batches {args.batches!r}: give batch sizes as integers, e.g. 1,4,16")
    if not batches or min(batches) < 1:
        raise SystemExit(f"--batches {args.batches!r}: give at least one batch size, each >= 1")
    return compare_with_hf(args.ckpt, device, args.new_tokens, args.cuda_graphs, batches,
                           args.equal_lengths)


def _prompts(tokenizer, batch: int, equal: bool = False) -> list[list[int]]:
    ids = tokenizer.encode(TEXT)
    if batch == 1 or equal:
        return [ids[i:i + 16] for i in range(batch)]         # batch 1: ids[:16], as before
    return [ids[:8 + (i * 53) % 64] for i in range(batch)]              # lengths 8..71, mixed


def _decode_rate(generate, prompts: list[list[int]], n: int) -> tuple[float, float]:
    """(decode tokens/s, CPU ms per decode step): time(n tokens) - time(1 token), best of three.
    The process's CPU time is the engine's own cost even on a machine busy with other work."""
    generate(prompts, 2)                                                 # warm-up
    wall = cpu = float("inf")
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        generate(prompts, 1)
        t1, c1 = time.perf_counter(), time.process_time()
        generate(prompts, n)
        t2, c2 = time.perf_counter(), time.process_time()
        wall, cpu = min(wall, (t2 - t1) - (t1 - t0)), min(cpu, (c2 - c1) - (c1 - c0))
    return len(prompts) * (n - 1) / wall, cpu / (n - 1) * 1e3


def dequantized(llm: LLM) -> LLM:
    """Every Int4Linear of the model replaced by a dense Linear holding its dequantized weight."""
    for name, module in list(llm.model.named_modules()):
        if isinstance(module, Int4Linear):
            dense = Linear(module.in_features, module.out_features, module.bias is not None)
            dense.weight.data = module.dequantize()                        # (N, K), the layer's dtype
            if module.bias is not None:
                dense.bias.data = module.bias.data
            parent, _, child = name.rpartition(".")
            setattr(llm.model.get_submodule(parent) if parent else llm.model, child, dense)
    return llm


def hf_model(path: str, dtype: torch.dtype):
    """transformers' model of a checkpoint directory, or of a .gguf file."""
    from transformers import AutoModelForCausalLM           # a test/bench-only dependency
    if path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                    gguf_file=os.path.basename(path), dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def hf_generate(hf, pad: int, device: torch.device):
    """generate(prompts, k): HF generate() of exactly k greedy tokens per prompt, left-padded with an
    explicit attention mask (the pad id may be EOS)."""
    @torch.inference_mode()
    def generate(prompts: list[list[int]], k: int) -> None:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
                    do_sample=False, pad_token_id=pad)
    return generate


def compare_with_hf(path: str, device: torch.device, n: int, cuda_graphs: bool,
                    batches: tuple[int, ...] = (1, 16), equal: bool = False) -> dict:
    dtype = "float32" if not is_gpu(device) else "bfloat16"
    llm = LLM(path, device=str(device), dtype=dtype, cuda_graphs=cuda_graphs and is_gpu(device),
              max_kv_tokens=16 * 256)
    if path.endswith(".gguf") and not is_gpu(device):
        dequantized(llm)                               # dense float32, as transformers loads the file
    hf = hf_model(path, getattr(torch, dtype)).to(device).eval()
    pad = llm.config.eos_token_ids[0] if llm.config.eos_token_ids else 0
    theirs = hf_generate(hf, pad, device)

    def ours(prompts, k):
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True))

    rows = []
    for batch in batches:
        prompts = _prompts(llm.tokenizer, batch, equal)
        tps, ms = _decode_rate(ours, prompts, n)
        hf_tps, hf_ms = _decode_rate(theirs, prompts, n)
        rows.append({"batch": batch, "prompt_lens": f"{min(map(len, prompts))}-{max(map(len, prompts))}",
                     "tinyinfer_tok_s": tps, "hf_tok_s": hf_tps, "ratio": tps / hf_tps,
                     "tinyinfer_cpu_ms_step": ms, "hf_cpu_ms_step": hf_ms, "cpu_time_ratio": hf_ms / ms})
    where = "" if is_gpu(device) else " -- CPU figure: ratios within this run only"
    print(f"{device_label(device)}; {path}, {dtype}, greedy, {n} new tokens, commit {git_commit()}{where}")
    print(format_table(rows, ["batch", "prompt_lens", "tinyinfer_tok_s", "hf_tok_s", "ratio",
                              "tinyinfer_cpu_ms_step", "hf_cpu_ms_step", "cpu_time_ratio"]))
    print("ratio: tokens/s over HF's (wall clock); cpu_time_ratio: HF's CPU time per decode step over "
          "tinyinfer's (steadier on a busy machine); > 1 means tinyinfer is faster")
    summary = [summary_row(f"e2e {path.rstrip('/').split('/')[-1]} bs{r['batch']} vs HF generate",
                           r["tinyinfer_tok_s"], "tok/s", vs_torch=r["ratio"]) for r in rows]
    return {"ckpt": path, "dtype": dtype, "new_tokens": n, "is_cpu_figure": not is_gpu(device),
            "rows": rows, "summary": summary}


def figure(results: dict):
    """Decode tokens/s against batch size, one curve per engine (every rows column "<engine>_tok_s":
    tinyinfer, HF; a bench that adds another engine's column gets its curve for free), and each engine's
    CPU time per decode step, the steadier figure on a busy machine."""
    from tools.bench.plot import Figure, Panel, engine_series
    rows = results["rows"]
    panels = [Panel("batch size (sequences)", "decode tokens/s (wall clock)", engine_series(rows, "batch"),
                    xlog=True, title=f"{results['ckpt'].rstrip('/').split('/')[-1]}, {results['dtype']}, "
                                     f"{results['new_tokens']} new tokens, greedy")]
    cpu = engine_series(rows, "batch", "_cpu_ms_step")
    if cpu:
        panels.append(Panel("batch size (sequences)", "CPU time per decode step (ms)", cpu, xlog=True,
                            title="the process's CPU time (steadier under load)"))
    return Figure("bench hf: decode speed against batch size", panels)
