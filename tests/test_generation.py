"""Unit tests for udg_lib.generation: mixed-adapter batches equal one-by-one decoding, routed adapters equal
peft's mixed batches, reference NLL, the FULL-model prediction hook.

The adapter tests (mixed batches equal one-by-one, routed equals peft token for token, refusals) run for both
model families."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import assert_close_to_scale, sentences, seq2seq_only
from conftest import tiny_model as build_tiny_model
from udg_lib.data.schema import PROFILE_FIELDS
from udg_lib.families import Decoding, get_family
from udg_lib.finetuning import FinetuneConfig
from udg_lib.generation import (
    BASE_ADAPTER,
    EXP2_FILE,
    PREDICTIONS_FILE,
    UserPredictor,
    RoutedAdapters,
    greedy_generate,
    load_routed_adapters,
    load_user_adapters,
    question_pairs,
    reference_nll,
)
from udg_lib.pretraining import reply_perplexity
from udg_lib.prompts import build_prompts
from udg_lib.tokenizer import SentencePieceSettings, train_sentencepiece_tokenizer





@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_sentencepiece_tokenizer(sentences(60), tmp_path_factory.mktemp("tok") / "tokenizer",
                                         SentencePieceSettings(vocab_size=300, extra_ids=10, num_threads=1))


def tiny_model(tokenizer, family: str = "seq2seq"):
    return build_tiny_model(tokenizer, family).eval()


@pytest.fixture(scope="module")
def adapters(tokenizer, family, tmp_path_factory):
    """Three users' adapters of `family`'s model with random (non-zero) B matrices, so each adapter changes
    the outputs."""
    folder = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for k in range(3):
        model = tiny_model(tokenizer, family)
        torch.manual_seed(100 + k)
        peft_model = get_peft_model(model, get_family(family).lora_config(FinetuneConfig(lora_dropout=0.0)))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.5)
        peft_model.save_pretrained(str(folder / f"u{k}"))
        dirs[f"u{k}"] = folder / f"u{k}"
    return dirs


def test_mixed_adapter_batches_equal_one_by_one(tokenizer, family, adapters):
    sources = sentences(12, seed=3)
    names = [f"u{i % 3}" for i in range(len(sources))]
    names[5] = BASE_ADAPTER
    mixed_model = load_user_adapters(tiny_model(tokenizer, family), adapters)
    mixed = greedy_generate(mixed_model, tokenizer, sources, Decoding(max_new_tokens=12, batch_size=5),
                            adapter_names=names)
    mixed_nll, mixed_n, *_ = reference_nll(mixed_model, tokenizer, sources, sentences(12, seed=4),
                                           Decoding(batch_size=5),
                                       adapter_names=names)
    one_by_one, nll_one = [], []
    for source, reference, name in zip(sources, sentences(12, seed=4), names):
        model = tiny_model(tokenizer, family)
        if name != BASE_ADAPTER:
            model = load_user_adapters(model, {name: adapters[name]})
        one_by_one += greedy_generate(model, tokenizer, [source], Decoding(max_new_tokens=12))
        nll_one.append(reference_nll(model, tokenizer, [source], [reference])[0][0])
    assert mixed == one_by_one  # greedy picks agree unless two logits tie within rounding (none do here)
    # batches of 5 vs 1 (other padding, other kernels): float32 rounding of sums over the hidden size
    assert_close_to_scale(mixed_nll, nll_one, dtype=torch.float32, reduction_size=mixed_model.config.hidden_size)
    # the adapters matter: not every user gets the base model's reply
    base = greedy_generate(tiny_model(tokenizer, family), tokenizer, sources, Decoding(max_new_tokens=12))
    assert mixed[5] == base[5] and mixed != base
    assert mixed_n.sum() > len(sources)


# The modules each family's LoRA adapters sit on (`ModelFamily.lora_targets`).
LORA_TARGET = {"seq2seq": lambda name: name.endswith(("q", "k", "v", "o")) and ".SelfAttention." in name,
               "causal": lambda name: name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))}


def test_routed_adapters_equal_peft_mixed_batches_token_for_token(tokenizer, family, adapters):
    sources, references = sentences(16, seed=11), sentences(16, seed=12)
    names = [f"u{(i * 7) % 3}" for i in range(len(sources))]  # users interleaved: every batch mixes them
    names[2] = names[9] = BASE_ADAPTER
    peft_model = load_user_adapters(tiny_model(tokenizer, family), adapters)
    expected = greedy_generate(peft_model, tokenizer, sources, Decoding(max_new_tokens=12, batch_size=6),
                               adapter_names=names)
    expected_scores = reference_nll(peft_model, tokenizer, sources, references, Decoding(batch_size=6),
                                    adapter_names=names)
    base_model = tiny_model(tokenizer, family)
    base = greedy_generate(base_model, tokenizer, sources, Decoding(max_new_tokens=12))
    with load_routed_adapters(base_model, adapters) as routed:
        assert routed.targets == [n for n, _ in base_model.named_modules() if LORA_TARGET[family](n)]
        replies = greedy_generate(routed, tokenizer, sources, Decoding(max_new_tokens=12, batch_size=6),
                                  adapter_names=names)
        scores = reference_nll(routed, tokenizer, sources, references, Decoding(batch_size=6), adapter_names=names)
        assert greedy_generate(routed, tokenizer, sources, Decoding(max_new_tokens=12)) == base  # no names: the base
    assert replies == expected
    # routed and peft add the LoRA term by different matmuls: float32 rounding of sums over the hidden size
    for column in ("nll", "text_nll"):
        assert_close_to_scale(getattr(scores, column), getattr(expected_scores, column), dtype=torch.float32,
                              reduction_size=base_model.config.hidden_size)
    assert scores.n_tokens.tolist() == expected_scores.n_tokens.tolist()
    # the adapters matter, and a base row gets exactly the base model's reply
    assert replies[2] == base[2] and replies[9] == base[9]
    assert sum(r != b for r, b in zip(replies, base)) >= len(sources) // 2
    # closed: the hooks are gone and the base model is what it was
    assert greedy_generate(base_model, tokenizer, sources, Decoding(max_new_tokens=12)) == base


@seq2seq_only  # right-padded prompts: a causal batch would need left padding to match one-by-one beams
def test_routed_adapters_follow_beams_to_their_row(tokenizer, adapters):
    sources, names = sentences(4, seed=13), ["u1", BASE_ADAPTER, "u0", "u2"]
    padded = tokenizer(sources, return_tensors="pt", padding=True)
    options = dict(do_sample=False, num_beams=3, max_new_tokens=10)
    one_by_one = []
    for i, name in enumerate(names):
        model = tiny_model(tokenizer)
        if name != BASE_ADAPTER:
            model = load_user_adapters(model, {name: adapters[name]})
        one_by_one.append(model.generate(input_ids=padded["input_ids"][i:i + 1][:, : padded["attention_mask"][i].sum()],
                                         **options)[0])
    with RoutedAdapters(tiny_model(tokenizer), adapters) as routed, torch.no_grad(), routed.route(names):
        together = routed.model.generate(**padded, **options)  # beams expand each row 3x
    assert tokenizer.batch_decode(together, skip_special_tokens=True) == \
        tokenizer.batch_decode(one_by_one, skip_special_tokens=True)


def test_routed_adapters_on_a_causal_lm_with_different_ranks_and_targets(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    adapter_configs = {"a": LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                       "b": LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, use_rslora=True,
                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])}
    dirs = {}
    for k, (name, lora) in enumerate(adapter_configs.items()):
        torch.manual_seed(0)
        peft_model = get_peft_model(LlamaForCausalLM(config), lora)
        torch.manual_seed(k + 1)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        peft_model.save_pretrained(str(tmp_path / name))
        dirs[name] = tmp_path / name
    torch.manual_seed(0)
    base_model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(3, 64, (5, 9), generator=torch.Generator().manual_seed(1))
    names = ["a", "b", BASE_ADAPTER, "b", "b"]
    with torch.no_grad():
        base_logits = base_model(input_ids=input_ids).logits
        with load_routed_adapters(base_model, dirs) as routed, routed.route(names):
            routed_logits = base_model(input_ids=input_ids).logits
            routed_tokens = base_model.generate(input_ids=input_ids, do_sample=False, max_new_tokens=6)
        peft_model = load_user_adapters(copy.deepcopy(base_model), dirs)
        peft_logits = peft_model(input_ids=input_ids, adapter_names=names).logits
        peft_tokens = peft_model.generate(input_ids=input_ids, do_sample=False, max_new_tokens=6, adapter_names=names)
    assert len(routed.targets) == 2 * 4 and routed.scaling.tolist() == pytest.approx([0.0, 2.0, 16 / math.sqrt(8)])
    # routed and peft add the LoRA term by different matmuls: rounding of sums over the hidden size. 64 ulps, not
    # 16: LoRA weights of 0.3 at scaling up to 5.7 on base weights of 0.02 grow the residual stream to ~300 while
    # the logits stay below 0.4, so they carry the rounding of far larger sums (peft is 1.6e-6 from float64 here)
    assert_close_to_scale(routed_logits, peft_logits, ulps=64, reduction_size=config.hidden_size)
    # exact by construction: a base row gets the base layers' own output plus exactly zero (scaling 0)
    assert torch.equal(routed_logits[2], base_logits[2]) and not torch.allclose(routed_logits[0], base_logits[0])
    assert torch.equal(routed_tokens, peft_tokens)  # greedy picks: equal unless two logits tie within rounding


def test_routed_adapters_refuse_what_they_cannot_route(tokenizer, family, adapters, tmp_path):
    model = tiny_model(tokenizer, family)
    batch = tokenizer(sentences(2, seed=14), return_tensors="pt", padding=True)
    with RoutedAdapters(model, adapters) as routed:
        with pytest.raises(KeyError, match="no adapter named"), routed.route(["u0", "nobody"]):
            pass
        with pytest.raises(ValueError, match="a batch of 2 rows, but 3 rows were routed"), \
                routed.route(["u0", "u1", "u2"]):
            model(**batch, labels=batch["input_ids"])
        model.train()
        with pytest.raises(RuntimeError, match="for evaluation"), routed.route(["u0", "u1"]):
            model(**batch, labels=batch["input_ids"])
        model.eval()
    with pytest.raises(RuntimeError, match="closed"), routed.route(["u0"]):
        pass
    dora = tmp_path / "dora"
    dora.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (dora / f).write_bytes((adapters["u0"] / f).read_bytes())
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="does not support use_dora=True"):
        RoutedAdapters(model, {"u0": dora})


def test_reference_nll_matches_corpus_perplexity(tokenizer):
    model = tiny_model(tokenizer)
    sources, references = sentences(7, seed=5), sentences(7, seed=6)
    nll, n, *_ = reference_nll(model, tokenizer, sources, references, Decoding(batch_size=3))
    # compared as log perplexity, where the rounding is (float32 NLL from other batches, hidden-size sums)
    assert_close_to_scale(nll.sum() / n.sum(), math.log(reply_perplexity(model, tokenizer, sources, references)),
                          dtype=torch.float32, reduction_size=model.config.hidden_size)
    # a random model: about uniform over the vocabulary, so per-token NLL is near log V
    assert 0.5 * math.log(len(tokenizer)) < nll.sum() / n.sum() < 2 * math.log(len(tokenizer))
    with pytest.raises(ValueError, match="2 sources but 1 references"):
        reference_nll(model, tokenizer, sources[:2], references[:1])


def test_reference_text_nll_leaves_out_eos_and_counts_the_scored_characters(tokenizer):
    model = tiny_model(tokenizer)
    short, long = "  i like   cats ", " ".join(sentences(6, seed=8))
    sources = sentences(2, seed=9)
    kept = len(tokenizer(short, add_special_tokens=False)["input_ids"])  # the short reply just fits
    scores = reference_nll(model, tokenizer, sources, [short, long], Decoding(max_target_length=kept + 1))
    assert scores.n_tokens.tolist() == [kept + 1] * 2  # the long one cut: `kept` text tokens + </s>
    # the text part is the full sum minus -log p(</s> | the reply's tokens), computed here by hand
    for i, reference in enumerate((short, long)):
        ids = tokenizer(reference, add_special_tokens=False)["input_ids"][:kept] + [tokenizer.eos_token_id]
        source = tokenizer(sources[i], return_tensors="pt")
        with torch.no_grad():
            logits = model(**source, labels=torch.tensor([ids])).logits[0]
        eos_nll = -torch.log_softmax(logits[len(ids) - 1].double(), dim=-1)[tokenizer.eos_token_id].item()
        # a batch of 2 vs 1 row, float32 vs double softmax: float32 rounding of sums over the hidden size
        assert_close_to_scale(scores.nll[i] - scores.text_nll[i], eos_nll, dtype=torch.float32,
                              reduction_size=model.config.hidden_size)
    assert scores.text_chars[0] == len("i like cats")  # whitespace runs count once
    first = tokenizer(long, add_special_tokens=False)["input_ids"][:kept]
    assert scores.text_chars[1] == len(" ".join(tokenizer.decode(first).split()))
    assert scores.text_chars[1] < len(long)


def test_user_predictor_writes_the_users_rows_only(tokenizer, tmp_path):
    users = pd.DataFrame({"user_id": ["a", "b"], **{f: "unknown" for f in PROFILE_FIELDS}})
    texts = iter(sentences(30, seed=7))
    test = pd.DataFrame([{"pair_id": f"{u}{i}", "speaker_id": u, "partner_id": "b" if u == "a" else "a",
                          "context": [next(texts)], "response": next(texts), "split": "test"}
                         for u in ("a", "b") for i in range(3)])
    questions = pd.DataFrame({"question_id": ["q01", "q02"], "question": ["what is your hobby", "do you like cats"]})
    predictor = UserPredictor(tokenizer, test, users, "ppp", questions, decoding=Decoding(max_new_tokens=8))
    predictor("a", tiny_model(tokenizer), tmp_path)
    predictions = pd.read_parquet(tmp_path / PREDICTIONS_FILE)
    assert predictions["pair_id"].tolist() == ["a0", "a1", "a2"]
    assert set(predictions.columns) >= {"generated", "nll", "n_tokens", "text_nll", "text_chars"}
    answers = pd.read_parquet(tmp_path / EXP2_FILE)
    assert answers["question_id"].tolist() == ["q01", "q02"]
    prompts = build_prompts(question_pairs(questions, "a"), users, "ppp")
    assert prompts.iloc[0].endswith("what is your hobby")
