"""Every command line's --help shows its defaults and names every checkpoint format; `memory` reads
every format `generate` does; a GGUF is served under its file stem (issue 25)."""
from __future__ import annotations

import importlib

import pytest

from gguf_util import smollm2_gguf
from hf_util import LLAMA

FORMATS = "a Hugging Face directory, one .safetensors file"


def _help(module: str, capsys) -> str:
    mod = importlib.import_module(module)
    with pytest.raises(SystemExit):
        (mod.parse_args if hasattr(mod, "parse_args") else mod.main)(["--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("module,shown", [
    ("tinyinfer.generate", ["--temperature TEMPERATURE 0 = greedy (default: 1.0)",
                            "requests in the running batch at most (default: 256)"]),
    ("tinyinfer.serve.__main__", ["TCP port (0: any free port, printed) (default: 8000)",
                                  "requests in the running batch at most (default: 256)"]),
    ("tinyinfer.quantize", ["input channels sharing one scale and zero point (default: 128)"]),
    ("tinyinfer.memory.__main__", ["tokens per sequence (default: 4096)"]),
])
def test_help_shows_defaults_and_every_format(capsys, module, shown):
    text = _help(module, capsys)
    for words in shown:
        assert words in text, (words, text)
    assert FORMATS in text and ".gguf file" in text
    assert "(default: None)" not in text


def test_a_gguf_is_served_under_its_file_stem():
    from tinyinfer.serve.__main__ import served_name
    assert served_name(smollm2_gguf()) == "SmolLM2-135M-Instruct.Q4_1"
    assert served_name(LLAMA + "/") == "shakespeare-llama"


def test_memory_reads_a_gguf(capsys):
    from tinyinfer.memory.__main__ import main
    main(["--ckpt", smollm2_gguf()])
    out = capsys.readouterr().out
    assert "134.52 M parameters (counted in the checkpoint's tensors" in out     # SmolLM2-135M
    assert "GQA (3 KV heads)" in out and "<- this model" in out
