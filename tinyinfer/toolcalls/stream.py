"""Tool calls parsed from a reply as it streams: each feed of new text gives the content that is safe
to send and `tool_calls` deltas (OpenAI's streaming layout: a call's index, id and name first, then its
arguments in pieces as the model writes them).

The reader is a small state machine over the text so far:
    content -> (open tag, or "{" at the start for llama3_json) -> head -> args -> tail -> content / sep
- content: text before a possible tag is sent; the end that may still become a tag is held back, and
  so is whitespace at the end (sent only when more text follows), so the joined content equals the
  non-streamed content (which is stripped).
- head: the call's JSON up to its arguments object; once `{"name": "...", "arguments": {` is there,
  the call's start goes out. A call written in another key order waits for its end and goes out whole.
- args: the arguments object, sent as it arrives; its end is found by bracket depth (calls.py).
- tail: the rest of the call's object, then the close tag (hermes) or ";" / the end (llama3_json).
At the end, whatever is held is settled against the format's non-streamed parse, so for any split of
a well-formed reply the deltas join to the same calls and content. A call already started that turns
out malformed (invalid JSON, cut off by max_tokens) stays as far as it was sent, as OpenAI's own
stream does when a call is cut off.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from tinyinfer.toolcalls.calls import JsonValueScanner, ToolCall, partial_suffix
from tinyinfer.toolcalls.formats import ToolCallFormat

_NAME = r'"name"\s*:\s*("(?:[^"\\]|\\.)*")'
_WS = re.compile(r"\s*")


@dataclass
class StreamDelta:
    """What one feed adds: content text and tool_calls delta entries (at most one per call)."""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def call_entry(self, index: int) -> dict:
        for entry in self.tool_calls:
            if entry["index"] == index:
                return entry
        entry = {"index": index, "function": {}}
        self.tool_calls.append(entry)
        return entry


class ToolCallStream:
    """Feed a reply's text piece by piece (`feed`), then `finish()`; `calls` are the calls sent."""

    def __init__(self, fmt: ToolCallFormat):
        self.fmt = fmt
        keys = "|".join(fmt.argument_keys)
        self.head = re.compile(r'\s*\{\s*' + _NAME + r'\s*,\s*"(?:' + keys + r')"\s*:\s*(?=\{)')
        self.text, self.pos, self.mode = "", 0, "content"
        self.call_start = 0                 # where the current call's JSON (or tag body) begins
        self.scanner = JsonValueScanner()
        self.content, self.held_ws = "", ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> StreamDelta:
        self.text += text
        out = StreamDelta()
        for _ in range(3 * len(self.text) + 4):     # a pass consumes text, or moves to a mode that will
            if not self._step(out):
                break
        return out

    def _step(self, out: StreamDelta) -> bool:
        rest = self.text[self.pos:]
        fmt = self.fmt
        if self.mode == "content" and fmt.open_tag is None:     # llama3_json: a call starts the reply
            if len(rest.strip()) < 1 or fmt.python_tag.startswith(rest.strip()):
                return False                            # not yet known
            start = fmt.body_start(rest)
            self.mode = "text" if start is None else "head"
            self.call_start = self.pos + (start or 0)
            return True
        if self.mode in ("content", "text"):
            i = -1 if self.mode == "text" else rest.find(fmt.open_tag)
            if i < 0:
                keep = 0 if self.mode == "text" else partial_suffix(rest, fmt.open_tag)
                self._content(out, rest[:len(rest) - keep])
                self.pos += len(rest) - keep
                return False
            self._content(out, rest[:i])
            self.pos = self.call_start = self.pos + i + len(fmt.open_tag)
            self.mode = "head"
            return True
        if self.mode == "head":
            return self._head(out)
        if self.mode == "args":
            n = self.scanner.feed(rest)
            self._arguments(out, rest[:n])
            self.pos += n
            if self.scanner.done:                   # the outer object's rest: depth 1 again
                self.mode, self.scanner = "tail", JsonValueScanner()
                self.scanner.depth = 1
            return n > 0
        if self.mode == "tail":
            if not self.scanner.done:
                self.pos += self.scanner.feed(rest)
                return self.scanner.done
            return self._after_call(rest)
        if self.mode == "sep":
            return self._sep_step()
        return False

    def _head(self, out: StreamDelta) -> bool:
        body = self.text[self.call_start:]
        m = self.head.match(body)
        if m is not None:
            self._start(out, ToolCall(json.loads(m.group(1)), ""))
            self.pos, self.mode, self.scanner = self.call_start + m.end(), "args", JsonValueScanner()
            return True
        if self.fmt.close_tag is not None:          # another key order: the whole block at its close
            j = body.find(self.fmt.close_tag)
            if j < 0:
                return False
            call = self.fmt.block(body[:j])
            if call is None:
                self._content(out, self.fmt.open_tag + body[:j + len(self.fmt.close_tag)])
            else:
                self._whole(out, call)
            self.pos, self.mode = self.call_start + j + len(self.fmt.close_tag), "content"
            return True
        scanner = JsonValueScanner()
        n = scanner.feed(body)
        if not scanner.done:
            return False
        found = self.fmt.call_in(body[:n])
        if found is None:                           # not a call: it and the rest are content
            self.mode = "text"
            return True
        self._whole(out, found[0])
        self.pos, self.mode = self.call_start + n, "sep"
        return True

    def _after_call(self, rest: str) -> bool:
        if self.fmt.close_tag is not None:
            j = rest.find(self.fmt.close_tag)
            if j < 0:
                return False
            self.pos, self.mode = self.pos + j + len(self.fmt.close_tag), "content"
            return True
        self.mode = "sep"
        return True

    def _sep_step(self) -> bool:
        rest = self.text[self.pos:]
        i = _WS.match(rest).end()
        if rest.startswith(";", i):
            i = _WS.match(rest, i + 1).end()
        if i == len(rest):
            return False
        self.pos = self.call_start = self.pos + i
        self.mode = "head" if rest[i] == "{" else "text"
        return True

    def _start(self, out: StreamDelta, call: ToolCall) -> None:
        self.calls.append(call)
        entry = out.call_entry(len(self.calls) - 1)
        entry.update(id=call.id, type="function")
        entry["function"].update(name=call.name, arguments="")

    def _arguments(self, out: StreamDelta, text: str) -> None:
        self._arguments_at(out, len(self.calls) - 1, text)

    def _whole(self, out: StreamDelta, call: ToolCall) -> None:
        args, call.arguments = call.arguments, ""
        self._start(out, call)
        self._arguments(out, args)

    def _content(self, out: StreamDelta, text: str) -> None:
        text = self.held_ws + (text if self.content else text.lstrip())
        kept = text.rstrip()
        self.held_ws = text[len(kept):]
        self.content += kept
        out.content += kept

    def finish(self) -> StreamDelta:
        """The held text settled against the whole reply's parse; call once, after the last feed."""
        out = StreamDelta()
        expected = self.fmt.parse(self.text)
        sent = self.calls
        if len(sent) > len(expected.calls) or any(
                s.name != e.name or not e.arguments.startswith(s.arguments)
                for s, e in zip(sent, expected.calls)):
            return out                              # a started call did not hold: leave it as sent
        for i, e in enumerate(expected.calls):
            if i < len(sent):
                self._arguments_at(out, i, e.arguments[len(sent[i].arguments):])
            else:
                self._whole(out, ToolCall(e.name, e.arguments, e.id))
        content = expected.content or ""
        if content.startswith(self.content):
            out.content += content[len(self.content):]
            self.content = content
        return out

    def _arguments_at(self, out: StreamDelta, index: int, text: str) -> None:
        if text:
            self.calls[index].arguments += text
            fn = out.call_entry(index)["function"]
            fn["arguments"] = fn.get("arguments", "") + text
