"""User-specific fine-tuning (§3.5, §4.1.3): domain adaptation, One-ID, LoRA and FULL.

- Domain adaptation (§4.1.3): a pre-trained model is trained on the pooled `train_da` halves of all
  evaluation users, with the prompt format of its pre-training; early stopping on the pooled `dev` pairs.
- One-ID (§4.1.3): one model for all users, trained on the pooled `train_ft` halves with each user's
  4-character id in front of the prompt (`prompts.add_user_id`).
- LoRA (§3.5): one adapter per user on the domain-adapted model, trained on that user's `train_ft` pairs
  and stopped early on that user's `dev` pairs; saved in PEFT's own format.
- FULL: every weight updated per user; the base weights come back from an in-memory copy between users.

Every function works for both model families (`families.family_of(model)`: T5, the paper's, or a causal
LM): the family tokenizes the pairs (loss on the reply only), pads the batches and names the LoRA targets.

Training is a small plain loop (`train_with_early_stopping`) rather than the HF Trainer: per-user runs are
tiny and need exact control of early stopping and of restoring the best weights. Adam with lr 1e-4 and
stopping "when the validation loss began to rise" are §4.1.3's; batch size, epoch cap and the LoRA
scaling/dropout are not reported and are ours (see `FinetuneConfig`).

`run_users` loops over users and is resumable: each user's folder is built in a temp folder, a `done.json`
marker is written last and the folder renamed into place, so a killed run leaves either a complete user or
nothing; a rerun skips users with a marker. Each user is seeded from (seed, user_id), not from its position
in the loop, so a resumed run gives the same artifacts as an uninterrupted one.

`pairs` everywhere is one split set's rows of stage 00's `eval_pairs.parquet` (filter `split_set` first).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from transformers import PreTrainedModel, PreTrainedTokenizerBase, T5ForConditionalGeneration

from udg_lib import io
from udg_lib.conditions import Cell, evaluation_rows, evaluation_user_ids
from udg_lib.precision import Precision, autocast_for, training_attention
from udg_lib.families import (  # SELF_ATTENTION_QKVO and seq2seq_collator are re-exported for callers of old
    SELF_ATTENTION_QKVO,
    SEQ2SEQ,
    ModelFamily,
    family_of,
    seq2seq_collator,
    t5_config,
)
from udg_lib.progress import progress_bar
from udg_lib.encoding import LABEL_PAD_ID, Seq2SeqExamples
from udg_lib.prompts import assign_one_ids, build_prompts

# peft calls transformers' deprecated `is_gradient_checkpointing` once per adapter: one warning per user.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)

EXECUTORS: tuple[str, ...] = ("local", "ray")  # where per-user models train (`executors.train_users`)
LORA_TRAINING: tuple[str, ...] = ("per_user", "batched")  # LoRA users one at a time, or several per pass
DONE_FILE = "done.json"  # per-user completion marker, written last
ADAPTER_DIR = "adapter"  # per-user LoRA adapter (adapter_config.json + adapter_model.safetensors)
MODEL_DIR = "model"  # per-user FULL model (save_pretrained), only with save_full_models=True
ADAPTER_NAME = "default"  # PEFT saves a "default" adapter at the folder's top level, any other in a subfolder

# ---------------------------------------------------------------------------------------------------------------
# Configuration and the training loop


@dataclass
class FinetuneConfig:
    learning_rate: float = 1e-4  # §4.1.3: Adam, lr 1e-4 (torch.optim.Adam, no weight decay, constant)
    batch_size: int = 8  # training batch (not reported; users have ~50-150 fine-tuning pairs)
    eval_batch_size: int = 32  # dev-loss batch
    max_epochs: int = 30  # cap; early stopping normally ends a run well before
    patience: int = 1  # §4.1.3 "terminate learning when the validation loss began to rise": 1 epoch
    min_delta: float = 0.0  # an epoch improves when dev loss < best - min_delta
    max_source_length: int = 128  # prompt tokens, </s> included (as pre-training)
    max_target_length: int = 48  # reply tokens, </s> included (as pre-training)
    seed: int = 0  # run_users derives each user's seed from (seed, user_id)
    lora_r: int = 12  # §4.1.3
    lora_alpha: float = 24.0  # not reported; 2r (scale alpha/r = 2), a common choice
    lora_dropout: float = 0.1  # not reported; T5's own dropout rate
    # module-name suffixes (tuple) or one regex (str) that peft full-matches; see SELF_ATTENTION_QKVO above
    lora_target_modules: tuple[str, ...] | str = SELF_ATTENTION_QKVO
    # "fp32", "bf16" or "auto" (bf16 where the device multiplies it natively: `precision.resolve_precision`).
    # bf16 runs forward passes under autocast; the weights being trained and Adam stay fp32. A frozen LoRA base
    # is held in bf16 by whoever loads it (`experiments`). On an AVX2-only CPU bf16 is emulated and slower.
    precision: str = "fp32"

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if not isinstance(self.lora_target_modules, str):
            values["lora_target_modules"] = list(self.lora_target_modules)
        return values


@dataclass
class TrainingSummary:
    """What one `train_with_early_stopping` run did. Epoch 0 is the model before training."""

    epochs_run: int  # training epochs completed
    best_epoch: int  # the epoch whose weights were kept (0: training never beat the starting weights)
    best_dev_loss: float  # token-level cross-entropy on dev at best_epoch (NaN without dev examples)
    initial_dev_loss: float
    train_losses: list[float] = field(default_factory=list)  # per epoch: mean of batch losses
    dev_losses: list[float] = field(default_factory=list)  # per epoch, after it (epoch 0 not included)
    stopped_early: bool = False
    steps: int = 0
    n_train: int = 0
    n_dev: int = 0
    trainable_parameters: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class LengthBucketSampler(Sampler[int]):
    """A seeded random order in which neighbouring examples have similar lengths, so batches pad little.

    Each epoch draws a permutation exactly as `RandomSampler` does with `generator` (so the generator is consumed
    as before), cuts it into mega-batches of `batch_size` x min(50, n / (4 x batch_size)) examples and sorts each
    by length, longest first: transformers' `LengthGroupedSampler` (the Trainer's `group_by_length`) without
    its move of the longest example to the first batch, which would change which examples share a batch even
    where no mega-batch is larger than a batch (a user's few dozen pairs)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator):
        self.lengths, self.batch_size = list(lengths), batch_size
        self.order = RandomSampler(range(len(self.lengths)), generator=generator)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        indices = list(self.order)
        size = self.batch_size * max(1, min(50, len(indices) // (4 * self.batch_size)))
        for start in range(0, len(indices), size):
            yield from sorted(indices[start:start + size], key=lambda i: -self.lengths[i])


def training_loader(examples: Dataset, batch_size: int, generator: torch.Generator,
                    collate_fn: Callable) -> DataLoader:
    """Training batches of similar lengths in a seeded random order (`LengthBucketSampler`); examples without
    `input_ids` (not tokenized pairs) in a plain seeded random order."""
    if len(examples) and isinstance(examples[0], Mapping) and "input_ids" in examples[0]:
        lengths = [len(examples[i]["input_ids"]) for i in range(len(examples))]
        sampler: Sampler[int] = LengthBucketSampler(lengths, batch_size, generator)
    else:
        sampler = RandomSampler(examples, generator=generator)
    return DataLoader(examples, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)


def padding_share(lengths: Sequence[int], batches: Iterable[Sequence[int]]) -> float:
    """The share of padded positions when the examples of `lengths` are padded to each batch's longest
    (`batches`: lists of example indices)."""
    real = padded = 0
    for batch in batches:
        if batch:
            real += sum(lengths[i] for i in batch)
            padded += max(lengths[i] for i in batch) * len(batch)
    return 1 - real / padded if padded else 0.0


@torch.no_grad()
def dev_loss(model: torch.nn.Module, examples: Dataset, collator: Callable, batch_size: int = 32,
             precision: str | Precision = "fp32") -> float:
    """Token-level cross-entropy over `examples` (each batch's mean weighted by its label tokens); NaN if none.

    Batches are taken in dataset order, so the value does not depend on any random state.
    """
    if len(examples) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    device = _device(model)
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = _to(collator([examples[i] for i in range(start, min(start + batch_size, len(examples)))]), device)
        n = int((batch["labels"] != LABEL_PAD_ID).sum())
        with autocast_for(precision, device):
            total += float(model(**batch).loss) * n
        tokens += n
    model.train(was_training)
    return total / tokens if tokens else float("nan")


def train_with_early_stopping(model: torch.nn.Module, train_examples: Dataset, dev_examples: Dataset,
                              collator: Callable, config: FinetuneConfig,
                              params: Iterable[torch.nn.Parameter] | None = None) -> TrainingSummary:
    """Adam on `params` (default: every parameter with requires_grad) for up to `max_epochs` epochs.

    After each epoch the dev loss is measured; when it has not improved on the best so far for `patience`
    epochs in a row, training stops. The best weights (epoch 0, the starting weights, included) are then put
    back into `params`, so the model leaves this function at its best dev loss. Without dev examples it
    trains `max_epochs` epochs and keeps the last weights.

    Deterministic given `config.seed`: dropout draws from torch's global generator, seeded here, and the
    shuffling from its own seeded generator. Only `params` go to the optimizer; other weights stay as they are.
    On a CPU the model trains with eager attention (`precision.training_attention`), then gets its own back.
    """
    with training_attention(model, _device(model)):
        return _train_with_early_stopping(model, train_examples, dev_examples, collator, config, params)


def _train_with_early_stopping(model: torch.nn.Module, train_examples: Dataset, dev_examples: Dataset,
                               collator: Callable, config: FinetuneConfig,
                               params: Iterable[torch.nn.Parameter] | None) -> TrainingSummary:
    started = time.perf_counter()
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    torch.manual_seed(config.seed)
    shuffler = torch.Generator().manual_seed(config.seed)
    device = _device(model)
    optimizer = torch.optim.Adam(params, lr=config.learning_rate)  # §4.1.3: Adam, lr 1e-4, no weight decay
    has_dev = len(dev_examples) > 0

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    best_loss = initial = dev_loss(model, dev_examples, collator, config.eval_batch_size, config.precision)
    best_state, best_epoch = (snapshot() if has_dev else None), 0
    summary = TrainingSummary(epochs_run=0, best_epoch=0, best_dev_loss=best_loss, initial_dev_loss=initial,
                              n_train=len(train_examples), n_dev=len(dev_examples),
                              trainable_parameters=sum(p.numel() for p in params))
    if len(train_examples) > 0:
        loader = training_loader(train_examples, config.batch_size, shuffler, collator)
        bad_epochs = 0
        for epoch in range(1, config.max_epochs + 1):
            model.train()
            losses = []
            for batch in loader:
                with autocast_for(config.precision, device):
                    loss = model(**_to(batch, device)).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                summary.steps += 1
            summary.train_losses.append(sum(losses) / len(losses))
            summary.epochs_run = epoch
            if not has_dev:
                summary.dev_losses.append(float("nan"))
                continue
            loss = dev_loss(model, dev_examples, collator, config.eval_batch_size, config.precision)
            summary.dev_losses.append(loss)
            if loss < best_loss - config.min_delta:
                best_loss, best_epoch, best_state, bad_epochs = loss, epoch, snapshot(), 0
            else:
                bad_epochs += 1
                if bad_epochs >= config.patience:
                    summary.stopped_early = epoch < config.max_epochs
                    break
        if has_dev:
            with torch.no_grad():
                for p, saved in zip(params, best_state):
                    p.copy_(saved)
    model.eval()
    summary.best_epoch = best_epoch if has_dev else summary.epochs_run
    summary.best_dev_loss = best_loss
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Examples


def _check_one_split_set(pairs: pd.DataFrame) -> None:
    if "split_set" in pairs.columns and pairs["split_set"].nunique() > 1:
        raise ValueError(f"pairs hold split sets {sorted(pairs['split_set'].unique())}; pass one split set's rows")


def user_examples(pairs: pd.DataFrame, user_id: str, split: str) -> pd.DataFrame:
    """The reply pairs `user_id` speaks in `split`: the only rows a per-user model of that user sees."""
    _check_one_split_set(pairs)
    return pairs[(pairs["speaker_id"] == user_id) & (pairs["split"] == split)]


def check_evaluation_unit(pairs: pd.DataFrame, user_id: str) -> None:
    """A user is fine-tuned only on real data: fine-tuning and dev pairs in this split set, or ValueError."""
    own = pairs.loc[pairs["speaker_id"] == user_id, "split"]
    missing = [s for s in ("train_ft", "dev") if not (own == s).any()]
    if missing:
        raise ValueError(f"user {user_id!r} has no {' or '.join(missing)} pairs in this split set; stage 00 leaves "
                         "such users out of the set, so pass only the users with pairs there")


def pooled_examples(pairs: pd.DataFrame, user_ids: Iterable[str], split: str) -> pd.DataFrame:
    """`split` pairs of all `user_ids`, pooled (domain adaptation, One-ID)."""
    _check_one_split_set(pairs)
    return pairs[pairs["speaker_id"].isin(set(user_ids)) & (pairs["split"] == split)]


def one_ids_of(users: pd.DataFrame, seed: int = 0) -> dict[str, str]:
    """Users' One-IDs: stage 00's `one_id` column where present, else `prompts.assign_one_ids`."""
    users = evaluation_rows(users)  # One-IDs belong to evaluation users only
    if "one_id" in users.columns:
        ids = dict(zip(users["user_id"], users["one_id"]))
        bad = {u: i for u, i in ids.items() if not isinstance(i, str)}
        if bad:  # e.g. "0042" read back by read_csv as 42: read eval_users.csv with dtype=str
            raise ValueError(f"One-IDs must be strings (read eval_users.csv with dtype=str); got {bad}")
        return ids
    return assign_one_ids(users["user_id"], seed=seed)


def encode_pairs(pairs: pd.DataFrame, users: pd.DataFrame, fmt: str, tokenizer: PreTrainedTokenizerBase,
                 config: FinetuneConfig, one_ids: Mapping[str, str] | None = None,
                 family: ModelFamily = SEQ2SEQ) -> Seq2SeqExamples:
    """Prompts (`fmt`, optionally with One-IDs) -> replies, tokenized as in pre-training for `family`
    (T5: source -> labels; causal LM: one sequence with the loss on the reply only)."""
    sources = build_prompts(pairs, users, fmt, one_ids).tolist()
    return family.tokenize_pairs(sources, pairs["response"].tolist(), tokenizer, config.max_source_length,
                                 config.max_target_length, one_id_prefix=one_ids is not None)


def _eval_user_ids(users: pd.DataFrame, user_ids: Iterable[str] | None) -> list[str]:
    return sorted(user_ids) if user_ids is not None else evaluation_user_ids(users)


def domain_adapt(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: pd.DataFrame,
                 users: pd.DataFrame, fmt: str, config: FinetuneConfig,
                 user_ids: Iterable[str] | None = None) -> tuple[PreTrainedModel, TrainingSummary]:
    """§4.1.3 domain adaptation: all parameters, on the pooled `train_da` pairs of the evaluation users
    (`user_ids`, default every user in `users`) with the model's pre-training prompt format `fmt`;
    early stopping on their pooled `dev` pairs. Trains `model` in place and returns it with the summary."""
    ids, family = _eval_user_ids(users, user_ids), family_of(model)
    train = encode_pairs(pooled_examples(pairs, ids, "train_da"), users, fmt, tokenizer, config, family=family)
    dev = encode_pairs(pooled_examples(pairs, ids, "dev"), users, fmt, tokenizer, config, family=family)
    summary = train_with_early_stopping(model, train, dev, family.collator(tokenizer), config)
    return model, summary


def train_one_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: pd.DataFrame,
                 users: pd.DataFrame, fmt: str, config: FinetuneConfig, user_ids: Iterable[str] | None = None,
                 one_ids: Mapping[str, str] | None = None) -> tuple[PreTrainedModel, TrainingSummary]:
    """§4.1.3 One-ID: one model on every user's `train_ft` pairs, each prompt prefixed with its speaker's
    One-ID (default: `one_ids_of(users)`); early stopping on the pooled `dev` pairs (with ids too)."""
    ids = _eval_user_ids(users, user_ids)
    one_ids = dict(one_ids) if one_ids is not None else one_ids_of(users, config.seed)
    missing = [u for u in ids if u not in one_ids]
    if missing:
        raise ValueError(f"no One-ID for users {missing[:5]}")
    family = family_of(model)
    train = encode_pairs(pooled_examples(pairs, ids, "train_ft"), users, fmt, tokenizer, config, one_ids, family)
    dev = encode_pairs(pooled_examples(pairs, ids, "dev"), users, fmt, tokenizer, config, one_ids, family)
    summary = train_with_early_stopping(model, train, dev, family.collator(tokenizer), config)
    return model, summary


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def lora_config(config: FinetuneConfig, family: ModelFamily = SEQ2SEQ) -> LoraConfig:
    """peft's LoraConfig for `config` on `family`'s targets (`ModelFamily.lora_config`)."""
    return family.lora_config(config)


def lora_trainable_parameters(config: FinetuneConfig, preset: str = "t5-base", vocab_size: int = 32128) -> int:
    """Trainable LoRA parameters for a T5 preset's shape, counted by peft on a weightless (meta) model."""
    with torch.device("meta"):
        model = T5ForConditionalGeneration(t5_config(preset, vocab_size))
    peft_model = get_peft_model(model, lora_config(config), low_cpu_mem_usage=True)
    return peft_model.get_nb_trainable_parameters()[0]


def load_user_adapter(base_model: PreTrainedModel, adapter_dir: str | Path,
                      is_trainable: bool = False) -> PeftModel:
    """A saved user adapter on `base_model` (PEFT's own loader; `base_model` is wrapped in place).

    To switch between users on one base, load the next with `peft_model.load_adapter(dir, adapter_name=user)`
    and `peft_model.set_adapter(user)`, or `delete_adapter` the current one first.
    """
    return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)


# ---------------------------------------------------------------------------------------------------------------
# Per-user loop (LoRA, FULL), resumable


def user_seed(seed: int, user_id: str) -> int:
    """A user's training seed: a function of (seed, user_id) only, never of the user's place in the loop."""
    digest = hashlib.blake2b(f"{seed}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def user_dir_name(user_id: str) -> str:
    """A folder name for a user id (ids may hold '/' as `corpus/user`): readable part + hash, collision-free."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", user_id).strip("._")[:48] or "user"
    return f"{readable}-{hashlib.sha1(user_id.encode()).hexdigest()[:8]}"


def user_dir(out_dir: str | Path, user_id: str) -> Path:
    return Path(out_dir) / user_dir_name(user_id)


def is_user_done(out_dir: str | Path, user_id: str) -> bool:
    return (user_dir(out_dir, user_id) / DONE_FILE).is_file()


def read_user_summary(out_dir: str | Path, user_id: str) -> dict[str, Any]:
    return json.loads((user_dir(out_dir, user_id) / DONE_FILE).read_text(encoding="utf-8"))


def user_table(out_dir: str | Path, user_ids: Sequence[str], statuses: Mapping[str, str]) -> pd.DataFrame:
    """The per-user result table (user_id, status, dir, the summary's fields) read back from done.json files,
    in `user_ids` order: what `run_users`, `multilora.run_users_batched` and `executors.train_users` return."""
    rows = []
    for user in user_ids:
        record = read_user_summary(out_dir, user)
        rows.append({"user_id": user, "status": statuses[user], "dir": str(user_dir(out_dir, user)),
                     **record["summary"]})
    return pd.DataFrame(rows)


AfterUser = Callable[[str, torch.nn.Module, Path], None]


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
        if self.lora_training not in LORA_TRAINING:
            raise ValueError(f"lora_training must be one of {LORA_TRAINING}, not {self.lora_training!r}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, not {self.executor!r}")
        if self.users_per_batch < 1:
            raise ValueError(f"users_per_batch must be at least 1, got {self.users_per_batch}")
        if self.users_per_task < 1:
            raise ValueError(f"users_per_task must be at least 1, got {self.users_per_task}")
        if self.num_cpus_per_task < 0 or self.num_gpus_per_task < 0:
            raise ValueError(f"resources per task must be >= 0, got num_cpus={self.num_cpus_per_task}, "
                             f"num_gpus={self.num_gpus_per_task}")


class UserSlot(Protocol):
    """One per-user method's hold on a base model while `run_users` trains user after user on it
    (`methods.Full.user_slot`, `methods.PeftMethod.user_slot`)."""

    model: torch.nn.Module  # what a user trains and `after_user` evaluates

    def begin(self, config: FinetuneConfig) -> list[torch.nn.Parameter] | None:
        """Fresh per-user weights; the parameters to train (None: all of `model`)."""

    def save(self, staging: Path, tokenizer: PreTrainedTokenizerBase, options: UserTrainingOptions) -> None:
        """The user's trained weights into its (staging) folder."""

    def end(self) -> None:
        """Drop the user's weights (also after a failure)."""

    def close(self) -> None:
        """Give the base model back unchanged."""


class UserMethod(Protocol):
    """What `run_users` needs of a per-user method: its name and a slot on a base model."""

    name: str

    def user_slot(self, base_model: PreTrainedModel, config: FinetuneConfig) -> UserSlot: ...


def _check_users(cell: Cell) -> None:
    duplicated = sorted(u for u, n in Counter(cell.user_ids).items() if n > 1)
    if duplicated:
        raise ValueError(f"user_ids lists users more than once: {duplicated[:5]}")
    unknown = [u for u in cell.user_ids if u not in set(cell.users["user_id"])]
    if unknown:
        raise ValueError(f"{len(unknown)} user_ids are not in users['user_id']: {unknown[:5]}")


def run_users(method: UserMethod, base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cell: Cell,
              out_dir: str | Path, config: FinetuneConfig, options: UserTrainingOptions | None = None,
              after_user: AfterUser | None = None) -> pd.DataFrame:
    """Train one model of a per-user `method` for every user of `cell`, one after the other, resumably: a
    LoRA or other peft adapter (§3.5) or a FULL model (§4.1.3).

    Each user trains on `user_examples(cell.pairs, user, "train_ft")` only, stops early on its own `dev`
    pairs, with the cell's prompt format and seed `user_seed(config.seed, user)`. Per user,
    `out_dir/<user_dir_name>/` holds what the method saves (an adapter: `adapter/`, PEFT format; a FULL
    model only with `options.save_full_models`) and `done.json` (user_id, method, summary, config), written
    last. `after_user(user_id, model, folder)` runs while the user's trained model is in memory, before the
    marker (e.g. to write its dev/test replies into `folder`, which is published with the rest).

    `base_model` is used in place and given back unchanged (the method's slot restores it). Users with a
    `done.json` are skipped. Returns one row per user in `cell.user_ids` order: user_id, status
    ("trained" / "skipped"), dir, and the summary's fields.
    """
    if not callable(getattr(method, "user_slot", None)):
        raise TypeError("run_users trains a per-user method (methods.LORA, methods.FULL, a PeftMethod), "
                        f"not {getattr(method, 'name', method)!r}")
    options = options or UserTrainingOptions()
    _check_users(cell)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family = family_of(base_model)
    collator = family.collator(tokenizer)
    requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
    statuses: dict[str, str] = {}
    slot = method.user_slot(base_model, config)
    try:
        for user in progress_bar(list(cell.user_ids), desc=f"{method.name} users", disable=not options.progress):
            if is_user_done(out_dir, user):
                statuses[user] = "skipped"
                continue
            user_config = replace(config, seed=user_seed(config.seed, user))
            check_evaluation_unit(cell.pairs, user)
            train = encode_pairs(user_examples(cell.pairs, user, "train_ft"), cell.users, cell.fmt, tokenizer, config,
                                 family=family)
            dev = encode_pairs(user_examples(cell.pairs, user, "dev"), cell.users, cell.fmt, tokenizer, config,
                               family=family)
            with io.staged_dir(user_dir(out_dir, user)) as staging:  # renamed into place once done.json is in
                try:
                    params = slot.begin(user_config)
                    summary = train_with_early_stopping(slot.model, train, dev, collator, user_config, params)
                    slot.save(staging, tokenizer, options)
                    if after_user is not None:
                        after_user(user, slot.model, staging)
                finally:
                    slot.end()
                io.write_json(staging / DONE_FILE, {"user_id": user, "method": method.name, "fmt": cell.fmt,
                                                    "seed": user_config.seed, "summary": summary.as_dict(),
                                                    "config": config.as_dict()})
            statuses[user] = "trained"
    finally:
        slot.close()
        for name, p in base_model.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
        base_model.eval()

    return user_table(out_dir, cell.user_ids, statuses)
