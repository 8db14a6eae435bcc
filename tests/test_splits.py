import pandas as pd
import pytest

from conftest import synthetic_turns
from udg_lib.splits import (
    SplitConfig,
    assign_user_dialogues,
    build_reply_pairs,
    dialogue_partners,
    select_eval_users,
    split_corpus,
    table2_row,
)

import numpy as np


def test_reply_pairs_take_up_to_n_previous_turns():
    turns = synthetic_turns(n_dialogues=2, turns_per_dialogue=6)
    pairs = build_reply_pairs(turns, context_turns=3)
    assert len(pairs) == 2 * 5  # every turn but the first of each dialogue
    last = pairs[(pairs["dialogue_id"] == "d000") & (pairs["turn_index"] == 5)].iloc[0]
    assert list(last["context"]) == [f"{s} says turn {t} of d000" for s, t in
                                     zip(turns.loc[2:4, "speaker_id"], range(2, 5))]
    assert last["context_first_turn"] == 2
    assert last["partner_id"] == turns.loc[4, "speaker_id"] != last["speaker_id"]


def test_partner_is_the_other_speaker_with_most_turns():
    turns = pd.DataFrame({"dialogue_id": ["d"] * 5 + ["solo"], "turn_index": [0, 1, 2, 3, 4, 0],
                          "speaker_id": ["a", "b", "c", "b", "a", "z"], "text": list("abcdef")})
    partners = dialogue_partners(turns).set_index(["dialogue_id", "user_id"])["partner_id"]
    assert partners[("d", "a")] == "b" and partners[("d", "b")] == "a" and partners[("d", "c")] == "a"
    assert partners[("solo", "z")] == ""


def test_eval_users_respect_turn_range_and_sample():
    turns = synthetic_turns()
    counts = turns.groupby("speaker_id").size()
    config = SplitConfig(min_turns=int(counts.median()), max_turns=int(counts.max()) - 1)
    users = select_eval_users(turns, config)
    assert users and all(config.min_turns <= counts[u] <= config.max_turns for u in users)
    sample = select_eval_users(turns, SplitConfig(min_turns=1, max_turns=None, max_users=3, seed=1))
    assert len(sample) == 3 and sample == select_eval_users(turns, SplitConfig(min_turns=1, max_turns=None, max_users=3, seed=1))


@pytest.fixture(scope="module")
def split():
    turns = synthetic_turns(n_users=30, n_dialogues=400, seed=3)
    counts = turns.groupby("speaker_id").size()
    config = SplitConfig(min_turns=int(counts.quantile(0.6)), max_turns=None, n_sets=3, context_turns=3, seed=5)
    return turns, config, *split_corpus(turns, config)


def test_pretraining_never_sees_an_evaluation_user(split):
    turns, config, pretrain, eval_pairs, eval_users, report = split
    assert eval_users and len(pretrain) > 0
    eval_dialogues = set(turns.loc[turns["speaker_id"].isin(eval_users), "dialogue_id"])
    assert not set(pretrain["dialogue_id"]) & eval_dialogues
    assert not set(pretrain["speaker_id"]) & set(eval_users)
    assert report["n_pretrain_pairs"] == len(pretrain)


def test_thirty_percent_of_partners_are_held_out(split):
    turns, config, pretrain, eval_pairs, eval_users, report = split
    partners = dialogue_partners(turns)
    for (split_set, user), group in eval_pairs.groupby(["split_set", "speaker_id"]):
        partner_of = partners[partners["user_id"] == user].set_index("dialogue_id")["partner_id"]
        all_partners = set(partner_of)
        heldout = set(partner_of[group.loc[group["split"].isin(["dev", "test"]), "dialogue_id"]])
        expected = min(max(2, round(0.3 * len(all_partners))), len(all_partners) - 1)
        assert len(heldout) == expected
        training = set(partner_of[group.loc[group["split"].isin(["train_da", "train_ft"]), "dialogue_id"]])
        assert not heldout & training  # a held-out partner's dialogues are all held out
        test_partners = set(partner_of[group.loc[group["split"] == "test", "dialogue_id"]])
        dev_partners = set(partner_of[group.loc[group["split"] == "dev", "dialogue_id"]])
        assert test_partners and dev_partners and not test_partners & dev_partners


def test_training_part_is_halved_by_dialogue(split):
    turns, config, pretrain, eval_pairs, eval_users, report = split
    for (split_set, user), group in eval_pairs.groupby(["split_set", "speaker_id"]):
        da = group[group["split"] == "train_da"]
        ft = group[group["split"] == "train_ft"]
        assert not set(da["dialogue_id"]) & set(ft["dialogue_id"])
        assert len(da) and len(ft)


def test_halves_are_balanced_in_pair_counts():
    rng = np.random.default_rng(4)
    sizes = {f"d{i}": int(n) for i, n in enumerate(rng.integers(1, 12, size=40))}
    partner_of = {d: f"p{i % 10}" for i, d in enumerate(sizes)}
    assignment = assign_user_dialogues(partner_of, sizes, 0.3, rng)
    halves = {h: sum(sizes[d] for d, s in assignment.items() if s == h) for h in ("train_da", "train_ft")}
    assert abs(halves["train_da"] - halves["train_ft"]) <= max(sizes.values())


def test_sets_differ_and_are_reproducible(split):
    turns, config, pretrain, eval_pairs, eval_users, report = split
    by_set = [frozenset(g.loc[g["split"] == "test", "pair_id"]) for _, g in eval_pairs.groupby("split_set")]
    assert len(set(by_set)) == config.n_sets
    again = split_corpus(turns, config)[1]
    pd.testing.assert_frame_equal(eval_pairs.drop(columns="context"), again.drop(columns="context"))


def test_no_heldout_reply_reaches_training_inputs():
    # Two evaluation users talk to each other: one's test reply would sit in the other's training context.
    turns = synthetic_turns(n_users=6, n_dialogues=200, seed=1)
    config = SplitConfig(min_turns=1, max_turns=None, n_sets=2, context_turns=4)
    _, eval_pairs, _, report = split_corpus(turns, config)
    for split_set, group in eval_pairs.groupby("split_set"):
        heldout = set(zip(*[group.loc[group["split"].isin(["dev", "test"]), c] for c in ("dialogue_id", "turn_index")]))
        training = group[group["split"].isin(["train_da", "train_ft"])]
        for row in training.itertuples():
            assert not any((row.dialogue_id, t) in heldout for t in range(row.context_first_turn, row.turn_index))
    assert sum(report["dropped_leaky_training_pairs"].values()) > 0


def test_assign_user_dialogues_keeps_a_training_partner():
    rng = np.random.default_rng(0)
    assignment = assign_user_dialogues({"d1": "a", "d2": "b", "d3": "c", "d4": ""}, {}, 0.3, rng)
    assert sorted(assignment.values()).count("test") == 1 and list(assignment.values()).count("dev") == 1
    assert assignment["d4"] in ("train_da", "train_ft")


def test_table2_row_averages_per_user(split):
    turns, config, pretrain, eval_pairs, eval_users, report = split
    row = table2_row("synthetic", {"user_kind": "Real", "domain": "open", "style": "text chat"}, eval_pairs, len(eval_users))
    per_set = eval_pairs[eval_pairs["split"].str.startswith("train")].groupby("split_set").size()
    assert row["N users"] == len(eval_users)
    assert row["N all train"] == round(per_set.mean())
    assert row["N train / user"] == pytest.approx(per_set.mean() / len(eval_users), abs=0.06)


def test_max_pairs_per_split_caps_each_users_split_with_a_seeded_sample(turns):
    full = split_corpus(turns, SplitConfig(min_turns=1, max_turns=None))[1]
    capped = split_corpus(turns, SplitConfig(min_turns=1, max_turns=None, max_pairs_per_split=2))[1]
    sizes = capped.groupby(["split_set", "speaker_id", "split"]).size()
    assert sizes.max() <= 2 and len(capped) < len(full)
    # a sample of the uncapped rows (same pair ids, same splits), and the same sample on a rerun
    merged = capped.merge(full, on=["split_set", "pair_id"], suffixes=("", "_full"))
    assert len(merged) == len(capped) and (merged["split"] == merged["split_full"]).all()
    again = split_corpus(turns, SplitConfig(min_turns=1, max_turns=None, max_pairs_per_split=2))[1]
    assert again.equals(capped)


def test_the_test_split_may_keep_its_own_cap(turns):
    capped = split_corpus(turns, SplitConfig(min_turns=1, max_turns=None, max_pairs_per_split=2))[1]
    more = split_corpus(turns, SplitConfig(min_turns=1, max_turns=None, max_pairs_per_split=2, max_test_pairs=4))[1]
    every = split_corpus(turns, SplitConfig(min_turns=1, max_turns=None, max_pairs_per_split=2, max_test_pairs=0))[1]
    sizes = more.groupby(["split_set", "speaker_id", "split"]).size()
    assert sizes.drop("test", level="split").max() <= 2 and sizes.xs("test", level="split").max() == 4
    assert (every["split"] == "test").sum() > (more["split"] == "test").sum() > (capped["split"] == "test").sum()
    assert SplitConfig(max_pairs_per_split=3).split_caps()["test"] == 3
    assert SplitConfig(max_pairs_per_split=3, max_test_pairs=0).split_caps() == {
        "train_da": 3, "train_ft": 3, "dev": 3, "test": 0}
