"""The four pre-trained models of §4.1.2: Plain T5 (span corruption) and Plain / PSP / PPP Dialogue.

- Model: a T5 encoder-decoder (§3.4: "Transformer encoder-decoder"), from scratch at a preset size
  (`families.t5_config`) or from a checkpoint such as sonoisa/t5-base-japanese (`build_model`).
- Plain T5: T5's span-corruption objective on the pre-training dialogues' turns
  (`udg_lib.data.prepare.pretraining_texts`, `pack_texts_for_span_corruption`, `SpanCorruptionCollator`):
  a general language model with no dialogue objective.
- Plain / PSP / PPP Dialogue: context -> response on the pre-training reply pairs, with the §3.4 prompts
  (`tokenize_pairs` + `transformers.DataCollatorForSeq2Seq`).
- `pretrain` runs Hugging Face's `Seq2SeqTrainer` (so `accelerate launch` / `torchrun` work unchanged), resumes
  from its last checkpoint, and saves the model with `save_pretrained`.
- Checks that a profile-aware model uses the profile: `profile_swap_change_rate`, `profile_perplexity_gap` (a
  one-sided paired test on the pairs whose profile a shuffle changes, `reads_profiles`), and how many prompts
  carry a known profile at all (`known_profile_share`, `evaluation_prompt_profile_share`).

T5's tokenization lives in `udg_lib.encoding` (`encode_sources`, `tokenize_pairs`), its shapes in
`families.t5_config`; a causal LM goes through `udg_lib.families` (its `tokenize_pairs`, collators and
`build_base_model`) into the same `pretrain`, and the conditioning checks work for both families.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch.utils.data import Dataset
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    set_seed,
)
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import get_last_checkpoint

from udg_lib import io
from udg_lib.precision import resolve_precision, training_attention
from udg_lib.data.schema import PROFILE_FIELDS, has_known_profile, profile_lookup  # noqa: F401 (has_known_profile: used by notebook 02)
from udg_lib.encoding import LABEL_PAD_ID
from udg_lib.families import Decoding
from udg_lib.generation import greedy_generate, reference_nll
from udg_lib.prompts import build_prompt, build_prompts, render_profile

CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
LOG_HISTORY_FILE = "log_history.json"
TRAINER_STATE_FILE = "trainer_state.json"  # inside each checkpoint (transformers.trainer.TRAINER_STATE_NAME)

# ---------------------------------------------------------------------------------------------------------------
# Model

def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def build_model(config_or_checkpoint: T5Config | str | Path, tokenizer: PreTrainedTokenizerBase,
                seed: int = 0) -> T5ForConditionalGeneration:
    """A T5 from scratch (for a config; weights drawn with `seed`) or from a checkpoint folder or hub id.

    The embeddings are resized only when `len(tokenizer)` exceeds their rows: T5 checkpoints carry spare rows
    (32128 for 32100 pieces), and shrinking would drop them.
    """
    if isinstance(config_or_checkpoint, T5Config):
        set_seed(seed)
        model = T5ForConditionalGeneration(config_or_checkpoint)
    else:
        model = T5ForConditionalGeneration.from_pretrained(str(config_or_checkpoint))
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
    for name in ("pad_token_id", "eos_token_id"):
        expected, actual = getattr(tokenizer, name), getattr(model.config, name)
        if expected is not None and actual != expected:
            raise ValueError(f"tokenizer {name}={expected} but model config has {actual}")
    return model


# ---------------------------------------------------------------------------------------------------------------
# Span corruption (Plain T5): Raffel et al. 2020, §3.1.4 / t5.data.preprocessors.span_corruption


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                            rng: np.random.Generator | None = None) -> np.ndarray:
    """Boolean mask of `length` with about `noise_density` of it True, in spans averaging the given length.

    A port of T5's `random_spans_noise_mask` (as in Hugging Face's run_t5_mlm_flax.py), with T5's order of
    operations: the non-noise count is taken after the noise count is clipped to [1, length - 1] (the flax
    script takes it before, which can index past the end for very short sequences). Spans alternate
    non-noise, noise, ..., so the mask always starts with a non-noise token.
    """
    rng = rng if rng is not None else np.random.default_rng()
    if noise_density == 0.0:
        return np.zeros(length, dtype=bool)
    orig_length = length
    length = max(length, 2)  # avoid degeneracy
    num_noise_tokens = int(np.round(length * noise_density))
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)  # at least one noise and one non-noise token
    num_nonnoise_tokens = length - num_noise_tokens
    # As the flax port: no more spans than either kind of token, so no span is empty (matters only above
    # noise_density 0.5).
    num_noise_spans = int(np.round(min(num_noise_tokens, num_nonnoise_tokens) / mean_noise_span_length))
    num_noise_spans = max(num_noise_spans, 1)

    def random_segmentation(num_items: int, num_segments: int) -> np.ndarray:
        """Split `num_items` into `num_segments` non-empty segments at random; returns their lengths."""
        mask_indices = np.arange(num_items - 1) < (num_segments - 1)
        rng.shuffle(mask_indices)
        first_in_segment = np.pad(mask_indices, [[1, 0]])
        segment_id = np.cumsum(first_in_segment)
        _, segment_length = np.unique(segment_id, return_counts=True)
        return segment_length

    noise_span_lengths = random_segmentation(num_noise_tokens, num_noise_spans)
    nonnoise_span_lengths = random_segmentation(num_nonnoise_tokens, num_noise_spans)
    interleaved_span_lengths = np.reshape(np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1),
                                          [num_noise_spans * 2])
    span_starts = np.cumsum(interleaved_span_lengths)[:-1]
    span_start_indicator = np.zeros((length,), dtype=np.int8)
    span_start_indicator[span_starts] = True
    span_num = np.cumsum(span_start_indicator)
    is_noise = np.equal(span_num % 2, 1)
    return is_noise[:orig_length]


def span_corruption_lengths(input_length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(raw tokens per sequence, target length) so that the corrupted input is exactly `input_length` long.

    T5's `random_spans_helper` (run_t5_mlm_flax.py's `compute_input_and_target_lengths`): pack raw sequences
    of the first length; inputs then hold the non-noise tokens, one sentinel per span and `</s>`.
    """
    def lengths_after_corruption(tokens_length: int) -> tuple[int, int]:
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1

    tokens_length = input_length
    while lengths_after_corruption(tokens_length + 1)[0] <= input_length:
        tokens_length += 1
    _, targets_length = lengths_after_corruption(tokens_length)
    if noise_density == 0.5 and targets_length > input_length:  # T5's hack: targets no longer than inputs
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


class PackedSequences(Dataset):
    """Fixed-length token id sequences (rows of a 2-D array) for span corruption, optionally repeated.

    Item `i` is row `i % n` with `mask_draw = i // n`: with `repeats` > 1 every row appears that many times
    per pass, each time with its own noise mask (see `SpanCorruptionCollator`). A slice selects rows and
    keeps `repeats`: `packed[:100]` / `packed[100:]` split off an evaluation set.
    """

    def __init__(self, sequences: np.ndarray, repeats: int = 1):
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.sequences = np.asarray(sequences, dtype=np.int64)
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.sequences) * self.repeats

    def __getitem__(self, index: int | slice) -> dict[str, Any] | PackedSequences:
        if isinstance(index, slice):
            return PackedSequences(self.sequences[index], self.repeats)
        if not 0 <= index < len(self):
            raise IndexError(index)
        row, draw = index % len(self.sequences), index // len(self.sequences)
        return {"input_ids": self.sequences[row].tolist(), "mask_draw": draw}


def pack_texts_for_span_corruption(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                                   length: int, repeats: int = 1) -> PackedSequences:
    """Tokenize `texts` without `</s>`, concatenate them in order and cut into `length`-token sequences.

    As T5 packs C4 (reduce_concat_tokens + split_tokens): no separator between texts; the incomplete last
    chunk is dropped. `length` is the raw length, the first value of `span_corruption_lengths`. Pass
    `repeats` > 1 when training will take more than one pass, so each pass draws new masks.
    """
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    flat = np.fromiter((t for seq in ids for t in seq), dtype=np.int64)
    n_sequences = len(flat) // length
    return PackedSequences(flat[: n_sequences * length].reshape(n_sequences, length), repeats)


def sentinel_ids(tokenizer: PreTrainedTokenizerBase, n: int | None = None) -> list[int]:
    """Ids of `<extra_id_0>`, `<extra_id_1>`, ... looked up by name (their ids need not descend as in T5)."""
    vocab = tokenizer.get_vocab()
    ids = []
    while n is None or len(ids) < n:
        token = f"<extra_id_{len(ids)}>"
        if token not in vocab:
            if n is not None:
                raise ValueError(f"tokenizer has no {token}; it has {len(ids)} sentinels, {n} needed")
            break
        ids.append(vocab[token])
    return ids


def _stable_seed(seed: int, draw: int, ids: np.ndarray) -> int:
    digest = hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=8,
                             key=f"{seed}:{draw}".encode()).digest()
    return int.from_bytes(digest, "little")


@dataclass
class SpanCorruptionCollator:
    """Raw token id sequences -> T5 span-corruption batches (input_ids, attention_mask, labels).

    Each noise span is replaced in the input by the next sentinel; the labels list each sentinel followed by
    the tokens it hides, then `</s>`; the input ends with `</s>` too. Padding: pad id in inputs, -100 in labels.

    The mask of a sequence is a function of (`seed`, its tokens, the item's `mask_draw`) rather than of a
    stateful generator, so a run resumed from a checkpoint sees exactly the masks an uninterrupted run would.
    The price: a second pass over the same `PackedSequences` repeats its masks (static masking, as BERT's
    original data); build it with `repeats` = the number of passes to draw fresh ones instead.
    """

    tokenizer: PreTrainedTokenizerBase
    input_length: int  # corrupted input length, `</s>` included (batches are padded to their longest)
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    seed: int = 0
    sentinels: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sentinels = sentinel_ids(self.tokenizer)
        if not self.sentinels:
            raise ValueError("the tokenizer has no <extra_id_N> sentinels")

    def corrupt(self, ids: Sequence[int], draw: int = 0) -> tuple[list[int], list[int]]:
        """(input ids, label ids) for one raw sequence."""
        ids = np.asarray(ids, dtype=np.int64)
        rng = np.random.default_rng(_stable_seed(self.seed, draw, ids))
        noise = random_spans_noise_mask(len(ids), self.noise_density, self.mean_noise_span_length, rng)
        inputs, labels = [], []
        span = -1
        for position, (token, is_noise) in enumerate(zip(ids.tolist(), noise)):
            if is_noise:
                if position == 0 or not noise[position - 1]:
                    span += 1
                    if span >= len(self.sentinels):
                        raise ValueError(f"{span + 1} noise spans but only {len(self.sentinels)} sentinels")
                    inputs.append(self.sentinels[span])
                    labels.append(self.sentinels[span])
                labels.append(token)
            else:
                inputs.append(token)
        eos = self.tokenizer.eos_token_id
        return inputs + [eos], labels + [eos]

    def __call__(self, features: Sequence[Mapping[str, Any] | Sequence[int]]) -> dict[str, torch.Tensor]:
        pairs = [self.corrupt(f["input_ids"], int(f.get("mask_draw", 0))) if isinstance(f, Mapping)
                 else self.corrupt(f) for f in features]
        longest = max(len(inputs) for inputs, _ in pairs)
        if longest > self.input_length:
            raise ValueError(f"a corrupted input has {longest} tokens > input_length={self.input_length}; pack "
                             f"sequences of span_corruption_lengths({self.input_length}, ...)[0] tokens")
        longest_labels = max(len(labels) for _, labels in pairs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(pairs), longest), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(pairs), longest), dtype=torch.long)
        labels = torch.full((len(pairs), longest_labels), LABEL_PAD_ID, dtype=torch.long)
        for row, (inputs, targets) in enumerate(pairs):
            input_ids[row, : len(inputs)] = torch.tensor(inputs)
            attention_mask[row, : len(inputs)] = 1
            labels[row, : len(targets)] = torch.tensor(targets)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}



# ---------------------------------------------------------------------------------------------------------------
# Dialogue pre-training (Plain / PSP / PPP Dialogue): context -> response


def holdout_dialogues(pairs: pd.DataFrame, fraction: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held-out) pairs, split by whole dialogues so held-out contexts are never trained on."""
    dialogues = np.array(sorted(pairs["dialogue_id"].unique()))
    rng = np.random.default_rng(seed)
    n_heldout = max(1, round(fraction * len(dialogues))) if fraction > 0 else 0
    heldout = set(rng.permutation(dialogues)[:n_heldout].tolist())
    mask = pairs["dialogue_id"].isin(heldout)
    return pairs[~mask].reset_index(drop=True), pairs[mask].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class PretrainConfig:
    max_steps: int = 100  # optimizer steps
    per_device_batch_size: int = 32  # train and eval batch per device
    learning_rate: float = 1e-3  # AdamW peak; from scratch. Use ~1e-4 when continuing a pretrained checkpoint
    warmup_ratio: float = 0.05  # linear warmup over this fraction of max_steps, then linear decay
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    eval_steps: int = 50  # evaluate (eval loss) every N steps; ignored without an eval set
    save_steps: int = 50  # checkpoint every N steps, under output_dir/checkpoints/
    save_total_limit: int | None = 2  # checkpoints kept (oldest deleted)
    logging_steps: int = 10  # train loss logged every N steps
    seed: int = 0  # Trainer seed: data order, dropout
    # "fp32", "bf16" or "auto" (`precision.resolve_precision`): bf16 = the Trainer's bf16 mixed precision (autocast,
    # fp32 master weights) on a GPU or a CPU; "auto" picks it where the device multiplies bf16 natively. TF32 on CUDA.
    precision: str = "fp32"
    # Batches of similar lengths (the Trainer's "group_by_length" sampler, seeded) for variable-length reply
    # pairs; packed span-corruption sequences are all one length, so it changes nothing there.
    group_by_length: bool = True
    max_source_length: int = 128  # prompt tokens, </s> included: for tokenize_pairs (dialogue models)
    max_target_length: int = 48  # reply tokens, </s> included: for tokenize_pairs (dialogue models)
    gradient_accumulation_steps: int = 1
    dataloader_num_workers: int = 0  # 0 on small CPU machines: workers compete with the math threads
    optim: str = "adamw_torch"
    use_cpu: bool = False  # train on CPU even where a GPU is visible (e.g. bitwise-reproducible tests)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _training_arguments(output_dir: Path, config: PretrainConfig, has_eval: bool) -> Seq2SeqTrainingArguments:
    on_gpu = torch.cuda.is_available() and not config.use_cpu
    precision = resolve_precision(config.precision, "cuda" if on_gpu else "cpu")
    return Seq2SeqTrainingArguments(
        output_dir=str(output_dir / CHECKPOINTS_DIR),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_batch_size,
        per_device_eval_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        # transformers 5 dropped `warmup_ratio`: a float in [0, 1) given as warmup_steps is a ratio.
        warmup_steps=float(config.warmup_ratio) if 0 < config.warmup_ratio < 1 else int(config.warmup_ratio),
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler_type,
        optim=config.optim,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps if has_eval else None,
        prediction_loss_only=True,  # the loss only: no logits kept across the eval set
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        seed=config.seed,
        bf16=precision.bf16,
        tf32=precision.tf32 or None,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=on_gpu,  # pinning without an accelerator only warns
        report_to=[],
        disable_tqdm=False,
        predict_with_generate=False,
        # Keep every item key for the collator (`mask_draw`): the datasets here hold model inputs only.
        remove_unused_columns=False,
        use_cpu=config.use_cpu or not on_gpu,  # the Trainer runs bf16 on a CPU only when told it is one
    )


def save_model_atomically(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """`save_pretrained` (model + tokenizer) into a temp folder beside `target`, then rename it into place."""
    with io.staged_dir(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def pretrain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train_dataset: Dataset,
             eval_dataset: Dataset | None, data_collator: Any, output_dir: str | Path,
             config: PretrainConfig) -> dict[str, Any]:
    """Train with `Seq2SeqTrainer`; resume from the newest checkpoint in `output_dir/checkpoints/` if any.

    Writes `output_dir/model/` (save_pretrained: model + tokenizer, atomically) and
    `output_dir/log_history.json` (the Trainer's log: train loss, eval loss, learning rate per step; it
    includes the steps before a resume). Returns a summary; `seconds` and `examples_per_second` cover the
    steps run by this call only. Dataset items reach `data_collator` whole (`remove_unused_columns=False`),
    so they should hold model inputs only, as `Seq2SeqExamples` and `PackedSequences` do.
    """
    output_dir = Path(output_dir)
    (output_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    last_checkpoint = get_last_checkpoint(str(output_dir / CHECKPOINTS_DIR))
    start_step = _checkpoint_step(last_checkpoint)
    if last_checkpoint and start_step >= config.max_steps:
        # Finished before (killed while saving the model?): transformers 5 would run one more step on resume.
        model = type(model).from_pretrained(last_checkpoint)
    args = _training_arguments(output_dir, config, eval_dataset is not None)
    trainer = Seq2SeqTrainer(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=tokenizer)
    started = time.perf_counter()
    if last_checkpoint and start_step >= config.max_steps:
        trainer.state = TrainerState.load_from_json(str(Path(last_checkpoint) / TRAINER_STATE_FILE))
        train_loss = float("nan")
    else:
        with training_attention(model, args.device):  # eager attention on a CPU (see precision.py)
            train_loss = trainer.train(resume_from_checkpoint=last_checkpoint).training_loss
    train_seconds = time.perf_counter() - started

    state = trainer.state
    eval_loss = None
    if eval_dataset is not None:
        logged = [e for e in state.log_history if "eval_loss" in e and e.get("step") == state.global_step]
        eval_loss = logged[-1]["eval_loss"] if logged else trainer.evaluate()["eval_loss"]
    train_losses = [e["loss"] for e in state.log_history if "loss" in e]
    examples = (state.global_step - start_step) * config.per_device_batch_size \
        * config.gradient_accumulation_steps * max(1, args.world_size)

    if trainer.is_world_process_zero():
        save_model_atomically(trainer.model, tokenizer, output_dir / MODEL_DIR)
        io.write_json(output_dir / LOG_HISTORY_FILE, state.log_history)
    trainer.accelerator.wait_for_everyone()
    return {
        "train_loss": float(train_loss),  # mean over this call's steps (NaN if none ran)
        "last_logged_train_loss": float(train_losses[-1]) if train_losses else None,
        "eval_loss": float(eval_loss) if eval_loss is not None else None,
        "steps": int(state.global_step),
        "resumed_from_step": start_step if last_checkpoint else None,
        "seconds": round(train_seconds, 2),
        "examples_per_second": round(examples / train_seconds, 2) if train_seconds > 0 else None,
        "steps_per_second": round((state.global_step - start_step) / train_seconds, 4) if train_seconds > 0 else None,
        "n_parameters": count_parameters(trainer.model),
        "model_dir": str(output_dir / MODEL_DIR),
        "config": config.as_dict(),
    }


def _checkpoint_step(checkpoint: str | None) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[-1]) if checkpoint else 0


def load_log_history(output_dir: str | Path) -> list[dict]:
    return json.loads((Path(output_dir) / LOG_HISTORY_FILE).read_text(encoding="utf-8"))


def plot_loss_curves(log_histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """Train and eval loss vs step, one panel per model, from saved `log_history.json` contents."""
    n = max(1, len(log_histories))
    figure = Figure(figsize=(4.0 * n, 3.2), layout="constrained")
    axes = figure.subplots(1, n, squeeze=False)[0]
    for axis, (name, history) in zip(axes, log_histories.items()):
        train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
        evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e]
        if train:
            axis.plot(*zip(*train), label="train", linewidth=1.2)
        if evals:
            axis.plot(*zip(*evals), label="eval", marker="o", markersize=3, linewidth=1.2)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend()
    axes[0].set_ylabel("loss (token cross-entropy)")
    return figure


# ---------------------------------------------------------------------------------------------------------------
# Profile conditioning checks (does a PSP / PPP model use the profile?)


def _batches(indices: Sequence[int], batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield indices[start: start + batch_size]


def _on_device(model: PreTrainedModel, device: str | torch.device | None) -> PreTrainedModel:
    """`model` moved to `device` (in place, as `Module.to` moves it); where it is when `device` is None. The
    families put each batch's inputs on the model's device."""
    return model if device is None else model.to(device)


def greedy_replies(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
                   decoding: Decoding = Decoding(), *, device: str | torch.device | None = None) -> list[str]:
    """Greedy decoding in the order of `sources`, for either model family (`generation.greedy_generate`), on
    `device` (the model is moved there; None: where it is) as `decoding` says."""
    return greedy_generate(_on_device(model, device), tokenizer, sources, decoding)


def profile_swap_table(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: pd.DataFrame,
                       users: pd.DataFrame, fmt: str, seed: int = 0, decoding: Decoding = Decoding(), *,
                       device: str | torch.device | None = None) -> pd.DataFrame:
    """Per held-out context of `pairs` (a sample: stage 02 draws it), the greedy reply with the true speaker
    profile and with another user's, in an order shuffled with `seed`.

    The replies are decoded on `device` (the model is moved there; None: where it is; stage 02 passes its
    GPU) as `decoding` says (`greedy_replies`).

    The other user is drawn uniformly among those whose rendered profile differs from the speaker's; for
    PPP only the speaker's profile ([USER1]) is swapped. Contexts whose speaker has no such user are left
    out (e.g. when every profile is unknown). One row per context: pair_id, speaker_id, swap_user_id,
    source, swapped_source, reply, swapped_reply, changed.
    """
    if fmt not in ("psp", "ppp"):
        raise ValueError(f"profile swaps need a profile prompt ('psp' or 'ppp'), got {fmt!r}")
    profiles = profile_lookup(users)
    user_ids = np.array(sorted(profiles))
    rendered = np.array([render_profile(profiles[u]) for u in user_ids], dtype=object)
    rng = np.random.default_rng(seed)
    sample = pairs.iloc[rng.permutation(len(pairs))]
    rows = []
    for row in sample.itertuples():
        speaker_profile = profiles.get(row.speaker_id)
        candidates = np.flatnonzero(rendered != render_profile(speaker_profile))
        if len(candidates) == 0:
            continue
        swap_user = str(user_ids[rng.choice(candidates)])
        partner_profile = profiles.get(row.partner_id)
        rows.append({
            "pair_id": row.pair_id,
            "speaker_id": row.speaker_id,
            "swap_user_id": swap_user,
            "source": build_prompt(fmt, list(row.context), speaker_profile, partner_profile),
            "swapped_source": build_prompt(fmt, list(row.context), profiles[swap_user], partner_profile),
        })
    table = pd.DataFrame(rows, columns=["pair_id", "speaker_id", "swap_user_id", "source", "swapped_source"])
    replies = greedy_replies(model, tokenizer, table["source"].tolist() + table["swapped_source"].tolist(),
                             decoding, device=device)
    table["reply"] = replies[: len(table)]
    table["swapped_reply"] = replies[len(table):]
    table["changed"] = table["reply"] != table["swapped_reply"]
    return table


def profile_swap_change_rate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                             pairs: pd.DataFrame, users: pd.DataFrame, fmt: str, seed: int = 0,
                             **kwargs: Any) -> float:
    """Fraction of held-out contexts whose greedy reply changes when the speaker profile is swapped.

    NaN when no context has a differing profile to swap in. See `profile_swap_table` for the per-context rows.
    """
    table = profile_swap_table(model, tokenizer, pairs, users, fmt, seed, **kwargs)
    return float(table["changed"].mean()) if len(table) else float("nan")


def reply_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
                 targets: Sequence[str], decoding: Decoding = Decoding(), *,
                 device: str | torch.device | None = None):
    """Per reply: summed NLL and token count, eos included (`generation.reference_nll`, either family), on
    `device` (the model is moved there; None: where it is) as `decoding` says."""
    return reference_nll(_on_device(model, device), tokenizer, list(sources), list(targets), decoding)


def reply_perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
                     targets: Sequence[str], decoding: Decoding = Decoding(), *,
                     device: str | torch.device | None = None) -> float:
    """Token-level perplexity of the replies: exp(total NLL / total target tokens, eos included)."""
    scores = reply_scores(model, tokenizer, sources, targets, decoding, device=device)
    total = int(scores.n_tokens.sum())
    return math.exp(float(scores.nll.sum()) / total) if total else float("nan")


def shuffle_profiles(users: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The users with their profiles permuted (seeded) among the users that have a known profile: each
    of them gets some profiled user's profile; all-unknown users keep theirs (swapping unknowns is no test)."""
    known = has_known_profile(users).to_numpy()
    rows = np.flatnonzero(known)
    permutation = np.random.default_rng(seed).permutation(len(rows))
    shuffled = users.copy()
    values = users[list(PROFILE_FIELDS)].to_numpy()
    values[rows] = values[rows[permutation]]
    shuffled[list(PROFILE_FIELDS)] = values
    return shuffled


def profile_changing_pairs(pairs: pd.DataFrame, users: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The pairs whose speaker has a known profile that `shuffle_profiles(users, seed)` changes: only their
    prompts differ between true and shuffled profiles, so only they can show a model reading its profile (the
    others would add zero differences and dilute the test)."""
    true = profile_lookup(users)
    shuffled = profile_lookup(shuffle_profiles(users, seed))
    known = set(users.loc[has_known_profile(users), "user_id"])
    keep = [speaker in known and render_profile(true[speaker]) != render_profile(shuffled[speaker])
            for speaker in pairs["speaker_id"]]
    return pairs[np.asarray(keep, dtype=bool)]


def known_profile_share(pairs: pd.DataFrame, users: pd.DataFrame, fmt: str = "psp") -> float:
    """Share of the pairs whose `fmt` prompt shows at least one known profile field: the speaker's for PSP,
    the speaker's or the partner's for PPP (users missing from `users` count as unknown); NaN without pairs."""
    if fmt not in ("psp", "ppp"):
        raise ValueError(f"only profile prompts ('psp', 'ppp') carry profiles, got {fmt!r}")
    if not len(pairs):
        return float("nan")
    known = set(users.loc[has_known_profile(users), "user_id"])
    shown = pairs["speaker_id"].isin(known)
    if fmt == "ppp":
        shown |= pairs["partner_id"].isin(known)
    return float(shown.mean())


def evaluation_prompt_profile_share(eval_pairs: pd.DataFrame, users_by_set: Mapping[Any, pd.DataFrame]) -> float:
    """Share of the evaluation users' test prompts (`split == "test"`) whose PSP profile shows a known field,
    each split set's pairs read with that set's users table, keyed by the `split_set` column's values (stage 01:
    profiles from the users' training turns only, as the fine-tuned PSP systems see them); NaN without tests."""
    test = eval_pairs[eval_pairs["split"] == "test"]
    known = sum(known_profile_share(group, users_by_set[split_set]) * len(group)
                for split_set, group in test.groupby("split_set"))
    return float(known / len(test)) if len(test) else float("nan")


def profile_reading_test(nll_diff: Sequence[float] | np.ndarray, alpha: float = 0.05,
                         n_resamples: int = 999) -> dict[str, float | bool]:
    """Does a model read its profile? One-sided paired test on per-reply NLL differences (shuffled minus true
    profile, nats per token): the mean with its 95% bootstrap CI, the Wilcoxon signed-rank p for "shuffled
    scores worse" (`alternative="greater"`), and `reads_profiles` = p < `alpha` and CI low > 0. NaN (and
    False) below 2 pairs or when every difference is zero."""
    from udg_lib import stats  # imported here: statsmodels is not needed for pre-training itself

    diff = np.asarray(nll_diff, dtype=float)
    enough = len(diff) >= 2 and bool(np.any(diff != 0))
    low, high = stats.bootstrap_mean_ci(diff, n_resamples=n_resamples) if enough else (float("nan"), float("nan"))
    p = stats.signed_rank_test(diff, alternative="greater") if enough else float("nan")
    return {"n_pairs": int(len(diff)), "nll_diff_mean": float(diff.mean()) if len(diff) else float("nan"),
            "nll_diff_ci_low": float(low), "nll_diff_ci_high": float(high), "p_value": float(p),
            "alternative": "greater", "reads_profiles": bool(enough and p < alpha and low > 0)}


def profile_perplexity_gap(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                           pairs: pd.DataFrame, users: pd.DataFrame, fmt: str, seed: int = 0,
                           decoding: Decoding = Decoding(), *,
                           device: str | torch.device | None = None) -> dict[str, float]:
    """Reply perplexity with the true profiles vs with shuffled ones (`shuffle_profiles`), with a paired test.

    Only the pairs whose speaker profile the shuffle changes are scored (`profile_changing_pairs`; `n_offered`
    counts the pairs given). A model that uses the profile scores its own users' replies better: `gap` =
    shuffled - true perplexity > 0. The units are the replies, paired: each one's mean NLL per token under the
    shuffled minus the true profiles, tested one-sided by `profile_reading_test` (`reads_profiles`).
    Scored on `device` (the model is moved there; None: where it is) as `decoding` says.
    """
    offered = len(pairs)
    pairs = profile_changing_pairs(pairs, users, seed)
    targets = pairs["response"].tolist()
    true = reply_scores(model, tokenizer, build_prompts(pairs, users, fmt).tolist(), targets, decoding, device=device)
    shuffled = reply_scores(model, tokenizer, build_prompts(pairs, shuffle_profiles(users, seed), fmt).tolist(),
                            targets, decoding, device=device)

    def perplexity(scores) -> float:
        return math.exp(float(scores.nll.sum()) / int(scores.n_tokens.sum())) if len(scores.nll) else float("nan")

    diff = shuffled.nll / shuffled.n_tokens - true.nll / true.n_tokens  # same targets: same token counts
    return {"perplexity_true_profiles": perplexity(true), "perplexity_shuffled_profiles": perplexity(shuffled),
            "gap": perplexity(shuffled) - perplexity(true), "n_offered": int(offered),
            **profile_reading_test(np.asarray(diff, dtype=float))}
