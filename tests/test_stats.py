"""udg_lib.stats on textbook examples with known values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats
from statsmodels.stats.multitest import multipletests

from udg_lib import stats

# Darwin's Zea mays data (Fisher 1935): cross- minus self-fertilised heights, eighths of an inch; scipy's docs
# give the exact two-sided signed-rank p 0.041259765625 and the one-sided 0.0206298828125.
DARWIN = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
# Student's sleep data (Cushny & Peebles 1905): extra hours of sleep, drug 2 minus drug 1, ten patients.
# Paired t: t = 4.0621, df = 9, p = 0.002833 (R's t.test(..., paired = TRUE) on datasets::sleep).
SLEEP = [1.2, 2.4, 1.3, 1.3, 0.0, 1.0, 1.8, 0.8, 4.6, 1.4]


def test_signed_rank_matches_the_textbook_values():
    assert stats.signed_rank_test(DARWIN) == pytest.approx(0.041259765625)
    assert stats.signed_rank_test(DARWIN, alternative="greater") == pytest.approx(0.0206298828125)
    # a shift mu tests the differences against mu: all of Darwin's data minus 100 are negative
    assert stats.signed_rank_test(DARWIN, mu=100.0, alternative="less") == pytest.approx(2.0 ** -15)
    assert stats.signed_rank_test([0.0, 0.0, 0.0]) == 1.0 and math.isnan(stats.signed_rank_test([1.0]))
    with pytest.raises(ValueError, match="alternative"):
        stats.signed_rank_test(DARWIN, alternative="bigger")


def test_paired_t_matches_student_sleep_data():
    assert stats.paired_t_test(SLEEP) == pytest.approx(0.002833, abs=5e-7)
    assert stats.paired_t_test(SLEEP, alternative="greater") == pytest.approx(0.002833 / 2, abs=5e-7)
    assert math.isnan(stats.paired_t_test([1.0, 1.0, 1.0]))  # no variance: no t


def test_bootstrap_ci_of_the_mean_is_seeded_and_close_to_the_t_interval_for_normal_data():
    low, high = stats.bootstrap_mean_ci(SLEEP)
    assert low < np.mean(SLEEP) < high and (low, high) == stats.bootstrap_mean_ci(SLEEP)
    values = np.random.default_rng(0).normal(0.3, 1.0, 400)
    t_low, t_high = scipy.stats.ttest_1samp(values, 0).confidence_interval()
    low, high = stats.bootstrap_mean_ci(values)
    assert low == pytest.approx(t_low, abs=0.02) and high == pytest.approx(t_high, abs=0.02)
    assert stats.bootstrap_mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert all(math.isnan(v) for v in stats.bootstrap_mean_ci([0.5]))


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    p = np.random.default_rng(0).uniform(0, 0.2, 25)
    assert stats.holm(p) == pytest.approx(multipletests(p, method="holm")[1])
    adjusted = stats.holm([0.01, np.nan, 0.02])  # NaN does not count in the family
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)


def test_tost_is_the_larger_of_two_one_sided_t_tests():
    diff = np.array(SLEEP)
    se = diff.std(ddof=1) / math.sqrt(diff.size)
    t_dist = scipy.stats.t(df=diff.size - 1)
    expected = max(t_dist.sf((diff.mean() + 2.0) / se), t_dist.cdf((diff.mean() - 2.0) / se))
    assert stats.equivalence_test(diff, np.zeros_like(diff), 2.0) == pytest.approx(expected)
    assert stats.equivalence_test(diff, np.zeros_like(diff), 2.0) == pytest.approx(0.1542, abs=1e-4)
    assert stats.equivalence_test(diff, np.zeros_like(diff), 4.0) < 0.001  # mean 1.58 well inside +-4
    assert stats.noninferiority_test(diff, 0.5) == pytest.approx(t_dist.sf((diff.mean() + 0.5) / se))
    with pytest.raises(ValueError, match="margin"):
        stats.equivalence_test(diff, diff, 0.0)


@pytest.mark.parametrize("n, expected", [(4, 0.125), (5, 0.0625), (6, 0.03125), (10, 2 / 1024)])
def test_smallest_attainable_wilcoxon_p(n, expected):
    assert stats.min_attainable_p(n) == pytest.approx(expected)
    # reached when every difference has the same sign
    assert stats.signed_rank_test(np.arange(1, n + 1, dtype=float)) == pytest.approx(expected)
    assert stats.min_attainable_p(n, "greater") == pytest.approx(expected / 2)


def test_min_detectable_effect_gives_the_requested_power():
    n, sd = 10, 2.0
    effect = stats.min_detectable_effect(n, sd, alpha=0.05, power=0.8)
    # power of the two-sided one-sample t-test at that effect, from the noncentral t directly
    t_crit = scipy.stats.t.ppf(0.975, n - 1)
    nc = effect / sd * math.sqrt(n)
    power = scipy.stats.nct.sf(t_crit, n - 1, nc) + scipy.stats.nct.cdf(-t_crit, n - 1, nc)
    assert power == pytest.approx(0.8, abs=1e-4)
    # large n: the normal approximation (z_0.975 + z_0.8) * sd / sqrt(n)
    assert stats.min_detectable_effect(10_000, 1.0) == pytest.approx((1.959964 + 0.841621) / 100, rel=1e-3)
    assert math.isnan(stats.min_detectable_effect(1, 1.0)) and stats.min_detectable_effect(5, 0.0) == 0.0


def test_min_equivalence_margin_normal_approximation():
    margin = stats.min_equivalence_margin(10_000, 1.0)
    assert margin == pytest.approx((1.644854 + 1.281552) / 100, rel=1e-3)
    assert stats.min_equivalence_margin(10, 1.0) > margin * 10  # t quantiles, not z, at small n


def test_sign_flip_test_matches_fishers_count_on_darwins_data():
    # Fisher (1935) on Darwin's data: 863 of the 2^15 sign patterns give a sum at least the observed one
    assert stats.sign_flip_test(DARWIN) == pytest.approx(863 / 2 ** 15)
    assert stats.sign_flip_test(DARWIN, alternative="two-sided") == pytest.approx(2 * 863 / 2 ** 15)
    sums = [sum(s * abs(d) for s, d in zip(signs, DARWIN)) for signs in itertools.product((1, -1), repeat=15)]
    assert stats.sign_flip_test(DARWIN, alternative="less") == pytest.approx(
        sum(total <= sum(DARWIN) for total in sums) / 2 ** 15)  # ties with the observed sum count on both sides
    # a test of the mean: shifting by mu tests the mean against mu; zeros have no sign and are dropped
    assert stats.sign_flip_test([1.0, 2.0, 3.0, 0.0, 0.0]) == pytest.approx(1 / 8) == stats.min_attainable_p(3, "greater")
    assert stats.sign_flip_test([2.0, 3.0, 4.0], mu=1.0) == pytest.approx(1 / 8)
    assert stats.sign_flip_test([1.0, 1.0]) == 0.25 and stats.sign_flip_test([0.0, 1e-13]) == 1.0
    assert math.isnan(stats.sign_flip_test([]))


def test_sign_flip_monte_carlo_beyond_the_exact_limit_is_seeded_and_close_to_the_t_test():
    values = np.random.default_rng(0).normal(0.3, 1.0, 40)  # 40 > SIGN_FLIP_EXACT_MAX: Monte Carlo
    p = stats.sign_flip_test(values)
    assert p == stats.sign_flip_test(values) and p != stats.sign_flip_test(values, seed=1)
    assert p == pytest.approx(stats.paired_t_test(values, alternative="greater"), abs=0.01)
    assert stats.sign_flip_test(np.arange(1.0, 41.0)) == pytest.approx(1 / (stats.SIGN_FLIP_RESAMPLES + 1))
