"""Reply pairs and the paper's splits (§4.2.1, §4.1.3).

- Evaluation users: users with enough turns (UPC scale: about 100-300 each) and at least three partners,
  so that every split set has a dev partner, a test partner and training dialogues.
- Per evaluation user and per seeded set: the dialogues with a random 30% of their partners are
  held out (half dev, half test), the rest is train.
- Each user's train part is halved: one half is pooled over all users for domain adaptation
  (`train_da`), the other is the user's own fine-tuning data (`train_ft`).
- Pre-training uses other users only: no dialogue with an evaluation user in it.
- A training pair whose context shows a turn held out for another evaluation user is dropped,
  so no dev/test reply ever appears in training inputs (this matters where evaluation users share
  dialogues, as sitcom characters do).
- Evaluation units are real: a user left without fine-tuning, dev or test pairs in a set (after the
  leakage guard) is left out of that set, and the count is reported; no model is "fine-tuned on nothing".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

SPLITS: tuple[str, ...] = ("train_da", "train_ft", "dev", "test")
# One dev partner, one test partner and at least one partner whose dialogues are for training (§4.2.1).
MIN_PARTNERS = 3
# The splits a user needs in a set to be an evaluation unit there: own training data, early stopping, test.
REQUIRED_SPLITS: tuple[str, ...] = ("train_ft", "dev", "test")


@dataclass(frozen=True)
class SplitConfig:
    min_turns: int = 100  # evaluation users speak at least this many turns
    max_turns: int | None = 300  # ... and at most this many (None: no cap, e.g. sitcom leads)
    max_users: int | None = None  # a seeded sample of the eligible users, for small profiles
    heldout_partner_fraction: float = 0.3  # §4.2.1: 30% of partners -> dev + test
    n_sets: int = 3  # §4.2.1: three seeded sets
    context_turns: int = 5  # up to N previous turns as context
    seed: int = 0
    # At most this many pairs per user in each split of a set (a seeded sample; None keeps all). Small
    # profiles use it to bring sitcom leads (~500 pairs per split) to the scale of chat users (~50).
    max_pairs_per_split: int | None = None
    # The test split's own cap (None: max_pairs_per_split; 0: all test pairs). Every test pair is scored by
    # forward passes, which cost little beside training, so a design may keep more test pairs than it trains
    # on: the within-user part of a user's mean difference shrinks with them (udg_lib.power).
    max_test_pairs: int | None = None

    def split_caps(self) -> dict[str, int | None]:
        """The pair cap of each split (None or 0: uncapped)."""
        test = self.max_pairs_per_split if self.max_test_pairs is None else self.max_test_pairs
        return {"train_da": self.max_pairs_per_split, "train_ft": self.max_pairs_per_split,
                "dev": self.max_pairs_per_split, "test": test}

    def as_dict(self) -> dict:
        return asdict(self)


def build_reply_pairs(turns: pd.DataFrame, context_turns: int) -> pd.DataFrame:
    """Every turn with at least one previous turn becomes a pair: up to N previous turns -> response.

    `partner_id` is the speaker of the nearest earlier turn by someone else ("" if none).
    """
    rows = []
    for dialogue_id, dialogue in turns.groupby("dialogue_id", sort=True):
        texts = dialogue["text"].tolist()
        speakers = dialogue["speaker_id"].tolist()
        indices = dialogue["turn_index"].tolist()
        for position in range(1, len(texts)):
            speaker = speakers[position]
            partner = next((s for s in reversed(speakers[:position]) if s != speaker), "")
            start = max(0, position - context_turns)
            rows.append({
                "pair_id": f"{dialogue_id}#{indices[position]}",
                "dialogue_id": dialogue_id,
                "turn_index": indices[position],
                "speaker_id": speaker,
                "partner_id": partner,
                "context": texts[start:position],
                "context_first_turn": indices[start],
                "response": texts[position],
            })
    return pd.DataFrame(rows, columns=["pair_id", "dialogue_id", "turn_index", "speaker_id", "partner_id",
                                       "context", "context_first_turn", "response"])


def eligibility(turns: pd.DataFrame, config: SplitConfig, partners: pd.DataFrame | None = None
                ) -> tuple[list[str], dict[str, int]]:
    """Evaluation users and how many speakers each rule excluded (Table 2).

    Eligible: `min_turns`..`max_turns` turns and at least `MIN_PARTNERS` partners (one dev, one test, one
    for training). Counts: `speakers`, `excluded_below_min_turns`, `excluded_above_max_turns`,
    `excluded_few_partners` (each speaker counted once, by the first rule that excludes them),
    `eligible`, and `not_sampled` (eligible users outside the `max_users` sample)."""
    counts = turns.groupby("speaker_id").size()
    partners = dialogue_partners(turns) if partners is None else partners
    n_partners = partners[partners["partner_id"] != ""].groupby("user_id")["partner_id"].nunique()
    below = counts < config.min_turns
    above = ~below & (counts > config.max_turns if config.max_turns is not None else False)
    in_range = counts[~below & ~above]
    few = [u for u in in_range.index if n_partners.get(u, 0) < MIN_PARTNERS]
    users = sorted(set(in_range.index) - set(few))
    eligible = len(users)
    if config.max_users is not None and len(users) > config.max_users:
        rng = np.random.default_rng(config.seed)
        users = sorted(rng.choice(users, size=config.max_users, replace=False).tolist())
    return users, {
        "speakers": int(len(counts)),
        "excluded_below_min_turns": int(below.sum()),
        "excluded_above_max_turns": int(np.sum(above)),
        "excluded_few_partners": len(few),
        "eligible": eligible,
        "not_sampled": eligible - len(users),
    }


def select_eval_users(turns: pd.DataFrame, config: SplitConfig, partners: pd.DataFrame | None = None) -> list[str]:
    """Users with min_turns..max_turns turns and at least `MIN_PARTNERS` partners (see `eligibility`).

    `partners` is `dialogue_partners(turns)` when the caller has it already."""
    return eligibility(turns, config, partners)[0]


def no_eval_users_message(name: str, config: SplitConfig, counts: dict[str, int]) -> str:
    """One line: why a corpus has no evaluation user, rule by rule."""
    max_turns = "no maximum" if config.max_turns is None else f"at most {config.max_turns}"
    return (f"{name}: no evaluation user: of {counts['speakers']} speakers, {counts['excluded_below_min_turns']} "
            f"have fewer than min_turns={config.min_turns} turns, {counts['excluded_above_max_turns']} more than "
            f"max_turns ({max_turns}), {counts['excluded_few_partners']} fewer than {MIN_PARTNERS} partners "
            f"(one dev, one test, one for training); lower min_turns or raise max_turns in the corpus' split "
            f"settings")


def dialogue_partners(turns: pd.DataFrame) -> pd.DataFrame:
    """For each (dialogue, user): the partner, i.e. the other speaker with most turns there ("" if alone)."""
    counts = turns.groupby(["dialogue_id", "speaker_id"], sort=True).size().rename("n").reset_index()
    ranked = counts.sort_values(["dialogue_id", "n", "speaker_id"], ascending=[True, False, True])
    top_two = ranked.groupby("dialogue_id", sort=True)["speaker_id"].agg(lambda s: list(s)[:2])
    partner = [
        next((s for s in top_two[d] if s != user), "")
        for d, user in zip(counts["dialogue_id"], counts["speaker_id"])
    ]
    return pd.DataFrame({"dialogue_id": counts["dialogue_id"], "user_id": counts["speaker_id"], "partner_id": partner})


def assign_user_dialogues(partner_of_dialogue: dict[str, str], pair_counts: dict[str, int],
                          fraction: float, rng: np.random.Generator) -> dict[str, str]:
    """One user's dialogues -> train_da / train_ft / dev / test (§4.2.1, §4.1.3).

    A random `fraction` of the user's partners (at least two, at most all but one) is held out;
    their dialogues go to test (first half of those partners) and dev (the rest). The remaining
    dialogues are split into two halves of about equal pair counts.
    """
    partners = sorted({p for p in partner_of_dialogue.values() if p})
    n_heldout = min(max(2, round(fraction * len(partners))), len(partners) - 1)
    heldout = rng.permutation(partners)[:n_heldout].tolist()
    n_test = math.ceil(n_heldout / 2)
    split_of_partner = {p: ("test" if i < n_test else "dev") for i, p in enumerate(heldout)}

    assignment = {d: split_of_partner[p] for d, p in partner_of_dialogue.items() if p in split_of_partner}
    train = [d for d in sorted(partner_of_dialogue) if d not in assignment]
    halves = {"train_da": 0, "train_ft": 0}
    for dialogue in rng.permutation(train).tolist():  # greedy: the lighter half takes the next dialogue
        half = min(halves, key=lambda h: (halves[h], h != "train_ft"))  # a tie goes to the user's own half
        assignment[dialogue] = half
        halves[half] += pair_counts.get(dialogue, 0)
    return assignment


def split_corpus(turns: pd.DataFrame, config: SplitConfig) -> tuple[pd.DataFrame, pd.DataFrame, list[str], dict]:
    """Reply pairs for pre-training and for evaluation users.

    Returns (pretrain_pairs, eval_pairs, eval_users, report). `eval_pairs` has one row per pair,
    set and split (`split_set`, `split`); pre-training pairs come only from dialogues without any
    evaluation user. `report["heldout_dialogues"]` (a frame: split_set, user_id, dialogue_id, split) lists
    every user's dev/test dialogues per set: stage 01 infers no evaluation user's profile from them (§3.3).
    """
    pairs = build_reply_pairs(turns, config.context_turns)
    partners = dialogue_partners(turns)
    eval_users, eligibility_counts = eligibility(turns, config, partners)
    eval_set = set(eval_users)
    with_eval = set(turns.loc[turns["speaker_id"].isin(eval_set), "dialogue_id"])
    pretrain = pairs[~pairs["dialogue_id"].isin(with_eval)].reset_index(drop=True)

    partners = partners[partners["user_id"].isin(eval_set)]
    user_pairs = pairs[pairs["speaker_id"].isin(eval_set)]
    pair_counts: dict[str, dict[str, int]] = {}
    for (user, dialogue), n in user_pairs.groupby(["speaker_id", "dialogue_id"]).size().items():
        pair_counts.setdefault(user, {})[dialogue] = int(n)

    frames, dropped, left_out, heldout = [], {}, {}, []
    for split_set in range(config.n_sets):
        rng = np.random.default_rng([config.seed, split_set])
        split_of = {}
        for user, group in partners.groupby("user_id", sort=True):
            assignment = assign_user_dialogues(dict(zip(group["dialogue_id"], group["partner_id"])),
                                               pair_counts.get(user, {}),
                                               config.heldout_partner_fraction, rng)
            split_of.update({(user, d): s for d, s in assignment.items()})
        heldout.extend({"split_set": split_set, "user_id": u, "dialogue_id": d, "split": s}
                       for (u, d), s in split_of.items() if s in ("dev", "test"))
        labelled = user_pairs.assign(split=[split_of.get((u, d)) for u, d in
                                            zip(user_pairs["speaker_id"], user_pairs["dialogue_id"])])
        labelled = labelled[labelled["split"].notna()]
        leaky = _context_shows_heldout(labelled)
        dropped[split_set] = int(leaky.sum())
        kept = labelled[~leaky]
        kept = _cap_pairs(kept, config.split_caps(), rng)
        kept, left_out[split_set] = _real_units(kept, eval_users)
        frames.append(kept.assign(split_set=split_set))
    eval_pairs = pd.concat(frames, ignore_index=True) if frames else user_pairs.assign(split=[], split_set=[])
    report = {
        "n_pairs": int(len(pairs)),
        "n_pretrain_pairs": int(len(pretrain)),
        "n_pretrain_dialogues": int(pretrain["dialogue_id"].nunique()),
        "n_pretrain_speakers": int(pretrain["speaker_id"].nunique()),
        "n_eval_users": len(eval_users),
        "n_eval_dialogues": len(with_eval),
        "dropped_leaky_training_pairs": dropped,
        "eligibility": eligibility_counts,
        # per set: users left out of that set for lack of train_ft / dev / test pairs, with the missing splits
        "users_left_out": left_out,
    }
    report["heldout_dialogues"] = pd.DataFrame(heldout, columns=["split_set", "user_id", "dialogue_id", "split"])
    return pretrain, eval_pairs, eval_users, report


def _real_units(labelled: pd.DataFrame, users: list[str]) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Drop the pairs of users who lack any of `REQUIRED_SPLITS` in this set; {user: missing splits}."""
    present = labelled.groupby("speaker_id")["split"].agg(set).to_dict()
    missing = {u: [s for s in REQUIRED_SPLITS if s not in present.get(u, set())] for u in users}
    missing = {u: m for u, m in missing.items() if m}
    return labelled[~labelled["speaker_id"].isin(set(missing))], missing


def _cap_pairs(labelled: pd.DataFrame, caps: dict[str, int | None], rng: np.random.Generator) -> pd.DataFrame:
    """At most `caps[split]` pairs per (user, split) (None or 0: all), drawn with `rng`; original order kept."""
    if not any(caps.values()):
        return labelled
    keep = []
    for (_, split), group in labelled.groupby(["speaker_id", "split"], sort=True):
        index = group.index.to_numpy()
        cap = caps.get(split)
        keep.append(index if not cap or len(index) <= cap else np.sort(rng.choice(index, size=cap, replace=False)))
    return labelled.loc[np.sort(np.concatenate(keep))] if keep else labelled


def _context_shows_heldout(labelled: pd.DataFrame) -> pd.Series:
    """True for a training pair whose context includes a turn that is a dev/test response."""
    heldout = labelled[labelled["split"].isin(["dev", "test"])]
    heldout_turns = heldout.groupby("dialogue_id")["turn_index"].apply(list).to_dict()
    training = labelled["split"].isin(["train_da", "train_ft"])

    def leaks(row) -> bool:
        return any(row.context_first_turn <= t < row.turn_index for t in heldout_turns.get(row.dialogue_id, ()))

    flags = [training_row and leaks(row) for training_row, row in zip(training, labelled.itertuples())]
    return pd.Series(flags, index=labelled.index, dtype=bool)


def table2_row(name: str, meta: dict, eval_pairs: pd.DataFrame, n_users: int, report: dict | None = None) -> dict:
    """The Table 2 analog for one dataset, averaged over split sets (§4.2.1 Table 2), with the speakers each
    eligibility rule excluded when `report` (split_corpus's) is given."""
    per_user = (eval_pairs.groupby(["split_set", "speaker_id", "split"]).size().unstack("split", fill_value=0)
                .reindex(columns=list(SPLITS), fill_value=0))
    train = per_user["train_da"] + per_user["train_ft"]
    n_all_train = train.groupby(level="split_set").sum().mean() if len(per_user) else 0.0
    return {
        "dataset": name,
        "N users": n_users,
        "user": meta.get("user_kind", ""),
        "domain": meta.get("domain", ""),
        "style": meta.get("style", ""),
        "N all train": round(float(n_all_train)),
        "N train / user": round(float(train.mean()), 1) if len(per_user) else 0.0,
        "N fine-tune / user": round(float(per_user["train_ft"].mean()), 1) if len(per_user) else 0.0,
        "N dev / user": round(float(per_user["dev"].mean()), 1) if len(per_user) else 0.0,
        "N test / user": round(float(per_user["test"].mean()), 1) if len(per_user) else 0.0,
        **(_exclusion_columns(report) if report is not None else {}),
    }


def _exclusion_columns(report: dict) -> dict[str, int]:
    counts = report["eligibility"]
    left_out = report["users_left_out"]
    return {
        "speakers": counts["speakers"],
        "excl. few turns": counts["excluded_below_min_turns"],
        "excl. many turns": counts["excluded_above_max_turns"],
        f"excl. < {MIN_PARTNERS} partners": counts["excluded_few_partners"],
        "not sampled": counts["not_sampled"],
        "user-sets left out (no train/dev/test)": sum(len(v) for v in left_out.values()),
    }
