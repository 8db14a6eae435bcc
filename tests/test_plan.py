"""The cost planner (udg_lib.plan): counts by hand on a tmp profile, timings on the "test" shape, the paper's
9,324 models, and the command line. Timings are checked to be positive, never against a bound."""

from __future__ import annotations

import json
import math

import numpy as np
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
                                  outputs_root=write_stage00(tmp / "outputs"),
                                  options=cost_plan.PlanOptions(steps=1, device="cpu"))


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
    planned = cost_plan.plan_profile("tmp", params_dir=tmp_path / "params",
                                     outputs_root=write_stage00(tmp_path / "outputs"),
                                     options=cost_plan.PlanOptions(steps=1, device="cpu", max_rows=1))
    assert planned.shape.family == "causal"
    assert planned.precision["requested"] == "fp32" and planned.precision["used"] == "fp32"
    assert "avx512_bf16" in planned.precision["cpu"]


def test_epochs_come_from_an_earlier_run_when_there_is_one(tmp_path):
    loaded, _ = cost_plan.profile_params("tmp", write_params(tmp_path / "params"))
    s03 = loaded["03_finetune_users"]
    methods = cost_plan.stage03_methods(s03)
    assert [m.plan_label for m in methods] == ["DA", "One-ID", "LoRA", "FULL"]
    caps, why = cost_plan.expected_epochs(s03, methods, None, None)
    assert caps == {"da": 1, "one_id": 2, "lora": 2, "full": 2} and "upper bound" in why
    stage = tmp_path / "outputs" / "03_finetune_users"
    stage.mkdir(parents=True)
    by_method = [{"method": m, "epochs_mean": e} for m, e in (("da", 1.0), ("one_id", 2.0), ("lora", 1.5),
                                                              ("lora", 2.5), ("full", 1.0))]
    (stage / "metrics.json").write_text(json.dumps({"metrics": {"by_method": by_method}}))
    measured = cost_plan.measured_epochs("tmp", tmp_path / "outputs")
    assert measured[0] == {"da": 1.0, "one_id": 2.0, "lora": 2.0, "full": 1.0}
    epochs, why = cost_plan.expected_epochs(s03, methods, measured, None)
    assert epochs["lora"] == 2.0 and "earlier run measured" in why and "LoRA 2.0" in why
    assert cost_plan.expected_epochs(s03, methods, measured, 5)[0]["lora"] == 2  # an assumed count is capped too
    # a method the earlier run did not train is assumed to run to its cap
    more = cost_plan.stage03_methods({**s03, "methods": ["one_id", "lora", "full", "rag_lora"],
                                      "peft_methods": {"ia3": {"peft_type": "IA3"}}})
    assert [m.plan_label for m in more] == ["DA", "One-ID", "LoRA", "FULL", "LoRA + own replies (RAG)", "ia3"]
    epochs, _ = cost_plan.expected_epochs(s03, more, measured, None)
    assert epochs["rag_lora"] == epochs["ia3"] == 2 and epochs["full"] == 1.0


def test_every_method_of_stage_03_gets_a_row_priced_by_its_kind(tmp_path):
    loaded, _ = cost_plan.profile_params("tmp", write_params(tmp_path / "params"))
    s03 = {**loaded["03_finetune_users"], "methods": ["one_id", "lora", "full", "rag_lora"],
           "peft_methods": {"ia3": {"peft_type": "IA3", "label": "IA3"}}, "lora_training": "per_user"}
    methods = cost_plan.stage03_methods(s03)
    timings = {kind: cost_plan.StepTiming(kind, 4, 4, None if kind == "lora_batched" else 1.0)
               for kind in cost_plan.STEP_KINDS}
    work = [cost_plan.WorkCounts("d", users=4, split_sets=1, pretrained=2, train_ft=8, train_da=8, dev=4, test=4)]
    settings = cost_plan.CountSettings(tuple(methods), {m.name: 2 for m in methods}, user_batch=4, da_batch=8,
                                       generate_batch=8, questions=2, lora_kind="lora", users_per_batch=2,
                                       source_tokens=48)
    rows = {r["work"]: r for r in cost_plan.count_rows(work, timings, settings)}
    assert {"DA", "One-ID", "LoRA", "FULL", "LoRA + own replies (RAG)", "IA3", "FULL replies", "IA3 replies",
            "generation"} == set(rows)
    assert rows["IA3"]["units"] == rows["LoRA"]["units"] and rows["IA3"]["models"] == 4 * 2
    # RAG + LoRA: LoRA's steps on longer inputs (48 + 32 prompt tokens)
    assert rows["LoRA + own replies (RAG)"]["seconds_per_unit"] == pytest.approx(80 / 48)
    # stages 04-05 generate for DA, One-ID, LoRA and RAG + LoRA (FULL and IA3 answered in stage 03)
    assert rows["generation"]["units"] == 1 * 2 * 4 * 4 * 4 / 8  # sets x models x methods x users x test / batch


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
    assert cost_plan.estimate_pairs(200, 0.3, cap=10, test_cap=25) == {"train_ft": 10, "train_da": 10, "dev": 10, "test": 25}
    assert cost_plan.estimate_pairs(200, 0.3, cap=10, test_cap=0)["test"] == pytest.approx(30)


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
    error = capsys.readouterr().err
    assert "no params/no-such-profile/" in error and "cpu, cpu-t5" in error and "models" not in error
    assert cost_plan.main(["--profile", "models"]) == 1  # the model layers' folder is not a profile


# ---------------------------------------------------------------------------------------------------------------
# --power: a finished run's paired comparisons (udg_lib.power)

from statsmodels.stats.power import TTestPower  # noqa: E402

from udg_lib import power as run_power  # noqa: E402

N_USERS, N_PAIRS = 12, 5
SYSTEMS = [("plain_dialogue", "lora"), ("plain_dialogue", "full"), ("psp", "lora"), ("psp", "full")]


def synthetic_scores(seed=0):
    """Stage 04 scores: N_USERS users x N_PAIRS test pairs x SYSTEMS, a user effect and reply noise per system;
    every reference 10 characters long, so a user's bits per character is the mean of its replies'."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(N_USERS):
        user_shift = {s: rng.normal(0, 0.05) for s in SYSTEMS}
        for pair in range(N_PAIRS):
            for s in SYSTEMS:
                rows.append({"dataset": "d", "split_set": 0, "user_id": f"u{u:02d}", "pair_id": pair,
                             "pretrain": s[0], "method": s[1], "system": "/".join(s),
                             "similarity": 0.3 + user_shift[s] + rng.normal(0, 0.1),
                             "text_nll": 10 * math.log(2) * (1.5 + user_shift[s] + rng.normal(0, 0.2)),
                             "text_chars": 10})
    scores = pd.DataFrame(rows)
    scores["bits_per_char"] = scores["text_nll"] / math.log(2) / scores["text_chars"]
    return scores


def user_diffs(scores, metric, a, b):
    """By hand: per user, the mean over its replies of a's systems minus b's."""
    wide = scores.pivot_table(index="user_id", columns=["pretrain", "method"], values=metric, aggfunc="mean")
    return (wide[a].mean(axis=1) - wide[b].mean(axis=1)).to_numpy()


def write_outputs(root, scores, llm=None):
    (root / "04_exp1_next_utterance").mkdir(parents=True)
    scores.to_parquet(root / "04_exp1_next_utterance" / "scores.parquet")
    if llm is not None:
        (root / "06_llm_baselines").mkdir(parents=True)
        llm.to_parquet(root / "06_llm_baselines" / "scores.parquet")
    return root


def test_power_table_matches_statsmodels_by_hand(tmp_path):
    scores = synthetic_scores()
    run = run_power.read_run(write_outputs(tmp_path / "run", scores))
    table = run_power.power_table(run, {"similarity": 0.01, "bits_per_char": 0.02})
    assert set(table["family"]) == {"C2", "C4", "Q2"}  # no One-ID, DA or LLM in this run
    solver = TTestPower()
    for metric, target in (("similarity", 0.01), ("bits_per_char", 0.02)):
        # C2 (family of 1): PSP LoRA/FULL > Plain Dialogue LoRA/FULL, one-sided at alpha 0.05
        c2 = table[(table["family"] == "C2") & (table["metric"] == metric)].iloc[0]
        d = user_diffs(scores, metric, [("psp", "lora"), ("psp", "full")],
                       [("plain_dialogue", "lora"), ("plain_dialogue", "full")])
        sd = np.std(d, ddof=1)
        assert (c2["n"], c2["m"]) == (N_USERS, 1)
        assert c2["sd"] == pytest.approx(sd)
        assert c2["detectable"] == pytest.approx(
            solver.solve_power(nobs=N_USERS, alpha=0.05, power=0.8, alternative="larger") * sd)
        assert c2["n_needed"] == math.ceil(
            solver.solve_power(effect_size=target / sd, alpha=0.05, power=0.8, alternative="larger"))
        # Q2 (family of 2: LoRA and FULL): two-sided at 0.05 / 2
        q2 = table[(table["family"] == "Q2") & (table["metric"] == metric) & (table["comparison"].str.contains("LoRA"))]
        d = user_diffs(scores, metric, [("psp", "lora")], [("plain_dialogue", "lora")])
        sd = np.std(d, ddof=1)
        assert q2.iloc[0]["m"] == 2 and q2.iloc[0]["sd"] == pytest.approx(sd)
        assert q2.iloc[0]["detectable"] == pytest.approx(
            solver.solve_power(nobs=N_USERS, alpha=0.025, power=0.8, alternative="two-sided") * sd)
        assert q2.iloc[0]["n_needed"] == math.ceil(
            solver.solve_power(effect_size=target / sd, alpha=0.025, power=0.8, alternative="two-sided"))


def test_variance_components_reproduce_the_measured_sd_at_the_runs_test_pairs(tmp_path):
    # balanced users: between + within / k is MS_between / k, the variance of the users' means, exactly
    scores = synthetic_scores(seed=3)
    run = run_power.read_run(write_outputs(tmp_path / "run", scores))
    table = run_power.power_table(run)
    assert (table["pairs_per_user"] == N_PAIRS).all() and (table["sd_between"] > 0).sum() >= 4
    for row in table.itertuples():
        if row.sd_between > 0:  # not clipped at zero
            assert math.sqrt(row.sd_between ** 2 + row.sd_within ** 2 / N_PAIRS) == pytest.approx(row.sd)
    # the split itself, by hand on known data: user means 0, 1, 2, 3 and replies +-1 around them
    diffs = pd.DataFrame({"dataset": "d", "user_id": np.repeat(list("abcd"), 2),
                          "diff": [-1, 1, 0, 2, 1, 3, 2, 4]}).astype({"diff": float})
    parts = run_power.variance_components(diffs)
    assert parts.within == pytest.approx(2.0)  # (1 + 1) x 4 / (8 - 4)
    assert parts.between == pytest.approx((2 * 5 / 3 - 2.0) / 2)  # (MS_between - MS_within) / k, MS_between = 2 x var(0..3)
    assert parts.sd(2) == pytest.approx(math.sqrt(5 / 3))


def test_llm_comparisons_come_from_stage_06_scores(tmp_path):
    scores = synthetic_scores()
    llm = scores[scores["system"] == "psp/lora"].assign(pretrain="llm", method="chat", system="llm/chat")
    llm["similarity"] -= 0.1
    run = run_power.read_run(write_outputs(tmp_path / "run", scores, llm))
    table = run_power.power_table(run)
    c1 = table[(table["family"] == "C1") & (table["metric"] == "similarity")]
    assert len(c1) == 1 and c1.iloc[0]["n"] == N_USERS and c1.iloc[0]["effect"] > 0
    assert not any("not available" in note for note in run.notes)


def test_a_published_folder_without_stage_06_says_llm_comparisons_are_unavailable(tmp_path, capsys):
    scores = synthetic_scores()
    from udg_lib.metrics import per_user_means

    folder = tmp_path / "results" / "04_exp1_next_utterance"
    folder.mkdir(parents=True)
    per_user_means(scores, ["similarity", "bits_per_char"]).to_csv(folder / "per_user_scores.csv", index=False)
    (tmp_path / "results" / "06_llm_baselines").mkdir()  # published: metrics and tables, no per-user file
    run = run_power.read_run(tmp_path / "results")
    assert run.samples is None
    table = run_power.power_table(run)
    c2 = table[(table["family"] == "C2") & (table["metric"] == "similarity")].iloc[0]
    assert c2["sd"] == pytest.approx(np.std(user_diffs(scores, "similarity", [("psp", "lora"), ("psp", "full")],
                                                       [("plain_dialogue", "lora"), ("plain_dialogue", "full")]),
                                            ddof=1))
    assert "C1" not in set(table["family"])
    assert cost_plan.main(["--power", str(tmp_path / "results")]) == 0
    printed = capsys.readouterr().out
    assert "LLM comparisons (C1) are not available from this folder" in printed
    header = next(line for line in printed.splitlines() if line.lstrip().startswith("family"))
    assert header.split()[-4:] == ["sd", "detectable", "target", "n_needed"]  # no per-sample split columns
    line = next(line for line in printed.splitlines() if line.lstrip().startswith("C2") and "similarity" in line)
    assert line.split()[-4:] == [f"{c2['sd']:.3g}", f"{c2['detectable']:.3g}", "0.01", str(int(c2["n_needed"]))]
    assert "bits_per_char" in printed and "lower is better" in printed
    assert sum(line.lstrip().startswith(("C2", "C4", "Q2")) for line in printed.splitlines()) == len(table)
    assert cost_plan.main(["--power", str(tmp_path / "results"), "--target-similarity", "0.05"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("C2")]
    assert [(r[-9], r[-2]) for r in rows] == [("similarity", "0.05"), ("bits_per_char", "0.02")]


def test_command_line_power_refuses_a_folder_without_scores(tmp_path, capsys):
    assert cost_plan.main(["--power", str(tmp_path)]) == 1
    assert "per_user_scores.csv" in capsys.readouterr().err


def test_users_needed_is_the_smallest_n_that_reaches_the_target():
    assert run_power.users_needed(lambda n: 10 / n, 1.0) == 10
    assert run_power.users_needed(lambda n: 10 / n, 0.9) == 12
    assert run_power.users_needed(lambda n: 1.0, 0.5) is None


def test_design_tradeoff_costs_and_shrinks_with_users_and_test_pairs(tmp_path):
    scores = synthetic_scores(seed=3)
    run = run_power.read_run(write_outputs(tmp_path / "run", scores))
    table = run_power.power_table(run)
    grid = run_power.design_tradeoff(table, run, lambda users, train, test: users * train * test / 60,
                                     run_power.DesignGrid([N_USERS, 4 * N_USERS], [10], [N_PAIRS, 4 * N_PAIRS]))
    assert grid["minutes"].tolist() == pytest.approx([u * 10 * t for u in (N_USERS, 4 * N_USERS)
                                                      for t in (N_PAIRS, 4 * N_PAIRS)])
    at_run = grid[(grid["users"] == N_USERS) & (grid["test_pairs"] == N_PAIRS)].iloc[0]
    on_similarity = table[table["metric"] == "similarity"]
    for family, rows in on_similarity.groupby("family"):
        hardest = rows.loc[rows["sd"].idxmax()]
        if hardest["sd_between"] > 0:  # the model reproduces the measured SD at the run's design
            assert at_run[family] == pytest.approx(hardest["detectable"])
        assert (grid.loc[grid["users"] > N_USERS, family].to_numpy()
                < grid.loc[grid["users"] == N_USERS, family].to_numpy()).all()
        assert (grid.loc[grid["test_pairs"] > N_PAIRS, family].to_numpy()
                < grid.loc[grid["test_pairs"] == N_PAIRS, family].to_numpy()).all()


def test_design_hours_recost_the_planned_stages(tmp_path, monkeypatch):
    monkeypatch.delitem(USERS, "beta")  # one dataset: the plan's own design is one (users, pairs) point
    planned = cost_plan.plan_profile("tmp", params_dir=write_params(tmp_path / "params"),
                                     outputs_root=write_stage00(tmp_path / "outputs"),
                                     options=cost_plan.PlanOptions(steps=1, device="cpu"))
    own = planned.design_hours(USERS["alpha"], PAIRS["train_ft"], PAIRS["test"])
    assert own == pytest.approx(planned.stage_hours("03") + planned.stage_hours("04-05"))
    assert planned.design_hours(2 * USERS["alpha"], PAIRS["train_ft"], PAIRS["test"]) > own
    assert planned.design_hours(USERS["alpha"], 4 * PAIRS["train_ft"], PAIRS["test"]) > own


@pytest.mark.parametrize("family_name", ["seq2seq", "causal"])
def test_data_lengths_are_the_mean_padded_lengths_of_each_users_batches(tmp_path, family_name):
    """Two users, one batch each (batch 4 >= their 3 pairs): the padded lengths are each batch's longest prompt
    and reply as the family tokenizes them, cut to the caps; their mean over batches is what the plan times."""
    from udg_lib.families import get_family
    from udg_lib.tokenizer import load_tokenizer

    prepared = tmp_path / "00_prepare_corpus"
    tokenizer = cost_plan.synthetic_tokenizer()
    tokenizer.save_pretrained(str(prepared / "tokenizer"))
    words = lambda k: " ".join(f"w{i}" for i in range(k))  # noqa: E731
    prompts = {"u0": [3, 5, 60], "u1": [2, 4, 6]}  # u0's longest prompt is cut to the cap
    replies = {"u0": [1, 2, 3], "u1": [4, 9, 2]}
    rows = [{"split_set": 0, "split": "train_ft", "speaker_id": u, "psp": f"[USER] [SEP] {words(p)}",
             "plain": words(p), "response": words(r)}
            for u in prompts for p, r in zip(prompts[u], replies[u])]
    rows.append({"split_set": 0, "split": "test", "speaker_id": "u0", "psp": f"[USER] [SEP] {words(200)}",
                 "plain": words(200), "response": words(50)})  # not a training pair: never timed
    (prepared / "chitchat").mkdir()
    pd.DataFrame(rows).to_parquet(prepared / "chitchat" / "prompts.parquet")

    family = get_family(family_name)
    loaded = load_tokenizer(prepared / "tokenizer").tokenizer

    def longest(user):
        examples = family.tokenize_pairs([f"[USER] [SEP] {words(p)}" for p in prompts[user]],
                                         [words(r) for r in replies[user]], loaded, 20, 6)
        items = [examples[i] for i in range(len(examples))]
        if family_name == "causal":
            src = [sum(label == -100 for label in item["labels"]) for item in items]
            return max(src), max(len(item["labels"]) - s for item, s in zip(items, src))
        return max(len(item["input_ids"]) for item in items), max(len(item["labels"]) for item in items)

    found = cost_plan.data_lengths(prepared, family_name, ["psp"], 4, 20, 6)
    (s0, t0), (s1, t1) = longest("u0"), longest("u1")
    assert s0 <= 20 and t1 <= 6  # the caps cut u0's prompt and u1's reply
    assert (found.source, found.target, found.batches) == (math.ceil((s0 + s1) / 2), math.ceil((t0 + t1) / 2), 2)
    assert "2 training batches" in found.why
    assert cost_plan.data_lengths(tmp_path / "nothing", family_name, ["psp"], 4, 20, 6) is None


def test_the_plan_counts_every_training_seed(tmp_path):
    from udg_lib.param_profiles import RUN_SETTINGS_FILE

    assert cost_plan.training_seeds("full-en") == 3 and cost_plan.training_seeds("cpu") == 1
    (tmp_path / RUN_SETTINGS_FILE).write_text("seeds: 2\n")
    assert cost_plan.training_seeds("cpu", tmp_path) == 2
