"""Shared fixtures: small generated corpora (English and Japanese) for the data and split tests."""

from __future__ import annotations

import random

import pandas as pd
import pytest


def synthetic_turns(n_users: int = 12, n_dialogues: int = 120, turns_per_dialogue: int = 8, seed: int = 0) -> pd.DataFrame:
    """Two-party dialogues between random pairs of users; text names speaker, dialogue and turn."""
    rng = random.Random(seed)
    users = [f"u{i:02d}" for i in range(n_users)]
    rows = []
    for d in range(n_dialogues):
        a, b = rng.sample(users, 2)
        for t in range(turns_per_dialogue):
            speaker = (a, b)[t % 2]
            rows.append({"dialogue_id": f"d{d:03d}", "turn_index": t, "speaker_id": speaker,
                         "text": f"{speaker} says turn {t} of d{d:03d}", "timestamp": ""})
    return pd.DataFrame(rows)


@pytest.fixture
def turns() -> pd.DataFrame:
    return synthetic_turns()
