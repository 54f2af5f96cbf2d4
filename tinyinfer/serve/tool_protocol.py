"""The tool fields of a chat request (OpenAI function calling,
https://platform.openai.com/docs/guides/function-calling), validated with pydantic in strict mode:
`tools`, `tool_choice`, and the messages that carry calls back (an assistant turn's `tool_calls`, a
`role: "tool"` turn's `tool_call_id`). Each problem is a `ToolFieldError` naming the field
(`tools.0.function.parameters`); serve/protocol.py answers it as a 400.

- A tool is {"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}; its
  name is OpenAI's `[a-zA-Z0-9_-]{1,64}`, its parameters a JSON schema (checked against its
  metaschema with `jsonschema`) of type "object".
- tool_choice is "none", "auto", "required" or {"type": "function", "function": {"name"}} naming one
  of the tools; anything but "none" needs tools.
- An assistant turn's call arguments arrive as JSON text (OpenAI's layout) and reach the chat template
  as the object they encode, as transformers' templates expect (`tool_call.arguments | tojson`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal, Optional

import jsonschema
from pydantic import BaseModel, ConfigDict, ValidationError

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class ToolFieldError(ValueError):
    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionDef(_Strict):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(_Strict):
    name: str
    arguments: str


class CallIn(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


@dataclass(frozen=True)
class ToolRequest:
    """What a request asks about tools: `tools` (as sent, for the template), `choice` ("none", "auto",
    "required" or "named") and `name` (the named function)."""
    tools: Optional[list[dict]]
    choice: str
    name: Optional[str] = None


def _check(model: type[BaseModel], value: Any, field: str) -> BaseModel:
    try:
        return model.model_validate(value)
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join([field] + [str(p) for p in e["loc"]])
        if e["type"] == "extra_forbidden":
            raise ToolFieldError(f"unknown field {where!r}", where) from err
        if e["type"] == "missing":
            raise ToolFieldError(f"{where} is required", where) from err
        raise ToolFieldError(f"{where}: {e['msg']} (got {e.get('input')!r:.60})", where) from err


def _check_parameters(params: dict, field: str) -> None:
    if params.get("type") != "object":
        raise ToolFieldError(f"{field} must be a JSON schema of type 'object' (a function takes named "
                             f"arguments), got type {params.get('type')!r}", field)
    try:
        jsonschema.validators.validator_for(params).check_schema(params)
    except jsonschema.SchemaError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "the top level"
        raise ToolFieldError(f"{field} is not a valid JSON schema (at {where}: {err.message:.200})",
                             field) from None


def check_tools(tools: Optional[list[dict]], tool_choice: Any) -> ToolRequest:
    """The request's tools and tool_choice, checked; ToolFieldError names the first bad field."""
    names = []
    for i, tool in enumerate(tools or []):
        t = _check(ToolDef, tool, f"tools.{i}")
        if not _NAME.fullmatch(t.function.name):
            raise ToolFieldError(f"tools.{i}.function.name={t.function.name!r} is invalid: use 1 to 64 "
                                 "letters, digits, '_' or '-'", f"tools.{i}.function.name")
        if t.function.name in names:
            raise ToolFieldError(f"tools.{i}.function.name={t.function.name!r} is given twice",
                                 f"tools.{i}.function.name")
        names.append(t.function.name)
        if t.function.parameters is not None:
            _check_parameters(t.function.parameters, f"tools.{i}.function.parameters")
    if tool_choice is None:
        return ToolRequest(tools, "auto" if names else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ToolFieldError(f"tool_choice={tool_choice!r} is invalid: use 'none', 'auto', "
                                 "'required' or {'type': 'function', 'function': {'name': ...}}",
                                 "tool_choice")
        if tool_choice != "none" and not names:
            raise ToolFieldError(f"tool_choice={tool_choice!r} needs tools: the request has none",
                                 "tool_choice")
        return ToolRequest(tools, tool_choice)
    named = _check(NamedToolChoice, tool_choice, "tool_choice")
    if named.function.name not in names:
        raise ToolFieldError(f"tool_choice names function {named.function.name!r}, which is not in "
                             f"tools (they are {names})", "tool_choice.function.name")
    return ToolRequest(tools, "named", named.function.name)


def template_message(msg: dict, i: int) -> dict:
    """One message as the chat template gets it: an assistant's tool_calls checked, their arguments
    decoded to objects; a tool turn must name the call it answers."""
    if msg.get("role") == "tool" and not isinstance(msg.get("tool_call_id"), str):
        raise ToolFieldError(f"messages.{i}: a 'tool' message needs tool_call_id (the id of the call "
                             "it answers), a string", f"messages.{i}.tool_call_id")
    calls = msg.get("tool_calls")
    if calls is None:
        return msg
    if msg.get("role") != "assistant" or not isinstance(calls, list):
        raise ToolFieldError(f"messages.{i}.tool_calls: only an assistant message has tool_calls, a "
                             "list", f"messages.{i}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        where = f"messages.{i}.tool_calls.{j}"
        c = _check(CallIn, call, where)
        try:
            args = json.loads(c.function.arguments)
        except json.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            raise ToolFieldError(f"{where}.function.arguments must be a JSON object as text, got "
                                 f"{c.function.arguments!r:.60}", f"{where}.function.arguments")
        out.append({"id": c.id, "type": "function",
                    "function": {"name": c.function.name, "arguments": args}})
    return {**msg, "tool_calls": out}
