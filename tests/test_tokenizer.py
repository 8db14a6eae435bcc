"""Unit tests for udg_lib.tokenizer on tiny generated English + Japanese corpora."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer, T5Tokenizer

from udg_lib.tokenizer import (
    SPECIAL_TOKENS,
    SPIECE_MODEL_FILE,
    load_tokenizer,
    sentinel_tokens,
    tokenizer_fingerprint,
    SentencePieceSettings,
    train_sentencepiece_tokenizer,
)

ENGLISH = [
    "hello how are you today",
    "i like watching movies on weekends",
    "what is your hobby",
    "the weather is nice today",
    "i am a student and i live in tokyo",
]
JAPANESE = [
    "今日はいい天気ですね。",
    "趣味は映画鑑賞です",
    "週末は何をしていますか",
    "私は大学生です。",
    "最近よく料理をします",
]
VOCAB_SIZE = 600  # must exceed the 256 byte pieces plus the corpus' characters
EXTRA_IDS = 100


def make_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Dialogue-like lines mixing both languages, with and without the §3.4 prompt markers."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        first, second = rng.choice(ENGLISH + JAPANESE), rng.choice(ENGLISH + JAPANESE)
        lines.append(f"[USER] 20s, female [SEP] {first}" if rng.random() < 0.2 else f"{first} {second}")
    return lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    output_dir = tmp_path_factory.mktemp("tok") / "tokenizer"
    tokenizer = train_sentencepiece_tokenizer(make_corpus(), output_dir,
                                              SentencePieceSettings(vocab_size=VOCAB_SIZE, extra_ids=EXTRA_IDS))
    return output_dir, tokenizer


def test_t5_ids_and_eos_appended(trained):
    _, tok = trained
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.bos_token is None
    ids = tok("hello").input_ids
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


def test_special_tokens_are_single_ids_and_round_trip(trained):
    _, tok = trained
    for token in SPECIAL_TOKENS:
        ids = tok(token, add_special_tokens=False).input_ids
        assert len(ids) == 1
        assert tok.convert_ids_to_tokens(ids) == [token]
        assert token in tok.all_special_tokens
    # They are SentencePiece pieces, not appended ids, so they sit below the sentinels.
    assert len({tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}) == len(SPECIAL_TOKENS)


def test_profile_prompt_keeps_markers_whole(trained):
    _, tok = trained
    text = "[USER] 20s, female [SEP] hello"
    tokens = tok.convert_ids_to_tokens(tok(text).input_ids)
    assert tokens[0] == "[USER]" and tokens.count("[SEP]") == 1 and tokens[-1] == "</s>"
    assert tokens[tokens.index("[SEP]") + 1].startswith("▁")  # the text after a marker starts a word
    assert "[USER1]" not in tokens  # longest match: "[USER]" must not swallow or split "[USER1]"
    ppp = tok.convert_ids_to_tokens(tok("[USER1] 学生 [USER2] 会社員 [SEP] こんにちは").input_ids)
    assert ppp[0] == "[USER1]" and "[USER2]" in ppp and "[SEP]" in ppp
    decoded = tok.decode(tok(text).input_ids, skip_special_tokens=False)
    assert decoded.startswith("[USER]") and "[SEP]" in decoded and decoded.endswith("hello</s>")


@pytest.mark.parametrize(
    "text",
    ["今日はいい天気ですね。", "趣味は映画鑑賞です", "鮨と蕎麦が好き🍣", "hello, 世界! 2024年"],
)
def test_text_round_trips_without_unk(trained, text):
    _, tok = trained
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids  # unseen characters fall back to byte pieces
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_sentinel_tokens_follow_t5(trained):
    _, tok = trained
    ids = [tok.convert_tokens_to_ids(t) for t in sentinel_tokens(EXTRA_IDS)]
    assert ids[0] == len(tok) - 1  # <extra_id_0> is the last id, as in released T5 checkpoints
    assert ids == list(range(len(tok) - 1, len(tok) - 1 - EXTRA_IDS, -1))
    assert tok("<extra_id_0>", add_special_tokens=False).input_ids == [ids[0]]
    assert ids[0] in tok("a <extra_id_0> b").input_ids


def test_len_covers_every_id(trained):
    _, tok = trained
    # T5Config(vocab_size=len(tokenizer)) must cover every id the tokenizer can emit.
    assert max(tok.get_vocab().values()) == len(tok) - 1
    assert len(tok) <= VOCAB_SIZE + EXTRA_IDS


def test_reload_from_disk_is_identical(trained):
    output_dir, tok = trained
    assert (output_dir / "tokenizer.json").is_file() and (output_dir / SPIECE_MODEL_FILE).is_file()
    assert not list(output_dir.parent.glob(".*"))  # no staging folder left behind
    reloaded = AutoTokenizer.from_pretrained(output_dir)
    for text in [*ENGLISH, *JAPANESE, "[USER] 30s, male [SEP] 鮨🍣 <extra_id_3>"]:
        assert reloaded(text).input_ids == tok(text).input_ids
    assert len(reloaded) == len(tok)
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tok)


def test_training_is_deterministic_and_overwrites(tmp_path):
    corpus = make_corpus(n_lines=200, seed=1)
    first = train_sentencepiece_tokenizer(corpus, tmp_path / "a", SentencePieceSettings(vocab_size=VOCAB_SIZE,
                                                                                        extra_ids=8))
    first_json = (tmp_path / "a" / "tokenizer.json").read_bytes()
    second = train_sentencepiece_tokenizer(corpus, tmp_path / "b", SentencePieceSettings(vocab_size=VOCAB_SIZE,
                                                                                         extra_ids=8))
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == first_json  # scores included
    # Retraining into an existing folder replaces it whole.
    train_sentencepiece_tokenizer(corpus, tmp_path / "a", SentencePieceSettings(vocab_size=VOCAB_SIZE, extra_ids=4))
    assert len(AutoTokenizer.from_pretrained(tmp_path / "a")) == len(first) - 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_bpe_model_type(tmp_path):
    tok = train_sentencepiece_tokenizer(make_corpus(200), tmp_path / "bpe",
                                        SentencePieceSettings(vocab_size=VOCAB_SIZE, model_type="bpe"))
    ids = tok("[USER] 趣味は映画鑑賞です🎬").input_ids
    assert tok.convert_ids_to_tokens(ids)[0] == "[USER]" and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "趣味は映画鑑賞です🎬"


def test_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece_tokenizer(["hi"], tmp_path / "x", SentencePieceSettings(model_type="char"))
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_sentencepiece_tokenizer(["", "  ", "\n"], tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_load_tokenizer_adds_missing_markers(tmp_path):
    # A T5-style tokenizer without the markers, standing in for a pretrained checkpoint.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("▁hello", -3.0)]
    vocab += [(c, -5.0) for c in "helo"]
    T5Tokenizer(vocab=vocab, extra_ids=3).save_pretrained(tmp_path / "plain")

    tok, added = load_tokenizer(tmp_path / "plain")
    assert added
    assert len(tok) == len(vocab) + 3 + len(SPECIAL_TOKENS)
    tokens = tok.convert_ids_to_tokens(tok("[USER] hello [SEP] hello").input_ids)
    assert tokens == ["[USER]", "▁hello", "[SEP]", "▁hello", "</s>"]
    assert set(sentinel_tokens(3)) <= set(tok.all_special_tokens)  # the sentinels stay special

    untouched = load_tokenizer(tmp_path / "plain", add_special_tokens=False)
    assert not untouched.added_special_tokens
    assert tokenizer_fingerprint(untouched.tokenizer) != tokenizer_fingerprint(tok)

    tok.save_pretrained(tmp_path / "with_markers")
    reloaded = load_tokenizer(tmp_path / "with_markers")
    assert not reloaded.added_special_tokens
    assert tokenizer_fingerprint(reloaded.tokenizer) == tokenizer_fingerprint(tok)


def test_load_tokenizer_on_trained_adds_nothing(trained):
    output_dir, tok = trained
    loaded = load_tokenizer(output_dir)
    assert not loaded.added_special_tokens
    assert len(loaded.tokenizer) == len(tok)
