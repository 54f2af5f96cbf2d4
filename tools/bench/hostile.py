"""hostile: another client's latency while hostile requests are in flight (issue 24's "done when").

A server on a free loopback port (`python -m tinyinfer.serve`, the demo model) answers a
seeded 8-token completion alone (--repeats times: the solo median), then again while three hostile
clients each send, over and over: a 50 MB prompt (past --max-request-bytes: it is read up to the limit
and refused), a chat request whose template loops for ever (stopped at --template-timeout), and one
request of 1,000 prompts x n = 64 (refused by --max-seqs-per-request). Meanwhile a fourth client polls
/health. Printed: the 8-token request's median time under attack / alone (the bound is 3x), the
/health latencies (the bound is 100 ms), and whether every attacked run returned the solo tokens.
Bounded: --seconds of attack, loopback only.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import threading
import time

import torch

from tools.bench.common import summary_row

LOOPING = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
GOOD = {"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0.8, "seed": 1234, "ignore_eos": True}
GPU_CHECK_ARGS: list[list[str]] = []          # a server-robustness bench: make gpu-check skips it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="8-token requests per phase")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long the attack lasts at most")


def _server(device: torch.device, root: str):
    """`python -m tinyinfer.serve` in a process of its own (its GIL is not the clients'), on the demo
    model with the looping template; returns (process, url)."""
    import json as _json
    import subprocess
    import sys
    model = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "models",
                                          "shakespeare-llama"))
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(model):
        os.symlink(os.path.join(model, name), os.path.join(root, name))
    with open(os.path.join(root, "tokenizer_config.json"), "w") as f:
        _json.dump({"chat_template": LOOPING}, f)
    proc = subprocess.Popen([sys.executable, "-m", "tinyinfer.serve", "--ckpt", root, "--port", "0",
                             "--device", str(device), "--max-kv-tokens", "2048"],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()   # drain the rest
            return proc, m.group(1)
    raise RuntimeError("the server did not start")


def _timed(client, url: str) -> tuple[float, list]:
    t = time.perf_counter()
    r = client.post(url + "/v1/completions", json=GOOD, timeout=120)
    return time.perf_counter() - t, r.json()["choices"]


def run(args: argparse.Namespace, device: torch.device) -> dict:
    import httpx
    import tempfile
    tmp = tempfile.TemporaryDirectory()
    proc, url = _server(device, os.path.join(tmp.name, "model"))
    stop, health_ms, statuses = threading.Event(), [], {}
    try:
        with httpx.Client() as c:
            _timed(c, url)                                          # warm-up
            quiet_ms = []
            for _ in range(args.repeats * 4):                       # /health with nothing running
                t = time.perf_counter()
                c.get(url + "/health", timeout=30)
                quiet_ms.append((time.perf_counter() - t) * 1000)
                time.sleep(0.02)
            solo = [_timed(c, url) for _ in range(args.repeats)]
        big = b'{"prompt": "' + b"x" * (50 * 2**20) + b'"}'
        attacks = {"50MB prompt": ("/v1/completions", big),
                   "looping template": ("/v1/chat/completions",
                                        b'{"messages": [{"role": "user", "content": "hi"}]}'),
                   "1000 x 64": ("/v1/completions", json.dumps({"prompt": ["a"] * 1000, "n": 64}).encode())}

        def attack(name: str, path: str, body: bytes) -> None:
            with httpx.Client() as c:
                while not stop.is_set():
                    try:
                        r = c.post(url + path, content=body, timeout=60,
                                   headers={"Content-Type": "application/json"})
                        statuses.setdefault(name, set()).add(r.status_code)
                    except httpx.HTTPError as err:                  # the server closed a 50 MB upload
                        statuses.setdefault(name, set()).add(type(err).__name__)

        def poll() -> None:
            with httpx.Client() as c:
                while not stop.is_set():
                    t = time.perf_counter()
                    c.get(url + "/health", timeout=30)
                    health_ms.append((time.perf_counter() - t) * 1000)
                    time.sleep(0.02)

        workers = [threading.Thread(target=attack, args=(n, *a), daemon=True) for n, a in attacks.items()]
        workers.append(threading.Thread(target=poll, daemon=True))
        for w in workers:
            w.start()
        time.sleep(1.0)                                             # every attack under way
        attacked, deadline = [], time.monotonic() + args.seconds
        with httpx.Client() as c:
            while len(attacked) < args.repeats and time.monotonic() < deadline:
                attacked.append(_timed(c, url))
        stop.set()
        for w in workers:
            w.join(70)
    finally:
        stop.set()
        proc.terminate()
        proc.wait(60)
        tmp.cleanup()
    solo_s = statistics.median(t for t, _ in solo)
    hit_s = statistics.median(t for t, _ in attacked) if attacked else float("inf")
    same = all(ch == solo[0][1] for _, ch in attacked)
    health = sorted(health_ms)
    p99 = health[min(len(health) - 1, int(0.99 * len(health)))] if health else float("inf")
    print(f"8-token request: alone {solo_s * 1000:.0f} ms, under attack {hit_s * 1000:.0f} ms "
          f"(x{hit_s / solo_s:.2f}; bound x3); {len(attacked)} runs, same tokens as alone: {same}")
    print(f"/health during the attack: {len(health)} answers, median {statistics.median(health):.1f} ms, "
          f"p99 {p99:.1f} ms, max {health[-1]:.1f} ms (bound 100 ms)" if health else "/health: none")
    print(f"/health with nothing else running: median {statistics.median(quiet_ms):.1f} ms, max "
          f"{max(quiet_ms):.1f} ms (what this machine's load alone costs)")
    print(f"hostile answers: {({k: sorted(map(str, v)) for k, v in statuses.items()})}")
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
    return {"solo_s": solo_s, "attacked_s": hit_s, "ratio": hit_s / solo_s, "same_tokens": same,
            "health_ms_median": statistics.median(health) if health else None, "health_ms_p99": p99,
            "health_ms_max": health[-1] if health else None,
            "quiet_health_ms_median": statistics.median(quiet_ms), "quiet_health_ms_max": max(quiet_ms),
            "summary": [summary_row("8-token request under attack / alone", hit_s / solo_s, "x")]}
