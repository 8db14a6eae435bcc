"""Provenance for results: every `metrics.json` says which code, packages, device, seeds and data made it."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from udg_lib.io import write_json
from udg_lib.param_profiles import profile_chain
from udg_lib.paths import repo_root

# Distributions whose versions can change a number in the study (models, data, metrics, runner).
DEFAULT_PACKAGES: tuple[str, ...] = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "tokenizers",
    "sentencepiece",
    "numpy",
    "pandas",
    "pyarrow",
    "scipy",
    "papermill",
    "sentence-transformers",
    "rouge-score",
    "fugashi",
    "unidic-lite",
    "chitchat-dataset",
    "seinfeld-laugh-corpus",
    "pyannote.db.thebigbangtheory",
    "udg",
)

METRICS_FILE = "metrics.json"
_CHUNK_BYTES = 1 << 20


def git_commit(root: str | Path | None = None) -> str:
    """HEAD of the checkout at `root` (default: the repo root), `+dirty` if it has uncommitted changes.

    Untracked files count as changes: a new module the notebooks import changes results too.
    Returns "unknown" outside a git checkout or without git.
    """
    cwd = Path(root) if root else repo_root()
    try:
        commit = _git(cwd, "rev-parse", "HEAD")
        dirty = bool(_git(cwd, "status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def package_versions(names: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str]:
    """Installed versions of the named distributions, plus `python`; names not installed are left out."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def device_info() -> dict[str, Any]:
    """Platform, CPU count and the torch device (with GPU name) this process computes on."""
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        import torch  # imported here: a stage that never touches torch should not need it
    except ImportError:
        info["torch_device"] = "unavailable"
        return info
    if torch.cuda.is_available():
        info["torch_device"] = "cuda"
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info["torch_device"] = "cpu"
    return info


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MiB; None where the OS does not report it.

    Called from a notebook this is the kernel's own peak, which the runner cannot see per stage.
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def fingerprint_file(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in chunks so large corpora fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def hash_cache_file() -> Path:
    """Where `fingerprint_cached` keeps its hashes: `$XDG_CACHE_HOME/udg/file-hashes.json` (~/.cache by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "udg" / "file-hashes.json"


def fingerprint_cached(paths: Iterable[str | Path], cache_file: str | Path | None = None) -> dict[str, str]:
    """sha256 of each file, keyed by its absolute path; a file whose size and modification times (mtime,
    ctime, in ns) match the cache entry is not read again, so a large corpus is hashed once, not every run.

    The cache (default `hash_cache_file()`) is a small JSON file of path -> size, times, sha256; entries of
    files that no longer exist are dropped. An unreadable or unwritable cache only costs re-reading.
    """
    cache_path = Path(cache_file) if cache_file else hash_cache_file()
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    digests, changed = {}, False
    for path in paths:
        path = Path(path).resolve()
        stat = path.stat()
        key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}
        entry = cache.get(str(path))
        if isinstance(entry, dict) and all(entry.get(k) == v for k, v in key.items()) and entry.get("sha256"):
            digests[str(path)] = entry["sha256"]
            continue
        digests[str(path)] = fingerprint_file(path)
        cache[str(path)] = {**key, "sha256": digests[str(path)]}
        changed = True
    if changed:
        kept = {name: entry for name, entry in cache.items() if Path(name).is_file()}
        try:
            write_json(cache_path, kept)
        except OSError:
            pass  # a read-only home or a full disk: the hashes are still right, only not remembered
    return digests


def fingerprint_files(paths: Iterable[str | Path], root: str | Path | None = None) -> dict[str, str]:
    """sha256 of each file, keyed by the path as given; relative paths are read under `root` (default: cwd).

    Relative keys keep results comparable across machines and output folders.
    """
    base = Path(root) if root else Path()
    return {str(path): fingerprint_file(base / path) for path in paths}


def provenance(
    seeds: Mapping[str, Any] | None = None,
    data_files: Iterable[str | Path] | None = None,
    *,
    data_root: str | Path | None = None,
) -> dict[str, Any]:
    """Everything needed to tell whether two results are comparable: code, packages, device, seeds, data.

    Relative `data_files` are read under `data_root` (default: cwd), see `fingerprint_files`.
    """
    return {
        "git_commit": git_commit(),
        "packages": package_versions(),
        "device": device_info(),
        "seeds": dict(seeds or {}),
        "data": fingerprint_files(data_files or (), root=data_root),
        "peak_rss_mb": peak_rss_mb(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_metrics(
    output_dir: str | Path,
    metrics: Mapping[str, Any],
    *,
    params: Mapping[str, Any] | None = None,
    seeds: Mapping[str, Any] | None = None,
    data_files: Iterable[str | Path] | None = None,
) -> Path:
    """Write `output_dir/metrics.json` as {"metrics", "params", "provenance"}, merging into an existing one.

    Relative `data_files` are read under `output_dir`, so a stage fingerprints its own files by their
    names in its folder. A notebook may call this after each step: new metric and param keys update the
    old ones, provenance is refreshed, and seeds and data fingerprints recorded by earlier calls are kept.
    """
    path = Path(output_dir) / METRICS_FILE
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    new_provenance = provenance(seeds, data_files, data_root=output_dir)
    old_provenance = old.get("provenance", {})
    new_provenance["seeds"] = {**old_provenance.get("seeds", {}), **new_provenance["seeds"]}
    new_provenance["data"] = {**old_provenance.get("data", {}), **new_provenance["data"]}
    record = {
        **old,  # keeps blocks other writers added, e.g. the runner's "stage"
        "metrics": {**old.get("metrics", {}), **metrics},
        "params": {**old.get("params", {}), **(params or {})},
        "provenance": new_provenance,
    }
    return write_json(path, record)


# Code whose change can change a stage's numbers: a run older than its last change is not published.
SOURCE_PATHS: tuple[str, ...] = ("udg_lib", "notebooks")


def source_paths(profile: str | None, root: str | Path | None = None) -> list[str]:
    """The paths whose last commit a published run must include: `SOURCE_PATHS` and `params/<profile>` with
    every profile it extends and its model layer (`param_profiles.profile_chain`; all of `params/` when the
    profile is not known)."""
    if not profile:
        return [*SOURCE_PATHS, "params"]
    checkout = Path(root) if root else repo_root()
    folder = checkout / "params" / profile
    chain = profile_chain(folder) if folder.is_dir() else [folder]
    return [*SOURCE_PATHS, *(p.relative_to(checkout).as_posix() for p in chain)]


def last_source_commit(profile: str | None, root: str | Path | None = None) -> str:
    """The last commit that touched `source_paths(profile)` in the checkout at `root` (default: the repo)."""
    return _git(Path(root) if root else repo_root(), "log", "-1", "--format=%H", "--", *source_paths(profile, root))


def stale_stage_faults(metrics_files: Iterable[str | Path], profile: str | None,
                       root: str | Path | None = None) -> list[str]:
    """One line per stage record that a published result must not come from (showyourwork's rule: results
    from a commit): its `provenance.git_commit` is missing or unknown, ends with `+dirty` (uncommitted code ran),
    is not a commit of the checkout at `root`, or is older than the last change to `source_paths(profile)`
    (`git merge-base --is-ancestor`: that change must be the recorded commit or one of its ancestors)."""
    cwd = Path(root) if root else repo_root()
    try:
        last = last_source_commit(profile, cwd)
    except (OSError, subprocess.CalledProcessError) as exc:
        return [f"{cwd}: not a git checkout, so no stage's commit can be checked ({type(exc).__name__})"]
    faults = []
    for path in map(Path, metrics_files):
        commit = str(json.loads(path.read_text(encoding="utf-8")).get("provenance", {}).get("git_commit") or "")
        if not commit or commit == "unknown":
            faults.append(f"{path}: no git commit recorded (provenance.git_commit {commit or 'missing'})")
        elif commit.endswith("+dirty"):
            faults.append(f"{path}: ran on a dirty tree ({commit}): uncommitted code made it")
        elif subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=cwd,
                            capture_output=True).returncode != 0:
            faults.append(f"{path}: commit {commit} is not in the repository at {cwd}")
        elif last and subprocess.run(["git", "merge-base", "--is-ancestor", last, commit], cwd=cwd,
                                     capture_output=True).returncode != 0:
            faults.append(f"{path}: stale: commit {commit[:10]} predates {last[:10]}, the last change to "
                          f"{', '.join(source_paths(profile, cwd))}")
    return faults


def recorded_params(output_dir: str | Path) -> dict[str, Any]:
    """The parameters a stage ran with, from its `metrics.json`: the runner's resolved set (its "stage" block)
    over what the notebook recorded itself; an error names the file when there is none."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.json to read the stage's parameters from (run the stage first)")
    record = json.loads(path.read_text(encoding="utf-8"))
    return {**record.get("params", {}), **record.get("stage", {}).get("params", {})}
