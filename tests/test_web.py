"""The chat page at GET / in a real browser (headless Chromium, tests/web_util.py): a seeded reply read
from the page equals the same request made through the API, chat mode sends the conversation so far,
Stop aborts the request on the server (/metrics), model output that is HTML stays text and runs
nothing, server errors show as the server's message, --api-key asks for the key, --no-web turns the
page off. Without Chromium the browser tests skip (make test-browser installs it; .ci/run sets
TINYINFER_REQUIRE_BROWSER=1, which turns the skip into a failure)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chat_util import demo_chat_model
from hf_util import LLAMA, REPO
from serve_util import AppThread, ServerThread, metric
from web_util import (browser_missing, cli_server, last_reply, open_page, screenshot, send,
                      settings, start_chromium, wait)
from tinyinfer import LLMEngine

import httpx  # noqa: E402  (serve_util skips the module when the serve packages are missing)

OPTS = dict(device="cpu", dtype="float32", max_kv_tokens=4096)
ABORTED = 'tinyinfer_requests_total{finish_reason="abort"}'
HTML = ("Try <b>this</b>: <script>window.injected = 'script'</script>"
        "<img src=x onerror=\"window.injected = 'img'\"> &amp; done")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    why = browser_missing()
    if why and os.environ.get("TINYINFER_REQUIRE_BROWSER") == "1":
        pytest.fail(f"TINYINFER_REQUIRE_BROWSER=1 but {why}")
    if why:
        pytest.skip(why)
    d = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield d
    d.quit()


@pytest.fixture(scope="module")
def demo():
    """The demo model as it ships: no chat template, so the page offers completion mode only."""
    srv = ServerThread(LLMEngine(LLAMA, **OPTS), name="shakespeare-llama")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    srv = ServerThread(LLMEngine(demo_chat_model(tmp_path_factory.mktemp("web") / "model"), **OPTS),
                       name="demo-chat")
    yield srv
    srv.stop()


def api(srv, path: str, body: dict) -> dict:
    return httpx.post(srv.url + path, json=body, timeout=120).json()


def aborted(srv) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    return metric(text, ABORTED) if ABORTED in text else 0.0


def record_text_lengths(driver) -> None:
    """From now on the page records the length of the last reply's text at every change of the log."""
    driver.execute_script(
        "window.lengths = []; new MutationObserver(() => { const t = document.querySelector("
        "'#log .turn:last-child .text'); if (t) window.lengths.push(t.textContent.length); })"
        ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});")


def test_completion_mode_streams_the_same_text_as_the_api(driver, demo):
    open_page(driver, demo.url, "shakespeare-llama")
    chat_option = driver.find_element("css selector", "#mode option[value=chat]")
    assert not chat_option.is_enabled() and "no chat template" in chat_option.text
    assert not driver.find_element("id", "key-row").is_displayed()     # no --api-key: no key field
    settings(driver, temperature=0.8, max_tokens=40, seed=7)
    record_text_lengths(driver)
    send(driver, "ROMEO:")
    got = last_reply(driver)
    want = api(demo, "/v1/completions", {"model": "shakespeare-llama", "prompt": "ROMEO:",
                                         "temperature": 0.8, "max_tokens": 40, "seed": 7})
    assert got["text"] == want["choices"][0]["text"] and got["finish"] == want["choices"][0]["finish_reason"]
    tokens = want["usage"]["completion_tokens"]
    assert got["stats"].startswith(f"{tokens} tokens · TTFT ") and " tokens/s · finish: " in got["stats"]
    grew = sorted(set(driver.execute_script("return window.lengths")))
    assert len(grew) >= tokens // 2, f"the reply did not show as it streamed: lengths seen {grew}"


def test_stop_aborts_the_request_on_the_server(driver, demo, monkeypatch):
    open_page(driver, demo.url, "shakespeare-llama")
    # Seed 8 at 1.5 runs all 900 tokens without an end of text. The fused CPU step makes 900 demo tokens
    # ~1 s, which a loaded machine's browser could take to click Stop: each engine step waits 10 ms
    # here, so the reply needs >= 9 s and Stop comes long before the end.
    step = demo.engine.step
    monkeypatch.setattr(demo.engine, "step", lambda: (time.sleep(0.01), step())[1])
    settings(driver, temperature=1.5, max_tokens=900, seed=8)
    before = aborted(demo)
    send(driver, "ROMEO:")
    wait(driver, lambda d: len(d.find_element("css selector", "#log .turn:last-child .text").text) >= 20,
         "show the start of the reply")
    driver.find_element("id", "stop").click()
    got = last_reply(driver)
    assert got["finish"] == "stopped" and got["stats"].endswith("finish: stopped")
    deadline = time.monotonic() + 10
    while aborted(demo) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aborted(demo) == before + 1
    text = httpx.get(demo.url + "/metrics", timeout=10).text
    assert metric(text, "tinyinfer_kv_blocks_used") == 0 == metric(text, "tinyinfer_num_requests_running")
    # What the page had shown is the seeded stream cut short: the same request stopped at as many tokens.
    n = int(got["stats"].split()[0])
    want = api(demo, "/v1/completions", {"prompt": "ROMEO:", "temperature": 1.5, "max_tokens": n, "seed": 8})
    assert want["choices"][0]["finish_reason"] == "length" and got["text"] == want["choices"][0]["text"]
    assert driver.find_element("id", "send").is_enabled()
    assert not driver.find_element("id", "stop").is_enabled()


def test_a_server_error_shows_as_the_servers_message(driver, demo):
    open_page(driver, demo.url, "shakespeare-llama")
    settings(driver, temperature=-1, max_tokens=8, seed=None)
    send(driver, "ROMEO:")
    got = last_reply(driver)
    want = api(demo, "/v1/completions", {"model": "shakespeare-llama", "prompt": "ROMEO:", "max_tokens": 8,
                                         "temperature": -1.0, "stream": True,
                                         "stream_options": {"include_usage": True}})
    assert got["finish"] == "error" and "error" in got["classes"].split()
    assert got["text"] == want["error"]["message"] and "temperature" in got["text"]


def test_chat_mode_sends_the_conversation_and_matches_the_api(driver, chat):
    from selenium.webdriver.common.keys import Keys
    open_page(driver, chat.url, "demo-chat")
    settings(driver, mode="chat", system="Speak as a king.", temperature=0.8, max_tokens=24)
    history = [{"role": "system", "content": "Speak as a king."}]
    for i, (text, seed) in enumerate([("Who goes there?", 7), ("Speak again, my lord.", 8)]):
        settings(driver, seed=seed)
        if i == 0:
            send(driver, text)
        else:                                       # the keyboard path: Enter sends
            driver.find_element("id", "input").send_keys(text, Keys.ENTER)
        got = last_reply(driver)
        history.append({"role": "user", "content": text})
        want = api(chat, "/v1/chat/completions", {"model": "demo-chat", "messages": history, "seed": seed,
                                                  "temperature": 0.8, "max_tokens": 24})
        answer = want["choices"][0]["message"]["content"]
        assert got["text"] == answer and got["finish"] == want["choices"][0]["finish_reason"]
        history.append({"role": "assistant", "content": answer})
    assert len(driver.find_elements("css selector", "#log .turn")) == 4
    path = screenshot(driver, "chat-page.png")
    assert path.stat().st_size > 10_000
    driver.find_element("id", "clear").click()      # a new conversation: the first turn's reply again
    settings(driver, seed=7)
    send(driver, "Who goes there?")
    assert last_reply(driver)["text"] == history[2]["content"]
    assert len(driver.find_elements("css selector", "#log .turn")) == 2


def test_api_key_flow_and_the_page_without_a_key(driver):
    with cli_server("--api-key", "sekret") as (url, line):
        assert f"chat page: {url}/" in line
        r = httpx.get(url + "/", timeout=10)        # the page itself is public; its requests are not
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert httpx.get(url + "/web/config.json", timeout=10).json()["api_key_required"] is True
        open_page(driver, url, "API key needed")
        assert driver.find_element("id", "key-row").is_displayed()
        key = driver.find_element("id", "key")
        key.send_keys("wrong\t")
        wait(driver, lambda d: "API key" in d.find_element("id", "notice").text, "show the 401 message")
        message = httpx.get(url + "/v1/models", timeout=10).json()["error"]["message"]
        assert driver.find_element("id", "notice").text == message
        key.clear()
        key.send_keys("sekret\t")
        wait(driver, lambda d: d.find_element("id", "model").text == "shakespeare-llama", "take the key")
        settings(driver, max_tokens=5, seed=1)
        send(driver, "ROMEO:")
        got = last_reply(driver)
        assert got["finish"] in ("length", "stop") and got["text"], got


def test_no_web_turns_the_page_off():
    with cli_server("--no-web") as (url, line):
        assert "chat page" not in line
        for path in ("/", "/web/app.js", "/web/config.json"):
            r = httpx.get(url + path, timeout=10)
            assert r.status_code == 404 and "message" in r.json()["error"], path
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 200


def fake_server():
    """A test double of the server's API behind the real page: its chat reply is HTML (cut into
    5-character events, so tags straddle events), its completion stream ends in an error event, and
    /control shows the same HTML on a page without the page's protections (the check below can fail)."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, StreamingResponse
    from tinyinfer.serve.page import add_page
    app = FastAPI()
    add_page(app, chat_template=True, api_key_required=False)

    def stream(*events) -> StreamingResponse:
        return StreamingResponse((f"data: {e if e == '[DONE]' else json.dumps(e)}\n\n" for e in events),
                                 media_type="text/event-stream")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "double", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        return stream(*[{"choices": [{"index": 0, "delta": {"content": HTML[i:i + 5]},
                                      "finish_reason": None}]} for i in range(0, len(HTML), 5)],
                      {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, "[DONE]")

    @app.post("/v1/completions")
    async def completions() -> StreamingResponse:
        return stream({"choices": [{"index": 0, "text": "To be", "finish_reason": None}]},
                      {"error": {"message": "the engine failed (test double)"}}, "[DONE]")

    @app.get("/control")
    async def control() -> HTMLResponse:
        return HTMLResponse(f"<!doctype html><body>{HTML}</body>")

    return AppThread(app)


def test_html_in_a_reply_is_shown_as_text_and_runs_nothing(driver):
    srv = fake_server()
    try:
        driver.get(srv.url + "/control")            # the control: this HTML, parsed as HTML, runs code
        wait(driver, lambda d: d.execute_script("return window.injected") == "img", "run the control")
        open_page(driver, srv.url, "double")
        settings(driver, mode="chat", seed=None)
        send(driver, HTML)                          # the user's own text is shown as text too
        got = last_reply(driver)
        assert got["text"] == HTML and got["elements"] == 0 and got["finish"] == "stop"
        time.sleep(0.5)                             # an <img src=x> would have failed to load by now
        assert driver.execute_script(
            "return [window.injected, document.querySelectorAll('#log img, #log script, #log b').length, "
            "document.querySelector('#log .turn.user .text').textContent]") == [None, 0, HTML]
        # The second wall: even markup put into the page as HTML runs nothing (Content-Security-Policy).
        driver.execute_script("const d = document.createElement('div'); d.innerHTML = arguments[0]; "
                              "document.body.append(d);", HTML)
        time.sleep(0.5)
        assert driver.execute_script("return [window.injected, document.querySelectorAll('img').length]") \
            == [None, 1]
        settings(driver, mode="completion")
        send(driver, "To")
        got = last_reply(driver)
        assert got["finish"] == "error" and got["text"] == "the engine failed (test double)"
    finally:
        srv.stop()


def test_a_built_package_ships_the_page(tmp_path):
    """setup.py's package_data: a non-editable install gets the page's files (build_py is what copies
    a package's files into a wheel)."""
    from tinyinfer.serve.page import _TYPES
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=REPO,
                   check=True, capture_output=True, timeout=120)
    web = Path(tmp_path, "tinyinfer", "serve", "web")
    assert sorted(p.name for p in web.iterdir()) == sorted(_TYPES)
