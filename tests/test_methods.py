"""The methods package and the conditions the stages loop over: a run's method list, its record, the cell,
and a generic peft method (IA3) trained per user from its config alone."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
import torch

from conftest import sentences
from udg_lib import finetuning as ft
from udg_lib import methods as mth
from udg_lib import conditions as cd
from udg_lib.conditions import Cell, generated_pair_ids
from udg_lib.data.schema import PROFILE_FIELDS
from udg_lib.families import t5_config
from udg_lib.pretraining import build_model

USERS = ("u0", "u1")


def _pairs(split_set: int = 0) -> pd.DataFrame:
    texts = iter(sentences(80, seed=11))
    return pd.DataFrame([{"pair_id": f"{user}-{split}-{i}", "speaker_id": user, "partner_id": "x",
                          "context": [next(texts)], "response": next(texts), "split": split, "split_set": split_set}
                         for user in USERS for split, n in (("train_ft", 6), ("dev", 2), ("test", 3))
                         for i in range(n)])


def _users() -> pd.DataFrame:
    return pd.DataFrame({"user_id": list(USERS), **{f: "unknown" for f in PROFILE_FIELDS}})


def test_build_methods_puts_da_first_in_table_order_and_refuses_taken_names():
    built = mth.build_methods(["full", "lora"], {"ia3": {"peft_type": "IA3", "label": "IA3"}})
    assert [m.name for m in built] == ["da", "lora", "full", "ia3"]  # DA first, then the tables' order
    assert built[-1].label == "IA3" and not built[-1].paper and built[-1].user_specific
    assert [m.name for m in mth.build_methods([])] == ["da"]
    with pytest.raises(ValueError, match="belong to the study's methods"):
        mth.build_methods(["lora"], {"lora": {"peft_type": "IA3"}})
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        mth.build_methods(["dora"])
    with pytest.raises(ValueError, match="needs a peft_type"):
        mth.build_methods([], {"prefix": {"num_virtual_tokens": 8}})


def test_a_run_records_its_methods_and_later_stages_rebuild_them():
    built = mth.build_methods(["one_id", "lora", "full"], {"ia3": {"peft_type": "IA3", "label": "IA3"}})
    records = json.loads(json.dumps([m.record for m in built]))  # as metrics.json keeps them
    again = mth.from_records(records)
    assert [type(m) for m in again] == [type(m) for m in built] and [m.name for m in again] == [m.name for m in built]
    assert again[1] is mth.ONE_ID and again[-1].peft == {"peft_type": "IA3"}
    assert mth.from_records(None) == list(mth.PAPER_METHODS)  # a stage 03 from before methods were recorded
    assert mth.labels_of(again)["ia3"] == "IA3" and mth.labels_of(again)["retrieval"] == "Retrieval (own turns)"


def test_method_names_load_without_the_model_libraries():
    """Tables, figures and the judge name systems from `methods.names`: reading it imports no torch."""
    import subprocess

    script = ("import sys; from udg_lib.methods import FINE_TUNED, LABELS, method_order; "
              "assert 'torch' not in sys.modules, 'torch imported'; print(method_order(), FINE_TUNED)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "['da', 'one_id', 'lora', 'full', 'retrieval']" in result.stdout


def test_a_cell_holds_one_split_set_and_its_users():
    pairs = _pairs()
    cell = Cell(pairs, _users(), ["u1", "u0"], "psp", "d", 0)
    assert cell.user_ids == ("u1", "u0") and cell.fmt == "psp" and cell.condition("lora").method == "lora"
    assert len(cell.test) == 6 and set(cell.test["split"]) == {"test"}
    assert cell.generated_ids(2, 0) == generated_pair_ids(pairs, ["u0", "u1"], 2, 0, "d", 0)
    assert cell.with_users(["u0"]).user_ids == ("u0",) and set(cell.train_pairs("u0")["split"]) == {"train_ft"}
    assert cell.with_users(["u1", "u0"]).user_ids == ("u1", "u0")  # the order given: a Ray task's chunk keeps it
    with pytest.raises(ValueError, match="one split set"):
        Cell(pd.concat([pairs, _pairs(1)]), _users(), USERS)
    with pytest.raises(TypeError, match="not the string"):
        Cell(pairs, _users(), "u0")
    with pytest.raises(ValueError, match="no prompt format"):
        _ = Cell(pairs, _users(), USERS).fmt  # a data-only cell has no pre-trained model
    with pytest.raises(ValueError, match="no stage 03 folder"):
        Cell(pairs, _users(), USERS).path("da")


def _prepared(tmp_path) -> tuple:
    """Stage 00's and stage 01's files for dataset "d" ("ja"): eval users u0-u2 (u2 has no pairs in set 1) and
    one partner who is no evaluation user, in two split sets."""
    prepared, users_dir = tmp_path / "00", tmp_path / "01"
    (prepared / "d" / "corpus").mkdir(parents=True)
    (prepared / "d" / "corpus" / "meta.json").write_text(json.dumps({"language": "ja"}))
    (prepared / "d" / "eval_users.csv").write_text("user_id,one_id,n_turns\nu0,0042,10\nu1,aB3x,12\nu2,Qz9k,9\n")
    pairs = pd.concat([_pairs(0), _pairs(1), _pairs(0).assign(speaker_id="u2", split_set=0,
                                                               pair_id=lambda f: "u2" + f["pair_id"])])
    pairs.to_parquet(prepared / "d" / cd.EVAL_PAIRS_FILE)
    users_dir.mkdir()
    for split_set in (0, 1):
        profiles = pd.DataFrame({"user_id": ["u0", "u1", "u2", "partner"],
                                 **{f: f"set{split_set}" for f in PROFILE_FIELDS}})
        profiles.to_parquet(cd.users_table_path(users_dir, "d", split_set))
    return prepared, users_dir


def test_cells_loop_over_datasets_split_sets_and_pretrained_models_with_their_data(tmp_path):
    prepared, users_dir = _prepared(tmp_path)
    stage03 = tmp_path / "03"
    found = list(cd.cells(prepared, users_dir, ["d"], [0, 1], ["psp", cd.NO_PRETRAINED], stage03))
    assert [(c.split_set, c.pretrained) for c in found] == [(0, "psp"), (0, "none"), (1, "psp"), (1, "none")]
    first, data_only, later = found[0], found[1], found[2]
    assert first.folder == cd.condition_dir(stage03, "d", 0, "psp") == stage03 / "d" / "set0" / "psp"
    assert data_only.folder is None and first.language == "ja" and first.fmt == "psp"
    assert first.pairs is data_only.pairs and first.users is data_only.users  # one read per (dataset, set)
    assert set(first.pairs["split_set"]) == {0} and set(later.pairs["split_set"]) == {1}
    assert first.user_ids == ("u0", "u1", "u2") and later.user_ids == ("u0", "u1")  # u2: no pairs in set 1
    users = first.users.set_index("user_id")
    assert users.loc["u0", "one_id"] == "0042" and users.loc["partner", "one_id"] == ""  # One-IDs stay strings
    assert users["evaluation"].tolist() == [True, True, True, False] and set(later.users["age_band"]) == {"set1"}
    assert cd.evaluation_user_ids(first.users) == ["u0", "u1", "u2"]
    assert [[c.pretrained for c in group] for group in cd.by_split_set(found)] == [["psp", "none"]] * 2
    assert [c.user_ids for c in cd.cells(prepared, users_dir, ["d"], [0], ["ppp"], max_users=2)] == [("u0", "u1")]
    trained = {"trained_users": {"d": {"0": ["u2", "u0"]}}}  # stage 03's metrics: the users it trained
    assert next(cd.cells(prepared, users_dir, ["d"], [0], ["ppp"], trained=trained)).user_ids == ("u0", "u2")
    with pytest.raises(FileNotFoundError, match="no users table for split set 2"):
        list(cd.cells(prepared, users_dir, ["d"], [2], ["psp"]))


def test_a_peft_method_from_its_config_trains_each_user_and_gives_the_base_back(tokenizer, tmp_path):
    """IA3, named only by a config: one adapter per user in peft's format, a done.json, the base unchanged."""
    torch.set_num_threads(1)
    base = build_model(t5_config("test", len(tokenizer)), tokenizer, seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ia3 = mth.PeftMethod("ia3", {"peft_type": "IA3"}, "IA3")
    config = ft.FinetuneConfig(batch_size=4, max_epochs=2, max_source_length=32, max_target_length=16)
    cell = Cell(_pairs(), _users(), USERS, fmt_override="psp")
    table = ft.run_users(ia3, base, tokenizer, cell, tmp_path, config, ft.UserTrainingOptions(progress=False))
    assert table["status"].tolist() == ["trained", "trained"] and (table["trainable_parameters"] > 0).all()
    for user in USERS:
        folder = ft.user_dir(tmp_path, user)
        adapter = json.loads((folder / ft.ADAPTER_DIR / "adapter_config.json").read_text())
        assert adapter["peft_type"] == "IA3" and adapter["task_type"] == "SEQ_2_SEQ_LM"
        assert json.loads((folder / ft.DONE_FILE).read_text())["method"] == "ia3"
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("ia3" in name for name, _ in base.named_modules())  # unwrapped
    again = ft.run_users(ia3, base, tokenizer, cell, tmp_path, config, ft.UserTrainingOptions(progress=False))
    assert again["status"].tolist() == ["skipped", "skipped"]  # resumable, as every per-user method
