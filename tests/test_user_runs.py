"""Per-user runs through udg_lib.executors: Ray vs local, kill -9 and resume, canary isolation, determinism.

A tiny model (preset "test") and conftest's tokenizer, saved as the base folder that train_users loads. The
safety tests (determinism, kill -9 and resume, canary isolation, Ray equals local) run for both model families
(a tiny T5 and a tiny Llama-style causal LM); input checks and Ray's failure handling, which do not depend on
the model, for T5 only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import CANARY, sentences, seq2seq_only, tiny_model
from udg_lib.data.schema import PROFILE_FIELDS
from udg_lib.executors import RayTask, UserTrainingError, load_base_model, train_user_chunk, train_users
from udg_lib.finetuning import (
    ADAPTER_DIR,
    DONE_FILE,
    EXECUTORS,
    FinetuneConfig,
    UserTrainingOptions,
    load_user_adapter,
    user_dir,
)
from udg_lib.encoding import LABEL_PAD_ID
from udg_lib.conditions import Cell
from udg_lib.methods import FULL, LORA, ONE_ID, get

USERS = ["u0", "u1", "u2", "u3"]
CONFIG = FinetuneConfig(learning_rate=1e-2, batch_size=4, max_epochs=3, patience=1, max_source_length=32,
                        max_target_length=16)


@pytest.fixture(scope="module")
def base_dir(tokenizer, family, tmp_path_factory) -> Path:
    """A saved tiny base model of `family` with its tokenizer, as a domain-adaptation stage would leave it."""
    folder = tmp_path_factory.mktemp(f"base-{family}") / "model"
    tiny_model(tokenizer, family).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame]:
    """One split set's eval pairs: per user 6 train_ft, 3 dev, 2 test rows; and the users."""
    rows = []
    texts = iter(sentences(400, seed=1))
    for user in USERS:
        partner = USERS[(USERS.index(user) + 1) % len(USERS)]
        for split, n in (("train_ft", 6), ("dev", 3), ("test", 2)):
            for i in range(n):
                rows.append({"pair_id": f"{user}-{split}-{i}", "dialogue_id": f"d-{user}-{i}", "turn_index": 1,
                             "speaker_id": user, "partner_id": partner, "context": [next(texts), next(texts)],
                             "response": next(texts), "split": split, "split_set": 0})
    users = pd.DataFrame({"user_id": USERS, "one_id": ["aB3x", "Qz9k", "m0Np", "T7wq"],
                          **{f: ["20s", "female", "unknown", "student", "Kanto"][j] for j, f in
                             enumerate(PROFILE_FIELDS)}})
    return pd.DataFrame(rows), users


def adapter_tensors(out_dir: Path, user: str) -> dict[str, torch.Tensor]:
    return load_file(str(user_dir(out_dir, user) / ADAPTER_DIR / "adapter_model.safetensors"))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-equal: for the same computation run twice on this machine (same seed, a resumed run, a Ray task),
    which holds by construction; tensors from different computations go to `assert_close_to_scale`."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def done_record(out_dir: Path, user: str) -> dict:
    """A user's done.json without its timing field (wall seconds differ between runs)."""
    record = json.loads((user_dir(out_dir, user) / DONE_FILE).read_text())
    del record["summary"]["seconds"]
    return record


def leftovers(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir() if p.name.startswith("."))


def adapter_config(out_dir: Path, user: str) -> dict:
    """A user's adapter_config.json, target_modules sorted: peft keeps a list of targets (the causal family's)
    as a set and writes it in the process' hash order (see test_adapter_config_bytes_...)."""
    config = json.loads((user_dir(out_dir, user) / ADAPTER_DIR / "adapter_config.json").read_text())
    if isinstance(config["target_modules"], list):
        config["target_modules"] = sorted(config["target_modules"])
    return config


# --- input checks ----------------------------------------------------------------------------------------------


@seq2seq_only
def test_bad_input_gets_clear_errors(base_dir, data, tmp_path):
    pairs, users = data
    with pytest.raises(ValueError, match=r"executor must be one of \('local', 'ray'\), not 'dask'"):
        UserTrainingOptions(executor="dask")
    assert EXECUTORS == ("local", "ray")
    with pytest.raises(TypeError, match="per-user method .*not 'one_id'"):  # One-ID: one pooled model per cell
        train_users(ONE_ID, base_dir, Cell(pairs, users, ["u0"], fmt_override="psp"), tmp_path, CONFIG)
    with pytest.raises(TypeError, match="not 'lora'"):  # a method is an object now, not its name
        train_users("lora", base_dir, Cell(pairs, users, ["u0"], fmt_override="psp"), tmp_path, CONFIG)
    with pytest.raises(ValueError, match=r"lora_training must be one of \('per_user', 'batched'\), not 'mixed'"):
        UserTrainingOptions(lora_training="mixed")
    with pytest.raises(ValueError, match=r"not in users\['user_id'\]: \['nobody'\]"):
        train_users(LORA, base_dir, Cell(pairs, users, ["u0", "nobody"], fmt_override="psp"), tmp_path, CONFIG,
                    UserTrainingOptions(lora_training="per_user"))
    with pytest.raises(ValueError, match=r"more than once: \['u0'\]"):
        train_users(LORA, base_dir, Cell(pairs, users, ["u0", "u0"], fmt_override="psp"), tmp_path, CONFIG,
                    UserTrainingOptions(lora_training="per_user"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        train_users(LORA, tmp_path / "missing", Cell(pairs, users, ["u0"], fmt_override="psp"), tmp_path, CONFIG,
                    UserTrainingOptions(lora_training="per_user"))
    with pytest.raises(ValueError, match="users_per_task"):
        UserTrainingOptions(executor="ray", users_per_task=0)
    with pytest.raises(ValueError, match="users_per_batch"):
        UserTrainingOptions(users_per_batch=0)
    with pytest.raises(ValueError, match="resources per task"):
        UserTrainingOptions(executor="ray", num_gpus_per_task=-1)
    assert not any(tmp_path.iterdir())  # nothing trained or written by a rejected call


@seq2seq_only
def test_a_ray_task_trains_its_chunk_in_the_order_it_was_cut(base_dir, data, tmp_path):
    """A task's users keep the caller's order (batched LoRA cuts its batches in it, as the local executor does)."""
    pairs, users = data
    seen = []

    class Recorder:  # stands in for a per-user method: what train_on_base is handed
        name = "recorder"

        def train_on_base(self, model, tokenizer, cell, out_dir, config, options, after_user):
            seen.append((cell.user_ids, options.progress))
            return pd.DataFrame({"user_id": list(cell.user_ids), "status": "trained"})

    task = RayTask(Recorder(), str(base_dir), str(tmp_path), CONFIG, UserTrainingOptions(executor="ray"), "cpu", None)
    statuses = train_user_chunk(task, Cell(pairs, users, USERS, fmt_override="psp"), ["u3", "u1"])
    assert statuses == {"u3": "trained", "u1": "trained"} and seen == [(("u3", "u1"), False)]


# --- determinism ------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_adapters_and_another_seed_does_not(base_dir, data, tmp_path):
    pairs, users = data
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        table = train_users(LORA, base_dir, Cell(pairs, users, ["u0"], fmt_override="psp"), tmp_path / name,
                            replace(CONFIG, seed=seed), UserTrainingOptions(progress=False, lora_training="per_user"))
        assert table["status"].tolist() == ["trained"]
        runs[name] = adapter_tensors(tmp_path / name, "u0")
    assert same_tensors(runs["a"], runs["b"])
    assert done_record(tmp_path / "a", "u0") == done_record(tmp_path / "b", "u0")
    assert not same_tensors(runs["a"], runs["c"])  # the comparison can tell runs apart


# --- kill -9 and resume ------------------------------------------------------------------------------------------

RUNNER = textwrap.dedent('''
    """Train every user of the test data locally; sleep in after_user so the test can kill us mid-run."""
    import json, sys, time
    import pandas as pd
    import torch
    from udg_lib.conditions import Cell
    from udg_lib.executors import train_users
    from udg_lib.finetuning import FinetuneConfig, UserTrainingOptions
    from udg_lib.methods import LORA

    torch.set_num_threads(1)
    args = json.loads(open(sys.argv[1]).read())
    config = FinetuneConfig(**args["config"])
    pause = args["pause"]

    def slow_down(user, model, folder):  # runs before done.json: the staging folder exists meanwhile
        time.sleep(pause)

    cell = Cell(pd.read_pickle(args["pairs"]), pd.read_pickle(args["users"]), args["user_ids"], fmt_override="psp")
    table = train_users(LORA, args["base_dir"], cell, args["out_dir"], config,
                        UserTrainingOptions(lora_training="per_user", progress=False), device="cpu",
                        after_user=slow_down if pause else None)
    table.to_json(args["table"], orient="records")
''')


def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(base_dir, data, tmp_path):
    pairs, users = data
    pairs.to_pickle(tmp_path / "pairs.pkl")
    users.to_pickle(tmp_path / "users.pkl")
    (tmp_path / "runner.py").write_text(RUNNER)
    out_dir = tmp_path / "killed"
    config = CONFIG.as_dict()

    def start(pause: float, table: str) -> subprocess.Popen:
        args = {"base_dir": str(base_dir), "pairs": str(tmp_path / "pairs.pkl"), "users": str(tmp_path / "users.pkl"),
                "user_ids": USERS, "out_dir": str(out_dir), "config": config, "pause": pause,
                "table": str(tmp_path / table)}
        (tmp_path / f"{table}.args.json").write_text(json.dumps(args))
        return subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / f"{table}.args.json")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def done_users() -> list[str]:
        return [u for u in USERS if (user_dir(out_dir, u) / DONE_FILE).is_file()]

    # Each user sleeps 1 s before its marker, so once one user is done the others take >= 3 s more. Kill while
    # a later user's staging folder exists, so the restart also has a killed run's temp folder to clear.
    process = start(pause=1.0, table="first.json")
    deadline = time.monotonic() + 120
    while not (done_users() and out_dir.is_dir() and leftovers(out_dir)):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"runner ended or hung before the kill window: {process.communicate()[0][-2000:]}")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    finished = done_users()
    assert process.returncode == -signal.SIGKILL and 1 <= len(finished) < len(USERS)
    assert leftovers(out_dir)  # the killed user's temp folder is still there

    process = start(pause=0.0, table="second.json")
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-2000:]
    table = pd.read_json(tmp_path / "second.json", orient="records")
    assert table["user_id"].tolist() == USERS
    assert table["status"].tolist() == ["skipped" if u in finished else "trained" for u in USERS]
    assert leftovers(out_dir) == []

    reference = tmp_path / "uninterrupted"
    train_users(LORA, base_dir, Cell(pairs, users, USERS, fmt_override="psp"), reference, CONFIG,
                UserTrainingOptions(progress=False, lora_training="per_user"), device="cpu")
    for user in USERS:
        weights = "adapter_model.safetensors"
        assert ((user_dir(out_dir, user) / ADAPTER_DIR / weights).read_bytes()
                == (user_dir(reference, user) / ADAPTER_DIR / weights).read_bytes()), user
        assert adapter_config(out_dir, user) == adapter_config(reference, user)  # three processes wrote these
        assert done_record(out_dir, user) == done_record(reference, user)


SAVE_LORA_CONFIG = ("import sys; from udg_lib.families import get_family; "
                    "from udg_lib.finetuning import FinetuneConfig; "
                    "get_family(sys.argv[1]).lora_config(FinetuneConfig()).save_pretrained(sys.argv[2])")


@pytest.mark.parametrize("family_name", ["seq2seq", "causal"])
def test_adapter_config_bytes_do_not_depend_on_the_process_hash_seed(family_name, tmp_path):
    """A resumed run's adapter_config.json is byte-identical to an uninterrupted run's: peft would save a target
    list (the causal family's q/k/v/o_proj) in an order that PYTHONHASHSEED decides, so `families.suffix_regex`
    gives peft one regex string instead."""
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", SAVE_LORA_CONFIG, family_name, str(tmp_path / seed)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"})
    saved = [(tmp_path / seed / "adapter_config.json").read_bytes() for seed in ("1", "2")]
    assert saved[0] == saved[1]


# --- canary isolation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "full"])
def test_another_users_canary_never_reaches_a_users_batches(base_dir, data, tmp_path, method, family, monkeypatch):
    pairs, users = data
    pairs = pairs.copy()
    owner = "u1"
    planted = (pairs["speaker_id"] == owner) & pairs["split"].isin(["train_ft", "dev"])
    # First in the reply (cut on the right) and last in the newest context turn (prompts lose their oldest
    # tokens): truncation never drops it.
    pairs.loc[planted, "response"] = f"{CANARY} " + pairs.loc[planted, "response"]
    pairs["context"] = [[*c[:-1], f"{c[-1]} {CANARY}"] if plant else c for c, plant in zip(pairs["context"], planted)]
    # The test tokenizer spells most words by characters: room for the profile and the canary's turn.
    config = replace(CONFIG, max_source_length=128, max_target_length=48)
    base, tokenizer = load_base_model(base_dir, "cpu")
    canary_ids = tokenizer(CANARY, add_special_tokens=False)["input_ids"]

    seen: list[tuple[str, torch.Tensor]] = []  # (input_ids | labels, tensor) of every forward pass
    model_class = type(base)  # T5ForConditionalGeneration or LlamaForCausalLM; peft's wrappers call its forward
    real_forward = model_class.forward

    def recording_forward(self, *args, **kwargs):
        for key in ("input_ids", "labels"):
            if kwargs.get(key) is not None:
                seen.append((key, kwargs[key].detach().clone()))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(model_class, "forward", recording_forward)

    def batches_of(user: str) -> tuple[list[str], list[list[int]]]:
        seen.clear()
        train_users(get(method), base_dir, Cell(pairs, users, [user], fmt_override="psp"), tmp_path / user, config,
                    UserTrainingOptions(progress=False, lora_training="per_user"), device="cpu")
        texts, rows = [], []
        for key, ids in seen:
            ids = ids.clone()
            ids[ids == LABEL_PAD_ID] = tokenizer.pad_token_id
            rows.extend(ids.tolist())
            texts.extend(t.replace(" ", "") for t in tokenizer.batch_decode(ids, skip_special_tokens=True))
        return texts, rows

    def holds_canary_ids(row: list[int]) -> bool:
        n = len(canary_ids)
        return any(row[i:i + n] == canary_ids for i in range(len(row) - n + 1))

    texts, rows = batches_of("u0")
    # training (6 train_ft rows per epoch) and dev batches (3 dev rows) were both recorded
    assert len(rows) >= 2 * (6 + 3) and {key for key, _ in seen} == {"input_ids", "labels"}
    assert not any(CANARY in t for t in texts) and not any(holds_canary_ids(r) for r in rows)
    # control: the owner's own batches do carry it, in prompts and in replies, so the detector can fire
    texts, rows = batches_of(owner)
    inputs = [ids for key, ids in seen if key == "input_ids"]
    replies = [ids.tolist() for key, ids in seen if key == "labels"]
    if family == "seq2seq":
        prompts = [ids.tolist() for ids in inputs]
    else:  # a causal sequence is prompt + reply: the prompt is where the loss is masked (-100)
        labels = [ids for key, ids in seen if key == "labels"]
        assert len(labels) == len(inputs)
        prompts = [[row[mask].tolist() for row, mask in zip(ids, batch_labels == LABEL_PAD_ID)]
                   for ids, batch_labels in zip(inputs, labels)]
    assert any(CANARY in t for t in texts) and any(holds_canary_ids(r) for r in rows)
    assert any(holds_canary_ids(r) for batch in prompts for r in batch)
    assert any(holds_canary_ids(r) for batch in replies for r in batch)


# --- Ray ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU local Ray instance for this module, quiet and without dashboard; shut down afterwards."""
    import ray

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no usage report (and no network attempt)
        assert not ray.is_initialized()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()


def test_ray_tasks_give_the_local_executors_adapters(base_dir, data, tmp_path, local_ray):
    pairs, users = data
    local = train_users(LORA, base_dir, Cell(pairs, users, USERS[:2], fmt_override="ppp"), tmp_path / "local", CONFIG,
                        UserTrainingOptions(progress=False, lora_training="per_user"))
    remote = train_users(LORA, base_dir, Cell(pairs, users, USERS[:2], fmt_override="ppp"), tmp_path / "ray", CONFIG,
                         UserTrainingOptions(executor="ray", users_per_task=1, num_cpus_per_task=1, progress=False,
                                             lora_training="per_user"))
    assert local_ray.is_initialized()  # a Ray the caller started is left running
    assert remote["status"].tolist() == ["trained", "trained"] and remote["user_id"].tolist() == USERS[:2]
    assert remote.drop(columns=["dir", "seconds"]).equals(local.drop(columns=["dir", "seconds"]))
    base, _ = load_base_model(base_dir, "cpu")
    for user in USERS[:2]:
        assert same_tensors(adapter_tensors(tmp_path / "local", user), adapter_tensors(tmp_path / "ray", user))
        assert done_record(tmp_path / "local", user) == done_record(tmp_path / "ray", user)
        model = load_user_adapter(base, user_dir(tmp_path / "ray", user) / ADAPTER_DIR)  # PEFT's loader
        assert any("lora_" in name for name, _ in model.named_parameters())
        base = model.unload()
    # a rerun through Ray trains nothing
    again = train_users(LORA, base_dir, Cell(pairs, users, USERS[:2], fmt_override="ppp"), tmp_path / "ray", CONFIG,
                        UserTrainingOptions(executor="ray", progress=False, lora_training="per_user"))
    assert again["status"].tolist() == ["skipped", "skipped"]
    assert leftovers(tmp_path / "ray") == []



def test_batched_lora_in_ray_tasks_equals_batched_lora_here(base_dir, data, tmp_path, local_ray):
    """`lora_training="batched"` on Ray: each task trains its users with `multilora.run_users_batched`, on a base
    held in the precision's frozen dtype (bf16 here), as this process does; one task of three users, two per step
    (a rolling queue), gives the adapters of the same call here."""
    pairs, users = data
    config = replace(CONFIG, precision="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 emulated on a CPU without AVX512-BF16: slow, not wrong
        local = train_users(LORA, base_dir, Cell(pairs, users, USERS[:3], fmt_override="ppp"), tmp_path / "local",
                            config, UserTrainingOptions(lora_training="batched", users_per_batch=2, progress=False))
        remote = train_users(LORA, base_dir, Cell(pairs, users, USERS[:3], fmt_override="ppp"), tmp_path / "ray",
                             config, UserTrainingOptions(executor="ray", users_per_task=3, num_cpus_per_task=1,
                                                 lora_training="batched", users_per_batch=2, progress=False))
    fp32 = train_users(LORA, base_dir, Cell(pairs, users, USERS[:3], fmt_override="ppp"), tmp_path / "fp32", CONFIG,
                       UserTrainingOptions(lora_training="batched", users_per_batch=2, progress=False))
    assert remote["status"].tolist() == ["trained"] * 3
    assert remote.drop(columns=["dir", "seconds"]).equals(local.drop(columns=["dir", "seconds"]))
    for user in USERS[:3]:
        assert same_tensors(adapter_tensors(tmp_path / "local", user), adapter_tensors(tmp_path / "ray", user))
        record = done_record(tmp_path / "ray", user)
        assert record == done_record(tmp_path / "local", user)
        assert record["users_per_batch"] == 2 and record["config"]["precision"] == "bf16"  # the batched path ran
    # the frozen base's dtype reaches the adapters: an fp32 base trains another adapter
    assert not same_tensors(adapter_tensors(tmp_path / "fp32", "u0"), adapter_tensors(tmp_path / "ray", "u0"))
    assert fp32["status"].tolist() == ["trained"] * 3
    with pytest.raises(ValueError, match="lora_training must be one of .* not 'mixed'"):
        UserTrainingOptions(executor="ray", lora_training="mixed")

@seq2seq_only
def test_failed_ray_task_names_its_users_and_keeps_finished_ones(base_dir, data, tmp_path, local_ray):
    pairs, users = data

    def fail_on_u1(user, model, folder):  # a closure: cloudpickle ships it to the workers by value
        if user == "u1":
            raise RuntimeError("planted failure")

    with pytest.raises(UserTrainingError,
                       match=r"^1 of 2 Ray tasks failed \(users: u0, u1\).*\['u1'\].*RuntimeError: planted failure$") \
            as caught:
        train_users(FULL, base_dir, Cell(pairs, users, USERS[:3], fmt_override="psp"), tmp_path, CONFIG,
                    UserTrainingOptions(executor="ray", users_per_task=2, progress=False, lora_training="per_user"),
                    after_user=fail_on_u1)
    assert caught.value.failed_users == ["u1"]
    # u0 (before the failure, same task) and u2 (the other task) stay done; nothing of u1 is left
    assert all((user_dir(tmp_path, u) / DONE_FILE).is_file() for u in ("u0", "u2"))
    assert not user_dir(tmp_path, "u1").exists() and leftovers(tmp_path) == []
    resumed = train_users(FULL, base_dir, Cell(pairs, users, USERS[:3], fmt_override="psp"), tmp_path, CONFIG,
                          UserTrainingOptions(executor="ray", users_per_task=2, progress=False,
                                              lora_training="per_user"))
    assert resumed["status"].tolist() == ["skipped", "trained", "skipped"]


@seq2seq_only
def test_a_request_the_local_ray_cannot_meet_fails_instead_of_waiting(base_dir, data, tmp_path, local_ray):
    pairs, users = data
    with pytest.raises(ValueError, match="asks for 0.25 GPUs but the local Ray instance has 0"):
        train_users(LORA, base_dir, Cell(pairs, users, ["u0"], fmt_override="psp"), tmp_path, CONFIG,
                    UserTrainingOptions(executor="ray", num_gpus_per_task=0.25, progress=False,
                                        lora_training="per_user"))
    with pytest.raises(ValueError, match="asks for 3 CPUs but the local Ray instance has 2"):
        train_users(LORA, base_dir, Cell(pairs, users, ["u0"], fmt_override="psp"), tmp_path, CONFIG,
                    UserTrainingOptions(executor="ray", num_cpus_per_task=3, progress=False, lora_training="per_user"))
