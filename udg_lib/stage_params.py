"""What a stage runs with: a notebook's declared parameters laid over a profile's yaml files (the profiles it
extends first, `param_profiles`), checked and fingerprinted, and the profile's runner settings. The runner
(`pipeline`) executes stages so resolved; the planner (`plan`) counts and costs them without running anything,
so both read them here.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import papermill

from udg_lib import paths
from udg_lib.catalog import STAGE_NAMES, stage
from udg_lib.param_profiles import CHAIN_KEYS, RUN_SETTINGS_FILE, PipelineError, is_model_layer, layered_file
from udg_lib.provenance import fingerprint_cached

# Parameters the runner sets itself, injected only into notebooks that declare them.
RUNNER_PARAMS = ("profile", "outputs_root", "output_dir")
# Where a stage writes is not part of its configuration: left out of the recorded params and run key.
LOCATION_PARAMS = ("outputs_root", "output_dir")
# Annotations of a parameters cell and the yaml values each accepts (an int is a float; a bool is not an int).
PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,)
}


# A profile's own runner settings (not a stage's parameters): params/<profile>/pipeline.yaml, which may also say
# `extends: <profile>` (udg_lib.param_profiles: the profile is that one with its own files laid over it) and
# `model: <name>` (the model layer params/models/<name>/ that sets the model's keys in every stage).
# `seeds`: training seeds (1: one run). With N > 1 the stages from `replicate_from` on (by default the first that
# trains: the pre-trained models, then DA, One-ID, LoRA and FULL and their evaluation) run N - 1 more times,
# replica r in outputs/<profile>/seeds/seed-<r>/ with every replicated stage's `seed` parameter + r; the
# stages before it (corpus, splits, profiles) are shared, linked into each replica's folder. The report pools
# the replicas as a replication factor within each user (`udg_lib.report`).
RUN_SETTINGS = {"seeds": 1, "replicate_from": "02"}


@dataclass(frozen=True)
class Stage:
    """A notebook and the parameters it runs with under one profile."""

    name: str  # the file stem, e.g. "00_prepare_corpus"
    notebook: Path
    declared: frozenset[str]  # names in the notebook's parameters cell
    overrides: dict[str, Any]  # from the profile's yaml file
    params: dict[str, Any]  # notebook defaults <- yaml <- profile: what the notebook runs with
    source_hash: str
    inputs: dict[str, str]  # sha256 of each input file (or folder) a param names, keyed as written
    sources: dict[str, Path] = field(default_factory=dict)  # the yaml file that set each override

    def source_of(self, param: str) -> Path:
        """Where a parameter's value was set: the profile yaml file that set it, else the notebook (its default;
        the runner's own values, such as a replica's seed, too)."""
        return self.sources.get(param, self.notebook)


def stage_notebooks(notebooks_dir: Path) -> list[Path]:
    """The `NN_*.ipynb` notebooks in run order."""
    notebooks = sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise PipelineError(f"no stage notebooks (NN_*.ipynb) in {notebooks_dir}")
    return notebooks


def stage_index(names: list[str], ref: str) -> int:
    """Position of the stage named by its full stem or its NN prefix."""
    for index, name in enumerate(names):
        if ref in (name, name.split("_", 1)[0]):
            return index
    raise PipelineError(f"no stage '{ref}' (stages: {', '.join(names)})")


def load_stage(notebook: Path, params_dir: Path, profile: str) -> Stage:
    """Resolve a notebook's parameters under a profile (its own yaml laid over those of the profiles it extends),
    rejecting yaml keys the notebook does not declare; an error names the file that set the key."""
    try:
        declared = papermill.inspect_notebook(notebook)
    except Exception as exc:  # nbformat and papermill raise assorted types for an unreadable notebook
        raise PipelineError(f"{notebook}: cannot read its parameters: {type(exc).__name__}: {_one_line(exc)}") from exc
    defaults = {name: _default_value(p["default"]) for name, p in declared.items()}
    params_file = params_dir / f"{notebook.stem}.yaml"
    overrides, sources = layered_file(params_dir, params_file.name)
    model_keys = stage(notebook.stem).model_keys if notebook.stem in STAGE_NAMES else ()
    for key in overrides:
        if is_model_layer(sources[key].parent) and key not in model_keys:
            raise PipelineError(f"{sources[key]}: '{key}' is not the model's to set (a model layer sets only "
                                f"{', '.join(model_keys) or 'nothing'} in {notebook.stem}; the rest is the profile's)")
        if key in RUNNER_PARAMS:
            raise PipelineError(f"{sources[key]}: '{key}' is set by the runner and cannot be overridden")
        if key not in defaults:
            known = ", ".join(defaults) or "none"
            raise PipelineError(f"{sources[key]}: unknown parameter '{key}' ({notebook.name} declares: {known})")
    for source in dict.fromkeys(sources.values()):
        check_param_types(source, declared, {k: v for k, v in overrides.items() if sources[k] == source})
    params = {name: value for name, value in defaults.items() if name not in LOCATION_PARAMS}
    params.update(overrides)
    if "profile" in defaults:
        params["profile"] = profile
    check_corpus_specs(sources.get("corpora", notebook), params.get("corpora"))
    return Stage(notebook.stem, notebook, frozenset(defaults), overrides, params, notebook_source_hash(notebook),
                 input_fingerprints(params, params_file), sources)


def check_param_types(params_file: Path, declared: dict[str, dict], overrides: dict[str, Any]) -> None:
    """Each yaml value must have the type its parameter is annotated with (see PARAM_TYPES); parameters
    annotated otherwise (or not at all) are not checked. A null is accepted only where the default is None."""
    for key, value in overrides.items():
        annotation = declared[key].get("inferred_type_name", "None")
        accepted = PARAM_TYPES.get(annotation)
        if accepted is None or (value is None and declared[key].get("default") == "None"):
            continue
        if isinstance(value, bool) and bool not in accepted or not isinstance(value, accepted):
            given = "null" if value is None else type(value).__name__
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise PipelineError(f"{params_file}: parameter '{key}' expects {annotation}, got {given} {shown}")


def check_corpus_specs(source: Path, corpora: Any) -> None:
    """Stage 00's corpus specs, checked against their formats' keys before anything runs."""
    if not isinstance(corpora, list):
        return  # a stage without corpora, or a wrong type that check_param_types reported
    from udg_lib.data import CorpusError, check_corpus_spec  # pandas and the loaders: only when needed

    for spec in corpora:
        try:
            check_corpus_spec(spec, where=str(source))
        except CorpusError as exc:
            raise PipelineError(str(exc)) from exc


def input_paths(params: dict[str, Any]) -> dict[str, Path]:
    """The files and folders that the params' strings name (nested lists and dicts included): a string
    with a `/` or a file suffix naming a regular file or a folder, relative ones read from the repository root as
    `udg_lib.data.load_from_spec` reads them. Hub ids and names that are not paths do not exist, so they
    are left out."""
    root, found = paths.repo_root(), {}

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)
        elif isinstance(value, str) and value and ("/" in value or os.sep in value or Path(value).suffix):
            path = Path(value).expanduser()
            path = path if path.is_absolute() else root / path
            if path.is_file() or path.is_dir():  # regular files: never a device such as /dev/full
                found[value] = path

    visit({key: value for key, value in params.items() if key not in LOCATION_PARAMS})
    return found


def input_fingerprints(params: dict[str, Any], params_file: Path) -> dict[str, str]:
    """sha256 of every input file the params name (a folder: of its files' names and hashes), from the
    cache of `provenance.fingerprint_cached`, so a file cut or replaced at the same path makes the stage stale."""
    fingerprints = {}
    for value, path in sorted(input_paths(params).items()):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        try:
            digests = fingerprint_cached(files)
        except OSError as exc:
            raise PipelineError(f"{params_file}: cannot read input {value!r}: {_one_line(exc)}") from exc
        if path.is_file():
            fingerprints[value] = digests[str(path.resolve())]
        else:
            listing = [(str(f.relative_to(path)), digests[str(f.resolve())]) for f in files]
            fingerprints[value] = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return fingerprints


def _default_value(source: str) -> Any:
    """A default from the parameters cell as a value when it is a literal, else its source, e.g. `Path("x")`."""
    try:
        return ast.literal_eval(source)
    except (ValueError, TypeError, SyntaxError):
        return source


def notebook_source_hash(notebook: Path) -> str:
    """sha256 of the cells' types and sources: outputs, execution counts and metadata do not count."""
    cells = nbformat.read(notebook, as_version=4).cells
    payload = json.dumps([(cell.cell_type, cell.source) for cell in cells])
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class RunSettings:
    """`RUN_SETTINGS_FILE` of a profile: how many training seeds, and from which stage on they replicate."""

    seeds: int = 1
    replicate_from: str = "02"


def read_run_settings(params_root: Path) -> RunSettings:
    """The profile's runner settings (defaults when it has no `RUN_SETTINGS_FILE`), through the profiles it
    extends; a bad key or value is a one-line error naming the file that set it."""
    values, sources = layered_file(params_root, RUN_SETTINGS_FILE)
    for key in values:
        if key not in RUN_SETTINGS:
            raise PipelineError(f"{sources[key]}: unknown setting '{key}' (known: {', '.join([*CHAIN_KEYS, *RUN_SETTINGS])})")
    seeds = values.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise PipelineError(f"{sources['seeds']}: seeds must be a whole number >= 1, got {seeds!r}")
    replicate_from = values.get("replicate_from", "02")
    if not isinstance(replicate_from, str):
        raise PipelineError(f"{sources['replicate_from']}: replicate_from must name a stage (e.g. \"02\"), got "
                            f"{replicate_from!r}")
    return RunSettings(seeds, replicate_from)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())  # error values may span lines; the report is one
