#!/usr/bin/env bash
# The prepared device check of issues #12 and #21: one script that fits 8 minutes on one H100/H200-class GPU by
# its own arithmetic (printed first, from benchmarks/gpu_preflight.py) and writes JSON under
# benchmarks/results/gpu/ (or --out DIR):
#
#   preflight.json              what the node's Python sees: CUDA, the GPU, torch/transformers/peft versions, TF32
#                               and bf16 state, and each step's expected seconds with the formula behind them
#   user_training_seq2seq.json  per-user LoRA training at the t5-base shape, users/hour: reload per user vs
#                               in-process loop vs batched multi-user (goal: batched >= 5x reload)
#   user_training_causal.json   the same on the causal base (SmolLM2-135M shape, families.llama_config)
#   mixed_adapters.json         Exp1 generation, 12 users x 8 contexts: routed / peft mixed batches vs one
#                               user at a time (goal >= 5x), replies checked identical
#   plan_fp32.json, plan_bf16.json  the cost planner (udg_lib.plan) for full-en, a step of each kind in fp32
#                               (TF32 products) and under bf16 autocast: bf16 vs fp32 per kind
#   gpu_check.json              the summary of all of the above: each step's exit status, seconds (expected and
#                               taken), time limit and peak GPU memory (torch.cuda.max_memory_allocated)
#
#   bash benchmarks/gpu_check.sh                        # on the GPU node
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh # a node's own Python (README: which wheels to bring)
#   bash benchmarks/gpu_check.sh --cpu-smoke --out DIR  # the same code paths at tiny sizes on CPU (~2 min)
#
# The preflight stops the check with one line and exit 2 when CUDA is not visible (except with --cpu-smoke).
# Every benchmark step rewrites its JSON after each variant it times, so a step stopped at its time limit (1.5x
# its expected seconds, and never past the 8 minutes) keeps the figures it had; gpu_check.json records what
# each step left, and the script exits 1 if any step failed, timed out or was skipped. Timings are printed and
# written, never asserted.
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
if ! command -v "$PYTHON" > /dev/null 2>&1; then
  echo "gpu_check.sh: no Python at $PYTHON (make setup creates .venv; on a node with its own Python set PYTHON=...)" >&2
  exit 2
fi

# The GPU sizes; benchmarks/gpu_preflight.py prints the expected seconds of each step from them.
export GPU_T5_USERS=12 GPU_T5_STEPS=3 GPU_CAUSAL_USERS=12 GPU_CAUSAL_STEPS=3
export GPU_MIXED_USERS=12 GPU_MIXED_CONTEXTS=8 GPU_MIXED_BATCH=64 GPU_MIXED_TOKENS=24 GPU_PLAN_STEPS=2
if [ "$SMOKE" = 1 ]; then
  OUT=${OUT:-$(mktemp -d -t gpu-check-smoke-XXXXXX)}
  DEVICE=cpu
  DEADLINE=900  # a guard against a hang (the smoke run takes ~2 min on an idle 2-core CPU)
  PROFILE=test
  PREFLIGHT=(--cpu-smoke)
  T5=(--shapes test --users 3 --steps 1 --users-per-batch 3 --repeats 1 --threads 1)
  CAUSAL=(--family causal --shapes test --users 3 --steps 1 --users-per-batch 3 --repeats 1 --threads 1)
  MIXED=(--shape test --vocab 400 --users 3 --contexts 2 --batch-size 4 --max-new-tokens 4 --threads 1)
  PLAN=(--steps 1 --max-rows 2)
else
  OUT=${OUT:-benchmarks/results/gpu}
  DEVICE=cuda
  DEADLINE=480
  PROFILE=full-en
  PREFLIGHT=()
  # (a) reloads the 0.9 GB t5-base once per user (from the page cache), so users cost most there
  T5=(--shapes t5-base --users "$GPU_T5_USERS" --steps "$GPU_T5_STEPS" --users-per-batch "$GPU_T5_USERS"
      --repeats 1 --threads 0)
  CAUSAL=(--family causal --shapes smollm2-135m --users "$GPU_CAUSAL_USERS" --steps "$GPU_CAUSAL_STEPS"
          --users-per-batch "$GPU_CAUSAL_USERS" --repeats 1 --threads 0)
  MIXED=(--shape t5-base --users "$GPU_MIXED_USERS" --contexts "$GPU_MIXED_CONTEXTS" --batch-size "$GPU_MIXED_BATCH"
         --max-new-tokens "$GPU_MIXED_TOKENS")
  PLAN=(--steps "$GPU_PLAN_STEPS")
fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's udg_lib, whatever the venv has installed
STATUS="$OUT/steps.tsv"
: > "$STATUS"
started=$SECONDS
SUMMARY_RESERVE=20  # seconds kept for the summary at the end

echo "== preflight"
"$PYTHON" benchmarks/gpu_preflight.py --out "$OUT" ${PREFLIGHT[@]+"${PREFLIGHT[@]}"}
rc=$?
if [ "$rc" != 0 ]; then  # it printed the one line that says why
  exit 2
fi
printf '%s\t%s\t%s\t%s\n' preflight 0 "$((SECONDS - started))" - >> "$STATUS"

# run_step NAME COMMAND...: runs with its time limit (limits.tsv; never past the deadline), logs to NAME.log,
# records "NAME rc seconds limit" in steps.tsv (rc "skipped" when no time was left)
run_step() {
  local name=$1; shift
  local remaining=$((DEADLINE - (SECONDS - started) - SUMMARY_RESERVE))
  if [ "$remaining" -lt 20 ]; then
    echo "== $name: skipped, $((SECONDS - started)) s of the $DEADLINE s are gone"
    printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 0 >> "$STATUS"
    return
  fi
  local limit
  limit=$(awk -v name="$name" '$1 == name {print $2}' "$OUT/limits.tsv")
  [ "$SMOKE" = 1 ] && limit=300
  limit=${limit:-$remaining}
  [ "$remaining" -lt "$limit" ] && limit=$remaining
  echo "== $name (limit $limit s)"
  local step_started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - step_started))" "$limit" >> "$STATUS"
}

run_step user_training_seq2seq "$PYTHON" benchmarks/bench_user_training.py --device "$DEVICE" "${T5[@]}" \
  --out "$OUT/user_training_seq2seq.json"
run_step user_training_causal "$PYTHON" benchmarks/bench_user_training.py --device "$DEVICE" "${CAUSAL[@]}" \
  --out "$OUT/user_training_causal.json"
run_step mixed_adapters "$PYTHON" benchmarks/bench_mixed_adapters.py --device "$DEVICE" "${MIXED[@]}" \
  --out "$OUT/mixed_adapters.json"
run_step plan "$PYTHON" benchmarks/run_plan.py --out "$OUT" --dtypes fp32,bf16 -- --profile "$PROFILE" \
  --device "$DEVICE" "${PLAN[@]}"

"$PYTHON" - "$OUT" "$SMOKE" "$PROFILE" "$((SECONDS - started))" <<'EOF'
"""Summarise the step files into gpu_check.json (missing files and failed steps are recorded, not fatal)."""
import json
import sys
from pathlib import Path

from udg_lib.io import write_json
from udg_lib.provenance import provenance

out, smoke, profile, seconds = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], int(sys.argv[4])


def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


preflight = load("preflight")
expected = preflight["expected_seconds"]
step_files = {"user_training_seq2seq": ["user_training_seq2seq"], "user_training_causal": ["user_training_causal"],
              "mixed_adapters": ["mixed_adapters"], "plan": ["plan_fp32", "plan_bf16"], "preflight": ["preflight"]}
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, took, limit = line.split("\t")
    files = {f: load(f) for f in step_files.get(name, [])}
    peaks = [d.get("peak_gpu_memory_bytes") for d in files.values() if d and d.get("peak_gpu_memory_bytes")]
    steps[name] = {"rc": None if rc == "skipped" else int(rc), "skipped": rc == "skipped", "timed_out": rc == "124",
                   "seconds": int(took), "expected_seconds": expected.get(name, {}).get("seconds"),
                   "limit_seconds": None if limit == "-" else int(limit), "log": f"{name}.log",
                   "json_written": {f: d is not None for f, d in files.items()},
                   "complete": all(d is not None and d.get("complete", True) for d in files.values()),
                   "peak_gpu_memory_bytes": max(peaks, default=None)}

user_training = {}
for family in ("seq2seq", "causal"):
    data = load(f"user_training_{family}")
    user_training[family] = None if data is None else {
        row["variant"]: {key: row.get(key) for key in ("shape", "users", "users_per_hour", "speedup_vs_a",
                                                        "peak_gpu_memory_bytes", "error")}
        for row in data["rows"]}

mixed = load("mixed_adapters")
mixed_summary = None if mixed is None else {
    "users": mixed["config"]["users"], "contexts": mixed["config"]["contexts"], "complete": mixed["complete"],
    "identical": mixed.get("identical"), "speedup_routed_over": mixed.get("speedup_routed_over"),
    "speedup_mixed_over": mixed.get("speedup_mixed_over"), "contexts_per_second": mixed["contexts_per_second"],
    "peak_gpu_memory_bytes": mixed.get("peak_gpu_memory_bytes_by_variant")}

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
    "notes": {kind: t["note"] for kind, t in plan["timings"].items() if t["seconds"] is None},
    "peak_gpu_memory_bytes": plan.get("peak_gpu_memory_bytes")}
    for dtype, plan in plans.items()}

environment = preflight["environment"]
summary = {
    "smoke": smoke,
    "device": environment.get("gpu", "cpu") if not smoke else "cpu",
    "profile": profile,
    "seconds": seconds,
    "expected_seconds": preflight["expected_total_seconds"],
    "deadline_seconds": preflight["deadline_seconds"],
    "environment": environment,
    "steps": steps,
    "user_training": user_training,
    "mixed_adapters": mixed_summary,
    "bf16_speedup_over_fp32": bf16_vs_fp32,
    "plan": plan_summary,
    "goals": {"batched_lora_speedup": 5.0, "routed_generation_speedup": 5.0, "paper_gpu_hours": 10.0},
    "provenance": provenance(),
}
write_json(out / "gpu_check.json", summary)
print(json.dumps({k: summary[k] for k in ("device", "seconds", "expected_seconds", "steps",
                                          "bf16_speedup_over_fp32")}, indent=1))
print(f"written: {out / 'gpu_check.json'}")
sys.exit(1 if any(step["rc"] != 0 for step in steps.values()) else 0)
EOF
