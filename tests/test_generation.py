"""Unit tests for udg_lib.generation: mixed-adapter batches equal one-by-one decoding, reference NLL, the
FULL-model prediction hook."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from peft import get_peft_model

from conftest import sentences
from udg_lib.data.schema import PROFILE_FIELDS
from udg_lib.finetuning import FinetuneConfig, lora_config
from udg_lib.generation import (
    BASE_ADAPTER,
    EXP2_FILE,
    PREDICTIONS_FILE,
    UserPredictor,
    greedy_generate,
    load_user_adapters,
    question_pairs,
    reference_nll,
)
from udg_lib.pretraining import build_model, reply_perplexity, t5_config
from udg_lib.prompts import build_prompts
from udg_lib.tokenizer import train_sentencepiece_tokenizer





@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_sentencepiece_tokenizer(sentences(60), tmp_path_factory.mktemp("tok") / "tokenizer",
                                         vocab_size=300, extra_ids=10, num_threads=1)


def tiny_model(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(t5_config("test", len(tokenizer)), tokenizer).eval()


@pytest.fixture(scope="module")
def adapters(tokenizer, tmp_path_factory):
    """Three users' adapters with random (non-zero) B matrices, so each adapter changes the outputs."""
    folder = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for k in range(3):
        model = tiny_model(tokenizer)
        torch.manual_seed(100 + k)
        peft_model = get_peft_model(model, lora_config(FinetuneConfig(lora_dropout=0.0)))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.5)
        peft_model.save_pretrained(str(folder / f"u{k}"))
        dirs[f"u{k}"] = folder / f"u{k}"
    return dirs


def test_mixed_adapter_batches_equal_one_by_one(tokenizer, adapters):
    sources = sentences(12, seed=3)
    names = [f"u{i % 3}" for i in range(len(sources))]
    names[5] = BASE_ADAPTER
    mixed_model = load_user_adapters(tiny_model(tokenizer), adapters)
    mixed = greedy_generate(mixed_model, tokenizer, sources, adapter_names=names, max_new_tokens=12, batch_size=5)
    mixed_nll, mixed_n, *_ = reference_nll(mixed_model, tokenizer, sources, sentences(12, seed=4),
                                       adapter_names=names, batch_size=5)
    one_by_one, nll_one = [], []
    for source, reference, name in zip(sources, sentences(12, seed=4), names):
        model = tiny_model(tokenizer)
        if name != BASE_ADAPTER:
            model = load_user_adapters(model, {name: adapters[name]})
        one_by_one += greedy_generate(model, tokenizer, [source], max_new_tokens=12)
        nll_one.append(reference_nll(model, tokenizer, [source], [reference])[0][0])
    assert mixed == one_by_one
    np.testing.assert_allclose(mixed_nll, nll_one, rtol=1e-4)
    # the adapters matter: not every user gets the base model's reply
    base = greedy_generate(tiny_model(tokenizer), tokenizer, sources, max_new_tokens=12)
    assert mixed[5] == base[5] and mixed != base
    assert mixed_n.sum() > len(sources)


def test_reference_nll_matches_corpus_perplexity(tokenizer):
    model = tiny_model(tokenizer)
    sources, references = sentences(7, seed=5), sentences(7, seed=6)
    nll, n, *_ = reference_nll(model, tokenizer, sources, references, batch_size=3)
    assert math.isclose(math.exp(nll.sum() / n.sum()), reply_perplexity(model, tokenizer, sources, references),
                        rel_tol=1e-5)
    # a random model: about uniform over the vocabulary, so per-token NLL is near log V
    assert 0.5 * math.log(len(tokenizer)) < nll.sum() / n.sum() < 2 * math.log(len(tokenizer))
    with pytest.raises(ValueError, match="2 sources but 1 references"):
        reference_nll(model, tokenizer, sources[:2], references[:1])


def test_reference_text_nll_leaves_out_eos_and_counts_the_scored_characters(tokenizer):
    model = tiny_model(tokenizer)
    short, long = "  i like   cats ", " ".join(sentences(6, seed=8))
    sources = sentences(2, seed=9)
    kept = len(tokenizer(short, add_special_tokens=False)["input_ids"])  # the short reply just fits
    scores = reference_nll(model, tokenizer, sources, [short, long], max_target_length=kept + 1)
    assert scores.n_tokens.tolist() == [kept + 1] * 2  # the long one cut: `kept` text tokens + </s>
    # the text part is the full sum minus -log p(</s> | the reply's tokens), computed here by hand
    for i, reference in enumerate((short, long)):
        ids = tokenizer(reference, add_special_tokens=False)["input_ids"][:kept] + [tokenizer.eos_token_id]
        source = tokenizer(sources[i], return_tensors="pt")
        with torch.no_grad():
            logits = model(**source, labels=torch.tensor([ids])).logits[0]
        eos_nll = -torch.log_softmax(logits[len(ids) - 1].double(), dim=-1)[tokenizer.eos_token_id].item()
        assert scores.nll[i] - scores.text_nll[i] == pytest.approx(eos_nll, rel=1e-4)
    assert scores.text_chars[0] == len("i like cats")  # whitespace runs count once
    first = tokenizer(long, add_special_tokens=False)["input_ids"][:kept]
    assert scores.text_chars[1] == len(" ".join(tokenizer.decode(first).split()))
    assert scores.text_chars[1] < len(long)


def test_user_predictor_writes_the_users_rows_only(tokenizer, tmp_path):
    users = pd.DataFrame({"user_id": ["a", "b"], **{f: "unknown" for f in PROFILE_FIELDS}})
    texts = iter(sentences(30, seed=7))
    test = pd.DataFrame([{"pair_id": f"{u}{i}", "speaker_id": u, "partner_id": "b" if u == "a" else "a",
                          "context": [next(texts)], "response": next(texts), "split": "test"}
                         for u in ("a", "b") for i in range(3)])
    questions = pd.DataFrame({"question_id": ["q01", "q02"], "question": ["what is your hobby", "do you like cats"]})
    predictor = UserPredictor(tokenizer, test, users, "ppp", questions, max_new_tokens=8)
    predictor("a", tiny_model(tokenizer), tmp_path)
    predictions = pd.read_parquet(tmp_path / PREDICTIONS_FILE)
    assert predictions["pair_id"].tolist() == ["a0", "a1", "a2"]
    assert set(predictions.columns) >= {"generated", "nll", "n_tokens", "text_nll", "text_chars"}
    answers = pd.read_parquet(tmp_path / EXP2_FILE)
    assert answers["question_id"].tolist() == ["q01", "q02"]
    prompts = build_prompts(question_pairs(questions, "a"), users, "ppp")
    assert prompts.iloc[0].endswith("what is your hobby")
