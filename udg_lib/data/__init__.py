"""Corpus layer: one canonical schema for every corpus, loaders, validation and storage."""

from __future__ import annotations

from pathlib import Path

from udg_lib.data.chitchat import load_chitchat
from udg_lib.data.generic import load_generic
from udg_lib.data.personachat import load_japanese_xlsx, load_personachat_json
from udg_lib.data.schema import (
    PROFILE_FIELDS,
    SCHEMA_VERSION,
    UNKNOWN,
    Corpus,
    CorpusError,
    load_corpus,
    save_corpus,
    validate_corpus,
)
from udg_lib.data.sitcoms import load_seinfeld, load_tbbt

FORMATS = ("chitchat", "seinfeld", "tbbt", "personachat_json", "japanese_xlsx", "generic")


def load_from_spec(spec: dict) -> Corpus:
    """Load one corpus described by a parameter-file entry, e.g.
    `{"format": "generic", "turns": "data/turns.jsonl", "users": "data/users.csv", "name": "mylab"}`.
    Relative paths are taken from the repository root.
    """
    from udg_lib.paths import repo_root

    spec = dict(spec)
    fmt = spec.pop("format", None)
    if fmt not in FORMATS:
        raise CorpusError("parameters", f"corpus {spec.get('name', '?')!r}", f"unknown format {fmt!r}; expected one of {FORMATS}")

    def resolve(key: str) -> Path | None:
        value = spec.pop(key, None)
        if value is None:
            return None
        path = Path(value)
        return path if path.is_absolute() else repo_root() / path

    name = spec.pop("name", None)
    if fmt == "chitchat":
        corpus = load_chitchat(resolve("path"), **spec)
    elif fmt == "seinfeld":
        corpus = load_seinfeld(**spec)
    elif fmt == "tbbt":
        corpus = load_tbbt(**spec)
    elif fmt == "personachat_json":
        corpus = load_personachat_json(resolve("path"), **spec)
    elif fmt == "japanese_xlsx":
        corpus = load_japanese_xlsx(resolve("path"), **spec)
    else:
        corpus = load_generic(resolve("turns"), resolve("users"), **spec)
    if name:
        corpus.name = name
    return corpus


__all__ = [
    "FORMATS", "PROFILE_FIELDS", "SCHEMA_VERSION", "UNKNOWN", "Corpus", "CorpusError", "load_chitchat",
    "load_corpus", "load_from_spec", "load_generic", "load_japanese_xlsx", "load_personachat_json",
    "load_seinfeld", "load_tbbt", "save_corpus", "validate_corpus",
]
