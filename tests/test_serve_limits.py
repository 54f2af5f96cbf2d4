"""The server's limits at the limit and one past it, on loopback: a completion whose prompt + max_tokens
fills the usable context (the smaller of the model's context and the KV pool) exactly runs to "length",
one more token is a 400; a chat request without max_tokens asks for exactly the rest of the context and
gets it; a conversation that fills the context alone is refused, one token shorter gets one token --
where the KV pool binds and where the model's context does; n (MAX_N), logprobs (MAX_LOGPROBS),
prompts x n, messages and stop strings (count and length) at their caps are served, one past is
refused. Limits are read from the code, not restated."""
from __future__ import annotations

import json

import pytest

from chat_util import demo_chat_model
from serve_util import ServerThread
from tinyinfer import LLMEngine
from tinyinfer.loading.chat import apply_chat_template
from tinyinfer.sampling.params import MAX_LOGPROBS
from tinyinfer.serve.limits import Limits
from tinyinfer.serve.protocol import MAX_N, MAX_STOP_CHARS, MAX_STOP_STRINGS

import httpx  # noqa: E402

POOL = 128                       # KV tokens: well below the demo model's context, so the pool binds
# Caps small enough to test at quickly; n at MAX_N still fits (66 = 2 prompts x n 33).
LIMITS = Limits(max_seqs_per_request=MAX_N + 2, max_messages=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return demo_chat_model(tmp_path_factory.mktemp("limits") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerThread(LLMEngine(model_dir, device="cpu", dtype="float32", max_kv_tokens=POOL),
                       name="demo", limits=LIMITS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def context(server) -> int:
    engine = server.engine
    assert engine.kv_tokens < engine.config.max_context
    return engine.kv_tokens


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, content=json.dumps(body),
                      headers={"Content-Type": "application/json"}, timeout=120)


def completion(server, n_prompt: int, max_tokens: int, **extra) -> httpx.Response:
    prompt = [(5 * i) % 500 + 3 for i in range(n_prompt)]
    return post(server, "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens,
                                            "temperature": 0.0, "ignore_eos": True, **extra})


def assert_refused(r: httpx.Response, param: str, words: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


@pytest.mark.parametrize("n_prompt", [1, 100])
def test_completion_filling_the_context_exactly_runs_to_length(server, context, n_prompt):
    r = completion(server, n_prompt, context - n_prompt)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": context - n_prompt,
                             "total_tokens": context}


def test_completion_one_token_past_the_context_is_refused(server, context):
    assert_refused(completion(server, 100, context - 99), "prompt", "whole pool")
    assert_refused(completion(server, context + 1, 1), "prompt", "whole pool")


def conversation(server, n_tokens: int) -> list[dict]:
    """A one-message conversation whose template renders to exactly n_tokens tokens."""
    def of(k: int) -> list[dict]:
        return [{"role": "user", "content": " ".join(["sir"] * k)}]

    tok = server.engine.tokenizer
    k = max(1, n_tokens - len(apply_chat_template(tok, of(1))))     # about one token per word
    for _ in range(50):
        got = len(apply_chat_template(tok, of(k)))
        if got == n_tokens:
            return of(k)
        k += 1 if got < n_tokens else -1
    pytest.fail(f"no conversation of exactly {n_tokens} tokens")


def test_chat_without_max_tokens_gets_exactly_the_rest_of_the_context(server, context):
    messages = conversation(server, 40)
    r = post(server, "/v1/chat/completions", {"messages": messages, "temperature": 0.0,
                                              "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": context - 40,
                             "total_tokens": context}


def test_chat_filling_the_context_is_refused_one_token_shorter_gets_one_token(server, context):
    r = post(server, "/v1/chat/completions", {"messages": conversation(server, context),
                                              "ignore_eos": True})
    assert_refused(r, "messages", f"context of {context} tokens")
    r = post(server, "/v1/chat/completions", {"messages": conversation(server, context - 1),
                                              "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_where_the_model_context_binds_chat_and_completions_fill_it_exactly(model_dir):
    srv = ServerThread(LLMEngine(model_dir, device="cpu", dtype="float32", max_kv_tokens=4096),
                       name="demo")
    try:
        context = srv.engine.config.max_context
        assert srv.engine.kv_tokens > context
        r = completion(srv, context - 12, 12)
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == context, r.text
        assert_refused(completion(srv, context - 12, 13), "prompt", f"context of {context} tokens")
        r = post(srv, "/v1/chat/completions", {"messages": conversation(srv, context - 10),
                                               "temperature": 0.0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 10
        assert r.json()["choices"][0]["finish_reason"] == "length"
    finally:
        srv.stop()


def test_n_at_its_cap_is_served_and_one_past_is_refused(server):
    r = completion(server, 3, 1, n=MAX_N, temperature=1.0, seed=1)
    assert r.status_code == 200, r.text
    assert sorted(c["index"] for c in r.json()["choices"]) == list(range(MAX_N))
    assert r.json()["usage"]["completion_tokens"] == MAX_N
    assert_refused(completion(server, 3, 1, n=MAX_N + 1), "n", f"1..{MAX_N}")
    assert_refused(completion(server, 3, 1, n=0), "n", f"1..{MAX_N}")


def test_logprobs_at_their_cap_are_served_and_one_past_is_refused(server):
    r = completion(server, 3, 2, logprobs=MAX_LOGPROBS)
    assert r.status_code == 200, r.text
    assert [len(top) for top in r.json()["choices"][0]["logprobs"]["top_logprobs"]] == [MAX_LOGPROBS] * 2
    assert_refused(completion(server, 3, 2, logprobs=MAX_LOGPROBS + 1), "logprobs", f"0 to {MAX_LOGPROBS}")
    r = post(server, "/v1/chat/completions", {"messages": conversation(server, 20), "max_tokens": 2,
                                              "logprobs": True, "top_logprobs": MAX_LOGPROBS + 1})
    assert_refused(r, "top_logprobs", f"0 to {MAX_LOGPROBS}")


def test_prompts_times_n_messages_and_stop_strings_at_their_caps_and_one_past(server):
    cap = LIMITS.max_seqs_per_request
    r = post(server, "/v1/completions", {"prompt": [[5, 6], [7, 8]], "n": cap // 2, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == cap, r.text
    assert_refused(post(server, "/v1/completions", {"prompt": [[5, 6]] * (cap + 1), "max_tokens": 1}),
                   "prompt", f"{cap + 1} sequences")
    assert_refused(post(server, "/v1/completions", {"prompt": [[5, 6], [7, 8]], "n": cap // 2 + 1,
                                                    "max_tokens": 1}), "n", f"{cap + 2} sequences")
    msgs = [{"role": "user", "content": "sir"}] * LIMITS.max_messages
    r = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert_refused(post(server, "/v1/chat/completions", {"messages": msgs + msgs[:1], "max_tokens": 1}),
                   "messages", f"{LIMITS.max_messages + 1} messages")
    stops = ["zq" * (MAX_STOP_CHARS // 2)] * MAX_STOP_STRINGS
    r = post(server, "/v1/completions", {"prompt": [5, 6], "stop": stops, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert_refused(post(server, "/v1/completions", {"prompt": [5, 6], "stop": stops + ["x"]}), "stop",
                   f"at most {MAX_STOP_STRINGS}")
    assert_refused(post(server, "/v1/completions", {"prompt": [5, 6], "stop": [stops[0] + "z"]}), "stop",
                   f"at most {MAX_STOP_CHARS} characters")


def test_the_server_is_idle_after_the_limits(server):
    stats = server.engine.stats
    assert stats["free_blocks"] == stats["num_blocks"] and stats["running"] == stats["waiting"] == 0
