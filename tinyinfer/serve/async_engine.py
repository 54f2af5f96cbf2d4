"""`AsyncEngine`: the online engine behind an asyncio server.

One thread owns the `LLMEngine` (its calls are serialised by a lock, but a step returns the deltas of
every request, so one loop must hand them out): it takes typed commands (`AddRequests`, `Abort`,
`Stop`) from a thread-safe queue between steps, runs `step()` while any request is live, and hands each step's
`RequestDelta`s to the asyncio loop that asked for them (`call_soon_threadsafe`). Requests from every
client therefore join the same running batch between two steps -- continuous batching across clients
(Yu et al., "Orca", OSDI 2022) -- and a client that goes away aborts its requests at the next step
boundary, freeing their KV blocks at once.

    stream = await engine.add([prompt_ids], [params])   # RequestError: refused, nothing runs
    while stream.unfinished:
        for index, delta in await stream.next_batch(): ...   # index: which of the added requests
    stream.close()                                      # aborts whatever has not finished
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional, Union

from tinyinfer.engine.llm_engine import LLMEngine
from tinyinfer.engine.output import RequestDelta
from tinyinfer.sampling.params import SamplingParams
from tinyinfer.serve.metrics import Metrics

_IDLE_WAIT_S = 0.5          # how long the idle engine thread blocks on the command queue


@dataclass
class _Live:
    """Engine-thread bookkeeping of one running request."""
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue
    index: int
    arrival: float
    first_token: Optional[float] = None
    num_tokens: int = 0


# The commands the engine thread takes from its queue, between two steps.
@dataclass
class AddRequests:
    """Add these requests together: all of them run, or (one refused) none; `done` is settled on the
    client's loop with None or the error."""
    rids: list[str]
    prompts: list[list[int]]
    params: list[SamplingParams]
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue
    done: asyncio.Future
    arrival: float = field(default_factory=time.perf_counter)


@dataclass
class Abort:
    """Abort these requests (a client went away); unknown or finished ids are ignored."""
    rids: list[str]


@dataclass
class Stop:
    """Abort everything, deliver the final deltas and end the thread."""


Command = Union[AddRequests, Abort, Stop]


class RequestStream:
    """The deltas of requests added together (the n choices of one HTTP request), as (index, delta)."""

    def __init__(self, engine: "AsyncEngine", rids: list[str], sink: asyncio.Queue):
        self.engine, self.rids, self.sink = engine, rids, sink
        self.unfinished = set(range(len(rids)))

    async def next_batch(self) -> list[tuple[int, RequestDelta]]:
        """The next (index, delta), and every other one already delivered (a consumer that fell
        behind the engine catches up in one go)."""
        items = [await self.sink.get()]
        while not self.sink.empty():
            items.append(self.sink.get_nowait())
        for index, delta in items:
            if delta.finished:
                self.unfinished.discard(index)
        return items

    def close(self) -> None:
        """Abort every request of this stream that has not finished (a client went away)."""
        if self.unfinished:
            self.engine.abort([self.rids[i] for i in sorted(self.unfinished)])
            self.unfinished.clear()


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: Optional[Metrics] = None):
        self.engine = engine
        self.metrics = metrics if metrics is not None else Metrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}        # touched by the engine thread only
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self.crash: Optional[str] = None           # why the engine thread ended, if it crashed
        self._thread = threading.Thread(target=self._run, name="tinyinfer-engine", daemon=True)
        self.metrics.kv_blocks_total.set(engine.blocks.num_blocks)

    # ------------------------------------------------------------------ client side (any thread)
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def failure(self) -> Optional[str]:
        """Why no request can be served now (None while one can): stopping, the engine thread gone,
        or the engine itself broken (a tensor-parallel rank lost)."""
        if self._stopping.is_set():
            return "the server is shutting down"
        if not self._thread.is_alive():
            return "the engine thread is not running" + (f" ({self.crash})" if self.crash else "")
        return self.engine.failure()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is running, deliver the final deltas, and end the engine thread."""
        self._stopping.set()
        self._commands.put(Stop())
        if self._thread.is_alive():
            self._thread.join(timeout)

    async def add(self, prompts: list[list[int]], params: list[SamplingParams]) -> RequestStream:
        """Queue requests; returns once the engine accepted all of them. If one is refused
        (RequestError, or any error adding it) none runs, and the error is raised here."""
        if not self.alive:
            raise RuntimeError("the engine is shutting down")
        loop = asyncio.get_running_loop()
        rids = [f"req-{next(self._ids)}" for _ in prompts]
        sink: asyncio.Queue = asyncio.Queue()
        done = loop.create_future()
        self._commands.put(AddRequests(rids, prompts, params, loop, sink, done))
        try:
            await done
        except asyncio.CancelledError:              # the client left before the engine took them
            self.abort(rids)
            raise
        return RequestStream(self, rids, sink)

    def abort(self, rids: list[str]) -> None:
        self._commands.put(Abort(list(rids)))

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            while self._serve_once():
                pass
        except BaseException as err:               # a bug in this loop: /health says so (503)
            self.crash = f"{type(err).__name__}: {err}"
            traceback.print_exc(file=sys.stderr)

    def _serve_once(self) -> bool:
        """Take every queued command, then run one step if anything is live; False once stopped."""
        wait = not self.engine.has_unfinished()
        while True:
            try:
                cmd = self._commands.get(timeout=_IDLE_WAIT_S) if wait else self._commands.get_nowait()
            except queue.Empty:
                break
            wait = False
            if isinstance(cmd, Stop) or self._stopping.is_set():
                self._shutdown()
                return False
            if isinstance(cmd, Abort):
                for rid in cmd.rids:
                    self.engine.abort(rid)
            else:
                self._add(cmd)
        if self.engine.has_unfinished():
            self._step()
        self._update_gauges()
        return True

    def _add(self, cmd: AddRequests) -> None:
        added = []
        try:
            for rid, prompt, params in zip(cmd.rids, cmd.prompts, cmd.params):
                self.engine.add_request(prompt, params, request_id=rid)
                added.append(rid)
        except Exception as err:                    # RequestError: a bad request; else a bug
            for rid in added:
                self.engine.abort(rid)              # its final delta finds no _Live: dropped
            cmd.loop.call_soon_threadsafe(_settle, cmd.done, err)
            return
        for i, (rid, prompt) in enumerate(zip(cmd.rids, cmd.prompts)):
            self._live[rid] = _Live(cmd.loop, cmd.sink, i, cmd.arrival)
            self.metrics.prompt_tokens.inc(len(prompt))
        cmd.loop.call_soon_threadsafe(_settle, cmd.done, None)

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception as err:                    # a bug, not a bad request: fail the live ones
            traceback.print_exc(file=sys.stderr)
            deltas = [RequestDelta(rid, [], "", True, "error", RuntimeError(
                f"the engine failed during a step ({type(err).__name__}: {err}); request aborted"))
                for rid in list(self._live)]
            for rid in list(self._live):
                self.engine.abort(rid)
        now = time.perf_counter()
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        m, new_tokens = self.metrics, 0
        for d in deltas:
            live = self._live.get(d.request_id)
            if live is None:
                continue                            # refused group's aborts, or already failed
            if d.new_token_ids:
                if live.first_token is None:
                    live.first_token = now
                    m.ttft.observe(now - live.arrival)
                live.num_tokens += len(d.new_token_ids)
                new_tokens += len(d.new_token_ids)
            if d.finished:
                del self._live[d.request_id]
                m.requests.labels(finish_reason=d.finish_reason).inc()
                if live.num_tokens > 1:
                    m.tpot.observe((now - live.first_token) / (live.num_tokens - 1))
            by_loop.setdefault(live.loop, []).append((live.sink, live.index, d))
        m.generation_tokens.inc(new_tokens)         # counted before a client can see the tokens
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _update_gauges(self) -> None:
        stats, m = self.engine.stats, self.metrics
        m.running.set(stats["running"])
        m.waiting.set(stats["waiting"])
        m.kv_blocks_used.set(stats["num_blocks"] - stats["free_blocks"])
        if stats["preemptions"] > m.preemptions_seen:
            m.preemptions.inc(stats["preemptions"] - m.preemptions_seen)
            m.preemptions_seen = stats["preemptions"]
        if "spec_draft_tokens" in stats:
            seen, now = m.spec_seen, (stats["spec_draft_tokens"], stats["spec_accepted_tokens"])
            m.spec_draft_tokens.inc(now[0] - seen[0])
            m.spec_accepted_tokens.inc(now[1] - seen[1])
            m.spec_seen = now

    def _shutdown(self) -> None:
        for rid in list(self._live):
            self.engine.abort(rid)
        while self.engine.has_unfinished() and self._live:
            self._step()
        self._update_gauges()


def _settle(future: asyncio.Future, error: Optional[Exception]) -> None:
    if future.done():                               # the client went away while waiting
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _deliver(items: list) -> None:
    for sink, index, delta in items:
        sink.put_nowait((index, delta))
