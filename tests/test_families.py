"""Unit tests for udg_lib.families: one object per model family (seq2seq T5, causal Llama-style).

Tiny models built here from configs with fixed seeds (T5 preset "test", Llama preset "test") and the
project's SentencePiece tokenizer fixture (pad 0, eos 1, the §3.4 markers as single pieces).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import PeftModel, TaskType, get_peft_model

from conftest import assert_close_to_scale, sentences, tiny_model
from udg_lib.families import (
    CAUSAL,
    SEQ2SEQ,
    SMOLLM2_VOCAB,
    CausalCollator,
    family_of,
    get_family,
    llama_config,
    load_model,
    pad_sequences,
)
from udg_lib.finetuning import FinetuneConfig, train_with_early_stopping
from udg_lib.metrics import reference_chars
from udg_lib.encoding import LABEL_PAD_ID, encode_targets, tokenize_pairs
from udg_lib.families import Decoding, t5_config
from udg_lib.pretraining import build_model
from udg_lib.prompts import SEP, add_user_id, build_psp_prompt

CONFIG = FinetuneConfig(learning_rate=3e-3, batch_size=8, max_epochs=6, patience=6, max_source_length=48,
                        max_target_length=16, lora_dropout=0.0)


def tiny_llama(tokenizer, seed: int = 0, **overrides):
    model = CAUSAL.from_config(llama_config("test", len(tokenizer), **overrides), seed=seed)
    return CAUSAL.prepare(model, tokenizer)


def tiny_t5(tokenizer, seed: int = 0):
    return build_model(t5_config("test", len(tokenizer)), tokenizer, seed=seed)


def toy_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """PSP prompts of two turns and short replies; the reply repeats the context's first word, so a model
    can learn it (and learns to end replies with eos)."""
    contexts = sentences(2 * n, seed=seed)
    sources, replies = [], []
    for i in range(n):
        turns = contexts[2 * i: 2 * i + 2]
        sources.append(build_psp_prompt(turns, {"age_band": "20s", "gender": "female"}))
        replies.append(f"{turns[0].split()[0]} {turns[1].split()[-1]}")
    return sources, replies


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained_llama(tokenizer):
    """A tiny causal model trained a few epochs on the toy pairs (so it emits eos), and its summary."""
    sources, replies = toy_pairs(48)
    examples = CAUSAL.tokenize_pairs(sources, replies, tokenizer, CONFIG.max_source_length, CONFIG.max_target_length)
    model = tiny_llama(tokenizer)
    summary = train_with_early_stopping(model, examples, examples, CAUSAL.collator(tokenizer), CONFIG)
    return model, summary


# --- dispatch ----------------------------------------------------------------------------------------------------


def test_family_of_dispatches_on_the_config_as_transformers_does(tokenizer):
    t5, llama = tiny_t5(tokenizer), tiny_llama(tokenizer)
    assert family_of(t5) is SEQ2SEQ and family_of(t5.config) is SEQ2SEQ
    assert family_of(llama) is CAUSAL and family_of(llama.config) is CAUSAL
    assert family_of(get_peft_model(llama, CAUSAL.lora_config(CONFIG))) is CAUSAL
    assert (SEQ2SEQ.task_type, CAUSAL.task_type) == (TaskType.SEQ_2_SEQ_LM, TaskType.CAUSAL_LM)
    assert get_family("causal") is CAUSAL and get_family("seq2seq") is SEQ2SEQ
    with pytest.raises(ValueError, match="unknown model family"):
        get_family("encoder")
    with pytest.raises(TypeError, match="no transformers config"):
        family_of(torch.nn.Linear(2, 2))


def test_load_model_picks_the_family_class_from_the_saved_config(tokenizer, tmp_path):
    for model in (tiny_t5(tokenizer), tiny_llama(tokenizer)):
        folder = tmp_path / type(model).__name__
        model.save_pretrained(folder)
        loaded = load_model(folder)
        assert type(loaded) is type(model) and family_of(loaded) is family_of(model) and not loaded.training
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_prepare_gives_a_causal_model_a_pad_token_and_its_tokenizer_ids(tokenizer):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    model = CAUSAL.from_config(llama_config("test", len(tokenizer), pad_token_id=None, eos_token_id=7))
    CAUSAL.prepare(model, no_pad)
    assert no_pad.pad_token_id == no_pad.eos_token_id == 1
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 1
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 1
    grown = CAUSAL.from_config(llama_config("test", len(tokenizer) - 5))
    assert CAUSAL.prepare(grown, tokenizer).get_input_embeddings().weight.shape[0] == len(tokenizer)
    t5 = tiny_t5(tokenizer)
    t5.config.eos_token_id = 5
    with pytest.raises(ValueError, match="eos_token_id=1"):
        SEQ2SEQ.prepare(t5, tokenizer)  # T5's ids belong to the checkpoint: checked, never reset


# --- encoding and loss masking -----------------------------------------------------------------------------------


def test_seq2seq_family_is_todays_encoding(tokenizer):
    sources, replies = toy_pairs(6)
    ours = SEQ2SEQ.tokenize_pairs(sources, replies, tokenizer, 24, 8)
    today = tokenize_pairs(sources, replies, tokenizer, 24, 8)
    assert ours.input_ids == today.input_ids and ours.labels == today.labels


def test_causal_examples_are_source_separator_reply_eos_with_the_loss_on_the_reply(tokenizer):
    sources, replies = toy_pairs(6)
    examples = CAUSAL.tokenize_pairs(sources, replies, tokenizer, 128, 5)
    sep = tokenizer.convert_tokens_to_ids(SEP)
    capped = encode_targets(replies, tokenizer, 5)  # replies capped at 5 tokens, eos included
    for i, (source, target) in enumerate(zip(sources, capped)):
        prompt = tokenizer(source, add_special_tokens=False)["input_ids"]
        assert examples.input_ids[i] == prompt + [sep] + target
        assert examples.labels[i] == [LABEL_PAD_ID] * (len(prompt) + 1) + target
        assert target[-1] == tokenizer.eos_token_id and len(target) <= 5


class BosFirst:
    """The fixture tokenizer as Gemma's behaves: bos (here id 2) in front of every text it encodes."""

    def __init__(self, tokenizer):
        self.inner, self.bos_token_id = tokenizer, 2

    def __call__(self, texts, add_special_tokens=True):
        encoded = self.inner(texts, add_special_tokens=False)
        if add_special_tokens:
            encoded["input_ids"] = [[2, *ids] for ids in encoded["input_ids"]] if isinstance(texts, list) \
                else [2, *encoded["input_ids"]]
        return encoded

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_causal_sources_start_with_bos_only_where_the_tokenizer_adds_one(tokenizer):
    sources = toy_pairs(3)[0]
    assert CAUSAL.bos_ids(tokenizer) == [] and CAUSAL.bos_ids(BosFirst(tokenizer)) == [2]
    long_enough = CAUSAL.encode_sources(sources, tokenizer, 128)
    assert CAUSAL.encode_sources(sources, BosFirst(tokenizer), 128) == [[2, *ids] for ids in long_enough]
    head = tokenizer("[USER] 20s, female [SEP]", add_special_tokens=False)["input_ids"]
    for ids in CAUSAL.encode_sources(sources, BosFirst(tokenizer), 16):  # cut: bos and head still first
        assert len(ids) <= 16 and ids[: 1 + len(head)] == [2, *head] and ids[-1] == long_enough[0][-1]


def test_causal_batch_loss_covers_reply_tokens_only(tokenizer):
    sources, replies = toy_pairs(5)
    examples = CAUSAL.tokenize_pairs(sources, replies, tokenizer, 48, 16)
    batch = CAUSAL.collator(tokenizer)([examples[i] for i in range(len(examples))])
    lengths = [len(ids) for ids in examples.input_ids]
    assert batch["input_ids"].shape == batch["labels"].shape == (5, max(lengths))
    for row, n in enumerate(lengths):  # right padding: pad ids, mask 0 and labels -100 after each example
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][row, n:] == LABEL_PAD_ID).all()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
    model = tiny_llama(tokenizer)
    loss = model(**batch).loss
    # by hand: the mean next-token cross-entropy over the reply positions (and eos) of every row
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = 0.0, 0
    for row, (ids, labels) in enumerate(zip(examples.input_ids, examples.labels)):
        log_probs = torch.log_softmax(logits[row], dim=-1)
        for position, label in enumerate(labels):
            if label != LABEL_PAD_ID:
                total -= log_probs[position - 1, ids[position]].item()
                count += 1
    assert count == sum(len(t) for t in encode_targets(replies, tokenizer, 16))
    # same logits; the model's float32 mean over `count` tokens vs a float64 sum here
    assert_close_to_scale(loss.item(), total / count, dtype=torch.float32, reduction_size=count)
    assert (batch["labels"] != LABEL_PAD_ID).sum() == count


@pytest.mark.parametrize("family", [SEQ2SEQ, CAUSAL], ids=lambda f: f.name)
def test_token_losses_average_to_the_models_own_loss(tokenizer, family):
    sources, replies = toy_pairs(5)
    examples = family.tokenize_pairs(sources, replies, tokenizer, 48, 16)
    batch = family.collator(tokenizer)([examples[i] for i in range(len(examples))])
    model = tiny_t5(tokenizer) if family is SEQ2SEQ else tiny_llama(tokenizer)
    model.eval()
    losses, mask = family.token_losses(model, batch)
    assert mask.sum(dim=1).tolist() == [len(t) for t in encode_targets(replies, tokenizer, 16)]
    # the same per-token losses averaged in another order: float32 rounding of a mean over the scored tokens
    assert_close_to_scale(losses[mask].mean(), model(**batch).loss, reduction_size=int(mask.sum()))
    assert (losses[~mask] == 0).all()


def test_pad_sequences_pads_either_side():
    ids, mask = pad_sequences([[5, 6], [7]], 0, side="left")
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    batch = CausalCollator(0)([{"input_ids": [5], "labels": [-100]}, {"input_ids": [5, 6], "labels": [-100, 6]}])
    assert batch["input_ids"].tolist() == [[5, 0], [5, 6]] and batch["labels"].tolist() == [[-100, -100], [-100, 6]]


@pytest.mark.parametrize("family", [SEQ2SEQ, CAUSAL], ids=lambda f: f.name)
def test_truncation_keeps_the_one_id_and_profile_head_of_a_1000_token_context(tokenizer, family):
    turns = sentences(220, seed=5)  # ~1,000 tokens of context
    prompt = add_user_id(build_psp_prompt(turns, {"age_band": "30s", "gender": "male"}), "aB3x")
    head = tokenizer("aB3x [USER] 30s, male [SEP]", add_special_tokens=False)["input_ids"]
    newest = tokenizer(turns[-1], add_special_tokens=False)["input_ids"]
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > 1000
    encoded = family.encode_sources([prompt], tokenizer, 64, one_id_prefix=True)[0]
    end = [tokenizer.eos_token_id] if family is SEQ2SEQ else [tokenizer.convert_tokens_to_ids(SEP)]
    assert len(encoded) <= 64 and encoded[: len(head)] == head
    assert encoded[-1 - len(newest):] == newest + end  # the newest turn survives, oldest turns go first
    examples = family.tokenize_pairs([prompt], ["a reply"], tokenizer, 64, 16, one_id_prefix=True)
    assert examples.input_ids[0][: len(head)] == head


# --- generation and scoring --------------------------------------------------------------------------------------


def test_causal_stop_ids_are_eos_separator_and_newline_tokens(tokenizer):
    stops = CAUSAL.stop_token_ids(tokenizer)
    newline = [i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])]
    assert newline and set(stops) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(SEP), *newline}


def test_training_a_tiny_causal_model_with_the_finetuning_loop_lowers_the_loss(trained_llama):
    _, summary = trained_llama
    assert summary.epochs_run == CONFIG.max_epochs and summary.steps == CONFIG.max_epochs * 6
    assert summary.train_losses[-1] < summary.train_losses[0] - 1.0
    assert summary.best_dev_loss < summary.initial_dev_loss - 1.0


def test_left_padded_batched_greedy_equals_one_at_a_time(tokenizer, trained_llama):
    model, _ = trained_llama
    sources = toy_pairs(12, seed=7)[0] + ["hello", build_psp_prompt(sentences(6, seed=8), None)]
    batched = CAUSAL.generate(model, tokenizer, sources, Decoding(max_new_tokens=12, batch_size=5,
                                                                  max_source_length=48))
    alone = [CAUSAL.generate(model, tokenizer, [s], Decoding(max_new_tokens=12, max_source_length=48))[0]
             for s in sources]
    assert batched == alone
    lengths = {len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in batched}
    assert len(lengths) > 1 and min(lengths) < 12  # rows stopped at eos at different steps
    assert all("\n" not in r and SEP not in r for r in batched)


def test_a_causal_reply_never_starts_with_a_stop_token(tokenizer):
    # A model that would end at once (eos first, as SmolLM2-Instruct does after a long context turn) still
    # gives its best non-stop token first, then stops.
    model = tiny_model(tokenizer, "causal")
    word = tokenizer("hello", add_special_tokens=False)["input_ids"][-1]

    def prefer_eos_then_word(module, inputs, output):
        output[..., tokenizer.eos_token_id] += 100.0
        output[..., word] += 50.0
        return output

    model.lm_head.register_forward_hook(prefer_eos_then_word)
    replies = CAUSAL.generate(model, tokenizer, ["hello there", "how are you"],
                              Decoding(max_new_tokens=5, batch_size=2, max_source_length=32))
    expected = tokenizer.decode([word]).strip()
    assert expected and replies == [expected, expected]


def test_causal_reference_nll_equals_a_manual_computation(tokenizer, trained_llama):
    model, _ = trained_llama
    sources, references = toy_pairs(7, seed=9)
    references[2] = " ".join(sentences(6, seed=10))  # longer than max_target_length: scored as cut
    scores = CAUSAL.reference_nll(model, tokenizer, sources, references,
                                  Decoding(batch_size=3, max_source_length=48, max_target_length=12))
    prompts = CAUSAL.encode_sources(sources, tokenizer, 48)
    targets = encode_targets(references, tokenizer, 12)
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        token_nll = [-log_probs[len(prompt) + j - 1, t].item() for j, t in enumerate(target)]
        assert scores.n_tokens[i] == len(target)
        # batches of 3 vs 1 row, float32 vs double softmax: float32 rounding of sums over the hidden size
        assert_close_to_scale(scores.nll[i], sum(token_nll), dtype=torch.float32,
                              reduction_size=model.config.hidden_size)
        assert_close_to_scale(scores.text_nll[i], sum(token_nll[:-1]), dtype=torch.float32,  # eos left out
                              reduction_size=model.config.hidden_size)
    assert scores.text_chars[0] == reference_chars(references[0])
    assert 0 < scores.text_chars[2] < reference_chars(references[2])


def test_seq2seq_family_generates_and_scores_as_todays_functions(tokenizer):
    from udg_lib.generation import greedy_generate, reference_nll

    model = tiny_t5(tokenizer)
    sources, references = toy_pairs(4)
    assert SEQ2SEQ.generate(model, tokenizer, sources, Decoding(max_new_tokens=5)) == \
        greedy_generate(model, tokenizer, sources, Decoding(max_new_tokens=5))
    ours, today = SEQ2SEQ.reference_nll(model, tokenizer, sources, references), \
        reference_nll(model, tokenizer, sources, references)
    assert all(np.array_equal(a, b) for a, b in zip(ours, today))  # one computation (generation delegates): exact


# --- LoRA ----------------------------------------------------------------------------------------------------------


def test_causal_lora_on_the_family_targets_trains_only_the_adapter(tokenizer):
    sources, replies = toy_pairs(16)
    examples = CAUSAL.tokenize_pairs(sources, replies, tokenizer, 48, 16)
    base = tiny_llama(tokenizer)
    before = state(base)
    peft_model = get_peft_model(base, CAUSAL.lora_config(CONFIG))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    summary = train_with_early_stopping(peft_model, examples, examples, CAUSAL.collator(tokenizer),
                                        FinetuneConfig(learning_rate=1e-2, batch_size=8, max_epochs=3, patience=3))
    assert summary.best_dev_loss < summary.initial_dev_loss
    # r = 12 on q, k, v, o of 2 layers: q, o 192 -> 192; k, v 192 -> 2 kv heads x 48 = 96
    expected = 2 * 12 * (2 * (192 + 192) + 2 * (192 + 96))
    assert summary.trainable_parameters == expected == CAUSAL.lora_trainable_parameters(base.config, CONFIG)
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in state(peft_model).items() if "lora_" not in k}
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)  # untouched
    assert any(bool(p.abs().sum() > 0) for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_lora_parameter_counts_beside_the_papers_1_8_million():
    config = FinetuneConfig()  # r = 12, the default targets: each family's own q, k, v, o
    # §4.1.3: T5 self-attention q, k, v, o on t5-base = 1.8M (as finetuning.lora_trainable_parameters)
    assert SEQ2SEQ.lora_trainable_parameters(t5_config("t5-base", 32128), config) == 1_769_472
    # SmolLM2-135M: 30 layers of q, o (576 -> 576) and k, v (576 -> 3 x 64): 1.38M
    smollm2 = llama_config("smollm2-135m", SMOLLM2_VOCAB)
    assert CAUSAL.lora_trainable_parameters(smollm2, config) == 30 * 12 * (2 * 1152 + 2 * 768) == 1_382_400
    # an explicit target list still wins over the family's default
    single = get_peft_model(CAUSAL.from_config(llama_config("test", 64)),
                            CAUSAL.lora_config(FinetuneConfig(lora_target_modules=("q_proj",))))
    assert {n.rsplit(".", 1)[-1] for n, m in single.named_modules() if hasattr(m, "lora_A")} == {"q_proj"}


def test_mixed_adapter_causal_batches_equal_each_adapter_alone(tokenizer):
    base = tiny_llama(tokenizer)
    peft_model = get_peft_model(base, CAUSAL.lora_config(CONFIG), adapter_name="u0")
    peft_model.add_adapter("u1", CAUSAL.lora_config(CONFIG))
    torch.manual_seed(1)
    with torch.no_grad():  # B != 0, so the two adapters (and the base) answer differently
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert isinstance(peft_model, PeftModel)
    sources, references = toy_pairs(6, seed=11)
    names = ["u0", "u1", "__base__", "u1", "u0", "u1"]
    mixed = CAUSAL.generate(peft_model, tokenizer, sources, Decoding(max_new_tokens=6, batch_size=6),
                            adapter_names=names)
    mixed_nll = CAUSAL.reference_nll(peft_model, tokenizer, sources, references, adapter_names=names).nll
    for adapter in ("u0", "u1", "__base__"):
        rows = [i for i, n in enumerate(names) if n == adapter]
        one = CAUSAL.generate(peft_model, tokenizer, [sources[i] for i in rows], Decoding(max_new_tokens=6),
                              adapter_names=[adapter] * len(rows))
        assert one == [mixed[i] for i in rows]
        alone = CAUSAL.reference_nll(peft_model, tokenizer, [sources[i] for i in rows],
                                     [references[i] for i in rows], adapter_names=[adapter] * len(rows)).nll
        # batches of 6 vs 2-3 rows: float32 rounding of sums over the hidden size
        assert_close_to_scale(alone, mixed_nll[rows], dtype=torch.float32, reduction_size=base.config.hidden_size)
    assert len(set(mixed_nll.round(3))) > 1
