"""cpu_profile: where one decode step's time goes on a CPU (the breakdown in docs/cpu-performance.md).

For each --ckpt, at batch 1 and 16, the engine is run to a decode step with ~20 generated tokens and
that step is taken apart. "step" is the fastest of 40 real engine steps (the least disturbed by the
rest of a shared machine), and "engine Python" their time outside the model runner (scheduler, the
sampling step's bookkeeping, appending tokens, deltas). Every other row re-runs one part of the step
on its own, on that step's inputs (the fastest of repeated runs): the linears, RoPE + K/V write,
attention, norms and SwiGLU activations of every layer in layer order (so a large model's weights
stream from memory as in the step), the embedding, lm_head, argmax + finite check, batch building
(build_batch + StepBatch.to_device), and the forward pass whole; "layer glue" is the forward minus its
parts (views, splits, module calls, and the cache misses of running the parts interleaved). Two rows
are costs included above, not extra: "custom-op dispatch" (each op through its custom op minus the
same kernel called directly, times the op calls in a step) and "detokenization, streamed" (pushing the
step's tokens through TextStream: what a streaming request pays per step; a request nobody streams
decodes once at its end). --compile adds torch.compile of the forward: compile seconds and the
forward's time compiled. One torch thread; a .gguf runs dense float32, as `bench hf` compares it;
Llama-family models (MHA / GQA). CPU figures: times within one run.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tinyinfer import ops
from tinyinfer.engine.batch import build_batch
from tinyinfer.engine.llm import LLM
from tinyinfer.engine.output import TextStream
from tinyinfer.layers.attention import attend
from tinyinfer.ops import cpu as cpu_kernels
from tinyinfer.ops.cpu_matmul import linear_cpu
from tinyinfer.sampling.params import SamplingParams
from tinyinfer.sampling.sampler import finite_rows
from tools.bench.common import cpu_only, device_label, format_table, git_commit
from tools.bench.hf import _prompts, dequantized

GPU_CHECK_ARGS: list[list[str]] = []          # a CPU benchmark: make gpu-check skips it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", action="append", default=None,
                        help="checkpoint (repeatable; default models/shakespeare-llama)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the forward")


def _best_us(fn, budget_s: float = 0.3) -> float:
    """Minimum time of fn() over repeated runs, in microseconds."""
    fn()
    start, best = time.perf_counter(), float("inf")
    while time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e6


def _step_parts(llm: LLM, batch_size: int, compile_forward: bool) -> dict:
    eng, runner, model = llm.engine, llm.engine.runner, llm.model
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    for p in _prompts(llm.tokenizer, batch_size):
        eng.add_request(p, params, stream=False)
    for _ in range(20):
        eng.step()
    steps, outside = [], []                   # per real step: its time, and the time outside the runner
    execute_sampled = runner.execute_sampled
    inside = []

    def timed(batch):
        t = time.perf_counter()
        out = execute_sampled(batch)
        inside.append(time.perf_counter() - t)
        return out
    runner.execute_sampled = timed            # this instance only, for these steps
    try:
        for _ in range(40):
            inside.clear()
            t = time.perf_counter()
            eng.step()
            steps.append(time.perf_counter() - t)
            outside.append(steps[-1] - sum(inside))
    finally:
        del runner.execute_sampled
    work = eng.scheduler.schedule(0)
    batch = build_batch(work.seqs, work.num_new, runner.block_size)
    parts = {"step": min(steps) * 1e6, "engine Python": min(outside) * 1e6}
    with torch.inference_mode():
        ids, pos, meta = batch.to_device(runner.device)
        kv, layers, cfg = runner.kv.layers(), list(model.layers), model.cfg
        T, hidden = ids.shape[0], model.forward(ids, pos, meta, kv)
        x = torch.randn_like(hidden)
        a0 = layers[0].attn
        q, k, v = a0.qkv_proj(x).split(a0.splits, dim=-1)
        q, k, v = (t.reshape(T, -1, cfg.head_dim) for t in (q, k, v))
        rq, rk = ops.rope_store_kv(q, k, v, model.rotary.cos_sin_cache, pos, *kv[0], meta.slot_mapping)
        o = attend(rq, rk, v, *kv[0], meta, a0.scale).reshape(T, -1)
        gu = layers[0].mlp.gate_up_proj(x)
        act = F.silu(gu[:, :cfg.intermediate_size]) * gu[:, cfg.intermediate_size:]

        def linears():
            for layer in layers:
                layer.attn.qkv_proj(x), layer.attn.o_proj(o)
                layer.mlp.gate_up_proj(x), layer.mlp.down_proj(act)
        parts["linears"] = _best_us(linears)
        parts["lm_head"] = _best_us(lambda: model.compute_logits(x[:batch.num_seqs]))
        parts["attention"] = _best_us(lambda: [attend(rq, rk, v, *c, meta, a0.scale) for c in kv])
        parts["rope + K/V write"] = _best_us(lambda: [ops.rope_store_kv(
            q, k, v, model.rotary.cos_sin_cache, pos, *c, meta.slot_mapping) for c in kv])
        parts["norms"] = _best_us(lambda: [ln.add_and_norm(x, x) for layer in layers for ln in (
            layer.input_layernorm, layer.post_attention_layernorm)] + [model.norm(x)])
        parts["SwiGLU activation"] = _best_us(lambda: [F.silu(gu[:, :cfg.intermediate_size]) *
                                                       gu[:, cfg.intermediate_size:] for _ in layers])
        parts["embedding"] = _best_us(lambda: model.embed_tokens(ids))
        parts["forward"] = _best_us(lambda: model.forward(ids, pos, meta, kv))
        logits = model.compute_logits(x[:batch.num_seqs])
        parts["argmax + finite check"] = _best_us(lambda: (logits.argmax(dim=-1), finite_rows(logits)))
        parts["batch building"] = _best_us(lambda: build_batch(work.seqs, work.num_new, runner.block_size)
                                           .to_device(runner.device))
        calls = 4 * len(layers) + 1
        parts["custom-op dispatch"] = calls * (_best_us(lambda: ops.linear(x, a0.o_proj.weight, None))
                                               - _best_us(lambda: linear_cpu(x, a0.o_proj.weight, None)))
        parts["custom-op dispatch"] += 2 * len(layers) * (
            _best_us(lambda: ops.fused_add_rmsnorm(x, x, layers[0].input_layernorm.weight, 1e-5))
            - _best_us(lambda: cpu_kernels.fused_add_rmsnorm_cpu(x, x, layers[0].input_layernorm.weight,
                                                                 1e-5)))
        if compile_forward:
            compiled = torch.compile(model.forward)
            t = time.perf_counter()
            compiled(ids, pos, meta, kv)
            parts["compile (s)"] = time.perf_counter() - t
            parts["forward, compiled"] = _best_us(lambda: compiled(ids, pos, meta, kv))
    tokens = [s.token_ids[-1] for s in work.seqs]
    streams = [TextStream(llm.tokenizer, s.prompt_ids, []) for s in work.seqs]
    parts["detokenization, streamed"] = _best_us(lambda: [st.push(t) for st, t in zip(streams, tokens)])
    for rid in list(eng.requests):
        eng.abort(rid)
    eng.step()
    return parts


def run(args: argparse.Namespace, device: torch.device) -> dict:
    cpu_only("cpu_profile", device, args.threads)
    rows = []
    for path in args.ckpt or ["models/shakespeare-llama"]:
        llm = LLM(path, device="cpu", dtype="float32", max_kv_tokens=8192)
        if path.endswith(".gguf"):
            dequantized(llm)
        for batch in (1, 16):
            p = _step_parts(llm, batch, args.compile)
            p["layer glue"] = p["forward"] - sum(p[k] for k in (
                "linears", "attention", "rope + K/V write", "norms", "SwiGLU activation", "embedding"))
            rows += [{"ckpt": path.rstrip("/").split("/")[-1], "batch": batch, "part": k,
                      "us": round(v, 3 if k == "compile (s)" else 1),
                      "share_of_step": f"{100 * v / p['step']:.0f}%" if k != "compile (s)" else ""}
                     for k, v in p.items()]
    print(f"{device_label(device)}; float32, decode step at ~20 generated tokens, commit {git_commit()}")
    print(format_table(rows, ["ckpt", "batch", "part", "us", "share_of_step"]))
    return {"rows": rows, "is_cpu_figure": True}
