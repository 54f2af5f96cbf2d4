"""The fuzz-style suite's hostile half (tests/test_fuzz.py has the checkpoint and request mutations):
single-bit flips in every section of a GGUF file, and hostile HTTP requests -- chat templates that
loop, explode or raise; bodies too large or too deep; amplification; stop-string and message floods.
Each ends in its specific error (or loads / is served), within bounded time and memory, and a seeded
request right after gets exactly the tokens it got alone. `make test` runs a sample drawn with a fresh
seed shown in the test id (TINYINFER_FUZZ_SEED=N replays it); `make fuzz` runs all of them."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

from chat_util import SCRIPT_TEMPLATE, demo_chat_model
from hf_util import REPO
from tinyinfer import LLMEngine

SEED = int(os.environ.get("TINYINFER_FUZZ_SEED") or random.SystemRandom().randrange(2**31))
ALLOWED = {"NoneType", "CheckpointError", "ConfigError"}   # loads, or a checkpoint / config error


def flips(tmp_path, per_section: int) -> list[dict]:
    run = subprocess.run([sys.executable, os.path.join(REPO, "tests", "gguf_hostile.py"),
                          str(tmp_path), "flips", str(SEED), str(per_section)],
                         capture_output=True, text=True, cwd=REPO, timeout=900,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def check_flips(results: list[dict], per_section: int) -> None:
    assert len(results) == 4 * per_section
    for r in results:
        assert r["error"] in ALLOWED, r
        assert r["error"] == "NoneType" or f"{r['case']}.gguf" in r["message"], r
        assert r["seconds"] < 5 and r["peak_mb"] - r["base_mb"] < 256, r
    refused = {r["case"].split("_")[1] for r in results if r["error"] != "NoneType"}
    assert "header" in refused, results                     # a flipped header never loads


@pytest.mark.parametrize("seed", [SEED], ids=lambda s: f"seed{s}")  # TINYINFER_FUZZ_SEED replays it
def test_gguf_bit_flips_sample(tmp_path, seed):
    check_flips(flips(tmp_path, 3), 3)


@pytest.mark.fuzz
def test_gguf_bit_flips(tmp_path):
    check_flips(flips(tmp_path, 40), 40)


# --------------------------------------------------------------------------------------- the server

TEMPLATES = {   # hostile chat templates -> words of their 400
    "nested_range": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                     "{% endfor %}", "did not finish"),
    "huge_output": ("{{ 'x' * 10**7 }}", "more than"),
    "zero_division": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    "memory_bomb": ("{{ ('x' * 10**5) * 10**5 }}", "chat template"),
    "raise": ("{{ raise_exception('no') }}", "refused the conversation"),
    "attribute": ("{{ messages.__class__.__mro__ }}", "unsafe"),
    "undefined_call": ("{{ nope() }}", "chat template"),
}
HI = [{"role": "user", "content": "hi"}]
REQUESTS = {    # case -> (path, body (bytes or JSON), status, param, words)
    "body_over_limit": ("completions", {"prompt": "x" * 300_000}, 413, None, "--max-request-bytes"),
    "nested_1000": ("completions", b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, None,
                    "not valid JSON"),
    "nested_in_metadata": ("completions", b'{"prompt": "a", "metadata": ' + b'{"a": ' * 300 +
                           b"1" + b"}" * 301, 400, None, "not valid JSON"),
    "invalid_utf8": ("completions", b'{"prompt": "\xff\xfe"}', 400, None, "not valid JSON"),
    "json_values": ("completions", b'{"prompt": [' + b",".join([b"1"] * 60_000) + b"]}", 413, None,
                    "JSON values"),
    "json_containers": ("completions", b'{"prompt": [' + b",".join([b"[1]"] * 6_000) + b"]}", 413,
                        None, "arrays and objects"),
    "prompts_x_n": ("completions", {"prompt": ["a"] * 1000, "n": 64}, 400, "n",
                    "--max-seqs-per-request"),
    "many_prompts": ("completions", {"prompt": ["a"] * 9}, 400, "prompt", "9 sequences"),
    "stop_count": ("completions", {"prompt": "a", "stop": ["x"] * 300}, 400, "stop", "at most 16"),
    "stop_length": ("completions", {"prompt": "a", "stop": ["x" * 3000]}, 400, "stop", "1000"),
    "messages_flood": ("chat/completions", {"messages": HI * 5_500}, 413, None, "arrays and objects"),
    "messages_over_cap": ("chat/completions", {"messages": HI * 51}, 400, "messages", "51 messages"),
    "max_tokens_huge": ("completions", {"prompt": "a", "max_tokens": 10**12}, 400, "max_tokens", ""),
    "chat_top_logprobs": ("chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 21},
                          400, "top_logprobs", "top_logprobs"),
    "chat_max_completion_tokens_0": ("chat/completions", {"messages": HI, "max_completion_tokens": 0},
                                     400, "max_completion_tokens", "max_completion_tokens"),
    **{f"template_{k}": ("chat/completions", {"messages": HI}, 400, "messages", w)
       for k, (_, w) in TEMPLATES.items()},
}
GOOD = {"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0.8, "seed": 1234, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    serve_util = pytest.importorskip("serve_util")
    from tinyinfer.serve.limits import Limits
    limits = Limits(max_request_bytes=200_000, max_seqs_per_request=8, template_timeout_s=2.0,
                    max_messages=50, max_json_values=50_000, max_json_containers=5_000)
    engine = LLMEngine(demo_chat_model(tmp_path_factory.mktemp("fz") / "m"), device="cpu",
                       dtype="float32", max_kv_tokens=512)
    srv = serve_util.ServerThread(engine, limits=limits)
    yield srv
    srv.stop()


def check_requests(server, cases: list[str]) -> None:
    import httpx
    solo = httpx.post(server.url + "/v1/completions", json=GOOD, timeout=60).json()["choices"]
    for case in cases:
        path, body, status, param, words = REQUESTS[case]
        if case.startswith("template_"):
            server.engine.tokenizer.chat_template = TEMPLATES[case[len("template_"):]][0]
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        t = time.perf_counter()
        try:
            r = httpx.post(f"{server.url}/v1/{path}", content=data, timeout=60,
                           headers={"Content-Type": "application/json"})
        finally:
            server.engine.tokenizer.chat_template = SCRIPT_TEMPLATE
        assert time.perf_counter() - t < 30, case                # bounded: no hang
        assert r.status_code == status, (case, r.text[:500])
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], (case, err)
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200, case
        again = httpx.post(server.url + "/v1/completions", json=GOOD, timeout=60).json()["choices"]
        assert again == solo, (case, again, solo)               # exactly its solo tokens
    stats = server.engine.stats
    assert stats["running"] == stats["waiting"] == 0 and stats["free_blocks"] == stats["num_blocks"]


@pytest.mark.parametrize("seed", [SEED], ids=lambda s: f"seed{s}")
def test_hostile_requests_sample(server, seed):
    check_requests(server, random.Random(seed).sample(sorted(REQUESTS), 8))


@pytest.mark.fuzz
def test_every_hostile_request(server):
    check_requests(server, sorted(REQUESTS))
