"""llama.cpp as a peer row of `bench quality`: its log-probabilities on the same token ids, read from the
logits file `llama-perplexity --kl-divergence-base FILE` writes (llama.cpp's perplexity tool), scored
by tools/bench/divergence.py's formulas like every other row. It runs with --no-repack, as bench
llamacpp does: llama.cpp's weight repacking for AMX crashes on this machine's CPU (SIGSEGV).

llama-perplexity tokenizes a text file itself, cuts it into chunks of -c tokens and scores the second
half of each chunk (positions c/2 .. c-2, each seeing the chunk from its start). So the row is run with
one chunk of exactly the row's token count on the text those ids come from, and exists where the row
scores no more than that second half (the long-context rows); the file's tokens are checked against
ours, position by position (a mismatch is reported, not scored). The file (format as perplexity.cpp
writes it): "_logits_", int32 n_ctx, int32 n_vocab, int32 n_chunk, int32 tokens[n_chunk * n_ctx], then
per chunk and scored position a record of 2 * ((n_vocab + 1) / 2) + 4 uint16: float32 scale, float32
min_log_prob, then n_vocab uint16 levels l with log p = scale * l + min_log_prob. llama.cpp clips each
row's logits at (max - 16) before storing: a level 0 says only "log p <= min_log_prob". Those entries (a
probability each below e^-16 of the top token's) take min(the reference's log-prob, min_log_prob):
the row's KL is then what llama.cpp's stored values say, with its tail assumed to follow the reference's
(tests/test_bench_quality_peers.py bounds what the format itself costs: < 1e-6 nats/token).
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from tools.bench.llamacpp import find_llama_tool

MAGIC = b"_logits_"


def find_llama_perplexity(path: Optional[str]) -> tuple[Optional[str], str]:
    return find_llama_tool("llama-perplexity", path)


def read_kl_base(path: str) -> tuple[list[int], Tensor, Tensor]:
    """A --kl-divergence-base file -> (its tokens, log-probs (n_chunk, n_ctx - 1 - n_ctx // 2, n_vocab)
    float32, clipped: bool, the same shape, True where the file says only "<= min_log_prob")."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:8] != MAGIC:
        raise ValueError(f"{path}: not a llama-perplexity logits file (starts {raw[:8]!r}, not {MAGIC!r})")
    n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(raw, np.int32, 3, 8))
    tokens = np.frombuffer(raw, np.int32, n_chunk * n_ctx, 20)
    nv, rows = 2 * ((n_vocab + 1) // 2) + 4, n_ctx - 1 - n_ctx // 2
    body = 20 + 4 * n_chunk * n_ctx
    want = body + 2 * nv * rows * n_chunk
    if len(raw) != want:
        raise ValueError(f"{path}: {len(raw)} bytes, {want} expected for n_ctx {n_ctx}, n_vocab {n_vocab}, "
                         f"{n_chunk} chunk(s)")
    rec = np.frombuffer(raw, np.uint16, nv * rows * n_chunk, body).reshape(n_chunk, rows, nv)
    head = np.ascontiguousarray(rec[..., :4]).view(np.float32)             # (chunk, rows, 2)
    levels = rec[..., 4:4 + n_vocab].astype(np.float32)
    logp = head[..., :1] * levels + head[..., 1:2]
    clipped = (levels == 0) & (head[..., :1] != 0)
    return tokens.tolist(), torch.from_numpy(logp), torch.from_numpy(clipped)


def fill_clipped(logp: Tensor, clipped: Tensor, ref_logits: Tensor) -> Tensor:
    """llama.cpp's stored log-probs (n, vocab), its clipped entries (stored as the row's bound,
    min_log_prob) set to min(the reference's log-prob, that bound) (module doc)."""
    ref = torch.log_softmax(ref_logits.double(), -1).float()
    return torch.where(clipped, torch.minimum(ref, logp), logp)


def llama_logits(binary: str, gguf: str, ids: list[int], text: str, score: int, ref_logits: Tensor,
                 threads: int) -> Tensor:
    """llama.cpp's log-probs as logits (len(ids), vocab) (rows before its scored half zero) of `ids`,
    the first len(ids) tokens of `text`; ref_logits: the reference's last `score` scored rows."""
    n = len(ids)
    if score > n - 1 - n // 2:
        raise ValueError(f"llama-perplexity scores only the second half of its context: {n - 1 - n // 2} "
                         f"of {n} positions, {score} asked for (a long-context row has it)")
    with tempfile.TemporaryDirectory(prefix="tinyinfer-quality-") as tmp:
        text_file, out = os.path.join(tmp, "text.txt"), os.path.join(tmp, "base.bin")
        with open(text_file, "w", encoding="utf-8") as f:
            f.write(text)
        cmd = [binary, "-m", gguf, "-f", text_file, "-c", str(n), "-b", str(n), "--chunks", "1",
               "-t", str(threads), "--no-repack", "--kl-divergence-base", out]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0 or not os.path.isfile(out):
            tail = " / ".join((run.stderr or run.stdout).strip().splitlines()[-2:])
            raise RuntimeError(f"llama-perplexity exited {run.returncode}: {tail}")
        tokens, logp, clipped = read_kl_base(out)
    tokens = tokens[:n]
    if tokens != ids:
        at = next(i for i, (a, b) in enumerate(zip(tokens + [-1], ids)) if a != b)
        raise ValueError(f"llama.cpp tokenizes the text differently: first difference at position {at} "
                         f"({tokens[at] if at < len(tokens) else None} vs {ids[at]})")
    rows = fill_clipped(logp[0][-score:], clipped[0][-score:], ref_logits)
    logits = torch.zeros(n, rows.shape[1])
    logits[n - 1 - score:n - 1] = rows
    return logits
