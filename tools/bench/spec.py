"""spec: speculative decoding -- acceptance, tokens per target step, and measured vs predicted speedup.

For k = 1..8 (greedy, batch 1 by default): the acceptance rate, tau = mean tokens emitted per target
step, the measured times of one plain decode step t_decode, one draft step t_draft and one verify step
t_verify(k+1) (a forward over k+1 tokens), decode tokens/s with and without speculation in the same
run (plain decoding timed again right before each k), the measured speedup, and the speedup those
parts predict (Leviathan et al. 2023, eq. for the walltime improvement, with measured costs instead of
a cost ratio):

    S = tau * t_decode / (k * t_draft + t_verify(k+1))

measured / predicted says how much the engine's own work (proposing, sampling, rollback, bookkeeping)
costs. Rows:
  * CPU: the shipped pair (models/shakespeare-llama + models/shakespeare-draft), then the n-gram
    proposer on a prompt that repeats itself. A CPU figure is only a ratio within this run.
  * GPU: a random-weight Llama-2-7B-shaped target and a random ~1B-shaped draft (TinyLlama's shape) for
    the costs, with an *oracle* proposer for the acceptance: it runs the draft model (so its cost is
    real) but proposes the target's own greedy token with probability alpha (0.6, 0.8, 0.9), else a
    wrong one. Then the n-gram proposer on a self-repeating prompt.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from tinyinfer.config.model import ModelConfig
from tinyinfer.engine.batch import build_batch
from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.engine.kv_cache import PagedKVCache
from tinyinfer.engine.llm import LLM
from tinyinfer.engine.llm_engine import LLMEngine
from tinyinfer.engine.model_runner import ModelRunner
from tinyinfer.engine.proposers import DraftModelProposer, NgramProposer, Proposal
from tinyinfer.engine.sequence import Sequence
from tinyinfer.engine.speculative import Speculator
from tinyinfer.loading.tokenizer import Tokenizer
from tinyinfer.models.transformer import Transformer, build_model
from tinyinfer.sampling.params import SamplingParams
from tools.bench import spec_workloads
from tools.bench.common import device_label, format_table, is_gpu, summary_row, time_calls

ROOT = Path(__file__).resolve().parents[2]
TARGET, DRAFT = ROOT / "models" / "shakespeare-llama", ROOT / "models" / "shakespeare-draft"
PROMPT = "ROMEO:\nWhat light through yonder window breaks? It is the east, and Juliet is the sun."
REPEAT = ("KING HENRY:\nOnce more unto the breach, dear friends, once more;\nOr close the wall up "
          "with our English dead.\n") * 3 + "KING HENRY:\nOnce more"
COLUMNS = ["proposer", "k", "acceptance", "tau", "t_decode_ms", "t_draft_ms", "t_verify_ms",
           "plain_tok_s", "spec_tok_s", "measured_S", "predicted_S", "measured/predicted"]
GPU_CHECK_ARGS = [["--new-tokens", "96"]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k-max", type=int, default=8, help="speculate k = 1 .. k-max")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens generated per run (default: 128 on a GPU, 64 on a CPU)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.6, 0.8, 0.9],
                        help="GPU oracle: probability of proposing the target's greedy token")
    parser.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=None,
                        help="random-weight target + draft with the oracle proposer (default: on a "
                             "GPU; on a CPU it runs small shapes, to try the path)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads (0 = torch's default), one as generate uses")
    parser.add_argument("--workloads", action="store_true",
                        help="instead: the suffix proposer on a chat model's edit / multi-turn / open "
                             "workloads (tools/bench/spec_workloads.py)")
    spec_workloads.add_arguments(parser)


# ---------------------------------------------------------------------------------------------- models

def synthetic_llm(cfg, dtype: torch.dtype, device: torch.device, kv_tokens: int, tokenizer) -> LLM:
    """The engine around a random-weight model (no checkpoint to read). The lm_head is scaled so the
    logits have a clear argmax (random models otherwise have near-ties, where bf16 rounding decides)."""
    with torch.inference_mode():
        model = build_model(cfg, dtype, device)
        gen = torch.Generator(device).manual_seed(cfg.num_layers)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02 * (10.0 if name.startswith("lm_head") else 1.0), generator=gen)
    kv = PagedKVCache(cfg.num_layers, kv_tokens // 16, 16, *Transformer.kv_dims(cfg), dtype, device)
    runner = ModelRunner(model, kv, cuda_graphs=is_gpu(device))
    return LLM.from_engine(LLMEngine.from_runner(runner, tokenizer))


def synthetic_configs(gpu: bool):
    if not gpu:
        return (ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=4,
                            num_heads=4, num_kv_heads=4, head_dim=64, max_position_embeddings=1024),
                ModelConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=2,
                            num_heads=2, num_kv_heads=1, head_dim=64, max_position_embeddings=1024))
    target = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                         num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096)
    draft = ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                        num_heads=32, num_kv_heads=4, head_dim=64, max_position_embeddings=4096)
    return target, draft


class OracleProposer:
    """Runs a draft model for its cost, but proposes the target's known greedy continuation with
    probability alpha per token (else a wrong token): acceptance at a chosen rate on random weights.
    (The draft cache then holds the draft's own tokens where the oracle's were kept: it is only timed.)"""

    def __init__(self, inner, reference: dict[tuple, list[int]], alpha: float, vocab: int):
        self.inner, self.reference, self.alpha, self.vocab = inner, reference, alpha, vocab
        self.rng = random.Random(0)

    def propose(self, seqs, limits):
        self.inner.propose(seqs, limits)
        tokens = []
        for s, k in zip(seqs, limits):
            ref, j = self.reference[tuple(s.prompt_ids)], s.num_outputs
            tokens.append([ref[j + i] if self.rng.random() < self.alpha else (ref[j + i] + 1) % self.vocab
                           for i in range(k)])
        return Proposal(tokens, None)

    def accepted(self, seqs, lengths, num_accepted):
        self.inner.accepted(seqs, lengths, num_accepted)

    def forget(self, seq):
        self.inner.forget(seq)


# ---------------------------------------------------------------------------------------------- timing

def decode_rate(llm, prompts: list[list[int]], n: int, device: torch.device) -> tuple[float, list]:
    """Decode tokens/s: (time for n tokens - time for 1 token) leaves the prefill out."""

    def timed(max_tokens: int):
        torch.cuda.synchronize(device) if is_gpu(device) else None
        t0 = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                    ignore_eos=True))
        return time.perf_counter() - t0, outs

    timed(n)                                    # warm-up: graphs captured, caches touched
    t1, _ = timed(1)
    if llm.engine.speculator is not None:
        llm.engine.speculator.reset_stats()
    tn, outs = timed(n)
    return len(prompts) * (n - 1) / max(tn - t1, 1e-9), outs


def step_time(runner: ModelRunner, num_new: int, context: int, device: torch.device) -> float:
    """Median time of one forward of `num_new` tokens per sequence at `context` cached tokens, as
    the engine runs it (a CUDA graph where the step fits one; host-synchronised)."""
    blocks = BlockManager(runner.num_blocks, runner.block_size)
    seq = Sequence("timed", list(range(3, 3 + context + num_new)), SamplingParams(), 0)
    blocks.grow(seq, len(seq))
    try:
        runner.execute(build_batch([seq], [context], runner.block_size))    # prefill the context
        seq.num_cached = context
        batch = build_batch([seq], [num_new], runner.block_size)

        def one(_i: int) -> None:
            runner.execute(batch, all_logits=num_new > 1).sum().item()      # the host waits
        return time_calls(one, device, runs=7, warmup=3, target_run_s=0.05).median_s
    finally:
        blocks.free(seq)


def bench_rows(name: str, llm, proposer_for, prompts, n: int, k_max: int, t_draft: float,
               device: torch.device, speculators: dict) -> list[dict]:
    engine = llm.engine
    context = len(prompts[0]) + n // 2
    t_decode = step_time(engine.runner, 1, context, device)
    rows = []
    for k in range(1, k_max + 1):
        # Plain decoding timed right before each speculative run (interleaved): on a busy machine one
        # plain figure for every k would turn the machine's drift into speed-up.
        engine.speculator = None
        plain_rate, _ = decode_rate(llm, prompts, n, device)
        spec = engine.speculator = speculators.setdefault(
            k, Speculator(engine.runner, engine.blocks, NgramProposer(), k))
        spec.proposer = proposer_for(k)
        t_verify = step_time(engine.runner, k + 1, context, device)
        rate, _ = decode_rate(llm, prompts, n, device)
        fig = spec.figures()
        tau = fig["tokens_per_target_step"]
        predicted = tau * t_decode / (k * t_draft + t_verify)
        measured = rate / plain_rate
        rows.append({"proposer": name, "k": k, "acceptance": fig["acceptance_rate"], "tau": tau,
                     "t_decode_ms": t_decode * 1e3, "t_draft_ms": t_draft * 1e3,
                     "t_verify_ms": t_verify * 1e3, "plain_tok_s": plain_rate, "spec_tok_s": rate,
                     "measured_S": measured, "predicted_S": predicted,
                     "measured/predicted": measured / predicted})
        print(format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    engine.speculator = None
    return rows


def run(args: argparse.Namespace, device: torch.device) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.workloads:
        return spec_workloads.run_workloads(args, device)
    gpu = is_gpu(device)
    synthetic = gpu if args.synthetic is None else args.synthetic
    n = args.new_tokens or (128 if gpu else 64)
    print(device_label(device))
    print(format_table([], COLUMNS))
    if synthetic:
        tok = Tokenizer.from_dir(TARGET)
        cfg_t, cfg_d = synthetic_configs(gpu)
        kv_tokens = args.batch * (256 + n + 2 * args.k_max) + 4096
        dtype = torch.bfloat16 if gpu else torch.float32
        target = synthetic_llm(cfg_t, dtype, device, kv_tokens, tok)
        draft = synthetic_llm(cfg_d, dtype, device, kv_tokens, tok)
    else:
        target = LLM(str(TARGET), device=str(device), dtype="float32", max_kv_tokens=16384)
        draft = LLM(str(DRAFT), device=str(device), dtype="float32", max_kv_tokens=16384)
    prompts = [target.tokenizer.encode(PROMPT)] * args.batch
    _, plain_outs = decode_rate(target, prompts, n, device)      # the oracle's reference outputs
    context = len(prompts[0]) + n // 2
    t_draft = step_time(draft.engine.runner, 1, context, device)
    rows, speculators = [], {}         # one Speculator per k: verify graphs are captured once
    if synthetic:
        reference = {tuple(o.prompt_token_ids): o.token_ids for o in plain_outs}
        for alpha in args.alphas:
            rows += bench_rows(f"oracle a={alpha}", target, lambda k: OracleProposer(
                DraftModelProposer(draft.engine.runner), reference, alpha, cfg_t.vocab_size), prompts, n,
                args.k_max, t_draft, device, speculators)
    else:
        rows += bench_rows("draft model", target, lambda k: DraftModelProposer(draft.engine.runner), prompts, n,
                           args.k_max, t_draft, device, speculators)
    rep = [target.tokenizer.encode(REPEAT)] * args.batch
    rows += bench_rows("n-gram (repeating prompt)", target, lambda k: NgramProposer(), rep, n,
                       args.k_max, 0.0, device, speculators)
    print(format_table(rows, COLUMNS))
    best = max(rows, key=lambda r: r["measured_S"])
    summary = [summary_row(f"spec {r['proposer']} k={r['k']} speedup", r["measured_S"], "x",
                           predicted=round(r["predicted_S"], 3),
                           ratio=round(r["measured/predicted"], 3))
               for r in rows if r["k"] in (2, 4, 8)]
    print(f"best: {best['proposer']} k={best['k']}: measured {best['measured_S']:.2f}x, predicted "
          f"{best['predicted_S']:.2f}x")
    return {"new_tokens": n, "batch": args.batch, "rows": rows, "summary": summary}


def figure(results: dict):
    if results.get("mode") == "workloads":
        raise ValueError("bench spec --workloads draws no plot: its table is the result")
    """Speed-up against acceptance rate, per proposer: measured (solid) beside predicted (dashed), one
    point per k (sorted by acceptance)."""
    from tools.bench.plot import Figure, Panel, Series
    series = []
    for name in dict.fromkeys(r["proposer"] for r in results["rows"]):
        rows = sorted((r for r in results["rows"] if r["proposer"] == name), key=lambda r: r["acceptance"])
        acc = [r["acceptance"] for r in rows]
        series += [Series(f"{name}: measured", acc, [r["measured_S"] for r in rows],
                          point_labels=[f"k={r['k']}" for r in rows]),
                   Series(f"{name}: predicted", acc, [r["predicted_S"] for r in rows], dashed=True)]
    ks = sorted({r["k"] for r in results["rows"]})
    panel = Panel("acceptance rate", "decode speed-up over plain decoding (x)", series, hline=1.0,
                  hline_label="no speed-up",
                  title=f"k = {ks[0]}..{ks[-1]}, batch {results['batch']}, {results['new_tokens']} new tokens")
    return Figure("bench spec: speculative decoding, measured vs predicted", [panel])
