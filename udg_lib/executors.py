"""Scale-out of per-user fine-tuning (§4.1.3: one LoRA or FULL model per user; §4.2 tests thousands of them).

`train_users` runs `finetuning.run_users` for many users either in this process (`executor="local"`) or as
Ray tasks (`executor="ray"`), each task training a chunk of users on a base model it loads once. LoRA users
train one at a time (`lora_training="per_user"`) or several per step (`"batched"`,
`multilora.run_users_batched`), in a task as in this process; the frozen LoRA base is held in the precision's
`frozen_dtype` (bf16 where `config.precision` resolves so on the device), as stage 03's local path holds it.
Both executors write the same per-user folders (`out_dir/<user_dir_name>/` with `done.json` last, renamed into
place), so a run can be resumed by either executor, and a user's adapter does not depend on which executor
trained it, on the chunking, or on the order (each user is seeded from (seed, user_id) and starts from the
saved base; batched LoRA: for the same chunks of `users_per_batch`, which a task of `users_per_task` users
cuts from its own chunk).

On a Ray cluster every node must see `base_model_dir` and `out_dir` at the same path (a shared filesystem:
NFS, Lustre, a mounted bucket) and have this package installed in the same environment; `pairs` and `users`
travel through Ray's object store. Only one `train_users` call should write to an `out_dir` at a time:
each call clears the temp folders that a killed run left for its users.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from udg_lib.conditions import Cell
from udg_lib.finetuning import (
    DONE_FILE,
    AfterUser,
    FinetuneConfig,
    UserTrainingOptions,
    is_user_done,
    user_dir_name,
    user_table,
)
from udg_lib.families import build_model
from udg_lib.progress import progress_bar
from udg_lib.tokenizer import load_tokenizer


class UserTrainingError(RuntimeError):
    """Some Ray tasks failed. `failed_users`: users of the failed tasks that have no done.json."""

    def __init__(self, message: str, failed_users: list[str]):
        super().__init__(message)
        self.failed_users = failed_users


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base_model(base_model_dir: str | Path, device: str | None = None,
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer that `save_pretrained` wrote into `base_model_dir`, the model on `device`.

    The tokenizer is taken as saved (no markers added): it is the one the model was trained with.
    """
    base_model_dir = Path(base_model_dir)
    if not (base_model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_model_dir} holds no saved model (no config.json); expected the folder "
                                "that save_pretrained wrote, with the tokenizer saved beside it")
    tokenizer = load_tokenizer(base_model_dir, add_special_tokens=False).tokenizer
    model = build_model(base_model_dir, tokenizer)
    return model.to(device or default_device()).eval(), tokenizer


def clear_staging_leftovers(out_dir: str | Path, user_ids: Sequence[str]) -> list[Path]:
    """Remove the temp folders that a killed run left for `user_ids` in `out_dir`; return what was removed.

    `io.staged_dir` builds a user in `.<name>.*.tmp` and `io.replace_dir` parks an old folder as
    `.<name>.old-*`; a SIGKILL between the two skips their own cleanup. Only call this while nothing else
    writes these users.
    """
    out_dir = Path(out_dir)
    removed = []
    for user in user_ids:
        name = user_dir_name(user)
        for pattern in (f".{name}.*.tmp", f".{name}.old-*"):
            for leftover in out_dir.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
    return removed


class UserTrainer(Protocol):
    """A per-user method as the executors see it (`methods.PerUserMethod`): it trains users on a loaded base."""

    name: str

    def train_on_base(self, base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cell: Cell,
                      out_dir: Path, config: FinetuneConfig, options: UserTrainingOptions,
                      after_user: AfterUser | None) -> pd.DataFrame: ...


def _check_users(cell: Cell) -> None:
    duplicates = sorted(u for u, n in Counter(cell.user_ids).items() if n > 1)
    if duplicates:
        raise ValueError(f"user_ids lists users more than once: {duplicates[:5]}")
    known = set(cell.users["user_id"])
    unknown = [u for u in cell.user_ids if u not in known]
    if unknown:
        raise ValueError(f"{len(unknown)} user_ids are not in users['user_id']: {unknown[:5]}")


def train_users(method: UserTrainer, base_model_dir: str | Path, cell: Cell, out_dir: str | Path,
                config: FinetuneConfig, options: UserTrainingOptions | None = None, device: str | None = None,
                after_user: AfterUser | None = None) -> pd.DataFrame:
    """One model of a per-user `method` for every user of `cell` (`method.train_on_base`: `run_users`, or
    batched LoRA), in this process or on Ray as `options.executor` says; resumable.

    `base_model_dir` holds the (domain-adapted) model and its tokenizer as `save_pretrained` wrote them.
    Users that already have a done.json in `out_dir` are skipped; the temp folders of a killed run are
    removed first. Returns run_users' table: one row per user in `cell.user_ids` order with status
    "trained" / "skipped", read back from the done.json files.

    - "local": the base is loaded once on `device` (default cuda if available, else cpu) and every user is
      trained here: one after the other, or LoRA users `options.users_per_batch` at a time with
      `options.lora_training="batched"` (`multilora.run_users_batched`).
    - "ray": the users still to train are cut into chunks of `options.users_per_task`; each chunk is one Ray
      task that loads the base once and trains its users on it as the local executor would, writing into
      `out_dir` itself (so out_dir and base_model_dir must be on a filesystem all nodes share). A task asks
      Ray for `num_cpus_per_task` CPUs (and uses that many torch threads) and `num_gpus_per_task` GPUs: a
      fraction such as 0.25 lets four small trainings share one GPU. Tasks run on `device` (default: cuda
      when they ask for a GPU, else cpu). With `ray_address` ("auto", "ray://head:10001", ...) it connects to
      that cluster; without, it starts a local instance on this machine's CPUs and shuts it down at the end.
      A Ray already initialized by the caller is used as it is and left running. Without `ray_address` the
      instance is taken to be fixed (a request for more CPUs or GPUs than it has fails at once); give the
      address of an autoscaling cluster so that tasks wait for nodes instead. Batched LoRA in a task trains
      up to `users_per_batch` of its users per step, so give a GPU task at least that many `users_per_task`.
      `after_user` runs inside the tasks, so cloudpickle must be able to ship it (a module-level function or
      a closure over plain data, not over a model or a file). When tasks fail, the others still finish;
      then `UserTrainingError` names the users of the failed tasks. Users finished before a failure keep
      their done.json, so a rerun trains only the rest. Ray retries a task whose worker died (e.g. killed for
      memory); resuming makes that safe.
    """
    if not callable(getattr(method, "train_on_base", None)):
        raise TypeError("train_users trains a per-user method (methods.LORA, methods.FULL, a PeftMethod), "
                        f"not {getattr(method, 'name', method)!r}")
    options = options or UserTrainingOptions()
    _check_users(cell)
    base_model_dir = Path(base_model_dir).resolve()
    if not (base_model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_model_dir} holds no saved model (no config.json)")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_staging_leftovers(out_dir, cell.user_ids)

    if options.executor == "local":
        model, tokenizer = load_base_model(base_model_dir, device or default_device())
        return method.train_on_base(model, tokenizer, cell, out_dir, config, options, after_user)

    statuses = {u: "skipped" for u in cell.user_ids if is_user_done(out_dir, u)}
    todo = [u for u in cell.user_ids if u not in statuses]
    if todo:
        size = options.users_per_task
        chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
        task = RayTask(method, str(base_model_dir), str(out_dir), config, options,
                       device or ("cuda" if options.num_gpus_per_task > 0 else "cpu"), after_user)
        # A task sees only the rows of the users it may train: nothing else need cross the network.
        statuses.update(_run_ray_tasks(task, chunks, cell.with_pairs(cell.pairs[cell.pairs["speaker_id"].isin(set(todo))])))
    return user_table(out_dir, cell.user_ids, statuses)


@dataclass(frozen=True)
class RayTask:
    """What every Ray task of one `train_users` call shares: it trains a chunk of users (`train_user_chunk`)."""

    method: UserTrainer
    base_model_dir: str
    out_dir: str
    config: FinetuneConfig
    options: UserTrainingOptions
    device: str
    after_user: AfterUser | None


def train_user_chunk(task: RayTask, cell: Cell, user_ids: list[str]) -> dict[str, str]:
    """One Ray task's work: load the base once, train `user_ids` on it as the local executor would (LoRA batched
    or per user); returns {user_id: status}."""
    torch.set_num_threads(max(1, int(task.options.num_cpus_per_task)))  # as many threads as CPUs reserved
    hf_logging.disable_progress_bar()  # workers' load/save bars would interleave in the driver's log
    model, tokenizer = load_base_model(task.base_model_dir, task.device)
    quiet = replace(task.options, progress=False)
    table = task.method.train_on_base(model, tokenizer, cell.with_users(user_ids), Path(task.out_dir), task.config,
                                      quiet, task.after_user)
    return dict(zip(table["user_id"], table["status"]))


def _run_ray_tasks(task: RayTask, chunks: list[list[str]], cell: Cell) -> dict[str, str]:
    import ray  # imported here: ~1 s, and the local executor does not need it

    options = task.options
    ray_address, num_cpus_per_task, num_gpus_per_task = options.ray_address, options.num_cpus_per_task, \
        options.num_gpus_per_task
    started_here = False
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
            started_here = True
    pending: dict[Any, list[str]] = {}
    try:
        if not ray_address:  # a local instance cannot grow: a request it can never meet would wait forever
            available = ray.cluster_resources()
            for resource, wanted in (("CPU", num_cpus_per_task), ("GPU", num_gpus_per_task)):
                if wanted > available.get(resource, 0):
                    raise ValueError(f"each task asks for {wanted} {resource}s but the local Ray instance has "
                                     f"{available.get(resource, 0)}")
        cell_ref = ray.put(cell)  # once, shared by every task
        remote = ray.remote(train_user_chunk)
        for chunk in chunks:
            name = f"train_users[{chunk[0]}{' ...' if len(chunk) > 1 else ''}]"  # as the dashboard lists it
            ref = remote.options(num_cpus=num_cpus_per_task, num_gpus=num_gpus_per_task, name=name).remote(
                task, cell_ref, chunk)
            pending[ref] = chunk
        statuses: dict[str, str] = {}
        failures: list[tuple[list[str], Exception]] = []
        with progress_bar(total=sum(map(len, chunks)), unit="user", desc=f"{task.method.name} users (ray)",
                          disable=not options.progress) as bar:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                chunk = pending.pop(ref)
                try:
                    statuses.update(ray.get(ref))
                except ray.exceptions.RayError as error:  # the task raised, or its worker died past retries
                    failures.append((chunk, error))
                bar.update(len(chunk))
        if failures:
            out_dir = task.out_dir
            failed = [u for chunk, _ in failures for u in chunk if not is_user_done(out_dir, u)]
            chunks_text = "; ".join(", ".join(chunk) for chunk, _ in failures)
            first = failures[0][1]
            cause = getattr(first, "cause", None) or first  # a RayTaskError wraps what the task raised
            raise UserTrainingError(
                f"{len(failures)} of {len(chunks)} Ray tasks failed (users: {chunks_text}); {len(failed)} of "
                f"their users have no {DONE_FILE}: {failed}. Finished users stay done; rerun to train the rest. "
                f"First error: {type(cause).__name__}: {cause}", failed) from first
        return statuses
    finally:
        for ref in pending:  # interrupted (e.g. Ctrl-C in a notebook): stop the tasks still queued or running
            ray.cancel(ref)
        if started_here:
            ray.shutdown()
