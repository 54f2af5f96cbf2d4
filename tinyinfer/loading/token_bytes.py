"""The bytes each token id stands for, as a grammar engine needs them to compute a token mask (which
tokens can extend the output so that it still matches the grammar; Willard & Louf 2023).

A token's bytes are not its decoded text: a byte-level BPE vocabulary (GPT-2, Llama 3, Qwen, SmolLM2's
GGUF) spells each byte as one printable character (GPT-2's byte table, loading/gguf_tokenizer.py), and a
SentencePiece vocabulary writes a space as "▁" and falls back to byte pieces `<0xAB>` for text outside
its pieces -- a piece that is one byte of a multi-byte UTF-8 character decodes to nothing printable on
its own. Special tokens (BOS, EOS, chat markers, unknown) stand for no text: a grammar never allows them
(EOS is handled apart, by the grammar's accepting state).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class TokenBytes:
    """tokens[i]: the bytes of token i (b"" for a special token or an id past the tokenizer's
    vocabulary, up to the model's logits width); special: the ids that are special tokens."""
    tokens: list[bytes]
    special: list[int]
    eos_ids: list[int]


def _gpt2_unspell() -> dict[str, int]:
    # The inverse of GPT-2's byte -> printable character table.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table, extra = {chr(b): b for b in keep}, 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _byte_level(piece: str, unspell: dict[str, int]) -> bytes:
    try:
        return bytes(unspell[c] for c in piece)
    except KeyError:        # not in the byte alphabet: an added token written as its own text
        return piece.encode("utf-8")


def _metaspace(piece: str, byte_fallback: bool) -> bytes:
    m = _BYTE_PIECE.fullmatch(piece) if byte_fallback else None
    return bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8")


def _sentencepiece(sp) -> tuple[list[bytes], list[int]]:
    out, special = [], []
    for i in range(sp.GetPieceSize()):
        if sp.IsControl(i) or sp.IsUnknown(i):
            out.append(b"")
            special.append(i)
        elif sp.IsByte(i):
            out.append(bytes([int(sp.IdToPiece(i)[3:5], 16)]))
        else:
            out.append(sp.IdToPiece(i).replace("▁", " ").encode("utf-8"))
    return out, special


def _hf(tk) -> tuple[list[bytes], list[int]]:
    spec = json.loads(tk.to_str())
    decoder = json.dumps(spec.get("decoder"))
    byte_level = '"ByteLevel"' in decoder
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback")) or '"ByteFallback"' in decoder
    unspell = _gpt2_unspell()
    n = tk.get_vocab_size(with_added_tokens=True)
    out = [b""] * n
    for piece, i in tk.get_vocab(with_added_tokens=False).items():
        if 0 <= i < n:
            out[i] = _byte_level(piece, unspell) if byte_level else _metaspace(piece, byte_fallback)
    special = []
    for i, added in tk.get_added_tokens_decoder().items():
        if not 0 <= i < n:
            continue
        if added.special:
            out[i] = b""
            special.append(i)
        else:                 # a user-defined token: matched as the text it is written as
            out[i] = added.content.encode("utf-8")
    return out, special


def token_bytes(tokenizer, n_vocab: int) -> TokenBytes:
    """The bytes of every token of a tinyinfer `Tokenizer` (loading/tokenizer.py), padded with b""
    (special) up to n_vocab, the model's logits width."""
    backend = tokenizer._backend
    if hasattr(backend, "sp"):
        tokens, special = _sentencepiece(backend.sp)
    else:
        tokens, special = _hf(backend.tk)
    tokens = tokens[:n_vocab]
    special = [i for i in special if i < n_vocab]
    pad = range(len(tokens), n_vocab)
    tokens += [b""] * len(pad)
    special += list(pad)
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None and tokenizer.eos_id < n_vocab else []
    return TokenBytes(tokens, sorted(set(special)), eos)
