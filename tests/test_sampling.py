"""Sampler: processors against hand-computed examples, validation, keyed randomness, and the
distribution sampling must follow (chi-square, float64 references). Speculative rejection sampling:
tests/test_rejection_sampling.py."""
import math

import pytest
import torch

from stats_util import chi2_pvalue, row, total_variation
from tinyinfer.sampling.params import SamplingParams
from tinyinfer.sampling.processors import probabilities, process_logits
from tinyinfer.sampling.sampler import keyed_uniform, sample

INF = math.inf


# --- processors, hand-computed -------------------------------------------------------------------

def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    out = process_logits(row([2.0, -1.0, 0.5, 3.0]), [SamplingParams(repetition_penalty=2.0)], [[0, 1, 1]])
    assert torch.equal(out, row([1.0, -2.0, 0.5, 3.0]))


def test_temperature_divides_and_greedy_rows_are_untouched():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    out = process_logits(logits, [SamplingParams(temperature=0.5), SamplingParams(temperature=0.0)], [[], []])
    assert torch.equal(out, torch.tensor([[2.0, 4.0, 6.0], [1.0, 2.0, 3.0]]))


def test_top_k_keeps_the_k_largest():
    out = process_logits(row([1.0, 3.0, 2.0, 0.0, 2.5]), [SamplingParams(top_k=2)], [[]])
    assert torch.equal(out, row([-INF, 3.0, -INF, -INF, 2.5]))


def test_top_k_keeps_ties_at_the_cutoff():
    out = process_logits(row([1.0, 2.0, 2.0, 0.0]), [SamplingParams(top_k=2)], [[]])
    assert torch.equal(out, row([-INF, 2.0, 2.0, -INF]))
    out = process_logits(row([1.0, 2.0, 2.0, 0.0]), [SamplingParams(top_k=1)], [[]])
    assert torch.equal(out, row([-INF, 2.0, 2.0, -INF]))


@pytest.mark.parametrize("top_p, kept", [(0.4, 1), (0.75, 2), (0.85, 3), (1.0, 4)])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    logits = row([math.log(v) for v in (0.15, 0.5, 0.05, 0.3)])  # sorted: 0.5, 0.3, 0.15, 0.05
    out = process_logits(logits, [SamplingParams(top_p=top_p)], [[]])
    order = [1, 3, 0, 2]
    assert torch.isfinite(out[0, order[:kept]]).all()
    assert torch.isinf(out[0, order[kept:]]).all()
    assert torch.equal(out[0, order[:kept]], logits[0, order[:kept]])


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    logits = row([math.log(v) for v in (0.4, 0.3, 0.2, 0.1)])
    # After top-k=2 the mass is (4/7, 3/7): top_p=0.5 keeps one token (on the raw mass it would keep two).
    out = process_logits(logits, [SamplingParams(top_k=2, top_p=0.5)], [[]])
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]


@pytest.mark.parametrize("min_p, kept", [(0.2, 3), (0.7, 1), (0.0, 4), (1.0, 1)])
def test_min_p_drops_tokens_below_min_p_times_the_max(min_p, kept):
    logits = row([math.log(v) for v in (0.5, 0.3, 0.15, 0.05)])
    out = process_logits(logits, [SamplingParams(min_p=min_p)], [[]])
    assert torch.isfinite(out[0]).tolist() == [True] * kept + [False] * (4 - kept)


def test_probabilities_are_softmax_of_processed_and_one_hot_for_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    params = [SamplingParams(temperature=2.0, top_k=3), SamplingParams(temperature=0.0)]
    probs = probabilities(logits, params, [[], []])
    ref = torch.softmax(torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64), 0)
    torch.testing.assert_close(probs[0, :3].double(), ref)
    assert probs[0, 3] == 0
    assert torch.equal(probs[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_greedy_with_repetition_penalty_picks_the_penalised_argmax():
    params = [SamplingParams(temperature=0.0, repetition_penalty=4.0)]
    tok = sample(row([1.0, 3.0, 2.0]), params, [[1]], seeds=[0], steps=[0])
    assert tok.tolist() == [2]  # 3 / 4 = 0.75 < 2


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_k=10), dict(top_p=0.8, repetition_penalty=1.3),
                                dict(temperature=1.5, top_k=20, top_p=0.9, min_p=0.05),
                                dict(min_p=0.2, repetition_penalty=0.8)])
def test_processors_match_transformers_logits_processors(kw):
    lp = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 64, generator=g) * 3
    hist = torch.randint(0, 64, (4, 12), generator=g)
    p = SamplingParams(**kw)
    ref = lp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(hist, logits.clone())
    ref = lp.TemperatureLogitsWarper(p.temperature)(hist, ref)
    if p.top_k:
        ref = lp.TopKLogitsWarper(p.top_k)(hist, ref)
    if p.top_p < 1:
        ref = lp.TopPLogitsWarper(p.top_p)(hist, ref)
    if p.min_p:
        ref = lp.MinPLogitsWarper(p.min_p)(hist, ref)
    out = process_logits(logits, [p] * 4, hist.tolist())
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    torch.testing.assert_close(out[torch.isfinite(out)], ref[torch.isfinite(ref)])


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
    ("top_k", -1), ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2),
    ("min_p", -0.1), ("min_p", 1.1), ("max_tokens", 0), ("max_tokens", -3),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("seed", 1.5), ("stop", [""]), ("stop_token_ids", [-1]), ("ignore_eos", "yes"),
])
def test_invalid_values_raise_value_error_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_top_k_mixed_with_rows_that_turn_it_off():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    params = [SamplingParams(top_k=1), SamplingParams(), SamplingParams(top_k=3)]
    out = process_logits(logits, params, [[]] * 3)
    assert torch.isfinite(out).tolist() == [[False, True, False, False], [True] * 4,
                                            [True, True, True, False]]


def test_a_non_finite_row_does_not_disturb_the_others():
    # Finite rows (greedy, top-p, top-k, min-p) between rows holding NaN or inf: every finite row draws
    # what it draws alone (same seed and step), every non-finite one some index inside the vocabulary
    # (the engine then ends that request: its logits were not finite).
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [nan, 0.0, 1.0, 2.0], [0.3, 1.2, 1.1, 0.2],
                           [5.0, 0.0, inf, 1.0], [2.0, 1.0, 2.5, 0.0], [-inf, -inf, -inf, -inf],
                           [0.1, 0.4, 0.2, 0.3]])
    params = [SamplingParams(temperature=0.0), SamplingParams(top_p=0.9), SamplingParams(top_p=0.8),
              SamplingParams(top_k=2), SamplingParams(top_k=2, temperature=0.7), SamplingParams(),
              SamplingParams(min_p=0.5)]
    seeds, steps = [1, 2, 3, 4, 5, 6, 7], [0, 3, 1, 0, 2, 5, 4]
    toks = sample(logits, params, [[]] * 7, seeds, steps).tolist()
    finite = torch.isfinite(logits).all(dim=1).tolist()
    assert finite == [True, False, True, False, True, False, True]
    for b in range(7):
        assert 0 <= toks[b] < 4, (b, toks)
        if finite[b]:
            alone = sample(logits[b:b + 1], params[b:b + 1], [[]], seeds[b:b + 1], steps[b:b + 1])
            assert toks[b] == alone.item(), (b, toks)
    assert toks[0] == 1                                       # greedy: the argmax


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]


# --- keyed randomness ----------------------------------------------------------------------------

def test_keyed_uniform_is_uniform_and_in_the_open_interval():
    u = keyed_uniform(torch.tensor([7, 8]), torch.tensor([0, 5]), 0, 200_000, "cpu")
    assert 0 < float(u.min()) and float(u.max()) < 1
    counts = torch.stack([torch.histc(r, bins=20, min=0, max=1) for r in u])
    for c in counts:
        assert chi2_pvalue(c, torch.full((20,), 0.05)) > 1e-3


@pytest.mark.parametrize("other", ["next step", "next seed", "other stream"])
def test_keyed_uniforms_of_neighbouring_keys_are_independent(other):
    # Joint histogram of (u at key, u at a neighbouring key) over 4 x 4 bins must be flat.
    n = 100_000
    seeds, steps = torch.arange(n) * 2, torch.arange(n) % 97
    a = keyed_uniform(seeds, steps, 2, 1, "cpu")[:, 0]
    b = keyed_uniform(seeds + (other == "next seed"), steps + (other == "next step"),
                      2 + (other == "other stream"), 1, "cpu")[:, 0]
    cells = (a * 4).long() * 4 + (b * 4).long()
    assert chi2_pvalue(torch.bincount(cells, minlength=16), torch.full((16,), 1 / 16)) > 1e-3


def test_keyed_uniform_depends_only_on_its_key():
    a = keyed_uniform(torch.tensor([3, 2**40 + 3, -5]), torch.tensor([9, 9, 9]), 2, 64, "cpu")
    b = keyed_uniform(torch.tensor([-5, 3]), torch.tensor([9, 9]), 2, 64, "cpu")
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])  # high seed bits matter
    assert not torch.equal(a[0], keyed_uniform(torch.tensor([3]), torch.tensor([10]), 2, 64, "cpu")[0])
    assert not torch.equal(a[0], keyed_uniform(torch.tensor([3]), torch.tensor([9]), 1, 64, "cpu")[0])


def test_seeded_row_gives_the_same_token_alone_and_in_any_batch():
    g = torch.Generator().manual_seed(0)
    V = 50
    logits = torch.randn(9, V, generator=g) * 2
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=123)] + [
        SamplingParams(temperature=t, top_k=k, repetition_penalty=r)
        for t, k, r in [(0.0, 0, 1.0), (1.3, 5, 1.2), (0.5, 0, 1.0), (1.0, 10, 1.0),
                        (2.0, 0, 1.5), (0.7, 3, 1.0), (1.0, 0, 1.0), (0.0, 2, 1.1)]]
    hist = [[1, 2, 3]] + [[i, i + 1] for i in range(8)]
    seeds, steps = [123] + list(range(8)), [17] + list(range(8))
    for step in range(20):
        alone = sample(logits[:1], params[:1], hist[:1], seeds[:1], [step])
        perm = torch.randperm(9, generator=g).tolist()
        batch = sample(logits[perm], [params[i] for i in perm], [hist[i] for i in perm],
                       [seeds[i] for i in perm], [step if i == 0 else steps[i] for i in perm])
        assert batch[perm.index(0)] == alone[0]


def test_temperature_to_zero_limit_equals_greedy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 100, generator=g) * 3
    greedy = sample(logits, [SamplingParams(temperature=0.0)] * 64, [[]] * 64, range(64), [0] * 64)
    cold = sample(logits, [SamplingParams(temperature=1e-4)] * 64, [[]] * 64, range(64), [0] * 64)
    assert torch.equal(greedy, logits.argmax(-1)) and torch.equal(cold, greedy)
    probs = probabilities(logits, [SamplingParams(temperature=1e-4)] * 64, [[]] * 64)
    torch.testing.assert_close(probs, torch.nn.functional.one_hot(greedy, 100).float())


def reference_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                           min_p: float) -> torch.Tensor:
    """float64, one token at a time: softmax(logits / T) restricted by top-k, then top-p, then min-p."""
    p = torch.softmax(logits.double() / temperature, 0)
    order = sorted(range(len(p)), key=lambda i: -float(p[i]))
    keep = order[:top_k] if top_k else order
    mass = sum(float(p[i]) for i in keep)
    prefix, acc = [], 0.0
    for i in keep:
        prefix.append(i)
        acc += float(p[i]) / mass
        if acc >= top_p:
            break
    top = max(float(p[i]) for i in prefix)
    kept = [i for i in prefix if float(p[i]) >= min_p * top]
    out = torch.zeros_like(p)
    out[kept] = p[kept]
    return out / out.sum()


@pytest.mark.parametrize("temperature, top_k, top_p, min_p, vary", [
    (1.0, 0, 1.0, 0.0, "seed"), (0.7, 5, 1.0, 0.0, "step"), (1.3, 0, 0.8, 0.0, "seed"),
    (0.8, 6, 0.9, 0.0, "step"), (0.8, 6, 0.9, 0.0, "seed"), (1.0, 0, 1.0, 0.1, "step")])
def test_first_token_distribution_matches_restricted_softmax(temperature, top_k, top_p, min_p, vary):
    g = torch.Generator().manual_seed(2)
    V, N = 12, 100_000
    logits = torch.randn(V, generator=g) * 1.5
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)] * N
    ids = torch.arange(N)
    seeds = ids + 1000 if vary == "seed" else torch.full((N,), 4242)
    steps = torch.zeros(N, dtype=torch.long) if vary == "seed" else ids
    toks = sample(logits.expand(N, V), params, [[]] * N, seeds, steps)
    counts = torch.bincount(toks, minlength=V)
    ref = reference_distribution(logits, temperature, top_k, top_p, min_p)
    assert chi2_pvalue(counts, ref) > 1e-3
    assert total_variation(counts, ref) < 0.01
