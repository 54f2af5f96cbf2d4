"""The OpenAI-compatible server, through the real `openai` client on loopback: completions and chat,
streamed and not, logprobs, n, prompt forms -- each checked against offline `LLM.generate` / `LLM.chat`
on the same checkpoint (seeded requests get the same tokens however they are batched)."""
from __future__ import annotations

import asyncio
import time

import pytest

from chat_util import demo_chat_model
from serve_util import ServerThread, metric
from tinyinfer import LLM, LLMEngine, SamplingParams

import openai  # noqa: E402  (serve_util skips the module when the serve packages are missing)
import httpx  # noqa: E402

OPTS = dict(device="cpu", dtype="float32", max_kv_tokens=4096)
PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo", "To be", "KING RICHARD III:\nNow is the winter",
           "First Citizen:\nBefore we proceed", "MENENIUS:\nWhy"]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> str:
    return demo_chat_model(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(chat_dir):
    srv = ServerThread(LLMEngine(chat_dir, **OPTS), name="demo")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ref(chat_dir) -> LLM:
    return LLM(chat_dir, **OPTS)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def sp(seed: int, max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_k=40, seed=seed, max_tokens=max_tokens, **kw)


def test_completion_equals_offline_generate(client, ref):
    r = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=12, temperature=0.8,
                                  seed=3, extra_body={"top_k": 40})
    want = ref.generate(PROMPTS[0], sp(3))[0]
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids) and r.object == "text_completion"


def test_streamed_completion_arrives_token_by_token_and_adds_up(client, ref):
    chunks = list(client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=20, seed=4,
                                            temperature=0.8, stream=True, extra_body={"top_k": 40},
                                            stream_options={"include_usage": True}))
    want = ref.generate(PROMPTS[1], sp(4, 20))[0]
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == want.text and len(texts) >= 10          # one event per step with text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_completion_logprobs_are_the_engines(client, ref):
    r = client.completions.create(model="demo", prompt=PROMPTS[2], max_tokens=8, seed=5,
                                  temperature=0.8, logprobs=3, extra_body={"top_k": 40})
    want = ref.generate(PROMPTS[2], sp(5, 8, logprobs=3))[0]
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x.logprob for x in want.logprobs], abs=1e-5)
    assert all(len(top) == 3 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text                  # tokens with their spaces
    for tok, lpv, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tok not in top or top[tok] == pytest.approx(lpv)


def test_prompt_forms_and_n_choices(client, ref):
    ids = ref.tokenizer.encode(PROMPTS[3])
    for prompt in ([PROMPTS[3]], ids, [ids]):
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=6, seed=6, temperature=0.8,
                                      extra_body={"top_k": 40})
        assert r.choices[0].text == ref.generate([ids], sp(6, 6))[0].text
    r = client.completions.create(model="demo", prompt=[PROMPTS[0], PROMPTS[4]], n=2, max_tokens=6,
                                  seed=10, temperature=0.8, extra_body={"top_k": 40})
    want = ref.generate([PROMPTS[0], PROMPTS[0], PROMPTS[4], PROMPTS[4]],
                        [sp(10, 6), sp(11, 6), sp(10, 6), sp(11, 6)])       # choice j: seed + j
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [w.text for w in want]


def test_chat_equals_llm_chat_streamed_or_not(client, ref):
    msgs = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who goes?"}]
    want = ref.chat(msgs, sp(7, 16, logprobs=2))[0]
    r = client.chat.completions.create(model="demo", messages=msgs, max_completion_tokens=16, seed=7,
                                       temperature=0.8, logprobs=True, top_logprobs=2,
                                       extra_body={"top_k": 40})
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    content = r.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([x.logprob for x in want.logprobs], abs=1e-5)
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)
    chunks = list(client.chat.completions.create(model="demo", messages=msgs, max_tokens=16, seed=7,
                                                 temperature=0.8, stream=True, extra_body={"top_k": 40}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_concurrent_seeded_requests_equal_each_alone(server, ref):
    async def main():
        aclient = server.client(asynchronous=True)
        jobs = [aclient.completions.create(model="demo", prompt=PROMPTS[i % 6], max_tokens=10 + i,
                                           seed=100 + i, temperature=0.8, stream=False,
                                           extra_body={"top_k": 40, "ignore_eos": True})
                for i in range(12)]
        out = await asyncio.gather(*jobs)
        await aclient.close()
        return out

    results = asyncio.run(main())
    for i, r in enumerate(results):
        alone = ref.generate(PROMPTS[i % 6], sp(100 + i, 10 + i, ignore_eos=True))[0]
        assert r.choices[0].text == alone.text and r.usage.completion_tokens == 10 + i


def aborted(text: str) -> float:
    name = 'tinyinfer_requests_total{finish_reason="abort"}'
    return metric(text, name) if name in text else 0.0


def wait_for_abort(server, before: float) -> str:
    """/metrics once the engine counted one more abort and holds no block (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(server.url + "/metrics").text
        idle = metric(text, "tinyinfer_kv_blocks_used") == 0 == metric(text, "tinyinfer_num_requests_running")
        if (aborted(text) > before and idle) or time.monotonic() > deadline:
            return text


def test_first_chunk_arrives_before_the_request_ends(client, server):
    before = aborted(httpx.get(server.url + "/metrics").text)
    stream = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=500, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    stream.close()                        # 499 tokens to go: only an incremental server got here
    assert first.choices[0].finish_reason is None
    text = wait_for_abort(server, before)
    assert aborted(text) == before + 1
    assert metric(text, "tinyinfer_kv_blocks_used") == 0 and metric(text, "tinyinfer_num_requests_running") == 0


def test_a_client_that_stops_waiting_for_a_whole_response_is_aborted(server):
    before = aborted(httpx.get(server.url + "/metrics").text)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", timeout=0.5,
                   json={"prompt": PROMPTS[0], "max_tokens": 1000, "ignore_eos": True})
    text = wait_for_abort(server, before)
    assert aborted(text) == before + 1 and metric(text, "tinyinfer_kv_blocks_used") == 0


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in ("tinyinfer_num_requests_running", "tinyinfer_num_requests_waiting",
                 "tinyinfer_kv_blocks_used", "tinyinfer_kv_blocks_total", "tinyinfer_prompt_tokens_total",
                 "tinyinfer_generation_tokens_total", "tinyinfer_preemptions_total",
                 'tinyinfer_requests_total{finish_reason="length"}',
                 "tinyinfer_time_to_first_token_seconds_count",
                 "tinyinfer_time_per_output_token_seconds_count"):
        assert metric(text, name) >= 0
    assert metric(text, "tinyinfer_kv_blocks_total") == server.engine.blocks.num_blocks
    assert metric(text, "tinyinfer_generation_tokens_total") > 0
