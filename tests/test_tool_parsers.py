"""Tool-call parsers (tinyinfer/toolcalls): the hermes parser agrees with transformers' own response
parser (`parse_response` with its Qwen response template) on hand-written replies; llama3_json on
hand-written Llama 3 replies; a stream cut at random points gives the same calls and content as the
whole reply; malformed calls stay text; the constraint for tool_choice "required" / a named function
accepts exactly the calls it should (checked with `jsonschema`)."""
from __future__ import annotations

import json
import random

import pytest

from tinyinfer.toolcalls import ToolCallStream, detect_format, get_format
from tinyinfer.toolcalls.forcing import call_grammar, call_schema, choice_of, forced_output
from tool_util import HERMES_TEMPLATE, TOOLS

jsonschema = pytest.importorskip("jsonschema")

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
HERMES = [
    "No call here, just text.",
    CALL,
    "Let me look that up.\n" + CALL,
    CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    'Two:\n<tool_call>{"name": "f", "arguments": {"s": "a } ] \\" <tool_call>", "n": [1, {"k": null}]}}'
    '</tool_call>\n<tool_call>\n{"arguments": {"x": 1.5e3}, "name": "g"}\n</tool_call>',
    'Unicode: café 😀\n<tool_call>{"name": "f", "arguments": {"t": "naïve ☃"}}</tool_call>',
]


def transformers_parse(text: str):
    """transformers' reading of a Hermes / Qwen reply: (content, [(name, arguments dict)])."""
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS
    except ImportError:
        pytest.skip("this transformers has no response templates")
    template = next(v for k, v in _RESPONSE_TEMPLATE_FALLBACKS.items() if "qwen2" in k)
    tok = transformers.PreTrainedTokenizerBase()
    parsed = tok.parse_response(text, template, prefix="")
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in parsed.get("tool_calls", [])]
    return parsed.get("content") or None, calls


def ours(fmt: str, text: str):
    parsed = get_format(fmt).parse(text)
    for c in parsed.calls:
        assert c.id.startswith("call_") and c.to_openai()["type"] == "function"
    return parsed.content, [(c.name, json.loads(c.arguments)) for c in parsed.calls]


@pytest.mark.parametrize("text", HERMES, ids=range(len(HERMES)))
def test_hermes_parses_as_transformers_does(text):
    assert ours("hermes", text) == transformers_parse(text)


def test_the_arguments_are_the_models_own_json_text():
    parsed = get_format("hermes").parse(HERMES[4])
    assert [c.arguments for c in parsed.calls] == [
        '{"s": "a } ] \\" <tool_call>", "n": [1, {"k": null}]}', '{"x": 1.5e3}']


LLAMA3 = [
    ('{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}', None,
     [("get_weather", {"city": "Oslo", "unit": "celsius"})]),
    ('<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "arguments": {"a": [1]}}', None,
     [("f", {}), ("g", {"a": [1]})]),
    ('  {"name": "f", "parameters": {"a": 1}}\nThat is all.', "That is all.", [("f", {"a": 1})]),
    ("The answer is 4.", "The answer is 4.", []),
    ('{"name": "f"}', '{"name": "f"}', []),                                  # no parameters: text
    ('{"name": "f", "parameters": [1]}', '{"name": "f", "parameters": [1]}', []),
    ('{"name": "f", "parameters": {"a": ', '{"name": "f", "parameters": {"a":', []),  # cut off
]


@pytest.mark.parametrize("text, content, calls", LLAMA3, ids=range(len(LLAMA3)))
def test_llama3_json(text, content, calls):
    assert ours("llama3_json", text) == (content, calls)


MALFORMED = [
    'x <tool_call>{"name": "f", "arguments": {"a": 1}</tool_call> y',     # invalid JSON
    'x <tool_call>{"name": "f", "arguments": {"a": 1',                    # never closes, cut off
    '<tool_call>{"arguments": {}}</tool_call>',                            # no name
    "<tool_call>{'name': 'f', 'arguments': {}}</tool_call>",               # not JSON
    '<tool_call>{"name": "f", "arguments": "{}"}</tool_call>',             # arguments not an object
]


@pytest.mark.parametrize("text", MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_call_is_text(text):
    assert ours("hermes", text) == (text.strip(), [])


def test_a_last_call_without_its_close_tag_counts_when_its_json_is_whole():
    assert ours("hermes", 'ok <tool_call>{"name": "f", "arguments": {"a": 1}}\n') == ("ok", [("f", {"a": 1})])


def streamed(fmt: str, pieces: list[str]):
    stream = ToolCallStream(get_format(fmt))
    content, calls = "", {}
    for delta in [stream.feed(p) for p in pieces] + [stream.finish()]:
        content += delta.content
        for entry in delta.tool_calls:
            call = calls.setdefault(entry["index"], {"args": ""})
            if "name" in entry["function"]:
                assert "name" not in call and entry["id"].startswith("call_")     # sent once, first
                call["name"] = entry["function"]["name"]
            call["args"] += entry["function"].get("arguments", "")
    return content or None, [(calls[i]["name"], calls[i]["args"]) for i in sorted(calls)]


def random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("fmt, text", [("hermes", t) for t in HERMES + MALFORMED[2:]] +
                         [("llama3_json", t) for t, _, _ in LLAMA3[:-1]])
def test_a_stream_cut_anywhere_gives_the_whole_replys_calls(fmt, text):
    whole = get_format(fmt).parse(text)
    expected = (whole.content, [(c.name, c.arguments) for c in whole.calls])
    rng = random.Random(text)
    for pieces in [[text], list(text)] + [random_pieces(text, rng) for _ in range(30)]:
        assert streamed(fmt, pieces) == expected, pieces


def test_a_stream_sends_the_name_first_and_the_arguments_as_they_come():
    stream = ToolCallStream(get_format("hermes"))
    assert stream.feed("Hi <tool").content == "Hi"                   # "<tool" may begin a tag: held
    first = stream.feed('_call>\n{"name": "get_weather", "arguments": {"ci')
    assert first.content == "" and first.tool_calls[0]["function"] == {"name": "get_weather",
                                                                       "arguments": '{"ci'}
    more = stream.feed('ty": "Rome"')
    assert more.tool_calls == [{"index": 0, "function": {"arguments": 'ty": "Rome"'}}]
    assert stream.feed('}}\n</tool_call>').tool_calls[0]["function"] == {"arguments": "}"}
    assert stream.finish().tool_calls == [] and len(stream.calls) == 1


def test_a_started_call_that_is_cut_off_stays_a_call_in_a_stream():
    """Its name went out before the reply ended: the stream cannot take it back (OpenAI's own stream
    ends such a call with finish_reason "length"); its markup is never sent as content. A block that
    never became a call is text, as in the whole reply."""
    content, calls = streamed("hermes", ["Sure.\n<tool_", 'call>{"name": "f", "argu', 'ments": {"a": [1'])
    assert content == "Sure." and calls == [("f", '{"a": [1')]
    assert streamed("hermes", ["<tool_call>", "{'nam", "e': 1}"]) == ("<tool_call>{'name': 1}", [])


def test_the_format_is_read_from_the_chat_template():
    assert detect_format(HERMES_TEMPLATE) == "hermes"
    assert detect_format("<|start_header_id|>{% if tools %}{{ tools | tojson }}{% endif %}") == "llama3_json"
    assert detect_format("{{ messages[0].content }}") is None and detect_format(None) is None
    with pytest.raises(ValueError, match="unknown tool-call format 'xml'"):
        get_format("xml")


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json"])
def test_the_forced_call_schema_takes_valid_calls_only(fmt):
    key = get_format(fmt).argument_keys[0]
    schema = call_schema(get_format(fmt), TOOLS)
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = [{"name": "get_weather", key: {"city": "Rome", "unit": "celsius"}}, {"name": "get_time", key: {}}]
    bad = [{"name": "get_weather", key: {"city": "Rome"}}, {"name": "nope", key: {}},
           {"name": "get_time"}, {"name": "get_weather", key: {"city": "Rome", "unit": "kelvin"}}]
    for call in ok:
        jsonschema.validate(call, schema)
    for call in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(call, schema)
    named = call_schema(get_format(fmt), TOOLS, "get_time")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ok[0], named)


def test_the_forced_output_is_a_grammar_for_tags_and_a_schema_for_bare_json():
    hermes = forced_output(get_format("hermes"), TOOLS, "get_weather")
    assert hermes.kind == "grammar" and hermes.grammar.startswith('start: "<tool_call>\\n" call')
    assert call_grammar(get_format("llama3_json"), TOOLS) is None
    assert forced_output(get_format("llama3_json"), TOOLS).kind == "json_schema"


def test_tool_choice_for_the_python_api():
    assert choice_of(None, TOOLS) == ("auto", None) and choice_of(None, None) == ("none", None)
    assert choice_of({"type": "function", "function": {"name": "get_time"}}, TOOLS) == ("named", "get_time")
    for bad in ("required-ish", {"type": "function", "function": {"name": "nope"}}, {"function": "x"}):
        with pytest.raises(ValueError, match="tool_choice"):
            choice_of(bad, TOOLS)
    with pytest.raises(ValueError, match="needs tools"):
        choice_of("required", None)
