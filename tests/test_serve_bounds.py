"""The server's bounds (serve/limits.py, serve/templates.py): a body past --max-request-bytes is a 413,
deep JSON a 400, too many sequences / messages / stop strings a 400 naming the field, hostile chat
templates (endless loops, huge output, ZeroDivisionError, RecursionError) a 400 naming the template
within the deadline -- and /health answers while any of it runs, and a good request right after
gets the same tokens as before."""
from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest

from chat_util import SCRIPT_TEMPLATE, demo_chat_model
from serve_util import ServerThread
from tinyinfer import LLMEngine
from tinyinfer.serve.limits import Limits

OPTS = dict(device="cpu", dtype="float32", max_kv_tokens=512)
LIMITS = Limits(max_request_bytes=200_000, max_seqs_per_request=8, template_timeout_s=2.0,
                max_messages=50, max_json_values=50_000, max_json_containers=5_000)
HOSTILE = {   # template -> words its 400 must contain
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": "within 2 s",
    "{{ 'x' * 10**7 }}": "more than",
    "{{ 1 / 0 }}": "ZeroDivisionError",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}": "RecursionError",
    "{{ ('x' * 10**5) * 10**5 }}": "chat template",           # 10 GB: past the worker's memory
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerThread(LLMEngine(demo_chat_model(tmp_path_factory.mktemp("b") / "m"), **OPTS),
                       limits=LIMITS)
    yield srv
    srv.stop()


def post(server, path: str, body, timeout: float = 60) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=data, timeout=timeout,
                      headers={"Content-Type": "application/json"})


def error(r: httpx.Response, status: int, param, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert all(w in err["message"] for w in words), err
    return err


def good(server) -> list[str]:
    r = post(server, "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 6, "temperature": 0,
                                         "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def health_ms(server) -> float:
    t = time.perf_counter()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    return (time.perf_counter() - t) * 1000


def test_a_body_past_the_limit_is_a_413_before_it_is_read(server):
    before = good(server)
    error(post(server, "/v1/completions", {"prompt": "x" * 300_000}), 413, None, "200000",
          "--max-request-bytes")
    assert good(server) == before


def test_json_nested_deeper_than_the_parser_allows_is_a_400(server):
    for body in (b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}",
                 b'{"prompt": "x", "metadata": {"a": ' + b"{" * 1000 + b"}" * 1001):
        error(post(server, "/v1/completions", body), 400, None, "not valid JSON")


def test_a_body_of_too_many_json_values_is_a_413(server):
    body = b'{"prompt": [' + b",".join([b"[1]"] * 6_000) + b"]}"
    error(post(server, "/v1/completions", body), 413, None, "arrays and objects")
    body = b'{"prompt": "a,[{,", "stop_token_ids": [' + b",".join([b"1"] * 60_000) + b"]}"
    error(post(server, "/v1/completions", body), 413, None, "JSON values")


def test_prompts_times_n_past_the_cap_is_a_400_naming_n(server):
    error(post(server, "/v1/completions", {"prompt": ["a"] * 3, "n": 3}), 400, "n", "9 sequences",
          "--max-seqs-per-request")
    error(post(server, "/v1/completions", {"prompt": ["a"] * 9}), 400, "prompt", "9 sequences")


def test_stop_strings_are_bounded_in_count_and_length(server):
    error(post(server, "/v1/completions", {"prompt": "a", "stop": ["x"] * 17}), 400, "stop", "16")
    error(post(server, "/v1/completions", {"prompt": "a", "stop": "x" * 1001}), 400, "stop", "1000")
    r = post(server, "/v1/completions", {"prompt": "a", "stop": ["zq" * 400] * 16, "max_tokens": 3})
    assert r.status_code == 200, r.text


def test_too_many_messages_is_a_400(server):
    msgs = [{"role": "user", "content": "hi"}] * 51
    error(post(server, "/v1/chat/completions", {"messages": msgs}), 400, "messages", "51 messages")


@pytest.mark.parametrize("field, value, param", [
    ("max_tokens", 10**12, "max_tokens"), ("max_completion_tokens", 0, "max_completion_tokens"),
    ("max_completion_tokens", 10**6, "max_completion_tokens"), ("top_logprobs", 21, "top_logprobs")])
def test_chat_errors_name_the_field_sent(server, field, value, param):
    body = {"messages": [{"role": "user", "content": "hi"}], field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    error(post(server, "/v1/chat/completions", body), 400, param, param)


def test_completion_max_tokens_past_the_context_names_max_tokens(server):
    error(post(server, "/v1/completions", {"prompt": "a", "max_tokens": 10**12}), 400, "max_tokens",
          "max_tokens")


@pytest.mark.parametrize("template", list(HOSTILE), ids=range(len(HOSTILE)))
def test_a_hostile_template_is_a_400_and_health_answers_meanwhile(server, template):
    """/health keeps answering while the template runs (rendered on the loop or under the GIL, it
    would answer nothing until the render ends); how fast it answers is measured by
    `python -m tools.bench hostile`, not here (no timings in tests)."""
    before = good(server)
    tok = server.engine.tokenizer
    tok.chat_template = template
    try:
        box = {}
        t = threading.Thread(target=lambda: box.update(r=post(server, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}]})))
        t.start()
        answered = 0
        while t.is_alive():
            assert httpx.get(server.url + "/health", timeout=30).status_code == 200
            answered += t.is_alive()                # answered while the render was in flight
            time.sleep(0.05)
        t.join()
    finally:
        tok.chat_template = SCRIPT_TEMPLATE
    error(box["r"], 400, "messages", HOSTILE[template])
    if "within" in HOSTILE[template]:               # the deadline case runs the whole 2 s
        assert answered >= 3, answered
    assert good(server) == before


def test_the_chat_template_still_renders_after_hostile_ones(server):
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 3})
    assert r.status_code == 200, r.text


def test_health_is_503_once_the_engine_thread_is_dead(tmp_path):
    srv = ServerThread(LLMEngine(demo_chat_model(tmp_path / "m"), **OPTS), limits=LIMITS)
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        runner = srv.app.state.engine

        def broken():
            raise RuntimeError("boom")
        runner.engine.has_unfinished = broken
        runner._thread.join(10)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and "engine thread" in r.json()["reason"], r.text
        r = post(srv, "/v1/completions", {"prompt": "a", "max_tokens": 2})
        assert r.status_code == 503, r.text
    finally:
        srv.stop()


def test_the_byte_level_prompt_bound_never_refuses_text_that_fits():
    """PromptBound: for a byte-level tokenizer (SmolLM2's), len(text) / L <= tokens for any text --
    checked on texts built from the longest tokens themselves, the case closest to the bound."""
    gguf = pytest.importorskip("tinyinfer.loading.gguf")
    from hf_util import LLAMA, REPO
    from tinyinfer.loading.tokenizer import Tokenizer
    from tinyinfer.serve.limits import PromptBound
    path = f"{REPO}/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.isfile(path):
        pytest.skip("SmolLM2 GGUF not fetched (tests/test_gguf.py fetches it)")
    tok = Tokenizer.from_gguf(gguf.load_gguf(path).tokenizer())
    bound = PromptBound(tok, 64)
    longest = bound.max_chars // 64
    vocab = sorted(tok._backend.tk.get_vocab(), key=len, reverse=True)[:50]
    for text in [tok.decode(tok.encode(p, add_bos=False)) for p in vocab] + ["héllo wörld " * 50]:
        assert len(tok.encode(text, add_bos=False)) >= len(text) / longest, text
    bound.check("x" * bound.max_chars, "prompt")
    with pytest.raises(Exception, match="cannot fit"):
        bound.check("x" * (bound.max_chars + 1), "prompt")
    sp = PromptBound(Tokenizer.from_dir(LLAMA), 64)
    assert sp.max_chars is None                     # SentencePiece: no sound bound, none applied


def test_a_good_request_gets_its_solo_tokens_while_hostile_ones_are_in_flight(server):
    """The "done when" scene without its timings (those are `python -m tools.bench hostile`): an
    oversized body, a looping template and a prompts x n flood, each sent over and over, while
    another client's seeded request gets exactly its tokens and /health keeps answering."""
    body = {"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0.8, "seed": 7, "ignore_eos": True}
    solo = post(server, "/v1/completions", body).json()["choices"]
    server.engine.tokenizer.chat_template = next(iter(HOSTILE))     # the looping one
    stop, seen = threading.Event(), []

    def attack(path, payload):
        while not stop.is_set():
            seen.append(post(server, path, payload).status_code)

    threads = [threading.Thread(target=attack, args=a) for a in (
        ("/v1/completions", {"prompt": "x" * 300_000}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": ["a"] * 1000, "n": 64}))]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        for _ in range(3):
            assert post(server, "/v1/completions", body).json()["choices"] == solo
            assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        server.engine.tokenizer.chat_template = SCRIPT_TEMPLATE
    assert set(seen) <= {400, 413} and {400, 413} <= set(seen), seen
