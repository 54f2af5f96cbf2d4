"""The HTTP server: OpenAI-compatible endpoints (FastAPI) over one `AsyncEngine`.

    POST /v1/completions        prompt (text, texts, token ids) -> text_completion
    POST /v1/chat/completions   messages -> the checkpoint's chat template -> chat.completion
    GET  /v1/models, /health, /metrics (Prometheus text format)
    GET  /                      the chat page (serve/page.py; web=False leaves it out)

A request's choices run as engine requests (n choices of p prompts: p * n, choice p * n + j).
Streaming sends one server-sent event per engine step that produced text, as it is produced; a client
that disconnects -- mid-stream or while waiting for a whole response -- has its requests aborted, which
frees their KV blocks at once. Errors are {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from tinyinfer.config.errors import RequestError
from tinyinfer.engine.llm_engine import LLMEngine
from tinyinfer.loading.chat import ChatTemplateError, apply_chat_template
from tinyinfer.sampling.params import SamplingParams
from tinyinfer.serve.async_engine import AsyncEngine, RequestStream
from tinyinfer.serve.metrics import CONTENT_TYPE
from tinyinfer.serve.page import add_page
from tinyinfer.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, _Common,
                                      parse)
from tinyinfer.serve.responses import ChatFormat, Choice, CompletionFormat, Formatter, TokenTexts, sse

_DISCONNECT_POLL_S = 0.25


def build_app(engine: LLMEngine, model_name: str, api_key: Optional[str] = None,
              web: bool = True) -> FastAPI:
    """The app; its lifespan starts the engine thread and, at shutdown, stops it."""
    runner = AsyncEngine(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="tinyinfer", lifespan=lifespan)
    app.state.engine = runner
    tok = engine.tokenizer
    token_texts = TokenTexts(tok)
    context = min(engine.config.max_context, engine.kv_tokens)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(err.status_code, str(err.detail), None, None, kind).body(),
                            status_code=err.status_code)

    async def check_key(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", "authentication_error")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok" if runner.alive else "engine stopped"},
                            status_code=200 if runner.alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(runner.metrics.render(), media_type=CONTENT_TYPE)

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "tinyinfer", "max_model_len": context}]}

    def check_model(req: _Common) -> None:
        if req.model is not None and req.model != model_name:
            raise APIError(400, f"model {req.model!r} is not served here; this server serves "
                           f"{model_name!r} (GET /v1/models)", "model", "model_not_found")

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await request.body())
        check_model(req)
        prompts = []
        for p in req.prompts():
            if isinstance(p, str):
                p = tok.encode(p)
            prompts.append(p)
        params = req.sampling_params(16 if req.max_tokens is None else req.max_tokens, req.logprobs)
        fmt = CompletionFormat(f"cmpl-{uuid.uuid4().hex}", model_name, token_texts,
                               req.logprobs is not None)
        return await serve(request, req, prompts, params, fmt, "prompt")

    @v1.post("/chat/completions")
    async def chat(request: Request) -> Response:
        req = parse(ChatCompletionRequest, await request.body())
        check_model(req)
        messages = [m.for_template(i) for i, m in enumerate(req.messages)]
        try:
            ids = apply_chat_template(tok, messages, tools=req.tools, documents=req.documents,
                                      **(req.chat_template_kwargs or {}))
        except ChatTemplateError as err:
            raise APIError(400, str(err), "messages", "chat_template") from err
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:                      # as much as the context and the KV pool leave
            max_tokens = context - len(ids)
            if max_tokens < 1:
                raise APIError(400, f"the conversation is {len(ids)} tokens: it fills the model's "
                               f"context of {context} tokens; shorten it", "messages", "context_length_exceeded")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = req.sampling_params(max_tokens, logprobs)
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", model_name, token_texts, req.logprobs)
        return await serve(request, req, [ids], params, fmt, "messages")

    async def serve(request: Request, req: _Common, prompts: list[list[int]],
                    params: list[SamplingParams], fmt: Formatter, prompt_field: str) -> Response:
        flat = [(p, sp) for p in prompts for sp in params]
        try:
            stream = await runner.add([p for p, _ in flat], [sp for _, sp in flat])
        except RequestError as err:             # the field at fault, else the prompt
            raise APIError(400, str(err).replace("SamplingParams.", ""), err.field or prompt_field,
                           "invalid_request") from err
        except Exception as err:                    # shutting down, or a bug adding the request
            raise APIError(503 if not runner.alive else 500, f"{type(err).__name__}: {err}", None,
                           None, "unavailable" if not runner.alive else "internal_error") from err
        choices = [Choice(i) for i in range(len(flat))]
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(stream_events(stream, choices, fmt, prompt_tokens, include_usage),
                                     media_type="text/event-stream")
        return await whole_response(request, stream, choices, fmt, prompt_tokens)

    app.include_router(v1)
    if web:
        add_page(app, chat_template=tok.chat_template is not None, api_key_required=api_key is not None)
    return app


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
