"""Chat responses with tool calls parsed from the reply (toolcalls/): `message.tool_calls` and
`finish_reason: "tool_calls"` in a whole response, `delta.tool_calls` in a stream (a call's index, id
and name first, then its arguments in pieces), never the format's markup as content.

Used for a request whose tool_choice is not "none" (docs/tool-calls.md). A reply that calls nothing is
an ordinary one (content, finish_reason as the engine says); one cut off by max_tokens keeps
finish_reason "length".
"""
from __future__ import annotations

from dataclasses import replace

from tinyinfer.sampling.params import SamplingParams
from tinyinfer.sampling.processors import Logprobs
from tinyinfer.serve.protocol import APIError
from tinyinfer.serve.responses import ChatFormat, Choice, TokenTexts, dumps
from tinyinfer.serve.structured import compile_structured, structured_output
from tinyinfer.toolcalls import FORMATS, StreamDelta, ToolCallFormat, ToolCallStream
from tinyinfer.toolcalls.forcing import forced_output


async def tool_params(server, req, params: list[SamplingParams]) -> list[SamplingParams]:
    """The sampling parameters of a chat request that may call tools (`server`: serve/app.py's Server,
    `req` its ChatCompletionRequest): for "required" or a named function, constrained to one valid
    call (toolcalls/forcing.py), compiled off the loop first. A 400 when calls cannot be parsed, when
    response_format / structured_outputs would constrain the same reply, or when the call's grammar
    does not compile (a tool's parameters that llguidance cannot take)."""
    asked, fmt = req.tool_request, server.tool_format
    if fmt is None:
        raise APIError(400, f"tool_choice={asked.choice!r}: this model's chat template names no tool-call "
                       f"format, so calls cannot be parsed; start the server with --tool-call-parser "
                       f"({' or '.join(FORMATS)}), or send tool_choice 'none' (the tools are shown to "
                       "the model, nothing is parsed)", "tool_choice", "no_tool_parser")
    if asked.choice not in ("required", "named"):
        return params
    if structured_output(req.response_format, req.structured_outputs) is not None:
        raise APIError(400, f"tool_choice={req.tool_choice!r} constrains the reply to a call; it cannot "
                       "also follow response_format / structured_outputs: send one of them",
                       "tool_choice", "invalid_value")
    forced = forced_output(fmt, asked.tools, asked.name)
    try:
        await compile_structured(server, forced, "structured_outputs")
    except APIError as err:
        raise APIError(400, f"tools: the call's grammar does not compile: {err.message}", "tools",
                       "invalid_value") from None
    return [replace(sp, structured=forced) for sp in params]


def _finish_reason(reason, called: bool):
    return "tool_calls" if called and reason == "stop" else reason


class ToolChatFormat(ChatFormat):
    def __init__(self, request_id: str, model: str, token_texts: TokenTexts, with_logprobs: bool,
                 fmt: ToolCallFormat):
        super().__init__(request_id, model, token_texts, with_logprobs)
        self.fmt = fmt
        self.streams: dict[int, ToolCallStream] = {}

    def chunk(self, c: Choice, text: str, lps: list[Logprobs], offset: int) -> str:
        stream = self.streams.setdefault(c.index, ToolCallStream(self.fmt))
        d = stream.feed(text)
        if c.finish_reason is not None:
            d = merge(d, stream.finish())
        delta: dict = {}
        if d.content or (c.finish_reason is None and not d.tool_calls):
            delta["content"] = d.content
        if d.tool_calls:
            delta["tool_calls"] = d.tool_calls
        finish = _finish_reason(c.finish_reason, bool(stream.calls))
        return (f'{self.chunk_head}{{"index":{c.index},"delta":{dumps(delta)},"logprobs":'
                f'{dumps(self.logprobs(lps))},"finish_reason":{dumps(finish)}}}]}}')

    def response(self, choices: list[Choice], usage: dict) -> dict:
        out = []
        for c in choices:
            parsed = self.fmt.parse(c.text)
            message = {"role": "assistant", "content": parsed.content}
            if parsed.calls:
                message["tool_calls"] = [call.to_openai() for call in parsed.calls]
            out.append({"index": c.index, "message": message, "logprobs": self.logprobs(c.logprobs),
                        "finish_reason": _finish_reason(c.finish_reason, bool(parsed.calls))})
        return self._envelope("chat.completion", out, usage=usage)


def merge(a: StreamDelta, b: StreamDelta) -> StreamDelta:
    """Two deltas of one stream as one (the last feed and the finish of a reply)."""
    out = StreamDelta(a.content + b.content, [dict(e, function=dict(e["function"])) for e in a.tool_calls])
    for e in b.tool_calls:
        entry = out.call_entry(e["index"])
        args = entry["function"].get("arguments", "") + e["function"].get("arguments", "")
        entry.update({k: v for k, v in e.items() if k != "function"})
        entry["function"].update(e["function"], arguments=args)
    return out
