"""BYU Chit-Chat (PyPI `chitchat-dataset`): 7,168 text chats by 1,315 real people with stable ids.

Each conversation's `messages` is a list of turns, each turn a list of messages by one sender;
we join a turn's messages into one utterance. The corpus carries no profiles: every field starts
`unknown` and notebook 01 infers them (§3.3).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from udg_lib.data.schema import RECORD, Corpus, CorpusError, read_json, users_from_speakers, validate_corpus


def default_chitchat_path() -> Path:
    import chitchat_dataset

    return Path(chitchat_dataset.__file__).resolve().parent / "dataset.json"


def load_chitchat(path: str | Path | None = None, *, message_separator: str = " ") -> Corpus:
    """Load the Chit-Chat JSON (the packaged copy by default) into the canonical schema.

    Whitespace-only turns (12 in the released corpus) are dropped and counted in `meta`.
    """
    path = Path(path) if path else default_chitchat_path()
    data = read_json(path)
    if not isinstance(data, dict):
        raise CorpusError(path, "top level", "expected an object of conversations keyed by id")

    rows, dropped = [], 0
    for conversation_id in sorted(data):
        conversation = data[conversation_id]
        record = f"conversation {conversation_id}"
        if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
            raise CorpusError(path, record, "missing field 'messages'")
        turn_index = 0
        for position, turn in enumerate(conversation["messages"]):
            where = f"{record} turn {position}"
            if not isinstance(turn, list) or not all(isinstance(m, dict) for m in turn):
                raise CorpusError(path, where, "a turn must be a list of message objects")
            for field in ("text", "sender"):
                if any(field not in m for m in turn):
                    raise CorpusError(path, where, f"missing field '{field}'")
            senders = {m["sender"] for m in turn}
            if len(senders) > 1:
                raise CorpusError(path, where, f"messages from more than one sender: {sorted(senders)}")
            text = message_separator.join(str(m["text"]).strip() for m in turn if str(m["text"]).strip())
            if not text:
                dropped += 1
                continue
            rows.append({
                "dialogue_id": conversation_id,
                "turn_index": turn_index,
                "speaker_id": senders.pop(),
                "text": text,
                "timestamp": turn[0].get("timestamp", ""),
                RECORD: where,
            })
            turn_index += 1
    turns = pd.DataFrame(rows)
    turns, users = validate_corpus(turns, users_from_speakers(turns["speaker_id"]), path)
    return Corpus(
        name="chitchat", turns=turns, users=users, language="en", domain="open (conversation starters)",
        style="text chat", user_kind="Real", source=f"chitchat-dataset ({path.name})",
        extra={"dropped_empty_turns": dropped},
    )
