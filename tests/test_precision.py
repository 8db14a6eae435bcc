"""Unit tests for udg_lib.precision: what "auto" picks on each kind of device (capabilities mocked), and that a
bf16 run trains and scores (LoRA on a base held in bf16, FULL under autocast, generation and reference NLL)."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import sentences, tiny_model
from udg_lib import finetuning as ft_module
from udg_lib import precision as pr
from udg_lib.data.schema import PROFILE_FIELDS
from udg_lib.families import get_family
from udg_lib.finetuning import ADAPTER_DIR, FinetuneConfig, UserTrainingOptions, encode_pairs, run_users, \
    train_with_early_stopping, user_dir, user_examples
from udg_lib.conditions import Cell
from udg_lib.families import Decoding
from udg_lib.methods import LORA
from udg_lib.generation import greedy_generate, load_routed_adapters, reference_nll
from udg_lib.prompts import build_prompts


def mock_cpu(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (False, False, "fp32"),  # AVX2 only: bf16 is emulated, slower than fp32
    (True, False, "bf16"),  # AVX512-BF16 (e.g. AMD Zen 4)
    (False, True, "bf16"),  # AMX (Intel Sapphire Rapids and later)
    (True, True, "bf16"),
])
def test_auto_picks_bf16_only_on_a_cpu_that_multiplies_it_natively(monkeypatch, avx512_bf16, amx, expected):
    mock_cpu(monkeypatch, avx512_bf16, amx)
    chosen = pr.resolve_precision("auto", "cpu")
    assert chosen.used == expected and chosen.requested == "auto" and not chosen.tf32
    assert chosen.frozen_dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)
    assert pr.resolve_precision("fp32", "cpu").used == "fp32"  # asked for fp32: fp32 whatever the CPU


@pytest.mark.parametrize("bf16_gpu, expected", [(True, "bf16"), (False, "fp32")], ids=["ampere+", "pre-ampere"])
def test_auto_on_cuda_follows_the_gpu_and_turns_tf32_on(monkeypatch, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        chosen = pr.resolve_precision("auto", "cuda")
        assert chosen.used == expected and chosen.device_type == "cuda" and chosen.tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_forced_bf16_without_native_support_warns_and_bad_names_fail(monkeypatch):
    mock_cpu(monkeypatch, False, False)
    with pytest.warns(UserWarning, match="emulated"):
        assert pr.resolve_precision("bf16", "cpu").used == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        pr.resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        pr.autocast_for("yes", "cpu")


def test_autocast_for_follows_the_resolved_precision(monkeypatch):
    with pr.autocast_for("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pr.autocast_for("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with pr.autocast_for("auto", "cpu"):
        assert torch.is_autocast_enabled("cpu") == pr.native_bf16("cpu")
    mock_cpu(monkeypatch, False, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stage warned when it chose; every batch must not warn again
        with pr.autocast_for("bf16", "cpu"):
            assert torch.is_autocast_enabled("cpu")


def test_the_record_names_the_choice_and_the_cpu_flags():
    record = pr.resolve_precision("fp32", "cpu").record()
    assert record["requested"] == "fp32" and record["used"] == "fp32" and record["device"] == "cpu"
    assert {"model_name", "torch_cpu_capability", "avx2", "avx512_bf16", "amx_bf16"} <= set(record["cpu"])
    assert "AVX512-BF16" in pr.cpu_flags_line() and "AVX512-BF16" in str(pr.resolve_precision("fp32", "cpu"))


# --- a bf16 run trains and scores ----------------------------------------------------------------------------

USERS = ["u0", "u1"]
CONFIG = FinetuneConfig(learning_rate=1e-2, batch_size=4, max_epochs=3, patience=3, max_source_length=32,
                        max_target_length=16, lora_dropout=0.0)


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, texts = [], iter(sentences(300, seed=3))
    for user in USERS:
        for split, n in (("train_ft", 8), ("dev", 3), ("test", 3)):
            for i in range(n):
                rows.append({"pair_id": f"{user}-{split}-{i}", "dialogue_id": f"d-{user}-{i}", "turn_index": 1,
                             "speaker_id": user, "partner_id": "", "context": [next(texts)],
                             "response": next(texts), "split": split, "split_set": 0})
    users = pd.DataFrame({"user_id": USERS, **{f: ["20s", "female", "unknown", "student", "Kanto"][j]
                                               for j, f in enumerate(PROFILE_FIELDS)}})
    return pd.DataFrame(rows), users


def test_bf16_lora_trains_on_a_bf16_base_and_scores_like_fp32(tokenizer, family, data, tmp_path):
    """Stage 03's bf16 path: the frozen base held in bf16, the adapters fp32 (peft casts them), forward passes
    under autocast; then stage 04's: adapters routed on the bf16 base. The dev loss must fall, and the bf16
    reference NLLs must agree with an fp32 evaluation of the same adapters to bf16's precision (8 mantissa
    bits: ~0.4% per product; a few % on a summed NLL of a dozen tokens through a 2-layer model)."""
    pairs, users = data
    config = replace(CONFIG, precision="bf16")
    base = tiny_model(tokenizer, family, seed=1).to(dtype=torch.bfloat16)
    table = run_users(LORA, base, tokenizer, Cell(pairs, users, USERS, fmt_override="psp"), tmp_path, config,
                      UserTrainingOptions(progress=False))
    assert (table["best_dev_loss"] < table["initial_dev_loss"]).all()
    assert all(math.isfinite(x) for x in table["best_dev_loss"])
    for user in USERS:
        tensors = load_file(str(user_dir(tmp_path, user) / ADAPTER_DIR / "adapter_model.safetensors"))
        assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert all(p.dtype == torch.bfloat16 for p in base.parameters())  # given back as it came

    test = pairs[pairs["split"] == "test"]
    sources = build_prompts(test, users, "psp").tolist()
    names = test["speaker_id"].tolist()
    dirs = {u: user_dir(tmp_path, u) / ADAPTER_DIR for u in USERS}
    scores = {}
    for dtype, chosen in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        model = tiny_model(tokenizer, family, seed=1).to(dtype=dtype)
        routed = load_routed_adapters(model, dirs)
        decoding = Decoding(max_new_tokens=6, max_source_length=32, max_target_length=16, precision=chosen)
        scores[chosen] = reference_nll(routed, tokenizer, sources, test["response"].tolist(), decoding,
                                       adapter_names=names)
        replies = greedy_generate(routed, tokenizer, sources, decoding, adapter_names=names)
        assert len(replies) == len(sources) and all(isinstance(r, str) for r in replies)
        routed.close()
    np.testing.assert_allclose(scores["bf16"].nll, scores["fp32"].nll, rtol=0.05)


def test_bf16_full_training_keeps_fp32_weights(tokenizer, family, data):
    pairs, users = data
    model = tiny_model(tokenizer, family)
    train = encode_pairs(user_examples(pairs, "u0", "train_ft"), users, "psp", tokenizer, CONFIG,
                         family=get_family(family))
    dev = encode_pairs(user_examples(pairs, "u0", "dev"), users, "psp", tokenizer, CONFIG, family=get_family(family))
    summary = train_with_early_stopping(model, train, dev, get_family(family).collator(tokenizer),
                                        replace(CONFIG, precision="bf16", max_epochs=2))
    assert summary.steps > 0 and math.isfinite(summary.best_dev_loss) and summary.best_dev_loss < summary.initial_dev_loss
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_training_attention_is_eager_on_a_cpu_only_while_training_and_trains_alike(tokenizer, family, data):
    """A causal model (SDPA by default) trains with eager attention on a CPU and gets SDPA back; a T5 (its own
    attention) is left alone. In fp32 both attentions give the same training within float rounding: the dev
    losses of the same seeded run agree to 1e-4 relative (the two compute softmax(QK^T)V in different orders)."""
    pairs, users = data
    model = tiny_model(tokenizer, family)
    before = pr.attention_implementation(model)
    with pr.training_attention(model, "cpu"):
        during = pr.attention_implementation(model)
    assert pr.attention_implementation(model) == before
    assert during == ("eager" if before == "sdpa" else before)
    if family == "causal":
        assert before == "sdpa" and during == "eager"
        with pr.training_attention(model, "meta"):  # not a CPU: nothing changes
            assert pr.attention_implementation(model) == "sdpa"

    fam = get_family(family)
    train = encode_pairs(user_examples(pairs, "u0", "train_ft"), users, "psp", tokenizer, CONFIG, family=fam)
    dev = encode_pairs(user_examples(pairs, "u0", "dev"), users, "psp", tokenizer, CONFIG, family=fam)
    config = replace(CONFIG, max_epochs=2, patience=5)
    trained = {}
    for how in ("switched", "sdpa"):
        model = tiny_model(tokenizer, family, seed=2)
        with pytest.MonkeyPatch.context() as patch:
            if how == "sdpa":  # what training did before the switch
                patch.setattr(ft_module, "training_attention", lambda m, d: contextlib.nullcontext())
            trained[how] = train_with_early_stopping(model, train, dev, fam.collator(tokenizer), config)
        assert pr.attention_implementation(model) == before  # given back after training
    np.testing.assert_allclose(trained["switched"].dev_losses, trained["sdpa"].dev_losses, rtol=1e-4)
