"""Unit tests for udg_lib.experiments and the methods it runs: routed LoRA users give what peft's mixed batches
give, the learning-rate sweep reads dev loss only, every test pair is scored and replies go to a seeded subset."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from peft import get_peft_model

from conftest import assert_close_to_scale, sentences
from udg_lib import conditions as cd
from udg_lib import experiments as ex
from udg_lib import finetuning as ft
from udg_lib import methods as mth
from udg_lib.conditions import Cell
from udg_lib.families import Decoding
from udg_lib.data.schema import PROFILE_FIELDS
from udg_lib.routing import RoutedAdapters
from udg_lib.families import t5_config
from udg_lib.pretraining import build_model

USERS = ("alice", "bob/2", "carol")  # "bob/2": a user id that is no valid module name


def users_table() -> pd.DataFrame:
    return pd.DataFrame({"user_id": list(USERS), **{f: "unknown" for f in PROFILE_FIELDS}})


def cell_of(pairs: pd.DataFrame, folder, pretrained: str = "ppp") -> Cell:
    """The cell stage 03 would train in `folder`, dataset "d", split set 0."""
    return Cell(pairs, users_table(), USERS, pretrained, "d", 0, folder)


@pytest.fixture(scope="module")
def condition(tokenizer, tmp_path_factory):
    """A condition folder as stage 03 leaves it: da/model and one PEFT adapter per user (random, non-zero)."""
    folder = tmp_path_factory.mktemp("condition")
    base = build_model(t5_config("test", len(tokenizer)), tokenizer, seed=0)
    base.save_pretrained(folder / "da" / mth.MODEL_DIR)
    tokenizer.save_pretrained(folder / "da" / mth.MODEL_DIR)
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
    texts = iter(sentences(40, seed=21))
    pairs = pd.DataFrame([{"pair_id": f"p{u}{i}", "speaker_id": user, "partner_id": USERS[(u + 1) % 3],
                           "context": [next(texts)], "response": next(texts), "split": "test"}
                          for u, user in enumerate(USERS) for i in range(4)])
    cell = cell_of(pairs, condition)
    questions = pd.DataFrame({"question_id": ["q01", "q02"], "question": ["what is your hobby", "do you like cats"]})
    decoding = Decoding(max_new_tokens=10, batch_size=5)
    evaluations = {mode: mth.Evaluation(tokenizer, decoding, lora_eval=mode) for mode in mth.LORA_EVAL_MODES}
    exp1 = {mode: ex.exp1_predictions(cell, evaluation, [mth.LORA]) for mode, evaluation in evaluations.items()}
    exp2 = {mode: ex.exp2_replies(cell, evaluation, questions, [mth.LORA]) for mode, evaluation in evaluations.items()}
    routed, peft = exp1["routed"], exp1["peft"]
    assert routed["generated"].tolist() == peft["generated"].tolist()
    # routed and peft add the LoRA term by different matmuls: float32 rounding of sums over the hidden size
    assert_close_to_scale(routed["nll"], peft["nll"], dtype=torch.float32,
                          reduction_size=t5_config("test", len(tokenizer)).d_model)
    pd.testing.assert_frame_equal(exp2["routed"], exp2["peft"])
    assert len(routed) == 12 and len(exp2["routed"]) == 6 
    assert routed.groupby("speaker_id")["generated"].first().nunique() == len(USERS)  # each its own adapter
    model, names = mth.LORA.load_all(cell, mth.Evaluation(tokenizer))
    assert isinstance(model, RoutedAdapters) and names == mth.adapter_names_for(USERS)
    with pytest.raises(ValueError, match="lora_eval must be one of"):
        mth.LORA.load_all(cell, mth.Evaluation(tokenizer, lora_eval="merged"))


def test_lora_learning_rate_sweep_reads_dev_loss_only_and_leaves_nothing(tokenizer, condition):
    texts = iter(sentences(120, seed=5))
    rows = [{"pair_id": f"p{u}{split}{i}", "speaker_id": user, "partner_id": USERS[(u + 1) % 3],
             "context": [next(texts)], "response": next(texts), "split": split, "split_set": 0}
            for u, user in enumerate(USERS) for split, n in (("train_ft", 6), ("dev", 3), ("test", 3))
            for i in range(n)]
    pairs = pd.DataFrame(rows)
    config = ft.FinetuneConfig(batch_size=4, max_epochs=2, max_source_length=32, max_target_length=16)
    job = mth.TrainingJob(tokenizer, condition, config, config)
    before = sorted(p.name for p in condition.iterdir())
    best, table = ex.sweep_learning_rate(mth.LORA, cell_of(pairs, condition, "psp"), job, [1e-6, 1e-2])
    assert sorted(p.name for p in condition.iterdir()) == before  # the sweep's adapters are gone
    assert len(table) == 6 and set(table["learning_rate"]) == {1e-6, 1e-2}
    means = table.groupby("learning_rate")["best_dev_loss"].mean()
    assert best == means.idxmin() and best == 1e-2  # 1e-6 barely moves an adapter in 2 epochs
    # the test replies choose nothing: changing them leaves the sweep's table unchanged
    changed = pairs.assign(response=lambda f: f["response"].where(f["split"] != "test", "completely different"))
    _, again = ex.sweep_learning_rate(mth.LORA, cell_of(changed, condition, "psp"), job, [1e-6, 1e-2])
    pd.testing.assert_frame_equal(table, again)
    with pytest.raises(ValueError, match="no learning rates"):
        ex.sweep_learning_rate(mth.LORA, cell_of(pairs, condition, "psp"), job, [])


def test_choose_learning_rate_adapts_the_domain_then_sweeps_the_first_users(tokenizer, tmp_path):
    texts = iter(sentences(120, seed=6))
    rows = [{"pair_id": f"p{u}{split}{i}", "speaker_id": user, "partner_id": USERS[(u + 1) % 3],
             "context": [next(texts)], "response": next(texts), "split": split, "split_set": 0}
            for u, user in enumerate(USERS) for split, n in (("train_da", 4), ("train_ft", 6), ("dev", 3),
                                                              ("test", 3)) for i in range(n)]
    pretrained = tmp_path / "pretrained" / "psp" / mth.MODEL_DIR  # stage 02's folder of the PSP model
    build_model(t5_config("test", len(tokenizer)), tokenizer, seed=0).save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    config = ft.FinetuneConfig(batch_size=4, max_epochs=2, max_source_length=32, max_target_length=16)
    da_config = ex.finetune_config(config, max_epochs=1)
    job = mth.TrainingJob(tokenizer, tmp_path / "pretrained", config, da_config)
    job, table = ex.choose_learning_rate(mth.LORA, cell_of(pd.DataFrame(rows), tmp_path / "condition", "psp"), job,
                                         [1e-6, 1e-2], sweep_users=2)
    chosen = job.config_for(mth.LORA)
    assert (tmp_path / "condition" / "da" / ft.DONE_FILE).is_file()  # DA kept for the condition's methods
    assert sorted(p.name for p in (tmp_path / "condition").iterdir()) == ["da"]
    assert set(table["user_id"]) == set(sorted(USERS)[:2]) and len(table) == 4
    assert chosen.learning_rate == 1e-2 and chosen.batch_size == config.batch_size
    assert job.config_for(mth.FULL) == config  # only the swept method's config changes
    summary = ex.sweep_summary(table)
    assert summary["learning_rate"].tolist() == [1e-6, 1e-2] and len(summary.columns) == 6
    assert summary["users_lowest"].sum() == 2  # each swept user's lowest dev loss counted once


def test_choose_learning_rate_sweeps_the_first_users_by_id_whatever_the_cells_order(tokenizer, tmp_path,
                                                                                    monkeypatch):
    swept = []

    def sweep(method, cell, job, learning_rates):
        swept.append(cell.user_ids)
        return 1e-3, pd.DataFrame()

    monkeypatch.setattr(mth.DA, "train", lambda cell, job: None)  # the DA model is not what this test is about
    monkeypatch.setattr(ex, "sweep_learning_rate", sweep)
    config = ft.FinetuneConfig()
    cell = Cell(_test_pairs(), users_table(), ["carol", "alice", "bob/2"], "psp", "d", 0, tmp_path)
    job, _ = ex.choose_learning_rate(mth.LORA, cell, mth.TrainingJob(tokenizer, tmp_path, config, config), [1e-3],
                                     sweep_users=2)
    assert swept == [("alice", "bob/2")] and job.config_for(mth.LORA).learning_rate == 1e-3


def test_sweep_summary_counts_the_users_each_rate_wins():
    table = pd.DataFrame({"learning_rate": [1e-4, 1e-4, 1e-4, 1e-3, 1e-3, 1e-3], "user_id": list("abcabc"),
                          "initial_dev_loss": 3.0, "best_dev_loss": [2.9, 2.8, 2.5, 2.7, 2.9, 2.6],
                          "epochs_run": 2, "stopped_early": True})
    summary = ex.sweep_summary(table).set_index("learning_rate")
    assert summary.loc[1e-4, "users_lowest"] == 2 and summary.loc[1e-3, "users_lowest"] == 1
    assert summary.loc[1e-4, "best_dev_loss"] == pytest.approx(2.7333333)


# ---------------------------------------------------------------------------------------------------------------
# Every test pair scored, replies generated on a capped, seeded subset (issue #20 §1)


def test_generation_subset_is_a_capped_seeded_choice_that_ignores_order():
    ids = [f"p{i:02d}" for i in range(20)]
    chosen = cd.generation_subset(ids, 5, seed=0, key="chitchat/set0/alice")
    assert len(chosen) == 5 and set(chosen) <= set(ids) and chosen == sorted(chosen)
    assert cd.generation_subset(list(reversed(ids)) + ids[:3], 5, 0, "chitchat/set0/alice") == chosen  # order, repeats
    draws = {tuple(cd.generation_subset(ids, 5, seed, "chitchat/set0/alice")) for seed in range(6)}
    assert len(draws) > 1  # the seed matters
    assert cd.generation_subset(ids, 5, 0, "chitchat/set0/bob") != chosen  # so does the user (key)
    assert cd.generation_subset(ids, 0, 0, "k") == ids and cd.generation_subset(ids, 20, 0, "k") == ids
    assert cd.generation_subset(ids, 99, 3, "k") == ids and cd.generation_subset([], 2, 0, "k") == []
    # a pair added later does not reshuffle the rest: the new choice keeps all but at most one old pick
    assert len(set(cd.generation_subset([*ids, "p99"], 5, 0, "chitchat/set0/alice")) & set(chosen)) >= 4


def test_generated_pair_ids_caps_each_user_and_matches_generation_subset():
    pairs = pd.DataFrame([{"pair_id": f"{u}-{i}", "speaker_id": u, "split": split}
                          for u, n in (("alice", 6), ("bob", 2), ("carol", 5)) for i in range(n)
                          for split in ("test",)] + [{"pair_id": "alice-train", "speaker_id": "alice",
                                                       "split": "train_ft"}])
    chosen = cd.generated_pair_ids(pairs, ["alice", "bob"], 3, 7, "chitchat", 0)
    by_user = pd.Series(sorted(chosen)).str.split("-").str[0].value_counts().to_dict()
    assert by_user == {"alice": 3, "bob": 2}  # carol is not asked for; bob has only 2
    assert {p for p in chosen if p.startswith("alice")} == set(
        cd.generation_subset([f"alice-{i}" for i in range(6)], 3, 7, cd.subset_key("chitchat", 0, "alice")))
    assert cd.generated_pair_ids(pairs, ["alice"], 3, 7, "chitchat", 0) == {p for p in chosen if p.startswith("al")}
    assert cd.generated_pair_ids(pairs, ["alice", "bob"], 0, 7, "chitchat", 0) == {
        *(f"alice-{i}" for i in range(6)), "bob-0", "bob-1"}


def _test_pairs(n_per_user: int = 4, seed: int = 21) -> pd.DataFrame:
    texts = iter(sentences(n_per_user * len(USERS) * 2 + 8, seed=seed))
    return pd.DataFrame([{"pair_id": f"p{u}{i}", "speaker_id": user, "partner_id": USERS[(u + 1) % 3],
                          "context": [next(texts)], "response": next(texts), "split": "test"}
                         for u, user in enumerate(USERS) for i in range(n_per_user)])


def test_exp1_predictions_score_every_pair_and_generate_only_the_subset(tokenizer, condition):
    pairs = _test_pairs()
    cell, evaluation = cell_of(pairs, condition), mth.Evaluation(tokenizer, Decoding(max_new_tokens=6, batch_size=5))
    chosen = cd.generated_pair_ids(pairs, USERS, 2, 0, "d", 0)
    assert cell.generated_ids(2, 0) == chosen == mth.Evaluation(tokenizer, max_generated=2).generate_ids(cell)
    everything = ex.exp1_predictions(cell, evaluation, [mth.LORA])
    subset = ex.exp1_predictions(cell, evaluation, [mth.LORA], generate_ids=chosen)
    assert len(subset) == len(pairs) == 12 and subset["text_nll"].notna().all()  # every pair scored
    assert_close_to_scale(subset["nll"], everything["nll"], dtype=torch.float32, reduction_size=64)
    made = subset["generated"].notna()
    assert set(subset.loc[made, "pair_id"]) == chosen and len(chosen) == 6  # 2 of each user's 4
    assert subset.loc[~made, "generated"].isna().all()
    # a generated reply does not depend on which other pairs were generated
    assert subset.loc[made, "generated"].tolist() == everything.loc[made, "generated"].tolist()


def test_exp1_predictions_keep_the_subset_of_stage_03s_full_replies(tokenizer, tmp_path):
    from udg_lib.generation import PREDICTIONS_FILE

    pairs = _test_pairs()
    for user, own in pairs.groupby("speaker_id"):  # as notebook 03 writes them: every test pair generated
        folder = ft.user_dir(tmp_path / "full", user)
        folder.mkdir(parents=True)
        own[["pair_id", "speaker_id"]].assign(generated=[f"reply {p}" for p in own["pair_id"]], nll=1.0,
                                              n_tokens=2, text_nll=0.5, text_chars=3).to_parquet(
            folder / PREDICTIONS_FILE)
    chosen = cd.generated_pair_ids(pairs, USERS, 1, 0, "d", 0)
    full = ex.exp1_predictions(cell_of(pairs, tmp_path), mth.Evaluation(tokenizer), [mth.FULL], generate_ids=chosen)
    assert len(full) == 12 and full["text_nll"].notna().all()
    assert set(full.loc[full["generated"].notna(), "pair_id"]) == chosen and len(chosen) == 3
    path = ft.user_dir(tmp_path / "full", USERS[0]) / PREDICTIONS_FILE
    pd.read_parquet(path).assign(generated=None).to_parquet(path)  # a FULL file without the subset's replies
    with pytest.raises(ValueError, match="no FULL reply"):
        ex.exp1_predictions(cell_of(pairs, tmp_path), mth.Evaluation(tokenizer), [mth.FULL], generate_ids=chosen)


def test_retrieval_answers_only_the_subset():
    import numpy as np

    from udg_lib.metrics import SentenceEmbedder

    embedder = SentenceEmbedder("ones", lambda texts, batch_size: np.ones((len(texts), 3), dtype=np.float32), 3)
    pairs = pd.concat([_test_pairs(), _test_pairs(2, seed=3).assign(split="train_ft", pair_id=lambda f: "t" + f["pair_id"])],
                      ignore_index=True)
    chosen = cd.generated_pair_ids(pairs, USERS, 2, 0, "d", 0)
    floor = ex.retrieval_predictions(embedder, cell_of(pairs, None), generate_ids=chosen)
    assert set(floor["pair_id"]) == chosen and floor["generated"].notna().all()
    assert len(ex.retrieval_predictions(embedder, cell_of(pairs, None))) == 12


def test_stage_03s_full_predictor_generates_only_its_subset_and_scores_every_pair(tokenizer, condition, tmp_path):
    from udg_lib.generation import PREDICTIONS_FILE, UserPredictor

    users = pd.DataFrame({"user_id": list(USERS), **{f: "unknown" for f in PROFILE_FIELDS}})
    pairs = _test_pairs()
    chosen = cd.generated_pair_ids(pairs, USERS, 2, 0, "d", 0)
    model = mth.inference_model(condition / "da" / mth.MODEL_DIR, tokenizer, "cpu", "fp32")
    predictor = UserPredictor(tokenizer, pairs, users, "ppp", generate_ids=chosen, decoding=Decoding(max_new_tokens=4))
    predictor(USERS[0], model, tmp_path)
    saved = pd.read_parquet(tmp_path / PREDICTIONS_FILE)
    assert len(saved) == 4 and saved["text_nll"].notna().all()  # all of the user's test pairs scored
    own = {p for p in chosen if p.startswith("p0")}
    assert len(own) == 2 and set(saved.loc[saved["generated"].notna(), "pair_id"]) == own
