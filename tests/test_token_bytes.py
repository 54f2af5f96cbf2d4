"""Token bytes (loading/token_bytes.py), the vocabulary a grammar mask is computed over, checked against
the tokenizers themselves: for any text, the bytes of its tokens, joined, are the text's UTF-8 bytes --
for SmolLM2's byte-level BPE (GGUF) and the demo model's SentencePiece with byte fallback (its
encoder's leading "▁" is a space) -- multi-byte characters split across byte tokens included; special
tokens stand for no bytes."""
from __future__ import annotations

import pytest

from gguf_util import smollm2_gguf
from hf_util import LLAMA
from tinyinfer.loading.gguf import load_gguf
from tinyinfer.loading.token_bytes import token_bytes
from tinyinfer.loading.tokenizer import Tokenizer

TEXTS = ["Hello, wörld!", '{"a": [1, 2.5e-3], "b": null}', "日本語 😀 ça\tva\n  end", "<0x41> literal",
         "naïve façade — “quotes”"]


@pytest.fixture(scope="module", params=["smollm2-gguf", "demo-sentencepiece"])
def tokenizer(request) -> Tokenizer:
    if request.param == "smollm2-gguf":
        return Tokenizer.from_gguf(load_gguf(smollm2_gguf()).tokenizer())
    return Tokenizer.from_dir(LLAMA)


@pytest.mark.parametrize("text", TEXTS)
def test_the_bytes_of_the_tokens_are_the_bytes_of_the_text(tokenizer, text):
    tb = token_bytes(tokenizer, tokenizer.vocab_size + 5)             # a padded head: 5 ids past it
    ids = tokenizer.encode(text, add_bos=False)
    got = b"".join(tb.tokens[i] for i in ids)
    lead = b" " if got.startswith(b" ") and not text.startswith(" ") else b""   # SentencePiece's "▁"
    assert got == lead + text.encode("utf-8")
    assert tokenizer.decode(ids) in (text, " " + text)


def test_special_tokens_and_padding_stand_for_no_bytes(tokenizer):
    n = tokenizer.vocab_size
    tb = token_bytes(tokenizer, n + 5)
    assert len(tb.tokens) == n + 5 and set(range(n, n + 5)) <= set(tb.special)
    assert tokenizer.eos_id in tb.special and tb.eos_ids == [tokenizer.eos_id]
    assert all(tb.tokens[i] == b"" for i in tb.special)
    assert sum(1 for t in tb.tokens if t) > 0.9 * n               # every other token has bytes
