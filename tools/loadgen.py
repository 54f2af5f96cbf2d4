"""A load generator for the server, the method of vLLM's serving benchmark (Kwon et al., SOSP 2023):
requests arrive as a Poisson process (exponential gaps at a given rate; rate inf = all at once), each a
streaming completion with a fixed output length (ignore_eos + max_tokens); per request it records time
to first token (TTFT: send to first text event) and time per output token (TPOT: (last - first) /
(tokens - 1)), and a run reports requests/s and output tokens/s over its whole duration, with TTFT and
TPOT percentiles.

Standard library only (http.client, one thread per request in flight), so it measures any
OpenAI-compatible server and loads nothing of the server's packages.
"""
from __future__ import annotations

import http.client
import json
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse


@dataclass
class Result:
    prompt_tokens: int
    max_tokens: int
    sent: float = 0.0
    first: Optional[float] = None       # first event with text
    done: Optional[float] = None
    tokens: int = 0                     # completion tokens (the server's usage)
    error: Optional[str] = None

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def tpot(self) -> Optional[float]:
        return (self.done - self.first) / (self.tokens - 1) if self.tokens > 1 else None


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each of n requests is sent: a Poisson process of `rate`/s."""
    if math.isinf(rate):
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def stream_completion(url: str, body: dict, result: Result, timeout: float) -> None:
    """POST a streaming completion; fill `result` with its timings and token count."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        result.sent = time.perf_counter()
        conn.request("POST", u.path.rstrip("/") + "/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            result.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return
        buf = b""
        while True:
            data = resp.read1(65536)                # whatever arrived: often several events
            if not data:
                result.error = "the stream ended without [DONE]"
                return
            buf += data
            *events, buf = buf.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: "):
                    continue
                if event.startswith(b"data: [DONE]"):
                    result.done = time.perf_counter()
                    return
                if result.first is None and b'"text":""' not in event:
                    result.first = time.perf_counter()
                if b'"usage"' in event:             # include_usage: the last event before [DONE]
                    result.tokens = json.loads(event[6:])["usage"]["completion_tokens"]
                elif b'"error"' in event:
                    result.error = event[6:].decode()[:200]
    except OSError as err:
        result.error = f"{type(err).__name__}: {err}"
    finally:
        conn.close()


def run_load(url: str, requests: list[tuple[list[int], int]], rate: float, seed: int = 0,
             model: Optional[str] = None, timeout: float = 600.0) -> tuple[list[Result], float]:
    """Send (prompt ids, output tokens) requests at Poisson arrivals; returns the results and the
    run's duration (first send to last completion)."""
    results = [Result(len(p), n) for p, n in requests]
    threads = []
    start = time.perf_counter()
    for (prompt, n), res, at in zip(requests, results, arrival_times(len(requests), rate, seed)):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        body = {"prompt": prompt, "max_tokens": n, "ignore_eos": True, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        if model is not None:
            body["model"] = model
        t = threading.Thread(target=stream_completion, args=(url, body, res, timeout), daemon=True)
        t.start()
        threads.append(t)
    deadline = time.perf_counter() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    ends = [r.done for r in results if r.done is not None]
    return results, (max(ends) if ends else time.perf_counter()) - start


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.error is None and r.done is not None and r.first is not None]
    ttft = [r.ttft for r in ok]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    out_tokens = sum(r.tokens for r in ok)
    return {"completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if r.error})[:3],
            "duration_s": round(duration, 3), "requests_per_s": round(len(ok) / duration, 3),
            "output_tokens_per_s": round(out_tokens / duration, 2), "output_tokens": out_tokens,
            "ttft_p50_ms": round(1e3 * percentile(ttft, 50), 2),
            "ttft_p99_ms": round(1e3 * percentile(ttft, 99), 2),
            "tpot_p50_ms": round(1e3 * percentile(tpot, 50), 3),
            "tpot_p99_ms": round(1e3 * percentile(tpot, 99), 3)}
