"""gpu_check.sh's plan step: `python -m udg_lib.plan` once per dtype in one process (one interpreter start, one
CUDA context), each plan's JSON written as soon as that dtype is timed, with the peak GPU memory of its timings
(`torch.cuda.max_memory_allocated`, reset between dtypes; null on a CPU) added.

    python benchmarks/run_plan.py --out DIR --dtypes fp32,bf16 -- --profile full-en --device cuda --steps 2

writes DIR/plan_fp32.json and DIR/plan_bf16.json; everything after `--` goes to `udg_lib.plan` as it is.
Exits 1 if any dtype's plan failed (the others still run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from udg_lib import plan
from udg_lib.io import write_json


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    forwarded = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for plan_<dtype>.json")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    failed = 0
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        target = args.out / f"plan_{dtype}.json"
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        print(f"== plan {dtype}", flush=True)
        rc = plan.main([*forwarded, "--precision", dtype, "--json", str(target)])
        if rc != 0 or not target.is_file():
            failed += 1
            continue
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        write_json(target, {**json.loads(target.read_text(encoding="utf-8")), "peak_gpu_memory_bytes": peak})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
