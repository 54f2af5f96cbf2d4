"""Bad requests end alone, with a RequestError naming the problem; the good requests of the same call
get exactly the tokens they get alone. Also: one LLM / LLMEngine shared by several threads (calls run
one at a time, never inside each other's step) and 64-bit seeds."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from hf_util import LLAMA
from tinyinfer import LLM, LLMEngine, RequestError, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
GOOD = ["ROMEO:", [5, 6, 7, 8]]


@pytest.fixture(scope="module")
def llm():
    return LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=4096)


@pytest.fixture(scope="module")
def alone(llm):
    return [llm.generate([p], GREEDY)[0].token_ids for p in GOOD]


BAD_PROMPTS = {  # issue 20, cases 4 and 7: each refused alone, naming what it saw
    "none_id": ([5, None, 7], "item 1 is None"),
    "nested_list": ([[5, 6], [7]], "item 0 is [5, 6]"),
    "bool_id": ([5, True, 7], "item 1 is True"),
    "float_id": ([5, 6.0], "item 1 is 6.0"),
    "numpy_floats": (np.array([5.0, 6.0]), "item 0 is"),
    "numpy_2d": (np.array([[5, 6]]), "1-D"),
    "torch_bools": (torch.tensor([True, False]), "item 0 is"),
    "bytes": (b"ROMEO", "decode bytes"),
    "none": (None, "got None"),
    "dict": ({"prompt": "x"}, "got {'prompt': 'x'}"),
    "empty_text": ("", "empty prompt"),
    "empty_ids": ([], "empty prompt"),
    "out_of_vocab_numpy": (np.array([5, 10**6]), "token id 1000000 is outside the vocabulary"),
    "negative_id": ([5, -1], "token id -1 is outside"),
}


@pytest.mark.parametrize("name", list(BAD_PROMPTS))
def test_a_malformed_prompt_fails_alone_and_the_batch_finishes(llm, alone, name):
    bad, words = BAD_PROMPTS[name]
    outs = llm.generate([GOOD[0], bad, GOOD[1]], GREEDY)
    assert outs[1].finish_reason == "error" and isinstance(outs[1].error, RequestError)
    assert words in str(outs[1].error), str(outs[1].error)
    assert [outs[0].token_ids, outs[2].token_ids] == alone
    assert llm.stats["free_blocks"] == llm.stats["num_blocks"]


@pytest.mark.parametrize("ids", [np.array([5, 6, 7, 8]), torch.tensor([5, 6, 7, 8]),
                                 [np.int64(5), np.int32(6), np.uint16(7), torch.tensor(8)],
                                 (5, 6, 7, 8)], ids=["numpy", "torch", "mixed_scalars", "tuple"])
def test_token_ids_may_be_numpy_or_torch_integers(llm, alone, ids):
    out = llm.generate(ids, GREEDY)[0]                   # one prompt of ids, whatever its container
    assert out.token_ids == alone[1] and out.prompt_token_ids == [5, 6, 7, 8]
    assert all(type(t) is int for t in out.prompt_token_ids)
    assert llm.generate([GOOD[0], ids], GREEDY)[1].token_ids == alone[1]


def test_bad_or_mutated_sampling_params_fail_that_request_alone(llm, alone):
    mutated = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    mutated.top_p = 7.0                                  # assigned after construction: checked again
    outs = llm.generate([GOOD[0], "x", "y", GOOD[1]],
                        [GREEDY, mutated, {"temperature": 0}, GREEDY])
    assert "top_p=7.0" in str(outs[1].error) and "SamplingParams" in str(outs[2].error)
    assert all(o.finish_reason == "error" for o in outs[1:3])
    assert [outs[0].token_ids, outs[3].token_ids] == alone


@pytest.mark.parametrize("seed", [2**63, -2**63 - 1, 2**70])
def test_a_seed_beyond_64_bits_is_refused_by_name(seed):  # issue 20, case 2
    with pytest.raises(ValueError, match=rf"SamplingParams\.seed={seed} is invalid.*64 bits"):
        SamplingParams(seed=seed)


def test_seeds_at_the_64_bit_limits_sample(llm):
    outs = llm.generate(["ROMEO:"] * 2, [SamplingParams(seed=s, max_tokens=8, ignore_eos=True)
                                         for s in (2**63 - 1, -2**63)])
    assert all(o.finish_reason == "length" and len(o.token_ids) == 8 for o in outs)


def test_a_seed_set_past_64_bits_after_construction_fails_that_request_alone(llm, alone):
    params = SamplingParams(temperature=0.7, max_tokens=12)
    params.seed = 2**70
    outs = llm.generate([GOOD[0], GOOD[1]], [GREEDY, params])
    assert outs[1].finish_reason == "error" and "seed" in str(outs[1].error)
    assert outs[0].token_ids == alone[0]


# ------------------------------------------------------------------------------------------- threads

def test_two_threads_sharing_one_llm_get_their_own_outputs(llm):   # issue 20, case 1
    prompts = [["ROMEO:", "JULIET:"], ["To be", [9, 10, 11], "KING:"]]
    params = [SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)]
    want = [[o.token_ids for o in llm.generate(p, sp)] for p, sp in zip(prompts, params)]
    got, streamed, errors = [None, None], [[], []], []
    start = threading.Barrier(2)

    def run(i: int) -> None:
        try:
            start.wait()
            outs = llm.generate(prompts[i], params[i], on_token=lambda d: streamed[i].append(d))
            got[i] = [o.token_ids for o in outs]
        except Exception as err:                 # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == want
    for i in range(2):                           # each callback saw its own requests only, whole
        by_id: dict[str, list[int]] = {}
        for d in streamed[i]:
            by_id.setdefault(d.request_id, []).extend(d.new_token_ids)
        assert sorted(map(tuple, by_id.values())) == sorted(map(tuple, want[i]))


def test_engine_calls_from_several_threads_never_run_inside_a_step():
    engine = LLMEngine(LLAMA, device="cpu", dtype="float32", max_kv_tokens=4096)
    runner, execute = engine.runner, engine.runner.execute
    inside, overlaps = [0], []

    def guarded(batch, **kw):                    # fails if another call enters during a step
        inside[0] += 1
        if inside[0] > 1:
            overlaps.append(threading.current_thread().name)
        time.sleep(0.002)
        try:
            return execute(batch, **kw)
        finally:
            inside[0] -= 1

    runner.execute = guarded
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    alone = {}
    for i in range(6):
        rid = engine.add_request([5 + i, 6, 7], params)
        while engine.has_unfinished():
            for d in engine.step():
                alone.setdefault(d.request_id, []).extend(d.new_token_ids)
        alone[i] = alone.pop(rid)
    outputs: dict[str, list[int]] = {}
    added: dict[int, str] = {}
    stop, errors = threading.Event(), []
    deadline = time.monotonic() + 60

    def stepper() -> None:
        try:
            while (not stop.is_set() or engine.has_unfinished()) and time.monotonic() < deadline:
                for d in engine.step():
                    outputs.setdefault(d.request_id, []).extend(d.new_token_ids)
        except Exception as err:                 # reported below
            errors.append(err)

    def adder() -> None:
        try:
            for i in range(6):
                added[i] = engine.add_request([5 + i, 6, 7], params)
                engine.logits([1, 2, 3])         # a teacher-forced pass between the steps
                time.sleep(0.003)
        except Exception as err:                 # reported below
            errors.append(err)

    threads = [threading.Thread(target=stepper, name="stepper"),
               threading.Thread(target=adder, name="adder")]
    for t in threads:
        t.start()
    threads[1].join(120)
    stop.set()
    threads[0].join(120)
    del runner.execute
    assert not errors and not overlaps, f"calls ran inside another thread's step: {overlaps}, {errors}"
    assert {i: outputs[rid] for i, rid in added.items()} == alone
