"""Load on the server: 64 concurrent streaming clients (the real `openai` client), 16 of which hang up
mid-stream. Every other stream completes in full with exactly the text offline `LLM.generate` gives
its seeded request; the 16 are aborted (not run to their 400 tokens); afterwards no KV block is held
and nothing is running or waiting. Bounded: 64 requests, a 90 s ceiling."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from hf_util import LLAMA
from serve_util import ServerThread, metric
from tinyinfer import LLM, LLMEngine, SamplingParams

import openai  # noqa: E402

OPTS = dict(device="cpu", dtype="float32", max_kv_tokens=4096)
PROMPTS = ["ROMEO:", "JULIET:\nO Romeo", "To be", "KING RICHARD III:\nNow is", "First Citizen:", "MENENIUS:"]
N, HANG_UP, KEEP_TOKENS, HANG_UP_TOKENS = 64, 16, 12, 400


def params(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_k=40, seed=1000 + i, max_tokens=KEEP_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def server():
    srv = ServerThread(LLMEngine(LLAMA, **OPTS), name="demo")
    yield srv
    srv.stop()


async def client_run(aclient: openai.AsyncOpenAI, i: int) -> dict:
    hang_up = i % 4 == 0                                 # 16 of 64
    stream = await aclient.completions.create(
        model="demo", prompt=PROMPTS[i % len(PROMPTS)], stream=True, temperature=0.8, seed=1000 + i,
        max_tokens=HANG_UP_TOKENS if hang_up else KEEP_TOKENS, extra_body={"top_k": 40, "ignore_eos": True})
    text, reason, chunks = "", None, 0
    async for chunk in stream:
        chunks += 1
        text += chunk.choices[0].text
        reason = chunk.choices[0].finish_reason
        if hang_up and chunks == 2:
            await stream.close()                          # the client goes away mid-stream
            break
    return {"text": text, "reason": reason, "hung_up": hang_up}


def test_64_streams_with_16_disconnects(server):
    async def main() -> list[dict]:
        aclient = server.client(asynchronous=True)
        try:
            return await asyncio.wait_for(asyncio.gather(*(client_run(aclient, i) for i in range(N))), 90)
        finally:
            await aclient.close()

    results = asyncio.run(main())
    kept = [i for i, r in enumerate(results) if not r["hung_up"]]
    assert len(kept) == N - HANG_UP
    ref = LLM(LLAMA, **OPTS).generate([PROMPTS[i % len(PROMPTS)] for i in kept], [params(i) for i in kept])
    for i, want in zip(kept, ref):
        assert results[i]["reason"] == "length" and results[i]["text"] == want.text, f"client {i}"

    deadline = time.monotonic() + 30
    while True:                                           # the engine thread handles the aborts
        text = httpx.get(server.url + "/metrics").text
        idle = all(metric(text, m) == 0 for m in ("tinyinfer_kv_blocks_used", "tinyinfer_num_requests_running",
                                                  "tinyinfer_num_requests_waiting"))
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert idle, text
    assert metric(text, 'tinyinfer_requests_total{finish_reason="abort"}') == HANG_UP
    assert metric(text, 'tinyinfer_requests_total{finish_reason="length"}') == N - HANG_UP
