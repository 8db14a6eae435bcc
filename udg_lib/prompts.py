"""Model inputs (§3.4, §4.1.3): Plain, PSP, PPP, and the One-ID prefix.

    Plain: x_0 [SEP] x_1 ... [SEP] x_n
    PSP:   [USER] u_p1, u_p2, ... [SEP] x_0 [SEP] ... x_n
    PPP:   [USER1] speaker profile [USER2] partner profile [SEP] x_0 [SEP] ... x_n
    One-ID: "<id> " + any of the above, id = 4 random alphanumerics, stable per user
    RAG:   the head (plain: a [USER] head of its own) ends with "said: r_1 | r_2", the user's retrieved
           own training replies (`retrieval`), before the first [SEP]: truncation keeps the head whole

The bracketed markers are special tokens (see `udg_lib.tokenizer`). Context turns are joined with
[SEP] too: the profile always stands before the first [SEP], so the split stays unambiguous.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

from udg_lib.data.schema import PROFILE_FIELDS, UNKNOWN, profile_lookup

USER, USER1, USER2, SEP = "[USER]", "[USER1]", "[USER2]", "[SEP]"
PROMPT_SPECIAL_TOKENS: tuple[str, ...] = (USER, USER1, USER2, SEP)
PROMPT_FORMATS: tuple[str, ...] = ("plain", "psp", "ppp")
ONE_ID_ALPHABET = string.ascii_letters + string.digits
ONE_ID_LENGTH = 4  # §4.1.3: "a random four-digit alphanumeric string"


def render_profile(profile: Mapping[str, object] | None) -> str:
    """`u_p1, u_p2, ...`: the known profile values in the fixed field order; unknown ones are left out."""
    if profile is None:
        return ""
    values = [str(profile.get(f, UNKNOWN)).strip() for f in PROFILE_FIELDS]
    return ", ".join(v for v in values if v and v != UNKNOWN)


def join_context(context: Sequence[str]) -> str:
    return f" {SEP} ".join(t.strip() for t in context)


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def build_plain_prompt(context: Sequence[str]) -> str:
    return join_context(context)


def build_psp_prompt(context: Sequence[str], speaker_profile: Mapping[str, object] | None) -> str:
    """§3.4 Persona Speaker Prompt."""
    return _join(USER, render_profile(speaker_profile), SEP, join_context(context))


def build_ppp_prompt(context: Sequence[str], speaker_profile: Mapping[str, object] | None,
                     partner_profile: Mapping[str, object] | None) -> str:
    """§3.4 Persona Pair Prompt."""
    return _join(USER1, render_profile(speaker_profile), USER2, render_profile(partner_profile), SEP,
                 join_context(context))


MEMORY_LEAD = "said:"  # leads the retrieved replies in a RAG prompt's head


def add_memories(prompt: str, fmt: str, memory: str) -> str:
    """A RAG prompt: the user's retrieved own replies (`retrieval.memory_head`) at the end of the head, so that
    context truncation, which keeps the head whole and cuts the oldest turns, never drops them."""
    if not memory:
        return prompt
    if fmt == "plain":
        return _join(USER, MEMORY_LEAD, memory, SEP, prompt)
    head, sep, context = prompt.partition(f" {SEP}")
    return f"{_join(head, MEMORY_LEAD, memory)}{sep}{context}"


def add_user_id(prompt: str, one_id: str) -> str:
    """§4.1.3 One-ID: the user's id at the beginning of the input prompt."""
    return f"{one_id} {prompt}"


def build_prompt(fmt: str, context: Sequence[str], speaker_profile: Mapping[str, object] | None = None,
                 partner_profile: Mapping[str, object] | None = None, one_id: str | None = None,
                 memory: str = "") -> str:
    if fmt == "plain":
        prompt = build_plain_prompt(context)
    elif fmt == "psp":
        prompt = build_psp_prompt(context, speaker_profile)
    elif fmt == "ppp":
        prompt = build_ppp_prompt(context, speaker_profile, partner_profile)
    else:
        raise ValueError(f"unknown prompt format {fmt!r}; expected one of {PROMPT_FORMATS}")
    prompt = add_memories(prompt, fmt, memory)
    return add_user_id(prompt, one_id) if one_id else prompt


def build_prompts(pairs: pd.DataFrame, users: pd.DataFrame, fmt: str,
                  one_ids: Mapping[str, str] | None = None) -> pd.Series:
    """Prompts for reply pairs (`context`, `speaker_id`, `partner_id`) with profiles from `users`; a `memory`
    column (RAG: `retrieval.memory_head`) puts the user's retrieved replies into each head."""
    profiles = profile_lookup(users)
    memories = pairs["memory"] if "memory" in pairs.columns else [""] * len(pairs)
    return pd.Series([
        build_prompt(fmt, list(row.context), profiles.get(row.speaker_id), profiles.get(row.partner_id),
                     one_ids.get(row.speaker_id) if one_ids else None, memory or "")
        for row, memory in zip(pairs.itertuples(), memories)
    ], index=pairs.index, dtype=object)


def assign_one_ids(user_ids: Iterable[str], seed: int = 0) -> dict[str, str]:
    """A random-looking 4-character id per user, stable across runs and subsets; collisions re-drawn."""
    taken: dict[str, str] = {}
    result = {}
    for user in sorted(set(user_ids)):
        attempt = 0
        while True:
            digest = hashlib.sha256(f"{seed}:{attempt}:{user}".encode()).digest()
            one_id = "".join(ONE_ID_ALPHABET[b % len(ONE_ID_ALPHABET)] for b in digest[:ONE_ID_LENGTH])
            if one_id not in taken:
                break
            attempt += 1
        taken[one_id] = user
        result[user] = one_id
    return result
