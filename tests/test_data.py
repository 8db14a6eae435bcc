"""Loaders and validation: each fault names the file, the record and the fault."""

import json

import pandas as pd
import pytest

from udg_lib.data import (
    CorpusError,
    load_chitchat,
    load_corpus,
    load_from_spec,
    load_generic,
    load_japanese_xlsx,
    load_personachat_json,
    load_seinfeld,
    load_tbbt,
    save_corpus,
)
from udg_lib.data.personachat import persona_user_id
from udg_lib.data.sitcoms import read_tbbt_alignment, sitcom_profiles

TURNS = [
    {"dialogue_id": "d1", "turn_index": 0, "speaker_id": "ann", "text": "Hi, what do you do?"},
    {"dialogue_id": "d1", "turn_index": 1, "speaker_id": "ken", "text": "大学で物理を教えています。"},
    {"dialogue_id": "d1", "turn_index": 2, "speaker_id": "ann", "text": "That sounds fun"},
]
USERS = [
    {"user_id": "ann", "age_band": "20s", "gender": "female", "persona": ["I like tea."]},
    {"user_id": "ken", "age_band": "", "occupation": "researcher", "self_intro": "物理学者です。"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# --- generic JSONL / CSV ---------------------------------------------------------------------

def test_generic_jsonl_with_users(tmp_path):
    corpus = load_generic(write_jsonl(tmp_path / "turns.jsonl", TURNS), write_jsonl(tmp_path / "users.jsonl", USERS),
                          name="lab", language="ja")
    assert corpus.name == "lab" and len(corpus.turns) == 3
    users = corpus.users.set_index("user_id")
    assert users.loc["ann", "marital"] == "unknown" and users.loc["ken", "age_band"] == "unknown"
    assert users.loc["ken", "self_intro"] == "物理学者です。" and list(users.loc["ann", "persona"]) == ["I like tea."]
    assert corpus.turns.loc[1, "text"] == "大学で物理を教えています。"


def test_generic_csv_without_users(tmp_path):
    path = tmp_path / "turns.csv"
    pd.DataFrame(TURNS).to_csv(path, index=False)
    corpus = load_generic(path)
    assert set(corpus.users["user_id"]) == {"ann", "ken"} and (corpus.users["gender"] == "unknown").all()


@pytest.mark.parametrize("lines, fault", [
    (['{"dialogue_id": "d1", "turn_index": 0, "speaker_id": "ann", "text": "hi"}', '{"dialogue_id": "d1", '], "line 2: malformed JSON"),
    (['["d1", 0, "ann", "hi"]'], "line 1: expected a JSON object"),
    (['{"dialogue_id": "d1", "turn_index": 0, "speaker_id": "ann"}'], "line 1: missing field 'text'"),
    (['{"dialogue_id": "d1", "turn_index": 0, "speaker_id": "ann", "text": "  "}'], "line 1: empty text"),
    (['{"dialogue_id": "d1", "turn_index": 0, "speaker_id": "ann", "text": "a"}',
      '{"dialogue_id": "d1", "turn_index": 0, "speaker_id": "ken", "text": "b"}'],
     "line 2: duplicate (dialogue_id, turn_index) = ('d1', 0), first seen at line 1"),
    (['{"dialogue_id": "d1", "turn_index": "x", "speaker_id": "ann", "text": "a"}'], "line 1: turn_index must be a non-negative integer"),
])
def test_generic_jsonl_faults(tmp_path, lines, fault):
    path = tmp_path / "turns.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError) as err:
        load_generic(path)
    assert str(err.value).startswith(f"{path}: {fault}")
    assert "\n" not in str(err.value)


def test_generic_speaker_absent_from_users(tmp_path):
    turns = write_jsonl(tmp_path / "turns.jsonl", TURNS)
    users = write_jsonl(tmp_path / "users.jsonl", USERS[:1])
    with pytest.raises(CorpusError, match=r"turns.jsonl: line 2: speaker 'ken' is not in the users table \(.*users.jsonl\)"):
        load_generic(turns, users)


def test_generic_speakers_absent_from_users_are_counted_and_the_first_five_named(tmp_path):
    turns = write_jsonl(tmp_path / "turns.jsonl", [
        {"dialogue_id": "d1", "turn_index": i, "speaker_id": f"s{i}", "text": "hi"} for i in range(8)])
    users = write_jsonl(tmp_path / "users.jsonl", [{"user_id": "s0"}])
    with pytest.raises(CorpusError) as err:
        load_generic(turns, users)
    assert str(err.value) == (f"{turns}: line 2: 7 speakers are not in the users table ({users}), "
                              "first five: 's1', 's2', 's3', 's4', 's5'")


def test_generic_duplicate_user(tmp_path):
    turns = write_jsonl(tmp_path / "turns.jsonl", TURNS)
    users = write_jsonl(tmp_path / "users.jsonl", [*USERS, {"user_id": "ann"}])
    with pytest.raises(CorpusError, match=r"users.jsonl: line 3: duplicate user_id 'ann'"):
        load_generic(turns, users)


def test_generic_non_utf8_bytes(tmp_path):
    path = tmp_path / "turns.jsonl"
    good = json.dumps(TURNS[0]).encode()
    path.write_bytes(good + b"\n" + b'{"dialogue_id": "d1", "turn_index": 1, "speaker_id": "ken", "text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"turns.jsonl: line 2: not UTF-8: byte 0xe9 at column 73"):
        load_generic(path)


def test_generic_csv_wrong_field_count(tmp_path):
    path = tmp_path / "turns.csv"
    path.write_text("dialogue_id,turn_index,speaker_id,text\nd1,0,ann,hi\nd1,1,ken,hello,extra\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"turns.csv: line 3: expected 4 fields as in the header"):
        load_generic(path)


def test_generic_csv_missing_value(tmp_path):
    path = tmp_path / "turns.csv"
    path.write_text("dialogue_id,turn_index,speaker_id,text\nd1,0,,hi\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"turns.csv: line 2: missing field 'speaker_id'"):
        load_generic(path)


def test_load_from_spec_rejects_unknown_format():
    with pytest.raises(CorpusError, match="unknown format 'nope'"):
        load_from_spec({"format": "nope", "name": "x"})


def test_corpus_spec_with_an_unknown_key_names_it_and_the_keys_the_format_accepts(tmp_path):
    turns = write_jsonl(tmp_path / "turns.jsonl", TURNS)
    with pytest.raises(CorpusError) as err:
        load_from_spec({"format": "generic", "path": str(turns), "name": "lab"})
    assert str(err.value) == ("parameters: corpus 'lab': unknown key 'path' for format 'generic'; it accepts: "
                              "format, name, split, turns, users, language, domain, style, user_kind")
    with pytest.raises(CorpusError, match="format 'generic' needs the key 'turns'"):
        load_from_spec({"format": "generic", "name": "lab"})
    # `split` belongs to stage 00's settings; the loader ignores it
    assert len(load_from_spec({"format": "generic", "turns": str(turns), "split": {"max_turns": None}}).turns) == 3


# --- storage -------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    corpus = load_generic(write_jsonl(tmp_path / "t.jsonl", TURNS), write_jsonl(tmp_path / "u.jsonl", USERS), language="ja")
    save_corpus(corpus, tmp_path / "saved")
    again = load_corpus(tmp_path / "saved")
    pd.testing.assert_frame_equal(again.turns, corpus.turns)
    assert again.users["persona"].tolist() == corpus.users["persona"].tolist()
    assert again.language == "ja" and json.loads((tmp_path / "saved" / "meta.json").read_text())["schema_version"] == "1"


def test_load_refuses_other_schema_version(tmp_path):
    corpus = load_generic(write_jsonl(tmp_path / "t.jsonl", TURNS))
    save_corpus(corpus, tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "meta.json").read_text())
    (tmp_path / "saved" / "meta.json").write_text(json.dumps({**meta, "schema_version": "0"}))
    with pytest.raises(CorpusError, match="schema_version: expected 1"):
        load_corpus(tmp_path / "saved")


# --- BYU Chit-Chat -------------------------------------------------------------------------

def test_chitchat_joins_the_messages_of_a_turn(tmp_path):
    conversation = {"prompt": "p", "ratings": {}, "start": "", "messages": [
        [{"text": "Hello", "sender": "a", "timestamp": "t0"}, {"text": "how are you?", "sender": "a", "timestamp": "t1"}],
        [{"text": " ", "sender": "b", "timestamp": "t2"}],
        [{"text": "great", "sender": "b", "timestamp": "t3"}],
    ]}
    path = tmp_path / "cc.json"
    path.write_text(json.dumps({"c1": conversation}))
    corpus = load_chitchat(path)
    assert corpus.turns["text"].tolist() == ["Hello how are you?", "great"]
    assert corpus.turns["turn_index"].tolist() == [0, 1] and corpus.meta["dropped_empty_turns"] == 1


def test_chitchat_turn_with_two_senders_is_an_error(tmp_path):
    path = tmp_path / "cc.json"
    path.write_text(json.dumps({"c1": {"messages": [[{"text": "a", "sender": "x"}, {"text": "b", "sender": "y"}]]}}))
    with pytest.raises(CorpusError, match=r"cc.json: conversation c1 turn 0: messages from more than one sender"):
        load_chitchat(path)


def test_packaged_chitchat_has_real_users():
    corpus = load_chitchat()
    assert corpus.meta["n_users"] == 1315 and corpus.meta["n_dialogues"] == 7168
    assert not corpus.turns.duplicated(["dialogue_id", "turn_index"]).any()


# --- sitcoms -------------------------------------------------------------------------------

def test_tbbt_words_become_turns_and_scenes(tmp_path):
    path = tmp_path / "TheBigBangTheory.Season01.Episode03.out"
    path.write_text("\n".join([
        "1.0 0.2 sheldon Hello 0.9", "1.2 0.0 sheldon , 0.9", "1.3 0.2 sheldon Leonard 0.9", "1.5 0.0 sheldon . 0.9",
        "2.0 0.3 leonard Hi 0.9", "2.3 0.0 leonard ! 0.9",
        "20.0 0.3 penny Hey 0.9",
    ]) + "\n")
    words = read_tbbt_alignment(path)
    assert words[0].episode == "S01E03" and len(words) == 7
    corpus = load_tbbt(alignment_dir=tmp_path, scene_gap_s=6.0)
    # the lone line after a 17 s gap is a one-turn scene and is dropped (no reply pair)
    assert corpus.turns["text"].tolist() == ["Hello, Leonard.", "Hi!"]
    assert corpus.users.set_index("user_id").loc["sheldon", "occupation"] == "researcher"


def test_tbbt_bad_line_is_named(tmp_path):
    path = tmp_path / "TheBigBangTheory.Season01.Episode01.out"
    path.write_text("1.0 0.2 sheldon Hello 0.9\n1.2 sheldon , 0.9\n")
    with pytest.raises(CorpusError, match=r"Episode01.out: line 2: expected 5 fields"):
        read_tbbt_alignment(path)


def test_packaged_sitcoms_carry_the_profile_table():
    seinfeld = load_seinfeld()
    users = seinfeld.users.set_index("user_id")
    assert users.loc["JERRY", "gender"] == "male" and users.loc["ELAINE", "occupation"] == "office_worker"
    minor = [u for u in users.index if "@" in u]
    assert minor and all(users.loc[u, "gender"] == "unknown" for u in minor[:20])  # episode-scoped roles
    tbbt = load_tbbt()
    assert set(sitcom_profiles("tbbt")["user_id"]) <= set(tbbt.users["user_id"])


# --- PersonaChat-style JSON and the Japanese .xlsx layout -----------------------------------

def test_personachat_json_merges_both_views(tmp_path):
    turns = ["こんにちは！", "やあ、元気？", "元気だよ。趣味は？", "映画鑑賞です。"]
    persona_a, persona_b = ["私は学生です。", "犬を飼っています。"], ["私は教師です。"]
    data = {"train": [
        {"personality": persona_a, "utterances": [{"history": ["__SILENCE__"], "candidates": ["x", turns[0]]},
                                                 {"history": turns[:2], "candidates": ["x", turns[2]]}]},
        {"personality": persona_b, "utterances": [{"history": turns[:1], "candidates": ["x", turns[1]]},
                                                 {"history": turns[:3], "candidates": ["x", turns[3]]}]},
    ]}
    path = tmp_path / "pc.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    corpus = load_personachat_json(path, language="ja")
    assert corpus.turns["text"].tolist() == turns
    a, b = persona_user_id(persona_a), persona_user_id(persona_b)
    assert corpus.turns["speaker_id"].tolist() == [a, b, a, b]
    assert list(corpus.users.set_index("user_id").loc[a, "persona"]) == persona_a
    assert corpus.user_kind == "Persona"


def test_personachat_json_missing_field(tmp_path):
    path = tmp_path / "pc.json"
    path.write_text(json.dumps({"train": [{"personality": ["x"]}]}))
    with pytest.raises(CorpusError, match=r"pc.json: train\[0\]: missing field 'utterances'"):
        load_personachat_json(path)


def _write_xlsx(path, sheets):
    with pd.ExcelWriter(path, engine="openpyxl") as writer:
        for name, frame in sheets.items():
            frame.to_excel(writer, sheet_name=name, index=False)
    return path


def test_jpersonachat_xlsx_layout(tmp_path):
    dialogues = pd.DataFrame({"No": [1, 1, 1, 2, 2], "ペルソナID": ["PP1"] * 3 + ["PP2"] * 2,
                              "話者": ["A", "B", "A", "A", "B"],
                              "発話": ["こんにちは", "こんにちは！", "お元気ですか", "はじめまして", "よろしく"]})
    personas = pd.DataFrame({"No": [1, 2], "ペルソナID": ["PP1", "PP2"],
                             "A": ["私は主婦です。\n料理が好きです。", "私は主婦です。\n料理が好きです。"],
                             "B": ["私は会社員です。", "私は大学生です。"]})
    path = _write_xlsx(tmp_path / "japanese_persona_chat.xlsx", {"対話": dialogues, "ペルソナリスト": personas})
    corpus = load_japanese_xlsx(path)
    a = persona_user_id(["私は主婦です。", "料理が好きです。"])
    assert corpus.language == "ja" and corpus.user_kind == "Persona"
    assert (corpus.turns["speaker_id"] == a).sum() == 3  # one persona across two dialogues is one user
    assert len(corpus.users) == 3


def test_jempathetic_xlsx_layout_and_faults(tmp_path):
    dialogues = pd.DataFrame({"ID": ["e1", "e1"], "話者": ["A", "B"], "発話": ["試験に落ちた。", "それは残念。"]})
    corpus = load_japanese_xlsx(_write_xlsx(tmp_path / "jed.xlsx", {"対話": dialogues}))
    assert corpus.turns["speaker_id"].tolist() == ["e1:A", "e1:B"] and corpus.user_kind == "Crowd"
    bad = dialogues.assign(発話=["試験に落ちた。", None])
    with pytest.raises(CorpusError, match=r"bad.xlsx: sheet '対話' row 3: empty text"):
        load_japanese_xlsx(_write_xlsx(tmp_path / "bad.xlsx", {"対話": bad}))
    with pytest.raises(CorpusError, match=r"nosheet.xlsx: workbook: missing sheet '対話'"):
        load_japanese_xlsx(_write_xlsx(tmp_path / "nosheet.xlsx", {"Sheet1": dialogues}))


def test_malformed_json_corpus_names_its_line(tmp_path):
    path = tmp_path / "cc.json"
    path.write_text('{"c1": {"messages": []},\n "c2": }\n')
    with pytest.raises(CorpusError, match=r"cc.json: line 2: malformed JSON"):
        load_chitchat(path)
