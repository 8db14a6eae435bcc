"""The 70 personal questions that Exp2 puts to every user model (§4.3.1).

The paper takes 70 questions from Sugiyama et al. (2014)'s personal question set, which is not public.
Ours (`data/resources/personal_questions.csv`) keep its spirit, questions one asks a new acquaintance:
- the 34 distinct conversation prompts of the BYU Chit-Chat corpus (PyPI `chitchat-dataset` 0.9.0), copied
  verbatim; they are real questions put to real people, and the English models met them in training
  (source `chitchat-dataset`, source_detail: how many chats opened with the prompt);
- 36 questions written for this study about hobbies, food, home, work, travel, family and preferences,
  not copied from Sugiyama et al. (source `written for udg`, source_detail: the topic).
Every question carries a Japanese translation (`text_ja`) for Japanese corpora.

Columns: question_id (q01..q70), text_en, text_ja, source, source_detail.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd

LANGUAGES: tuple[str, ...] = ("en", "ja")
COLUMNS: tuple[str, ...] = ("question_id", "text_en", "text_ja", "source", "source_detail")
QUESTIONS_FILE = "personal_questions.csv"


class QuestionFileError(ValueError):
    """A fault in a question file, naming the file, the row and the fault on one line."""

    def __init__(self, source: str | Path, record: str, fault: str):
        self.source, self.record, self.fault = str(source), record, fault
        super().__init__(f"{source}: {record}: {fault}")


def default_questions_path() -> Path:
    """The packaged question file (installed with `udg_lib` as package data)."""
    return Path(str(resources.files("udg_lib") / "data" / "resources" / QUESTIONS_FILE))


def read_question_file(path: str | Path | None = None) -> pd.DataFrame:
    """The whole question table, checked: every column present, ids unique and non-empty, no empty text."""
    path = Path(path) if path else default_questions_path()
    try:
        # keep_default_na=False: an empty cell stays "" (reported as empty text), never NaN
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except FileNotFoundError:
        raise QuestionFileError(path, "file", "not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise QuestionFileError(path, "file", f"not a UTF-8 CSV table ({exc})") from None
    missing = [column for column in COLUMNS if column not in table.columns]
    if missing:
        raise QuestionFileError(path, "header", f"missing column(s) {missing}; expected {list(COLUMNS)}")
    if table.empty:
        raise QuestionFileError(path, "file", "no questions")

    table = table.loc[:, list(COLUMNS)].copy()
    for column in COLUMNS:
        table[column] = table[column].str.strip()
    seen: dict[str, int] = {}
    for position, row in enumerate(table.itertuples(index=False), start=1):
        record = f"row {position} (line {position + 1})"  # line 1 is the header
        if not row.question_id:
            raise QuestionFileError(path, record, "empty question_id")
        if row.question_id in seen:
            raise QuestionFileError(path, record, f"duplicate question_id {row.question_id!r} (first in row {seen[row.question_id]})")
        seen[row.question_id] = position
        for column in ("text_en", "text_ja"):
            if not getattr(row, column):
                raise QuestionFileError(path, f"{record} {row.question_id}", f"empty {column}")
    return table


def load_personal_questions(language: str = "en", path: str | Path | None = None) -> pd.DataFrame:
    """Exp2's questions in `language` ("en" or "ja"), in file order: columns question_id, question."""
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    table = read_question_file(path)
    return pd.DataFrame({"question_id": table["question_id"], "question": table[f"text_{language}"]}).reset_index(drop=True)
