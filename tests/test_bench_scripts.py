"""Smoke tests for the benchmark scripts in benchmarks/: each runs end to end at tiny sizes (timings unchecked)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_user_training_smoke(tmp_path, capsys):
    bench = load_script("bench_user_training")
    threads = torch.get_num_threads()
    try:
        rows = bench.main(["--shapes", "test", "--users", "3", "--steps", "2", "--users-per-batch", "2",
                           "--repeats", "2", "--threads", "1", "--out", str(tmp_path / "bench.json")])
    finally:
        torch.set_num_threads(threads)
    assert [r["variant"] for r in rows] == list(bench.VARIANTS)
    assert all(r["users"] == 3 and r["steps_per_user"] == 2 and r["repeats"] == 2 and r["seconds"] > 0 for r in rows)
    assert rows[0]["speedup_vs_a"] == 1.0 and rows[2]["users_per_batch"] == 2
    # (a) and (b) run the same training from the same seeds: the same adapters, whatever the overheads
    assert rows[1]["max_adapter_diff_vs_a"] < 1e-5
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["rows"] == rows and "packages" in written["provenance"]
    printed = capsys.readouterr().out
    assert "users_per_hour" in printed and "c: run_users_batched" in printed


def test_bench_user_training_writes_each_variant_as_soon_as_it_is_timed(tmp_path, monkeypatch):
    """A run stopped part-way (gpu_check.sh's time limit) leaves the rows of the variants it timed."""
    bench = load_script("bench_user_training")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("stopped at the time limit")

    monkeypatch.setattr(bench, "run_users_batched", stopped)
    commits = iter(["c0ffee", "c0ffee+dirty"])  # the second read would see the file the first write left
    monkeypatch.setattr(bench, "git_commit", lambda: next(commits))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(KeyboardInterrupt):
            bench.main(["--shapes", "test", "--users", "2", "--steps", "1", "--repeats", "1", "--threads", "1",
                        "--out", str(tmp_path / "bench.json")])
    finally:
        torch.set_num_threads(threads)
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["complete"] is False and written["peak_gpu_memory_bytes"] is None  # on a CPU
    timed = {r["variant"]: r["seconds"] for r in written["rows"]}
    assert timed[bench.VARIANTS[0]] > 0 and timed[bench.VARIANTS[1]] > 0 and timed[bench.VARIANTS[2]] is None
    assert all("peak_gpu_memory_bytes" in r for r in written["rows"])
    assert written["provenance"]["git_commit"] == "c0ffee"  # the code measured, read once before any write


def test_bench_throughput_smoke(tmp_path, capsys):
    bench = load_script("bench_throughput")
    threads = torch.get_num_threads()
    result = bench.main(["--smoke", "--out", str(tmp_path / "bench.json")])
    assert torch.get_num_threads() == threads  # restored
    rows = result["rows"]
    assert {(r["family"], r["mode"], r["variant"]) for r in rows} == \
        {(f, m, v) for f in ("seq2seq", "causal") for m, v in bench.VARIANTS}
    auto = [(r["family"], r["mode"], r["variant"]) for r in rows if r["pipeline_auto"]]
    assert sorted(auto) == sorted((f, m, result["precision_auto"]) for f in ("seq2seq", "causal") for m in bench.MODES)
    assert result["compile"] is None and result["padding"] is None  # --compile / --prepared not asked
    assert all(r["seconds"] > 0 and r["tokens_per_s"] > 0 and r["flops_counted"] > 0 for r in rows)
    # every step as stage 03 trains: eager attention for the causal model on a CPU, the profile's LoRA dropout
    assert {r["attention"] for r in rows if r["family"] == "causal"} == {"eager"}
    assert {r["lora_dropout"] for r in rows if r["mode"] == "lora"} == \
        {result["stage03"]["causal"]["lora_dropout"], result["stage03"]["seq2seq"]["lora_dropout"]}
    attention = result["attention"]  # SDPA vs eager at two shapes, side by side
    assert [(r["shape"].split()[0], r["attention"]) for r in attention] == \
        [("benchmark", "sdpa"), ("benchmark", "eager"), ("stage", "sdpa"), ("stage", "eager")]
    assert all(r["seconds"] > 0 and 0 < r["roofline_share"] and 0 < r["shape_roofline_share"] for r in attention)
    assert all(r["speedup_vs_sdpa"] > 0 for r in attention if r["attention"] == "eager")
    lora = {r["family"]: r["trainable_parameters"] for r in rows if r["mode"] == "lora"}
    full = {r["family"]: r["trainable_parameters"] for r in rows if r["mode"] == "full"}
    assert lora == result["lora_trainable_parameters"] and all(lora[f] < full[f] for f in lora)
    assert {"fp32_gflops", "bf16_gflops", "bf16_linear_gflops"} <= set(result["roofline"][0])
    assert "avx512_bf16" in result["cpu"]
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["rows"] == rows and "packages" in written["provenance"]
    printed = capsys.readouterr().out
    assert "roofline" in printed and "gflops_counted" in printed and "1.8 M" in printed


TIME_LOG = """START
-- 06_llm_baselines done in 270.1 s
	Command being timed: "make run"
	Elapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03.50
	Maximum resident set size (kbytes): 6815744
"""


def test_record_make_run_keeps_one_entry_per_label_and_renders(tmp_path, capsys):
    from udg_lib import catalog, rendering

    record = load_script("record_make_run")
    assert record.parse_time_log(TIME_LOG) == {"wall_seconds": 3723.5, "max_rss_gb": 6.5}
    outputs = tmp_path / "outputs"
    for k, name in enumerate(catalog.STAGE_NAMES):
        (outputs / name).mkdir(parents=True)
        metrics = {"precision": {"used": "bf16"}} if k >= 2 else {}
        (outputs / name / "metrics.json").write_text(json.dumps({
            "stage": {"wall_seconds": 60.0 * (k + 1)}, "metrics": metrics,
            "provenance": {"git_commit": "0123456789abcdef"}}))
    log, out = tmp_path / "run.log", tmp_path / "results" / "make_run_cpu.json"
    log.write_text(TIME_LOG)
    for label in ("before", "after", "after"):
        assert record.main(["--outputs", str(outputs), "--time-log", str(log), "--label", label,
                            "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["label"] for r in runs] == ["before", "after"]  # a label recorded again is replaced
    assert runs[0]["stage_minutes_total"] == 28.0 and runs[0]["precision"]["03_finetune_users"] == "bf16"
    block = rendering.render_benchmarks_block(tmp_path / "results")
    assert "**`make run` of the `cpu` profile on one machine**" in block and "| before |" in block
    assert "01234567" in block and "62.1" in block  # the commit, the wall minutes
    log.write_text("no report here")
    assert record.main(["--outputs", str(outputs), "--time-log", str(log), "--label", "x", "--out", str(out)]) == 1
    assert "no GNU time -v report" in capsys.readouterr().err


def test_compare_reruns_sets_two_runs_side_by_side(tmp_path):
    compare = load_script("compare_reruns")
    published = Path(__file__).resolve().parents[1] / "results" / "cpu"
    run_b = tmp_path / "rerun"
    (run_b / compare.FINETUNE).mkdir(parents=True)
    for name in ("metrics.json", "training_by_method.csv", "lora_lr_sweep.csv"):
        (run_b / compare.FINETUNE / name).write_text((published / compare.FINETUNE / name).read_text())
    out = tmp_path / "rerun.md"
    assert compare.main([str(published), str(run_b), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("LoRA learning rate chosen") == 2 and text.count("users_lowest") >= 3
    assert "(none)" in text  # neither folder keeps stage 02's checkpoints: no first losses to show
    assert "C1 verdict" in text and "## Headline numbers" in text
    with pytest.raises(SystemExit):
        compare.main([str(published), str(tmp_path / "missing")])
