"""Stage 00: turn one loaded corpus into the files every later stage reads.

<out>/<name>/corpus/            turns.parquet, users.parquet, meta.json (canonical schema)
<out>/<name>/pretrain_pairs.parquet   reply pairs from dialogues without evaluation users
<out>/<name>/eval_pairs.parquet       reply pairs of evaluation users, per split set and split
<out>/<name>/eval_users.csv           evaluation users: One-ID, turn counts, profile
<out>/<name>/heldout_dialogues.parquet  per set, each evaluation user's dev/test dialogues (kept out of profiles)
<out>/<name>/prompts.parquet          eval pairs rendered as Plain / PSP / PPP (+ one_id column)
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from udg_lib import io
from udg_lib.data.schema import PROFILE_FIELDS, Corpus, save_corpus
from udg_lib.prompts import PROMPT_FORMATS, assign_one_ids, build_prompts
from udg_lib.splits import SplitConfig, no_eval_users_message, split_corpus, table2_row


def prepare_corpus(corpus: Corpus, config: SplitConfig, out_dir: str | Path) -> dict:
    """Save the corpus, split it, write pairs, evaluation users and prompts; return its report.

    A corpus without evaluation users still gives pre-training pairs; its report carries `warning`, the
    one line saying which eligibility rule excluded everyone (`require_eval_users` fails on it)."""
    out_dir = Path(out_dir) / corpus.name
    save_corpus(corpus, out_dir / "corpus")
    pretrain, eval_pairs, eval_users, report = split_corpus(corpus.turns, config)
    io.write_parquet(out_dir / "heldout_dialogues.parquet", report.pop("heldout_dialogues"))
    one_ids = assign_one_ids(eval_users, seed=config.seed)

    io.write_parquet(out_dir / "pretrain_pairs.parquet", pretrain.assign(dataset=corpus.name))
    io.write_parquet(out_dir / "eval_pairs.parquet", eval_pairs.assign(dataset=corpus.name))

    turn_counts = corpus.turns.groupby("speaker_id").size()
    users = corpus.users[corpus.users["user_id"].isin(eval_users)]
    users = users.assign(one_id=users["user_id"].map(one_ids), n_turns=users["user_id"].map(turn_counts))
    io.write_text(out_dir / "eval_users.csv",
                  users[["user_id", "one_id", "n_turns", *PROFILE_FIELDS]].to_csv(index=False))

    prompts = eval_pairs[["pair_id", "split_set", "split", "speaker_id", "partner_id", "response"]].copy()
    prompts["one_id"] = prompts["speaker_id"].map(one_ids)
    for fmt in PROMPT_FORMATS:
        prompts[fmt] = build_prompts(eval_pairs, corpus.users, fmt)
    io.write_parquet(out_dir / "prompts.parquet", prompts)

    return {
        "meta": corpus.meta,
        "split_config": config.as_dict(),
        "split_report": report,
        "table2": table2_row(corpus.name, corpus.meta, eval_pairs, len(eval_users), report),
        "warning": None if eval_users else no_eval_users_message(corpus.name, config, report["eligibility"]),
        "files": sorted(str(p.relative_to(out_dir.parent)) for p in out_dir.rglob("*") if p.is_file()),
    }


def require_eval_users(reports: list[dict]) -> list[str]:
    """The one-line warnings of corpora without evaluation users; ValueError when no corpus has any."""
    warnings = [r["warning"] for r in reports if r.get("warning")]
    if reports and len(warnings) == len(reports):
        raise ValueError(warnings[0] if len(warnings) == 1 else
                         "no corpus has an evaluation user: " + " | ".join(warnings))
    return warnings


def eval_corpus_names(prepared_dir: str | Path) -> list[str]:
    """The corpora stage 00 prepared that have evaluation users (the others only give pre-training pairs)."""
    names = []
    for name in corpus_names(prepared_dir):
        users = pd.read_csv(Path(prepared_dir) / name / "eval_users.csv", dtype=str, keep_default_na=False)
        if len(users):
            names.append(name)
    return names


def pretraining_texts(out_dir: str | Path, names: list[str]) -> pd.Series:
    """All turns of the pre-training dialogues of the named corpora, in dialogue and turn order: the
    tokenizer's training text and Plain T5's. No evaluation user's turn is among them."""
    texts = []
    for name in names:
        base = Path(out_dir) / name
        dialogues = set(pd.read_parquet(base / "pretrain_pairs.parquet", columns=["dialogue_id"])["dialogue_id"])
        turns = pd.read_parquet(base / "corpus" / "turns.parquet", columns=["dialogue_id", "turn_index", "text"])
        kept = turns[turns["dialogue_id"].isin(dialogues)].sort_values(["dialogue_id", "turn_index"])
        texts.append(kept["text"])
    return pd.concat(texts, ignore_index=True) if texts else pd.Series(dtype=str)


def table2_frame(reports: list[dict]) -> pd.DataFrame:
    """Table 2 analog: one row per dataset."""
    return pd.DataFrame([r["table2"] for r in reports])


def corpus_names(prepared_dir: str | Path) -> list[str]:
    """The corpora stage 00 prepared, in name order."""
    return sorted(p.parent.parent.name for p in Path(prepared_dir).glob("*/corpus/meta.json"))


def corpus_language(prepared_dir: str | Path, name: str) -> str:
    """The language a prepared corpus declares in its meta.json ("en", "ja")."""
    meta = Path(prepared_dir) / name / "corpus" / "meta.json"
    return json.loads(meta.read_text(encoding="utf-8")).get("language", "en")


def corpus_text_sample(prepared_dir: str | Path, name: str, n: int, seed: int = 0) -> pd.Series:
    """A seeded sample of `n` turns' text of a prepared corpus (all of them when it has fewer)."""
    texts = pd.read_parquet(Path(prepared_dir) / name / "corpus" / "turns.parquet", columns=["text"])["text"]
    return texts.sample(min(n, len(texts)), random_state=seed).reset_index(drop=True)


def namespaced_user_id(corpus: str, user_id: str) -> str:
    """User ids are unique within a corpus; `corpus/user` is unique across corpora ("" stays "")."""
    return f"{corpus}/{user_id}" if user_id else ""


def load_pretraining_pairs(prepared_dir: str | Path, users_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """All corpora's pre-training pairs with their users (profiles from `users_dir/<corpus>.parquet`,
    written by stage 01), ids namespaced as `corpus/user`, and the pre-training text for Plain T5."""
    prepared_dir, users_dir = Path(prepared_dir), Path(users_dir)
    names = corpus_names(prepared_dir)
    pairs, users = [], []
    for name in names:
        frame = pd.read_parquet(prepared_dir / name / "pretrain_pairs.parquet")
        for column in ("speaker_id", "partner_id"):
            frame[column] = [namespaced_user_id(name, u) for u in frame[column]]
        pairs.append(frame)
        table = pd.read_parquet(users_dir / f"{name}.parquet")
        users.append(table.assign(user_id=[namespaced_user_id(name, u) for u in table["user_id"]]))
    return (pd.concat(pairs, ignore_index=True), pd.concat(users, ignore_index=True),
            pretraining_texts(prepared_dir, names))
