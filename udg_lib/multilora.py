"""Batched multi-user LoRA (§3.5, §4.1.3): many users' adapters trained, or evaluated, in one forward pass.

`finetuning.run_users(methods.LORA, ...)` trains one user's adapter at a time, so on a GPU each step is a small,
mostly idle batch, and on any device the per-step Python overhead is paid once per user. Here up to
`users_per_batch` users train side by side on one plain base model:

- `MultiLora` puts forward hooks on the target `nn.Linear` modules (the ones peft would wrap for
  `config.lora_target_modules`, matched by peft's own `check_target_module_exists`). Each hook adds
  `scaling * B_u(A_u(dropout(x)))` to the module's output, where `u` is the user of that batch row: the users'
  A/B matrices are stacked, gathered per row and applied with `bmm`. peft's mixed-batch `adapter_names` does
  this for inference only (it raises in training mode), hence the hooks.
- Each user keeps its own A/B `nn.Parameter`s (initialised as peft does: A `kaiming_uniform_(a=sqrt(5))`, B 0,
  under `torch.manual_seed(user_seed(seed, user))`) and its own `torch.optim.Adam`, so the optimizer state is
  per user exactly as in the one-user loop.
- One step takes the next batch of every active user, concatenates them, runs one forward, and backpropagates
  the sum over users of each user's own mean token loss: rows never interact (T5 or causal LM) and a user's weights are
  gathered only into its own rows, so each user's gradient is the one it would get alone.
- A user's epoch ends when its own loader is exhausted; its dev loss is then measured (batched with every
  user whose epoch ended at the same step) and early stopping is applied to it alone, exactly as
  `finetuning.train_with_early_stopping` does (patience, min_delta, epoch 0 = the starting weights, best
  weights restored). A finished user is saved and its slot goes to the next user in the queue at once
  (a rolling queue rather than fixed groups: users stop after different numbers of epochs, and fixed groups
  would leave slots idle until the slowest member of the group finishes).

Saved adapters are PEFT's own format in `run_users`' layout (`<out_dir>/<user_dir_name>/adapter/` +
`done.json`), so `finetuning.load_user_adapter` / `PeftModel.from_pretrained` load them, and a run is
resumable in the same way (users with a `done.json` are skipped).

Evaluation uses the same per-row routing (`routing.RoutedAdapters`, in a module below this one and
generation): it loads many users' saved adapters onto one plain base model, stacked once, and runs each batch
row through its own user's adapter in one pass per layer (`generation.greedy_generate` / `reference_nll` take
it in place of a model). peft's mixed batches give the
same replies but loop over the batch's adapters in Python at every layer, which costs as much as one user at
a time; they stay as the reference the routed path is tested against.

Reproducibility: the same call (seed, users, order, users_per_batch, users already done) gives identical
adapters. With dropout (T5's own `dropout_rate` or `lora_dropout`) a user's dropout masks are drawn for the
whole concatenated batch, so they depend on which users shared its steps; a resumed run then gives adapters
that are equally good but not bit-identical to an uninterrupted one. With dropout 0 a user's training is
independent of its batchmates up to floating-point rounding, and `users_per_batch=1` follows `run_users`
step for step (same initialisation, shuffling and dropout stream).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from udg_lib import io
from udg_lib.conditions import Cell
from udg_lib.families import ModelFamily, family_of
from udg_lib.precision import autocast_for, training_attention
from udg_lib.finetuning import (
    ADAPTER_DIR,
    DONE_FILE,
    AfterUser,
    FinetuneConfig,
    TrainingSummary,
    UserMethod,
    UserTrainingOptions,
    check_evaluation_unit,
    training_loader,
    encode_pairs,
    is_user_done,
    user_dir,
    user_examples,
    user_seed,
    user_table,
)
from udg_lib.progress import progress_bar
from udg_lib.routing import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, _peft_key, _TargetHooks, lora_target_names


class MultiLora(_TargetHooks):
    """Per-row LoRA on a plain base model: each batch row goes through its own user's adapter.

    Use as a context manager (the hooks are removed on exit, leaving the base model as it was). Outside
    `routed` / `only` the hooks add nothing, so the model is the plain base. The base weights are never
    touched; freeze them (`requires_grad_(False)`) when training so that only the adapters get gradients.
    """

    def __init__(self, base_model: nn.Module, config: FinetuneConfig):
        self.model = base_model
        self.config = config
        self.peft_config = family_of(base_model).lora_config(config)
        self.targets = lora_target_names(base_model, self.peft_config)
        self.scaling = config.lora_alpha / config.lora_r  # peft's scaling without rsLoRA
        self.adapters: dict[str, dict[str, tuple[nn.Parameter, nn.Parameter]]] = {}
        self._rows: tuple[list[str], torch.Tensor] | None = None  # (users in stack order, each row's position)
        self._single: str | None = None
        self._hook_targets(base_model, self.targets)

    def _reset(self) -> None:
        self._rows, self._single = None, None

    # -- adapters --

    def add_user(self, user_id: str, seed: int) -> list[nn.Parameter]:
        """A fresh adapter for `user_id`, initialised as peft's `update_layer` does under `manual_seed(seed)`.

        peft builds nn.Linear(in, r) and nn.Linear(r, out) per target (each draws its default init) and then
        re-draws A with kaiming_uniform_(a=sqrt(5)) and zeroes B; the same draws in the same order give the
        same A matrices as `run_users` for that seed. Returns the user's parameters (A, B per target).
        """
        if user_id in self.adapters:
            raise ValueError(f"user {user_id!r} already has an adapter")
        torch.manual_seed(seed)
        weights = {}
        for name in self.targets:
            base = self.model.get_submodule(name)
            lora_a = nn.Linear(base.in_features, self.config.lora_r, bias=False)  # on CPU, as peft, then moved
            lora_b = nn.Linear(self.config.lora_r, base.out_features, bias=False)
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_b.weight)
            weights[name] = (nn.Parameter(lora_a.weight.detach().to(base.weight.device)),
                             nn.Parameter(lora_b.weight.detach().to(base.weight.device)))
        self.adapters[user_id] = weights
        return self.parameters(user_id)

    def parameters(self, user_id: str) -> list[nn.Parameter]:
        return [p for name in self.targets for p in self.adapters[user_id][name]]

    def remove_user(self, user_id: str) -> None:
        del self.adapters[user_id]

    def adapter_state_dict(self, user_id: str) -> dict[str, torch.Tensor]:
        """The user's weights under the key names `PeftModel.save_pretrained` writes for a "default" adapter."""
        state = {}
        for name in self.targets:
            lora_a, lora_b = self.adapters[user_id][name]
            state[_peft_key(name, "lora_A")] = lora_a.detach().to("cpu", copy=True).contiguous()
            state[_peft_key(name, "lora_B")] = lora_b.detach().to("cpu", copy=True).contiguous()
        return state

    def save_adapter(self, user_id: str, folder: str | Path) -> Path:
        """The user's adapter as PEFT saves it: adapter_config.json + adapter_model.safetensors."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.adapter_state_dict(user_id), str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        peft_config = copy.deepcopy(self.peft_config)
        peft_config.inference_mode = True  # as PeftModel.save_pretrained writes it
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = self.model.__dict__.get("name_or_path") or None
        peft_config.save_pretrained(str(folder))
        return folder

    def load_adapter(self, user_id: str, folder: str | Path) -> None:
        """A saved PEFT adapter (e.g. from `run_users`) as `user_id`'s weights, for batched multi-user inference."""
        folder = Path(folder)
        saved = json.loads((folder / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
        for key, ours in (("r", self.config.lora_r), ("lora_alpha", self.config.lora_alpha)):
            if saved.get(key) != ours:
                raise ValueError(f"{folder / ADAPTER_CONFIG_FILE}: {key}={saved.get(key)!r}, expected {ours!r}")
        tensors = load_file(str(folder / ADAPTER_WEIGHTS_FILE))
        expected = {_peft_key(name, m) for name in self.targets for m in ("lora_A", "lora_B")}
        if set(tensors) != expected:
            odd = sorted(set(tensors) ^ expected)[:3]
            raise ValueError(f"{folder / ADAPTER_WEIGHTS_FILE}: keys differ from this model's LoRA targets, e.g. {odd}")
        self.add_user(user_id, seed=0)
        with torch.no_grad():
            for name in self.targets:
                for matrix, param in zip(("lora_A", "lora_B"), self.adapters[user_id][name]):
                    value = tensors[_peft_key(name, matrix)]
                    if value.shape != param.shape:
                        raise ValueError(f"{folder / ADAPTER_WEIGHTS_FILE}: {_peft_key(name, matrix)} has shape "
                                         f"{tuple(value.shape)}, expected {tuple(param.shape)}")
                    param.copy_(value)

    # -- routing --

    @contextmanager
    def routed(self, row_users: Sequence[str]) -> Iterator[None]:
        """Within the block, row i of every batch goes through `row_users[i]`'s adapter."""
        missing = sorted(set(row_users) - set(self.adapters))
        if missing:
            raise KeyError(f"no adapter for users {missing[:5]}")
        order = list(dict.fromkeys(row_users))
        position = {user: i for i, user in enumerate(order)}
        device = self.model.get_submodule(self.targets[0]).weight.device
        index = torch.tensor([position[u] for u in row_users], dtype=torch.long, device=device)
        previous = self._rows, self._single
        self._rows, self._single = (order, index), None
        try:
            yield
        finally:
            self._rows, self._single = previous

    @contextmanager
    def only(self, user_id: str) -> Iterator[None]:
        """Within the block, every row goes through `user_id`'s adapter (any batch size: e.g. `generate`)."""
        if user_id not in self.adapters:
            raise KeyError(f"no adapter for user {user_id!r}")
        previous = self._rows, self._single
        self._rows, self._single = None, user_id
        try:
            yield
        finally:
            self._rows, self._single = previous

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]:
        dropout = self.config.lora_dropout

        def add_lora(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._single is None and self._rows is None:
                return None
            x = args[0]
            if dropout > 0:
                x = F.dropout(x, dropout, training=module.training)  # peft's lora_dropout, off in eval mode
            if self._single is not None:  # peft's own arithmetic: lora_B(lora_A(dropout(x))) * scaling
                lora_a, lora_b = self.adapters[self._single][name]
                delta = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b)
                return output + (delta * self.scaling).to(output.dtype)
            users, index = self._rows
            if x.shape[0] != index.shape[0]:
                raise ValueError(f"{name}: batch has {x.shape[0]} rows but {index.shape[0]} were routed "
                                 "(use `only(user)` for generation with beams or a changing batch)")
            stacked_a = torch.stack([self.adapters[u][name][0] for u in users])  # (users, r, in)
            stacked_b = torch.stack([self.adapters[u][name][1] for u in users])  # (users, out, r)
            rows_a = stacked_a.index_select(0, index).transpose(1, 2)  # (rows, in, r)
            rows_b = stacked_b.index_select(0, index).transpose(1, 2)  # (rows, r, out)
            h = x.reshape(x.shape[0], -1, x.shape[-1]).to(rows_a.dtype)
            delta = torch.bmm(torch.bmm(h, rows_a), rows_b).reshape(output.shape)
            return output + (delta * self.scaling).to(output.dtype)

        return add_lora


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass(eq=False)
class _UserRun:
    """One user's state in the batched loop: the body of `train_with_early_stopping`, unrolled per step."""

    user: str
    seed: int
    train: Dataset
    dev: Dataset
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    loader: DataLoader | None
    summary: TrainingSummary
    started: float
    batches: Iterator[list[dict[str, Any]]] | None = None
    batches_left: int = 0
    losses: list[float] = field(default_factory=list)
    best_loss: float = float("nan")
    best_state: list[torch.Tensor] | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    finished: bool = False

    @property
    def has_dev(self) -> bool:
        return len(self.dev) > 0

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def begin(self, initial_dev_loss: float, config: FinetuneConfig) -> None:
        """Epoch 0: the starting weights are the best so far."""
        self.best_loss = self.summary.initial_dev_loss = self.summary.best_dev_loss = initial_dev_loss
        self.best_state = self.snapshot() if self.has_dev else None
        if self.loader is None or config.max_epochs < 1:
            self.finish()
        else:
            self.next_epoch()

    def next_epoch(self) -> None:
        self.batches, self.batches_left, self.losses = iter(self.loader), len(self.loader), []

    def next_batch(self) -> list[dict[str, Any]]:
        batch = next(self.batches)
        self.batches_left -= 1
        if self.batches_left == 0:
            # Run the loader to its end as a `for` loop does: with full last batches the sampler draws one
            # more permutation from the generator when resumed, which shifts every later epoch's order.
            if next(self.batches, None) is not None:
                raise RuntimeError(f"user {self.user!r}: loader gave more than len(loader) batches")
        return batch

    def end_epoch(self, dev_loss: float, config: FinetuneConfig) -> None:
        """After the user's last batch of an epoch: record it and apply early stopping, as the one-user loop."""
        summary = self.summary
        summary.train_losses.append(sum(self.losses) / len(self.losses))
        summary.epochs_run += 1
        epoch = summary.epochs_run
        summary.dev_losses.append(dev_loss)
        if self.has_dev:
            if dev_loss < self.best_loss - config.min_delta:
                self.best_loss, self.best_epoch, self.best_state, self.bad_epochs = dev_loss, epoch, self.snapshot(), 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs >= config.patience:
                    summary.stopped_early = epoch < config.max_epochs
                    self.finish()
                    return
        if epoch >= config.max_epochs:
            self.finish()
        else:
            self.next_epoch()

    def finish(self) -> None:
        """Best weights back (with dev examples; else the last ones stay) and the summary completed."""
        if self.has_dev and self.best_state is not None:
            with torch.no_grad():
                for p, saved in zip(self.params, self.best_state):
                    p.copy_(saved)
        self.summary.best_epoch = self.best_epoch if self.has_dev else self.summary.epochs_run
        self.summary.best_dev_loss = self.best_loss
        self.summary.seconds = round(time.perf_counter() - self.started, 3)
        self.batches, self.best_state, self.finished = None, None, True


def _forward_token_losses(model: PreTrainedModel, multi: MultiLora, features: list[dict[str, Any]],
                          row_users: list[str], family: ModelFamily, collator: Callable, device: torch.device
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (rows x scored positions; 0 at padding) and its mask, one routed forward: the
    model's own loss is their masked mean, here kept per token so that each user gets its own mean."""
    batch = {k: v.to(device) for k, v in collator(features).items()}
    with multi.routed(row_users):
        return family.token_losses(model, batch)


@torch.no_grad()
def batched_dev_losses(model: PreTrainedModel, multi: MultiLora, examples: dict[str, Dataset],
                       collator: Callable, batch_size: int = 32) -> dict[str, float]:
    """Each user's token-level dev cross-entropy under its own adapter (as `finetuning.dev_loss`; NaN if none),
    all users' examples in shared batches of `batch_size`, in each dataset's order."""
    rows = [(user, data[i]) for user, data in examples.items() for i in range(len(data))]
    totals = {user: 0.0 for user in examples}
    tokens = {user: 0 for user in examples}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            users = [user for user, _ in chunk]
            losses, mask = _forward_token_losses(model, multi, [f for _, f in chunk], users, family_of(model),
                                                 collator, device)
            sums, counts = losses.sum(dim=1).tolist(), mask.sum(dim=1).tolist()
            for user, total, count in zip(users, sums, counts):
                totals[user] += total
                tokens[user] += int(count)
    finally:
        model.train(was_training)
    return {user: totals[user] / tokens[user] if tokens[user] else float("nan") for user in examples}


def run_users_batched(method: UserMethod, base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      cell: Cell, out_dir: str | Path, config: FinetuneConfig,
                      options: UserTrainingOptions | None = None, after_user: AfterUser | None = None) -> pd.DataFrame:
    """`finetuning.run_users` of LoRA with up to `users_per_batch` users trained together in each step (§3.5).

    Same artifacts and return value as `finetuning.run_users` with `methods.LORA`: per user,
    `out_dir/<user_dir_name>/` holds `adapter/` (PEFT format, `load_user_adapter`) and `done.json`
    (user_id, method, fmt, seed, summary, config, users_per_batch), written atomically with `io.staged_dir`;
    users with a `done.json` are skipped. Each user trains on its own `train_ft` pairs with batch
    `config.batch_size`, seed `user_seed(config.seed, user)` and its own Adam, and stops early on its own
    `dev` pairs. Users enter in `user_ids` order and a finished user's slot goes to the next one at once.
    `after_user(user_id, model, folder)` gets `base_model` routed wholly through that user's adapter
    (eval mode), before the marker is written. `summary.seconds` is the wall time from a user's start to its
    end, shared with its batchmates.

    `base_model` is used in place and given back unchanged (no hooks, same weights and requires_grad flags,
    eval mode). Returns one row per user in `user_ids` order: user_id, status ("trained" / "skipped"), dir,
    and the summary's fields.
    """
    if not getattr(method, "batched_lora", False):  # it trains LoRA adapters: under another name they would lie
        raise TypeError("run_users_batched trains LoRA (methods.LORA, RagLora), "
                        f"not {getattr(method, 'name', method)!r}")
    options = options or UserTrainingOptions()
    pairs, users, user_ids, fmt = cell.pairs, cell.users, cell.user_ids, cell.fmt
    users_per_batch, progress = options.users_per_batch, options.progress
    duplicated = sorted(u for u, n in Counter(user_ids).items() if n > 1)
    if duplicated:
        raise ValueError(f"user_ids lists users more than once: {duplicated[:5]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family = family_of(base_model)  # T5 or causal LM: tokenization, padding, per-token losses
    collator = family.collator(tokenizer)
    device = next(base_model.parameters()).device
    requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
    statuses: dict[str, str] = {u: "skipped" for u in user_ids if is_user_done(out_dir, u)}
    queue = deque(u for u in user_ids if u not in statuses)
    active: dict[str, _UserRun] = {}

    def start(multi: MultiLora, user: str) -> _UserRun:
        seed = user_seed(config.seed, user)
        check_evaluation_unit(pairs, user)
        train = encode_pairs(user_examples(pairs, user, "train_ft"), users, fmt, tokenizer, config, family=family)
        dev = encode_pairs(user_examples(pairs, user, "dev"), users, fmt, tokenizer, config, family=family)
        params = multi.add_user(user, seed)  # seeds torch with `seed`, as run_users before get_peft_model
        torch.manual_seed(seed)  # ... and train_with_early_stopping again before training (dropout stream)
        loader = (training_loader(train, config.batch_size, torch.Generator().manual_seed(seed), list)
                  if len(train) > 0 else None)
        summary = TrainingSummary(epochs_run=0, best_epoch=0, best_dev_loss=float("nan"),
                                  initial_dev_loss=float("nan"), n_train=len(train), n_dev=len(dev),
                                  trainable_parameters=sum(p.numel() for p in params))
        return _UserRun(user=user, seed=seed, train=train, dev=dev, params=params, loader=loader,
                        optimizer=torch.optim.Adam(params, lr=config.learning_rate),  # §4.1.3: Adam, lr 1e-4
                        summary=summary, started=time.perf_counter())

    def publish(multi: MultiLora, run: _UserRun) -> None:
        with io.staged_dir(user_dir(out_dir, run.user)) as staging:  # renamed into place once done.json is in
            multi.save_adapter(run.user, staging / ADAPTER_DIR)
            if after_user is not None:
                base_model.eval()
                with multi.only(run.user):
                    after_user(run.user, base_model, staging)
                base_model.train()
            io.write_json(staging / DONE_FILE, {"user_id": run.user, "method": method.name, "fmt": fmt, "seed": run.seed,
                                                "summary": run.summary.as_dict(), "config": config.as_dict(),
                                                "users_per_batch": users_per_batch})
        multi.remove_user(run.user)
        statuses[run.user] = "trained"

    bar = progress_bar(total=len(queue), desc="lora users (batched)", disable=not progress)
    try:
        for p in base_model.parameters():
            p.requires_grad_(False)  # only the adapters get gradients
        with MultiLora(base_model, config) as multi, training_attention(base_model, device):
            base_model.train()
            while queue or active:
                joined = []
                while queue and len(active) < users_per_batch:
                    run = start(multi, queue.popleft())
                    active[run.user] = run
                    joined.append(run)
                ended = joined  # epoch 0 for the new users, the last epoch for the others
                if not joined:
                    stepping = list(active.values())
                    features, row_users, spans = [], [], []
                    for run in stepping:
                        batch = run.next_batch()
                        spans.append((run, len(features), len(features) + len(batch)))
                        features.extend(batch)
                        row_users.extend([run.user] * len(batch))
                    with autocast_for(config.precision, device):
                        losses, mask = _forward_token_losses(base_model, multi, features, row_users, family,
                                                             collator, device)
                    # each user's own mean token loss: its gradient is the one it would get training alone
                    user_losses = torch.stack([losses[a:b].sum() / mask[a:b].sum() for _, a, b in spans])
                    for run in stepping:
                        run.optimizer.zero_grad(set_to_none=True)
                    user_losses.sum().backward()
                    for run, value in zip(stepping, user_losses.tolist()):
                        run.optimizer.step()
                        run.losses.append(value)
                        run.summary.steps += 1
                    ended = [run for run in stepping if run.batches_left == 0]
                with_dev = {run.user: run.dev for run in ended if run.has_dev}
                with autocast_for(config.precision, device):
                    dev_losses = (batched_dev_losses(base_model, multi, with_dev, collator, config.eval_batch_size)
                                  if with_dev else {})
                for run in ended:
                    loss = dev_losses.get(run.user, float("nan"))
                    if run in joined:
                        run.begin(loss, config)
                    else:
                        run.end_epoch(loss, config)
                    if run.finished:
                        publish(multi, run)
                        del active[run.user]
                        bar.update(1)
    finally:
        bar.close()
        for name, p in base_model.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
        base_model.eval()

    return user_table(out_dir, user_ids, statuses)
