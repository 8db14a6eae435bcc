"""Subword tokenizers for the T5 models: train one from scratch, or load a pretrained one with the §3.4 markers.

A trained tokenizer is a SentencePiece model (T5's ids: pad 0, eos 1, unk 2, no bos) with byte fallback, so
Japanese and emoji never become `<unk>`, wrapped as a Hugging Face tokenizer that appends `</s>`, keeps the
§3.4 markers whole and carries T5's `<extra_id_N>` sentinels for span-corruption pre-training. Its folder
reloads with `transformers.AutoTokenizer.from_pretrained` alone, offline.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TokenizersBackend
from transformers.convert_slow_tokenizer import SpmConverter

from udg_lib.io import staged_dir
from udg_lib.prompts import PROMPT_SPECIAL_TOKENS as SPECIAL_TOKENS  # §3.4: the PSP/PPP markers
from udg_lib.llm import checkpoint_source
from udg_lib.data.prepare import corpus_language, corpus_names, corpus_text_sample

# T5's fixed ids; `bos_id=-1` because T5 never prepends a start token (the decoder starts from pad).
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
SPIECE_MODEL_FILE = "spiece.model"  # the raw SentencePiece model, kept beside tokenizer.json (T5's file name)
SUPPORTED_MODEL_TYPES = ("unigram", "bpe")


class LoadedTokenizer(NamedTuple):
    """What `load_tokenizer` returns; unpacks as `tokenizer, added = load_tokenizer(...)`."""

    tokenizer: PreTrainedTokenizerBase
    added_special_tokens: bool  # new ids were appended: the model's embeddings must cover len(tokenizer)


def sentinel_tokens(extra_ids: int) -> list[str]:
    """T5's span-corruption sentinels, `<extra_id_0>` first."""
    return [f"<extra_id_{i}>" for i in range(extra_ids)]


def _marker_token(token: str) -> AddedToken:
    # normalized=False: match the raw text, so NFKC or whitespace rules can never alter a marker.
    return AddedToken(token, special=True, normalized=False)


def _write_training_corpus(texts: Iterable[str], path: Path) -> int:
    """One text per line (SentencePiece reads lines); line breaks inside a text become spaces, as the
    tokenizer's own normalizer treats them. Returns the number of non-empty lines written."""
    n_lines = 0
    with path.open("w", encoding="utf-8") as handle:
        for text in texts:
            line = " ".join(text.splitlines()).strip()
            if line:
                handle.write(line + "\n")
                n_lines += 1
    return n_lines


def _wrap_sentencepiece_model(model_file: Path, extra_ids: int) -> TokenizersBackend:
    """Wrap a SentencePiece model as a `TokenizersBackend` that encodes as SentencePiece does.

    Not `T5Tokenizer`: in transformers 5 that class rebuilds its Unigram model with byte fallback switched
    off whenever it loads, so byte pieces would come back as `<unk>`. `TokenizersBackend` loads tokenizer.json
    verbatim (the route transformers itself uses for byte-fallback T5s such as umT5).
    """
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    pieces = list(proto.pieces)
    # Unigram takes (piece, score) pairs; BPE takes piece -> id and derives merges from the scores.
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        vocab: list[tuple[str, float]] | dict[str, int] = [(p.piece, p.score) for p in pieces]
    else:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
    # Builds normalizer, byte-fallback model and decoder from the proto itself. legacy=True gives every chunk
    # between added tokens its own "▁" prefix, so "[USER] hello" -> [USER] ▁hello, as pretrained T5s do.
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto=proto, vocab=vocab, legacy=True)
    # Sentinels appended in reverse, so <extra_id_0> has the highest id, as in every released T5 checkpoint.
    sentinels = list(reversed(sentinel_tokens(extra_ids)))
    return TokenizersBackend(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        add_bos_token=False,
        add_eos_token=True,  # T5 appends </s> to every input and target
        # The markers are already SentencePiece pieces (no new ids); registering them as special tokens makes
        # the HF side split them off before subword segmentation too.
        extra_special_tokens=[_marker_token(t) for t in (*SPECIAL_TOKENS, *sentinels)],
    )


def _write_failure(staging: Path, output_dir: Path) -> OSError | None:
    """The OS error behind a failed SentencePiece run, if writing in `staging` fails now (a full disk);
    None when the folder takes a small write, so the trainer's own error stands."""
    probe = staging / ".write-probe"
    try:
        with probe.open("wb") as handle:
            handle.write(b"\0" * (64 << 10))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        code = err.errno or errno.EIO
        return OSError(code, os.strerror(code), str(output_dir))
    finally:
        probe.unlink(missing_ok=True)
    return None


@dataclass(frozen=True)
class SentencePieceSettings:
    """How `train_sentencepiece_tokenizer` trains (stage 00's parameters)."""

    vocab_size: int = 8000  # an upper bound: a small corpus yields fewer pieces (256 bytes and the markers count)
    model_type: str = "unigram"  # or "bpe"
    character_coverage: float = 0.9995
    extra_ids: int = 100  # T5's <extra_id_N> sentinels, not counted in vocab_size
    input_sentence_size: int = 2_000_000  # sentences sampled (seeded) when the corpus has more
    seed: int = 0
    normalization_rule_name: str = "nmt_nfkc"  # "identity" keeps every character as written
    num_threads: int = 4

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}")


def train_sentencepiece_tokenizer(texts: Iterable[str], output_dir: str | Path,
                                  settings: SentencePieceSettings = SentencePieceSettings()) -> PreTrainedTokenizerBase:
    """Train a SentencePiece tokenizer on `texts`, save it to `output_dir`, and return it reloaded from there.

    `output_dir` holds tokenizer.json + tokenizer_config.json (load with `AutoTokenizer`) and spiece.model,
    whose trainer spec records every training option. It is written atomically and replaced if it exists.
    `settings.vocab_size` is an upper bound (a small corpus yields fewer pieces); it counts the 256 byte pieces
    and the markers, but not the `extra_ids` sentinels: size the model's embeddings with `len(tokenizer)`.
    The default NFKC rule folds full-width ASCII and half-width kana (as T5 does); "identity" keeps every
    character as written. Output is identical for identical texts, seed and `num_threads`.
    """
    output_dir = Path(output_dir)
    with staged_dir(output_dir) as staging:  # built beside output_dir, renamed into place on success
        corpus_file = staging / "corpus.txt"
        if _write_training_corpus(texts, corpus_file) == 0:
            raise ValueError("no non-empty texts to train the tokenizer on")
        # Seeds the sentence sampling and shuffling used when the corpus exceeds input_sentence_size.
        spm.set_random_generator_seed(settings.seed)
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus_file),
                model_prefix=str(staging / Path(SPIECE_MODEL_FILE).stem),
                vocab_size=settings.vocab_size,
                model_type=settings.model_type,
                character_coverage=settings.character_coverage,
                normalization_rule_name=settings.normalization_rule_name,
                input_sentence_size=settings.input_sentence_size,
                shuffle_input_sentence=True,
                pad_id=0,
                eos_id=1,
                unk_id=2,
                bos_id=-1,
                user_defined_symbols=list(SPECIAL_TOKENS),  # §3.4: each marker is one piece, never split
                byte_fallback=True,  # unseen characters become UTF-8 byte pieces, never <unk>
                hard_vocab_limit=False,  # a small corpus yields fewer pieces instead of failing
                num_threads=settings.num_threads,
                minloglevel=1,  # keep warnings (e.g. over-long lines skipped), drop the progress log
            )
            # Parsed before the training text is deleted, so that a full disk is still full if this fails.
            wrapped = _wrap_sentencepiece_model(staging / SPIECE_MODEL_FILE, settings.extra_ids)
        except Exception as err:
            # A full disk shows as SentencePiece's "INTERNAL: ...WriteLine..." or, when the model file was
            # cut short without an error, as a protobuf DecodeError: report the OS error instead.
            failure = _write_failure(staging, output_dir)
            if failure is None:
                raise
            raise failure from err
        corpus_file.unlink()
        (staging / "spiece.vocab").unlink()  # the same pieces are in tokenizer.json
        wrapped.save_pretrained(staging)
    return AutoTokenizer.from_pretrained(output_dir)


def add_marker_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Register any §3.4 marker the tokenizer lacks as a special token, in place.

    Returns True when new ids were appended to the vocabulary (a marker that was already a piece is only
    marked special). Then resize the model if `len(tokenizer)` exceeds its embedding rows; T5 checkpoints
    often carry spare rows (e.g. 32128 for a 32100-piece vocabulary), so resizing down would drop them.
    """
    registered = set(tokenizer.all_special_tokens)
    missing = [token for token in SPECIAL_TOKENS if token not in registered]
    if not missing:
        return False
    size_before = len(tokenizer)
    # replace_extra_special_tokens=False: transformers 5 otherwise replaces the list, dropping the sentinels.
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [_marker_token(t) for t in missing]}, replace_extra_special_tokens=False
    )
    return len(tokenizer) > size_before


def load_tokenizer(name_or_path: str | Path, *, add_special_tokens: bool = True) -> LoadedTokenizer:
    """Load a tokenizer folder, hub id or packaged LLM short name (`llm.PACKAGED_LLMS`, e.g. "smollm2" for the
    causal track) with `AutoTokenizer` and, unless told not to, add the §3.4 markers.

    A tokenizer from `train_sentencepiece_tokenizer` already has them; a pretrained one (e.g.
    `sonoisa/t5-base-japanese`) gains them, and `added_special_tokens` tells the caller to check the
    model's embedding size (see `add_marker_tokens`).
    """

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_source(name_or_path)))
    added = add_marker_tokens(tokenizer) if add_special_tokens else False
    return LoadedTokenizer(tokenizer=tokenizer, added_special_tokens=added)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 hex digest of the vocabulary (every token and its id, added tokens included), for provenance."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    payload = json.dumps(vocab, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Does a tokenizer cover a corpus' language? A profile that pairs a Japanese checkpoint with English corpora
# (or an English embedder with a Japanese corpus) trains and scores for hours on text its vocabulary spells
# as <unk> or letter by letter; two figures measured on a sample of the corpus refuse it in seconds.

# Non-space characters per token below which a tokenizer is taken to spell the language piece by piece. English
# tokenizers give ~3.5-4.5 on chat text and a vocabulary without English words ~1-2; Japanese ones ~1.5-2.5
# and byte fallback under 1. A language not listed is judged by its uncovered share alone.
MIN_CHARS_PER_TOKEN: dict[str, float] = {"en": 2.0, "ja": 1.2}
# Share of a corpus' non-space characters that a tokenizer may spell only as <unk> or byte pieces.
MAX_UNCOVERED_SHARE = 0.02
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TokenizerLanguageError(ValueError):
    """A tokenizer does not cover a corpus' language; the message is one line naming both and the figure."""


class TokenizerFit(NamedTuple):
    """How well a tokenizer covers a sample of text."""

    uncovered_share: float  # non-space characters spelled only as <unk> or byte-fallback pieces, as a share
    chars_per_token: float  # non-space characters per token (special tokens and bare "▁" left out)
    n_texts: int


def _uncovered_token(token: str, unk_token: str | None) -> bool:
    return token == unk_token or bool(_BYTE_PIECE.fullmatch(token))


def measure_tokenizer_fit(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> TokenizerFit:
    """The share of characters a tokenizer cannot spell with its vocabulary, and characters per token.

    A fast tokenizer's offsets give the characters behind each <unk> or byte piece exactly; a slow one (e.g.
    a Python sentencepiece tokenizer) counts one character per <unk> and a byte piece as 1/k of a character,
    k being the text's mean UTF-8 bytes per character.
    """
    texts = [" ".join(str(t).split()) for t in texts]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no non-empty texts to measure the tokenizer on")
    unk = tokenizer.unk_token
    n_chars = n_tokens = 0
    uncovered = 0.0
    for text in texts:
        n_chars += sum(1 for char in text if not char.isspace())
        if tokenizer.is_fast:
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
            spans = [text[start:end] for start, end in encoded["offset_mapping"]]
            missing = {position for token, (start, end) in zip(tokens, encoded["offset_mapping"])
                       if _uncovered_token(token, unk) for position in range(start, end) if not text[position].isspace()}
            uncovered += len(missing)
            n_tokens += sum(1 for span in spans if span.strip())
        else:
            tokens = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
            bytes_per_char = len(text.encode("utf-8")) / len(text)
            uncovered += sum(1 if token == unk else 1 / bytes_per_char
                             for token in tokens if _uncovered_token(token, unk))
            n_tokens += sum(1 for token in tokens if token.strip("▁ ") or _uncovered_token(token, unk))
    return TokenizerFit(uncovered_share=uncovered / max(n_chars, 1), chars_per_token=n_chars / max(n_tokens, 1),
                        n_texts=len(texts))


def check_tokenizer_fit(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], *, tokenizer_name: str,
                        corpus_name: str, language: str) -> TokenizerFit:
    """`measure_tokenizer_fit`, raising TokenizerLanguageError when the tokenizer leaves more than
    MAX_UNCOVERED_SHARE of the corpus uncovered or spells it in fewer characters per token than
    MIN_CHARS_PER_TOKEN asks for the corpus' language."""
    fit = measure_tokenizer_fit(tokenizer, texts)
    where = f"tokenizer {tokenizer_name!r} on corpus {corpus_name!r} (language {language!r})"
    if fit.uncovered_share > MAX_UNCOVERED_SHARE:
        raise TokenizerLanguageError(
            f"{where}: {fit.uncovered_share:.1%} of the characters are <unk> or byte pieces (at most "
            f"{MAX_UNCOVERED_SHARE:.0%} allowed): the vocabulary does not cover the corpus' language; "
            f"use a tokenizer and model of that language")
    floor = MIN_CHARS_PER_TOKEN.get(language)
    if floor is not None and fit.chars_per_token < floor:
        raise TokenizerLanguageError(
            f"{where}: {fit.chars_per_token:.2f} characters per token (at least {floor} expected for "
            f"{language!r}): the vocabulary spells the corpus piece by piece; use a tokenizer and model of that language")
    return fit


# Turns per corpus a fit is measured on: enough for a stable figure, a second or two per tokenizer.
FIT_SAMPLE_TURNS = 2000


def check_corpora_fit(tokenizer: PreTrainedTokenizerBase, prepared_dir: str | Path, tokenizer_name: str,
                      languages: Iterable[str] | None = None) -> dict[str, TokenizerFit]:
    """`check_tokenizer_fit` on a seeded sample of every corpus stage 00 prepared in `prepared_dir` (those of
    `languages` only, when given); the fits by corpus name."""

    wanted = None if languages is None else set(languages)
    fits = {}
    for name in corpus_names(prepared_dir):
        language = corpus_language(prepared_dir, name)
        if wanted is None or language in wanted:
            texts = corpus_text_sample(prepared_dir, name, FIT_SAMPLE_TURNS)
            fits[name] = check_tokenizer_fit(tokenizer, texts, tokenizer_name=tokenizer_name, corpus_name=name,
                                             language=language)
    return fits
