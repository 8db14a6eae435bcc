"""The methods with one model per cell (§4.1.3): domain adaptation (DA, the base of every other method and
the floor without per-user training) and One-ID (every user's pairs, each prompt led by the user's id)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from udg_lib import finetuning as ft
from udg_lib.conditions import Cell
from udg_lib.methods import names
from udg_lib.families import build_model, family_of
from udg_lib.generation import greedy_generate, predict_pairs
from udg_lib.methods.base import (
    MODEL_DIR,
    Evaluation,
    Method,
    ResponseTimer,
    TrainingJob,
    read_done,
    held_for_timing,
    save_model,
    timed,
    timed_reply,
)
from udg_lib.pretraining import count_parameters
from udg_lib.prompts import build_prompts


def _summary_row(record: dict, method: str) -> pd.DataFrame:
    return pd.DataFrame([{"method": method, "user_id": "", **record["summary"]}])


def _predict_saved(cell: Cell, evaluation: Evaluation, folder_name: str, generate_ids: Collection[Any] | None,
                   one_ids: dict[str, str] | None) -> pd.DataFrame:
    test = cell.test
    generate = None if generate_ids is None else test["pair_id"].isin(set(generate_ids)).tolist()
    model = evaluation.model(cell.path(folder_name, MODEL_DIR))
    return predict_pairs(model, test, evaluation.predictor(cell, test, one_ids), generate=generate)


class DomainAdaptation(Method):
    """§4.1.3 domain adaptation on the pooled train_da halves of the cell's users: the base of every other
    method, and as a system the floor without per-user training and without One-ID."""

    name = names.DA
    label = names.LABELS[names.DA]
    fine_tuned: ClassVar[bool] = False
    answers_questions: ClassVar[bool] = False

    def train(self, cell: Cell, job: TrainingJob) -> pd.DataFrame:
        folder = self.folder(cell)
        record = read_done(folder)
        if record is None:
            model = build_model(job.pretrained_model(cell), job.tokenizer).to(job.device)
            model, summary = ft.domain_adapt(model, job.tokenizer, cell.pairs, cell.users, cell.fmt, job.da_config,
                                             cell.user_ids)
            record = {"method": self.name, "fmt": cell.fmt, "summary": summary.as_dict(),
                      "config": job.da_config.as_dict(), "n_parameters": count_parameters(model),
                      "family": family_of(model).name}
            save_model(model, job.tokenizer, folder, record)
        return _summary_row(record, self.name)

    @property
    def plan_label(self) -> str:
        return "DA"

    def base_model_dir(self, cell: Cell) -> Path:
        """The domain-adapted model every other method of the cell starts from."""
        return self.folder(cell) / MODEL_DIR

    def predict(self, cell: Cell, evaluation: Evaluation, generate_ids: Collection[Any] | None) -> pd.DataFrame:
        return _predict_saved(cell, evaluation, self.name, generate_ids, None).assign(method=self.name)

    def plan_rows(self, train_da: float, train_ft: float, dev: float, users: int) -> tuple[float, float, int]:
        return users * train_da, users * dev, 1


class OneId(Method):
    """§4.1.3 One-ID: one model on every user's train_ft pairs, each prompt prefixed with its user's One-ID."""

    name = names.ONE_ID
    label = names.LABELS[names.ONE_ID]

    def train(self, cell: Cell, job: TrainingJob) -> pd.DataFrame:
        folder = self.folder(cell)
        record = read_done(folder)
        if record is None:
            config = job.config_for(self)
            model = build_model(cell.path(DA.name, MODEL_DIR), job.tokenizer).to(job.device)
            model, summary = ft.train_one_id(model, job.tokenizer, cell.pairs, cell.users, cell.fmt, config,
                                             cell.user_ids)
            record = {"method": self.name, "fmt": cell.fmt, "summary": summary.as_dict(), "config": config.as_dict()}
            save_model(model, job.tokenizer, folder, record)
        return _summary_row(record, self.name)

    def predict(self, cell: Cell, evaluation: Evaluation, generate_ids: Collection[Any] | None) -> pd.DataFrame:
        return (_predict_saved(cell, evaluation, self.name, generate_ids, ft.one_ids_of(cell.users))
                .assign(method=self.name))

    def answer(self, cell: Cell, evaluation: Evaluation, asked: pd.DataFrame) -> pd.DataFrame:
        model = evaluation.model(cell.path(self.name, MODEL_DIR))
        sources = build_prompts(asked, cell.users, cell.fmt, ft.one_ids_of(cell.users)).tolist()
        replies = greedy_generate(model, evaluation.tokenizer, sources, evaluation.decoding, one_id_prefix=True)
        return asked.assign(reply=replies, method=self.name)

    def response_timer(self, cell: Cell, evaluation: Evaluation) -> ResponseTimer:
        """One model for everyone: cold reads it from disk, warm generates with it held in memory."""
        folder, device = cell.path(self.name, MODEL_DIR), evaluation.device
        warm = held_for_timing(folder, evaluation)
        reply = timed_reply(cell, evaluation, ft.one_ids_of(cell.users))

        def time_user(row: pd.DataFrame, user: str, k: int) -> tuple[float, float]:
            return (timed(lambda: reply(held_for_timing(folder, evaluation), row), device),
                    timed(lambda: reply(warm, row), device))

        return time_user


DA = DomainAdaptation()
