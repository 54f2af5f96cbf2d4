"""Streaming and whole responses: the deltas of a request's engine requests become server-sent events
(one per engine step that produced text), or one JSON response once all are done. A client that goes
away -- mid-stream, or while it waits for a whole response -- has its requests aborted, which frees
their KV blocks at once.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tinyinfer.serve.async_engine import RequestStream
from tinyinfer.serve.protocol import APIError
from tinyinfer.serve.responses import Choice, Formatter, sse

_DISCONNECT_POLL_S = 0.25


def _apply(c: Choice, delta) -> tuple[str, list]:
    """Fold one delta into its choice; returns its new text and logprobs."""
    lps = delta.new_logprobs or []
    c.text += delta.new_text
    c.num_tokens += len(delta.new_token_ids)
    c.logprobs += lps
    if delta.finished:
        c.finish_reason = delta.finish_reason
    return delta.new_text, lps


def _engine_error(delta) -> APIError:
    return APIError(500, str(delta.error or "the request failed in the engine"), None, "engine_error",
                    "internal_error")


async def stream_events(stream: RequestStream, choices: list[Choice], fmt: Formatter,
                        prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    try:
        if fmt.chat:
            yield "".join(sse(fmt.role_chunk(c.index)) for c in choices)
        failed = False
        while stream.unfinished and not failed:
            events = []
            for index, delta in await stream.next_batch():
                c = choices[index]
                offset = len(c.text)
                text, lps = _apply(c, delta)
                if delta.finish_reason == "error":
                    events.append(sse(_engine_error(delta).body()))
                    failed = True
                    break
                if text or lps or delta.finished:
                    events.append(sse(fmt.chunk(c, text, lps, offset)))
            if events:
                yield "".join(events)
        if include_usage and not failed:
            yield sse(fmt.usage_chunk(fmt.usage(prompt_tokens, sum(c.num_tokens for c in choices))))
        yield sse("[DONE]")
    finally:                                        # disconnect (cancelled) or error: abort the rest
        stream.close()


async def whole_response(request: Request, stream: RequestStream, choices: list[Choice],
                         fmt: Formatter, prompt_tokens: int) -> Response:
    async def collect() -> Optional[APIError]:
        while stream.unfinished:
            for index, delta in await stream.next_batch():
                _apply(choices[index], delta)
                if delta.finish_reason == "error":
                    return _engine_error(delta)
        return None

    task = asyncio.ensure_future(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                task.cancel()
                return Response(status_code=499)    # nobody reads it; the requests are aborted below
        error = task.result()
        if error is not None:
            raise error
        usage = fmt.usage(prompt_tokens, sum(c.num_tokens for c in choices))
        return JSONResponse(fmt.response(choices, usage))
    finally:
        task.cancel()
        stream.close()
