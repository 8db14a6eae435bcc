"""The study report and the small presentation helpers of udg_lib.experiments, on hand-made result files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from udg_lib import experiments as ex
from udg_lib import report


def significance_row(dataset, a, b, diff, p, metric="similarity"):
    return {"dataset": dataset, "label_a": a, "label_b": b, "metric": metric, "method": "wilcoxon", "n": 20,
            "mean_a": 0.5, "mean_b": 0.5 - diff, "mean_diff": diff, "statistic": 1.0, "p_value": p}


def test_claims_verdicts_follow_sign_and_p():
    exp1 = pd.DataFrame([
        significance_row("chitchat", "psp/lora", "plain_dialogue/lora", 0.02, 0.01),
        significance_row("chitchat", "ppp/full", "plain_dialogue/full", 0.01, 0.30),  # not significant
        significance_row("chitchat", "psp/full", "psp/lora", 0.001, 0.60),  # C4 holds
        significance_row("chitchat", "ppp/full", "ppp/lora", 0.03, 0.001),  # C4 fails
    ])
    exp2 = pd.DataFrame([significance_row("chitchat", "psp/one_id", "psp/lora", -0.2, 0.001, "dist_s"),
                         significance_row("chitchat", "psp/one_id", "psp/full", -0.1, 0.01, "dist_s")])
    llm = pd.DataFrame([significance_row("chitchat", "psp/lora", "llm/smollm2-chat", 0.1, 0.001),
                        significance_row("chitchat", "psp/one_id", "llm/smollm2-chat", -0.1, 0.001)])  # not C1's
    low = pd.DataFrame({"dataset": ["chitchat"] * 3, "system": ["a", "b", "c"], "pretrain": ["llm", "psp", "psp"],
                        "method": ["smollm2-chat", "lora", "full"], "share_below_0.2": [0.4, 0.1, 0.2], "n": 10})
    claims = report.judge_claims(exp1, exp2, llm, low).set_index("claim")
    assert claims.loc["C1", "verdict"] == "supported" and claims.loc["C1", "tests_holding"] == "1/1"
    assert claims.loc["C2", "verdict"] == "partly supported" and claims.loc["C2", "tests_holding"] == "1/2"
    assert claims.loc["C3", "verdict"] == "supported"
    assert claims.loc["C4", "verdict"] == "partly supported"
    assert claims.loc["C5", "verdict"] == "supported" and "40%" in claims.loc["C5", "evidence"]
    low.loc[1, "share_below_0.2"] = 0.5  # a fine-tuned system with more low similarities than the LLM
    assert report.judge_claims(exp1, exp2, llm, low).set_index("claim").loc["C5", "verdict"] == "not supported"
    missing = report.judge_claims(None, None, None, None)
    assert set(missing["verdict"]) == {"not tested"} and len(missing) == 5


def test_low_similarity_shares():
    scores = pd.DataFrame({"dataset": "d", "system": ["s"] * 4, "pretrain": "llm", "method": "m",
                           "similarity": [0.1, 0.19, 0.2, 0.9]})
    shares = report.low_similarity_shares(scores)
    assert shares["share_below_0.2"].tolist() == [0.5] and shares["n"].tolist() == [4]


def test_exp1_table_orders_rows_like_the_paper_and_notes_read_well():
    per_user = pd.DataFrame([
        {"dataset": "d", "split_set": 0, "user_id": u, "pretrain": p, "method": m, "similarity": s,
         "acc_at_sim": 0.0, "rouge_l": 10.0, "perplexity": 50.0}
        for u in ("a", "b") for p, m, s in (("none", "retrieval", 0.2), ("psp", "lora", 0.4), ("psp", "da", 0.3),
                                            ("plain_t5", "one_id", 0.35), ("llm", "smollm2-chat", 0.1))])
    table = ex.exp1_table(per_user)
    assert list(zip(table["model"], table["fine-tuning"])) == [
        ("Plain T5", "One-ID"), ("PSP", "DA (no user)"), ("PSP", "LoRA"), ("Floor", "Retrieval (own turns)"),
        ("Prompt LLM", "smollm2-chat")]
    assert table["n_users"].tolist() == [2] * 5
    notes = ex.significance_notes(pd.DataFrame([significance_row("d", "psp/lora", "plain_dialogue/lora", 0.02, 0.01)]))
    assert notes == ["- PSP / LoRA vs Plain Dialogue / LoRA (similarity): diff +0.0200, p = 0.01 * (wilcoxon, n = 20)"]


def test_sample_test_contexts_is_seeded_per_user():
    pairs = pd.DataFrame({"split": ["test"] * 8 + ["dev"], "speaker_id": list("aaaabbbbb"),
                          "pair_id": [f"p{i}" for i in range(9)]})
    first = ex.sample_test_contexts(pairs, ["a", "b"], 2, seed=1)
    assert first.groupby("speaker_id").size().tolist() == [2, 2] and "p8" not in set(first["pair_id"])
    assert first.equals(ex.sample_test_contexts(pairs, ["a", "b"], 2, seed=1))
    assert len(ex.sample_test_contexts(pairs, ["a"], 0)) == 4


def test_report_assembles_what_exists(tmp_path):
    root = tmp_path / "outputs"
    for stage, seconds, rss in (("00_prepare_corpus", 60, 1024), ("04_exp1_next_utterance", 120, 2048)):
        (root / stage).mkdir(parents=True)
        (root / stage / "metrics.json").write_text(json.dumps({
            "metrics": {}, "provenance": {"peak_rss_mb": rss, "device": {"torch_device": "cpu"}},
            "stage": {"wall_seconds": seconds, "finished_at": "2026-11-25T00:00:00+00:00"}}))
    (root / "00_prepare_corpus" / "table2.md").write_text("| dataset |\n|--|\n| chitchat |")
    (root / "04_exp1_next_utterance" / "table3_chitchat.md").write_text("### Table 3 analog: chitchat\n\n| x |")
    pd.DataFrame({"model": ["PSP"], "fine-tuning": ["LoRA"], "similarity": [0.41], "acc_at_sim": [0.0],
                  "rouge_l": [9.0], "perplexity": [np.nan], "n_users": [3]}).to_csv(
        root / "04_exp1_next_utterance" / "table3_chitchat.csv", index=False)
    path = report.write_report(root, "cpu")
    text = path.read_text()
    assert path == root / "report.md"
    assert "**3.0 min** of wall time" in text and "peak resident memory **2.00 GB**" in text
    assert "| chitchat |" in text and "Table 3 analog: chitchat" in text
    assert "0.41" in text  # our PSP / LoRA similarity beside the paper's 0.532
    assert "**C1**" in text and "not tested" in text
    assert report.main(["--profile", "cpu", "--outputs-root", str(root)]) == 0
    assert report.main(["--profile", "cpu", "--outputs-root", str(tmp_path / "none")]) == 1


@pytest.mark.parametrize("name, short, shown", [("smollm2", "smollm2", "SmolLM2-135M-Instruct"),
                                                ("Qwen/Qwen2.5-1.5B-Instruct", "qwen2.5-1.5b-instruct",
                                                 "Qwen2.5-1.5B-Instruct")])
def test_llm_names(name, short, shown):
    assert ex.llm_short_name(name) == short and ex.llm_display_name(name) == shown
