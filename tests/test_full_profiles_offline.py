"""The full profiles' offline path: stages 00-05 of full-en and full-ja on stand-in hub checkpoints, no network.

A temporary Hugging Face cache laid out as the hub's (`models--org--name/snapshots/<commit>/` and `refs/main`)
holds stand-ins under the hub ids the profiles name: T5 checkpoints built with `t5-base`'s configuration
(`udg_lib.families.t5_config("t5-base", ...)`, random weights) and SentencePiece T5 tokenizers in the hub
repositories' own file layouts, and two small sentence-transformers embedders. The runner then executes the
notebooks in a subprocess with `HF_HUB_OFFLINE=1`, on each full profile's yaml values with only the sizes
overridden (steps, users, pairs, epochs, reply lengths; see SIZES), so a typo in a full-profile yaml fails here.
The corpora are small generated ones in full-en's and full-ja's formats: full-en's own (Chit-Chat, Seinfeld,
TBBT: the notebook's defaults) take minutes in stage 01 alone, and the `test` profile's pipeline test runs them.

The end-to-end run shrinks t5-base's width and depth: at full size (223 M parameters) one training step takes
10-20 s on a 2-core CPU, and stages 02-03 train dozens of models. The full-size architecture is loaded through
stage 02's own call and trained a step in `test_the_t5_base_stand_in_loads_and_trains_a_step_offline`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import sentencepiece as spm
import torch
import yaml
from transformers import AutoTokenizer, T5ForConditionalGeneration

from conftest import JA_WORDS, japanese_sentences, sentences
from udg_lib.param_profiles import layered_file
from udg_lib.paths import repo_root
from udg_lib.families import t5_config

pytestmark = pytest.mark.pipeline

STAGES = ("00_prepare_corpus", "01_infer_profiles", "02_pretrain_models", "03_finetune_users",
          "04_exp1_next_utterance", "05_exp2_diversity")  # 06 runs hub LLMs: not stood in here
SHRUNK_T5 = dict(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2)  # see docstring
T5_BASE_VOCAB_ROWS, T5_BASE_PARAMETERS = 32128, 222_903_552  # google-t5/t5-base's embedding rows and size
SPARE_ROWS = 28  # hub T5s carry spare embedding rows (32128 for 32100 pieces): the markers fit in them
# Sizes only: every other value comes from params/<profile>/. Stage 01's LLM is a hub model this test does
# not stand in for (stage 01 is not under test); one split set of the three bounds the per-user stages.
SIZES = {
    # the generated users speak 56 turns each: the eligibility floor comes down with the corpus
    "00_prepare_corpus": {"max_users": 2, "max_pairs_per_split": 6, "min_turns": 20},
    "01_infer_profiles": {"unit_size": 20, "max_users": 4, "llm": ""},  # 150 posts a unit: more than a user has
    "02_pretrain_models": {"dialogue_steps": 2, "batch_size": 8, "eval_every": 2, "max_train_pairs": 48,
                           "max_heldout_pairs": 8, "conditioning_samples": 3},
    "03_finetune_users": {"split_sets": [0], "max_users": 2, "max_epochs": 1, "da_max_epochs": 1,
                          "users_per_batch": 2, "max_questions": 2, "max_new_tokens": 4},
    "04_exp1_next_utterance": {"max_new_tokens": 4, "response_time_users": 1},
    "05_exp2_diversity": {"max_new_tokens": 4},
}


def profile_value(profile: str, stage: str, key: str):
    """One value of a project profile as a run resolves it (the profiles it extends and its model layer)."""
    return layered_file(repo_root() / "params" / profile, f"{stage}.yaml")[0][key]


def hub_snapshot(cache: Path, repo_id: str) -> Path:
    """An empty snapshot folder for `repo_id` in a hub-layout cache, with `refs/main` naming its commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # 40 hex digits, as a git commit
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def train_t5_sentencepiece(texts: list[str], folder: Path, vocab_size: int) -> Path:
    """spiece.model as the hub T5s have it: unigram, pad 0 / eos 1 / unk 2, no bos, no byte fallback."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(t.split()) for t in texts if t.strip()), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=0.9999, pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, hard_vocab_limit=False, minloglevel=2, num_threads=1,
                                   input_sentence_size=200_000, shuffle_input_sentence=True)
    corpus.unlink()
    (folder / "spiece.vocab").unlink()
    return folder / "spiece.model"


def stand_in_t5(snapshot: Path, spiece: Path, layout: tuple[str, ...], vocab_rows: int | None = None, **sizes) -> int:
    """A T5 with t5-base's configuration (shrunk by `sizes`) and random weights, and its tokenizer, in `snapshot`
    with the hub repository's tokenizer files (`layout`); the embeddings have `vocab_rows` rows (default: the
    tokenizer's pieces and SPARE_ROWS). Returns the model's parameter count."""
    shutil.copy(spiece, snapshot / "spiece.model")
    staging = snapshot.parent.parent / "tokenizer-staging"
    staging.mkdir()
    shutil.copy(spiece, staging / "spiece.model")
    t5_config("t5-base", 1, **sizes).save_pretrained(staging)
    tokenizer = AutoTokenizer.from_pretrained(staging)  # T5Tokenizer from spiece.model, 100 sentinels
    tokenizer.save_pretrained(staging)
    for name in layout:  # only the files the hub repository has
        shutil.copy(staging / name, snapshot / name)
    shutil.rmtree(staging)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config("t5-base", vocab_rows or len(tokenizer) + SPARE_ROWS, **sizes))
    model.save_pretrained(snapshot)
    return sum(p.numel() for p in model.parameters())


def stand_in_causal_lm(snapshot: Path, texts: list[str], vocab_size: int = 1200) -> int:
    """A Llama-style causal LM (`families.llama_config("test")`, random weights) with a byte-level BPE tokenizer
    in SmolLM2's layout (tokenizer.json + tokenizer_config.json; <|im_start|> / <|im_end|> / <|endoftext|>) in
    `snapshot`. Returns the model's parameter count."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from udg_lib.families import llama_config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.save_pretrained(snapshot)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("test", len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(snapshot)
    return sum(p.numel() for p in model.parameters())


def stand_in_embedder(snapshot: Path, spiece: Path) -> None:
    """A small sentence-transformers model (BERT, mean pooling) with a SentencePiece tokenizer in `snapshot`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, T5Config

    folder = snapshot.parent.parent / "embedder-staging"
    folder.mkdir()
    shutil.copy(spiece, folder / "spiece.model")
    T5Config(vocab_size=1).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    (folder / "config.json").unlink()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(folder)
    word = Transformer(str(folder), max_seq_length=128)
    SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "mean")]).save(str(snapshot))
    shutil.rmtree(folder)


def english_corpus(folder: Path, n_users: int = 8) -> dict:
    """A generic-format corpus spec (turns JSONL, users CSV with profiles for stage 01 to fit its rules on):
    every pair of users talks twice, eight turns a dialogue."""
    rows, number = [], 0
    for a in range(n_users):
        for b in range(a + 1, n_users):
            for _ in range(2):
                number += 1
                rows += [{"dialogue_id": f"d{number:03d}", "turn_index": turn, "speaker_id": f"user{(a, b)[turn % 2]}",
                          "text": text} for turn, text in enumerate(sentences(8, seed=number))]
    (folder / "turns.jsonl").write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    users = pd.DataFrame({"user_id": [f"user{i}" for i in range(n_users)],
                          "age_band": ["20s", "30s"] * (n_users // 2), "gender": ["female", "male"] * (n_users // 2),
                          "occupation": ["college_student"] * n_users})
    users.to_csv(folder / "users.csv", index=False)
    return {"format": "generic", "turns": str(folder / "turns.jsonl"), "users": str(folder / "users.csv"),
            "name": "chat"}


def japanese_workbook(path: Path, n_personas: int = 8, seed: int = 0) -> Path:
    """A JPersonaChat-layout workbook: every pair of personas talks twice, eight turns a dialogue."""
    rng = random.Random(seed)
    jobs = ["学生", "会社員", "教師", "主婦", "医者", "料理人", "作家", "公務員"]
    personas = [[f"私は{jobs[i]}です。", f"{rng.choice(JA_WORDS)}が好きです。"] for i in range(n_personas)]
    dialogues, table, number = [], [], 0
    for a in range(n_personas):
        for b in range(a + 1, n_personas):
            table.append({"ペルソナID": f"P{a}-{b}", "A": "\n".join(personas[a]), "B": "\n".join(personas[b])})
            for _ in range(2):
                number += 1
                for turn, text in enumerate(japanese_sentences(8, seed=number)):
                    dialogues.append({"No": number, "ペルソナID": f"P{a}-{b}", "話者": "AB"[turn % 2], "発話": text})
    with pd.ExcelWriter(path, engine="openpyxl") as writer:
        pd.DataFrame(dialogues).to_excel(writer, sheet_name="対話", index=False)
        pd.DataFrame(table).to_excel(writer, sheet_name="ペルソナリスト", index=False)
    return path


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> dict:
    """The stand-ins, under the hub ids the full profiles name, in a cache laid out as the hub's."""
    root = tmp_path_factory.mktemp("hf_home")
    cache, work = root / "hub", root / "work"
    english = [*sentences(2000), " ".join(string.printable.split())]  # hub T5s spell digits and punctuation too
    japanese = [*japanese_sentences(2000), *(" ".join(string.printable.split()) for _ in range(5))]
    en_spiece = train_t5_sentencepiece(english, work / "en", vocab_size=300)
    ja_spiece = train_t5_sentencepiece(japanese, work / "ja", vocab_size=500)
    params = {
        # google-t5/t5-base: spiece.model and tokenizer.json, no tokenizer_config.json
        "google-t5/t5-base": stand_in_t5(hub_snapshot(cache, "google-t5/t5-base"), en_spiece,
                                         ("tokenizer.json",), **SHRUNK_T5),
        # sonoisa/t5-base-japanese: spiece.model, tokenizer_config.json and special_tokens_map.json
        "sonoisa/t5-base-japanese": stand_in_t5(hub_snapshot(cache, "sonoisa/t5-base-japanese"), ja_spiece,
                                                ("tokenizer_config.json",), **SHRUNK_T5),
    }
    causal = profile_value("full-en-causal", "02_pretrain_models", "checkpoint")
    params[causal] = stand_in_causal_lm(hub_snapshot(cache, causal), english)
    stand_in_embedder(hub_snapshot(cache, "sentence-transformers/all-mpnet-base-v2"), en_spiece)
    stand_in_embedder(hub_snapshot(cache, "sonoisa/sentence-luke-japanese-base-lite"), ja_spiece)
    corpora = {"full-en": [english_corpus(work)],
               "full-ja": [{"format": "japanese_xlsx", "path": str(japanese_workbook(work / "jpc.xlsx")), "name": "pcjp"}]}
    env = {**os.environ, "HF_HOME": str(root), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(repo_root()), "OMP_NUM_THREADS": "1"}
    return {"root": root, "cache": cache, "env": env, "params": params, "corpora": corpora, "en_spiece": en_spiece}


def profile_params(profile: str, folder: Path, **replace) -> Path:
    """params/<profile>/ with SIZES laid over it, for stages 00-05, in `folder`."""
    folder.mkdir(parents=True)
    for stage in STAGES:
        values, _ = layered_file(repo_root() / "params" / profile, f"{stage}.yaml")  # with the profiles it extends
        values.update(SIZES[stage])
        values.update(replace.get(stage, {}))
        (folder / f"{stage}.yaml").write_text(yaml.safe_dump(values, allow_unicode=True))
    return folder


def run_profile(profile: str, hub_cache: dict, tmp: Path, **replace) -> subprocess.CompletedProcess:
    notebooks = tmp / "notebooks"
    notebooks.mkdir()
    for stage in STAGES:
        shutil.copy(repo_root() / "notebooks" / f"{stage}.ipynb", notebooks)
    command = [sys.executable, "-m", "udg_lib.pipeline", "--profile", profile, "--params-dir",
               str(profile_params(profile, tmp / "params", **replace)), "--outputs-root", str(tmp / "outputs"),
               "--notebooks-dir", str(notebooks)]
    return subprocess.run(command, env=hub_cache["env"], capture_output=True, text=True, timeout=900)


def stage_metrics(outputs: Path, stage: str) -> dict:
    return json.loads((outputs / stage / "metrics.json").read_text())


def profile_corpora(profile: str, hub_cache: dict) -> list[dict]:
    if profile == "full-en-causal":
        return profile_corpora("full-en", hub_cache)
    """The corpora a test run of `profile` prepares: full-ja's own specs with the path of our workbook (its
    yaml names a file the user supplies); for full-en, whose corpora are the notebook's open defaults, a
    generated corpus in the generic format."""
    from udg_lib.stage_params import load_stage

    notebook = repo_root() / "notebooks" / "00_prepare_corpus.ipynb"
    specs = load_stage(notebook, repo_root() / "params" / profile, profile).params["corpora"]
    if profile == "full-en":
        assert [spec["format"] for spec in specs] == ["chitchat", "seinfeld", "tbbt"]
        return hub_cache["corpora"][profile]
    [ours] = hub_cache["corpora"][profile]
    return [{**spec, "path": ours["path"]} for spec in specs]


@pytest.mark.parametrize(("profile", "checkpoint", "language", "embedder", "dataset"), [
    ("full-en", "google-t5/t5-base", "en", "sentence-transformers/all-mpnet-base-v2", "chat"),
    ("full-ja", "sonoisa/t5-base-japanese", "ja", "sonoisa/sentence-luke-japanese-base-lite", "pcjp"),
])
def test_a_full_profile_runs_stages_00_to_05_offline_on_stand_in_checkpoints(
    hub_cache, tmp_path, profile, checkpoint, language, embedder, dataset
):
    corpora = profile_corpora(profile, hub_cache)
    result = run_profile(profile, hub_cache, tmp_path, **{"00_prepare_corpus": {"corpora": corpora}})
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = tmp_path / "outputs"
    prepared = stage_metrics(outputs, "00_prepare_corpus")["metrics"]
    assert prepared["tokenizer"]["source"] == checkpoint and set(prepared["tokenizer"]["fit"]) == {dataset}
    pretrained = stage_metrics(outputs, "02_pretrain_models")
    assert pretrained["metrics"]["precision"]["requested"] == "auto" and pretrained["stage"]["params"]["max_source_length"] == 256
    assert pretrained["metrics"]["models"]["plain_t5"]["checkpoint"] == checkpoint
    assert pretrained["metrics"]["models"]["plain_t5"]["n_parameters"] == hub_cache["params"][checkpoint]
    trained = stage_metrics(outputs, "03_finetune_users")["metrics"]
    assert trained["pretrained"] == ["plain_t5", "plain_dialogue", "psp", "ppp"]  # the full profiles' four
    assert 1 <= trained["users_per_dataset"][dataset] <= 2  # max_users 2
    exp1 = stage_metrics(outputs, "04_exp1_next_utterance")["metrics"]
    assert exp1["embedders"] == {language: embedder} and exp1["n_scored"] > 0
    scores = pd.read_parquet(outputs / "04_exp1_next_utterance" / "scores.parquet")
    assert scores["similarity"].between(-1.0001, 1.0001).all() and scores["rouge_l"].between(0, 100).all()
    replies = pd.read_parquet(outputs / "05_exp2_diversity" / "replies.parquet")
    assert set(replies["dataset"]) == {dataset} and len(replies) == stage_metrics(
        outputs, "05_exp2_diversity")["metrics"]["n_replies"] > 0


def test_the_causal_track_runs_stages_00_to_05_offline_on_a_stand_in_lm(hub_cache, tmp_path):
    base = profile_value("full-en-causal", "02_pretrain_models", "checkpoint")
    result = run_profile("full-en-causal", hub_cache, tmp_path,
                         **{"00_prepare_corpus": {"corpora": profile_corpora("full-en-causal", hub_cache)}})
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = tmp_path / "outputs"
    assert stage_metrics(outputs, "00_prepare_corpus")["metrics"]["tokenizer"]["source"] == base
    pretrained = stage_metrics(outputs, "02_pretrain_models")["metrics"]
    assert pretrained["model_family"] == "causal" and pretrained["models"]["plain_t5"]["checkpoint"] == base
    condition = next((outputs / "03_finetune_users").glob("*/set0/psp"))
    assert json.loads((condition / "da" / "done.json").read_text())["family"] == "causal"
    adapter = next((condition / "lora").glob("*/adapter"))
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    scores = pd.read_parquet(outputs / "04_exp1_next_utterance" / "scores.parquet")
    assert {"lora", "full", "one_id", "da"} <= set(scores["method"]) and scores["similarity"].notna().all()
    assert stage_metrics(outputs, "05_exp2_diversity")["metrics"]["n_replies"] > 0


def failure_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("udg pipeline:")]
    return line


def test_a_japanese_checkpoint_with_english_corpora_fails_in_stage_00(hub_cache, tmp_path):
    """full-en with full-ja's tokenizer: stage 00 refuses it, naming tokenizer, corpus and figure."""
    replace = {"00_prepare_corpus": {"tokenizer_name_or_path": "sonoisa/t5-base-japanese",
                                     "corpora": hub_cache["corpora"]["full-en"]}}
    line = failure_line(run_profile("full-en", hub_cache, tmp_path, **replace))
    # its vocabulary holds the Latin letters one by one, as a Japanese one trained on web text does
    assert re.search(r"stage 00_prepare_corpus failed in cell \d+: TokenizerLanguageError: tokenizer "
                     r"'sonoisa/t5-base-japanese' on corpus 'chat' \(language 'en'\): [01]\.\d\d characters per "
                     r"token \(at least 2.0 expected for 'en'\)", line), line
    assert not (tmp_path / "outputs" / "00_prepare_corpus").exists()


def test_an_english_embedder_for_a_japanese_corpus_fails_before_stage_01(hub_cache, tmp_path):
    """The runner checks the later stages' models as soon as stage 00 has prepared the corpora."""
    replace = {"00_prepare_corpus": {"corpora": profile_corpora("full-ja", hub_cache)},
               "04_exp1_next_utterance": {"embedder_ja": "sentence-transformers/all-mpnet-base-v2"}}
    line = failure_line(run_profile("full-ja", hub_cache, tmp_path, **replace))
    assert line.startswith(f"udg pipeline: {tmp_path / 'params' / '04_exp1_next_utterance.yaml'}: embedder_ja: "
                           f"tokenizer 'sentence-transformers/all-mpnet-base-v2' on corpus 'pcjp' (language 'ja'):")
    assert (tmp_path / "outputs" / "00_prepare_corpus").is_dir()
    assert not (tmp_path / "outputs" / "01_infer_profiles").exists()


def _cpu_bf16() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX); without it autocast emulates bf16 many times slower."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_the_t5_base_stand_in_loads_and_trains_a_step_offline(hub_cache, tmp_path, bf16):
    """t5-base at full size (223 M parameters) in the hub layout, loaded by stage 02's call from full-en's
    checkpoint id with the cache offline, then one training step (in bf16 autocast where the CPU has it)."""
    if bf16 and not _cpu_bf16():
        pytest.skip(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 "
                    "(AVX512-BF16 or AMX); full-en's bf16 runs on the GPU node")
    checkpoint = profile_value("full-en", "02_pretrain_models", "checkpoint")
    cache = tmp_path / "hub"
    n_parameters = stand_in_t5(hub_snapshot(cache, checkpoint), hub_cache["en_spiece"], ("tokenizer.json",),
                               vocab_rows=T5_BASE_VOCAB_ROWS)
    assert n_parameters == T5_BASE_PARAMETERS
    script = f"""
import torch
from udg_lib import families, pretraining as pt
from udg_lib.tokenizer import load_tokenizer
torch.set_num_threads(1)
tokenizer, added = load_tokenizer({checkpoint!r})
model = families.build_base_model("seq2seq", {checkpoint!r}, "", tokenizer)  # stage 02's own call
assert pt.count_parameters(model) == {T5_BASE_PARAMETERS}, pt.count_parameters(model)
batch = tokenizer(["[USER] 20s [SEP] hello there"], return_tensors="pt")
labels = tokenizer(["hi"], return_tensors="pt")["input_ids"]
with torch.autocast("cpu", dtype=torch.bfloat16, enabled={bf16}):
    loss = model(**batch, labels=labels).loss
loss.backward()
torch.optim.AdamW(model.parameters(), lr=1e-4).step()
rows = model.get_input_embeddings().weight.shape[0]
print("loss", float(loss), "markers added", added, "rows", rows, "tokens", len(tokenizer))
"""
    env = {**hub_cache["env"], "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path)}
    try:
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(cache)  # 0.9 GB of weights
    assert result.returncode == 0, result.stderr[-3000:]
    # the markers are new ids that fit in the checkpoint's spare rows (no resize), as on the hub's t5-base
    assert f"markers added True rows {T5_BASE_VOCAB_ROWS} " in result.stdout, result.stdout
