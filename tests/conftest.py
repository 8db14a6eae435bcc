"""Shared fixtures: small generated corpora (English and Japanese) for the data and split tests, a small
tokenizer, and tiny models of either family for the model tests; `assert_close_to_scale` for comparing floats.

Tolerance policy. Two computations of the same numbers that differ only in how they are carried out (another
batch shape, routed adapters vs peft, a batch vs one row at a time, another processor's kernels) round
differently: float addition is not associative, and the kernels pick their summation order by shape and by
instruction set (AVX2, AVX-512, AMX). Such results are compared with `assert_close_to_scale`: a tolerance of
the dtype's machine epsilon times the tensor's scale (its largest magnitude) times a factor for the length of
the sums involved; never an element-wise rtol (a gradient or logit tensor holds elements near zero, whose
rounding error is set by the scale of the sums that made them, not by their own size), and never an absolute
tolerance tuned on one machine's kernels. Each call says how its factor was chosen. Weights trained by Adam
are the exception: Adam carries rounding differences forward through every step, so their tolerances come from
measured training dynamics (test_multilora's TRAINED_MATCH). Exact equality stays where it holds by
construction: the same computation run twice on one machine (determinism, resume, Ray vs local), weights saved
and loaded back, a value that is exactly zero (an isolated row's gradient), a base row that gets exactly zero
added. Greedy replies are compared exactly: they agree unless two candidate tokens' logits tie within
rounding. Checks of arithmetic against hand-computed numbers keep pytest.approx's defaults.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
import torch

# Words of the tiny generated dialogues the model tests train on.
WORDS = ("hello how are you today i like movies on weekends what is your hobby the weather is nice "
         "i am a student and live in tokyo cooking music games sports reading travel cats dogs").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` random sentences of 3-8 WORDS, reproducible from `seed`."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]


# Words of the tiny generated Japanese text (no spaces between words, as Japanese is written).
JA_WORDS = ("こんにちは 今日は いい天気 ですね 私は 大学生 です 東京に 住んで います 週末は よく 映画を 見ます "
            "趣味は 料理と 読書 犬を 飼って 音楽が 好き 旅行に 行きたい 仕事は 会社員 猫が かわいい 朝ごはんは パン").split()


def japanese_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` random Japanese sentences of 3-7 JA_WORDS ending in 。, reproducible from `seed`."""
    rng = random.Random(seed)
    return ["".join(rng.choice(JA_WORDS) for _ in range(rng.randint(3, 7))) + "。" for _ in range(n)]


CANARY = "ZQXCANARY"  # a string planted in one user's data that must never reach another user's batches

MODEL_FAMILIES = ("seq2seq", "causal")  # udg_lib.families.FAMILIES' names


@pytest.fixture(scope="module", params=MODEL_FAMILIES)
def family(request) -> str:
    """A model family's name; a test that asks for it (or for a fixture built on it) runs once per family.
    The safety tests (resume, isolation, determinism, executor and routing equivalence) must hold for both."""
    return request.param


# A test whose fixtures are built on `family` but whose subject is family-independent runs for one family only.
seq2seq_only = pytest.mark.parametrize("family", ["seq2seq"], indirect=True)


def tiny_model(tokenizer, family: str = "seq2seq", seed: int = 0, dropout: float | None = None):
    """A tiny model of `family` fitted to `tokenizer` (`families.build_model`), random weights drawn with `seed`:
    T5 preset "test" or Llama preset "test". `dropout`: T5's dropout_rate or Llama's attention_dropout
    (default: the presets', 0.1 and 0)."""
    from udg_lib.families import build_model, llama_config
    from udg_lib.families import t5_config

    if family == "seq2seq":
        config = t5_config("test", len(tokenizer), **({} if dropout is None else {"dropout_rate": dropout}))
    elif family == "causal":
        config = llama_config("test", len(tokenizer), **({} if dropout is None else {"attention_dropout": dropout}))
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {MODEL_FAMILIES}")
    return build_model(config, tokenizer, seed=seed)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small SentencePiece T5 tokenizer over the generated sentences, the prompt markers and CANARY
    (modules that need another tokenizer define their own fixture of this name)."""
    from udg_lib.tokenizer import SentencePieceSettings, train_sentencepiece_tokenizer

    corpus = sentences(60) + ["[USER] 20s, female [SEP] hello", "[USER1] 30s [USER2] 40s [SEP] hi", CANARY]
    return train_sentencepiece_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tokenizer",
                                         SentencePieceSettings(vocab_size=300, extra_ids=10, num_threads=1))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a loaded machine they can run 20x slower with them;
    subprocesses and Ray tasks of the tests use one thread too. (Notebook kernels are not affected.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_turns(n_users: int = 12, n_dialogues: int = 120, turns_per_dialogue: int = 8,
                    seed: int = 0) -> pd.DataFrame:
    """Two-party dialogues between random pairs of users; text names speaker, dialogue and turn."""
    rng = random.Random(seed)
    users = [f"u{i:02d}" for i in range(n_users)]
    rows = []
    for d in range(n_dialogues):
        a, b = rng.sample(users, 2)
        for t in range(turns_per_dialogue):
            speaker = (a, b)[t % 2]
            rows.append({"dialogue_id": f"d{d:03d}", "turn_index": t, "speaker_id": speaker,
                         "text": f"{speaker} says turn {t} of d{d:03d}", "timestamp": ""})
    return pd.DataFrame(rows)


@pytest.fixture
def turns() -> pd.DataFrame:
    return synthetic_turns()


def assert_close_to_scale(actual, expected, *, ulps: float = 16, reduction_size: int = 1,
                          dtype: torch.dtype | np.dtype | None = None, scale: float | None = None) -> None:
    """Assert that `actual` equals `expected` up to float rounding: every element within
    `ulps * sqrt(reduction_size) * eps(dtype) * scale` of its counterpart.

    `scale`: the largest magnitude in `expected` unless given. Rounding errors are relative to the sums that
    produced a value, so an element near zero carries as much absolute error as the largest one; one tolerance
    for the whole tensor, scaled by its largest element, is what an element-wise rtol gets wrong.
    `dtype`: the precision the values were computed in (default: `expected`'s); pass it when they are kept in a
    wider type than computed in (per-row NLL summed in float64 from float32 logits).
    `reduction_size`: the number of terms in the reduction whose order differs between the two computations
    (a batch's rows and positions for a gradient, the hidden size for a matmul). A float sum of n terms carries
    a rounding error bounded by about n * eps * sum|x|, typically sqrt(n) * eps * sum|x| as the errors' signs
    vary; another order (another batch shape, another kernel) moves the result by about that much.
    `ulps`: the factor over that typical error, for what the sqrt(n) model leaves out (a model stacks several
    such reductions; sum|x| exceeds the result's scale where terms cancel). With AVX-512 and AVX2 kernels the
    comparisons in these tests stay within 0.35 x sqrt(n) * eps * scale (one ill-conditioned model reaches 7.3
    and is given 64), so the default, 16, leaves a margin of ~50 for other processors; a real fault (a row
    routed to the wrong adapter, a leaked gradient, a mis-scaled update) moves results by a sizeable fraction of
    their scale, orders of magnitude above the tolerance.
    """
    def float64(x) -> np.ndarray:
        return (x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor)
                else np.asarray(x, dtype=np.float64))

    if dtype is None:
        dtype = expected.dtype if isinstance(expected, torch.Tensor) else np.asarray(expected).dtype
    eps = torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) else float(np.finfo(dtype).eps)
    a, e = float64(actual), float64(expected)
    assert a.shape == e.shape, f"shapes differ: {a.shape} vs {e.shape}"
    scale = float(np.abs(e).max(initial=0.0)) if scale is None else scale
    tolerance = ulps * math.sqrt(reduction_size) * eps * scale
    error = float(np.abs(a - e).max(initial=0.0))
    assert error <= tolerance, (f"max |actual - expected| = {error:.3g} > {tolerance:.3g} = {ulps} ulps x "
                                f"sqrt({reduction_size}) x eps({dtype}) x scale {scale:.3g}")
