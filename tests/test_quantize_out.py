"""`python -m tinyinfer.quantize --out DIR`: one self-contained directory per model, so outputs sit side
by side in one folder; never overwrites without --force; files mode 0644 (tinyinfer/quantize.py)."""
from __future__ import annotations

import os
import stat

import pytest

from gguf_util import smollm2_gguf
from hf_util import LLAMA
from tinyinfer import LLM, SamplingParams
from tinyinfer.quantize import main


def _quantize(src, out, *extra):
    return main(["--ckpt", src, "--out", str(out), "--device", "cpu", "--no-clip-search", *extra])


def test_two_models_in_one_folder_both_load_and_generate(tmp_path, capsys):
    demo, smol = tmp_path / "models" / "demo-int4", tmp_path / "models" / "smollm2-int4"
    assert _quantize(LLAMA, demo) == 0 and _quantize(smollm2_gguf(), smol) == 0
    err = capsys.readouterr().err
    assert f"wrote {smol}/" in err and "MiB in all" in err
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    for out, src, prompt in ((demo, LLAMA, "ROMEO:"), (smol, smollm2_gguf(), "The capital of France is")):
        assert {"model.safetensors", "config.json", "generation_config.json"} <= set(os.listdir(out))
        for name in os.listdir(out):
            assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644, name
        llm = LLM(str(out), device="cpu")
        got = llm.generate(prompt, greedy)[0]
        assert got.error is None and len(got.token_ids) == 4
        assert llm.tokenizer.encode(prompt) == LLM(src, device="cpu").tokenizer.encode(prompt)
    chat = LLM(str(smol), device="cpu").chat([{"role": "user", "content": "Hi"}], greedy)[0]
    assert chat.error is None                                 # the GGUF's chat template came along


def test_an_existing_output_is_refused_without_force(tmp_path, capsys):
    out = tmp_path / "q"
    assert _quantize(LLAMA, out) == 0
    before = os.path.getmtime(out / "model.safetensors")
    capsys.readouterr()
    assert _quantize(LLAMA, out) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "--force" in err, err
    assert os.path.getmtime(out / "model.safetensors") == before
    (out / "tokenizer.json").write_text("stale")           # a file this source would not write
    assert _quantize(LLAMA, out, "--force") == 0
    assert not (out / "tokenizer.json").exists()            # --force left nothing stale behind
    LLM(str(out), device="cpu")
    assert _quantize(LLAMA, tmp_path / "x.safetensors") == 2
    assert "give a directory" in capsys.readouterr().err


def test_help_shows_defaults_and_what_is_written(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "input channels sharing one scale and zero point (default: 128)" in text
    assert "replace the files of an earlier output in --out (default: False)" in text
    assert "its vocabulary rebuilt as tokenizer.json" in text             # a GGUF's tokenizer
