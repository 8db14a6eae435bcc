"""No test information in any model input (issue: valid evidence, §1): profiles per split set, heads that
truncation never cuts, evaluation units with real training data."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import synthetic_turns
from udg_lib import profiles
from udg_lib.data.prepare import require_eval_users
from udg_lib.data.schema import PROFILE_FIELDS, normalize_users
from udg_lib.finetuning import check_evaluation_unit
from udg_lib.encoding import encode_sources
from udg_lib.prompts import PROMPT_FORMATS, build_prompt, build_prompts
from udg_lib.splits import (MIN_PARTNERS, REQUIRED_SPLITS, SplitConfig, eligibility, no_eval_users_message,
                            split_corpus, table2_row)

DISCLOSURE = "I work as a pilot"


# --- evaluation units ---------------------------------------------------------------------------------------


def _turns_with_two_partner_user() -> pd.DataFrame:
    """synthetic dialogues plus `solo`, who talks (a lot) with exactly two partners."""
    turns = synthetic_turns(n_users=10, n_dialogues=200, seed=1)
    extra = []
    for d in range(30):
        partner = ("u00", "u01")[d % 2]
        for t in range(8):
            speaker = ("solo", partner)[t % 2]
            extra.append({"dialogue_id": f"s{d:03d}", "turn_index": t, "speaker_id": speaker,
                          "text": f"{speaker} says {t} in s{d:03d}", "timestamp": ""})
    return pd.concat([turns, pd.DataFrame(extra)], ignore_index=True)


def test_users_with_fewer_than_three_partners_are_not_eligible_and_are_counted():
    turns = _turns_with_two_partner_user()
    users, counts = eligibility(turns, SplitConfig(min_turns=50, max_turns=None))
    assert "solo" not in users and users
    assert counts["excluded_few_partners"] >= 1 and MIN_PARTNERS == 3
    assert counts["speakers"] == turns["speaker_id"].nunique()
    assert (counts["excluded_below_min_turns"] + counts["excluded_above_max_turns"] + counts["excluded_few_partners"]
            + counts["eligible"]) == counts["speakers"]


@pytest.fixture(scope="module")
def split():
    turns = synthetic_turns(n_users=14, n_dialogues=160, turns_per_dialogue=6, seed=7)
    config = SplitConfig(min_turns=40, max_turns=None, n_sets=3, context_turns=3, seed=2, max_pairs_per_split=4)
    return turns, config, *split_corpus(turns, config)


def test_every_user_of_every_set_has_fine_tuning_dev_and_test_pairs(split):
    turns, config, pretrain, eval_pairs, eval_users, report = split
    assert eval_users
    for (split_set, user), group in eval_pairs.groupby(["split_set", "speaker_id"]):
        assert set(REQUIRED_SPLITS) <= set(group["split"]), (split_set, user)
    for split_set, missing in report["users_left_out"].items():
        kept = set(eval_pairs.loc[eval_pairs["split_set"] == split_set, "speaker_id"])
        assert not kept & set(missing)
        assert kept | set(missing) == set(eval_users)


def test_users_without_dev_pairs_in_a_set_are_left_out_and_reported():
    turns = synthetic_turns(n_users=14, n_dialogues=160, turns_per_dialogue=6, seed=7)
    config = SplitConfig(min_turns=40, max_turns=None, n_sets=1, context_turns=3, seed=2)
    _, full, users, _ = split_corpus(turns, config)
    victim = users[0]
    dev_dialogues = set(full.loc[(full["speaker_id"] == victim) & (full["split"] == "dev"), "dialogue_id"])
    # the victim never speaks in their dev dialogues any more: no dev pair, so no early stopping possible
    cut = turns[~(turns["dialogue_id"].isin(dev_dialogues) & (turns["speaker_id"] == victim)
                  & (turns["turn_index"] > 0))]
    _, pairs, users_after, report = split_corpus(cut, config)
    if victim in users_after:  # still eligible by turns and partners
        assert victim in report["users_left_out"][0] and "dev" in report["users_left_out"][0][victim]
        assert victim not in set(pairs["speaker_id"])
        row = table2_row("x", {}, pairs, len(users_after), report)
        assert row["user-sets left out (no train/dev/test)"] >= 1


def test_table2_counts_the_users_each_rule_excluded(split):
    turns, config, pretrain, eval_pairs, eval_users, report = split
    row = table2_row("synthetic", {}, eval_pairs, len(eval_users), report)
    assert row["speakers"] == turns["speaker_id"].nunique()
    assert row["excl. few turns"] == report["eligibility"]["excluded_below_min_turns"]
    assert f"excl. < {MIN_PARTNERS} partners" in row


def test_a_corpus_without_evaluation_users_says_which_rule_excluded_everyone():
    turns = synthetic_turns(n_users=6, n_dialogues=10)
    config = SplitConfig(min_turns=500, max_turns=None)
    _, pairs, users, report = split_corpus(turns, config)
    assert users == [] and pairs.empty
    message = no_eval_users_message("tiny", config, report["eligibility"])
    assert message.startswith("tiny: no evaluation user") and "6 have fewer than min_turns=500" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="^tiny: no evaluation user"):
        require_eval_users([{"warning": message}])
    assert require_eval_users([{"warning": message}, {"warning": None}]) == [message]


def test_a_user_without_fine_tuning_pairs_is_never_trained(split):
    turns, config, pretrain, eval_pairs, eval_users, report = split
    pairs = eval_pairs[eval_pairs["split_set"] == 0]
    user = pairs["speaker_id"].iloc[0]
    check_evaluation_unit(pairs, user)  # a real unit passes
    with pytest.raises(ValueError, match="no train_ft pairs"):
        check_evaluation_unit(pairs[~((pairs["speaker_id"] == user) & (pairs["split"] == "train_ft"))], user)


# --- profiles without test information ----------------------------------------------------------------------


def _plant(turns: pd.DataFrame, user: str, dialogue: str) -> pd.DataFrame:
    """`user`'s last turn of `dialogue` says DISCLOSURE (the dialogue's last turn: no later context shows it)."""
    turns = turns.copy()
    own = turns[(turns["dialogue_id"] == dialogue) & (turns["speaker_id"] == user)]
    last = turns[turns["dialogue_id"] == dialogue]["turn_index"].max()
    index = own[own["turn_index"] == own["turn_index"].max()].index[0]
    if turns.at[index, "turn_index"] != last:  # make it the last turn
        turns = turns[~((turns["dialogue_id"] == dialogue) & (turns["turn_index"] > turns.at[index, "turn_index"]))]
    turns.loc[index, "text"] = DISCLOSURE
    return turns


def _prompts_of_set(turns, config, split_set):
    _, pairs, eval_users, report = split_corpus(turns, config)
    heldout = report["heldout_dialogues"]
    users = normalize_users(pd.DataFrame({"user_id": sorted(turns["speaker_id"].unique())}))
    _, _, by_set = profiles.profiles_by_split_set(turns, users, profiles.MarkovLogicInferrer(), heldout,
                                                  profiles.Voting(unit_size=5, threshold=0.5), progress=False)
    table = by_set[split_set]
    set_pairs = pairs[pairs["split_set"] == split_set]
    rendered = pd.concat([build_prompts(set_pairs, table, fmt) for fmt in PROMPT_FORMATS])
    return pairs, heldout, table.set_index("user_id"), rendered


@pytest.fixture(scope="module")
def planted_setup():
    turns = synthetic_turns(n_users=10, n_dialogues=150, turns_per_dialogue=6, seed=11)
    config = SplitConfig(min_turns=40, max_turns=None, n_sets=2, context_turns=3, seed=4)
    _, pairs, eval_users, report = split_corpus(turns, config)
    return turns, config, pairs, eval_users, report["heldout_dialogues"]


def test_a_disclosure_in_test_turns_reaches_no_prompt(planted_setup):
    turns, config, pairs, eval_users, heldout = planted_setup
    user = eval_users[0]
    test_dialogues = heldout[(heldout["split_set"] == 0) & (heldout["user_id"] == user)
                             & (heldout["split"] == "test")]["dialogue_id"]
    planted = _plant(turns, user, sorted(test_dialogues)[0])
    _, _, table, rendered = _prompts_of_set(planted, config, 0)
    assert table.at[user, "occupation"] == "unknown"
    assert not rendered.str.contains("pilot|professional").any()


def test_the_same_disclosure_in_a_training_turn_reaches_the_profile(planted_setup):
    turns, config, pairs, eval_users, heldout = planted_setup
    user = eval_users[0]
    own = pairs[(pairs["split_set"] == 0) & (pairs["speaker_id"] == user) & (pairs["split"] == "train_ft")]
    planted = _plant(turns, user, sorted(own["dialogue_id"])[0])
    _, _, table, rendered = _prompts_of_set(planted, config, 0)
    assert table.at[user, "occupation"] == "professional"
    assert rendered.str.contains("professional").any()


def test_supplied_profiles_are_kept_for_users_outside_the_inferred_sample():
    users = normalize_users(pd.DataFrame({"user_id": ["a", "b", "c"], "gender": ["male", "female", None]}))
    inferred = pd.DataFrame({"user_id": ["a"], **{f: ["unknown"] for f in PROFILE_FIELDS}})
    inferred["gender"] = ["male"]
    filled = profiles.fill_profiles(users, inferred).set_index("user_id")
    assert filled["gender"].tolist() == ["male", "female", "unknown"]  # b keeps its supplied value


# --- heads that truncation never cuts ------------------------------------------------------------------------


def test_id_and_profile_heads_survive_a_1000_token_context(tokenizer):
    old_turn, new_turn = "cats dogs " * 100, "hello how are you today"
    context = [old_turn] * 5 + [new_turn]  # ~1,000 tokens of context
    speaker = {"age_band": "20s", "gender": "female", "marital": "unknown", "occupation": "unknown",
               "region": "unknown"}
    partner = {**speaker, "age_band": "30s"}
    for fmt in PROMPT_FORMATS:
        for one_id in (None, "Zq7x"):
            prompt = build_prompt(fmt, context, speaker, partner, one_id)
            ids = encode_sources([prompt], tokenizer, 64, one_id_prefix=one_id is not None)[0]
            text = tokenizer.decode(ids, skip_special_tokens=False)
            assert len(ids) <= 64
            if one_id:
                assert text.replace(" ", "").startswith("Zq7x"), fmt
            if fmt != "plain":
                assert "20s" in text and ("[USER]" in text or "[USER1]" in text), fmt
            if fmt == "ppp":
                assert "30s" in text
            assert text.replace("</s>", "").rstrip().endswith(new_turn), (fmt, one_id, text[-80:])
            assert "cats" not in text  # the oldest turns went first, whole (none fits beside the newest)
