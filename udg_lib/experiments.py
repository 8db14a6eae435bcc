"""The study's conditions end to end: user-specific fine-tuning of one cell (dataset, split set,
pre-trained model; `conditions.Cell`) with each of its methods (notebook 03), and the Exp1 / Exp2
predictions and scores built on it (notebooks 04, 05).

A cell's folder, under stage 03's output, is `<dataset>/set<k>/<pretrained>/`, one subfolder per method
(`methods`):

    da/model, da/done.json          domain-adapted model (§4.1.3), the base of every method below
    one_id/model, one_id/done.json  One-ID model (§4.1.3)
    lora/<user>/adapter, done.json  one LoRA adapter per user (§3.5), PEFT format
    full/<user>/done.json, predictions.parquet, exp2_replies.parquet
                                    FULL per user (§4.1.3): evaluated while in memory (`generation.UserPredictor`);
                                    `model/` too only with save_full_models
    <peft method>/<user>/adapter, done.json, predictions.parquet, exp2_replies.parquet
                                    a peft method of the parameters (`methods.PeftMethod`), evaluated in memory

Every step is skipped when its `done.json` exists, so a killed notebook picks up where it stopped.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from transformers import AutoConfig

from udg_lib import finetuning as ft
from udg_lib import methods as mth
from udg_lib.baselines import LocalLLM, llm_base_method
from udg_lib.conditions import (
    NO_PRETRAINED,
    PRETRAINED_FORMATS,
    PRETRAINED_LABELS,
    Cell,
)
from udg_lib.families import ModelFamily, family_of
from udg_lib.generation import question_pairs
from udg_lib.methods import DA, MODEL_DIR, Evaluation, Method, PerUserMethod, TrainingJob
from udg_lib.metrics import (
    DEGENERATE_THRESHOLD,
    TOKENIZER_COLUMN,
    cosine_similarities,
    generation_health,
    leakage_scores,
    reference_chars,
    results_table,
    retrieve_responses,
    rouge_l,
)
from udg_lib.precision import Precision, resolve_precision
from udg_lib.summaries import (  # the notebooks call them as experiments.*
    LLM_DISPLAY_NAMES,
    llm_display_name,
    llm_short_name,
    significance_notes,
    sweep_summary,
    system_label,
)


def condition_family(condition: str | Path) -> ModelFamily:
    """The model family (seq2seq or causal) of a cell's saved DA model, read from its config alone."""
    return family_of(AutoConfig.from_pretrained(Path(condition) / DA.name / MODEL_DIR))


def finetune_condition(cell: Cell, job: TrainingJob, methods: Sequence[Method] = mth.PAPER_METHODS) -> pd.DataFrame:
    """§4.1.3 for one cell: domain adaptation (always first: every other method starts from it), then each
    of `methods` for every user of the cell, each resumably in its own folder (`Method.train`).

    Methods evaluated in memory (FULL, the generic peft methods) write each user's test replies (with
    reference NLL) and Exp2 answers to `job.questions` into the user's folder. Returns one row per trained
    unit: method, user_id ("" for DA and One-ID) and the training summary.
    """
    frames = [DA.train(cell, job)]
    frames += [method.train(cell, job) for method in methods if method is not DA]
    return pd.concat(frames, ignore_index=True)


def sweep_learning_rate(method: PerUserMethod, cell: Cell, job: TrainingJob,
                        learning_rates: Sequence[float]) -> tuple[float, pd.DataFrame]:
    """The learning rate of a per-user `method` with the lowest mean best dev loss over the cell's users,
    and the per-user table.

    Each candidate trains every user's model on the cell's domain-adapted model (`cell/da`, from
    `finetune_condition`) with early stopping on that user's dev pairs, as the real run will, into a temporary
    folder that is then removed. Only training and dev pairs are read: test replies never choose the rate.
    Rows: learning_rate, user_id, initial_dev_loss, best_dev_loss, epochs_run, best_epoch, stopped_early, steps.
    """
    if not learning_rates:
        raise ValueError("no learning rates to sweep")
    base_dir = DA.base_model_dir(cell)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir} holds no domain-adapted model: run finetune_condition for DA first")
    frames = []
    with tempfile.TemporaryDirectory(prefix="lr-sweep-") as scratch:
        for rate in learning_rates:
            config = finetune_config(job.config_for(method), learning_rate=float(rate))
            table = method.train_users(cell, job, Path(scratch) / f"lr{rate:g}", config, evaluate=False)
            frames.append(table.assign(learning_rate=float(rate)))
    columns = ["learning_rate", "user_id", "initial_dev_loss", "best_dev_loss", "epochs_run", "best_epoch",
               "stopped_early", "steps"]
    results = pd.concat(frames, ignore_index=True)[columns]
    means = results.groupby("learning_rate", sort=False)["best_dev_loss"].mean()
    return float(means.idxmin()), results


def choose_learning_rate(method: PerUserMethod, cell: Cell, job: TrainingJob, learning_rates: Sequence[float],
                         sweep_users: int = 0) -> tuple[TrainingJob, pd.DataFrame]:
    """The cell's domain adaptation (kept: `finetune_condition` resumes from it), then `method`'s learning
    rate swept on the first `sweep_users` users' dev loss (0: all of the cell's). Returns `job` training
    `method` at the chosen rate, and the sweep's per-user table."""
    DA.train(cell, job)
    swept = cell.with_users(sorted(cell.user_ids)[:sweep_users or None])  # the first users by id
    rate, table = sweep_learning_rate(method, swept, job, learning_rates)
    return job.with_config(method, finetune_config(job.config_for(method), learning_rate=rate)), table


def finetune_config(base: ft.FinetuneConfig, **overrides: Any) -> ft.FinetuneConfig:
    """`base` with the given fields replaced (None values ignored), e.g. the DA config from the user config."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------------
# Exp1 (§4.2): next-utterance predictions of every system of one cell


def exp1_predictions(cell: Cell, evaluation: Evaluation, methods: Sequence[Method] = mth.PAPER_METHODS,
                     generate_ids: Collection[Any] | None = None) -> pd.DataFrame:
    """Reference NLLs on every `test` pair of the cell's users and greedy replies on those in `generate_ids`
    (None: all; `Cell.generated_ids`), for each of `methods` (`Method.predict`); a pair not generated has
    `generated` None.

    DA (the floor: domain-adapted on the users' pooled halves, no per-user training, no One-ID) and One-ID
    run their saved models, LoRA runs every user's adapter on the DA model (`evaluation.lora_eval`), FULL
    and the peft methods are read from the replies notebook 03 wrote while each user's model was in memory.
    Columns: pair_id, speaker_id, generated, nll, n_tokens, text_nll, text_chars
    (`generation.ReferenceScores`), method.
    """
    return pd.concat([method.predict(cell, evaluation, generate_ids) for method in methods], ignore_index=True)


def join_context(context: Sequence[str]) -> str:
    """A context as one string for retrieval embeddings (turns in order, newest last)."""
    return " \n ".join(context)


def retrieval_predictions(embedder: Any, cell: Cell, generate_ids: Collection[Any] | None = None) -> pd.DataFrame:
    """The retrieval floor: each test context in `generate_ids` (None: all) answered with the user's own
    training response (train_da and train_ft) whose context is most similar (`metrics.retrieve_responses`).
    It has no likelihood, so the pairs it does not answer have nothing to score and get no row."""
    pairs = cell.pairs
    train = pairs[pairs["split"].isin(["train_da", "train_ft"]) & pairs["speaker_id"].isin(set(cell.user_ids))]
    test = cell.test
    if generate_ids is not None:
        test = test[test["pair_id"].isin(set(generate_ids))]
    generated = retrieve_responses(embedder, [join_context(c) for c in train["context"]], train["response"].tolist(),
                                   train["speaker_id"].tolist(), [join_context(c) for c in test["context"]],
                                   test["speaker_id"].tolist())
    return pd.DataFrame({"pair_id": test["pair_id"], "speaker_id": test["speaker_id"], "generated": generated,
                         "nll": float("nan"), "n_tokens": float("nan"), "method": mth.RETRIEVAL})


def score_predictions(predictions: pd.DataFrame, pairs: pd.DataFrame, embedder: Any, language: str) -> pd.DataFrame:
    """Per-sample Exp1 scores (§4.2.3): the reference joined in, cosine similarity of sentence embeddings,
    ROUGE-L F x100 (language-aware tokens; both NaN where no reply was generated, `generated` None), and the
    reference likelihood columns:

    - nll / n_tokens (perplexity, per token of the system's own tokenizer): summed NLL in nats of the
      reference tokens and their count; T5 (`generation.reference_nll`): the reply cut to
      max_target_length - 1 tokens plus `</s>`; LLMs (`baselines.LocalLLM.reference_nll`): the whole
      reply, no end-of-turn token. NaN where a system gives no likelihood (retrieval, endpoints).
    - text_nll / text_chars: the NLL of the reply's text alone (no `</s>`) and the characters it covers
      (`metrics.reference_chars`: whitespace runs count as one). Kept when `predictions` has them (T5);
      otherwise (LLMs, whose nll is exactly that) text_nll = nll and text_chars = the whole reference.
    - bits_per_char = text_nll / ln 2 / text_chars (NaN for an empty reference), comparable across tokenizers.

    A row whose `generated` is missing (None/NaN: scored for likelihood only, outside the generated subset)
    keeps it missing and gets NaN similarity and ROUGE-L; its likelihood columns are kept.
    """
    references = pairs.drop_duplicates("pair_id").set_index("pair_id")["response"]
    scored = predictions.rename(columns={"speaker_id": "user_id"}).copy()
    scored["reference"] = references.reindex(scored["pair_id"]).to_numpy()
    if scored["reference"].isna().any():
        raise ValueError(f"predictions for unknown pair ids {scored.loc[scored['reference'].isna(), 'pair_id'].tolist()[:3]}")
    made = scored["generated"].notna()  # None: scored only, no reply generated (`generation_subset`)
    scored["generated"] = scored["generated"].astype(object).where(made, None)
    replies, references = scored.loc[made, "generated"].astype(str).tolist(), scored.loc[made, "reference"].tolist()
    scored["similarity"] = float("nan")
    scored["rouge_l"] = float("nan")
    if replies:
        scored.loc[made, "similarity"] = cosine_similarities(embedder, replies, references)
        scored.loc[made, "rouge_l"] = rouge_l(replies, references, language)
    if "text_nll" not in scored.columns or "text_chars" not in scored.columns:
        scored["text_nll"] = scored["nll"].astype("float64")
        scored["text_chars"] = [reference_chars(r) for r in scored["reference"]]
    chars = scored["text_chars"].astype("float64")
    scored["bits_per_char"] = (scored["text_nll"].astype("float64") / math.log(2) / chars.where(chars > 0))
    return scored


EXP1_METRICS: tuple[str, ...] = ("similarity", "acc_at_sim", "rouge_l", "bits_per_char", "perplexity")
EXP1_FORMATS: dict[str, str] = {"similarity": ".3f", "acc_at_sim": ".3g", "rouge_l": ".1f", "bits_per_char": ".2f",
                                "perplexity": ".1f", "n_users": "d"}


def exp1_comparisons(pretrained: Sequence[str], methods: Sequence[Method] = mth.PAPER_METHODS
                      ) -> list[tuple[dict, dict]]:
    """The paired tests of Exp1: LoRA vs One-ID and FULL vs LoRA per pre-trained model; PSP and PPP vs Plain
    Dialogue per method; each fine-tuned system vs its DA floor and vs the retrieval floor. A method beyond
    the paper's (`methods.PeftMethod`) is compared with LoRA, its floors and across pre-trained models too."""
    fine_tuned = [m.name for m in methods if m.fine_tuned]
    paired = [(mth.LORA.name, mth.ONE_ID.name), (mth.FULL.name, mth.LORA.name)]
    paired += [(m.name, mth.LORA.name) for m in methods if not m.paper]
    paired = [(a, b) for a, b in paired if a in fine_tuned and b in fine_tuned]
    comparisons: list[tuple[dict, dict]] = []
    for name in pretrained:
        comparisons += [({"pretrain": name, "method": a}, {"pretrain": name, "method": b}) for a, b in paired]
    for profiled in ("psp", "ppp"):
        if profiled in pretrained and "plain_dialogue" in pretrained:
            comparisons += [({"pretrain": profiled, "method": m}, {"pretrain": "plain_dialogue", "method": m})
                            for m in fine_tuned]
    for name in pretrained:
        for method in fine_tuned:
            comparisons += [({"pretrain": name, "method": method}, {"pretrain": name, "method": DA.name}),
                            ({"pretrain": name, "method": method},
                             {"pretrain": NO_PRETRAINED, "method": mth.RETRIEVAL})]
    return comparisons


def leakage_table(scores: pd.DataFrame, pairs_by_dataset: dict[str, pd.DataFrame], embedder: Any,
                  methods: Sequence[str] = tuple(m.name for m in mth.PAPER_METHODS)) -> pd.DataFrame:
    """Per sample: is the generated reply closer to another evaluation user's training responses than to the
    user's own, and is it a near copy (>= 0.9) of another user's? (`metrics.leakage_scores`; §4.1.3 and
    §4.3.4 name the risk for One-ID but do not measure it.) DA-pooled (no per-user training, no id) gives the
    level without per-user training. Only rows with a generated reply (`generated_rows`)."""
    frames = []
    scores = generated_rows(scores)
    for (dataset, split_set), group in scores[scores["method"].isin(methods)].groupby(["dataset", "split_set"]):
        pairs = pairs_by_dataset[dataset]
        users = set(group["user_id"])
        train = pairs[(pairs["split_set"] == split_set) & pairs["split"].isin(["train_da", "train_ft"])
                      & pairs["speaker_id"].isin(users)]
        leak = leakage_scores(embedder.encode(group["generated"].tolist()), group["user_id"].tolist(),
                              embedder.encode(train["response"].tolist()), train["speaker_id"].tolist())
        frames.append(pd.concat([group[["dataset", "split_set", "user_id", "pair_id", "pretrain", "method"]]
                                 .reset_index(drop=True), leak.drop(columns=["target_user"])], axis=1))
    return pd.concat(frames, ignore_index=True)


def leakage_comparisons(methods: Sequence[Method] = mth.PAPER_METHODS) -> list[tuple[dict, dict]]:
    """The paired leakage tests: every two fine-tuned methods (One-ID vs LoRA, One-ID vs FULL, LoRA vs FULL,
    ...), then each against DA, the level without per-user training."""
    names = [m.name for m in methods if m.fine_tuned]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]] + [(m, DA.name) for m in names]
    return [({"method": a}, {"method": b}) for a, b in pairs]


# ---------------------------------------------------------------------------------------------------------------
# Exp2 (§4.3): every user's model answers the personal questions


def exp2_replies(cell: Cell, evaluation: Evaluation, questions: pd.DataFrame,
                 methods: Sequence[Method] = mth.PAPER_METHODS) -> pd.DataFrame:
    """Greedy answers (§4.3.2) of each user's model of every method that answers questions (`Method.answer`:
    One-ID, LoRA, FULL and the peft methods; not the DA floor) to every question.

    Columns: user_id, question_id, reply, method. LoRA users share batches (`evaluation.lora_eval`); FULL's
    and the peft methods' answers come from notebook 03's files."""
    asked = pd.concat([question_pairs(questions, u) for u in cell.user_ids], ignore_index=True)
    replies = pd.concat([m.answer(cell, evaluation, asked) for m in methods if m.answers_questions],
                        ignore_index=True)
    return replies.rename(columns={"speaker_id": "user_id", "pair_id": "question_id"})[
        ["user_id", "question_id", "reply", "method"]]


def exp2_comparisons(methods: Sequence[Method] = mth.PAPER_METHODS) -> list[tuple[dict, dict]]:
    """Table 7's paired tests within a pre-trained model: every two methods that answer the questions
    (One-ID vs LoRA, One-ID vs FULL, LoRA vs FULL, then the peft methods)."""
    names = [m.name for m in methods if m.answers_questions]
    return [({"method": a}, {"method": b}) for i, a in enumerate(names) for b in names[i + 1:]]


# ---------------------------------------------------------------------------------------------------------------
# Table 6: models, size on disk, response time


def response_times(cell: Cell, evaluation: Evaluation, n_users: int = 5,
                   methods: Sequence[Method] = mth.PAPER_METHODS) -> pd.DataFrame:
    """Table 6's "response time": load the user's model, then generate one reply, per method; cold (the model
    read from disk) and warm (already in memory), averaged over `n_users` users' first test contexts.

    One-ID: one model for everyone (cold: read it; warm: generate). LoRA: the DA base stays in memory
    (cold: read the user's adapter onto it; warm: the adapter already loaded, switch to it). FULL: a whole
    model per user (cold: read it; warm: generate). FULL models are kept on disk only with save_full_models;
    otherwise the DA model folder stands in for them (same architecture and file size, so the same read time).
    Methods without a `response_timer` (the DA floor, the peft methods) are not timed.
    """
    chosen = list(cell.user_ids[:n_users])
    test = cell.pairs[cell.pairs["split"] == "test"]
    firsts = test[test["speaker_id"].isin(chosen)].sort_values("pair_id").drop_duplicates("speaker_id")
    timers = [(m.name, timer) for m in methods if (timer := m.response_timer(cell, evaluation)) is not None]
    rows = []
    for k, row in enumerate(firsts.itertuples(index=False)):
        frame = pd.DataFrame([row._asdict()])
        for name, timer in timers:
            cold, warm = timer(frame, row.speaker_id, k)
            rows += [{"method": name, "mode": "cold", "seconds": cold}, {"method": name, "mode": "warm", "seconds": warm}]
    return pd.DataFrame(rows)


def table6(times: pd.DataFrame, cell: Cell, methods: Sequence[Method] = mth.PAPER_METHODS) -> pd.DataFrame:
    """Table 6 analog: number of models, size on disk per model, mean response time cold and warm, for the
    timed methods."""
    mean = times.groupby(["method", "mode"])["seconds"].mean().unstack()
    n_users = len(cell.user_ids)
    return pd.DataFrame([{"model": m.label, "models": m.models(n_users),
                          "size_MB": (m.disk_bytes(cell) or float("nan")) / 1e6,
                          "response_s_cold": mean.loc[m.name, "cold"], "response_s_warm": mean.loc[m.name, "warm"]}
                         for m in methods if m.name in mean.index])


def artifact_sizes(cell: Cell) -> dict[str, Any]:
    """Bytes on disk: the DA model (= one FULL or One-ID model), the mean LoRA adapter, and their counts."""
    def folder_bytes(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    adapters = [d / ft.ADAPTER_DIR for d in mth.LORA.folder(cell).glob("*") if (d / ft.ADAPTER_DIR).is_dir()]
    return {
        "model_weights_bytes": DA.disk_bytes(cell),
        "model_folder_bytes": folder_bytes(DA.base_model_dir(cell)),
        "adapter_weights_bytes_mean": mth.LORA.disk_bytes(cell),
        "adapter_folder_bytes_mean": (sum(folder_bytes(a) for a in adapters) / len(adapters)) if adapters else None,
        "n_adapters": len(adapters),
    }


# ---------------------------------------------------------------------------------------------------------------
# Presentation: Tables 3-5 analogs and their significance notes


OURS_TOKENIZER_LABEL = "ours (stage 00)"  # every fine-tuned system and DA floor shares stage 00's tokenizer
HEALTH_GROUP_COLS: tuple[str, ...] = ("dataset", "system", "pretrain", "method")  # one system per dataset
HEALTH_FILE = "generation_health"  # .csv and .md, in stage 04's and stage 06's folders


def row_tokenizer(pretrain: str, method: str) -> str:
    """The tokenizer a system's perplexity is counted in: ours (stage 00's) for the fine-tuned systems, the
    LLM's own (named after its model: chat and completion rows of one model share it), "" for a system without
    likelihood. In a causal run stage 00's is the base LM's tokenizer with the §3.4 markers added."""
    if pretrain in PRETRAINED_FORMATS:
        return OURS_TOKENIZER_LABEL
    if pretrain == "llm":
        method = llm_base_method(method)  # the 10-turn and RAG extra rows: the same model and tokenizer
        base = method.rsplit("-", 1)[0] if method.endswith(("-chat", "-completion", "-endpoint")) else method
        return LLM_DISPLAY_NAMES.get(base, base)
    return ""


def exp1_table(per_user: pd.DataFrame, metrics: Sequence[str] = EXP1_METRICS,
               method_labels: Mapping[str, str] | None = None, health: pd.DataFrame | None = None) -> pd.DataFrame:
    """One dataset's Exp1 table: rows grouped by pre-trained model (paper order), then the floors and the
    prompt LLMs; mean over users and split sets (`metrics.results_table`). `method_labels` names methods
    `methods.LABELS` does not know (the LLMs, the peft methods: `methods.labels_of`).

    With perplexity among `metrics`, a `tokenizer` column (`row_tokenizer`) follows the metrics, so that
    `metrics.bold_best` compares perplexity only among rows of one tokenizer. With `health`
    (`generation_health_table`), a degenerate system's "fine-tuning" label ends with "⚠ degenerate 63%":
    a table for display; write CSVs without `health`, so labels stay stable row keys across runs.
    """
    table = results_table(per_user, metrics)
    pretrain_order = [*PRETRAINED_FORMATS, NO_PRETRAINED, "llm"]
    method_order = mth.method_order()
    table["_p"] = table["pretrain"].map(lambda p: pretrain_order.index(p) if p in pretrain_order else 99)
    table["_m"] = table["method"].map(lambda m: method_order.index(m) if m in method_order else 99)
    table = table.sort_values(["_p", "_m", "method"], kind="stable").drop(columns=["_p", "_m"])
    table.insert(0, "model", [PRETRAINED_LABELS.get(p, "Floor" if p == NO_PRETRAINED else "Prompt LLM")
                              for p in table["pretrain"]])
    labels = {**mth.LABELS, **(method_labels or {})}
    flags = _degenerate_flags(per_user, health)
    table.insert(1, "fine-tuning", [labels.get(m, m) + flags.get((p, m), "")
                                    for p, m in zip(table["pretrain"], table["method"])])
    if "perplexity" in metrics:
        table.insert(table.columns.get_loc("n_users"), TOKENIZER_COLUMN,
                     [row_tokenizer(p, m) for p, m in zip(table["pretrain"], table["method"])])
    return table.drop(columns=["pretrain", "method"]).reset_index(drop=True)


def _degenerate_flags(per_user: pd.DataFrame, health: pd.DataFrame | None) -> dict[tuple[str, str], str]:
    """(pretrain, method) -> " ⚠ degenerate 63%" for the degenerate systems of per_user's dataset."""
    if health is None or health.empty:
        return {}
    if "dataset" in health.columns and "dataset" in per_user.columns:
        health = health[health["dataset"].isin(set(per_user["dataset"]))]
    flagged = health[health["degenerate"].astype(str).str.lower() == "true"]  # bools, or read back from CSV
    return {(p, m): f" ⚠ degenerate {share:.0%}"
            for p, m, share in zip(flagged["pretrain"], flagged["method"], flagged["degenerate_share"])}


def generation_health_table(scores: pd.DataFrame) -> pd.DataFrame:
    """`metrics.generation_health` of per-sample Exp1 scores, one row per dataset and system, pooled over
    users and split sets (the most common reply is the system's over all its replies on that dataset). Rows
    scored without a generated reply (`generated` None) are left out: `n` counts replies."""
    return generation_health(generated_rows(scores), list(HEALTH_GROUP_COLS))


def generated_rows(scores: pd.DataFrame) -> pd.DataFrame:
    """The per-sample score rows that have a generated reply (stage 04 scores every test pair but generates
    replies on `generation_subset`; the others have `generated` None and NaN similarity and ROUGE-L)."""
    return scores[scores["generated"].notna()] if "generated" in scores.columns else scores


def write_generation_health(scores: pd.DataFrame, folder: str | Path) -> pd.DataFrame:
    """`generation_health_table(scores)` written to `<folder>/generation_health.csv` and `.md`; returns it.

    Stage 04 writes its systems' (T5s and retrieval), stage 06 its prompt LLMs'."""
    health = generation_health_table(scores)
    folder = Path(folder)
    health.to_csv(folder / f"{HEALTH_FILE}.csv", index=False)
    lines = ["### Generation health", ""]
    for dataset in dict.fromkeys(health["dataset"]):
        lines += [f"#### {dataset}", *health_notes(health, dataset)[1:], ""]
    (folder / f"{HEALTH_FILE}.md").write_text("\n".join(lines), encoding="utf-8")
    return health


def health_notes(health: pd.DataFrame, dataset: str) -> list[str]:
    """Lines for below an Exp1 table: the generation health of the dataset's systems and what ⚠ means."""
    rows = health[health["dataset"] == dataset]
    if rows.empty:
        return []
    shown = pd.DataFrame({
        "system": rows["system"], "n": rows["n"].astype(int),
        "empty": rows["empty_share"].map("{:.0%}".format), "repeat": rows["repeat_share"].map("{:.0%}".format),
        "most common": rows["most_common_share"].map("{:.0%}".format),
        "most common reply": rows["most_common_reply"].map(_short_reply),
        "degenerate": [f"{share:.0%}{' ⚠' if flag else ''}" for share, flag in zip(rows["degenerate_share"],
                                                                                  rows["degenerate"])],
    })
    return ["", f"Generation health (n replies per system, pooled over users and split sets). Degenerate: a reply "
            f"that is empty, one token or character repeated (\"k k k\", \"))))\", any one-character reply), or "
            f"identical to the system's most common reply; ⚠ marks a system with more than "
            f"{DEGENERATE_THRESHOLD:.0%} degenerate replies, whose scores describe a collapsed model.", "",
            shown.to_markdown(index=False)]


def _short_reply(reply: str | None, width: int = 40) -> str:
    if reply is None or pd.isna(reply):
        return "(none repeated)"
    reply = " ".join(str(reply).split()).replace("|", "\\|")
    return f'"{reply if len(reply) <= width else reply[: width - 1] + "…"}"'


def per_user_over_sets(per_user: pd.DataFrame, metric_cols: Sequence[str]) -> pd.DataFrame:
    """Per-user values averaged over split sets: the unit of the significance tests (a user appears in every
    split set, so the sets are not independent samples)."""
    keys = ["dataset", "user_id", "pretrain", "method"]
    return per_user.groupby(keys, sort=False)[list(metric_cols)].mean().reset_index()


# ---------------------------------------------------------------------------------------------------------------
# Prompt-based LLM baselines (§4.2.2): naming and context sampling


def local_llm(name_or_path: str, device: str = "cpu", precision: str | Precision = "fp32") -> Any:
    """A `baselines.LocalLLM` on `device`, its weights held in `precision`'s frozen dtype (it only generates
    and scores)."""
    generator = LocalLLM(name_or_path)
    resolve_precision(precision, device).for_inference(generator.model.to(device))
    return generator
