"""`tool_choice` "required" or a named function, enforced by constrained decoding: the model may only
write one call, in its format, to one of the allowed functions, with arguments that match that
function's `parameters` JSON schema (so the call always parses and validates).

The call's JSON is described by a JSON schema: `{"name": <const>, "arguments" | "parameters": <the
function's parameters>}`, one alternative per allowed function (`anyOf`). For `llama3_json` the reply
is that JSON alone, a `json_schema` constraint; for `hermes` the JSON sits between `<tool_call>` tags,
a Lark grammar that embeds the schema (`%json`, llguidance's Lark extension).
"""
from __future__ import annotations

import json
from typing import Optional

from tinyinfer.toolcalls.formats import ToolCallFormat

# A function without `parameters` takes none (OpenAI's rule): its arguments are an empty object.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def call_schema(fmt: ToolCallFormat, tools: list[dict], name: Optional[str] = None) -> dict:
    """The JSON schema of one call in `fmt` to `name` (else to any of `tools`): tools are OpenAI tool
    dicts ({"type": "function", "function": {"name", "parameters"}})."""
    key = fmt.argument_keys[0]
    options = []
    for tool in tools:
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        options.append({"type": "object", "properties": {
            "name": {"const": fn["name"]}, key: fn.get("parameters") or _NO_PARAMETERS},
            "required": ["name", key], "additionalProperties": False})
    if not options:
        raise ValueError(f"no tool named {name!r}" if name else "no tools to call")
    return options[0] if len(options) == 1 else {"anyOf": options}


def call_grammar(fmt: ToolCallFormat, tools: list[dict], name: Optional[str] = None) -> Optional[str]:
    """The Lark grammar of one call wrapped in `fmt`'s tags, or None when the format has no tags
    (the schema alone is the constraint)."""
    if fmt.open_tag is None:
        return None
    schema = json.dumps(call_schema(fmt, tools, name))
    return (f"start: {json.dumps(fmt.open_tag + chr(10))} call {json.dumps(chr(10) + fmt.close_tag)}\n"
            f"call: %json {schema}\n")
