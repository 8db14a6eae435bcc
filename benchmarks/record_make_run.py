"""Record a finished `make run` (wall time, stage times, peak memory, precision, CPU) for README's benchmark block.

    /usr/bin/time -v make run > run.log 2>&1
    .venv/bin/python benchmarks/record_make_run.py --outputs outputs/cpu --time-log run.log --label after \
        --out benchmarks/results/make_run_cpu.json

Each label (e.g. "before" and "after" a change, on one machine) is one entry of the JSON file; recording a label
again replaces it. Stage minutes and precision come from each stage's `metrics.json` (the runner's wall time and
`metrics.precision`), the code from the stages' recorded git commit, the whole run's wall clock and peak resident
memory from GNU time's `-v` report, the CPU from /proc/cpuinfo (`udg_lib.precision.cpu_flags`). Nothing is typed:
`python -m udg_lib.report --benchmarks` renders the entries side by side.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from udg_lib import io
from udg_lib.precision import cpu_flags
from udg_lib.catalog import STAGE_NAMES as STAGES


def parse_time_log(text: str) -> dict[str, float]:
    """Wall seconds and peak resident GB from GNU time's `-v` report (the last one in `text`)."""
    wall = re.findall(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    rss = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not wall or not rss:
        raise ValueError("no GNU time -v report (Elapsed wall clock time, Maximum resident set size) in the log")
    seconds = 0.0
    for part in wall[-1].split(":"):
        seconds = seconds * 60 + float(part)
    return {"wall_seconds": round(seconds, 1), "max_rss_gb": round(int(rss[-1]) / 1024 / 1024, 2)}


def run_record(outputs: Path, time_log: str) -> dict[str, Any]:
    stages, commits, precision = {}, set(), {}
    for name in STAGES:
        path = outputs / name / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the run did not finish stage {name}")
        record = json.loads(path.read_text(encoding="utf-8"))
        stages[name] = round(record.get("stage", {}).get("wall_seconds", float("nan")) / 60, 2)
        commits.add(record.get("provenance", {}).get("git_commit", "unknown"))
        used = (record.get("metrics", {}).get("precision") or {}).get("used")
        if used:
            precision[name] = used
    return {"commits": sorted(commits), "stage_minutes": stages,
            "stage_minutes_total": round(sum(stages.values()), 1), **parse_time_log(time_log),
            "precision": precision or "fp32 (before the precision parameter)", "cpu": cpu_flags()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, required=True, help="the run's outputs/<profile> folder")
    parser.add_argument("--time-log", type=Path, required=True, help="the log holding `/usr/bin/time -v`'s report")
    parser.add_argument("--label", required=True, help="e.g. before / after")
    parser.add_argument("--note", default="", help="one line on what the run was")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/make_run_cpu.json"))
    args = parser.parse_args(argv)
    try:
        entry = {"label": args.label, "note": args.note,
                 **run_record(args.outputs, args.time_log.read_text(encoding="utf-8", errors="replace"))}
    except (OSError, ValueError) as error:
        print(f"record_make_run: {args.time_log if isinstance(error, ValueError) else ''} {error}".strip(),
              file=sys.stderr)
        return 1
    runs = json.loads(args.out.read_text(encoding="utf-8"))["runs"] if args.out.is_file() else []
    runs = [r for r in runs if r["label"] != args.label] + [entry]
    io.write_json(args.out, {"runs": runs})
    print(f"{args.out}: {args.label}: {entry['stage_minutes_total']} min of stage time, "
          f"{entry['wall_seconds'] / 60:.1f} min wall, {entry['max_rss_gb']} GB peak")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
