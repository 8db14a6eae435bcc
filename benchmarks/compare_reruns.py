"""Two finished runs of one profile side by side: how far a fresh rerun moves the study's numbers.

    .venv/bin/python benchmarks/compare_reruns.py RUN_A/outputs/cpu RUN_B/outputs/cpu \
        --out benchmarks/results/rerun_cpu_2user_sweep.md

Writes a Markdown file: each run's code (the stages' recorded commit), precision and CPU flags; the first
pre-training losses of each model (same data, so a difference here is arithmetic, not sampling); the LoRA
learning-rate sweep of each run (`experiments.sweep_summary`) and the LoRA dev losses over all users; then
every headline number and verdict (`report.compare_results`). Nothing in the file is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from udg_lib.summaries import sweep_summary
from udg_lib.publishing import compare_results

PRETRAIN, FINETUNE = "02_pretrain_models", "03_finetune_users"


def _metrics(stage_dir: Path) -> dict:
    path = stage_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def first_losses(run: Path, steps: int = 3) -> pd.DataFrame:
    """The first logged training losses of each pre-trained model (its last checkpoint's trainer_state.json)."""
    latest: dict[str, tuple[int, Path]] = {}
    for state in (run / PRETRAIN).glob("*/checkpoints/checkpoint-*/trainer_state.json"):
        model, step = state.parents[2].name, int(state.parent.name.split("-")[-1])
        latest[model] = max(latest.get(model, (-1, state)), (step, state))
    return pd.DataFrame([{"model": model, "step": h["step"], "loss": h["loss"]}
                         for model, (_, state) in sorted(latest.items())
                         for h in [h for h in json.loads(state.read_text())["log_history"] if "loss" in h][:steps]])


def describe(run: Path) -> list[str]:
    metrics = _metrics(run / FINETUNE)
    commit = metrics.get("provenance", {}).get("git_commit", "unknown")
    precision = metrics.get("metrics", {}).get("precision", {})
    return [f"- `{run}`: commit {commit[:10]}, precision {precision.get('used', 'unknown')}, CPU "
            f"{json.dumps(precision.get('cpu', {}))}; LoRA learning rate chosen "
            f"{metrics.get('metrics', {}).get('lora_learning_rate', 'unknown')}"]


def lora_dev_losses(run: Path) -> pd.DataFrame:
    path = run / FINETUNE / "training_by_method.csv"
    table = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["method"])
    return table[table["method"] == "lora"]


def render(run_a: Path, run_b: Path) -> str:
    lines = ["# Two fresh runs of one profile, side by side", "",
             f"_Written by `benchmarks/compare_reruns.py {run_a} {run_b}`._", ""]
    lines += describe(run_a) + describe(run_b)
    for title, frames in (("First logged pre-training losses (same batches in both runs)",
                           [first_losses(run_a), first_losses(run_b)]),
                          ("LoRA learning-rate sweep (dev loss only; `users_lowest`: users whose lowest best dev loss "
                           "came with that rate)",
                           [sweep_summary(pd.read_csv(r / FINETUNE / "lora_lr_sweep.csv"))
                            if (r / FINETUNE / "lora_lr_sweep.csv").is_file() else pd.DataFrame()
                            for r in (run_a, run_b)]),
                          ("LoRA over all users at the chosen rate (stage 03's training_by_method.csv)",
                           [lora_dev_losses(run_a), lora_dev_losses(run_b)])):
        lines += ["", f"## {title}", ""]
        for run, frame in zip((run_a, run_b), frames):
            lines += [f"`{run}`:", "", frame.to_markdown(index=False, floatfmt=".6g") if len(frame) else "(none)", ""]
    lines += ["## Headline numbers and verdicts (`python -m udg_lib.report --compare`)", "",
              compare_results(run_a, run_b).to_markdown(index=False), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path, help="the first run's outputs/<profile> folder")
    parser.add_argument("run_b", type=Path, help="the second run's outputs/<profile> folder")
    parser.add_argument("--out", type=Path, help="write the Markdown here instead of printing it")
    args = parser.parse_args(argv)
    for run in (args.run_a, args.run_b):
        if not (run / FINETUNE / "metrics.json").is_file():
            parser.error(f"{run}: no {FINETUNE}/metrics.json (not a finished run's outputs/<profile> folder)")
    text = render(args.run_a, args.run_b)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
        print(args.out)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
