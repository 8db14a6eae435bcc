"""Smoke tests for benchmarks/bench_mixed_adapters.py: it runs end to end at tiny sizes, its equality check
passes on correct replies and catches wrong ones (timings are printed, never checked)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mixed_adapters.py"
TINY = ["--shape", "test", "--vocab", "400", "--users", "3", "--contexts", "2", "--batch-size", "4",
        "--max-new-tokens", "6", "--threads", "1"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    # benchmarks/ is a folder of scripts, not a package: load the file itself
    spec = importlib.util.spec_from_file_location("bench_mixed_adapters", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_mixed_batches_reproduce_one_user_at_a_time(bench, tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "bench.json"
    report = bench.main([*TINY, "--out", str(out)])
    assert report["identical"]
    assert report["mismatches"] == {"load per user": [], "switch per user": [], "routed": []}
    assert report["contexts"] == 6
    # the adapters change the replies, so identical replies are evidence that each row got its own adapter
    assert report["replies_differing_from_base"] > 0
    assert list(report["seconds"]) == ["(a) load per user", "(a) switch per user", "(b) mixed, batch 4",
                                       "(c) routed, batch 4", "base model, no adapters"]
    assert all(s > 0 for s in report["seconds"].values())
    assert set(report["speedup_mixed_over"]) == {"load per user", "switch per user"}
    assert set(report["speedup_routed_over"]) == {"load per user", "switch per user", "mixed"}
    written = json.loads(out.read_text())
    assert written["identical"] is True and written["config"]["users"] == 3
    assert "peft" in written["provenance"]["packages"]
    printed = capsys.readouterr().out
    assert printed.count("OK:") == 3 and "MISMATCH" not in printed and "contexts/s" in printed


def test_a_wrong_reply_is_reported(bench, monkeypatch, capsys):
    mixed = bench.generate_mixed

    def one_wrong(*args, **kwargs):
        replies = mixed(*args, **kwargs)
        return [replies[0] + " extra", *replies[1:]] if len(replies) > 2 else replies  # not the warm-up

    monkeypatch.setattr(bench, "generate_mixed", one_wrong)
    report = bench.main(TINY)
    assert not report["identical"]
    assert [m["index"] for m in report["mismatches"]["switch per user"]] == [0]
    assert report["mismatches"]["load per user"][0]["user"] == "u0"
    assert "MISMATCH: switch per user vs mixed batches differ on 1/6 contexts" in capsys.readouterr().out


def test_a_wrong_routed_reply_is_reported(bench, monkeypatch, capsys):
    routed = bench.generate_routed

    def last_wrong(*args, **kwargs):
        replies = routed(*args, **kwargs)
        return [*replies[:-1], replies[-1] + " extra"] if len(replies) > 2 else replies  # not the warm-up

    monkeypatch.setattr(bench, "generate_routed", last_wrong)
    report = bench.main(TINY)
    assert not report["identical"]
    assert [m["index"] for m in report["mismatches"]["routed"]] == [5]
    assert report["mismatches"]["switch per user"] == []
    assert "MISMATCH: routed vs mixed batches differ on 1/6 contexts" in capsys.readouterr().out


def test_the_json_holds_each_variant_as_soon_as_it_is_timed(bench, monkeypatch, tmp_path):
    """A run stopped part-way (gpu_check.sh's time limit) leaves the figures of the variants it timed."""
    def stopped(*args, **kwargs):
        if len(args[2]) > 2:  # not the warm-up
            raise KeyboardInterrupt("stopped at the time limit")
        return routed(*args, **kwargs)

    routed = bench.generate_routed
    monkeypatch.setattr(bench, "generate_routed", stopped)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main([*TINY, "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["complete"] is False and "identical" not in written
    assert list(written["seconds"]) == ["(a) load per user", "(a) switch per user", "(b) mixed, batch 4"]
    assert written["peak_gpu_memory_bytes"] is None  # on a CPU
    assert written["config"]["vocab_size"] == 400  # the quick tokenizer is exactly as large as asked


def test_quick_tokenizer_spells_any_prompt_and_decodes_every_id(bench):
    lexicon = bench.pseudo_words(2000, seed=0)
    tokenizer = bench.quick_tokenizer(1000, lexicon)
    assert len(tokenizer) == 1000
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)  # T5's ids
    prompts, _ = bench.synthetic_prompts(2, 2, lexicon, seed=1)
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == prompt  # markers, profile values and words come back as written
        assert tokenizer.convert_tokens_to_ids("[SEP]") in ids
    assert tokenizer.convert_ids_to_tokens(3) == "▁"  # a space alone, which decodes to nothing at the start
    assert all(tokenizer.decode([i]) for i in range(4, len(tokenizer)))  # every other id decodes to some text


def test_find_mismatches(bench):
    found = bench.find_mismatches(["a", "b", "c"], ["a", "x", "c"], ["u0", "u1", "u1"])
    assert [(m.index, m.user, m.expected, m.got) for m in found] == [(1, "u1", "b", "x")]
    assert bench.find_mismatches(["a"], ["a"], ["u0"]) == []
    with pytest.raises(ValueError, match="2 expected replies, 1 replies, 2 owners"):
        bench.find_mismatches(["a", "b"], ["a"], ["u0", "u0"])


def test_bad_arguments_are_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--users", "0"])
    assert "--users must be at least 1, got 0" in capsys.readouterr().err
