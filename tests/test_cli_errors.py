"""`python -m tinyinfer.generate`: every user mistake is one line on stderr ("error: ..."), exit
status 2, no traceback, and nothing on stdout -- in particular no echo of a prompt that is then refused
(issue 20, cases 2, 6, 9). Run in-process: an uncaught exception would fail the test itself."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from hf_util import LLAMA
from tinyinfer.generate import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["--max-tokens", "4", "--prompt", "ROMEO:", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, out: str, err: str, words: str) -> None:
    # loading notes ("tinyinfer: KV cache: ...") may come first; the mistake is one line
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("tinyinfer: ")]
    assert code == 2 and out == "", (code, out)
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err


def checkpoint_with_config(tmp_path, text: str) -> str:
    for f in ("model.safetensors", "tokenizer.model"):
        shutil.copy(os.path.join(LLAMA, f), tmp_path)
    (tmp_path / "config.json").write_text(text)
    return str(tmp_path)


def test_cuda_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_one_line(*run(capsys, "--ckpt", LLAMA, "--device", "cuda"), "no CUDA device")


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x"])
def test_a_device_tinyinfer_does_not_run_on(capsys, device):
    assert_one_line(*run(capsys, "--ckpt", LLAMA, "--device", device), f"device {device!r} is not supported")


def test_a_config_json_that_is_a_list(capsys, tmp_path):
    path = checkpoint_with_config(tmp_path, "[1, 2, 3]")
    assert_one_line(*run(capsys, "--ckpt", path, "--device", "cpu"), "config.json must hold a JSON object")


def test_a_config_json_without_hidden_size(capsys, tmp_path):
    cfg = json.load(open(os.path.join(LLAMA, "config.json")))
    del cfg["hidden_size"]
    path = checkpoint_with_config(tmp_path, json.dumps(cfg))
    assert_one_line(*run(capsys, "--ckpt", path, "--device", "cpu"), "config field hidden_size is missing")


def test_a_seed_beyond_64_bits(capsys):
    assert_one_line(*run(capsys, "--ckpt", LLAMA, "--device", "cpu", "--seed", str(2**70)),
                    "SamplingParams.seed=")


def test_an_over_long_prompt_is_not_echoed_before_the_context_error(capsys):
    code, out, err = run(capsys, "--ckpt", LLAMA, "--device", "cpu", "--prompt", "ROMEO " * 1200)
    assert_one_line(code, out, err, "exceeds the model's context of 1024 tokens")


def test_an_accepted_prompt_is_echoed_before_its_text(capsys):
    code, out, err = run(capsys, "--ckpt", LLAMA, "--device", "cpu", "--prompt", "ROMEO:",
                         "--temperature", "0")
    assert code == 0 and out.startswith("ROMEO:") and len(out) > len("ROMEO:\n"), (out, err)


@pytest.mark.parametrize("module", ["tinyinfer.quantize", "tinyinfer.serve.__main__"])
def test_the_other_command_lines_refuse_an_unknown_device_in_one_line(capsys, tmp_path, module):
    import importlib
    main_of = importlib.import_module(module).main
    args = ["--ckpt", LLAMA, "--device", "tpu"]
    code = main_of(args + (["--out", str(tmp_path / "q")] if "quantize" in module else []))
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("tinyinfer: ")]
    assert code == 2 and len(lines) == 1 and "device 'tpu' is not supported" in lines[0], err


@pytest.mark.parametrize("args,words", [(["--prompt", ""], "empty prompt"),
                                        (["--chat"], "this model has no chat template")])
def test_request_errors_come_before_the_model_loads(capsys, monkeypatch, args, words):
    import tinyinfer.engine.llm as llm_module

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the error")
    monkeypatch.setattr(llm_module, "LLM", no_loading)
    assert_one_line(*run(capsys, "--ckpt", LLAMA, "--device", "cpu", *args), words)


def test_one_set_of_sampling_defaults_and_both_max_token_flags():
    from tinyinfer.cli import DEFAULT_MAX_TOKENS
    from tinyinfer.generate import parse_args
    from tinyinfer.sampling.params import SamplingParams
    args = parse_args(["--ckpt", LLAMA])
    assert args.max_tokens is None and args.temperature == SamplingParams().temperature == 1.0
    assert DEFAULT_MAX_TOKENS == SamplingParams().max_tokens
    assert parse_args(["--ckpt", LLAMA, "--max-tokens", "7"]).max_tokens == 7
    assert parse_args(["--ckpt", LLAMA, "--max-new-tokens", "9"]).max_tokens == 9


def test_json_reports_load_and_warm_up_apart_from_ttft(capsys):
    code = main(["--ckpt", LLAMA, "--device", "cpu", "--prompt", "ROMEO:", "--max-tokens", "3", "--json"])
    fig = json.loads(capsys.readouterr().out)
    assert code == 0 and fig["load_s"] > 0 and fig["warmup_s"] > 0 and fig["generated_tokens"] == 3
