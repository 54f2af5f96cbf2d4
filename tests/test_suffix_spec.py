"""The suffix proposer (engine/suffix_proposer.py, engine/suffix_automaton.py): the automaton against
brute force over random texts (longest repeated suffix, occurrence counts, matches against another
text, continuations that really occur), the store's bound, the adaptive length against the formula
it maximizes; in the engine, greedy output identical to plain greedy decoding (adaptive and fixed
length, batch, preemption, prefix caching on and off, mixed speculating / plain steps), drafts from
other requests' outputs, and acceptance in /metrics. The chi-square test of sampled output is
test_speculative.py's, run for the suffix proposer too."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from tinyinfer import LLM, SamplingParams
from tinyinfer.engine.suffix_automaton import SuffixAutomaton, SuffixStore
from tinyinfer.engine.suffix_proposer import SuffixProposer, best_length

ROOT = Path(__file__).resolve().parent.parent
TARGET = str(ROOT / "models" / "shakespeare-llama")
TEXT = (ROOT / "data" / "tinyshakespeare-val-slice.txt").read_text()


def occurrences(text: list[int], pattern: list[int]) -> list[int]:
    """End positions (exclusive) of every occurrence of pattern in text."""
    n = len(pattern)
    return [i + n for i in range(len(text) - n + 1) if text[i:i + n] == pattern]


@pytest.mark.parametrize("seed", range(6))
def test_automaton_against_brute_force(seed):
    rng = random.Random(seed)
    alphabet = rng.choice([2, 3, 5])
    text = [rng.randrange(alphabet) for _ in range(rng.randrange(1, 60))]
    sam = SuffixAutomaton()
    for i, c in enumerate(text):
        sam.extend(c)
        prefix = text[:i + 1]
        # Longest suffix that also ends earlier, and its occurrence count.
        want = next(n for n in range(len(prefix) - 1, -1, -1)
                    if n == 0 or len(occurrences(prefix[:-1], prefix[-n:])) > 0)
        state, got = sam.repeated_suffix()
        assert got == want, (prefix, got, want)
        if want:
            assert sam.count[state] == len(occurrences(prefix, prefix[-want:]))
            cont = sam.continuation(state, 5)
            # The match + its continuation occurs in the text, and each token is a most frequent one.
            assert occurrences(prefix, prefix[-want:] + cont)
            if cont:
                follow = [prefix[e] for e in occurrences(prefix[:-1], prefix[-want:])]
                assert follow.count(cont[0]) == max(follow.count(t) for t in set(follow))
    # Matching another text: the longest suffix of each of its prefixes that is a substring here.
    other = [rng.randrange(alphabet) for _ in range(30)]
    state = matched = 0
    for i, c in enumerate(other):
        state, matched = sam.step(state, matched, c)
        want = max(n for n in range(i + 2) if n == 0 or occurrences(text, other[i + 1 - n:i + 1]))
        assert matched == want
    assert len(sam.length) <= max(2 * len(text), 2)          # at most 2n states (n >= 2), 1 + 1 for n = 1


def test_store_stays_within_its_capacity_and_never_matches_across_outputs():
    store = SuffixStore(capacity=100)
    rng = random.Random(0)
    for _ in range(50):
        store.add([rng.randrange(50) for _ in range(rng.randrange(1, 40))])
        assert store.tokens <= 100
        assert len(store.sam.length) <= 2 * (store.tokens + len(store.docs)) + 1
    store = SuffixStore(capacity=1000)
    store.add([1, 2, 3])
    store.add([4, 5])
    state, matched = store.sam.match([2, 3])
    assert matched == 2 and store.sam.continuation(state, 4) == []   # stops at the separator
    state, matched = store.sam.match([9, 4])
    assert matched == 1 and store.sam.continuation(state, 4) == [5]


def test_adaptive_length_maximizes_expected_tokens_per_cost():
    assert best_length(0.0, 8, 0.1, 0.15) == 0               # nothing is ever accepted: plain decoding
    assert best_length(0.999, 8, 0.1, 0.15) == 8
    lengths = [best_length(a / 20, 8, 0.1, 0.15) for a in range(20)]
    assert lengths == sorted(lengths) and lengths[0] == 0 < lengths[-1]
    for a in (0.3, 0.6, 0.9):                                 # against the formula, term by term
        rate = [(1 - a ** (d + 1)) / (1 - a) / (1 + (d > 0) * 0.1 + 0.15 * d) for d in range(9)]
        assert best_length(a, 8, 0.1, 0.15) == max(range(9), key=lambda d: (rate[d], -d))


# ---------------------------------------------------------------------------------------------- engine

POOL, PREEMPT_POOL = 8192, 768
GREEDY = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    from tinyinfer.loading.tokenizer import Tokenizer
    ids = Tokenizer.from_dir(Path(TARGET)).encode(TEXT[:4000])
    # Some prompts repeat themselves (the proposer drafts), some do not (it decodes them plainly).
    out = [ids[s:s + n] for s, n in zip([0, 97, 211, 340, 452, 601], [2, 60, 7, 33, 14, 48])]
    return out[:3] + [ids[0:40] * 3, ids[500:530] * 2, out[3] + out[3]] + out[3:]


@pytest.fixture(scope="module")
def reference(prompts) -> list[list[int]]:
    plain = LLM(TARGET, device="cpu", dtype="float32", max_kv_tokens=POOL)
    return [o.token_ids for o in plain.generate(prompts, GREEDY)]


class Recorder(SuffixProposer):
    """Records each step's draft lengths."""

    def propose(self, seqs, limits):
        prop = super().propose(seqs, limits)
        self.steps = getattr(self, "steps", []) + [[len(t) for t in prop.tokens]]
        return prop


@pytest.mark.parametrize("case", ["batch", "preempt", "no-prefix-cache", "fixed-k"])
@pytest.mark.parametrize("k", [2, 8])
def test_greedy_output_equals_plain_greedy(case, k, prompts, reference):
    llm = LLM(TARGET, device="cpu", dtype="float32", max_kv_tokens=PREEMPT_POOL if case == "preempt" else POOL,
              enable_prefix_caching=case != "no-prefix-cache")
    proposer = Recorder(adaptive=case != "fixed-k")
    spec = llm.engine.set_speculator(proposer, k)
    for rnd in range(2):                # the second round also drafts from the first round's outputs
        got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        for i, (g, w) in enumerate(zip(got, reference)):
            first = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), None)
            assert first is None, f"round {rnd}, prompt {i}: first difference at output token {first}"
    assert spec.accepted > 0 and spec.proposed > spec.accepted
    # Mixed steps: some sequences verified drafts while others in the same pass drafted none.
    assert any(0 in s and max(s) > 0 for s in proposer.steps)
    if case == "preempt":
        assert llm.stats["preemptions"] > 0
    if case == "batch":
        assert llm.stats["prefix_cache_hits"] > 0
    assert llm.stats["free_blocks"] == llm.stats["num_blocks"]
    assert not proposer.requests                              # every finished request forgotten


def test_a_step_where_nobody_drafts_runs_plainly(prompts, reference):
    """Acceptance learned as hopeless (alpha 0, no probes): every step is a plain step -- the verify
    pass (all_logits=True) never runs -- and the output is plain decoding's."""
    llm = LLM(TARGET, device="cpu", dtype="float32", max_kv_tokens=POOL)
    proposer = SuffixProposer(probe=10 ** 9)
    proposer.model.alpha = lambda key: 0.0
    spec = llm.engine.set_speculator(proposer, 8)
    runner, verifies = llm.engine.runner, []
    execute = runner.execute
    runner.execute = lambda batch, all_logits=False, **kw: (verifies.append(all_logits),
                                                            execute(batch, all_logits, **kw))[1]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == reference
    assert not any(verifies) and spec.proposed == 0 and set(spec.drafts) == {0}
    assert spec.figures()["tokens_per_target_step"] == 1.0


def test_a_request_drafts_from_an_earlier_requests_output(prompts):
    llm = LLM(TARGET, device="cpu", dtype="float32", max_kv_tokens=POOL, draft="suffix", speculate_k=8)
    spec = llm.engine.speculator
    first = llm.generate([prompts[1]], GREEDY)[0]
    assert spec.proposer.store.tokens == len(first.token_ids)
    spec.reset_stats()
    # Same prompt again: its own text does not repeat much, the store holds the whole answer.
    assert llm.generate([prompts[1]], GREEDY)[0].token_ids == first.token_ids
    assert spec.figures()["tokens_per_target_step"] > 3.0


def test_metrics_report_draft_and_accepted_tokens(prompts):
    import httpx
    from serve_util import ServerThread, metric
    from tinyinfer import LLMEngine
    engine = LLMEngine(TARGET, device="cpu", dtype="float32", max_kv_tokens=POOL, draft="suffix",
                       speculate_k=4)
    srv = ServerThread(engine, name="demo")
    try:
        body = {"model": "demo", "prompt": prompts[3], "max_tokens": 48, "temperature": 0.0,
                "ignore_eos": True}
        for _ in range(2):
            assert httpx.post(srv.url + "/v1/completions", json=body, timeout=120).status_code == 200
        text = httpx.get(srv.url + "/metrics").text
        drafted = metric(text, "tinyinfer_spec_decode_num_draft_tokens_total")
        accepted = metric(text, "tinyinfer_spec_decode_num_accepted_tokens_total")
        stats = engine.stats
        assert (drafted, accepted) == (stats["spec_draft_tokens"], stats["spec_accepted_tokens"])
        assert 0 < accepted <= drafted
    finally:
        srv.stop()


def test_draft_suffix_from_the_command_line():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "tinyinfer.generate", "--ckpt", TARGET, "--device", "cpu",
                        "--draft", "suffix", "--speculate-k", "4", "--max-tokens", "24",
                        "--temperature", "0", "--prompt", TEXT[:200]],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "acceptance_rate" in r.stdout + r.stderr
