"""LLM.chat and `python -m tinyinfer.generate --chat`: a conversation is rendered with the checkpoint's
template and generated like any prompt; the CLI carries the history turn by turn and ends cleanly at EOF."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from chat_util import demo_chat_model
from hf_util import LLAMA, REPO
from tinyinfer import LLM, SamplingParams
from tinyinfer.loading.chat import ChatTemplateError, apply_chat_template, render

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> str:
    return demo_chat_model(tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def llm(chat_dir) -> LLM:
    return LLM(chat_dir, device="cpu", dtype="float32", max_kv_tokens=2048)


def test_chat_generates_from_the_rendered_conversation(llm):
    conv = [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Who art thou?"}]
    text = render(llm.tokenizer.chat_template, conv, bos_token="<s>")
    assert text == "<s>SYSTEM:\nSpeak in verse.\n\nUSER:\nWho art thou?\n\nASSISTANT:\n"
    ids = apply_chat_template(llm.tokenizer, conv)
    assert ids[0] == llm.tokenizer.bos_id and ids.count(llm.tokenizer.bos_id) == 1
    out = llm.chat(conv, GREEDY)[0]
    assert out.prompt_token_ids == ids
    assert out.token_ids == llm.generate([ids], GREEDY)[0].token_ids
    assert [o.token_ids for o in llm.chat([conv, conv[1:]], GREEDY)] == \
        [out.token_ids, llm.generate([apply_chat_template(llm.tokenizer, conv[1:])], GREEDY)[0].token_ids]


def test_chat_without_a_template_is_a_clear_error():
    with pytest.raises(ChatTemplateError, match="no chat template"):
        LLM(LLAMA, device="cpu", max_kv_tokens=256).chat([{"role": "user", "content": "hi"}])


def run_cli(ckpt: str, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "tinyinfer.generate", "--ckpt", ckpt, "--chat",
                           "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu",
                           "--dtype", "float32", "--max-kv-tokens", "2048", *extra],
                          input=stdin, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def test_cli_chat_keeps_the_history_and_ends_at_eof(chat_dir, llm):
    proc = run_cli(chat_dir, "Who art thou?\n\nWhence comest thou?\n", "--system", "Speak in verse.")
    assert proc.returncode == 0, proc.stderr
    conv = [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Who art thou?"}]
    first = llm.chat(conv, GREEDY)[0].text
    conv += [{"role": "assistant", "content": first}, {"role": "user", "content": "Whence comest thou?"}]
    second = llm.chat(conv, GREEDY)[0].text
    assert proc.stdout == first + "\n" + second + "\n"
    assert proc.stderr.count("generated") == 2       # one figures line per turn


def test_cli_chat_prompt_is_the_first_user_message(chat_dir, llm):
    proc = run_cli(chat_dir, "", "--prompt", "Who art thou?")
    assert proc.returncode == 0, proc.stderr
    first = llm.chat([{"role": "user", "content": "Who art thou?"}], GREEDY)[0].text
    assert proc.stdout == first + "\n" and proc.stderr.count("generated") == 1
    proc = run_cli(chat_dir, "Whence comest thou?\n", "--prompt", "Who art thou?")
    conv = [{"role": "user", "content": "Who art thou?"}, {"role": "assistant", "content": first},
            {"role": "user", "content": "Whence comest thou?"}]
    assert proc.returncode == 0 and proc.stdout == first + "\n" + llm.chat(conv, GREEDY)[0].text + "\n"


def test_cli_chat_without_a_template_says_so():
    proc = run_cli(LLAMA, "hello\n")
    assert proc.returncode == 2 and "no chat template" in proc.stderr
