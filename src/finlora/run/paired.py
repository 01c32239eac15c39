"""Comparisons of two cells of a study whose jobs share their seeds: each seed fixes the data order and the
initialisation in every cell, so a difference is taken seed by seed (a paired t interval), not between two
means. Also the tests a study report states its claims with: equivalence within a margin fixed in advance
(two one-sided tests, TOST), Holm's correction of a family of p-values, McNemar's exact test on the rows two
runs scored, and a bootstrap over seeds and rows. Student's t comes from `finlora.run.stats` (closed form,
checked against the tables there), so nothing here needs scipy.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from finlora.run.stats import t_cdf, t_quantile


@dataclass(frozen=True)
class Paired:
    """a − b over the seeds both cells have: per-seed differences, their mean, standard deviation and standard
    error, the 95% t interval of the mean (n − 1 degrees of freedom) and the two-sided p-value of mean = 0.
    `unpaired`: seeds only one side has (left out). No spread, interval or p-value with fewer than 2 pairs;
    no p-value (and a zero-width interval) when every pair differs by the same amount."""

    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    mean: float
    sd: float | None = None
    se: float | None = None
    low: float | None = None
    high: float | None = None
    p: float | None = None
    unpaired: tuple[int, ...] = ()

    @property
    def n(self) -> int:
        return len(self.diffs)

    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def paired(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Paired:
    """`Paired` of a − b, seed by seed (`a`, `b`: seed → value)."""
    seeds = tuple(sorted(a.keys() & b.keys()))
    unpaired = tuple(sorted(a.keys() ^ b.keys()))
    if not seeds:
        raise ValueError(f"no seed in common (a: {sorted(a)}, b: {sorted(b)})")
    diffs = tuple(round(a[s] - b[s], 12) for s in seeds)  # equal moves stay equal through float rounding
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Paired(seeds, diffs, mean, unpaired=unpaired)
    sd = statistics.stdev(diffs)
    se = sd / math.sqrt(len(diffs))
    df = len(diffs) - 1
    if se == 0:  # every seed moved by the same amount (few seeds, discrete scores): no t test is possible
        return Paired(seeds, diffs, mean, sd, se, mean, mean, None, unpaired)
    half = t_quantile(0.5 + level / 2, df) * se
    p = 2 * (1 - t_cdf(abs(mean) / se, df))
    return Paired(seeds, diffs, mean, sd, se, mean - half, mean + half, p, unpaired)


@dataclass(frozen=True)
class Equivalence:
    """Two one-sided t tests of |a − b| < margin: p = the larger of the two one-sided p-values; equivalence is
    shown at level alpha when p < alpha, i.e. when the (1 − 2·alpha) interval lies inside ±margin."""

    margin: float
    p_lower: float
    p_upper: float
    low: float  # the (1 − 2·alpha) interval of the mean difference
    high: float
    alpha: float

    @property
    def p(self) -> float:
        return max(self.p_lower, self.p_upper)

    @property
    def equivalent(self) -> bool:
        return self.p < self.alpha


def tost(d: Paired, margin: float, alpha: float = 0.05) -> Equivalence | None:
    """TOST on a paired difference (None where `paired` has no p-value: no test is possible)."""
    if not d.se:  # fewer than 2 pairs, or no spread between them
        return None
    df = d.n - 1
    p_lower = 1 - t_cdf((d.mean + margin) / d.se, df)  # H0: difference ≤ −margin
    p_upper = t_cdf((d.mean - margin) / d.se, df)  # H0: difference ≥ +margin
    half = t_quantile(1 - alpha, df) * d.se
    return Equivalence(margin, p_lower, p_upper, d.mean - half, d.mean + half, alpha)


def verdict(d: Paired, eq: Equivalence | None, p_adjusted: float | None = None, alpha: float = 0.05) -> str:
    """What a difference supports: `equivalent` (TOST), `differs` (p, Holm-adjusted if given, below alpha),
    both, or `inconclusive`; `one pair` when no test is possible."""
    if d.se is None:
        return "one pair"
    if d.p is None:
        return "inconclusive (no spread over seeds)"
    p = d.p if p_adjusted is None else p_adjusted
    differs = p < alpha
    if eq is not None and eq.equivalent:
        return "equivalent, yet differs" if differs else "equivalent"
    return "differs" if differs else "inconclusive"


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the k-th smallest times (m − k + 1), made
    non-decreasing, at most 1. Rejecting where adjusted p < alpha keeps the family-wise error below alpha."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class McNemar:
    """Rows scored by both runs: `a_only` right only in a, `b_only` right only in b; the exact two-sided
    p-value of a and b being right equally often (binomial, discordant rows at 1/2)."""

    a_only: int
    b_only: int
    rows: int

    @property
    def p(self) -> float:
        n, k = self.a_only + self.b_only, min(self.a_only, self.b_only)
        if n == 0:
            return 1.0
        return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def mcnemar(a_right: Sequence[bool], b_right: Sequence[bool]) -> McNemar:
    """McNemar's exact test on two runs' per-row correctness over the same rows, in the same order."""
    if len(a_right) != len(b_right):
        raise ValueError(f"the runs scored different rows ({len(a_right)} vs {len(b_right)})")
    a_only = sum(1 for x, y in zip(a_right, b_right, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a_right, b_right, strict=True) if y and not x)
    return McNemar(a_only, b_only, len(a_right))


def bootstrap_rows_and_seeds(a: Mapping[int, Sequence[bool]], b: Mapping[int, Sequence[bool]],
                             draws: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Accuracy a − b with a percentile interval that resamples both sources of noise: the seeds (with
    replacement), then the rows (with replacement, the same rows for a and b, which scored the same rows).
    `a`, `b`: seed → per-row correctness. Returns (difference, low, high)."""
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        raise ValueError("no seed in common")
    diff = np.array([np.asarray(a[s], float) - np.asarray(b[s], float) for s in seeds])  # seeds × rows
    rng = np.random.default_rng(seed)
    n_seeds, n_rows = diff.shape
    picked_seeds = rng.integers(0, n_seeds, size=(draws, n_seeds))
    picked_rows = rng.integers(0, n_rows, size=(draws, n_rows))
    means = np.array([diff[s][:, r].mean() for s, r in zip(picked_seeds, picked_rows, strict=True)])
    tail = (1 - level) / 2
    return float(diff.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def commonest_label_rate(targets: Sequence[str]) -> tuple[str, float]:
    """The commonest label of a test set's scored rows and its share: the accuracy of always answering it,
    the floor a trained classifier has to clear."""
    label, count = Counter(str(t).strip().lower() for t in targets).most_common(1)[0]
    return label, count / len(targets)
