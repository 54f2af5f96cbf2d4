"""A `tokenizers.Tokenizer` rebuilt from a GGUF file's vocabulary (tokenizer.ggml.* metadata).

A GGUF file has no tokenizer.json; this module rebuilds its byte-level BPE ("gpt2") or SentencePiece
BPE ("llama") vocabulary so the ids are those llama.cpp gives. docs/formats.md lists the token types,
the pre-tokenizer regexes, and where transformers' GGUF conversion gives other ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors)

from tinyinfer.loading.gguf_file import GGUFError, Metadata

NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4          # tokenizer.ggml.token_type values
                                                             # (the others: 5 unused, 6 byte)

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (regex applied before GPT-2's, or None; GPT-2's own regex as the last step?),
# the same splits llama.cpp applies (its llama-vocab.cpp)
_PRE = {
    **dict.fromkeys(("gpt2", "gpt-2", "default"), (None, True)),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx"),
                    (_LLAMA3, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), (_QWEN2, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell"), (r"\p{N}", True)),
}


@dataclass
class GGUFTokenizer:
    """`tokenizer.encode(text)` adds BOS / EOS as the file says (its post-processor);
    `tokenizer.encode(text, add_special_tokens=False)` adds nothing."""
    tokenizer: Tokenizer
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: Optional[int]
    unk_id: Optional[int]
    add_bos: bool
    add_eos: bool
    chat_template: Optional[str]


def _byte_level(tokens: list[str], types: list[int], meta: Metadata) -> Tokenizer:
    merges = meta.require("tokenizer.ggml.merges", "a gpt2 (byte-level BPE) vocabulary")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE:
        raise GGUFError(f"{meta.path}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer tinyinfer "
                        f"does not know; supported: {', '.join(sorted(_PRE))}")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spell = _byte_spelling()
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        # Normal tokens are written in the byte alphabet; added ones (control, user-defined) as the
        # text they match, which is how the added-token matcher below finds them.
        if not set(tok) <= alphabet and kind not in (CONTROL, USER_DEFINED):
            tok = "".join(spell[b] for b in tok.encode("utf-8"))
        vocab[tok] = i
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{meta.path}: BPE merge {m!r} is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    regex, gpt2_regex = _PRE[pre]
    steps = [] if regex is None else [pre_tokenizers.Split(Regex(regex), behavior="isolated")]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex))
    tk.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    return tk


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the
    other 68 bytes take the code points 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE as an ordered merge list: every split of a piece into two vocabulary pieces
    is a merge ranked by the piece's score (highest first); ties by left then right piece length
    (longer first), then by vocabulary order (piece, left id, right id)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    score = dict(zip(tokens, scores))
    ranked = []
    for piece, s in score.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                  if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((s, left, right) for left, right in splits)
    ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)   # stable
    return [(left, right) for _, left, right in ranked]


def _sentencepiece(tokens: list[str], meta: Metadata) -> Tokenizer:
    scores = meta.require("tokenizer.ggml.scores", "a llama (SentencePiece) vocabulary")
    if len(scores) != len(tokens):
        raise GGUFError(f"{meta.path}: {len(scores)} token scores for {len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges_from_scores(tokens, scores),
                              fuse_unk=True, byte_fallback=True))
    # Spaces become "▁"; with add_space_prefix one "▁" goes in front of every stretch of text -- at
    # the start and after each special token (added tokens are cut out before normalization).
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    escape = normalizers.Replace(" ", "▁")
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), escape]) if prefix else escape
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(steps)
    return tk


def build_tokenizer(meta: Metadata) -> GGUFTokenizer:
    """The tokenizer described by the file's tokenizer.ggml.* metadata."""
    kind = meta.require("tokenizer.ggml.model", "the tokenizer")
    tokens = meta.require("tokenizer.ggml.tokens", "the tokenizer")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{meta.path}: {len(types)} token types for {len(tokens)} tokens")
    if kind == "gpt2":
        tk = _byte_level(tokens, types, meta)
    elif kind == "llama":
        tk = _sentencepiece(tokens, meta)
    else:
        raise GGUFError(f"{meta.path}: tokenizer.ggml.model is {kind!r}; tinyinfer builds 'gpt2' "
                        "(byte-level BPE) and 'llama' (SentencePiece BPE) vocabularies")
    ids = {}
    for key in ("bos", "eos", "padding", "unknown"):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None and not 0 <= value < len(tokens):
            raise GGUFError(f"{meta.path}: tokenizer.ggml.{key}_token_id = {value} is outside the "
                            f"vocabulary of {len(tokens)} tokens")
        ids[key] = value
    # Control and unknown tokens are special (llama.cpp matches both whole); so are the bos/eos/
    # pad/unk tokens unless the file calls them normal text (a pad id pointing at "!", say).
    named = {v for v in ids.values() if v is not None}
    special = [i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN) or (i in named and t != NORMAL)]
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i, t in enumerate(types) if t == USER_DEFINED and i not in special])
    # llama.cpp (and transformers) add BOS to SentencePiece vocabularies that do not say otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and ids["bos"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
    tk.post_processor = _template(tokens, ids["bos"] if add_bos else None, ids["eos"] if add_eos else None)
    return GGUFTokenizer(tk, ids["bos"], ids["eos"], ids["padding"], ids["unknown"], add_bos,
                         add_eos, meta.get("tokenizer.chat_template"))


def _template(tokens: list[str], bos: Optional[int], eos: Optional[int]) -> processors.TemplateProcessing:
    first = [tokens[bos]] if bos is not None else []
    last = [tokens[eos]] if eos is not None else []
    single = first + ["$A"] + last
    pair = single + [f"{t}:1" for t in first] + ["$B:1"] + [f"{t}:1" for t in last]
    specials = [(tokens[i], i) for i in {bos, eos} if i is not None]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
