"""Unit tests for udg_lib.pretraining: span corruption, dialogue examples, training/resume, profile checks.

Tiny models (preset "test") and a tokenizer trained here on a few dozen sentences; the whole file runs in
well under a minute on CPU.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq

from udg_lib.data.schema import PROFILE_FIELDS
from udg_lib.precision import native_bf16
from udg_lib.data.prepare import pretraining_texts
from udg_lib.encoding import LABEL_PAD_ID, encode_sources, tokenize_pairs
from udg_lib.families import Decoding, t5_config
from udg_lib.pretraining import (
    LOG_HISTORY_FILE,
    build_model,
    count_parameters,
    evaluation_prompt_profile_share,
    greedy_replies,
    holdout_dialogues,
    known_profile_share,
    load_log_history,
    pack_texts_for_span_corruption,
    plot_loss_curves,
    pretrain,
    PretrainConfig,
    profile_changing_pairs,
    profile_perplexity_gap,
    profile_reading_test,
    profile_swap_change_rate,
    profile_swap_table,
    random_spans_noise_mask,
    reply_perplexity,
    sentinel_ids,
    shuffle_profiles,
    span_corruption_lengths,
    SpanCorruptionCollator,
)
from udg_lib.precision import resolve_precision
from udg_lib.prompts import build_prompt, build_prompts
from udg_lib.splits import build_reply_pairs
from udg_lib.tokenizer import SentencePieceSettings, train_sentencepiece_tokenizer

WORDS = ("hello how are you today i like movies on weekends what is your hobby the weather is nice "
         "i am a student and live in tokyo cooking music games sports reading travel cats dogs").split()
PROFILE_VALUES = {
    "age_band": ["20s", "30s", "40s"],
    "gender": ["female", "male"],
    "marital": ["married", "unknown"],
    "occupation": ["student", "office_worker", "homemaker"],
    "region": ["Kanto", "Kinki"],
}


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    corpus = sentences(60) + ["[USER] 20s, female [SEP] hello", "[USER1] 30s [USER2] 40s [SEP] hi"]
    corpus += [", ".join(values) for values in PROFILE_VALUES.values()]
    return train_sentencepiece_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tokenizer",
                                         SentencePieceSettings(vocab_size=400, extra_ids=50))


@pytest.fixture(scope="module")
def corpus() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reply pairs (two-party dialogues) and users with distinct known profiles."""
    rng = random.Random(0)
    users = [f"u{i}" for i in range(6)]
    rows = []
    for d in range(24):
        a, b = rng.sample(users, 2)
        for t, text in enumerate(sentences(6, seed=d)):
            rows.append({"dialogue_id": f"d{d:02d}", "turn_index": t, "speaker_id": (a, b)[t % 2], "text": text})
    turns = pd.DataFrame(rows)
    profiles = pd.DataFrame({
        "user_id": users,
        **{f: [PROFILE_VALUES[f][i % len(PROFILE_VALUES[f])] for i in range(len(users))] for f in PROFILE_FIELDS},
        "self_intro": "", "persona": [[] for _ in users],
    })
    return build_reply_pairs(turns, context_turns=3), profiles


def tiny_model(tokenizer, seed: int = 0, **overrides):
    return build_model(t5_config("test", len(tokenizer), **overrides), tokenizer, seed=seed)


# --- span corruption -------------------------------------------------------------------------------------------


def spans(mask: np.ndarray) -> int:
    return int(np.sum(mask[1:] & ~mask[:-1]) + mask[0])


@pytest.mark.parametrize("length", [2, 3, 10, 57, 141, 568, 1000])
def test_noise_mask_density_and_span_count(length):
    mask = random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(length))
    n_noise = min(max(round(length * 0.15), 1), length - 1)
    assert mask.shape == (length,) and mask.dtype == bool
    assert mask.sum() == n_noise
    assert spans(mask) == max(round(min(n_noise, length - n_noise) / 3.0), 1)
    assert not mask[0]  # spans alternate starting with a non-noise one


def test_noise_mask_is_seeded_and_averages_the_density():
    a = random_spans_noise_mask(500, rng=np.random.default_rng(1))
    assert np.array_equal(a, random_spans_noise_mask(500, rng=np.random.default_rng(1)))
    assert not np.array_equal(a, random_spans_noise_mask(500, rng=np.random.default_rng(2)))
    fractions = [random_spans_noise_mask(n, rng=np.random.default_rng(n)).mean() for n in range(100, 400)]
    assert abs(np.mean(fractions) - 0.15) < 0.005
    assert not random_spans_noise_mask(10, noise_density=0.0).any()


def test_span_corruption_lengths_give_exact_input_length(tokenizer):
    raw, target = span_corruption_lengths(128)
    assert (raw, target) == (141, 29)  # T5's random_spans_helper for inputs_length=128
    collator = SpanCorruptionCollator(tokenizer, input_length=128, seed=0)
    rng = np.random.default_rng(0)
    batch = collator([{"input_ids": rng.integers(3, 300, raw).tolist()} for _ in range(4)])
    assert batch["input_ids"].shape == (4, 128) and batch["labels"].shape == (4, target)
    assert batch["attention_mask"].all()
    with pytest.raises(ValueError, match="input_length"):
        SpanCorruptionCollator(tokenizer, input_length=100)([list(range(3, 3 + raw))])


def fill_sentinels(inputs: list[int], labels: list[int], sentinels: list[int]) -> list[int]:
    """Put each label span back in place of its sentinel in the input."""
    position = {s: i for i, s in enumerate(sentinels)}
    spans_by_sentinel, current = {}, None
    for token in labels[:-1]:
        if token in position:
            current = token
            spans_by_sentinel[current] = []
        else:
            spans_by_sentinel[current].append(token)
    merged = []
    for token in inputs[:-1]:
        merged.extend(spans_by_sentinel[token] if token in position else [token])
    return merged


def test_collator_sentinels_in_order_and_labels_reconstruct_original(tokenizer):
    collator = SpanCorruptionCollator(tokenizer, input_length=64, seed=3)
    sentinels = sentinel_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(sentinels[:2]) == ["<extra_id_0>", "<extra_id_1>"]
    raw = span_corruption_lengths(64)[0]
    rng = np.random.default_rng(0)
    originals = [rng.integers(3, 300, raw).tolist() for _ in range(3)] + [list(range(3, 23))]  # one shorter
    batch = collator([{"input_ids": o} for o in originals])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for row, original in enumerate(originals):
        n_in = int(batch["attention_mask"][row].sum())
        inputs = batch["input_ids"][row, :n_in].tolist()
        assert (batch["input_ids"][row, n_in:] == pad).all()
        labels = [t for t in batch["labels"][row].tolist() if t != LABEL_PAD_ID]
        assert inputs[-1] == eos and labels[-1] == eos
        used_in, used_labels = [t for t in inputs if t in sentinels], [t for t in labels if t in sentinels]
        # <extra_id_0>, <extra_id_1>, ... in increasing order by name, in both inputs and labels
        names = tokenizer.convert_ids_to_tokens(used_in)
        assert names == [f"<extra_id_{i}>" for i in range(len(names))] and used_labels == used_in
        assert labels[0] == sentinels[0]
        assert fill_sentinels(inputs, labels, sentinels) == original
        n_noise = len(labels) - len(used_labels) - 1
        assert n_noise == min(max(round(len(original) * 0.15), 1), len(original) - 1)
    # padding of labels is -100 (the shorter sequence has fewer targets)
    assert (batch["labels"][3] == LABEL_PAD_ID).any()


def test_collator_mask_depends_on_seed_and_sequence_only(tokenizer):
    sequence = {"input_ids": list(range(10, 10 + 57))}
    other = {"input_ids": list(range(100, 100 + 57))}
    first = SpanCorruptionCollator(tokenizer, 64, seed=0)([sequence, other])
    again = SpanCorruptionCollator(tokenizer, 64, seed=0)([other, sequence])
    assert torch.equal(first["input_ids"][0], again["input_ids"][1])  # same mask whatever the batch
    reseeded = SpanCorruptionCollator(tokenizer, 64, seed=1)([sequence])
    assert not torch.equal(first["input_ids"][0], reseeded["input_ids"][0])


def test_repeated_sequences_draw_new_masks(tokenizer):
    packed = pack_texts_for_span_corruption(sentences(40, seed=2), tokenizer, length=57, repeats=2)
    n = len(packed.sequences)
    assert len(packed) == 2 * n and packed[n]["input_ids"] == packed[0]["input_ids"]
    assert (packed[0]["mask_draw"], packed[n]["mask_draw"]) == (0, 1)
    batch = SpanCorruptionCollator(tokenizer, 64, seed=0)([packed[0], packed[n]])
    assert not torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    with pytest.raises(IndexError):
        packed[2 * n]
    head, rest = packed[:3], packed[3:]  # slices select rows (an eval split), keeping repeats
    assert (len(head), len(rest)) == (6, 2 * (n - 3)) and rest[0]["input_ids"] == packed[3]["input_ids"]


def test_pack_texts_concatenates_without_eos(tokenizer):
    texts = sentences(20, seed=5)
    packed = pack_texts_for_span_corruption(texts, tokenizer, length=16)
    flat = [t for text in texts for t in tokenizer(text, add_special_tokens=False).input_ids]
    assert len(packed) == len(flat) // 16
    assert [t for i in range(len(packed)) for t in packed[i]["input_ids"]] == flat[: len(packed) * 16]
    assert tokenizer.eos_token_id not in packed.sequences


def test_pretraining_texts_keep_pretraining_dialogues_only(tmp_path):
    (tmp_path / "cc" / "corpus").mkdir(parents=True)
    pd.DataFrame({"dialogue_id": ["a", "a", "b"], "turn_index": [1, 0, 0], "text": ["y", "x", "z"]}).to_parquet(
        tmp_path / "cc" / "corpus" / "turns.parquet")
    pd.DataFrame({"dialogue_id": ["a"]}).to_parquet(tmp_path / "cc" / "pretrain_pairs.parquet")
    assert pretraining_texts(tmp_path, ["cc"]).tolist() == ["x", "y"]  # dialogue b has an evaluation user


# --- dialogue examples -----------------------------------------------------------------------------------------


def test_tokenize_pairs_fits_lengths_and_keeps_eos(tokenizer):
    sources = ["hello how are you", "i like movies " * 20]
    targets = ["fine", "the weather is nice today " * 10]
    examples = tokenize_pairs(sources, targets, tokenizer, max_source_length=12, max_target_length=8)
    assert len(examples) == 2
    assert examples[0] == {"input_ids": tokenizer(sources[0]).input_ids, "labels": tokenizer(targets[0]).input_ids}
    long_item = examples[1]
    assert len(long_item["input_ids"]) == 12 and len(long_item["labels"]) == 8
    assert long_item["input_ids"][-1] == long_item["labels"][-1] == tokenizer.eos_token_id
    assert long_item["labels"][:-1] == tokenizer(targets[1], add_special_tokens=False).input_ids[:7]
    with pytest.raises(ValueError):
        tokenize_pairs(["a"], [], tokenizer, 8, 8)


def test_long_prompt_keeps_profile_and_newest_turns(tokenizer):
    context = [sentences(1, seed=i)[0] + " hobby" for i in range(6)] + ["cats dogs"]
    speaker = {"age_band": "20s", "gender": "female"}
    prompt = build_prompt("psp", context, speaker)
    assert encode_sources([prompt], tokenizer, 512)[0] == tokenizer(prompt).input_ids  # short enough: unchanged
    ids = encode_sources([prompt], tokenizer, 20)[0]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) <= 20 and tokens[-1] == "</s>"
    head = tokenizer.convert_ids_to_tokens(tokenizer("[USER] 20s, female [SEP]", add_special_tokens=False).input_ids)
    assert tokens[: len(head)] == head  # the profile survives
    assert tokenizer.decode(ids, skip_special_tokens=True).endswith("cats dogs")  # the newest turn survives
    assert tokens[len(head) - 1] == "[SEP]" and tokens[len(head)].startswith("▁")  # whole turns only
    plain = encode_sources([build_prompt("plain", context)], tokenizer, 10)[0]
    assert tokenizer.decode(plain, skip_special_tokens=True).endswith("cats dogs")


def test_holdout_dialogues_splits_whole_dialogues(corpus):
    pairs, _ = corpus
    train, heldout = holdout_dialogues(pairs, 0.25, seed=0)
    assert len(train) + len(heldout) == len(pairs) and len(heldout) > 0
    assert not set(train["dialogue_id"]) & set(heldout["dialogue_id"])


# --- model -----------------------------------------------------------------------------------------------------


def test_presets_and_t5_base_shape():
    config = t5_config("t5-base", 32128)
    assert (config.d_model, config.num_layers, config.num_decoder_layers, config.d_ff, config.num_heads) == (
        768, 12, 12, 3072, 12)
    assert config.decoder_start_token_id == config.pad_token_id == 0 and config.tie_word_embeddings
    with torch.device("meta"):  # no memory: count the parameters of the real shape
        model = AutoModelForSeq2SeqLM.from_config(config)
    assert 222e6 < count_parameters(model) < 224e6  # §4.1.2: "222 M parameters"
    assert t5_config("cpu", 100, dropout_rate=0.0).dropout_rate == 0.0
    with pytest.raises(ValueError, match="preset"):
        t5_config("huge", 100)


def test_build_model_resizes_only_when_tokenizer_is_larger(tokenizer, tmp_path):
    small = build_model(t5_config("test", len(tokenizer) - 5), tokenizer)
    assert small.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert small.lm_head.weight.data_ptr() == small.shared.weight.data_ptr()  # still tied
    roomy = build_model(t5_config("test", len(tokenizer) + 28), tokenizer)
    roomy.save_pretrained(tmp_path / "roomy")
    reloaded = build_model(tmp_path / "roomy", tokenizer)
    assert reloaded.get_input_embeddings().weight.shape[0] == len(tokenizer) + 28  # spare rows kept
    assert torch.equal(reloaded.shared.weight, roomy.shared.weight)
    assert torch.equal(tiny_model(tokenizer, seed=1).shared.weight, tiny_model(tokenizer, seed=1).shared.weight)


# --- training and resume ---------------------------------------------------------------------------------------


def dialogue_data(tokenizer, corpus):
    pairs, users = corpus
    train, heldout = holdout_dialogues(pairs, 0.2, seed=0)

    def examples(frame):
        sources = build_prompts(frame, users, "psp").tolist()
        return tokenize_pairs(sources, frame["response"].tolist(), tokenizer, 48, 16)

    return examples(train), examples(heldout)


RESUME_CONFIG = PretrainConfig(max_steps=4, per_device_batch_size=4, learning_rate=1e-3, warmup_ratio=0.25,
                               eval_steps=2, save_steps=2, save_total_limit=None, logging_steps=1, seed=7,
                               use_cpu=True)  # CUDA kernels need not be bitwise deterministic


def run(tokenizer, data, collator, output_dir, init_seed: int = 0):
    train, heldout = data
    return pretrain(tiny_model(tokenizer, seed=init_seed), tokenizer, train, heldout, collator, output_dir,
                    RESUME_CONFIG)


def test_pretrain_resumes_to_the_same_weights(tokenizer, corpus, tmp_path):
    """Uninterrupted 4 steps == 2 steps, kill, resume from checkpoint-2 to step 4 (dropout on, CPU, fixed seeds)."""
    data = dialogue_data(tokenizer, corpus)
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=LABEL_PAD_ID)
    straight = run(tokenizer, data, collator, tmp_path / "straight")
    assert straight["steps"] == 4 and straight["resumed_from_step"] is None
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]

    run(tokenizer, data, collator, tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "model")  # as if killed after saving checkpoint-2
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "checkpoint-4")
    # Other initial weights: equal final weights then prove that checkpoint-2 was loaded, not retrained.
    resumed = run(tokenizer, data, collator, tmp_path / "killed", init_seed=1)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4

    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    history = load_log_history(tmp_path / "killed")
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]  # the log survives the resume
    assert [e["step"] for e in history if "eval_loss" in e] == [2, 4]
    assert math.isclose(resumed["eval_loss"], straight["eval_loss"], rel_tol=1e-6)

    # Killed after the last checkpoint but before the model was saved: no extra step, same weights.
    shutil.rmtree(tmp_path / "straight" / "model")
    again = run(tokenizer, data, collator, tmp_path / "straight", init_seed=1)
    assert again["steps"] == 4 and again["resumed_from_step"] == 4 and math.isnan(again["train_loss"])
    c = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    assert all(torch.equal(a[name], c[name]) for name in a)


def test_span_corruption_training_resumes_identically(tokenizer, tmp_path):
    raw, _ = span_corruption_lengths(32)
    packed = pack_texts_for_span_corruption(sentences(200, seed=1), tokenizer, raw)
    collator = SpanCorruptionCollator(tokenizer, input_length=32, seed=0)
    data = (packed, None)
    run(tokenizer, data, collator, tmp_path / "straight")
    run(tokenizer, data, collator, tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "model")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "checkpoint-4")
    resumed = run(tokenizer, data, collator, tmp_path / "killed", init_seed=1)
    assert resumed["resumed_from_step"] == 2 and resumed["eval_loss"] is None
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_saved_model_reloads_with_auto_classes_and_generates(tokenizer, corpus, tmp_path):
    data = dialogue_data(tokenizer, corpus)
    config = PretrainConfig(max_steps=2, per_device_batch_size=4, eval_steps=1, save_steps=1, save_total_limit=1,
                            logging_steps=1)
    summary = pretrain(tiny_model(tokenizer), tokenizer, *data, DataCollatorForSeq2Seq(tokenizer), tmp_path / "run",
                       config)
    assert summary["steps"] == 2 and summary["examples_per_second"] > 0 and summary["eval_loss"] > 0
    assert summary["n_parameters"] == count_parameters(tiny_model(tokenizer))
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 1  # save_total_limit
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no staging left
    model_dir = tmp_path / "run" / "model"
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(reloaded_tokenizer) == len(tokenizer)
    inputs = reloaded_tokenizer(["[USER] 20s [SEP] hello how are you"], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[0] == 1 and 1 < output.shape[1] <= 6 and output[0, 0] == model.config.decoder_start_token_id
    assert (tmp_path / "run" / LOG_HISTORY_FILE).is_file()


def test_plot_loss_curves_one_panel_per_model():
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7}]
    figure = plot_loss_curves({"Plain T5": history, "PSP Dialogue": history})
    assert isinstance(figure, Figure) and len(figure.axes) == 2
    assert [a.get_title() for a in figure.axes] == ["Plain T5", "PSP Dialogue"]


# --- profile conditioning checks -------------------------------------------------------------------------------


def test_uniform_model_has_perplexity_vocab_size(tokenizer):
    model = tiny_model(tokenizer)
    with torch.no_grad():
        model.shared.weight.zero_()  # tied: lm_head is zero too, so every logit is 0
    assert torch.equal(model.lm_head.weight, torch.zeros_like(model.lm_head.weight))
    perplexity = reply_perplexity(model, tokenizer, ["hello how are you", "i like movies"],
                                  ["fine", "me too the weather is nice"], Decoding(batch_size=1))
    assert math.isclose(perplexity, model.config.vocab_size, rel_tol=1e-5)


def test_perplexity_matches_model_loss(tokenizer):
    model = tiny_model(tokenizer)
    model.eval()
    sources, targets = ["hello how are you"], ["fine thanks"]
    batch = tokenizer(sources, return_tensors="pt")
    labels = tokenizer(targets, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = math.exp(model(**batch, labels=labels).loss.item())
    assert math.isclose(reply_perplexity(model, tokenizer, sources, targets), expected, rel_tol=1e-5)


def test_greedy_replies_keep_input_order(tokenizer):
    model = tiny_model(tokenizer)
    sources = ["hello", "i like movies on weekends and cats", "hi"]
    replies = greedy_replies(model, tokenizer, sources, Decoding(max_new_tokens=4, batch_size=2))
    assert len(replies) == 3
    assert replies == [greedy_replies(model, tokenizer, [s], Decoding(max_new_tokens=4))[0] for s in sources]
    assert greedy_replies(model, tokenizer, [], Decoding(max_new_tokens=4)) == []


@pytest.mark.parametrize("fmt", ["psp", "ppp"])
def test_profile_swap_change_rate_is_a_fraction(tokenizer, corpus, fmt):
    pairs, users = corpus
    model = tiny_model(tokenizer)
    rate = profile_swap_change_rate(model, tokenizer, pairs.head(8), users, fmt, seed=0,
                                    decoding=Decoding(max_new_tokens=4))
    assert 0.0 <= rate <= 1.0
    table = profile_swap_table(model, tokenizer, pairs.head(8), users, fmt, seed=0, decoding=Decoding(max_new_tokens=4))
    assert len(table) == 8 and (table["speaker_id"] != table["swap_user_id"]).all()
    assert (table["source"] != table["swapped_source"]).all()
    if fmt == "ppp":  # only the speaker's profile is swapped; the partner's stays
        assert (table["source"].str.split("[USER2]", regex=False).str[1]
                == table["swapped_source"].str.split("[USER2]", regex=False).str[1]).all()


def test_profile_swap_without_differing_profiles_is_nan(tokenizer, corpus):
    pairs, users = corpus
    unknown = users.assign(**{f: "unknown" for f in PROFILE_FIELDS})
    assert math.isnan(profile_swap_change_rate(tiny_model(tokenizer), tokenizer, pairs.head(4), unknown, "psp"))
    with pytest.raises(ValueError, match="profile prompt"):
        profile_swap_table(tiny_model(tokenizer), tokenizer, pairs, users, "plain")


def test_profile_perplexity_gap(tokenizer, corpus):
    pairs, users = corpus
    shuffled = shuffle_profiles(users, seed=0)
    assert sorted(map(tuple, shuffled[list(PROFILE_FIELDS)].to_numpy())) == sorted(
        map(tuple, users[list(PROFILE_FIELDS)].to_numpy()))
    assert (shuffled["user_id"] == users["user_id"]).all()
    result = profile_perplexity_gap(tiny_model(tokenizer), tokenizer, pairs.head(20), users, "ppp", seed=0)
    assert result["n_offered"] == 20  # only the pairs whose speaker profile the shuffle changes are scored
    assert result["n_pairs"] == len(profile_changing_pairs(pairs.head(20), users, seed=0))
    assert result["alternative"] == "greater" and isinstance(result["reads_profiles"], bool)
    assert result["perplexity_true_profiles"] > 1 and result["perplexity_shuffled_profiles"] > 1
    assert math.isclose(result["gap"], result["perplexity_shuffled_profiles"] - result["perplexity_true_profiles"])



def test_conditioning_checks_run_on_the_device_they_are_given(tokenizer, corpus, monkeypatch):
    """Stage 02 passes its device (cuda on a GPU node) and precision; the model is moved there, and the results
    on the model's own device are those of a call without them (CPU here: the tests need no GPU)."""
    pairs, users = corpus
    model = tiny_model(tokenizer)
    table = profile_swap_table(model, tokenizer, pairs.head(6), users, "psp", seed=0,
                               decoding=Decoding(max_new_tokens=4))
    gap = profile_perplexity_gap(model, tokenizer, pairs.head(12), users, "psp", seed=0)
    moved, to = [], model.to
    monkeypatch.setattr(model, "to", lambda *args, **kwargs: moved.append(args) or to(*args, **kwargs))
    on_device = profile_swap_table(model, tokenizer, pairs.head(6), users, "psp", seed=0,
                                   decoding=Decoding(max_new_tokens=4, precision="fp32"), device="cpu")
    assert on_device.equals(table)
    assert profile_perplexity_gap(model, tokenizer, pairs.head(12), users, "psp", seed=0,
                                  decoding=Decoding(precision="fp32"),
                                  device="cpu") == pytest.approx(gap, nan_ok=True)
    assert moved == [("cpu",)] * 3  # the swaps once, the true and the shuffled profiles' scores once each
    # held in bf16 as stage 02 holds it where bf16 is native (`Precision.for_inference`): NLLs still in fp32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 emulated on a CPU without AVX512-BF16: slow, not wrong
        numerics = resolve_precision("bf16", "cpu")
    half = numerics.for_inference(tiny_model(tokenizer))
    result = profile_perplexity_gap(half, tokenizer, pairs.head(12), users, "psp", seed=0,
                                    decoding=Decoding(precision=numerics), device="cpu")
    assert result["perplexity_true_profiles"] == pytest.approx(gap["perplexity_true_profiles"], rel=0.05)
    assert len(profile_swap_table(half, tokenizer, pairs.head(6), users, "psp", seed=0,
                                  decoding=Decoding(max_new_tokens=4, precision=numerics), device="cpu")) == 6

def test_profile_changing_pairs_keeps_speakers_whose_shuffled_profile_differs():
    users = pd.DataFrame({"user_id": list("abcde"), **{f: ["unknown"] * 5 for f in PROFILE_FIELDS}})
    users["gender"] = ["female", "female", "male", "unknown", "female"]  # a, b and e share a profile
    pairs = pd.DataFrame({"pair_id": range(10), "speaker_id": list("abcdeabcde"), "partner_id": ["x"] * 10,
                          "response": ["r"] * 10})
    for seed in range(6):
        shuffled = shuffle_profiles(users, seed).set_index("user_id")["gender"]
        kept = profile_changing_pairs(pairs, users, seed)
        changed = {u for u in "abcde" if shuffled[u] != users.set_index("user_id").at[u, "gender"]}
        assert set(kept["speaker_id"]) == changed and len(kept) == 2 * len(changed)
        assert "d" not in changed  # an unknown profile is never shuffled
    # some seed swaps two of the identical female profiles among themselves: those pairs are left out
    assert any(len(profile_changing_pairs(pairs, users, seed)) < 8 for seed in range(6))


def test_known_profile_share_counts_prompts_that_show_a_known_field():
    users = pd.DataFrame({"user_id": list("abc"), **{f: ["unknown"] * 3 for f in PROFILE_FIELDS}})
    users.loc[0, "region"] = "Utah"
    pairs = pd.DataFrame({"speaker_id": ["a", "a", "b", "c", "zz"], "partner_id": ["b", "b", "a", "b", "a"]})
    assert known_profile_share(pairs, users, "psp") == pytest.approx(2 / 5)  # a twice; zz has no profile at all
    assert known_profile_share(pairs, users, "ppp") == pytest.approx(4 / 5)  # ... or a as the partner
    assert math.isnan(known_profile_share(pairs.head(0), users))
    # test prompts: each split set's pairs with that set's users table; other splits are not counted
    eval_pairs = pairs.assign(split=["test", "test", "train_ft", "test", "dev"], split_set=[0, 1, 0, 1, 0])
    later = users.assign(region=["unknown", "unknown", "Ohio"])  # set 1's table: a known only from c's turns
    assert evaluation_prompt_profile_share(eval_pairs, {0: users, 1: later}) == pytest.approx(2 / 3)  # a@0 and c@1
    assert math.isnan(evaluation_prompt_profile_share(eval_pairs[eval_pairs["split"] == "dev"], {0: users}))
    with pytest.raises(ValueError, match="profile prompts"):
        known_profile_share(pairs, users, "plain")


def test_profile_reading_test_is_one_sided():
    rng = np.random.default_rng(0)
    better = rng.normal(0.05, 0.05, size=60)  # shuffled profiles score the replies worse: the model reads them
    result = profile_reading_test(better)
    assert result["reads_profiles"] and result["p_value"] < 0.001 and result["nll_diff_ci_low"] > 0
    assert result["n_pairs"] == 60 and result["nll_diff_mean"] == pytest.approx(better.mean())
    worse = profile_reading_test(-better)  # shuffled profiles score better: a two-sided test would call it
    assert not worse["reads_profiles"] and worse["p_value"] > 0.99 and worse["nll_diff_ci_high"] < 0
    noise = profile_reading_test(rng.normal(0.0, 0.05, size=60))
    assert not noise["reads_profiles"] and noise["nll_diff_ci_low"] < 0
    # most replies a little better, one far worse: the signed-rank p is small but the mean's CI reaches below
    # zero, and reads_profiles needs both
    outlier = profile_reading_test([0.01 + 0.001 * i for i in range(20)] + [-5.0])
    assert outlier["p_value"] < 0.05 and outlier["nll_diff_ci_low"] < 0 and not outlier["reads_profiles"]
    for degenerate in ([0.0] * 10, [0.3]):
        result = profile_reading_test(degenerate)
        assert not result["reads_profiles"] and math.isnan(result["p_value"])


def test_shuffle_profiles_moves_known_profiles_only():
    users = pd.DataFrame({"user_id": list("abcd"), **{f: ["unknown"] * 4 for f in PROFILE_FIELDS}})
    users.loc[[0, 2], "gender"] = ["female", "male"]
    users.loc[[0, 2], "age_band"] = ["20s", "60s+"]
    shuffled = shuffle_profiles(users, seed=3)
    assert (shuffled.loc[[1, 3], list(PROFILE_FIELDS)] == "unknown").all().all()  # all-unknown users stay put
    assert sorted(shuffled.loc[[0, 2], "gender"]) == ["female", "male"]


def test_bf16_pretraining_runs_on_a_cpu(tokenizer, corpus, tmp_path):
    """precision "bf16" reaches the Trainer's bf16 mixed precision on a CPU too (the Trainer accepts it only
    with use_cpu, which a machine without a GPU now always passes); weights are saved in fp32."""
    data = dialogue_data(tokenizer, corpus)
    config = PretrainConfig(max_steps=2, per_device_batch_size=4, eval_steps=1, save_steps=2, logging_steps=1,
                            precision="bf16")
    with pytest.warns(UserWarning, match="emulated") if not native_bf16("cpu") else contextlib.nullcontext():
        summary = pretrain(tiny_model(tokenizer), tokenizer, *data, DataCollatorForSeq2Seq(tokenizer),
                           tmp_path / "run", config)
    assert summary["steps"] == 2 and math.isfinite(summary["eval_loss"])
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())
