"""bench quality's llama.cpp row (tools/bench/llamacpp_logits.py) without llama.cpp: a tiny logits file
written here by the format llama-perplexity --kl-divergence-base writes (llama.cpp's perplexity.cpp:
header, tokens, per scored position float32 scale and min_log_prob then uint16 levels of the log-prob,
logits below max - 16 clipped) is read back to the log-probabilities within a level's rounding; the
format itself costs < 1e-6 nats/token of KL; a stand-in llama-perplexity shows the row is placed on the
right positions and refused on other tokens; without llama.cpp the reason is given."""
from __future__ import annotations

import stat
import sys

import numpy as np
import pytest
import torch

from tools.bench.divergence import compare, reference
from tools.bench.llamacpp_logits import fill_clipped, find_llama_perplexity, llama_logits, read_kl_base


def write_kl_base(path, logits: np.ndarray, tokens: list[int]) -> None:
    """One chunk of n_ctx = len(tokens); logits (n_ctx, vocab): rows n_ctx/2 .. n_ctx-2 are stored."""
    n_ctx, vocab = logits.shape
    first = n_ctx // 2
    nv = 2 * ((vocab + 1) // 2) + 4
    out = [b"_logits_", np.array([n_ctx, vocab, 1], np.int32).tobytes(), np.array(tokens, np.int32).tobytes()]
    for row in logits[first:n_ctx - 1].astype(np.float32):
        top, low = float(row.max()), max(float(row.min()), float(row.max()) - 16)
        lse = np.log(np.exp(row.astype(np.float64) - top).sum())
        scale = np.float32((top - low) / 65535)
        rec = np.zeros(nv, np.uint16)
        rec[:4] = np.array([scale, low - top - lse], np.float32).view(np.uint16)
        rec[4:4 + vocab] = np.where(row > low, np.rint((row - low) / scale), 0)
        out.append(rec.tobytes())
    path.write_bytes(b"".join(out))


def _logits(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, vocab)) * 1.5                  # spread < 16: none clipped
    x[:, :3] -= 40                                           # a few far below the top: clipped
    return x.astype(np.float32)


def test_the_file_reads_back_to_the_log_probabilities(tmp_path):
    n, vocab = 12, 37                                         # odd vocab: the record is padded
    x, tokens = _logits(n, vocab), list(range(3, 3 + n))
    write_kl_base(tmp_path / "b.bin", x, tokens)
    got_tokens, logp, clipped = read_kl_base(str(tmp_path / "b.bin"))
    assert got_tokens == tokens and logp.shape == (1, n - 1 - n // 2, vocab)
    want = torch.log_softmax(torch.from_numpy(x[n // 2:n - 1]).double(), -1)
    assert clipped[0, :, :3].all() and not clipped[0, :, 3:].any()
    err = (logp[0].double() - want)[~clipped[0]].abs().max().item()
    assert err < 16 / 65535                                    # within a level (range <= 16)
    assert (logp[0][clipped[0]] >= want[clipped[0]].float()).all()   # clipped: only an upper bound


def test_the_format_costs_less_than_1e_6_nats(tmp_path):
    n, vocab = 40, 500
    x = _logits(n, vocab, 1)
    ids = list(np.random.default_rng(2).integers(0, vocab, n))
    write_kl_base(tmp_path / "b.bin", x, ids)
    _, logp, clipped = read_kl_base(str(tmp_path / "b.bin"))
    score = n - 1 - n // 2
    ref = reference(torch.from_numpy(x), ids, score)
    path = torch.zeros(n, vocab)
    path[n - 1 - score:n - 1] = fill_clipped(logp[0], clipped[0], ref.logits)
    got = compare(path, ids, ref)
    assert got["kl"] < 1e-6 and got["top1"] == 1.0
    unfilled = torch.zeros(n, vocab)
    unfilled[n - 1 - score:n - 1] = logp[0]                  # the bound taken as the value: visibly off
    assert compare(unfilled, ids, ref)["kl"] != pytest.approx(got["kl"], abs=1e-9)


def test_a_bad_file_is_refused_by_name(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"not a logits file at all")
    with pytest.raises(ValueError, match="not a llama-perplexity logits file"):
        read_kl_base(str(tmp_path / "x.bin"))
    write_kl_base(tmp_path / "b.bin", _logits(8, 5), list(range(8)))
    (tmp_path / "c.bin").write_bytes((tmp_path / "b.bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match="bytes, .* expected"):
        read_kl_base(str(tmp_path / "c.bin"))


def _stand_in(tmp_path, fixture) -> str:
    """A llama-perplexity that copies `fixture` to its --kl-divergence-base path."""
    script = tmp_path / "llama-perplexity"
    body = f"a = sys.argv\nshutil.copy({str(fixture)!r}, a[a.index('--kl-divergence-base') + 1])\n"
    script.write_text(f"#!{sys.executable}\nimport shutil, sys\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_the_row_sits_on_the_scored_positions_and_needs_the_same_tokens(tmp_path):
    n, vocab, score = 16, 9, 5
    x, ids = _logits(n, vocab, 3), [i % vocab for i in range(n)]
    write_kl_base(tmp_path / "b.bin", x, ids)
    binary = _stand_in(tmp_path, tmp_path / "b.bin")
    ref = reference(torch.from_numpy(x), ids, score)
    logits = llama_logits(binary, "m.gguf", ids, "text", score, ref.logits, 1)
    assert logits.shape == (n, vocab) and not logits[:n - 1 - score].any()
    assert compare(logits, ids, ref)["kl"] < 1e-6
    with pytest.raises(ValueError, match="tokenizes the text differently: first difference at position 4"):
        llama_logits(binary, "m.gguf", ids[:4] + [8] + ids[5:], "text", score, ref.logits, 1)
    with pytest.raises(ValueError, match="second half of its context: 7 of 16 positions, 15 asked"):
        llama_logits(binary, "m.gguf", ids, "text", 15, ref.logits, 1)


def test_without_llama_cpp_the_reason_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    binary, why = find_llama_perplexity(None)
    assert binary is None and "no llama-perplexity on PATH" in why
    binary, why = find_llama_perplexity(str(tmp_path / "nope"))
    assert binary is None and "nope" in why and "no executable" in why
