"""A tool-calling round trip through the real `openai` client on loopback, streamed: a call forced by
tool_choice (a named function, or "required") -> the tool's result sent back -> the final answer. The
demo model was never trained on tools, so only the constraint (toolcalls/forcing.py) makes its call
valid: every call's arguments validate against the function's parameters (`jsonschema`), sampling at
temperature 1.0; the streamed call equals the whole-response call of the same seed."""
from __future__ import annotations

import json

import pytest

from serve_util import ServerThread
from tinyinfer import LLM, LLMEngine, SamplingParams
from tool_util import TOOLS, WEATHER, demo_tool_model

import openai  # noqa: E402  (serve_util skips the module when the serve packages are missing)

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
OPTS = dict(device="cpu", dtype="float32", max_kv_tokens=4096)
USER = [{"role": "user", "content": "What is the weather in Verona?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerThread(LLMEngine(demo_tool_model(tmp_path_factory.mktemp("rt") / "model"), **OPTS))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client(timeout=120)


def create(client, messages, stream: bool, **kw):
    return client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, stream=stream,
                                          temperature=1.0, max_tokens=120, **kw)


def collect(chunks) -> tuple[str, list[dict], str]:
    """A stream's content, its calls ({"id", "name", "arguments"}) and its finish_reason."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert call["id"] is None and d.function.name           # id and name come first, once
                call["id"], call["name"] = d.id, d.function.name
            call["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def valid(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def test_round_trip_call_result_answer_streamed(client):
    content, calls, finish = collect(create(client, USER, True, tool_choice=NAMED, seed=7))
    assert finish == "tool_calls" and "<tool_call>" not in content and len(calls) == 1
    call = calls[0]
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    args = valid(call["name"], call["arguments"])
    whole = create(client, USER, False, tool_choice=NAMED, seed=7).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == \
        [(call["name"], call["arguments"])]
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"city": args["city"], "sky": "clear"})}]
    answer, more_calls, finish = collect(create(client, messages, True, seed=8, tool_choice="none"))
    assert answer and more_calls == [] and finish in ("stop", "length")


@pytest.mark.parametrize("seed", range(6))
def test_required_always_gives_one_valid_call(client, seed):
    msg = create(client, USER, False, tool_choice="required", seed=seed).choices[0].message
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0].function.name in SCHEMAS
    valid(msg.tool_calls[0].function.name, msg.tool_calls[0].function.arguments)


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_llm_chat_returns_the_forced_call(server, parser):
    llm = LLM.from_engine(server.engine)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=120) for s in range(3)]
    outs = llm.chat([USER] * 3, params, tools=[WEATHER], tool_choice="required", tool_call_parser=parser)
    for out in outs:
        assert out.finish_reason == "stop" and len(out.tool_calls) == 1, out.text
        assert out.tool_calls[0].name == "get_weather"
        valid("get_weather", out.tool_calls[0].arguments)
        assert out.text.startswith("<tool_call>" if parser == "hermes" else '{"name": "get_weather"')
