"""Structured output on the server (docs/structured-output.md): a request's `response_format` (OpenAI:
`{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`) or
`structured_outputs` (vLLM's extra field: exactly one of `json`, `regex`, `choice`, `grammar`,
`json_object`) as a `StructuredOutput`, and its compilation off the event loop with a time limit
(`compile_structured`), into the engine's grammar cache, so the engine thread finds it compiled. Every
problem is a 400 naming the field as the request spelled it.
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from tinyinfer.config.errors import InvalidParam, RequestError
from tinyinfer.sampling.structured import StructuredOutput
from tinyinfer.serve.protocol import APIError

COMPILE_TIMEOUT_S = 10.0      # a schema or grammar that takes longer is refused (llguidance's own
                              # limits bound its work too; typical compiles take milliseconds)
_VLLM_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
              "json_object": "json_object"}


def _bad(field: str, message: str) -> APIError:
    return APIError(400, f"{field}: {message}", field, "invalid_value")


def from_response_format(rf: dict) -> Optional[StructuredOutput]:
    kind = rf.get("type")
    if kind == "text":
        extra = sorted(set(rf) - {"type"})
        if extra:
            raise _bad("response_format", f"unknown key(s) {extra} for type 'text'")
        return None
    if kind == "json_object":
        return StructuredOutput(json_object=True)
    if kind != "json_schema":
        raise _bad("response_format.type", f"{kind!r} is not one of 'text', 'json_object', 'json_schema'")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format.json_schema", "give an object {'name': ..., 'schema': {...}, "
                   "'strict': true}")
    unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if unknown:
        raise _bad("response_format.json_schema", f"unknown key(s) {unknown}")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise _bad("response_format.json_schema.name", "a non-empty string is required")
    if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
        raise _bad("response_format.json_schema.strict", "use true or false")
    if spec.get("schema") is None:               # OpenAI: no schema means any JSON object
        return StructuredOutput(json_object=True)
    return StructuredOutput(json_schema=spec["schema"])


def from_structured_outputs(so: dict) -> StructuredOutput:
    unknown = sorted(set(so) - set(_VLLM_KEYS))
    if unknown:
        raise _bad("structured_outputs", f"unknown key(s) {unknown}; tinyinfer takes one of "
                   f"{', '.join(_VLLM_KEYS)}")
    given = {k: v for k, v in so.items() if v is not None and v is not False}
    if len(given) != 1:
        raise _bad("structured_outputs", f"give exactly one of {', '.join(_VLLM_KEYS)}; got "
                   f"{len(given)} ({', '.join(given) or 'none'})")
    (key, value), = given.items()
    return StructuredOutput(**{_VLLM_KEYS[key]: value})


def structured_output(response_format: Optional[dict[str, Any]],
                      structured_outputs: Optional[dict[str, Any]]) -> Optional[StructuredOutput]:
    """The request's constraint (None: plain text); APIError 400 naming the field."""
    if response_format is not None and structured_outputs is not None \
            and response_format.get("type") != "text":
        raise _bad("structured_outputs", "give response_format or structured_outputs, not both")
    source = "structured_outputs" if structured_outputs is not None else "response_format"
    try:
        if structured_outputs is not None:
            return from_structured_outputs(structured_outputs)
        return None if response_format is None else from_response_format(response_format)
    except InvalidParam as err:
        raise _bad(api_field(source, err.field), str(err).replace("StructuredOutput.", "")) from None


def api_field(source: str, field: Optional[str]) -> str:
    """The request's name for a StructuredOutput field (structured.json_schema -> structured_outputs.json
    or response_format.json_schema.schema)."""
    kind = (field or "").rpartition(".")[2]
    if source == "response_format":
        return "response_format.json_schema.schema" if kind == "json_schema" else "response_format"
    back = {v: k for k, v in _VLLM_KEYS.items()}
    return f"structured_outputs.{back[kind]}" if kind in back else "structured_outputs"


async def compile_structured(server, so: StructuredOutput, source: str) -> None:
    """Compile on the server's grammar thread within COMPILE_TIMEOUT_S; the compiled grammar lands in
    the engine's cache. A constraint that cannot compile, or too slowly, is a 400 naming the field."""
    loop = asyncio.get_running_loop()
    job = loop.run_in_executor(server.grammar_pool, server.grammars.compile, so)
    try:
        await asyncio.wait_for(job, COMPILE_TIMEOUT_S)
    except asyncio.TimeoutError:
        field = api_field(source, f"structured.{so.kind}")
        raise _bad(field, f"took longer than {COMPILE_TIMEOUT_S:g} s to compile; simplify it") from None
    except RequestError as err:
        field = api_field(source, err.field)
        if err.field == "structured":            # llguidance missing: the server cannot do it at all
            raise APIError(400, str(err), field, "unsupported_parameter") from None
        raise _bad(field, str(err).replace(f"{err.field} ", "", 1)) from None
