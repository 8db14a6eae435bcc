"""Unit tests for udg_lib.multilora: per-row LoRA routing, batched per-user training, PEFT format, resume.

Tiny models (preset "test") and a tokenizer trained here on a few dozen sentences, as in test_finetuning. The
safety tests (routing equals peft, gradient and canary isolation, batched equals the one-user loop, determinism
and resume) run for both model families.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from conftest import CANARY, assert_close_to_scale, sentences, tiny_model
from udg_lib.data.schema import PROFILE_FIELDS
from udg_lib.families import get_family
from udg_lib.finetuning import (
    ADAPTER_DIR,
    DONE_FILE,
    FinetuneConfig,
    UserTrainingOptions,
    encode_pairs,
    load_user_adapter,
    run_users,
    user_dir,
    user_examples,
)
from udg_lib.multilora import MultiLora, lora_target_names, run_users_batched
from udg_lib.conditions import Cell
from udg_lib.methods import FULL, LORA

USERS = ["u0", "u1", "u2", "u3"]


def make_data() -> tuple[pd.DataFrame, pd.DataFrame]:
    """One split set's eval pairs. Users differ in train size (6, 9, 12, 5: partial and full last batches of 4,
    so users' epochs end at different steps); u3 has one dev pair only."""
    rows = []
    texts = iter(sentences(500, seed=1))
    sizes = {"u0": (6, 3), "u1": (9, 3), "u2": (12, 4), "u3": (5, 1)}
    for user in USERS:
        partner = USERS[(USERS.index(user) + 1) % len(USERS)]
        n_train, n_dev = sizes[user]
        for split, n in (("train_ft", n_train), ("dev", n_dev), ("test", 2)):
            for i in range(n):
                rows.append({"pair_id": f"{user}-{split}-{i}", "dialogue_id": f"d-{user}-{i}", "turn_index": 1,
                             "speaker_id": user, "partner_id": partner, "context": [next(texts), next(texts)],
                             "response": next(texts), "split": split, "split_set": 0})
    users = pd.DataFrame({"user_id": USERS, **{f: ["20s", "female", "unknown", "student", "Kanto"][j]
                                               for j, f in enumerate(PROFILE_FIELDS)}})
    return pd.DataFrame(rows), users


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame]:
    return make_data()


# early stopping fires for some users (u1 at epoch 5), not for others; a larger lr would stop sooner but would
# also blow rounding differences up into visible ones when comparing with run_users
CONFIG = FinetuneConfig(learning_rate=1e-2, batch_size=4, max_epochs=8, patience=1, max_source_length=32,
                        max_target_length=16)
NO_DROPOUT = replace(CONFIG, lora_dropout=0.0)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-equal: for weights left alone, copied, or computed the same way twice on this machine (determinism,
    resume), which holds by construction; different computations go to `assert_close_to_scale`."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def adapter_tensors(out_dir, user) -> dict[str, torch.Tensor]:
    return load_file(str(user_dir(out_dir, user) / ADAPTER_DIR / "adapter_model.safetensors"))


def close_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def batch_of(tokenizer, data, user_ids, split="test", family="seq2seq"):
    pairs, users = data
    model_family = get_family(family)
    features = [f for u in user_ids for f in encode_pairs(user_examples(pairs, u, split), users, "psp", tokenizer,
                                                           CONFIG, family=model_family)]
    return model_family.collator(tokenizer)(features)


def has_no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- routing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [CONFIG.lora_target_modules, ("q", "v")])
def test_targets_are_the_modules_peft_wraps(tokenizer, targets):
    model = tiny_model(tokenizer)
    config = replace(CONFIG, lora_target_modules=targets)
    names = lora_target_names(model, MultiLora(model, config).peft_config)
    wrapped = get_peft_model(tiny_model(tokenizer), MultiLora(model, config).peft_config)
    assert names == [n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if hasattr(m, "lora_A")]
    assert len(names) == (8 if isinstance(targets, str) else 6)  # q/k/v/o self-attention; q/v in all 3 attentions
    with pytest.raises(ValueError, match="no module"):
        MultiLora(model, FinetuneConfig(lora_target_modules=("nothing_here",)))
    with pytest.raises(ValueError, match="nn.Linear only"):
        MultiLora(model, FinetuneConfig(lora_target_modules=("shared",)))  # the embedding


def test_mixed_batch_rows_match_peft_with_each_users_adapter(tokenizer, data, tmp_path, family):
    """Every row of one interleaved batch gets the logits PEFT gives with that row's user's saved adapter."""
    base = tiny_model(tokenizer, family)
    before = state(base)
    row_users = ["u1", "u0", "u2", "u1", "u0", "u2"]
    batch = batch_of(tokenizer, data, ["u0", "u1", "u2"], family=family)  # 6 rows: u0, u0, u1, u1, u2, u2
    order = [2, 0, 4, 3, 1, 5]  # rows re-ordered to match row_users
    batch = {k: v[order] for k, v in batch.items()}
    with MultiLora(base, CONFIG) as multi:
        for i, user in enumerate(["u0", "u1", "u2"]):
            multi.add_user(user, seed=i)
            with torch.no_grad():
                for p in multi.parameters(user):
                    p.normal_(0, 0.3)  # B starts at 0; give every user a non-trivial update
            multi.save_adapter(user, tmp_path / user)
        base.eval()
        with torch.no_grad(), multi.routed(row_users):
            mixed = base(**batch).logits
        with torch.no_grad():
            plain = base(**batch).logits  # outside routing: the base model
    assert has_no_hooks(base) and same_state(before, state(base))
    for user in ["u0", "u1", "u2"]:
        fresh = tiny_model(tokenizer, family)
        fresh.load_state_dict(before)
        peft_model = load_user_adapter(fresh, tmp_path / user)
        peft_model.eval()
        with torch.no_grad():
            expected = peft_model(**batch).logits
        rows = [i for i, u in enumerate(row_users) if u == user]
        # routed and peft add the LoRA term by different matmuls: rounding of sums over the hidden size
        assert_close_to_scale(mixed[rows], expected[rows], reduction_size=base.config.hidden_size)
        assert not torch.allclose(plain[rows], expected[rows], atol=1e-3)  # the adapters do change the output


def test_saved_adapter_loads_back_for_batched_inference(tokenizer, tmp_path):
    base = tiny_model(tokenizer)
    with MultiLora(base, CONFIG) as multi:
        multi.add_user("a", seed=1)
        multi.save_adapter("a", tmp_path / "a")
        multi.load_adapter("b", tmp_path / "a")
        assert same_state(multi.adapter_state_dict("a"), multi.adapter_state_dict("b"))  # a copy: exact
        with MultiLora(base, FinetuneConfig(lora_r=4)) as other, pytest.raises(ValueError, match="r=12, expected 4"):
            other.load_adapter("c", tmp_path / "a")
        weights = tmp_path / "a" / "adapter_model.safetensors"
        save_file({k.replace(".q.", ".query."): v for k, v in load_file(str(weights)).items()}, str(weights))
        with pytest.raises(ValueError, match="adapter_model.safetensors: keys differ"):
            multi.load_adapter("c", tmp_path / "a")
        with pytest.raises(ValueError, match="already"):
            multi.add_user("a", seed=0)


def test_other_users_rows_give_no_gradient(tokenizer, data, family):
    """Isolation at the gradient level: a loss on u1's rows only leaves u0's adapter gradient exactly zero,
    and u0's gradient from a mixed batch equals its gradient from its own rows alone (up to rounding)."""
    base = tiny_model(tokenizer, family, dropout=0.0)
    base.requires_grad_(False)
    batch = batch_of(tokenizer, data, ["u0", "u1"], split="train_ft", family=family)  # 6 rows of u0, then 9 of u1
    row_users = ["u0"] * 6 + ["u1"] * 9
    with MultiLora(base, NO_DROPOUT) as multi:
        for i, user in enumerate(["u0", "u1"]):
            multi.add_user(user, seed=i)
            with torch.no_grad():
                for p in multi.parameters(user):
                    p.normal_(0, 0.3)
        base.train()

        def grads(rows_batch, users, loss_rows):
            for user in ("u0", "u1"):
                for p in multi.parameters(user):
                    p.grad = None
            with multi.routed(users):
                losses, _ = get_family(family).token_losses(base, rows_batch)  # per row: 0 where not scored
            losses[loss_rows].sum().backward()
            return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in multi.parameters("u0")]

        only_u1 = grads(batch, row_users, slice(6, None))
        # exact by construction: u0's adapter never touches u1's rows, so no term reaches its gradient
        assert all(int(torch.count_nonzero(g)) == 0 for g in only_u1)
        mixed = grads(batch, row_users, slice(0, 6))
        alone = grads({k: v[:6] for k, v in batch.items()}, row_users[:6], slice(0, 6))
        assert any(g.abs().sum() > 0 for g in alone)
        # not exact: 15 rows or 6 (and their padded length) change the kernels' summation order. Each gradient
        # is a sum over u0's rows and positions, so its rounding is relative to the largest gradient, not to
        # each element (an element-wise rtol failed on near-zero ones: 7e-6 apart at scale 30 with AMX kernels,
        # 1.6e-5 with AVX-512 ones; 5e-6 with AVX2)
        for m, a in zip(mixed, alone):
            assert_close_to_scale(m, a, reduction_size=batch["input_ids"][:6].numel())


# --- batched training ---------------------------------------------------------------------------------------------


def test_batched_run_saves_peft_adapters_and_leaves_base_unchanged(tokenizer, data, tmp_path):
    pairs, users = data
    base = tiny_model(tokenizer)
    base.shared.weight.requires_grad_(False)  # a caller's flag, given back as it was
    before = state(base)
    grads = {n: p.requires_grad for n, p in base.named_parameters()}
    seen = {}

    def keep_outputs(user, model, folder):
        with torch.no_grad():
            seen[user] = model(**batch_of(tokenizer, data, [user])).logits
        (folder / "replies.txt").write_text("kept with the artifact")

    table = run_users_batched(LORA, base, tokenizer, Cell(pairs, users, USERS, fmt_override="psp"),
                              tmp_path / "batched", CONFIG, UserTrainingOptions(users_per_batch=2, progress=False),
                              after_user=keep_outputs)
    assert list(table["user_id"]) == USERS and list(table["status"]) == ["trained"] * 4
    assert same_state(before, state(base)) and has_no_hooks(base) and not base.training
    assert grads == {n: p.requires_grad for n, p in base.named_parameters()}
    assert (table["trainable_parameters"] == 2 * 32 * 12 * 4 * 2).all()  # as run_users: r 12, q/k/v/o x 2 stacks
    assert list(table["n_train"]) == [6, 9, 12, 5] and list(table["n_dev"]) == [3, 3, 4, 1]
    u3 = table.set_index("user_id").loc["u3"]  # 5 training pairs at batch 4: two steps an epoch
    assert u3["steps"] == 2 * u3["epochs_run"] and u3["epochs_run"] >= 1

    # the same files as run_users("lora") writes, and adapter_config.json identical to PEFT's own
    reference = run_users(LORA, tiny_model(tokenizer), tokenizer, Cell(pairs, users, ["u0"], fmt_override="psp"),
                          tmp_path / "loop", CONFIG, UserTrainingOptions(progress=False))
    ours, theirs = user_dir(tmp_path / "batched", "u0"), user_dir(tmp_path / "loop", "u0")
    assert json.loads((ours / ADAPTER_DIR / "adapter_config.json").read_text()) == \
        json.loads((theirs / ADAPTER_DIR / "adapter_config.json").read_text())
    assert load_file(str(ours / ADAPTER_DIR / "adapter_model.safetensors")).keys() == \
        load_file(str(theirs / ADAPTER_DIR / "adapter_model.safetensors")).keys()
    done, loop_done = json.loads((ours / DONE_FILE).read_text()), json.loads((theirs / DONE_FILE).read_text())
    assert set(loop_done) <= set(done) and done["summary"].keys() == loop_done["summary"].keys()
    assert list(table.columns) == list(reference.columns)

    for user in USERS:
        folder = user_dir(tmp_path / "batched", user)
        assert (folder / "replies.txt").is_file() and json.loads((folder / DONE_FILE).read_text())["user_id"] == user
        fresh = tiny_model(tokenizer)
        fresh.load_state_dict(before)
        peft_model = load_user_adapter(fresh, folder / ADAPTER_DIR)
        assert isinstance(peft_model, PeftModel)
        peft_model.eval()
        with torch.no_grad():  # routed in memory vs peft from disk: rounding of sums over the hidden size
            assert_close_to_scale(peft_model(**batch_of(tokenizer, data, [user])).logits, seen[user],
                                  reduction_size=fresh.config.hidden_size)
    assert [p.name for p in (tmp_path / "batched").iterdir() if p.name.startswith(".")] == []  # no staging left


# Tolerances for two trainings that differ only in rounding (the one-user loop vs batched: one loss over the
# batch vs per-user means; a user with or without batchmates: other batch shapes). Adam carries the gradients'
# rounding differences forward through every step, so trained weights end as far apart as the training dynamics
# take a rounding-sized perturbation, not a few eps. Measured on these tests' runs by adding noise of
# c * eps(float32) * max|grad| to every gradient before each Adam step: at c = 32 adapters ended up to 1e-4 (T5)
# and 8e-4 (causal) apart, dev losses 3e-5 and 5e-5, growing about linearly in c. The tolerances (dev losses,
# adapter weights) cover c = 32; the two paths' own differences, with AVX-512 and AVX2 kernels, stay below 2e-6
# (T5) and 2.5e-4 (causal) in weights and 2e-5 in losses; a run that took another step (another row, batch order
# or dropout mask) can part by up to Adam's step size, lr = 1e-2, at every step.
TRAINED_MATCH = {"seq2seq": (1e-4, 1e-4), "causal": (1e-4, 1e-3)}
# max_epochs of the loop comparison. The tiny causal model has ~24x the T5's parameters; at lr 1e-2 by epoch 6-8
# u2's training spikes and the runs part visibly (dev losses 5e-2 apart). So 5 epochs for it: users still end
# both ways, and every epoch count, step and early stop must still agree exactly.
LOOP_EPOCHS = {"seq2seq": 8, "causal": 5}


@pytest.mark.parametrize("users_per_batch, dropout", [(1, 0.1), (1, 0.0), (3, 0.0)])
def test_matches_the_one_user_loop(tokenizer, data, tmp_path, users_per_batch, dropout, family):
    """One user per batch follows run_users("lora") step for step (same init, shuffling and dropout stream);
    without dropout, users sharing batches still train exactly as alone (up to rounding)."""
    pairs, users = data
    loss_tolerance, weight_tolerance = TRAINED_MATCH[family]
    config = replace(CONFIG if dropout else NO_DROPOUT, max_epochs=LOOP_EPOCHS[family])
    loop = run_users(LORA, tiny_model(tokenizer, family, dropout=dropout), tokenizer,
                     Cell(pairs, users, USERS, fmt_override="ppp"), tmp_path / "loop", config,
                     UserTrainingOptions(progress=False))
    batched = run_users_batched(LORA, tiny_model(tokenizer, family, dropout=dropout), tokenizer,
                                Cell(pairs, users, USERS, fmt_override="ppp"), tmp_path / "batched", config,
                                UserTrainingOptions(users_per_batch=users_per_batch, progress=False))
    for column in ("epochs_run", "best_epoch", "steps", "stopped_early", "n_train", "n_dev"):
        assert batched[column].tolist() == loop[column].tolist(), column
    assert loop["stopped_early"].any() and not loop["stopped_early"].all()  # both ways of ending are exercised
    for column in ("best_dev_loss", "initial_dev_loss"):
        assert batched[column].to_numpy() == pytest.approx(loop[column].to_numpy(), abs=loss_tolerance, nan_ok=True)
    for ours, theirs in zip(batched["dev_losses"], loop["dev_losses"]):
        assert ours == pytest.approx(theirs, abs=loss_tolerance, nan_ok=True)
    for user in USERS:
        assert close_tensors(adapter_tensors(tmp_path / "batched", user), adapter_tensors(tmp_path / "loop", user),
                             atol=weight_tolerance)


def test_canary_in_a_batchmate_does_not_reach_a_users_adapter(tokenizer, data, tmp_path, family):
    """u0 trained beside u1 (whose replies carry a canary) ends as u0 trained alone (dropout 0)."""
    pairs, users = data
    pairs = pairs.copy()
    planted = (pairs["speaker_id"] == "u1") & (pairs["split"] == "train_ft")
    pairs.loc[planted, "response"] = f"{CANARY} " + pairs.loc[planted, "response"]
    together = run_users_batched(LORA, tiny_model(tokenizer, family, dropout=0.0), tokenizer,
                                 Cell(pairs, users, ["u0", "u1"], fmt_override="psp"), tmp_path / "together",
                                 NO_DROPOUT, UserTrainingOptions(users_per_batch=2, progress=False))
    alone = run_users_batched(LORA, tiny_model(tokenizer, family, dropout=0.0), tokenizer,
                              Cell(pairs, users, ["u0"], fmt_override="psp"), tmp_path / "alone", NO_DROPOUT,
                              UserTrainingOptions(users_per_batch=2, progress=False))
    loss_tolerance, weight_tolerance = TRAINED_MATCH[family]  # batchmates change rounding only
    assert close_tensors(adapter_tensors(tmp_path / "together", "u0"), adapter_tensors(tmp_path / "alone", "u0"),
                         atol=weight_tolerance)
    assert together["dev_losses"][0] == pytest.approx(alone["dev_losses"][0], abs=loss_tolerance)
    # ... while u1's adapter did learn from its own (canary) rows
    assert not close_tensors(adapter_tensors(tmp_path / "together", "u1"), adapter_tensors(tmp_path / "alone", "u0"),
                             atol=weight_tolerance)


def test_deterministic_and_resumable(tokenizer, data, tmp_path, family):
    pairs, users = data

    def run(out, model=None, **kwargs):
        return run_users_batched(LORA, model or tiny_model(tokenizer, family), tokenizer,
                                 Cell(pairs, users, USERS, fmt_override="psp"), tmp_path / out, CONFIG,
                                 UserTrainingOptions(users_per_batch=3, progress=False), **kwargs)

    first, second = run("a"), run("b")  # same seed, with dropout: identical adapters
    for user in USERS:
        assert same_state(adapter_tensors(tmp_path / "a", user), adapter_tensors(tmp_path / "b", user))
    assert first["dev_losses"].tolist() == second["dev_losses"].tolist()

    # a user's marker is gone (killed before it was written): only that user retrains
    (user_dir(tmp_path / "b", "u2") / DONE_FILE).unlink()
    rerun = run("b")
    assert list(rerun["status"]) == ["skipped", "skipped", "trained", "skipped"]
    assert rerun["dev_losses"][0] == first["dev_losses"][0]  # skipped rows read back from done.json

    # the loop dies while publishing its second user: the first stays done, nothing of the second is published
    published = []

    def crash(user, model, folder):
        published.append(user)
        if len(published) == 2:
            raise RuntimeError("simulated crash")

    base = tiny_model(tokenizer, family)
    before = state(base)
    with pytest.raises(RuntimeError, match="simulated"):
        run("c", model=base, after_user=crash)
    assert same_state(before, state(base)) and has_no_hooks(base)
    assert all(p.requires_grad for p in base.parameters())
    done, crashed = published
    assert (user_dir(tmp_path / "c", done) / DONE_FILE).is_file() and not user_dir(tmp_path / "c", crashed).exists()
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".")] == []  # no staging left
    resumed = run("c", model=base)
    assert [s == "skipped" for s in resumed["status"]] == [u == done for u in USERS]
    assert all((user_dir(tmp_path / "c", u) / DONE_FILE).is_file() for u in USERS)
    assert same_state(adapter_tensors(tmp_path / "c", done), adapter_tensors(tmp_path / "a", done))


def test_bad_arguments(tokenizer, data, tmp_path):
    pairs, users = data
    with pytest.raises(TypeError, match="trains LoRA .*not 'full'"):  # its adapters would be labelled FULL
        run_users_batched(FULL, tiny_model(tokenizer), tokenizer, Cell(pairs, users, USERS, fmt_override="psp"),
                          tmp_path, CONFIG)
    with pytest.raises(ValueError, match="users_per_batch"):
        run_users_batched(LORA, tiny_model(tokenizer), tokenizer, Cell(pairs, users, USERS, fmt_override="psp"),
                          tmp_path, CONFIG, UserTrainingOptions(users_per_batch=0))
    with pytest.raises(ValueError, match="more than once.*u1"):
        run_users_batched(LORA, tiny_model(tokenizer), tokenizer,
                          Cell(pairs, users, ["u1", "u0", "u1"], fmt_override="psp"), tmp_path, CONFIG)
    with pytest.raises(ValueError, match="split set"):
        run_users_batched(LORA, tiny_model(tokenizer), tokenizer,
                          Cell(pd.concat([pairs, pairs.assign(split_set=1)]), users, USERS, fmt_override="psp"),
                          tmp_path, CONFIG, UserTrainingOptions(progress=False))
    with MultiLora(tiny_model(tokenizer), CONFIG) as multi:
        with pytest.raises(KeyError, match="no adapter"), multi.routed(["nobody"]):
            pass
        multi.add_user("u0", seed=0)
        batch = batch_of(tokenizer, data, ["u0"])
        with pytest.raises(ValueError, match="2 rows but 1 were routed"), multi.routed(["u0"]):
            multi.model(**batch)
    assert has_no_hooks(multi.model)


def test_a_user_without_dev_pairs_is_refused_not_trained_on_nothing(tokenizer, data, tmp_path):
    pairs, users = data
    without_dev = pairs[~((pairs["speaker_id"] == "u3") & (pairs["split"] == "dev"))]
    with pytest.raises(ValueError, match="'u3' has no dev pairs"):
        run_users_batched(LORA, tiny_model(tokenizer), tokenizer,
                          Cell(without_dev, users, ["u3"], fmt_override="psp"), tmp_path / "b", CONFIG)
