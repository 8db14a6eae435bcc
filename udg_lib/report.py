"""The study report: `outputs/<profile>/report.md`, assembled from the stages' saved outputs.

Tables 1-7 and Figure 2 of our run, the paper's numbers beside ours where they are comparable, the run's
wall time and peak memory, and the paper's claims C1-C5 with whether our run supports each (with the
significance figures the paper does not give). Nothing here runs a model:
`python -m udg_lib.report --profile cpu` rebuilds it from the files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from udg_lib import io, paths

STAGES = ("00_prepare_corpus", "01_infer_profiles", "02_pretrain_models", "03_finetune_users",
          "04_exp1_next_utterance", "05_exp2_diversity", "06_llm_baselines")
REPORT_FILE = "report.md"
ALPHA = 0.05
LOW_SIMILARITY = 0.2  # C5 / Figure 2: "many similarities under 0.2"

# Otsuka et al. 2024, Table 4 (User Profile Chat): real users in text chat with ~170 training turns each, the
# paper's closest analog of BYU Chit-Chat (real users, text chat, ~100 training turns each).
# (similarity, Acc@sim0.9, ROUGE-L, PPL); PPL None = NA.
PAPER_TABLE4_UPC: dict[tuple[str, str], tuple[float, float, float, float | None]] = {
    ("plain_t5", "one_id"): (0.497, 0.0467, 23.7, 23.7), ("plain_t5", "lora"): (0.443, 0.0235, 21.4, 23.0),
    ("plain_t5", "full"): (0.448, 0.0282, 22.2, 23.3),
    ("plain_dialogue", "one_id"): (0.530, 0.0711, 27.8, 15.9), ("plain_dialogue", "lora"): (0.520, 0.0691, 27.8, 16.6),
    ("plain_dialogue", "full"): (0.524, 0.0727, 28.2, 14.8),
    ("psp", "one_id"): (0.533, 0.0721, 27.9, 17.2), ("psp", "lora"): (0.532, 0.0781, 28.0, 12.6),
    ("psp", "full"): (0.533, 0.079, 28.2, 10.1),
    ("ppp", "one_id"): (0.533, 0.072, 27.4, 17.7), ("ppp", "lora"): (0.530, 0.0758, 27.9, 14.5),
    ("ppp", "full"): (0.534, 0.0780, 28.0, 14.4),
    ("llm", "GPT3.5"): (0.342, 0.0447, 18.4, None), ("llm", "Jp-NeoX-3.6B"): (0.317, 0.0306, 15.8, None),
    ("llm", "Jp-Llama2-7B"): (0.313, 0.0373, 15.1, None),
}
# Table 7, UPC column: (Dist-1, Dist-2, Dist-S).
PAPER_TABLE7_UPC: dict[tuple[str, str], tuple[float, float, float]] = {
    ("plain_dialogue", "one_id"): (0.174, 0.320, 0.305), ("plain_dialogue", "lora"): (0.0330, 0.0669, 0.265),
    ("plain_dialogue", "full"): (0.0348, 0.0725, 0.312),
    ("psp", "one_id"): (0.0324, 0.0624, 0.181), ("psp", "lora"): (0.0457, 0.103, 0.472),
    ("psp", "full"): (0.0443, 0.100, 0.475),
    ("ppp", "one_id"): (0.0206, 0.0354, 0.0877), ("ppp", "lora"): (0.0496, 0.109, 0.452),
    ("ppp", "full"): (0.0517, 0.112, 0.456),
}
# Table 6 (t5-base, 222 M parameters, a GPU).
PAPER_TABLE6 = pd.DataFrame({"model": ["One-ID", "LoRA", "FULL"], "models": ["1", "No. of users", "No. of users"],
                             "size": ["850 MB", "7 MB", "850 MB"], "response time": ["0.24 s", "0.55 s", "2.7 s"]})
PAPER_CLAIMS = {
    "C1": "Per-user fine-tuned models beat prompt-based LLMs on similarity to the user's real reply (§4.2.4).",
    "C2": "PSP/PPP pre-training (profiles in the prompt) helps LoRA/FULL over Plain Dialogue when user data is "
          "small (§4.2.4).",
    "C3": "One-ID is less diverse across users than LoRA/FULL (Distinct-S, §4.3.4).",
    "C4": "LoRA and FULL do not differ significantly (§4.2.4).",
    "C5": "Prompt-based generation has many similarities under 0.2 (Figure 2).",
}


def low_similarity_shares(scores: pd.DataFrame, threshold: float = LOW_SIMILARITY) -> pd.DataFrame:
    """Per dataset and system: the share of replies whose similarity to the reference is below `threshold`."""
    grouped = scores.groupby(["dataset", "system", "pretrain", "method"], sort=False)["similarity"]
    frame = grouped.agg(share_below=lambda s: float((s < threshold).mean()), n="size").reset_index()
    return frame.rename(columns={"share_below": f"share_below_{threshold:g}"})


# ---------------------------------------------------------------------------------------------------------------
# Claims


def _fine_tuned(label: str) -> bool:
    return label.split("/")[-1] in ("one_id", "lora", "full")


def _verdict(all_hold: bool, most_hold: bool) -> str:
    return "supported" if all_hold else ("partly supported" if most_hold else "not supported")


def _tests_line(frame: pd.DataFrame, most: int = 8) -> str:
    """The tests as "dataset: a vs b diff (p)", the `most` smallest p-values first when there are more."""
    shown = frame.sort_values("p_value").head(most) if len(frame) > most else frame
    line = "; ".join(f"{r.dataset}: {r.label_a} vs {r.label_b} {r.mean_diff:+.3f} (p = {r.p_value:.2g})"
                     for r in shown.itertuples(index=False))
    return line + (f"; ... {len(frame) - most} more in the stage's significance file" if len(frame) > most else "")


def judge_claims(exp1_significance: pd.DataFrame | None, exp2_significance: pd.DataFrame | None,
                 llm_significance: pd.DataFrame | None, low_shares: pd.DataFrame | None) -> pd.DataFrame:
    """C1-C5 with a verdict and the evidence, from the saved significance tables (see PAPER_CLAIMS).

    A claim of a difference holds in a test when the difference has the claimed sign and p < 0.05; C4 (no
    difference) holds when p >= 0.05. "supported": every test holds; "partly": at least half; else not.
    """
    rows = []

    def add(claim: str, tests: pd.DataFrame | None, holds: pd.Series | None, extra: str = "") -> None:
        if tests is None or holds is None or len(tests) == 0:
            rows.append({"claim": claim, "statement": PAPER_CLAIMS[claim], "verdict": "not tested",
                         "tests_holding": "", "evidence": extra or "the stage's outputs are missing"})
            return
        n, k = len(tests), int(holds.sum())
        rows.append({"claim": claim, "statement": PAPER_CLAIMS[claim], "verdict": _verdict(k == n, 2 * k >= n),
                     "tests_holding": f"{k}/{n}", "evidence": extra or _tests_line(tests)})

    if llm_significance is not None:
        c1 = llm_significance[llm_significance["label_a"].str.endswith(("/lora", "/full"))]
        add("C1", c1, (c1["mean_diff"] > 0) & (c1["p_value"] < ALPHA))
    else:
        add("C1", None, None)
    if exp1_significance is not None:
        sim = exp1_significance[exp1_significance["metric"] == "similarity"]
        c2 = sim[sim["label_a"].str.match(r"^(psp|ppp)/(lora|full)$") & sim["label_b"].str.startswith("plain_dialogue/")]
        add("C2", c2, (c2["mean_diff"] > 0) & (c2["p_value"] < ALPHA))
        c4 = sim[sim["label_a"].str.endswith("/full") & sim["label_b"].str.endswith("/lora")]
        add("C4", c4, c4["p_value"] >= ALPHA)
    else:
        add("C2", None, None)
        add("C4", None, None)
    if exp2_significance is not None:
        c3 = exp2_significance[(exp2_significance["metric"] == "dist_s")
                               & exp2_significance["label_a"].str.endswith("/one_id")]
        add("C3", c3, (c3["mean_diff"] < 0) & (c3["p_value"] < ALPHA))
    else:
        add("C3", None, None)
    if low_shares is not None and len(low_shares):
        column = next(c for c in low_shares.columns if c.startswith("share_below"))
        checks, lines = [], []
        for dataset, frame in low_shares.groupby("dataset", sort=False):
            llm = frame[frame["pretrain"] == "llm"]
            tuned = frame[frame["method"].isin(["one_id", "lora", "full"])]
            if llm.empty or tuned.empty:
                continue
            checks.append(llm[column].min() > tuned[column].max())
            lines.append(f"{dataset}: LLMs {', '.join(f'{v:.0%}' for v in llm[column])} below {LOW_SIMILARITY}, "
                         f"fine-tuned at most {tuned[column].max():.0%}")
        holds = pd.Series(checks, dtype=bool)
        add("C5", pd.DataFrame({"check": checks}), holds, "; ".join(lines) + " (holds when every LLM's share "
            "exceeds every fine-tuned system's)")
    else:
        add("C5", None, None)
    return pd.DataFrame(rows).sort_values("claim").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------
# Assembly


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def _metrics(stage: Path) -> dict[str, Any] | None:
    path = stage / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def run_summary(stage_dirs: Mapping[str, Path]) -> pd.DataFrame:
    """Per stage: wall time (the runner's record), peak resident memory of its kernel, device, when it ended."""
    rows = []
    for name in STAGES:
        record = _metrics(stage_dirs[name])
        if record is None:
            continue
        stage, provenance = record.get("stage", {}), record.get("provenance", {})
        rows.append({"stage": name, "wall_minutes": round(stage["wall_seconds"] / 60, 1) if "wall_seconds" in stage
                     else None, "peak_rss_GB": round(provenance.get("peak_rss_mb", float("nan")) / 1024, 2),
                     "device": provenance.get("device", {}).get("torch_device"),
                     "finished": stage.get("finished_at", provenance.get("timestamp"))})
    return pd.DataFrame(rows)


def _paper_side_by_side(ours: pd.DataFrame | None) -> str:
    """Our chitchat Table (similarity, ROUGE-L) beside the paper's UPC numbers for the same systems."""
    from udg_lib.experiments import METHOD_LABELS, PRETRAINED_LABELS

    rows = []
    for (pretrain, method), values in PAPER_TABLE4_UPC.items():
        label_model = PRETRAINED_LABELS.get(pretrain, "Prompt LLM")
        label_method = METHOD_LABELS.get(method, method)
        row = {"model": label_model, "fine-tuning": label_method, "paper similarity": values[0],
               "paper ROUGE-L": values[2], "paper PPL": values[3]}
        if ours is not None and pretrain != "llm":
            match = ours[(ours["model"] == label_model) & (ours["fine-tuning"] == label_method)]
            if len(match):
                row.update({"our similarity": match["similarity"].iloc[0], "our ROUGE-L": match["rouge_l"].iloc[0],
                            "our PPL": match["perplexity"].iloc[0]})
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g", missingval="NA")


def build_report(root: str | Path, profile: str, stage_dirs: Mapping[str, str | Path] | None = None) -> str:
    """The report's markdown. `stage_dirs` overrides where a stage's outputs are read (a stage still running
    in its work folder); links always point at the final stage folders under `root`."""
    root = Path(root)
    dirs = {name: Path((stage_dirs or {}).get(name, paths.stage_dir(root, name))) for name in STAGES}
    exp1, exp2, llm = dirs["04_exp1_next_utterance"], dirs["05_exp2_diversity"], dirs["06_llm_baselines"]
    summary = run_summary(dirs)
    total = summary["wall_minutes"].sum() if len(summary) else float("nan")
    peak = summary["peak_rss_GB"].max() if len(summary) else float("nan")
    trained = (_metrics(dirs["03_finetune_users"]) or {}).get("metrics", {})
    parts = [
        f"# Study report: user-specific dialogue generation ({profile} profile)",
        "",
        "A reproduction of Otsuka et al., LREC-COLING 2024, *User-specific dialogue generation*. "
        + ("This is the **small offline setting** (`cpu` profile): a ~2 M-parameter T5 trained from scratch, "
           "public English corpora with inferred profiles, 135 M / 270 M LLMs on a CPU. Compare systems with "
           "each other, not our magnitudes with the paper's." if profile != "full" else
           "The `full` profile: the paper's checkpoints and sizes on a GPU node."),
        "",
        "## The run",
        f"Stages 00-06 took **{total:.1f} min** of wall time in all; peak resident memory **{peak:.2f} GB** "
        "(the largest of the stage kernels; each stage runs in its own kernel).",
        f"Users per dataset: {trained.get('users_per_dataset', {})}; split sets: {trained.get('split_sets', [])}.",
        "",
        summary.to_markdown(index=False) if len(summary) else "(no stage outputs)",
        "",
        "## Table 1 analog: inferred profiles (§3.3)",
        _read(dirs["01_infer_profiles"] / "table1.md") or "(missing)",
        "",
        "## Table 2 analog: datasets (§4.2.1)",
        _read(dirs["00_prepare_corpus"] / "table2.md") or "(missing)",
        "",
        "## Tables 3-5 analogs: Exp1 next-utterance prediction (§4.2)",
        "One table per dataset; mean over users and split sets; best value per metric in bold. Prompt LLM rows",
        "answer the contexts noted below each table.",
    ]
    tables = sorted(llm.glob("table[3-9]_*.md")) or sorted(exp1.glob("table[3-9]_*.md"))
    for path in tables:
        parts += ["", _read(path) or ""]
    ours_chitchat = next((_csv(p.with_suffix(".csv")) for p in tables if p.stem.endswith("_chitchat")), None)
    parts += ["", "### Beside the paper (its Table 4, User Profile Chat, the closest analog of Chit-Chat)",
              _paper_side_by_side(ours_chitchat)]
    parts += ["", "## Table 6 analog: model count, size, response time", _read(exp1 / "table6.md") or "(missing)",
              "", "Paper (t5-base, a GPU):", PAPER_TABLE6.to_markdown(index=False)]
    parts += ["", "## Table 7 analog: Exp2 diversity across users (§4.3)", _read(exp2 / "table7.md") or "(missing)",
              "", "Paper, UPC column:",
              pd.DataFrame([{"system": f"{p} / {m}", "Dist-1": v[0], "Dist-2": v[1], "Dist-S": v[2]}
                            for (p, m), v in PAPER_TABLE7_UPC.items()]).to_markdown(index=False, floatfmt=".3g")]
    figure = paths.stage_dir(".", "06_llm_baselines") / "figures" / "figure2.png"
    parts += ["", "## Figure 2 analog: similarity between generated and reference replies",
              f"![Figure 2]({figure.as_posix()})" if (llm / "figures" / "figure2.png").is_file() else "(missing)"]
    leakage = _csv(exp1 / "leakage_by_method.csv")
    if leakage is not None:
        parts += ["", "## Cross-user leakage (beyond the paper)",
                  "Share of generated replies closer to another user's training responses than to the user's own "
                  "(`closer_to_other`) and near copies (similarity >= 0.9) of another user's (`verbatim_other`). "
                  "DA sees no user: its rates are the chance level.", "",
                  leakage.to_markdown(index=False, floatfmt=".3f")]
        tests = _csv(exp1 / "leakage_significance.csv")
        if tests is not None:
            parts += ["", tests[["dataset", "label_a", "label_b", "metric", "mean_diff", "p_value", "n"]]
                      .to_markdown(index=False, floatfmt=".3g")]
    claims = judge_claims(_csv(exp1 / "significance.csv"), _csv(exp2 / "significance.csv"),
                          _csv(llm / "significance_vs_llm.csv"), _csv(llm / "low_similarity_share.csv"))
    parts += ["", "## The paper's claims, checked on this run",
              "Paired tests across users (Exp1) or questions (Exp2), Wilcoxon signed-rank unless the profile says "
              "otherwise; a test holds when the difference has the claimed sign with p < 0.05 (C4: p >= 0.05). "
              "Uncorrected for multiple comparisons.", ""]
    for row in claims.itertuples(index=False):
        parts += [f"- **{row.claim}** {row.statement} **{row.verdict}**"
                  + (f" ({row.tests_holding} tests hold)" if row.tests_holding else ""),
                  f"  - {row.evidence}"]
    return "\n".join(parts) + "\n"


def write_report(root: str | Path, profile: str, stage_dirs: Mapping[str, str | Path] | None = None) -> Path:
    """Write `<root>/report.md` atomically and return its path."""
    return io.write_text(Path(root) / REPORT_FILE, build_report(root, profile, stage_dirs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m udg_lib.report", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True)
    parser.add_argument("--outputs-root", help="folder of stage outputs instead of outputs/<profile>")
    args = parser.parse_args(argv)
    root = paths.outputs_root(args.profile, args.outputs_root)
    if not root.is_dir():
        print(f"udg report: no outputs at {root}; run `make run PROFILE={args.profile}` first", file=sys.stderr)
        return 1
    print(write_report(root, args.profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
