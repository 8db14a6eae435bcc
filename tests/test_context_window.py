"""The dialogue history a fine-tuned system reads (`ModelFamily.visible_contexts`): the turns its prompt keeps
under `max_source_length`, which stage 06 hands to the prompt LLMs so both sides see the same input."""

from __future__ import annotations

import pytest

from conftest import sentences
from udg_lib.families import get_family
from udg_lib.prompts import SEP, build_prompt, join_context

PROFILE = {"age_band": "20s", "gender": "female"}
CONTEXT = sentences(5, seed=3)  # five turns of roughly 30-40 tokens each in the test tokenizer


def _views(family, tokenizer, fmt, one_id, max_source_length, context=CONTEXT):
    prompt = build_prompt(fmt, context, PROFILE, PROFILE, one_id)
    [view] = family.visible_contexts([context], [prompt], tokenizer, max_source_length, one_id_prefix=bool(one_id))
    [encoded] = family.encode_sources([prompt], tokenizer, max_source_length, one_id_prefix=bool(one_id))
    return prompt, view, encoded


@pytest.mark.parametrize("name", ["seq2seq", "causal"])
@pytest.mark.parametrize("fmt,one_id", [("plain", None), ("psp", None), ("ppp", None), ("psp", "Ab1x")])
@pytest.mark.parametrize("max_source_length", [100, 150, 400])
def test_visible_turns_are_exactly_what_the_fine_tuned_prompt_keeps(tokenizer, name, fmt, one_id, max_source_length):
    family = get_family(name)
    prompt, view, encoded = _views(family, tokenizer, fmt, one_id, max_source_length)
    assert view.turns and not view.partial  # these budgets fit at least one whole turn
    # the newest turns, oldest dropped first
    assert list(view.turns) == CONTEXT[len(CONTEXT) - len(view.turns):]
    # a prompt built from those turns alone, never cut, is token for token the cut prompt: the same input
    rebuilt = build_prompt(fmt, list(view.turns), PROFILE, PROFILE, one_id)
    assert family.encode_sources([rebuilt], tokenizer, 10_000, one_id_prefix=bool(one_id))[0] == encoded
    # and one turn more would not have fit the budget
    if len(view.turns) < len(CONTEXT):
        more = build_prompt(fmt, CONTEXT[len(CONTEXT) - len(view.turns) - 1:], PROFILE, PROFILE, one_id)
        assert len(family.encode_sources([more], tokenizer, 10_000, one_id_prefix=bool(one_id))[0]) > max_source_length
    # n_tokens: the context tokens, [SEP]s between turns included, within the budget beside the head
    joined = tokenizer(join_context(view.turns), add_special_tokens=False)["input_ids"]
    assert view.n_tokens == len(joined)
    assert len(encoded) <= max_source_length


@pytest.mark.parametrize("name", ["seq2seq", "causal"])
def test_the_head_is_kept_and_takes_its_share_of_the_budget(tokenizer, name):
    family = get_family(name)
    counts = {}
    short = [f"hello {word}" for word in ("music", "dogs", "games", "tokyo", "reading", "weekends", "today")]
    for fmt, one_id in (("plain", None), ("psp", None), ("psp", "Ab1x"), ("ppp", "Ab1x")):
        prompt, view, encoded = _views(family, tokenizer, fmt, one_id, 48, short)
        assert list(view.turns) == short[len(short) - len(view.turns):] and not view.partial
        counts[fmt, one_id] = len(view.turns)
        if one_id:
            assert tokenizer.decode(encoded).startswith(one_id)  # One-ID is never the part that is cut
        if fmt != "plain":
            assert tokenizer.convert_tokens_to_ids(SEP) in encoded  # the profile head's [SEP] is there
    # a longer head leaves fewer turns
    assert counts["plain", None] > counts["psp", None] > counts["psp", "Ab1x"] >= counts["ppp", "Ab1x"] >= 1
    # a head that fills the budget leaves no turn at all
    _, view, _ = _views(family, tokenizer, "ppp", "Ab1x", 8)
    assert view == ((), False, 0)


@pytest.mark.parametrize("name", ["seq2seq", "causal"])
def test_a_newest_turn_longer_than_the_budget_is_cut_inside_as_the_model_reads_it(tokenizer, name):
    family = get_family(name)
    prompt, view, encoded = _views(family, tokenizer, "plain", None, 12)
    assert view.partial and len(view.turns) == 1
    kept = encoded[len(family.bos_ids(tokenizer)) if name == "causal" else 0:][:view.n_tokens]
    assert view.turns[0] == tokenizer.decode(kept, skip_special_tokens=True).strip()
    assert CONTEXT[-1].endswith(view.turns[0].split(" ", 1)[-1])  # the end of the newest turn, its start cut
    assert len(view.turns[0]) < len(CONTEXT[-1])


def test_the_turns_are_counted_in_the_fine_tuned_tokenizer_not_the_readers(tokenizer):
    """Another tokenizer (a word-level one here, as an LLM's coarser BPE) would keep other turns under the same
    budget: the turns are the given (fine-tuned) tokenizer's choice, so an LLM handed them reads what the
    fine-tuned system reads, however its own tokenizer counts them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for turn in CONTEXT for w in turn.split()})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>", SEP, *words])}, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    per_word = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>",
                                       additional_special_tokens=[SEP])
    family = get_family("seq2seq")
    _, ours, _ = _views(family, tokenizer, "plain", None, 130)
    _, theirs, _ = _views(family, per_word, "plain", None, 130)
    assert len(theirs.turns) == len(CONTEXT) > len(ours.turns)  # a word is one token there: every turn fits
    assert ours.n_tokens <= 129 and theirs.n_tokens == len(" ".join(CONTEXT).split()) + len(CONTEXT) - 1


def test_a_turn_holding_the_separator_is_refused(tokenizer):
    family = get_family("seq2seq")
    context = ["one [SEP] two", "three"]
    with pytest.raises(ValueError, match="3 \\[SEP\\]-separated turns .* but 2 context turns"):
        family.visible_contexts([context], [build_prompt("plain", context)], tokenizer, 100)


@pytest.mark.parametrize("name", ["seq2seq", "causal"])
def test_stage_06_reads_the_family_of_a_condition_from_its_saved_config(tokenizer, tmp_path, name):
    from conftest import tiny_model
    from udg_lib.experiments import condition_family

    tiny_model(tokenizer, name).save_pretrained(tmp_path / "da" / "model")
    assert condition_family(tmp_path) is get_family(name)


def test_the_paper_history_row_counts_perplexity_in_its_models_tokenizer():
    from udg_lib.experiments import row_tokenizer

    assert row_tokenizer("llm", "smollm2-chat-paper10") == row_tokenizer("llm", "smollm2-chat") == "SmolLM2-135M-Instruct"
    assert row_tokenizer("llm", "gemma3-270m-completion-paper10") == "Gemma-3-270M"
