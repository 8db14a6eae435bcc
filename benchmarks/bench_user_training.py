"""Benchmark: per-user LoRA training (§3.5, §4.1.3) in users per hour, three ways.

(a) naive: for every user the base model is reloaded from disk (`from_pretrained` + `get_peft_model` +
    train + `save_pretrained`), as most public per-user PEFT code does;
(b) in-process loop: `finetuning.run_users(methods.LORA, ...)`, the base loaded once and one adapter added and
    deleted per user;
(c) batched: `multilora.run_users_batched`, up to `--users-per-batch` users' adapters trained together in
    one forward/backward per step.

Every variant trains the same users on the same synthetic data with the same `FinetuneConfig`: one epoch of
`--steps` batches per user (`max_epochs=1` and `patience=2`, so early stopping never fires) and a dev loss
before and after it, so all three do the same optimizer steps (checked) and differ only in overheads. Each
variant's time includes loading the base model from disk (once for (b) and (c), per user for (a)). (a) and
(b) draw the same initial adapters, shuffling and dropout, so their adapters agree to rounding (reported);
(c) draws dropout masks over the whole concatenated batch, so its adapters differ from (a)'s as two dropout
draws would.

Model shapes: `families.t5_config(shape, vocab)` for the "cpu" preset (8k vocabulary) and a randomly
initialised t5-base-shaped model (32,128 rows as t5-base), saved once to a temp folder for (a). With
`--family causal`, Llama-style shapes of `families.llama_config` instead ("test", "smollm2-135m": SmolLM2-135M's
shape with its 49,152-row vocabulary), examples encoded by `families.CAUSAL` (source + [SEP] + reply, the loss
on the reply) and LoRA on q/k/v/o_proj. (b) and (c) call the library as stage 03 does; where it does not yet
take a causal model, the row reports the error ("not supported yet: ...") instead of timings. Data: PSP
prompts (§3.4) of pseudo-word dialogues with three context turns (~70-110 tokens) and replies of 5-16 words
(~7-30 tokens), tokenized by a SentencePiece tokenizer trained on the fly.

Timings are printed (and written with `--out`), never asserted. The ratios are measured side by side in one
run, variants interleaved over `--repeats` rounds, each variant's fastest run reported, with its CPU seconds
beside it and, on CUDA, its peak GPU memory (`torch.cuda.max_memory_allocated`). With `--out` the JSON is
rewritten after every timed run (`complete: false` until the end), so a run stopped at a time limit still
leaves the figures it had. torch runs on one thread by default: on a machine shared with other jobs its threads spin while
they wait for a core, and oversubscribed they made single runs up to 5x slower at random (`--threads 0`
restores torch's own choice, for an idle machine).

    .venv/bin/python benchmarks/bench_user_training.py                      # both shapes, CPU defaults
    .venv/bin/python benchmarks/bench_user_training.py --device cuda --users 32 --steps 8 --out bench.json
    .venv/bin/python benchmarks/bench_user_training.py --family causal --shapes smollm2-135m --device cuda
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from udg_lib import io
from udg_lib.data.schema import PROFILE_FIELDS
from udg_lib.families import CAUSAL, SMOLLM2_VOCAB, ModelFamily, get_family, llama_config
from udg_lib.finetuning import (
    ADAPTER_DIR,
    FinetuneConfig,
    UserTrainingOptions,
    encode_pairs,
    lora_config,
    run_users,
    seq2seq_collator,
    train_with_early_stopping,
    user_dir,
    user_examples,
    user_seed,
)
from udg_lib.multilora import run_users_batched
from udg_lib.conditions import Cell
from udg_lib.methods import LORA
from udg_lib.families import t5_config
from udg_lib.pretraining import build_model, count_parameters
from udg_lib.provenance import git_commit, provenance
from udg_lib.prompts import build_prompts
from udg_lib.tokenizer import SentencePieceSettings, train_sentencepiece_tokenizer

SHAPES = ("cpu", "t5-base")
VOCAB = {"test": 1000, "cpu": 8000, "t5-base": 32128}  # embedding rows; the tokenizer itself is smaller
# Per-shape defaults sized for ~5 min on 2 CPU cores in all, two rounds (t5-base: ~1.5 s per training example)
DEFAULT_USERS = {"test": 4, "cpu": 16, "t5-base": 3}
DEFAULT_STEPS = {"test": 2, "cpu": 4, "t5-base": 2}
# --family causal: Llama-style presets of families.llama_config (embedding rows as above)
CAUSAL_SHAPES = ("smollm2-135m",)
CAUSAL_VOCAB = {"test": 1000, "smollm2-135m": SMOLLM2_VOCAB}
DEFAULT_USERS.update({"smollm2-135m": 3})
DEFAULT_STEPS.update({"smollm2-135m": 2})
VARIANTS = ("a: reload per user", "b: run_users loop", "c: run_users_batched")
FMT = "psp"
SYLLABLES = [c + v for c in "bdfghklmnprstvwz" for v in "aeiou"]
PROFILE_VALUES = (["10s", "20s", "30s", "40s", "50s"], ["female", "male"], ["single", "married"],
                  ["student", "engineer", "teacher", "nurse"], ["tokyo", "osaka", "hokkaido", "kyushu"])


# ---------------------------------------------------------------------------------------------------------------
# Synthetic workload


def synthetic_pairs(n_users: int, train_per_user: int, dev_per_user: int,
                    seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Eval pairs (one split set) and users: three-turn contexts and a reply per pair, Zipf-distributed words."""
    rng = random.Random(seed)
    lexicon = list(dict.fromkeys("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))
                                 for _ in range(3000)))
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choices(lexicon, weights, k=rng.randint(low, high)))

    user_ids = [f"user{i:03d}" for i in range(n_users)]
    rows = []
    for i, user in enumerate(user_ids):
        partner = user_ids[(i + 1) % n_users]
        for split, n in (("train_ft", train_per_user), ("dev", dev_per_user)):
            for j in range(n):
                rows.append({"pair_id": f"{user}-{split}-{j}", "dialogue_id": f"d-{user}-{split}-{j}",
                             "turn_index": 3, "speaker_id": user, "partner_id": partner,
                             "context": [sentence(6, 18) for _ in range(3)], "response": sentence(5, 16),
                             "split": split, "split_set": 0})
    users = pd.DataFrame({"user_id": user_ids, **{field: [rng.choice(values) for _ in user_ids]
                                                  for field, values in zip(PROFILE_FIELDS, PROFILE_VALUES)}})
    return pd.DataFrame(rows), users


def synthetic_tokenizer(pairs: pd.DataFrame, folder: Path) -> PreTrainedTokenizerBase:
    texts = [t for context in pairs["context"] for t in context] + pairs["response"].tolist()
    return train_sentencepiece_tokenizer(texts, folder, SentencePieceSettings(vocab_size=2000, extra_ids=100,
                                                                              num_threads=1))


# ---------------------------------------------------------------------------------------------------------------
# Variant (a): what most public per-user PEFT code does


def encode_family_pairs(family: ModelFamily, pairs: pd.DataFrame, users: pd.DataFrame,
                        tokenizer: PreTrainedTokenizerBase, config: FinetuneConfig) -> Any:
    """`finetuning.encode_pairs` for seq2seq (stage 03's own), the family's `tokenize_pairs` otherwise."""
    if family.name == "seq2seq":
        return encode_pairs(pairs, users, FMT, tokenizer, config)
    return family.tokenize_pairs(build_prompts(pairs, users, FMT).tolist(), pairs["response"].tolist(), tokenizer,
                                 config.max_source_length, config.max_target_length)


def reload_per_user(model_dir: Path, device: str, tokenizer: PreTrainedTokenizerBase, pairs: pd.DataFrame,
                    users: pd.DataFrame, user_ids: Sequence[str], out_dir: Path,
                    config: FinetuneConfig, family: ModelFamily | None = None) -> pd.DataFrame:
    """Per user: base from disk, `get_peft_model`, the same training loop as `run_users`, `save_pretrained`."""
    family = family or get_family("seq2seq")
    collator = seq2seq_collator(tokenizer) if family.name == "seq2seq" else family.collator(tokenizer)
    rows = []
    for user in user_ids:
        model = family.auto_class.from_pretrained(str(model_dir)).to(device)
        seed = user_seed(config.seed, user)
        torch.manual_seed(seed)  # the adapter's initial A matrices, as run_users
        peft_model = get_peft_model(model, lora_config(config) if family.name == "seq2seq"
                                    else family.lora_config(config))
        train = encode_family_pairs(family, user_examples(pairs, user, "train_ft"), users, tokenizer, config)
        dev = encode_family_pairs(family, user_examples(pairs, user, "dev"), users, tokenizer, config)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        summary = train_with_early_stopping(peft_model, train, dev, collator, replace(config, seed=seed), params)
        peft_model.save_pretrained(str(user_dir(out_dir, user) / ADAPTER_DIR))
        rows.append({"user_id": user, **summary.as_dict()})
        del model, peft_model
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, run: Callable[[], pd.DataFrame]) -> tuple[float, float, pd.DataFrame]:
    """Wall seconds, this process's CPU seconds (all threads; less sensitive to other jobs), and the result."""
    synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    table = run()
    synchronize(device)
    return time.perf_counter() - started, time.process_time() - cpu_started, table


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: str) -> int | None:
    """Bytes of GPU memory allocated at most since the last `reset_peak_memory` (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None


def max_adapter_difference(a: Path, b: Path, user_ids: Sequence[str]) -> float:
    diffs = []
    for user in user_ids:
        x = load_file(str(user_dir(a, user) / ADAPTER_DIR / "adapter_model.safetensors"))
        y = load_file(str(user_dir(b, user) / ADAPTER_DIR / "adapter_model.safetensors"))
        if x.keys() != y.keys():
            raise RuntimeError(f"{user}: adapters of different keys in {a} and {b}")
        diffs.extend(float((x[k] - y[k]).abs().max()) for k in x)
    return max(diffs)


def bench_shape(shape: str, n_users: int, steps: int, users_per_batch: int, batch_size: int, dev_per_user: int,
                device: str, work: Path, repeats: int = 1, seed: int = 0, family_name: str = "seq2seq",
                on_rows: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Time the three variants on one model shape; one row per variant, its fastest of `repeats` runs.

    For the causal family a variant the library cannot run yet gives a row with `error` set and no timings.
    `on_rows` gets the rows as they stand after every timed run (variants not timed yet without figures)."""
    family = get_family(family_name)
    pairs, users = synthetic_pairs(n_users, steps * batch_size, dev_per_user, seed=seed)
    tokenizer = synthetic_tokenizer(pairs, work / "tokenizer")
    user_ids = users["user_id"].tolist()
    config = FinetuneConfig(batch_size=batch_size, eval_batch_size=max(dev_per_user, 1), max_epochs=1, patience=2,
                            seed=seed)
    model_dir = work / "base"
    if family is CAUSAL:
        base = family.prepare(family.from_config(llama_config(shape, max(CAUSAL_VOCAB[shape], len(tokenizer))),
                                                 seed=seed), tokenizer)
    else:
        base = build_model(t5_config(shape, max(VOCAB[shape], len(tokenizer))), tokenizer, seed=seed)
    parameters = count_parameters(base)
    base.save_pretrained(model_dir)
    del base

    def load_base() -> torch.nn.Module:
        return family.auto_class.from_pretrained(str(model_dir)).to(device)

    runs = {
        VARIANTS[0]: lambda out: reload_per_user(model_dir, device, tokenizer, pairs, users, user_ids, out, config,
                                                 family),
        VARIANTS[1]: lambda out: run_users(LORA, load_base(), tokenizer,
                                           Cell(pairs, users, user_ids, fmt_override=FMT), out, config,
                                           UserTrainingOptions(progress=False)),
        VARIANTS[2]: lambda out: run_users_batched(LORA, load_base(), tokenizer,
                                                   Cell(pairs, users, user_ids, fmt_override=FMT), out, config,
                                                   UserTrainingOptions(users_per_batch=users_per_batch, progress=False)),
    }
    # warm-up (untimed): first calls pay one-off costs (allocator, kernels, lazy imports) that belong to no variant
    reload_per_user(model_dir, device, tokenizer, pairs, users, user_ids[:1], work / "warmup", config, family)
    best: dict[str, tuple[float, float]] = {}
    peaks: dict[str, int | None] = {}
    diffs: dict[str, float] = {}  # each variant's first run against (a)'s, read once
    errors: dict[str, str] = {}

    def current_rows() -> list[dict[str, Any]]:
        rows = []
        for variant in runs:
            row = {"family": family.name, "shape": shape, "variant": variant, "users": n_users,
                   "steps_per_user": steps, "seconds": None, "users_per_hour": None, "cpu_seconds": None,
                   "repeats": repeats, "parameters": parameters,
                   "users_per_batch": users_per_batch if variant == VARIANTS[2] else 1,
                   "max_adapter_diff_vs_a": None, "peak_gpu_memory_bytes": peaks.get(variant),
                   "error": errors.get(variant)}
            if variant in best:
                if VARIANTS[0] in best and variant not in diffs:
                    diffs[variant] = max_adapter_difference(work / "a0", work / f"{variant[0]}0", user_ids)
                seconds, cpu_seconds = best[variant]
                row.update(seconds=round(seconds, 2), users_per_hour=round(n_users * 3600 / seconds, 1),
                           cpu_seconds=round(cpu_seconds, 2), max_adapter_diff_vs_a=diffs.get(variant))
            rows.append(row)
        for row in rows:
            row["speedup_vs_a"] = (round(rows[0]["seconds"] / row["seconds"], 2)
                                   if row["seconds"] and rows[0]["seconds"] else None)
        return rows

    for repeat in range(repeats):  # variants interleaved, so a burst of load elsewhere hits all of them alike
        for variant, run in runs.items():
            if variant in errors:
                continue
            out = work / f"{variant[0]}{repeat}"
            reset_peak_memory(device)
            try:
                seconds, cpu_seconds, table = timed(device, lambda run=run, out=out: run(out))
            except Exception as exc:  # the causal family's path not wired yet: reported, not raised
                if family is not CAUSAL:
                    raise
                errors[variant] = f"not supported yet: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                continue
            if table["steps"].tolist() != [steps] * n_users:  # same work in every variant, or ratios mean nothing
                raise RuntimeError(f"{shape} {variant}: optimizer steps per user {table['steps'].tolist()}, "
                                   f"expected {steps} each")
            best[variant] = min(best.get(variant, (seconds, cpu_seconds)), (seconds, cpu_seconds))
            peak = peak_memory(device)
            peaks[variant] = None if peak is None else max(peak, peaks.get(variant) or 0)
            if on_rows is not None:
                on_rows(current_rows())
    return current_rows()


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("seq2seq", "causal"), default="seq2seq",
                        help="seq2seq: T5 presets; causal: Llama-style presets (families.llama_config)")
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated presets (default: {','.join(SHAPES)}; causal: "
                             f"{','.join(CAUSAL_SHAPES)}; 'test' for a smoke run)")
    parser.add_argument("--users", type=int, default=None,
                        help=f"users per shape (default per shape: {DEFAULT_USERS})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per user (default per shape: {DEFAULT_STEPS})")
    parser.add_argument("--users-per-batch", type=int, default=8, help="(c): users trained together (default 8)")
    parser.add_argument("--batch-size", type=int, default=4, help="training examples per user per step")
    parser.add_argument("--dev", type=int, default=4, help="dev pairs per user (a dev loss before and after)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each variant, interleaved; the fastest is reported (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1, stable on a shared machine; 0: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    known = CAUSAL_VOCAB if args.family == "causal" else VOCAB
    shapes = args.shapes or ",".join(CAUSAL_SHAPES if args.family == "causal" else SHAPES)
    args.shapes = [s.strip() for s in shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in known]
    if unknown or not args.shapes:
        parser.error(f"unknown shapes {unknown}; choose from {list(known)}")
    if args.threads < 0:
        parser.error("--threads must be 0 (torch's choice) or more")
    for name in ("users", "steps", "users_per_batch", "batch_size", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    return args


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    columns = ["shape", "variant", "users", "steps_per_user", "seconds", "users_per_hour", "speedup_vs_a",
               "cpu_seconds", "max_adapter_diff_vs_a"]
    frame = pd.DataFrame(rows)
    frame["max_adapter_diff_vs_a"] = frame["max_adapter_diff_vs_a"].map(lambda v: "-" if v is None else f"{v:.1e}")
    table = frame[columns].to_string(index=False)
    errors = [f"{r['shape']} {r['variant']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join([table, *errors])


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars would bury the table
    rows: list[dict[str, Any]] = []
    # The code measured, read before the first write: the file this run rewrites after each shape would
    # otherwise mark the tree dirty from the second write on.
    measured_commit = git_commit()

    def write(current: list[dict[str, Any]], complete: bool) -> None:
        if args.out is None:
            return
        peaks = [r["peak_gpu_memory_bytes"] for r in current if r.get("peak_gpu_memory_bytes")]
        io.write_json(args.out, {"rows": current, "complete": complete,
                                 "peak_gpu_memory_bytes": max(peaks, default=None),
                                 "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                 "torch_threads": torch.get_num_threads(),
                                 "provenance": {**provenance(seeds={"seed": args.seed}), "git_commit": measured_commit}})

    for shape in args.shapes:
        n_users = args.users or DEFAULT_USERS[shape]
        steps = args.steps or DEFAULT_STEPS[shape]
        with tempfile.TemporaryDirectory(prefix=f"bench-user-training-{shape}-") as work:
            rows.extend(bench_shape(shape, n_users, steps, min(args.users_per_batch, n_users), args.batch_size,
                                    args.dev, args.device, Path(work), repeats=args.repeats, seed=args.seed,
                                    family_name=args.family,
                                    on_rows=lambda so_far: write(rows + so_far, complete=False)))
        print(format_table([r for r in rows if r["shape"] == shape]), flush=True)
    print()
    print(format_table(rows))
    write(rows, complete=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
