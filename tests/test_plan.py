"""The cost planner (udg_lib.plan): counts by hand on a tmp profile, timings on the "test" shape, the paper's
9,324 models, and the command line. Timings are checked to be positive, never against a bound."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml

from udg_lib import plan as cost_plan

# a tmp profile: two split sets, two pre-trained models, the tiny "test" T5, small batches
PARAMS = {
    "00_prepare_corpus": {"max_users": 3, "vocab_size": 300},
    "02_pretrain_models": {"model_preset": "test", "plain_t5_steps": 5, "dialogue_steps": 7, "batch_size": 4,
                           "max_source_length": 24, "max_target_length": 8},
    "03_finetune_users": {"split_sets": [0, 1], "pretrained": ["psp", "ppp"], "max_epochs": 2, "da_max_epochs": 1,
                          "batch_size": 4, "da_batch_size": 8, "users_per_batch": 2, "max_questions": 5,
                          "max_source_length": 24, "max_target_length": 8},
    "04_exp1_next_utterance": {"batch_size": 16, "max_new_tokens": 4},
    "05_exp2_diversity": {"pretrained": ["psp"]},
}
USERS = {"alpha": 3, "beta": 2}  # users per split set of each dataset
PAIRS = {"train_da": 10, "train_ft": 10, "dev": 4, "test": 3}  # per user, split set and split


def write_params(folder, params=PARAMS):
    folder.mkdir(parents=True, exist_ok=True)
    for stage, values in params.items():
        (folder / f"{stage}.yaml").write_text(yaml.safe_dump(values), encoding="utf-8")
    return folder


def write_stage00(root):
    """Stage 00's eval_pairs for two datasets: USERS users, PAIRS pairs each, in split sets 0 and 1."""
    for dataset, n_users in USERS.items():
        rows = [{"split_set": s, "split": split, "speaker_id": f"{dataset}{u}"}
                for s in (0, 1) for u in range(n_users) for split, n in PAIRS.items() for _ in range(n)]
        folder = root / "00_prepare_corpus" / dataset
        folder.mkdir(parents=True)
        pd.DataFrame(rows).to_parquet(folder / "eval_pairs.parquet")
    return root


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    return cost_plan.plan_profile("tmp", params_dir=write_params(tmp / "params"),
                                  outputs_root=write_stage00(tmp / "outputs"), steps=1, device="cpu")


def test_counts_match_a_hand_count(planned):
    table = planned.table.set_index("work")
    assert [d.name for d in planned.datasets] == ["alpha", "beta"]
    assert all(d.source == "stage 00 outputs" for d in planned.datasets)
    # stage 02: Plain T5 from scratch (5 steps) and three dialogue models (7 steps each)
    assert table.loc["pre-training", ["models", "units"]].tolist() == [4, 5 + 3 * 7]
    # LoRA and FULL: one per user, split set and pre-trained model; 2 epochs (the cap: no earlier run) of
    # ceil(10 / 4) steps, and a dev pass before training and after each epoch of ceil(4 / 4) batches at a third
    # of a step each
    per_user = 2 * math.ceil(10 / 4) + 3 * math.ceil(4 / 4) / 3
    for method in ("LoRA", "FULL"):
        assert table.loc[method, "models"] == (3 + 2) * 2 * 2
        assert table.loc[method, "units"] == round((3 + 2) * 2 * 2 * per_user)
    # DA and One-ID: one per dataset, split set and pre-trained model, on the pooled pairs; DA at batch 8 for 1
    # epoch, One-ID with the users' batch (4) and epoch cap (2), as notebook 03 trains it
    pooled = {"DA": {n: math.ceil(n * 10 / 8) + 2 * math.ceil(n * 4 / 8) / 3 for n in USERS.values()},
              "One-ID": {n: 2 * math.ceil(n * 10 / 4) + 3 * math.ceil(n * 4 / 4) / 3 for n in USERS.values()}}
    for method in ("DA", "One-ID"):
        assert table.loc[method, "models"] == 2 * 2 * 2
        assert table.loc[method, "units"] == round(2 * 2 * sum(pooled[method].values()))
    # stage 03 answers each FULL user's 3 test contexts and 5 questions in memory: one batch each
    assert table.loc["FULL replies", "units"] == (3 + 2) * 2 * 2 * 2
    # stages 04-05: test contexts of DA, One-ID, LoRA per (set, pre-trained), 5 questions for One-ID and LoRA
    # of 1 model
    replies = sum(2 * 2 * 3 * n * 3 + 2 * 1 * 2 * n * 5 for n in USERS.values())
    assert table.loc["generation", "units"] == math.ceil(replies / 16)
    assert planned.stage_hours("03") == pytest.approx(
        table.loc[["DA", "One-ID", "LoRA", "FULL", "FULL replies"], "device_hours"].sum())


def test_the_family_comes_from_model_family_and_precision_is_resolved(tmp_path):
    params = {**PARAMS, "02_pretrain_models": {**PARAMS["02_pretrain_models"], "model_family": "causal"},
              "03_finetune_users": {**PARAMS["03_finetune_users"], "precision": "fp32"}}
    loaded, _ = cost_plan.profile_params("tmp", write_params(tmp_path / "params", params))
    assert cost_plan.profile_shape(loaded).family == "causal"  # stage 02's parameter is model_family
    assert cost_plan.profile_shape(loaded).preset == "test"  # trained from scratch at its preset
    with_checkpoint = {**loaded, "02_pretrain_models": {**loaded["02_pretrain_models"], "checkpoint": "smollm2"}}
    shape = cost_plan.profile_shape(with_checkpoint)  # the cpu profile: SmolLM2 as shipped, not the default preset
    assert (shape.preset, shape.vocab_size) == ("smollm2-135m", 49152)
    planned = cost_plan.plan_profile("tmp", params_dir=tmp_path / "params", steps=1, device="cpu", max_rows=1,
                                     outputs_root=write_stage00(tmp_path / "outputs"))
    assert planned.shape.family == "causal"
    assert planned.precision["requested"] == "fp32" and planned.precision["used"] == "fp32"
    assert "avx512_bf16" in planned.precision["cpu"]


def test_epochs_come_from_an_earlier_run_when_there_is_one(tmp_path):
    loaded, _ = cost_plan.profile_params("tmp", write_params(tmp_path / "params"))
    s03 = loaded["03_finetune_users"]
    caps, why = cost_plan.expected_epochs(s03, None, None)
    assert caps == {"DA": 1, "One-ID": 2, "LoRA": 2, "FULL": 2} and "upper bound" in why
    stage = tmp_path / "outputs" / "03_finetune_users"
    stage.mkdir(parents=True)
    by_method = [{"method": m, "epochs_mean": e} for m, e in (("da", 1.0), ("one_id", 2.0), ("lora", 1.5),
                                                              ("lora", 2.5), ("full", 1.0))]
    (stage / "metrics.json").write_text(json.dumps({"metrics": {"by_method": by_method}}))
    measured = cost_plan.measured_epochs("tmp", tmp_path / "outputs")
    assert measured[0] == {"DA": 1.0, "One-ID": 2.0, "LoRA": 2.0, "FULL": 1.0}
    epochs, why = cost_plan.expected_epochs(s03, measured, None)
    assert epochs["LoRA"] == 2.0 and "earlier run measured" in why
    assert cost_plan.expected_epochs(s03, measured, 5)[0]["LoRA"] == 2  # an assumed count is capped too


def test_timings_are_positive_and_scale_the_estimates(planned):
    assert planned.shape.preset == "test" and planned.shape.family == "seq2seq"
    for kind in ("pretrain", "full", "lora", "generate"):
        timing = planned.timings[kind]
        assert timing.seconds > 0 and timing.samples and timing.timed_rows <= timing.rows
    assert planned.timings["lora_batched"].rows == 2 * 4  # users_per_batch x batch_size
    table = planned.table
    assert (table["device_hours"] > 0).all()
    assert table["device_hours"].tolist() == pytest.approx(
        (table["units"] * table["seconds_per_unit"] / 3600).tolist(), rel=0.01)
    assert planned.total_hours == pytest.approx(table["device_hours"].sum())


def test_paper_counts_give_its_9324_models(planned):
    paper = planned.paper_table.set_index("work")
    assert planned.paper_models == cost_plan.PAPER_MODELS == 9324
    assert paper.loc["One-ID", "models"] == 3 * 4 * 3
    assert paper.loc["LoRA", "models"] == paper.loc["FULL", "models"] == (147 + 140 + 100) * 4 * 3
    assert planned.meets_goal() == (planned.paper_training_hours <= cost_plan.GOAL_GPU_HOURS)


def test_an_absent_corpus_is_planned_with_the_papers_mean_and_says_so(tmp_path):
    params = {**PARAMS, "00_prepare_corpus": {"corpora": [{"format": "generic", "name": "mine",
                                                            "turns": str(tmp_path / "absent.jsonl")}]}}
    loaded, _ = cost_plan.profile_params("tmp", write_params(tmp_path / "params", params))
    users = cost_plan.dataset_users(loaded, tmp_path / "no-outputs")
    assert [(d.name, d.users) for d in users] == [("mine", 129)]
    assert users[0].source.startswith("assumed: the paper's mean") and "absent.jsonl" in users[0].source


def test_estimate_pairs_splits_turns_as_stage_00():
    pairs = cost_plan.estimate_pairs(200, 0.3, cap=0)
    assert pairs == pytest.approx({"train_ft": 70, "train_da": 70, "dev": 30, "test": 30})
    assert cost_plan.estimate_pairs(200, 0.3, cap=50)["train_ft"] == 50


def test_command_line_prints_the_plan_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = cost_plan.main(["--profile", "tmp", "--params-dir", str(write_params(tmp_path / "params")),
                           "--outputs-root", str(write_stage00(tmp_path / "outputs")), "--steps", "1",
                           "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "cost plan of profile 'tmp'" in printed and "9,324" in printed and "pre-training" in printed
    written = json.loads(out.read_text())
    assert written["paper"]["models"] == 9324 and written["table"] and "provenance" in written


def test_command_line_names_the_known_profiles_for_an_unknown_one(capsys):
    assert cost_plan.main(["--profile", "no-such-profile"]) == 1
    assert "no params/no-such-profile/" in capsys.readouterr().err
