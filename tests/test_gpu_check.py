"""benchmarks/gpu_check.sh --cpu-smoke: the device check's code paths at tiny sizes on CPU, so CI runs them
(the figures are written, never checked against a bound); its preflight, and the arithmetic that sizes it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_check.sh"
STEPS = ("preflight", "user_training_seq2seq", "user_training_causal", "mixed_adapters", "plan")


def load_preflight():
    spec = importlib.util.spec_from_file_location("gpu_preflight", BENCHMARKS / "gpu_preflight.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_writes_every_result_file(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("preflight", "user_training_seq2seq", "user_training_causal", "mixed_adapters", "plan_fp32",
                 "plan_bf16", "gpu_check"):
        assert (out / f"{name}.json").is_file(), name
    # the preflight: versions, CUDA, TF32 and bf16 state, and the GPU sizes' expected seconds within 8 minutes
    assert "preflight: python" in done.stdout and "CUDA visible: no" in done.stdout
    assert "expected seconds on one H100/H200" in done.stdout and "within the 75% margin" in done.stdout
    preflight = json.loads((out / "preflight.json").read_text())
    environment = preflight["environment"]
    assert {"torch", "transformers", "peft"} <= set(environment["packages"])
    assert {"cuda_visible", "tf32_matmul_default", "tf32_matmul_in_stages", "precision_auto"} <= set(environment)
    assert preflight["expected_total_seconds"] <= 0.75 * preflight["deadline_seconds"] == 360
    assert set(preflight["expected_seconds"]) == {*STEPS, "summary"}

    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["smoke"] is True and summary["device"] == "cpu"
    assert {"steps", "user_training", "mixed_adapters", "bf16_speedup_over_fp32", "plan", "goals", "environment",
            "expected_seconds", "provenance"} <= set(summary)
    assert set(summary["steps"]) == set(STEPS)
    for name, step in summary["steps"].items():
        assert step["rc"] == 0 and not step["skipped"] and not step["timed_out"], name
        assert step["complete"] and all(step["json_written"].values()), name
        assert "peak_gpu_memory_bytes" in step and step["peak_gpu_memory_bytes"] is None  # no GPU here
        assert step["expected_seconds"] > 0
    for family in ("seq2seq", "causal"):
        written = json.loads((out / f"user_training_{family}.json").read_text())
        assert written["complete"] is True and "peak_gpu_memory_bytes" in written
        variants = summary["user_training"][family]
        assert len(variants) == 3 and all("peak_gpu_memory_bytes" in v for v in variants.values())
        # a variant runs (users/hour) or says why it cannot yet
        assert all(v["users_per_hour"] or (v["error"] or "").startswith("not supported yet") for v in
                   variants.values())
    assert summary["user_training"]["seq2seq"]["a: reload per user"]["users_per_hour"] > 0
    assert summary["mixed_adapters"]["identical"] is True and summary["mixed_adapters"]["complete"] is True
    assert set(summary["bf16_speedup_over_fp32"]) == {"pretrain", "full", "lora", "lora_batched", "generate"}
    assert summary["plan"]["fp32"]["profile"] == "test" and "peak_gpu_memory_bytes" in summary["plan"]["bf16"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_cuda_the_check_stops_at_the_preflight_with_one_line(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("gpu_check.sh: CUDA is not visible to ")
    assert "--cpu-smoke" in errors[0]
    assert not (tmp_path / "user_training_seq2seq.log").exists()  # nothing ran after the preflight
    missing = subprocess.run(["bash", str(SCRIPT)], env={**env, "PYTHON": str(tmp_path / "no-python")},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith("gpu_check.sh: no Python at ")


def test_the_gpu_sizes_fit_eight_minutes_by_the_arithmetic():
    preflight = load_preflight()
    expected = preflight.expected_seconds(preflight.SIZES)
    total = sum(step["seconds"] for step in expected.values())
    assert total <= preflight.MARGIN * preflight.DEADLINE_S
    assert all(step["limit"] >= step["seconds"] and step["formula"] for step in expected.values())
    # the script exports the same sizes that the arithmetic's defaults hold
    exported = {}
    for line in SCRIPT.read_text().splitlines():
        if line.startswith("export GPU_"):
            exported.update(pair.split("=") for pair in line.removeprefix("export ").split())
    assert {k: int(v) for k, v in exported.items()} == preflight.SIZES
