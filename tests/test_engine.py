"""Engine behaviour under pressure and bad input: preemption, per-request errors, the CLI."""
import os
import re
import subprocess
import sys

import pytest
import torch

from hf_util import LLAMA, REPO
from tinyinfer import LLM, RequestError, SamplingParams

PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo", "To be", "KING RICHARD III:\nNow is the winter",
           "First Citizen:\nBefore we proceed any further, hear me speak.", "A", "MENENIUS:\nWhy",
           "Good morrow"]


def _mixed_params():
    return [SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True) if i % 2 == 0 else
            SamplingParams(temperature=0.9, top_k=50, seed=100 + i, max_tokens=48, ignore_eos=True)
            for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def ample():
    return LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=8192)


@pytest.fixture(scope="module")
def ample_outputs(ample):
    return ample.generate(PROMPTS, _mixed_params())


def test_tiny_pool_preempts_and_still_matches_ample_pool(ample_outputs):
    # 8 sequences of up to ~62 tokens need ~4 blocks each; 12 blocks force preemption.
    tiny = LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=12 * 16)
    outs = tiny.generate(PROMPTS, _mixed_params())
    assert [o.token_ids for o in outs] == [o.token_ids for o in ample_outputs]
    assert tiny.stats["free_blocks"] == tiny.stats["num_blocks"]
    assert tiny.stats["preemptions"] > 0


def test_seeded_request_is_the_same_alone_and_in_a_batch(ample, ample_outputs):
    for i in (1, 3):
        alone = ample.generate([PROMPTS[i]], _mixed_params()[i])[0]
        assert alone.token_ids == ample_outputs[i].token_ids


def test_request_larger_than_the_pool_is_rejected_while_others_finish():
    llm = LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=8 * 16)
    params = [SamplingParams(temperature=0.0, max_tokens=16), SamplingParams(max_tokens=500),
              SamplingParams(temperature=0.0, max_tokens=16)]
    outs = llm.generate(["ROMEO:", "JULIET:", "HAMLET:"], params)
    assert outs[1].finish_reason == "error" and isinstance(outs[1].error, RequestError)
    assert "whole pool" in str(outs[1].error)
    assert [len(outs[0].token_ids), len(outs[2].token_ids)] == [16, 16]
    assert llm.stats["free_blocks"] == llm.stats["num_blocks"]


@pytest.mark.parametrize("prompt,max_tokens,pattern", [
    ("", 8, "empty prompt"),
    ([3 + i % 1000 for i in range(1100)], 8, "exceeds the model's context of 1024"),
    ("ROMEO:", 1022, r"\+ max_tokens 1022 = 1025 exceeds the model's context"),
    ([5, 4000], 8, "token id 4000 is outside the vocabulary"),
])
def test_bad_request_errors_alone_and_the_engine_stays_usable(ample, ample_outputs, prompt,
                                                              max_tokens, pattern):
    outs = ample.generate([PROMPTS[0], prompt, PROMPTS[2]],
                          [_mixed_params()[0], SamplingParams(max_tokens=max_tokens),
                           _mixed_params()[2]])
    assert outs[1].finish_reason == "error" and isinstance(outs[1].error, RequestError)
    assert re.search(pattern, str(outs[1].error))
    assert outs[0].token_ids == ample_outputs[0].token_ids
    assert outs[2].token_ids == ample_outputs[2].token_ids


def test_nan_logits_end_only_that_request_and_free_its_blocks(ample_outputs):
    llm = LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=8192)
    poison = 1000                                       # a rare piece; its embedding becomes NaN
    with torch.no_grad():
        llm.model.embed_tokens.weight[poison] = float("nan")
    outs = llm.generate([PROMPTS[0], [1, 50, poison, 60], PROMPTS[2]],
                        [_mixed_params()[0], SamplingParams(max_tokens=8), _mixed_params()[2]])
    assert outs[1].finish_reason == "error" and "NaN/inf logits" in str(outs[1].error)
    assert outs[0].token_ids == ample_outputs[0].token_ids
    assert outs[2].token_ids == ample_outputs[2].token_ids
    assert llm.stats["free_blocks"] == llm.stats["num_blocks"]
    assert llm.generate([PROMPTS[0]], _mixed_params()[0])[0].token_ids == ample_outputs[0].token_ids


def test_stop_string_cuts_the_text_and_nothing_after_it_is_emitted(ample):
    free = ample.generate(["ROMEO:"], SamplingParams(temperature=0.0, max_tokens=40))[0]
    stop = free.text[10:14]
    out = ample.generate(["ROMEO:"], SamplingParams(temperature=0.0, max_tokens=40, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:free.text.find(stop)]
    assert stop not in out.text


def test_stop_token_ids_end_generation(ample):
    free = ample.generate(["ROMEO:"], SamplingParams(temperature=0.0, max_tokens=20))[0]
    out = ample.generate(["ROMEO:"], SamplingParams(temperature=0.0, max_tokens=20,
                                                    stop_token_ids=[free.token_ids[5]]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[:free.token_ids.index(free.token_ids[5]) + 1]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "tinyinfer.generate", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)


def test_cli_streams_text_and_prints_a_figures_line():
    r = _cli("--ckpt", LLAMA, "--prompt", "ROMEO:", "--max-tokens", "12", "--temperature", "0",
             "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:")
    assert "12 generated" in r.stderr and "tokens/s" in r.stderr and "time to first token" in r.stderr


def test_cli_threads_option_sets_torchs_thread_count():
    from tinyinfer.cli import apply_threads
    from tinyinfer.generate import parse_args
    before = torch.get_num_threads()
    try:
        assert parse_args(["--ckpt", LLAMA]).threads == 1                    # the default
        apply_threads(parse_args(["--ckpt", LLAMA, "--threads", "2"]))
        assert torch.get_num_threads() == 2
        apply_threads(parse_args(["--ckpt", LLAMA, "--threads", "0"]))     # 0: torch's, untouched
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("args,pattern", [
    (["--ckpt", "/does/not/exist"], "does not exist"),
    (["--ckpt", os.path.join(REPO, "tests")], "no .safetensors"),
    (["--ckpt", LLAMA, "--temperature", "-1"], "temperature"),
    (["--ckpt", LLAMA, "--prompt", "x" * 5000], "context"),
    (["--ckpt", LLAMA, "--threads", "-2"], "--threads -2"),
])
def test_cli_user_mistakes_give_one_clear_line_and_no_traceback(args, pattern):
    r = _cli("--prompt", "ROMEO:", *args, "--device", "cpu")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert re.search(pattern, r.stderr), r.stderr
