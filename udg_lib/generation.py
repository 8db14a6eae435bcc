"""Replies and reference likelihoods from the T5 dialogue models (Exp1 §4.2, Exp2 §4.3).

- `greedy_generate`: greedy decoding (§4.3.2 uses greedy search "to avoid the influence of the sampling
  probability"; Exp1 uses it too), batched by prompt length.
- `reference_nll`: per-sample summed negative log-likelihood of the reference reply and its token count, from
  which `metrics.perplexity` derives the paper's perplexity (§4.2.3), and the NLL of the reply's text alone
  with the characters it covers, from which `metrics.bits_per_char` compares our T5s with the prompt LLMs.
- Both take `adapter_names`: each row runs through its own user's LoRA adapter inside one batch. Pass a
  `RoutedAdapters` (`load_routed_adapters`) as the model: every user's adapter is applied in one routed pass
  per layer (`multilora.RoutedAdapters`), so evaluating 32 users costs little more than the base model on the
  same contexts. A `PeftModel` holding the adapters (`load_user_adapters`) runs peft's mixed-adapter batches
  instead, which give the same replies but loop over the adapters at every layer (about the cost of one user
  at a time); it is kept as the reference.
- `UserPredictor`: the `after_user` hook of `finetuning.run_users`. FULL models are not kept on disk unless
  asked (each is a whole model), so their test replies, reference NLLs and Exp2 answers are written while
  the trained model is still in memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from udg_lib import io
from udg_lib.metrics import reference_chars
from udg_lib.multilora import BASE_ROUTE, RoutedAdapters
from udg_lib.pretraining import LABEL_PAD_ID, encode_sources, encode_targets
from udg_lib.prompts import build_prompts

PREDICTIONS_FILE = "predictions.parquet"  # a user's Exp1 test replies: pair_id, generated, ReferenceScores' fields
EXP2_FILE = "exp2_replies.parquet"  # a user's Exp2 answers: question_id, reply
BASE_ADAPTER = BASE_ROUTE  # "__base__": no adapter for this row (peft's name inside a mixed batch; routed too)


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _adapter_routing(model: torch.nn.Module | RoutedAdapters, adapter_names: Sequence[str] | None,
                     batch: Sequence[int]) -> tuple[AbstractContextManager, dict]:
    """How a batch's rows reach their adapters: a routing block (`RoutedAdapters`) or peft's `adapter_names`."""
    if adapter_names is None:
        return nullcontext(), {}
    names = [adapter_names[i] for i in batch]
    if isinstance(model, RoutedAdapters):
        return model.route(names), {}
    return nullcontext(), {"adapter_names": names}


def _module(model: torch.nn.Module | RoutedAdapters) -> torch.nn.Module:
    return model.model if isinstance(model, RoutedAdapters) else model


def _check_lengths(name: str, values: Sequence | None, n: int) -> None:
    if values is not None and len(values) != n:
        raise ValueError(f"{len(values)} {name} for {n} prompts")


@torch.no_grad()
def greedy_generate(model: torch.nn.Module | RoutedAdapters, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str], *,
                    adapter_names: Sequence[str] | None = None, max_new_tokens: int = 48, batch_size: int = 32,
                    max_source_length: int = 128, one_id_prefix: bool = False) -> list[str]:
    """Greedy replies in the order of `sources`; prompts are cut as in training (`encode_sources`).

    `adapter_names[i]` picks the LoRA adapter of row i (`BASE_ADAPTER` for none): routed when `model` is a
    `RoutedAdapters`, peft's mixed batches when it is a `PeftModel` with those adapters loaded. Rows are
    batched by prompt length, so results do not depend on the order.
    """
    _check_lengths("adapter names", adapter_names, len(sources))
    routing, model = model, _module(model)
    was_training = model.training
    model.eval()
    encoded = encode_sources(list(sources), tokenizer, max_source_length, one_id_prefix)
    replies = [""] * len(encoded)
    device = next(model.parameters()).device
    for batch in _length_batches([len(e) for e in encoded], batch_size):
        padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(device)
        route, kwargs = _adapter_routing(routing, adapter_names, batch)
        with route:  # the encoder and every decoding step see this batch's rows, in this order
            output = model.generate(**padded, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, **kwargs)
        for i, text in zip(batch, tokenizer.batch_decode(output, skip_special_tokens=True)):
            replies[i] = text.strip()
    model.train(was_training)
    return replies


class ReferenceScores(NamedTuple):
    """`reference_nll`'s per-sample arrays (nats; tokens of our T5 tokenizer)."""

    nll: np.ndarray  # summed NLL of the scored reference tokens, `</s>` included (the paper's perplexity)
    n_tokens: np.ndarray  # those tokens, `</s>` included
    text_nll: np.ndarray  # the same sum without `</s>`: the NLL of the reply's text alone
    text_chars: np.ndarray  # characters of the reference those text tokens cover (`metrics.reference_chars`)


def _covered_chars(tokenizer: PreTrainedTokenizerBase, references: Sequence[str], kept: Sequence[int]) -> np.ndarray:
    """`reference_chars` of the part of each reference that its first `kept[i]` tokens cover."""
    chars = np.array([reference_chars(r) for r in references], dtype=np.int64)
    if not references:
        return chars
    encoded = tokenizer(list(references), add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    for i, reference in enumerate(references):
        ids = encoded["input_ids"][i]
        if len(ids) <= kept[i]:
            continue  # not truncated: the whole reference is scored
        if kept[i] == 0:
            chars[i] = 0
        elif tokenizer.is_fast:
            chars[i] = reference_chars(reference[: encoded["offset_mapping"][i][kept[i] - 1][1]])
        else:
            chars[i] = reference_chars(tokenizer.decode(ids[: kept[i]], skip_special_tokens=True))
    return chars


@torch.no_grad()
def reference_nll(model: torch.nn.Module | RoutedAdapters, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
                  references: Sequence[str], *, adapter_names: Sequence[str] | None = None, batch_size: int = 32,
                  max_source_length: int = 128, max_target_length: int = 48,
                  one_id_prefix: bool = False) -> ReferenceScores:
    """Per sample: summed NLL (nats) of the reference reply's tokens and their count, with and without `</s>`.

    References longer than `max_target_length - 1` tokens are cut as in training (`encode_targets`), so
    `text_chars` counts only the characters the kept tokens cover. Perplexity over any set of samples is
    exp(sum nll / sum n_tokens) (`metrics.perplexity`), bits per character sum text_nll / ln 2 / sum
    text_chars (`metrics.bits_per_char`). `model` and `adapter_names` as in `greedy_generate`.
    """
    if len(sources) != len(references):
        raise ValueError(f"{len(sources)} sources but {len(references)} references")
    _check_lengths("adapter names", adapter_names, len(sources))
    routing, model = model, _module(model)
    was_training = model.training
    model.eval()
    inputs = encode_sources(list(sources), tokenizer, max_source_length, one_id_prefix)
    targets = encode_targets(list(references), tokenizer, max_target_length)
    nll = np.zeros(len(inputs), dtype=np.float64)
    text_nll = np.zeros(len(inputs), dtype=np.float64)
    counts = np.array([len(t) for t in targets], dtype=np.int64)
    device = next(model.parameters()).device
    for batch in _length_batches([len(e) for e in inputs], batch_size):
        padded = tokenizer.pad({"input_ids": [inputs[i] for i in batch]}, return_tensors="pt").to(device)
        labels = torch.full((len(batch), max(len(targets[i]) for i in batch)), LABEL_PAD_ID, dtype=torch.long)
        for row, i in enumerate(batch):
            labels[row, : len(targets[i])] = torch.tensor(targets[i])
        labels = labels.to(device)
        route, kwargs = _adapter_routing(routing, adapter_names, batch)
        with route:
            logits = model(**padded, labels=labels, **kwargs).logits.float()
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=LABEL_PAD_ID,
                                                      reduction="none").double().cpu()
        nll[batch] = token_nll.sum(dim=1).numpy()
        eos_nll = token_nll[torch.arange(len(batch)), torch.tensor([len(targets[i]) - 1 for i in batch])]
        text_nll[batch] = (token_nll.sum(dim=1) - eos_nll).numpy()  # encode_targets ends every target with </s>
    model.train(was_training)
    text_chars = _covered_chars(tokenizer, list(references), (counts - 1).tolist())
    return ReferenceScores(nll, counts, text_nll, text_chars)


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
    """Every user's saved adapter on `base_model`, routed per row (`multilora.RoutedAdapters`; the base is
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
    max_new_tokens: int = 48
    batch_size: int = 32
    max_source_length: int = 128
    max_target_length: int = 48

    def __call__(self, user_id: str, model: torch.nn.Module, folder: Path) -> None:
        own = self.test_pairs[self.test_pairs["speaker_id"] == user_id]
        io.write_parquet(Path(folder) / PREDICTIONS_FILE, predict_pairs(model, own, self))
        if self.questions is not None:
            asked = question_pairs(self.questions, user_id)
            sources = build_prompts(asked, self.users, self.fmt, self.one_ids).tolist()
            replies = greedy_generate(model, self.tokenizer, sources, max_new_tokens=self.max_new_tokens,
                                      batch_size=self.batch_size, max_source_length=self.max_source_length,
                                      one_id_prefix=self.one_ids is not None)
            io.write_parquet(Path(folder) / EXP2_FILE, pd.DataFrame({"question_id": asked["pair_id"].to_numpy(),
                                                                     "reply": replies}))


def predict_pairs(model: torch.nn.Module | RoutedAdapters, pairs: pd.DataFrame, settings: UserPredictor,
                  adapter_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Greedy replies and reference NLLs for reply pairs, prompts built as `settings` says.

    Columns: pair_id, speaker_id, generated and `ReferenceScores`' fields (nll, n_tokens, text_nll, text_chars)."""
    tokenizer = settings.tokenizer
    sources = build_prompts(pairs, settings.users, settings.fmt, settings.one_ids).tolist()
    generated = greedy_generate(model, tokenizer, sources, adapter_names=adapter_names,
                                max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                                max_source_length=settings.max_source_length,
                                one_id_prefix=settings.one_ids is not None)
    scored = reference_nll(model, tokenizer, sources, pairs["response"].tolist(),
                           adapter_names=adapter_names, batch_size=settings.batch_size,
                           max_source_length=settings.max_source_length,
                           max_target_length=settings.max_target_length,
                           one_id_prefix=settings.one_ids is not None)
    return pd.DataFrame({"pair_id": pairs["pair_id"].to_numpy(), "speaker_id": pairs["speaker_id"].to_numpy(),
                         "generated": generated, **scored._asdict()})
