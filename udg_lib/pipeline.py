"""Run the numbered notebooks in order with papermill, one output folder per stage.

    python -m udg_lib.pipeline --profile test            # run what is missing or stale
    python -m udg_lib.pipeline --profile test --from 02  # rerun 02 and everything after it
    python -m udg_lib.pipeline --profile test --list     # show what is up to date

Stage `notebooks/NN_name.ipynb` runs with the overrides in `params/<profile>/NN_name.yaml` and writes
`outputs/<profile>/NN_name/` (the executed notebook, `metrics.json`, its data files). A stage is skipped
when its `run_key` (params, notebook source, the content of the input files its params name, the run keys
of earlier stages) matches the one it last recorded, unless forced. A stage runs in a hidden temp folder that
replaces the final one only on success, so a failed or interrupted stage leaves nothing under outputs/.

The executed copy `outputs/<profile>/NN_name/NN_name.ipynb` is made to read as the stage's own before the
rename (`finish_executed_copy`): its injected parameters name the stage's final folder as `output_dir` (and the
profile's outputs folder as `outputs_root`), not the hidden work folder the run wrote to (its comment line names
that one), so a reader who reruns the copy in JupyterLab or with papermill reproduces the stage in place, as
running `notebooks/NN_name.ipynb` by hand with its defaults does. (The run itself still writes to the work
folder, so that a failed stage leaves outputs/ as it was and a killed one resumes there; only the copy is
rewritten, so the run key does not change.) A rerun in place rewrites the stage's files one by one, not
atomically; `provenance.write_metrics` merges into the metrics.json there, keeping the runner's `stage` block,
so the pipeline still counts the stage as up to date, which holds for a rerun that reproduces it. A parameter
changed in the copy alone would leave that record describing the old value: change it in the profile's yaml
file and run the pipeline `--from NN` instead. Stage 03 skips the users already finished in its folder, in
place as in a work folder. Each stage's kernel draws plain text progress bars, and in the executed copy every
bar reads its last state (`udg_lib.progress`).

Before any stage runs, every stage's yaml values are checked against the types annotated in its notebook's
parameters cell (int, float, str, bool, list, dict), stage 00's corpus specs against their formats and the
files they name for existence. Once stage 00's corpora are there, and before a later stage runs, the tokenizer
of every model the later stages name (checkpoint, embedders) must cover the corpora's languages.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import nbformat
import papermill
from jupyter_client import AsyncKernelManager
from papermill.translators import translate_parameters
from traitlets.config import Config

from udg_lib import paths
from udg_lib.io import replace_dir, write_json
from udg_lib.param_profiles import MODELS_DIR, PipelineError, is_model_layer, profile_chain
from udg_lib.stage_params import (
    RunSettings,
    Stage,
    _one_line,
    load_stage,
    read_run_settings,
    stage_index,
    stage_notebooks,
)
from udg_lib.progress import PROGRESS_ENV, TEXT_BARS, settle_stream_outputs, settle_widget_bars
from udg_lib.provenance import METRICS_FILE

# Errors of a full disk: the exception rarely names the file, so the failure line names the outputs folder.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_DISK_BYTES = 1 << 20  # less free space than this after a failure: the disk is taken to be full
# Parameters naming a model whose tokenizer must cover the language of the corpora it serves: stage 02's
# checkpoint serves every corpus; notebooks 04 and 06 embed Japanese datasets with `embedder_ja` and the
# others with `embedder`. (Stage 00 checks its own `tokenizer_name_or_path`.)
LANGUAGE_MODEL_PARAMS: dict[str, Callable[[str], bool]] = {
    "checkpoint": lambda language: True,
    "embedder": lambda language: language != "ja",
    "embedder_ja": lambda language: language == "ja",
}


@dataclass(frozen=True)
class StageResult:
    """What happened to one stage in a run."""

    stage: str
    status: str  # "ran" or "skipped"
    seconds: float
    run_key: str
    output_dir: Path


class StageKernelManager(AsyncKernelManager):
    """Starts and stops the kernel of a stage without alarming log lines from normal operation.

    jupyter_client interrupts (SIGINT) every kernel before asking it to shut down, and ipykernel logs
    "KeyboardInterrupt caught in kernel" when the signal lands; a stage's kernel has finished (or failed) by
    then, so the shutdown request alone stops it (a kernel that does not stop is killed after
    `shutdown_wait_time`). The kernel runs with `UDG_PROGRESS=text` (see `udg_lib.progress`). The transport is
    set by `kernel_config`.
    """

    async def _async_interrupt_kernel(self) -> None:
        if self.shutting_down:
            return
        await super()._async_interrupt_kernel()

    async def _async_pre_start_kernel(self, **kw: Any) -> tuple[list[str], dict[str, Any]]:
        # Plain text progress bars in the executed copy (udg_lib.progress): a saved widget reads "0%" untrusted.
        kw["env"] = {**kw.get("env", os.environ), PROGRESS_ENV: TEXT_BARS}
        return await super()._async_pre_start_kernel(**kw)


def kernel_config(socket_dir: str | Path) -> Config:
    """Kernel manager settings: local IPC sockets in `socket_dir` on POSIX (no TCP port is opened, so
    ipykernel has no reason to warn "Kernel is running over TCP without encryption"); TCP elsewhere."""
    config = Config()
    if os.name == "posix":
        config.KernelManager.transport = "ipc"
        config.KernelManager.ip = str(Path(socket_dir) / "kernel")
    return config


def check_input_files(stage: Stage) -> None:
    """Every file a corpus spec names exists: a profile whose corpora the user supplies (full-ja) fails in one
    line before any stage runs, not after the stages before it."""
    from udg_lib.data import corpus_paths  # pandas and the loaders: only when needed

    for spec in stage.params.get("corpora") or []:
        for key, path in corpus_paths(spec).items():
            if not path.exists():
                source = stage.source_of("corpora")
                name = spec.get("name", spec.get("format"))
                raise PipelineError(f"{source}: corpus {name!r}: {key} {path} does not exist; put the file there "
                                    f"or change the path")


def check_model_languages(stages: list[Stage], prepared_dir: Path) -> None:
    """Each model the later stages name (LANGUAGE_MODEL_PARAMS) has a tokenizer that covers the language of
    the corpora stage 00 prepared in `prepared_dir` (`tokenizer.check_corpora_fit`), so a Japanese checkpoint
    with English corpora, or an English embedder with a Japanese corpus, fails before the long stages run.
    Only tokenizers are loaded (from the Hugging Face cache or a folder): seconds."""
    # imported here, as torch, transformers and sentence-transformers: `--help` and a status check need none
    from udg_lib.data.prepare import corpus_language, corpus_names
    from udg_lib.metrics import embedder_model_ref
    from udg_lib.tokenizer import TokenizerLanguageError, check_corpora_fit, load_tokenizer

    languages = {corpus_language(prepared_dir, name) for name in corpus_names(prepared_dir)}
    checked = set()  # (model, languages): stages 04 and 06 name the same embedders
    for stage in stages:
        for param, serves in LANGUAGE_MODEL_PARAMS.items():
            value = stage.params.get(param)
            served = [language for language in sorted(languages) if serves(language)]
            if not value or not isinstance(value, str) or not served:
                continue
            source = stage.source_of(param)
            ref = embedder_model_ref(value) if param.startswith("embedder") else value
            if ref is None or (ref, tuple(served)) in checked:
                continue
            checked.add((ref, tuple(served)))
            try:
                tokenizer, _ = load_tokenizer(ref, add_special_tokens=False)
            except Exception as exc:  # a hub id missing from the cache offline, a folder without a tokenizer
                raise PipelineError(f"{source}: {param} {value!r}: cannot load its tokenizer to check its language "
                                    f"(is it in the Hugging Face cache?): {type(exc).__name__}: {_one_line(exc)}") from exc
            try:
                check_corpora_fit(tokenizer, prepared_dir, value, served)
            except TokenizerLanguageError as exc:
                raise PipelineError(f"{source}: {param}: {exc}") from exc


def compute_run_key(
    params: dict[str, Any], source_hash: str, upstream_keys: list[str | None], inputs: dict[str, str] | None = None
) -> str:
    """Identity of a stage's result: its params, its notebook, the content of the input files its params
    name, and the results of every earlier stage. (A stage naming no input file keeps the key it had
    before inputs counted.)"""
    identity = {"params": params, "notebook": source_hash, "upstream": upstream_keys}
    if inputs:
        identity["inputs"] = inputs
    payload = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def recorded_run_key(output_dir: Path) -> str | None:
    """The run key in a stage folder's metrics.json; None if the stage never finished there."""
    try:
        return json.loads((output_dir / METRICS_FILE).read_text(encoding="utf-8"))["stage"]["run_key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _upstream_keys(names: list[str], index: int, root: Path) -> list[str | None]:
    return [recorded_run_key(paths.stage_dir(root, name)) for name in names[:index]]


def _resolve_dirs(
    profile: str, params_dir: str | Path | None, outputs_root: str | Path | None, notebooks_dir: str | Path | None
) -> tuple[Path, Path, Path]:
    """(params, outputs, notebooks) folders: the repo's own unless given."""
    root = paths.repo_root()
    if not params_dir and profile == MODELS_DIR:  # params/models/ holds model layers, not a profile
        raise PipelineError(f"{root / 'params' / MODELS_DIR} holds model layers (named by a profile's "
                            f"pipeline.yaml), not a profile: name a profile")
    return (
        Path(params_dir) if params_dir else root / "params" / profile,
        paths.outputs_root(profile, outputs_root).resolve(),
        Path(notebooks_dir).resolve() if notebooks_dir else root / "notebooks",
    )


def replicated_stage(stage: Stage, replica: int) -> Stage:
    """`stage` as replica `replica` runs it: its `seed` parameter (where it declares one) + `replica`."""
    if "seed" not in stage.params:
        return stage
    seed = int(stage.params["seed"]) + replica
    return replace(stage, overrides={**stage.overrides, "seed": seed}, params={**stage.params, "seed": seed})


def _link_shared_stages(root: Path, out_root: Path, shared: list[str]) -> None:
    """A replica folder whose shared (unreplicated) stages are links to the main run's."""
    root.mkdir(parents=True, exist_ok=True)
    for name in shared:
        link, target = root / name, Path(os.path.relpath(out_root / name, root))
        if link.is_symlink() and os.readlink(link) == str(target):
            continue
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            shutil.rmtree(link)
        link.symlink_to(target, target_is_directory=True)


def run_pipeline(
    profile: str,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    force: bool = False,
    params_dir: str | Path | None = None,
    outputs_root: str | Path | None = None,
    notebooks_dir: str | Path | None = None,
    verbose: bool = False,
) -> list[StageResult]:
    """Run, in order, every stage that is missing or stale; raise PipelineError with a one-line reason.

    `from_stage` forces that stage and every later one (earlier ones still run if stale); `only` runs
    just one stage; `force` reruns even up-to-date stages.
    """
    if from_stage and only:
        raise PipelineError("--from and --only cannot be combined")
    params_root, out_root, nb_dir = _resolve_dirs(profile, params_dir, outputs_root, notebooks_dir)
    if not params_root.is_dir():  # a mistyped profile must not quietly run on notebook defaults
        raise PipelineError(f"no parameter folder {params_root} for profile {profile!r}")
    notebooks = stage_notebooks(nb_dir)
    names = [notebook.stem for notebook in notebooks]
    selected = [stage_index(names, only)] if only else list(range(len(names)))
    first_forced = stage_index(names, from_stage) if from_stage else None
    # Resolve and check every stage (also those --only/--from leave out) before running any, so a typo in a
    # late yaml file fails in seconds, not hours.
    all_stages = [load_stage(notebook, params_root, profile) for notebook in notebooks]
    stages = {index: all_stages[index] for index in selected}
    for stage in stages.values():
        check_input_files(stage)
    run_settings = read_run_settings(params_root)
    if run_settings.seeds > 1:
        stage_index(names, run_settings.replicate_from)  # a mistyped stage fails before anything runs
    layers = [f"{MODELS_DIR}/{f.name}" if is_model_layer(f) else f.name for f in reversed(profile_chain(params_root))]
    print(f"profile {profile}: {' over '.join(layers)}; training seeds {run_settings.seeds}")
    # The stage that prepares the corpora (00): once its output is there, the later stages' models are checked
    # against the corpora's languages before the first of them runs.
    corpus_stage = next((index for index, stage in enumerate(all_stages) if "corpora" in stage.params), None)
    languages_checked = corpus_stage is None

    created_root = not out_root.exists()  # created by the first stage that runs (a failure names the path)
    for stale in out_root.glob(".*.tmp-*"):  # left by a killed run of a stage that no longer exists
        if not any(stale.name.startswith(f".{name}.tmp-") for name in names):
            shutil.rmtree(stale, ignore_errors=True)
    results = []
    try:
        for index, stage in stages.items():
            forced = force or (first_forced is not None and index >= first_forced)
            upstream = _upstream_keys(names, index, out_root)
            if not languages_checked and index > corpus_stage and upstream[corpus_stage] is not None and (
                forced or not _up_to_date(stage, upstream, out_root)
            ):
                check_model_languages(all_stages[corpus_stage + 1:], paths.stage_dir(out_root, names[corpus_stage]))
                languages_checked = True
            results.append(_run_stage(stage, upstream, out_root, profile, forced, verbose))
        results += _run_replicas(run_settings, names, stages, first_forced, force, out_root,
                                 profile, verbose)
    finally:
        if created_root and out_root.is_dir() and not any(out_root.iterdir()):
            out_root.rmdir()  # a first run that failed leaves no trace
    return results


def _run_replicas(settings: RunSettings, names: list[str], stages: dict[int, Stage], first_forced: int | None,
                  force: bool, out_root: Path, profile: str, verbose: bool) -> list[StageResult]:
    """Training-seed replicas 1 .. seeds - 1 of the selected stages from `replicate_from` on (RUN_SETTINGS)."""
    if settings.seeds == 1:
        return []
    start = stage_index(names, settings.replicate_from)
    results = []
    for replica in range(1, settings.seeds):
        root = paths.replica_root(out_root, replica)
        _link_shared_stages(root, out_root, names[:start])
        for index, stage in stages.items():
            if index < start:
                continue
            forced = force or (first_forced is not None and index >= first_forced)
            print(f"(training seed replica {replica} of {settings.seeds - 1}: {root})")
            result = _run_stage(replicated_stage(stage, replica), _upstream_keys(names, index, root), root, profile,
                                forced, verbose)
            results.append(replace(result, stage=f"seed-{replica}/{result.stage}"))
    return results


def _up_to_date(stage: Stage, upstream_keys: list[str | None], out_root: Path) -> bool:
    """Whether the stage's folder holds the result of these params, notebook, inputs and upstream results."""
    run_key = compute_run_key(stage.params, stage.source_hash, upstream_keys, stage.inputs)
    return recorded_run_key(paths.stage_dir(out_root, stage.name)) == run_key


def _run_stage(
    stage: Stage, upstream_keys: list[str | None], out_root: Path, profile: str, forced: bool, verbose: bool
) -> StageResult:
    run_key = compute_run_key(stage.params, stage.source_hash, upstream_keys, stage.inputs)
    final_dir = paths.stage_dir(out_root, stage.name)
    work_dir = stage_work_dir(out_root, stage.name, run_key)
    for stale in out_root.glob(f".{stage.name}.tmp-*"):  # a killed run's folder is kept only for resuming
        if stale != work_dir or forced:
            shutil.rmtree(stale, ignore_errors=True)
    if not forced and recorded_run_key(final_dir) == run_key:
        print(f"skip {stage.name} (up to date)")
        shutil.rmtree(work_dir, ignore_errors=True)
        return StageResult(stage.name, "skipped", 0.0, run_key, final_dir)

    print(f"== {stage.name} (profile {profile}) ==")
    seconds = execute_stage(stage, run_key, out_root, profile, verbose)
    print(f"-- {stage.name} done in {seconds:.1f} s")
    return StageResult(stage.name, "ran", seconds, run_key, final_dir)


def stage_work_dir(out_root: Path, stage_name: str, run_key: str) -> Path:
    """The hidden folder a stage runs in before it is renamed into place.

    Named by the run key, so a run killed mid-stage (kill -9, preemption, OOM) leaves a folder that the next
    run with the same parameters, notebook and upstream outputs resumes in: stages that train per user
    (03) skip the users already finished there. A stage that fails with an error, or any change of key,
    starts from an empty folder.
    """
    return out_root / f".{stage_name}.tmp-{run_key[:16]}"


def execute_stage(stage: Stage, run_key: str, out_root: Path, profile: str, verbose: bool) -> float:
    """Execute one notebook in its work folder and swap that in as the stage folder; return wall seconds."""
    work_dir = stage_work_dir(out_root, stage.name, run_key)
    if work_dir.exists():
        print(f"resuming {stage.name} in {work_dir.name} (left by an interrupted run)")
    executed = work_dir / f"{stage.name}.ipynb"
    runner_values = {"profile": profile, "outputs_root": str(out_root), "output_dir": str(work_dir)}
    injected = {key: value for key, value in runner_values.items() if key in stage.declared}
    parameters = {**stage.overrides, **injected}
    final_dir = paths.stage_dir(out_root, stage.name)
    try:
        # Not mkdtemp: its 0700 mode would carry over to the final folder; mkdir honours the umask.
        work_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        # A short private folder for the kernel's sockets (a Unix socket path has ~100 characters at most).
        with tempfile.TemporaryDirectory(prefix="udg-kernel-") as socket_dir:
            papermill.execute_notebook(
                stage.notebook,
                executed,
                parameters=parameters,
                # The interpreter running the pipeline (jupyter_client's native kernel), whatever kernel the
                # notebook's metadata names: `udg` exists only where `make lab` registered it.
                kernel_name="python3",
                cwd=stage.notebook.parent,
                progress_bar=True,
                log_output=verbose,
                kernel_manager_class=StageKernelManager,
                config=kernel_config(socket_dir),
            )
        seconds = time.perf_counter() - started
        _record_stage(work_dir / METRICS_FILE, stage, run_key, profile, seconds)
        relocate_adapter_configs(work_dir, final_dir)
        finish_executed_copy(executed, parameters, work_dir, final_dir)
        replace_dir(work_dir, final_dir)
        return seconds
    except Exception as exc:
        raise PipelineError(_failure_message(stage.name, exc, _keep_failed_notebook(executed), out_root)) from exc
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)  # gone already after a success


def _record_stage(metrics_path: Path, stage: Stage, run_key: str, profile: str, seconds: float) -> None:
    """Add the runner's "stage" block to the metrics.json the notebook wrote."""
    if not metrics_path.exists():
        raise PipelineError(
            "the notebook wrote no metrics.json; call udg_lib.provenance.write_metrics(output_dir, ...)"
        )
    record = json.loads(metrics_path.read_text(encoding="utf-8"))
    record["stage"] = {
        "name": stage.name,
        "profile": profile,
        "params": stage.params,
        "inputs": stage.inputs,
        "run_key": run_key,
        "wall_seconds": round(seconds, 2),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(metrics_path, record)


def relocate_adapter_configs(work_dir: Path, final_dir: Path) -> list[Path]:
    """Point saved PEFT adapters at their base model's final place before the work folder is renamed.

    An adapter trained on a base loaded from the work folder records that folder in `adapter_config.json`'s
    `base_model_name_or_path`; after the rename only `final_dir` exists, and
    `AutoPeftModelForSeq2SeqLM.from_pretrained(adapter_dir)` must find the base there. Returns the files changed.
    """
    changed = []
    for config_file in sorted(work_dir.rglob("adapter_config.json")):
        config = json.loads(config_file.read_text(encoding="utf-8"))
        base = config.get("base_model_name_or_path")
        moved = _moved(base, work_dir, final_dir)
        if moved != base:
            config["base_model_name_or_path"] = moved
            write_json(config_file, config)
            changed.append(config_file)
    return changed


def finish_executed_copy(executed: Path, parameters: dict[str, Any], work_dir: Path, final_dir: Path) -> None:
    """Make a stage's executed notebook read as the stage's own, before its work folder is renamed into place.

    - Its injected parameters cell (`parameters`, as papermill injected them), and papermill's record of the
      parameters and of the output path, name `final_dir` where they named `work_dir` (`output_dir`):
      rerunning the copy in JupyterLab, or with papermill, writes into the stage's folder, not into a hidden
      work folder that no longer exists. The cell's comment line names the work folder the run wrote to. The
      source notebook, hence the run key, is untouched.
    - Each progress bar reads its last state: text bars (`progress.settle_stream_outputs`), and the text
      fallback of other libraries' widget bars (`progress.settle_widget_bars`).
    """
    notebook = nbformat.read(executed, as_version=nbformat.NO_CONVERT)
    record = notebook.metadata.get("papermill", {})
    parameters = {key: _moved(value, work_dir, final_dir) for key, value in parameters.items()}
    for cell in notebook.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            note = f"Parameters (the runner wrote to {work_dir.name}, renamed to output_dir when the stage finished)"
            cell.source = translate_parameters("python3", "python", parameters, note)
        if cell.cell_type == "code":
            cell.outputs = settle_stream_outputs(cell.outputs)
    settle_widget_bars(notebook)
    if "parameters" in record:
        record["parameters"] = parameters
    if "output_path" in record:
        record["output_path"] = _moved(record["output_path"], work_dir, final_dir)
    nbformat.write(notebook, executed)


def _moved(value: Any, old: Path, new: Path) -> Any:
    """`value` with the folder `old` replaced by `new` if it is that path or one under it; else `value`."""
    if isinstance(value, str) and (value == str(old) or value.startswith(str(old) + os.sep)):
        return str(new) + value[len(str(old)):]
    return value


def _keep_failed_notebook(executed: Path) -> Path | None:
    """Move a failed run's executed notebook out of outputs/ into a fresh folder under the system temp dir;
    None when there is none or it cannot be moved (a full disk)."""
    if not executed.exists():
        return None
    try:
        kept = Path(tempfile.mkdtemp(prefix="udg-failed-")) / executed.name
        shutil.move(executed, kept)
    except OSError:
        return None
    return kept


def _failure_message(stage: str, exc: Exception, kept: Path | None, out_root: Path | None = None) -> str:
    if isinstance(exc, papermill.PapermillExecutionError):
        # exec_count is the "In [n]" label the cell carries in the kept notebook.
        cause = f" in cell {exc.exec_count}: {exc.ename}: {_one_line(exc.evalue)}"
        found = re.match(r"\[Errno (\d+)\]", str(exc.evalue))
        os_errno = int(found[1]) if found else None
    elif isinstance(exc, PipelineError):
        cause, os_errno = f": {_one_line(exc)}", None
    else:
        cause = f": {type(exc).__name__}: {_one_line(exc)}"
        os_errno = exc.errno if isinstance(exc, OSError) else None
    notes = []
    if out_root is not None:  # a full disk's error seldom names the file, and some libraries hide its errno
        if os_errno in _DISK_FULL:
            notes.append(f"writing under {out_root}")
        elif os_errno is None and _disk_full(out_root):
            notes.append(f"the disk of {out_root} is full")
    notes.append(f"executed notebook kept at {kept}" if kept else "no executed notebook")
    return f"stage {stage} failed{cause} ({'; '.join(notes)})"


def _disk_full(folder: Path) -> bool:
    """Whether the disk of `folder` (or of its nearest existing parent) has next to no space left."""
    for candidate in (folder, *folder.parents):
        try:
            usage = shutil.disk_usage(candidate)
        except OSError:
            continue
        return usage.free < min(_FULL_DISK_BYTES, usage.total // 100)
    return False


def stage_statuses(
    profile: str,
    *,
    params_dir: str | Path | None = None,
    outputs_root: str | Path | None = None,
    notebooks_dir: str | Path | None = None,
) -> list[tuple[str, str]]:
    """(stage, "up to date" | "stale" | "missing") for every stage, as a run now would see them."""
    params_root, out_root, nb_dir = _resolve_dirs(profile, params_dir, outputs_root, notebooks_dir)
    if not params_root.is_dir():  # a mistyped profile must not quietly run on notebook defaults
        raise PipelineError(f"no parameter folder {params_root} for profile {profile!r}")
    notebooks = stage_notebooks(nb_dir)
    names = [notebook.stem for notebook in notebooks]
    statuses = []
    upstream_current = True  # a rerun upstream changes its run key, which makes everything after it stale
    for index, notebook in enumerate(notebooks):
        stage = load_stage(notebook, params_root, profile)
        recorded = recorded_run_key(paths.stage_dir(out_root, stage.name))
        expected = compute_run_key(
            stage.params, stage.source_hash, _upstream_keys(names, index, out_root), stage.inputs
        )
        if recorded is None:
            status = "missing"
        elif upstream_current and recorded == expected:
            status = "up to date"
        else:
            status = "stale"
        upstream_current = upstream_current and status == "up to date"
        statuses.append((stage.name, status))
    return statuses


def format_summary(results: list[StageResult]) -> str:
    """A table of what ran, for the end of a run."""
    width = max([len("stage"), *(len(result.stage) for result in results)])
    lines = [f"{'stage':<{width}}  {'status':<7}  {'seconds':>8}"]
    for result in results:
        seconds = f"{result.seconds:.1f}" if result.status == "ran" else "-"
        lines.append(f"{result.stage:<{width}}  {result.status:<7}  {seconds:>8}")
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m udg_lib.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True, help="params/<profile>/ overrides, outputs/<profile>/ results")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument(
        "--from", dest="from_stage", metavar="STAGE", help="rerun STAGE (name or NN) and every later one"
    )
    selection.add_argument("--only", metavar="STAGE", help="run just STAGE (name or NN) if stale")
    parser.add_argument("--force", action="store_true", help="rerun stages even when up to date")
    parser.add_argument("--params-dir", help="folder of <stage>.yaml files instead of params/<profile>")
    parser.add_argument("--outputs-root", help="folder for stage outputs instead of outputs/<profile>")
    parser.add_argument("--notebooks-dir", help="folder of NN_*.ipynb stages instead of notebooks/")
    parser.add_argument("--list", action="store_true", help="print each stage's status and exit")
    parser.add_argument("--verbose", action="store_true", help="echo the notebooks' output while they run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    dirs = {"params_dir": args.params_dir, "outputs_root": args.outputs_root, "notebooks_dir": args.notebooks_dir}
    if args.verbose:
        # papermill echoes cell output through its logger at INFO.
        logging.basicConfig(format="%(message)s")
        logging.getLogger("papermill").setLevel(logging.INFO)
    try:
        if args.list:
            statuses = stage_statuses(args.profile, **dirs)
            width = max(len(name) for name, _ in statuses)
            for name, status in statuses:
                print(f"{name:<{width}}  {status}")
            return 0
        results = run_pipeline(
            args.profile, from_stage=args.from_stage, only=args.only, force=args.force, verbose=args.verbose, **dirs
        )
    except PipelineError as exc:
        print(f"udg pipeline: {exc}", file=sys.stderr)
        return 1
    print(format_summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
