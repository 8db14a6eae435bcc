"""Parameter profiles in layers: a profile may extend another and override only what differs.

A profile is a folder `params/<profile>/` of `NN_stage.yaml` files (a stage's overrides of its notebook's
parameters cell) and an optional `pipeline.yaml` (the runner's settings: `seeds`, `replicate_from`). When its
`pipeline.yaml` says `extends: <other>`, the profile is `params/<other>/` (itself possibly extending a third)
with its own files laid over it, key by key: a stage file the child does not have is the parent's, and a key the
child's file does not set keeps the parent's value. peft's `method_comparison` suite is the model (one
defaults file, each experiment overrides what differs); `full-en-causal` is `full-en` with another model.

The resolved values are what a run sees; each value remembers the file that set it, so an error names the file
to edit, and `provenance.source_paths` counts every folder of the chain (a change to the parent makes the
child's published results stale too).

The model is set in one place. A profile's `pipeline.yaml` may say `model: <name>`, naming a model layer
`params/models/<name>/`: stage files that set only what the model decides (`catalog.StageSpec.model_keys`,
checked by `stage_params.load_stage`: its tokenizer, family
and checkpoint, the LoRA settings that follow the architecture, the completion LLM of the controlled C1s). The
layer goes directly below the profile that names it, so it overrides whatever the profiles below set for those
keys and the profile's own files can still override it; only the nearest `model:` counts (a child that names
another model replaces its parent's layer, and a key the new layer does not set falls back to the notebook or
the profiles, never to the old model). `full-en-causal` is `full-en` with `model: smollm2-135m`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

RUN_SETTINGS_FILE = "pipeline.yaml"  # a profile's runner settings, and where `extends` and `model` are said
EXTENDS = "extends"
MODEL = "model"
CHAIN_KEYS = (EXTENDS, MODEL)  # settings that shape the chain: not values of the profile
MODELS_DIR = "models"  # params/models/<name>/: the model layers, beside the profiles


class PipelineError(RuntimeError):
    """A stage could not be prepared or run; the message is one line for the user."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())  # error values may span lines; the report is one


def read_params_file(path: Path) -> dict[str, Any]:
    """The overrides in one yaml file of a profile; a missing file means none."""
    if not path.exists():
        return {}
    try:
        overrides = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: invalid yaml: {_one_line(exc)}") from exc
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise PipelineError(f"{path}: expected a mapping of parameter names to values")
    return overrides


def _profile_folders(params_dir: str | Path) -> list[Path]:
    """The profiles a profile extends, the base first and `params_dir` last (each `pipeline.yaml` may name,
    `extends: <profile>`, a sibling folder that comes before it). A parent that is not a folder, a value that is
    not a profile name, or a cycle is a one-line error naming the file."""
    chain: list[Path] = []
    folder = Path(params_dir)
    while True:
        if any(folder.resolve() == seen.resolve() for seen in chain):
            names = " -> ".join(p.name for p in [*reversed(chain), folder])
            raise PipelineError(f"{chain[-1] / RUN_SETTINGS_FILE}: {EXTENDS} makes a cycle: {names}")
        chain.append(folder)
        settings = folder / RUN_SETTINGS_FILE
        parent = read_params_file(settings).get(EXTENDS)
        if parent is None:
            return list(reversed(chain))
        _check_name(settings, EXTENDS, parent, "profile (a folder beside it)")
        folder = folder.parent / parent
        if not folder.is_dir():
            raise PipelineError(f"{settings}: {EXTENDS} {parent!r}: no parameter folder {folder}")


def _check_name(settings: Path, key: str, value: object, what: str) -> None:
    if not isinstance(value, str) or not value or Path(value).name != value:
        raise PipelineError(f"{settings}: {key} must name one {what}, got {value!r}")


def is_model_layer(folder: Path) -> bool:
    return folder.parent.name == MODELS_DIR


def profile_chain(params_dir: str | Path) -> list[Path]:
    """The folders a profile resolves through, the base first and `params_dir` last: the profiles it extends
    and, directly below the nearest profile whose `pipeline.yaml` names a `model`, that model's layer
    `params/models/<model>/` (beside the profiles' folders). A model that is not a folder there, or a layer with
    a `pipeline.yaml` of its own, is a one-line error naming the file."""
    chain = _profile_folders(params_dir)
    for index in reversed(range(len(chain))):
        settings = chain[index] / RUN_SETTINGS_FILE
        model = read_params_file(settings).get(MODEL)
        if model is None:
            continue
        _check_name(settings, MODEL, model, f"model layer (a folder in {MODELS_DIR}/ beside the profiles)")
        layer = chain[index].parent / MODELS_DIR / model
        if not layer.is_dir():
            raise PipelineError(f"{settings}: {MODEL} {model!r}: no model layer {layer}")
        if (layer / RUN_SETTINGS_FILE).exists():
            raise PipelineError(f"{layer / RUN_SETTINGS_FILE}: a model layer holds stage files only "
                                f"(runner settings and {EXTENDS} belong to profiles)")
        return [*chain[:index], layer, *chain[index:]]
    return chain


def profile_model(params_dir: str | Path) -> str | None:
    """The model layer a profile resolves through (its nearest `model:`), or None when it names none."""
    return next((folder.name for folder in profile_chain(params_dir) if is_model_layer(folder)), None)


def known_profiles(params_root: Path) -> list[str]:
    """The profile folders in `params_root` (the model layers' folder is not one)."""
    return sorted(p.name for p in params_root.iterdir() if p.is_dir() and p.name != MODELS_DIR)


def layered_file(params_dir: str | Path, name: str) -> tuple[dict[str, Any], dict[str, Path]]:
    """A profile's values for one file name (`NN_stage.yaml` or `pipeline.yaml`) through its chain, each key
    from the last folder that sets it, and the file each key came from. `extends` and `model` are not values."""
    values: dict[str, Any] = {}
    sources: dict[str, Path] = {}
    for folder in profile_chain(params_dir):
        path = folder / name
        own = {k: v for k, v in read_params_file(path).items() if not (name == RUN_SETTINGS_FILE and k in CHAIN_KEYS)}
        values.update(own)
        sources.update(dict.fromkeys(own, path))
    return values, sources
