"""Replies and reference likelihoods from the dialogue models, T5 or causal LM (Exp1 §4.2, Exp2 §4.3).

- `greedy_generate`: greedy decoding (§4.3.2 uses greedy search "to avoid the influence of the sampling
  probability"; Exp1 uses it too), batched by prompt length.
- `reference_nll`: per-sample summed negative log-likelihood of the reference reply and its token count, from
  which `metrics.perplexity` derives the paper's perplexity (§4.2.3), and the NLL of the reply's text alone
  with the characters it covers, from which `metrics.bits_per_char` compares our T5s with the prompt LLMs.
- Both take `adapter_names`: each row runs through its own user's LoRA adapter inside one batch. Pass a
  `RoutedAdapters` (`load_routed_adapters`) as the model: every user's adapter is applied in one routed pass
  per layer (`routing.RoutedAdapters`), so evaluating 32 users costs little more than the base model on the
  same contexts. A `PeftModel` holding the adapters (`load_user_adapters`) runs peft's mixed-adapter batches
  instead, which give the same replies but loop over the adapters at every layer (about the cost of one user
  at a time); it is kept as the reference.
- `UserPredictor`: the `after_user` hook of `finetuning.run_users`. FULL models are not kept on disk unless
  asked (each is a whole model), so their test replies, reference NLLs and Exp2 answers are written while
  the trained model is still in memory.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import pandas as pd
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from udg_lib import io
from udg_lib.families import Decoding, ReferenceScores, _module, family_of
from udg_lib.routing import BASE_ROUTE, RoutedAdapters
from udg_lib.prompts import build_prompts

__all__ = ["BASE_ADAPTER", "EXP2_FILE", "PREDICTIONS_FILE", "ReferenceScores", "RoutedAdapters", "UserPredictor",
           "greedy_generate", "load_routed_adapters", "load_user_adapters", "predict_pairs", "question_pairs",
           "reference_nll"]

PREDICTIONS_FILE = "predictions.parquet"  # a user's Exp1 test replies: pair_id, generated, ReferenceScores' fields
EXP2_FILE = "exp2_replies.parquet"  # a user's Exp2 answers: question_id, reply
BASE_ADAPTER = BASE_ROUTE  # "__base__": no adapter for this row (peft's name inside a mixed batch; routed too)


def greedy_generate(model: torch.nn.Module | RoutedAdapters, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
                    decoding: Decoding = Decoding(), *, adapter_names: Sequence[str] | None = None,
                    one_id_prefix: bool = False) -> list[str]:
    """Greedy replies in the order of `sources`; prompts are cut as in training (`ModelFamily.encode_sources`).

    The model's family (`families.family_of`: T5 or a causal LM) does the decoding. `adapter_names[i]` picks
    the LoRA adapter of row i (`BASE_ADAPTER` for none): routed when `model` is a `RoutedAdapters`, peft's
    mixed batches when it is a `PeftModel` with those adapters loaded. Rows are batched by prompt length, so
    results do not depend on the order. `decoding` (`families.Decoding`) sets the lengths, the batch and the
    autocast the batches decode under (its `precision`: "fp32", "bf16", "auto" or a resolved `Precision`).
    """
    return family_of(_module(model)).generate(model, tokenizer, sources, decoding, adapter_names=adapter_names,
                                              one_id_prefix=one_id_prefix)


def reference_nll(model: torch.nn.Module | RoutedAdapters, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
                  references: Sequence[str], decoding: Decoding = Decoding(), *,
                  adapter_names: Sequence[str] | None = None, one_id_prefix: bool = False) -> ReferenceScores:
    """Per sample: summed NLL (nats) of the reference reply's tokens and their count, with and without eos.

    References longer than `decoding.max_target_length - 1` tokens are cut as in training (`encode_targets`), so
    `text_chars` counts only the characters the kept tokens cover. Perplexity over any set of samples is
    exp(sum nll / sum n_tokens) (`metrics.perplexity`), bits per character sum text_nll / ln 2 / sum
    text_chars (`metrics.bits_per_char`). `model` and `adapter_names` as in `greedy_generate`.
    """
    return family_of(_module(model)).reference_nll(model, tokenizer, sources, references, decoding,
                                                   adapter_names=adapter_names, one_id_prefix=one_id_prefix)


def load_user_adapters(base_model: torch.nn.Module, adapter_dirs: Mapping[str, str | Path]) -> PeftModel:
    """One `PeftModel` holding every user's saved adapter, named by the mapping's keys (`base_model` is
    wrapped in place). Adapter names must be valid module names: use e.g. `u0`, `u1`, ... not raw user ids."""
    if not adapter_dirs:
        raise ValueError("no adapters to load")
    names = list(adapter_dirs)
    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    peft_model.eval()
    return peft_model


def load_routed_adapters(base_model: torch.nn.Module, adapter_dirs: Mapping[str, str | Path]) -> RoutedAdapters:
    """Every user's saved adapter on `base_model`, routed per row (`routing.RoutedAdapters`; the base is
    hooked, not wrapped: `close()` gives it back unchanged). Names are free-form, unlike peft's."""
    base_model.eval()
    return RoutedAdapters(base_model, adapter_dirs)


def question_pairs(questions: pd.DataFrame, user_id: str) -> pd.DataFrame:
    """Exp2 (§4.3.1) inputs for one user: each question as a one-turn context the user answers, with no
    known partner (PPP renders the partner's profile as unknown)."""
    return pd.DataFrame({"pair_id": questions["question_id"].to_numpy(), "speaker_id": user_id, "partner_id": "",
                         "context": [[q] for q in questions["question"]]})


@dataclass
class UserPredictor:
    """`after_user` hook: a trained user model's Exp1 test replies (with reference NLL) and Exp2 answers.

    `test_pairs` are one split set's `test` rows (all users; the hook selects the user's own), `users` the
    profiles, `fmt` the prompt format, `questions` the Exp2 questions (question_id, question) or None.
    Picklable, so it travels to Ray workers.
    """

    tokenizer: PreTrainedTokenizerBase
    test_pairs: pd.DataFrame
    users: pd.DataFrame
    fmt: str
    questions: pd.DataFrame | None = None
    one_ids: Mapping[str, str] | None = None
    decoding: Decoding = Decoding()  # lengths, batch and autocast (a FULL model in memory stays fp32)
    # test pairs whose replies are generated (`conditions.generated_pair_ids`); None: all. Every pair is scored.
    generate_ids: Collection[Any] | None = None

    def __call__(self, user_id: str, model: torch.nn.Module, folder: Path) -> None:
        own = self.test_pairs[self.test_pairs["speaker_id"] == user_id]
        generate = None if self.generate_ids is None else own["pair_id"].isin(set(self.generate_ids)).tolist()
        io.write_parquet(Path(folder) / PREDICTIONS_FILE, predict_pairs(model, own, self, generate=generate))
        if self.questions is not None:
            asked = question_pairs(self.questions, user_id)
            sources = build_prompts(asked, self.users, self.fmt, self.one_ids).tolist()
            replies = greedy_generate(model, self.tokenizer, sources, self.decoding,
                                      one_id_prefix=self.one_ids is not None)
            io.write_parquet(Path(folder) / EXP2_FILE, pd.DataFrame({"question_id": asked["pair_id"].to_numpy(),
                                                                     "reply": replies}))


def predict_pairs(model: torch.nn.Module | RoutedAdapters, pairs: pd.DataFrame, settings: UserPredictor,
                  adapter_names: Sequence[str] | None = None,
                  generate: Sequence[bool] | None = None) -> pd.DataFrame:
    """Greedy replies and reference NLLs for reply pairs, prompts built as `settings` says.

    Every pair is scored (reference NLL: forward passes only); replies are generated only for the rows where
    `generate` is true (None: all), the others get `generated` None. Replies are batched by prompt length, so
    a generated row's reply does not depend on which other rows are generated.
    Columns: pair_id, speaker_id, generated and `ReferenceScores`' fields (nll, n_tokens, text_nll, text_chars)."""
    tokenizer = settings.tokenizer
    sources = build_prompts(pairs, settings.users, settings.fmt, settings.one_ids).tolist()
    chosen = [True] * len(sources) if generate is None else [bool(g) for g in generate]
    if len(chosen) != len(sources):
        raise ValueError(f"generate has {len(chosen)} flags for {len(sources)} pairs")
    rows = [i for i, g in enumerate(chosen) if g]
    replies = greedy_generate(model, tokenizer, [sources[i] for i in rows], settings.decoding,
                              adapter_names=None if adapter_names is None else [adapter_names[i] for i in rows],
                              one_id_prefix=settings.one_ids is not None) if rows else []
    generated: list[str | None] = [None] * len(sources)
    for i, reply in zip(rows, replies):
        generated[i] = reply
    scored = reference_nll(model, tokenizer, sources, pairs["response"].tolist(), settings.decoding,
                           adapter_names=adapter_names, one_id_prefix=settings.one_ids is not None)
    return pd.DataFrame({"pair_id": pairs["pair_id"].to_numpy(), "speaker_id": pairs["speaker_id"].to_numpy(),
                         "generated": generated, **scored._asdict()})
