"""`bench spec --workloads`: the suffix proposer (engine/suffix_proposer.py) on a real chat model.

Three workloads of chat conversations shipped in data/spec_workloads.json (written for this project):
edit (the answer copies much of the prompt), multiturn (the answer repeats earlier turns) and open
(open chat that does not repeat). Each conversation is answered twice in a row, plain then
speculative (interleaved, so the machine's drift hits both alike), batch 1, greedy and sampled; a
fresh proposer per (workload, temperature, repeat), whose store then fills with that workload's own
earlier answers. Decode tokens/s of a request = (tokens - 1) / (last token's time - first token's):
the prefill is left out.

At T = 0 the answers must equal plain decoding's (`same_as_plain`): a verify pass scores k + 1 rows
where a plain step scores one, and in bfloat16 a near-tie could round either way, so it is counted
rather than assumed. Predicted speed-up, from the chapter's formula with the measured acceptance rate alpha and the
measured step costs t(n) (one forward over n tokens per sequence): a step that drafted d tokens emits
E(d) = (1 - alpha^(d+1)) / (1 - alpha) tokens on average and costs t(d + 1) (t(1): a plain step), so

    predicted S = sum_steps E(d) * t(1) / sum_steps t(d + 1)

(`tau_S` puts the measured tokens per step in place of E: the cost model alone.) Suffix drafts are
not independent draws -- a copied run is kept whole or cut early -- so E with one alpha tends to
underestimate long copied runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tinyinfer.engine.llm import LLM
from tinyinfer.engine.speculative import Speculator
from tinyinfer.engine.suffix_proposer import SuffixProposer
from tinyinfer.loading.chat import apply_chat_template
from tinyinfer.sampling.params import SamplingParams
from tools.bench import common
from tools.bench.common import format_table, summary_row

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ROOT / "data" / "spec_workloads.json"
WORKLOADS = ("edit", "multiturn", "open")
COLUMNS = ["workload", "T", "tokens", "mean_accepted", "acceptance", "tau", "plain_tok_s",
           "spec_tok_s", "measured_S", "predicted_S", "tau_S", "measured/predicted", "same_as_plain"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(MODEL), help="--workloads: the chat model")
    parser.add_argument("--max-tokens", type=int, default=200, help="--workloads: tokens per answer at most")
    parser.add_argument("--repeats", type=int, default=2, help="--workloads: passes over the prompts")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7],
                        help="--workloads: sampling temperatures (0: greedy)")


def decode(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[list[int], float]:
    """(tokens, decode seconds) of one request alone: from its first token to its last."""
    stamps: list[float] = []
    out = llm.generate([prompt], params, on_token=lambda d: stamps.append(time.perf_counter())
                       if d.new_token_ids else None)[0]
    return out.token_ids, (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


def step_costs(llm: LLM, k: int, context: int, rounds: int) -> dict[int, float]:
    """t(n) for n = 1 .. k+1: one forward of n new tokens after `context` cached ones, as the engine
    runs it. Each round times every n in turn (the best of 3 calls); per n, the median over rounds of
    t(n) / t(1) of the same round, times the median t(1): on a busy machine the ratios the prediction
    needs stay steady while the absolute times drift."""
    from tinyinfer.engine.batch import build_batch
    from tinyinfer.engine.sequence import Sequence
    runner, blocks = llm.engine.runner, llm.engine.blocks
    seq = Sequence("timed", list(range(3, 3 + context + k + 1)), SamplingParams(), 0)
    blocks.grow(seq, len(seq))
    try:
        runner.execute(build_batch([seq], [context], runner.block_size))     # prefill the context
        seq.num_cached = context
        batches = {n: build_batch([seq], [n], runner.block_size) for n in range(1, k + 2)}
        ratios: dict[int, list[float]] = {n: [] for n in batches}
        base = []
        for _ in range(rounds):
            t = {}
            for n, batch in batches.items():
                calls = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    runner.execute(batch, all_logits=n > 1).sum().item()
                    calls.append(time.perf_counter() - t0)
                t[n] = min(calls)
            base.append(t[1])
            for n in batches:
                ratios[n].append(t[n] / t[1])
    finally:
        blocks.free(seq)
    t1 = statistics.median(base)
    return {n: t1 * statistics.median(r) for n, r in ratios.items()}


def predicted(drafts: dict[int, int], alpha: float, tau: float, cost: dict[int, float]
              ) -> tuple[float, float]:
    """(predicted S from alpha, S from the measured tokens per step), module docstring."""
    steps = sum(drafts.values())
    spent = sum(h * cost[d + 1] for d, h in drafts.items())
    e = sum(h * (d + 1 if alpha >= 1 else (1 - alpha ** (d + 1)) / (1 - alpha)) for d, h in drafts.items())
    return e * cost[1] / spent, tau * steps * cost[1] / spent


def run_workloads(args: argparse.Namespace, device: torch.device) -> dict:
    quick = common.QUICK
    llm = LLM(args.model, device=str(device), max_kv_tokens=16384)
    engine, k = llm.engine, args.k_max
    convs = json.loads(PROMPTS.read_text())
    prompts = {w: [apply_chat_template(llm.tokenizer, c) for c in convs[w][:1 if quick else None]]
               for w in WORKLOADS}
    context = int(statistics.mean(len(p) for w in WORKLOADS for p in prompts[w])) + args.max_tokens // 2
    cost = step_costs(llm, k, context, 1 if quick else 7)
    print(f"step costs at a {context}-token context (ms): "
          + ", ".join(f"t({n})={t * 1e3:.1f}" for n, t in cost.items()), flush=True)
    print(format_table([], COLUMNS), flush=True)
    rows = []
    for temp in args.temperatures:
        for w in WORKLOADS:
            tok = {"plain": 0, "spec": 0}
            secs = {"plain": 0.0, "spec": 0.0}
            proposed = accepted = emitted = seq_steps = 0
            drafts: dict[int, int] = {}
            same = runs = 0                 # answers identical to plain decoding's (greedy: all)
            for rep in range(1 if quick else args.repeats):
                spec = Speculator(engine.runner, engine.blocks, SuffixProposer(
                    per_token=0.15 if device.type == "cpu" else 0.02), k)
                for i, prompt in enumerate(prompts[w]):
                    params = SamplingParams(temperature=temp, max_tokens=args.max_tokens,
                                            seed=1000 * rep + i)
                    ids = {}
                    for mode in ("plain", "spec"):
                        engine.speculator = spec if mode == "spec" else None
                        ids[mode], s = decode(llm, prompt, params)
                        tok[mode] += len(ids[mode]) - 1
                        secs[mode] += s
                    same += ids["plain"] == ids["spec"]
                    runs += 1
                engine.speculator = None
                proposed, accepted = proposed + spec.proposed, accepted + spec.accepted
                emitted, seq_steps = emitted + spec.emitted, seq_steps + spec.seq_steps
                for d, h in spec.drafts.items():
                    drafts[d] = drafts.get(d, 0) + h
            plain_rate = tok["plain"] / max(secs["plain"], 1e-9)
            spec_rate = tok["spec"] / max(secs["spec"], 1e-9)
            alpha = accepted / max(1, proposed)
            tau = emitted / max(1, seq_steps)
            pred, tau_pred = predicted(drafts, alpha, tau, cost)
            measured = spec_rate / max(plain_rate, 1e-9)
            verify_steps = sum(h for d, h in drafts.items() if d > 0)
            rows.append({"workload": w, "T": temp, "tokens": tok["spec"],
                         "mean_accepted": accepted / max(1, verify_steps), "acceptance": alpha,
                         "tau": tau, "plain_tok_s": plain_rate, "spec_tok_s": spec_rate,
                         "measured_S": measured, "predicted_S": pred, "tau_S": tau_pred,
                         "measured/predicted": measured / pred,
                         "same_as_plain": f"{same}/{runs}" if temp == 0 else "",
                         "drafts": {str(d): h for d, h in sorted(drafts.items())}})
            print(format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    print(format_table(rows, COLUMNS))
    summary = [summary_row(f"spec suffix {r['workload']} T={r['T']} speedup", r["measured_S"], "x",
                           predicted=round(r["predicted_S"], 3), ratio=round(r["measured/predicted"], 3))
               for r in rows]
    return {"mode": "workloads", "model": Path(args.model).name, "k_max": k,
            "max_tokens": args.max_tokens, "repeats": args.repeats,
            "step_costs_ms": {str(n): t * 1e3 for n, t in cost.items()}, "rows": rows, "summary": summary}
