"""The methods with one model per user (§3.5, §4.1.3): FULL (every weight), LoRA (r=12 adapters, trained in
batches of users and evaluated through `routing.RoutedAdapters`), and any other peft method from a config
(prefix tuning, IA3, LoRA variants): `PeftMethod`, built from the parameters with no new code.

Each per-user method trains on the cell's domain-adapted model (`pooled.DA`), one user after another
(`finetuning.run_users`) or, for LoRA, several users per step (`multilora.run_users_batched`), locally or on
Ray (`executors.train_users`). FULL and the generic peft methods are evaluated while each user's model is
in memory (`generation.UserPredictor` writes the user's test replies and Exp2 answers beside its weights);
LoRA's adapters are saved and evaluated later, all users of a batch in one routed pass.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch
from peft import PeftConfig, PeftModel, get_peft_config, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from udg_lib import finetuning as ft
from udg_lib.conditions import Cell
from udg_lib.methods import names
from udg_lib.executors import clear_staging_leftovers, train_users
from udg_lib.families import build_model, family_of
from udg_lib.generation import (
    EXP2_FILE,
    PREDICTIONS_FILE,
    greedy_generate,
    load_routed_adapters,
    load_user_adapters,
    predict_pairs,
)
from udg_lib.methods.base import (Evaluation, Method, ResponseTimer, TrainingJob, held_for_timing, timed, timed_reply,
                                  weights_bytes)
from udg_lib.methods.pooled import DA
from udg_lib.metrics import load_embedder
from udg_lib.multilora import run_users_batched
from udg_lib.precision import resolve_precision
from udg_lib.prompts import build_prompts
from udg_lib.retrieval import UserMemories, memory_head

LORA_EVAL_MODES: tuple[str, ...] = ("routed", "peft")


class PerUserMethod(Method):
    """A method with one model per user, trained on the cell's DA model on the user's own pairs alone."""

    per_user: ClassVar[bool] = True
    user_specific: ClassVar[bool] = True
    evaluated_in_memory: ClassVar[bool] = True  # test replies and Exp2 answers written while trained
    frozen_base: ClassVar[bool] = False  # the base is frozen: hold it in the precision's frozen dtype

    def user_slot(self, base_model: PreTrainedModel, config: ft.FinetuneConfig) -> ft.UserSlot:
        raise NotImplementedError

    def train_on_base(self, base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cell: Cell,
                      out_dir: Path, config: ft.FinetuneConfig, options: ft.UserTrainingOptions,
                      after_user: ft.AfterUser | None) -> pd.DataFrame:
        """Every user of `cell` trained on `base_model`, loaded once (the executors' unit of work)."""
        if self.frozen_base:  # adapters stay fp32 (`precision.Precision.frozen_dtype`)
            device = str(next(base_model.parameters()).device)
            base_model.to(dtype=resolve_precision(config.precision, device).frozen_dtype)
        return ft.run_users(self, base_model, tokenizer, cell, out_dir, config, options, after_user)

    def train(self, cell: Cell, job: TrainingJob) -> pd.DataFrame:
        return self.train_users(cell, job, self.folder(cell), job.config_for(self))

    def train_users(self, cell: Cell, job: TrainingJob, out_dir: Path, config: ft.FinetuneConfig,
                    evaluate: bool = True) -> pd.DataFrame:
        """`cell`'s users into `out_dir` with `config`, evaluated in memory when the method is and `evaluate`
        (a learning-rate sweep trains into a scratch folder and evaluates nothing)."""
        after_user = job.predictor(cell) if self.evaluated_in_memory and evaluate else None
        base_dir = DA.base_model_dir(cell)
        if job.options.executor == "ray":
            table = train_users(self, base_dir, cell, out_dir, config, job.options, job.device, after_user)
        else:
            clear_staging_leftovers(out_dir, cell.user_ids)  # half-written user folders of a killed run
            base = build_model(base_dir, job.tokenizer).to(job.device)  # loaded once for all users of the cell
            table = self.train_on_base(base, job.tokenizer, cell, out_dir, config, job.options, after_user)
        return table.drop(columns=["status", "dir"]).assign(method=self.name)

    def predict(self, cell: Cell, evaluation: Evaluation, generate_ids: Collection[Any] | None) -> pd.DataFrame:
        """The replies stage 03 wrote while each user's model was in memory; `generate_ids` keeps this stage's
        subset of them (stage 03 generated that subset or more)."""
        frames = []
        for user in cell.user_ids:
            path = ft.user_dir(self.folder(cell), user) / PREDICTIONS_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path}: {self.label} predictions missing (rerun notebook 03)")
            saved = pd.read_parquet(path)
            if "text_nll" not in saved.columns:
                raise ValueError(f"{path}: no text_nll column (written by an older notebook 03); rerun notebook 03")
            frames.append(saved)
        saved = pd.concat(frames, ignore_index=True)
        if generate_ids is not None:  # keep this stage's subset, as for the other methods
            wanted = set(generate_ids) & set(cell.test["pair_id"])
            missing = sorted(wanted - set(saved.loc[saved["generated"].notna(), "pair_id"]))
            if missing:
                raise ValueError(f"{self.folder(cell)}: no {self.label} reply for test pairs {missing[:3]}: notebook "
                                 "03 generated fewer (its max_generated_per_user must be 0 or at least this stage's, "
                                 "with the same generation_seed)")
            saved["generated"] = saved["generated"].where(saved["pair_id"].isin(wanted), None)
        return saved.assign(method=self.name)

    def answer(self, cell: Cell, evaluation: Evaluation, asked: pd.DataFrame) -> pd.DataFrame:
        frames = []
        for user in cell.user_ids:
            path = ft.user_dir(self.folder(cell), user) / EXP2_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path}: {self.label} Exp2 replies missing (rerun notebook 03)")
            frames.append(pd.read_parquet(path).assign(speaker_id=user, method=self.name)
                          .rename(columns={"question_id": "pair_id"}))
        return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------------------------
# FULL


@dataclass
class _FullSlot:
    """FULL on one base: every weight trains; the base weights come back from an in-memory copy."""

    model: PreTrainedModel
    state: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def begin(self, config: ft.FinetuneConfig) -> None:
        self.model.load_state_dict(self.state)
        for p in self.model.parameters():
            p.requires_grad_(True)
        return None

    def save(self, staging: Path, tokenizer: PreTrainedTokenizerBase, options: ft.UserTrainingOptions) -> None:
        if options.save_full_models:
            self.model.save_pretrained(staging / ft.MODEL_DIR)
            tokenizer.save_pretrained(staging / ft.MODEL_DIR)

    def end(self) -> None:
        pass

    def close(self) -> None:
        self.model.load_state_dict(self.state)


class Full(PerUserMethod):
    """§4.1.3 FULL: every weight updated per user; evaluated in memory (a whole model per user)."""

    name = names.FULL
    label = names.LABELS[names.FULL]

    def user_slot(self, base_model: PreTrainedModel, config: ft.FinetuneConfig) -> _FullSlot:
        return _FullSlot(base_model)

    def response_timer(self, cell: Cell, evaluation: Evaluation) -> ResponseTimer:
        """A whole model per user: cold reads it (the DA model's folder stands in when FULL models were not
        kept: same architecture and file size, so the same read time), warm generates with it in memory."""
        device = evaluation.device
        held: dict[str, torch.nn.Module] = {}
        reply = timed_reply(cell, evaluation)

        def time_user(row: pd.DataFrame, user: str, k: int) -> tuple[float, float]:
            saved = ft.user_dir(self.folder(cell), user) / ft.MODEL_DIR
            folder = saved if saved.is_dir() else DA.base_model_dir(cell)

            def load_and_reply() -> None:
                held["model"] = held_for_timing(folder, evaluation)
                reply(held["model"], row)

            cold = timed(load_and_reply, device)
            return cold, timed(lambda: reply(held["model"], row), device)

        return time_user


# ---------------------------------------------------------------------------------------------------------------
# peft methods: any peft config (`PeftMethod`), and LoRA (§3.5) with its batched training and routed evaluation


@dataclass
class _PeftSlot:
    """A peft adapter per user on one base: the base is wrapped once, one adapter added and deleted per user,
    and unwrapped at the end."""

    base: PreTrainedModel
    peft_config: PeftConfig
    model: torch.nn.Module | None = None

    def begin(self, config: ft.FinetuneConfig) -> list[torch.nn.Parameter]:
        torch.manual_seed(config.seed)  # the adapter's initial weights (LoRA's A matrices)
        if self.model is None:
            self.model = get_peft_model(self.base, self.peft_config, adapter_name=ft.ADAPTER_NAME)
        else:
            self.model.add_adapter(ft.ADAPTER_NAME, self.peft_config)
            self.model.set_adapter(ft.ADAPTER_NAME)  # also makes it (only it) trainable
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, staging: Path, tokenizer: PreTrainedTokenizerBase, options: ft.UserTrainingOptions) -> None:
        self.model.save_pretrained(str(staging / ft.ADAPTER_DIR), selected_adapters=[ft.ADAPTER_NAME],
                                   save_embedding_layers=False)

    def end(self) -> None:
        if self.model is not None and ft.ADAPTER_NAME in self.model.peft_config:
            self.model.delete_adapter(ft.ADAPTER_NAME)

    def close(self) -> None:
        if self.model is not None:
            self.end()
            self.model.unload()


class PeftMethod(PerUserMethod):
    """Any peft method, one adapter per user, from a config dict as the parameters give it (peft's
    `get_peft_config`: `{"peft_type": "IA3"}`, `{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}`, ...;
    the family's task type is filled in). Trained one user at a time; evaluated in memory, as FULL."""

    paper: ClassVar[bool] = False
    plan_kind: ClassVar[str] = "lora"  # priced as one user's peft LoRA step: an adapter on a frozen base

    def __init__(self, name: str, peft: Mapping[str, Any], label: str = ""):
        if not name.isidentifier():
            raise ValueError(f"peft method name {name!r}: use a plain identifier (it names folders and columns)")
        if "peft_type" not in peft:
            raise ValueError(f"peft method {name!r}: its config needs a peft_type (e.g. IA3, PREFIX_TUNING)")
        self.name = name  # type: ignore[misc]  # an instance's name: methods built from parameters
        self.label = label or name
        self.peft = dict(peft)

    def __repr__(self) -> str:
        return f"PeftMethod({self.name!r}, {self.peft!r})"

    @property
    def record(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "peft": self.peft}

    def peft_config(self, model: PreTrainedModel, config: ft.FinetuneConfig) -> PeftConfig:
        return get_peft_config({"task_type": family_of(model).task_type, **self.peft})

    def user_slot(self, base_model: PreTrainedModel, config: ft.FinetuneConfig) -> _PeftSlot:
        return _PeftSlot(base_model, self.peft_config(base_model, config))

    def disk_bytes(self, cell: Cell) -> float | None:
        adapters = [d / ft.ADAPTER_DIR for d in self.folder(cell).glob("*") if (d / ft.ADAPTER_DIR).is_dir()]
        return sum(weights_bytes(a) for a in adapters) / len(adapters) if adapters else None


def adapter_names_for(user_ids: Collection[str]) -> dict[str, str]:
    """Module-safe adapter names (`u0`, `u1`, ...) for user ids, in sorted id order."""
    return {user: f"u{k}" for k, user in enumerate(sorted(set(user_ids)))}


class Lora(PeftMethod):
    """§3.5 LoRA (r=12 by default; the family's attention projections): one adapter per user, trained
    several users per step (`multilora`) or one at a time, saved in PEFT's format and evaluated later with
    every user's adapter on one base (`load_all`)."""

    NAME = names.LORA
    paper: ClassVar[bool] = True
    swept: ClassVar[bool] = True
    batched_lora: ClassVar[bool] = True
    evaluated_in_memory: ClassVar[bool] = False
    frozen_base: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__(self.NAME, {"peft_type": "LORA"}, names.LABELS[names.LORA])

    def __repr__(self) -> str:
        return "Lora()"

    @property
    def record(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label}

    def peft_config(self, model: PreTrainedModel, config: ft.FinetuneConfig) -> PeftConfig:
        return family_of(model).lora_config(config)  # r, alpha, dropout, targets from the FinetuneConfig

    def train_on_base(self, base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cell: Cell,
                      out_dir: Path, config: ft.FinetuneConfig, options: ft.UserTrainingOptions,
                      after_user: ft.AfterUser | None) -> pd.DataFrame:
        if options.lora_training != "batched":
            return super().train_on_base(base_model, tokenizer, cell, out_dir, config, options, after_user)
        device = str(next(base_model.parameters()).device)
        base_model.to(dtype=resolve_precision(config.precision, device).frozen_dtype)
        return run_users_batched(self, base_model, tokenizer, cell, out_dir, config, options, after_user)

    def load_all(self, cell: Cell, evaluation: Evaluation) -> tuple[Any, dict[str, str]]:
        """The DA model with every user's adapter loaded (names from `adapter_names_for`), for
        `generation.greedy_generate` / `reference_nll` with `adapter_names`.

        `evaluation.lora_eval` "routed": a `RoutedAdapters` (one routed pass per layer for all users of a
        batch); "peft": a `PeftModel` running peft's mixed-adapter batches (the reference; same replies,
        slower). The base is held in the precision's frozen dtype (`inference_model`); the adapters stay fp32.
        """
        if evaluation.lora_eval not in LORA_EVAL_MODES:
            raise ValueError(f"lora_eval must be one of {LORA_EVAL_MODES}, not {evaluation.lora_eval!r}")
        names = adapter_names_for(cell.user_ids)
        base = evaluation.model(DA.base_model_dir(cell))
        dirs = {names[u]: ft.user_dir(self.folder(cell), u) / ft.ADAPTER_DIR for u in sorted(names)}
        missing = [str(d) for d in dirs.values() if not d.is_dir()]
        if missing:
            raise FileNotFoundError(f"LoRA adapters missing (rerun notebook 03): {missing[:3]}")
        load = load_routed_adapters if evaluation.lora_eval == "routed" else load_user_adapters
        return load(base, dirs), names

    def predict(self, cell: Cell, evaluation: Evaluation, generate_ids: Collection[Any] | None) -> pd.DataFrame:
        test = cell.test
        generate = None if generate_ids is None else test["pair_id"].isin(set(generate_ids)).tolist()
        model, names = self.load_all(cell, evaluation)
        return predict_pairs(model, test, evaluation.predictor(cell, test), generate=generate,
                             adapter_names=[names[u] for u in test["speaker_id"]]).assign(method=self.name)

    def answer(self, cell: Cell, evaluation: Evaluation, asked: pd.DataFrame) -> pd.DataFrame:
        model, names = self.load_all(cell, evaluation)
        sources = build_prompts(asked, cell.users, cell.fmt).tolist()
        replies = greedy_generate(model, evaluation.tokenizer, sources, evaluation.decoding,
                                  adapter_names=[names[u] for u in asked["speaker_id"]])
        return asked.assign(reply=replies, method=self.name)

    def response_timer(self, cell: Cell, evaluation: Evaluation) -> ResponseTimer:
        """The DA base stays in memory: cold reads the user's adapter onto it, warm switches to the adapter
        already loaded."""
        device = evaluation.device
        base = held_for_timing(DA.base_model_dir(cell), evaluation)
        held: dict[str, PeftModel] = {}
        reply = timed_reply(cell, evaluation)

        def time_user(row: pd.DataFrame, user: str, k: int) -> tuple[float, float]:
            adapter, name = ft.user_dir(self.folder(cell), user) / ft.ADAPTER_DIR, f"u{k}"

            def load_adapter() -> None:
                if "model" not in held:
                    held["model"] = PeftModel.from_pretrained(base, str(adapter), adapter_name=name)
                else:
                    held["model"].load_adapter(str(adapter), adapter_name=name)
                held["model"].set_adapter(name)
                held["model"].eval()
                reply(held["model"], row)

            cold = timed(load_adapter, device)
            return cold, timed(lambda: (held["model"].set_adapter(name), reply(held["model"], row)), device)

        return time_user


# ---------------------------------------------------------------------------------------------------------------
# RAG + per-user LoRA


class RagLora(Lora):
    """Retrieval-augmented LoRA (not in the paper): each input's head carries the user's `k` most similar own
    training replies (`retrieval.UserMemories`, by context similarity; a training pair never retrieves
    itself), and the user's adapter is trained and evaluated on such inputs. The replies cost input tokens,
    so its source budget is the run's plus `extra_tokens`: the context it sees is the same as LoRA's.

    Leak guard: the index holds only the cell's training pairs of its users (`retrieval`): no dev or test
    reply ever reaches an input (tests/test_retrieval.py plants one and looks for it).
    """

    NAME = names.RAG_LORA
    LABEL = names.LABELS[names.RAG_LORA]
    paper: ClassVar[bool] = False
    swept: ClassVar[bool] = False  # trains at the rate LoRA's sweep chose

    def __init__(self, k: int = 2, max_words: int = 12, extra_tokens: int = 32, embedder: str = "minilm"):
        PeftMethod.__init__(self, self.NAME, {"peft_type": "LORA"}, self.LABEL)
        if k < 1 or max_words < 1 or extra_tokens < 0:
            raise ValueError(f"RAG needs k >= 1, max_words >= 1, extra_tokens >= 0; got {k}, {max_words}, {extra_tokens}")
        self.k, self.max_words, self.extra_tokens, self.embedder_name = k, max_words, extra_tokens, embedder
        self._embedders: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"RagLora(k={self.k}, max_words={self.max_words}, extra_tokens={self.extra_tokens})"

    @property
    def record(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label,
                "rag": {"k": self.k, "max_words": self.max_words, "extra_tokens": self.extra_tokens,
                        "embedder": self.embedder_name}}

    def _embedder(self, device: str) -> Any:
        if device not in self._embedders:
            self._embedders[device] = load_embedder(self.embedder_name, device=device)
        return self._embedders[device]

    def with_memories(self, cell: Cell, frame: pd.DataFrame, device: str) -> pd.DataFrame:
        """`frame` (pairs of the cell's users, or questions put to them) with each row's `memory`: the user's
        retrieved own training replies, from the cell's training pairs only."""
        index = UserMemories.from_pairs(self._embedder(device), cell.pairs, cell.user_ids)
        found = index.retrieve(frame, self.k)
        return frame.assign(memory=[memory_head(m, self.max_words) for m in found])

    def plan_scale(self, source_tokens: int) -> float:
        return (source_tokens + self.extra_tokens) / max(source_tokens, 1)  # longer inputs, the same step otherwise

    def rag_cell(self, cell: Cell, device: str) -> Cell:
        return cell.with_pairs(self.with_memories(cell, cell.pairs, device))

    def train(self, cell: Cell, job: TrainingJob) -> pd.DataFrame:
        lora = job.configs.get(Lora.NAME, job.config)  # LoRA's own config (its swept rate), more input tokens
        config = replace(lora, max_source_length=lora.max_source_length + self.extra_tokens)
        return self.train_users(self.rag_cell(cell, job.device), job, self.folder(cell), config)

    def _evaluation(self, evaluation: Evaluation) -> Evaluation:
        decoding = evaluation.decoding
        return replace(evaluation, decoding=replace(decoding, max_source_length=decoding.max_source_length
                                                    + self.extra_tokens))

    def predict(self, cell: Cell, evaluation: Evaluation, generate_ids: Collection[Any] | None) -> pd.DataFrame:
        return super().predict(self.rag_cell(cell, evaluation.device), self._evaluation(evaluation), generate_ids)

    def answer(self, cell: Cell, evaluation: Evaluation, asked: pd.DataFrame) -> pd.DataFrame:
        asked = self.with_memories(cell, asked, evaluation.device)
        return super().answer(cell, self._evaluation(evaluation), asked).drop(columns=["memory"])

    def response_timer(self, cell: Cell, evaluation: Evaluation) -> ResponseTimer | None:
        return None
