"""The tool-call formats chat models are trained on, one parser each, and how to pick one.

- `hermes` (Hermes 2 Pro, Qwen 2.5 / 3): each call is `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`, several in a row allowed, text around them is the reply's content; a last call
  whose close tag is missing (the model stopped after the JSON) still counts.
- `llama3_json` (Llama 3.1 / 3.2 JSON tool calling): the whole reply is `{"name": ..., "parameters":
  {...}}` (after an optional `<|python_tag|>`), several separated by `;`; a reply that does not
  begin with such JSON is plain content, and so is what follows the last call.

Whatever does not parse (a tag that never closes, invalid JSON, no "name") stays content: a model's
malformed call is its text, never an error. The format is named by --tool-call-parser or detected from
the chat template's text (`detect_format`): the template tells the model which format to write.
"""
from __future__ import annotations

import re
from typing import Optional

from tinyinfer.toolcalls.calls import ParsedOutput, ToolCall, call_from_object

_WS = re.compile(r"\s*")


class ToolCallFormat:
    """A format: `parse` (a whole reply) and the pieces toolcalls/stream.py reads."""
    name: str
    argument_keys: tuple[str, ...]
    open_tag: Optional[str] = None      # a call begins with this tag (else: the reply begins with "{")
    close_tag: Optional[str] = None

    def parse(self, text: str) -> ParsedOutput:
        raise NotImplementedError

    def call_in(self, text: str, start: int = 0) -> Optional[tuple[ToolCall, int]]:
        """The call written as JSON at text[start:] (leading whitespace allowed), with its end."""
        return call_from_object(text, _WS.match(text, start).end(), self.argument_keys)


class Hermes(ToolCallFormat):
    name = "hermes"
    argument_keys = ("arguments", "parameters")
    open_tag, close_tag = "<tool_call>", "</tool_call>"

    def block(self, body: str) -> Optional[ToolCall]:
        """The call between a pair of tags, or None when the body is anything else."""
        found = self.call_in(body)
        return found[0] if found is not None and not body[found[1]:].strip() else None

    def parse(self, text: str) -> ParsedOutput:
        pieces, calls, pos = [], [], 0
        while True:
            i = text.find(self.open_tag, pos)
            if i < 0:
                pieces.append(text[pos:])
                break
            j = text.find(self.close_tag, i + len(self.open_tag))
            end = len(text) if j < 0 else j + len(self.close_tag)
            # A last call whose close tag never came still counts when its JSON is whole (the
            # model stopped right after it); a cut-off one is text.
            call = self.block(text[i + len(self.open_tag):len(text) if j < 0 else j])
            if call is None:
                pieces.append(text[pos:end])
            else:
                pieces.append(text[pos:i])
                calls.append(call)
            pos = end
        return ParsedOutput("".join(pieces).strip() or None, calls)


class Llama3Json(ToolCallFormat):
    name = "llama3_json"
    argument_keys = ("parameters", "arguments")
    python_tag = "<|python_tag|>"

    def body_start(self, text: str) -> Optional[int]:
        """Where the calls would begin (past whitespace and <|python_tag|>), if text starts with '{'."""
        i = _WS.match(text).end()
        if text.startswith(self.python_tag, i):
            i = _WS.match(text, i + len(self.python_tag)).end()
        return i if text.startswith("{", i) else None

    def parse(self, text: str) -> ParsedOutput:
        plain = ParsedOutput(text.strip() or None, [])
        i = self.body_start(text)
        if i is None:
            return plain
        calls = []
        while i < len(text):
            found = self.call_in(text, i)
            if found is None:                       # text after the calls is content
                return ParsedOutput(text[i:].strip() or None, calls) if calls else plain
            calls.append(found[0])
            i = _WS.match(text, found[1]).end()
            if text.startswith(";", i):
                i = _WS.match(text, i + 1).end()
        return ParsedOutput(None, calls)


FORMATS: dict[str, type[ToolCallFormat]] = {"hermes": Hermes, "llama3_json": Llama3Json}


def detect_format(template: Optional[str]) -> Optional[str]:
    """The format a chat template asks for: `<tool_call>` tags -> hermes; Llama 3's header markers
    with a template that renders tools -> llama3_json; else None (unknown: name one with
    --tool-call-parser)."""
    if not template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and "tools" in template):
        return "llama3_json"
    return None


def get_format(name: str) -> ToolCallFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown tool-call format {name!r}: use one of {sorted(FORMATS)}")
    return FORMATS[name]()
