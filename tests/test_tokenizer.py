"""Tokenizer: the shipped SentencePiece model against Hugging Face's tokenizer for the same file, the
tokenizer.json path (a converted copy and a tiny byte-level BPE trained here), BOS/EOS from the configs,
and incremental detokenization (valid UTF-8 at every step, spaces kept, pieces add up to decode)."""
import json
import random
import shutil
import sys
from pathlib import Path

import pytest

from tinyinfer.engine.output import IncrementalDetokenizer, TextStream
from tinyinfer.loading.tokenizer import Tokenizer

CKPT = Path(__file__).resolve().parent.parent / "models" / "shakespeare-llama"

TEXTS = [
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "  two  leading spaces, and trailing ones  ",
    " leading",
    "tabs\tand\n\nnewlines\r\n",
    "café naïve façade — “quotes”",
    "emoji 😀🎭 and 日本語 and Ελληνικά",
    "",
]


@pytest.fixture(scope="module")
def sp_tok() -> Tokenizer:
    return Tokenizer.from_dir(CKPT)


def hf_tokenizer(path: Path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read tokenizer.model")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def stream(tok: Tokenizer, prompt: list[int], output: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.push(t) for t in output]
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces)
    return pieces


# --- SentencePiece ---------------------------------------------------------------------------------

def test_sentencepiece_checkpoint_metadata(sp_tok):
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.vocab_size) == (1, 2, 1024)
    assert sp_tok.add_bos  # the demo models were trained with BOS = 1 first
    assert sp_tok.id_to_piece(1) == "<s>" and sp_tok.id_to_piece(960) == "▁"


def test_bos_follows_the_checkpoint_and_the_argument(sp_tok):
    plain = sp_tok.encode("ROMEO:", add_bos=False)
    assert sp_tok.encode("ROMEO:") == [1] + plain
    assert sp_tok.encode("ROMEO:", add_bos=True) == [1] + plain
    assert 1 not in plain


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_encode_and_decode_match_hugging_face(sp_tok, text):
    hf = hf_tokenizer(CKPT)
    assert sp_tok.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False)
    ids = sp_tok.encode(text)
    assert sp_tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_unicode_round_trips_through_byte_fallback(sp_tok):
    text = "emoji 😀🎭 and 日本語"
    ids = sp_tok.encode(text)
    assert any(sp_tok.id_to_piece(i).startswith("<0x") for i in ids)  # really hits byte fallback
    assert sp_tok.decode(ids) == text


def test_bos_as_hugging_face_adds_it_with_a_tokenizer_config(sp_tok, tmp_path):
    shutil.copy(CKPT / "tokenizer.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}))
    hf = hf_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    for text in TEXTS[:3]:
        assert tok.encode(text) == hf.encode(text)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert Tokenizer.from_dir(tmp_path).encode("ROMEO:") == sp_tok.encode("ROMEO:", add_bos=False)


def test_decode_drops_special_tokens_and_ids_beyond_the_vocabulary(sp_tok):
    ids = sp_tok.encode("ROMEO: hi", add_bos=False)
    assert sp_tok.decode([1] + ids + [2, 5000]) == "ROMEO: hi"


def test_from_dir_accepts_a_weights_file_and_rejects_missing_paths(tmp_path):
    assert Tokenizer.from_dir(CKPT / "model.safetensors").vocab_size == 1024
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# --- tokenizer.json ----------------------------------------------------------------------------

def test_tokenizer_json_converted_from_the_sentencepiece_model_encodes_the_same(sp_tok, tmp_path):
    hf_tokenizer(CKPT).save_pretrained(str(tmp_path))  # writes tokenizer.json (+ tokenizer_config.json)
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "tokenizer.model").exists()
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 1024)
    for text in TEXTS:
        ids = sp_tok.encode(text, add_bos=False)
        assert tok.encode(text, add_bos=False) == ids
        assert tok.decode([1] + ids) == sp_tok.decode(ids)
        assert "".join(stream(tok, [1], ids)) == sp_tok.decode(ids)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A tiny byte-level BPE (the Llama 3 / GPT-2 scheme) trained on a few lines, BOS added by its
    post-processor, as tokenizer.json only."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [t for t in TEXTS if t] * 20 + ["To be, or not to be, that is the question."] * 20
    tk.train_from_iterator(lines, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<|begin|> $A",
                                                      special_tokens=[("<|begin|>", 0)])
    d = tmp_path_factory.mktemp("bpe")
    tk.save(str(d / "tokenizer.json"))
    (d / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1]}))
    return d


def test_tokenizer_json_bos_from_the_post_processor_and_ids_from_config(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (0, 1, True)
    ids = tok.encode("To be, or not")
    assert ids[0] == 0 and tok.encode("To be, or not", add_bos=False) == ids[1:]
    assert tok.id_to_piece(0) == "<|begin|>"


def test_tokenizer_config_names_the_special_tokens_and_bos_policy(bpe_dir, tmp_path):
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": {"content": "<|end|>"}, "eos_token": "<|begin|>"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 0, False)
    assert tok.encode("To be")[0] != 1
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="<|nope|>"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_bpe_round_trips_and_streams(bpe_dir, text):
    tok = Tokenizer.from_dir(bpe_dir)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = stream(tok, ids[:1], ids[1:])
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_a_tiktoken_style_tokenizer_model_falls_back_to_tokenizer_json(bpe_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # tiktoken's base64-rank lines
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path)
    assert Tokenizer.from_dir(tmp_path).encode("To be", add_bos=False) == \
        Tokenizer.from_dir(bpe_dir).encode("To be", add_bos=False)


def test_missing_tokenizers_library_is_a_clear_error(bpe_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match="pip install tokenizers"):
        Tokenizer.from_dir(bpe_dir)


# --- incremental detokenization ----------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_are_valid_utf8_and_add_up_to_decode(sp_tok, text):
    ids = sp_tok.encode(text, add_bos=False)
    pieces = stream(sp_tok, [sp_tok.bos_id], ids)
    assert "".join(pieces) == sp_tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # no half characters, ever


def test_stream_after_a_prompt_keeps_the_leading_space(sp_tok):
    prompt = sp_tok.encode("To be, or not to")
    full = sp_tok.encode("To be, or not to be, that is")
    assert full[:len(prompt)] == prompt
    output = full[len(prompt):]
    pieces = stream(sp_tok, prompt, output)
    assert pieces[0].startswith(" ")
    assert sp_tok.decode(prompt) + "".join(pieces) == sp_tok.decode(full)


def test_emoji_bytes_are_held_until_the_character_is_complete(sp_tok):
    ids = sp_tok.encode("a😀", add_bos=False)
    bytes_ = [i for i in ids if sp_tok.id_to_piece(i).startswith("<0x")]
    assert len(bytes_) == 4
    detok = IncrementalDetokenizer(sp_tok, [sp_tok.bos_id])
    out = [detok.push(i) for i in ids]
    assert out[-4:] == ["", "", "", "😀"]


def test_random_token_streams_add_up_to_decode_including_invalid_bytes(sp_tok):
    rng = random.Random(0)
    byte_ids = [i for i in range(sp_tok.vocab_size) if sp_tok.id_to_piece(i).startswith("<0x")]
    for _ in range(200):
        prompt = sp_tok.encode(rng.choice(TEXTS[:4]))
        pool = byte_ids[128:] if rng.random() < 0.5 else list(range(sp_tok.vocab_size))
        output = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        pieces = stream(sp_tok, prompt, output)
        assert sp_tok.decode(prompt) + "".join(pieces) == sp_tok.decode(prompt + output)
        # Held-back text is only ever an unfinished UTF-8 sequence, released by flush().
        assert all(not p.endswith("\ufffd") for p in pieces[:-1])


def _texts_of(stream: TextStream, output: list[int], ended: bool) -> list[str]:
    """What the engine hands out per step: push, take; at the end finish() (a stop or length
    finish) or nothing (an abort), then the final take."""
    pieces = []
    for tok in output:
        stream.push(tok)
        pieces.append(stream.take(final=False))
    if ended:
        stream.finish()
    return pieces + [stream.take(final=True)]


@pytest.mark.parametrize("backend", ["sentencepiece", "bpe"])
def test_text_decoded_once_at_the_end_equals_the_streamed_text(sp_tok, bpe_dir, backend):
    # TextStream(stream=False) (LLM.generate without on_token) decodes once when the request ends:
    # the same text the per-token pieces add up to, for normal finishes and aborts alike, with
    # invalid byte runs and special tokens shown or skipped.
    tok = sp_tok if backend == "sentencepiece" else Tokenizer.from_dir(bpe_dir)
    rng = random.Random(1)
    byte_ids = [i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")]
    for _ in range(150):
        prompt = tok.encode(rng.choice(TEXTS[:5]))
        pool = byte_ids[128:] if byte_ids and rng.random() < 0.4 else range(tok.vocab_size)
        output = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        skip, ended = rng.random() < 0.7, rng.random() < 0.7
        streamed = _texts_of(TextStream(tok, prompt, [], skip), output, ended)
        deferred = _texts_of(TextStream(tok, prompt, [], skip, stream=False), output, ended)
        assert deferred[:-1] == [""] * len(output), "a deferred stream hands out nothing before the end"
        assert deferred[-1] == "".join(streamed)
    # Stop strings need the text as it grows: with one, stream=False still streams.
    assert not TextStream(tok, [], ["x"], stream=False).deferred
