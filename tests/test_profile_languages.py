"""A profile that mixes languages fails early: tokenizer fit on a corpus sample, and the runner's checks."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pandas as pd
import pytest
import sentencepiece as spm
from transformers import AutoTokenizer, T5Config

from conftest import japanese_sentences, sentences
from udg_lib.pipeline import PipelineError, Stage, check_model_languages, run_pipeline
from udg_lib.tokenizer import (
    MIN_CHARS_PER_TOKEN,
    TokenizerLanguageError,
    check_tokenizer_fit,
    measure_tokenizer_fit,
    SentencePieceSettings,
    train_sentencepiece_tokenizer,
)

ENGLISH, JAPANESE = sentences(200, seed=1), japanese_sentences(200, seed=1)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer folders built here: English and Japanese ones from the project's trainer (byte fallback), and
    a hub-style Japanese T5 tokenizer (spiece.model only, no byte fallback) whose vocabulary holds the Latin
    letters one by one, as a Japanese vocabulary trained on web text does."""
    root = tmp_path_factory.mktemp("language_tokenizers")
    train_sentencepiece_tokenizer(sentences(300), root / "en", SentencePieceSettings(vocab_size=1000, extra_ids=10,
                                                                                     num_threads=1))
    train_sentencepiece_tokenizer(japanese_sentences(300), root / "ja",
                                  SentencePieceSettings(vocab_size=600, extra_ids=10, num_threads=1))
    corpus = root / "ja_latin.txt"
    corpus.write_text("\n".join([*japanese_sentences(300), *[" ".join(string.ascii_letters)] * 5]), encoding="utf-8")
    folder = root / "ja_latin"
    folder.mkdir()
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=400,
                                   character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1)
    (folder / "spiece.vocab").unlink()
    T5Config(vocab_size=500).save_pretrained(folder)  # AutoTokenizer picks T5Tokenizer from the model type
    return {"en": root / "en", "ja": root / "ja", "ja_latin": folder}


def load(folder: Path):
    return AutoTokenizer.from_pretrained(folder)


def test_a_tokenizer_of_the_corpus_language_is_accepted(tokenizers):
    english = check_tokenizer_fit(load(tokenizers["en"]), ENGLISH, tokenizer_name="en", corpus_name="chat",
                                  language="en")
    japanese = check_tokenizer_fit(load(tokenizers["ja"]), JAPANESE, tokenizer_name="ja", corpus_name="pcjp",
                                   language="ja")
    assert english.uncovered_share == 0 and english.chars_per_token > 3  # whole words
    assert japanese.uncovered_share == 0 and japanese.chars_per_token >= MIN_CHARS_PER_TOKEN["ja"]
    assert english.n_texts == japanese.n_texts == 200


def test_an_english_tokenizer_on_a_japanese_corpus_is_refused_naming_both_and_the_share(tokenizers):
    with pytest.raises(TokenizerLanguageError) as caught:
        check_tokenizer_fit(load(tokenizers["en"]), JAPANESE, tokenizer_name="my/en-t5", corpus_name="pcjp",
                            language="ja")
    message = str(caught.value)
    assert message.startswith("tokenizer 'my/en-t5' on corpus 'pcjp' (language 'ja'): 100.0% of the characters "
                              "are <unk> or byte pieces") and "\n" not in message


def test_a_japanese_tokenizer_on_an_english_corpus_is_refused(tokenizers):
    # byte fallback: English letters it never saw become byte pieces
    with pytest.raises(TokenizerLanguageError, match=r"'ja' on corpus 'chat' \(language 'en'\): 100.0% "):
        check_tokenizer_fit(load(tokenizers["ja"]), ENGLISH, tokenizer_name="ja", corpus_name="chat", language="en")
    # letters in the vocabulary one by one: covered, but spelled letter by letter
    tokenizer = load(tokenizers["ja_latin"])
    fit = measure_tokenizer_fit(tokenizer, ENGLISH)
    assert fit.uncovered_share == 0 and fit.chars_per_token < 1.5
    with pytest.raises(TokenizerLanguageError, match=rf"{fit.chars_per_token:.2f} characters per token \(at least "
                                                     rf"2.0 expected for 'en'\): the vocabulary spells the corpus"):
        check_tokenizer_fit(tokenizer, ENGLISH, tokenizer_name="ja_latin", corpus_name="chat", language="en")


def test_a_hub_style_tokenizer_without_byte_fallback_counts_unknown_characters(tokenizers):
    fit = measure_tokenizer_fit(load(tokenizers["ja_latin"]), ["私は学生です。", "私は🙂です。"])
    assert fit.uncovered_share == pytest.approx(1 / 13)  # the emoji is <unk>; 13 characters in all


def prepared_corpus(root: Path, name: str, language: str, texts: list[str]) -> None:
    """The two files of a stage 00 corpus the language checks read."""
    folder = root / name / "corpus"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"name": name, "language": language}))
    pd.DataFrame({"text": texts}).to_parquet(folder / "turns.parquet")


PARAMS = Path("params")  # the profile folder the hand-built stages below say their values came from


def stage(name: str, **params) -> Stage:
    sources = dict.fromkeys(params, PARAMS / f"{name}.yaml")
    return Stage(name, Path(f"{name}.ipynb"), frozenset(params), dict(params), dict(params), "", {}, sources)


def test_the_runner_refuses_an_english_embedder_for_a_japanese_corpus_and_accepts_matching_ones(
    tokenizers, tmp_path
):
    prepared = tmp_path / "00_prepare_corpus"
    prepared_corpus(prepared, "chat", "en", ENGLISH)
    prepared_corpus(prepared, "pcjp", "ja", JAPANESE)
    params = PARAMS
    good = [stage("02_pretrain", checkpoint=""),
            stage("04_exp1", embedder=str(tokenizers["en"]), embedder_ja=str(tokenizers["ja"])),
            stage("06_llm", embedder=str(tokenizers["en"]), embedder_ja="use-multilingual")]
    check_model_languages(good, prepared)
    with pytest.raises(PipelineError) as caught:
        check_model_languages([stage("04_exp1", embedder=str(tokenizers["en"]), embedder_ja=str(tokenizers["en"]))],
                              prepared)
    assert str(caught.value).startswith(f"{params / '04_exp1.yaml'}: embedder_ja: tokenizer '{tokenizers['en']}' "
                                        f"on corpus 'pcjp' (language 'ja'): 100.0% of the characters")
    # a checkpoint serves every corpus: an English one fails on the Japanese corpus
    with pytest.raises(PipelineError, match=r"02_pretrain.yaml: checkpoint: tokenizer .* on corpus 'pcjp'"):
        check_model_languages([stage("02_pretrain", checkpoint=str(tokenizers["en"]))], prepared)
    with pytest.raises(PipelineError, match=r"checkpoint '/no/such/model': cannot load its tokenizer to check its "
                                            r"language \(is it in the Hugging Face cache\?\)"):
        check_model_languages([stage("02_pretrain", checkpoint="/no/such/model")], prepared)


def test_full_ja_without_its_corpus_file_fails_before_any_stage_in_one_line(tmp_path):
    from udg_lib.paths import repo_root

    workbook = repo_root() / "data" / "ja" / "japanese_persona_chat.xlsx"
    if workbook.exists():
        pytest.skip(f"{workbook} is there: this checkout has the corpus")
    outputs = tmp_path / "outputs"
    with pytest.raises(PipelineError) as caught:
        run_pipeline("full-ja", outputs_root=outputs)
    assert str(caught.value) == (f"{repo_root() / 'params' / 'full-ja' / '00_prepare_corpus.yaml'}: corpus 'pcjp': "
                                 f"path {workbook} does not exist; put the file there or change the path")
    assert not outputs.exists()
