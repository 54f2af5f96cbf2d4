"""The HTTP server: OpenAI-compatible endpoints (FastAPI) over one `AsyncEngine`.

    POST /v1/completions        prompt (text, texts, token ids) -> text_completion
    POST /v1/chat/completions   messages -> the checkpoint's chat template -> chat.completion
    GET  /v1/models, /health, /metrics (Prometheus text format)
    GET  /                      the chat page (serve/page.py; web=False leaves it out)

A request's choices run as engine requests (n choices of p prompts: p * n, choice p * n + j).
Errors are {"error": {"message", "type", "param", "code"}} (400, 401, 413, 503).

The event loop does no unbounded work (docs/concurrency.md): the body is read against
--max-request-bytes, its JSON counted (serve/limits.py), then parsing and tokenization run on a small
thread pool and chat templates in worker processes with a deadline (serve/templates.py). Each handler
is a plain function that finds the server's state (`Server`) on `request.app.state.server`.
"""
from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from tinyinfer.engine.grammar import Grammars
from tinyinfer.engine.llm_engine import LLMEngine
from tinyinfer.config.errors import RequestError
from tinyinfer.loading.chat import ChatTemplateError, choose_template
from tinyinfer.loading.tokenizer import Tokenizer
from tinyinfer.sampling.params import SamplingParams
from tinyinfer.serve.async_engine import AsyncEngine
from tinyinfer.serve.limits import Limits, PromptBound, check_json_size, read_body
from tinyinfer.serve.metrics import CONTENT_TYPE
from tinyinfer.serve.page import add_page
from tinyinfer.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, OpenAIRequest,
                                      parse)
from tinyinfer.serve.responses import ChatFormat, Choice, CompletionFormat, Formatter, TokenTexts
from tinyinfer.serve.streaming import stream_events, whole_response
from tinyinfer.serve.structured import api_field, compile_structured, structured_output
from tinyinfer.serve.templates import TemplateRenderer
from tinyinfer.serve.tool_responses import tool_params, ToolChatFormat
from tinyinfer.toolcalls import ToolCallFormat, detect_format, get_format


@dataclass
class Server:
    """What the handlers share: the engine thread, the tokenizer, the bounds, the off-loop workers."""
    runner: AsyncEngine
    tokenizer: Tokenizer
    token_texts: TokenTexts
    model_name: str
    api_key: Optional[str]
    context: int                    # tokens a prompt + its output may take: the model's and the pool's
    limits: Limits
    prompt_bound: PromptBound
    prep: ThreadPoolExecutor        # parsing and tokenization (the tokenizers release the GIL)
    render: ThreadPoolExecutor      # waits on the template workers, so a slow template blocks no prep
    templates: TemplateRenderer
    tool_format: Optional[ToolCallFormat] = None    # how tool calls are parsed (None: not at all)
    grammars: Optional[Grammars] = None              # the engine's compiled-grammar cache
    grammar_pool: Optional[ThreadPoolExecutor] = None  # compiles schemas / grammars off the loop

    async def off_loop(self, pool: ThreadPoolExecutor, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


def build_app(engine: LLMEngine, model_name: str, api_key: Optional[str] = None,
              limits: Limits = Limits(), web: bool = True, tool_call_parser: Optional[str] = None
              ) -> FastAPI:
    """The app; its lifespan starts the engine thread and, at shutdown, stops it and the workers.
    tool_call_parser: the format of tool calls (toolcalls/formats.py; default: the chat template's)."""
    context = min(engine.config.max_context, engine.kv_tokens)
    templates = 2
    server = Server(AsyncEngine(engine), engine.tokenizer, TokenTexts(engine.tokenizer), model_name,
                    api_key, context, limits.check(), PromptBound(engine.tokenizer, context),
                    ThreadPoolExecutor(2, thread_name_prefix="tinyinfer-prep"),
                    ThreadPoolExecutor(templates, thread_name_prefix="tinyinfer-render"),
                    TemplateRenderer(templates, limits.template_timeout_s))
    tool_template = engine.tokenizer.chat_templates.get("tool_use", engine.tokenizer.chat_template)
    name = tool_call_parser or detect_format(tool_template)
    server.tool_format = None if name is None else get_format(name)
    server.grammars = engine.grammars
    server.grammar_pool = ThreadPoolExecutor(1, thread_name_prefix="tinyinfer-grammar-compile")
    app = FastAPI(title="tinyinfer", lifespan=lifespan)
    app.state.server = server
    app.state.engine = server.runner
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])
    v1.add_api_route("/models", models, methods=["GET"])
    v1.add_api_route("/completions", completions, methods=["POST"])
    v1.add_api_route("/chat/completions", chat, methods=["POST"])
    app.include_router(v1)
    if web:
        add_page(app, chat_template=engine.tokenizer.chat_template is not None,
                 api_key_required=api_key is not None)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI):
    server: Server = app.state.server
    server.runner.start()
    try:
        yield
    finally:
        server.runner.stop()
        server.templates.close()
        server.prep.shutdown(wait=False, cancel_futures=True)
        server.render.shutdown(wait=False, cancel_futures=True)
        server.grammar_pool.shutdown(wait=False, cancel_futures=True)


def state(request: Request) -> Server:
    return request.app.state.server


async def api_error(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def http_error(request: Request, err: HTTPException) -> JSONResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(APIError(err.status_code, str(err.detail), None, None, kind).body(),
                        status_code=err.status_code)


async def check_key(request: Request) -> None:
    key = state(request).api_key
    if key is not None and request.headers.get("authorization") != f"Bearer {key}":
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                       "invalid_api_key", "authentication_error")


async def health(request: Request) -> Response:
    """200 while a request can be served; 503 naming why not (shutting down, the engine thread
    gone, a tensor-parallel worker lost)."""
    failure = state(request).runner.failure()
    if failure is None:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable", "reason": failure}, status_code=503)


async def metrics(request: Request) -> Response:
    return Response(state(request).runner.metrics.render(), media_type=CONTENT_TYPE)


async def models(request: Request) -> dict:
    s = state(request)
    return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": 0,
                                        "owned_by": "tinyinfer", "max_model_len": s.context}]}


async def read_request(request: Request, model: type[OpenAIRequest]) -> OpenAIRequest:
    """The body read against the byte limit, counted, then parsed off the loop; the model checked."""
    s = state(request)
    body = await read_body(request, s.limits.max_request_bytes)
    req = await s.off_loop(s.prep, _parse, model, body, s.limits)
    if req.model is not None and req.model != s.model_name:
        raise APIError(400, f"model {req.model!r} is not served here; this server serves "
                       f"{s.model_name!r} (GET /v1/models)", "model", "model_not_found")
    return req


def _parse(model: type[OpenAIRequest], body: bytes, limits: Limits) -> OpenAIRequest:
    check_json_size(body, limits.max_json_values, limits.max_json_containers)
    return parse(model, body)


def check_sequences(s: Server, num_prompts: int, n: int) -> None:
    if num_prompts * n > s.limits.max_seqs_per_request:
        raise APIError(400, f"{num_prompts} prompt(s) x n={n} is {num_prompts * n} sequences; this "
                       f"server runs at most {s.limits.max_seqs_per_request} per request "
                       "(--max-seqs-per-request): split the request", "n" if n > 1 else "prompt",
                       "too_many_sequences")


def tokenize(s: Server, prompts: list[Union[str, list[int]]]) -> list[list[int]]:
    """Text prompts as token ids (ids pass through); run on the prep pool."""
    for p in prompts:
        if isinstance(p, str):
            s.prompt_bound.check(p, "prompt")
    return [s.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]


async def completions(request: Request) -> Response:
    s = state(request)
    req = await read_request(request, CompletionRequest)
    prompts = req.prompts()
    check_sequences(s, len(prompts), req.n)
    ids = await s.off_loop(s.prep, tokenize, s, prompts)
    params = req.sampling_params(16 if req.max_tokens is None else req.max_tokens, req.logprobs)
    fmt = CompletionFormat(f"cmpl-{uuid.uuid4().hex}", s.model_name, s.token_texts,
                           req.logprobs is not None)
    return await serve(request, req, ids, params, fmt, "prompt")


async def chat(request: Request) -> Response:
    s = state(request)
    req = await read_request(request, ChatCompletionRequest)
    if len(req.messages) > s.limits.max_messages:
        raise APIError(400, f"{len(req.messages)} messages; this server takes at most "
                       f"{s.limits.max_messages} per conversation", "messages", "too_many_messages")
    check_sequences(s, 1, req.n)
    messages = [m.for_template(i) for i, m in enumerate(req.messages)]
    try:
        template = choose_template(s.tokenizer, None, req.tools)
        max_chars = s.prompt_bound.max_chars or s.limits.max_request_bytes
        text = await s.off_loop(s.render, lambda: s.templates.render(
            template, messages, max_chars, tools=req.tools, documents=req.documents,
            special_tokens=s.tokenizer.special_tokens, template_kwargs=req.chat_template_kwargs))
    except ChatTemplateError as err:
        raise APIError(400, str(err), "messages", "chat_template") from err
    ids = await s.off_loop(s.prep, lambda: s.tokenizer.encode(text, add_bos=False))
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:                      # as much as the context and the KV pool leave
        max_tokens = s.context - len(ids)
        if max_tokens < 1:
            raise APIError(400, f"the conversation is {len(ids)} tokens: it fills the model's context "
                           f"of {s.context} tokens; shorten it", "messages", "context_length_exceeded")
    params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", s.model_name, s.token_texts, req.logprobs)
    if req.tool_request.choice != "none":       # tool calls parsed from the reply (serve/tool_responses.py)
        params = await tool_params(s, req, params)
        fmt = ToolChatFormat(fmt.id, s.model_name, s.token_texts, req.logprobs, s.tool_format)
    return await serve(request, req, [ids], params, fmt, "messages")


async def serve(request: Request, req: OpenAIRequest, prompts: list[list[int]],
                params: list[SamplingParams], fmt: Formatter, prompt_field: str) -> Response:
    """Add every (prompt, choice) to the engine, then stream or collect their deltas."""
    runner = state(request).runner
    so = structured_output(req.response_format, req.structured_outputs)
    if so is not None:                          # compiled off the loop first: a bad one is a 400
        await compile_structured(state(request), so, "structured_outputs" if req.structured_outputs
                                 is not None else "response_format")
        for sp in params:
            sp.structured = so
    flat = [(p, sp) for p in prompts for sp in params]
    try:
        stream = await runner.add([p for p, _ in flat], [sp for _, sp in flat])
    except RequestError as err:                 # the field at fault, else the prompt
        field = err.field or prompt_field
        if field.startswith("structured"):      # as the request named it
            field = api_field("structured_outputs" if req.structured_outputs is not None
                              else "response_format", field)
        raise req.invalid(str(err).replace("SamplingParams.", ""), field, "invalid_request") from err
    except Exception as err:                    # shutting down, a broken engine, or a bug
        failure = runner.failure()
        raise APIError(503 if failure else 500, f"{failure or type(err).__name__}: {err}", None,
                       None, "unavailable" if failure else "internal_error") from err
    choices = [Choice(i) for i in range(len(flat))]
    prompt_tokens = sum(len(p) for p in prompts)
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(stream_events(stream, choices, fmt, prompt_tokens, include_usage),
                                 media_type="text/event-stream")
    return await whole_response(request, stream, choices, fmt, prompt_tokens)
