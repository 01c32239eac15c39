"""The study report's statistics (finlora.run.paired) on values a person can check by hand or in a textbook."""

from __future__ import annotations

import math

import pytest

from finlora.run.paired import bootstrap_rows_and_seeds, commonest_label_rate, holm, mcnemar, paired, tost, verdict
from finlora.run.report import t_cdf

# Student's sleep data (Cushny & Peebles, 1905; R's `sleep`): extra hours of sleep under drug 2 and drug 1, the
# same 10 patients. R: t.test(extra ~ group, paired = TRUE) gives t = 4.0621, df = 9, p = 0.002833,
# 95% CI 0.7001142 to 2.4598858 (drug 2 − drug 1).
DRUG1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_paired_t_matches_students_sleep_data():
    d = paired(dict(enumerate(DRUG2)), dict(enumerate(DRUG1)))
    assert d.n == 10 and d.mean == pytest.approx(1.58)
    assert d.mean / d.se == pytest.approx(4.0621, abs=1e-4)
    assert (d.low, d.high) == (pytest.approx(0.7001142, abs=1e-6), pytest.approx(2.4598858, abs=1e-6))
    assert d.p == pytest.approx(0.002833, abs=1e-6) and d.excludes_zero()


def test_paired_uses_only_the_seeds_both_sides_have():
    d = paired({1: 0.70, 2: 0.72, 3: 0.90}, {1: 0.60, 2: 0.61, 4: 0.0})
    assert d.seeds == (1, 2) and d.unpaired == (3, 4)
    assert d.diffs == (pytest.approx(0.10), pytest.approx(0.11))
    one = paired({1: 0.7}, {1: 0.6, 2: 0.5})
    assert (one.n, one.se, one.low, one.p) == (1, None, None, None) and verdict(one, tost(one, 0.02)) == "one pair"
    with pytest.raises(ValueError, match="no seed in common"):
        paired({1: 0.7}, {2: 0.6})


def test_t_cdf_closed_forms():
    # df = 1 is Cauchy: F(t) = 1/2 + atan(t)/π; df = 2: F(t) = 1/2 + t / (2√(2 + t²)).
    for t in (-3.0, -0.5, 0.0, 1.0, 6.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_tost_by_hand():
    """Differences 1, 2, 3 (mean 2, sd 1, se 1/√3, df 2), margin 5: t = (2 − 5)/se = −5.196 for the upper
    test, p = 1/2 − 5.196 / (2√(2 + 27)) = 0.017549 (df-2 closed form); the lower test's t = 12.12."""
    d = paired({1: 1.0, 2: 2.0, 3: 3.0}, {1: 0.0, 2: 0.0, 3: 0.0})
    eq = tost(d, margin=5)
    t_up = -3 * math.sqrt(3)
    assert eq.p_upper == pytest.approx(0.5 + t_up / (2 * math.sqrt(2 + t_up**2)), abs=1e-12)
    assert eq.p_upper == pytest.approx(0.017549, abs=1e-6)
    t_low = 7 * math.sqrt(3)
    assert eq.p_lower == pytest.approx(0.5 - t_low / (2 * math.sqrt(2 + t_low**2)), abs=1e-12)
    assert eq.p == eq.p_upper and eq.equivalent
    half = 2.9199856 / math.sqrt(3)  # t(0.95, 2) = 2.919986: the 90% interval
    assert (eq.low, eq.high) == (pytest.approx(2 - half, abs=1e-6), pytest.approx(2 + half, abs=1e-6))
    assert d.p == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), abs=1e-12)  # t = 2√3, df 2: 0.074
    assert verdict(d, eq) == "equivalent"  # its 95% interval 2 ± 2.48 holds 0
    narrow = tost(d, margin=3)  # 90% interval [0.31, 3.69] reaches past +3: not shown equivalent
    assert not narrow.equivalent and verdict(d, narrow) == "inconclusive"
    far = paired({1: 2.0, 2: 2.1, 3: 1.9}, {1: 0.0, 2: 0.0, 3: 0.0})
    assert verdict(far, tost(far, margin=1)) == "differs"
    near = paired({1: 0.5, 2: 0.6, 3: 0.4}, {1: 0.0, 2: 0.0, 3: 0.0})  # t = 8.66, p = 0.013; inside ±2
    assert verdict(near, tost(near, margin=2)) == "equivalent, yet differs"
    assert verdict(near, tost(near, margin=2), p_adjusted=0.2) == "equivalent"
    wide_noise = paired({1: 3.0, 2: -2.0, 3: 0.5}, {1: 0.0, 2: 0.0, 3: 0.0})
    assert verdict(wide_noise, tost(wide_noise, margin=1)) == "inconclusive"


def test_holm_textbook_example():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 → made non-decreasing: 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []


def test_mcnemar_exact():
    a = [True] * 9 + [False] * 1 + [True] * 5 + [False] * 5  # 9 rows right only in a, 1 only in b
    b = [False] * 9 + [True] * 1 + [True] * 5 + [False] * 5
    m = mcnemar(a, b)
    assert (m.a_only, m.b_only, m.rows) == (9, 1, 20)
    assert m.p == pytest.approx(2 * (1 + 10) / 1024)  # 2·P(X ≤ 1), X ~ Bin(10, 1/2) = 0.021484
    assert mcnemar([True, False], [True, False]).p == 1.0 and mcnemar([True, False], [False, True]).p == 1.0
    with pytest.raises(ValueError, match="different rows"):
        mcnemar([True], [True, False])


def test_bootstrap_resamples_seeds_as_well_as_rows():
    """Seed 1: a right and b wrong on every row; seed 2: both alike. Rows alone would give no spread inside a
    seed; resampling the seeds gives the whole range 0 to 1 around the mean 0.5."""
    rows = 50
    a = {1: [True] * rows, 2: [True] * rows}
    b = {1: [False] * rows, 2: [True] * rows}
    diff, low, high = bootstrap_rows_and_seeds(a, b, draws=400)
    assert diff == 0.5 and (low, high) == (0.0, 1.0)
    same = bootstrap_rows_and_seeds(a, a, draws=50)
    assert same == (0.0, 0.0, 0.0)


def test_commonest_label_rate():
    assert commonest_label_rate(["positive", "Neutral", "neutral "]) == ("neutral", pytest.approx(2 / 3))


def test_no_spread_over_seeds_is_no_test():
    """Two seeds that moved by the same amount (scores are multiples of 1/rows) give sd 0: no t test, not p = 0."""
    d = paired({1: 0.706, 2: 0.722}, {1: 0.684, 2: 0.700})  # 0.022 both times, up to float rounding
    assert d.sd == 0 and d.p is None
    flat = paired({1: 0.5, 2: 0.7}, {1: 0.4, 2: 0.6})
    assert flat.p is None and flat.low == flat.high == flat.mean
    assert tost(flat, 0.02) is None and verdict(flat, None) == "inconclusive (no spread over seeds)"
