"""Paired statistics for judging the paper's claims across users (not in the paper, which reports none).

Thin, tested wrappers over scipy and statsmodels, so that every number the report states comes from a
library routine named here:

- `signed_rank_test`: Wilcoxon signed-rank on paired differences, optionally against a shift `mu`
  (scipy.stats.wilcoxon; exact null distribution for small n without ties, as scipy chooses).
- `paired_t_test`: one-sample t on the differences (scipy.stats.ttest_1samp).
- `bootstrap_mean_ci`: percentile bootstrap CI of the mean difference, resampling units (scipy.stats.bootstrap).
- `holm`: Holm's step-down adjustment, the formula of statsmodels' multipletests "holm" (tested equal to it);
  computed here because that branch calls gc.collect() on every call, about a second in a process that
  holds torch.
- `equivalence_test`: two one-sided paired t-tests, TOST (statsmodels ttost_paired). We use the t version,
  not a Wilcoxon TOST, because the equivalence margin is a statement about the *mean* difference (the
  paper's tables are means) and TOST at level alpha is then exactly "the (1 - 2 alpha) t interval of the
  mean lies inside the margin"; a signed-rank TOST would bound the pseudo-median instead. Per-user values
  are means over many replies, so their differences are close to normal.
- `noninferiority_test`: the one-sided half of TOST.
- `min_attainable_p`: the smallest p a Wilcoxon signed-rank test can reach with n pairs (2 / 2^n two-sided):
  with 4 users it is 0.125, so no paired rank test on 4 users can reach p < 0.05, whatever the data.
- `min_detectable_effect`: the smallest mean difference a paired design of n units detects with the given
  power, from the noncentral t distribution (statsmodels TTestPower, exact for the t-test; the Wilcoxon test
  needs about 5% more units under normality, asymptotic relative efficiency 3/pi).
- `min_equivalence_margin`: the smallest margin TOST could establish with the given power when the true
  difference is 0 (normal approximation with t quantiles: (t_{1-alpha} + t_{(1+power)/2}) * sd / sqrt(n)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.stats
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

ALTERNATIVES = ("two-sided", "greater", "less")


def _diffs(diff: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(diff, dtype=np.float64).ravel()
    return values[~np.isnan(values)]


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"unknown alternative {alternative!r}; expected one of {ALTERNATIVES}")


def signed_rank_test(diff: Sequence[float] | np.ndarray, mu: float = 0.0, alternative: str = "two-sided") -> float:
    """p of the Wilcoxon signed-rank test that the differences are centred on `mu` (NaNs dropped).

    Zero differences (after the shift) are dropped ("wilcox"); p = 1.0 when none is left, NaN for n < 2.
    """
    _check_alternative(alternative)
    values = _diffs(diff) - mu
    if values.size < 2:
        return float("nan")
    if np.all(values == 0):
        return 1.0
    return float(scipy.stats.wilcoxon(values, zero_method="wilcox", alternative=alternative).pvalue)


def paired_t_test(diff: Sequence[float] | np.ndarray, mu: float = 0.0, alternative: str = "two-sided") -> float:
    """p of the one-sample t-test of the differences against `mu`; NaN for n < 2 or zero variance."""
    _check_alternative(alternative)
    values = _diffs(diff)
    if values.size < 2 or np.ptp(values) == 0:
        return float("nan")
    return float(scipy.stats.ttest_1samp(values, mu, alternative=alternative).pvalue)


def bootstrap_mean_ci(diff: Sequence[float] | np.ndarray, confidence: float = 0.95, n_resamples: int = 9999,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean difference, resampling the paired units (NaN for n < 2)."""
    values = _diffs(diff)
    if values.size < 2:
        return float("nan"), float("nan")
    if np.ptp(values) == 0:  # every resample has the same mean
        return float(values[0]), float(values[0])
    result = scipy.stats.bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                                   method="percentile", random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values in the input order; NaN inputs stay NaN and do not count in the family."""
    p = np.asarray(p_values, dtype=np.float64).ravel()
    adjusted = np.full(p.shape, np.nan)
    keep = ~np.isnan(p)
    if keep.any():
        kept = p[keep]
        order = np.argsort(kept, kind="stable")
        steps = kept[order] * np.arange(kept.size, 0, -1)  # the i-th smallest times (m - i + 1)
        values = np.empty_like(kept)
        values[order] = np.minimum(1.0, np.maximum.accumulate(steps))
        adjusted[keep] = values
    return adjusted


def equivalence_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, margin: float) -> float:
    """TOST p that the mean of a - b lies inside (-margin, +margin) (paired t; NaN for n < 2 or zero variance)."""
    if margin <= 0:
        raise ValueError(f"equivalence margin must be > 0, got {margin}")
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size < 2 or np.ptp(a - b) == 0:
        return float("nan")
    return float(ttost_paired(a, b, -margin, margin)[0])


def noninferiority_test(diff: Sequence[float] | np.ndarray, margin: float) -> float:
    """One-sided paired t p that the mean difference exceeds -margin (a is not worse than b by margin)."""
    if margin <= 0:
        raise ValueError(f"non-inferiority margin must be > 0, got {margin}")
    return paired_t_test(diff, -margin, "greater")


def min_attainable_p(n: int, alternative: str = "two-sided") -> float:
    """The smallest p-value of an exact Wilcoxon signed-rank test with n pairs: 2 / 2^n (1 / 2^n one-sided)."""
    _check_alternative(alternative)
    if n < 1:
        return 1.0
    return min(1.0, (2.0 if alternative == "two-sided" else 1.0) * 2.0 ** -n)


def min_detectable_effect(n: int, sd: float, alpha: float = 0.05, power: float = 0.8,
                          alternative: str = "two-sided") -> float:
    """Smallest mean difference a paired t-test on n units detects with `power` (NaN for n < 2 or sd NaN)."""
    _check_alternative(alternative)
    if n < 2 or not np.isfinite(sd):
        return float("nan")
    if sd == 0:
        return 0.0
    alt = {"two-sided": "two-sided", "greater": "larger", "less": "smaller"}[alternative]
    effect_size = TTestPower().solve_power(nobs=n, alpha=alpha, power=power, alternative=alt)
    return float(abs(np.ravel(effect_size)[0]) * sd)


def min_equivalence_margin(n: int, sd: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest margin TOST establishes with `power` when the true mean difference is 0 (see module doc)."""
    if n < 2 or not np.isfinite(sd):
        return float("nan")
    t = scipy.stats.t(df=n - 1)
    return float((t.ppf(1 - alpha) + t.ppf((1 + power) / 2)) * sd / math.sqrt(n))
