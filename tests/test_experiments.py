"""Unit tests for udg_lib.experiments' LoRA evaluation: routed users give what peft's mixed batches give."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from peft import get_peft_model

from conftest import assert_close_to_scale, sentences
from udg_lib import experiments as ex
from udg_lib import finetuning as ft
from udg_lib.data.schema import PROFILE_FIELDS
from udg_lib.multilora import RoutedAdapters
from udg_lib.pretraining import build_model, t5_config

USERS = ("alice", "bob/2", "carol")  # "bob/2": a user id that is no valid module name


@pytest.fixture(scope="module")
def condition(tokenizer, tmp_path_factory):
    """A condition folder as stage 03 leaves it: da/model and one PEFT adapter per user (random, non-zero)."""
    folder = tmp_path_factory.mktemp("condition")
    base = build_model(t5_config("test", len(tokenizer)), tokenizer, seed=0)
    base.save_pretrained(folder / "da" / ex.MODEL_DIR)
    tokenizer.save_pretrained(folder / "da" / ex.MODEL_DIR)
    peft_model = get_peft_model(base, ft.lora_config(ft.FinetuneConfig(lora_dropout=0.0)))
    for k, user in enumerate(USERS):
        torch.manual_seed(200 + k)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.5)
        peft_model.save_pretrained(str(ft.user_dir(folder / "lora", user) / ft.ADAPTER_DIR))
    return folder


def test_routed_lora_evaluation_equals_peft_mixed_batches(tokenizer, condition):
    users = pd.DataFrame({"user_id": list(USERS), **{f: "unknown" for f in PROFILE_FIELDS}})
    texts = iter(sentences(40, seed=21))
    pairs = pd.DataFrame([{"pair_id": f"p{u}{i}", "speaker_id": user, "partner_id": USERS[(u + 1) % 3],
                           "context": [next(texts)], "response": next(texts), "split": "test"}
                          for u, user in enumerate(USERS) for i in range(4)])
    questions = pd.DataFrame({"question_id": ["q01", "q02"], "question": ["what is your hobby", "do you like cats"]})
    settings = {"max_new_tokens": 10, "batch_size": 5}
    exp1 = {mode: ex.exp1_predictions(condition, tokenizer, pairs, users, USERS, "ppp", settings, methods=("lora",),
                                      lora_eval=mode) for mode in ex.LORA_EVAL_MODES}
    exp2 = {mode: ex.exp2_replies(condition, tokenizer, questions, users, USERS, "ppp", settings, methods=("lora",),
                                  lora_eval=mode) for mode in ex.LORA_EVAL_MODES}
    routed, peft = exp1["routed"], exp1["peft"]
    assert routed["generated"].tolist() == peft["generated"].tolist()
    # routed and peft add the LoRA term by different matmuls: float32 rounding of sums over the hidden size
    assert_close_to_scale(routed["nll"], peft["nll"], dtype=torch.float32,
                          reduction_size=t5_config("test", len(tokenizer)).d_model)
    pd.testing.assert_frame_equal(exp2["routed"], exp2["peft"])
    assert len(routed) == 12 and len(exp2["routed"]) == 6 
    assert routed.groupby("speaker_id")["generated"].first().nunique() == len(USERS)  # each its own adapter
    model, names = ex.load_condition_lora(condition, tokenizer, USERS, "cpu")
    assert isinstance(model, RoutedAdapters) and names == ex.adapter_names_for(USERS)
    with pytest.raises(ValueError, match="lora_eval must be one of"):
        ex.load_condition_lora(condition, tokenizer, USERS, "cpu", lora_eval="merged")


def test_lora_learning_rate_sweep_reads_dev_loss_only_and_leaves_nothing(tokenizer, condition):
    texts = iter(sentences(120, seed=5))
    users = pd.DataFrame({"user_id": list(USERS), **{f: "unknown" for f in PROFILE_FIELDS}})
    rows = [{"pair_id": f"p{u}{split}{i}", "speaker_id": user, "partner_id": USERS[(u + 1) % 3],
             "context": [next(texts)], "response": next(texts), "split": split, "split_set": 0}
            for u, user in enumerate(USERS) for split, n in (("train_ft", 6), ("dev", 3), ("test", 3))
            for i in range(n)]
    pairs = pd.DataFrame(rows)
    config = ft.FinetuneConfig(batch_size=4, max_epochs=2, max_source_length=32, max_target_length=16)
    before = sorted(p.name for p in condition.iterdir())
    best, table = ex.sweep_lora_learning_rate(condition, tokenizer, pairs, users, USERS, "psp", config,
                                              [1e-6, 1e-2])
    assert sorted(p.name for p in condition.iterdir()) == before  # the sweep's adapters are gone
    assert len(table) == 6 and set(table["learning_rate"]) == {1e-6, 1e-2}
    means = table.groupby("learning_rate")["best_dev_loss"].mean()
    assert best == means.idxmin() and best == 1e-2  # 1e-6 barely moves an adapter in 2 epochs
    # the test replies choose nothing: changing them leaves the sweep's table unchanged
    changed = pairs.assign(response=lambda f: f["response"].where(f["split"] != "test", "completely different"))
    _, again = ex.sweep_lora_learning_rate(condition, tokenizer, changed, users, USERS, "psp", config, [1e-6, 1e-2])
    pd.testing.assert_frame_equal(table, again)
    with pytest.raises(ValueError, match="no learning rates"):
        ex.sweep_lora_learning_rate(condition, tokenizer, pairs, users, USERS, "psp", config, [])


def test_choose_lora_learning_rate_adapts_the_domain_then_sweeps_the_first_users(tokenizer, tmp_path):
    texts = iter(sentences(120, seed=6))
    users = pd.DataFrame({"user_id": list(USERS), **{f: "unknown" for f in PROFILE_FIELDS}})
    rows = [{"pair_id": f"p{u}{split}{i}", "speaker_id": user, "partner_id": USERS[(u + 1) % 3],
             "context": [next(texts)], "response": next(texts), "split": split, "split_set": 0}
            for u, user in enumerate(USERS) for split, n in (("train_da", 4), ("train_ft", 6), ("dev", 3),
                                                              ("test", 3)) for i in range(n)]
    pretrained = tmp_path / "pretrained"
    build_model(t5_config("test", len(tokenizer)), tokenizer, seed=0).save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    config = ft.FinetuneConfig(batch_size=4, max_epochs=2, max_source_length=32, max_target_length=16)
    da_config = ex.finetune_config(config, max_epochs=1)
    chosen, table = ex.choose_lora_learning_rate(pretrained, tokenizer, pd.DataFrame(rows), users, USERS, "psp",
                                                 tmp_path / "condition", config, da_config, [1e-6, 1e-2],
                                                 sweep_users=2)
    assert (tmp_path / "condition" / "da" / ft.DONE_FILE).is_file()  # DA kept for the condition's methods
    assert sorted(p.name for p in (tmp_path / "condition").iterdir()) == ["da"]
    assert set(table["user_id"]) == set(sorted(USERS)[:2]) and len(table) == 4
    assert chosen.learning_rate == 1e-2 and chosen.batch_size == config.batch_size
    summary = ex.sweep_summary(table)
    assert summary["learning_rate"].tolist() == [1e-6, 1e-2] and len(summary.columns) == 5
