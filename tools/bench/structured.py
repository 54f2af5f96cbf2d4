"""structured: constrained decoding (docs/structured-output.md) -- validity, decode overhead, compile latency.

1. Validity: every JSON schema of tests/data/structured_schemas.json (54, written for this project:
   nested objects, arrays, enums, patterns, anyOf / oneOf / allOf, $ref and recursion, required and
   optional fields, number bounds, unicode) on each --models checkpoint, sampled at temperature 1.0
   (--seeds seeds each, all in one batch): the share of outputs that parse and validate with
   `jsonschema` (the goal is 100 %).
2. Overhead: decode tokens/s with a JSON-schema constraint / unconstrained, at each --batches size, on
   --overhead-model (SmolLM2 by default), interleaved in one run, median of --repeats; decode steps
   only (after every sequence has its first token), --decode-tokens each. The constraint (a long
   array of objects) never completes within that, so both sides decode the same number of tokens.
   The same with the mask computed after the forward instead of during it (overlap off).
3. Compile latency: time to first token (add_request + steps to the first token, batch 1) of an
   unconstrained request, of a schema never seen (cold: compiled first) and of the same schema again
   (cached), median of --repeats.

Figures from a CPU are same-run ratios; write down the machine's load average with them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from tinyinfer.engine.llm_engine import LLMEngine
from tinyinfer.sampling.params import SamplingParams
from tinyinfer.sampling.structured import StructuredOutput
from tools.bench.common import format_table, summary_row

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "tests" / "data" / "structured_schemas.json"
DEMO = ROOT / "models" / "shakespeare-llama"
SMOL = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
# Never complete within the decode budget: ~15 tokens per item, at least 40 items.
LONG = {"type": "array", "minItems": 40, "items": {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999}, "name": {"type": "string", "maxLength": 12},
    "ok": {"type": "boolean"}}, "required": ["id", "name", "ok"], "additionalProperties": False}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=[str(DEMO), str(SMOL)], help="checkpoints for validity")
    p.add_argument("--seeds", type=int, default=1, help="samples per schema and model (validity)")
    p.add_argument("--limit", type=int, default=None, help="only the first N schemas (validity)")
    p.add_argument("--max-tokens", type=int, default=400, help="max_tokens of a validity sample")
    p.add_argument("--overhead-model", default=str(SMOL), help="checkpoint for overhead and latency")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes (overhead)")
    p.add_argument("--decode-tokens", type=int, default=48, help="decode tokens per sequence (overhead)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (overhead, latency)")
    p.add_argument("--skip", nargs="*", default=[], choices=["validity", "overhead", "latency"],
                   help="parts of the bench not to run")


def prompt_for(path: str) -> str:
    return CHAT.format("Answer with JSON.") if path.endswith(".gguf") else "ROMEO:"


def drive(engine: LLMEngine, requests: list[tuple[str, SamplingParams]]) -> tuple[dict, float, int]:
    """Run requests to the end: (id -> [text, finish], decode seconds, decode tokens); decode counts
    the steps after every request has its first token."""
    ids = [engine.add_request(p, sp) for p, sp in requests]
    out = {i: ["", None] for i in ids}
    started, first, t0, decoded = set(), False, 0.0, 0
    while engine.has_unfinished():
        deltas = engine.step()
        if first:
            decoded += sum(len(d.new_token_ids) for d in deltas)
        for d in deltas:
            out[d.request_id][0] += d.new_text
            out[d.request_id][1] = d.finish_reason
            started.add(d.request_id)
        if not first and len(started) == len(ids):
            first, t0 = True, time.perf_counter()
    return out, (time.perf_counter() - t0) if first else 0.0, decoded


def validity(args, schemas: dict) -> list[dict]:
    import jsonschema
    rows = []
    for path in args.models:
        engine = LLMEngine(path, device="cpu", dtype="float32", max_kv_tokens=65536)
        reqs, names = [], []
        for s in range(args.seeds):
            for name, schema in schemas.items():
                names.append(name)
                reqs.append((prompt_for(path), SamplingParams(temperature=1.0, seed=s, max_tokens=args.max_tokens,
                                                              structured=StructuredOutput(json_schema=schema))))
        t = time.perf_counter()
        out, _, _ = drive(engine, reqs)
        valid, bad = 0, []
        for name, (text, reason) in zip(names, out.values()):
            try:
                jsonschema.validate(json.loads(text), schemas[name])
                valid += 1
            except (ValueError, jsonschema.ValidationError) as err:
                bad.append(f"{name} ({reason}): {str(err)[:80]} in {text[:80]!r}")
        rows.append({"model": Path(path).name, "outputs": len(reqs), "valid": valid,
                     "valid_%": round(100 * valid / len(reqs), 1), "s": round(time.perf_counter() - t, 1)})
        for line in bad:
            print("  invalid:", line)
    return rows


def overhead(args, engine: LLMEngine) -> list[dict]:
    prompt = prompt_for(args.overhead_model)
    plain = SamplingParams(temperature=1.0, seed=1, max_tokens=args.decode_tokens + 1, ignore_eos=True)
    so = StructuredOutput(json_schema=LONG)
    engine.grammars.compile(so)                          # compile time is section 3's
    rows = []
    for batch in args.batches:
        runs: dict[str, list[float]] = {"plain": [], "json": [], "json_no_overlap": []}
        for _ in range(args.repeats):                    # interleaved: load changes hit all alike
            for name in runs:
                engine.grammars.overlap = name != "json_no_overlap"
                sp = plain if name == "plain" else SamplingParams(
                    temperature=1.0, seed=1, max_tokens=args.decode_tokens + 1, structured=so)
                _, secs, toks = drive(engine, [(prompt, sp)] * batch)
                runs[name].append(toks / secs)
        engine.grammars.overlap = True
        med = {k: statistics.median(v) for k, v in runs.items()}
        rows.append({"batch": batch, "plain_tok/s": round(med["plain"], 1), "json_tok/s": round(med["json"], 1),
                     "json/plain": round(med["json"] / med["plain"], 3),
                     "no_overlap/plain": round(med["json_no_overlap"] / med["plain"], 3)})
    return rows


def latency(args, engine: LLMEngine) -> dict:
    prompt = prompt_for(args.overhead_model)

    def ttft(sp: SamplingParams) -> float:
        t = time.perf_counter()
        rid = engine.add_request(prompt, sp)
        while not any(d.new_token_ids for d in engine.step() if d.request_id == rid):
            pass
        secs = time.perf_counter() - t
        engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
        return secs
    times: dict[str, list[float]] = {"plain": [], "cold": [], "cached": []}
    for r in range(args.repeats):
        schema = dict(LONG, title=f"fresh-{os.getpid()}-{r}-{time.time_ns()}")   # never seen before
        times["plain"].append(ttft(SamplingParams(max_tokens=4)))
        times["cold"].append(ttft(SamplingParams(max_tokens=4, structured=StructuredOutput(json_schema=schema))))
        times["cached"].append(ttft(SamplingParams(max_tokens=4, structured=StructuredOutput(json_schema=schema))))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"ttft_plain_ms": round(med["plain"], 1), "ttft_cold_ms": round(med["cold"], 1),
            "ttft_cached_ms": round(med["cached"], 1), "compile_added_ms": round(med["cold"] - med["plain"], 1),
            "cached_added_ms": round(med["cached"] - med["plain"], 1)}


def run(args: argparse.Namespace, device: torch.device) -> dict:
    schemas = json.loads(SCHEMAS.read_text())
    schemas = dict(list(schemas.items())[:args.limit])
    results: dict = {"load_average": os.getloadavg()[0], "summary": []}
    print(f"load average at start: {os.getloadavg()}")
    if "validity" not in args.skip:
        rows = validity(args, schemas)
        print(format_table(rows, list(rows[0])))
        results["validity"] = rows
        results["summary"] += [summary_row(f"valid_{r['model']}", r["valid_%"], "%") for r in rows]
    if {"overhead", "latency"} - set(args.skip):
        engine = LLMEngine(args.overhead_model, device="cpu", dtype="float32", max_kv_tokens=16384)
        engine.grammars.compile(StructuredOutput(json_object=True))   # the tokenizer set-up, once
        if "overhead" not in args.skip:
            rows = overhead(args, engine)
            print(format_table(rows, list(rows[0])))
            results["overhead"] = rows
            results["summary"] += [summary_row(f"json/plain_b{r['batch']}", r["json/plain"], "x") for r in rows]
        if "latency" not in args.skip:
            results["latency"] = latency(args, engine)
            print(results["latency"])
    results["load_average_end"] = os.getloadavg()[0]
    print(f"load average at end: {os.getloadavg()}")
    return results
