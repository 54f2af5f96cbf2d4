"""Constrained decoding in the engine (engine/grammar.py), checked against something independent of the
grammar engine: every sampled output parses and validates with `jsonschema`, regex outputs satisfy
`re.fullmatch`, choice outputs are in the list -- at temperature 1.0, batched with different
constraints, across preemption, chunked prefill and prefix caching, seeded (the same tokens alone and in
a batch). EOS only where the grammar accepts; a complete grammar stops the request; max_tokens
mid-structure is "length"; a constraint that cannot compile, a draft, or a missing llguidance is a
RequestError naming the field."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from hf_util import LLAMA
from tinyinfer import LLMEngine, RequestError, SamplingParams, StructuredOutput
from tinyinfer.loading.token_bytes import token_bytes

SCHEMAS = json.loads((Path(__file__).parent / "data" / "structured_schemas.json").read_text())
SUITE = ["nested_object", "array_objects", "anyof_objects", "pattern_date", "unicode_enum", "enum_mixed",
         "recursive_tree", "number_bounds", "optional_fields", "defs_ref", "escaped_keys", "type_union"]
PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo", "To be", "First Citizen:\nBefore we proceed any further"]


@pytest.fixture(scope="module")
def engine():
    # No prefix cache: the tests below build engines over the same runner (LLMEngine.from_runner),
    # whose steps write KV blocks this engine would otherwise keep as cached prefixes.
    return LLMEngine(LLAMA, device="cpu", dtype="float32", max_kv_tokens=8192, enable_prefix_caching=False)


def run(engine: LLMEngine, requests: dict[str, tuple[str, SamplingParams]], max_steps: int = 2000) -> dict:
    """request id -> (text, token ids, finish reason), all added before the first step."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(prompt, params, request_id=rid)
    out = {rid: ["", [], None] for rid in requests}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for d in engine.step():
            out[d.request_id][0] += d.new_text
            out[d.request_id][1] += d.new_token_ids
            out[d.request_id][2] = d.finish_reason
    assert not engine.has_unfinished()
    return {rid: tuple(v) for rid, v in out.items()}


def schema_params(name: str, seed: int, max_tokens: int = 400) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens,
                          structured=StructuredOutput(json_schema=SCHEMAS[name]))


def test_every_output_validates_in_a_batch_of_different_schemas(engine):
    reqs = {f"{name}/{s}": (PROMPTS[s % 4], schema_params(name, s)) for s, name in enumerate(SUITE)}
    reqs["free"] = ("ROMEO:", SamplingParams(temperature=1.0, seed=1, max_tokens=30))    # unconstrained
    got = run(engine, reqs)
    for rid, (text, _, reason) in got.items():
        if rid == "free":
            continue
        assert reason == "stop", (rid, text)
        jsonschema.validate(json.loads(text), SCHEMAS[rid.split("/")[0]])


def test_regex_choice_and_grammars_are_matched_whole(engine):
    cases = {
        "regex": (StructuredOutput(regex=r"[a-z]{2,8} [0-9]{1,3}(, [a-z]+){0,2}"),
                  lambda t: re.fullmatch(r"[a-z]{2,8} [0-9]{1,3}(, [a-z]+){0,2}", t)),
        "choice": (StructuredOutput(choice=["yes", "no", "maybe so", "ça va"]),
                   lambda t: t in ("yes", "no", "maybe so", "ça va")),
        "lark": (StructuredOutput(grammar='start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,2}/'),
                 lambda t: re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})*\)", t)),
        "gbnf": (StructuredOutput(grammar='root ::= "x=" [0-9] [0-9]? ";"'), lambda t: re.fullmatch(r"x=[0-9]{1,2};", t)),
    }
    reqs = {f"{k}/{s}": (PROMPTS[s], SamplingParams(temperature=1.0, seed=s, max_tokens=60, structured=c[0]))
            for k, c in cases.items() for s in range(4)}
    for rid, (text, _, reason) in run(engine, reqs).items():
        kind = rid.split("/")[0]
        assert reason in ("stop", "length"), rid
        if reason == "stop":
            assert cases[kind][1](text), (rid, text)
        else:            # cut by max_tokens: only the regex and lark grammars can run that long
            assert kind in ("regex", "lark"), (rid, text)


def test_a_seeded_request_draws_the_same_tokens_alone_in_a_batch_and_chunked(engine):
    p = schema_params("event", 11)
    alone = run(engine, {"a": (PROMPTS[3], p)})["a"]
    batch = run(engine, {"a": (PROMPTS[3], p), "b": ("To be", schema_params("product", 2)),
                         "c": ("ROMEO:", SamplingParams(temperature=0.8, seed=5, max_tokens=40))})["a"]
    chunked = LLMEngine.from_runner(engine.runner, engine.tokenizer, max_num_seqs=4,
                                   max_num_batched_tokens=8)
    assert alone == batch == run(chunked, {"a": (PROMPTS[3], p)})["a"]
    jsonschema.validate(json.loads(alone[0]), SCHEMAS["event"])


def test_preemption_keeps_the_matcher_and_the_tokens(engine):
    reqs = {f"r{i}": (PROMPTS[i], schema_params(name, i, max_tokens=80)) for i, name in
            enumerate(["array_objects", "nested_object", "event", "product"])}
    ample = run(engine, reqs)
    tiny = LLMEngine(LLAMA, device="cpu", dtype="float32", max_kv_tokens=8 * 16)   # 4 requests do not fit
    assert run(tiny, reqs) == ample
    assert tiny.stats["preemptions"] > 0, "the small pool should have forced preemption"


def test_prefix_cache_hits_change_nothing(engine):
    cached = LLMEngine.from_runner(engine.runner, engine.tokenizer, enable_prefix_caching=True)
    prompt = PROMPTS[3] * 4                                    # several full blocks
    first = run(cached, {"a": (prompt, schema_params("weather", 4))})["a"]
    second = run(cached, {"b": (prompt, schema_params("weather", 4))})["b"]
    assert cached.stats["prefix_cache_hits"] > 0 and first == second


def test_eos_only_where_the_grammar_accepts(engine):
    g, eos = engine.grammars, engine.config.eos_token_ids[0]
    m = g.matcher(StructuredOutput(regex="[ab]+(c[ab])?"))

    def allowed() -> torch.Tensor:
        logits = torch.zeros(1, engine.config.vocab_size)
        g.start_masks([m]).apply(logits, [0])
        return logits[0] == 0
    pieces = token_bytes(engine.tokenizer, engine.config.vocab_size).tokens
    a, c = (max(i for i, t in enumerate(pieces) if t == ch) for ch in (b"a", b"c"))   # not byte pieces
    assert not allowed()[eos] and allowed()[a] and not allowed()[c]      # "" is not in the language
    assert m.accept(a) is None and allowed()[eos] and allowed()[c] and not m.done   # "a" is
    assert m.accept(c) is None and not allowed()[eos] and not m.done                # "ac" is not
    assert m.accept(a) is None and allowed()[eos] and not allowed()[c]              # "aca" is
    assert m.accept(eos) is None and m.done
    assert m.accept(a) is not None                         # nothing after the end


def test_complete_grammar_stops_and_max_tokens_mid_structure_is_length(engine):
    got = run(engine, {"short": ("ROMEO:", schema_params("event", 1, max_tokens=6)),
                       "whole": ("ROMEO:", SamplingParams(temperature=1.0, seed=1, max_tokens=50,
                                                          structured=StructuredOutput(choice=["ok"])))})
    text, ids, reason = got["short"]
    assert reason == "length" and len(ids) == 6 and text.startswith("{")
    with pytest.raises(ValueError):
        json.loads(text)
    text, ids, reason = got["whole"]
    assert (text, reason) == ("ok", "stop") and engine.config.eos_token_ids[0] not in ids


def test_logprobs_list_only_allowed_tokens(engine):
    p = SamplingParams(temperature=1.0, seed=3, max_tokens=5, logprobs=5,
                       structured=StructuredOutput(choice=["yes", "no"]))
    engine.add_request("ROMEO:", p, request_id="lp")
    first = None
    while engine.has_unfinished():
        for d in engine.step():
            first = first or d.new_logprobs
    top = first[0].top
    assert 1 <= len(top) <= 4 and all(engine.tokenizer.decode([t]).strip() in ("y", "n", "")
                                      for t, _ in top)


@pytest.mark.parametrize("so, field", [
    (StructuredOutput(json_schema={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),
     "structured.json_schema"),
    (StructuredOutput(json_schema={"type": "frobnicate"}), "structured.json_schema"),
    (StructuredOutput(regex="(unclosed"), "structured.regex"),
    (StructuredOutput(grammar="start: undefined_rule"), "structured.grammar"),
    (StructuredOutput(grammar="this is not a grammar ::= ::="), "structured.grammar"),
])
def test_a_constraint_that_cannot_compile_is_refused_and_the_engine_goes_on(engine, so, field):
    with pytest.raises(RequestError) as err:
        engine.add_request("ROMEO:", SamplingParams(structured=so))
    assert err.value.field == field and "cannot" in str(err.value)
    assert run(engine, {"next": ("ROMEO:", schema_params("flat_person", 0))})["next"][2] == "stop"


def test_speculative_decoding_is_refused_with_structured_output():
    spec = LLMEngine(LLAMA, device="cpu", dtype="float32", max_kv_tokens=1024, draft="ngram")
    with pytest.raises(RequestError, match="speculative") as err:
        spec.add_request("ROMEO:", SamplingParams(structured=StructuredOutput(json_object=True)))
    assert err.value.field == "structured" and not spec.has_unfinished()


def test_without_llguidance_the_request_names_the_pip_command(engine, monkeypatch):
    fresh = LLMEngine.from_runner(engine.runner, engine.tokenizer)
    monkeypatch.setitem(sys.modules, "llguidance", None)       # import llguidance -> ImportError
    with pytest.raises(RequestError, match="pip install llguidance") as err:
        fresh.add_request("ROMEO:", SamplingParams(structured=StructuredOutput(regex="a")))
    assert err.value.field == "structured"
    fresh.add_request("ROMEO:", SamplingParams(max_tokens=2))  # unconstrained requests still run
    while fresh.has_unfinished():
        fresh.step()
