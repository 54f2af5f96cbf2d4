"""Tokenizers built from GGUF vocabularies, against the tokenizer transformers builds from the same file
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`): the real SmolLM2 file (byte-level BPE, "smollm"
pre-tokenizer) and synthetic files with a SentencePiece vocabulary (the demo models' tokenizer.model,
also checked against sentencepiece itself) and byte-level BPE vocabularies trained here for the
"llama-bpe" and "qwen2" pre-tokenizers."""
from __future__ import annotations

import json
import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gguf_util import REPO, smollm2_gguf, write_gguf
from tinyinfer.loading.gguf import GGUFError, load_gguf
from tinyinfer.loading.gguf_file import Metadata, open_reader
from tinyinfer.loading.gguf_tokenizer import build_tokenizer

pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!", "", " ", "  leading spaces", "trailing   ", "I'm can't we'll THEY'RE",
    "naïve café — “quotes” «guillemets»", "漢字かなカナ 한국어 中文测试", "Ελληνικά кириллица עברית",
    "emoji 😀👍🏽👨\u200d👩\u200d👧 flags 🇫🇷", "def f(x):\n\tif x > 3:\n\t\treturn x ** 2\n\n\n    return None",
    "tabs\t\tand\r\nwindows\rlines\n\n", "numbers 123456 3.14159 1,000,000 2024-01-01",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "text<|endoftext|>more",
    "<s>bos in text</s> and <unk>", "<think>reasoning</think>",
]
# Texts where a whitespace run meets a digit, or with non-ASCII numerals: llama.cpp's "smollm" rule
# (and SmolLM2's own tokenizer.json) split every digit off first; transformers' GGUF tokenizer does not.
SMOLLM_DIGIT_TEXTS = ["x =  42", "a  1", "col1\t\t12\n  3", "½ cup, x² and ٣"]


def _hf_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def _ours(path: str):
    return build_tokenizer(Metadata(open_reader(path)[1], path))


def assert_same(ours, hf, texts):
    for text in texts:
        ids = hf(text).input_ids
        assert ours.tokenizer.encode(text).ids == ids, text
        assert ours.tokenizer.encode(text, add_special_tokens=False).ids == hf(
            text, add_special_tokens=False).input_ids, text
        for skip in (False, True):
            assert ours.tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip), (text, skip)


def test_smollm2_matches_transformers():
    path = smollm2_gguf()
    ours, hf = _ours(path), _hf_tokenizer(path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (1, 2, 2, 0)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
    assert not ours.add_bos and not ours.add_eos
    assert ours.tokenizer.get_vocab_size() == len(hf) == 49152
    assert ours.chat_template == load_gguf(path).chat_template
    assert_same(ours, hf, TEXTS)
    # The one difference, the digit split: transformers' tokenizer with it added agrees with ours.
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    assert_same(ours, hf, TEXTS + SMOLLM_DIGIT_TEXTS)
    assert ours.tokenizer.encode("a  1").tokens == ["a", "ĠĠ", "1"]


def _spm_file(tmp_path, name: str, extra: dict) -> str:
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    with open(os.path.join(REPO, "models", "shakespeare-llama", "tokenizer.model"), "rb") as f:
        proto.ParseFromString(f.read())
    pieces = proto.pieces
    meta = {"llama.block_count": 1, "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": [p.piece for p in pieces],
            "tokenizer.ggml.scores": [p.score for p in pieces],
            "tokenizer.ggml.token_type": [int(p.type) for p in pieces],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, **extra}
    return write_gguf(str(tmp_path / name), "llama", meta, {})


def _sentencepiece():
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(
        model_file=os.path.join(REPO, "models", "shakespeare-llama", "tokenizer.model"))


def test_sentencepiece_vocabulary(tmp_path):
    path = _spm_file(tmp_path, "spm.gguf", {})
    ours, hf, sp = _ours(path), _hf_tokenizer(path), _sentencepiece()
    assert ours.add_bos and not ours.add_eos        # no add_bos_token key: llama adds BOS
    specials = {"<s>": 1, "</s>": 2, "<unk>": 0}
    plain = [t for t in TEXTS if not any(s in t for s in specials)]
    for text in plain:                              # sentencepiece itself: the model's tokenizer
        ids = ours.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == sp.encode(text), text
        assert ours.tokenizer.decode(ids) == sp.decode(ids) == text
    # transformers agrees except on text starting with whitespace (see gguf_tokenizer.py)
    assert_same(ours, hf, [t for t in plain if not t[:1].isspace()])
    # llama.cpp: special tokens matched whole, "▁" in front of the text after each of them
    text = "<s>bos in text</s> and <unk>x"
    want = [1] + sp.encode("bos in text") + [2] + sp.encode(" and ") + [0] + sp.encode("x")
    assert ours.tokenizer.encode(text).ids == [1] + want
    for skip in (False, True):
        assert ours.tokenizer.decode(want, skip_special_tokens=skip) == hf.decode(
            want, skip_special_tokens=skip)


def test_pad_id_on_a_normal_token_stays_text(tmp_path):
    """A pad id pointing at an ordinary piece must not turn that piece into a special token."""
    sp = _sentencepiece()
    piece = sp.id_to_piece(sp.encode("the")[0])
    ours = _ours(_spm_file(tmp_path, "pad.gguf", {"tokenizer.ggml.padding_token_id": sp.piece_to_id(piece)}))
    assert ours.pad_id == sp.piece_to_id(piece)
    ids = ours.tokenizer.encode("the other", add_special_tokens=False).ids
    assert ids == sp.encode("the other") and ours.tokenizer.decode(ids) == "the other"


def test_sentencepiece_without_space_prefix(tmp_path):
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2
    path = _spm_file(tmp_path, "spm-noprefix.gguf", {"tokenizer.ggml.add_space_prefix": False,
                                                     "tokenizer.ggml.add_bos_token": False})
    ours = _ours(path)
    proto = sentencepiece_model_pb2.ModelProto()
    with open(os.path.join(REPO, "models", "shakespeare-llama", "tokenizer.model"), "rb") as f:
        proto.ParseFromString(f.read())
    proto.normalizer_spec.add_dummy_prefix = False
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    assert not ours.add_bos
    for text in ["Hello world", "  two spaces", "x"]:
        ids = ours.tokenizer.encode(text).ids
        assert ids == sp.encode(text), text
        assert ours.tokenizer.decode(ids) == sp.decode(ids) == text


def _bpe_file(tmp_path, pre: str, add_bos: bool) -> str:
    """A byte-level BPE vocabulary trained here, with ChatML control tokens and a user-defined one."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(os.path.join(REPO, "data", "tinyshakespeare-val-slice.txt"), encoding="utf-8") as f:
        corpus = [f.read()] + TEXTS * 3
    tk.train_from_iterator(corpus, trainer)
    model = json.loads(tk.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + ["<think>", "</think>"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in specials else 4 if t in ("<think>", "</think>") else 1 for t in tokens]
    meta = {"qwen2.block_count": 1, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 0,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_bos_token": add_bos}
    return write_gguf(str(tmp_path / f"{pre}.gguf"), "qwen2", meta, {})


@pytest.mark.parametrize("pre,add_bos", [("qwen2", False), ("llama-bpe", True)])
def test_byte_level_vocabularies(tmp_path, pre, add_bos):
    path = _bpe_file(tmp_path, pre, add_bos)
    ours, hf = _ours(path), _hf_tokenizer(path)
    assert ours.add_bos == add_bos and (ours.bos_id, ours.eos_id) == (0, 2)
    assert_same(ours, hf, TEXTS + SMOLLM_DIGIT_TEXTS + ["12345678 1234", "x\n\n  y"])
    think = ours.tokenizer.token_to_id("<think>")
    assert think in ours.tokenizer.encode("a<think>b").ids       # user-defined: matched whole


def test_unknown_pre_tokenizer_and_model_are_refused(tmp_path):
    path = _bpe_file(tmp_path, "no-such-pre", False)
    with pytest.raises(GGUFError, match="tokenizer.ggml.pre is 'no-such-pre'"):
        _ours(path)
    meta = {"llama.block_count": 1, "tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}
    path = write_gguf(str(tmp_path / "bert.gguf"), "llama", meta, {})
    with pytest.raises(GGUFError, match="tokenizer.ggml.model is 'bert'"):
        _ours(path)
