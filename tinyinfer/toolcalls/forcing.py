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

from tinyinfer.sampling.structured import StructuredOutput
from tinyinfer.toolcalls.formats import ToolCallFormat

# The call's JSON laid out as the formats' prompts show it ({"name": "f", "arguments": {...}}): no
# free whitespace for a small model to wander in (llguidance's JSON options; other validators ignore it).
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
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
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": _LAYOUT}


def call_grammar(fmt: ToolCallFormat, tools: list[dict], name: Optional[str] = None) -> Optional[str]:
    """The Lark grammar of one call wrapped in `fmt`'s tags, or None when the format has no tags
    (the schema alone is the constraint)."""
    if fmt.open_tag is None:
        return None
    schema = json.dumps(call_schema(fmt, tools, name))
    return (f"start: {json.dumps(fmt.open_tag + chr(10))} call {json.dumps(chr(10) + fmt.close_tag)}\n"
            f"call: %json {schema}\n")


def forced_output(fmt: ToolCallFormat, tools: list[dict], name: Optional[str] = None) -> StructuredOutput:
    """The constraint that makes the reply one call in `fmt` to `name` (else to any of `tools`)."""
    grammar = call_grammar(fmt, tools, name)
    if grammar is None:
        return StructuredOutput(json_schema=call_schema(fmt, tools, name))
    return StructuredOutput(grammar=grammar)


def choice_of(tool_choice, tools: Optional[list[dict]]) -> tuple[str, Optional[str]]:
    """(mode, function name) of an OpenAI tool_choice: "none", "auto", "required", or ("named", name)
    for {"type": "function", "function": {"name": ...}}; ValueError for anything else. The default
    is "auto" with tools, "none" without (OpenAI's)."""
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if tool_choice in ("none", "auto", "required"):
        if tool_choice != "none" and not tools:
            raise ValueError(f"tool_choice={tool_choice!r} needs tools")
        return tool_choice, None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) and tool_choice.get("type") == "function" else None
    known = [t.get("function", {}).get("name") for t in tools or [] if isinstance(t, dict)]
    if not isinstance(name, str) or name not in known:
        raise ValueError(f"tool_choice={tool_choice!r:.100} is invalid: use 'none', 'auto', 'required' "
                         f"or {{'type': 'function', 'function': {{'name': N}}}} with N one of {known}")
    return "named", name
