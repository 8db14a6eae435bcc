"""The seq2seq encoding of prompts and replies (§3.4's prompts as token ids), shared by pre-training, fine-tuning
and both model families.

- `encode_sources`: prompt ids within `max_source_length`, `</s>` last. A too-long prompt loses its oldest
  context turns first, never its head (the One-ID, the PSP/PPP profile up to the first [SEP]) nor the newest
  turns the reply answers (`split_prompt_head`, `kept_context_start`: the rule `baselines` also applies to the
  prompt LLMs' histories, so every system reads the same turns).
- `encode_targets`: reply ids right-truncated to `max_target_length`, always ending with `</s>`.
- `tokenize_pairs` / `Seq2SeqExamples`: both as a torch Dataset for `DataCollatorForSeq2Seq`, labels padded
  with `LABEL_PAD_ID`.

`families.CAUSAL` lays the same pieces out as one sequence (prompt, then reply, loss on the reply only); this
module sits below `families`, `pretraining` and `finetuning`, so none of them needs another to encode.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from udg_lib.prompts import SEP, USER, USER1

LABEL_PAD_ID = -100  # ignored by the loss (PyTorch's cross-entropy default)


class Seq2SeqExamples(Dataset):
    """Tokenized (source, target) pairs; items are dicts for `DataCollatorForSeq2Seq`."""

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]]):
        if len(input_ids) != len(labels):
            raise ValueError(f"{len(input_ids)} sources but {len(labels)} targets")
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def split_prompt_head(prompt: str, one_id_prefix: bool = False) -> tuple[str, str]:
    """(head, dialogue context): the head is the One-ID (its first word, when `one_id_prefix`) and the
    profile head through the first [SEP] (PSP/PPP); ("", prompt) for a plain prompt without an id."""
    id_head = ""
    if one_id_prefix:
        one_id, _, prompt = prompt.partition(" ")
        id_head = one_id + " "
    position = prompt.find(SEP)
    if position < 0:
        return id_head, prompt
    head = prompt[:position]
    if USER in head or USER1 in head:
        return id_head + prompt[: position + len(SEP)], prompt[position + len(SEP):]
    return id_head, prompt


def kept_context_start(head: list[int], body: list[int], budget: int, sep_id: int) -> int | None:
    """Where the kept part of `body` starts when head + body must fit `budget` tokens; None when the head
    alone fills the budget (no context is kept at all).

    The rule: the head always, then the most recent tokens of the body; a turn cut at the start is dropped
    whole (the tail starts after its first [SEP]), unless the newest turn alone is longer than the budget,
    which then keeps its last tokens. `baselines` gives the prompt LLMs the same turns through this rule.
    """
    if len(head) >= budget:
        return None
    keep = budget - len(head)
    if len(body) <= keep:
        return 0
    start = len(body) - keep
    tail = body[start:]
    # Drop the partial oldest turn, unless the newest turn alone is longer than the budget.
    if sep_id in tail[:-1]:
        start += tail.index(sep_id) + 1
    return start


def _truncate_context(head: list[int], body: list[int], budget: int, sep_id: int) -> list[int]:
    """head + the most recent part of body within `budget` tokens, starting at a turn boundary if possible
    (`kept_context_start`)."""
    start = kept_context_start(head, body, budget, sep_id)
    return head[:budget] if start is None else head + body[start:]


def encode_sources(sources: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                   max_source_length: int, one_id_prefix: bool = False) -> list[list[int]]:
    """Token ids of prompts, at most `max_source_length` with `</s>`.

    Too-long prompts lose their oldest context turns first, never the head — the One-ID (`one_id_prefix`:
    every prompt starts with a user's id, §4.1.3) and the profile head (PSP/PPP, up to the first [SEP]) —
    nor the newest turns the reply answers: right truncation would cut exactly those (29% of chitchat's
    5-turn contexts exceed 128 tokens), left truncation the id that One-ID is about.
    """
    if len(sources) == 0:
        return []
    sep_id = tokenizer.convert_tokens_to_ids(SEP)
    heads, bodies = zip(*(split_prompt_head(s, one_id_prefix) for s in sources))
    head_ids = tokenizer(list(heads), add_special_tokens=False)["input_ids"]
    body_ids = tokenizer(list(bodies), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [_truncate_context(h, b, max_source_length - 1, sep_id) + [eos] for h, b in zip(head_ids, body_ids)]


def encode_targets(targets: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                   max_target_length: int) -> list[list[int]]:
    """Token ids of replies, right-truncated to `max_target_length`, always ending with `</s>`."""
    if len(targets) == 0:
        return []
    ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [seq[: max_target_length - 1] + [eos] for seq in ids]


def tokenize_pairs(sources: Sequence[str], targets: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                   max_source_length: int, max_target_length: int, one_id_prefix: bool = False) -> Seq2SeqExamples:
    """Prompts and replies as a torch Dataset (see `encode_sources` for how long prompts are cut)."""
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
    return Seq2SeqExamples(encode_sources(sources, tokenizer, max_source_length, one_id_prefix),
                           encode_targets(targets, tokenizer, max_target_length))
