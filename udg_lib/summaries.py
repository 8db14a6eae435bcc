"""Light presentation helpers (pandas only): system and LLM labels, the significance notes under Tables 3-5 and
7, and the LoRA learning-rate sweep's summary. The stage notebooks reach them through `experiments`; the report's
renderer imports them from here, so `python -m udg_lib.report` does not load torch and transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from udg_lib.conditions import PRETRAINED_LABELS
from udg_lib.methods.names import LABELS as METHOD_LABELS


def system_label(pretrained: str, method: str, labels: Mapping[str, str] | None = None) -> str:
    """Display label of a system, e.g. "PSP / LoRA"; floors without a pre-trained model keep their own.
    `labels` names methods beyond the paper's (`methods.labels_of`)."""
    labels = {**METHOD_LABELS, **(labels or {})}
    if pretrained in PRETRAINED_LABELS:
        return f"{PRETRAINED_LABELS[pretrained]} / {labels.get(method, method)}"
    return labels.get(method, method)


LLM_DISPLAY_NAMES: dict[str, str] = {"smollm2": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma-3-270M"}


def llm_short_name(name_or_path: str) -> str:
    """A method name for an LLM: the packaged short name, or the last path / id component, lower-cased."""
    return Path(name_or_path.rstrip("/")).name.lower() or "llm"


def llm_display_name(name_or_path: str) -> str:
    return LLM_DISPLAY_NAMES.get(name_or_path, Path(name_or_path.rstrip("/")).name)


def significance_notes(significance: pd.DataFrame, alpha: float = 0.05,
                       labels: Mapping[str, str] | None = None) -> list[str]:
    """One line per test: "a vs b: mean diff, p (test, n users)", significant ones marked. `labels` names
    methods beyond the paper's (`methods.labels_of`)."""
    lines = []
    for row in significance.itertuples(index=False):
        mark = " *" if row.p_value < alpha else ""
        a, b = (system_label(*label.partition("/")[::2], labels) for label in (row.label_a, row.label_b))
        lines.append(f"- {a} vs {b} ({row.metric}): "
                     f"diff {row.mean_diff:+.4f}, p = {row.p_value:.3g}{mark} ({row.method}, n = {row.n})")
    return lines


def sweep_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per swept learning rate: mean initial and best dev loss, epochs run, share stopped early,
    and `users_lowest`, the users whose lowest best dev loss came with that rate (how decisive the choice was:
    a mean won by one user of two can flip with the last digits of the pre-trained weights)."""
    columns = ["initial_dev_loss", "best_dev_loss", "epochs_run", "stopped_early"]
    summary = table.groupby("learning_rate")[columns].mean().reset_index()
    winners = table.loc[table.groupby("user_id")["best_dev_loss"].idxmin(), "learning_rate"].value_counts()
    return summary.assign(users_lowest=summary["learning_rate"].map(winners).fillna(0).astype(int))
