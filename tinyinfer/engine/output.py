"""Output processing: a request's generated tokens become streamed text, stop strings end it, and each
step reports what every request gained.

Streaming is the subtle part. Decoding one token at a time is wrong twice over: a byte-fallback piece
(`<0xF0>`) may be a quarter of an emoji, and SentencePiece drops the leading space of the first piece it
decodes. `IncrementalDetokenizer` therefore decodes a short window of recent tokens twice, with and
without the new ones, emits the difference, and holds text back while it ends in an incomplete UTF-8
sequence (U+FFFD) -- the "prefix/read offset" scheme used by serving engines such as vLLM (Kwon et al.,
SOSP 2023). `TextStream` adds stop strings: the text is cut where one starts, and a tail that may
still become one is held back from the stream.

Text nobody reads per step is not made per step: a request without stop strings whose consumer does
not stream (`TextStream(..., stream=False)`: LLM.generate without `on_token`) only collects its tokens,
and its text is decoded once when it ends -- one decode of the window and the output, the same text the
incremental pieces add up to (tests/test_tokenizer.py checks both ways agree).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from tinyinfer.loading.tokenizer import Tokenizer
from tinyinfer.sampling.processors import Logprobs
from tinyinfer.toolcalls.calls import ToolCall

# Tokens of context kept before the unread ones: enough that a piece's leading space is decoded as
# "inside the text" rather than "at its start".
_WINDOW = 5


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text that is always valid UTF-8.

    The pieces returned by `push` (then `flush` at the end) concatenate to the text the output adds
    after the prompt: decode(prompt + output) minus decode(prompt) -- so a leading space of the first
    output token is kept; with an empty (or BOS-only) prompt that is exactly decode(output).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int],
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens    # False: special tokens rendered as text
        self.tokens = [int(t) for t in prompt_ids]
        self.read_offset = len(self.tokens)  # tokens before this are already emitted (or prompt)
        self.prefix_offset = self._window_start()  # start of the decoding window
        self.text = ""  # everything emitted so far

    def _window_start(self) -> int:
        # The window must not start inside a character: some decoders (tokenizers' ByteFallback) turn a
        # whole run of byte pieces into U+FFFDs when it starts with a continuation byte. A character
        # spans at most 4 byte pieces, so step back at most 3.
        end = len(self.tokens)
        start = max(0, end - _WINDOW)
        for _ in range(3):
            if start == 0 or not self._decode(self.tokens[start:end]).startswith("\ufffd"):
                break
            start -= 1
        return start

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens)

    def _advance(self, force: bool) -> str:
        decode = self._decode
        prefix = decode(self.tokens[self.prefix_offset:self.read_offset])
        full = decode(self.tokens[self.prefix_offset:])
        # U+FFFD at the end: an incomplete UTF-8 sequence that later byte pieces may complete.
        if not force and (len(full) <= len(prefix) or full.endswith("\ufffd")):
            return ""
        new = full[len(prefix):]
        self.prefix_offset = self._window_start()
        self.read_offset = len(self.tokens)
        self.text += new
        return new

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly printable text (often '', never broken UTF-8)."""
        self.tokens.append(int(token_id))
        return self._advance(force=False)

    def extend(self, token_ids: Sequence[int]) -> None:
        """Add tokens without decoding them: the next `flush` returns their text in one decode."""
        self.tokens += [int(t) for t in token_ids]

    def flush(self) -> str:
        """At the end of a sequence: return held-back text (an incomplete sequence decodes to U+FFFD)."""
        return self._advance(force=True) if self.read_offset < len(self.tokens) else ""


class StopMatcher:
    """Finds stop strings in a text fed a few characters at a time, in O(new characters x stops) per
    feed: one Knuth-Morris-Pratt automaton per stop string (Knuth, Morris & Pratt, "Fast pattern
    matching in strings", SIAM J. Comput. 1977). Its state for a stop is the longest prefix of that
    stop the text ends with -- which is also the tail to hold back from a stream, as it may still
    become the stop -- so nothing rescans the text or slices prefixes of the stops."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.fail = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)

    def feed(self, text: str, report: bool = True) -> Optional[int]:
        """Advance over `text`; the offset in it where the earliest-starting stop that ends inside it
        starts (so the text cut there holds no stop string at all), or None. report=False: matches ending inside `text` do not count (the
        automata still advance, so a stop that ends later is found)."""
        hit = None
        for i, (stop, fail) in enumerate(zip(self.stops, self.fail)):
            k, first = self.state[i], None
            for pos, ch in enumerate(text):
                while k and stop[k] != ch:
                    k = fail[k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):
                    if first is None and report:
                        first = pos + 1 - k
                    k = fail[k - 1]
            self.state[i] = k
            if first is not None and (hit is None or first < hit):
                hit = first                     # the earliest start, whatever the list order
        return hit

    def held(self) -> int:
        """Characters at the end of the text that may be the start of a stop string."""
        return max(self.state, default=0)


def _failure(stop: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of stop[:i + 1] that is also its suffix."""
    fail, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[k] != stop[i]:
            k = fail[k - 1]
        if stop[k] == stop[i]:
            k += 1
        fail[i] = k
    return fail


class TextStream:
    """The output text of one request: incremental detokenization plus its stop strings."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stops: Sequence[str],
                 skip_special_tokens: bool = True, stream: bool = True):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self.stops = StopMatcher(stops)
        self.text = ""                             # the output so far, cut at a stop string
        self.sent = 0                              # characters already handed out by take()
        self.stopped = False
        # Deferred: no stop string to watch and no reader before the end -> decode once, at the end.
        self.deferred = not stream and not stops
        self._pending: list[int] = []              # deferred tokens not decoded yet

    def push(self, token_id: int, check_stops: bool = True) -> bool:
        """Add one generated token's text; True if the text now contains a stop string (cut there).
        check_stops=False (before min_tokens): no stop string can end it; one that starts before
        and ends after this text still can, later."""
        if self.deferred:
            self._pending.append(token_id)
            return False
        return self._add(self.detok.push(token_id), check_stops)

    def finish(self) -> bool:
        """The request ends: add the held-back text; True if that completes a stop string."""
        if self.deferred:
            self.detok.extend(self._pending)
            self._pending = []
        return self._add(self.detok.flush(), True)

    def take(self, final: bool) -> str:
        """The text not handed out yet; while not final, a tail that may be the start of a stop
        string is held back. A deferred stream has text only once final."""
        if self.deferred:
            if not final:
                return ""
            # Ended without finish() (abort, error): the text streaming would have sent by now.
            for tok in self._pending:
                self.text += self.detok.push(tok)
            self._pending = []
        end = len(self.text) if final else len(self.text) - min(self.stops.held(), len(self.text))
        new = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return new

    def _add(self, new: str, check_stops: bool) -> bool:
        if self.stopped:
            return True
        start = len(self.text)
        hit = self.stops.feed(new, check_stops)
        if hit is None:
            self.text += new
            return False
        # A stop may start in text added before (held back, never sent): cut where it starts.
        cut = start + hit
        self.text = (self.text + new)[:max(cut, 0)]
        self.stopped = True
        return True


@dataclass
class RequestDelta:
    """What one request gained in one engine step (LLMEngine.step returns one per request that
    progressed). Concatenating a request's new_token_ids / new_text gives its whole output."""
    request_id: str
    new_token_ids: list[int]
    new_text: str                       # stop-string prefixes are held back until resolved
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" | "length" | "error" | "abort" once finished
    error: Optional[Exception] = None
    new_logprobs: Optional[list[Logprobs]] = None  # one per new token when params.logprobs is set


@dataclass
class RequestOutput:
    """A finished request, as LLM.generate returns it."""
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None  # "stop" | "length" | "error" | "abort"
    error: Optional[Exception] = None
    logprobs: Optional[list[Logprobs]] = None      # one per token when params.logprobs is set
    # LLM.chat with tools: the calls parsed from `text` (toolcalls/), and the text outside them.
    tool_calls: Optional[list[ToolCall]] = None
    content: Optional[str] = None
