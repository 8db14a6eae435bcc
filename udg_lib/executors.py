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
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from udg_lib.finetuning import (
    DONE_FILE,
    METHODS,
    AfterUser,
    FinetuneConfig,
    is_user_done,
    run_users,
    user_dir_name,
    user_table,
)
from udg_lib.families import build_model
from udg_lib.precision import resolve_precision
from udg_lib.progress import progress_bar
from udg_lib.tokenizer import load_tokenizer

EXECUTORS: tuple[str, ...] = ("local", "ray")
LORA_TRAINING: tuple[str, ...] = ("per_user", "batched")


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


def _check_inputs(method: str, executor: str, users: pd.DataFrame, user_ids: Sequence[str],
                  users_per_task: int, num_cpus_per_task: float, num_gpus_per_task: float,
                  lora_training: str = "per_user", users_per_batch: int = 8) -> None:
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; expected one of {EXECUTORS}")
    if lora_training not in LORA_TRAINING:
        raise ValueError(f"unknown lora_training {lora_training!r}; expected one of {LORA_TRAINING}")
    if users_per_batch < 1:
        raise ValueError(f"users_per_batch must be at least 1, got {users_per_batch}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if isinstance(user_ids, str):
        raise TypeError(f"user_ids must be a sequence of user ids, not the string {user_ids!r}")
    duplicates = sorted(u for u, n in Counter(user_ids).items() if n > 1)
    if duplicates:
        raise ValueError(f"user_ids lists users more than once: {duplicates[:5]}")
    known = set(users["user_id"])
    unknown = [u for u in user_ids if u not in known]
    if unknown:
        raise ValueError(f"{len(unknown)} user_ids are not in users['user_id']: {unknown[:5]}")
    if users_per_task < 1:
        raise ValueError(f"users_per_task must be at least 1, got {users_per_task}")
    if num_cpus_per_task < 0 or num_gpus_per_task < 0:
        raise ValueError(f"resources per task must be >= 0, got num_cpus={num_cpus_per_task}, "
                         f"num_gpus={num_gpus_per_task}")


def train_users(method: str, base_model_dir: str | Path, pairs: pd.DataFrame, users: pd.DataFrame,
                user_ids: Sequence[str], fmt: str, out_dir: str | Path, config: FinetuneConfig, *,
                executor: str = "local", ray_address: str | None = None, users_per_task: int = 4,
                num_cpus_per_task: float = 1, num_gpus_per_task: float = 0.0, device: str | None = None,
                save_full_models: bool = False, after_user: AfterUser | None = None,
                progress: bool = True, lora_training: str = "per_user", users_per_batch: int = 8) -> pd.DataFrame:
    """One LoRA adapter or FULL model per user (`finetuning.run_users`), in this process or on Ray; resumable.

    `base_model_dir` holds the (domain-adapted) model and its tokenizer as `save_pretrained` wrote them.
    Users that already have a done.json in `out_dir` are skipped; the temp folders of a killed run are
    removed first. Returns run_users' table: one row per user in `user_ids` order with status
    "trained" / "skipped", read back from the done.json files.

    - "local": the base is loaded once on `device` (default cuda if available, else cpu) and every user is
      trained here: one after the other, or LoRA users `users_per_batch` at a time with
      `lora_training="batched"` (`multilora.run_users_batched`).
    - "ray": the users still to train are cut into chunks of `users_per_task`; each chunk is one Ray task
      that loads the base once and runs `run_users` on it, writing into `out_dir` itself (so out_dir and
      base_model_dir must be on a filesystem all nodes share). A task asks Ray for `num_cpus_per_task` CPUs
      (and uses that many torch threads) and `num_gpus_per_task` GPUs: a fraction such as 0.25 lets four
      small trainings share one GPU. Tasks run on `device` (default: cuda when they ask for a GPU, else cpu).
      With `ray_address` ("auto", "ray://head:10001", ...) it connects to that cluster; without, it starts a
      local instance on this machine's CPUs and shuts it down at the end. A Ray already initialized by the
      caller is used as it is and left running. Without `ray_address` the instance is taken to be fixed
      (a request for more CPUs or GPUs than it has fails at once); give the address of an autoscaling
      cluster so that tasks wait for nodes instead. A task trains its chunk as the local executor would
      (`lora_training="batched"`: up to `users_per_batch` of its users per step, so give a GPU task at least
      that many `users_per_task`). `after_user` runs inside the tasks, so cloudpickle must
      be able to ship it (a module-level function or a closure over plain data, not over a model or a file).
      When tasks fail, the others still finish; then `UserTrainingError` names the users of the failed
      tasks. Users finished before a failure keep their done.json, so a rerun trains only the rest. Ray
      retries a task whose worker died (e.g. killed for memory); resuming makes that safe.
    """
    user_ids = list(user_ids)
    _check_inputs(method, executor, users, user_ids, users_per_task, num_cpus_per_task, num_gpus_per_task,
                  lora_training, users_per_batch)
    base_model_dir = Path(base_model_dir).resolve()
    if not (base_model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_model_dir} holds no saved model (no config.json)")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_staging_leftovers(out_dir, user_ids)

    if executor == "local":
        device = device or default_device()
        model, tokenizer = load_base_model(base_model_dir, device)
        return _train_on_base(method, model, tokenizer, pairs, users, user_ids, fmt, out_dir, config, device,
                              lora_training, users_per_batch, save_full_models, after_user, progress)

    statuses = {u: "skipped" for u in user_ids if is_user_done(out_dir, u)}
    todo = [u for u in user_ids if u not in statuses]
    if todo:
        chunks = [todo[i:i + users_per_task] for i in range(0, len(todo), users_per_task)]
        task_args = {"method": method, "base_model_dir": str(base_model_dir), "fmt": fmt, "out_dir": str(out_dir),
                     "config": config, "device": device or ("cuda" if num_gpus_per_task > 0 else "cpu"),
                     "num_threads": max(1, int(num_cpus_per_task)), "save_full_models": save_full_models,
                     "after_user": after_user, "lora_training": lora_training, "users_per_batch": users_per_batch}
        # A task sees only the rows of the users it may train: nothing else need cross the network.
        statuses.update(_run_ray_tasks(chunks, pairs[pairs["speaker_id"].isin(set(todo))], users, task_args,
                                       ray_address, num_cpus_per_task, num_gpus_per_task, progress))
    return user_table(out_dir, user_ids, statuses)


def _train_on_base(method: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: pd.DataFrame,
                   users: pd.DataFrame, user_ids: list[str], fmt: str, out_dir: str | Path, config: FinetuneConfig,
                   device: str, lora_training: str, users_per_batch: int, save_full_models: bool,
                   after_user: AfterUser | None, progress: bool) -> pd.DataFrame:
    """`user_ids` trained on a base loaded once: LoRA on a base held in the precision's frozen dtype (adapters
    stay fp32), one user at a time or batched; FULL one user at a time (`run_users`)."""
    if method == "lora":
        model.to(dtype=resolve_precision(config.precision, device).frozen_dtype)
        if lora_training == "batched":
            from udg_lib.multilora import run_users_batched  # imported here: multilora loads peft's internals

            return run_users_batched(model, tokenizer, pairs, users, user_ids, fmt, out_dir, config,
                                     users_per_batch=users_per_batch, after_user=after_user, progress=progress)
    return run_users(method, model, tokenizer, pairs, users, user_ids, fmt, out_dir, config,
                     save_full_models=save_full_models, after_user=after_user, progress=progress)


def train_user_chunk(method: str, base_model_dir: str, pairs: pd.DataFrame, users: pd.DataFrame,
                     user_ids: list[str], fmt: str, out_dir: str, config: FinetuneConfig, device: str,
                     num_threads: int, save_full_models: bool, after_user: AfterUser | None,
                     lora_training: str = "per_user", users_per_batch: int = 8) -> dict[str, str]:
    """One Ray task's work: load the base once, train `user_ids` on it as the local executor would (LoRA batched
    or per user); returns {user_id: status}."""
    torch.set_num_threads(num_threads)  # as many threads as CPUs reserved, or tasks sharing a node oversubscribe
    hf_logging.disable_progress_bar()  # workers' load/save bars would interleave in the driver's log
    model, tokenizer = load_base_model(base_model_dir, device)
    table = _train_on_base(method, model, tokenizer, pairs, users, user_ids, fmt, out_dir, config, device,
                           lora_training, users_per_batch, save_full_models, after_user, progress=False)
    return dict(zip(table["user_id"], table["status"]))


def _run_ray_tasks(chunks: list[list[str]], pairs: pd.DataFrame, users: pd.DataFrame, task_args: dict[str, Any],
                   ray_address: str | None, num_cpus_per_task: float, num_gpus_per_task: float,
                   progress: bool) -> dict[str, str]:
    import ray  # imported here: ~1 s, and the local executor does not need it

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
        pairs_ref, users_ref = ray.put(pairs), ray.put(users)  # once, shared by every task
        remote = ray.remote(train_user_chunk)
        for chunk in chunks:
            name = f"train_users[{chunk[0]}{' ...' if len(chunk) > 1 else ''}]"  # as the dashboard lists it
            ref = remote.options(num_cpus=num_cpus_per_task, num_gpus=num_gpus_per_task, name=name).remote(
                pairs=pairs_ref, users=users_ref, user_ids=chunk, **task_args)
            pending[ref] = chunk
        statuses: dict[str, str] = {}
        failures: list[tuple[list[str], Exception]] = []
        with progress_bar(total=sum(map(len, chunks)), unit="user", desc=f"{task_args['method']} users (ray)",
                          disable=not progress) as bar:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                chunk = pending.pop(ref)
                try:
                    statuses.update(ray.get(ref))
                except ray.exceptions.RayError as error:  # the task raised, or its worker died past retries
                    failures.append((chunk, error))
                bar.update(len(chunk))
        if failures:
            out_dir = task_args["out_dir"]
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
