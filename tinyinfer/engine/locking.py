"""One re-entrant lock per engine, so that several threads may share an `LLMEngine` or an `LLM`.

The engine's state (scheduler queues, block tables, the KV cache) changes throughout a step, so two
threads must never run engine calls at the same time: the calls named in `serialized_calls` take the
engine's lock and run one at a time, each whole. The lock is re-entrant (an `on_token` callback may call
the engine from inside `LLM.generate`), and `LLM.generate` / `chat` / `logits` hold it for the whole
call: a second thread's `generate` waits for the first to finish instead of stepping the first one's
requests (a step returns the deltas of every request, whichever thread added it).

    @serialized_calls("add_request", "step")
    class Engine: ...
    with engine_lock(engine): ...      # several calls as one
"""
from __future__ import annotations

import functools
import threading
from typing import Callable, TypeVar

T = TypeVar("T", bound=type)


def engine_lock(engine: object) -> threading.RLock:
    """The engine's lock, made on first use (dict.setdefault is atomic, so two threads get one lock)."""
    lock = engine.__dict__.get("_lock")
    return lock if lock is not None else engine.__dict__.setdefault("_lock", threading.RLock())


def _locked(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with engine_lock(self):
            return method(self, *args, **kwargs)
    return call


def serialized_calls(*names: str) -> Callable[[T], T]:
    """Class decorator: the methods `names` run under the instance's engine_lock."""
    def wrap(cls: T) -> T:
        for name in names:
            setattr(cls, name, _locked(getattr(cls, name)))
        return cls
    return wrap
