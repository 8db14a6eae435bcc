"""The canonical corpus schema every loader produces, its validation, and its storage.

turns: dialogue_id, turn_index, speaker_id, text, timestamp (optional, may be empty)
users: user_id, age_band, gender, marital, occupation, region (each may be "unknown"),
       self_intro (may be empty), persona (list of sentences, may be empty)

Loaders attach a `_record` column ("line 3", "row 7", "conversation X turn 2") so that
validation errors can name the file, the record and the fault. It is dropped before saving.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from udg_lib import io

SCHEMA_VERSION = "1"
UNKNOWN = "unknown"
PROFILE_FIELDS: tuple[str, ...] = ("age_band", "gender", "marital", "occupation", "region")
TURN_COLUMNS: tuple[str, ...] = ("dialogue_id", "turn_index", "speaker_id", "text", "timestamp")
REQUIRED_TURN_FIELDS: tuple[str, ...] = ("dialogue_id", "turn_index", "speaker_id", "text")
USER_COLUMNS: tuple[str, ...] = ("user_id", *PROFILE_FIELDS, "self_intro", "persona")
RECORD = "_record"


class CorpusError(ValueError):
    """A fault in an input corpus, naming the file, the record and the fault on one line."""

    def __init__(self, source: str | Path, record: str, fault: str):
        self.source, self.record, self.fault = str(source), record, fault
        super().__init__(f"{source}: {record}: {fault}")


@dataclass
class Corpus:
    """One dialogue corpus in the canonical schema, with the facts Table 2 reports."""

    name: str
    turns: pd.DataFrame
    users: pd.DataFrame
    language: str = "en"  # "en" or "ja": picks tokenizers for ROUGE-L and embeddings later
    domain: str = "open"
    style: str = "text chat"
    user_kind: str = "Real"  # Table 2's "user" row: Real or Persona
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def meta(self) -> dict:
        return {
            "name": self.name,
            "schema_version": SCHEMA_VERSION,
            "language": self.language,
            "domain": self.domain,
            "style": self.style,
            "user_kind": self.user_kind,
            "source": self.source,
            "n_dialogues": int(self.turns["dialogue_id"].nunique()),
            "n_turns": int(len(self.turns)),
            "n_users": int(len(self.users)),
            **self.extra,
        }


def _locate(frame: pd.DataFrame, position: int) -> str:
    if RECORD in frame.columns:
        return str(frame[RECORD].iloc[position])
    return f"row {position + 1}"


def unknown_if_blank(value: object) -> str:
    """Profile values: None, NaN and blank strings all mean `unknown`."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return UNKNOWN
    text = str(value).strip()
    return text if text else UNKNOWN


def has_known_profile(users: pd.DataFrame) -> pd.Series:
    """True for users with at least one known profile field."""
    return users[list(PROFILE_FIELDS)].map(unknown_if_blank).ne(UNKNOWN).any(axis=1)


def profile_lookup(users: pd.DataFrame) -> dict[str, dict[str, object]]:
    """user_id -> {profile field: value}, for rendering prompts."""
    return users.set_index("user_id")[list(PROFILE_FIELDS)].to_dict("index")


def users_from_speakers(speakers: list[str] | pd.Series) -> pd.DataFrame:
    """A users table with every profile field unknown, for corpora that carry no profiles."""
    ids = sorted(set(speakers))
    return normalize_users(pd.DataFrame({"user_id": ids}))


def normalize_users(users: pd.DataFrame) -> pd.DataFrame:
    """Fill missing profile fields with `unknown`, self_intro with "", persona with []."""
    users = users.copy()
    for column in PROFILE_FIELDS:
        users[column] = users[column].map(unknown_if_blank) if column in users else UNKNOWN
    if "self_intro" in users:
        users["self_intro"] = users["self_intro"].map(lambda v: "" if unknown_if_blank(v) == UNKNOWN else str(v).strip())
    else:
        users["self_intro"] = ""
    if "persona" in users:
        users["persona"] = users["persona"].map(_as_sentence_list)
    else:
        users["persona"] = [[] for _ in range(len(users))]
    users["user_id"] = users["user_id"].astype(str)
    keep = [*USER_COLUMNS, *([RECORD] if RECORD in users else [])]
    return users[keep]


def _as_sentence_list(value: object) -> list[str]:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return []
    if isinstance(value, str):
        return [s.strip() for s in value.split("|") if s.strip()]
    return [str(s).strip() for s in value if str(s).strip()]


def validate_corpus(turns: pd.DataFrame, users: pd.DataFrame, source: str | Path,
                    users_source: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check a corpus against the schema; return clean, sorted frames without `_record`.

    Raises CorpusError naming the file, the record and the fault for: a missing field, empty
    text, a non-integer turn index, a duplicate (dialogue_id, turn_index), a duplicate user,
    and a speaker absent from the users table.
    """
    users_source = users_source or source
    turns = turns.reset_index(drop=True)
    for column in REQUIRED_TURN_FIELDS:
        if column not in turns.columns:
            raise CorpusError(source, _locate(turns, 0) if len(turns) else "header", f"missing field '{column}'")
        missing = turns[column].isna()
        if missing.any():
            raise CorpusError(source, _locate(turns, int(missing.to_numpy().argmax())), f"missing field '{column}'")
    if "timestamp" not in turns.columns:
        turns["timestamp"] = ""
    turns["timestamp"] = turns["timestamp"].map(lambda v: "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
    for column in ("dialogue_id", "speaker_id", "text"):
        turns[column] = turns[column].astype(str)
    empty = turns["text"].str.strip() == ""
    if empty.any():
        raise CorpusError(source, _locate(turns, int(empty.to_numpy().argmax())), "empty text")
    index = pd.to_numeric(turns["turn_index"], errors="coerce")
    bad = index.isna() | (index != index.round()) | (index < 0)
    if bad.any():
        position = int(bad.to_numpy().argmax())
        raise CorpusError(source, _locate(turns, position),
                          f"turn_index must be a non-negative integer, got {turns['turn_index'].iloc[position]!r}")
    turns["turn_index"] = index.astype("int64")
    duplicated = turns.duplicated(["dialogue_id", "turn_index"], keep="first")
    if duplicated.any():
        position = int(duplicated.to_numpy().argmax())
        row = turns.iloc[position]
        first = turns[(turns["dialogue_id"] == row["dialogue_id"]) & (turns["turn_index"] == row["turn_index"])].index[0]
        raise CorpusError(source, _locate(turns, position),
                          f"duplicate (dialogue_id, turn_index) = ({row['dialogue_id']!r}, {row['turn_index']}), "
                          f"first seen at {_locate(turns, int(first))}")

    users = normalize_users(users.reset_index(drop=True))
    duplicated_users = users.duplicated("user_id")
    if duplicated_users.any():
        position = int(duplicated_users.to_numpy().argmax())
        raise CorpusError(users_source, _locate(users, position), f"duplicate user_id {users['user_id'].iloc[position]!r}")
    absent = ~turns["speaker_id"].isin(set(users["user_id"]))
    if absent.any():
        position = int(absent.to_numpy().argmax())
        missing_speakers = list(dict.fromkeys(turns.loc[absent, "speaker_id"]))  # in order of first turn
        n, names = len(missing_speakers), ", ".join(repr(s) for s in missing_speakers[:5])
        fault = (f"speaker {names} is not in the users table ({users_source})" if n == 1 else
                 f"{n} speakers are not in the users table ({users_source}), "
                 f"{'first five' if n > 5 else 'all'}: {names}")
        raise CorpusError(source, _locate(turns, position), fault)

    turns = turns.sort_values(["dialogue_id", "turn_index"], kind="stable")[list(TURN_COLUMNS)].reset_index(drop=True)
    users = users.sort_values("user_id", kind="stable")[list(USER_COLUMNS)].reset_index(drop=True)
    return turns, users


def read_utf8_lines(path: str | Path) -> list[str]:
    """The lines of a text file; a non-UTF-8 byte raises CorpusError naming its line and column."""
    raw = Path(path).read_bytes()
    lines = raw.split(b"\n")
    decoded = []
    for number, line in enumerate(lines, start=1):
        try:
            decoded.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as err:
            raise CorpusError(path, f"line {number}",
                              f"not UTF-8: byte 0x{line[err.start]:02x} at column {err.start + 1}") from None
    if decoded and decoded[-1] == "":
        decoded.pop()
    if decoded and decoded[0].startswith("\ufeff"):
        decoded[0] = decoded[0][1:]
    return decoded


def read_json(path: str | Path) -> object:
    """A JSON file; bad bytes or syntax raise CorpusError naming the byte offset or line."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CorpusError(path, f"byte {err.start}", "not UTF-8") from None
    except json.JSONDecodeError as err:
        raise CorpusError(path, f"line {err.lineno}", f"malformed JSON: {err.msg}") from None


# --- storage ----------------------------------------------------------------------------------

def save_corpus(corpus: Corpus, directory: str | Path) -> Path:
    """Write turns.parquet, users.parquet and meta.json (schema version inside each)."""
    directory = Path(directory)
    stamp = {"udg_schema_version": SCHEMA_VERSION, "udg_corpus": corpus.name}
    io.write_parquet(directory / "turns.parquet", corpus.turns[list(TURN_COLUMNS)], stamp)
    io.write_parquet(directory / "users.parquet", corpus.users[list(USER_COLUMNS)], stamp)
    io.write_json(directory / "meta.json", corpus.meta)
    return directory


def load_corpus(directory: str | Path) -> Corpus:
    """Read a corpus written by `save_corpus`; refuses another schema version."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise CorpusError(directory / "meta.json", "schema_version",
                          f"expected {SCHEMA_VERSION}, found {meta.get('schema_version')!r}; rerun stage 00")
    turns = pd.read_parquet(directory / "turns.parquet")
    users = pd.read_parquet(directory / "users.parquet")
    users["persona"] = users["persona"].map(lambda v: [str(s) for s in v] if v is not None else [])
    known = {"name", "language", "domain", "style", "user_kind", "source"}
    counts = {"schema_version", "n_dialogues", "n_turns", "n_users"}
    extra = {k: v for k, v in meta.items() if k not in known | counts}
    return Corpus(turns=turns, users=users, extra=extra, **{k: meta[k] for k in known if k in meta})
