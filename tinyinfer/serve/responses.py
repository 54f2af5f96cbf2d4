"""OpenAI response objects: completions (`text_completion`) and chat completions (`chat.completion`,
streamed as `chat.completion.chunk`), their per-token logprobs in each API's layout, and `usage`.
Streaming uses server-sent events: one `data: {json}` line per chunk, `data: [DONE]` last.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Optional

from tinyinfer.loading.tokenizer import Tokenizer
from tinyinfer.sampling.processors import Logprobs


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj: dict | str) -> str:
    """One server-sent event; a str is JSON (or [DONE]) already."""
    return f"data: {obj if isinstance(obj, str) else dumps(obj)}\n\n"


class TokenTexts:
    """Each token as the text it adds inside a text, and as its UTF-8 bytes (cached per id).

    Decoding a token alone loses a SentencePiece word's leading space ("▁the" -> "the"), so it is
    decoded after an anchor token and the anchor's text is cut off. A byte-fallback piece (`<0xE2>`,
    part of a character) is no text on its own: its string is the piece, its bytes the byte it stands for.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.anchor = tokenizer.encode("a", add_bos=False)[:1]
        self.anchor_text = tokenizer.decode(self.anchor)
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self.cache.get(token_id)
        if hit is None:
            hit = self.cache[token_id] = self._text(token_id)
        return hit

    def _text(self, token_id: int) -> tuple[str, list[int]]:
        full = self.tokenizer.decode(self.anchor + [token_id])
        text = full[len(self.anchor_text):] if full.startswith(self.anchor_text) else \
            self.tokenizer.decode([token_id])
        if "\ufffd" not in text:
            return text, list(text.encode("utf-8"))
        piece = self.tokenizer.id_to_piece(token_id)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return piece, [int(piece[3:5], 16)]
        return piece, list(piece.encode("utf-8"))


@dataclass
class Choice:
    """One choice as it accumulates: its text, tokens and logprobs so far, and how it ended."""
    index: int
    text: str = ""
    num_tokens: int = 0
    logprobs: list[Logprobs] = field(default_factory=list)
    finish_reason: Optional[str] = None


class Formatter:
    """Builds one API's chunks and final response for one request."""
    chat = False
    chunk_object: str                   # the "object" of a streamed chunk (set by each API)

    def __init__(self, request_id: str, model: str, token_texts: TokenTexts, with_logprobs: bool):
        self.id, self.model, self.token_text = request_id, model, token_texts
        self.with_logprobs = with_logprobs
        self.created = int(time.time())
        # A chunk is this envelope around one choice; stream chunks are built as text, the JSON
        # json.dumps would give, without building a dict per token.
        self.chunk_head = (f'{{"id":{dumps(self.id)},"object":"{self.chunk_object}","created":'
                           f'{self.created},"model":{dumps(model)},"choices":[')

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope(self.chunk_object, [], usage=usage)

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


class CompletionFormat(Formatter):
    chunk_object = "text_completion"

    def logprobs(self, lps: list[Logprobs], offset: int) -> Optional[dict]:
        """{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}."""
        if not self.with_logprobs:
            return None
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            text = self.token_text(lp.token_id)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({self.token_text(t)[0]: v for t, v in lp.top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def chunk(self, c: Choice, text: str, lps: list[Logprobs], offset: int) -> str:
        return (f'{self.chunk_head}{{"index":{c.index},"text":{dumps(text)},"logprobs":'
                f'{dumps(self.logprobs(lps, offset))},"finish_reason":{dumps(c.finish_reason)}}}]}}')

    def response(self, choices: list[Choice], usage: dict) -> dict:
        return self._envelope("text_completion", [
            {"index": c.index, "text": c.text, "logprobs": self.logprobs(c.logprobs, 0),
             "finish_reason": c.finish_reason} for c in choices], usage=usage)


class ChatFormat(Formatter):
    chat = True
    chunk_object = "chat.completion.chunk"

    def _entry(self, token_id: int, logprob: float) -> dict:
        text, raw = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    def logprobs(self, lps: list[Logprobs]) -> Optional[dict]:
        """{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}."""
        if not self.with_logprobs:
            return None
        return {"content": [{**self._entry(lp.token_id, lp.logprob),
                             "top_logprobs": [self._entry(t, v) for t, v in lp.top]} for lp in lps]}

    def role_chunk(self, index: int) -> str:
        return (f'{self.chunk_head}{{"index":{index},"delta":{{"role":"assistant","content":""}},'
                f'"logprobs":null,"finish_reason":null}}]}}')

    def chunk(self, c: Choice, text: str, lps: list[Logprobs], offset: int) -> str:
        delta = f'{{"content":{dumps(text)}}}' if text or c.finish_reason is None else "{}"
        return (f'{self.chunk_head}{{"index":{c.index},"delta":{delta},"logprobs":'
                f'{dumps(self.logprobs(lps))},"finish_reason":{dumps(c.finish_reason)}}}]}}')

    def response(self, choices: list[Choice], usage: dict) -> dict:
        return self._envelope("chat.completion", [
            {"index": c.index, "message": {"role": "assistant", "content": c.text},
             "logprobs": self.logprobs(c.logprobs), "finish_reason": c.finish_reason}
            for c in choices], usage=usage)
