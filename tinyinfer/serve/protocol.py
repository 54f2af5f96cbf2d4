"""The OpenAI request schema (completions and chat completions, https://platform.openai.com/docs/api-reference),
validated with pydantic in strict mode: a wrong type is refused, never coerced ("0.5" is not a number).

Fields are in three groups. Supported: the sampling fields, `n`, `stream` (+ `stream_options`),
`logprobs`, and vLLM's extras `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`,
`stop_token_ids` (benchmarks need fixed output lengths), and structured output: `response_format` and
vLLM's `structured_outputs` (serve/structured.py). Accepted and ignored because they cannot change
the output: `user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`. Accepted only at their
no-op value (else refused by name): `presence_penalty`, `frequency_penalty`, `logit_bias`, `echo`,
`suffix`, `best_of`. Anything else is refused by name. Chat's `tools`, `tool_choice` and the messages
that carry tool calls are checked by serve/tool_protocol.py.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from tinyinfer.config.errors import InvalidParam

from tinyinfer.sampling.params import SEED_RANGE, SamplingParams
from tinyinfer.serve.tool_protocol import ToolFieldError, ToolRequest, check_tools, template_message

MAX_N = 64
MAX_STOP_STRINGS = 16       # OpenAI allows 4; each costs the engine thread a KMP step per new character
MAX_STOP_CHARS = 1000
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
# Names apply_chat_template takes itself: extra template variables may not override them.
_TEMPLATE_ARGUMENTS = {"messages", "tools", "documents", "add_generation_prompt", "template",
                       "special_tokens", "tokenizer", "max_chars"}


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class OpenAIRequest(_Strict):
    """The fields completions and chat completions share."""
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None                     # vLLM: -1 or 0 = off
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    response_format: Optional[dict[str, Any]] = None        # serve/structured.py
    structured_outputs: Optional[dict[str, Any]] = None     # vLLM's: json / regex / choice / grammar
    # ignored: no effect on what is generated
    user: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    # accepted only at their no-op values (check_noops)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None

    def check_noops(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise unsupported(name, getattr(self, name), "tinyinfer has no presence/frequency "
                                  "penalty; use repetition_penalty")
        if self.logit_bias:
            raise unsupported("logit_bias", self.logit_bias, "logit biases are not implemented")
        if not 1 <= self.n <= MAX_N:
            raise APIError(400, f"n={self.n} is invalid: use 1..{MAX_N}", "n", "invalid_value")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in stops):
            raise APIError(400, f"stop: {len(stops)} string(s) of up to {max(map(len, stops))} "
                           f"characters; this server takes at most {MAX_STOP_STRINGS} of at most "
                           f"{MAX_STOP_CHARS} characters each", "stop", "invalid_value")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", "stream_options",
                           "invalid_value")

    def sampling_params(self, max_tokens: int, logprobs: Optional[int]) -> list[SamplingParams]:
        """One SamplingParams per choice; choice i > 0 of a seeded request gets seed + i (wrapped
        around within 64 bits, so a seed that is valid stays valid for every choice)."""
        kw = dict(temperature=_or(self.temperature, 1.0), top_p=_or(self.top_p, 1.0),
                  top_k=0 if self.top_k in (None, -1) else self.top_k, min_p=_or(self.min_p, 0.0),
                  repetition_penalty=_or(self.repetition_penalty, 1.0), max_tokens=max_tokens,
                  stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                  min_tokens=self.min_tokens, logprobs=logprobs)
        try:
            return [SamplingParams(seed=None if self.seed is None else _choice_seed(self.seed, i), **kw)
                    for i in range(self.n)]
        except InvalidParam as err:                 # "SamplingParams.<field>=<value> is invalid: ..."
            raise self.invalid(str(err).replace("SamplingParams.", ""), err.field,
                               "invalid_value") from err

    def invalid(self, message: str, field: Optional[str], code: str) -> APIError:
        """A 400 about a SamplingParams field, named as this API names it."""
        return APIError(400, message, field, code)


class CompletionRequest(OpenAIRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def check_noops(self) -> None:
        super().check_noops()
        if self.echo:
            raise unsupported("echo", True, "the prompt is not returned with the completion")
        if self.suffix:
            raise unsupported("suffix", self.suffix, "insertion (fill in the middle) is not implemented")
        if self.best_of not in (None, self.n):
            raise unsupported("best_of", self.best_of, "use n")

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p or any(len(x) == 0 for x in p):
            raise APIError(400, "prompt is empty: give text or token ids", "prompt", "invalid_value")
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    # Extra keys (tool_calls, reasoning_content, ...) go to the template as they are.
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None

    def for_template(self, i: int) -> dict:
        msg = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            bad = next((p.type for p in self.content if p.type != "text" or p.text is None), None)
            if bad is not None:
                raise APIError(400, f"messages[{i}].content has a part of type {bad!r}; tinyinfer "
                               "takes text parts only", f"messages.{i}.content", "unsupported_content")
            msg["content"] = "\n".join(p.text for p in self.content)
        try:
            return template_message(msg, i)
        except ToolFieldError as err:
            raise APIError(400, str(err), err.field, "invalid_value") from err


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[dict[str, Any]]] = None    # rendered into the prompt by the chat template
    documents: Optional[list[dict[str, Any]]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    parallel_tool_calls: Optional[bool] = None      # ignored
    tool_choice: Union[str, dict[str, Any], None] = None
    _tools: Optional[ToolRequest] = PrivateAttr(None)

    @property
    def tool_request(self) -> ToolRequest:
        """tools and tool_choice as check_noops found them."""
        return self._tools

    def invalid(self, message: str, field: Optional[str], code: str) -> APIError:
        # The chat API's names: max_completion_tokens (when sent) and top_logprobs.
        names = {"logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        if field in names:
            message = message.replace(f"{field}=", f"{names[field]}=").replace(
                f"max_tokens {self.max_completion_tokens}", f"max_completion_tokens "
                f"{self.max_completion_tokens}")
            field = names[field]
        return APIError(400, message, field, code)

    def check_noops(self) -> None:
        super().check_noops()
        try:
            self._tools = check_tools(self.tools, self.tool_choice)
        except ToolFieldError as err:
            raise APIError(400, str(err), err.field, "invalid_value") from err
        if not self.messages:
            raise APIError(400, "messages is empty: give at least one message", "messages",
                           "invalid_value")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")
        taken = sorted(set(self.chat_template_kwargs or {}) & _TEMPLATE_ARGUMENTS)
        if taken:
            raise APIError(400, f"chat_template_kwargs may not set {taken}: the request's own fields "
                           "fill those", "chat_template_kwargs", "invalid_value")


def unsupported(name: str, value: Any, why: str) -> APIError:
    return APIError(400, f"{name}={value!r} is not supported: {why}", name, "unsupported_parameter")


def _choice_seed(seed: int, i: int) -> int:
    """seed + i, wrapped into [-2**63, 2**63) when seed is; any other seed is left for
    SamplingParams to refuse by name."""
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        return seed
    return (seed + i - SEED_RANGE[0]) % 2**64 + SEED_RANGE[0]


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def parse(model: type[OpenAIRequest], body: bytes) -> OpenAIRequest:
    """Validate a request body; any problem is an APIError naming the field."""
    try:
        req = model.model_validate_json(body)
    except ValidationError as err:
        errors = err.errors()
        e = errors[0]
        if e["type"] == "json_invalid":             # nesting past depth 200 included: no recursion
            raise APIError(400, f"the request body is not valid JSON: {e['msg']}", None,
                           "invalid_json") from err
        if e["type"] == "model_type":
            raise APIError(400, f"the request body must be a JSON object, got "
                           f"{type(e.get('input')).__name__}", None, "invalid_json") from err
        # Union members add their type to the location ("prompt", "str"); the field path is the rest.
        path = [str(p) for p in e["loc"] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
        param = ".".join(path)
        if e["type"] == "extra_forbidden":
            raise APIError(400, f"unknown field {param!r}: tinyinfer does not support it", param,
                           "unsupported_parameter") from err
        if e["type"] == "missing":
            raise APIError(400, f"{param} is required", param, "missing_field") from err
        union = len(errors) > 1 and all(x["loc"][:len(e["loc"]) - 1] == e["loc"][:-1] for x in errors)
        why = "has the wrong type" if union else e["msg"]
        raise APIError(400, f"{param}: {why} (got {e.get('input')!r:.60})", param,
                       "invalid_type") from err
    req.check_noops()
    return req
