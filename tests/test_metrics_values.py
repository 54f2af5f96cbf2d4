"""Prometheus metric VALUES after a known workload on a fresh server (its own registry), not only their
presence: prompt and generation token counters to the token, finished requests by finish reason
(length, stop, abort), the latency histograms' observation counts (one time-to-first-token per request
that produced a token, one time-per-output-token per finished request of two tokens or more), the
preemption counter against the engine's own count, and the gauges back at idle. A refused request
counts nothing. The token counts expected are worked out from the requests (and, for the stop, from
offline generation on the same checkpoint), never read back from the server."""
from __future__ import annotations

import json
import time

import pytest

from hf_util import LLAMA
from serve_util import ServerThread, metric
from tinyinfer import LLM, LLMEngine, SamplingParams

import httpx  # noqa: E402

POOL = 128                     # KV tokens: 8 blocks of 16
PROMPT = [(11 * i) % 700 + 3 for i in range(20)]


@pytest.fixture(scope="module")
def server():
    srv = ServerThread(LLMEngine(LLAMA, device="cpu", dtype="float32", max_kv_tokens=POOL), name="demo")
    yield srv
    srv.stop()


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", content=json.dumps(body),
                      headers={"Content-Type": "application/json"}, timeout=120)


def values(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text

    def get(name: str) -> float:
        return metric(text, name) if any(line.startswith(name + " ") for line in text.splitlines()) else 0.0

    names = ["tinyinfer_prompt_tokens_total", "tinyinfer_generation_tokens_total",
             "tinyinfer_preemptions_total", "tinyinfer_time_to_first_token_seconds_count",
             "tinyinfer_time_per_output_token_seconds_count", "tinyinfer_num_requests_running",
             "tinyinfer_num_requests_waiting", "tinyinfer_kv_blocks_used", "tinyinfer_kv_blocks_total"]
    got = {n.removeprefix("tinyinfer_"): get(n) for n in names}
    for reason in ("length", "stop", "abort", "error"):
        got[reason] = get(f'tinyinfer_requests_total{{finish_reason="{reason}"}}')
    return got


def test_counters_after_a_known_workload(server):
    want = dict(prompt_tokens_total=0, generation_tokens_total=0, length=0, stop=0, abort=0, error=0,
                time_to_first_token_seconds_count=0, time_per_output_token_seconds_count=0)

    def expect(**delta) -> None:
        for k, v in delta.items():
            want[k] += v
        # The engine thread updates the gauges (blocks, running) right after it delivers a step's
        # results: give it a moment (bounded) before the values must match.
        deadline = time.monotonic() + 10
        while True:
            got = values(server)
            settled = {k: got[k] for k in want} == want and got["kv_blocks_used"] == 0
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert {k: got[k] for k in want} == want
        assert got["num_requests_running"] == got["num_requests_waiting"] == got["kv_blocks_used"] == 0
        assert got["kv_blocks_total"] == server.engine.blocks.num_blocks

    expect()                                                     # a fresh server counts nothing
    # 1. One request to its length: 20 prompt tokens, 7 generated.
    r = post(server, {"prompt": PROMPT, "max_tokens": 7, "ignore_eos": True, "temperature": 0.0})
    assert r.status_code == 200, r.text
    expect(prompt_tokens_total=20, generation_tokens_total=7, length=1,
           time_to_first_token_seconds_count=1, time_per_output_token_seconds_count=1)

    # 2. n=3 of a 5-token prompt, 1 token each: the prompt counts once per choice; one token has no
    # time per output token.
    r = post(server, {"prompt": PROMPT[:5], "max_tokens": 1, "n": 3, "ignore_eos": True, "seed": 2})
    assert r.status_code == 200, r.text
    expect(prompt_tokens_total=15, generation_tokens_total=3, length=3,
           time_to_first_token_seconds_count=3)

    # 3. Ended by a stop token id: the tokens up to and including it, worked out offline.
    free = LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=POOL).generate(
        [PROMPT], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].token_ids
    cut = next(i for i in range(3, 12) if free[i] not in free[:i])
    r = post(server, {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.0,
                      "stop_token_ids": [free[cut]]})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop", r.text
    expect(prompt_tokens_total=20, generation_tokens_total=cut + 1, stop=1,
           time_to_first_token_seconds_count=1, time_per_output_token_seconds_count=1)

    # 4. Refused (prompt + max_tokens past the pool): nothing counts.
    r = post(server, {"prompt": PROMPT, "max_tokens": POOL})
    assert r.status_code == 400, r.text
    expect()

    # 5. Eight 16-token prompts in one call fill the pool (8 blocks of 16) after their prefill; the
    # first decode step needs a second block for each, so that one step preempts four of them (the
    # newest, to be recomputed). Each generated token counts once however often it was recomputed.
    r = post(server, {"prompt": PROMPT[:16], "max_tokens": 20, "n": 8, "ignore_eos": True, "seed": 5})
    assert r.status_code == 200, r.text
    expect(prompt_tokens_total=8 * 16, generation_tokens_total=8 * 20, length=8,
           time_to_first_token_seconds_count=8, time_per_output_token_seconds_count=8)
    preempted = server.engine.stats["preemptions"]
    assert preempted >= 4 and values(server)["preemptions_total"] == preempted


def test_an_abort_counts_its_prompt_and_the_tokens_made_before_it(server):
    before = values(server)
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 100, "ignore_eos": True,
                            "stream": True}) as r:
        next(r.iter_lines())                                     # the first token's event
    deadline = time.monotonic() + 20
    while True:                            # the abort counted and the gauges back at idle
        after = values(server)
        if (after["abort"] > before["abort"] and after["kv_blocks_used"] == 0) or \
                time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert after["abort"] == before["abort"] + 1
    assert after["prompt_tokens_total"] == before["prompt_tokens_total"] + 20
    made = after["generation_tokens_total"] - before["generation_tokens_total"]
    assert 1 <= made < 100                                       # some, but it never finished
    assert after["time_to_first_token_seconds_count"] == before["time_to_first_token_seconds_count"] + 1
    # Aborted after more than one token: it has a time per output token too (none if just one).
    assert (after["time_per_output_token_seconds_count"] - before["time_per_output_token_seconds_count"]
            == (1 if made > 1 else 0))
    for reason in ("length", "stop", "error"):
        assert after[reason] == before[reason]
    assert after["kv_blocks_used"] == after["num_requests_running"] == 0
