"""Provenance: fingerprints, versions, and the metrics.json every stage writes."""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime
from pathlib import Path

import pytest

from udg_lib import provenance
from udg_lib.provenance import (
    device_info,
    fingerprint_cached,
    fingerprint_file,
    fingerprint_files,
    git_commit,
    package_versions,
    write_metrics,
)


def test_fingerprint_file_equals_hashlib_sha256(tmp_path: Path) -> None:
    data = bytes(range(256)) * 12_000  # ~3 MiB: several read chunks
    path = tmp_path / "corpus.bin"
    path.write_bytes(data)
    assert fingerprint_file(path) == hashlib.sha256(data).hexdigest()


def test_fingerprint_files_keys_are_the_paths_as_given(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    expected = {"a.txt": hashlib.sha256(b"a").hexdigest(), "b.txt": hashlib.sha256(b"b").hexdigest()}
    assert fingerprint_files(["a.txt", Path("b.txt")], root=tmp_path) == expected
    monkeypatch.chdir(tmp_path)
    assert fingerprint_files(["a.txt", Path("b.txt")]) == expected


def test_package_versions_include_python_and_skip_missing() -> None:
    versions = package_versions(["pytest", "no-such-distribution-udg"])
    assert set(versions) == {"python", "pytest"}


def test_git_commit_of_this_checkout_and_outside_git(tmp_path: Path) -> None:
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", git_commit())
    assert git_commit(tmp_path) == "unknown"


def test_device_info_names_the_torch_device() -> None:
    info = device_info()
    assert info["cpu_count"] >= 1
    assert info["torch_device"] in {"cpu", "cuda", "unavailable"}


def test_write_metrics_merges_repeated_calls(tmp_path: Path) -> None:
    (tmp_path / "turns.jsonl").write_text('{"text": "hi"}\n')
    # A relative data file is read in the output folder and keyed by its name there.
    write_metrics(
        tmp_path, {"bleu": 1.0, "loss": 2.0}, params={"lr": 1e-4}, seeds={"torch": 0}, data_files=["turns.jsonl"]
    )
    path = write_metrics(tmp_path, {"loss": 1.5, "rouge": 0.3}, seeds={"numpy": 1})

    record = json.loads(path.read_text())
    assert path == tmp_path / "metrics.json"
    assert record["metrics"] == {"bleu": 1.0, "loss": 1.5, "rouge": 0.3}
    assert record["params"] == {"lr": 1e-4}
    provenance = record["provenance"]
    assert {"git_commit", "packages", "device", "seeds", "data", "timestamp"} <= set(provenance)
    assert provenance["seeds"] == {"torch": 0, "numpy": 1}
    assert provenance["data"] == {"turns.jsonl": hashlib.sha256(b'{"text": "hi"}\n').hexdigest()}
    assert datetime.fromisoformat(provenance["timestamp"]).utcoffset().total_seconds() == 0


def test_fingerprint_cached_reads_a_file_again_only_when_it_changes(tmp_path: Path, monkeypatch) -> None:
    path, cache = tmp_path / "corpus.jsonl", tmp_path / "cache" / "hashes.json"
    path.write_text("3352 turns")
    reads = []
    monkeypatch.setattr(provenance, "fingerprint_file", lambda p: reads.append(p) or fingerprint_file(p))
    key = str(path.resolve())
    assert fingerprint_cached([path], cache) == {key: hashlib.sha256(b"3352 turns").hexdigest()}
    assert fingerprint_cached([path], cache) == {key: hashlib.sha256(b"3352 turns").hexdigest()}
    assert len(reads) == 1  # the second call took the hash from the cache
    path.write_text("1000 turns")  # same size, new content: the modification time tells
    stat = path.stat()  # (a coarse filesystem clock could give both writes one time; a later write does not)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert fingerprint_cached([path], cache) == {key: hashlib.sha256(b"1000 turns").hexdigest()}
    assert len(reads) == 2
    assert json.loads(cache.read_text())[key]["sha256"] == hashlib.sha256(b"1000 turns").hexdigest()


def test_hash_cache_lives_under_xdg_cache_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert provenance.hash_cache_file() == tmp_path / "udg" / "file-hashes.json"


def test_recorded_params_prefer_the_runners_resolved_set(tmp_path: Path) -> None:
    from udg_lib.provenance import recorded_params

    write_metrics(tmp_path, {"x": 1}, params={"max_source_length": 64, "own": True})
    assert recorded_params(tmp_path) == {"max_source_length": 64, "own": True}
    record = json.loads((tmp_path / "metrics.json").read_text())
    record["stage"] = {"params": {"max_source_length": 48}}  # what the runner writes after the notebook
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    assert recorded_params(tmp_path) == {"max_source_length": 48, "own": True}
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        recorded_params(tmp_path / "missing")
