"""`StructuredOutput`: what a request's output must match -- a JSON schema, any JSON object, a regular
expression, one of a list of strings, or a context-free grammar -- for constrained decoding (the next
token is drawn only among those the grammar allows at that point: Willard & Louf, "Efficient Guided
Generation for Large Language Models", 2023). Validated at construction (`InvalidParam` naming the
field) like `SamplingParams`; the grammar itself is compiled by the engine (through llguidance,
https://github.com/guidance-ai/llguidance), which reports a schema or grammar it cannot compile as a
`RequestError` for that request.

The grammar dialect is Lark, as llguidance reads it; a GBNF grammar (llama.cpp's EBNF, rules written `name ::= ...`) is accepted too and
converted to Lark by llguidance. Regular expressions follow Rust's `regex` syntax (llguidance's), which
for the common subset (classes, repetition, alternation, groups) is Python's too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

from tinyinfer.config.errors import InvalidParam

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 1 << 20          # 1 MiB of schema / grammar text: far beyond any real one


def _bad(field: str, value: object, want: str) -> InvalidParam:
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return InvalidParam(f"StructuredOutput.{field}={text} is invalid: {want}", f"structured.{field}")


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one of: `json_schema` (a dict, or its JSON text), `json_object=True` (any JSON object),
    `regex` (the whole output matches it), `choice` (the output is one of these strings), `grammar`
    (Lark, or GBNF with `::=`). Hashable by content (`key`), so compiled grammars can be cached."""

    json_schema: Optional[Union[dict, str]] = None
    json_object: bool = False
    regex: Optional[str] = None
    choice: Optional[Union[list, tuple]] = None
    grammar: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.json_object, bool):
            raise _bad("json_object", self.json_object, "use True or False")
        given = [k for k in KINDS if (self.json_object if k == "json_object" else getattr(self, k) is not None)]
        if len(given) != 1:
            raise InvalidParam(f"StructuredOutput needs exactly one of {', '.join(KINDS)}; got "
                               f"{len(given)} ({', '.join(given) or 'none'})", "structured")
        if self.json_schema is not None:
            object.__setattr__(self, "json_schema", _schema_text(self.json_schema))
        for name in ("regex", "grammar"):
            text = getattr(self, name)
            if text is not None and (not isinstance(text, str) or not text.strip()):
                raise _bad(name, text, "use a non-empty string")
            if isinstance(text, str) and len(text) > MAX_SPEC_CHARS:
                raise _bad(name, text, f"at most {MAX_SPEC_CHARS} characters")
        if self.choice is not None:
            c = self.choice
            if (not isinstance(c, (list, tuple)) or not c
                    or not all(isinstance(s, str) and s for s in c)):
                raise _bad("choice", c, "use a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(c))

    @property
    def kind(self) -> str:
        """Which constraint this is: one of KINDS."""
        return next(k for k in KINDS if (self.json_object if k == "json_object" else getattr(self, k) is not None))

    @property
    def schema(self) -> Optional[dict]:
        """The JSON schema as a dict (None unless kind is json_schema)."""
        return None if self.json_schema is None else json.loads(self.json_schema)

    @property
    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal for equal constraints (a schema's spacing does not matter; its
        key order does: properties are generated in the order the schema lists them)."""
        kind = self.kind
        if kind == "json_object":
            return kind, ""
        if kind == "choice":
            return kind, json.dumps(list(self.choice))
        return kind, getattr(self, kind)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StructuredOutput) and self.key == other.key


def _schema_text(schema: Any) -> str:
    # Kept as canonical JSON text (no spaces; key order kept, since properties are generated in the
    # schema's order): the dataclass stays immutable and hashable, and two spacings of one schema
    # share a compiled grammar.
    if isinstance(schema, str):
        if len(schema) > MAX_SPEC_CHARS:
            raise _bad("json_schema", schema, f"at most {MAX_SPEC_CHARS} characters")
        try:
            schema = json.loads(schema)
        except ValueError as err:
            raise _bad("json_schema", schema, f"not JSON ({err}); give a dict or its JSON text") from None
    if isinstance(schema, bool):
        raise _bad("json_schema", schema, "use a schema object; for any JSON object use json_object=True")
    if not isinstance(schema, dict):
        raise _bad("json_schema", schema, "use a JSON schema: a dict (or its JSON text) such as "
                   "{'type': 'object', 'properties': {...}}")
    try:
        text = json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise _bad("json_schema", schema, f"not JSON-serialisable ({err})") from None
    if len(text) > MAX_SPEC_CHARS:
        raise _bad("json_schema", schema, f"at most {MAX_SPEC_CHARS} characters of JSON")
    return text
