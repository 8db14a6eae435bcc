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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

RUN_SETTINGS_FILE = "pipeline.yaml"  # a profile's runner settings, and where `extends` is said
EXTENDS = "extends"


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


def profile_chain(params_dir: str | Path) -> list[Path]:
    """The folders a profile resolves through, the base first and `params_dir` last: each folder's
    `pipeline.yaml` may name (`extends: <profile>`) a sibling folder that comes before it. A parent that is not
    a folder, a value that is not a profile name, or a cycle is a one-line error naming the file."""
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
        if not isinstance(parent, str) or not parent or Path(parent).name != parent:
            raise PipelineError(f"{settings}: {EXTENDS} must name one profile (a folder beside it), got {parent!r}")
        folder = folder.parent / parent
        if not folder.is_dir():
            raise PipelineError(f"{settings}: {EXTENDS} {parent!r}: no parameter folder {folder}")


def layered_file(params_dir: str | Path, name: str) -> tuple[dict[str, Any], dict[str, Path]]:
    """A profile's values for one file name (`NN_stage.yaml` or `pipeline.yaml`) through its chain, each key
    from the last folder that sets it, and the file each key came from. `extends` itself is not a value."""
    values: dict[str, Any] = {}
    sources: dict[str, Path] = {}
    for folder in profile_chain(params_dir):
        path = folder / name
        own = {k: v for k, v in read_params_file(path).items() if not (name == RUN_SETTINGS_FILE and k == EXTENDS)}
        values.update(own)
        sources.update(dict.fromkeys(own, path))
    return values, sources
