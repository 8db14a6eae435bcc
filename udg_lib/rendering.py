"""The study report as text: `outputs/<profile>/report.md` from the stages' saved outputs (Tables 1-7, Figure 2,
the paper's numbers beside ours, wall time and memory, generation health, the judged claims and questions),
README's results block from a published folder, and README's benchmark block. Nothing here runs a model or
judges: the verdicts come from `judging`; publishing and comparing result folders is `publishing`'s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from udg_lib.catalog import EXP1, EXP2, FINETUNE, LLM, PRECISION_STAGES, PREPARE, PRETRAIN, PROFILES, STAGE_NAMES
from udg_lib import io, paths
from udg_lib.judging import (
    ClaimSettings,
    LOW_SIMILARITY,
    METRIC_NAMES,
    METRIC_SHORT,
    ProfileGate,
    REPLICA,
    SMALLER,
    UNTESTABLE_PROFILES,
    _fmt,
    collapsed_systems,
    judge_claims,
    judge_questions,
    profile_gate,
    small_data_datasets,
)
from udg_lib.conditions import PRETRAINED_LABELS
from udg_lib.summaries import llm_short_name, significance_notes, sweep_summary
from udg_lib.methods.names import LABELS as METHOD_LABELS
from udg_lib.methods.names import FULL, LORA, ONE_ID

REPORT_FILE = "report.md"
CLAIMS_FILE = "claims.csv"
CLAIM_TESTS_FILE = "claim_tests.csv"
QUESTIONS_FILE = "questions.csv"
QUESTION_TESTS_FILE = "question_tests.csv"
# The profiles at the paper's scale, and the sentence the report opens with for each.
FULL_PROFILES = {
    "full-ja": "The paper's setting: its checkpoint, sizes and Japanese corpora (the `full-ja` profile).",
    "full-en": "The paper's sizes on the open English corpora, from google-t5/t5-base (the `full-en` profile).",
}

# Otsuka et al. 2024, Table 4 (User Profile Chat): real users in text chat with ~170 training turns each, the
# paper's closest analog of BYU Chit-Chat (real users, text chat, ~100 training turns each).
# (similarity, Acc@sim0.9, ROUGE-L, PPL); PPL None = NA.
PAPER_TABLE4_UPC: dict[tuple[str, str], tuple[float, float, float, float | None]] = {
    ("plain_t5", ONE_ID): (0.497, 0.0467, 23.7, 23.7), ("plain_t5", LORA): (0.443, 0.0235, 21.4, 23.0),
    ("plain_t5", FULL): (0.448, 0.0282, 22.2, 23.3),
    ("plain_dialogue", ONE_ID): (0.530, 0.0711, 27.8, 15.9), ("plain_dialogue", LORA): (0.520, 0.0691, 27.8, 16.6),
    ("plain_dialogue", FULL): (0.524, 0.0727, 28.2, 14.8),
    ("psp", ONE_ID): (0.533, 0.0721, 27.9, 17.2), ("psp", LORA): (0.532, 0.0781, 28.0, 12.6),
    ("psp", FULL): (0.533, 0.079, 28.2, 10.1),
    ("ppp", ONE_ID): (0.533, 0.072, 27.4, 17.7), ("ppp", LORA): (0.530, 0.0758, 27.9, 14.5),
    ("ppp", FULL): (0.534, 0.0780, 28.0, 14.4),
    ("llm", "GPT3.5"): (0.342, 0.0447, 18.4, None), ("llm", "Jp-NeoX-3.6B"): (0.317, 0.0306, 15.8, None),
    ("llm", "Jp-Llama2-7B"): (0.313, 0.0373, 15.1, None),
}
# Table 7, UPC column: (Dist-1, Dist-2, Dist-S).
PAPER_TABLE7_UPC: dict[tuple[str, str], tuple[float, float, float]] = {
    ("plain_dialogue", ONE_ID): (0.174, 0.320, 0.305), ("plain_dialogue", LORA): (0.0330, 0.0669, 0.265),
    ("plain_dialogue", FULL): (0.0348, 0.0725, 0.312),
    ("psp", ONE_ID): (0.0324, 0.0624, 0.181), ("psp", LORA): (0.0457, 0.103, 0.472),
    ("psp", FULL): (0.0443, 0.100, 0.475),
    ("ppp", ONE_ID): (0.0206, 0.0354, 0.0877), ("ppp", LORA): (0.0496, 0.109, 0.452),
    ("ppp", FULL): (0.0517, 0.112, 0.456),
}
# Table 6 (t5-base, 222 M parameters, a GPU).
PAPER_TABLE6 = pd.DataFrame({"model": ["One-ID", "LoRA", "FULL"], "models": ["1", "No. of users", "No. of users"],
                             "size": ["850 MB", "7 MB", "850 MB"], "response time": ["0.24 s", "0.55 s", "2.7 s"]})


# ---------------------------------------------------------------------------------------------------------------
# Assembly


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def _table7(exp2: Path) -> pd.DataFrame | None:
    """Stage 05's Table 7 with its index column named `system` (the notebook writes it unnamed)."""
    table7 = _csv(exp2 / "table7.csv")
    return None if table7 is None else table7.rename(columns={table7.columns[0]: "system"})


def _parquet(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


def pooled_replicas(root: Path, folder: Path, stage: str, name: str) -> pd.DataFrame | None:
    """`folder / name` (a stage's per-sample file) with the same file of every training-seed replica of the run
    at `root` (`paths.replica_roots`), each with its `replica` number (0: the run itself); the file alone, with
    no replica column, when the run has no replicas. A replica without the file is an error naming it."""
    frame = _parquet(folder / name)
    replicas = paths.replica_roots(root)
    if frame is None or not replicas:
        return frame
    frames = [frame.assign(**{REPLICA: 0})]
    for replica, replica_dir in replicas:
        path = paths.stage_dir(replica_dir, stage) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: training-seed replica {replica} has no {name} (finish the run: the "
                                    "pipeline runs every replica after the main stages)")
        frames.append(pd.read_parquet(path).assign(**{REPLICA: replica}))
    return pd.concat(frames, ignore_index=True)


def seeds_line(root: Path) -> str:
    """How many training runs the verdicts rest on."""
    replicas = paths.replica_roots(root)
    if not replicas:
        return ("Each pre-trained model and One-ID is a single training run (one seed), so the verdicts are about "
                "these checkpoints, not about the training recipes (a profile's `pipeline.yaml` sets `seeds`).")
    return (f"Training seeds: {len(replicas) + 1} (the run and its replicas under `{paths.REPLICAS_DIR}/`): every "
            "pre-trained model, DA, One-ID, LoRA and FULL is trained once per seed; a user's value is the mean over "
            "seeds (a replication factor within the user), so the verdicts speak of the training recipe over these "
            f"{len(replicas) + 1} runs.")


def _metrics(stage: Path) -> dict[str, Any] | None:
    path = stage / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


RUNNING = "running: this report was written before the stage finished"


def run_summary(stage_dirs: Mapping[str, Path]) -> pd.DataFrame:
    """Per stage: wall time (the runner's record), peak resident memory of its kernel, device, the precision it
    computed in (stages 02-06: `precision.Precision.record()`), when it ended.

    A stage whose metrics.json has no runner record yet (stage 06 writing this report) says so in `finished`.
    """
    rows = []
    for name in STAGE_NAMES:
        record = _metrics(stage_dirs[name])
        if record is None:
            continue
        stage, provenance = record.get("stage", {}), record.get("provenance", {})
        precision = record.get("metrics", {}).get("precision") or {}
        rows.append({"stage": name, "wall_minutes": round(stage["wall_seconds"] / 60, 1) if "wall_seconds" in stage
                     else float("nan"), "peak_rss_GB": round(provenance.get("peak_rss_mb", float("nan")) / 1024, 2),
                     "device": provenance.get("device", {}).get("torch_device"),
                     "precision": precision.get("used", "fp32" if name in PRECISION_STAGES else None),
                     "finished": stage.get("finished_at") or RUNNING})
    return pd.DataFrame(rows, columns=["stage", "wall_minutes", "peak_rss_GB", "device", "precision", "finished"])


def precision_line(dirs: Mapping[str, Path]) -> str | None:
    """'- Precision: bf16 (asked "auto") on cpu, CPU ...': what stages 02-06 computed in and on which processor;
    a run from before the precision parameter computed in fp32 and recorded no CPU flags."""
    records = {name: (_metrics(dirs[name]) or {}).get("metrics", {}).get("precision") for name in PRECISION_STAGES
               if name in dirs and _metrics(dirs[name]) is not None}
    if not records:
        return None
    used = sorted({(r or {}).get("used", "fp32") for r in records.values()})
    asked = sorted({(r or {}).get("requested", "fp32") for r in records.values()})
    cpu = next((r["cpu"] for r in records.values() if r and r.get("cpu")), None)
    flags = (f"; CPU {cpu.get('model_name', '?')} (torch {cpu.get('torch_cpu_capability', '?')}): "
             + ", ".join(f"{label} {'yes' if cpu.get(key) else 'no'}" for label, key in
                         (("AVX2", "avx2"), ("AVX512-BF16", "avx512_bf16"), ("AMX", "amx_bf16")))) if cpu else ""
    return (f"- Precision of stages 02-06: {' / '.join(used)} (asked {' / '.join(map(repr, asked))})" + flags
            + ("" if cpu else " (recorded before the `precision` parameter existed: fp32)") + ".")


def _summary_markdown(summary: pd.DataFrame) -> str:
    shown = summary.astype(object).where(summary.notna(), "—")
    return shown.to_markdown(index=False)


def _stage_params(record: Mapping[str, Any] | None) -> dict[str, Any]:
    record = record or {}
    return {**record.get("params", {}), **record.get("stage", {}).get("params", {})}


EVALUATED = "evaluated"
PRETRAINING_ONLY = "pre-training pairs only"


def table2_with_roles(table2: pd.DataFrame, pretrain_pairs: Mapping[str, int] | None,
                      users_per_dataset: Mapping[str, int] | None) -> pd.DataFrame:
    """Table 2 analog with what each corpus does in this run: "evaluated" when stage 03 fine-tuned users of it
    (stages 04-06 then score them), else "pre-training pairs only", beside the pre-training pairs it gives
    (stage 00's pool, from dialogues without evaluation users). Stage 00 prepares evaluation users for every
    corpus, but a profile's stage 03 `datasets` may train on only some of them (`cpu`: Chit-Chat)."""
    out = table2.copy()
    names = out["dataset"].astype(str)
    if users_per_dataset is not None:
        out.insert(1, "in this run", [EVALUATED if users_per_dataset.get(n, 0) else PRETRAINING_ONLY
                                      for n in names])
        out.insert(2, "users fine-tuned", [int(users_per_dataset.get(n, 0)) for n in names])
    if pretrain_pairs is not None:
        out.insert(3 if users_per_dataset is not None else 1, "pre-training pairs",
                   [pretrain_pairs.get(n) for n in names])
    return out


def corpus_roles(dirs: Mapping[str, Path]) -> pd.DataFrame | None:
    """`table2_with_roles` from a run's stage 00 `table2.csv` and the metrics.json of stages 00 and 03."""
    table2 = _csv(dirs[PREPARE.name] / "table2.csv")
    if table2 is None or "dataset" not in table2.columns:
        return None
    prepared, tuned = _metrics(dirs[PREPARE.name]), _metrics(dirs[FINETUNE.name])
    pairs = None if prepared is None else prepared.get("metrics", {}).get("pretrain_pairs")
    users = None if tuned is None else tuned.get("metrics", {}).get("users_per_dataset")
    return table2_with_roles(table2, pairs, users)


def corpora_line(dirs: Mapping[str, Path]) -> str | None:
    """One line: which corpora this run evaluates and which only give pre-training pairs (Table 2 analog)."""
    roles = corpus_roles(dirs)
    if roles is None or "in this run" not in roles.columns:
        return None
    evaluated = roles.loc[roles["in this run"] == EVALUATED, "dataset"].astype(str).tolist()
    others = roles.loc[roles["in this run"] != EVALUATED, "dataset"].astype(str).tolist()
    return (f"- Corpora (Table 2 analog): evaluated {', '.join(evaluated) or 'none'}"
            + (f"; {', '.join(others)} {'give' if len(others) > 1 else 'gives'} pre-training pairs only (stage 03 "
               f"fine-tunes none of {'their' if len(others) > 1 else 'its'} users)"
               if others else "") + ".")


def _table2_markdown(dirs: Mapping[str, Path]) -> str:
    roles = corpus_roles(dirs)
    if roles is None:
        return _read(dirs[PREPARE.name] / "table2.md") or "(missing)"
    return ("\"in this run\": evaluated when stage 03 fine-tuned users of the corpus (stages 04-06 score them), "
            "else the corpus only gives pre-training pairs (stage 00's pool, from dialogues without evaluation "
            "users).\n\n" + roles.to_markdown(index=False))


def settings_lines(dirs: Mapping[str, Path]) -> list[str]:
    """The run's corpora, model sizes and settings, read from stages 00, 02, 03 and 06's metrics.json."""
    lines = [line for line in [precision_line(dirs), corpora_line(dirs)] if line]
    pre = _metrics(dirs[PRETRAIN.name])
    if pre is not None:
        params, models = _stage_params(pre), pre.get("metrics", {}).get("models", {})
        origin = (f"the checkpoint `{params['checkpoint']}`" if params.get("checkpoint")
                  else f"trained from scratch (preset `{params.get('model_preset', '?')}`)")
        sizes = sorted({int(m["n_parameters"]) for m in models.values() if m.get("n_parameters")})
        size = " / ".join(f"{n:,} ({n / 1e6:.2g} M)" for n in sizes) or "?"
        steps = ", ".join(f"{name} {m.get('steps', 'as shipped' if m.get('checkpoint') else '?')}"
                          for name, m in models.items())
        family = pre.get("metrics", {}).get("model_family", params.get("model_family", "seq2seq"))
        kind = "causal LM" if family == "causal" else "T5"
        lines.append(f"- Pre-trained {kind} models: {origin}, {size} parameters; training steps: {steps or '?'}.")
    tuned = _metrics(dirs[FINETUNE.name])
    if tuned is not None:
        params, metrics = _stage_params(tuned), tuned.get("metrics", {})
        lora = metrics.get("lora_trainable_parameters")
        lora_lr, swept = metrics.get("lora_learning_rate"), metrics.get("lora_learning_rate_sweep")
        lr = f"Adam lr {params.get('learning_rate', '?')}" + (
            f" (LoRA {lora_lr:g}, chosen on dev loss from {swept.get('candidates')})"
            if swept and lora_lr is not None and lora_lr != params.get("learning_rate") else "")
        lines.append(
            f"- Fine-tuning (§4.1.3): {lr}, at most {params.get('max_epochs', '?')} "
            f"epochs per user with early stopping (patience {params.get('patience', '?')}); LoRA r = "
            f"{params.get('lora_r', '?')} on `{params.get('lora_targets', '?')}`: "
            f"{f'{lora:,}' if isinstance(lora, int) else '?'} trainable parameters per user. Users per dataset: "
            f"{metrics.get('users_per_dataset', {})}; split sets: {metrics.get('split_sets', [])}.")
    llm = _metrics(dirs[LLM.name])
    if llm is not None:
        metrics = llm.get("metrics", {})
        baselines = ", ".join(metrics.get("baselines", {}).values()) or "none"
        lines.append(f"- Prompt LLM baselines (§4.2.2): {baselines}; test contexts answered per dataset: "
                     f"{metrics.get('n_contexts', {})}.")
    return lines


def _paper_side_by_side(ours: pd.DataFrame | None) -> str:
    """Our chitchat Table (similarity, ROUGE-L) beside the paper's UPC numbers for the same systems."""
    rows = []
    for (pretrain, method), values in PAPER_TABLE4_UPC.items():
        label_model = PRETRAINED_LABELS.get(pretrain, "Prompt LLM")
        label_method = METHOD_LABELS.get(method, method)
        row = {"model": label_model, "fine-tuning": label_method, "paper similarity": values[0],
               "paper ROUGE-L": values[2], "paper PPL": values[3]}
        if ours is not None and pretrain != "llm":
            match = ours[(ours["model"] == label_model) & (ours["fine-tuning"] == label_method)]
            if len(match):
                row.update({"our similarity": match["similarity"].iloc[0], "our ROUGE-L": match["rouge_l"].iloc[0]})
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g", missingval="NA")


def generation_health(dirs: Mapping[str, Path]) -> pd.DataFrame | None:
    """Stages 04 and 06's `generation_health.csv` together (None when neither stage wrote one)."""
    frames = [f for f in (_csv(dirs[s] / "generation_health.csv") for s in (EXP1.name,
                                                                           LLM.name)) if f is not None]
    return pd.concat(frames, ignore_index=True) if frames else None


def _health_lines(health: pd.DataFrame | None) -> list[str]:
    if health is None:
        return ["(not recorded by this run: no `generation_health.csv` in stages 04 / 06)"]
    flagged = health[health["degenerate"].astype(str).str.lower() == "true"] if "degenerate" in health else health[:0]
    lines = ["Per system: share of empty replies, replies that are one repeated token or character, replies equal "
             "to the system's most common reply, and their union (`degenerate_share`). A system over 20% "
             "degenerate is flagged.", "",
             health.to_markdown(index=False, floatfmt=".3f"), ""]
    if len(flagged):
        lines.append("**Flagged (degenerate):** " + "; ".join(
            f"{r.dataset}: {r.system} ({r.degenerate_share:.0%})" for r in flagged.itertuples(index=False))
                     + ". Read these systems' rows in Tables 3-5 and the claims with that in mind.")
    else:
        lines.append("No system is flagged.")
    return lines


def _bits_per_char_lines(tables: Sequence[Path]) -> list[str]:
    frames = []
    for path in tables:
        table = _csv(path.with_suffix(".csv"))
        if table is not None and "bits_per_char" in table.columns:
            dataset = path.stem.split("_", 1)[1]
            frames.append(table.assign(dataset=dataset, system=table["model"] + " / " + table["fine-tuning"]))
    if not frames:
        return ["(not recorded by this run: the Exp1 tables have no `bits_per_char` column)"]
    wide = pd.concat(frames).pivot_table(index="system", columns="dataset", values="bits_per_char", sort=False)
    return ["Bits per character of the reference reply, comparable across tokenizers (T5 and LLMs alike); token "
            "perplexity is comparable only within one tokenizer. Lower is better.", "",
            wide.to_markdown(floatfmt=".3f", missingval="NA")]


def _exp2_tests_lines(significance: pd.DataFrame | None) -> list[str]:
    """Stage 05's paired tests across questions, labelled by dataset (uncorrected; C3 below is the judged one)."""
    if significance is None:
        return []
    lines = ["", "Paired tests across questions (Wilcoxon, uncorrected; the judged C3 is below), by dataset:"]
    for dataset, frame in significance.groupby("dataset", sort=False):
        lines += [f"- **{dataset}**", *[f"  {line}" for line in significance_notes(frame)]]
    return lines


def _judge_text(settings: ClaimSettings) -> str:
    """How a comparison is judged, in the report's words (the module docstring's rules)."""
    return (
        "Per comparison: the mean difference (oriented so that positive favours the claim: for bits/char, where "
        "lower is better, b minus a) with a 95% percentile bootstrap CI over units (descriptive); a one-sided "
        "sign-flip permutation test of the mean in the claimed direction (\"p for\") and one in the other "
        "(\"p against\": below the smallest effect of interest; C4: TOST within the margin for, the mean "
        "outside it against; Q2: two-sided for, TOST against), each Holm-adjusted within the claim's family "
        "(one family per claim, metric and reading); n of non-zero differences (|d| < 1e-12 is a zero); the "
        "smallest p the exact test can reach with them (1 / 2^n one-sided) beside alpha / family size (Holm's "
        "strictest step); the smallest effect detectable at 80% power at that alpha (one-sided paired t, whose "
        f"power the sign-flip test shares). alpha = {settings.alpha}. Similarity: smallest effect of interest "
        f"{settings.min_similarity_effect}, equivalence margin {settings.equivalence_margin} similarity; bits/char "
        f"of the real reply (lower is better): smallest effect of interest {settings.min_bits_per_char_effect}, "
        f"equivalence margin {settings.bits_per_char_equivalence_margin} bits/char; Dist-S "
        f"{settings.min_dist_s_effect}; share under {LOW_SIMILARITY} {settings.min_share_effect}.")


VERDICT_RULES = (
    "**Supported**: the Holm-adjusted p for the claim < alpha and not significantly below the smallest effect of "
    "interest. **Real, smaller than claimed**: both (an effect in the claimed direction, significantly smaller "
    "than the smallest effect of interest); never counted as support. **Contradicted**: the Holm-adjusted p "
    "against it < alpha only. **Inconclusive**: neither, and always when the design cannot decide (the smallest "
    "attainable p above alpha / family size), or when a system of the comparison is flagged degenerate (over 20% "
    "of its replies: \"collapsed system\"). Non-significance is never support. A claim is contradicted when any "
    "comparison is, supported when all are, \"real, smaller than claimed\" when all are that or supported.")


def claims_lines(claims: pd.DataFrame, tests: pd.DataFrame, settings: ClaimSettings,
                 small_datasets: Collection[str] | None, gate: ProfileGate | None = None) -> list[str]:
    """The claims section of the report: verdicts (similarity and bits/char side by side), then each claim's
    comparisons with n, effect, CI, p, Holm p, per metric."""
    scope = "every dataset" if small_datasets is None else (", ".join(sorted(small_datasets)) or "none")
    table = pd.DataFrame({
        "claim": claims["claim"].map(lambda c: f"**{c}**"),
        "verdict (metric)": [f"{v} ({METRIC_SHORT[m]})" for v, m in zip(claims["verdict"], claims["metric"])],
        "s/r/c/i": [f"{s}/{r}/{c}/{i}" for s, r, c, i in zip(claims["n_supported"], claims["n_smaller"],
                                                             claims["n_contradicted"], claims["n_inconclusive"])],
        "verdict on bits/char (lower is better)": [
            f"{v} ({t})" if t else (v or "—") for v, t in zip(claims["verdict_bits_per_char"],
                                                             claims["tests_bits_per_char"])],
        "our reading": claims["our_reading"].replace("", "—"), "n": claims["n_units"]})
    lines = [
        "Each claim is a family of paired comparisons across units: users (Exp1; each user's mean over scored "
        "test pairs, averaged over split sets) or questions (Exp2, Dist-S averaged over datasets and split sets). "
        "C1 and C5 compare LLMs and fine-tuned systems on the same test contexts, matched on "
        "(dataset, split set, pair). Every Exp1 claim and question is judged twice, on similarity (the paper's "
        "headline) and on bits per character of the user's real reply, each with its own verdict. "
        + _judge_text(settings)
        + f" \"With little user data\" (C2, C6): datasets whose users average fewer than "
        f"{settings.small_data_max_train:g} training pairs (Table 2): {scope}.",
        "", VERDICT_RULES, "",
        "Profile check (C2, Q2): " + (gate.line + (" C2 and Q2 are judged." if gate.passed else
                                                   f" C2 and Q2: {UNTESTABLE_PROFILES}.")
                                      if gate is not None else "not applied."),
        "",
        table.to_markdown(index=False),
        "",
        "(s/r/c/i: comparisons supported / real, smaller than claimed / contradicted / inconclusive on the "
        "headline metric; bits/char's counts in brackets.)",
    ]
    for row in claims.itertuples(index=False):
        bits = f"; bits/char: {row.verdict_bits_per_char}" if row.verdict_bits_per_char else ""
        lines += ["", f"### {row.claim}: {row.verdict} ({METRIC_SHORT[row.metric]}){bits}", row.statement]
        if row.note:
            lines.append(f"Note: {row.note.rstrip('.')}.")
        rows = tests[tests["claim"] == row.claim]  # C1s has none of its own: its comparisons are C1's, shown there
        if rows.empty:
            continue
        for metric, frame in rows.groupby("metric", sort=False):
            lines += ["", f"{METRIC_NAMES[metric]}:", "", _tests_markdown(frame)]
    return lines


def _tests_markdown(rows: pd.DataFrame, outcome: str = "verdict") -> str:
    """Comparisons as a markdown table: n (non-zero n), effect with its 95% CI, one-sided p for and against
    with Holm, the smallest attainable p beside alpha / family, detectable effect and the outcome (a claim's
    verdict or a question's answer) with the reason when inconclusive."""
    return pd.DataFrame({
        "dataset": rows["dataset"], "comparison": rows["comparison"],
        "n (non-zero)": [f"{n} ({k})" for n, k in zip(rows["n"], rows["n_nonzero"])],
        "effect [95% CI]": [f"{_fmt(e, '+.3f')} [{_fmt(lo, '+.3f')}, {_fmt(hi, '+.3f')}]"
                            for e, lo, hi in zip(rows["effect"], rows["ci_low"], rows["ci_high"])],
        "p for": rows["p_for"].map(_fmt), "Holm": rows["p_for_holm"].map(_fmt),
        "p against": rows["p_against"].map(_fmt), "Holm ": rows["p_against_holm"].map(_fmt),
        "min p / alpha÷m": [f"{_fmt(p)} / {_fmt(a)}" for p, a in zip(rows["min_attainable_p"], rows["alpha_family"])],
        "detectable (80%)": rows["detectable_80"].map(lambda v: _fmt(v, ".3f")),
        outcome: [v + (f" ({r})" if r and v in ("inconclusive", "yes, smaller than the smallest effect of interest",
                                                   SMALLER) else "")
                  for v, r in zip(rows[outcome], rows["reason"])]}).to_markdown(index=False)


def questions_lines(answers: pd.DataFrame, tests: pd.DataFrame, settings: ClaimSettings) -> list[str]:
    """The report's section on the run's questions (`RUN_QUESTIONS`): answers on both metrics, then each
    question's comparisons per metric."""
    lines = [
        "Questions every run answers, judged by the claims' rules (paired across users, per dataset; Holm "
        f"within each question and metric; alpha = {settings.alpha}), on similarity and on bits/char (lower is "
        f"better). Q1's and Q3's smallest effects of interest are {settings.min_similarity_effect} similarity and "
        f"{settings.min_bits_per_char_effect} bits/char; Q2 asks for any difference (two-sided sign-flip test) "
        f"and answers \"no\" only on equivalence within {settings.equivalence_margin} similarity / "
        f"{settings.bits_per_char_equivalence_margin} bits/char (TOST). Q3 compares retrieval with per-user "
        "fine-tuning: the prompt LLM's RAG row on the contexts it answered (Q3a, Q3b against RAG-LLM) and RAG + LoRA "
        "against LoRA on every test pair (Q3b); it is not tested where a run has no RAG condition.",
        "",
        answers[["question", "answer", "answer_bits_per_char", "n_tests", "n_yes", "n_no", "n_inconclusive"]]
        .rename(columns={"answer": "answer (similarity)", "answer_bits_per_char": "answer (bits/char)"})
        .to_markdown(index=False),
    ]
    for row in answers.itertuples(index=False):
        lines += ["", f"### {row.question}: {row.answer} (similarity); {row.answer_bits_per_char or 'NA'} "
                  "(bits/char)", row.statement]
        if row.note:
            lines.append(f"Note: {row.note.rstrip('.')}.")
        rows = tests[tests["question"] == row.question]
        for metric, frame in rows.groupby("metric", sort=False):
            lines += ["", f"{METRIC_NAMES[metric]}:", "", _tests_markdown(frame, "answer")]
    return lines


def training_lines(finetune_dir: Path) -> list[str]:
    """How each method's training ended (stage 03): the share of units stopped by early stopping rather than
    the epoch cap, epochs, dev-loss gain; and the LoRA learning-rate sweep when the run made one."""
    by_method = _csv(finetune_dir / "training_by_method.csv")
    if by_method is None:
        return ["(stage 03's training_by_method.csv missing)"]
    metrics = _metrics(finetune_dir)
    params = _stage_params(metrics)
    lines = ["Per method: units (users, or one pooled model), mean epochs run, share stopped by early stopping "
             f"on the dev loss rather than the cap (max_epochs {params.get('max_epochs', 'NA')}, One-ID too; DA "
             f"{params.get('da_max_epochs', 'NA')}), and the mean dev loss before and at the best epoch.", "",
             by_method.to_markdown(index=False, floatfmt=".3f")]
    sweep = _csv(finetune_dir / "lora_lr_sweep.csv")
    if sweep is not None:
        chosen = (metrics or {}).get("metrics", {}).get("lora_learning_rate")
        lines += ["", f"LoRA learning rate chosen on dev loss only, over {sweep['user_id'].nunique()} users: "
                  f"**{_fmt(chosen, 'g')}** (lowest mean best dev loss):", "",
                  sweep_summary(sweep).to_markdown(index=False, floatfmt=".4g")]
    return lines


def scored_generated_counts(per_user: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and user, summed over split sets (stage 04's `per_user_scores.csv`): `n scored`, the test
    pairs whose reference likelihood was scored (systems without one, the retrieval floor, left out), and
    `n generated`, those with a generated reply; "9-10" where the systems differ."""
    keys = ["dataset", "user_id"]
    per_system = per_user.groupby([*keys, "pretrain", "method"], sort=False)[["n_scored", "n_generated"]].sum()

    def span(values: pd.Series) -> str:
        low, high = (int(values.min()), int(values.max())) if len(values) else (0, 0)
        return f"{low}" if low == high else f"{low}-{high}"

    rows = [{"dataset": dataset, "user": user, "n scored": span(group.loc[group["n_scored"] > 0, "n_scored"]),
             "n generated": span(group["n_generated"])}
            for (dataset, user), group in per_system.groupby(level=keys, sort=False)]
    return pd.DataFrame(rows, columns=["dataset", "user", "n scored", "n generated"])


def scored_generated_lines(exp1_dir: Path) -> list[str]:
    """The report's per-user counts of scored and generated test pairs (`scored_generated_counts`)."""
    per_user = _csv(exp1_dir / "per_user_scores.csv")
    if per_user is None or not {"n_scored", "n_generated"} <= set(per_user.columns):
        return ["(not recorded by this run: stage 04's per_user_scores.csv has no n_scored / n_generated)"]
    params = _stage_params(_metrics(exp1_dir))
    cap = params.get("max_generated_per_user")
    return ["Per user: test pairs whose reference was scored (bits per character and perplexity average them) "
            "and whose reply was generated (similarity, Acc@sim and ROUGE-L average those: a seeded subset of at "
            f"most {_fmt(cap, 'd') if cap else 'all'} per user and split set).", "",
            scored_generated_counts(per_user).to_markdown(index=False)]


def same_base_llms(pretrain_dir: Path, llm_dir: Path) -> tuple[str, ...]:
    """Stage 06's LLM methods that prompt the checkpoint stage 02 started from (C1s), from both stages'
    recorded parameters: e.g. ("smollm2-chat",) when the causal track starts from `smollm2`."""
    checkpoint = str(_stage_params(_metrics(pretrain_dir)).get("checkpoint") or "")
    if not checkpoint:
        return ()
    params = _stage_params(_metrics(llm_dir))
    return tuple(f"{llm_short_name(params[key])}-{kind}" for key, kind in (("chat_model", "chat"),
                                                                          ("completion_model", "completion"))
                 if params.get(key) == checkpoint)


@dataclass(frozen=True)
class Report:
    """A built report: its markdown and the tables written beside it."""

    text: str
    claims: pd.DataFrame  # one verdict per claim of the paper
    claim_tests: pd.DataFrame  # the paired comparisons behind them
    questions: pd.DataFrame  # one answer per question of this study (Q1, Q2)
    question_tests: pd.DataFrame


def build_report(root: str | Path, profile: str, stage_dirs: Mapping[str, str | Path] | None = None,
                 settings: ClaimSettings | None = None) -> Report:
    """The report's markdown, the judged claims and the answered questions, each with its tests. `stage_dirs`
    overrides where a stage's outputs are read (a stage still running in its work folder); links always point
    at the final stage folders under `root`. `settings` None reads the equivalence margin stage 06 recorded,
    else the defaults."""
    root = Path(root)
    dirs = {name: Path((stage_dirs or {}).get(name, paths.stage_dir(root, name))) for name in STAGE_NAMES}
    exp1, exp2, llm = dirs[EXP1.name], dirs[EXP2.name], dirs[LLM.name]
    if settings is None:
        margin = _stage_params(_metrics(llm)).get("equivalence_margin")
        settings = ClaimSettings(equivalence_margin=float(margin)) if margin is not None else ClaimSettings()
    if not settings.same_base_llms:
        settings = replace(settings, same_base_llms=same_base_llms(dirs[PRETRAIN.name], llm))
    summary = run_summary(dirs)
    finished = summary[summary["finished"] != RUNNING]
    total = finished["wall_minutes"].sum() if len(finished) else float("nan")
    peak = summary["peak_rss_GB"].max() if len(summary) else float("nan")
    running = summary.loc[summary["finished"] == RUNNING, "stage"].tolist()
    parts = [
        f"# Study report: user-specific dialogue generation ({profile} profile)",
        "",
        "A reproduction of Otsuka et al., LREC-COLING 2024, *User-specific dialogue generation*. "
        + (FULL_PROFILES[profile] if profile in FULL_PROFILES else
           "A small setting: compare systems with each other, not our magnitudes with the paper's."),
        "",
        "## The run",
        f"Stages took **{total:.1f} min** of wall time in all"
        + (f" (not counting {', '.join(running)}: {RUNNING}; `python -m udg_lib.report --profile {profile}` "
           "after the run records it)" if running else "")
        + f"; peak resident memory **{peak:.2f} GB** (the largest of the stage kernels; each stage runs in its "
          "own kernel).",
        "",
        *settings_lines(dirs),
        "",
        _summary_markdown(summary) if len(summary) else "(no stage outputs)",
        "",
        "## Table 1 analog: inferred profiles (§3.3)",
        _read(dirs[PROFILES.name] / "table1.md") or "(missing)",
        "",
        "## Table 2 analog: datasets (§4.2.1)",
        _table2_markdown(dirs),
        "",
        "## Tables 3-5 analogs: Exp1 next-utterance prediction (§4.2)",
        "One table per dataset; mean over users and split sets; best value per metric in bold. Prompt LLM rows",
        "answer the contexts noted below each table.",
    ]
    tables = sorted(llm.glob("table[3-9]_*.md")) or sorted(exp1.glob("table[3-9]_*.md"))
    for path in tables:
        parts += ["", _read(path) or ""]
    parts += ["", "### Bits per character", *_bits_per_char_lines(tables)]
    parts += ["", "### Test pairs scored and generated", *scored_generated_lines(exp1)]
    chitchat = next((p for p in tables if p.stem.endswith("_chitchat")), None)
    if chitchat is not None:
        parts += ["", "### Beside the paper (its Table 4, User Profile Chat, the closest analog of Chit-Chat)",
                  _paper_side_by_side(_csv(chitchat.with_suffix(".csv")))]
    parts += ["", "## Generation health", *_health_lines(generation_health(dirs))]
    parts += ["", "## Table 6 analog: model count, size, response time", _read(exp1 / "table6.md") or "(missing)",
              "", "Paper (t5-base, a GPU):", PAPER_TABLE6.to_markdown(index=False)]
    table7 = _table7(exp2)
    parts += ["", "## Table 7 analog: Exp2 diversity across users (§4.3)",
              table7.to_markdown(index=False, floatfmt=".3g") if table7 is not None else "(missing)",
              *_exp2_tests_lines(_csv(exp2 / "significance.csv")),
              "", "Paper, UPC column:",
              pd.DataFrame([{"system": f"{p} / {m}", "Dist-1": v[0], "Dist-2": v[1], "Dist-S": v[2]}
                            for (p, m), v in PAPER_TABLE7_UPC.items()]).to_markdown(index=False, floatfmt=".3g")]
    figure = paths.stage_dir(".", LLM.name) / "figures" / "figure2.png"
    parts += ["", "## Figure 2 analog: similarity between generated and reference replies",
              f"![Figure 2]({figure.as_posix()})" if (llm / "figures" / "figure2.png").is_file() else "(missing)"]
    leakage = _csv(exp1 / "leakage_by_method.csv")
    if leakage is not None:
        parts += ["", "## Cross-user leakage (beyond the paper)",
                  "Share of generated replies closer to another user's training responses than to the user's own "
                  "(`closer_to_other`) and near copies (similarity >= 0.9) of another user's (`verbatim_other`). "
                  "The domain-adapted model without user conditioning sees no user: its rates are the chance "
                  "level.", "", leakage.to_markdown(index=False, floatfmt=".3f")]
        tests = _csv(exp1 / "leakage_significance.csv")
        if tests is not None:
            parts += ["", tests[["dataset", "label_a", "label_b", "metric", "mean_diff", "p_value", "n"]]
                      .to_markdown(index=False, floatfmt=".3g")]
    small = small_data_datasets(_csv(dirs[PREPARE.name] / "table2.csv"), settings.small_data_max_train)
    collapsed = collapsed_systems(generation_health(dirs))
    pretrain = _metrics(dirs[PRETRAIN.name])
    gate = None if pretrain is None else profile_gate(pretrain.get("metrics", {}), settings.alpha,
                                                      settings.min_profile_share)
    exp1_scores = pooled_replicas(root, exp1, EXP1.name, "scores.parquet")
    llm_scores = pooled_replicas(root, llm, LLM.name, "scores.parquet")
    claims, claim_tests = judge_claims(exp1_scores, llm_scores,
                                       pooled_replicas(root, exp2, EXP2.name, "replies.parquet"), small,
                                       settings, collapsed, gate)
    parts += ["", "## The paper's claims, checked on this run", seeds_line(root), "",
              *claims_lines(claims, claim_tests, settings, small, gate)]
    answers, question_tests = judge_questions(exp1_scores, settings, collapsed, gate, llm_scores)
    parts += ["", "## What per-user training, profiles and retrieval change (beyond the paper)",
              *questions_lines(answers, question_tests, settings),
              "", "## How training ended (stage 03)", *training_lines(dirs[FINETUNE.name])]
    return Report("\n".join(parts) + "\n", claims, claim_tests, answers, question_tests)


def write_report(root: str | Path, profile: str, stage_dirs: Mapping[str, str | Path] | None = None,
                 settings: ClaimSettings | None = None) -> Path:
    """Write `<root>/report.md`, `claims.csv`, `claim_tests.csv`, `questions.csv` and `question_tests.csv`
    atomically; return the report's path."""
    root = Path(root)
    built = build_report(root, profile, stage_dirs, settings)
    for name, table in ((CLAIMS_FILE, built.claims), (CLAIM_TESTS_FILE, built.claim_tests),
                        (QUESTIONS_FILE, built.questions), (QUESTION_TESTS_FILE, built.question_tests)):
        io.write_text(root / name, table.to_csv(index=False))
    return io.write_text(root / REPORT_FILE, built.text)


def readme_markers(profile: str) -> tuple[str, str]:
    return f"<!-- results:{profile}:start -->", f"<!-- results:{profile}:end -->"


def _exp1_tables(folder: Path) -> dict[str, pd.DataFrame]:
    stage = folder / LLM.name
    found = sorted(stage.glob("table[3-9]_*.csv")) or sorted((folder / EXP1.name).glob("table[3-9]_*.csv"))
    return {p.stem.split("_", 1)[1]: pd.read_csv(p) for p in found}


def render_results_block(folder: str | Path, profile: str) -> str:
    """README's results block (between the markers) rendered from a published results folder."""
    folder = Path(folder)
    dirs = {name: folder / name for name in STAGE_NAMES}
    summary = run_summary(dirs)
    rel = f"results/{profile}"
    lines = [f"_Written by `python -m udg_lib.report --profile {profile} --publish` from `{rel}/` (do not edit by "
             f"hand); every table, test and figure: [`{rel}/report.md`]({rel}/report.md)._", ""]
    if len(summary):
        lines += [f"Wall time **{summary['wall_minutes'].sum():.1f} min** over {len(summary)} stages, peak resident "
                  f"memory **{summary['peak_rss_GB'].max():.2f} GB**.", "", *settings_lines(dirs), "",
                  _summary_markdown(summary[["stage", "wall_minutes", "peak_rss_GB", "precision"]])]
    for dataset, table in _exp1_tables(folder).items():
        metrics = [m for m in ("similarity", "rouge_l", "bits_per_char") if m in table.columns]
        shown = table[["model", "fine-tuning", *metrics, "n_users"]] if "n_users" in table else table[
            ["model", "fine-tuning", *metrics]]
        lines += ["", f"**Exp1, {dataset}** (mean over users and split sets):", "",
                  shown.to_markdown(index=False, floatfmt=".3f", missingval="NA")]
    health = generation_health(dirs)
    if health is not None:
        lines += ["", *_health_lines(health)[-1:]]
    table7 = _table7(folder / EXP2.name)
    if table7 is not None:
        columns = ["system", *[c for c in table7.columns if c.endswith("Dist-S")]]
        lines += ["", "**Exp2, Distinct-S** (Table 7 analog):", "",
                  table7[columns].to_markdown(index=False, floatfmt=".3f")]
    claims = _csv(folder / CLAIMS_FILE)
    if claims is not None:
        claims = claims.astype(object).where(claims.notna(), "")
        if "verdict_bits_per_char" in claims.columns:  # the judge of issue #20: both metrics, named
            lines += ["", "**The paper's claims on this run** (verdict per metric, each naming it; comparisons "
                      "supported / real, smaller than claimed / contradicted / inconclusive; Holm within each claim "
                      "and metric; n = units per comparison; bits/char: lower is better):", "",
                      pd.DataFrame({"claim": claims["claim"],
                                    "verdict": [f"**{v}** ({METRIC_SHORT.get(m, m)})"
                                                for v, m in zip(claims["verdict"], claims["metric"])],
                                    "s/r/c/i": [f"{s}/{r}/{c}/{i}" for s, r, c, i in zip(
                                        claims["n_supported"], claims["n_smaller"], claims["n_contradicted"],
                                        claims["n_inconclusive"])],
                                    "bits/char": [f"**{v}** ({t})" if t else (f"**{v}**" if v else "—") for v, t in
                                                  zip(claims["verdict_bits_per_char"], claims["tests_bits_per_char"])],
                                    "our reading": [v or "—" for v in claims["our_reading"]],
                                    "n": [str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
                                          for v in claims["n_units"]],  # a column with blanks reads as float
                                    "statement": claims["statement"]})
                      .to_markdown(index=False)]
            notes = [f"- {r.claim}: {r.note}" for r in claims.itertuples(index=False) if r.note]
            lines += ["", *notes] if notes else []
        else:
            lines += ["", "**The paper's claims on this run** (comparisons supported / contradicted / inconclusive; "
                      "Holm within each claim; n = units per comparison):", "",
                      pd.DataFrame({"claim": claims["claim"], "verdict": claims["verdict"].map(lambda v: f"**{v}**"),
                                    "comparisons s/c/i": [f"{s}/{c}/{i}" for s, c, i in zip(
                                        claims["n_supported"], claims["n_contradicted"], claims["n_inconclusive"])],
                                    "n": claims["n_units"].astype(str), "statement": claims["statement"]})
                      .to_markdown(index=False)]
    answers, question_tests = _csv(folder / QUESTIONS_FILE), _csv(folder / QUESTION_TESTS_FILE)
    if answers is not None and question_tests is not None:
        both = "answer_bits_per_char" in answers.columns
        retrieval = ", profiles and retrieval" if answers["question"].str.startswith("Q3").any() else " and profiles"
        lines += ["", f"**What per-user training{retrieval} change** (beyond the paper; "
                  + ("similarity and bits/char (lower is better)" if both else "similarity")
                  + ", paired across users; effect = mean difference with its 95% bootstrap CI; Holm within each "
                  "question" + (" and metric" if both else "") + "):", ""]
        for row in answers.astype(object).where(answers.notna(), "").itertuples(index=False):
            lines.append(f"- **{row.question}: {row.answer}**" + (
                f" (similarity); **{row.answer_bits_per_char or 'NA'}** (bits/char)" if both else "")
                + f". {row.statement}")
        if len(question_tests):
            lines += ["", pd.DataFrame({
                "question": question_tests["question"], "dataset": question_tests["dataset"],
                **({"metric": question_tests["metric"]} if both else {}),
                "comparison": question_tests["comparison"], "n": question_tests["n"],
                "effect [95% CI]": [f"{_fmt(e, '+.3f')} [{_fmt(lo, '+.3f')}, {_fmt(hi, '+.3f')}]" for e, lo, hi in
                                    zip(question_tests["effect"], question_tests["ci_low"], question_tests["ci_high"])],
                "Holm p for": question_tests["p_for_holm"].map(_fmt),
                "Holm p against": question_tests["p_against_holm"].map(_fmt), "answer": question_tests["answer"]})
                .to_markdown(index=False)]
    return "\n".join(lines).strip() + "\n"


def readme_block(text: str, profile: str) -> str | None:
    """The text between README's results markers for `profile` (None when the markers are absent)."""
    start, end = readme_markers(profile)
    match = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), text, flags=re.S)
    return match.group(1) if match else None


def update_readme(readme: str | Path, block: str, profile: str) -> Path:
    """Replace the text between README's results markers with `block`."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    if readme_block(text, profile) is None:
        start, end = readme_markers(profile)
        raise ValueError(f"{readme}: no '{start}' ... '{end}' markers to write the results block between")
    start, end = readme_markers(profile)
    new = re.sub(re.escape(start) + r"\n.*?" + re.escape(end), lambda _: f"{start}\n{block}{end}", text, flags=re.S)
    return io.write_text(readme, new)


BENCHMARKS_BLOCK = "benchmarks"  # README's benchmark block: <!-- results:benchmarks:start --> ... end -->


def _plan_epochs_source(plan: Mapping[str, Any]) -> str:
    """Where a cost plan took its epochs per training: "epochs as <run> measured", from its assumptions."""
    line = next((a for a in plan.get("assumptions", []) if a.startswith("epochs:")), "")
    if "as an earlier run measured" not in line:
        return "epochs: " + (line.split(";")[0].removeprefix("epochs: ") or "unknown")
    source = line[line.rfind("; ", 0, line.find(")")) + 2: line.find(")")]
    return ("epochs as the previously published run measured" if "/results/" in source
            else "epochs as the run at --outputs-root measured")


def _bench_json(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _bench_when(record: Mapping[str, Any]) -> str:
    stamp = str(record.get("provenance", {}).get("timestamp", ""))[:10]
    return f", measured {stamp}" if stamp else ""


def render_benchmarks_block(folder: str | Path) -> str:
    """README's benchmark block, rendered from the JSON files the scripts in `benchmarks/` write with `--out`
    (a missing file is named, not skipped silently)."""
    folder = Path(folder)
    lines = ["_Written by `python -m udg_lib.report --benchmarks` from `benchmarks/results/*.json` (do not edit "
             "by hand); each script's docstring says what it times._"]
    throughput = _bench_json(folder, "bench_throughput")
    if throughput is None:
        lines += ["", "**Training throughput**: no `bench_throughput.json`."]
    else:
        cpu, args = throughput["cpu"], throughput["args"]
        lines += ["", f"**Training throughput** (`bench_throughput.py`, {cpu.get('model_name', 'CPU')} "
                  f"{cpu.get('torch_cpu_capability', '')}{_bench_when(throughput)}): one optimizer step (forward, "
                  f"backward, Adam) at batch {args['batch']} × ({args['source_tokens']} + {args['reply_tokens']}) "
                  "tokens, beside this CPU's best 1024² matrix products (the roofline).", ""]
        lines += [f"- {r['threads']} thread(s): roofline fp32 {r['fp32_gflops']:.1f} GFLOP/s, bf16 "
                  f"{r['bf16_gflops']:.1f} GFLOP/s" for r in throughput["roofline"]]
        rows = pd.DataFrame(throughput["rows"])
        rows["model"] = rows["family"].map(throughput.get("models", {})).fillna(rows["family"])
        if "variant" not in rows:  # figures from before the precision parameter: fp32 or bf16 autocast
            rows["variant"], rows["pipeline_auto"] = rows["dtype"], False
        rows["variant"] = [f"**{v}** (auto)" if auto else v for v, auto in zip(rows["variant"], rows["pipeline_auto"])]
        if "precision_auto" in throughput:
            lines += [f"- precision `auto` here: **{throughput['precision_auto']}** (bold rows: stage 03's step with it)"]
        if "shape_roofline_share" not in rows:
            rows["shape_roofline_share"] = float("nan")
        table = rows.rename(columns={"seconds": "s/step", "gflops_counted": "GFLOP/s", "roofline_share":
                                     "share of roofline", "shape_roofline_share": "share of its shapes' rate"})[
            ["threads", "model", "mode", "variant", "s/step", "tokens_per_s", "GFLOP/s", "share of roofline",
             "share of its shapes' rate"]]
        table = table.assign(**{"s/step": table["s/step"].map(lambda v: f"{v:.3g}"),
                                "tokens_per_s": table["tokens_per_s"].map(lambda v: f"{v:,.1f}"),
                                "GFLOP/s": table["GFLOP/s"].map(lambda v: f"{v:.3g}"),
                                "share of roofline": table["share of roofline"].map(lambda v: f"{v:.0%}"),
                                "share of its shapes' rate": table["share of its shapes' rate"].map(
                                    lambda v: "—" if v != v else f"{v:.0%}")})
        lines += ["", table.to_markdown(index=False)]
        compiled = throughput.get("compile")
        if compiled:
            lines += ["", f"- `torch.compile` of the causal LoRA step ({compiled['precision']}): " + (
                f"{compiled['eager_seconds']:.3g} s eager, {compiled['compiled_seconds']:.3g} s compiled "
                f"(×{compiled['speedup']:.2f}; first compiled step {compiled['compiled_first_step_seconds']:.0f} s), "
                f"losses within {compiled['max_relative_loss_difference']:.1e}"
                + (f"; it pays off after {compiled['break_even_steps']} steps, a per-user model trains "
                   f"{compiled['steps_per_model']}" if compiled.get("break_even_steps") is not None else "") + ": "
                + ("adopted" if compiled["adopt"] else "not adopted (below 1.2×, unequal, or compiling costs more "
                   "than it saves)")
                if "compiled_seconds" in compiled else
                f"failed: {compiled.get('compiled_error') or compiled.get('eager_error')}")]
        if throughput.get("attention"):
            attention = pd.DataFrame(throughput["attention"])
            lines += ["", "Stage 03's causal LoRA step with SDPA and with the eager attention it trains with on a CPU "
                      "(`precision.training_attention`), at the benchmark's shape and at stage 03's own per-user "
                      "shape; LoRA dropout as its profile sets it:", "",
                      attention.assign(**{"s/step": attention["seconds"].map(lambda v: f"{v:.3g}"),
                                          "GFLOP/s": attention["gflops_counted"].map(lambda v: f"{v:.3g}"),
                                          "share of roofline": attention["roofline_share"].map(lambda v: f"{v:.0%}"),
                                          "share of its shapes' rate": attention.get(
                                              "shape_roofline_share", pd.Series(float("nan"), index=attention.index)).map(
                                              lambda v: "—" if v != v else f"{v:.0%}"),
                                          "speed-up": attention.get("speedup_vs_sdpa", pd.Series(dtype=float)).map(
                                              lambda v: "" if v != v else f"×{v:.2f}")})[
                          ["threads", "shape", "tokens_per_step", "precision", "lora_dropout", "attention", "s/step",
                           "GFLOP/s", "share of roofline", "share of its shapes' rate", "speed-up"]].to_markdown(
                              index=False)]
        if throughput.get("padding"):
            lines += ["", "Padding share of the pipeline's batches on real prompts (before issue #21: random or data "
                      "order; now: length-bucketed or sorted):", "",
                      pd.DataFrame(throughput["padding"]).assign(
                          padding_before=lambda f: f["padding_before"].map(lambda v: f"{v:.0%}"),
                          padding_now=lambda f: f["padding_now"].map(lambda v: f"{v:.0%}"))[
                          ["batches", "examples", "padding_before", "padding_now"]].to_markdown(index=False)]
    runs = _bench_json(folder, "make_run_cpu")
    if runs is not None:
        lines += ["", "**`make run` of the `cpu` profile on one machine** (`benchmarks/record_make_run.py`; minutes of "
                  "each stage, the runner's; wall and peak memory by `/usr/bin/time -v`):", ""]
        table = pd.DataFrame([{"run": r["label"], "code": ", ".join(c[:8] for c in r["commits"]),
                               "precision": (" / ".join(sorted(set(r["precision"].values())))
                                             if isinstance(r["precision"], dict) else r["precision"]),
                               **{k[:2]: v for k, v in r["stage_minutes"].items()},
                               "stages, min": r["stage_minutes_total"], "wall, min": round(r["wall_seconds"] / 60, 1),
                               "peak GB": r["max_rss_gb"]} for r in runs["runs"]])
        cpus = {f"{r['cpu']['model_name']} ({'AVX512-BF16' if r['cpu'].get('avx512_bf16') else 'no AVX512-BF16'}, "
                f"{'AMX' if r['cpu'].get('amx_bf16') else 'no AMX'})" for r in runs["runs"]}
        lines += [table.to_markdown(index=False, floatfmt=".1f"), "", f"CPU: {'; '.join(sorted(cpus))}."]
        plan, tuned = _bench_json(folder, "plan_cpu"), _metrics(folder.parents[1] / "results" / "cpu" / FINETUNE.name)
        if tuned is not None:
            measured = tuned["metrics"]["training_seconds"] / 60
            ahead = tuned["metrics"].get("plan") or {}
            if ahead.get("stage03_seconds"):
                planned = ahead["stage03_seconds"] / 60
                lines += ["", f"The cost plan notebook 03 made before training (`udg_lib.plan`, "
                          f"{ahead.get('precision', '?')}; this run's users and padded batch lengths, "
                          f"{_plan_epochs_source(ahead)}; steps timed in the run, the median of three after two "
                          f"warm-up calls) put stage 03's training at {planned:.1f} min; the published run "
                          f"measured {measured:.1f} min ({measured / planned - 1:+.0%} against the plan)."]
            if plan is not None:
                replanned = sum(r["device_hours"] for r in plan["table"] if r["stage"] == "03") * 60
                lines += ["", f"Re-planned afterwards, alone on the machine, at the published run's outputs "
                          f"(`python -m udg_lib.plan --profile cpu --outputs-root RUN`, `plan_cpu.json`, "
                          f"{plan['precision']['used']}; {_plan_epochs_source(plan)}, so with that run's epochs only "
                          f"the step costs are predicted): {replanned:.1f} min ({measured / replanned - 1:+.0%})."]
    for name in ("bench_user_training", "bench_user_training_causal"):
        record = _bench_json(folder, name)
        if record is None:
            lines += ["", f"**Per-user training**: no `{name}.json`."]
            continue
        lines += ["", f"**Per-user training** (`bench_user_training.py`, {record.get('torch_threads', '?')} "
                  f"thread(s){_bench_when(record)}): (a) reload the base per user, (b) one in-process loop, (c) "
                  "batched multi-user LoRA; the ratio is (a)'s time over the variant's.", "",
                  pd.DataFrame(record["rows"]).rename(columns={"speedup_vs_a": "× (a)"})
                  .assign(users_per_hour=lambda f: f["users_per_hour"].map(lambda v: f"{v:,.0f}"))[
                      ["shape", "variant", "users", "steps_per_user", "seconds", "users_per_hour", "× (a)"]]
                  .to_markdown(index=False, floatfmt=".4g")]
    mixed = _bench_json(folder, "bench_mixed_adapters")
    if mixed is None:
        lines += ["", "**Mixed-adapter generation**: no `bench_mixed_adapters.json`."]
    else:
        config = mixed["config"]
        lines += ["", f"**Mixed-adapter generation** (`bench_mixed_adapters.py`, {config['shape']} shape, "
                  f"{config['users']} users × {config['contexts']} contexts, {config.get('threads_used', '?')} "
                  f"thread(s){_bench_when(mixed)}); replies identical across the variants: "
                  f"{'yes' if mixed.get('identical') else '**no**'}.", "",
                  pd.DataFrame({"variant": list(mixed["seconds"]), "seconds": list(mixed["seconds"].values()),
                                "contexts/s": [mixed["contexts_per_second"][k] for k in mixed["seconds"]]})
                  .to_markdown(index=False, floatfmt=".3g")]
    return "\n".join(lines).strip() + "\n"
