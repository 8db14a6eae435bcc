#!/usr/bin/env bash
# The prepared device check of issue #12: one script, under 8 minutes on one H100/H200-class GPU, that writes
# JSON under benchmarks/results/gpu/ (or --out DIR):
#
#   user_training_seq2seq.json  per-user LoRA training at the t5-base shape, users/hour: reload per user vs
#                               in-process loop vs batched multi-user (goal: batched >= 5x reload, 32 users)
#   user_training_causal.json   the same on the causal base (SmolLM2-135M shape, families.llama_config); a
#                               variant the library cannot run on a causal model yet reports its error
#   mixed_adapters.json         Exp1 generation, 32 users x 8 contexts: routed / peft mixed batches vs one
#                               user at a time (goal >= 5x), replies checked identical
#   plan_fp32.json, plan_bf16.json  the cost planner (udg_lib.plan) for full-en (full before it exists), a
#                               step of each kind in fp32 and under bf16 autocast: bf16 vs fp32 per kind
#   gpu_check.json              the summary of all of the above, and each step's exit status and seconds
#
#   bash benchmarks/gpu_check.sh                        # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke --out DIR  # the same code paths at tiny sizes on CPU (< 2 min)
#
# A step that fails or runs past its time limit is recorded in gpu_check.json and the others still run; the
# script exits 1 if any step failed. Timings are printed and written, never asserted.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --cpu-smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$SMOKE" = 1 ]; then
  OUT=${OUT:-$(mktemp -d -t gpu-check-smoke-XXXXXX)}
  DEVICE=cpu
  LIMIT=300  # seconds per step: a guard against a hang (each step takes ~10-30 s on an idle 2-core CPU)
  PROFILE=test
  T5=(--shapes test --users 3 --steps 1 --users-per-batch 3 --repeats 1 --threads 1)
  CAUSAL=(--family causal --shapes test --users 3 --steps 1 --users-per-batch 3 --repeats 1 --threads 1)
  MIXED=(--shape test --vocab 400 --users 3 --contexts 2 --batch-size 4 --max-new-tokens 4 --threads 1)
  PLAN=(--steps 1 --max-rows 2)
else
  OUT=${OUT:-benchmarks/results/gpu}
  DEVICE=cuda
  LIMIT=150
  PROFILE=full-en
  [ -d params/full-en ] || PROFILE=full  # until the full-en / full-ja profiles are merged
  # 32 users, 4 steps of 4 examples each: (a) reloads t5-base 32 times (~1 s each from the page cache)
  T5=(--shapes t5-base --users 32 --steps 4 --users-per-batch 32 --repeats 1 --threads 0)
  CAUSAL=(--family causal --shapes smollm2-135m --users 32 --steps 4 --users-per-batch 32 --repeats 1 --threads 0)
  MIXED=(--shape t5-base --users 32 --contexts 8 --batch-size 64 --max-new-tokens 48)
  PLAN=(--steps 3)
fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's udg_lib, whatever the venv has installed
STATUS="$OUT/steps.tsv"
: > "$STATUS"

# run_step NAME COMMAND...: runs with a time limit, logs to NAME.log, records "NAME rc seconds" in steps.tsv
run_step() {
  local name=$1; shift
  local started=$SECONDS
  echo "== $name"
  timeout "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" >> "$STATUS"
}

started=$SECONDS
run_step user_training_seq2seq "$PYTHON" benchmarks/bench_user_training.py --device "$DEVICE" "${T5[@]}" \
  --out "$OUT/user_training_seq2seq.json"
run_step user_training_causal "$PYTHON" benchmarks/bench_user_training.py --device "$DEVICE" "${CAUSAL[@]}" \
  --out "$OUT/user_training_causal.json"
run_step mixed_adapters "$PYTHON" benchmarks/bench_mixed_adapters.py --device "$DEVICE" "${MIXED[@]}" \
  --out "$OUT/mixed_adapters.json"
for dtype in fp32 bf16; do
  run_step "plan_$dtype" "$PYTHON" -m udg_lib.plan --profile "$PROFILE" --device "$DEVICE" --dtype "$dtype" \
    "${PLAN[@]}" --json "$OUT/plan_$dtype.json"
done

"$PYTHON" - "$OUT" "$SMOKE" "$PROFILE" "$((SECONDS - started))" <<'EOF'
"""Summarise the step files into gpu_check.json (missing files and failed steps are recorded, not fatal)."""
import json
import sys
from pathlib import Path

import torch

from udg_lib.io import write_json
from udg_lib.provenance import provenance

out, smoke, profile, seconds = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], int(sys.argv[4])


def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, took = line.split("\t")
    steps[name] = {"rc": int(rc), "seconds": int(took), "timed_out": rc == "124", "log": f"{name}.log"}

user_training = {}
for family in ("seq2seq", "causal"):
    data = load(f"user_training_{family}")
    user_training[family] = None if data is None else {
        row["variant"]: {key: row.get(key) for key in ("shape", "users", "users_per_hour", "speedup_vs_a", "error")}
        for row in data["rows"]}

mixed = load("mixed_adapters")
mixed_summary = None if mixed is None else {
    "users": mixed["config"]["users"], "contexts": mixed["config"]["contexts"], "identical": mixed["identical"],
    "speedup_routed_over": mixed["speedup_routed_over"], "speedup_mixed_over": mixed["speedup_mixed_over"],
    "contexts_per_second": mixed["contexts_per_second"]}

plans = {dtype: load(f"plan_{dtype}") for dtype in ("fp32", "bf16")}
bf16_vs_fp32 = None
if all(plans.values()):
    fp32, bf16 = (plans[d]["timings"] for d in ("fp32", "bf16"))
    bf16_vs_fp32 = {kind: (fp32[kind]["seconds"] / bf16[kind]["seconds"]
                           if fp32[kind]["seconds"] and bf16[kind]["seconds"] else None) for kind in fp32}
plan_summary = {dtype: None if plan is None else {
    "profile": plan["profile"], "total_device_hours": plan["total_device_hours"],
    "paper_training_device_hours": plan["paper"]["training_device_hours"],
    "meets_goal_on_this_device": plan["paper"]["meets_goal_on_this_device"],
    "seconds_per_unit": {kind: t["seconds"] for kind, t in plan["timings"].items()},
    "notes": {kind: t["note"] for kind, t in plan["timings"].items() if t["seconds"] is None}}
    for dtype, plan in plans.items()}

summary = {
    "smoke": smoke,
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not smoke else "cpu",
    "profile": profile,
    "seconds": seconds,
    "steps": steps,
    "user_training": user_training,
    "mixed_adapters": mixed_summary,
    "bf16_speedup_over_fp32": bf16_vs_fp32,
    "plan": plan_summary,
    "goals": {"batched_lora_speedup": 5.0, "routed_generation_speedup": 5.0, "paper_gpu_hours": 10.0},
    "provenance": provenance(),
}
write_json(out / "gpu_check.json", summary)
print(json.dumps({k: summary[k] for k in ("device", "seconds", "steps", "bf16_speedup_over_fp32")}, indent=1))
print(f"written: {out / 'gpu_check.json'}")
sys.exit(1 if any(step["rc"] for step in steps.values()) else 0)
EOF
