"""Chat templates: a conversation (a list of {"role", "content"} messages) becomes prompt token ids by
rendering the checkpoint's Jinja template, exactly as Hugging Face transformers' `apply_chat_template`
does, so a chat prompt here has the same ids as there.

What "exactly" takes (the template language is Jinja2; the conventions are transformers'):
- a sandboxed environment (templates come from model repositories: untrusted code) with
  `trim_blocks` and `lstrip_blocks`, the loop-control extension (`{% break %}`, `{% continue %}`) and
  the `{% generation %}...{% endgeneration %}` block (rendered as its body);
- globals `raise_exception(message)` (a template refusing a conversation) and `strftime_now(format)`;
  the `tojson` filter as plain `json.dumps` (no HTML escaping; `indent`, `separators`, `sort_keys`);
- variables `messages` (keys whose value is None dropped), `tools`, `documents`,
  `add_generation_prompt`, the tokenizer's special-token strings (`bos_token`, `eos_token`, ...) and
  any extra keyword (`enable_thinking=False`), extras winning over the special tokens;
- the rendered text is encoded without adding BOS (the template writes it), special-token strings in it
  becoming their ids (loading/tokenizer.py).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Optional

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tinyinfer.loading.tokenizer import Tokenizer

# A message's reasoning goes by several names; templates read "reasoning_content" (most) or "thinking".
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A conversation cannot be rendered: no template, a template that does not parse, or one that
    refuses the conversation (raise_exception)."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %} ... {% endgeneration %}` marks assistant text for training masks; rendering a
    prompt only needs its body."""
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Optional[tuple[str, str]] = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled once per source text; a syntax error is a ChatTemplateError."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"the chat template does not parse (line {err.lineno}: {err.message}); "
                                "fix the template") from err


def _normalize(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError(f"a conversation is a non-empty list of messages, got {messages!r:.80}")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ChatTemplateError(f"message {i} is a {type(msg).__name__}, not a dict with 'role' "
                                    "and 'content'")
        msg = {k: v for k, v in msg.items() if v is not None}   # APIs send content=None, tool_calls=None
        reasoning = next((msg[k] for k in _REASONING_KEYS if k in msg), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


def render(template: str, messages: list[dict], add_generation_prompt: bool = True,
           tools: Optional[list[dict]] = None, documents: Optional[list[dict]] = None,
           special_tokens: Optional[dict[str, str]] = None, max_chars: Optional[int] = None,
           **template_kwargs: Any) -> str:
    """The prompt text of `messages` under `template` (add_generation_prompt: end with the header of
    the assistant's turn). Extra keywords become template variables. The output is built through
    Jinja's generator, so a template that writes more than `max_chars` characters is stopped there;
    any error a template can raise (ZeroDivisionError, RecursionError, MemoryError, ...) is a
    ChatTemplateError."""
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ChatTemplateError("tools must be a list of JSON-schema dicts ({'type': 'function', "
                                f"'function': {{...}}}}), got {tools!r:.80}")
    if documents is not None and not (isinstance(documents, list)
                                      and all(isinstance(d, dict) for d in documents)):
        raise ChatTemplateError(f"documents must be a list of dicts (e.g. 'title', 'text'), got "
                                f"{documents!r:.80}")
    variables = {**(special_tokens or {}), **template_kwargs}
    compiled = compile_template(template)
    parts, size = [], 0
    try:
        for part in compiled.generate(messages=_normalize(messages), tools=tools, documents=documents,
                                      add_generation_prompt=add_generation_prompt, **variables):
            size += len(part)
            if max_chars is not None and size > max_chars:
                raise ChatTemplateError(f"the chat template wrote more than {max_chars} characters "
                                        "for this conversation; it cannot fit the context")
            parts.append(part)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as err:
        raise ChatTemplateError(f"the chat template tried an unsafe operation: {err}") from err
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"the chat template refused the conversation: {err}") from err
    except Exception as err:                        # the template's own bug, whatever it raises
        raise ChatTemplateError(f"the chat template failed on this conversation: "
                                f"{type(err).__name__}: {str(err):.200}") from err
    return "".join(parts)


def choose_template(tokenizer: Tokenizer, template: Optional[str] = None,
                    tools: Optional[list] = None) -> str:
    """The template to use: `template` if given (a name of one of the checkpoint's templates, or Jinja
    source), else the checkpoint's "tool_use" one when tools are given and it has one, else its default."""
    named = tokenizer.chat_templates
    if template is not None:
        return named.get(template, template)
    if tools is not None and "tool_use" in named:
        return named["tool_use"]
    if tokenizer.chat_template is not None:
        return tokenizer.chat_template
    if named:
        raise ChatTemplateError(f"the checkpoint has chat templates {sorted(named)} but no 'default' "
                                "one; name the one to use")
    raise ChatTemplateError("this model has no chat template (no 'chat_template' in "
                            "tokenizer_config.json and no chat_template.jinja beside it); send a plain "
                            "prompt to the completions API instead, or add a template to the checkpoint")


def apply_chat_template(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        tools: Optional[list[dict]] = None, documents: Optional[list[dict]] = None,
                        template: Optional[str] = None, **template_kwargs: Any) -> list[int]:
    """Prompt token ids of a conversation: the rendered template, encoded without an added BOS."""
    text = render(choose_template(tokenizer, template, tools), messages, add_generation_prompt, tools,
                  documents, tokenizer.special_tokens, **template_kwargs)
    return tokenizer.encode(text, add_bos=False)
