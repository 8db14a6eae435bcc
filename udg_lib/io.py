"""Atomic writers: a failed stage never leaves a half-written artifact (temp path, then rename)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    lines = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
    return write_text(path, lines)


def write_parquet(path: str | Path, frame: pd.DataFrame, metadata: dict[str, str] | None = None) -> Path:
    """Write a DataFrame as Parquet; `metadata` is stored in the file's key-value metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_parquet_metadata(path: str | Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"pandas")}


def replace_dir(new: str | Path, final: str | Path) -> None:
    """Make `new` the folder at `final`: a reader sees the old complete folder or the new one, never a mix."""
    new, final = Path(new), Path(final)
    # A non-empty folder cannot be renamed over, so the old one steps aside first and is deleted last.
    old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}") if final.exists() else None
    if old:
        os.replace(final, old)
    try:
        os.replace(new, final)
    except OSError:
        if old:
            os.replace(old, final)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)  # the new folder is in place; a leftover must not fail the caller


@contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """Build a folder atomically: yield an empty folder beside `target` (same filesystem, usual mode);
    if the block succeeds it replaces `target` (`replace_dir`), otherwise it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700; the published folder gets the usual mode
    try:
        yield staging
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
