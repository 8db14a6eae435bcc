"""Results as reference files: `publish_results` copies a small, checked folder of a run to
`results/<profile>/` (only from a run whose stages all ran from a clean commit that includes the last change to
the code and the profile's params) and rewrites README's results block from it; `compare_results` sets the
headline numbers of two such folders side by side (a rerun, another processor).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from udg_lib.catalog import EXP2, STAGE_NAMES
from udg_lib import io
from udg_lib.provenance import stale_stage_faults
from udg_lib.rendering import (
    CLAIMS_FILE,
    CLAIM_TESTS_FILE,
    QUESTIONS_FILE,
    QUESTION_TESTS_FILE,
    REPORT_FILE,
    _csv,
    _exp1_tables,
    _table7,
    run_summary,
)


# ---------------------------------------------------------------------------------------------------------------
# Reference results: results/<profile>/, README's block, comparison with a rerun

PUBLISH_PATTERNS = (REPORT_FILE, CLAIMS_FILE, CLAIM_TESTS_FILE, QUESTIONS_FILE, QUESTION_TESTS_FILE,
                    "*/metrics.json", "*/*.csv", "*/*.md", "*/*.png", "*/figures/*.png")
PUBLISH_MAX_FILE_BYTES = 512_000  # per file: tables, metrics and figures are far smaller; data files are not copied
PUBLISH_MAX_BYTES = 2_000_000  # the whole folder, committed to git


def publish_results(root: str | Path, dest: str | Path, profile: str | None = None,
                    repo: str | Path | None = None) -> list[Path]:
    """Copy the small reference files of a finished run (report, claims, tables as CSV/markdown, every stage's
    metrics.json, figures; no model or per-sample data) from `root` to `dest`, keeping the stage layout, so
    report.md's links work there too. Raises when a stage has no metrics.json, when a stage's recorded commit
    is missing, `+dirty`, or older than the last change to udg_lib/, notebooks/ or params/<profile>/ of the
    checkout `repo` (default: this one; `provenance.stale_stage_faults`; there is no override: rerun the
    stale stages from a clean commit), or when the folder would exceed PUBLISH_MAX_BYTES. Every check runs
    before anything is copied, and the copy is atomic (`io.staged_dir`)."""
    root, dest = Path(root), Path(dest)
    absent = [s for s in STAGE_NAMES if not (root / s / "metrics.json").is_file()]
    if absent:
        raise FileNotFoundError(f"{root}: stages {absent} have no metrics.json; publish a finished run")
    faults = stale_stage_faults([root / s / "metrics.json" for s in STAGE_NAMES], profile, repo)
    if faults:
        more = f" (and {len(faults) - 1} more stage(s))" if len(faults) > 1 else ""
        raise ValueError(f"refused to publish {root}: {faults[0]}{more}; rerun from a clean, current commit")
    files = sorted({p for pattern in PUBLISH_PATTERNS for p in root.glob(pattern)
                    if p.is_file() and (p.parent == root or p.relative_to(root).parts[0] in STAGE_NAMES)})
    large = [p for p in files if p.stat().st_size > PUBLISH_MAX_FILE_BYTES]
    for path in large:
        print(f"udg report: not published (over {PUBLISH_MAX_FILE_BYTES:,} bytes): {path.relative_to(root)}",
              file=sys.stderr)
    files = [p for p in files if p not in large]
    total = sum(p.stat().st_size for p in files)
    if total > PUBLISH_MAX_BYTES:
        biggest = sorted(files, key=lambda p: -p.stat().st_size)[:3]
        raise ValueError(f"{dest}: {total:,} bytes would exceed {PUBLISH_MAX_BYTES:,}; largest: "
                         + ", ".join(f"{p.relative_to(root)} ({p.stat().st_size:,})" for p in biggest))
    with io.staged_dir(dest) as staging:
        for path in files:
            target = staging / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return [dest / p.relative_to(root) for p in files]


def headline_numbers(folder: str | Path) -> pd.DataFrame:
    """The numbers a rerun is compared on (item, value): stage times, Exp1 per system and dataset, Table 7
    Dist-S, the claims' verdicts and each comparison's effect. Reads a results/ or an outputs/ folder."""
    folder = Path(folder)
    items: list[tuple[str, Any]] = []
    summary = run_summary({name: folder / name for name in STAGE_NAMES})
    items += [(f"wall minutes: {r.stage}", r.wall_minutes) for r in summary.itertuples(index=False)]
    items += [(f"precision: {r.stage}", r.precision) for r in summary.itertuples(index=False) if r.precision]
    for dataset, table in _exp1_tables(folder).items():
        for row in table.to_dict("records"):
            for metric in ("similarity", "rouge_l", "bits_per_char"):
                if metric in row:
                    items.append((f"Exp1 {dataset}: {row['model']} / {row['fine-tuning']}: {metric}", row[metric]))
    table7 = _table7(folder / EXP2.name)
    if table7 is not None:
        for row in table7.to_dict("records"):
            items += [(f"Exp2 {row['system']}: {c}", row[c]) for c in table7.columns if c.endswith("Dist-S")]
    claims, tests = _csv(folder / CLAIMS_FILE), _csv(folder / CLAIM_TESTS_FILE)
    if claims is not None:
        items += [(f"{r.claim} verdict", r.verdict) for r in claims.itertuples(index=False)]
        if "verdict_bits_per_char" in claims.columns:
            items += [(f"{r.claim} verdict (bits/char)", r.verdict_bits_per_char) for r in claims.itertuples(index=False)
                      if isinstance(r.verdict_bits_per_char, str) and r.verdict_bits_per_char]
    if tests is not None:
        metric = (lambda r: f" ({r.metric})" if getattr(r, "metric", "similarity") == "bits_per_char" else "")
        items += [(f"{r.claim} {r.dataset}: {r.comparison}{metric(r)}: effect", r.effect)
                  for r in tests.itertuples(index=False)]
    answers, question_tests = _csv(folder / QUESTIONS_FILE), _csv(folder / QUESTION_TESTS_FILE)
    if answers is not None:
        items += [(f"{r.question} answer", r.answer) for r in answers.itertuples(index=False)]
    if question_tests is not None:
        metric = (lambda r: f" ({r.metric})" if getattr(r, "metric", "similarity") == "bits_per_char" else "")
        items += [(f"{r.question} {r.dataset}: {r.comparison}{metric(r)}: effect", r.effect)
                  for r in question_tests.itertuples(index=False)]
    return pd.DataFrame(items, columns=["item", "value"])


def compare_results(reference: str | Path, run: str | Path) -> pd.DataFrame:
    """Headline numbers of two folders side by side (outer join; a difference where both are numbers)."""
    merged = headline_numbers(reference).merge(headline_numbers(run), on="item", how="outer", sort=False,
                                               suffixes=(" (reference)", " (run)"))
    a, b = merged.columns[1], merged.columns[2]
    merged["difference"] = [y - x if isinstance(x, (int, float, np.number)) and isinstance(y, (int, float, np.number))
                            and not isinstance(x, bool) else ("" if x == y else "differs")
                            for x, y in zip(merged[a], merged[b])]
    return merged


def precision_differences(compared: pd.DataFrame) -> list[str]:
    """One line per stage whose two runs computed in different precisions (`compare_results`' rows): their
    numbers differ by rounding as well as by anything else."""
    rows = compared[compared["item"].str.startswith("precision: ") & (compared["difference"] == "differs")]
    return [f"note: {r['item'].removeprefix('precision: ')} ran in {r.iloc[1]} in the reference and in {r.iloc[2]} in "
            f"the run: its numbers differ by rounding too" for _, r in rows.iterrows()]
