"""Profile inference (§3.3): the cue rules, units, the vote, fitting, corpus-level inference,
evaluation, and the LLM inferrer's prompt and parsing (with fake generate functions)."""

import json
import math
import random

import pandas as pd
import pytest

from udg_lib import profiles

from udg_lib.data.schema import PROFILE_FIELDS, UNKNOWN, normalize_users
from udg_lib.profiles import (
    CUES,
    VOCABULARY,
    LLMProfileInferrer,
    MarkovLogicInferrer,
    Voting,
    evaluate_inference,
    infer_profiles,
    majority_vote,
    normalize_profile_value,
    parse_profile_reply,
    region_of,
    split_into_units,
)

SITCOM_VALUES = {  # every value resources/sitcom_profiles.csv uses
    "age_band": {"20s", "30s", "60s+"},
    "gender": {"female", "male"},
    "marital": {"married", "single"},
    "occupation": {"office_worker", "part_time_worker", "unemployed", "homemaker", "business_owner",
                   "civil_servant", "researcher", "engineer", "entertainer", "professional", "service_worker",
                   "retired"},
    "region": {"New York", "Florida", "California", "Texas", "New Jersey", "India"},
}


@pytest.fixture(scope="module")
def inferrer() -> MarkovLogicInferrer:
    return MarkovLogicInferrer()


def test_vocabulary_covers_the_labelled_table_and_table_1():
    assert set(VOCABULARY) == set(PROFILE_FIELDS)
    assert VOCABULARY["age_band"] == ("10s", "20s", "30s", "40s", "50s", "60s+")
    for field, values in SITCOM_VALUES.items():
        assert values <= set(VOCABULARY[field]), field
    assert {"Kanto", "Kinki", "Tokai", "Kyushu/Okinawa", "Tohoku/Hokkaido", "Chugoku/Shikoku", "Hokuriku",
            "Utah"} <= set(VOCABULARY["region"])
    for cue in CUES:
        assert set(cue.weights) <= set(VOCABULARY[cue.field]), cue.name


@pytest.mark.parametrize(("text", "field", "value"), [
    ("I'm 23 and I love hiking", "age_band", "20s"),
    ("I am 45 years old", "age_band", "40s"),
    ("im 19 wbu", "age_band", "10s"),
    ("I just turned 30!", "age_band", "30s"),
    ("I am in my early sixties now", "age_band", "60s+"),
    ("私は２３歳です", "age_band", "20s"),  # full-width digits
    ("40代の主婦です", "age_band", "40s"),
    ("I'm a senior in high school", "age_band", "10s"),
    ("Oh, my wife loves that show", "gender", "male"),
    ("My husband does the cooking", "gender", "female"),
    ("I'm a girl who likes soccer", "gender", "female"),
    ("夫が料理をしてくれた", "gender", "female"),
    ("俺の嫁がね", "gender", "male"),
    ("僕はそう思う", "gender", "male"),
    ("I'm married with two kids", "marital", "married"),
    ("I'm single and loving it", "marital", "single"),
    ("結婚しています", "marital", "married"),
    ("まだ独身です", "marital", "single"),
    ("I'm a sophomore at BYU", "occupation", "college_student"),
    ("I work as a nurse at the hospital", "occupation", "professional"),
    ("I'm an aerospace engineer", "occupation", "engineer"),
    ("I'm retired, so lots of time", "occupation", "retired"),
    ("I'm a stay-at-home mom", "occupation", "homemaker"),
    ("I'm unemployed right now", "occupation", "unemployed"),
    ("I own a small business downtown", "occupation", "business_owner"),
    ("私は会社員です", "occupation", "office_worker"),
    ("公務員です", "occupation", "civil_servant"),
    ("高校生です", "occupation", "high_school_student"),
    ("I live in Provo", "region", "Utah"),
    ("I'm originally from Texas, and Houston is home", "region", "Texas"),
    ("We moved to L.A. last year", "region", "California"),
    ("東京都に住んでいます", "region", "Kanto"),
    ("大阪出身なんです、大阪が好き", "region", "Kinki"),
    ("札幌在住です", "region", "Tohoku/Hokkaido"),
])
def test_each_attribute_fires_on_its_cue(inferrer, text, field, value):
    assert inferrer.infer_unit([text])[field][0] == value


@pytest.mark.parametrize(("text", "field"), [
    ("大丈夫です、工夫しました", "gender"),  # 夫 inside other words is no husband
    ("I'm 20 minutes late", "age_band"),
    ("I'm 100% sure", "age_band"),
    ("when I was in my twenties", "age_band"),
    ("I'm calling my lawyer", "occupation"),
    ("I'm not a doctor", "occupation"),
    ("I'm a terrible singer", "occupation"),
    ("I'm an aspiring actress", "occupation"),
    ("the Desperate Housewives finale", "occupation"),
    ("I love the smell of rain", "region"),
])
def test_no_cue_fires_on_lookalikes(inferrer, text, field):
    assert inferrer.infer_unit([text], threshold=0.0)[field] == (UNKNOWN, 0.0)


def test_tokyo_to_is_not_kyoto(inferrer):
    assert inferrer.infer_unit(["東京都"], threshold=0.0)["region"][0] == "Kanto"
    assert region_of("東京都") == "Kanto" and region_of("京都") == "Kinki"


def test_circumstantial_cues_need_repeating(inferrer):
    once = inferrer.infer_unit(["my boss called"])["occupation"]
    assert once[0] == UNKNOWN and 0 < once[1] < 0.6
    often = inferrer.infer_unit(["my boss called"] * 7)["occupation"]
    assert often[0] == "office_worker" and often[1] > once[1]


def test_threshold_turns_a_weak_answer_into_unknown(inferrer):
    value, p = inferrer.infer_unit(["my boss called"], threshold=0.1)["occupation"]
    assert value == "office_worker"
    assert inferrer.infer_unit(["my boss called"], threshold=p + 1e-9)["occupation"] == (UNKNOWN, p)
    assert inferrer.infer_unit(["I live in Provo"], threshold=0.999)["region"][0] == UNKNOWN


def test_conflicting_cues_lower_the_confidence(inferrer):
    sure = inferrer.infer_unit(["my wife is here"])["gender"][1]
    torn = inferrer.infer_unit(["my wife is here", "my boyfriend too"], threshold=0.0)["gender"][1]
    assert torn < sure


@pytest.mark.parametrize(("n_posts", "unit_size", "sizes"), [
    (10, 4, [4, 4, 2]),  # a trailing half unit stays
    (9, 4, [4, 5]),  # a shorter one joins the previous unit
    (3, 4, [3]),  # fewer posts than one unit: one unit
    (8, 4, [4, 4]),
    (0, 4, []),
    (301, 150, [150, 151]),
])
def test_split_into_units(n_posts, unit_size, sizes):
    posts = [f"p{i}" for i in range(n_posts)]
    units = split_into_units(posts, unit_size)
    assert [len(u) for u in units] == sizes
    assert [p for u in units for p in u] == posts


def test_split_rejects_a_unit_size_below_one():
    with pytest.raises(ValueError):
        split_into_units(["a"], 0)


def _unit(gender=(UNKNOWN, 0.0), marital=(UNKNOWN, 0.0)):
    return {"age_band": (UNKNOWN, 0.0), "gender": gender, "marital": marital, "occupation": (UNKNOWN, 0.0),
            "region": (UNKNOWN, 0.0)}


def test_majority_vote_ignores_unknown_and_reports_the_share():
    votes = majority_vote([_unit(("male", 0.9)), _unit(("male", 0.7)), _unit(("female", 0.99)), _unit(), _unit()])
    assert votes["gender"] == ("male", pytest.approx(2 / 3))
    assert votes["marital"] == (UNKNOWN, 0.0)


def test_majority_vote_breaks_ties_by_summed_confidence():
    votes = majority_vote([_unit(("male", 0.6)), _unit(("female", 0.9)), _unit(marital=("single", 0.7))])
    assert votes["gender"] == ("female", 0.5)
    assert votes["marital"] == ("single", 1.0)
    assert majority_vote([])["gender"] == (UNKNOWN, 0.0)


def _synthetic_labelled_units(n: int, seed: int) -> tuple[list[list[str]], list[dict]]:
    """Units whose labels the priors get wrong: waiters and people with a boss are part-timers here,
    as in the sitcom table, and "my girlfriend" is said by women of their friends."""
    rng = random.Random(seed)
    units, labels = [], []
    for _ in range(n):
        filler = [f"just chatting about item {rng.randint(0, 999)}" for _ in range(rng.randint(2, 6))]
        if rng.random() < 0.5:
            cues, label = ["I work as a waitress", "my boss was mad"], {"occupation": "part_time_worker",
                                                                         "gender": "female"}
            cues.append(rng.choice(["my girlfriend and I went shopping", "my husband says hi"]))
        else:
            cues, label = [rng.choice(["I'm a nurse", "my patients were kind"])], {"occupation": "professional",
                                                                                   "gender": "male"}
            cues.append(rng.choice(["my wife says hi", "I'm a guy"]))
        units.append(filler + cues)
        labels.append({**label, "marital": UNKNOWN})
    return units, labels


def _accuracy(inferrer: MarkovLogicInferrer, units, labels, field: str) -> float:
    return sum(inferrer.infer_unit(u)[field][0] == lab[field] for u, lab in zip(units, labels)) / len(units)


def test_fit_improves_accuracy_and_round_trips_through_json():
    train_units, train_labels = _synthetic_labelled_units(80, seed=0)
    test_units, test_labels = _synthetic_labelled_units(40, seed=1)
    prior = MarkovLogicInferrer()
    before = {f: _accuracy(prior, test_units, test_labels, f) for f in ("occupation", "gender")}
    fitted = MarkovLogicInferrer().fit(train_units, train_labels, l2=0.1)
    after = {f: _accuracy(fitted, test_units, test_labels, f) for f in ("occupation", "gender")}
    assert before["occupation"] < 0.8 and after["occupation"] == 1.0
    assert after["gender"] > before["gender"]
    assert fitted.models["occupation"].values == ("part_time_worker", "professional")
    assert fitted.models["marital"].values == VOCABULARY["marital"]  # no labels: priors kept

    restored = MarkovLogicInferrer.from_dict(json.loads(json.dumps(fitted.to_dict())))
    for unit in test_units[:10]:
        assert restored.infer_unit(unit) == fitted.infer_unit(unit)


def test_fit_keeps_priors_for_clauses_that_never_fire():
    units, labels = _synthetic_labelled_units(40, seed=2)
    fitted = MarkovLogicInferrer().fit(units, labels)
    assert fitted.infer_unit(["I live in Provo"])["region"][0] == "Utah"  # region had no labels at all
    # occupation was fitted on two values, and a stated age never fired: its prior weight stays
    assert fitted.infer_unit(["I'm 23"])["age_band"][0] == "20s"


def _corpus() -> tuple[pd.DataFrame, pd.DataFrame]:
    texts = {"ann": ["my wife and I", "I live in Provo", "hello"],
             "bob": ["my husband cooks", "I'm 34 years old"],
             "cy": ["nothing to see here", "ok"]}
    rows = [{"dialogue_id": f"d{i}", "turn_index": j, "speaker_id": user, "text": text, "timestamp": ""}
            for i, (user, posts) in enumerate(texts.items()) for j, text in enumerate(posts)]
    users = normalize_users(pd.DataFrame({"user_id": ["ann", "bob", "cy", "dee"],
                                          "gender": ["female", None, None, None],
                                          "region": ["Kanto", None, None, None]}))
    return pd.DataFrame(rows), users


def test_infer_profiles_keeps_corpus_values_and_fills_the_missing(inferrer):
    turns, users = _corpus()
    table = infer_profiles(turns, users, inferrer, Voting(unit_size=150, threshold=0.6),
                           progress=False).set_index("user_id")
    assert list(table.columns[:2]) == ["n_posts", "n_units"]
    assert table.loc["ann", "gender"] == "female" and table.loc["ann", "gender_source"] == "corpus"
    assert table.loc["ann", "gender_inferred"] == "male"  # the raw inference stays visible
    assert table.loc["ann", "region"] == "Kanto" and table.loc["ann", "region_inferred"] == "Utah"
    assert table.loc["ann", "marital"] == "married" and table.loc["ann", "marital_source"] == "inferred"
    assert table.loc["bob", ["gender", "marital", "age_band"]].tolist() == ["female", "married", "30s"]
    assert table.loc["bob", "gender_confidence"] == 1.0
    assert table.loc["cy", "gender"] == UNKNOWN and table.loc["cy", "gender_source"] == UNKNOWN
    assert table.loc["dee", ["n_posts", "n_units"]].tolist() == [0, 0]  # no turns: no units
    assert table.loc["ann", ["n_posts", "n_units"]].tolist() == [3, 1]

    everything = infer_profiles(turns, users, inferrer, Voting(unit_size=150, threshold=0.6), only_missing=False,
                                user_ids=["ann"], progress=False)
    assert everything["user_id"].tolist() == ["ann"]
    assert everything.loc[0, "gender"] == "male" and everything.loc[0, "gender_source"] == "inferred"


def test_infer_profiles_votes_over_units(inferrer):
    posts = ["my wife is great"] * 2 + ["my husband is great"] + ["filler"] * 3
    turns = pd.DataFrame({"dialogue_id": "d", "turn_index": range(len(posts)), "speaker_id": "u", "text": posts})
    users = normalize_users(pd.DataFrame({"user_id": ["u"]}))
    row = infer_profiles(turns, users, inferrer, Voting(unit_size=1, threshold=0.6), progress=False).iloc[0]
    assert (row["n_units"], row["gender"], row["gender_confidence"]) == (6, "male", pytest.approx(2 / 3))


def test_evaluate_inference_on_a_hand_made_example():
    gold = pd.DataFrame({"user_id": ["a", "b", "c", "d"], "age_band": UNKNOWN,
                         "gender": ["female", "male", "male", UNKNOWN], "marital": UNKNOWN, "occupation": UNKNOWN,
                         "region": UNKNOWN})
    predicted = pd.DataFrame({"user_id": ["a", "b", "c", "d"], "age_band": UNKNOWN,
                              "gender_inferred": ["female", UNKNOWN, "female", "male"], "gender": "ignored",
                              "marital": UNKNOWN, "occupation": UNKNOWN, "region": UNKNOWN})
    report = evaluate_inference(predicted, gold).set_index("field")
    gender = report.loc["gender"]
    assert (gender["n_labelled"], gender["n_covered"]) == (3, 2)
    assert gender["coverage"] == pytest.approx(2 / 3)
    assert gender["accuracy"] == pytest.approx(1 / 2)
    assert gender["accuracy_all"] == pytest.approx(1 / 3)
    assert (gender["majority_value"], gender["majority_accuracy"]) == ("male", pytest.approx(2 / 3))
    assert report.loc["marital", "n_labelled"] == 0 and math.isnan(report.loc["marital", "accuracy"])

    train = pd.DataFrame({"user_id": ["x", "y"], "age_band": UNKNOWN, "gender": ["female", "female"],
                          "marital": UNKNOWN, "occupation": UNKNOWN, "region": UNKNOWN})
    baseline = evaluate_inference(predicted, gold, train_gold=train).set_index("field").loc["gender"]
    assert (baseline["majority_value"], baseline["majority_accuracy"]) == ("female", pytest.approx(1 / 3))


# --- LLM inferrer, with fake generate functions ------------------------------------------------------

@pytest.mark.parametrize(("field", "raw", "value"), [
    ("gender", "Woman", "female"), ("gender", "M", "male"), ("gender", "male", "male"), ("gender", "女性", "female"),
    ("gender", "nonbinary", UNKNOWN),
    ("age_band", "20-29", "20s"), ("age_band", "late twenties", "20s"), ("age_band", "67", "60s+"),
    ("age_band", "teenager", "10s"), ("age_band", "unknown", UNKNOWN),
    ("age_band", "10s, 20s, 30s", UNKNOWN),  # an echoed list of options
    ("gender", "female/male", UNKNOWN),
    ("marital", "not married", "single"), ("marital", "Married", "married"), ("marital", "complicated", UNKNOWN),
    ("occupation", "Office Worker", "office_worker"), ("occupation", "software engineer", "engineer"),
    ("occupation", "university student", "college_student"), ("occupation", "astronaut", UNKNOWN),
    ("region", "Pasadena, CA", "California"), ("region", "new york", "New York"), ("region", "大阪", "Kinki"),
    ("region", "Mars", UNKNOWN), ("region", "US state", UNKNOWN), ("region", "Texas or Florida", UNKNOWN),
    ("occupation", "researcher, engineer", UNKNOWN),
])
def test_normalize_profile_value(field, raw, value):
    assert normalize_profile_value(field, raw) == value


def test_parse_profile_reply_reads_json_loose_pairs_and_garbage():
    reply = 'Sure! Here it is: {"Age": "30-39", "Gender": "Female", "marital status": "married", ' \
            '"occupation": "homemaker", "Location": "Tokyo"} Hope that helps.'
    assert parse_profile_reply(reply) == {"age_band": "30s", "gender": "female", "marital": "married",
                                          "occupation": "homemaker", "region": "Kanto"}
    loose = "{age_band: 20s, gender: 'male', marital: single, occupation: wizard, region: Utah,}"
    assert parse_profile_reply(loose) == {"age_band": "20s", "gender": "male", "marital": "single",
                                          "occupation": UNKNOWN, "region": "Utah"}
    assert parse_profile_reply("gender: female\nage: 45")["age_band"] == "40s"
    cut_off = '{"age_band": "20s", "marital": "one of married, single", "gender": "male", "age_band": "60s'
    assert parse_profile_reply(cut_off) == {"age_band": "20s", "gender": "male", "marital": UNKNOWN,
                                            "occupation": UNKNOWN, "region": UNKNOWN}
    assert set(parse_profile_reply("I cannot tell.").values()) == {UNKNOWN}


def test_llm_inferrer_prompt_lists_posts_within_the_budget():
    seen = []

    def generate(messages):
        seen.append(messages)
        return '{"gender": "female", "region": "Utah", "age_band": "forty"}'

    inferrer = LLMProfileInferrer(generate, max_posts=3, char_budget=60, max_post_chars=20, reply_prefix="")
    result = inferrer.infer_unit(["first post " * 5, "second", "third", "fourth"])
    assert result["gender"] == ("female", 1.0) and result["region"] == ("Utah", 1.0)
    assert result["age_band"] == ("40s", 1.0) and result["marital"] == (UNKNOWN, 0.0)
    prompt = seen[0][-1]["content"]
    assert "- first post first pos\n- second\n- third\n\n" in prompt and "fourth" not in prompt
    assert all(f'"{f}"' in prompt for f in PROFILE_FIELDS) and "college_student" in prompt
    assert [m["role"] for m in seen[0]] == ["system", "user"]
    short = LLMProfileInferrer(generate, char_budget=25, max_post_chars=20, reply_prefix="")
    prompt = short.build_messages(["a" * 30, "second"])[-1]["content"]
    assert "- " + "a" * 20 + "\n\n" in prompt and "second" not in prompt


def test_llm_inferrer_parses_the_continuation_of_its_reply_prefix():
    seen = []

    def generate(messages):
        seen.append(messages)
        return '30s", "gender": "male", "marital": "married, single", "occupation": "office_worker"}'

    result = LLMProfileInferrer(generate).infer_unit(["hello"])
    assert seen[0][-1] == {"role": "assistant", "content": '{"age_band": "'}
    assert {f: v for f, (v, _) in result.items()} == {"age_band": "30s", "gender": "male", "marital": UNKNOWN,
                                                      "occupation": "office_worker", "region": UNKNOWN}


def test_infer_profiles_runs_with_the_llm_inferrer():
    turns, users = _corpus()
    inferrer = LLMProfileInferrer(lambda messages: '{"gender": "male", "occupation": "nurse"}', reply_prefix="")
    table = infer_profiles(turns, users, inferrer, Voting(unit_size=2, threshold=0.6),
                           progress=False).set_index("user_id")
    assert table.loc["bob", "gender"] == "male" and table.loc["bob", "occupation"] == "professional"
    assert table.loc["ann", "gender"] == "female"  # corpus value kept
    assert table.loc["ann", "n_units"] == 2 and table.loc["dee", "gender"] == UNKNOWN



def test_labels_from_personas_fill_only_unknown_fields():
    users = pd.DataFrame({
        "user_id": ["p1", "p2", "p3"],
        "age_band": ["unknown", "unknown", "unknown"], "gender": ["unknown", "female", "unknown"],
        "marital": ["unknown"] * 3, "occupation": ["unknown"] * 3, "region": ["unknown"] * 3,
        "persona": [["My wife and I have two kids.", "I live in Ohio."], ["My husband is a chef."], []],
    })
    filled = profiles.labels_from_personas(users, profiles.MarkovLogicInferrer())
    assert filled.loc[0, "marital"] == "married" and filled.loc[0, "region"] == "Ohio"
    assert filled.loc[1, "gender"] == "female"  # a known value is kept
    assert (filled.loc[2, ["gender", "marital", "region"]] == "unknown").all()  # no persona, no labels


def test_inference_across_corpora_namespaces_user_ids():
    from types import SimpleNamespace

    users = pd.DataFrame({"user_id": ["ann", "bob"], **{f: ["unknown", "unknown"] for f in PROFILE_FIELDS}})
    users.loc[0, "gender"] = "female"
    turns = pd.DataFrame({"speaker_id": ["ann", "bob"], "text": ["My husband cooks.", "hello"]})
    corpora = {"cc": SimpleNamespace(turns=turns, users=users)}
    predicted = profiles.infer_across_corpora(corpora, {"cc": ["ann"]}, profiles.MarkovLogicInferrer(),
                                              profiles.Voting(unit_size=5, threshold=0.6))
    assert predicted["user_id"].tolist() == ["cc/ann"] and predicted.loc[0, "marital_inferred"] == "married"
    gold = profiles.users_across_corpora(corpora, {"cc": ["ann"]})
    assert gold["user_id"].tolist() == ["cc/ann"] and gold.loc[0, "gender"] == "female"


# --- the literal prefilter of MarkovLogicInferrer.features ------------------------------------------------------

def test_required_literals_are_in_every_match():
    import re

    assert profiles.required_literals(r"\bi(?:'m| am|m)\b (?:happily |still )?married\b") == {"married"}
    assert profiles.required_literals(r"(?<![A-Za-z0-9])(?:Florida|Miami)(?![A-Za-z0-9])") == {"florida", "miami"}
    assert profiles.required_literals(r"\bmy (?:wife|hubby)\b|妻が") == {"my wife", "my hubby", "妻が"}
    assert profiles.required_literals(r"\d+ years") == {" years"}
    assert profiles.required_literals(r"[a-z]+\d*") is None  # nothing literal: such a cue is always scanned
    texts = ["I'm 23 years old and I live in Provo", "my wife works at the Post Office", "IM A NURSE in Ohio",
             "私は23歳です。東京に住んでいます", "\u0130'm from Tampa"]  # a dotted capital I that re.I reads as i
    for cue in profiles.CUES:
        literals = profiles.required_literals(cue.pattern)
        for text in texts:
            text = profiles.normalize_text(text)
            if re.search(cue.pattern, text, re.IGNORECASE):
                assert any(lit in profiles.prefilter_text(text) for lit in literals), (cue.name, text)


def test_prefilter_folds_every_character_that_ignorecase_reads_as_ascii():
    import re
    import sys

    found = {chr(code) for code in range(128, sys.maxunicode + 1)
             if chr(code).lower() != chr(code).upper() or chr(code).lower() != chr(code)
             for letter in "abcdefghijklmnopqrstuvwxyz" if re.fullmatch(letter, chr(code), re.IGNORECASE)}
    assert found == {"\u0130", "\u0131", "\u017f", "\u212a"}
    assert all(profiles.prefilter_text(char).isascii() for char in found)


def test_features_with_the_prefilter_equal_a_plain_scan():
    inferrer = profiles.MarkovLogicInferrer()
    units = [["I'm a nurse and my wife is from Ohio.", "I just turned 23!"], ["hello there", "nothing to see"],
             ["私は会社員です。", "大阪に住んでいます"], ["My boss made me work late. I live in Salt Lake", "my kids"],
             ["I'M A SOPHOMORE majoring in biology", "\u0130'm from Boise"]]
    for unit in units:
        text = profiles.normalize_text("\n".join(unit))
        plain = {pattern: sum(1 for _ in regex.finditer(text)) for pattern, regex in inferrer._regex.items()}
        by_name = {(c.field, c.name): plain[c.pattern] for c in inferrer.cues}
        expected = {f: [by_name[(f, name)] for name in model.features] for f, model in inferrer.models.items()}
        got = inferrer.features(unit)
        assert {f: [round(2 ** x - 1) for x in v] for f, v in got.items()} == expected
    assert any(v.any() for v in inferrer.features(units[0]).values())


def test_users_to_infer_keeps_every_listed_user_and_samples_others():
    users = pd.DataFrame({"user_id": [f"u{i}" for i in range(30)]})
    keep = ["u1", "u5", "u7", "u20"]  # stage 01: evaluation users and every pre-training speaker
    chosen = profiles.users_to_infer(users, keep, max_users=3, seed=0)
    assert set(keep) <= set(chosen) and len(chosen) == len(keep) + 3
    assert chosen == profiles.users_to_infer(users, keep, max_users=3, seed=0)
    assert profiles.users_to_infer(users, keep, max_users=0) is None  # 0: every user
