"""ops: how many operations one decode step dispatches, per kind -- the launch count of a step.

A decode step of a small model (or of any model at batch 1 without CUDA graphs) costs its launches
more than its bytes, so "fewer launches per step" is a figure of its own. This bench runs one decode
step of a checkpoint under a `TorchDispatchMode` and counts every operation that reaches a kernel: a
tinyinfer custom op counts once (one kernel on a GPU; its CPU reference's inner ops are not seen),
view and metadata-only ops not at all. It needs no GPU, so the count is checked on every machine;
on a GPU `bench e2e` adds the profiler's own kernel count (kernels_per_step).
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tinyinfer.engine.llm_engine import LLMEngine
from tinyinfer.sampling.params import SamplingParams
from tools.bench.common import device_label, format_table, summary_row

# Ops that only make a view or read metadata: no kernel.
NO_KERNEL = {"view", "unsqueeze", "slice", "select", "reshape", "split", "split_with_sizes", "chunk",
             "detach", "detach_", "lift_fresh", "t", "transpose", "expand", "_unsafe_view", "alias",
             "as_strided", "empty", "squeeze", "permute", "unbind", "_reshape_alias", "resolve_conj",
             "resolve_neg"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).replace("aten.", "")
        if name not in NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default="models/shakespeare-llama", help="checkpoint to count on")
    parser.add_argument("--batch", type=int, default=4, help="sequences in the decode step")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads (0 = torch's default), one as generate uses")


def count_decode_step(engine: LLMEngine, batch: int) -> Counter:
    """The ops of the second decode step of `batch` greedy requests (the first may capture graphs)."""
    for i in range(batch):
        engine.add_request([5 + i, 17, 33], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    engine.step()                                      # prefill
    engine.step()                                      # first decode step
    counter = OpCounter()
    with counter:
        engine.step()
    while engine.has_unfinished():
        engine.step()
    return counter.counts


def run(args: argparse.Namespace, device: torch.device) -> dict:
    if args.threads > 0 and device.type == "cpu":
        torch.set_num_threads(args.threads)
    # Eager on a GPU too: a graph replay dispatches nothing, and the count is of the step's kernels.
    engine = LLMEngine(args.ckpt, device=str(device), max_kv_tokens=4096, enable_prefix_caching=False,
                       cuda_graphs=False)
    counts = count_decode_step(engine, args.batch)
    layers = engine.config.num_layers
    rows = [{"op": op, "per_step": n, "per_layer": round(n / layers, 2)}
            for op, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    total = sum(counts.values())
    print(f"{device_label(device)}; {args.ckpt}: {layers} layers, batch {args.batch}; "
          f"{total} kernel-launching ops per decode step")
    print(format_table(rows, ["op", "per_step", "per_layer"]))
    return {"ckpt": args.ckpt, "layers": layers, "batch": args.batch, "ops_per_step": total,
            "counts": dict(counts),
            "summary": [summary_row("ops per decode step", total, "ops", per_layer=total / layers)]}
