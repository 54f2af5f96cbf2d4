"""Bad input in the style of a fuzzer (issue 20): every mutation of a checkpoint (tests/fuzz_util.py)
is refused with a ConfigError / CheckpointError naming the field or tensor, or loads and generates;
every mutation of a request ends that request alone with a RequestError naming the field (or runs,
when it is at a limit rather than past it) while the good requests of the same batch get the tokens
they get alone; through the HTTP API the same mutations are 400s naming the field, and the server
stays up.

Two runs. Default (`make test`): each test samples TINYINFER_FUZZ_SAMPLES mutations of its kind
(default 12), drawn with a fresh seed shown in the test id (TINYINFER_FUZZ_SEED=N replays a run), a
few seconds in all. `pytest -m fuzz tests/test_fuzz.py` (or TINYINFER_FUZZ=1): every mutation as its
own test, and each checkpoint that loads compared with transformers loading the same files.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

import fuzz_util as fz
from hf_util import hf_logits, hf_model
from tinyinfer import LLM, LLMEngine, RequestError, SamplingParams
from tinyinfer.config.errors import CheckpointError, ConfigError, InvalidParam

SEED = int(os.environ.get("TINYINFER_FUZZ_SEED") or random.SystemRandom().randrange(2**31))
SAMPLES = int(os.environ.get("TINYINFER_FUZZ_SAMPLES", "12"))
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
GOOD = [[5, 6, 7], [9, 10, 11, 12]]


def sample(items: list, k: int = SAMPLES) -> list:
    return random.Random(SEED).sample(items, min(k, len(items)))


def checkpoint_mutations() -> list[fz.Mutation]:
    return fz.config_mutations() + fz.tensor_mutations() + fz.truncations(30, SEED)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mutation" in metafunc.fixturenames:          # the full run: one test per mutation
        metafunc.parametrize("mutation", checkpoint_mutations(), ids=lambda m: m.case)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return fz.write_checkpoint(tmp_path_factory.mktemp("fuzz") / "base")


def check_checkpoint(base_path: str, tmp_path, mutation: fz.Mutation, against_hf: bool = False) -> str:
    """Apply `mutation` to a copy of the base checkpoint: a named refusal, or a model that runs."""
    path = str(tmp_path / "ckpt")
    shutil.copytree(base_path, path)
    mutation.apply(path)
    try:
        llm = LLM(path, device="cpu", dtype="float32", max_kv_tokens=256)
    except (ConfigError, CheckpointError) as err:
        assert mutation.name in str(err), f"{mutation.case}: the error does not name {mutation.name}: {err}"
        return "refused"
    out = llm.generate(GOOD[0], GREEDY)[0]
    assert out.finish_reason == "length" or isinstance(out.error, RequestError), (mutation.case, out)
    if against_hf:                       # it loads: then as transformers loads it, or transformers refuses
        try:
            ref = hf_logits(hf_model(path), GOOD[0])
        except Exception:                # transformers refuses what tinyinfer reads: not a silent error
            return "loaded"
        torch.testing.assert_close(llm.logits(GOOD[0]), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()),
                                   msg=lambda m: f"{mutation.case} loads differently from transformers: {m}")
    return "loaded"


@pytest.mark.parametrize("seed", [SEED], ids=lambda s: f"seed{s}")
def test_checkpoint_mutations_sample(base, tmp_path, seed):
    mutations = checkpoint_mutations()
    picked = sample([m for m in mutations if m.case.startswith("config")]) + \
        sample([m for m in mutations if m.case.startswith("tensor")]) + \
        sample([m for m in mutations if m.case.startswith("truncated")], SAMPLES // 3)
    for i, mutation in enumerate(picked):
        check_checkpoint(base, tmp_path / str(i), mutation)


@pytest.mark.fuzz
def test_checkpoint_mutation(base, tmp_path, mutation):
    check_checkpoint(base, tmp_path, mutation, against_hf=True)


@pytest.mark.fuzz
def test_the_unmutated_checkpoint_matches_transformers(base):
    """The reference of the full run is real: transformers reads the base checkpoint as we do."""
    llm = LLM(base, device="cpu", dtype="float32", max_kv_tokens=256)
    ref = hf_logits(hf_model(base), GOOD[0])
    torch.testing.assert_close(llm.logits(GOOD[0]), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def check_gguf_truncations(tmp_path, count: int) -> None:
    """A GGUF file cut at random offsets: a CheckpointError naming the file, never another error."""
    import gguf_util
    path, _ = gguf_util.build(tmp_path, "llama")
    data, rng = open(path, "rb").read(), random.Random(SEED)
    for i, n in enumerate(sorted(rng.randrange(len(data)) for _ in range(count))):
        cut = tmp_path / f"cut{i}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=f"cut{i}.gguf"):
            LLM(str(cut), device="cpu", dtype="float32", max_kv_tokens=256)


@pytest.mark.parametrize("seed", [SEED], ids=lambda s: f"seed{s}")
def test_gguf_truncations_sample(tmp_path, seed):
    check_gguf_truncations(tmp_path, max(1, SAMPLES // 4))


@pytest.mark.fuzz
def test_gguf_truncations(tmp_path):
    check_gguf_truncations(tmp_path, 40)


# --------------------------------------------------------------------------------------- requests

@pytest.fixture(scope="module")
def llm():
    return LLM(fz.LLAMA, device="cpu", dtype="float32", max_kv_tokens=4096)


def check_batch(llm: LLM, cases: list[tuple[str, str, object, bool]], prompts: dict) -> None:
    """One generate call: the good prompts around every mutated request and every bad prompt."""
    alone = [llm.generate(p, GREEDY)[0].token_ids for p in GOOD]
    batch, params, expect = [GOOD[0]], [GREEDY], [None]
    for case, field, value, ok in cases:
        if not ok:                                 # refused at construction, naming the field
            try:
                SamplingParams(**{field: value})
            except InvalidParam as err:
                assert err.field == field and f"SamplingParams.{field}=" in str(err), case
        batch.append([5, 6, 7])
        params.append(fz.mutated_params(field, value))
        expect.append((case, field, ok))
    for name, prompt in prompts.items():
        batch.append(prompt)
        params.append(GREEDY)
        expect.append((f"prompt-{name}", None, False))
    batch.append(GOOD[1])
    params.append(GREEDY)
    expect.append(None)
    outs = llm.generate(batch, params)
    assert [outs[0].token_ids, outs[-1].token_ids] == alone, "a bad request changed the good ones"
    for out, want in zip(outs[1:-1], expect[1:-1]):
        case, field, ok = want
        if ok:
            assert out.finish_reason in ("length", "stop") and len(out.token_ids) <= 4, (case, out)
            assert all(0 <= t < 1024 for t in out.token_ids), case
        else:
            assert out.finish_reason == "error" and isinstance(out.error, RequestError), (case, out)
            if field is not None:
                assert field in str(out.error) and out.error.field in (field, None), (case, out.error)
    assert llm.stats["free_blocks"] == llm.stats["num_blocks"]


@pytest.mark.parametrize("seed", [SEED], ids=lambda s: f"seed{s}")
def test_request_mutations_sample(llm, seed):
    prompts = dict(sample(sorted(fz.BAD_PROMPTS.items(), key=lambda kv: kv[0]), SAMPLES // 2))
    check_batch(llm, sample(fz.params_cases(), 2 * SAMPLES), prompts)


@pytest.mark.fuzz
def test_every_request_mutation_in_one_batch(llm):
    check_batch(llm, fz.params_cases(), fz.BAD_PROMPTS)


# --------------------------------------------------------------------------------------- the server

# Fields the API takes as null (its default), and top_k -1 (vLLM's "off"): accepted there.
API_NULLABLE = {"temperature", "top_k", "top_p", "min_p", "max_tokens", "repetition_penalty", "seed",
                "stop", "stop_token_ids", "logprobs"}


def api_default(field: str, value) -> bool:
    return (value is None and field in API_NULLABLE) or (field == "top_k" and value == -1
                                                          and type(value) is int)


def http_cases() -> list[tuple[str, str, object, bool]]:
    """params_cases that JSON can carry, with the API's meaning (None and top_k -1: the default)."""
    out = []
    for case, field, value, ok in fz.params_cases():
        if field in ("skip_special_tokens", "structured"):  # not API fields (an unknown field is a 400;
            continue                                         # structured: response_format, structured_outputs)
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue
        out.append((case, field, value, ok or api_default(field, value)))
    return out


@pytest.fixture(scope="module")
def server():
    serve_util = pytest.importorskip("serve_util")
    srv = serve_util.ServerThread(LLMEngine(fz.LLAMA, device="cpu", dtype="float32", max_kv_tokens=2048))
    yield srv
    srv.stop()


def check_http(server, cases: list) -> None:
    import httpx
    base = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    for i, (case, field, value, ok) in enumerate(cases):
        body = dict(base, **({"prompt": value} if field == "prompt" else {field: value}))
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        if ok:                                       # the API's default max_tokens is 16
            limit = value if field == "max_tokens" and value is not None else 4 if field != "max_tokens" else 16
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= limit, (case, r.text)
        else:
            err = r.json()["error"]
            assert r.status_code == 400, (case, r.text)
            assert err["param"] == field or field in err["message"], (case, err)
        if i % 8 == 7 or i == len(cases) - 1:        # the server stays up, its engine idle
            assert httpx.post(server.url + "/v1/completions", json=base, timeout=60).status_code == 200
    stats = server.engine.stats
    assert stats["running"] == stats["waiting"] == 0 and stats["free_blocks"] == stats["num_blocks"]


HTTP_PROMPTS = [("prompt-none-id", "prompt", [5, None], False), ("prompt-bool-id", "prompt", [True, 5], False),
                ("prompt-float", "prompt", 1.5, False), ("prompt-object", "prompt", {"a": 1}, False),
                ("prompt-empty", "prompt", [], False), ("prompt-negative", "prompt", [5, -1], False),
                ("prompt-outside-vocab", "prompt", [1024], False), ("prompt-nested-empty", "prompt", [[]], False),
                ("prompt-too-long", "prompt", [5] * 3000, False), ("prompt-huge-id", "prompt", [2**70], False)]


@pytest.mark.parametrize("seed", [SEED], ids=lambda s: f"seed{s}")
def test_http_request_mutations_sample(server, seed):
    check_http(server, sample(http_cases(), SAMPLES) + sample(HTTP_PROMPTS, SAMPLES // 3))


@pytest.mark.fuzz
def test_every_http_request_mutation(server):
    check_http(server, http_cases() + HTTP_PROMPTS)


def test_the_mutation_lists_cover_every_field():
    from dataclasses import fields
    assert set(fz.LIMITS) == {f.name for f in fields(SamplingParams)}
    assert len(fz.config_mutations()) == len(fz.CONFIG_VALUES) * (len(fz.CONFIG) + len(fz.CONFIG["rope_parameters"]))
    assert {m.name for m in fz.tensor_mutations()} == set(fz.tensor_shapes())
