"""Special tokens in the output text: dropped by default (SamplingParams.skip_special_tokens=True),
rendered with skip_special_tokens=False / generate --show-special, for both tokenizer backends
(SentencePiece control pieces; tokenizers' special added tokens, here a GGUF vocabulary's)."""
import json

import pytest
import torch

from gguf_util import build
from hf_util import LLAMA
from tinyinfer import LLM, SamplingParams
from tinyinfer.engine.output import TextStream
from tinyinfer.generate import main as generate_main
from tinyinfer.loading.gguf import load_gguf
from tinyinfer.loading.tokenizer import Tokenizer
from tinyinfer.models.transformer import Transformer


def test_sampling_params_default_and_validation():
    assert SamplingParams().skip_special_tokens is True
    with pytest.raises(ValueError, match="skip_special_tokens"):
        SamplingParams(skip_special_tokens="no")


def _gguf_tokenizer(tmp_path) -> Tokenizer:
    path, _ = build(tmp_path, "qwen2")        # byte-level BPE; <s>, </s> are control tokens
    return Tokenizer.from_gguf(load_gguf(path).tokenizer())


@pytest.mark.parametrize("backend", ["sentencepiece", "gguf"])
def test_decode_drops_or_shows_special_tokens(tmp_path, backend):
    tok = Tokenizer.from_dir(LLAMA) if backend == "sentencepiece" else _gguf_tokenizer(tmp_path)
    text = "ab c" if backend == "gguf" else "ROMEO: hi"
    ids = tok.encode(text, add_bos=False)
    bos, eos = tok.id_to_piece(tok.bos_id), tok.id_to_piece(tok.eos_id)
    seq = [tok.bos_id] + ids + [tok.eos_id] + ids
    assert bos not in tok.decode(seq) and eos not in tok.decode(seq)
    shown = tok.decode(seq, skip_special_tokens=False)
    assert shown.startswith(bos) and eos in shown and shown.count(eos) == 1
    assert shown.replace(bos, "").replace(eos, "").replace(" ", "") == (text + text).replace(" ", "")
    # the streaming detokenizer renders the same text piece by piece
    for skip in (True, False):
        stream = TextStream(tok, [], [], skip_special_tokens=skip)
        for t in seq:
            stream.push(t)
        stream.finish()
        assert stream.take(final=True) == tok.decode(seq, skip_special_tokens=skip), skip


def _emit_bos_then_text(monkeypatch, bos: int, token: int) -> None:
    """The model, replaced at its head: it predicts BOS and `token` in turn."""
    def compute_logits(self, hidden):
        logits = torch.full((hidden.shape[0], self.cfg.vocab_size), -1e4)
        logits[:, bos if compute_logits.calls % 2 == 0 else token] = 0.0
        compute_logits.calls += 1
        return logits
    compute_logits.calls = 0
    monkeypatch.setattr(Transformer, "compute_logits", compute_logits)


def test_engine_output_text_and_generate_show_special(monkeypatch, capsys):
    llm = LLM(LLAMA, device="cpu", max_kv_tokens=512)
    token = llm.tokenizer.encode("ROMEO", add_bos=False)[0]
    _emit_bos_then_text(monkeypatch, llm.tokenizer.bos_id, token)
    params = dict(temperature=0.0, max_tokens=4, ignore_eos=True)
    hidden = llm.generate(["A"], SamplingParams(**params))[0]
    shown = llm.generate(["A"], SamplingParams(**params, skip_special_tokens=False))[0]
    assert hidden.token_ids == shown.token_ids == [llm.tokenizer.bos_id, token] * 2
    assert "<s>" not in hidden.text and shown.text.count("<s>") == 2
    assert shown.text.replace("<s>", "").replace(" ", "") == hidden.text.replace(" ", "")
    for flag, want in (([], 0), (["--show-special"], 2)):
        assert generate_main(["--ckpt", LLAMA, "--prompt", "A", "--max-new-tokens", "4",
                              "--temperature", "0", "--ignore-eos", "--device", "cpu", "--json"]
                             + flag) == 0
        assert json.loads(capsys.readouterr().out)["text"].count("<s>") == want
