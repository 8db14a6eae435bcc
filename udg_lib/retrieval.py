"""A user's own past replies, retrieved for the retrieval-augmented conditions (RAG).

For a context, the user's `k` most similar own training pairs (cosine similarity of sentence embeddings of
the contexts, as the retrieval floor's `metrics.retrieve_responses`): the prompt LLMs of stage 06 read their
contexts and replies (`baselines`), the RAG + per-user LoRA method reads the replies in its input head
(`methods.RagLora`). On LaMP, retrieval of the user's own history is the strongest personalisation baseline
(Salemi & Zamani, SIGIR 2025); this module makes it one condition among the others here.

Leak guard: an index holds only the `train_da` and `train_ft` pairs of the users it was built for, in the
split set of the pairs it was given (`UserMemories.from_pairs` filters them itself). A dev or test reply can
never be retrieved, whatever the caller passes; a pair never retrieves itself (training inputs would
otherwise carry their own reply).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from udg_lib.prompts import SEP

TRAIN_SPLITS: tuple[str, ...] = ("train_da", "train_ft")  # the only rows an index may hold


def context_text(context: Sequence[str]) -> str:
    """A context as one string for retrieval embeddings (turns in order, newest last)."""
    return " \n ".join(context)


@dataclass(frozen=True)
class Memory:
    """One retrieved training pair of the user: its context, its reply, and how similar its context was."""

    pair_id: str
    context: tuple[str, ...]
    reply: str
    similarity: float


class UserMemories:
    """The training pairs of some users, embedded once, searched per user."""

    def __init__(self, embedder, train: pd.DataFrame):
        bad = sorted(set(train["split"]) - set(TRAIN_SPLITS))
        if bad:
            raise ValueError(f"a retrieval index holds training pairs only; got splits {bad}")
        if "split_set" in train.columns and train["split_set"].nunique() > 1:
            raise ValueError(f"a retrieval index holds one split set; got {sorted(train['split_set'].unique())}")
        self.embedder = embedder
        self.train = train.reset_index(drop=True)
        self.vectors = _unit(embedder.encode([context_text(c) for c in self.train["context"]])) if len(train) else None
        self.rows: dict[str, list[int]] = {}
        for row, user in enumerate(self.train["speaker_id"]):
            self.rows.setdefault(user, []).append(row)

    @classmethod
    def from_pairs(cls, embedder, pairs: pd.DataFrame, user_ids: Iterable[str]) -> UserMemories:
        """The index of `user_ids`' own training pairs among one split set's `pairs` (every split may be
        passed: only train_da and train_ft rows are kept)."""
        ids = set(user_ids)
        return cls(embedder, pairs[pairs["split"].isin(TRAIN_SPLITS) & pairs["speaker_id"].isin(ids)])

    def retrieve(self, queries: pd.DataFrame, k: int) -> list[list[Memory]]:
        """For each row of `queries` (context, speaker_id, pair_id), the speaker's `k` most similar own
        training pairs, most similar first (ties: the earlier pair), never the query pair itself."""
        if k < 1:
            return [[] for _ in range(len(queries))]
        found: list[list[Memory]] = [[] for _ in range(len(queries))]
        if self.vectors is None or queries.empty:
            return found
        query_vectors = _unit(self.embedder.encode([context_text(c) for c in queries["context"]]))
        for q, (user, pair_id) in enumerate(zip(queries["speaker_id"], queries["pair_id"])):
            rows = [r for r in self.rows.get(user, []) if self.train.at[r, "pair_id"] != pair_id]
            if not rows:
                continue
            scores = self.vectors[rows] @ query_vectors[q]
            order = np.argsort(-scores, kind="stable")[:k]
            found[q] = [Memory(str(self.train.at[rows[i], "pair_id"]), tuple(self.train.at[rows[i], "context"]),
                               str(self.train.at[rows[i], "response"]), float(scores[i])) for i in order]
        return found


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def memory_head(memories: Sequence[Memory], max_words: int) -> str:
    """The retrieved replies as one string for a fine-tuned model's input head: each cut to `max_words`
    words, joined with " | " (never with [SEP], which ends the head)."""
    replies = [" ".join(m.reply.replace(SEP, " ").split()[:max_words]) for m in memories]
    return " | ".join(r for r in replies if r)
