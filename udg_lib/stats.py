"""Paired statistics for judging the paper's claims across users (not in the paper, which reports none).

Thin, tested wrappers over scipy and statsmodels, so that every number the report states comes from a
library routine named here:

- `sign_flip_test`: the sign-flip permutation test of the mean of paired differences against `mu`, one- or
  two-sided; what the claims' judge uses (see `udg_lib.report`). Under the null the differences are symmetric
  about `mu`, so each sign is equally likely; the statistic is their sum, i.e. the mean. Exact (every sign
  pattern) for up to `SIGN_FLIP_EXACT_MAX` non-zero differences, else a seeded Monte Carlo over
  `SIGN_FLIP_RESAMPLES` patterns with the observed one counted (p >= 1 / (B + 1)). Differences within
  `ZERO_TOLERANCE` of `mu` are zeros: no sign to flip, dropped. Unlike the signed-rank test it speaks of the
  mean, the quantity the effect, its CI and the paper's tables speak of; unlike the t-test it has a real
  smallest attainable p (`min_attainable_p`), exact level under symmetry whatever the tails.
- `signed_rank_test`: Wilcoxon signed-rank on paired differences, optionally against a shift `mu`
  (scipy.stats.wilcoxon; exact null distribution for small n without ties, as scipy chooses). Kept for stage
  05's per-dataset notes; it speaks of the pseudo-median, not the mean.
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
- `min_attainable_p`: the smallest p an exact sign-flip or signed-rank test can reach with n non-zero pairs
  (2 / 2^n two-sided, 1 / 2^n one-sided): with 4 users it is 1/16 one-sided, so no such test on 4 users can
  reach p < 0.05, whatever the data.
- `min_detectable_effect`: the smallest mean difference a paired design of n units detects with the given
  power, from the noncentral t distribution (statsmodels TTestPower, exact for the t-test; the sign-flip test
  of the mean has the t-test's power asymptotically, the Wilcoxon test needs about 5% more units under
  normality, asymptotic relative efficiency 3/pi).
- `min_equivalence_margin`: the smallest margin TOST could establish with the given power when the true
  difference is 0 (normal approximation with t quantiles: (t_{1-alpha} + t_{(1+power)/2}) * sd / sqrt(n)).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import scipy.stats
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

ALTERNATIVES = ("two-sided", "greater", "less")
ZERO_TOLERANCE = 1e-12  # |difference - mu| below this is a zero: no sign to flip
SIGN_FLIP_EXACT_MAX = 16  # up to 2^16 = 65,536 sign patterns enumerated; beyond, a seeded Monte Carlo
SIGN_FLIP_RESAMPLES = 20_000  # Monte Carlo sign patterns: p's standard error at p = 0.01 is 0.0007


def _diffs(diff: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(diff, dtype=np.float64).ravel()
    return values[~np.isnan(values)]


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"unknown alternative {alternative!r}; expected one of {ALTERNATIVES}")


@functools.lru_cache(maxsize=64)
def _sign_patterns(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """Rows of +-1: every pattern for n <= SIGN_FLIP_EXACT_MAX, else `n_resamples` seeded random ones."""
    if n <= SIGN_FLIP_EXACT_MAX:
        codes = np.arange(2 ** n, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64)[None, :]
        return np.where(codes & 1, -1.0, 1.0)
    return np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=(n_resamples, n))


def sign_flip_test(diff: Sequence[float] | np.ndarray, mu: float = 0.0, alternative: str = "greater",
                   n_resamples: int = SIGN_FLIP_RESAMPLES, seed: int = 0) -> float:
    """p of the sign-flip permutation test that the mean of the differences is `mu` (NaNs dropped; see the
    module doc). "greater": evidence that the mean exceeds `mu`. p = 1.0 when every difference equals `mu`,
    NaN when there are none."""
    _check_alternative(alternative)
    values = _diffs(diff)
    if values.size == 0:
        return float("nan")
    values = values - mu
    values = values[np.abs(values) >= ZERO_TOLERANCE]
    if values.size == 0:
        return 1.0
    patterns = _sign_patterns(int(values.size), n_resamples, seed)
    flipped = patterns @ np.abs(values)  # every pattern of signs on |d|: the observed one is among them
    observed = float(values.sum())
    slack = 1e-9 * float(np.abs(values).sum())  # float sums of the same terms in another order
    exact = values.size <= SIGN_FLIP_EXACT_MAX
    upper = (np.count_nonzero(flipped >= observed - slack) + (0 if exact else 1)) / (flipped.size + (0 if exact else 1))
    lower = (np.count_nonzero(flipped <= observed + slack) + (0 if exact else 1)) / (flipped.size + (0 if exact else 1))
    p = {"greater": upper, "less": lower, "two-sided": 2.0 * min(upper, lower)}[alternative]
    return float(min(1.0, p))


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
    """The smallest p-value of an exact sign-flip or signed-rank test with n non-zero pairs: 2 / 2^n (1 / 2^n
    one-sided), reached when every difference has the same sign."""
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
    return _standardized_detectable_effect(n, alpha, power, alternative) * sd


@functools.lru_cache(maxsize=4096)
def _standardized_detectable_effect(n: int, alpha: float, power: float, alternative: str) -> float:
    # a root search in statsmodels (milliseconds); the calibration test asks for the same few designs many times
    alt = {"two-sided": "two-sided", "greater": "larger", "less": "smaller"}[alternative]
    effect_size = TTestPower().solve_power(nobs=n, alpha=alpha, power=power, alternative=alt)
    return float(abs(np.ravel(effect_size)[0]))


def min_equivalence_margin(n: int, sd: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest margin TOST establishes with `power` when the true mean difference is 0 (see module doc)."""
    if n < 2 or not np.isfinite(sd):
        return float("nan")
    return _t_quantile_sum(n, alpha, power) * sd / math.sqrt(n)


@functools.lru_cache(maxsize=4096)
def _t_quantile_sum(n: int, alpha: float, power: float) -> float:
    t = scipy.stats.t(df=n - 1)
    return float(t.ppf(1 - alpha) + t.ppf((1 + power) / 2))
