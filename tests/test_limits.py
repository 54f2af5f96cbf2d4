"""Every limit checked by a comparison, tested at the limit and one past it: prompt + max_tokens against
the model's context and the whole KV pool (exactly full is accepted and runs to "length"; one more token
is refused), token ids against the vocabulary, and the SamplingParams caps (logprobs, min_tokens, seed,
temperature, penalties). An off-by-one in any of them (`>=` for `>`) fails here. Limits are read from
the code's constants, not restated. The server's limits are in tests/test_serve_limits.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from hf_util import LLAMA
from tinyinfer import LLM, RequestError, SamplingParams
from tinyinfer.config.errors import InvalidParam
from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.engine.request import prompt_ids, validate_request
from tinyinfer.sampling.params import MAX_LOGPROBS, MIN_TEMPERATURE, PENALTY_RANGE, SEED_RANGE

# --------------------------------------------------------------------- validate_request, no model

CONFIG = SimpleNamespace(max_context=100, vocab_size=50)


def check(n_prompt: int, max_tokens: int, num_blocks: int = 64, block_size: int = 4,
          **params) -> None:
    validate_request([7] * n_prompt, SamplingParams(max_tokens=max_tokens, **params), CONFIG,
                     BlockManager(num_blocks, block_size))


@pytest.mark.parametrize("n_prompt", [1, 60, 99])
def test_prompt_plus_max_tokens_equal_to_the_context_is_accepted_one_more_refused(n_prompt):
    check(n_prompt, CONFIG.max_context - n_prompt)
    over = CONFIG.max_context - n_prompt + 1
    with pytest.raises(RequestError) as err:
        check(n_prompt, over)
    assert str(err.value) == (f"prompt of {n_prompt} tokens + max_tokens {over} = {CONFIG.max_context + 1} "
                              f"exceeds the model's context of {CONFIG.max_context} tokens; shorten the "
                              "prompt or lower max_tokens")
    with pytest.raises(RequestError, match="exceeds the model's context"):
        check(n_prompt + 1, CONFIG.max_context - n_prompt)


@pytest.mark.parametrize("num_blocks,block_size", [(5, 4), (3, 7), (1, 16)])
def test_prompt_plus_max_tokens_equal_to_the_kv_pool_is_accepted_one_more_refused(num_blocks,
                                                                                  block_size):
    pool = num_blocks * block_size                     # < the context of 100: the pool binds
    check(pool - 3, 3, num_blocks, block_size)
    check(1, pool - 1, num_blocks, block_size)
    with pytest.raises(RequestError, match=f"whole pool holds \\({pool} tokens\\)"):
        check(pool - 3, 4, num_blocks, block_size)
    with pytest.raises(RequestError, match="whole pool"):
        check(pool, 1, num_blocks, block_size)


def test_max_tokens_is_named_at_fault_exactly_when_a_one_token_prompt_could_not_fit_with_it():
    limit = CONFIG.max_context
    for n_prompt, max_tokens, field in [(1, limit, "max_tokens"), (2, limit - 1, None),
                                        (5, limit + 3, "max_tokens")]:
        with pytest.raises(RequestError) as err:
            check(n_prompt, max_tokens)
        assert err.value.field == field, (n_prompt, max_tokens)
    pool = 5 * 4                                                 # 5 blocks of 4: the pool binds
    for n_prompt, max_tokens, field in [(1, pool, "max_tokens"), (2, pool - 1, None),
                                        (9, pool - 4, None), (1, pool + 4, "max_tokens")]:
        with pytest.raises(RequestError) as err:
            check(n_prompt, max_tokens, 5, 4)
        assert err.value.field == field, (n_prompt, max_tokens)


def test_token_ids_at_the_vocabulary_edges():
    bm, v = BlockManager(64, 4), CONFIG.vocab_size
    validate_request([0, v - 1], SamplingParams(), CONFIG, bm)
    validate_request([1], SamplingParams(stop_token_ids=[0, v - 1]), CONFIG, bm)
    for bad in (v, -1):
        with pytest.raises(RequestError, match=f"prompt token id {bad} is outside the vocabulary"):
            validate_request([1, bad], SamplingParams(), CONFIG, bm)
    with pytest.raises(RequestError, match=f"stop_token_ids holds {v}, outside") as err:
        validate_request([1], SamplingParams(stop_token_ids=[v]), CONFIG, bm)
    assert err.value.field == "stop_token_ids"
    with pytest.raises(RequestError) as err:
        validate_request([], SamplingParams(), CONFIG, bm)
    assert str(err.value) == "empty prompt: give at least one token or character"
    with pytest.raises(RequestError) as err:
        validate_request([1], {"temperature": 0}, CONFIG, bm)
    assert str(err.value) == "sampling params must be a SamplingParams, got {'temperature': 0} (dict)"


@pytest.mark.parametrize("length", [39, 40, 41, 80])
def test_a_bad_prompt_is_quoted_whole_up_to_40_characters_then_cut(length):
    bad = b"x" * (length - 3)                                   # repr: b'xx...x', `length` characters
    with pytest.raises(RequestError) as err:
        prompt_ids(bad, None)
    shown = repr(bad) if length <= 40 else repr(bad)[:37] + "..."
    assert str(err.value) == (f"a prompt must be text (str) or a list of token ids, got {shown} (bytes); "
                              "decode bytes to str first")


def test_params_changed_after_construction_are_checked_again():
    params = SamplingParams(max_tokens=5)
    params.max_tokens = 0
    with pytest.raises(RequestError, match="max_tokens=0") as err:
        validate_request([1], params, CONFIG, BlockManager(64, 4))
    assert err.value.field == "max_tokens"


# ------------------------------------------------------------------------- SamplingParams caps

lo_seed, hi_seed = SEED_RANGE
lo_pen, hi_pen = PENALTY_RANGE
CAPS = {  # field: (values at the limit, accepted; values one step past it, refused)
    "max_tokens": ([1], [0]),
    "logprobs": ([0, MAX_LOGPROBS], [-1, MAX_LOGPROBS + 1]),
    "seed": ([lo_seed, hi_seed - 1], [lo_seed - 1, hi_seed]),
    "temperature": ([0.0, MIN_TEMPERATURE], [MIN_TEMPERATURE / 2, -MIN_TEMPERATURE]),
    "repetition_penalty": ([lo_pen, hi_pen], [lo_pen / 2, hi_pen * 2]),
    "top_k": ([0], [-1]),
    "top_p": ([1.0, 1e-9], [0.0, 1.0 + 1e-9]),
    "min_p": ([0.0, 1.0], [-1e-9, 1.0 + 1e-9]),
}


@pytest.mark.parametrize("field", list(CAPS))
def test_sampling_params_at_each_limit_and_one_past(field):
    ok, bad = CAPS[field]
    for value in ok:
        SamplingParams(**{field: value})
    for value in bad:
        with pytest.raises(InvalidParam, match=f"{field}=") as err:
            SamplingParams(**{field: value})
        assert err.value.field == field


def test_min_tokens_up_to_max_tokens():
    SamplingParams(max_tokens=7, min_tokens=7)
    SamplingParams(max_tokens=7, min_tokens=0)
    for bad in (8, -1):
        with pytest.raises(InvalidParam, match=f"min_tokens={bad} is invalid"):
            SamplingParams(max_tokens=7, min_tokens=bad)


# -------------------------------------------------------------------------- engine, demo model


@pytest.fixture(scope="module")
def roomy() -> LLM:
    """The context binds (the pool is larger)."""
    return LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=4096)


@pytest.fixture(scope="module")
def small_pool() -> LLM:
    """The pool binds: 6 blocks of 16 tokens, far below the context."""
    return LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=96)


def run_to(llm: LLM, total: int, max_tokens: int):
    prompt = [(7 * i) % 900 + 3 for i in range(total - max_tokens)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate([prompt], params)[0]


@pytest.mark.parametrize("which", ["context", "pool"])
def test_engine_runs_a_request_that_fills_the_limit_exactly_and_refuses_one_more(roomy, small_pool,
                                                                              which):
    llm = roomy if which == "context" else small_pool
    context, pool = llm.engine.config.max_context, llm.engine.kv_tokens
    limit = min(context, pool)
    assert limit == (context if which == "context" else pool) and context != pool
    max_tokens = 9
    out = run_to(llm, limit, max_tokens)
    assert out.error is None and out.finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.token_ids) == limit and len(out.token_ids) == max_tokens
    over = run_to(llm, limit + 1, max_tokens)
    assert over.finish_reason == "error" and isinstance(over.error, RequestError)
    assert over.token_ids == []
    stats = llm.engine.stats
    assert stats["free_blocks"] == stats["num_blocks"]
