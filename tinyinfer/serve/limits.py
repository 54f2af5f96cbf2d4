"""The server's bounds on what one request may make it do, checked before the work they bound.

    body        --max-request-bytes (default 16 MiB): read in chunks and refused (413) as soon as it is
                past the limit, before anything parses it. Parsing holds the GIL (pydantic-core:
                ~0.3 us per number, ~6 us per array on a 2-core Xeon), so before it the body's JSON
                values (<= 262,144) and arrays + objects (<= 16,384) are counted by a byte scan
                (`check_json_size`): the largest body accepted parses in about 0.1 s. JSON nesting is
                bounded by the parser itself: pydantic-core's reader stops at depth 200 ("recursion
                limit exceeded") before it builds the nested values: a 400, never a RecursionError.
    sequences   prompts x n <= --max-seqs-per-request (default 256): one request may not queue more
                sequences than one full running batch (--max-num-seqs' default).
    messages    <= 1,024 per chat request; stop strings <= 16 of <= 1,000 characters each (OpenAI
                allows 4; stop matching costs O(new characters x stops) per step, engine/output.py).
    prompt      text that cannot fit the context is refused by its length before it is tokenized,
                where that bound is sound (`PromptBound`); tokenization runs off the event loop.
    template    chat templates render in worker processes with a deadline (--template-timeout,
                default 5 s) and an output limit (serve/templates.py).
"""
from __future__ import annotations

import json

import numpy as np
from dataclasses import dataclass
from typing import Optional

from tinyinfer.loading.tokenizer import Tokenizer
from tinyinfer.serve.protocol import APIError

MAX_MESSAGES = 1024
MAX_JSON_VALUES = 2**18
MAX_JSON_CONTAINERS = 2**14
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1000


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 16 * 2**20
    max_seqs_per_request: int = 256
    template_timeout_s: float = 5.0
    max_messages: int = MAX_MESSAGES
    max_json_values: int = MAX_JSON_VALUES
    max_json_containers: int = MAX_JSON_CONTAINERS

    def check(self) -> "Limits":
        for name in ("max_request_bytes", "max_seqs_per_request", "max_messages", "max_json_values",
                     "max_json_containers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: give a number >= 1")
        if not self.template_timeout_s > 0:
            raise ValueError(f"--template-timeout {self.template_timeout_s}: give seconds > 0")
        return self


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 once it is past `limit` bytes (a Content-Length that says
    so is refused before any byte is read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


def check_json_size(body: bytes, max_values: int = MAX_JSON_VALUES,
                    max_containers: int = MAX_JSON_CONTAINERS) -> None:
    """413 when the body holds more JSON values or containers than allowed: counted as the commas
    and brackets outside strings. The counts over the whole body (strings included) bound those
    from above and cost a memchr each; only a body over a limit that way is scanned exactly."""
    containers = body.count(b"[") + body.count(b"{")
    values = body.count(b",") + containers
    if values <= max_values and containers <= max_containers:
        return
    b = np.frombuffer(body, dtype=np.uint8)
    quotes = np.flatnonzero(b == ord('"'))
    slashes = np.flatnonzero(b == ord("\\"))
    if len(slashes):                    # a quote is escaped when an odd run of backslashes ends at it
        starts = np.concatenate(([True], np.diff(slashes) != 1))
        run_start = slashes[starts][np.cumsum(starts) - 1]         # each backslash's run start
        i = np.minimum(np.searchsorted(slashes, quotes - 1), len(slashes) - 1)
        run = np.where(slashes[i] == quotes - 1, quotes - run_start[i], 0)
        quotes = quotes[run % 2 == 0]
    def outside(char: str) -> int:       # occurrences after an even number of real quotes
        at = np.flatnonzero(b == ord(char))
        return int((np.searchsorted(quotes, at) % 2 == 0).sum())
    containers = outside("[") + outside("{")
    values = outside(",") + containers
    if values > max_values or containers > max_containers:
        raise APIError(413, f"the request body holds {values} JSON values in {containers} arrays and "
                       f"objects; this server takes at most {max_values} values and "
                       f"{max_containers} arrays and objects", None, "request_too_large")


def too_large(size: int, limit: int, at_least: bool = False) -> APIError:
    return APIError(413, f"the request body is {'over ' if at_least else ''}{size} bytes; this server "
                    f"takes at most {limit} (--max-request-bytes)", None, "request_too_large")


class PromptBound:
    """The longest text that could still fit `context` tokens, in characters; None when no sound
    bound is known.

    Sound for byte-level BPE tokenizers without a normalizer (GPT-2 style: Llama 3, Qwen, SmolLM2):
    every byte of the text lands in exactly one token, and no token covers more bytes than the longest
    entry of the vocabulary (L), so a text of B bytes needs at least B / L tokens; B >= its character
    count. Other tokenizers may drop or merge characters before tokenizing (SentencePiece collapses
    whitespace runs, NFKC composes characters), so a character count bounds nothing there: such text
    is tokenized off the event loop (the tokenizers release the GIL), bounded by --max-request-bytes.
    """

    def __init__(self, tokenizer: Tokenizer, context: int):
        longest = _longest_token_bytes(tokenizer)
        self.max_chars: Optional[int] = None if longest is None else longest * context
        self.context = context

    def check(self, text: str, field: str) -> None:
        if self.max_chars is not None and len(text) > self.max_chars:
            raise APIError(400, f"{field} is {len(text)} characters: it cannot fit the model's context "
                           f"of {self.context} tokens (no token is more than "
                           f"{self.max_chars // self.context} characters); shorten it", field,
                           "context_length_exceeded")


def _longest_token_bytes(tokenizer: Tokenizer) -> Optional[int]:
    tk = getattr(tokenizer._backend, "tk", None)        # tokenizers.Tokenizer, else SentencePiece
    if tk is None:
        return None
    spec = json.loads(tk.to_str())
    decoder = spec.get("decoder") or {}
    pre = json.dumps(spec.get("pre_tokenizer"))
    if spec.get("normalizer") is not None or decoder.get("type") != "ByteLevel" or '"Removed"' in pre:
        return None
    return max(len(piece.encode("utf-8")) for piece in tk.get_vocab(with_added_tokens=True))
