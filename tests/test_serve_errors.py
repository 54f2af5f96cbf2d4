"""Bad requests get HTTP 400 (401 without the API key) with {"error": {"message", "type", "param",
"code"}}, the server stays up, and a good request right after each succeeds; a request that fails
inside the engine (NaN logits) ends with an error for that client alone."""
from __future__ import annotations

import json

import pytest

from hf_util import LLAMA
from serve_util import ServerThread
from tinyinfer import LLMEngine

import httpx  # noqa: E402
import openai  # noqa: E402

KEY = "sesame"
POOL = 512                                  # KV tokens: less than the model's 1024-token context


@pytest.fixture(scope="module")
def server():
    srv = ServerThread(LLMEngine(LLAMA, device="cpu", dtype="float32", max_kv_tokens=POOL),
                       name="demo", api_key=KEY)
    yield srv
    srv.stop()


def post(server, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers=headers, timeout=60)


def assert_good_request_works(server) -> None:
    r = post(server, "/v1/completions", {"model": "demo", "prompt": "ROMEO:", "max_tokens": 4,
                                          "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


BAD = [  # (body, param the error must name, words the message must contain)
    (b'{"prompt": "ROMEO:", ', None, "not valid JSON"),
    (b'["ROMEO:"]', None, "JSON object"),
    ({"max_tokens": 4}, "prompt", "required"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "valid number"),
    ({"prompt": "x", "max_tokens": 4.5}, "max_tokens", "valid integer"),
    ({"prompt": 7}, "prompt", "wrong type"),
    ({"prompt": "x", "stop": ["a", 3]}, "stop", "wrong type"),
    ({"prompt": "x", "top_p": 1.5}, "top_p", "(0, 1]"),
    ({"prompt": "x", "temperature": -1}, "temperature", ">= 0"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"prompt": "x", "n": 0}, "n", "1..64"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "0 to 20"),
    ({"prompt": "x", "min_tokens": 9, "max_tokens": 4}, "min_tokens", "max_tokens"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": [5, 99999]}, "prompt", "outside the vocabulary"),
    ({"prompt": "x", "model": "gpt-4"}, "model", "not served here"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate", "unknown field"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"prompt": "x", "logit_bias": {"5": 2.0}}, "logit_bias", "not supported"),
    ({"prompt": "x", "echo": True}, "echo", "not supported"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream=true"),
    ({"prompt": "ROMEO: " * 600, "max_tokens": 16}, "prompt", "context"),
    ({"prompt": "ROMEO: " * 200, "max_tokens": 300}, "prompt", "KV cache"),
]


@pytest.mark.parametrize("body, param, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_completion_request_is_a_400_naming_the_problem(server, body, param, words):
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and words in err["message"], err
    assert_good_request_works(server)


@pytest.mark.parametrize("body, param, words", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no chat template"),
    ({"messages": []}, "messages", "empty"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role", "required"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content", "text"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs", "logprobs=true"),
    ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"template": "{{ 1 }}"}},
     "chat_template_kwargs", "may not set"),
])
def test_bad_chat_request_is_a_400(server, body, param, words):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert words in r.json()["error"]["message"]
    assert_good_request_works(server)


def test_a_missing_or_wrong_key_is_a_401(server):
    for key in (None, "wrong"):
        r = post(server, "/v1/completions", {"prompt": "x"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert_good_request_works(server)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    assert httpx.get(server.url + "/health").status_code == 200           # not behind the key


def test_nan_logits_fail_that_request_alone(server, monkeypatch):
    runner = server.engine.runner
    execute = runner.execute
    POISON = 999                                                         # a token id in the prompt

    def poisoned(batch, **kw):
        logits = execute(batch, **kw).clone()
        q = batch.query_start_loc
        for b in range(batch.num_seqs):
            if POISON in batch.input_ids[q[b]:q[b + 1]]:
                logits[b] = float("nan")
        return logits

    monkeypatch.setattr(runner, "execute", poisoned)
    good = {"prompt": [5, 6, 7], "max_tokens": 4}
    bad = post(server, "/v1/completions", {"prompt": [5, POISON, 7], "max_tokens": 4})
    assert bad.status_code == 500 and "NaN" in bad.json()["error"]["message"]
    assert post(server, "/v1/completions", good).status_code == 200
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": [5, POISON, 7], "max_tokens": 4, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and "NaN" in events[0] and events[-1] == "data: [DONE]"
    assert_good_request_works(server)


def test_an_engine_step_that_raises_fails_its_requests_and_the_server_goes_on(server, monkeypatch):
    runner = server.engine.runner
    execute = runner.execute

    def broken(batch, **kw):
        if 999 in batch.input_ids:
            raise RuntimeError("simulated kernel failure")
        return execute(batch, **kw)

    monkeypatch.setattr(runner, "execute", broken)
    r = post(server, "/v1/completions", {"prompt": [5, 999, 7], "max_tokens": 4})
    assert r.status_code == 500 and "simulated kernel failure" in r.json()["error"]["message"]
    stats = server.engine.stats
    assert stats["running"] == stats["waiting"] == 0 and stats["free_blocks"] == stats["num_blocks"]
    assert_good_request_works(server)
