"""Retrieval of a user's own training replies (RAG conditions) and its leak guard: a planted dev or test
reply must never reach any prompt, of the prompt LLMs or of RAG + per-user LoRA."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from udg_lib import baselines as bl
from udg_lib.conditions import Cell
from udg_lib.data.schema import PROFILE_FIELDS, UNKNOWN
from udg_lib.methods import RagLora, per_user
from udg_lib.metrics import SentenceEmbedder
from udg_lib.prompts import SEP, build_prompts
from udg_lib.retrieval import UserMemories, memory_head

PLANTED = "PLANTED-HELD-OUT-REPLY"


class LetterEmbedder(SentenceEmbedder):
    """Deterministic bag-of-letters embeddings: contexts sharing words come out similar."""

    def __init__(self) -> None:
        def encode_batch(texts: list[str], batch_size: int) -> np.ndarray:
            out = np.zeros((len(texts), 27), dtype=np.float32)
            for i, text in enumerate(texts):
                for ch in text.lower():
                    out[i, ord(ch) - ord("a") if "a" <= ch <= "z" else 26] += 1
                out[i, 26] += 0.5
            return out

        super().__init__("letters", encode_batch, 27)


def _pairs() -> pd.DataFrame:
    """User a: three training pairs, a dev and a test pair whose replies are planted and whose contexts equal
    a training context (the most similar a retriever could find); user b: one training pair."""
    rows = []

    def add(pair_id, speaker, split, context, response):
        rows.append({"pair_id": pair_id, "dialogue_id": pair_id.split("#")[0], "turn_index": 1, "speaker_id": speaker,
                     "partner_id": "b" if speaker == "a" else "a", "context": [context], "response": response,
                     "split": split, "split_set": 0})

    add("d1#1", "a", "train_da", "do you like cats", "I have two cats at home")
    add("d2#1", "a", "train_ft", "what is your job", "I teach math at a school")
    add("d3#1", "a", "train_ft", "do you like dogs", "dogs are fine but cats win")
    add("d4#1", "a", "dev", "do you like cats", f"{PLANTED} dev")
    add("d5#1", "a", "test", "do you like cats", f"{PLANTED} test")
    add("d6#1", "b", "train_ft", "do you like cats", "b likes birds")
    add("d7#1", "b", "test", "what is your job", f"{PLANTED} of b")
    return pd.DataFrame(rows)


def _users() -> pd.DataFrame:
    unknown = {field: UNKNOWN for field in PROFILE_FIELDS}
    return pd.DataFrame([{**unknown, "user_id": "a", "gender": "female", "self_intro": ""},
                         {**unknown, "user_id": "b", "gender": "male", "self_intro": ""}])


def test_retrieval_finds_the_users_own_most_similar_training_pairs_never_itself():
    pairs = _pairs()
    index = UserMemories.from_pairs(LetterEmbedder(), pairs, ["a", "b"])
    assert set(index.train["split"]) == {"train_da", "train_ft"}  # dev and test rows dropped
    test = pairs[pairs["split"] == "test"]
    found = index.retrieve(test, k=2)
    assert [m.pair_id for m in found[0]] == ["d1#1", "d3#1"]  # a's, most similar first
    assert [m.pair_id for m in found[1]] == ["d6#1"]  # b has one training pair: only its own
    assert found[0][0].similarity >= found[0][1].similarity
    own = index.retrieve(pairs[pairs["pair_id"] == "d1#1"], k=3)[0]
    assert "d1#1" not in [m.pair_id for m in own]  # a training pair never retrieves itself
    assert index.retrieve(test, k=0) == [[], []]


def test_an_index_refuses_held_out_rows_and_mixed_split_sets():
    pairs = _pairs()
    with pytest.raises(ValueError, match="training pairs only"):
        UserMemories(LetterEmbedder(), pairs)
    train = pairs[pairs["split"].isin(["train_da", "train_ft"])]
    with pytest.raises(ValueError, match="one split set"):
        UserMemories(LetterEmbedder(), pd.concat([train, train.assign(split_set=1)]))


def test_memory_head_cuts_words_and_never_ends_the_head():
    index = UserMemories.from_pairs(LetterEmbedder(), _pairs(), ["a"])
    memories = index.retrieve(_pairs().query("pair_id == 'd5#1'"), k=2)[0]
    assert memory_head(memories, 3) == "I have two | dogs are fine"
    assert SEP not in memory_head([memories[0].__class__("x", (), f"a {SEP} b", 1.0)], 5)


def test_planted_held_out_replies_never_reach_a_rag_prompt(monkeypatch):
    """The leak test: every prompt the RAG conditions build (LLM chat and completion prompts; RAG + LoRA's
    training, dev, test and Exp2 inputs) for pairs whose dev/test replies are planted holds no planted text."""
    pairs, users = _pairs(), _users()
    embedder = LetterEmbedder()
    loaded = []
    monkeypatch.setattr(per_user, "load_embedder", lambda name, device: loaded.append((name, device)) or embedder)
    rag = RagLora(k=3)  # its minilm is the fake above, loaded once per device
    cell = Cell(pairs, users, ("a", "b"), "psp")
    rag_pairs = rag.rag_cell(cell, "cpu").pairs
    prompts = build_prompts(rag_pairs, users, "psp").tolist()
    assert all(PLANTED not in p for p in prompts)
    assert any("said: I have two cats at home" in p for p in prompts)  # the memories are there
    questions = pd.DataFrame({"pair_id": ["q1"], "speaker_id": ["a"], "partner_id": [""],
                              "context": [["do you like cats"]]})
    asked = rag.with_memories(cell, questions, "cpu")
    assert PLANTED not in build_prompts(asked, users, "psp").iloc[0] and asked["memory"].iloc[0]
    assert loaded == [("minilm", "cpu")]  # the embedder is loaded once and kept

    test = pairs[pairs["split"] == "test"]
    memories = pd.Series(UserMemories.from_pairs(embedder, pairs, ["a", "b"]).retrieve(test, 3), index=test.index)
    turns = pd.DataFrame([turn for p in pairs.itertuples() for turn in (  # the corpus holds the planted replies too
        {"dialogue_id": p.dialogue_id, "turn_index": 0, "speaker_id": p.partner_id, "text": p.context[0]},
        {"dialogue_id": p.dialogue_id, "turn_index": 1, "speaker_id": p.speaker_id, "text": p.response})])
    for fmt in ("chat", "completion"):
        table = bl.baseline_prompts(test, users, pairs, turns, fmt, inputs=bl.PromptInputs(memories=memories))
        text = " ".join(table["prompt"])
        assert PLANTED not in text
        assert "I have two cats at home" in text and "b likes birds" in text
        if fmt == "chat":
            assert "Things the speaker said before" in json.loads(table["prompt"].iloc[0])[0]["content"]
    plain = bl.baseline_prompts(test, users, pairs, turns, "chat")  # without memories: no such section
    assert "Things the speaker said before" not in " ".join(plain["prompt"])


def test_rag_lora_is_rebuilt_from_its_record():
    from udg_lib import methods as mth

    built = mth.build_methods(["lora", "rag_lora"], rag={"k": 3, "max_words": 5, "extra_tokens": 16})
    assert [m.name for m in built] == ["da", "lora", "rag_lora"]
    again = mth.from_records([m.record for m in built])
    rag = again[-1]
    assert isinstance(rag, RagLora) and (rag.k, rag.max_words, rag.extra_tokens) == (3, 5, 16)
    assert not rag.paper and rag.user_specific
