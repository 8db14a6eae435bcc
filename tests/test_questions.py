import json
import re

import pytest

from udg_lib.data.chitchat import default_chitchat_path
from udg_lib.questions import (
    COLUMNS,
    QuestionFileError,
    default_questions_path,
    load_personal_questions,
    read_question_file,
)

JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")  # hiragana, katakana, CJK ideographs


def chitchat_prompts() -> set[str]:
    conversations = json.loads(default_chitchat_path().read_text(encoding="utf-8"))
    return {c["prompt"] for c in conversations.values() if isinstance(c.get("prompt"), str) and c["prompt"].strip()}


def test_packaged_file_has_70_questions_with_unique_ids():
    table = read_question_file()
    assert len(table) == 70
    assert list(table["question_id"]) == [f"q{i:02d}" for i in range(1, 71)]
    assert table["text_en"].is_unique and table["text_ja"].is_unique
    assert set(table["source"]) == {"chitchat-dataset", "written for udg"}
    assert default_questions_path().is_file()


def test_every_chitchat_prompt_is_in_the_file_verbatim():
    prompts = chitchat_prompts()
    assert len(prompts) == 34  # distinct non-empty prompts of chitchat-dataset 0.9.0
    table = read_question_file()
    from_corpus = table[table["source"] == "chitchat-dataset"]
    assert set(from_corpus["text_en"]) == prompts
    # source_detail records how many chats opened with the prompt
    conversations = json.loads(default_chitchat_path().read_text(encoding="utf-8"))
    first = from_corpus.iloc[0]
    count = sum(c.get("prompt") == first["text_en"] for c in conversations.values())
    assert f"{count} chats" in first["source_detail"]


def test_every_question_has_a_japanese_text():
    questions = load_personal_questions("ja")
    assert list(questions.columns) == ["question_id", "question"]
    assert len(questions) == 70
    for question_id, text in questions.itertuples(index=False):
        assert JAPANESE.search(text), f"{question_id}: no Japanese characters in {text!r}"
    english = load_personal_questions()
    assert (english["question_id"] == questions["question_id"]).all()
    assert not english["question"].str.contains(JAPANESE).any()


def write_questions(path, rows, header=COLUMNS):
    lines = [",".join(header)] + [",".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = ("q01", "Where are you from?", "出身はどこですか？", "written for udg", "topic: home")


def test_loader_reads_a_custom_file(tmp_path):
    path = write_questions(tmp_path / "q.csv", [GOOD, ("q02", "Any pets?", "ペットは？", "x", "")])
    assert load_personal_questions("ja", path)["question"].tolist() == ["出身はどこですか？", "ペットは？"]


@pytest.mark.parametrize(
    "rows, header, fault",
    [
        ([GOOD], COLUMNS[:2] + COLUMNS[3:], "missing column(s) ['text_ja']"),
        ([GOOD, GOOD], COLUMNS, "row 2 (line 3): duplicate question_id 'q01' (first in row 1)"),
        ([GOOD, ("q02", "", "空", "x", "")], COLUMNS, "row 2 (line 3) q02: empty text_en"),
        ([GOOD, ("q02", "Why?", " ", "x", "")], COLUMNS, "row 2 (line 3) q02: empty text_ja"),
        ([("", "Why?", "なぜ？", "x", "")], COLUMNS, "row 1 (line 2): empty question_id"),
        ([], COLUMNS, "no questions"),
    ],
)
def test_loader_names_file_row_and_fault(tmp_path, rows, header, fault):
    path = write_questions(tmp_path / "bad.csv", rows, header)
    with pytest.raises(QuestionFileError) as error:
        load_personal_questions("en", path)
    assert str(error.value).startswith(str(path))
    assert fault in str(error.value)


def test_loader_rejects_unknown_language_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="language must be one of"):
        load_personal_questions("de")
    with pytest.raises(QuestionFileError, match="not found"):
        load_personal_questions("en", tmp_path / "absent.csv")
