"""Test helpers: goodness-of-fit statistics for the samplers' distribution tests (Pearson's chi-square
through the regularized incomplete gamma function, and the total variation distance)."""
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


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts.double() / counts.sum() - probs.double()).abs().sum())
