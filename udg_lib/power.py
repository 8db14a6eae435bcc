"""Power of a finished run's paired comparisons, and what a bigger design would buy: a planning aid.

    python -m udg_lib.plan --power results/cpu             # a published folder (per-user means only)
    python -m udg_lib.plan --power outputs/cpu --target-bpc 0.02 --target-similarity 0.01

The comparisons are the judge's (`judging.claim_comparisons`, `judging.question_comparisons`), each taken on
similarity and on bits per character (`dataclasses.replace(comparison, metric=...)`), per user as the judge
pairs them (`judging.unit_differences`); C3 (Distinct-S across questions) and C5 (the share of replies under
0.2) are judged on other metrics and are not planned here. Per comparison and metric:

- `sd`: the SD of the per-user differences, oriented as the judge orients them (`judging.unit_differences`):
  positive favours the comparison's first side, a - b for similarity (higher is better), b - a for bits per
  character (lower is better). Detectable effects and targets are magnitudes.
- `detectable`: the smallest mean difference the run's n users detect with 80% power at Holm's strictest
  step (alpha / m, m = the comparisons in the judge's Holm family: claim, metric and reading): a one-sided paired t
  (`stats.min_detectable_effect`, noncentral t) for "greater" and "noninferior" comparisons, two-sided for
  "differs" (Q2), and for "equivalent" (C4) the smallest margin TOST establishes (`stats.min_equivalence_margin`).
- `n_needed`: the fewest users whose detectable effect is at most the metric's target (a search over n).

`design_tradeoff` crosses this with the cost planner: for a grid of (users, fine-tuning pairs per user, test
pairs per user) it gives the plan's minutes (`plan.Plan.design_hours`) and each family's detectable effect.
The per-user SD of a difference is modelled as between-user variance + within-user variance / test pairs, a
one-way variance-components split of the per-sample paired differences (`variance_components`). Its
assumptions, printed with it: the effects themselves do not change with the design (more fine-tuning pairs
cost minutes here, and what they do to the effect is not modelled); test pairs are exchangeable within a
user; bits per character is split on each reply's own value, while a user's value is character-weighted
(`metrics.bits_per_char`, as the report's), so its split is approximate where references differ in length;
a published folder holds per-user means only, so there the measured SD is kept for every number of test pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from udg_lib.catalog import EXP1, LLM, PREPARE
from udg_lib import judging, stats
from udg_lib.methods import names as method_names
from udg_lib.baselines import is_paper_history_method

METRICS = ("similarity", "bits_per_char")
LOWER_IS_BETTER = {"similarity": False, "bits_per_char": True}
DEFAULT_TARGETS = {"similarity": 0.01, "bits_per_char": 0.02}  # plan --power says so in its help
POWER = 0.8
MAX_USERS = 1_000_000  # n_needed searches up to here; beyond it the table says "> 1e6"
EXP1_DIR, LLM_DIR = EXP1.name, LLM.name  # stage folders read here
SAMPLE_KEYS = ["dataset", "split_set", "user_id", "pair_id"]
SIGN_NOTE = ("differences are oriented as the judge orients them: positive favours the comparison's first side "
             "(similarity a - b, higher is better; bits_per_char b - a, lower is better); detectable effects and "
             "targets are magnitudes")


@dataclass(frozen=True)
class RunValues:
    """What a run folder holds for the power table."""

    values: pd.DataFrame  # the judge's unit table: source, dataset, unit, pretrain, method, similarity, bits_per_char
    samples: pd.DataFrame | None  # per test reply: source, *SAMPLE_KEYS, pretrain, method, metrics; None: means only
    small_datasets: set[str] | None  # C2 / C6's scope, from stage 00's Table 2 (None: every dataset)
    notes: list[str]


def read_run(run_dir: str | Path, settings: judging.ClaimSettings = judging.ClaimSettings()) -> RunValues:
    """A run's per-user values: from stage 04's (and 06's) per-sample `scores.parquet` in an outputs folder,
    else from stage 04's `per_user_scores.csv` in a published folder (no per-user file for stage 06 there)."""

    run = Path(run_dir)
    exp1, llm = run / EXP1_DIR, run / LLM_DIR
    table2_file = run / PREPARE.name / "table2.csv"
    table2 = pd.read_csv(table2_file) if table2_file.is_file() else None
    small = judging.small_data_datasets(table2, settings.small_data_max_train)
    notes = [] if table2 is not None else ["no stage 00 table2.csv: every dataset is in C2 / C6's scope"]
    if (exp1 / "scores.parquet").is_file():
        scores = pd.read_parquet(exp1 / "scores.parquet")
        # the unit values are the judge's own (judging.exp1_unit_values / llm_unit_values), so the SD and the effect
        # here are those the judge tests; the per-sample rows feed only the variance split
        frames, samples = [judging.exp1_unit_values(scores)], [scores.assign(source="exp1")]
        if (llm / "scores.parquet").is_file():
            llm_scores = pd.read_parquet(llm / "scores.parquet")
            frames.append(judging.llm_unit_values(scores, llm_scores))
            tuned = scores[~scores["method"].isin([method_names.DA, method_names.RETRIEVAL])]  # every fine-tuned system
            for method, answers in llm_scores.groupby("method", sort=False):
                if is_paper_history_method(method):  # the paper's 10-turn extra row: never a side of C1 (the judge's rule)
                    continue
                # the fine-tuned systems on exactly the test contexts this LLM answered
                both = pd.concat([tuned.merge(answers[SAMPLE_KEYS].drop_duplicates(), on=SAMPLE_KEYS), answers],
                                 ignore_index=True)
                samples.append(both.assign(source=f"llm:{method}"))
        else:
            notes.append(f"no {LLM_DIR}/scores.parquet: LLM comparisons (C1) are not available from this folder")
        return RunValues(pd.concat(frames, ignore_index=True), pd.concat(samples, ignore_index=True), small, notes)
    per_user = exp1 / "per_user_scores.csv"
    if not per_user.is_file():
        raise FileNotFoundError(f"{run}: neither {EXP1_DIR}/scores.parquet nor {EXP1_DIR}/per_user_scores.csv")
    means = pd.read_csv(per_user)
    metrics = [m for m in METRICS if m in means.columns]
    values = (means.groupby(["dataset", "user_id", "pretrain", "method"], sort=False)[metrics].mean().reset_index()
              .rename(columns={"user_id": "unit"}).assign(source="exp1"))
    notes += [f"{per_user.relative_to(run)}: per-user means only, so the SD of a difference is measured at the "
              "run's test pairs and kept as it is for any other number of test pairs",
              f"LLM comparisons (C1) are not available from this folder: it has no per-user file for {LLM_DIR}"]
    return RunValues(values, None, small, notes)


def comparisons_by_metric(values: pd.DataFrame, small_datasets: set[str] | None,
                          settings: judging.ClaimSettings = judging.ClaimSettings()) -> list[judging.Comparison]:
    """The judge's similarity comparisons (claims, then questions), each on every metric of `METRICS` that
    the values hold."""
    found = judging.claim_comparisons(values, small_datasets, settings) + judging.question_comparisons(values, settings)
    on_similarity = [c for c in found if c.metric == "similarity"]
    return [replace(c, metric=m) for m in METRICS if m in values.columns and values[m].notna().any()
            for c in on_similarity]


def detectable_effect(kind: str, n: int, sd: float, alpha: float, power: float = POWER) -> float:
    """The smallest effect a comparison of `kind` detects on n paired units (see the module docstring)."""
    if kind == "equivalent":
        return stats.min_equivalence_margin(n, sd, alpha, power)
    return stats.min_detectable_effect(n, sd, alpha, power, "two-sided" if kind == "differs" else "greater")


def users_needed(detectable: Callable[[int], float], target: float, limit: int = MAX_USERS) -> int | None:
    """The smallest n >= 2 with detectable(n) <= target (detectable falls with n); None above `limit`."""
    if not target > 0 or not detectable(limit) <= target:
        return None
    low, high = 2, 2
    while not detectable(high) <= target:  # doubling, then bisection
        low, high = high + 1, min(high * 2, limit)
    while low < high:
        middle = (low + high) // 2
        if detectable(middle) <= target:
            high = middle
        else:
            low = middle + 1
    return high


def sample_differences(samples: pd.DataFrame, comparison: judging.Comparison) -> pd.DataFrame:
    """Per test reply of the comparison's source: mean of `a`'s systems minus mean of `b`'s on the same context
    (columns dataset, user_id, diff); contexts missing a system are left out."""
    frame = samples[samples["source"] == comparison.source]
    if comparison.dataset != "all":
        frame = frame[frame["dataset"] == comparison.dataset]
    wide = frame.pivot_table(index=SAMPLE_KEYS, columns=["pretrain", "method"], values=comparison.metric,
                             aggfunc="mean", dropna=False)

    def side(systems: tuple[tuple[str, str], ...]) -> pd.Series:
        if any(s not in wide.columns for s in systems):
            return pd.Series(np.nan, index=wide.index)
        return wide[list(systems)].mean(axis=1, skipna=False)

    diff = (side(comparison.a) - side(comparison.b)).dropna()
    return diff.rename("diff").reset_index()[["dataset", "user_id", "diff"]]


@dataclass(frozen=True)
class Components:
    """A one-way variance-components split of per-sample differences grouped by user."""

    between: float  # variance of the users' true mean differences
    within: float  # variance of one reply's difference around its user's mean
    pairs: float  # mean test pairs per user in the run

    def sd(self, pairs: float) -> float:
        """The SD of a user's mean difference over `pairs` test pairs."""
        return math.sqrt(self.between + self.within / pairs)


def variance_components(diffs: pd.DataFrame) -> Components | None:
    """The ANOVA (method-of-moments) estimates for unbalanced groups: within = MS_within; between =
    (MS_between - MS_within) / n0, n0 = (N - sum k_i^2 / N) / (g - 1), at least 0. None for < 2 users or no
    user with 2 replies."""
    groups = diffs.groupby(["dataset", "user_id"])["diff"]
    k, means = groups.size().to_numpy(float), groups.mean().to_numpy()
    total, g = k.sum(), len(k)
    if g < 2 or total - g < 1:
        return None
    within = float(((diffs["diff"] - groups.transform("mean")) ** 2).sum() / (total - g))
    grand = float(diffs["diff"].mean())
    between_ms = float((k * (means - grand) ** 2).sum() / (g - 1))
    n0 = (total - (k ** 2).sum() / total) / (g - 1)
    return Components(max(0.0, (between_ms - within) / n0), within, float(k.mean()))


def power_table(run: RunValues, targets: dict[str, float] | None = None, power: float = POWER,
                settings: judging.ClaimSettings = judging.ClaimSettings()) -> pd.DataFrame:
    """One row per comparison and metric: n users, family size m, SD, detectable effect, target, n needed
    (and, from per-sample scores, the SD's between / within split and the run's test pairs per user)."""
    targets = {**DEFAULT_TARGETS, **(targets or {})}
    comparisons = comparisons_by_metric(run.values, run.small_datasets, settings)
    family = pd.Series([(c.claim, c.metric, c.reading) for c in comparisons]).value_counts().to_dict()  # as the judge's Holm families
    rows = []
    for c in comparisons:
        diffs = judging.unit_differences(run.values, c).to_numpy(float)
        n, m = int(diffs.size), family[(c.claim, c.metric, c.reading)]
        sd = float(np.std(diffs, ddof=1)) if n >= 2 else float("nan")
        alpha = settings.alpha / m  # Holm's strictest step

        def detectable(users: int, sd: float = sd) -> float:
            return detectable_effect(c.kind, users, sd, alpha, power)

        row = {"family": c.claim, "dataset": c.dataset, "comparison": c.label, "metric": c.metric, "kind": c.kind,
               "source": c.source, "n": n, "m": m, "effect": float(diffs.mean()) if n else float("nan"), "sd": sd,
               "detectable": detectable(n), "target": targets[c.metric],
               "n_needed": users_needed(detectable, targets[c.metric]) if np.isfinite(sd) else None,
               "sd_between": float("nan"), "sd_within": float("nan"), "pairs_per_user": float("nan")}
        if run.samples is not None:
            parts = variance_components(sample_differences(run.samples, c))
            if parts is not None:
                row.update(sd_between=math.sqrt(parts.between), sd_within=math.sqrt(parts.within),
                           pairs_per_user=parts.pairs)
        rows.append(row)
    return pd.DataFrame(rows)


def format_power(table: pd.DataFrame, run: RunValues, run_dir: str | Path, power: float = POWER,
                 alpha: float = judging.ALPHA) -> str:
    """The printed power table with its conventions and notes."""
    lines = [f"power of {run_dir}'s paired comparisons: per user, {power:.0%} power, Holm's strictest step "
             f"(alpha {alpha:g} / m, m = comparisons in the family for that metric)", f"sign: {SIGN_NOTE}",
             "detectable: one-sided paired t for greater / noninferior, two-sided for differs, the TOST margin for "
             "equivalent; n_needed: fewest users whose detectable effect <= target", ""]
    if table.empty:
        lines.append("no comparison in scope (systems missing)")
    else:
        shown = table.drop(columns=["source"]).copy()
        if run.samples is None:
            shown = shown.drop(columns=["sd_between", "sd_within", "pairs_per_user"])
        shown["n_needed"] = shown["n_needed"].map(lambda v: f"> {MAX_USERS:.0e}" if v is None or v != v else str(int(v)))
        floats = {c: ".3g" for c in ("effect", "sd", "detectable", "target", "sd_between", "sd_within")}
        floats["pairs_per_user"] = ".1f"
        for column, spec in floats.items():
            if column in shown:
                shown[column] = shown[column].map(lambda v, spec=spec: "-" if v != v else format(v, spec))
        lines.append(shown.to_string(index=False))
    lines += ["", "note: C3 (Distinct-S) and C5 (share of replies under 0.2) are judged on other metrics: not here"]
    lines += [f"note: {n}" for n in run.notes]
    return "\n".join(lines)


@dataclass(frozen=True)
class DesignGrid:
    """The designs `design_tradeoff` costs and powers: every combination of these."""

    users: Sequence[int]
    train_pairs: Sequence[float]  # fine-tuning pairs per user
    test_pairs: Sequence[float]  # test pairs per user


def design_tradeoff(table: pd.DataFrame, run: RunValues, hours: Callable[[int, float, float], float],
                    grid: DesignGrid, metric: str = "similarity", power: float = POWER,
                    settings: judging.ClaimSettings = judging.ClaimSettings()) -> pd.DataFrame:
    """Per design of `grid` (users, fine-tuning pairs per user, test pairs per user): `hours(users, train_pairs,
    test_pairs)` as minutes (e.g. `plan.Plan.design_hours`) and, per family of `table` (`power_table`), the
    detectable effect on `metric` of its hardest comparison (the largest SD at the design's test pairs).
    The SD at other test pairs comes from `variance_components` when the run kept per-sample scores, else the
    measured SD is kept (see the module docstring)."""
    rows_of = table[table["metric"] == metric]
    parts: dict[int, Components | None] = {}
    if run.samples is not None:
        comparisons = {(c.claim, c.dataset, c.label): c
                       for c in comparisons_by_metric(run.values, run.small_datasets, settings) if c.metric == metric}
        for i, row in rows_of.iterrows():
            c = comparisons[(row["family"], row["dataset"], row["comparison"])]
            parts[i] = variance_components(sample_differences(run.samples, c))
    out = []
    for n in grid.users:
        for train in grid.train_pairs:
            for test in grid.test_pairs:
                row: dict[str, Any] = {"users": n, "train_pairs": train, "test_pairs": test,
                                       "minutes": hours(n, train, test) * 60}
                for family, rows in rows_of.groupby("family", sort=False):
                    effects = []
                    for i, r in rows.iterrows():
                        sd = parts[i].sd(test) if parts.get(i) is not None else r["sd"]
                        effects.append(detectable_effect(r["kind"], n, sd, settings.alpha / r["m"], power))
                    row[family] = max(effects)
                out.append(row)
    return pd.DataFrame(out)


TRADEOFF_ASSUMPTIONS = (
    "minutes: the cost plan's stage 03 and 04-05 estimate at each design (measured step costs, the plan's epochs)",
    "detectable: per family, its hardest comparison (largest SD), 80% power at Holm's strictest step",
    "SD of a user's mean difference = sqrt(between-user variance + within-user variance / test pairs), split "
    "from the run's per-sample differences (a published folder keeps its measured SD at every test-pairs value)",
    "the effects themselves are taken as unchanged: more fine-tuning pairs cost minutes, what they change in "
    "the effect is not modelled",
)
