"""Figure 2 (§4.2.4): how similar each system's replies are to the reference, in bins of 0.2.

The figure is rebuilt from the saved per-sample Exp1 scores alone, so restyling it never reruns a model:
- `outputs/<profile>/04_exp1_next_utterance/scores.parquet`: fine-tuned T5 systems and the retrieval floor;
- `outputs/<profile>/06_llm_baselines/scores.parquet`: the prompt-based LLMs.
Each row is one generated reply: dataset, split_set, user_id, pair_id, pretrain (plain_t5 | plain_dialogue |
psp | ppp; "none" for the retrieval floor; "llm"), method, system (display label), generated, reference,
similarity, rouge_l, nll, n_tokens. Only dataset, system, pretrain, method and similarity are read here.

Samples are pooled over split sets and users: a bar is the share of all of a system's replies on that dataset.

Default systems (`figure2_systems`): every prompt-based LLM, and per dataset the fine-tuned system with the
highest mean similarity for each of One-ID, LoRA and FULL (the paper's Figure 2 contrasts the prompt-based
models with the fine-tuned ones). The retrieval floor is left out by default; name it in `systems` to show it.

CLI: `python -m udg_lib.plots --profile cpu [--outputs-root DIR]` (`make figures`).
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from udg_lib.catalog import EXP1, LLM
from udg_lib import io, methods
from udg_lib.conditions import NO_PRETRAINED, PRETRAINED_FORMATS
from udg_lib.paths import outputs_root, stage_dir

EXP1_STAGE = EXP1.name  # fine-tuned systems and the retrieval floor
LLM_STAGE = LLM.name  # prompt-based LLMs; Figure 2 is written under this stage
SCORES_FILE = "scores.parquet"
FIGURE_NAME = "figure2"
FIGURE2_TITLE = "Frequency distribution of similarity between generated and reference utterances"
# Figure 2's size in inches: a panel per dataset, its legend beside it (`make_room_for_legends`).
PANEL_MIN_WIDTH, PANEL_WIDTH_PER_BIN = 4.5, 0.75
FIGURE_HEIGHT = 4.2
PANEL_MIN_HEIGHT = 2.6  # of the plot area: the rest of FIGURE_HEIGHT holds the titles and the tick labels
LEGEND_GAP = 0.2  # between a legend and the next panel

PRETRAINS: tuple[str, ...] = tuple(PRETRAINED_FORMATS)  # fine-tuned systems, in table order
FLOOR_PRETRAIN = NO_PRETRAINED  # retrieval floor
LLM_PRETRAIN = "llm"  # prompt-based LLMs
FIGURE2_METHODS: tuple[str, ...] = methods.FINE_TUNED  # fine-tuning methods Figure 2 shows by default
REQUIRED_COLUMNS: tuple[str, ...] = ("dataset", "system", "pretrain", "method", "similarity")
SIMILARITY_SLACK = 1e-4  # cosine similarity of float embeddings can overshoot ±1 by rounding


class ScoresError(ValueError):
    """A fault in a per-sample score table, naming the source, the record and the fault on one line."""

    def __init__(self, source: str, record: str, fault: str):
        self.source, self.record, self.fault = source, record, fault
        super().__init__(f"{source}: {record}: {fault}")


# ---------------------------------------------------------------------------------------------------------------
# Checking and describing the score table


def check_scores(scores: pd.DataFrame, source: str = "scores") -> pd.DataFrame:
    """The score table's generated replies with similarities clipped to [-1, 1]; a clear error for a missing
    column, an unknown pretrain, a similarity that is missing or outside [-1, 1], or a system label used for
    two systems. Rows scored without a reply (`generated` None: stage 04 generates on a subset of the test
    pairs it scores) are left out first."""
    missing = [column for column in REQUIRED_COLUMNS if column not in scores.columns]
    if missing:
        raise ScoresError(source, "columns", f"missing column(s) {missing}; have {list(scores.columns)}")
    if "generated" in scores.columns:
        scores = scores[scores["generated"].notna()]
    if scores.empty:
        raise ScoresError(source, "rows", "no samples")
    known = {*PRETRAINS, FLOOR_PRETRAIN, LLM_PRETRAIN}
    unknown = sorted(set(scores["pretrain"].astype(str)) - known)
    if unknown:
        raise ScoresError(source, "column 'pretrain'", f"unknown value(s) {unknown}; expected one of {sorted(known)}")

    similarity = pd.to_numeric(scores["similarity"], errors="coerce")
    bad = similarity.isna() | (similarity.abs() > 1 + SIMILARITY_SLACK)
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        row = scores.iloc[first]
        raise ScoresError(
            source, f"row {first} ({row['dataset']}, {row['system']})",
            f"similarity must be a number in [-1, 1], got {row['similarity']!r} ({int(bad.sum())} such rows)",
        )

    identities = scores[["dataset", "system", "pretrain", "method"]].astype(str).drop_duplicates()
    clashes = identities[identities.duplicated(["dataset", "system"], keep=False)]
    if not clashes.empty:
        dataset, system = clashes.iloc[0][["dataset", "system"]]
        pairs = clashes[(clashes["dataset"] == dataset) & (clashes["system"] == system)][["pretrain", "method"]]
        raise ScoresError(
            source, f"dataset {dataset!r} system {system!r}",
            f"one label names several systems (pretrain, method): {sorted(map(tuple, pairs.to_numpy()))}",
        )
    checked = scores.copy()
    checked["similarity"] = similarity.clip(-1.0, 1.0)
    return checked


def system_kind(pretrain: str) -> str:
    """"prompt-based", "retrieval floor" or "fine-tuned", from the pretrain column."""
    if pretrain == LLM_PRETRAIN:
        return "prompt-based"
    if pretrain == FLOOR_PRETRAIN:
        return "retrieval floor"
    return "fine-tuned"


def system_order(scores: pd.DataFrame) -> list[str]:
    """System labels in table order: fine-tuned (by pre-training, then method), the floor, then the LLMs."""
    systems = scores[["system", "pretrain", "method"]].astype(str).drop_duplicates("system")
    pretrain_rank = {name: rank for rank, name in enumerate((*PRETRAINS, FLOOR_PRETRAIN, LLM_PRETRAIN))}
    method_rank = {name: rank for rank, name in enumerate(methods.method_order())}
    order = sorted(
        systems.itertuples(index=False),
        key=lambda s: (pretrain_rank[s.pretrain], method_rank.get(s.method, len(method_rank)), s.method, s.system),
    )
    return [s.system for s in order]


# ---------------------------------------------------------------------------------------------------------------
# The histogram (§4.2.4: "frequency of similarity ... arranged in 0.2 increments")


def similarity_bin_edges(lowest_similarity: float, bin_width: float = 0.2) -> np.ndarray:
    """Edges from the first multiple of `bin_width` at or below min(lowest_similarity, -bin_width) up to 1.0.

    Negative similarities get their own bins, and there is always at least one below 0 as in Figure 2. Edges
    are rounded to 10 decimals so that 0.6 is 0.6, not 3 * 0.2 = 0.6000000000000001.
    """
    steps = 1.0 / bin_width if bin_width > 0 else math.inf
    if not (0 < bin_width <= 1) or abs(steps - round(steps)) > 1e-9:
        raise ValueError(f"bin_width must divide 1 evenly (e.g. 0.1, 0.2, 0.25), got {bin_width!r}")
    first = min(math.floor(round(lowest_similarity / bin_width, 9)), -1)
    return np.round(np.arange(first, round(steps) + 1) * bin_width, 10)


def bin_label(low: float, high: float, last: bool, decimals: int = 1) -> str:
    """"[0.2, 0.4)"; the last bin is closed: "[0.8, 1.0]"."""
    low, high = round(low, decimals) + 0.0, round(high, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"[{low:.{decimals}f}, {high:.{decimals}f}{']' if last else ')'}"


def label_decimals(bin_width: float) -> int:
    """Decimals that write every edge exactly: 1 for 0.2, 2 for 0.25."""
    return next((d for d in range(1, 10) if abs(bin_width * 10**d - round(bin_width * 10**d)) < 1e-6), 10)


def similarity_histogram(scores: pd.DataFrame, bin_width: float = 0.2) -> pd.DataFrame:
    """Counts and shares of similarity per dataset, system and bin (Figure 2's data).

    Bins are [low, high) except the last, [0.8, 1.0], so a similarity of 1.0 is counted; all systems share
    the same bins, and empty bins are listed with count 0. `share` is the bin's fraction of that system's
    samples on that dataset (pooled over split sets and users).
    Columns: dataset, system, kind, pretrain, method, bin, bin_low, bin_high, count, share, n_samples.
    """
    scores = check_scores(scores)
    edges = similarity_bin_edges(float(scores["similarity"].min()), bin_width)
    n_bins, decimals = len(edges) - 1, label_decimals(bin_width)
    # side="right": a similarity equal to an edge opens the bin above it; 1.0 is clipped into the last bin
    index = np.clip(np.searchsorted(edges, scores["similarity"].to_numpy(), side="right") - 1, 0, n_bins - 1)
    binned = scores.assign(bin_index=index)

    rank = {system: position for position, system in enumerate(system_order(scores))}
    rows = []
    for (dataset, system), group in binned.groupby(["dataset", "system"], sort=False):
        counts = np.bincount(group["bin_index"].to_numpy(), minlength=n_bins)
        pretrain, method = str(group["pretrain"].iloc[0]), str(group["method"].iloc[0])
        for b in range(n_bins):
            rows.append({
                "dataset": dataset, "system": system, "kind": system_kind(pretrain), "pretrain": pretrain,
                "method": method, "bin": bin_label(edges[b], edges[b + 1], last=b == n_bins - 1, decimals=decimals),
                "bin_low": float(edges[b]), "bin_high": float(edges[b + 1]), "count": int(counts[b]),
                "share": float(counts[b] / len(group)), "n_samples": len(group), "_rank": rank[system],
            })
    table = pd.DataFrame(rows).sort_values(["dataset", "_rank", "bin_low"], kind="stable")
    return table.drop(columns="_rank").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------
# The figure


def figure2_systems(scores: pd.DataFrame) -> dict[str, list[str]]:
    """Default systems per dataset: every LLM, and the best fine-tuned system (by mean similarity) of each
    method in One-ID, LoRA and FULL; in table order."""
    scores = check_scores(scores)
    order = system_order(scores)
    chosen: dict[str, list[str]] = {}
    for dataset, group in scores.groupby("dataset", sort=True):
        picks = set(group.loc[group["pretrain"] == LLM_PRETRAIN, "system"])
        fine_tuned = group[group["pretrain"].isin(PRETRAINS) & group["method"].isin(FIGURE2_METHODS)]
        means = fine_tuned.groupby(["method", "system"])["similarity"].mean().reset_index()
        for _, by_method in means.groupby("method"):
            # ties go to the system listed first in table order, so the choice is reproducible
            best = by_method.assign(rank=by_method["system"].map(order.index))
            picks.add(best.sort_values(["similarity", "rank"], ascending=[False, True]).iloc[0]["system"])
        chosen[str(dataset)] = [system for system in order if system in picks]
    return chosen


def plot_similarity_histograms(
    scores: pd.DataFrame, systems: Sequence[str] | None = None, bin_width: float = 0.2
) -> Figure:
    """Figure 2: one panel per dataset, grouped bars per similarity bin, one bar per system.

    `systems` names the systems to show (in every dataset that has them); by default `figure2_systems`.
    Prompt-based models are hatched so they stand out beside the fine-tuned ones; a system keeps its colour
    across panels. Each panel's legend stands beside it, and the figure grows to hold the legends and wraps its
    title, so that nothing is cut off or covered for any number of datasets and systems.
    """
    scores = check_scores(scores)
    histogram = similarity_histogram(scores, bin_width)
    datasets = sorted(histogram["dataset"].astype(str).unique())
    if systems is None:
        per_dataset = figure2_systems(scores)
    else:
        unknown = [s for s in systems if s not in set(histogram["system"])]
        if unknown:
            raise ValueError(f"no scores for system(s) {unknown}; have {system_order(scores)}")
        per_dataset = {d: [s for s in systems if s in set(histogram.loc[histogram["dataset"] == d, "system"])]
                       for d in datasets}
    shown = [s for s in system_order(scores) if any(s in picks for picks in per_dataset.values())]
    palette = [f"C{i % 10}" for i in range(len(shown))]
    colour = dict(zip(shown, palette))

    bins = histogram.drop_duplicates("bin_low").sort_values("bin_low")["bin"].tolist()
    panel_width = max(PANEL_MIN_WIDTH, PANEL_WIDTH_PER_BIN * len(bins))
    fig = Figure(figsize=(panel_width * len(datasets), FIGURE_HEIGHT), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(datasets), sharey=True, squeeze=False)[0])
    x = np.arange(len(bins))
    for ax, dataset in zip(axes, datasets):
        names = per_dataset.get(dataset, [])
        width = 0.8 / max(1, len(names))
        for position, system in enumerate(names):
            rows = histogram[(histogram["dataset"] == dataset) & (histogram["system"] == system)]
            prompt_based = rows["kind"].iloc[0] == "prompt-based"
            ax.bar(
                x - 0.4 + width * (position + 0.5), rows["share"].to_numpy(), width,
                color=colour[system], hatch="//" if prompt_based else None, edgecolor="white" if prompt_based else None,
                label=f"{system} (n={int(rows['n_samples'].iloc[0])})",
            )
        ax.set_xticks(x, bins, rotation=30, ha="right")
        ax.set_xlabel("similarity to reference")
        ax.set_title(dataset)
        ax.grid(axis="y", alpha=0.3)
        if names:
            # beside the panel, not over its bars (constrained layout makes room for it)
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    axes[0].set_ylabel("share of replies")
    make_room_for_legends(fig, panel_width, len(datasets))
    fit_suptitle(fig, FIGURE2_TITLE)
    return fig


def make_room_for_legends(fig: Figure, panel_width: float, n_panels: int) -> None:
    """Widen the figure by the widest panel legend per panel, and make it tall enough for the tallest one,
    so that the panels keep `panel_width` inches whatever the number and names of the systems."""
    legends = [legend for ax in fig.get_axes() if (legend := ax.get_legend()) is not None]
    extents = [legend.get_window_extent() for legend in legends]
    widest = max((extent.width for extent in extents), default=0.0) / fig.dpi
    tallest = max((extent.height for extent in extents), default=0.0) / fig.dpi
    fig.set_size_inches((panel_width + widest + LEGEND_GAP) * n_panels,
                        max(FIGURE_HEIGHT, tallest + FIGURE_HEIGHT - PANEL_MIN_HEIGHT))


def fit_suptitle(fig: Figure, title: str, margin: float = 0.04) -> None:
    """Set the figure's title, wrapped onto more lines where the figure is narrower than it (one panel).

    Constrained layout makes room for a title's height, never for its width: a line wider than the figure
    is cut off at both edges of the saved image. `margin` is the share of the width left free.
    """
    text = fig.suptitle(title)
    width, available = text.get_window_extent().width, fig.bbox.width * (1 - margin)
    if width > available:
        fits = max(1, int(len(title) * available / width))  # characters per line
        n_lines = len(textwrap.wrap(title, fits))
        # the narrowest wrap into that many lines, so that they come out about even
        even = next(w for w in range(math.ceil(len(title) / n_lines), fits + 1)
                    if len(textwrap.wrap(title, w)) <= n_lines)
        text.set_text(textwrap.fill(title, even))


# ---------------------------------------------------------------------------------------------------------------
# Rebuilding from saved scores


def score_paths(outputs_dir: str | Path) -> list[Path]:
    """Where Exp1's per-sample scores live: stage 04 (fine-tuned, floor) and stage 06 (LLMs)."""
    return [stage_dir(outputs_dir, stage) / SCORES_FILE for stage in (EXP1_STAGE, LLM_STAGE)]


def load_scores(outputs_dir: str | Path) -> pd.DataFrame:
    """The score files that exist, concatenated and checked; an error naming the paths if none exists."""
    paths = [path for path in score_paths(outputs_dir) if path.is_file()]
    if not paths:
        raise FileNotFoundError(
            "no per-sample score file for Figure 2; expected one of: " + ", ".join(map(str, score_paths(outputs_dir)))
        )
    frames = []
    for path in paths:
        frame = pd.read_parquet(path)
        check_scores(frame, str(path))  # fault messages name the file
        frames.append(frame)
    return check_scores(pd.concat(frames, ignore_index=True), " + ".join(map(str, paths)))


def rebuild_figure2(outputs_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write figure2.png, figure2.pdf and figure2_histogram.csv from saved scores; runs no model.

    `out_dir` defaults to `<outputs_dir>/06_llm_baselines/figures/`. The CSV holds every system's histogram;
    `in_figure` marks the bars drawn. Each file is written atomically.
    """
    out_dir = Path(out_dir) if out_dir else stage_dir(outputs_dir, LLM_STAGE) / "figures"
    return write_figure2(load_scores(outputs_dir), out_dir)


def write_figure2(scores: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Figure 2 (PNG, PDF) and its histogram CSV from per-sample scores already in memory (notebook 06)."""
    scores = check_scores(scores)
    out_dir = Path(out_dir)
    histogram = similarity_histogram(scores)
    drawn = {(d, s) for d, names in figure2_systems(scores).items() for s in names}
    histogram["in_figure"] = [(str(d), s) in drawn for d, s in zip(histogram["dataset"], histogram["system"])]

    fig = plot_similarity_histograms(scores)
    written = []
    for extension, options in (("png", {"dpi": 150}), ("pdf", {"metadata": {"CreationDate": None}})):
        path = out_dir / f"{FIGURE_NAME}.{extension}"
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format=extension, **options)  # the temp name has no suffix to infer a format from
        written.append(path)
    written.append(io.write_text(out_dir / f"{FIGURE_NAME}_histogram.csv", histogram.to_csv(index=False)))
    return written


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m udg_lib.plots", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True,
                        help=f"read outputs/<profile>/ (Figure 2 goes to {LLM_STAGE}/figures)")
    parser.add_argument("--outputs-root", help="folder of stage outputs instead of outputs/<profile>")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        paths = rebuild_figure2(outputs_root(args.profile, args.outputs_root))
    except (FileNotFoundError, ScoresError) as exc:
        print(f"udg plots: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
