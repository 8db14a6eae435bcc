"""The study's conditions, and the one loop over them that stages 03-06 share.

A *condition* is (dataset, split set, pre-trained model, method): one row of Tables 3-5 in one split set.
Every method of a (dataset, split set, pre-trained model) trains on the same users' pairs and lives in the
same folder of stage 03, so the unit the stages loop over is that triple with its data, a `Cell`:
the split set's rows of the dataset's evaluation pairs, its users table (profiles inferred without that
set's dev/test turns, stage 01), the users fine-tuned there, and its folder. `Cell.condition(method)` names
one condition of it.

`cells` is the loop: stage 03 selects each set's users (`max_users`), stages 04-06 read the users stage 03
trained (`trained`). Notebooks call it instead of writing the dataset x split set x pre-trained loop, and
library functions take a cell instead of the (pairs, users, user_ids, fmt, folder) bundle by hand.
A cell with `pretrained` "none" carries the data without a pre-trained model: the floors and the prompt LLMs.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from udg_lib.data.prepare import corpus_language

# The prompt format each pre-trained model was trained with (§3.4); fine-tuning keeps it.
PRETRAINED_FORMATS: dict[str, str] = {"plain_t5": "plain", "plain_dialogue": "plain", "psp": "psp", "ppp": "ppp"}
PRETRAINED_LABELS: dict[str, str] = {"plain_t5": "Plain T5", "plain_dialogue": "Plain Dialogue", "psp": "PSP",
                                     "ppp": "PPP"}
NO_PRETRAINED = "none"  # the floors' and prompt LLMs' cell: data without a pre-trained model of ours
EVAL_PAIRS_FILE = "eval_pairs.parquet"  # stage 00, per dataset


@dataclass(frozen=True)
class Condition:
    """One condition of the study: a row of Tables 3-5 in one split set."""

    dataset: str
    split_set: int
    pretrained: str
    method: str


def condition_dir(root: str | Path, dataset: str, split_set: int, pretrained: str) -> Path:
    """Stage 03's folder of a (dataset, split set, pre-trained model): `<root>/<dataset>/set<k>/<pretrained>`."""
    return Path(root) / dataset / f"set{split_set}" / pretrained


@dataclass(frozen=True, eq=False)
class Cell:
    """One (dataset, split set, pre-trained model) with the data its conditions read.

    `pairs`: the split set's rows of the dataset's evaluation pairs (every split: train_da, train_ft, dev,
    test); `users`: the users table of that set (`load_dataset_users`); `user_ids`: the users fine-tuned and
    evaluated there, sorted; `folder`: stage 03's folder of the cell (None for data-only cells).
    """

    pairs: pd.DataFrame
    users: pd.DataFrame
    user_ids: tuple[str, ...]
    pretrained: str = NO_PRETRAINED
    dataset: str = ""
    split_set: int = 0
    folder: Path | None = None
    language: str = "en"
    fmt_override: str | None = field(default=None, repr=False)  # a format without a pre-trained model (tests)

    def __post_init__(self) -> None:
        if isinstance(self.user_ids, str):
            raise TypeError(f"user_ids must be a sequence of user ids, not the string {self.user_ids!r}")
        object.__setattr__(self, "user_ids", tuple(self.user_ids))
        if "split_set" in self.pairs.columns and self.pairs["split_set"].nunique() > 1:
            raise ValueError(f"pairs hold split sets {sorted(self.pairs['split_set'].unique())}; "
                             "a cell holds one split set's rows")

    @property
    def fmt(self) -> str:
        """The prompt format of the cell's pre-trained model (§3.4)."""
        if self.fmt_override:
            return self.fmt_override
        if self.pretrained not in PRETRAINED_FORMATS:
            raise ValueError(f"cell {self.name}: no prompt format without a pre-trained model")
        return PRETRAINED_FORMATS[self.pretrained]

    @property
    def name(self) -> str:
        return f"{self.dataset or '-'} set {self.split_set} {self.pretrained}"

    def condition(self, method: str) -> Condition:
        return Condition(self.dataset, self.split_set, self.pretrained, method)

    def path(self, *parts: str) -> Path:
        """A path inside the cell's stage 03 folder."""
        if self.folder is None:
            raise ValueError(f"cell {self.name} has no stage 03 folder")
        return Path(self.folder, *parts)

    def with_users(self, user_ids: Iterable[str]) -> Cell:
        """The same cell restricted to `user_ids`, in the order given (e.g. the users a learning-rate sweep
        trains, or a Ray task's chunk: batched LoRA cuts its batches in this order)."""
        return Cell(self.pairs, self.users, tuple(user_ids), self.pretrained, self.dataset, self.split_set,
                    self.folder, self.language, self.fmt_override)

    def with_pairs(self, pairs: pd.DataFrame) -> Cell:
        """The same cell over other rows (e.g. only the users a Ray task trains)."""
        return Cell(pairs, self.users, self.user_ids, self.pretrained, self.dataset, self.split_set, self.folder,
                    self.language, self.fmt_override)

    @cached_property
    def test(self) -> pd.DataFrame:
        """Every test pair of the cell's users, sorted by user and pair id: all are scored."""
        return sample_test_contexts(self.pairs, self.user_ids, 0)

    def generated_ids(self, cap: int, seed: int) -> set[Any]:
        """The test pairs whose replies are generated: each user's `generation_subset` of at most `cap`."""
        return generated_pair_ids(self.pairs, self.user_ids, cap, seed, self.dataset, self.split_set)

    def train_pairs(self, user_id: str) -> pd.DataFrame:
        """The user's own training pairs of this set (train_da and train_ft): all that retrieval may read."""
        return self.pairs[(self.pairs["speaker_id"] == user_id) & self.pairs["split"].isin(["train_da", "train_ft"])]


def users_table_path(users_dir: str | Path, dataset: str, split_set: int) -> Path:
    """Stage 01's users table for one split set: profiles that read none of that set's dev/test turns."""
    return Path(users_dir) / f"{dataset}.set{int(split_set)}.parquet"


def load_dataset_users(prepared_dir: str | Path, users_dir: str | Path, dataset: str, split_set: int) -> pd.DataFrame:
    """Every user of a dataset with the profiles of split set `split_set` (stage 01), so PPP finds partners'
    profiles too; `evaluation` marks the evaluation users, which carry their One-ID (stage 00; "" elsewhere)."""
    eval_users = pd.read_csv(Path(prepared_dir) / dataset / "eval_users.csv", dtype=str, keep_default_na=False)
    path = users_table_path(users_dir, dataset, split_set)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no users table for split set {split_set}; rerun stage 01 (--from 01)")
    profiles = pd.read_parquet(path)
    profiles = profiles.drop(columns=[c for c in ("one_id", "n_turns", "evaluation") if c in profiles.columns])
    missing = sorted(set(eval_users["user_id"]) - set(profiles["user_id"]))
    if missing:
        raise ValueError(f"{path}: no profile for {len(missing)} evaluation users, first {missing[:5]}")
    merged = profiles.merge(eval_users[["user_id", "one_id", "n_turns"]], on="user_id", how="left")
    merged["evaluation"] = merged["one_id"].notna()
    merged["one_id"] = merged["one_id"].fillna("")
    merged["n_turns"] = pd.to_numeric(merged["n_turns"]).fillna(0).astype(int)
    return merged.sort_values(["evaluation", "user_id"], ascending=[False, True]).reset_index(drop=True)


def evaluation_rows(users: pd.DataFrame) -> pd.DataFrame:
    """The evaluation users' rows of a users table (`load_dataset_users` marks them in `evaluation`; a table
    without that column holds evaluation users only)."""
    return users[users["evaluation"]] if "evaluation" in users.columns else users


def evaluation_user_ids(users: pd.DataFrame) -> list[str]:
    return sorted(evaluation_rows(users)["user_id"])


def set_user_ids(users: pd.DataFrame, pairs: pd.DataFrame, max_users: int = 0) -> list[str]:
    """The users fine-tuned in one split set: the first `max_users` evaluation users by id (0: all) that have
    pairs in this set's `pairs` (stage 00 leaves a user out of a set without fine-tuning, dev or test pairs)."""
    present = set(pairs["speaker_id"])
    return [u for u in evaluation_user_ids(users)[: max_users or None] if u in present]


def trained_user_ids(trained_metrics: Mapping[str, Any], dataset: str, split_set: int) -> list[str]:
    """The users stage 03 fine-tuned for a dataset and split set (its metrics' `trained_users`)."""
    return list(trained_metrics["trained_users"][dataset][str(split_set)])


def dataset_language(prepared_dir: str | Path, dataset: str) -> str:
    """The language stage 00 recorded for a dataset ("en", "ja"): picks questions, tokenizers and embeddings."""
    return corpus_language(prepared_dir, dataset)


def cells(prepared_dir: str | Path, users_dir: str | Path, datasets: Sequence[str], split_sets: Sequence[int],
          pretrained: Sequence[str], stage03_dir: str | Path | None = None,
          trained: Mapping[str, Any] | None = None, max_users: int = 0) -> Iterator[Cell]:
    """Every (dataset, split set, pre-trained model) in that order, with its data: the loop of stages 03-06.

    The users of a set are the ones stage 03 trained when `trained` (its metrics) is given, else the first
    `max_users` evaluation users with pairs in the set (`set_user_ids`; stage 03 itself). Each dataset's pairs
    are read once. `pretrained` may hold "none" for a cell without a model (floors, prompt LLMs); cells of
    one (dataset, split set) share their pairs and users frames.
    """
    for dataset in datasets:
        language = dataset_language(prepared_dir, dataset)
        all_pairs = pd.read_parquet(Path(prepared_dir) / dataset / EVAL_PAIRS_FILE)
        for split_set in split_sets:
            users = load_dataset_users(prepared_dir, users_dir, dataset, split_set)  # no dev/test turns of the set
            pairs = all_pairs[all_pairs["split_set"] == split_set]
            user_ids = (trained_user_ids(trained, dataset, split_set) if trained is not None
                        else set_user_ids(users, pairs, max_users))
            for name in pretrained:
                folder = (condition_dir(stage03_dir, dataset, split_set, name)
                          if stage03_dir is not None and name != NO_PRETRAINED else None)
                yield Cell(pairs, users, tuple(sorted(user_ids)), name, dataset, int(split_set), folder, language)


def by_split_set(cells: Iterable[Cell]) -> Iterator[list[Cell]]:
    """`cells` grouped per (dataset, split set), in order: the systems that are scored together."""
    for _, group in itertools.groupby(cells, key=lambda cell: (cell.dataset, cell.split_set)):
        yield list(group)


def sample_test_contexts(pairs: pd.DataFrame, user_ids: Sequence[str], per_user: int, seed: int = 0) -> pd.DataFrame:
    """The `test` pairs of `user_ids` (one split set), or a seeded sample of `per_user` of each user's (0: all),
    sorted by user and pair id."""
    test = pairs[(pairs["split"] == "test") & pairs["speaker_id"].isin(set(user_ids))]
    if per_user:
        test = test.sort_values(["speaker_id", "pair_id"])
        keep = [i for _, g in test.groupby("speaker_id") for i in g.sample(min(per_user, len(g)), random_state=seed).index]
        test = test.loc[keep]
    return test.sort_values(["speaker_id", "pair_id"]).reset_index(drop=True)


def generation_subset(pair_ids: Iterable[Any], cap: int, seed: int, key: str) -> list[Any]:
    """The pair ids whose replies are generated: at most `cap` of `pair_ids` (0, or a cap of at least their
    number: all), sorted. Scoring (reference likelihood, forward passes only) runs on every pair; greedy
    replies cost a forward pass per token, so they run on this subset.

    A pair is kept when its SHA-256 of (seed, key, pair id) is among the `cap` smallest: the choice depends on
    nothing but these (not their order, the process, or Python's hash seed), and a pair added later does not
    reshuffle the others. `key` names one user's test pairs (`subset_key`), so users draw independently and
    any stage selects the same pairs from the same arguments.
    """
    ids = sorted(set(pair_ids))
    if not cap or cap >= len(ids):
        return ids
    rank = {p: hashlib.sha256(f"{seed}\x1f{key}\x1f{p}".encode("utf-8")).hexdigest() for p in ids}
    return sorted(sorted(ids, key=rank.__getitem__)[:cap])


def subset_key(dataset: str, split_set: int, user_id: str) -> str:
    """`generation_subset`'s key for one user's test pairs of one dataset and split set."""
    return f"{dataset}/set{int(split_set)}/{user_id}"


def generated_pair_ids(pairs: pd.DataFrame, user_ids: Sequence[str], cap: int, seed: int, dataset: str,
                       split_set: int) -> set[Any]:
    """The test pairs of `user_ids` (one split set's `pairs`) whose replies are generated: each user's
    `generation_subset` of at most `cap` (0: all)."""
    test = sample_test_contexts(pairs, user_ids, 0)
    return {p for user, group in test.groupby("speaker_id", sort=True)
            for p in generation_subset(group["pair_id"], cap, seed, subset_key(dataset, split_set, user))}
