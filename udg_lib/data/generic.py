"""The generic format for a lab's own data: JSONL or CSV, one turn a record.

turns file (required), `.jsonl` or `.csv`:
    dialogue_id (str), turn_index (int, unique within a dialogue), speaker_id (str), text (str),
    timestamp (optional, free text)
users file (optional), `.jsonl` or `.csv`:
    user_id, and optionally age_band, gender, marital, occupation, region (blank = unknown),
    self_intro (str), persona (JSONL: list of sentences; CSV: sentences separated by `|`)
Without a users file every speaker gets an all-unknown profile. With one, every speaker must be in it.
"""

from __future__ import annotations

import csv
import io as _io
import json
from pathlib import Path

import pandas as pd

from udg_lib.data.schema import (
    RECORD,
    REQUIRED_TURN_FIELDS,
    Corpus,
    CorpusError,
    read_utf8_lines,
    users_from_speakers,
    validate_corpus,
)


def read_records(path: str | Path, required: tuple[str, ...]) -> pd.DataFrame:
    """JSONL or CSV records with a `_record` locator ("line N"); each must carry `required` fields."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(path, "file", "does not exist")
    lines = read_utf8_lines(path)
    records: list[dict] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(path, f"line {number}", f"malformed JSON: {err.msg} at column {err.colno}") from None
            if not isinstance(record, dict):
                raise CorpusError(path, f"line {number}", f"expected a JSON object, got {type(record).__name__}")
            records.append(_require(record, required, path, f"line {number}"))
    elif path.suffix == ".csv":
        reader = csv.DictReader(_io.StringIO("\n".join(lines) + "\n", newline=""), restkey="_extra")
        if reader.fieldnames is None:
            raise CorpusError(path, "line 1", "empty file: expected a header")
        for row in reader:
            where = f"line {reader.line_num}"
            if row.get("_extra") or None in row.values():
                raise CorpusError(path, where, f"expected {len(reader.fieldnames)} fields as in the header")
            record = {k: v for k, v in row.items() if v != ""}
            records.append(_require(record, required, path, where))
    else:
        raise CorpusError(path, "file", "unsupported extension: use .jsonl or .csv")
    if not records:
        raise CorpusError(path, "file", "no records")
    return pd.DataFrame(records)


def _require(record: dict, required: tuple[str, ...], path: Path, where: str) -> dict:
    for field in required:
        if field not in record or record[field] is None:
            raise CorpusError(path, where, f"missing field '{field}'")
    return {**record, RECORD: where}


def load_generic(turns_path: str | Path, users_path: str | Path | None = None, *, name: str | None = None,
                 language: str = "en", domain: str = "open", style: str = "text chat",
                 user_kind: str = "Real") -> Corpus:
    """Load a corpus in the generic JSONL/CSV format and validate it."""
    turns_path = Path(turns_path)
    turns = read_records(turns_path, REQUIRED_TURN_FIELDS)
    if users_path:
        users = read_records(users_path, ("user_id",))
    else:
        users = users_from_speakers(turns["speaker_id"].astype(str))
    turns, users = validate_corpus(turns, users, turns_path, users_path)
    return Corpus(name=name or turns_path.stem, turns=turns, users=users, language=language, domain=domain,
                  style=style, user_kind=user_kind, source=str(turns_path))
