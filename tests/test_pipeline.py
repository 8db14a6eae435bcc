"""The notebooks themselves, executed by the runner on the `test` profile; numbers checked against bounds."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from udg_lib.pipeline import main, run_pipeline
from udg_lib.paths import repo_root

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def test_run(tmp_path_factory) -> Path:
    outputs = tmp_path_factory.mktemp("outputs") / "test"
    results = run_pipeline("test", outputs_root=outputs)
    assert [r.status for r in results] == ["ran"] * len(results)
    return outputs


def metrics(outputs: Path, stage: str) -> dict:
    return json.loads((outputs / stage / "metrics.json").read_text())


def test_prepare_corpus_writes_table2_and_splits(test_run: Path):
    stage = test_run / "00_prepare_corpus"
    result = metrics(test_run, "00_prepare_corpus")
    table2 = pd.read_csv(stage / "table2.csv").set_index("dataset")
    assert list(table2.index) == ["chitchat", "seinfeld", "tbbt"]
    assert (table2["N users"] == 4).all()  # params/test: max_users 4
    assert (table2["N test / user"] > 0).all() and (table2["N train / user"] > table2["N fine-tune / user"]).all()
    assert result["metrics"]["table2"] == json.loads(table2.reset_index().to_json(orient="records"))
    assert result["metrics"]["pretrain_pairs"]["chitchat"] > 50_000  # the non-evaluation users' dialogues
    for name in table2.index:
        pairs = pd.read_parquet(stage / name / "eval_pairs.parquet")
        assert set(pairs["split"]) == {"train_da", "train_ft", "dev", "test"} and set(pairs["split_set"]) == {0, 1, 2}
        users = pd.read_csv(stage / name / "eval_users.csv")
        assert users["one_id"].str.fullmatch(r"[A-Za-z0-9]{4}").all()
        pretrain = pd.read_parquet(stage / name / "pretrain_pairs.parquet", columns=["speaker_id"])
        assert not set(pretrain["speaker_id"]) & set(users["user_id"])
    assert result["stage"]["params"]["max_users"] == 4
    assert set(result["provenance"]["data"]) >= {"chitchat/corpus/turns.parquet"}


def test_tokenizer_reloads_with_the_markers(test_run: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(test_run / "00_prepare_corpus" / "tokenizer")
    ids = tokenizer("[USER1] 20s [USER2] male [SEP] hi")["input_ids"]
    assert {tokenizer.convert_tokens_to_ids(t) for t in ("[USER1]", "[USER2]", "[SEP]")} <= set(ids)
    # character_coverage 1.0: every character of the English corpus is a piece, no byte fallback
    assert not any(t.startswith("<0x") for t in tokenizer.tokenize("I have 7 cats, 2 dogs and 1 fish!"))


def test_infer_profiles_writes_users_table1_and_accuracy(test_run: Path):
    from udg_lib.data import PROFILE_FIELDS

    stage = test_run / "01_infer_profiles"
    for name in ("chitchat", "seinfeld", "tbbt"):
        users = pd.read_parquet(stage / "users" / f"{name}.parquet")
        corpus_users = pd.read_parquet(test_run / "00_prepare_corpus" / name / "corpus" / "users.parquet")
        assert set(users["user_id"]) == set(corpus_users["user_id"]) and set(PROFILE_FIELDS) <= set(users.columns)
        inferred = set(pd.read_parquet(stage / "inference" / f"{name}.parquet")["user_id"])
        speakers = pd.read_parquet(test_run / "00_prepare_corpus" / name / "pretrain_pairs.parquet")["speaker_id"]
        assert set(speakers) <= inferred  # every PSP pre-training prompt's speaker is inferred, even with max_users
        for split_set in (0, 1, 2):  # one table per split set: profiles without that set's dev/test turns
            per_set = pd.read_parquet(stage / "users" / f"{name}.set{split_set}.parquet")
            assert set(per_set["user_id"]) == set(users["user_id"])
    sitcom = pd.read_parquet(stage / "users" / "seinfeld.parquet").set_index("user_id")
    assert sitcom.loc["JERRY", "occupation"] == "entertainer"  # corpus profiles are kept as they are
    scores = pd.read_csv(stage / "inference_accuracy.csv")
    assert set(scores["inferrer"]) == {"rules (priors)", "rules (fitted)", "llm (smollm2)"}
    assert (scores.groupby("inferrer")["field"].nunique() == len(PROFILE_FIELDS)).all()
    assert scores["coverage"].between(0, 1).all() and scores["majority_accuracy"].between(0, 1).all()
    assert (pd.read_csv(stage / "table1.csv")["users"] > 0).all()


def test_pretrain_models_save_four_reloadable_models(test_run: Path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    stage = test_run / "02_pretrain_models"
    result = metrics(test_run, "02_pretrain_models")["metrics"]
    assert set(result["models"]) == {"plain_t5", "plain_dialogue", "psp", "ppp"}
    for name in result["models"]:
        model = AutoModelForSeq2SeqLM.from_pretrained(stage / name / "model")
        tokenizer = AutoTokenizer.from_pretrained(stage / name / "model")
        output = model.generate(**tokenizer(["[USER] 20s [SEP] hello"], return_tensors="pt"), max_new_tokens=4)
        assert output.shape[0] == 1 and result["models"][name]["steps"] == 6
        assert (stage / name / "log_history.json").exists()
    assert (stage / "loss_curves.png").stat().st_size > 0
    for name in ("psp", "ppp"):
        conditioning = result["profile_conditioning"][name]
        assert conditioning["perplexity_true_profiles"] > 1 and conditioning["perplexity_shuffled_profiles"] > 1
        assert conditioning["swap_change_rate"] is None or 0 <= conditioning["swap_change_rate"] <= 1
        assert isinstance(conditioning["reads_profiles"], bool) and conditioning["alternative"] == "greater"
        assert 0 < conditioning["n_pairs"] <= conditioning["n_offered"]  # pairs whose profile the shuffle changes
    shares = result["profile_shares"]  # every pre-training speaker is inferred (stage 01): most prompts show one
    assert set(shares["pretraining_prompts"]) == {"psp", "ppp"}
    assert all(0.5 < share <= 1 for share in shares["pretraining_prompts"].values())
    assert 0 <= shares["evaluation_prompts"] <= 1


def test_finetune_users_writes_reloadable_adapters_and_one_id_models(test_run: Path):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from udg_lib.finetuning import DONE_FILE, user_dir

    stage = test_run / "03_finetune_users"
    result = metrics(test_run, "03_finetune_users")["metrics"]
    assert result["users_per_dataset"] == {"chitchat": 4, "seinfeld": 4, "tbbt": 4}
    assert result["lora_trainable_parameters_t5_base"] == 1_769_472  # §4.1.3: "1.8 million"
    assert [m["name"] for m in result["methods"]] == ["da", "one_id", "lora", "full", "rag_lora", "ia3"]
    summaries = pd.read_parquet(stage / "training_summaries.parquet")
    # per condition: DA + One-ID + each user of that set x (LoRA, FULL, RAG + LoRA, and IA3 from its peft config)
    sizes = summaries.groupby(["dataset", "split_set", "pretrained"]).size()
    for (dataset, split_set, _), n in sizes.items():
        assert n == 2 + 4 * len(result["trained_users"][dataset][str(split_set)])
    # evaluation units are real: every model trained on data, at least one step, early stopping on dev pairs
    assert (summaries["n_train"] > 0).all() and (summaries["n_dev"] > 0).all()
    assert (summaries["epochs_run"] >= 1).all() and summaries["best_dev_loss"].notna().all()
    users = pd.read_csv(test_run / "00_prepare_corpus" / "tbbt" / "eval_users.csv", dtype=str)
    condition = stage / "tbbt" / "set0" / "psp"
    for user in users["user_id"]:
        assert (user_dir(condition / "lora", user) / DONE_FILE).is_file()
        assert (user_dir(condition / "rag_lora", user) / DONE_FILE).is_file()
        for in_memory in ("full", "ia3"):  # evaluated while trained
            assert (user_dir(condition / in_memory, user) / "predictions.parquet").is_file()
    for method in ("lora", "ia3", "rag_lora"):  # adapters in peft's format
        adapter = user_dir(condition / method, users["user_id"].iloc[0]) / "adapter"
        PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(condition / "da" / "model"), adapter)
    ia3 = json.loads((user_dir(condition / "ia3", users["user_id"].iloc[0]) / "adapter" / "adapter_config.json").read_text())
    assert ia3["peft_type"] == "IA3"
    AutoModelForSeq2SeqLM.from_pretrained(condition / "one_id" / "model")
    assert result["sizes"]["adapter_weights_bytes_mean"] < result["sizes"]["model_weights_bytes"] / 5


def test_exp1_writes_tables_scores_significance_leakage_and_table6(test_run: Path):
    stage = test_run / "04_exp1_next_utterance"
    scores = pd.read_parquet(stage / "scores.parquet")
    systems = set(zip(scores["pretrain"], scores["method"]))
    assert {("psp", "lora"), ("ppp", "full"), ("plain_t5", "one_id"), ("plain_dialogue", "da"), ("psp", "ia3"),
            ("ppp", "rag_lora"), ("none", "retrieval")} <= systems and len(systems) == 25
    # every system with a likelihood scores every test pair of every user, once; every system (retrieval too)
    # generates replies on the same pairs, at most max_generated_per_user (2 here) of each user's
    tuned = scores[scores["method"] != "retrieval"]
    assert tuned["bits_per_char"].notna().all() and not tuned.duplicated(["pretrain", "method", "pair_id"]).any()
    assert tuned.groupby(["pretrain", "method"])["pair_id"].nunique().nunique() == 1
    made = scores[scores["generated"].notna()]
    assert made.groupby(["pretrain", "method"])["pair_id"].apply(frozenset).nunique() == 1
    per_user = made.groupby(["pretrain", "method", "split_set", "user_id"])["pair_id"].nunique()
    assert per_user.max() == 2 and len(made) < len(scores)  # the split is exercised: some pairs scored only
    assert made["similarity"].between(-1.0001, 1.0001).all() and (made["rouge_l"] >= 0).all()
    assert scores.loc[scores["generated"].isna(), ["similarity", "rouge_l"]].isna().all().all()
    counts = pd.read_csv(stage / "per_user_scores.csv")
    assert (counts["n_scored"] > counts["n_generated"])[counts["method"] != "retrieval"].any()
    assert counts["n_generated"].between(1, 2).all()
    for number, name in ((3, "chitchat"), (4, "seinfeld"), (5, "tbbt")):
        table = pd.read_csv(stage / f"table{number}_{name}.csv")
        assert len(table) == 25 and (table["perplexity"].dropna() > 1).all()
        assert {"IA3", "LoRA + own replies (RAG)"} <= set(table["fine-tuning"])
        assert "**" in (stage / f"table{number}_{name}.md").read_text()
    significance = pd.read_csv(stage / "significance.csv")
    assert {"psp/lora", "ppp/full"} <= set(significance["label_a"]) and significance["p_value"].between(0, 1).all()
    assert set(pd.read_csv(stage / "leakage_by_method.csv")["method"]) == {"da", "one_id", "lora", "full", "rag_lora",
                                                                          "ia3"}
    table6 = pd.read_csv(stage / "table6.csv").set_index("model")
    assert table6.loc["LoRA", "size_MB"] < table6.loc["FULL", "size_MB"] and (table6["response_s_cold"] > 0).all()


def test_exp2_writes_table7(test_run: Path):
    stage = test_run / "05_exp2_diversity"
    table7 = pd.read_csv(stage / "table7.csv", index_col=0)
    assert len(table7) == 15 and table7.to_numpy().min() >= 0  # 3 models x One-ID, LoRA, FULL, RAG + LoRA, IA3
    assert {"PSP / IA3", "PSP / LoRA + own replies (RAG)"} <= set(table7.index)
    assert table7.to_numpy().min() >= 0 and table7.to_numpy().max() <= 1
    replies = pd.read_parquet(stage / "replies.parquet")
    assert replies["question_id"].nunique() == 5  # params/test: max_questions 5
    assert pd.read_csv(stage / "significance.csv")["metric"].isin(["dist_s", "dist_2"]).all()


def test_llm_baselines_figure2_and_the_report(test_run: Path, tmp_path: Path):
    from udg_lib.plots import rebuild_figure2

    stage = test_run / "06_llm_baselines"
    scores = pd.read_parquet(stage / "scores.parquet")
    # the LLMs read the fine-tuned systems' turns; params/test adds the paper's 10-turn prompt as marked extra rows
    assert set(scores["method"]) == {"smollm2-chat", "gemma3-270m-completion", "smollm2-chat-paper10",
                                     "gemma3-270m-completion-paper10", "smollm2-chat-rag",
                                     "gemma3-270m-completion-rag"} and scores["generated"].str.len().gt(0).any()
    assert scores.groupby("method")["user_id"].nunique().eq(12).all()
    exp1 = pd.read_parquet(test_run / "04_exp1_next_utterance" / "scores.parquet")
    test_pairs = exp1.drop_duplicates(["split_set", "pair_id"])
    for _, rows in scores.groupby("method"):  # every test pair scored, one reply per user (params/test)
        assert len(rows) == len(test_pairs) and rows["bits_per_char"].notna().all()
        assert rows[rows["generated"].notna()].groupby("user_id").size().eq(1).all()
        assert rows.loc[rows["generated"].isna(), "similarity"].isna().all()
    metrics = json.loads((stage / "metrics.json").read_text())["metrics"]
    read = metrics["history_read"]["chitchat"]
    assert metrics["extra_methods"] == ["smollm2-chat-paper10", "gemma3-270m-completion-paper10"]
    assert metrics["rag_methods"] == ["smollm2-chat-rag", "gemma3-270m-completion-rag"]
    # the RAG prompt is the plain one plus the user's retrieved own training pairs
    assert read["smollm2-chat-rag"]["prompt_tokens"] > read["smollm2-chat"]["prompt_tokens"]
    assert read["smollm2-chat"]["turns"] == read["fine-tuned psp"]["turns"] < read["smollm2-chat-paper10"]["turns"]
    # the same words; a newest turn cut inside re-tokenizes its first, cut word a token or so differently
    assert read["smollm2-chat"]["tokens"] == pytest.approx(read["fine-tuned psp"]["tokens"], abs=0.5)
    tested = pd.read_csv(stage / "significance_vs_llm.csv")["label_b"]  # "llm/<method>"
    assert tested.eq("llm/smollm2-chat").any() and not tested.str.endswith(("-paper10", "-rag")).any()  # C1: plain
    assert "Prompt LLM" in (stage / "table3_chitchat.md").read_text()
    assert (stage / "figures" / "figure2.png").stat().st_size > 0 and (stage / "figures" / "figure2.pdf").exists()
    rebuilt = rebuild_figure2(test_run, tmp_path)  # from the saved scores alone
    assert {p.name for p in rebuilt} == {"figure2.png", "figure2.pdf", "figure2_histogram.csv"}
    report = (test_run / "report.md").read_text()
    for needed in ("Table 1 analog", "Table 2 analog", "Table 3 analog: chitchat", "Table 6 analog", "Table 7 analog",
                   "figure2.png", "**C1**", "**C5**", "### Q3a:", "### Q3b:", "of wall time"):
        assert needed in report, needed


@pytest.fixture(scope="module")
def causal_run(test_run: Path, tmp_path_factory) -> Path:
    """Stages 02-05 again on the test profile with `model_family: causal` (a tiny Llama-style LM built from
    the test preset), reusing the T5 run's corpus and profiles."""
    root = tmp_path_factory.mktemp("causal")
    params = root / "params"
    shutil.copytree(repo_root() / "params" / "test", params)
    with (params / "02_pretrain_models.yaml").open("a", encoding="utf-8") as handle:
        handle.write("model_family: causal\n")
    with (params / "03_finetune_users.yaml").open("a", encoding="utf-8") as handle:  # the cpu profile's path
        handle.write("lora_learning_rates: [1.0e-6, 1.0e-2]\nlora_sweep_users: 2\nlora_training: per_user\n"
                     "methods: [one_id, lora, full]\npeft_methods: {}\n")  # the paper's methods: the cpu path
    outputs = root / "test"
    for stage in ("00_prepare_corpus", "01_infer_profiles"):
        shutil.copytree(test_run / stage, outputs / stage)
    for stage in ("02", "03", "04", "05"):
        [result] = run_pipeline("test", only=stage, params_dir=params, outputs_root=outputs)
        assert result.status == "ran", stage
    return outputs


def test_causal_family_runs_stages_02_to_05(causal_run: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from udg_lib.families import CAUSAL, family_of
    from udg_lib.finetuning import DONE_FILE, user_dir

    pretrained = metrics(causal_run, "02_pretrain_models")["metrics"]
    assert pretrained["model_family"] == "causal" and pretrained["models"]["plain_t5"]["steps"] == 6
    for name in ("psp", "ppp"):  # the conditioning check's paired test ran
        assert 0 <= pretrained["profile_conditioning"][name]["p_value"] <= 1
    stage = causal_run / "03_finetune_users"
    condition = stage / "tbbt" / "set0" / "psp"
    da = AutoModelForCausalLM.from_pretrained(condition / "da" / "model")
    assert family_of(da) is CAUSAL and json.loads((condition / "da" / DONE_FILE).read_text())["family"] == "causal"
    users = pd.read_csv(causal_run / "00_prepare_corpus" / "tbbt" / "eval_users.csv", dtype=str)
    adapter = user_dir(condition / "lora", users["user_id"].iloc[0]) / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    PeftModel.from_pretrained(da, adapter)
    summaries = pd.read_parquet(stage / "training_summaries.parquet")
    assert (summaries["n_train"] > 0).all() and (summaries["epochs_run"] >= 1).all()
    sweep = pd.read_csv(stage / "lora_lr_sweep.csv")  # chosen on 2 users' dev loss, in the first condition
    assert sweep["user_id"].nunique() == 2 and set(sweep["learning_rate"]) == {1e-6, 1e-2}
    chosen = metrics(causal_run, "03_finetune_users")["metrics"]["lora_learning_rate"]
    assert chosen == sweep.groupby("learning_rate")["best_dev_loss"].mean().idxmin()
    for condition_dir in (stage / "tbbt" / "set0").iterdir():  # every condition's adapters trained at that rate
        records = [json.loads(p.read_text()) for p in (condition_dir / "lora").glob(f"*/{DONE_FILE}")]
        assert records and all(r["config"]["learning_rate"] == chosen for r in records)
    scores = pd.read_parquet(causal_run / "04_exp1_next_utterance" / "scores.parquet")
    assert {("psp", "lora"), ("ppp", "full"), ("plain_t5", "one_id"), ("plain_dialogue", "da")} <= set(
        zip(scores["pretrain"], scores["method"]))
    table = pd.read_csv(causal_run / "04_exp1_next_utterance" / "table3_chitchat.csv")
    assert len(table) == 17 and (table["perplexity"].dropna() > 1).all()
    table7 = pd.read_csv(causal_run / "05_exp2_diversity" / "table7.csv", index_col=0)
    assert len(table7) == 9


def test_second_run_skips_up_to_date_stages(test_run: Path):
    results = run_pipeline("test", outputs_root=test_run)
    assert {r.status for r in results} == {"skipped"}


# A tqdm bar as its text shows it, from the start of its line: "generate smollm2:  46%|████▌     | 6/13 [...]".
BAR_STATE = re.compile(r"[^\n\r]*?(\d+)%\|[^|\n]*\| *(\d+)/(\d+) \[")


def test_saved_progress_bars_read_their_final_state(test_run: Path):
    """Opened untrusted (on another machine), an executed copy shows outputs as saved: every progress bar of a
    finished loop must read its final state there, never the "0%" first state of a widget's text fallback."""
    bars = []
    for executed in sorted(test_run.glob("*/[0-9][0-9]_*.ipynb")):
        notebook = json.loads(executed.read_text(encoding="utf-8"))
        for cell in notebook["cells"]:
            for output in cell.get("outputs", []):
                text = "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
                for state in BAR_STATE.finditer(text):
                    bars.append(state[0])
                    assert state[1] == "100" and state[2] == state[3], (executed.name, state[0])
    assert any(bar.startswith("generate+score smollm2: 100%|██████████| ") for bar in bars), bars


def test_an_executed_copy_reruns_in_its_own_folder_with_the_same_results(test_run: Path, tmp_path: Path):
    """The executed copy's parameters name the stage's final folder, so papermill (or JupyterLab) rerunning it
    there reproduces the stage in place. Run on a copy of the outputs, with the stage rerun by the runner first
    so that its executed copy names the copy's folder."""
    import papermill

    outputs = Path(shutil.copytree(test_run, tmp_path / "test"))
    stage = outputs / "05_exp2_diversity"
    [result] = run_pipeline("test", only="05", force=True, outputs_root=outputs)
    assert result.run_key == metrics(test_run, "05_exp2_diversity")["stage"]["run_key"]
    executed = stage / "05_exp2_diversity.ipynb"
    [injected] = [c for c in json.loads(executed.read_text())["cells"] if "injected-parameters" in c["metadata"]["tags"]]
    assert f'output_dir = "{stage}"\n' in injected["source"] and f'outputs_root = "{outputs}"\n' in injected["source"]
    before = metrics(outputs, "05_exp2_diversity")
    table7 = pd.read_csv(stage / "table7.csv", index_col=0)
    (stage / "table7.csv").unlink()

    papermill.execute_notebook(executed, executed, kernel_name="python3", cwd=stage, progress_bar=False)
    after = metrics(outputs, "05_exp2_diversity")
    assert after["metrics"] == before["metrics"] == metrics(test_run, "05_exp2_diversity")["metrics"]
    assert after["stage"] == before["stage"]  # the runner's record stands: the stage is reproduced
    pd.testing.assert_frame_equal(pd.read_csv(stage / "table7.csv", index_col=0), table7)
    assert not [path.name for path in outputs.iterdir() if path.name.startswith(".")]  # nothing hidden written
    assert {result.status for result in run_pipeline("test", outputs_root=outputs)} == {"skipped"}


def test_malformed_generic_corpus_fails_in_one_line_and_writes_nothing(tmp_path: Path, capsys):
    bad = tmp_path / "turns.jsonl"
    bad.write_text('{"dialogue_id": "d1", "turn_index": 0, "speaker_id": "a", "text": "hi"}\n'
                   '{"dialogue_id": "d1", "turn_index": 1, "speaker_id": "b"}\n', encoding="utf-8")
    params = tmp_path / "params"
    params.mkdir()
    (params / "00_prepare_corpus.yaml").write_text(yaml.safe_dump({"corpora": [{"format": "generic", "turns": str(bad)}]}))
    outputs = tmp_path / "outputs"
    code = main(["--profile", "mylab", "--params-dir", str(params), "--outputs-root", str(outputs), "--only", "00"])
    assert code == 1
    [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith("udg pipeline:")]
    assert "stage 00_prepare_corpus failed" in line
    assert f"CorpusError: {bad}: line 2: missing field 'text'" in line
    assert not outputs.exists()


def test_every_notebook_is_committed_clean():
    for path in sorted((repo_root() / "notebooks").glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
        assert not any(c.get("outputs") or c.get("execution_count") for c in code), path.name
        assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1, path.name


def test_opening_a_committed_notebook_in_jupyterlab_leaves_it_unmodified():
    """JupyterLab sets the notebook's `kernelspec` (from the `udg` kernel that `make lab` registers) and its
    `language_info` (the kernel's own) when the kernel starts, and marks the notebook modified unless they are
    equal to what the file holds. So the files hold what ipykernel reports on the reference Python (the
    minor version of environment.yml; a reader on another Python sees `version` alone change), written as
    Jupyter writes a notebook, so that saving an unchanged one changes no byte."""
    import nbformat
    from ipykernel.ipkernel import IPythonKernel

    python = re.search(r"- python=(\d+\.\d+)\n", (repo_root() / "environment.yml").read_text())[1]
    versions = set()
    for path in sorted((repo_root() / "notebooks").glob("*.ipynb")):
        metadata = json.loads(path.read_text())["metadata"]
        assert metadata["kernelspec"] == {"display_name": "udg (.venv)", "language": "python", "name": "udg"}, path.name
        info = metadata["language_info"]
        assert {**info, "version": None} == {**IPythonKernel.language_info, "version": None}, path.name
        assert info["version"].startswith(f"{python}."), (path.name, info["version"])
        versions.add(info["version"])
        assert path.read_text() == nbformat.writes(nbformat.read(path, as_version=nbformat.NO_CONVERT)) + "\n"
    assert len(versions) == 1, versions  # one Python for all of them


def _generic_corpus(folder: Path, n_users: int, n_dialogues: int) -> Path:
    from conftest import synthetic_turns

    path = folder / f"turns_{n_users}x{n_dialogues}.jsonl"
    turns = synthetic_turns(n_users=n_users, n_dialogues=n_dialogues, turns_per_dialogue=8, seed=n_users)
    path.write_text("".join(json.dumps(r) + "\n" for r in turns.drop(columns="timestamp").to_dict("records")),
                    encoding="utf-8")
    return path


def test_a_corpus_without_evaluation_users_is_one_clear_line(tmp_path: Path, capsys):
    params = tmp_path / "params"
    params.mkdir()
    few = _generic_corpus(tmp_path, 6, 10)  # ~13 turns per speaker: nobody reaches min_turns
    (params / "00_prepare_corpus.yaml").write_text(yaml.safe_dump(
        {"corpora": [{"format": "generic", "turns": str(few), "name": "few"}], "vocab_size": 400}))
    code = main(["--profile", "few", "--params-dir", str(params), "--outputs-root", str(tmp_path / "out"),
                 "--only", "00"])
    assert code == 1
    [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith("udg pipeline:")]
    assert "few: no evaluation user: of 6 speakers, 6 have fewer than min_turns=100 turns" in line


def test_a_corpus_without_evaluation_users_beside_another_warns_and_counts(tmp_path: Path, capsys):
    params = tmp_path / "params"
    params.mkdir()
    few, many = _generic_corpus(tmp_path, 6, 10), _generic_corpus(tmp_path, 12, 160)
    (params / "00_prepare_corpus.yaml").write_text(yaml.safe_dump(
        {"corpora": [{"format": "generic", "turns": str(many), "name": "many"},
                     {"format": "generic", "turns": str(few), "name": "few"}], "vocab_size": 400}))
    outputs = tmp_path / "out"
    code = main(["--profile", "mix", "--params-dir", str(params), "--outputs-root", str(outputs), "--only", "00"])
    assert code == 0
    table2 = pd.read_csv(outputs / "00_prepare_corpus" / "table2.csv").set_index("dataset")
    assert table2.loc["few", "N users"] == 0 and table2.loc["few", "excl. few turns"] == 6
    assert table2.loc["many", "N users"] > 0 and table2.loc["many", "speakers"] == 12
    log = (outputs / "00_prepare_corpus" / "00_prepare_corpus.ipynb").read_text()
    assert "WARNING few: no evaluation user" in log
