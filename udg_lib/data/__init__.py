"""Corpus layer: one canonical schema for every corpus, loaders, validation and storage."""

from __future__ import annotations

import inspect
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
from udg_lib.paths import repo_root

FORMATS = ("chitchat", "seinfeld", "tbbt", "personachat_json", "japanese_xlsx", "generic")
_LOADERS = {"chitchat": load_chitchat, "seinfeld": load_seinfeld, "tbbt": load_tbbt,
            "personachat_json": load_personachat_json, "japanese_xlsx": load_japanese_xlsx, "generic": load_generic}
# Spec keys that name files (resolved from the repository root) in place of the loader's path arguments.
_PATH_KEYS = {"chitchat": ("path",), "personachat_json": ("path",), "japanese_xlsx": ("path",),
              "generic": ("turns", "users")}
_REQUIRED_KEYS = {"personachat_json": "path", "japanese_xlsx": "path", "generic": "turns"}
# Every format takes these: `split` is read by stage 00 (per-corpus split settings), not by the loader.
_COMMON_KEYS = ("format", "name", "split")


def spec_keys(fmt: str) -> tuple[str, ...]:
    """The keys a corpus spec of format `fmt` accepts."""
    options = [name for name, p in inspect.signature(_LOADERS[fmt]).parameters.items()
               if p.kind is p.KEYWORD_ONLY and name not in _COMMON_KEYS]
    return (*_COMMON_KEYS, *_PATH_KEYS.get(fmt, ()), *options)


def check_corpus_spec(spec: object, where: str = "parameters") -> None:
    """Raise CorpusError for a spec that is not a mapping, names an unknown format or carries a key its
    format does not accept (e.g. `path:` for a generic corpus, which takes `turns:`)."""
    if not isinstance(spec, dict):
        raise CorpusError(where, "corpus spec", f"expected a mapping such as {{format: generic, turns: ...}}, "
                                                f"got {type(spec).__name__} {spec!r}")
    fmt, name = spec.get("format"), spec.get("name", spec.get("format", "?"))
    if fmt not in FORMATS:
        raise CorpusError(where, f"corpus {name!r}", f"unknown format {fmt!r}; expected one of {FORMATS}")
    unknown = [key for key in spec if key not in spec_keys(fmt)]
    if unknown:
        raise CorpusError(where, f"corpus {name!r}", f"unknown key {unknown[0]!r} for format {fmt!r}; "
                                                     f"it accepts: {', '.join(spec_keys(fmt))}")
    required = _REQUIRED_KEYS.get(fmt)
    if required and required not in spec:
        raise CorpusError(where, f"corpus {name!r}", f"format {fmt!r} needs the key {required!r} (a file path)")


def corpus_paths(spec: dict) -> dict[str, Path]:
    """The files a corpus spec names, by key, resolved as `load_from_spec` resolves them (relative paths
    from the repository root)."""

    found = {}
    for key in _PATH_KEYS.get(spec.get("format"), ()):
        if spec.get(key) is not None:
            path = Path(spec[key]).expanduser()
            found[key] = path if path.is_absolute() else repo_root() / path
    return found


def load_from_spec(spec: dict) -> Corpus:
    """Load one corpus described by a parameter-file entry, e.g.
    `{"format": "generic", "turns": "data/turns.jsonl", "users": "data/users.csv", "name": "mylab"}`.
    Relative paths are taken from the repository root. Stage 00 reads the `split` key before this is called.
    """

    check_corpus_spec(spec)
    spec = dict(spec)
    spec.pop("split", None)
    fmt = spec.pop("format", None)

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
    "FORMATS", "PROFILE_FIELDS", "SCHEMA_VERSION", "UNKNOWN", "Corpus", "CorpusError", "check_corpus_spec", "corpus_paths",
    "load_chitchat", "spec_keys",
    "load_corpus", "load_from_spec", "load_generic", "load_japanese_xlsx", "load_personachat_json",
    "load_seinfeld", "load_tbbt", "save_corpus", "validate_corpus",
]
