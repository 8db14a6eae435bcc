"""Unit tests for udg_lib.finetuning: early stopping, LoRA / FULL per user, resume, isolation, One-ID.

Tiny models (preset "test") and a tokenizer trained here on a few dozen sentences. The safety tests (FULL
restores the base between users, resume and determinism, canary isolation) run for both model families.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import CANARY, assert_close_to_scale, sentences, tiny_model
from udg_lib.data.schema import PROFILE_FIELDS
from udg_lib.families import get_family
from udg_lib.finetuning import (
    ADAPTER_DIR,
    DONE_FILE,
    MODEL_DIR,
    FinetuneConfig,
    UserTrainingOptions,
    domain_adapt,
    encode_pairs,
    load_user_adapter,
    lora_trainable_parameters,
    one_ids_of,
    run_users,
    seq2seq_collator,
    train_one_id,
    train_with_early_stopping,
    user_dir,
    user_examples,
    user_seed,
)
from udg_lib.encoding import LABEL_PAD_ID
from udg_lib.conditions import Cell
from udg_lib.methods import DA, FULL, LORA, ONE_ID, get

USERS = ["u0", "u1", "u2"]


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame]:
    """One split set's eval pairs: per user 6 train_ft, 4 train_da, 3 dev, 2 test rows; and the users."""
    rows = []
    texts = iter(sentences(400, seed=1))
    for user in USERS:
        partner = USERS[(USERS.index(user) + 1) % len(USERS)]
        for split, n in (("train_ft", 6), ("train_da", 4), ("dev", 3), ("test", 2)):
            for i in range(n):
                rows.append({"pair_id": f"{user}-{split}-{i}", "dialogue_id": f"d-{user}-{i}", "turn_index": 1,
                             "speaker_id": user, "partner_id": partner, "context": [next(texts), next(texts)],
                             "response": next(texts), "split": split, "split_set": 0})
    users = pd.DataFrame({"user_id": USERS, "one_id": ["aB3x", "Qz9k", "m0Np"],
                          **{f: ["20s", "female", "unknown", "student", "Kanto"][j] for j, f in
                             enumerate(PROFILE_FIELDS)}})
    return pd.DataFrame(rows), users


CONFIG = FinetuneConfig(learning_rate=1e-2, batch_size=4, max_epochs=3, patience=1, max_source_length=32,
                        max_target_length=16)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-equal: for weights left alone or computed the same way twice on this machine (determinism, resume,
    a user trained after others or alone), which holds by construction."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / ADAPTER_DIR / "adapter_model.safetensors"))


# --- early stopping ----------------------------------------------------------------------------------------------


class Scripted(torch.nn.Module):
    """One weight w from 0: training pulls it towards 5, the dev loss is (w - 1)^2 -> falls, then rises."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, labels):
        target = 5.0 if self.training else 1.0
        return SimpleNamespace(loss=(self.w - target) ** 2)


def scripted_collator(features):
    return {"input_ids": torch.zeros(len(features), 1), "labels": torch.ones(len(features), 1, dtype=torch.long)}


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_stops_when_dev_loss_rises_and_restores_best(patience):
    model = Scripted()
    config = FinetuneConfig(learning_rate=1.0, batch_size=1, max_epochs=10, patience=patience)
    summary = train_with_early_stopping(model, [0], [0], scripted_collator, config)
    # Adam's steps are ~lr: w ~ 1, 2, 3, ... so dev loss is lowest after epoch 1, then rises.
    assert summary.best_epoch == 1 and summary.stopped_early
    assert summary.epochs_run == 1 + patience and len(summary.dev_losses) == 1 + patience
    assert summary.dev_losses[1] > summary.dev_losses[0] == summary.best_dev_loss < summary.initial_dev_loss
    model.eval()
    assert ((model.w.detach() - 1.0) ** 2).item() == pytest.approx(summary.best_dev_loss)  # best weights restored


def test_early_stopping_keeps_start_weights_when_training_never_helps():
    model = Scripted()
    with torch.no_grad():
        model.w.fill_(1.0)  # already at the dev optimum
    summary = train_with_early_stopping(model, [0], [0], scripted_collator,
                                        FinetuneConfig(learning_rate=1.0, batch_size=1, max_epochs=5))
    assert (summary.best_epoch, summary.epochs_run) == (0, 1) and model.w.item() == 1.0


def test_training_is_deterministic_and_only_touches_params(tokenizer, data):
    pairs, users = data
    train = encode_pairs(user_examples(pairs, "u0", "train_ft"), users, "psp", tokenizer, CONFIG)
    dev = encode_pairs(user_examples(pairs, "u0", "dev"), users, "psp", tokenizer, CONFIG)
    results = []
    for _ in range(2):
        model = tiny_model(tokenizer)
        before = state(model)
        decoder = list(model.decoder.block.parameters())  # not the shared embeddings
        summary = train_with_early_stopping(model, train, dev, seq2seq_collator(tokenizer), CONFIG, decoder)
        after = state(model)
        assert summary.trainable_parameters == sum(p.numel() for p in decoder)
        assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("encoder."))
        results.append((summary.train_losses, summary.dev_losses, after))
    assert results[0][:2] == results[1][:2] and same_state(results[0][2], results[1][2])


# --- LoRA ---------------------------------------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_saved_adapter_reloads(tokenizer, data, tmp_path):
    pairs, users = data
    base = tiny_model(tokenizer)
    before = state(base)
    grads = {n: p.requires_grad for n, p in base.named_parameters()}
    seen = {}

    def keep_outputs(user, model, folder):
        batch = seq2seq_collator(tokenizer)([encode_pairs(user_examples(pairs, user, "test"), users, "psp",
                                                          tokenizer, CONFIG)[0]])
        with torch.no_grad():
            seen[user] = model(**batch).logits
        (folder / "replies.txt").write_text("kept with the artifact")

    table = run_users(LORA, base, tokenizer, Cell(pairs, users, USERS[:2], fmt_override="psp"), tmp_path, CONFIG,
                      after_user=keep_outputs)
    assert list(table["status"]) == ["trained", "trained"]
    assert not isinstance(base, PeftModel) and not any("lora" in n for n, _ in base.named_modules())
    assert same_state(before, state(base))  # base weights untouched, unwrapped again
    assert grads == {n: p.requires_grad for n, p in base.named_parameters()}
    # §4.1.3 r = 12 on every self-attention q, k, v, o: 2 * d_model * r per matrix, 4 matrices x 2 stacks
    assert (table["trainable_parameters"] == 2 * 32 * 12 * 4 * 2).all()
    for user in USERS[:2]:
        folder = user_dir(tmp_path, user)
        assert (folder / ADAPTER_DIR / "adapter_config.json").is_file()
        assert (folder / "replies.txt").is_file()
        tensors = adapter_tensors(folder)
        assert tensors and all("lora_" in k for k in tensors)
        assert any(("lora_B" in k) and bool(v.abs().sum() > 0) for k, v in tensors.items())  # B moved from 0
        done = json.loads((folder / DONE_FILE).read_text())
        assert done["user_id"] == user and done["summary"]["epochs_run"] >= 1
        # PEFT's own loader on a fresh copy of the base gives the outputs seen in memory
        fresh = tiny_model(tokenizer)
        fresh.load_state_dict(before)
        reloaded = PeftModel.from_pretrained(fresh, str(folder / ADAPTER_DIR))
        reloaded.eval()
        batch = seq2seq_collator(tokenizer)([encode_pairs(user_examples(pairs, user, "test"), users, "psp",
                                                          tokenizer, CONFIG)[0]])
        with torch.no_grad():  # peft from disk vs peft in memory: the same computation, equal up to rounding at most
            assert_close_to_scale(reloaded(**batch).logits, seen[user], reduction_size=fresh.config.hidden_size)
    again = load_user_adapter(tiny_model(tokenizer), user_dir(tmp_path, "u0") / ADAPTER_DIR)
    assert isinstance(again, PeftModel)


def test_lora_t5_base_shape_trainable_parameters():
    assert lora_trainable_parameters(FinetuneConfig()) == 1_769_472  # §4.1.3: "1.8 million"
    assert lora_trainable_parameters(FinetuneConfig(lora_target_modules=("q", "v"))) == 1_327_104


# --- FULL ---------------------------------------------------------------------------------------------------------


def test_full_restores_base_between_users(tokenizer, data, tmp_path, family):
    pairs, users = data
    base = tiny_model(tokenizer, family)
    before = state(base)
    in_loop, alone = {}, {}

    def recorder(store):
        return lambda user, model, folder: store.__setitem__(user, state(model))

    run_users(FULL, base, tokenizer, Cell(pairs, users, USERS, fmt_override="plain"), tmp_path / "all", CONFIG,
              UserTrainingOptions(save_full_models=True), after_user=recorder(in_loop))
    assert same_state(before, state(base))  # the caller's model comes back as it went in
    assert not same_state(in_loop["u2"], before)  # ... though every weight was trainable per user
    # u2 trained third (after u0 and u1) ends exactly as u2 trained alone from a fresh base
    run_users(FULL, tiny_model(tokenizer, family), tokenizer, Cell(pairs, users, ["u2"], fmt_override="plain"),
              tmp_path / "alone", CONFIG, after_user=recorder(alone))
    assert same_state(in_loop["u2"], alone["u2"])
    saved = user_dir(tmp_path / "all", "u2") / MODEL_DIR
    assert (saved / "config.json").is_file() and not (user_dir(tmp_path / "alone", "u2") / MODEL_DIR).exists()
    reloaded = type(base).from_pretrained(str(saved))
    assert all(torch.equal(v, in_loop["u2"][k]) for k, v in reloaded.state_dict().items())


# --- resume, determinism, isolation -----------------------------------------------------------------------------


def test_resume_after_crash_matches_uninterrupted_run(tokenizer, data, tmp_path, family):
    pairs, users = data
    full_run = run_users(LORA, tiny_model(tokenizer, family), tokenizer,
                         Cell(pairs, users, USERS, fmt_override="ppp"), tmp_path / "a", CONFIG)
    assert list(full_run["status"]) == ["trained"] * 3
    reference = {u: adapter_tensors(user_dir(tmp_path / "a", u)) for u in USERS}

    # same seed, same data: identical adapters (determinism)
    twin = run_users(LORA, tiny_model(tokenizer, family), tokenizer, Cell(pairs, users, USERS, fmt_override="ppp"),
                     tmp_path / "b", CONFIG)
    for u in USERS:
        assert same_state(reference[u], adapter_tensors(user_dir(tmp_path / "b", u)))
    assert twin["best_dev_loss"].tolist() == full_run["best_dev_loss"].tolist()

    # crash 1: the last user's marker is gone (killed before it was written) -> only that user retrains
    (user_dir(tmp_path / "b", "u2") / DONE_FILE).unlink()
    rerun = run_users(LORA, tiny_model(tokenizer, family), tokenizer, Cell(pairs, users, USERS, fmt_override="ppp"),
                      tmp_path / "b", CONFIG)
    assert list(rerun["status"]) == ["skipped", "skipped", "trained"]
    assert same_state(reference["u2"], adapter_tensors(user_dir(tmp_path / "b", "u2")))

    # crash 2: the loop dies during the third user -> nothing of it is published; a rerun trains only it
    def crash(user, model, folder):
        if user == "u2":
            raise RuntimeError("simulated crash")

    base = tiny_model(tokenizer, family)
    before = state(base)
    with pytest.raises(RuntimeError, match="simulated"):
        run_users(LORA, base, tokenizer, Cell(pairs, users, USERS, fmt_override="ppp"), tmp_path / "c", CONFIG,
                  after_user=crash)
    assert same_state(before, state(base)) and not isinstance(base, PeftModel)
    assert not user_dir(tmp_path / "c", "u2").exists()
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".")] == []  # no staging left
    resumed = run_users(LORA, base, tokenizer, Cell(pairs, users, USERS, fmt_override="ppp"), tmp_path / "c", CONFIG)
    assert list(resumed["status"]) == ["skipped", "skipped", "trained"]
    for u in USERS:
        assert same_state(reference[u], adapter_tensors(user_dir(tmp_path / "c", u)))


def test_user_seed_depends_on_user_not_position():
    assert user_seed(0, "u1") == user_seed(0, "u1") != user_seed(0, "u2")
    assert user_seed(0, "u1") != user_seed(1, "u1")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_no_other_users_rows_reach_a_users_batches(tokenizer, data, tmp_path, method, family, monkeypatch):
    pairs, users = data
    pairs = pairs.copy()
    planted = (pairs["speaker_id"] == "u1") & (pairs["split"] == "train_ft")
    pairs.loc[planted, "response"] = f"{CANARY} " + pairs.loc[planted, "response"]  # first: never truncated
    assert CANARY not in " ".join(user_examples(pairs, "u0", "train_ft")["response"])

    import udg_lib.finetuning as finetuning

    decoded: dict[str, list[str]] = {}
    current = {"user": None}
    model_family = get_family(family)
    real_collator = model_family.collator

    def recording_collator(tok):
        inner = real_collator(tok)

        def collate(features):
            batch = inner(features)
            for key in ("input_ids", "labels"):  # causal: input_ids hold the reply too, labels only the reply
                ids = batch[key].clone()
                ids[ids == LABEL_PAD_ID] = tok.pad_token_id
                decoded.setdefault(current["user"], []).extend(
                    t.replace(" ", "") for t in tok.batch_decode(ids, skip_special_tokens=True))
            return batch
        return collate

    real_encode = finetuning.encode_pairs

    def tracking_encode(frame, *args, **kwargs):
        current["user"] = frame["speaker_id"].iloc[0] if len(frame) else current["user"]
        return real_encode(frame, *args, **kwargs)

    monkeypatch.setattr(model_family, "collator", recording_collator)
    monkeypatch.setattr(finetuning, "encode_pairs", tracking_encode)
    run_users(get(method), tiny_model(tokenizer, family), tokenizer,
              Cell(pairs, users, ["u0", "u1"], fmt_override="psp"), tmp_path, CONFIG)
    assert decoded["u0"] and not any(CANARY in text for text in decoded["u0"])
    assert any(CANARY in text for text in decoded["u1"])  # the detector does see the canary


def test_user_examples_rejects_mixed_split_sets(data):
    pairs, _ = data
    mixed = pd.concat([pairs, pairs.assign(split_set=1)])
    with pytest.raises(ValueError, match="split set"):
        user_examples(mixed, "u0", "train_ft")
    assert set(user_examples(pairs, "u0", "dev")["speaker_id"]) == {"u0"}


def test_run_users_trains_per_user_methods_only(tokenizer, data, tmp_path):
    """DA and One-ID train one pooled model per cell; a method's name is no method: refused before any file."""
    pairs, users = data
    base, cell = tiny_model(tokenizer), Cell(pairs, users, ["u0"], fmt_override="psp")
    for method, name in ((ONE_ID, "one_id"), (DA, "da"), ("lora", "lora")):
        with pytest.raises(TypeError, match=f"per-user method .*not '{name}'"):
            run_users(method, base, tokenizer, cell, tmp_path / "out", CONFIG)
    assert not (tmp_path / "out").exists()


def test_one_ids_must_be_strings(data):
    _, users = data
    assert one_ids_of(users)["u1"] == "Qz9k"
    with pytest.raises(ValueError, match="dtype=str"):
        one_ids_of(users.assign(one_id=[42, 7, 1]))
    assert len(set(one_ids_of(users.drop(columns="one_id")).values())) == 3  # drawn when absent


# --- domain adaptation and One-ID -------------------------------------------------------------------------------


def test_domain_adaptation_uses_pooled_train_da(tokenizer, data, monkeypatch):
    pairs, users = data
    import udg_lib.finetuning as finetuning

    seen = []
    real_encode = finetuning.encode_pairs
    monkeypatch.setattr(finetuning, "encode_pairs",
                        lambda frame, *a, **k: seen.append(frame) or real_encode(frame, *a, **k))
    model, summary = domain_adapt(tiny_model(tokenizer), tokenizer, pairs, users, "ppp", CONFIG)
    train, dev = seen
    assert set(train["split"]) == {"train_da"} and set(train["speaker_id"]) == set(USERS)
    assert set(dev["split"]) == {"dev"} and summary.n_train == len(train) == 12 and summary.n_dev == 9
    assert summary.best_dev_loss <= summary.initial_dev_loss


def test_one_id_prompts_carry_the_user_id(tokenizer, data, monkeypatch):
    pairs, users = data
    import udg_lib.finetuning as finetuning

    sources = []
    real_build = finetuning.build_prompts

    def spy(frame, users_, fmt, one_ids=None):
        prompts = real_build(frame, users_, fmt, one_ids)
        sources.append((frame, prompts))
        return prompts

    monkeypatch.setattr(finetuning, "build_prompts", spy)
    ids = one_ids_of(users)
    _, summary = train_one_id(tiny_model(tokenizer), tokenizer, pairs, users, "psp", CONFIG)
    (train, train_prompts), (dev, dev_prompts) = sources
    assert set(train["split"]) == {"train_ft"} and summary.n_train == 18
    for frame, prompts in ((train, train_prompts), (dev, dev_prompts)):
        for speaker, prompt in zip(frame["speaker_id"], prompts):
            assert prompt.startswith(f"{ids[speaker]} [USER]")


def test_length_buckets_keep_batches_and_cut_padding():
    """The sampler draws RandomSampler's permutation from the generator and sorts within mega-batches: with
    a few batches' worth of examples, batches hold the same examples as a plain shuffle (so a user's training
    is the one it had before), and on many examples far less padding."""
    from torch.utils.data import RandomSampler

    from udg_lib.finetuning import LengthBucketSampler, padding_share

    few = [5, 30, 7, 22, 9, 14, 3, 18, 11, 25]  # 10 examples, batch 4: mega-batches of one batch
    plain = list(RandomSampler(range(len(few)), generator=torch.Generator().manual_seed(3)))
    bucketed = list(LengthBucketSampler(few, 4, torch.Generator().manual_seed(3)))
    assert [sorted(plain[i:i + 4]) for i in range(0, 10, 4)] == [sorted(bucketed[i:i + 4]) for i in range(0, 10, 4)]
    assert list(LengthBucketSampler(few, 4, torch.Generator().manual_seed(3))) == bucketed  # seeded
    lengths = [int(x) for x in torch.randint(5, 60, (400,), generator=torch.Generator().manual_seed(0))]
    order = list(LengthBucketSampler(lengths, 8, torch.Generator().manual_seed(0)))
    assert sorted(order) == list(range(400))  # every example once per epoch
    shuffled = list(RandomSampler(range(400), generator=torch.Generator().manual_seed(0)))
    batches = lambda o: [o[i:i + 8] for i in range(0, len(o), 8)]  # noqa: E731
    assert padding_share(lengths, batches(order)) < padding_share(lengths, batches(shuffled)) / 3
    assert padding_share([3, 3], [[0, 1]]) == 0.0 and padding_share([1, 3], [[0, 1]]) == pytest.approx(1 / 3)
