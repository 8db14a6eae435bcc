import pandas as pd

from udg_lib.prompts import (
    PROMPT_SPECIAL_TOKENS,
    add_user_id,
    assign_one_ids,
    build_plain_prompt,
    build_ppp_prompt,
    build_prompt,
    build_prompts,
    build_psp_prompt,
    render_profile,
)

SPEAKER = {"age_band": "20s", "gender": "female", "marital": "unknown", "occupation": "college_student", "region": "Utah"}
PARTNER = {"age_band": "30s", "gender": "male", "marital": "married", "occupation": "unknown", "region": "unknown"}
CONTEXT = ["hi, how are you?", "good, you?"]


def test_profile_keeps_known_values_in_field_order():
    assert render_profile(SPEAKER) == "20s, female, college_student, Utah"
    assert render_profile(PARTNER) == "30s, male, married"
    assert render_profile(None) == ""


def test_plain_psp_ppp_formats_match_the_paper():
    assert build_plain_prompt(CONTEXT) == "hi, how are you? [SEP] good, you?"
    assert build_psp_prompt(CONTEXT, SPEAKER) == "[USER] 20s, female, college_student, Utah [SEP] hi, how are you? [SEP] good, you?"
    assert build_ppp_prompt(CONTEXT, SPEAKER, PARTNER) == (
        "[USER1] 20s, female, college_student, Utah [USER2] 30s, male, married [SEP] hi, how are you? [SEP] good, you?")


def test_one_id_is_prepended_to_any_format():
    assert add_user_id("x [SEP] y", "aB3z") == "aB3z x [SEP] y"
    assert build_prompt("psp", ["こんにちは"], SPEAKER, one_id="Q9x1") == "Q9x1 [USER] 20s, female, college_student, Utah [SEP] こんにちは"


def test_special_tokens_are_the_bracketed_markers():
    assert PROMPT_SPECIAL_TOKENS == ("[USER]", "[USER1]", "[USER2]", "[SEP]")


def test_one_ids_are_four_alphanumerics_unique_and_stable():
    users = [f"user{i}" for i in range(3000)]
    ids = assign_one_ids(users, seed=7)
    assert all(len(v) == 4 and v.isalnum() and v.isascii() for v in ids.values())
    assert len(set(ids.values())) == len(users)
    assert assign_one_ids(users[:10], seed=7) == {u: ids[u] for u in users[:10]}  # stable across subsets
    assert assign_one_ids(users[:10], seed=8) != {u: ids[u] for u in users[:10]}


def test_build_prompts_looks_up_speaker_and_partner_profiles():
    users = pd.DataFrame([{"user_id": "a", **SPEAKER}, {"user_id": "b", **PARTNER}])
    pairs = pd.DataFrame({"context": [CONTEXT], "speaker_id": ["a"], "partner_id": ["b"]})
    assert build_prompts(pairs, users, "ppp").iloc[0] == build_ppp_prompt(CONTEXT, SPEAKER, PARTNER)
    assert build_prompts(pairs, users, "psp", {"a": "ZZ99"}).iloc[0].startswith("ZZ99 [USER] 20s")


def test_unknown_profiles_leave_no_double_spaces():
    assert build_psp_prompt(["hi"], {}) == "[USER] [SEP] hi"
    assert build_ppp_prompt(["hi"], None, PARTNER) == "[USER1] [USER2] 30s, male, married [SEP] hi"
