"""Every path the study uses derives from here: the repo root, `outputs/<profile>/`, stage folders."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path:
    """The checkout that holds `notebooks/` and `params/` (an editable install), else the cwd."""
    for candidate in (PACKAGE_DIR.parent, Path.cwd(), *Path.cwd().parents):
        if (candidate / "notebooks").is_dir() and (candidate / "params").is_dir():
            return candidate
    return Path.cwd()


def outputs_root(profile: str, root: str | Path | None = None) -> Path:
    """`outputs/<profile>` under the repo root, unless `root` names another folder."""
    return Path(root) if root else repo_root() / "outputs" / profile


def stage_dir(root: str | Path, stage: str) -> Path:
    """The output folder of a stage, e.g. `stage_dir(root, "00_prepare_corpus")`."""
    return Path(root) / stage


def stage_output_dir(stage: str, profile: str, outputs_root_dir: str = "", output_dir: str = "") -> Path:
    """Where a running notebook writes: the runner's `output_dir` if given, else `outputs/<profile>/<stage>`."""
    return Path(output_dir) if output_dir else stage_dir(outputs_root(profile, outputs_root_dir or None), stage)


REPLICAS_DIR = "seeds"  # a run's training-seed replicas: <outputs root>/seeds/seed-<r>/ (udg_lib.pipeline)


def replica_root(root: str | Path, replica: int) -> Path:
    """Where training-seed replica `replica` (1, 2, ...) of the run at `root` writes its stages."""
    return Path(root) / REPLICAS_DIR / f"seed-{int(replica)}"


def replica_roots(root: str | Path) -> list[tuple[int, Path]]:
    """(replica, folder) of every training-seed replica the run at `root` has, in order (none: one seed)."""
    found = []
    for folder in (Path(root) / REPLICAS_DIR).glob("seed-*"):
        suffix = folder.name.removeprefix("seed-")
        if suffix.isdigit() and folder.is_dir():
            found.append((int(suffix), folder))
    return sorted(found)
