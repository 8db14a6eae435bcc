"""Persona corpora supplied by path (their licences forbid redistribution).

- PersonaChat-style JSON (the `personachat_self_original.json` layout):
  `{"train": [{"personality": [...], "utterances": [{"history": [...], "candidates": [...]}]}], ...}`.
  Each entry is one dialogue seen by the persona owner, whose reply is the last candidate.
- JPersonaChat / JEmpatheticDialogues `.xlsx` (NTT's japanese-dialog-transformers release):
  sheet `対話` with a dialogue id column (`No` or `ID`), `話者` (A/B) and `発話`; JPersonaChat adds
  `ペルソナID` and a sheet `ペルソナリスト` (`ペルソナID`, `A`, `B`: newline-separated sentences).

As in the paper's PCJP (§4.2.1), a user is a persona: the same persona sentences give the same
user id, hashed from the sentences. Speakers without a persona are scoped to their dialogue.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from udg_lib.data.schema import RECORD, Corpus, CorpusError, read_json, normalize_users, validate_corpus

SILENCE = "__SILENCE__"  # ParlAI's placeholder for "the partner has not spoken yet"


def persona_user_id(sentences: list[str]) -> str:
    """A stable id for a persona: a hash of its sentences, order-insensitive."""
    key = "\n".join(sorted(s.strip() for s in sentences if s.strip()))
    return "persona-" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]


def load_personachat_json(path: str | Path, *, splits: tuple[str, ...] | None = None, language: str = "en",
                          name: str = "personachat") -> Corpus:
    """PersonaChat-style JSON: the two views of one dialogue are merged into one dialogue."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise CorpusError(path, "top level", "expected an object of splits, e.g. {\"train\": [...]}")

    views = []  # (turns, persona, owner_parity, record)
    for split in splits or sorted(data):
        if split not in data:
            raise CorpusError(path, f"split {split!r}", "not in the file")
        for number, entry in enumerate(data[split]):
            record = f"{split}[{number}]"
            for field in ("personality", "utterances"):
                if not isinstance(entry, dict) or field not in entry:
                    raise CorpusError(path, record, f"missing field '{field}'")
            if not entry["utterances"]:
                raise CorpusError(path, record, "no utterances")
            last = entry["utterances"][-1]
            if "history" not in last or not last.get("candidates"):
                raise CorpusError(path, f"{record} last utterance", "missing field 'history' or 'candidates'")
            turns = [t for t in last["history"] if t != SILENCE] + [last["candidates"][-1]]
            views.append((turns, list(entry["personality"]), (len(turns) - 1) % 2, record))

    # Both speakers' views of one dialogue: one is the other plus at most one final turn, and
    # their owners speak at different parities. Match such views; a view without a twin stands alone.
    buckets: dict[tuple[str, ...], list[int]] = {}
    for position, (turns, _, _, _) in enumerate(views):
        buckets.setdefault(tuple(turns[:2]), []).append(position)
    merged, used = [], set()
    for positions in buckets.values():
        positions = sorted(positions, key=lambda p: -len(views[p][0]))
        for p in positions:
            if p in used:
                continue
            used.add(p)
            turns, persona, parity, record = views[p]
            slot = {"turns": turns, "personas": {parity: persona}, "record": record}
            twin = next((q for q in positions if q not in used and views[q][2] != parity
                         and len(turns) - len(views[q][0]) <= 1 and turns[:len(views[q][0])] == views[q][0]), None)
            if twin is not None:
                used.add(twin)
                slot["personas"][views[twin][2]] = views[twin][1]
            merged.append(slot)

    rows, personas = [], {}
    for number, slot in enumerate(merged):
        dialogue_id = f"{name}-{number:06d}"
        speaker_of_parity = {}
        for parity in (0, 1):
            if parity in slot["personas"]:
                user = persona_user_id(slot["personas"][parity])
                personas[user] = slot["personas"][parity]
            else:
                user = f"{dialogue_id}:{'AB'[parity]}"
                personas.setdefault(user, [])
            speaker_of_parity[parity] = user
        for index, text in enumerate(slot["turns"]):
            rows.append({"dialogue_id": dialogue_id, "turn_index": index, "speaker_id": speaker_of_parity[index % 2],
                         "text": text, RECORD: f"{slot['record']} turn {index}"})
    users = normalize_users(pd.DataFrame({"user_id": list(personas), "persona": list(personas.values())}))
    turns_frame, users = validate_corpus(pd.DataFrame(rows), users, path)
    return Corpus(name=name, turns=turns_frame, users=users, language=language, domain="open",
                  style="text chat", user_kind="Persona", source=str(path))


def _column(frame: pd.DataFrame, candidates: tuple[str, ...], path: Path, sheet: str) -> str:
    for name in candidates:
        if name in frame.columns:
            return name
    raise CorpusError(path, f"sheet {sheet!r} header", f"missing column {' or '.join(repr(c) for c in candidates)}")


def load_japanese_xlsx(path: str | Path, *, name: str | None = None, dialogue_sheet: str = "対話",
                       persona_sheet: str = "ペルソナリスト") -> Corpus:
    """JPersonaChat or JEmpatheticDialogues `.xlsx`; persona users where a persona sheet exists."""
    path = Path(path)
    try:
        sheets = pd.read_excel(path, sheet_name=None, dtype=str, engine="openpyxl")
    except Exception as err:  # openpyxl raises several types for a file that is not a workbook
        raise CorpusError(path, "file", f"not a readable .xlsx workbook ({type(err).__name__}: {err})") from None
    if dialogue_sheet not in sheets:
        raise CorpusError(path, "workbook", f"missing sheet {dialogue_sheet!r} (found {sorted(sheets)})")
    dialogues = sheets[dialogue_sheet]
    dialogue_col = _column(dialogues, ("No", "ID", "作業No"), path, dialogue_sheet)
    speaker_col = _column(dialogues, ("話者",), path, dialogue_sheet)
    text_col = _column(dialogues, ("発話",), path, dialogue_sheet)
    persona_col = "ペルソナID" if "ペルソナID" in dialogues.columns else None

    persona_of: dict[tuple[str, str], list[str]] = {}
    if persona_col and persona_sheet in sheets:
        table = sheets[persona_sheet]
        id_col = _column(table, ("ペルソナID",), path, persona_sheet)
        for position, row in table.iterrows():
            for side in ("A", "B"):
                if side not in table.columns:
                    raise CorpusError(path, f"sheet {persona_sheet!r} header", f"missing column {side!r}")
                sentences = [s.strip() for s in str(row[side] if pd.notna(row[side]) else "").splitlines() if s.strip()]
                if not sentences:
                    raise CorpusError(path, f"sheet {persona_sheet!r} row {position + 2}", f"empty persona {side!r}")
                persona_of[(str(row[id_col]).strip(), side)] = sentences

    rows, personas, next_index = [], {}, {}
    for position, row in dialogues.iterrows():
        record = f"sheet {dialogue_sheet!r} row {position + 2}"  # row 1 is the header
        for column in (dialogue_col, speaker_col, text_col):
            if pd.isna(row[column]) or not str(row[column]).strip():
                if column == text_col:
                    raise CorpusError(path, record, "empty text")
                raise CorpusError(path, record, f"missing field '{column}'")
        dialogue_id, side = str(row[dialogue_col]).strip(), str(row[speaker_col]).strip()
        persona_key = (str(row[persona_col]).strip(), side) if persona_col and pd.notna(row[persona_col]) else None
        if persona_key and persona_key in persona_of:
            user = persona_user_id(persona_of[persona_key])
            personas[user] = persona_of[persona_key]
        else:
            user = f"{dialogue_id}:{side}"
            personas.setdefault(user, [])
        index = next_index.get(dialogue_id, 0)
        next_index[dialogue_id] = index + 1
        rows.append({"dialogue_id": dialogue_id, "turn_index": index, "speaker_id": user,
                     "text": str(row[text_col]).strip(), RECORD: record})
    users = normalize_users(pd.DataFrame({"user_id": list(personas), "persona": list(personas.values())}))
    turns, users = validate_corpus(pd.DataFrame(rows), users, path)
    kind = "Persona" if persona_of else "Crowd"
    return Corpus(name=name or path.stem, turns=turns, users=users, language="ja", domain="open",
                  style="text chat", user_kind=kind, source=str(path))
