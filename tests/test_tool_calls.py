"""Tools on chat (serve/tool_protocol.py, serve/tool_responses.py, LLM.chat(tools=)): the tools and the
turns that carry calls reach the chat template as transformers' `apply_chat_template(tools=)` gives
them (same prompt ids); bad tools / tool_choice / tool messages are 400s naming the field; streamed and
whole responses lay out calls as OpenAI does."""
from __future__ import annotations

import json

import pytest

from serve_util import ServerThread
from tinyinfer import LLM, LLMEngine, SamplingParams
from tinyinfer.serve.responses import Choice, TokenTexts
from tinyinfer.serve.tool_responses import ToolChatFormat
from tinyinfer.toolcalls import get_format
from tool_util import TOOLS, WEATHER, demo_tool_model

import httpx  # noqa: E402  (serve_util skips the module when the serve packages are missing)

transformers = pytest.importorskip("transformers")
OPTS = dict(device="cpu", dtype="float32", max_kv_tokens=4096)
ARGS = {"city": "Verona", "unit": "celsius"}
# A round trip in OpenAI's layout: the call's arguments are JSON text.
ROUND_TRIP = [{"role": "system", "content": "Answer briefly."},
              {"role": "user", "content": "What is the weather in Verona?"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return demo_tool_model(tmp_path_factory.mktemp("tools") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerThread(LLMEngine(model_dir, **OPTS), name="demo")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def llm(server) -> LLM:
    return LLM.from_engine(server.engine)


def hf_ids(model_dir: str, messages: list[dict], tools) -> list[int]:
    """transformers' prompt ids: its templates take a call's arguments as an object."""
    hf_messages = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": ARGS}}
                                        for c in m["tool_calls"]]} if "tool_calls" in m else m
                   for m in messages]
    hf_messages = [{k: v for k, v in m.items() if v is not None} for m in hf_messages]
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    return list(tok.apply_chat_template(hf_messages, tools=tools, add_generation_prompt=True,
                                        tokenize=True, return_dict=False))


def post(server, body) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def test_tools_and_tool_turns_render_as_in_transformers(server, llm, model_dir):
    want = hf_ids(model_dir, ROUND_TRIP, TOOLS)
    text = llm.tokenizer.decode(want)
    assert "<tool_call>" in text and '"arguments": {"city": "Verona"' in text and "<tool_response>" in text
    out = llm.chat(ROUND_TRIP, SamplingParams(temperature=0, max_tokens=2), tools=TOOLS, tool_choice="none")
    assert out[0].prompt_token_ids == want and out[0].tool_calls is None
    r = post(server, {"messages": ROUND_TRIP, "tools": TOOLS, "tool_choice": "none", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want)
    assert "tool_calls" not in r.json()["choices"][0]["message"]


def test_auto_parses_nothing_from_a_reply_without_calls(server, llm):
    params = SamplingParams(temperature=0, max_tokens=12)
    want = llm.chat(ROUND_TRIP[:2], params, tools=TOOLS)[0]
    assert want.tool_calls == [] and want.content == want.text.strip()
    r = post(server, {"messages": ROUND_TRIP[:2], "tools": TOOLS, "temperature": 0, "max_tokens": 12})
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": want.content}
    assert choice["finish_reason"] == want.finish_reason
    client = server.client()
    chunks = list(client.chat.completions.create(model="demo", messages=ROUND_TRIP[:2], tools=TOOLS,
                                                 temperature=0, max_tokens=12, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.content
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def bad(messages=ROUND_TRIP[:2], **fields):
    return {"messages": messages, "max_tokens": 2, **fields}


@pytest.mark.parametrize("body, param, words", [
    (bad(tools=[{"type": "function", "function": {"description": "x"}}]), "tools.0.function.name", "required"),
    (bad(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools.0.function.name", "letters"),
    (bad(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools.0.type", "function"),
    (bad(tools=[WEATHER, WEATHER]), "tools.1.function.name", "twice"),
    (bad(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
     "tools.0.function.parameters", "type 'object'"),
    (bad(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}}]),
     "tools.0.function.parameters", "not a valid JSON schema"),
    (bad(tools=[{"type": "function", "function": {"name": "f", "parameters": "{}"}}]),
     "tools.0.function.parameters", "dictionary"),
    (bad(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice.function.name", "not in tools"),
    (bad(tools=TOOLS, tool_choice="sometimes"), "tool_choice", "'required'"),
    (bad(tool_choice="required"), "tool_choice", "needs tools"),
    (bad(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tool_choice",
     "cannot also follow"),
    (bad(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "(?=x)y"}}}}}], tool_choice="required"), "tools", "does not compile"),
    (bad(tools=TOOLS, tool_choice={"type": "function"}), "tool_choice.function", "required"),
    (bad(ROUND_TRIP[:3] + [{"role": "tool", "content": "x"}], tools=TOOLS), "messages.3.tool_call_id",
     "tool_call_id"),
    (bad(ROUND_TRIP[:2] + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}], tools=TOOLS), "messages.2.tool_calls.0.function.arguments",
     "JSON object"),
    (bad(ROUND_TRIP[:2] + [{"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": "{}"}}]}], tools=TOOLS), "messages.2.tool_calls.0.id", "required"),
])
def test_bad_tool_fields_are_a_400_naming_the_field(server, body, param, words):
    r = post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert post(server, bad()).status_code == 200                   # the server is still fine


def test_a_template_without_a_tool_format_needs_the_parser_flag(tmp_path):
    d = demo_tool_model(tmp_path / "m", "{% for m in messages %}{{ m.content }}{% endfor %}")
    llm = LLM(d, **OPTS)
    with pytest.raises(ValueError, match="tool_call_parser"):
        llm.chat(ROUND_TRIP[1:2], tools=TOOLS)
    out = llm.chat(ROUND_TRIP[1:2], SamplingParams(max_tokens=2), tools=TOOLS, tool_call_parser="hermes")
    assert out[0].tool_calls is not None
    srv = ServerThread(llm.engine)
    try:
        r = post(srv, bad(tools=TOOLS))
        assert r.status_code == 400 and "--tool-call-parser" in r.json()["error"]["message"]
        assert post(srv, bad(tools=TOOLS, tool_choice="none")).status_code == 200
    finally:
        srv.stop()


def test_streamed_chunks_carry_calls_as_openai_lays_them_out(llm):
    fmt = ToolChatFormat("chatcmpl-1", "demo", TokenTexts(llm.tokenizer), False, get_format("hermes"))
    c = Choice(0)
    pieces = ["Checking.\n<tool", '_call>\n{"name": "get_time", "arguments": {', "}}\n</tool_call>"]
    chunks = []
    for i, piece in enumerate(pieces):
        c.finish_reason = "stop" if i == len(pieces) - 1 else None
        chunks.append(json.loads(fmt.chunk(c, piece, [], 0))["choices"][0])
    assert [ch["delta"].get("content") for ch in chunks] == ["Checking.", None, None]
    start = chunks[1]["delta"]["tool_calls"][0]
    assert start["index"] == 0 and start["id"].startswith("call_") and start["type"] == "function"
    assert start["function"] == {"name": "get_time", "arguments": "{"}
    assert chunks[2]["delta"]["tool_calls"] == [{"index": 0, "function": {"arguments": "}"}}]
    assert [ch["finish_reason"] for ch in chunks] == [None, None, "tool_calls"]
    c.text = "".join(pieces)
    whole = fmt.response([c], {})["choices"][0]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] == "Checking."
    assert whole["message"]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
