"""Prompt-based LLM baselines (§4.2.2): an LLM role-plays the speaker and writes the next utterance.

The prompt holds the speaker's and the partner's profiles, a self-introduction of the speaker, and
the dialogue history (the last 10 turns at most), in one of two formats:

    chat:       a system message that casts the model as the speaker, then the history as chat
                messages (the speaker's own turns from the assistant, everyone else's from the user);
                the GPT-3.5 analog.
    completion: the same content as a plain transcript that ends with the speaker's label and a
                colon; the Jp-NeoX-3.6B / Jp-Llama2-7B analog ("the same content ... modified into
                a completion format").

The history is the turns the fine-tuned systems read (`fine_tuned_contexts` -> `shared_histories`): the same
previous turns, selected in the fine-tuned systems' tokenizer under their token budget (`max_source_length`,
after the profile head and One-ID), oldest dropped first, so both sides see the same words and C1/C5 compare
replies to the same input. Each turn keeps its real speaker from the corpus's own turns (`dialogue_history`).
The paper's own prompt, "a dialogue history of up to 10 turns" (§4.2.2), stays available as an extra row:
`baseline_prompts` without `histories` reads the `max_history` corpus turns before the reply; its method
name ends with `PAPER_HISTORY_SUFFIX` (`paper_history_method`), and claims must leave such methods out
(`is_paper_history_method`), since their input differs from the fine-tuned systems'.
Speakers are labelled by their role, as in the paper's prompt, which names a speaker and a partner:
the speaker is "Speaker" (the assistant in chat), the pair's partner (the last other person who spoke)
is "Partner", and anyone else in a multi-party scene is "Person 1", "Person 2", ... in order of first
appearance in the shown history. User ids are not shown: in the sitcoms they are character names, which
would let an LLM draw on scripts it may have read, information no fine-tuned model gets.

Two generators run them: `LocalLLM` (a transformers causal LM; greedy; it also scores the reference,
so perplexity is available; `generate_and_score` reads each prompt once for both, in left-padded
batches, and stops a reply at its newline on the device) and `OpenAICompatibleClient` (any
OpenAI-compatible HTTP endpoint; it only returns text, so perplexity is NA, as for GPT-3.5 in the
paper's tables).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from udg_lib.data.schema import PROFILE_FIELDS, UNKNOWN, profile_lookup
from udg_lib.progress import progress_bar
from udg_lib.prompts import build_prompts, join_context

if TYPE_CHECKING:  # torch and transformers load only when a local model is used
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from udg_lib.families import ModelFamily, VisibleContext

FORMATS: tuple[str, ...] = ("chat", "completion")
LANGUAGES: tuple[str, ...] = ("en", "ja")
TRAINING_SPLITS: tuple[str, ...] = ("train_da", "train_ft")
MAX_HISTORY = 10  # §4.2.2: "a dialogue history of up to 10 turns"
# A method that reads the paper's 10-turn history, not the fine-tuned systems' turns: an extra row, never in C1/C5.
PAPER_HISTORY_SUFFIX = "-paper10"
RAG_SUFFIX = "-rag"  # an LLM row whose prompt also shows the user's retrieved own training pairs (Q3)
RAG_LABEL = " + own replies (RAG)"


def paper_history_method(method: str) -> str:
    """The method name of `method`'s extra row with the paper's 10-turn history (e.g. "smollm2-chat-paper10")."""
    return method + PAPER_HISTORY_SUFFIX


def paper_history_label(label: str) -> str:
    """The display label of that extra row: "SmolLM2-135M-Instruct (chat)" -> "SmolLM2-135M-Instruct (chat, 10
    turns, paper §4.2.2)"."""
    words = f"{MAX_HISTORY} turns, paper §4.2.2"
    return f"{label[:-1]}, {words})" if label.endswith(")") else f"{label} ({words})"


def is_paper_history_method(method: str) -> bool:
    """Whether a stage 06 method read the paper's 10-turn history instead of the fine-tuned systems' turns; its
    input differs from theirs, so no comparison with them (C1, C1s, C5) may use it."""
    return str(method).endswith(PAPER_HISTORY_SUFFIX)


def is_rag_method(method: str) -> bool:
    """Whether a stage 06 method's prompt also showed the user's retrieved own training pairs (`Baseline.rag`):
    a row for Q3 only; C1, C1s and C5 compare the fine-tuned systems with the plain prompts."""
    return str(method).endswith(RAG_SUFFIX)


def llm_base_method(method: str) -> str:
    """The plain prompt row an extra row varies ("smollm2-chat-rag" -> "smollm2-chat")."""
    return str(method).removesuffix(PAPER_HISTORY_SUFFIX).removesuffix(RAG_SUFFIX)

# Labels, profile field names and the instruction, per language.
_TEMPLATES: dict[str, dict[str, Any]] = {
    "en": {
        "speaker": "Speaker",
        "partner": "Partner",
        "other": "Person {n}",
        "fields": {"age_band": "age", "gender": "gender", "marital": "marital status",
                   "occupation": "occupation", "region": "lives in"},
        "not_given": "not given",
        "system": ("You are role-playing the speaker in a conversation with a partner. Stay in character.\n"
                   "Your profile: {speaker_profile}\n"
                   "Your partner's profile: {partner_profile}\n"
                   "Your self-introduction: {self_intro}\n"
                   "Reply with the speaker's next utterance only, in one line, without a name or quotes."),
        "start": "(The conversation starts. Say your first line.)",
        "continue": "(Go on: say your next line.)",
        "others": "Other people in the conversation: {labels} (no profiles given).",
        "memories": "Things the speaker said before, in similar moments:",
        "said": "{partner}: {context} / {speaker}: {reply}",
        "header": ("The following is a conversation between the Speaker and the Partner.\n"
                   "Speaker's profile: {speaker_profile}\n"
                   "Partner's profile: {partner_profile}\n"
                   "Speaker's self-introduction: {self_intro}\n"
                   "Each line is one utterance."),
    },
    "ja": {
        "speaker": "話者",
        "partner": "相手",
        "other": "人物{n}",
        "fields": {"age_band": "年代", "gender": "性別", "marital": "婚姻", "occupation": "職業",
                   "region": "居住地"},
        "not_given": "不明",
        "system": ("あなたは、ある対話の話者を演じています。話者になりきって相手と対話してください。\n"
                   "あなたのプロフィール: {speaker_profile}\n"
                   "相手のプロフィール: {partner_profile}\n"
                   "あなたの自己紹介: {self_intro}\n"
                   "話者の次の発話だけを、名前や鉤括弧を付けずに1行で出力してください。"),
        "start": "（対話の始まりです。最初の発話をしてください。）",
        "continue": "（続けて、次の発話をしてください。）",
        "others": "対話の他の参加者: {labels}（プロフィールなし）",
        "memories": "話者が以前、似た場面で言ったこと:",
        "said": "{partner}: {context} / {speaker}: {reply}",
        "header": ("以下は話者と相手の対話です。\n"
                   "話者のプロフィール: {speaker_profile}\n"
                   "相手のプロフィール: {partner_profile}\n"
                   "話者の自己紹介: {self_intro}\n"
                   "1行が1発話です。"),
    },
}
# Japanese words for the profile values of udg_lib.profiles.VOCABULARY; other values pass through.
_JA_VALUES: dict[str, str] = {
    "female": "女性", "male": "男性", "married": "既婚", "single": "未婚",
    "10s": "10代", "20s": "20代", "30s": "30代", "40s": "40代", "50s": "50代", "60s+": "60代以上",
    "office_worker": "会社員", "college_student": "大学生", "part_time_worker": "パート・アルバイト",
    "unemployed": "無職", "homemaker": "主婦・主夫", "business_owner": "自営業・経営者",
    "high_school_student": "高校生", "civil_servant": "公務員", "researcher": "研究者", "engineer": "エンジニア",
    "entertainer": "芸能人", "professional": "専門職", "service_worker": "サービス業", "retired": "退職者",
}
# A reply that starts with one of these labels has it stripped (models often echo the transcript's form).
_LABEL = re.compile(r"^\s*(?:speaker|partner|person\s*\d+|you|me|assistant|user|話者|相手|人物\d+|あなた)\s*[:：]\s*",
                    re.IGNORECASE)
_QUOTES = [('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("「", "」"), ("『", "』")]
# First-person words mark replies in which a user speaks about themself (English and Japanese).
_FIRST_PERSON = re.compile(r"\b(?:i|i'm|im|i've|i'd|i'll|my|me|myself)\b|私|わたし|僕|ぼく|俺|おれ|自分",
                           re.IGNORECASE)


def _template(language: str) -> dict[str, Any]:
    if language not in _TEMPLATES:
        raise ValueError(f"unknown prompt language {language!r}; expected one of {LANGUAGES}")
    return _TEMPLATES[language]


def describe_profile(profile: Mapping[str, object] | None, language: str = "en") -> str:
    """A profile in words for an LLM prompt: 'age: 20s, gender: female, ...'; unknown fields are left out.

    With no known field at all, the words for "not given".
    """
    template = _template(language)
    parts = []
    for field in PROFILE_FIELDS:
        value = str((profile or {}).get(field, UNKNOWN)).strip()
        if not value or value == UNKNOWN or value.lower() == "nan":
            continue
        value = _JA_VALUES.get(value, value) if language == "ja" else value.replace("_", " ")
        parts.append(f"{template['fields'][field]}: {value}")
    return ("、" if language == "ja" else ", ").join(parts) or template["not_given"]


def _split_sets(frame: pd.DataFrame) -> list:
    return sorted(frame["split_set"].unique().tolist()) if "split_set" in frame else []


def self_introduction(users: pd.DataFrame, pairs: pd.DataFrame, user_id: str, max_turns: int = 3,
                      max_chars: int = 300) -> str:
    """§4.2.2 "a self-introductory sentence created by the speaker".

    The corpus's own `self_intro` when the users frame has a non-empty one for `user_id` (kept whole).
    Otherwise one is built from the user's own replies (`response` where `speaker_id == user_id`) in
    TRAINING pairs only (split train_da or train_ft): dev and test replies are the answers the
    baseline is scored on, so they never enter its prompt. Rule: first-person replies ("I", "my",
    私, 僕, ...) before the others, then longer before shorter, ties by pair_id; distinct texts only;
    the first `max_turns` are joined with spaces and cut to `max_chars` at a word boundary. "" when
    the user has no training reply.

    `pairs` must hold a single split set (a turn trained on in one set can be a test turn in another).
    """
    if "user_id" in users and "self_intro" in users:
        own = users.loc[users["user_id"] == user_id, "self_intro"]
        for value in own:
            if isinstance(value, str) and value.strip():
                return value.strip()
    missing = {"split", "speaker_id", "response", "pair_id"} - set(pairs.columns)
    if missing:
        raise ValueError(f"pairs for the self-introduction lack columns {sorted(missing)}")
    if len(_split_sets(pairs)) > 1:
        raise ValueError(f"pairs for the self-introduction of {user_id!r} mix split sets {_split_sets(pairs)}; "
                         "pass one split set (its training turns can be another set's test turns)")
    mine = pairs[(pairs["speaker_id"] == user_id) & pairs["split"].isin(TRAINING_SPLITS)]
    candidates = {}
    for pair_id, response in sorted(zip(mine["pair_id"].astype(str), mine["response"].astype(str))):
        text = " ".join(response.split())
        if text and text not in candidates:
            candidates[text] = (not _FIRST_PERSON.search(text), -len(text), pair_id)
    chosen = sorted(candidates, key=candidates.__getitem__)[:max_turns]
    return _truncate(" ".join(chosen), max_chars)


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    # back to the last space when there is one in the second half (Japanese text has none: cut anywhere)
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


def dialogue_history(turns: pd.DataFrame, pairs: pd.DataFrame, max_turns: int = MAX_HISTORY) -> pd.Series:
    """§4.2.2 "a dialogue history of up to 10 turns", per pair: the (speaker_id, text) of the `max_turns`
    turns right before the pair's reply in its dialogue (turn_index order), oldest first.

    `turns` are stage 00's canonical turns (`udg_lib.data.load_corpus(...).turns`); pairs are found by
    their dialogue_id and turn_index. Only earlier turns: never the reply itself or a later turn. A
    Series aligned with `pairs`; an error names the first pair whose turn is missing or was spoken by
    someone else than its speaker_id.
    """
    if max_turns < 0:
        raise ValueError(f"max_turns must be >= 0, got {max_turns}")
    for name, frame, needed in (("turns", turns, {"dialogue_id", "turn_index", "speaker_id", "text"}),
                                ("pairs", pairs, {"pair_id", "dialogue_id", "turn_index", "speaker_id"})):
        missing = needed - set(frame.columns)
        if missing:
            raise ValueError(f"{name} for the dialogue history lack columns {sorted(missing)}")
    dialogues = {}
    wanted = set(pairs["dialogue_id"])
    for dialogue_id, dialogue in turns[turns["dialogue_id"].isin(wanted)].groupby("dialogue_id", sort=False):
        dialogue = dialogue.sort_values("turn_index", kind="stable")
        dialogues[dialogue_id] = (dialogue["turn_index"].astype("int64").tolist(),
                                  list(zip(dialogue["speaker_id"].astype(str), dialogue["text"].astype(str))))
    histories = []
    for row in pairs[["pair_id", "dialogue_id", "turn_index", "speaker_id"]].itertuples(index=False):
        indices, spoken = dialogues.get(row.dialogue_id, ([], []))
        position = bisect.bisect_left(indices, int(row.turn_index))
        if position == len(indices) or indices[position] != int(row.turn_index):
            raise ValueError(f"pair {row.pair_id!r}: turn {row.turn_index} of dialogue {row.dialogue_id!r} is not "
                             "in the corpus turns (stage 00's turns.parquet of another corpus or run?)")
        if spoken[position][0] != str(row.speaker_id):
            raise ValueError(f"pair {row.pair_id!r}: its turn was spoken by {spoken[position][0]!r} in the corpus "
                             f"turns, not by its speaker {row.speaker_id!r}")
        histories.append(spoken[max(0, position - max_turns):position])
    return pd.Series(histories, index=pairs.index, dtype=object)


def fine_tuned_contexts(pairs: pd.DataFrame, users: pd.DataFrame, fmt: str, tokenizer: PreTrainedTokenizerBase,
                        max_source_length: int, family: ModelFamily,
                        one_ids: Mapping[str, str] | None = None) -> list[VisibleContext]:
    """Per pair (`context`, `speaker_id`, `partner_id`), the context turns a fine-tuned system with prompt format
    `fmt` (plain, psp, ppp; with `one_ids`, One-ID's prefix) reads under `max_source_length` tokens of the
    fine-tuned `tokenizer`: `prompts.build_prompts`, then `family.visible_contexts`, the rule of its
    `encode_sources`."""

    sources = build_prompts(pairs, users, fmt, one_ids)
    return family.visible_contexts([list(c) for c in pairs["context"]], sources.tolist(), tokenizer,
                                   max_source_length, one_id_prefix=bool(one_ids))


def shared_histories(turns: pd.DataFrame, pairs: pd.DataFrame, visible: Sequence[VisibleContext]) -> pd.Series:
    """The LLM's history per pair: exactly the turns of `visible` (from `fine_tuned_contexts`, aligned with
    `pairs`), each with its real speaker from the corpus `turns` (`dialogue_history`); a cut oldest turn
    (`VisibleContext.partial`) shows only the words the fine-tuned system reads of it. An error names a pair
    whose context does not end the corpus history (turns of another corpus?)."""
    if len(visible) != len(pairs):
        raise ValueError(f"{len(visible)} visible contexts for {len(pairs)} pairs")
    longest = max((len(v.turns) for v in visible), default=0)
    histories = []
    for pair_id, full, view in zip(pairs["pair_id"], dialogue_history(turns, pairs, longest), visible):
        shown = full[len(full) - len(view.turns):] if view.turns else []
        if len(shown) != len(view.turns) or any(
                " ".join(text.split()) != " ".join(turn.split())
                for (_, text), turn in zip(shown[view.partial:], view.turns[view.partial:])):
            raise ValueError(f"pair {pair_id!r}: its context turns {list(view.turns)!r} do not end the corpus history "
                             f"{[t for _, t in full]!r}")
        if view.partial:
            shown = [(shown[0][0], view.turns[0]), *shown[1:]]
        histories.append(list(shown))
    return pd.Series(histories, index=pairs.index, dtype=object)


def history_tokens(histories: pd.Series, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens of each history's turns joined as the fine-tuned prompts join them (`prompts.join_context`), in
    `tokenizer`: with the fine-tuned tokenizer, the count to set beside `VisibleContext.n_tokens`."""

    texts = [join_context([text for _, text in history]) for history in histories]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


@dataclass(frozen=True)
class RolePlay:
    """What §4.2.2's prompt says about one reply: who speaks, to whom, and what was said before it."""

    speaker_id: str
    history: Sequence[tuple[str, str]]  # (speaker_id, text) of the turns before the reply, oldest first
    partner_id: str = ""  # the person the speaker answers; their profile is shown
    speaker_profile: Mapping[str, object] | None = None
    partner_profile: Mapping[str, object] | None = None
    self_intro: str = ""
    # retrieved (partner's last line, speaker's reply) of the speaker's own training pairs (`retrieval`): RAG
    memories: Sequence[tuple[str, str]] = ()


def _labelled_history(play: RolePlay, max_history: int, language: str) -> list[tuple[str, bool, str]]:
    """(label, is_speaker, text) for the last `max_history` turns: "Speaker", "Partner", "Person 1", ...
    (see the module docstring)."""
    if max_history < 0:
        raise ValueError(f"max_history must be >= 0, got {max_history}")
    words = _template(language)
    history = list(play.history)[-max_history:] if max_history else []
    labels: dict[str, str] = {play.speaker_id: words["speaker"]}
    if play.partner_id:
        labels.setdefault(play.partner_id, words["partner"])
    result, others = [], 0
    for speaker, text in history:
        if speaker not in labels:
            others += 1
            labels[speaker] = words["other"].format(n=others)
        result.append((labels[speaker], speaker == play.speaker_id, " ".join(str(text).split())))
    return result


def _others(history: list[tuple[str, bool, str]], language: str) -> list[str]:
    """Labels of people other than the speaker and the partner, in order of appearance."""
    words = _template(language)
    return list(dict.fromkeys(label for label, is_speaker, _ in history
                              if not is_speaker and label != words["partner"]))


def _fill(template: str, play: RolePlay, others: list[str], language: str) -> str:
    words = _template(language)
    text = template.format(speaker_profile=describe_profile(play.speaker_profile, language),
                           partner_profile=describe_profile(play.partner_profile, language),
                           self_intro=" ".join(play.self_intro.split()) or words["not_given"])
    if others:
        text += "\n" + words["others"].format(labels=", ".join(others))
    if play.memories:  # RAG: the speaker's own most similar training pairs
        text += "\n" + words["memories"] + "".join(
            "\n- " + words["said"].format(partner=words["partner"], speaker=words["speaker"],
                                          context=" ".join(context.split()) or "-", reply=" ".join(reply.split()))
            for context, reply in play.memories)
    return text


def build_chat_messages(play: RolePlay, max_history: int = MAX_HISTORY, language: str = "en") -> list[dict]:
    """§4.2.2 GPT-3.5 prompt: a system message that casts the model as the speaker (both profiles, the
    self-introduction, the instruction), then the last `max_history` turns: the speaker's own as
    "assistant", everyone else's as "user". When people other than the partner speak, each user line
    starts with its label ("Partner: ...", "Person 1: ..."). Consecutive turns of the same role are one
    message (some chat templates require alternation); the last message is always the user's.
    """
    words = _template(language)
    history = _labelled_history(play, max_history, language)
    others = _others(history, language)
    messages = [{"role": "system", "content": _fill(words["system"], play, others, language)}]
    for label, is_speaker, text in history:
        role = "assistant" if is_speaker else "user"
        content = f"{label}: {text}" if others and not is_speaker else text
        if messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + content
        else:
            messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":  # the model still needs a turn to answer
        messages.append({"role": "user", "content": words["continue" if history else "start"]})
    return messages


def build_completion_prompt(play: RolePlay, max_history: int = MAX_HISTORY, language: str = "en") -> str:
    """§4.2.2 Jp-NeoX / Jp-Llama2 prompt: the chat prompt's content as a transcript with one
    "Label: utterance" line per turn, ending with the speaker's label and a colon to be continued."""
    words = _template(language)
    history = _labelled_history(play, max_history, language)
    lines = [_fill(words["header"], play, _others(history, language), language), ""]
    lines += [f"{label}: {text}" for label, _, text in history]
    lines.append(f"{words['speaker']}:")
    return "\n".join(lines)


def clean_reply(text: str) -> str:
    """The utterance in a model's reply: its first non-empty line, without a leading speaker label
    or surrounding quotes; "" when nothing is left."""
    line = next((l.strip() for l in str(text).splitlines() if l.strip()), "")
    while True:
        stripped = _LABEL.sub("", line, count=1).strip()
        for opening, closing in _QUOTES:
            if len(stripped) >= 2 and stripped.startswith(opening) and stripped.endswith(closing):
                stripped = stripped[len(opening):-len(closing)].strip()
        if stripped == line:
            return line
        line = stripped


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown baseline prompt format {fmt!r}; expected one of {FORMATS}")


class LocalLLM:
    """A transformers causal LM as a baseline generator: greedy, batched with left padding.

    Load it by short name (udg_lib.llm.PACKAGED_LLMS), local path or model id, or wrap a model
    already in memory with `from_model`.
    """

    def __init__(self, name_or_path: str = "smollm2", *, cache_dir: str | Path | None = None,
                 dtype: torch.dtype | None = None):
        import torch

        from udg_lib.llm import load_causal_lm  # here, as torch: the prompt builders above need neither

        model, tokenizer = load_causal_lm(name_or_path, cache_dir=cache_dir, dtype=dtype or torch.float32)
        self._setup(model, tokenizer, name_or_path)

    @classmethod
    def from_model(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str | None = None) -> LocalLLM:
        instance = cls.__new__(cls)
        instance._setup(model, tokenizer, name or getattr(model, "name_or_path", "") or type(model).__name__)
        return instance

    def _setup(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, str(name)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(f"tokenizer of {self.name} has neither a pad nor an eos token to pad batches with")
        self.pad_token_id = int(pad)

    def __repr__(self) -> str:
        return f"LocalLLM({self.name!r})"

    # --- encoding ---------------------------------------------------------------------------------

    def prompt_text(self, prompt: str | Sequence[dict], fmt: str) -> str:
        """The text the model reads: a chat prompt through the tokenizer's chat template."""
        _check_format(fmt)
        if fmt == "completion":
            if not isinstance(prompt, str):
                raise TypeError(f"a completion prompt is a string, got {type(prompt).__name__}")
            return prompt
        if isinstance(prompt, str):
            prompt = json.loads(prompt)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.name} has no chat template; use the completion format (or set "
                             "tokenizer.chat_template)")
        return self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)

    def encode_prompt(self, prompt: str | Sequence[dict], fmt: str) -> list[int]:
        # A chat template writes its own special tokens; a completion prompt gets the tokenizer's (e.g. BOS).
        return list(self.tokenizer(self.prompt_text(prompt, fmt), add_special_tokens=fmt == "completion")["input_ids"])

    def _pad(self, sequences: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            span = slice(width - len(sequence), width) if side == "left" else slice(0, len(sequence))
            ids[row, span] = torch.tensor(sequence, dtype=torch.long)
            mask[row, span] = 1
        return ids.to(self.model.device), mask.to(self.model.device)

    @staticmethod
    def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
        """Indices grouped by similar length (less padding), in a fixed order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    # --- generation and scoring ---------------------------------------------------------------------

    def generate(self, prompts: Sequence[str | Sequence[dict]], fmt: str, max_new_tokens: int = 40,
                 batch_size: int = 8, progress: bool = False) -> list[str]:
        """Greedy continuations of `prompts` (chat: message lists or their JSON; completion: text),
        decoded without special tokens. A row stops at its first newline after some text (replies are one
        line; `NewlineStop`) or at EOS; the batching does not change the result."""
        replies, _ = self._batched(prompts, None, fmt, max_new_tokens, batch_size, progress)
        return replies

    def reference_nll(self, prompts: Sequence[str | Sequence[dict]], references: Sequence[str], fmt: str,
                      batch_size: int = 8, progress: bool = False) -> list[tuple[float, int]]:
        """(summed negative log-likelihood in nats, number of tokens) of each reference given its prompt.

        The reference is encoded on its own (after a space in the completion format, whose prompt ends
        with "Label:") and appended to the prompt's tokens; no end-of-turn token is scored. Perplexity
        over a set is exp(sum of NLLs / sum of tokens).

        Batched as `generate` (left-padded prompts, grouped by length): one pass over the prompts that asks
        for no logits, then one over the references on its cache, which computes the logits of the reference
        positions only. A batch's logits are thus batch x longest reference x vocabulary floats (Gemma-3's
        262k vocabulary: ~0.3 GB in fp32 at batch 8 and 40-token references), where full logits over prompt
        and reference reached 18 GB at batch 8. Log-probabilities in fp32 whatever the model's dtype.
        """
        _, scores = self._batched(prompts, references, fmt, None, batch_size, progress)
        return scores

    def generate_and_score(self, prompts: Sequence[str | Sequence[dict]], references: Sequence[str], fmt: str,
                           max_new_tokens: int = 40, batch_size: int = 8, progress: bool = False
                           ) -> tuple[list[str], list[tuple[float, int]]]:
        """`generate` and `reference_nll` of the same prompts from one pass over each prompt: `generate` runs
        as it does alone and its cache, cut back to the prompt, scores the references. The replies of
        `generate` (the same call) and its NLLs to floating-point rounding (tested), at the cost of one
        prompt pass."""
        return self._batched(prompts, references, fmt, max_new_tokens, batch_size, progress)

    def _batched(self, prompts: Sequence[str | Sequence[dict]], references: Sequence[str] | None, fmt: str,
                 max_new_tokens: int | None, batch_size: int, progress: bool
                 ) -> tuple[list[str], list[tuple[float, int]]]:
        """Replies (when `max_new_tokens` is given) and reference scores (when `references` are), batch by batch.

        Per batch of left-padded prompts (width W, so every row's last prompt token is in column W - 1):
        `model.generate` runs as it always did (its own pass over the prompts, then one token at a time) and
        hands back its cache, which is cut back to columns 0..W-2 (`_prompt_cache`); the references are scored
        over it, starting from each row's last prompt token (`_score_references`). Scoring alone fills that
        cache with a forward over columns 0..W-2 (`_prefill`), as does a cache that cannot be cut (a sliding-
        window layer past its window). Positions follow the attention mask, as `generate` numbers them.
        """
        import torch

        _check_format(fmt)
        if references is not None and len(prompts) != len(references):
            raise ValueError(f"{len(prompts)} prompts but {len(references)} references")
        encoded = [self.encode_prompt(p, fmt) for p in prompts]
        for prompt_ids, prompt in zip(encoded, prompts):
            if not prompt_ids:
                raise ValueError(f"empty prompt {prompt!r}: nothing to condition on")
        reference_ids = None if references is None else [self.encode_reference(r, fmt) for r in references]
        replies: list[str] = [""] * len(encoded)
        scores: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
        task = "generate" if references is None else "score" if max_new_tokens is None else "generate+score"
        for batch in progress_bar(self._batches([len(e) for e in encoded], batch_size), desc=f"{task} {self.name}",
                                  disable=not progress):
            ids, mask = self._pad([encoded[i] for i in batch], side="left")
            with torch.inference_mode():
                cache = None
                if max_new_tokens is not None:
                    output, cache = self._generate(ids, mask, max_new_tokens, keep_cache=reference_ids is not None)
                    for row, index in enumerate(batch):
                        # a row that stopped early was filled with padding, which decoding drops
                        replies[index] = self.tokenizer.decode(output[row, ids.shape[1]:], skip_special_tokens=True)
                    cache = self._prompt_cache(cache, ids.shape[1] - 1)
                if reference_ids is not None:
                    if cache is None:
                        cache = self._prefill(ids, mask)
                    for index, score in zip(batch, self._score_references(cache, ids, mask,
                                                                          [reference_ids[i] for i in batch])):
                        scores[index] = score
                del cache
        return replies, scores

    def encode_reference(self, reference: str, fmt: str) -> list[int]:
        """The reference's tokens as they follow the prompt: after a space in the completion format."""
        continuation = (" " if fmt == "completion" else "") + " ".join(str(reference).split())
        return list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])

    def _cache_argument(self) -> str:
        # transformers 5.2x names the cache `cache` (`past_key_values` is deprecated); earlier 5.x `past_key_values`
        import inspect

        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> Any:
        """The model's cache of every column but the last (None when there is only one). The pass is for its
        cache: of the logits only the last position's are computed (`logits_to_keep=1`)."""
        if ids.shape[1] < 2:
            return None
        head, head_mask = ids[:, :-1], mask[:, :-1]
        positions = (head_mask.cumsum(-1) - 1).clamp(min=0)  # `generate`'s numbering for left padding
        kwargs = dict(input_ids=head, attention_mask=head_mask, position_ids=positions, use_cache=True)
        try:
            output = self.model(**kwargs, logits_to_keep=1)
        except TypeError:  # a model without logits_to_keep
            output = self.model(**kwargs)
        return output["cache"] if "cache" in output.keys() else output["past_key_values"]

    def _score_references(self, cache: Any, ids: torch.Tensor, mask: torch.Tensor,
                          references: list[list[int]]) -> list[tuple[float, int]]:
        """(NLL, tokens) per row of each reference after its prompt, from the prompt's cache (columns 0..W-2):
        row i reads its last prompt token and its reference but the last token, right-padded; position k
        predicts reference token k."""
        import torch

        width = max(len(r) for r in references)
        if width == 0:
            return [(0.0, 0)] * len(references)
        rows = len(references)
        inputs = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        targets = torch.full((rows, width), -100, dtype=torch.long)  # cross_entropy's ignore_index
        reads = torch.zeros((rows, width), dtype=torch.long)
        for row, reference in enumerate(references):
            inputs[row, 0] = ids[row, -1]
            inputs[row, 1:len(reference)] = torch.tensor(reference[:-1], dtype=torch.long)
            targets[row, :len(reference)] = torch.tensor(reference, dtype=torch.long)
            reads[row, :max(len(reference), 1)] = 1
        device = ids.device
        inputs, targets, reads = inputs.to(device), targets.to(device), reads.to(device)
        positions = mask.sum(-1, keepdim=True) - 1 + torch.arange(width, device=device)
        kwargs = {} if cache is None else {self._cache_argument(): cache}
        logits = self.model(input_ids=inputs, attention_mask=torch.cat([mask[:, :-1], reads], dim=1),
                            position_ids=positions, use_cache=cache is not None, **kwargs).logits
        token_nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100,
                                                      reduction="none")
        sums = token_nll.double().sum(dim=1).cpu().tolist()
        return [(float(total), len(reference)) for total, reference in zip(sums, references)]

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                  keep_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """Greedy continuation of the batch (prompt and new tokens) and, with `keep_cache`, `generate`'s cache."""
        output = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=self.pad_token_id,
                                     stopping_criteria=[NewlineStop(self.tokenizer, ids.shape[1])],
                                     return_dict_in_generate=keep_cache)
        if not keep_cache:
            return output, None
        cache = output["cache"] if "cache" in output.keys() else output.get("past_key_values")
        return output["sequences"], cache

    @staticmethod
    def _prompt_cache(cache: Any, length: int) -> Any:
        """`cache` cut back to its first `length` positions, in place; None when there is none, `length` is 0 or
        the cache cannot be cut (not a `DynamicCache`, or a sliding-window layer that already dropped positions).
        `crop` with a negative count removes that many positions in every transformers 5 (5.2x refuses a
        positive one)."""
        from transformers import DynamicCache

        if not isinstance(cache, DynamicCache) or length < 1:  # a static or hybrid cache keeps its own size
            return None
        try:
            excess = cache.get_seq_length() - length
            if excess < 0:
                return None
            if excess:
                cache.crop(-excess)
        except (RuntimeError, ValueError, TypeError):  # e.g. a sliding window already full
            return None
        return cache if cache.get_seq_length() == length else None


_TOKEN_NEWLINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its size, its tables)


def newline_tables(tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token id, from its text decoded alone without special tokens (computed once per tokenizer):
    whether it holds a newline, a newline after some other character, and any character but a newline."""
    import torch

    cached = _TOKEN_NEWLINES.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    tables = (torch.tensor(["\n" in t for t in texts], dtype=torch.bool),
              torch.tensor(["\n" in t.lstrip("\n") for t in texts], dtype=torch.bool),
              torch.tensor([bool(t.replace("\n", "")) for t in texts], dtype=torch.bool))
    _TOKEN_NEWLINES[tokenizer] = (len(tokenizer), tables)
    return tables


class NewlineStop:
    """`generate`'s stopping criterion for one-line replies: a row stops once its generated text holds a
    newline after some non-newline text (leading newlines are skipped).

    Decided on the device from the newest token alone, without decoding: per row, whether text has been seen
    is kept as a tensor; a token stops the row when it holds a newline after text of its own, or any newline
    once text was seen (`newline_tables`). That equals decoding the row at every step wherever a token's text
    is the same alone and in context (byte-level BPE such as SmolLM2's; Gemma's SentencePiece, which adds no
    leading space) (tested against the decoding version). Make one per `generate` call: it counts the steps.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int):
        self.tables = newline_tables(tokenizer)
        self.prompt_length = prompt_length
        self.seen_text: torch.Tensor | None = None
        self.steps = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        import torch

        self.steps += 1
        if input_ids.shape[1] != self.prompt_length + self.steps:
            raise RuntimeError(f"NewlineStop expected {self.prompt_length} prompt tokens and {self.steps} new ones, "
                               f"got {input_ids.shape[1]} tokens: make one per generate call")
        if self.seen_text is None:
            self.tables = tuple(t.to(input_ids.device) for t in self.tables)
            self.seen_text = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        newline, newline_after_text, text = self.tables
        token = input_ids[:, -1]
        known = token < len(newline)  # ids past the tokenizer (a padded embedding) decode to nothing
        token = torch.where(known, token, torch.zeros_like(token))
        stop = known & (newline_after_text[token] | (self.seen_text & newline[token]))
        self.seen_text = self.seen_text | (known & text[token])
        return stop


class EndpointError(RuntimeError):
    """A request to an OpenAI-compatible endpoint that failed, naming its URL and HTTP status."""

    def __init__(self, url: str, status: int | None, detail: str):
        self.url, self.status = url, status
        super().__init__(f"POST {url} failed: {f'HTTP {status}' if status is not None else 'no response'}: {detail}")


class OpenAICompatibleClient:
    """Greedy replies from an OpenAI-compatible HTTP API (OpenAI, vLLM, llama.cpp server, ...).

    The API key is read from the environment variable named `api_key_env` at each request and is
    never kept on the object, so repr, pickles and saved configs cannot carry it. Without the
    variable set, requests go without an Authorization header (local servers need none).
    Requests answered 429 or 5xx, or not answered at all, are retried `max_retries` times with
    exponential backoff (or the server's Retry-After). The endpoint gives no token log-probabilities
    here, so perplexity is NA for it, as for GPT-3.5 in §4.2.4's tables.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60,
                 max_retries: int = 3, backoff: float = 1.0):
        if not re.match(r"^https?://", base_url):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff  # seconds before the first retry; doubles after each

    def __repr__(self) -> str:
        return (f"OpenAICompatibleClient(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r})")

    def _post(self, path: str, payload: dict) -> dict:
        url = f"{self.base_url}/{path}"
        body = json.dumps(payload).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            headers = {"Content-Type": "application/json"}
            key = os.environ.get(self.api_key_env, "")  # read per request, never stored
            if key:
                headers["Authorization"] = f"Bearer {key}"
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as error:
                status, detail = error.code, f"{error.reason}: {error.read().decode('utf-8', 'replace')[:500]}"
                if status != 429 and status < 500:
                    hint = f" (is ${self.api_key_env} set?)" if status in (401, 403) and not key else ""
                    raise EndpointError(url, status, detail + hint) from None
                retry_after = error.headers.get("Retry-After") if error.headers else None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                status, detail = None, str(getattr(error, "reason", error))
            else:
                try:
                    return json.loads(raw)
                except json.JSONDecodeError as error:
                    raise EndpointError(url, 200, f"response is not JSON ({error}): {raw[:200]!r}") from None
            if attempt == self.max_retries:
                raise EndpointError(url, status, f"{detail} (gave up after {attempt + 1} attempts)")
            delay = self.backoff * 2 ** attempt
            if retry_after and retry_after.strip().isdigit():
                delay = min(float(retry_after), 60.0)
            time.sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _choice(response: dict, url: str, key: str) -> str:
        try:
            choice = response["choices"][0]
            text = choice["message"]["content"] if key == "message" else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(url, 200, f"unexpected response shape: {json.dumps(response)[:300]}") from None
        return text or ""

    def generate(self, messages_list: Sequence[Sequence[dict] | str], max_new_tokens: int = 40,
                 progress: bool = False) -> list[str]:
        """One chat completion per message list (or its JSON), temperature 0: POST /chat/completions."""
        replies = []
        for messages in progress_bar(messages_list, desc=f"chat {self.model}", disable=not progress):
            if isinstance(messages, str):
                messages = json.loads(messages)
            payload = {"model": self.model, "messages": list(messages), "temperature": 0,
                       "max_tokens": max_new_tokens}
            replies.append(self._choice(self._post("chat/completions", payload),
                                        f"{self.base_url}/chat/completions", "message"))
        return replies

    def complete(self, prompts: Sequence[str], max_new_tokens: int = 40, progress: bool = False) -> list[str]:
        """One text completion per prompt, temperature 0, stopping at a newline: POST /completions."""
        replies = []
        for prompt in progress_bar(prompts, desc=f"complete {self.model}", disable=not progress):
            payload = {"model": self.model, "prompt": prompt, "temperature": 0, "max_tokens": max_new_tokens,
                       "stop": ["\n"]}
            replies.append(self._choice(self._post("completions", payload), f"{self.base_url}/completions", "text"))
        return replies


@dataclass(frozen=True)
class Baseline:
    """One prompt-LLM row of stage 06: its method name, label, generator, format and prompt inputs."""

    method: str
    label: str
    generator: Any  # LocalLLM or OpenAICompatibleClient
    fmt: str  # "chat" or "completion"
    paper_history: bool = False  # the paper's 10-turn history (extra rows, never in the claims)
    rag: bool = False  # the user's retrieved own training pairs in the prompt (Q3)

    def variant(self, paper_history: bool = False, rag: bool = False) -> Baseline:
        """The same LLM with the paper's history or with retrieval."""
        method = paper_history_method(self.method) if paper_history else self.method + (RAG_SUFFIX if rag else "")
        label = paper_history_label(self.label) if paper_history else self.label + (RAG_LABEL if rag else "")
        return Baseline(method, label, self.generator, self.fmt, paper_history, rag)


@dataclass(frozen=True)
class PromptInputs:
    """What the prompts show besides the speaker and the profiles: which turns of history, and which of the
    speaker's own past replies (RAG). Series are indexed like the pairs they belong to."""

    histories: pd.Series | None = None  # per pair: the (speaker_id, text) turns shown; None: the paper's
    memories: pd.Series | None = None  # per pair: retrieved `retrieval.Memory` lists; None: no retrieval
    max_history: int = MAX_HISTORY  # the paper's history: corpus turns before each reply (histories None)
    split: str | None = "test"  # the pairs of this split; None: every row


def baseline_prompts(pairs: pd.DataFrame, users: pd.DataFrame, train_pairs: pd.DataFrame, turns: pd.DataFrame,
                     fmt: str, language: str = "en", inputs: PromptInputs = PromptInputs()) -> pd.DataFrame:
    """§4.2.2 prompts, one row per pair of `split` in `pairs` (all rows with split=None): split_set (NA when
    `pairs` has none), pair_id, speaker_id, prompt (chat: the messages as JSON; completion: the text),
    reference, history_turns (the turns shown). A pair_id can recur across split sets; (split_set, pair_id)
    is the key.

    The history: `inputs.histories` (a Series indexed like `pairs`: the (speaker_id, text) turns each prompt
    shows, from `shared_histories`, the fine-tuned systems' turns) when given; else the paper's, the
    `inputs.max_history` corpus turns before each reply (`dialogue_history` on `turns`, stage 00's canonical
    turns). Each turn is labelled by its speaker's role. Self-introductions come from `train_pairs` (see
    `self_introduction`; only its training splits are read), of the same split set as the pair when both
    frames have `split_set`. `inputs.memories` (RAG): the speaker's own retrieved training pairs, each shown
    as the partner's last line and the speaker's reply.
    """
    histories, split = inputs.histories, inputs.split
    _check_format(fmt)
    _template(language)
    missing = {"pair_id", "dialogue_id", "turn_index", "speaker_id", "partner_id", "response"} - set(pairs.columns)
    if missing:
        raise ValueError(f"pairs lack columns {sorted(missing)}")
    if split is not None:
        if "split" not in pairs:
            raise ValueError(f"pairs have no `split` column to pick split {split!r} from (pass split=None)")
        pairs = pairs[pairs["split"] == split]
    if histories is None:
        histories = dialogue_history(turns, pairs, inputs.max_history)
    else:
        histories = _aligned(histories, pairs, "histories")
    memories = (_aligned(inputs.memories, pairs, "memories") if inputs.memories is not None
                else pd.Series([[]] * len(pairs), index=pairs.index, dtype=object))
    profiles = profile_lookup(users)
    by_set = "split_set" in pairs and "split_set" in train_pairs
    intros: dict[tuple, str] = {}
    rows = []
    for row, history, found in zip(pairs.itertuples(index=False), histories, memories):
        split_set = getattr(row, "split_set", pd.NA)
        key = (split_set if by_set else None, row.speaker_id)
        if key not in intros:
            train = train_pairs[train_pairs["split_set"] == key[0]] if by_set else train_pairs
            intros[key] = self_introduction(users, train, row.speaker_id)
        play = RolePlay(speaker_id=str(row.speaker_id), history=history, partner_id=str(row.partner_id or ""),
                        speaker_profile=profiles.get(row.speaker_id), partner_profile=profiles.get(row.partner_id),
                        self_intro=intros[key], memories=[(m.context[-1] if m.context else "", m.reply) for m in found])
        shown = len(history)  # every turn of the history given (dialogue_history already cut it to max_history)
        prompt = (json.dumps(build_chat_messages(play, shown, language), ensure_ascii=False) if fmt == "chat"
                  else build_completion_prompt(play, shown, language))
        rows.append({"split_set": split_set, "pair_id": row.pair_id, "speaker_id": row.speaker_id, "prompt": prompt,
                     "reference": row.response, "history_turns": shown})
    return pd.DataFrame(rows, columns=["split_set", "pair_id", "speaker_id", "prompt", "reference", "history_turns"])


def _aligned(values: pd.Series, pairs: pd.DataFrame, what: str) -> pd.Series:
    missing = pairs.index.difference(values.index)
    if len(missing):
        raise ValueError(f"{what} lack {len(missing)} of the pairs (index {missing[:3].tolist()}); index them as the pairs")
    return values.loc[pairs.index]


def prompt_tokens(generator: LocalLLM | OpenAICompatibleClient, prompts: Sequence[str], fmt: str) -> list[float]:
    """Tokens of each whole prompt as the LLM reads it (its own tokenizer, chat template included); NaN for an
    endpoint, whose tokenizer is not known here."""
    if isinstance(generator, LocalLLM):
        return [float(len(generator.encode_prompt(prompt, fmt))) for prompt in prompts]
    return [math.nan] * len(prompts)


def on_contexts(scores: pd.DataFrame, contexts: pd.DataFrame,
                keys: Sequence[str] = ("dataset", "split_set", "pair_id")) -> pd.DataFrame:
    """The rows of `scores` whose (dataset, split_set, pair_id) is among `contexts`' (e.g. the fine-tuned
    systems' scores on the contexts the LLMs answered). A pair_id alone is not a context: the same pair is
    a test pair of several split sets, answered by different fine-tuned models (and ids can recur across
    datasets)."""
    keys = list(keys)
    for name, frame in (("scores", scores), ("contexts", contexts)):
        missing = set(keys) - set(frame.columns)
        if missing:
            raise ValueError(f"{name} lack the key columns {sorted(missing)} of a test context")
    wanted = pd.MultiIndex.from_frame(contexts[keys].drop_duplicates())
    return scores[pd.MultiIndex.from_frame(scores[keys]).isin(wanted)]


def run_baseline(generator: LocalLLM | OpenAICompatibleClient, prompts: pd.DataFrame, fmt: str,
                 max_new_tokens: int = 40, batch_size: int = 8, progress: bool = True,
                 generate: Sequence[bool] | None = None) -> pd.DataFrame:
    """`prompts` (from `baseline_prompts`) plus `raw_generated`, `generated` (cleaned by `clean_reply`),
    and `nll` / `n_tokens` of the reference: from a LocalLLM, NaN from an endpoint (perplexity NA).

    `generate` (a flag per prompt; None: all) picks the prompts that get a reply; the others keep `raw_generated`
    and `generated` None. A LocalLLM scores the reference of every prompt: the chosen ones in the pass that
    generates (`generate_and_score`), the rest in forward passes only (`reference_nll`), with the same NLLs.
    """
    _check_format(fmt)
    missing = {"prompt", "reference"} - set(prompts.columns)
    if missing:
        raise ValueError(f"prompts lack columns {sorted(missing)}")
    items, references = prompts["prompt"].tolist(), prompts["reference"].tolist()
    chosen = [True] * len(items) if generate is None else [bool(flag) for flag in generate]
    if len(chosen) != len(items):
        raise ValueError(f"{len(chosen)} generate flags for {len(items)} prompts")
    rows = [i for i, flag in enumerate(chosen) if flag]
    rest = [i for i, flag in enumerate(chosen) if not flag]
    raw: list[str | None] = [None] * len(items)
    scores: list[tuple[float, Any]] = [(math.nan, math.nan)] * len(items)
    if isinstance(generator, LocalLLM):
        if rows:
            replies, chosen_scores = generator.generate_and_score(
                [items[i] for i in rows], [references[i] for i in rows], fmt, max_new_tokens=max_new_tokens,
                batch_size=batch_size, progress=progress)  # one pass over each prompt
            for i, reply, score in zip(rows, replies, chosen_scores):
                raw[i], scores[i] = reply, score
        if rest:
            for i, score in zip(rest, generator.reference_nll([items[i] for i in rest], [references[i] for i in rest],
                                                              fmt, batch_size=batch_size, progress=progress)):
                scores[i] = score
    elif isinstance(generator, OpenAICompatibleClient):
        chosen_items = [items[i] for i in rows]
        replies = (generator.generate(chosen_items, max_new_tokens, progress=progress) if fmt == "chat"
                   else generator.complete(chosen_items, max_new_tokens, progress=progress))
        for i, reply in zip(rows, replies):
            raw[i] = reply
    else:
        raise TypeError(f"generator must be a LocalLLM or an OpenAICompatibleClient, got {type(generator).__name__}")
    result = prompts.copy()
    result["raw_generated"] = pd.Series(raw, index=result.index, dtype=object)
    result["generated"] = pd.Series([None if text is None else clean_reply(text) for text in raw], index=result.index,
                                    dtype=object)
    result["nll"] = [float(nll) for nll, _ in scores]
    result["n_tokens"] = pd.array([None if isinstance(n, float) else n for _, n in scores], dtype="Int64")
    return result
