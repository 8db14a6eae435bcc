"""The study's conditions end to end: user-specific fine-tuning of one pre-trained model on one dataset and
split set (notebook 03), and the Exp1 / Exp2 predictions and scores built on it (notebooks 04, 05).

A *condition* is (dataset, split set, pre-trained model). Its folder, under stage 03's output, is
`<dataset>/set<k>/<pretrained>/`:

    da/model, da/done.json          domain-adapted model (§4.1.3), the base of every method below
    one_id/model, one_id/done.json  One-ID model (§4.1.3)
    lora/<user>/adapter, done.json  one LoRA adapter per user (§3.5), PEFT format
    full/<user>/done.json, predictions.parquet, exp2_replies.parquet
                                    FULL per user (§4.1.3): evaluated while in memory (`generation.UserPredictor`);
                                    `model/` too only with save_full_models

Every step is skipped when its `done.json` exists, so a killed notebook picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from udg_lib import finetuning as ft
from udg_lib import io
from udg_lib.generation import (
    EXP2_FILE,
    PREDICTIONS_FILE,
    UserPredictor,
    greedy_generate,
    load_routed_adapters,
    load_user_adapters,
    predict_pairs,
    question_pairs,
)
from udg_lib.baselines import PAPER_HISTORY_SUFFIX
from udg_lib.families import ModelFamily, build_model, family_of, load_model
from udg_lib.precision import Precision, resolve_precision
from udg_lib.pretraining import count_parameters
from udg_lib.prompts import build_prompts

# The prompt format each pre-trained model was trained with (§3.4); fine-tuning keeps it.
PRETRAINED_FORMATS: dict[str, str] = {"plain_t5": "plain", "plain_dialogue": "plain", "psp": "psp", "ppp": "ppp"}
PRETRAINED_LABELS: dict[str, str] = {"plain_t5": "Plain T5", "plain_dialogue": "Plain Dialogue", "psp": "PSP",
                                     "ppp": "PPP"}
METHOD_LABELS: dict[str, str] = {"da": "DA-pooled (no per-user training)",  # §4.1.3 DA model: pooled users' halves
                                 "one_id": "One-ID", "lora": "LoRA", "full": "FULL",
                                 "retrieval": "Retrieval (own turns)"}
MODEL_DIR = "model"


def condition_dir(root: str | Path, dataset: str, split_set: int, pretrained: str) -> Path:
    return Path(root) / dataset / f"set{split_set}" / pretrained


def system_label(pretrained: str, method: str) -> str:
    """Display label of a system, e.g. "PSP / LoRA"; floors without a pre-trained model keep their own."""
    if pretrained in PRETRAINED_LABELS:
        return f"{PRETRAINED_LABELS[pretrained]} / {METHOD_LABELS.get(method, method)}"
    return METHOD_LABELS.get(method, method)


def users_table_path(users_dir: str | Path, dataset: str, split_set: int) -> Path:
    """Stage 01's users table for one split set: profiles that read none of that set's dev/test turns."""
    return Path(users_dir) / f"{dataset}.set{int(split_set)}.parquet"


def load_dataset_users(prepared_dir: str | Path, users_dir: str | Path, dataset: str, split_set: int) -> pd.DataFrame:
    """Every user of a dataset with the profiles of split set `split_set` (stage 01), so PPP finds partners'
    profiles too; `evaluation` marks the evaluation users, which carry their One-ID (stage 00; "" elsewhere)."""
    eval_users = pd.read_csv(Path(prepared_dir) / dataset / "eval_users.csv", dtype=str, keep_default_na=False)
    path = users_table_path(users_dir, dataset, split_set)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no users table for split set {split_set}; rerun stage 01 (--from 01)")
    profiles = pd.read_parquet(path)
    profiles = profiles.drop(columns=[c for c in ("one_id", "n_turns", "evaluation") if c in profiles.columns])
    missing = sorted(set(eval_users["user_id"]) - set(profiles["user_id"]))
    if missing:
        raise ValueError(f"{path}: no profile for {len(missing)} evaluation users, first {missing[:5]}")
    merged = profiles.merge(eval_users[["user_id", "one_id", "n_turns"]], on="user_id", how="left")
    merged["evaluation"] = merged["one_id"].notna()
    merged["one_id"] = merged["one_id"].fillna("")
    merged["n_turns"] = pd.to_numeric(merged["n_turns"]).fillna(0).astype(int)
    return merged.sort_values(["evaluation", "user_id"], ascending=[False, True]).reset_index(drop=True)


def set_user_ids(users: pd.DataFrame, pairs: pd.DataFrame, max_users: int = 0) -> list[str]:
    """The users fine-tuned in one split set: the first `max_users` evaluation users by id (0: all) that have
    pairs in this set's `pairs` (stage 00 leaves a user out of a set without fine-tuning, dev or test pairs)."""
    present = set(pairs["speaker_id"])
    return [u for u in ft.evaluation_user_ids(users)[: max_users or None] if u in present]


def trained_user_ids(trained_metrics: Mapping[str, Any], dataset: str, split_set: int) -> list[str]:
    """The users stage 03 fine-tuned for a dataset and split set (its metrics' `trained_users`)."""
    return list(trained_metrics["trained_users"][dataset][str(split_set)])


def dataset_language(prepared_dir: str | Path, dataset: str) -> str:
    """The language stage 00 recorded for a dataset ("en", "ja"): picks questions, tokenizers and embeddings."""
    from udg_lib.data.prepare import corpus_language

    return corpus_language(prepared_dir, dataset)


@dataclass
class UserTrainingOptions:
    """How per-user models are trained: where (executor) and how LoRA is batched. Not part of the method."""

    lora_training: str = "batched"  # "batched": several users' adapters in one pass (multilora); "per_user"
    users_per_batch: int = 8  # batched LoRA: users trained together
    executor: str = "local"  # "local" or "ray" (users_per_task users per Ray task; LoRA as lora_training says)
    ray_address: str | None = None  # a Ray cluster; None starts a local instance
    users_per_task: int = 4
    num_cpus_per_task: float = 1.0
    num_gpus_per_task: float = 0.0
    save_full_models: bool = False  # keep each FULL model on disk (a whole model per user)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.lora_training not in ("batched", "per_user"):
            raise ValueError(f"lora_training must be 'batched' or 'per_user', not {self.lora_training!r}")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', not {self.executor!r}")


def condition_family(condition: str | Path) -> ModelFamily:
    """The model family (seq2seq or causal) of a condition's saved DA model, read from its config alone."""
    from transformers import AutoConfig

    return family_of(AutoConfig.from_pretrained(Path(condition) / "da" / MODEL_DIR))


def inference_model(folder: str | Path, tokenizer: PreTrainedTokenizerBase, device: str,
                    precision: str | Precision = "fp32") -> torch.nn.Module:
    """A saved model on `device` for generation or scoring only: held in `precision`'s frozen dtype (bf16
    where it resolves to bf16 on `device`), in eval mode."""
    return resolve_precision(precision, device).for_inference(build_model(folder, tokenizer).to(device))


def _save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, record: dict) -> None:
    """model/ (save_pretrained + tokenizer) and done.json, published together (temp folder + rename)."""
    with io.staged_dir(folder) as staging:
        model.save_pretrained(staging / MODEL_DIR)
        tokenizer.save_pretrained(staging / MODEL_DIR)
        io.write_json(staging / ft.DONE_FILE, record)


def _done(folder: Path) -> dict | None:
    marker = folder / ft.DONE_FILE
    return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None


def _summary_row(record: dict, **keys: Any) -> dict[str, Any]:
    return {**keys, **record["summary"]}


def finetune_condition(pretrained_model_dir: str | Path, tokenizer: PreTrainedTokenizerBase, pairs: pd.DataFrame,
                       users: pd.DataFrame, user_ids: Sequence[str], pretrained: str, out_dir: str | Path,
                       config: ft.FinetuneConfig, da_config: ft.FinetuneConfig,
                       options: UserTrainingOptions | None = None, questions: pd.DataFrame | None = None,
                       predict_settings: dict[str, Any] | None = None, device: str | None = None,
                       methods: Sequence[str] = ("one_id", "lora", "full"),
                       lora_config: ft.FinetuneConfig | None = None) -> pd.DataFrame:
    """§4.1.3 for one condition: domain adaptation, then One-ID, LoRA and FULL for every user in `user_ids`.

    `lora_config` (default `config`) trains the LoRA adapters, e.g. with a learning rate chosen on the users'
    dev loss (`sweep_lora_learning_rate`); One-ID and FULL keep `config`.

    `pairs` are one split set's rows of a dataset's eval pairs, `users` its evaluation users (profiles and
    One-IDs). FULL users are evaluated in memory: their test replies (with reference NLL) and Exp2 answers to
    `questions` go into their folders (`predict_settings`: UserPredictor's length/batch options).
    Returns one row per trained unit: method, user_id ("" for DA and One-ID) and the training summary.
    """
    options = options or UserTrainingOptions()
    out_dir = Path(out_dir)
    fmt = PRETRAINED_FORMATS[pretrained]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[dict[str, Any]] = []
    user_ids = sorted(user_ids)

    # §4.1.3: domain adaptation on the pooled train_da halves, before any user-specific training.
    da_dir = out_dir / "da"
    record = _done(da_dir)
    if record is None:
        model = build_model(pretrained_model_dir, tokenizer).to(device)
        model, summary = ft.domain_adapt(model, tokenizer, pairs, users, fmt, da_config, user_ids)
        record = {"method": "da", "fmt": fmt, "summary": summary.as_dict(), "config": da_config.as_dict(),
                  "n_parameters": count_parameters(model), "family": family_of(model).name}
        _save_model(model, tokenizer, da_dir, record)
        del model
    rows.append(_summary_row(record, method="da", user_id=""))
    base_dir = da_dir / MODEL_DIR

    if "one_id" in methods:  # one model for all users, each prompt led by the user's One-ID
        one_id_dir = out_dir / "one_id"
        record = _done(one_id_dir)
        if record is None:
            model = build_model(base_dir, tokenizer).to(device)
            model, summary = ft.train_one_id(model, tokenizer, pairs, users, fmt, config, user_ids)
            record = {"method": "one_id", "fmt": fmt, "summary": summary.as_dict(), "config": config.as_dict()}
            _save_model(model, tokenizer, one_id_dir, record)
            del model
        rows.append(_summary_row(record, method="one_id", user_id=""))

    predictor = None
    if "full" in methods:
        test = pairs[pairs["split"] == "test"]
        predictor = UserPredictor(tokenizer, test, users, fmt, questions, **(predict_settings or {}))
    for method in ("lora", "full"):
        if method not in methods:
            continue
        method_config = (lora_config or config) if method == "lora" else config
        table = _train_users(method, base_dir, tokenizer, pairs, users, user_ids, fmt, out_dir / method,
                             method_config, options, predictor if method == "full" else None, device)
        rows += [{**r, "method": method} for r in table.drop(columns=["status", "dir"]).to_dict("records")]
    return pd.DataFrame(rows)


def sweep_lora_learning_rate(condition: str | Path, tokenizer: PreTrainedTokenizerBase, pairs: pd.DataFrame,
                             users: pd.DataFrame, user_ids: Sequence[str], pretrained: str,
                             config: ft.FinetuneConfig, learning_rates: Sequence[float],
                             options: UserTrainingOptions | None = None, device: str | None = None
                             ) -> tuple[float, pd.DataFrame]:
    """The LoRA learning rate with the lowest mean best dev loss over `user_ids`, and the per-user table.

    Each candidate trains every user's adapter on the condition's domain-adapted model (`condition/da`, from
    `finetune_condition`) with early stopping on that user's dev pairs, as the real run will, into a temporary
    folder that is then removed. Only training and dev pairs are read: test replies never choose the rate.
    Rows: learning_rate, user_id, initial_dev_loss, best_dev_loss, epochs_run, best_epoch, stopped_early, steps.
    """
    import tempfile

    if not learning_rates:
        raise ValueError("no learning rates to sweep")
    base_dir = Path(condition) / "da" / MODEL_DIR
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir} holds no domain-adapted model: run finetune_condition for DA first")
    options = options or UserTrainingOptions()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    frames = []
    with tempfile.TemporaryDirectory(prefix="lora-lr-sweep-") as scratch:
        for rate in learning_rates:
            table = _train_users("lora", base_dir, tokenizer, pairs, users, sorted(user_ids),
                                 PRETRAINED_FORMATS[pretrained], Path(scratch) / f"lr{rate:g}",
                                 finetune_config(config, learning_rate=float(rate)), options, None, device)
            frames.append(table.assign(learning_rate=float(rate)))
    columns = ["learning_rate", "user_id", "initial_dev_loss", "best_dev_loss", "epochs_run", "best_epoch",
               "stopped_early", "steps"]
    results = pd.concat(frames, ignore_index=True)[columns]
    means = results.groupby("learning_rate", sort=False)["best_dev_loss"].mean()
    return float(means.idxmin()), results


def choose_lora_learning_rate(pretrained_model_dir: str | Path, tokenizer: PreTrainedTokenizerBase,
                              pairs: pd.DataFrame, users: pd.DataFrame, user_ids: Sequence[str], pretrained: str,
                              condition: str | Path, config: ft.FinetuneConfig, da_config: ft.FinetuneConfig,
                              learning_rates: Sequence[float], sweep_users: int = 0,
                              options: UserTrainingOptions | None = None, device: str | None = None
                              ) -> tuple[ft.FinetuneConfig, pd.DataFrame]:
    """The condition's domain adaptation (kept: `finetune_condition` resumes from it), then the LoRA learning
    rate swept on the first `sweep_users` users' dev loss (0: all of `user_ids`). Returns `config` with the
    chosen rate, for `finetune_condition(..., lora_config=...)`, and the sweep's per-user table."""
    finetune_condition(pretrained_model_dir, tokenizer, pairs, users, user_ids, pretrained, condition, config,
                       da_config, options, device=device, methods=())
    rate, table = sweep_lora_learning_rate(condition, tokenizer, pairs, users, sorted(user_ids)[:sweep_users or None],
                                           pretrained, config, learning_rates, options, device)
    return finetune_config(config, learning_rate=rate), table


def sweep_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per swept LoRA learning rate: mean initial and best dev loss, epochs run, share stopped early,
    and `users_lowest`, the users whose lowest best dev loss came with that rate (how decisive the choice was:
    a mean won by one user of two can flip with the last digits of the pre-trained weights)."""
    columns = ["initial_dev_loss", "best_dev_loss", "epochs_run", "stopped_early"]
    summary = table.groupby("learning_rate")[columns].mean().reset_index()
    winners = table.loc[table.groupby("user_id")["best_dev_loss"].idxmin(), "learning_rate"].value_counts()
    return summary.assign(users_lowest=summary["learning_rate"].map(winners).fillna(0).astype(int))


def _train_users(method: str, base_dir: Path, tokenizer: PreTrainedTokenizerBase, pairs: pd.DataFrame,
                 users: pd.DataFrame, user_ids: list[str], fmt: str, out_dir: Path, config: ft.FinetuneConfig,
                 options: UserTrainingOptions, after_user: UserPredictor | None, device: str) -> pd.DataFrame:
    if options.executor == "ray":
        from udg_lib.executors import train_users

        return train_users(method, base_dir, pairs, users, user_ids, fmt, out_dir, config, executor="ray",
                           ray_address=options.ray_address, users_per_task=options.users_per_task,
                           num_cpus_per_task=options.num_cpus_per_task, num_gpus_per_task=options.num_gpus_per_task,
                           device=device, save_full_models=options.save_full_models, after_user=after_user,
                           progress=options.progress, lora_training=options.lora_training,
                           users_per_batch=options.users_per_batch)
    from udg_lib.executors import clear_staging_leftovers

    clear_staging_leftovers(out_dir, user_ids)  # half-written user folders of a killed run
    base = build_model(base_dir, tokenizer).to(device)  # loaded once for all users of this condition
    if method == "lora":  # the frozen base is held in the precision's dtype (bf16 where native); adapters stay fp32
        base.to(dtype=resolve_precision(config.precision, device).frozen_dtype)
    if method == "lora" and options.lora_training == "batched":
        from udg_lib.multilora import run_users_batched

        return run_users_batched(base, tokenizer, pairs, users, user_ids, fmt, out_dir, config,
                                 users_per_batch=options.users_per_batch, progress=options.progress)
    return ft.run_users(method, base, tokenizer, pairs, users, user_ids, fmt, out_dir, config,
                        save_full_models=options.save_full_models, after_user=after_user,
                        progress=options.progress)


def artifact_sizes(condition: Path) -> dict[str, Any]:
    """Bytes on disk: the DA model (= one FULL or One-ID model), the mean LoRA adapter, and their counts."""
    def folder_bytes(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    def weights_bytes(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))

    adapters = [d / ft.ADAPTER_DIR for d in (condition / "lora").glob("*") if (d / ft.ADAPTER_DIR).is_dir()]
    return {
        "model_weights_bytes": weights_bytes(condition / "da" / MODEL_DIR),
        "model_folder_bytes": folder_bytes(condition / "da" / MODEL_DIR),
        "adapter_weights_bytes_mean": (sum(weights_bytes(a) for a in adapters) / len(adapters)) if adapters else None,
        "adapter_folder_bytes_mean": (sum(folder_bytes(a) for a in adapters) / len(adapters)) if adapters else None,
        "n_adapters": len(adapters),
    }


def finetune_config(base: ft.FinetuneConfig, **overrides: Any) -> ft.FinetuneConfig:
    """`base` with the given fields replaced (None values ignored), e.g. the DA config from the user config."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------------
# Exp1 (§4.2): next-utterance predictions of every system of one condition


def _prediction_settings(tokenizer: PreTrainedTokenizerBase, test: pd.DataFrame, users: pd.DataFrame, fmt: str,
                         settings: dict[str, Any] | None, one_ids: dict[str, str] | None = None) -> UserPredictor:
    return UserPredictor(tokenizer, test, users, fmt, None, one_ids=one_ids, **(settings or {}))


def adapter_names_for(user_ids: Sequence[str]) -> dict[str, str]:
    """Module-safe adapter names (`u0`, `u1`, ...) for user ids, in sorted id order."""
    return {user: f"u{k}" for k, user in enumerate(sorted(set(user_ids)))}


LORA_EVAL_MODES: tuple[str, ...] = ("routed", "peft")


def load_condition_lora(condition: Path, tokenizer: PreTrainedTokenizerBase, user_ids: Sequence[str],
                        device: str, lora_eval: str = "routed",
                        precision: str | Precision = "fp32") -> tuple[Any, dict[str, str]]:
    """The DA model with every user's adapter loaded (names from `adapter_names_for`), for
    `generation.greedy_generate` / `reference_nll` with `adapter_names`.

    `lora_eval` "routed": a `RoutedAdapters` (one routed pass per layer for all users of a batch);
    "peft": a `PeftModel` running peft's mixed-adapter batches (the reference; same replies, slower).
    The base is held in `precision`'s frozen dtype (`inference_model`); the adapters stay fp32.
    """

    if lora_eval not in LORA_EVAL_MODES:
        raise ValueError(f"lora_eval must be one of {LORA_EVAL_MODES}, not {lora_eval!r}")
    names = adapter_names_for(user_ids)
    base = inference_model(condition / "da" / MODEL_DIR, tokenizer, device, precision)
    dirs = {names[u]: ft.user_dir(condition / "lora", u) / ft.ADAPTER_DIR for u in sorted(names)}
    missing = [str(d) for d in dirs.values() if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"LoRA adapters missing (rerun notebook 03): {missing[:3]}")
    load = load_routed_adapters if lora_eval == "routed" else load_user_adapters
    return load(base, dirs), names


def generation_subset(pair_ids: Iterable[Any], cap: int, seed: int, key: str) -> list[Any]:
    """The pair ids whose replies are generated: at most `cap` of `pair_ids` (0, or a cap of at least their
    number: all), sorted. Scoring (reference likelihood, forward passes only) runs on every pair; greedy
    replies cost a forward pass per token, so they run on this subset.

    A pair is kept when its SHA-256 of (seed, key, pair id) is among the `cap` smallest: the choice depends on
    nothing but these (not their order, the process, or Python's hash seed), and a pair added later does not
    reshuffle the others. `key` names one user's test pairs (`subset_key`), so users draw independently and
    any stage selects the same pairs from the same arguments.
    """
    ids = sorted(set(pair_ids))
    if not cap or cap >= len(ids):
        return ids
    rank = {p: hashlib.sha256(f"{seed}\x1f{key}\x1f{p}".encode("utf-8")).hexdigest() for p in ids}
    return sorted(sorted(ids, key=rank.__getitem__)[:cap])


def subset_key(dataset: str, split_set: int, user_id: str) -> str:
    """`generation_subset`'s key for one user's test pairs of one dataset and split set."""
    return f"{dataset}/set{int(split_set)}/{user_id}"


def generated_pair_ids(pairs: pd.DataFrame, user_ids: Sequence[str], cap: int, seed: int, dataset: str,
                       split_set: int) -> set[Any]:
    """The test pairs of `user_ids` (one split set's `pairs`) whose replies are generated: each user's
    `generation_subset` of at most `cap` (0: all)."""
    test = sample_test_contexts(pairs, user_ids, 0)
    return {p for user, group in test.groupby("speaker_id", sort=True)
            for p in generation_subset(group["pair_id"], cap, seed, subset_key(dataset, split_set, user))}


def exp1_predictions(condition: str | Path, tokenizer: PreTrainedTokenizerBase, pairs: pd.DataFrame,
                     users: pd.DataFrame, user_ids: Sequence[str], pretrained: str,
                     settings: dict[str, Any] | None = None, device: str = "cpu",
                     methods: Sequence[str] = ("da", "one_id", "lora", "full"),
                     lora_eval: str = "routed", generate_ids: Collection[Any] | None = None) -> pd.DataFrame:
    """Reference NLLs on every `test` pair of `user_ids` and greedy replies on those in `generate_ids` (None:
    all; `generated_pair_ids`), for each method of a condition; a pair not generated has `generated` None.

    DA (the floor: domain-adapted on the users' pooled halves, no per-user training, no One-ID) and One-ID
    run their saved models, LoRA runs every user's adapter on the DA model (`lora_eval`: see
    `load_condition_lora`), FULL is read from the replies notebook 03 wrote while each FULL model was in
    memory. Columns: pair_id, speaker_id, generated, nll, n_tokens, text_nll, text_chars
    (`generation.ReferenceScores`), method.
    """

    condition = Path(condition)
    fmt = PRETRAINED_FORMATS[pretrained]
    precision = (settings or {}).get("precision", "fp32")
    test = sample_test_contexts(pairs, user_ids, 0)  # every test pair of these users: all are scored
    generate = None if generate_ids is None else test["pair_id"].isin(set(generate_ids)).tolist()
    frames = []
    if "da" in methods:
        model = inference_model(condition / "da" / MODEL_DIR, tokenizer, device, precision)
        frames.append(predict_pairs(model, test, _prediction_settings(tokenizer, test, users, fmt, settings),
                                    generate=generate).assign(method="da"))
    if "one_id" in methods:
        model = inference_model(condition / "one_id" / MODEL_DIR, tokenizer, device, precision)
        settings_one_id = _prediction_settings(tokenizer, test, users, fmt, settings, ft.one_ids_of(users))
        frames.append(predict_pairs(model, test, settings_one_id, generate=generate).assign(method="one_id"))
    if "lora" in methods:
        model, names = load_condition_lora(condition, tokenizer, user_ids, device, lora_eval, precision)
        frames.append(predict_pairs(model, test, _prediction_settings(tokenizer, test, users, fmt, settings),
                                    adapter_names=[names[u] for u in test["speaker_id"]], generate=generate)
                      .assign(method="lora"))
    if "full" in methods:
        full = []
        for user in sorted(set(user_ids)):
            path = ft.user_dir(condition / "full", user) / PREDICTIONS_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path}: FULL predictions missing (rerun notebook 03)")
            saved = pd.read_parquet(path)
            if "text_nll" not in saved.columns:
                raise ValueError(f"{path}: no text_nll column (written by an older notebook 03); rerun notebook 03")
            full.append(saved)
        full = pd.concat(full, ignore_index=True)
        if generate_ids is not None:  # stage 03 generated its own subset (or all); keep this one, as for the others
            wanted = set(generate_ids) & set(test["pair_id"])
            missing = sorted(wanted - set(full.loc[full["generated"].notna(), "pair_id"]))
            if missing:
                raise ValueError(f"{condition / 'full'}: no FULL reply for test pairs {missing[:3]}: notebook 03 "
                                 "generated fewer (its max_generated_per_user must be 0 or at least this stage's, "
                                 "with the same generation_seed)")
            full["generated"] = full["generated"].where(full["pair_id"].isin(wanted), None)
        frames.append(full.assign(method="full"))
    return pd.concat(frames, ignore_index=True)


def join_context(context: Sequence[str]) -> str:
    """A context as one string for retrieval embeddings (turns in order, newest last)."""
    return " \n ".join(context)


def retrieval_predictions(embedder: Any, pairs: pd.DataFrame, user_ids: Sequence[str],
                          generate_ids: Collection[Any] | None = None) -> pd.DataFrame:
    """The retrieval floor: each test context in `generate_ids` (None: all) answered with the user's own
    training response (train_da and train_ft) whose context is most similar (`metrics.retrieve_responses`).
    It has no likelihood, so the pairs it does not answer have nothing to score and get no row."""
    from udg_lib.metrics import retrieve_responses

    ids = set(user_ids)
    train = pairs[pairs["split"].isin(["train_da", "train_ft"]) & pairs["speaker_id"].isin(ids)]
    test = sample_test_contexts(pairs, user_ids, 0)
    if generate_ids is not None:
        test = test[test["pair_id"].isin(set(generate_ids))]
    generated = retrieve_responses(embedder, [join_context(c) for c in train["context"]], train["response"].tolist(),
                                   train["speaker_id"].tolist(), [join_context(c) for c in test["context"]],
                                   test["speaker_id"].tolist())
    return pd.DataFrame({"pair_id": test["pair_id"], "speaker_id": test["speaker_id"], "generated": generated,
                         "nll": float("nan"), "n_tokens": float("nan"), "method": "retrieval"})


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
    from udg_lib.metrics import cosine_similarities, reference_chars, rouge_l

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


def exp1_comparisons(pretrained: Sequence[str]) -> list[tuple[dict, dict]]:
    """The paired tests of Exp1: LoRA vs One-ID and FULL vs LoRA per pre-trained model; PSP and PPP vs Plain
    Dialogue per method; each fine-tuned system vs its DA floor and vs the retrieval floor."""
    comparisons: list[tuple[dict, dict]] = []
    for name in pretrained:
        comparisons += [({"pretrain": name, "method": "lora"}, {"pretrain": name, "method": "one_id"}),
                        ({"pretrain": name, "method": "full"}, {"pretrain": name, "method": "lora"})]
    for profiled in ("psp", "ppp"):
        if profiled in pretrained and "plain_dialogue" in pretrained:
            comparisons += [({"pretrain": profiled, "method": m}, {"pretrain": "plain_dialogue", "method": m})
                            for m in ("one_id", "lora", "full")]
    for name in pretrained:
        for method in ("one_id", "lora", "full"):
            comparisons += [({"pretrain": name, "method": method}, {"pretrain": name, "method": "da"}),
                            ({"pretrain": name, "method": method}, {"pretrain": "none", "method": "retrieval"})]
    return comparisons


def leakage_table(scores: pd.DataFrame, pairs_by_dataset: dict[str, pd.DataFrame], embedder: Any,
                  methods: Sequence[str] = ("da", "one_id", "lora", "full")) -> pd.DataFrame:
    """Per sample: is the generated reply closer to another evaluation user's training responses than to the
    user's own, and is it a near copy (>= 0.9) of another user's? (`metrics.leakage_scores`; §4.1.3 and
    §4.3.4 name the risk for One-ID but do not measure it.) DA-pooled (no per-user training, no id) gives the
    level without per-user training. Only rows with a generated reply (`generated_rows`)."""
    from udg_lib.metrics import leakage_scores

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


# ---------------------------------------------------------------------------------------------------------------
# Exp2 (§4.3): every user's model answers the personal questions


def exp2_replies(condition: str | Path, tokenizer: PreTrainedTokenizerBase, questions: pd.DataFrame,
                 users: pd.DataFrame, user_ids: Sequence[str], pretrained: str, settings: dict[str, Any] | None = None,
                 device: str = "cpu", methods: Sequence[str] = ("one_id", "lora", "full"),
                 lora_eval: str = "routed") -> pd.DataFrame:
    """Greedy answers (§4.3.2) of each user's One-ID, LoRA and FULL model to every question.

    Columns: user_id, question_id, reply, method. LoRA users share batches (`lora_eval`: see
    `load_condition_lora`); FULL answers come from notebook 03's files."""
    condition = Path(condition)
    fmt = PRETRAINED_FORMATS[pretrained]
    options = {k: v for k, v in (settings or {}).items()
               if k in ("max_new_tokens", "batch_size", "max_source_length", "precision")}
    precision = options.get("precision", "fp32")
    asked = pd.concat([question_pairs(questions, u) for u in sorted(set(user_ids))], ignore_index=True)
    frames = []
    if "one_id" in methods:
        model = inference_model(condition / "one_id" / MODEL_DIR, tokenizer, device, precision)
        sources = build_prompts(asked, users, fmt, ft.one_ids_of(users)).tolist()
        frames.append(asked.assign(reply=greedy_generate(model, tokenizer, sources, one_id_prefix=True, **options),
                                   method="one_id"))
    if "lora" in methods:
        model, names = load_condition_lora(condition, tokenizer, user_ids, device, lora_eval, precision)
        sources = build_prompts(asked, users, fmt).tolist()
        replies = greedy_generate(model, tokenizer, sources, adapter_names=[names[u] for u in asked["speaker_id"]],
                                  **options)
        frames.append(asked.assign(reply=replies, method="lora"))
    if "full" in methods:
        for user in sorted(set(user_ids)):
            path = ft.user_dir(condition / "full", user) / EXP2_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path}: FULL Exp2 replies missing (rerun notebook 03)")
            frames.append(pd.read_parquet(path).assign(speaker_id=user, method="full")
                          .rename(columns={"question_id": "pair_id"}))
    replies = pd.concat(frames, ignore_index=True)
    return replies.rename(columns={"speaker_id": "user_id", "pair_id": "question_id"})[
        ["user_id", "question_id", "reply", "method"]]


# ---------------------------------------------------------------------------------------------------------------
# Table 6: models, size on disk, response time


def response_times(condition: str | Path, tokenizer: PreTrainedTokenizerBase, pairs: pd.DataFrame,
                   users: pd.DataFrame, user_ids: Sequence[str], pretrained: str, n_users: int = 5,
                   device: str = "cpu", max_new_tokens: int = 48,
                   precision: str | Precision = "fp32") -> pd.DataFrame:
    """Table 6's "response time": load the user's model, then generate one reply, per method; cold (the model
    read from disk) and warm (already in memory), averaged over `n_users` users' first test contexts.

    One-ID: one model for everyone (cold: read it; warm: generate). LoRA: the DA base stays in memory
    (cold: read the user's adapter onto it; warm: the adapter already loaded, switch to it). FULL: a whole
    model per user (cold: read it; warm: generate). FULL models are kept on disk only with save_full_models;
    otherwise the DA model folder stands in for them (same architecture and file size, so the same read time).
    """
    import time

    from peft import PeftModel

    condition = Path(condition)
    fmt = PRETRAINED_FORMATS[pretrained]
    one_ids = ft.one_ids_of(users)
    chosen = sorted(set(user_ids))[:n_users]
    test = pairs[pairs["split"] == "test"]
    firsts = test[test["speaker_id"].isin(chosen)].sort_values("pair_id").drop_duplicates("speaker_id")

    def reply(model: torch.nn.Module, row: pd.DataFrame, with_id: bool) -> None:
        source = build_prompts(row, users, fmt, one_ids if with_id else None).tolist()
        greedy_generate(model, tokenizer, source, max_new_tokens=max_new_tokens, one_id_prefix=with_id,
                        precision=precision)

    def timed(action) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        action()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def load(folder: Path) -> torch.nn.Module:  # as stage 04 evaluates: held in the precision's dtype
        return resolve_precision(precision, device).for_inference(load_model(folder).to(device))

    rows = []
    warm_one_id = load(condition / "one_id" / MODEL_DIR)
    base = load(condition / "da" / MODEL_DIR)
    peft_model: PeftModel | None = None
    for k, row in enumerate(firsts.itertuples(index=False)):
        frame = pd.DataFrame([row._asdict()])
        user = row.speaker_id
        rows.append({"method": "one_id", "mode": "cold",
                     "seconds": timed(lambda: reply(load(condition / "one_id" / MODEL_DIR), frame, True))})
        rows.append({"method": "one_id", "mode": "warm", "seconds": timed(lambda: reply(warm_one_id, frame, True))})
        adapter = ft.user_dir(condition / "lora", user) / ft.ADAPTER_DIR
        name = f"u{k}"

        def load_adapter() -> None:
            nonlocal peft_model
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(base, str(adapter), adapter_name=name)
            else:
                peft_model.load_adapter(str(adapter), adapter_name=name)
            peft_model.set_adapter(name)
            peft_model.eval()
            reply(peft_model, frame, False)

        rows.append({"method": "lora", "mode": "cold", "seconds": timed(load_adapter)})
        rows.append({"method": "lora", "mode": "warm",
                     "seconds": timed(lambda: (peft_model.set_adapter(name), reply(peft_model, frame, False)))})
        saved = ft.user_dir(condition / "full", user) / ft.MODEL_DIR
        folder = saved if saved.is_dir() else condition / "da" / MODEL_DIR
        full_model = None

        def load_full() -> None:
            nonlocal full_model
            full_model = load(folder)
            reply(full_model, frame, False)

        rows.append({"method": "full", "mode": "cold", "seconds": timed(load_full)})
        rows.append({"method": "full", "mode": "warm", "seconds": timed(lambda: reply(full_model, frame, False))})
    return pd.DataFrame(rows)


def table6(times: pd.DataFrame, sizes: dict[str, Any], n_users: int) -> pd.DataFrame:
    """Table 6 analog: number of models, size on disk per model, mean response time cold and warm."""
    mean = times.groupby(["method", "mode"])["seconds"].mean().unstack()
    model_mb = sizes["model_weights_bytes"] / 1e6
    adapter_mb = (sizes["adapter_weights_bytes_mean"] or float("nan")) / 1e6
    spec = {"one_id": (1, model_mb), "lora": (n_users, adapter_mb), "full": (n_users, model_mb)}
    return pd.DataFrame([{"model": METHOD_LABELS[m], "models": spec[m][0], "size_MB": spec[m][1],
                          "response_s_cold": mean.loc[m, "cold"], "response_s_warm": mean.loc[m, "warm"]}
                         for m in ("one_id", "lora", "full") if m in mean.index])


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
        method = method.removesuffix(PAPER_HISTORY_SUFFIX)  # the 10-turn extra row: the same model and tokenizer
        base = method.rsplit("-", 1)[0] if method.endswith(("-chat", "-completion", "-endpoint")) else method
        return LLM_DISPLAY_NAMES.get(base, base)
    return ""


def exp1_table(per_user: pd.DataFrame, metrics: Sequence[str] = EXP1_METRICS,
               method_labels: Mapping[str, str] | None = None, health: pd.DataFrame | None = None) -> pd.DataFrame:
    """One dataset's Exp1 table: rows grouped by pre-trained model (paper order), then the floors and the
    prompt LLMs; mean over users and split sets (`metrics.results_table`). `method_labels` names methods
    METHOD_LABELS does not know (the LLMs).

    With perplexity among `metrics`, a `tokenizer` column (`row_tokenizer`) follows the metrics, so that
    `metrics.bold_best` compares perplexity only among rows of one tokenizer. With `health`
    (`generation_health_table`), a degenerate system's "fine-tuning" label ends with "⚠ degenerate 63%":
    a table for display; write CSVs without `health`, so labels stay stable row keys across runs.
    """
    from udg_lib.metrics import TOKENIZER_COLUMN, results_table

    table = results_table(per_user, metrics)
    pretrain_order = [*PRETRAINED_FORMATS, "none", "llm"]
    method_order = ["da", "one_id", "lora", "full", "retrieval"]
    table["_p"] = table["pretrain"].map(lambda p: pretrain_order.index(p) if p in pretrain_order else 99)
    table["_m"] = table["method"].map(lambda m: method_order.index(m) if m in method_order else 99)
    table = table.sort_values(["_p", "_m", "method"], kind="stable").drop(columns=["_p", "_m"])
    table.insert(0, "model", [PRETRAINED_LABELS.get(p, "Floor" if p == "none" else "Prompt LLM") for p in table["pretrain"]])
    labels = {**METHOD_LABELS, **(method_labels or {})}
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
    from udg_lib.metrics import generation_health

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
    from udg_lib.metrics import DEGENERATE_THRESHOLD

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


def significance_notes(significance: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """One line per test: "a vs b: mean diff, p (test, n users)", significant ones marked."""
    lines = []
    for row in significance.itertuples(index=False):
        mark = " *" if row.p_value < alpha else ""
        lines.append(f"- {_selector_label(row.label_a)} vs {_selector_label(row.label_b)} ({row.metric}): "
                     f"diff {row.mean_diff:+.4f}, p = {row.p_value:.3g}{mark} ({row.method}, n = {row.n})")
    return lines


def _selector_label(label: str) -> str:
    pretrain, _, method = label.partition("/")
    return system_label(pretrain, method)


def per_user_over_sets(per_user: pd.DataFrame, metric_cols: Sequence[str]) -> pd.DataFrame:
    """Per-user values averaged over split sets: the unit of the significance tests (a user appears in every
    split set, so the sets are not independent samples)."""
    keys = ["dataset", "user_id", "pretrain", "method"]
    return per_user.groupby(keys, sort=False)[list(metric_cols)].mean().reset_index()


# ---------------------------------------------------------------------------------------------------------------
# Prompt-based LLM baselines (§4.2.2): naming and context sampling


LLM_DISPLAY_NAMES: dict[str, str] = {"smollm2": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma-3-270M"}


def llm_short_name(name_or_path: str) -> str:
    """A method name for an LLM: the packaged short name, or the last path / id component, lower-cased."""
    return Path(name_or_path.rstrip("/")).name.lower() or "llm"


def llm_display_name(name_or_path: str) -> str:
    return LLM_DISPLAY_NAMES.get(name_or_path, Path(name_or_path.rstrip("/")).name)


def local_llm(name_or_path: str, device: str = "cpu", precision: str | Precision = "fp32") -> Any:
    """A `baselines.LocalLLM` on `device`, its weights held in `precision`'s frozen dtype (it only generates
    and scores)."""
    from udg_lib.baselines import LocalLLM

    generator = LocalLLM(name_or_path)
    resolve_precision(precision, device).for_inference(generator.model.to(device))
    return generator


def sample_test_contexts(pairs: pd.DataFrame, user_ids: Sequence[str], per_user: int, seed: int = 0) -> pd.DataFrame:
    """The `test` pairs of `user_ids` (one split set), or a seeded sample of `per_user` of each user's (0: all),
    sorted by user and pair id."""
    test = pairs[(pairs["split"] == "test") & pairs["speaker_id"].isin(set(user_ids))]
    if per_user:
        test = test.sort_values(["speaker_id", "pair_id"])
        keep = [i for _, g in test.groupby("speaker_id") for i in g.sample(min(per_user, len(g)), random_state=seed).index]
        test = test.loc[keep]
    return test.sort_values(["speaker_id", "pair_id"]).reset_index(drop=True)
