"""Model families: what differs between a seq2seq T5 (the paper's, §3.4) and a decoder-only causal LM.

The rest of the pipeline asks a family, never `if family == ...`. transformers and peft draw the same line:
the checkpoint's config decides (`config.is_encoder_decoder` -> `AutoModelForSeq2SeqLM`, else
`AutoModelForCausalLM`), and a LoRA config names its task (`TaskType.SEQ_2_SEQ_LM` / `TaskType.CAUSAL_LM`).
`family_of(model_or_config)` follows them; `load_model` loads any checkpoint through its family's Auto class.

A family knows, for the same (source, reply) pairs and the same argument lists as the seq2seq functions it
stands in for (`encoding.tokenize_pairs` / `encode_sources`, `generation.greedy_generate` /
`reference_nll`, `finetuning.lora_config`):

- `tokenize_pairs`: training examples with the loss on the reply only. Seq2seq: source -> encoder, reply ->
  labels (today's code, reused). Causal: one sequence `source + separator + reply + eos`, labels -100 on
  the source and separator, so `model(**batch).loss` (transformers shifts the labels) covers exactly the
  reply tokens and its eos, as the seq2seq labels do. The separator is the §3.4 turn marker [SEP]: prompts
  already join turns with it, so the reply is simply the next turn. It takes the place of the source's
  `</s>`, so with a one-token separator both families keep the same source tokens: the One-ID and profile
  head always, the newest turns, oldest turns cut first (`encoding.split_prompt_head` /
  `_truncate_context`). Replies are capped at `max_target_length` tokens, eos included, in both. A
  tokenizer that starts every text with bos (Gemma, Llama) gets it in front of the source.
- `collator`: right-padded training batches, labels padded with -100 (both work unchanged with
  `finetuning.train_with_early_stopping` and `dev_loss`, which only call `model(**batch).loss`);
  `token_losses` gives the per-token losses behind that mean, for per-row (per-user) losses.
- `generate`: greedy replies in length-sorted batches. Causal batches are LEFT-padded (positions from the
  attention mask, as `generate` derives them), only the new tokens are decoded, and a reply ends at eos,
  at the separator (the start of a next turn) or at a newline (pretrained LMs end lines with one); the
  result equals one-at-a-time generation (tested).
- `reference_nll`: `generation.ReferenceScores` per sample: summed NLL (nats) over the reply tokens with
  eos and their count (perplexity), and `text_nll` without eos with the characters those tokens cover
  (`metrics.bits_per_char`), so bits per character compare across families and tokenizers. The causal
  family scores left-padded batches and computes logits only for the reply positions (`logits_to_keep`).
- `lora_targets` / `lora_config` / `lora_trainable_parameters`: T5's self-attention q, k, v, o
  (`finetuning.SELF_ATTENTION_QKVO`, 1.8 M on t5-base as §4.1.3 reports) and a Llama-style model's
  q_proj, k_proj, v_proj, o_proj (1.38 M on SmolLM2-135M at r = 12).
- `prepare`: fit a tokenizer to a model (resize the embeddings when markers were added; a causal model
  without a pad token pads with eos, which the attention mask and the -100 labels hide).

Both families run any peft `PeftModel` the same way (`adapter_names` routes each row through its user's
adapter in one batch). Sizes of locally built causal models come from `llama_config` presets, as T5's from
`families.t5_config`: "test" is tiny, "smollm2-135m" the shape of SmolLM2-135M.

Where the pipeline asks (issue #11): `finetuning` (encode_pairs, domain_adapt, One-ID, run_users),
`multilora` (per-user losses via `token_losses`, LoRA targets), `generation` (greedy_generate and
reference_nll dispatch on `family_of(model)`; `RoutedAdapters` routes rows for both), `pretraining`'s
conditioning checks, and stage 02 (`model_family`: `build_base_model`, the family's `tokenize_pairs` and
`collator`; a causal Plain trained from scratch uses `NextTokenCollator`). Stages 03-06 read the family
from the saved checkpoints' configs.
"""

from __future__ import annotations

import re
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    set_seed,
)

from udg_lib.metrics import reference_chars
from udg_lib.encoding import (
    LABEL_PAD_ID,
    Seq2SeqExamples,
    _truncate_context,
    encode_sources,
    encode_targets,
    kept_context_start,
    split_prompt_head,
    tokenize_pairs,
)
from udg_lib.precision import Precision, autocast_for
from udg_lib.prompts import SEP
from udg_lib.llm import checkpoint_source


class LoraSettings(Protocol):
    """What `lora_config` reads of a fine-tuning config (`finetuning.FinetuneConfig` has these fields)."""

    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: Sequence[str] | str | None

# LoRA targets. §4.1.3 reports r = 12 and 1.8M trainable parameters on t5-base (d_model 768, 12+12 layers).
# With r = 12 each 768x768 projection adds 2 * 768 * 12 = 18,432 parameters, so on t5-base:
#   q, v in all attention (peft's T5 default)            72 matrices  1,327,104  (1.3M)
#   q, k, v in all attention                            108 matrices  1,990,656  (2.0M)
#   q, k, v, o in all attention                         144 matrices  2,654,208  (2.7M)
#   q, k, v, o in self-attention only (no cross-attn)    96 matrices  1,769,472  (1.8M)  <- the default
# Only the last rounds to the reported 1.8M, so it is T5's default; pass ("q", "v") for peft's usual choice.
# (`ModelFamily.lora_trainable_parameters` recomputes these from a config on the meta device.)
SELF_ATTENTION_QKVO = r".*\.SelfAttention\.(q|k|v|o)"  # a regex: peft full-matches a str against module names

# Llama-style shapes built from a config. "test": a tiny model for unit tests (GQA as SmolLM2: 4 query heads
# share 2 key/value heads). "smollm2-135m": HuggingFaceTB/SmolLM2-135M's shape (134.5M parameters with its
# 49,152-row vocabulary, tied embeddings), for size accounting and benchmarks without its weights.
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    "test": dict(hidden_size=192, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=48),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                         rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}),
}
SMOLLM2_VOCAB = 49152


# "t5-base" is the shape of t5-base and sonoisa/t5-base-japanese (T5 v1.0: ReLU feed-forward, tied
# embeddings; 222.9M parameters with a 32k vocabulary, §4.1.2's "222 M"). "cpu" (2.0M parameters with an 8k
# vocabulary, half of them the embeddings) was picked on a 2-core CPU: at equal training time (~200 s of
# dialogue pre-training) 2+2 layers of d_model 128 reached eval loss 6.16, 3+3 layers 6.66 and d_model 192 3+3
# layers 6.65; this small a budget favours more steps over a larger model. On that idle machine a batch of 32
# trains at ~0.34 s/step for span corruption (input 128, targets 29) and ~0.49 s/step for dialogue (128/48),
# evaluation and checkpoints included.
T5_PRESETS: dict[str, dict[str, Any]] = {
    "test": dict(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2),
    "cpu": dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4),
    "t5-base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12),
}


def t5_config(preset: str, vocab_size: int, **overrides: Any) -> T5Config:
    """A T5 v1.0 configuration at a preset size; `overrides` replace any field (e.g. dropout_rate=0.0).

    T5's token conventions: pad 0, eos 1, and the decoder starts from pad.
    """
    if preset not in T5_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(T5_PRESETS)}")
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        **T5_PRESETS[preset],
        relative_attention_num_buckets=32,
        dropout_rate=0.1,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=True,  # T5 v1.0: lm_head shares the input embeddings, outputs scaled by d_model^-0.5
    )
    fields.update(overrides)
    return T5Config(**fields)


def llama_config(preset: str, vocab_size: int, **overrides: Any) -> LlamaConfig:
    """A Llama-style causal LM configuration at a preset size; `overrides` replace any field.

    Token ids default to the project tokenizer's (pad 0, eos 1, no bos), as `families.t5_config`'s do.
    """
    if preset not in LLAMA_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(LLAMA_PRESETS)}")
    fields: dict[str, Any] = dict(vocab_size=vocab_size, **LLAMA_PRESETS[preset], max_position_embeddings=2048,
                                  tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    fields.update(overrides)
    return LlamaConfig(**fields)


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _module(model: Any) -> torch.nn.Module:
    """The model itself, or the base model under a router (`routing.RoutedAdapters`, not an `nn.Module`)."""
    return model if isinstance(model, torch.nn.Module) else model.model


def _routing(model: Any, adapter_names: Sequence[str] | None,
             batch: Sequence[int]) -> tuple[AbstractContextManager, dict]:
    """How a batch's rows reach their LoRA adapters: a router's `route` block (`routing.RoutedAdapters`: one
    routed pass per layer) or peft's mixed-batch `adapter_names` (a `PeftModel` holding the adapters)."""
    if adapter_names is None:
        return nullcontext(), {}
    names = [adapter_names[i] for i in batch]
    if not isinstance(model, torch.nn.Module):
        return model.route(names), {}
    return nullcontext(), {"adapter_names": names}


def _check_lengths(name: str, values: Sequence | None, n: int) -> None:
    if values is not None and len(values) != n:
        raise ValueError(f"{len(values)} {name} for {n} prompts")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def suffix_regex(targets: Sequence[str] | str) -> str:
    """peft `target_modules` as one full-match regex: a string stays as it is; a list of module-name suffixes
    becomes the regex that matches what peft matches for the list (the name itself or `....<suffix>`). peft
    keeps a list as a set and saves it in hash order, so a list would make adapter_config.json differ between
    processes (PYTHONHASHSEED); the regex is saved as written, byte-identical on every resume."""
    if isinstance(targets, str):
        return targets
    return r"(?:.*\.)?(?:" + "|".join(re.escape(t) for t in sorted(set(targets))) + ")"


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right",
                  length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): `sequences` padded with `pad_id` on `side` to `length` (default: the longest); mask 1 on
    the real tokens."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    length = max(len(s) for s in sequences) if length is None else length
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if not sequence:
            continue
        span = slice(0, len(sequence)) if side == "right" else slice(length - len(sequence), length)
        ids[row, span] = torch.tensor(list(sequence), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def _token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=LABEL_PAD_ID,
                                               reduction="none")
    return losses, labels != LABEL_PAD_ID


@dataclass(frozen=True)
class Decoding:
    """How prompts are cut, batched and read when a model generates or scores replies: every caller passes
    these together (stages 02-06; `UserPredictor`, `methods.Evaluation`)."""

    max_new_tokens: int = 48  # greedy reply length cap
    batch_size: int = 32  # rows per forward pass (batched by length)
    max_source_length: int = 128  # prompt tokens, cut as in training (`encode_sources`)
    max_target_length: int = 48  # reference tokens scored, eos included (`encode_targets`)
    precision: str | Precision = "fp32"  # the autocast of generation and scoring (`precision.autocast_for`)


class ReferenceScores(NamedTuple):
    """`reference_nll`'s per-sample arrays (nats; tokens of the model's tokenizer)."""

    nll: np.ndarray  # summed NLL of the scored reference tokens, eos included (the paper's perplexity)
    n_tokens: np.ndarray  # those tokens, eos included
    text_nll: np.ndarray  # the same sum without eos: the NLL of the reply's text alone
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


class VisibleContext(NamedTuple):
    """The dialogue history a fine-tuned system actually reads from one prompt (`ModelFamily.visible_contexts`)."""

    turns: tuple[str, ...]  # the context turns it reads, oldest first; whole turns as written in the context
    partial: bool  # the oldest turn shown is cut inside (only when the newest turn alone exceeds the budget)
    n_tokens: int  # the context tokens read (the [SEP]s between turns included), in the fine-tuned tokenizer


def seq2seq_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Pads inputs with the pad id and labels with -100; T5 derives decoder inputs from the labels."""
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=LABEL_PAD_ID, return_tensors="pt")


# ---------------------------------------------------------------------------------------------------------------
# The families


class ModelFamily(ABC):
    """What one model family does differently; one instance per family (`SEQ2SEQ`, `CAUSAL`)."""

    name: ClassVar[str]
    task_type: ClassVar[TaskType]  # peft's task for LoraConfig / get_peft_model
    auto_class: ClassVar[type]  # transformers' Auto class that loads and builds the family's models
    lora_targets: ClassVar[tuple[str, ...] | str]  # peft target_modules: suffixes, or one full-match regex

    @abstractmethod
    def encode_sources(self, sources: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_source_length: int,
                       one_id_prefix: bool = False) -> list[list[int]]:
        """Prompt token ids as the model reads them, at most `max_source_length` (end marker included)."""

    @abstractmethod
    def context_budget(self, tokenizer: PreTrainedTokenizerBase, max_source_length: int) -> int:
        """Tokens left for head + context in a prompt of `max_source_length` (the family's start and end
        markers taken out)."""

    def visible_contexts(self, contexts: Sequence[Sequence[str]], sources: Sequence[str],
                         tokenizer: PreTrainedTokenizerBase, max_source_length: int,
                         one_id_prefix: bool = False) -> list[VisibleContext]:
        """The turns of each context that `encode_sources` keeps from its prompt `sources[i]` (built from
        `contexts[i]` by `prompts.build_prompt`), by the same rule (`encoding.kept_context_start`): the head
        (One-ID, profile head) always, then the newest turns within the budget, oldest dropped first, whole;
        only a newest turn longer than the budget on its own is cut inside, and then it is returned as the
        decoded text of its kept tokens. Whole turns are returned as written in the context.

        Counted in the fine-tuned systems' tokenizer, whatever model reads the turns afterwards: the prompt
        LLMs of §4.2.2 (`baselines.shared_histories`) get exactly these turns, so both sides read the same
        words, even where the LLM's own tokenizer would count them differently.
        """
        if len(contexts) != len(sources):
            raise ValueError(f"{len(contexts)} contexts but {len(sources)} prompts")
        if len(sources) == 0:
            return []
        sep_id = tokenizer.convert_tokens_to_ids(SEP)
        budget = self.context_budget(tokenizer, max_source_length)
        heads, bodies = zip(*(split_prompt_head(s, one_id_prefix) for s in sources))
        head_ids = tokenizer(list(heads), add_special_tokens=False)["input_ids"]
        body_ids = tokenizer(list(bodies), add_special_tokens=False)["input_ids"]
        result = []
        for context, source, head, body in zip(contexts, sources, head_ids, body_ids):
            turns = [str(t).strip() for t in context]
            if turns and body.count(sep_id) != len(turns) - 1:
                raise ValueError(f"prompt {source[:80]!r}...: {body.count(sep_id) + 1} [SEP]-separated turns in its "
                                 f"context part but {len(turns)} context turns (a turn holding '{SEP}'?)")
            start = kept_context_start(head, body, budget, sep_id)
            if start is None or not turns:
                result.append(VisibleContext((), False, 0))
                continue
            kept = body[start:]
            whole = kept.count(sep_id) + (start == 0 or body[start - 1] == sep_id)
            shown = tuple(turns[len(turns) - whole:]) if whole else ()
            partial = start > 0 and body[start - 1] != sep_id
            if partial:  # a cut newest turn: the words of its kept tokens
                first = kept[:kept.index(sep_id)] if sep_id in kept else kept
                shown = (tokenizer.decode(first, skip_special_tokens=True).strip(), *shown)
            result.append(VisibleContext(shown, partial, len(kept)))
        return result

    @abstractmethod
    def tokenize_pairs(self, sources: Sequence[str], targets: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                       max_source_length: int, max_target_length: int,
                       one_id_prefix: bool = False) -> Seq2SeqExamples:
        """Training examples (items: input_ids, labels) with the loss on the reply tokens only."""

    @abstractmethod
    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[Sequence[Mapping[str, Any]]], dict]:
        """Examples -> a right-padded training batch (labels padded with -100)."""

    @abstractmethod
    def token_losses(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
        """(per-token cross-entropy, mask of the scored tokens) of a collated batch, one row per example:
        `model(**batch).loss` is their masked mean. For per-row losses (`multilora`'s per-user means)."""

    @torch.no_grad()
    def generate(self, model: Any, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
                 decoding: Decoding = Decoding(), *, adapter_names: Sequence[str] | None = None,
                 one_id_prefix: bool = False) -> list[str]:
        """Greedy replies in the order of `sources` (`generation.greedy_generate`'s contract): prompts encoded
        and cut as in training, batched by length, each batch routed to its rows' adapters and decoded by the
        family (`_generate_batch`) under the decoding's autocast."""
        _check_lengths("adapter names", adapter_names, len(sources))
        router, model = model, _module(model)
        was_training = model.training
        model.eval()
        encoded = self.encode_sources(list(sources), tokenizer, decoding.max_source_length, one_id_prefix)
        replies = [""] * len(encoded)
        for batch in _length_batches([len(e) for e in encoded], decoding.batch_size):
            route, kwargs = _routing(router, adapter_names, batch)
            with route, autocast_for(decoding.precision, _device(model)):  # every step sees these rows, in order
                texts = self._generate_batch(model, tokenizer, [encoded[i] for i in batch], decoding.max_new_tokens,
                                             kwargs)
            for i, text in zip(batch, texts):
                replies[i] = text
        model.train(was_training)
        return replies

    @abstractmethod
    def _generate_batch(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[list[int]],
                        max_new_tokens: int, kwargs: dict) -> list[str]:
        """One batch's greedy replies, stripped; `kwargs` go to `model.generate` (peft's adapter_names)."""

    @torch.no_grad()
    def reference_nll(self, model: Any, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
                      references: Sequence[str], decoding: Decoding = Decoding(), *,
                      adapter_names: Sequence[str] | None = None, one_id_prefix: bool = False) -> ReferenceScores:
        """Per-sample reply NLLs (`generation.reference_nll`'s contract): prompts and replies encoded and cut as
        in training, batched by length, each batch routed to its rows' adapters and scored by the family
        (`_score_batch`) under the decoding's autocast (log-probabilities in fp32, sums in fp64); `text_nll`
        leaves out each reply's final eos (`encode_targets` ends every one so)."""
        if len(sources) != len(references):
            raise ValueError(f"{len(sources)} sources but {len(references)} references")
        _check_lengths("adapter names", adapter_names, len(sources))
        router, model = model, _module(model)
        was_training = model.training
        model.eval()
        prompts = self.encode_sources(list(sources), tokenizer, decoding.max_source_length, one_id_prefix)
        targets = encode_targets(list(references), tokenizer, decoding.max_target_length)
        counts = np.array([len(t) for t in targets], dtype=np.int64)
        nll = np.zeros(len(prompts), dtype=np.float64)
        text_nll = np.zeros(len(prompts), dtype=np.float64)
        for batch in _length_batches([self._score_length(p, t) for p, t in zip(prompts, targets)],
                                     decoding.batch_size):
            route, kwargs = _routing(router, adapter_names, batch)
            with route, autocast_for(decoding.precision, _device(model)):
                sums, eos = self._score_batch(model, tokenizer, [prompts[i] for i in batch],
                                              [targets[i] for i in batch], kwargs)
            nll[batch] = sums.numpy()
            text_nll[batch] = (sums - eos).numpy()
        model.train(was_training)
        text_chars = _covered_chars(tokenizer, list(references), (counts - 1).tolist())
        return ReferenceScores(nll, counts, text_nll, text_chars)

    @abstractmethod
    def _score_length(self, prompt: list[int], target: list[int]) -> int:
        """The length `reference_nll` batches by: what one row of `_score_batch` costs."""

    @abstractmethod
    def _score_batch(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                     targets: list[list[int]], kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row (float64, on the CPU): the summed NLL of the target tokens, eos included, and the NLL of the
        final eos alone. `kwargs` go to the model's forward (peft's adapter_names)."""

    # --- shared by both families -----------------------------------------------------------------------------

    def lora_config(self, config: LoraSettings) -> LoraConfig:
        """peft's LoraConfig for `config` (r, alpha, dropout) on this family's targets.

        `config.lora_target_modules` overrides the targets, except for its default (T5's self-attention
        regex), which stands for "the family's own": it matches no module of a causal LM.
        """
        targets = config.lora_target_modules
        if targets is None or targets == SELF_ATTENTION_QKVO:
            targets = self.lora_targets
        return LoraConfig(task_type=self.task_type, r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, bias="none", target_modules=suffix_regex(targets))

    def lora_trainable_parameters(self, model_config: PretrainedConfig, config: LoraSettings) -> int:
        """Trainable LoRA parameters for a model of `model_config`, counted by peft on a weightless (meta) model."""
        with torch.device("meta"):
            model = self.auto_class.from_config(model_config)
        peft_model = get_peft_model(model, self.lora_config(config), low_cpu_mem_usage=True)
        return peft_model.get_nb_trainable_parameters()[0]

    def from_config(self, model_config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
        """A model with random weights drawn with `seed`."""
        set_seed(seed)
        return self.auto_class.from_config(model_config)

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        """Fit `tokenizer` and `model` to each other, in place: embeddings resized when the tokenizer has more
        ids than rows (markers added; spare rows are kept), the tokenizer's eos and pad ids checked or set."""
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{self.name} models need a tokenizer with an eos token (replies end with it)")
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        self._align_special_ids(model, tokenizer)
        return model

    @abstractmethod
    def _align_special_ids(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None: ...

    def __repr__(self) -> str:
        return f"<model family {self.name!r}>"


class Seq2SeqFamily(ModelFamily):
    """T5 and other encoder-decoders: today's code paths, unchanged."""

    name = "seq2seq"
    task_type = TaskType.SEQ_2_SEQ_LM
    auto_class = AutoModelForSeq2SeqLM
    lora_targets = SELF_ATTENTION_QKVO  # §4.1.3: r = 12 on self-attention q, k, v, o = 1.8M on t5-base

    def encode_sources(self, sources, tokenizer, max_source_length, one_id_prefix=False):
        return encode_sources(list(sources), tokenizer, max_source_length, one_id_prefix)

    def context_budget(self, tokenizer, max_source_length):
        return max_source_length - 1  # `</s>` ends every source

    def tokenize_pairs(self, sources, targets, tokenizer, max_source_length, max_target_length,
                       one_id_prefix=False):
        return tokenize_pairs(sources, targets, tokenizer, max_source_length, max_target_length, one_id_prefix)

    def collator(self, tokenizer):
        return seq2seq_collator(tokenizer)

    def token_losses(self, model, batch):
        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels)).logits
        return _token_cross_entropy(logits, labels)

    def _generate_batch(self, model, tokenizer, rows, max_new_tokens, kwargs):
        padded = tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(_device(model))
        output = model.generate(**padded, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, **kwargs)
        return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]

    def _score_length(self, prompt, target):
        return len(prompt)

    def _score_batch(self, model, tokenizer, prompts, targets, kwargs):
        device = _device(model)
        padded = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(device)
        labels = pad_sequences(targets, LABEL_PAD_ID)[0].to(device)
        logits = model(**padded, labels=labels, **kwargs).logits.float()
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=LABEL_PAD_ID,
                                                      reduction="none").double().cpu()
        eos = token_nll[torch.arange(len(targets)), torch.tensor([len(t) - 1 for t in targets])]
        return token_nll.sum(dim=1), eos

    def _align_special_ids(self, model, tokenizer):
        # T5 derives decoder inputs from pad (decoder_start_token_id): ids are the checkpoint's, never reset.
        for name in ("pad_token_id", "eos_token_id"):
            expected, actual = getattr(tokenizer, name), getattr(model.config, name)
            if expected is not None and actual != expected:
                raise ValueError(f"tokenizer {name}={expected} but model config has {actual}")


@dataclass(frozen=True)
class CausalCollator:
    """Causal examples -> input_ids, attention_mask, labels; right-padded (pad id / -100) for training."""

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_sequences([f["input_ids"] for f in features], self.pad_token_id)
        labels, _ = pad_sequences([f["labels"] for f in features], LABEL_PAD_ID, length=input_ids.shape[1])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass(frozen=True)
class NextTokenCollator:
    """Packed fixed-length token sequences (`pretraining.PackedSequences`) -> next-token training batches:
    labels are the inputs (transformers shifts them). The causal counterpart of T5's span corruption for a
    Plain model trained from scratch on the pre-training text."""

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([list(f["input_ids"]) for f in features], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


_STOP_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its size, its stop ids)


class CausalFamily(ModelFamily):
    """Decoder-only LMs (Llama, SmolLM2, Gemma, ...): source + separator + reply + eos in one sequence."""

    name = "causal"
    task_type = TaskType.CAUSAL_LM
    auto_class = AutoModelForCausalLM
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # Llama-style attention projections

    def __init__(self, separator: str = SEP):
        self.separator = separator  # between source and reply: the §3.4 turn marker (the reply is the next turn)

    def separator_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        ids = tokenizer(self.separator, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"separator {self.separator!r} encodes to no tokens")
        return ids

    @staticmethod
    def bos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """[bos] when the tokenizer itself starts every text with it (Gemma, Llama 2/3), else [] (SmolLM2 and
        the project's SentencePiece tokenizers): the model sees the start it was trained with."""
        bos = tokenizer.bos_token_id
        return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []

    def encode_sources(self, sources, tokenizer, max_source_length, one_id_prefix=False):
        """As `encoding.encode_sources`, with the separator where T5's source ends with `</s>` (and the
        tokenizer's bos first, if it adds one)."""
        if len(sources) == 0:
            return []
        start, end = self.bos_ids(tokenizer), self.separator_ids(tokenizer)
        budget = self.context_budget(tokenizer, max_source_length)
        sep_id = tokenizer.convert_tokens_to_ids(SEP)
        heads, bodies = zip(*(split_prompt_head(s, one_id_prefix) for s in sources))
        head_ids = tokenizer(list(heads), add_special_tokens=False)["input_ids"]
        body_ids = tokenizer(list(bodies), add_special_tokens=False)["input_ids"]
        return [start + _truncate_context(h, b, budget, sep_id) + end for h, b in zip(head_ids, body_ids)]

    def context_budget(self, tokenizer, max_source_length):
        markers = len(self.bos_ids(tokenizer)) + len(self.separator_ids(tokenizer))
        if max_source_length <= markers:
            raise ValueError(f"max_source_length={max_source_length} leaves no room beside the separator")
        return max_source_length - markers

    def tokenize_pairs(self, sources, targets, tokenizer, max_source_length, max_target_length,
                       one_id_prefix=False):
        """input_ids = source + separator + reply + eos; labels = -100 over source and separator, then the
        reply and eos (at most `max_target_length` tokens, as `encoding.encode_targets`)."""
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
        prompts = self.encode_sources(list(sources), tokenizer, max_source_length, one_id_prefix)
        replies = encode_targets(list(targets), tokenizer, max_target_length)
        return Seq2SeqExamples([p + r for p, r in zip(prompts, replies)],
                               [[LABEL_PAD_ID] * len(p) + r for p, r in zip(prompts, replies)])

    def collator(self, tokenizer):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: call CAUSAL.prepare(model, tokenizer) first")
        return CausalCollator(tokenizer.pad_token_id)

    def token_losses(self, model, batch):
        """Position t predicts token t + 1 (transformers' shift): rows are one shorter than the batch."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return _token_cross_entropy(logits[:, :-1], batch["labels"][:, 1:])

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Ids that end a reply: eos, a one-token separator, and every token whose text holds a newline."""
        cached = _STOP_IDS.get(tokenizer)
        if cached is not None and cached[0] == len(tokenizer):
            return cached[1]
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        stops = {tokenizer.eos_token_id, *(i for i, text in enumerate(texts) if "\n" in text)}
        separator = self.separator_ids(tokenizer)
        if len(separator) == 1:
            stops.add(separator[0])
        ids = sorted(stops)
        _STOP_IDS[tokenizer] = (len(tokenizer), ids)
        return ids

    def _generate_batch(self, model, tokenizer, rows, max_new_tokens, kwargs):
        """Greedy, stopped by `stop_token_ids`; the first token is never a stop token (`min_new_tokens=1`).
        A reply is the next turn and no training reply is empty; but a chat-tuned base (SmolLM2-Instruct)
        often ends the conversation (eos) right after a long context turn, which would score as an empty
        reply that says nothing about the replies the model would give. Degenerate text still counts as such
        (`metrics.generation_health`)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids, attention_mask = pad_sequences(rows, pad, side="left")
        device = _device(model)
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=1,
                                eos_token_id=self.stop_token_ids(tokenizer), pad_token_id=pad, **kwargs)
        new_tokens = output[:, input_ids.shape[1]:]
        return [text.split("\n", 1)[0].strip()
                for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def _score_length(self, prompt, target):
        return len(prompt) + len(target)

    def _score_batch(self, model, tokenizer, prompts, targets, kwargs):
        """Left-padded rows: every row ends with its reply's eos, so the logits of the last (longest reply + 1)
        positions cover every row's reply tokens; only those are computed (`logits_to_keep`)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = _device(model)
        input_ids, attention_mask = pad_sequences([p + t for p, t in zip(prompts, targets)], pad, side="left")
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as `generate` does for left padding
        longest = max(len(t) for t in targets)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       position_ids=position_ids.to(device), logits_to_keep=longest + 1, **kwargs).logits.float()
        labels = input_ids[:, -longest:].clone()  # the tokens that logits[:, :-1] predict
        for row, target in enumerate(targets):
            labels[row, : longest - len(target)] = LABEL_PAD_ID  # source (or padding), not scored
        token_nll = torch.nn.functional.cross_entropy(
            logits[:, -longest - 1:-1].transpose(1, 2), labels.to(device), ignore_index=LABEL_PAD_ID,
            reduction="none").double().cpu()
        return token_nll.sum(dim=1), token_nll[:, -1]  # the last token is each row's eos

    def _align_special_ids(self, model, tokenizer):
        # Causal LMs pad only to batch: without a pad token, eos pads (hidden by the mask and the -100 labels).
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        for config in (model.config, getattr(model, "generation_config", None)):
            if config is not None:
                config.pad_token_id = tokenizer.pad_token_id
                config.eos_token_id = tokenizer.eos_token_id


SEQ2SEQ = Seq2SeqFamily()
CAUSAL = CausalFamily()
FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SEQ2SEQ, CAUSAL)}


def get_family(name: str) -> ModelFamily:
    """The family named `name` ("seq2seq" or "causal"), e.g. from a notebook parameter."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {tuple(FAMILIES)}")
    return FAMILIES[name]


def family_of(model_or_config: torch.nn.Module | PretrainedConfig) -> ModelFamily:
    """The family of a model (a peft `PeftModel` too) or config, read as transformers does: encoder-decoder
    configs are seq2seq, every other one causal."""
    config = model_or_config if isinstance(model_or_config, PretrainedConfig) else getattr(model_or_config,
                                                                                           "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"{type(model_or_config).__name__} has no transformers config to read the family from")
    return SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else CAUSAL


def build_model(config_or_checkpoint: PretrainedConfig | str | Path, tokenizer: PreTrainedTokenizerBase,
                seed: int = 0) -> PreTrainedModel:
    """A model of either family fitted to `tokenizer` (`ModelFamily.prepare`): random weights drawn with `seed`
    for a config (`families.t5_config`, `llama_config`), else a checkpoint folder, hub id or packaged LLM
    short name (`load_model`). The pipeline's one way to get a model, whatever its family."""
    if isinstance(config_or_checkpoint, PretrainedConfig):
        model = family_of(config_or_checkpoint).from_config(config_or_checkpoint, seed)
    else:
        model = load_model(config_or_checkpoint)
    return family_of(model).prepare(model, tokenizer)


def build_base_model(family: str | ModelFamily, checkpoint: str | Path, preset: str,
                     tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """Stage 02's starting model (§4.1.2's Plain): `checkpoint` as shipped when given (it must be of `family`),
    else `family`'s `preset` shape from scratch (`families.t5_config` / `llama_config`), sized to `tokenizer`."""
    family = get_family(family) if isinstance(family, str) else family
    if checkpoint:
        model = build_model(checkpoint, tokenizer, seed)
        if family_of(model) is not family:
            raise ValueError(f"checkpoint {str(checkpoint)!r} is a {family_of(model).name} model but model_family is "
                             f"{family.name!r}; set model_family to {family_of(model).name!r} or pick another checkpoint")
        return model
    config = t5_config(preset, len(tokenizer)) if family is SEQ2SEQ else llama_config(preset, len(tokenizer))
    return build_model(config, tokenizer, seed)


def load_model(path_or_id: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A checkpoint (folder, hub id, or a packaged LLM's short name such as "smollm2", see
    `udg_lib.llm.PACKAGED_LLMS`) through its family's Auto class, in eval mode."""

    source = str(checkpoint_source(path_or_id))
    family = family_of(AutoConfig.from_pretrained(source))
    return family.auto_class.from_pretrained(source, dtype=dtype).eval()
