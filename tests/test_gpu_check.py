"""benchmarks/gpu_check.sh --cpu-smoke: the device check's code paths at tiny sizes on CPU, so CI runs them
(the figures are written, never checked against a bound)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_cpu_smoke_writes_every_result_file(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("user_training_seq2seq", "user_training_causal", "mixed_adapters", "plan_fp32", "plan_bf16",
                 "gpu_check"):
        assert (out / f"{name}.json").is_file(), name
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["smoke"] is True and summary["device"] == "cpu"
    assert {"steps", "user_training", "mixed_adapters", "bf16_speedup_over_fp32", "plan", "goals",
            "provenance"} <= set(summary)
    assert all(step["rc"] == 0 for step in summary["steps"].values())
    for family in ("seq2seq", "causal"):
        variants = summary["user_training"][family]
        assert len(variants) == 3
        # a variant runs (users/hour) or says why it cannot yet
        assert all(v["users_per_hour"] or (v["error"] or "").startswith("not supported yet") for v in
                   variants.values())
    assert summary["user_training"]["seq2seq"]["a: reload per user"]["users_per_hour"] > 0
    assert summary["mixed_adapters"]["identical"] is True
    assert set(summary["bf16_speedup_over_fp32"]) == {"pretrain", "full", "lora", "lora_batched", "generate"}
    assert summary["plan"]["fp32"]["profile"] == "test"
