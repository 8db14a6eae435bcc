"""Stage 00: turn one loaded corpus into the files every later stage reads.

<out>/<name>/corpus/            turns.parquet, users.parquet, meta.json (canonical schema)
<out>/<name>/pretrain_pairs.parquet   reply pairs from dialogues without evaluation users
<out>/<name>/eval_pairs.parquet       reply pairs of evaluation users, per split set and split
<out>/<name>/eval_users.csv           evaluation users: One-ID, turn counts, profile
<out>/<name>/prompts.parquet          eval pairs rendered as Plain / PSP / PPP (+ one_id column)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from udg_lib import io
from udg_lib.data.schema import PROFILE_FIELDS, Corpus, save_corpus
from udg_lib.prompts import PROMPT_FORMATS, assign_one_ids, build_prompts
from udg_lib.splits import SplitConfig, split_corpus, table2_row


def prepare_corpus(corpus: Corpus, config: SplitConfig, out_dir: str | Path) -> dict:
    """Save the corpus, split it, write pairs, evaluation users and prompts; return its report."""
    out_dir = Path(out_dir) / corpus.name
    save_corpus(corpus, out_dir / "corpus")
    pretrain, eval_pairs, eval_users, report = split_corpus(corpus.turns, config)
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
        "table2": table2_row(corpus.name, corpus.meta, eval_pairs, len(eval_users)),
        "files": sorted(str(p.relative_to(out_dir.parent)) for p in out_dir.rglob("*") if p.is_file()),
    }


def pretraining_texts(out_dir: str | Path, names: list[str]) -> pd.Series:
    """All turns of the pre-training dialogues of the named corpora (the tokenizer's training text)."""
    texts = []
    for name in names:
        base = Path(out_dir) / name
        dialogues = set(pd.read_parquet(base / "pretrain_pairs.parquet", columns=["dialogue_id"])["dialogue_id"])
        turns = pd.read_parquet(base / "corpus" / "turns.parquet", columns=["dialogue_id", "text"])
        texts.append(turns.loc[turns["dialogue_id"].isin(dialogues), "text"])
    return pd.concat(texts, ignore_index=True) if texts else pd.Series(dtype=str)


def table2_frame(reports: list[dict]) -> pd.DataFrame:
    """Table 2 analog: one row per dataset."""
    return pd.DataFrame([r["table2"] for r in reports])
