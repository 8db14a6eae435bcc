"""Cost planner: how many trainings a profile runs and what they cost on this device, before anything long runs.

    python -m udg_lib.plan --profile full-en                 # counts, timings, estimate; the paper's counts too
    python -m udg_lib.plan --profile cpu --steps 3 --json plan.json
    python -m udg_lib.plan --power results/cpu               # a finished run's power per comparison (udg_lib.power)

Counts come from the profile's parameters (params/<profile>/*.yaml over each notebook's parameters cell,
resolved by `stage_params.load_stage`, as a run would see them): users x split sets x pre-trained models x
methods, where domain adaptation (DA) and One-ID train once per (dataset, split set, pre-trained model) and
LoRA and FULL once per user (§4.1.3, notebook 03), plus stage 02's pre-training steps. Users and their pairs
come from stage 00's outputs under outputs/<profile>/ when they exist; otherwise each corpus of stage 00 is
loaded and stage 00's eligibility rules (`splits.eligibility`) are applied to it, and pairs per user are
estimated from the users' turns (see `estimate_pairs`). The plan says which source it used.

Costs: a few steps of each kind are timed on the current device (`--device`, default cuda when torch sees one),
on a model of the profile's shape with random weights built from its config (nothing is downloaded), through
the project's code paths: `families.ModelFamily` (`from_config`, `tokenize_pairs`, `collator`, `lora_config`),
peft's `get_peft_model`, `multilora.MultiLora` for batched LoRA, and `model.generate` as
`generation.greedy_generate` calls it. Batches are synthetic token sequences of the profile's batch sizes, at
the padded lengths stage 03's own batches have when stage 00's outputs exist (`data_lengths`; pre-training at
its caps), else at max_source_length / max_target_length. On a CPU a batch is capped at `max_rows` rows and its
time scaled linearly to the full batch (a CPU's time per row is close to constant; a GPU's is not, so there
the full batch is timed). Every estimate is an upper bound in three ways, each stated in the output: users
train for the whole epoch cap (early stopping usually ends them sooner; `--epochs` assumes fewer), replies are
generated to `max_new_tokens` (random weights are forced to full length), and a dev-loss pass is charged one
third of a training step per example (forward only).

The paper's 9,324 models (§4.2.2) and the compass goal of this project (9,324 user models in at most 10
GPU-hours on one H100-class GPU) are planned with the same timings: see `paper_counts`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from udg_lib import paths
from udg_lib.methods import PAPER_METHODS, Method, build_methods
from udg_lib.param_profiles import known_profiles
from udg_lib.stage_params import load_stage, read_run_settings, stage_notebooks
from udg_lib.catalog import stage
from udg_lib.conditions import PRETRAINED_FORMATS
from udg_lib.data import load_from_spec
from udg_lib.families import LLAMA_PRESETS, SMOLLM2_VOCAB, T5_PRESETS, get_family, llama_config, t5_config
from udg_lib.finetuning import FinetuneConfig, LengthBucketSampler, SELF_ATTENTION_QKVO
from udg_lib.io import write_json
from udg_lib.multilora import MultiLora
from udg_lib.power import format_power, power_table, read_run
from udg_lib.prompts import SEP, USER, USER1
from udg_lib.provenance import provenance
from udg_lib.splits import SplitConfig, eligibility
from udg_lib.tokenizer import load_tokenizer
from udg_lib.precision import PRECISIONS, cpu_flags_line, resolve_precision

# ---------------------------------------------------------------------------------------------------------------
# The paper's counts (§4.2.1 Table 2, §4.2.2)

# §4.2.2: per pre-trained model, One-ID trains one model per dataset and LoRA and FULL one per user: PCJP's
# 100 users give 1 + 100 + 100 = 201 models, x 4 pre-trained models = 804, x 3 split sets = 2,412; UPC (140
# users) 281 x 12 = 3,372; SD (147 users) 295 x 12 = 3,540. In all 2,412 + 3,372 + 3,540 = 9,324 models:
# 36 One-ID and 2 x 4,644 per-user models. (Domain adaptation, one model per dataset, split set and pre-trained
# model, precedes them; the paper does not count it among the 9,324.)
PAPER_USERS: dict[str, int] = {"SD": 147, "UPC": 140, "PCJP": 100}
PAPER_TRAIN_PAIRS_PER_USER: dict[str, int] = {"SD": 1650, "UPC": 168, "PCJP": 1548}  # Table 2 "N.train / user"
PAPER_SPLIT_SETS = 3  # §4.2.1
PAPER_PRETRAINED = 4  # §4.1.2: Plain T5, Plain Dialogue, PSP, PPP
PAPER_MODELS = 9324  # §4.2.2
GOAL_GPU_HOURS = 10.0  # the compass goal: the paper's 9,324 user models on one H100-class GPU
QUESTIONS = 70  # Exp2's personal questions (udg_lib/data/resources), answered by every system per user
DEV_FORWARD_SHARE = 1 / 3  # a dev-loss example costs a forward pass: ~1/3 of a training step (fwd + bwd)
# On a CPU a batch whose step would take over CPU_FULL_BATCH_SECONDS (judged from a step of CPU_MAX_ROWS rows) is
# timed at CPU_MAX_ROWS rows and scaled linearly: close for t5-base, whose time per row is about constant, and
# an overestimate for small models, whose steps are mostly fixed overhead, hence their whole batch is timed.
CPU_MAX_ROWS = 2  # 2 rows: a t5-base step is still ~1 s of matmuls per row, enough to time
CPU_FULL_BATCH_SECONDS = 10.0
# Untimed calls before a CPU timing: the first two bf16 steps of a shape build oneDNN kernels and Adam's state
# (SmolLM2-135M FULL, 4 x 69 tokens, AMD EPYC AVX512-BF16: 5.4 s, 3.2 s, then 1.65 s a step; one warm-up
# call left the 3.2 s step in the plan, which put stage 03 at twice its measured time).
CPU_WARMUP_CALLS = 2

STEP_KINDS = ("pretrain", "full", "lora", "lora_batched", "generate")


class PlanError(RuntimeError):
    """A plan could not be made; the message is one line for the user."""


# ---------------------------------------------------------------------------------------------------------------
# Parameters


def training_seeds(profile: str, params_dir: str | Path | None = None) -> int:
    """The profile's `seeds` (its runner settings, `param_profiles.RUN_SETTINGS_FILE`; 1 without one)."""
    params_root = Path(params_dir) if params_dir else paths.repo_root() / "params" / profile
    return read_run_settings(params_root).seeds if params_root.is_dir() else 1


def profile_params(profile: str, params_dir: str | Path | None = None,
                   notebooks_dir: str | Path | None = None) -> tuple[dict[str, dict[str, Any]], str]:
    """(stage name -> resolved params, where they came from), as `stage_params.load_stage` resolves them.

    A profile without a params folder gets the notebooks' defaults (said in the second value): the planner
    only reads, so a default plan is still informative where a run would refuse to start.
    """
    root = paths.repo_root()
    params_root = Path(params_dir) if params_dir else root / "params" / profile
    notebooks = stage_notebooks(Path(notebooks_dir) if notebooks_dir else root / "notebooks")
    source = str(params_root) if params_root.is_dir() else f"notebook defaults (no folder {params_root})"
    return {nb.stem: load_stage(nb, params_root, profile).params for nb in notebooks}, source


def _stage(params: Mapping[str, dict[str, Any]], key: str) -> dict[str, Any]:
    name = stage(key).name
    if name not in params:
        raise PlanError(f"no stage {name} among the notebooks ({', '.join(params)})")
    return params[name]


# ---------------------------------------------------------------------------------------------------------------
# Users and pairs


@dataclass(frozen=True)
class DatasetUsers:
    """One dataset's evaluation users and their mean pairs per split (one split set)."""

    name: str
    users: int  # per split set (the mean over sets, rounded)
    train_ft: float  # mean pairs per user: the user's own fine-tuning half
    train_da: float  # ... the half pooled for domain adaptation
    dev: float
    test: float
    source: str  # "stage 00 outputs", "estimated from the corpus ...", or why neither was possible


def users_from_outputs(prepared: Path, max_users: int = 0) -> list[DatasetUsers]:
    """Users per split set and pairs per user from stage 00's `eval_pairs.parquet` files."""
    found = []
    for pairs_file in sorted(prepared.glob("*/eval_pairs.parquet")):
        pairs = pd.read_parquet(pairs_file, columns=["split_set", "split", "speaker_id"])
        if pairs.empty:
            continue
        per_set = pairs.groupby("split_set")["speaker_id"].nunique()
        users = round(float(per_set.mean()))
        per_user = pairs.groupby(["split_set", "speaker_id", "split"]).size().unstack(fill_value=0).mean()
        found.append(DatasetUsers(pairs_file.parent.name, min(users, max_users) if max_users else users,
                                  *(float(per_user.get(s, 0.0)) for s in ("train_ft", "train_da", "dev", "test")),
                                  source="stage 00 outputs"))
    return found


def estimate_pairs(turns_per_user: float, heldout_fraction: float, cap: int,
                   test_cap: int | None = None) -> dict[str, float]:
    """Pairs per split for a user of `turns_per_user` turns, before stage 00 has run.

    Every turn but a dialogue's first is a reply pair (~1 per turn); a `heldout_fraction` of the user's
    partners goes to dev and test (half each), and the rest is halved into train_da and train_ft (§4.1.3,
    §4.2.1); `cap` (max_pairs_per_split, 0 for none) caps each split, `test_cap` (max_test_pairs: None
    follows `cap`, 0 for none) the test split.
    """
    caps = {"train_ft": cap, "train_da": cap, "dev": cap, "test": cap if test_cap is None else test_cap}
    shares = {"train_ft": (1 - heldout_fraction) / 2, "train_da": (1 - heldout_fraction) / 2,
              "dev": heldout_fraction / 2, "test": heldout_fraction / 2}
    return {split: min(turns_per_user * share, caps[split]) if caps[split] else turns_per_user * share
            for split, share in shares.items()}


def _test_cap(value: int) -> int | None:
    """Notebook 00's `max_test_pairs` as `SplitConfig` takes it: -1 (follow max_pairs_per_split) is None."""
    return None if value is None or int(value) < 0 else int(value)


def users_from_corpora(stage00: Mapping[str, Any], max_users: int = 0) -> list[DatasetUsers]:
    """Stage 00's eligibility rules applied to each of its corpora, loaded here (Chit-Chat: ~5 s)."""

    base = dict(min_turns=stage00["min_turns"], max_turns=stage00["max_turns"],
                max_users=stage00["max_users"] or None, heldout_partner_fraction=stage00["heldout_partner_fraction"],
                n_sets=stage00["n_sets"], context_turns=stage00["context_turns"], seed=stage00["seed"],
                max_pairs_per_split=stage00["max_pairs_per_split"] or None,
                max_test_pairs=_test_cap(stage00.get("max_test_pairs", -1)))
    found = []
    for spec in stage00["corpora"]:
        spec = dict(spec)
        config = SplitConfig(**{**base, **spec.pop("split", {})})
        name = spec.get("name", spec.get("format", "?"))
        try:
            corpus = load_from_spec(spec)
        except Exception as exc:  # a licensed corpus absent here: planned with the paper's mean users instead
            mean = round(sum(PAPER_USERS.values()) / len(PAPER_USERS))
            pairs = estimate_pairs(sum(PAPER_TRAIN_PAIRS_PER_USER.values()) / len(PAPER_USERS) / (1 - 0.3),
                                   config.heldout_partner_fraction, config.max_pairs_per_split or 0,
                                   config.max_test_pairs)
            found.append(DatasetUsers(name, min(mean, max_users) if max_users else mean, **pairs,
                                      source=f"assumed: the paper's mean of {mean} users (corpus not loadable: "
                                             f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]})"))
            continue
        users, counts = eligibility(corpus.turns, config)
        turns = corpus.turns.groupby("speaker_id").size()
        mean_turns = float(turns[users].mean()) if users else 0.0
        n = min(len(users), max_users) if max_users else len(users)
        found.append(DatasetUsers(corpus.name, n,
                                  **estimate_pairs(mean_turns, config.heldout_partner_fraction,
                                                   config.max_pairs_per_split or 0, config.max_test_pairs),
                                  source=f"estimated from the corpus: {counts['eligible']} of {counts['speakers']} "
                                         f"speakers eligible ({config.min_turns}-{config.max_turns or 'any'} turns, "
                                         f"3+ partners), {mean_turns:.0f} turns each"))
    return found


def dataset_users(params: Mapping[str, dict[str, Any]], outputs_root: Path) -> list[DatasetUsers]:
    """Stage 03's datasets: from stage 00's outputs when present, else estimated from the corpora."""
    stage03 = _stage(params, "03")
    prepared = paths.stage_dir(outputs_root, stage("00").name)
    found = users_from_outputs(prepared, stage03["max_users"]) if prepared.is_dir() else []
    if not found:
        found = users_from_corpora(_stage(params, "00"), stage03["max_users"])
    wanted = stage03["datasets"]
    return [d for d in found if not wanted or d.name in wanted]


# ---------------------------------------------------------------------------------------------------------------
# Model shape


@dataclass(frozen=True)
class ModelShape:
    """What the profile trains: a family and a preset size of `families.t5_config` / `families.llama_config`."""

    family: str  # "seq2seq" or "causal"
    preset: str
    vocab_size: int
    why: str  # how it was read from the params

    def model_config(self) -> Any:

        if self.family == "causal":
            return llama_config(self.preset, self.vocab_size)
        return t5_config(self.preset, self.vocab_size)


def profile_shape(params: Mapping[str, dict[str, Any]], family: str | None = None) -> ModelShape:
    """The model shape stage 02 trains: a checkpoint's (taken as t5-base's, as every §4.1.2 T5 checkpoint is;
    nothing is downloaded to read it) or its from-scratch preset; `family` (default: stage 02's `model_family`
    parameter) "causal" is the causal track, sized as SmolLM2-135M unless its preset is another Llama shape."""

    stage00, stage02 = _stage(params, "00"), _stage(params, "02")
    family = family or stage02.get("model_family") or "seq2seq"
    if family == "causal":  # a causal checkpoint is taken as SmolLM2-135M's shape (the packaged and hub bases)
        preset = ("smollm2-135m" if stage02["checkpoint"] or stage02["model_preset"] not in LLAMA_PRESETS
                  else stage02["model_preset"])
        vocab = SMOLLM2_VOCAB if preset == "smollm2-135m" else stage00["vocab_size"] + 102
        return ModelShape("causal", preset, vocab, f"causal track, {preset} shape")
    if family != "seq2seq":
        raise PlanError(f"unknown model family {family!r}; expected 'seq2seq' or 'causal'")
    if stage02["checkpoint"]:
        return ModelShape("seq2seq", "t5-base", 32128, f"checkpoint {stage02['checkpoint']} (t5-base shape)")
    preset = stage02["model_preset"]
    if preset not in T5_PRESETS:
        raise PlanError(f"stage 02 model_preset {preset!r} is not one of {tuple(T5_PRESETS)}")
    tokenizer = stage00["tokenizer_name_or_path"]
    # a trained SentencePiece vocabulary + 100 sentinels + the prompt markers; a hub tokenizer: T5's 32,128 rows
    vocab = 32128 if tokenizer else stage00["vocab_size"] + 102
    return ModelShape("seq2seq", preset, vocab, f"from-scratch preset {preset!r}")


# ---------------------------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class StepTiming:
    """Seconds of one unit of work (a step or a generation batch of `rows` rows) on this device."""

    kind: str
    rows: int  # rows of the unit planned (the profile's batch)
    timed_rows: int  # rows actually timed (fewer on a CPU; scaled linearly)
    seconds: float | None  # per unit, scaled to `rows`; None when the kind could not run
    samples: list[float] = field(default_factory=list)  # measured seconds of each timed repetition
    note: str = ""


def synthetic_tokenizer(words: int = 500) -> Any:
    """A whitespace word-level tokenizer built in memory (pad 0, eos 1, the prompt markers, w0..wN):
    enough for `tokenize_pairs` to make batches of exact lengths, with no file or download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast


    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, SEP: 3, USER: 4, USER1: 5}
    vocab.update({f"w{i}": len(vocab) + i for i in range(words)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def synthetic_batch(family: Any, tokenizer: Any, rows: int, source_length: int, target_length: int,
                    device: str) -> dict[str, torch.Tensor]:
    """A training batch of `rows` prompts of `source_length` tokens and replies of `target_length`, made by the
    family's own `tokenize_pairs` and `collator` from word sequences longer than both (so both are cut to
    exactly the lengths the profile allows)."""

    words = [f"w{i % 500}" for i in range(2 * source_length)]
    turns = [" ".join(words[i:i + 8]) for i in range(0, len(words), 8)]
    source = f" {SEP} ".join(turns)
    target = " ".join(words[: 2 * target_length])
    examples = family.tokenize_pairs([source] * rows, [target] * rows, tokenizer, source_length, target_length)
    batch = family.collator(tokenizer)([examples[i] for i in range(len(examples))])
    return {k: v.to(device) for k, v in batch.items()}


@dataclass(frozen=True)
class DataLengths:
    """Tokens of stage 03's training batches as its data makes them: the mean over batches of the longest prompt
    and the longest reply in a batch (what a padded batch costs)."""

    source: int
    target: int
    batches: int
    why: str


def data_lengths(prepared: Path, family_name: str, pretrained: Sequence[str], batch: int, source_cap: int,
                 target_cap: int, datasets: Sequence[str] = ()) -> DataLengths | None:
    """Stage 03's padded batch lengths from stage 00's outputs (`prompts.parquet`, `tokenizer/`): each
    evaluation user's `train_ft` pairs in the prompt format of each pre-trained model in `pretrained`, tokenized
    by the family as stage 03 tokenizes them (cut to the caps) and batched by `finetuning.LengthBucketSampler`
    (seed 0) in batches of `batch`. None when stage 00 has not run (the plan then times the caps)."""

    files = [f for f in sorted(prepared.glob("*/prompts.parquet")) if not datasets or f.parent.name in datasets]
    if not (prepared / "tokenizer").is_dir() or not files:
        return None
    tokenizer = load_tokenizer(prepared / "tokenizer").tokenizer
    family = get_family(family_name)
    formats = sorted({PRETRAINED_FORMATS[name] for name in pretrained if name in PRETRAINED_FORMATS}) or ["psp"]
    sources, targets = [], []
    for file in files:
        prompts = pd.read_parquet(file)
        prompts = prompts[prompts["split"] == "train_ft"]
        for fmt in formats:
            for _, rows in prompts.groupby(["split_set", "speaker_id"], sort=True):
                examples = family.tokenize_pairs(rows[fmt].tolist(), rows["response"].tolist(), tokenizer,
                                                 source_cap, target_cap)
                items = [examples[i] for i in range(len(examples))]
                if family_name == "causal":  # one sequence: the prompt is where the labels are masked
                    src = [sum(label == -100 for label in item["labels"]) for item in items]
                    tgt = [len(item["labels"]) - s for item, s in zip(items, src)]
                else:
                    src = [len(item["input_ids"]) for item in items]
                    tgt = [len(item["labels"]) for item in items]
                order = list(LengthBucketSampler([s + t for s, t in zip(src, tgt)], batch,
                                                 torch.Generator().manual_seed(0)))
                for start in range(0, len(order), batch):
                    chunk = order[start:start + batch]
                    sources.append(max(src[i] for i in chunk))
                    targets.append(max(tgt[i] for i in chunk))
    if not sources:
        return None
    source, target = math.ceil(statistics.mean(sources)), math.ceil(statistics.mean(targets))
    return DataLengths(source, target, len(sources),
                       f"stage 03's batches timed at {source} prompt + {target} reply tokens, the mean padded "
                       f"lengths of its {len(sources)} training batches ({', '.join(formats)} prompts of stage 00's "
                       f"users; caps {source_cap} + {target_cap})")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(run: Callable[[], Any], repetitions: int, device: str, warmup: int | None = None) -> list[float]:
    """Seconds of `repetitions` calls after `warmup` untimed calls (default `CPU_WARMUP_CALLS` on a CPU, one on a
    GPU)."""
    for _ in range(CPU_WARMUP_CALLS if warmup is None and device == "cpu" else warmup or 1):
        run()
    samples = []
    for _ in range(repetitions):
        _sync(device)
        started = time.perf_counter()
        run()
        _sync(device)
        samples.append(time.perf_counter() - started)
    return samples


def _train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, autocast: Any,
                loss_of: Callable[[], torch.Tensor] | None = None) -> Callable[[], None]:
    """One step of `finetuning.train_with_early_stopping`: forward, backward, Adam."""
    def step() -> None:
        with autocast():
            loss = loss_of() if loss_of else model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


@dataclass(frozen=True)
class TimingSpec:
    """The batches a profile's stages run, read from its params."""

    pretrain_batch: int
    pretrain_source: int
    pretrain_target: int
    user_batch: int  # stage 03 batch_size: LoRA and FULL
    users_per_batch: int  # batched LoRA
    source: int  # stage 03 max_source_length
    target: int  # stage 03 max_target_length
    generate_batch: int  # stage 04 batch_size
    max_new_tokens: int
    lora: dict[str, Any]  # r, alpha, dropout, targets

    @classmethod
    def from_params(cls, params: Mapping[str, dict[str, Any]]) -> TimingSpec:
        s02, s03, s04 = _stage(params, "02"), _stage(params, "03"), _stage(params, "04")
        return cls(s02["batch_size"], s02["max_source_length"], s02["max_target_length"], s03["batch_size"],
                   s03["users_per_batch"], s03["max_source_length"], s03["max_target_length"], s04["batch_size"],
                   s04["max_new_tokens"],
                   {"lora_r": s03["lora_r"], "lora_alpha": s03["lora_alpha"], "lora_dropout": s03["lora_dropout"],
                    "lora_targets": s03["lora_targets"]})


def time_steps(shape: ModelShape, spec: TimingSpec, *, steps: int = 2, device: str | None = None,
               precision: str = "auto", max_rows: int | None = None, seed: int = 0) -> dict[str, StepTiming]:
    """Seconds per unit of each kind in `STEP_KINDS` at the profile's shape and batches, on `device`.

    `precision` ("auto", "fp32", "bf16") is resolved for `device` as the stages resolve it
    (`precision.resolve_precision`), and bf16 is timed as they run it: forward passes under autocast, a LoRA
    base and a generating model held in bf16, trained weights in fp32.
    `max_rows` caps the rows timed per batch, the time scaled linearly to the full batch (default: none on a GPU;
    on a CPU `CPU_MAX_ROWS` for a step that would take over `CPU_FULL_BATCH_SECONDS` at the full batch). A kind that fails (e.g. batched LoRA on a family `multilora` does not
    support yet) gets `seconds=None` and the error as its note.
    """
    from peft import get_peft_model


    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        numerics = resolve_precision(precision, device)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    auto_cap = max_rows is None and device == "cpu"
    max_rows = max_rows if max_rows is not None else (CPU_MAX_ROWS if device == "cpu" else 0)
    family = get_family(shape.family)
    tokenizer = synthetic_tokenizer()

    def autocast() -> Any:
        return numerics.autocast()

    def rows_of(rows: int) -> int:
        return min(rows, max_rows) if max_rows else rows

    targets = spec.lora["lora_targets"]
    config = FinetuneConfig(batch_size=spec.user_batch, max_source_length=spec.source, max_target_length=spec.target,
                            lora_r=spec.lora["lora_r"], lora_alpha=spec.lora["lora_alpha"],
                            lora_dropout=spec.lora["lora_dropout"],
                            lora_target_modules=SELF_ATTENTION_QKVO if targets == "self_attention_qkvo"
                            else tuple(targets.split(",")))
    model = family.from_config(shape.model_config(), seed=seed).to(device)

    def measure(kind: str, rows: int, make: Callable[[int], Callable[[], Any]], note: str = "",
                whole_batch: bool = False) -> StepTiming:
        timed_rows = rows if whole_batch else rows_of(rows)
        try:
            run = make(timed_rows)
            if timed_rows < rows and auto_cap:  # a small model: time its whole batch if that is quick
                first = _time(run, 1, device, warmup=1)[0]
                if first * rows / timed_rows <= CPU_FULL_BATCH_SECONDS:
                    model.zero_grad(set_to_none=True)
                    timed_rows, run = rows, make(rows)
            samples = _time(run, steps, device)
        except Exception as exc:  # reported, not raised: the other kinds still make a plan
            return StepTiming(kind, rows, timed_rows, None, [], f"not supported yet: {type(exc).__name__}: "
                                                                 f"{' '.join(str(exc).split())[:200]}")
        finally:
            model.zero_grad(set_to_none=True)
        return StepTiming(kind, rows, timed_rows, statistics.median(samples) * rows / timed_rows,
                          [round(s, 4) for s in samples], note)

    def full_step(source: int, target: int) -> Callable[[int], Callable[[], None]]:
        def make(rows: int) -> Callable[[], None]:
            model.train()
            batch = synthetic_batch(family, tokenizer, rows, source, target, device)
            return _train_step(model, batch, torch.optim.Adam(model.parameters(), lr=1e-4), autocast)
        return make

    wrapped: dict[str, Any] = {}  # adapters are added once, however many batch sizes are timed

    def lora_step(rows: int) -> Callable[[], None]:
        if "peft" not in wrapped:  # the frozen base in the precision's dtype, as stage 03 holds it
            wrapped["peft"] = get_peft_model(model.to(dtype=numerics.frozen_dtype), family.lora_config(config))
        peft_model = wrapped["peft"]
        peft_model.train()
        batch = synthetic_batch(family, tokenizer, rows, spec.source, spec.target, device)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        return _train_step(peft_model, batch, torch.optim.Adam(params, lr=1e-4), autocast)

    timings = {"pretrain": measure("pretrain", spec.pretrain_batch,
                                   full_step(spec.pretrain_source, spec.pretrain_target),
                                   "stage 02: one step of the whole model (AdamW there, Adam here: same cost)"),
               "full": measure("full", spec.user_batch, full_step(spec.source, spec.target),
                               "stage 03: FULL, DA and One-ID: one step of the whole model")}
    timings["lora"] = measure("lora", spec.user_batch, lora_step, "stage 03: one user's peft LoRA step")
    # get_peft_model injected LoRA layers into `model` itself: a fresh plain base for the next kinds
    model = family.from_config(shape.model_config(), seed=seed).to(device, dtype=numerics.frozen_dtype)

    def lora_batched_step(rows: int) -> Callable[[], None]:
        users = [f"u{i}" for i in range(spec.users_per_batch)]
        if "multi" not in wrapped:
            wrapped["multi"] = MultiLora(model, config)
            for user in users:
                wrapped["multi"].add_user(user, seed)
        multi = wrapped["multi"]
        params = [p for user in users for p in multi.parameters(user)]
        for p in model.parameters():
            p.requires_grad_(False)
        model.train()
        batch = synthetic_batch(family, tokenizer, rows, spec.source, spec.target, device)
        row_users = [users[i % len(users)] for i in range(rows)]

        def loss_of() -> torch.Tensor:
            with multi.routed(row_users):
                return model(**batch).loss
        return _train_step(model, batch, torch.optim.Adam(params, lr=1e-4), autocast, loss_of)

    batched = measure("lora_batched", spec.users_per_batch * spec.user_batch, lora_batched_step,
                      f"stage 03: one multilora step of {spec.users_per_batch} users x {spec.user_batch} rows")
    timings["lora_batched"] = batched
    model = numerics.for_inference(family.from_config(shape.model_config(), seed=seed).to(device))

    def generate(rows: int) -> Callable[[], Any]:
        batch = synthetic_batch(family, tokenizer, rows, spec.source, spec.target, device)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if shape.family == "causal":  # the prompt without its reply, as CAUSAL.generate feeds it
            keep = batch["labels"][0] == -100
            inputs = {k: v[:, keep] for k, v in inputs.items()}

        @torch.no_grad()
        def run() -> Any:
            with autocast():
                return model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=spec.max_new_tokens,
                                      min_new_tokens=spec.max_new_tokens, pad_token_id=0, eos_token_id=1)
        return run

    # Decoding is timed at the whole batch: each new token costs a pass whose time on a CPU is mostly per step,
    # not per row (measured with SmolLM2 at 16 rows: 2 rows took 2.4 s, so scaling rows linearly gave 19 s a batch)
    timings["generate"] = measure("generate", spec.generate_batch, generate,
                                  f"stages 03-05: greedy replies of {spec.max_new_tokens} tokens (forced full length)",
                                  whole_batch=True)
    del model
    return timings


# ---------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    """A profile's counts, timings and estimates; `table` is what notebook 03 shows."""

    profile: str
    device: str
    precision: dict[str, Any]  # `Precision.record()`: requested, used, device, TF32, the CPU's flags
    shape: ModelShape
    params_source: str
    datasets: list[DatasetUsers]
    timings: dict[str, StepTiming]
    table: pd.DataFrame  # one row per stage's kind of work
    paper_table: pd.DataFrame  # the same at the paper's counts
    assumptions: list[str]
    work: list[WorkCounts] = field(default_factory=list)  # stage 03's datasets as counted
    count_settings: CountSettings | None = None  # how `count_rows` counted, to re-cost other designs

    def design_hours(self, users: int, train_pairs: float, test_pairs: float) -> float:
        """Stages 03 and 04-05 re-costed (`count_rows`, the same timings and settings) with every dataset at
        `users` users of `train_pairs` fine-tuning and `test_pairs` test pairs each (dev pairs, DA halves,
        split sets and pre-trained models as planned): the cost side of `power.design_tradeoff`."""
        if not self.work or self.count_settings is None:
            raise PlanError("this plan kept no counts to re-cost (made before design_hours existed)")
        work = [replace(w, users=users, train_ft=train_pairs, test=test_pairs) for w in self.work]
        rows = count_rows(work, self.timings, self.count_settings)
        return float(sum(r["device_hours"] for r in rows))

    @property
    def total_hours(self) -> float:
        return float(self.table["device_hours"].sum())

    def stage_hours(self, stage: str) -> float:
        """The estimate of one stage's rows ("02", "03", "04-05")."""
        return float(self.table.loc[self.table["stage"] == stage, "device_hours"].sum())

    @property
    def paper_training_hours(self) -> float:
        return float(self.paper_table.loc[self.paper_table["stage"] == "03", "device_hours"].sum())

    @property
    def paper_models(self) -> int:
        """Models the paper counts (§4.2.2): One-ID, LoRA and FULL; DA precedes them and is not counted."""
        return int(self.paper_table.loc[self.paper_table["work"] != "DA", "models"].sum())

    def meets_goal(self) -> bool:
        return self.paper_training_hours <= GOAL_GPU_HOURS

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "device": self.device, "precision": self.precision, "shape": asdict(self.shape),
                "params_source": self.params_source, "datasets": [asdict(d) for d in self.datasets],
                "timings": {k: asdict(v) for k, v in self.timings.items()},
                "table": self.table.to_dict("records"), "total_device_hours": self.total_hours,
                "paper": {"models": self.paper_models, "table": self.paper_table.to_dict("records"),
                          "training_device_hours": self.paper_training_hours, "goal_gpu_hours": GOAL_GPU_HOURS,
                          "meets_goal_on_this_device": self.meets_goal()},
                "assumptions": self.assumptions}


@dataclass(frozen=True)
class WorkCounts:
    """What stage 03 trains for one dataset: the unit of the count table."""

    dataset: str
    users: int
    split_sets: int
    pretrained: int
    train_ft: float
    train_da: float
    dev: float
    test: float


def stage03_methods(s03: Mapping[str, Any]) -> list[Method]:
    """The methods stage 03 trains with these parameters, DA first (as notebook 03 builds them)."""
    rag = {"k": s03.get("rag_k", 2), "max_words": s03.get("rag_max_words", 12),
           "extra_tokens": s03.get("rag_extra_tokens", 32), "embedder": s03.get("rag_embedder", "minilm")}
    return build_methods(s03.get("methods", [m.name for m in PAPER_METHODS[1:]]), s03.get("peft_methods"), rag)


@dataclass(frozen=True)
class CountSettings:
    """How `count_rows` counts stage 03-05's work: the methods stage 03 trains, batches, epochs, generation."""

    methods: tuple[Method, ...]  # stage 03's (`methods.build_methods` of its params), DA first
    epochs: Mapping[str, float]  # method name -> epochs each training is assumed to run (`expected_epochs`)
    user_batch: int
    da_batch: int
    generate_batch: int
    questions: int
    lora_kind: str  # "lora" (one user at a time) or "lora_batched" (LoRA's users `users_per_batch` per step)
    users_per_batch: int
    exp2_pretrained: int = 0
    sweep_trainings: int = 0  # extra LoRA trainings of the learning-rate sweep
    predict_batch: int = 32
    source_tokens: int = 128  # the prompt tokens a training step was timed with


def count_rows(work: Sequence[WorkCounts], timings: Mapping[str, StepTiming], settings: CountSettings
               ) -> list[dict[str, Any]]:
    """Stage 03-05 rows of a plan: one row per method stage 03 trains (DA, One-ID, LoRA and its learning-rate
    sweep, FULL, any peft or RAG method), the in-memory evaluation of the methods evaluated so, and the
    generation batches of stages 04-05.

    Steps per training = epochs x ceil(pairs / batch); the dev loss is measured before training and after each
    epoch, each pass costing dev pairs / batch steps at `DEV_FORWARD_SHARE` of a step. A method says what it
    trains on (`Method.plan_rows`: pooled pairs or a user's own) and which timed step prices it
    (`Method.plan_kind`, scaled by `Method.plan_scale` for longer inputs); DA's steps have its larger batch.
    Generation: stage 03 answers every in-memory user's test contexts and Exp2 questions (`predict_batch` rows
    per batch) and scores the references (a forward pass); stages 04-05 generate the test replies of the
    other methods and their Exp2 answers under `exp2_pretrained` models.
    """
    def seconds(kind: str) -> float:
        value = timings[kind].seconds
        return float("nan") if value is None else value

    rows = []
    for method in settings.methods:
        kind = method.plan_kind
        unit = seconds(kind)
        if kind == "lora" and settings.lora_kind == "lora_batched" and method.batched_lora and \
                timings["lora_batched"].seconds is not None:
            unit = seconds("lora_batched") / max(settings.users_per_batch, 1)  # one user's share of a batched step
        pooled = method is settings.methods[0]  # DA: its own, larger batch
        batch = settings.da_batch if pooled else settings.user_batch
        unit *= (batch / settings.user_batch) * method.plan_scale(settings.source_tokens)
        sweep = settings.sweep_trainings if method.swept else 0
        models = steps = 0.0
        for w in work:
            train, dev, per_cell = method.plan_rows(w.train_da, w.train_ft, w.dev, w.users)
            n = per_cell * w.split_sets * w.pretrained
            n_epochs = settings.epochs[method.name]
            per = n_epochs * math.ceil(train / batch) + (n_epochs + 1) * DEV_FORWARD_SHARE * math.ceil(dev / batch)
            models += n
            steps += n * per
            if sweep and w is work[0]:  # the sweep: on the first condition
                models += sweep
                steps += sweep * per
        rows.append({"stage": "03", "work": method.plan_label + (" (+ lr sweep)" if sweep else ""),
                     "models": round(models), "units": round(steps), "unit": "step", "seconds_per_unit": unit,
                     "device_hours": steps * unit / 3600})
    test = max((w.test for w in work), default=0)
    per_user = math.ceil(test / settings.predict_batch) + math.ceil(settings.questions / settings.predict_batch)
    for method in settings.methods:
        if not getattr(method, "evaluated_in_memory", False):
            continue
        users = sum(w.split_sets * w.pretrained * w.users for w in work)
        batches = users * per_user if work else 0
        scoring = users * math.ceil(test / settings.predict_batch) * DEV_FORWARD_SHARE if work else 0
        total = batches * seconds("generate") + scoring * seconds("full")
        rows.append({"stage": "03", "work": f"{method.plan_label} replies", "models": 0, "units": batches,
                     "unit": f"batch of <= {settings.predict_batch}", "device_hours": total / 3600,
                     "seconds_per_unit": total / batches if batches else float("nan")})
    later = [m for m in settings.methods if not getattr(m, "evaluated_in_memory", False)]
    answering = [m for m in later if m.answers_questions]
    replies = sum(w.split_sets * w.pretrained * len(later) * w.users * w.test for w in work)
    replies += sum(w.split_sets * min(settings.exp2_pretrained, w.pretrained) * len(answering) * w.users
                   * settings.questions for w in work)
    batches = math.ceil(replies / settings.generate_batch)
    rows.append({"stage": "04-05", "work": "generation", "models": 0, "units": batches,
                 "unit": f"batch of {settings.generate_batch}", "seconds_per_unit": seconds("generate"),
                 "device_hours": batches * seconds("generate") / 3600})
    return rows


def measured_epochs(profile: str, outputs_root: Path) -> tuple[dict[str, float], str] | None:
    """Mean epochs run per method (by name) in an earlier stage 03 of `profile`: its outputs, else its
    published reference results (`results/<profile>/`); None when neither exists."""
    for root in (outputs_root, paths.repo_root() / "results" / profile):
        metrics = paths.stage_dir(root, stage("03").name) / "metrics.json"
        if not metrics.is_file():
            continue
        by_method = pd.DataFrame(json.loads(metrics.read_text(encoding="utf-8"))["metrics"].get("by_method") or [])
        if by_method.empty or "epochs_mean" not in by_method:
            continue
        means = by_method.groupby("method")["epochs_mean"].mean()
        return {name: float(epochs) for name, epochs in means.items()}, str(metrics)
    return None


def expected_epochs(s03: Mapping[str, Any], methods: Sequence[Method],
                    measured: tuple[dict[str, float], str] | None, epochs: int | None) -> tuple[dict[str, float], str]:
    """Epochs each method's trainings are assumed to run (by method name), and why: `epochs` when given
    (capped), else the epochs an earlier run measured for the method (early stopping ends most runs before
    the cap; a method it did not train: the cap), else the caps (an upper bound). DA's cap is
    `da_max_epochs`, every other method's `max_epochs`."""
    caps = {m.name: s03["da_max_epochs"] if m is methods[0] else s03["max_epochs"] for m in methods}
    if epochs:
        return {k: min(epochs, cap) for k, cap in caps.items()}, f"{epochs} per training (assumed)"
    if measured:
        found, source = measured
        labels = {m.name: m.plan_label for m in methods}
        return ({k: min(found.get(k, cap), cap) for k, cap in caps.items()},
                "as an earlier run measured (" + ", ".join(f"{labels[k]} {found[k]:.1f}" for k in caps if k in found)
                + f"; {source})")
    return caps, "the caps, an upper bound: early stopping ends most trainings sooner"


def paper_counts(user_batch: int) -> list[WorkCounts]:
    """The paper's datasets at its own scale: Table 2's users, half of each user's training pairs for
    fine-tuning (§4.1.3), and dev / test pairs as the 30% held-out partners give them (half each)."""
    return [WorkCounts(name, users, PAPER_SPLIT_SETS, PAPER_PRETRAINED, train / 2, train / 2,
                       train / 0.7 * 0.15, train / 0.7 * 0.15)
            for (name, users), train in zip(PAPER_USERS.items(), PAPER_TRAIN_PAIRS_PER_USER.values())]


@dataclass(frozen=True)
class PlanOptions:
    """How `plan_profile` times and counts; every field None takes the profile's or the device's own."""

    steps: int | None = None  # repetitions per timed step (default 3, the median taken)
    device: str | None = None  # default: cuda when available, else cpu
    precision: str | None = None  # default: stage 03's parameter, resolved for the device
    family: str | None = None  # force a model family (default: stage 02's)
    epochs: int | None = None  # epochs every training is assumed to run (default: `expected_epochs`)
    max_rows: int | None = None  # rows timed per batch (default: `time_steps`' rule)


def plan_profile(profile: str, *, params_dir: str | Path | None = None, outputs_root: str | Path | None = None,
                 notebooks_dir: str | Path | None = None, options: PlanOptions = PlanOptions()) -> Plan:
    """The cost plan of `profile` on this device: counts from its params and users, a few timed steps of each
    kind, and estimates per stage and at the paper's counts. `options.precision` defaults to stage 03's
    parameter (what a run would use here: "auto" is resolved for this device); `options.epochs` assumes
    trainings stop after that many epochs (default: as an earlier run of the profile measured, else the caps:
    `expected_epochs`)."""
    steps, device, precision, family, epochs, max_rows = (options.steps, options.device, options.precision,
                                                           options.family, options.epochs, options.max_rows)
    params, source = profile_params(profile, params_dir, notebooks_dir)
    out_root = paths.outputs_root(profile, outputs_root)
    shape = profile_shape(params, family)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    steps = steps or 3  # the median of 3 (after CPU_WARMUP_CALLS on a CPU): single CPU steps vary by 50%
    s02, s03, s05 = _stage(params, "02"), _stage(params, "03"), _stage(params, "05")
    datasets = dataset_users(params, out_root)
    spec = TimingSpec.from_params(params)
    lengths = data_lengths(paths.stage_dir(out_root, stage("00").name), shape.family, s03["pretrained"],
                           spec.user_batch, spec.source, spec.target, s03["datasets"])
    if lengths is not None:
        spec = replace(spec, source=lengths.source, target=lengths.target)
    precision = precision or s03.get("precision", "auto")
    timings = time_steps(shape, spec, steps=steps, device=device, precision=precision, max_rows=max_rows)
    numerics = resolve_precision(precision, device)

    methods = stage03_methods(s03)
    epochs_by_method, epochs_why = expected_epochs(s03, methods, measured_epochs(profile, out_root), epochs)
    lora_kind = "lora_batched" if s03["lora_training"] == "batched" else "lora"
    questions = min(QUESTIONS, s03["max_questions"]) if s03["max_questions"] else QUESTIONS
    sweep = len(s03["lora_learning_rates"]) * (s03["lora_sweep_users"] or (datasets[0].users if datasets else 0))
    settings = CountSettings(tuple(methods), epochs_by_method, spec.user_batch, s03["da_batch_size"],
                             spec.generate_batch, questions, lora_kind, spec.users_per_batch,
                             exp2_pretrained=len(s05["pretrained"]), sweep_trainings=sweep, source_tokens=spec.source)

    plain_steps = 0 if s02["checkpoint"] else s02["plain_t5_steps"]
    dialogue_models = len(s02.get("dialogue_models", ("plain_dialogue", "psp", "ppp")))
    pretrain_steps = plain_steps + dialogue_models * s02["dialogue_steps"]
    rows = [{"stage": "02", "work": "pre-training", "models": (0 if s02["checkpoint"] else 1) + dialogue_models,
             "units": pretrain_steps, "unit": "step", "seconds_per_unit": timings["pretrain"].seconds or float("nan"),
             "device_hours": pretrain_steps * (timings["pretrain"].seconds or float("nan")) / 3600}]
    work = [WorkCounts(d.name, d.users, len(s03["split_sets"]), len(s03["pretrained"]), d.train_ft, d.train_da,
                       d.dev, d.test) for d in datasets]
    rows += count_rows(work, timings, settings)
    seeds = training_seeds(profile, params_dir)
    for row in rows:  # every row here is stage 02 or later: each training seed runs them all again
        row.update(models=row["models"] * seeds, units=row["units"] * seeds, device_hours=row["device_hours"] * seeds)
    table = _finish(pd.DataFrame(rows))
    paper_settings = replace(settings, methods=tuple(PAPER_METHODS), exp2_pretrained=3, sweep_trainings=0,
                             epochs={**{m.name: settings.epochs.get(m.name, s03["max_epochs"]) for m in PAPER_METHODS}})
    paper = _finish(pd.DataFrame(count_rows(paper_counts(spec.user_batch), timings, paper_settings)))

    assumptions = [
        f"params: {source}; model: {shape.family} {shape.preset} ({shape.why}), vocabulary {shape.vocab_size:,}",
        f"users and pairs: " + "; ".join(f"{d.name}: {d.users} users, {d.train_ft:.0f} fine-tuning / "
                                         f"{d.dev:.0f} dev / {d.test:.0f} test pairs each ({d.source})"
                                         for d in datasets),
        (lengths.why if lengths is not None else f"stage 03's batches timed at the caps, {spec.source} prompt + "
         f"{spec.target} reply tokens (no stage 00 outputs to measure: an upper bound)"),
        f"epochs: {epochs_why}; a dev-loss pass (before training and after each epoch) costs "
        f"{DEV_FORWARD_SHARE:.2f} of a step per batch",
        f"LoRA timed as {'batched multilora' if lora_kind == 'lora_batched' else 'one user at a time (peft)'}"
        + ("" if lora_kind == "lora" or timings["lora_batched"].seconds is not None
           else f" -> fell back to one user at a time ({timings['lora_batched'].note})"),
        f"methods: {', '.join(m.plan_label for m in methods)} (stage 03's `methods` and `peft_methods`); a peft "
        "method is priced as a LoRA step, RAG + LoRA's by its longer inputs",
        f"generation: test replies of every method and {questions} Exp2 questions per user, "
        f"{spec.max_new_tokens} tokens each (FULL's and the peft methods' in stage 03, with the references scored)",
        f"timed on {device} in {numerics.used} ({precision!r} asked"
        + (f"; CPU: {cpu_flags_line()}" if device == "cpu" else "") + f"): {steps} repetitions after {CPU_WARMUP_CALLS if device == 'cpu' else 1} warm-up call(s)"
        + (f"; batches capped at {max(t.timed_rows for t in timings.values())} rows and scaled linearly"
           if any(t.timed_rows < t.rows for t in timings.values()) else ""),
        f"training seeds: {seeds} (params/<profile>/pipeline.yaml `seeds`: stages 02-06 run once per seed; "
        "the rows above count all of them, the paper's counts below one)",
        "paper (§4.2.2): One-ID once per (dataset, split set, pre-trained model), LoRA and FULL once per user: "
        "(2 x 100 + 1) x 4 x 3 = 2,412 (PCJP) + (2 x 140 + 1) x 12 = 3,372 (UPC) + (2 x 147 + 1) x 12 = 3,540 (SD) "
        "= 9,324; DA's 36 models are trained but not counted there",
    ]
    return Plan(profile, device, numerics.record(), shape, source, datasets, timings, table, paper, assumptions, work,
                settings)


def _finish(table: pd.DataFrame) -> pd.DataFrame:
    table["wall"] = table["device_hours"].map(format_hours)
    return table[["stage", "work", "models", "units", "unit", "seconds_per_unit", "wall", "device_hours"]]


def format_hours(hours: float) -> str:
    """e.g. '3 h 05 min', '12 min', '40 s', '-' for an unknown value."""
    if hours != hours:  # NaN: a kind that could not be timed
        return "-"
    seconds = hours * 3600
    if seconds < 60:
        return f"{seconds:.0f} s"
    if hours < 1:
        return f"{seconds / 60:.0f} min"
    return f"{int(hours)} h {round(seconds / 60) % 60:02d} min"


def format_plan(plan: Plan) -> str:
    """The printed plan: counts and estimates per stage, the total, the paper's counts and the goal."""
    def show(table: pd.DataFrame) -> str:
        shown = table.assign(seconds_per_unit=table["seconds_per_unit"].map(lambda v: f"{v:.3g}"),
                             device_hours=table["device_hours"].map(lambda v: f"{v:.3g}"))
        return shown.to_string(index=False)

    lines = [f"cost plan of profile {plan.profile!r} on {plan.device} ({plan.precision['used']})", ""]
    lines += ["timed steps:"] + [f"  {t.kind:<12} {('-' if t.seconds is None else f'{t.seconds:.3g} s'):>10} per unit "
                                 f"of {t.rows} rows (timed {t.timed_rows}: {t.samples})  {t.note}"
                                 for t in plan.timings.values()]
    lines += ["", show(plan.table), f"total: {format_hours(plan.total_hours)} ({plan.total_hours:.3g} device-hours "
                                      f"on one {plan.device} device)", ""]
    lines += [f"at the paper's counts ({plan.paper_models:,} models: 36 One-ID + 4,644 LoRA + 4,644 FULL):",
              show(plan.paper_table),
              f"training (DA, One-ID, LoRA, FULL): {plan.paper_training_hours:.3g} device-hours on this {plan.device}; "
              f"goal: {PAPER_MODELS:,} user models in <= {GOAL_GPU_HOURS:g} GPU-hours on one H100-class GPU: "
              f"{'met' if plan.meets_goal() else 'not met'} on this device", ""]
    lines += ["assumptions:"] + [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)


def print_power(run_dir: Path, targets: Mapping[str, float]) -> int:
    """`--power RUN_DIR`: the power table of a finished run (`udg_lib.power`; imported here, so that a cost plan
    does not load statsmodels)."""

    try:
        run = read_run(run_dir)
        table = power_table(run, dict(targets))
    except (OSError, ValueError) as exc:
        print(f"udg plan: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(format_power(table, run, run_dir))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m udg_lib.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="params/<profile>/ (any profile whose folder exists)")
    parser.add_argument("--power", type=Path, metavar="RUN_DIR",
                        help="instead of a cost plan: the power of a finished run's paired comparisons (an outputs "
                             "folder, or a published results/<profile>/), see udg_lib.power")
    parser.add_argument("--target-similarity", type=float,
                        help="--power: the similarity difference n_needed is computed for (default 0.01)")
    parser.add_argument("--target-bpc", type=float,
                        help="--power: the bits-per-character difference n_needed is computed for (default 0.02)")
    parser.add_argument("--params-dir", help="folder of <stage>.yaml files instead of params/<profile>")
    parser.add_argument("--outputs-root", help="stage outputs instead of outputs/<profile> (stage 00's users)")
    parser.add_argument("--steps", type=int, help="timed repetitions per kind, their median taken (default 3; on a CPU after 2 warm-up calls)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when torch sees one)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="what to time (default: the profile's stage 03 parameter; auto = bf16 where native)")
    parser.add_argument("--family", choices=("seq2seq", "causal"), help="model family (default: the profile's)")
    parser.add_argument("--epochs", type=int, help="assume users stop after this many epochs (default: as an earlier run of the profile measured, else the cap)")
    parser.add_argument("--max-rows", type=int, help=f"rows timed per batch (default: all on GPU; on CPU {CPU_MAX_ROWS} for slow steps)")
    parser.add_argument("--json", type=Path, help="also write the plan as JSON here")
    args = parser.parse_args(argv)
    if args.power is not None:
        targets = {"similarity": args.target_similarity, "bits_per_char": args.target_bpc}
        return print_power(args.power, {k: v for k, v in targets.items() if v is not None})
    if args.profile is None:
        parser.error("--profile is required (or --power RUN_DIR)")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    known = known_profiles(paths.repo_root() / "params")
    if args.params_dir is None and args.profile not in known:
        print(f"udg plan: no params/{args.profile}/ (profiles: {', '.join(known)})", file=sys.stderr)
        return 1
    try:
        options = PlanOptions(args.steps, args.device, args.precision, args.family, args.epochs, args.max_rows)
        plan = plan_profile(args.profile, params_dir=args.params_dir, outputs_root=args.outputs_root, options=options)
    except Exception as exc:  # pipeline and corpus errors carry one-line messages
        print(f"udg plan: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(format_plan(plan))
    if args.json:

        write_json(args.json, {**plan.as_dict(), "provenance": provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
