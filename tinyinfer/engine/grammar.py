"""Constrained decoding (Willard & Louf, "Efficient Guided Generation for Large Language Models", 2023):
each structured request keeps a grammar matcher over its output tokens; before a token is drawn, the
matcher's token mask (which tokens keep the output inside the grammar, EOS only where the grammar
accepts) sets the other logits to -inf, before every other sampler step. The grammar engine is
llguidance (https://github.com/guidance-ai/llguidance; why: docs/structured-output.md), imported only
when a request asks for structured output.

`Grammars` (one per engine) holds the vocabulary's token bytes (loading/token_bytes.py) as llguidance's
tokenizer and a bounded LRU cache of compiled grammars keyed by the constraint's content; a request's
`Matcher` is a copy of the cached one. The masks of a step's structured rows are computed by
llguidance's own threads with the GIL released (`MaskJob`), started before the model's forward so that
they overlap it where there is a core to spare.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import torch

from tinyinfer.config.errors import RequestError
from tinyinfer.loading.token_bytes import token_bytes
from tinyinfer.sampling.structured import StructuredOutput

PIP_HINT = "pip install llguidance (or pip install -e '.[structured]')"
CACHE_SIZE = 256              # compiled grammars kept (LRU), each a few hundred kB at most
# JSON without optional whitespace: fewer tokens, and the grammar ends (the request stops) at the
# closing brace instead of allowing trailing blanks a sampling model may repeat up to max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_SHIFTS = torch.arange(32, dtype=torch.int32)
_POOL: Optional[ThreadPoolExecutor] = None       # one thread for the whole process, made on first use


def _llguidance():
    try:
        import llguidance      # not llguidance.torch: importing it sets up torch.compile (seconds)
    except ImportError:
        raise RequestError(f"structured output needs the llguidance package, which is not installed: "
                           f"{PIP_HINT}", "structured") from None
    return llguidance


class _Vocab:
    """What llguidance's TokenizerWrapper reads: every token's bytes, EOS, the special ids, and a
    tokenize function (used only to split a grammar's literal strings into tokens)."""

    def __init__(self, tokenizer, n_vocab: int, eos_ids: Sequence[int]):
        tb = token_bytes(tokenizer, n_vocab)
        self.tokens, self.special_token_ids = tb.tokens, tb.special
        self.eos_token_id = (list(eos_ids) or tb.eos_ids or [0])[0]
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer
        self._lead = self._encode("\n")         # what encoding "\n" + text puts before text's tokens

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_bos=False)

    def __call__(self, text: bytes) -> list[int]:
        # The tokens of text as it continues an output: a SentencePiece vocabulary would put a "▁" in
        # front of text encoded alone, so encode it after a newline and drop the newline's tokens.
        s, n = text.decode("utf-8", "replace"), len(self._lead)
        ids = self._encode("\n" + s)
        if ids[:n] == self._lead and b"".join(self.tokens[i] for i in ids[n:]) == s.encode("utf-8"):
            return ids[n:]
        return self._encode(s)


def grammar_text(ll, so: StructuredOutput) -> str:
    """The constraint as llguidance's grammar (a JSON document naming a Lark, regex or JSON-schema
    grammar); the per-kind errors come back from `Grammars.compile`."""
    M = ll.LLMatcher
    kind = so.kind
    if kind == "json_schema":
        return M.grammar_from_json_schema(so.json_schema, overrides=JSON_OPTIONS)
    if kind == "json_object":
        return M.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if kind == "regex":
        return M.grammar_from_regex(so.regex)
    if kind == "choice":       # Lark string literals take JSON's escapes
        return M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in so.choice))
    from llguidance.gbnf_to_lark import any_to_lark   # GBNF (rules with ::=) becomes Lark
    try:
        return M.grammar_from_lark(any_to_lark(so.grammar))
    except Exception as err:   # the GBNF converter raises its own errors for text it cannot parse
        raise ValueError(f"not a Lark or GBNF grammar: {err}") from None


class Grammars:
    """One engine's grammar compiler: llguidance's tokenizer over the model's vocabulary (built on
    first use, ~0.3 s for 49k tokens) and the compiled-grammar cache. Thread-safe: the server compiles
    off the event loop while the engine thread makes matchers."""

    def __init__(self, tokenizer, n_vocab: int, eos_ids: Sequence[int], cache_size: int = CACHE_SIZE):
        self.n_vocab, self.eos_ids = n_vocab, list(eos_ids)
        self._tokenizer, self._ll, self._lltok = tokenizer, None, None
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_size, self.compiled, self.hits = cache_size, 0, 0
        self.overlap = True           # compute masks during the forward (off: after it; for the bench)
        self._executor = None

    def _setup(self):
        with self._lock:
            if self._lltok is None:
                ll = _llguidance()
                vocab = _Vocab(self._tokenizer, self.n_vocab, self.eos_ids)
                eos = self.eos_ids or [vocab.eos_token_id]
                self._lltok = ll.LLTokenizer(ll.TokenizerWrapper(vocab), n_vocab=self.n_vocab, eos_token=eos)
                self._ll = ll
        return self._ll

    def compile(self, so: StructuredOutput):
        """The compiled grammar of a constraint (cached by content); RequestError naming the field
        (structured.json_schema, ...) when llguidance cannot compile it."""
        ll = self._setup()
        key = so.key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.hits += 1
                return self._cache[key]
        field = f"structured.{so.kind}"
        try:
            text = grammar_text(ll, so)
        except ValueError as err:
            raise RequestError(f"{field} cannot be compiled: {err}", field) from None
        matcher = ll.LLMatcher(self._lltok, text, log_level=0)     # drops the GIL while it builds
        if matcher.is_error():
            raise RequestError(f"{field} cannot be compiled: {_short(matcher.get_error())}", field)
        matcher.compute_bitmask()       # the first mask builds the lexer: done once, kept in the cache
        if matcher.is_error():
            raise RequestError(f"{field} cannot be used: {_short(matcher.get_error())}", field)
        with self._lock:
            self.compiled += 1
            self._cache[key] = matcher
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return matcher

    def matcher(self, so: StructuredOutput, speculative: bool = False) -> "Matcher":
        """A fresh matcher for one request (a copy of the compiled grammar). Speculative decoding is
        refused: its drafts are not checked against the grammar (docs/structured-output.md)."""
        if speculative:
            raise RequestError("structured output does not run with speculative decoding (drafts are "
                               "not checked against the grammar): use an engine without a draft "
                               "(no --draft) for these requests", "structured")
        return Matcher(self, self.compile(so).deep_copy())

    def start_masks(self, matchers: Sequence["Matcher"]) -> "MaskJob":
        """Begin computing the next-token masks of `matchers` (one row each), in the background when
        `overlap` is on; `MaskJob.apply` waits for them."""
        global _POOL
        ll = self._setup()
        with self._lock:
            if self._executor is None:
                self._executor = ll.LLExecutor()
            if _POOL is None:
                _POOL = ThreadPoolExecutor(1, thread_name_prefix="tinyinfer-grammar")
        bitmask = torch.full((len(matchers), (self.n_vocab + 31) // 32), -1, dtype=torch.int32)
        pairs = [(m.ll, i) for i, m in enumerate(matchers)]

        def fill() -> torch.Tensor:       # llguidance's threads write the rows, the GIL released
            self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4,
                                                   bitmask.shape[0])
            return bitmask
        if self.overlap:
            return MaskJob(_POOL.submit(fill), matchers)
        done: Future = Future()
        done.set_result(None)
        return MaskJob(done, matchers, fill)


class MaskJob:
    """The masks of one step's structured rows, being computed."""

    def __init__(self, future: Future, matchers: Sequence["Matcher"], later=None):
        self.future, self.matchers, self.later = future, matchers, later

    def apply(self, logits: torch.Tensor, rows: Sequence[int]) -> None:
        """Set logits[rows[i], t] = -inf for every token t row i's grammar forbids, in place (logits
        (R, V) float on any device; the mask is built on the host, then moved once)."""
        bitmask = self.later() if self.later is not None else self.future.result()   # (n, ceil(V/32))
        allowed = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).view(len(rows), -1)       # (n, 32*ceil(V/32))
        V = logits.shape[1]
        allowed = allowed[:, :V].bool().to(logits.device, non_blocking=True)         # (n, V)
        idx = torch.as_tensor(list(rows), device=logits.device)
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))


class Matcher:
    """One request's grammar state: it has consumed the request's output tokens so far."""

    def __init__(self, owner: Grammars, ll_matcher):
        self.owner, self.ll = owner, ll_matcher

    def accept(self, token: int) -> Optional[RequestError]:
        """Advance over a drawn token; the error if the grammar refuses it (never for a token drawn
        under this matcher's mask), else None."""
        if self.ll.consume_token(int(token)):
            return None
        return RequestError(f"the grammar refused token {token}: {_short(self.ll.get_error())}", "structured")

    @property
    def done(self) -> bool:
        """The output is complete: the grammar allows nothing more (only EOS)."""
        return self.ll.is_stopped()


def _short(message: str, limit: int = 400) -> str:
    message = " ".join(str(message).split())
    return message if len(message) <= limit else message[:limit - 3] + "..."
