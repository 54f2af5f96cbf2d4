"""Structured output through the server (serve/structured.py), with the real `openai` client on
loopback: `client.chat.completions.parse(response_format=PydanticModel)` returns a parsed object;
`response_format` json_object / json_schema on chat and completions and vLLM's `structured_outputs`
(json, regex, choice, grammar) give outputs that validate (`jsonschema`, `re.fullmatch`), streamed or
not; bad schemas and grammars are 400s naming the field, and the server serves on after them."""
from __future__ import annotations

import json
import re

import pytest

from chat_util import demo_chat_model
from serve_util import ServerThread
from tinyinfer import LLMEngine

import httpx  # noqa: E402  (serve_util skips the module when the serve packages are missing)
import jsonschema  # noqa: E402
import openai  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

OPTS = dict(device="cpu", dtype="float32", max_kv_tokens=4096)
MESSAGES = [{"role": "user", "content": "Name a character as JSON."}]


class Character(BaseModel):
    name: str = Field(max_length=12)
    act: int = Field(ge=1, le=5)
    alive: bool


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerThread(LLMEngine(demo_chat_model(tmp_path_factory.mktemp("so") / "model"), **OPTS))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client(timeout=120)


def test_the_openai_client_parses_a_pydantic_model(client):
    done = client.chat.completions.parse(model="demo", messages=MESSAGES, response_format=Character,
                                         temperature=1.0, seed=3, max_completion_tokens=200)
    msg = done.choices[0].message
    assert done.choices[0].finish_reason == "stop" and isinstance(msg.parsed, Character)
    assert 1 <= msg.parsed.act <= 5 and len(msg.parsed.name) <= 12


def test_json_object_and_json_schema_on_chat_and_completions_streamed_or_not(client):
    schema = {"type": "object", "properties": {"line": {"type": "string", "maxLength": 20},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["line", "n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    chat = client.chat.completions.create(model="demo", messages=MESSAGES, response_format=fmt, n=3,
                                          seed=1, max_tokens=120)
    texts = [c.message.content for c in chat.choices]
    stream = client.chat.completions.create(model="demo", messages=MESSAGES, response_format=fmt,
                                            seed=1, max_tokens=120, stream=True)
    texts.append("".join(e.choices[0].delta.content or "" for e in stream if e.choices))
    assert texts[-1] == texts[0]                       # same seed, streamed or not
    done = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=120, seed=2,
                                     extra_body={"response_format": fmt})
    texts.append(done.choices[0].text)
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    anything = client.chat.completions.create(model="demo", messages=MESSAGES, seed=4, max_tokens=60, n=4,
                                              response_format={"type": "json_object"})
    for c in anything.choices:        # free keys and strings may run to max_tokens: then a prefix
        text = c.message.content
        assert isinstance(json.loads(text), dict) if c.finish_reason == "stop" else text.startswith("{")


@pytest.mark.parametrize("spec, check", [
    ({"regex": "[a-z]{3,6}-[0-9]{2}"}, lambda t: re.fullmatch("[a-z]{3,6}-[0-9]{2}", t)),
    ({"choice": ["Romeo", "Juliet", "Mercutio"]}, lambda t: t in ("Romeo", "Juliet", "Mercutio")),
    ({"grammar": 'start: "<" WORD ">"\nWORD: /[a-z]{1,5}/'}, lambda t: re.fullmatch("<[a-z]{1,5}>", t)),
    ({"json": {"type": "array", "items": {"enum": [1, 2]}, "minItems": 1, "maxItems": 3}},
     lambda t: json.loads(t) in ([1], [2], [1, 1], [1, 2], [2, 1], [2, 2]) or len(json.loads(t)) == 3),
])
def test_vllm_structured_outputs(client, spec, check):
    done = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=40, seed=5, n=2,
                                     extra_body={"structured_outputs": spec})
    for c in done.choices:
        assert c.finish_reason == "stop" and check(c.text), c.text


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(open"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
])
def test_bad_constraints_are_400s_naming_the_field(server, extra, param):
    for path, body in (("/v1/completions", {"prompt": "ROMEO:"}), ("/v1/chat/completions", {"messages": MESSAGES})):
        r = httpx.post(server.url + path, json={**body, "max_tokens": 4, **extra}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.json()
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200


def test_compiled_grammars_are_cached_by_content(server, client):
    g = server.engine.grammars
    spec = {"regex": "(to be|not to be)"}
    client.completions.create(model="demo", prompt="ROMEO:", max_tokens=8, extra_body={"structured_outputs": spec})
    compiled, hits = g.compiled, g.hits
    client.completions.create(model="demo", prompt="To be", max_tokens=8, extra_body={"structured_outputs": spec})
    assert g.compiled == compiled and g.hits > hits
