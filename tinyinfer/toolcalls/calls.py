"""Tool calls as text: the `ToolCall` the APIs return, and the JSON scanning both formats share.

A call's `arguments` is the arguments object exactly as the model wrote it (a slice of its output,
validated with `json.loads`), not a re-serialisation: a stream can then send the same text piece by
piece before the call has ended, and the pieces join to the non-streamed string (toolcalls/stream.py).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional

_DECODER = json.JSONDecoder()
_WS = re.compile(r"\s*")


def call_id() -> str:
    """An id for one call, in OpenAI's form (`call_` + 24 characters)."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    """One function call: `name`, and `arguments` as JSON text (an object)."""
    name: str
    arguments: str
    id: str = field(default_factory=call_id)

    def to_openai(self, index: Optional[int] = None) -> dict:
        """The call as OpenAI's `tool_calls` entry (`index` only in streamed deltas)."""
        out = {"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}

    def parsed_arguments(self) -> dict:
        return json.loads(self.arguments)


@dataclass
class ParsedOutput:
    """A reply split into its text (None when only calls were written) and its calls."""
    content: Optional[str]
    calls: list[ToolCall]


def object_members(text: str, start: int) -> Optional[tuple[dict[str, tuple[int, int]], int]]:
    """The members of the JSON object at text[start] ('{'): key -> (start, end) of its raw value
    text, and the index just past the closing '}'; None when it is not one valid object."""
    if start >= len(text) or text[start] != "{":
        return None
    spans: dict[str, tuple[int, int]] = {}
    i = _WS.match(text, start + 1).end()
    if i < len(text) and text[i] == "}":
        return spans, i + 1
    while True:
        try:
            key, i = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        if not isinstance(key, str):
            return None
        i = _WS.match(text, i).end()
        if i >= len(text) or text[i] != ":":
            return None
        i = _WS.match(text, i + 1).end()
        try:
            _, end = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        spans[key] = (i, end)
        i = _WS.match(text, end).end()
        if i < len(text) and text[i] == ",":
            i = _WS.match(text, i + 1).end()
            continue
        if i < len(text) and text[i] == "}":
            return spans, i + 1
        return None


def call_from_object(text: str, start: int, argument_keys: tuple[str, ...]
                     ) -> Optional[tuple[ToolCall, int]]:
    """The call written as the JSON object at text[start]: a string "name" and an object under one
    of `argument_keys`; with the index past the object. None when the object is not such a call."""
    found = object_members(text, start)
    if found is None:
        return None
    spans, end = found
    key = next((k for k in argument_keys if k in spans), None)
    if "name" not in spans or key is None:
        return None
    name = json.loads(text[slice(*spans["name"])])
    raw = text[slice(*spans[key])]
    if not isinstance(name, str) or not name or not isinstance(json.loads(raw), dict):
        return None
    return ToolCall(name, raw), end


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (text that may yet become it)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class JsonValueScanner:
    """Finds where one JSON object or array ends in text fed piece by piece: it follows strings,
    escapes and bracket depth only (validity is json.loads' job once the value is whole)."""

    def __init__(self):
        self.depth, self.in_string, self.escaped, self.done = 0, False, False, False

    def feed(self, text: str) -> int:
        """How many characters of `text` belong to the value (all of them until it closes)."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


def arguments_as_objects(messages: list[dict]) -> list[dict]:
    """Messages for a chat template: an assistant turn's call arguments given as JSON text (OpenAI's
    layout) become the objects they encode, as transformers' templates expect; others pass as they are."""
    out = []
    for msg in messages:
        calls = msg.get("tool_calls") if isinstance(msg, dict) else None
        if isinstance(calls, list):
            msg = {**msg, "tool_calls": [_decoded(c) for c in calls]}
        out.append(msg)
    return out


def _decoded(call):
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**fn, "arguments": args}} if isinstance(args, dict) else call
