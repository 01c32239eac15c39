"""Statistics of a sweep's seeds: a metric's mean, spread and 95% Student-t interval over the seeds of one setting,
and the difference of two settings. Student's t in closed form: no scipy needed where the study runs."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Stats:
    """One metric over n runs: the mean, the sample standard deviation and the 95% interval of the mean,
    mean ± t(0.975, n−1)·std/√n (Student t, for the few seeds a cell has); no spread with one run."""

    n: int
    mean: float
    std: float | None = None
    low: float | None = None
    high: float | None = None

    def text(self, scale: float = 1.0, digits: int = 3) -> str:
        """`mean ± std [low, high]`, each value times `scale` (100 for percent)."""
        f = f"{{:.{digits}f}}".format
        if self.std is None:
            return f"{f(self.mean * scale)} (n=1)"
        return f"{f(self.mean * scale)} ± {f(self.std * scale)} [{f(self.low * scale)}, {f(self.high * scale)}]"


def seed_stats(values: list[float]) -> Stats:
    """`Stats` of the values of one cell (one per seed)."""
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return Stats(n, mean)
    std = statistics.stdev(values)
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return Stats(n, mean, std, mean - half, mean + half)


def difference_stats(a: list[float], b: list[float]) -> Stats:
    """mean(a) − mean(b) with a 95% Welch interval; the degrees of freedom are min(n_a, n_b) − 1, the
    conservative choice (wider than Welch–Satterthwaite's) that needs no fractional t quantile. `std` is the
    standard error of the difference. No interval unless both sides have two values or more."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if min(len(a), len(b)) < 2:
        return Stats(min(len(a), len(b)), diff)
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    half = t_quantile(0.975, min(len(a), len(b)) - 1) * se
    return Stats(min(len(a), len(b)), diff, se, diff - half, diff + half)


def t_quantile(p: float, df: int) -> float:
    """The p quantile (p > 0.5) of Student's t with integer df, by bisection on its closed-form distribution
    function (Abramowitz & Stegun 26.7.3–4): no scipy needed where the study runs."""
    level = 2 * p - 1  # P(|T| < t)
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with integer df (the closed form below): one-sided p-values of a t test."""
    return 0.5 + math.copysign(_t_central(abs(t), df) / 2, t)


def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with df degrees of freedom."""
    theta = math.atan(t / math.sqrt(df))
    c2, series, term = math.cos(theta) ** 2, 0.0, 1.0
    if df % 2:  # odd: (2/π)(θ + sinθ cosθ (1 + 2/3 c² + … + 2·4…(df−3) / 3·5…(df−2) c^(df−3)))
        for k in range(1, (df - 1) // 2 + 1):
            series, term = series + term, term * c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    for k in range(1, df // 2 + 1):  # even: sinθ (1 + 1/2 c² + … + 1·3…(df−3) / 2·4…(df−2) c^(df−2))
        series, term = series + term, term * c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * series
