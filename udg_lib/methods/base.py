"""What every fine-tuning method of the study is, and the two bundles it is handed: a `TrainingJob`
(stage 03) and an `Evaluation` (stages 04-05).

A `Method` says how it trains one cell (pooled over its users or one model per user), how it is loaded for
evaluation (its Exp1 predictions and Exp2 answers), where its files go (`<cell folder>/<name>/`), its label
in the tables, its Table 6 size and response time, and what the planner charges for it. The stages never
branch on a method's name: they ask the method.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from udg_lib import finetuning as ft
from udg_lib import io
from udg_lib.conditions import Cell
from udg_lib.methods import names
from udg_lib.families import Decoding, build_model, load_model
from udg_lib.generation import UserPredictor, greedy_generate
from udg_lib.precision import Precision, resolve_precision
from udg_lib.prompts import build_prompts

MODEL_DIR = "model"  # a saved model (save_pretrained + tokenizer) inside a method's folder
ResponseTimer = Callable[[pd.DataFrame, str, int], tuple[float, float]]  # (one test row, user, k) -> cold, warm


@dataclass(frozen=True, eq=False)
class TrainingJob:
    """Everything stage 03 trains a cell's methods with, but the cell itself."""

    tokenizer: PreTrainedTokenizerBase
    pretrained_dir: Path  # stage 02's folder: `<pretrained_dir>/<name>/model` is a cell's pre-trained model
    config: ft.FinetuneConfig  # One-ID and the per-user methods
    da_config: ft.FinetuneConfig  # domain adaptation (§4.1.3)
    options: ft.UserTrainingOptions = field(default_factory=ft.UserTrainingOptions)
    device: str = "cpu"
    decoding: Decoding = Decoding()  # the in-memory evaluation's lengths, batch and precision
    questions: pd.DataFrame | None = None  # Exp2 questions, answered in memory by methods evaluated there
    max_generated: int = 0  # test replies generated in memory per user (0: all; `Cell.generated_ids`)
    generation_seed: int = 0
    configs: Mapping[str, ft.FinetuneConfig] = field(default_factory=dict)  # per method, e.g. LoRA's swept lr

    def config_for(self, method: Method) -> ft.FinetuneConfig:
        return self.configs.get(method.name, self.config)

    def with_config(self, method: Method, config: ft.FinetuneConfig) -> TrainingJob:
        return replace(self, configs={**self.configs, method.name: config})

    def pretrained_model(self, cell: Cell) -> Path:
        return Path(self.pretrained_dir) / cell.pretrained / MODEL_DIR

    def predictor(self, cell: Cell, one_ids: Mapping[str, str] | None = None) -> UserPredictor:
        """The in-memory evaluation of a user's trained model: its test replies and Exp2 answers."""
        generate = cell.generated_ids(self.max_generated, self.generation_seed) if self.max_generated else None
        return UserPredictor(self.tokenizer, cell.pairs[cell.pairs["split"] == "test"], cell.users, cell.fmt,
                             self.questions, one_ids, self.decoding, generate)


@dataclass(frozen=True, eq=False)
class Evaluation:
    """How stages 04-05 run a cell's trained systems: generation/scoring settings, device, LoRA's path."""

    tokenizer: PreTrainedTokenizerBase
    decoding: Decoding = Decoding()  # lengths, batch and precision of generation and scoring
    device: str = "cpu"
    lora_eval: str = "routed"  # "routed" (`routing.RoutedAdapters`) or "peft" (mixed-adapter batches)
    max_generated: int = 0  # test replies generated per user (0: all); every test pair is scored
    generation_seed: int = 0

    @property
    def precision(self) -> str | Precision:
        return self.decoding.precision

    def generate_ids(self, cell: Cell) -> set[Any]:
        return cell.generated_ids(self.max_generated, self.generation_seed)

    def predictor(self, cell: Cell, test: pd.DataFrame, one_ids: Mapping[str, str] | None = None) -> UserPredictor:
        return UserPredictor(self.tokenizer, test, cell.users, cell.fmt, None, one_ids, self.decoding)

    def model(self, folder: Path) -> torch.nn.Module:
        return inference_model(folder, self.tokenizer, self.device, self.precision)


def inference_model(folder: str | Path, tokenizer: PreTrainedTokenizerBase, device: str,
                    precision: str | Precision = "fp32") -> torch.nn.Module:
    """A saved model on `device` for generation or scoring only: held in `precision`'s frozen dtype (bf16
    where it resolves to bf16 on `device`), in eval mode."""
    return resolve_precision(precision, device).for_inference(build_model(folder, tokenizer).to(device))


def held_for_timing(folder: str | Path, evaluation: Evaluation) -> torch.nn.Module:
    """A saved model as Table 6 times it: read from disk and held as stage 04 evaluates (the precision's dtype)."""
    numerics = resolve_precision(evaluation.precision, evaluation.device)
    return numerics.for_inference(load_model(folder).to(evaluation.device))


def timed_reply(cell: Cell, evaluation: Evaluation,
                one_ids: Mapping[str, str] | None = None) -> Callable[[torch.nn.Module, pd.DataFrame], None]:
    """Table 6's reply: a model answers one test row greedily as stage 04 generates (the evaluation's reply cap
    and precision); with `one_ids`, in One-ID's prompt with its ID prefix."""
    decoding = Decoding(evaluation.decoding.max_new_tokens, precision=evaluation.precision)

    def reply(model: torch.nn.Module, row: pd.DataFrame) -> None:
        sources = build_prompts(row, cell.users, cell.fmt, one_ids).tolist()
        greedy_generate(model, evaluation.tokenizer, sources, decoding, one_id_prefix=one_ids is not None)

    return reply


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, record: dict) -> None:
    """model/ (save_pretrained + tokenizer) and done.json, published together (temp folder + rename)."""
    with io.staged_dir(folder) as staging:
        model.save_pretrained(staging / MODEL_DIR)
        tokenizer.save_pretrained(staging / MODEL_DIR)
        io.write_json(staging / ft.DONE_FILE, record)


def read_done(folder: Path) -> dict | None:
    marker = folder / ft.DONE_FILE
    return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def timed(action: Callable[[], Any], device: str) -> float:
    """Wall seconds of `action`, synchronised on CUDA."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    action()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


class Method:
    """A fine-tuning method (§4.1.3) of the study. Subclasses set the class attributes and implement
    `train`, `predict` and, where the method answers Exp2, `answer`."""

    name: ClassVar[str] = ""  # the `method` column of every table, and the method's folder in a cell
    label: str = ""  # the tables' "fine-tuning" column
    per_user: ClassVar[bool] = False  # one model per user (Table 6 counts users) or one per cell
    user_specific: ClassVar[bool] = False  # trained on the user's own pairs alone (§3.5: LoRA, FULL)
    fine_tuned: ClassVar[bool] = True  # trained on the users' train_ft pairs (DA reads only train_da)
    paper: ClassVar[bool] = True  # one of the paper's systems, which its claims speak about
    answers_questions: ClassVar[bool] = True  # answers Exp2's personal questions (§4.3)
    plan_kind: ClassVar[str] = "full"  # the planner's timed step that prices one training step (plan.STEP_KINDS)
    swept: ClassVar[bool] = False  # its learning rate is the one stage 03's sweep chooses (LoRA)
    batched_lora: ClassVar[bool] = False  # trains several users per step with `lora_training: batched`

    @property
    def plan_label(self) -> str:
        """The planner's row name (the tables' label)."""
        return self.label

    def plan_scale(self, source_tokens: int) -> float:
        """A training step's cost relative to the timed one at `source_tokens` prompt tokens."""
        return 1.0

    @property
    def record(self) -> dict[str, Any]:
        """What stage 03 writes of the method into its metrics, for stages 04-06 to rebuild it (`from_record`)."""
        return {"name": self.name, "label": self.label}

    def folder(self, cell: Cell) -> Path:
        return cell.path(self.name)

    def train(self, cell: Cell, job: TrainingJob) -> pd.DataFrame:
        """Train the method for every user of `cell` into `folder(cell)`, resumably. Rows: method, user_id
        ("" for a pooled model) and the training summary's fields."""
        raise NotImplementedError

    def predict(self, cell: Cell, evaluation: Evaluation, generate_ids: Collection[Any] | None) -> pd.DataFrame:
        """Exp1 (§4.2): reference NLLs on every test pair of the cell's users, greedy replies on those in
        `generate_ids` (None: all). Columns: pair_id, speaker_id, generated, nll, n_tokens, text_nll,
        text_chars, method."""
        raise NotImplementedError

    def answer(self, cell: Cell, evaluation: Evaluation, asked: pd.DataFrame) -> pd.DataFrame:
        """Exp2 (§4.3.2): greedy answers to `asked` (`generation.question_pairs` of every user). Columns:
        speaker_id, pair_id (the question), reply, method."""
        raise NotImplementedError(f"{self.name} does not answer Exp2's questions")

    def models(self, n_users: int) -> int:
        """Table 6's number of models for `n_users` users."""
        return n_users if self.per_user else 1

    def disk_bytes(self, cell: Cell) -> float | None:
        """Table 6's size on disk of one of the method's models (weights only)."""
        return float(weights_bytes(cell.path(names.DA, MODEL_DIR)))  # a whole model, the DA model's size

    def response_timer(self, cell: Cell, evaluation: Evaluation) -> ResponseTimer | None:
        """Table 6's response time: a function of one test row, its user and the user's index giving the
        (cold, warm) seconds of loading the user's model and replying; None when the method is not timed."""
        return None

    def plan_rows(self, train_da: float, train_ft: float, dev: float, users: int) -> tuple[float, float, int]:
        """The planner's (training pairs, dev pairs, models) of the method for one cell of `users` users with
        the given mean pairs per user: what its steps are counted from."""
        if self.per_user:
            return train_ft, dev, users
        return users * train_ft, users * dev, 1
