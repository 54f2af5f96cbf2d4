"""Test helpers: goodness-of-fit statistics for the samplers' distribution tests (Pearson's chi-square
through the regularized incomplete gamma function, over tokens or over whole sampled outcomes, and
the total variation distance)."""
from __future__ import annotations

import torch


def row(values):
    return torch.tensor([values], dtype=torch.float32)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; categories with probability 0 must be empty."""
    counts, probs = counts.double(), probs.double()
    support = probs > 0
    assert counts[~support].sum() == 0, f"sampled a token outside the support: {counts[~support]}"
    expected = counts.sum() * probs[support]
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    if df == 0:
        return 1.0
    # Survival function of chi2(df): regularized upper incomplete gamma Q(df/2, stat/2).
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def chi2_outcomes(outcomes: list, exact: dict) -> tuple[float, int, float]:
    """Pearson chi-square of sampled outcomes (hashable, e.g. token triples) against their exact
    probabilities: each outcome expected >= 5 times is its own category, the rest one "other"
    category. -> (statistic, degrees of freedom, p-value)."""
    n = len(outcomes)
    counts: dict = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    likely = [t for t, p in exact.items() if p * n >= 5]
    expected = [exact[t] * n for t in likely]
    observed = [counts.get(t, 0) for t in likely]
    expected.append(n - sum(expected))                  # "other": every remaining outcome
    observed.append(n - sum(observed))
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = len(expected) - 1
    p_value = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64)).item()
    return stat, df, p_value


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts.double() / counts.sum() - probs.double()).abs().sum())
