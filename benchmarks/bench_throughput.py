"""Benchmark: training throughput of both model families beside this machine's matmul roofline.

For each torch thread count (`--threads`, default 1 and 2), in one run:

- roofline: the best of a few timings of an n x n matrix product (n = 1024), fp32 and bf16, as
  2 n^3 / seconds, in two layouts: `torch.matmul` (a @ b) and `F.linear` (a @ b.T, nn.Linear's layout);
  their kernels can differ by 10x (bf16 here), and the roofline is the faster: what this CPU's math
  library reaches on dense products;
- one optimizer step (forward + backward + Adam, the step of `finetuning.train_with_early_stopping`) of
  each family's model, for LoRA (r = 12 on the family's q, k, v, o: `families.ModelFamily.lora_config`) and
  FULL (every weight), in three precisions (`variant`): fp32; bf16 autocast over fp32 weights (FULL's bf16,
  and LoRA's with its base left in fp32); and, for LoRA, bf16 as stage 03 runs it (`precision.Precision`:
  the frozen base held in bf16, the adapters fp32, autocast). `pipeline_auto` marks the rows stage 03 runs
  with `precision: auto` on this CPU (bf16 where it multiplies bf16 natively, else fp32); beside the 1024²
  roofline, `shape_roofline_share`: the counted rate over what this CPU reaches on the model's own product
  shapes at the step's tokens (`shape_roofline`), the best such a step could do;
- `--compile`: the same step of the causal family's LoRA in the precision `auto` chooses, eager against
  `torch.compile` (inductor), with the compile time and the loss difference (adopted in the pipeline only
  where it is at least 1.2x faster with equal results; the JSON records the measurement either way);
- `--prepared DIR` (a stage 00 folder, e.g. outputs/cpu/00_prepare_corpus): the padding share of the
  pipeline's batches on real prompts and replies, in the order batches were made before issue #21 (random
  for training, data order for generation) and now (`finetuning.LengthBucketSampler`, length-sorted).

Models: seq2seq = a T5 of the cpu profile's shape (`families.t5_config("cpu", 8000)`, from scratch, as
stage 02 builds it); causal = SmolLM2-135M (`udg_lib.llm.load_causal_lm("smollm2")`, converted from its
GGUF on first use), or a randomly initialised model of the same shape (`families.llama_config("smollm2-135m")`)
if that fails. The batch is the same for both: `--batch` examples of `--source-tokens` prompt tokens and
`--reply-tokens` reply tokens (random ids; the loss on the reply only). Seq2seq: the prompt goes through the
encoder, the reply through the decoder. Causal: one sequence of source + reply.

Reported per step: seconds (median of `--steps` timed steps after one warm-up step; a configuration whose
warm-up takes over `--slow-step-seconds` is timed by its warm-up alone, `timed_steps` 0), CPU seconds,
tokens/s (all source + reply tokens of the batch), and two GFLOP/s figures:

- `gflops_6N` = 6 x parameters x tokens / seconds: the usual training estimate (2N forward + 4N backward
  per token). It overstates what a LoRA step computes (frozen weights get no weight gradient: ~4N) and what
  a T5 step computes (each token passes through only the encoder or the decoder half);
- `gflops_counted` = the FLOPs that `torch.utils.flop_counter.FlopCounterMode` counts in the warm-up step
  (every matmul, attention and convolution actually run, backward included) / seconds, and `roofline_share`
  = gflops_counted / this dtype's roofline at the same thread count.

bf16 speed depends on the CPU: with AVX512-BF16 or AMX, oneDNN multiplies bf16 natively; without them
(this project's 2-core AVX2 machine) bf16 products are converted and may be slower than fp32. The script
reports what it measures and the CPU's flags beside it. Timings are printed (and written with `--out`),
never asserted. On a machine shared with other jobs, expect noise; compare rows of one run.

    .venv/bin/python benchmarks/bench_throughput.py --out benchmarks/results/bench_throughput.json
    .venv/bin/python benchmarks/bench_throughput.py --smoke      # tiny models, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers.utils import logging as hf_logging

from udg_lib import io
from udg_lib.families import CAUSAL, SEQ2SEQ, SMOLLM2_VOCAB, ModelFamily, get_family, llama_config, load_model
from udg_lib.finetuning import FinetuneConfig
from udg_lib.param_profiles import layered_file
from udg_lib.precision import (attention_implementation, cpu_flags, cpu_flags_line, native_bf16, resolve_precision,
                               training_attention)
from udg_lib.encoding import LABEL_PAD_ID
from udg_lib.families import t5_config
from udg_lib.pretraining import count_parameters
from udg_lib.provenance import provenance

MODES = ("lora", "full")
DTYPES = ("fp32", "bf16")
# (mode, variant) -> (dtype of the frozen weights, autocast): what each measured precision does
VARIANTS = {("lora", "fp32"): ("fp32", False), ("lora", "bf16-autocast"): ("fp32", True),
            ("lora", "bf16"): ("bf16", True), ("full", "fp32"): ("fp32", False), ("full", "bf16"): ("fp32", True)}
PAPER_LORA_PARAMETERS = 1_800_000  # §4.1.3: "1.8 million" trainable LoRA parameters on t5-base
# The profile whose stage 03 each family's rows stand for: its LoRA dropout and per-user batch shape.
PIPELINE_PROFILES = {"causal": "cpu", "seq2seq": "cpu-t5"}
NOTEBOOK_LORA_DROPOUT = 0.1  # notebook 03's default (T5's own dropout rate) where a profile sets none


def stage03_settings(family: str) -> dict[str, Any]:
    """What stage 03 of the family's profile (`PIPELINE_PROFILES`) trains with: LoRA dropout, per-user batch
    size, prompt and reply token caps (params/<profile>/03_finetune_users.yaml, through the profiles it extends,
    over the notebook's defaults)."""
    params, _ = layered_file(Path(__file__).resolve().parents[1] / "params" / PIPELINE_PROFILES[family],
                             "03_finetune_users.yaml")
    return {"profile": PIPELINE_PROFILES[family], "lora_dropout": float(params.get("lora_dropout", NOTEBOOK_LORA_DROPOUT)),
            "batch_size": int(params.get("batch_size", 8)), "source_tokens": int(params.get("max_source_length", 64)),
            "reply_tokens": int(params.get("max_target_length", 16))}


# ---------------------------------------------------------------------------------------------------------------
# Models and batches


def seq2seq_model(smoke: bool, seed: int) -> tuple[torch.nn.Module, str]:
    preset, vocab = ("test", 1000) if smoke else ("cpu", 8000)
    return SEQ2SEQ.from_config(t5_config(preset, vocab), seed=seed), f"T5 preset {preset!r}, vocab {vocab}, random"


def causal_model(smoke: bool, seed: int) -> tuple[torch.nn.Module, str]:
    if smoke:
        return CAUSAL.from_config(llama_config("test", 1000), seed=seed), "Llama preset 'test', vocab 1000, random"
    try:
        return load_model("smollm2"), "SmolLM2-135M (packaged GGUF, dequantized)"
    except Exception as error:  # no package / conversion failed: the same shape with random weights
        print(f"loading SmolLM2-135M failed ({error!r}); using its shape with random weights", flush=True)
        return (CAUSAL.from_config(llama_config("smollm2-135m", SMOLLM2_VOCAB), seed=seed),
                "SmolLM2-135M shape, random weights")


MODELS: dict[str, Callable[[bool, int], tuple[torch.nn.Module, str]]] = {"seq2seq": seq2seq_model,
                                                                          "causal": causal_model}


def synthetic_batch(family: ModelFamily, batch: int, source_tokens: int, reply_tokens: int, vocab: int,
                    seed: int) -> dict[str, torch.Tensor]:
    """A training batch of random ids laid out as `family.collator` lays out real ones (no padding)."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.randint(2, vocab, (batch, source_tokens), generator=generator)
    reply = torch.randint(2, vocab, (batch, reply_tokens), generator=generator)
    if family.name == "seq2seq":  # encoder: source; decoder: reply (T5 shifts the labels in)
        return {"input_ids": source, "attention_mask": torch.ones_like(source), "labels": reply}
    input_ids = torch.cat([source, reply], dim=1)  # causal: one sequence, the loss on the reply only
    labels = input_ids.clone()
    labels[:, :source_tokens] = LABEL_PAD_ID
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def matmul_roofline(n: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """GFLOP/s (2 n^3 / seconds, the fastest of `repeats`) of an n x n product in two layouts: `matmul`
    (a @ b) and `linear` (a @ b.T, the layout of `nn.Linear`, which is what training multiplies). Their
    kernels can differ by 10x (bf16 without native support), so both are reported; the roofline is the faster."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    products = {"matmul": torch.matmul, "linear": torch.nn.functional.linear}
    result = {}
    for name, product in products.items():
        product(a[:128, :128], b[:128, :128])  # warm-up: library initialisation, not the timing of a big product
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            product(a, b)
            best = min(best, time.perf_counter() - started)
        result[name] = 2 * n**3 / best / 1e9
    return result


def shape_roofline(model: torch.nn.Module, tokens: int, dtype: torch.dtype, repeats: int) -> float:
    """GFLOP/s this CPU reaches on the model's own products: every `nn.Linear` shape of the model applied to
    `tokens` rows (a training batch's tokens), each timed at its best of `repeats`, the rate of their FLOP-weighted
    sum (forward products; the backward pass multiplies the same shapes transposed). Small products run below
    the 1024² roofline; this is the rate a step made of these shapes could reach at best."""
    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            shapes[tuple(module.weight.shape)] = shapes.get(tuple(module.weight.shape), 0) + 1
    generator = torch.Generator().manual_seed(0)
    flops = seconds = 0.0
    for (out_features, in_features), count in shapes.items():
        x = torch.randn(tokens, in_features, generator=generator).to(dtype)
        w = torch.randn(out_features, in_features, generator=generator).to(dtype)
        torch.nn.functional.linear(x, w)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - started)
        flops += count * 2 * tokens * in_features * out_features
        seconds += count * best
    return flops / seconds / 1e9


def training_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                  autocast: bool) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
        loss = model(**batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def measure(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: bool, steps: int,
            slow_step_seconds: float) -> dict[str, Any]:
    """One timed warm-up step with its FLOPs counted, then `steps` timed steps (Adam on the trainable weights).

    When the warm-up took longer than `slow_step_seconds` (e.g. bf16 on a CPU without bf16 units), its own
    time is reported instead (`timed_steps` 0): it includes the optimizer's first allocation and the
    counter's bookkeeping, both small beside such a step, so it is a slight overestimate.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-6)  # tiny lr: the weights barely drift across configurations
    counter = FlopCounterMode(display=False)
    wall, cpu = time.perf_counter(), time.process_time()
    with counter:
        training_step(model, batch, optimizer, autocast)
    seconds, cpu_seconds = [time.perf_counter() - wall], [time.process_time() - cpu]
    timed_steps = 0
    if seconds[0] <= slow_step_seconds:
        seconds, cpu_seconds, timed_steps = [], [], steps
        for _ in range(steps):
            wall, cpu = time.perf_counter(), time.process_time()
            training_step(model, batch, optimizer, autocast)
            seconds.append(time.perf_counter() - wall)
            cpu_seconds.append(time.process_time() - cpu)
    return {"trainable_parameters": sum(p.numel() for p in params), "flops_counted": counter.get_total_flops(),
            "seconds": statistics.median(seconds), "min_seconds": min(seconds),
            "cpu_seconds": statistics.median(cpu_seconds), "timed_steps": timed_steps}


def bench_family(name: str, model: torch.nn.Module, description: str, args: argparse.Namespace,
                 threads: int, roofline: dict[str, float], auto: str) -> list[dict[str, Any]]:
    """Every (mode, variant) of `VARIANTS` for one family; `auto` is what `precision: auto` uses here."""
    family = get_family(name)
    vocab = model.get_input_embeddings().weight.shape[0]
    batch = synthetic_batch(family, args.batch, args.source_tokens, args.reply_tokens, vocab, args.seed)
    tokens = args.batch * (args.source_tokens + args.reply_tokens)
    n_parameters = count_parameters(model)
    # r = 12, alpha 24, the family's own q, k, v, o and the dropout its profile's stage 03 uses
    config = FinetuneConfig(lora_dropout=stage03_settings(name)["lora_dropout"])
    at_shapes = {d: shape_roofline(model, tokens, t, max(args.matmul_repeats, 3))
                 for d, t in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"  {name}: its own product shapes at {tokens} tokens reach fp32 {at_shapes['fp32']:.1f}, bf16 "
          f"{at_shapes['bf16']:.1f} GFLOP/s", flush=True)
    rows = []
    for (mode, variant), (frozen, autocast) in VARIANTS.items():
        model.to(dtype=torch.bfloat16 if frozen == "bf16" else torch.float32)
        if mode == "lora":
            torch.manual_seed(args.seed)
            target = get_peft_model(model, family.lora_config(config))  # adapters fp32 (peft casts them)
        else:
            target = model
            for p in model.parameters():
                p.requires_grad_(True)
        dtype = "bf16" if autocast else "fp32"  # the products' dtype: whose roofline applies
        try:
            with training_attention(target, "cpu"):  # as stage 03 trains (eager attention on a CPU)
                attention = attention_implementation(target)
                result = measure(target, batch, autocast, args.steps, args.slow_step_seconds)
        finally:
            if mode == "lora":
                target.unload()  # the plain model back for the next variant
        gflops_counted = result["flops_counted"] / result["seconds"] / 1e9
        rows.append({
            "threads": threads, "family": name, "model": description, "mode": mode, "variant": variant,
            "dtype": dtype, "pipeline_auto": variant == auto or (mode == "lora" and auto == "bf16" and variant == "bf16"),
            "attention": attention, "lora_dropout": config.lora_dropout if mode == "lora" else None,
            "parameters": n_parameters, "trainable_parameters": result["trainable_parameters"],
            "batch": args.batch, "tokens_per_step": tokens, "seconds": round(result["seconds"], 4),
            "min_seconds": round(result["min_seconds"], 4), "cpu_seconds": round(result["cpu_seconds"], 4),
            "timed_steps": result["timed_steps"],
            "tokens_per_s": round(tokens / result["seconds"], 1),
            "gflops_6N": round(6 * n_parameters * tokens / result["seconds"] / 1e9, 2),
            "flops_counted": result["flops_counted"], "gflops_counted": round(gflops_counted, 2),
            "roofline_gflops": round(roofline[dtype], 1),
            "roofline_share": round(gflops_counted / roofline[dtype], 3),
            "shape_roofline_gflops": round(at_shapes[dtype], 1),
            "shape_roofline_share": round(gflops_counted / at_shapes[dtype], 3),
        })
        row = rows[-1]
        print(f"  {name:8s} {mode:4s} {variant:13s}: {row['seconds']:8.3f} s/step  {row['tokens_per_s']:9.1f} "
              f"tokens/s  {row['gflops_counted']:7.2f} GFLOP/s counted ({row['roofline_share']:.1%} of the {dtype} "
              f"roofline, {row['shape_roofline_share']:.1%} of its shapes' rate)"
              f"{'  <- stage 03 with precision auto' if row['pipeline_auto'] else ''}", flush=True)
    model.to(dtype=torch.float32)
    return rows


def bench_compile(model: torch.nn.Module, args: argparse.Namespace, auto: str) -> dict[str, Any]:
    """The causal LoRA step in the precision `auto` picks (eager attention, as stage 03 trains on a CPU), eager
    mode vs `torch.compile`: seconds per step (median of
    `args.steps` after the warm-up), the first compiled step's seconds (compilation included), and the largest
    relative difference of the losses of the same steps from the same start."""
    family = get_family("causal")
    vocab = model.get_input_embeddings().weight.shape[0]
    batch = synthetic_batch(family, args.batch, args.source_tokens, args.reply_tokens, vocab, args.seed)
    numerics = resolve_precision(auto, "cpu")
    result: dict[str, Any] = {"precision": numerics.used, "mode": "lora"}
    losses: dict[str, list[float]] = {}
    for how in ("eager", "compiled"):
        model.to(dtype=numerics.frozen_dtype)
        torch.manual_seed(args.seed)
        target = get_peft_model(model, family.lora_config(FinetuneConfig(lora_dropout=0.0)))
        runner = torch.compile(target) if how == "compiled" else target
        optimizer = torch.optim.Adam([p for p in target.parameters() if p.requires_grad], lr=1e-4)
        try:
            with training_attention(target, "cpu"):  # as stage 03 trains
                started = time.perf_counter()
                losses[how] = [training_step(runner, batch, optimizer, numerics.bf16)]
                result[f"{how}_first_step_seconds"] = round(time.perf_counter() - started, 2)
                seconds = []
                for _ in range(args.steps):
                    started = time.perf_counter()
                    losses[how].append(training_step(runner, batch, optimizer, numerics.bf16))
                    seconds.append(time.perf_counter() - started)
            result[f"{how}_seconds"] = round(statistics.median(seconds), 4)
        except Exception as error:  # no compiler, an unsupported op: recorded, not raised
            result[f"{how}_error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            break
        finally:
            target.unload()
            torch._dynamo.reset()
    model.to(dtype=torch.float32)
    if "compiled_seconds" in result:
        result["speedup"] = round(result["eager_seconds"] / result["compiled_seconds"], 3)
        result["max_relative_loss_difference"] = max(abs(a - b) / abs(a) for a, b in zip(losses["eager"],
                                                                                            losses["compiled"]))
        # compilation pays off only over the steps one compiled model runs: stage 03 wraps a new peft model for
        # each user (a recompile), which then trains `steps_per_model` steps
        saved = result["eager_seconds"] - result["compiled_seconds"]
        cost = result["compiled_first_step_seconds"] - result["eager_first_step_seconds"]
        result["break_even_steps"] = round(cost / saved) if saved > 0 else None
        result["steps_per_model"] = args.steps_per_model
        result["adopt"] = bool(result["speedup"] >= 1.2 and result["max_relative_loss_difference"] < 1e-2
                               and result["break_even_steps"] is not None
                               and result["break_even_steps"] <= args.steps_per_model)
    print(f"  torch.compile, causal LoRA in {numerics.used}: " + ", ".join(f"{k} {v}" for k, v in result.items()),
          flush=True)
    return result


def padding_shares(prepared: Path) -> list[dict[str, Any]]:
    """Padding share of the pipeline's batches on stage 00's real pairs (plain prompts, the cpu profile's
    lengths and batch sizes), before issue #21 and now: stage 02's pre-training batches (8 pairs of the
    pre-training dialogues), stage 03's per-user batches (4 of a user's training pairs) and DA's pooled batches
    (8), and generation / scoring batches (16 test prompts): random or data order before, length-bucketed or
    length-sorted now."""
    from udg_lib.data.prepare import eval_corpus_names
    from udg_lib.data.schema import PROFILE_FIELDS
    from udg_lib.families import CAUSAL
    from udg_lib.finetuning import LengthBucketSampler, padding_share
    from udg_lib.prompts import build_prompts
    from udg_lib.tokenizer import load_tokenizer

    tokenizer, _ = load_tokenizer(prepared / "tokenizer")
    no_profiles = pd.DataFrame(columns=["user_id", *PROFILE_FIELDS])  # plain prompts carry none
    source, target = 48, 24  # the cpu profile's max_source_length / max_target_length

    def lengths_of(pairs: pd.DataFrame) -> list[int]:
        examples = CAUSAL.tokenize_pairs(build_prompts(pairs, no_profiles, "plain").tolist(),
                                         pairs["response"].tolist(), tokenizer, source, target)
        return [len(examples[i]["input_ids"]) for i in range(len(examples))]

    def chunks(order: list[int], size: int) -> list[list[int]]:
        return [order[i:i + size] for i in range(0, len(order), size)]

    def shares(what: str, lengths: list[int], size: int, groups: int = 1) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(0)
        before = chunks(torch.randperm(len(lengths), generator=generator).tolist(), size)
        after = chunks(list(LengthBucketSampler(lengths, size, torch.Generator().manual_seed(0))), size)
        return {"batches": what, "examples": len(lengths), "batch_size": size, "groups": groups,
                "padding_before": round(padding_share(lengths, before), 3),
                "padding_now": round(padding_share(lengths, after), 3)}

    rows = []
    dataset = eval_corpus_names(prepared)[0]
    pairs = pd.read_parquet(prepared / dataset / "eval_pairs.parquet")
    pairs = pairs[pairs["split_set"] == pairs["split_set"].min()]
    pretrain = pd.concat([pd.read_parquet(f) for f in sorted(prepared.glob("*/pretrain_pairs.parquet"))],
                         ignore_index=True) if list(prepared.glob("*/pretrain_pairs.parquet")) else pd.DataFrame()
    if len(pretrain):
        rows.append(shares("stage 02 pre-training (8)", lengths_of(pretrain.sample(min(len(pretrain), 4000),
                                                                                  random_state=0)), 8))
    users = [frame for _, frame in pairs[pairs["split"] == "train_ft"].groupby("speaker_id")]
    per_user = [shares("", lengths_of(frame), 4) for frame in users]
    rows.append({"batches": "stage 03 per-user training (4)", "examples": sum(r["examples"] for r in per_user),
                 "batch_size": 4, "groups": len(per_user),
                 "padding_before": round(float(np.mean([r["padding_before"] for r in per_user])), 3),
                 "padding_now": round(float(np.mean([r["padding_now"] for r in per_user])), 3)})
    rows.append(shares("stage 03 DA pooled (8)", lengths_of(pairs[pairs["split"] == "train_da"]), 8))
    test = lengths_of(pairs[pairs["split"] == "test"])
    rows.append({"batches": "generation and scoring (16)", "examples": len(test), "batch_size": 16, "groups": 1,
                 "padding_before": round(padding_share(test, chunks(list(range(len(test))), 16)), 3),
                 "padding_now": round(padding_share(test, chunks(sorted(range(len(test)), key=test.__getitem__), 16)),
                                      3)})
    for row in rows:
        print(f"  padding, {row['batches']}: {row['padding_before']:.1%} before -> {row['padding_now']:.1%} now "
              f"({row['examples']} examples)", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Command line


def bench_attention(model: torch.nn.Module, args: argparse.Namespace, auto: str, threads: int,
                    roofline: dict[str, float]) -> list[dict[str, Any]]:
    """The causal LoRA step as stage 03 trains it (precision `auto`, its profile's dropout) with the model's
    own SDPA attention and with the eager attention `precision.training_attention` switches to on a CPU, side
    by side, at the benchmark's shape and at stage 03's own per-user shape (its profile's batch size, prompt
    and reply caps, unpadded): seconds per step (median of `args.steps` after a warm-up), counted GFLOP/s
    and its share of the roofline of the precision used."""
    family = get_family("causal")
    settings = stage03_settings("causal")
    vocab = model.get_input_embeddings().weight.shape[0]
    numerics = resolve_precision(auto, "cpu")
    shapes = {"benchmark": (args.batch, args.source_tokens, args.reply_tokens),
              f"stage 03 ({settings['profile']})": (settings["batch_size"], settings["source_tokens"],
                                                    settings["reply_tokens"])}
    rows = []
    model.to(dtype=numerics.frozen_dtype)
    for shape, (batch_size, source, reply) in shapes.items():
        batch = synthetic_batch(family, batch_size, source, reply, vocab, args.seed)
        at_shapes = shape_roofline(model, batch_size * (source + reply), numerics.frozen_dtype,
                                   max(args.matmul_repeats, 3))
        for how in ("sdpa", "eager"):
            torch.manual_seed(args.seed)
            target = get_peft_model(model, family.lora_config(FinetuneConfig(lora_dropout=settings["lora_dropout"])))
            switch = training_attention(target, "cpu") if how == "eager" else nullcontext()
            try:
                with switch:
                    used = attention_implementation(target)
                    result = measure(target, batch, numerics.bf16, max(args.steps, 3), args.slow_step_seconds)
            finally:
                target.unload()
            gflops = result["flops_counted"] / result["seconds"] / 1e9
            rows.append({"threads": threads, "shape": shape, "batch": batch_size, "tokens_per_step": batch_size * (source + reply),
                         "attention": used, "precision": numerics.used, "lora_dropout": settings["lora_dropout"],
                         "seconds": round(result["seconds"], 4), "gflops_counted": round(gflops, 2),
                         "roofline_gflops": round(roofline[numerics.used], 1),
                         "roofline_share": round(gflops / roofline[numerics.used], 3),
                         "shape_roofline_gflops": round(at_shapes, 1), "shape_roofline_share": round(gflops / at_shapes, 3)})
            print(f"  attention {used:5s} at the {shape} shape ({batch_size} x {source + reply} tokens), causal LoRA "
                  f"{numerics.used}: {result['seconds']:.3f} s/step, {gflops:.1f} GFLOP/s counted "
                  f"({rows[-1]['roofline_share']:.1%} of the {numerics.used} roofline, "
                  f"{rows[-1]['shape_roofline_share']:.1%} of its shapes' rate {at_shapes:.0f})", flush=True)
        sdpa, eager = rows[-2], rows[-1]
        eager["speedup_vs_sdpa"] = round(sdpa["seconds"] / eager["seconds"], 3)
    model.to(dtype=torch.float32)
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models and matrices: a run of seconds")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    parser.add_argument("--batch", type=int, default=8, help="examples per training step (default 8)")
    parser.add_argument("--source-tokens", type=int, default=64, help="prompt tokens per example (default 64)")
    parser.add_argument("--reply-tokens", type=int, default=16, help="reply tokens per example (default 16)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (median; default 2)")
    parser.add_argument("--slow-step-seconds", type=float, default=10.0,
                        help="a configuration whose warm-up step takes longer is timed by that step alone")
    parser.add_argument("--matmul-size", type=int, default=1024, help="n of the n x n roofline products")
    parser.add_argument("--matmul-repeats", type=int, default=2)
    parser.add_argument("--families", default="seq2seq,causal", help="comma-separated: seq2seq, causal")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile on the causal LoRA step")
    parser.add_argument("--steps-per-model", type=int, default=50,
                        help="steps one compiled model trains in stage 03 (a new peft model per user; the cpu "
                             "profile's users train 12-50): compile is adopted only if it pays off within them")
    parser.add_argument("--prepared", type=Path, help="a stage 00 folder: the padding share of real batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not args.families or any(f not in MODELS for f in args.families):
        parser.error(f"--families must name some of {list(MODELS)}")
    if args.smoke:
        args.threads, args.batch, args.source_tokens, args.reply_tokens = [1], 2, 12, 4
        args.steps, args.matmul_size, args.matmul_repeats = 1, 128, 1
        args.slow_step_seconds = float("inf")
    for name in ("batch", "source_tokens", "reply_tokens", "steps", "matmul_size", "matmul_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(t < 1 for t in args.threads):
        parser.error("--threads must be at least 1")
    return args


COLUMNS = ["threads", "family", "mode", "variant", "pipeline_auto", "trainable_parameters", "tokens_per_step", "seconds",
           "timed_steps", "tokens_per_s", "gflops_6N", "gflops_counted", "roofline_gflops", "roofline_share",
           "shape_roofline_share"]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    return pd.DataFrame(rows)[COLUMNS].to_string(index=False)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    threads_before = torch.get_num_threads()
    flags = cpu_flags()
    native = native_bf16("cpu")
    auto = resolve_precision("auto", "cpu").used
    note = ("this CPU multiplies bf16 natively (AVX512-BF16/AMX)" if native else
            "this CPU has no AVX512-BF16 or AMX: bf16 products are converted, so bf16 may run slower than fp32")
    print(f"CPU: {cpu_flags_line()}; {note}; precision auto -> {auto}", flush=True)
    padding = padding_shares(args.prepared) if args.prepared else None  # cheap: before the long timings
    models = {name: MODELS[name](args.smoke, args.seed) for name in args.families}
    lora_counts = {}
    for name, (model, description) in models.items():
        family = get_family(name)
        lora_counts[name] = family.lora_trainable_parameters(model.config, FinetuneConfig())
        print(f"{name}: {description}; {count_parameters(model):,} parameters; LoRA r=12 on q,k,v,o: "
              f"{lora_counts[name]:,} trainable (the paper's t5-base: {PAPER_LORA_PARAMETERS / 1e6:.1f} M)",
              flush=True)
    roofline_rows, rows, attention_rows = [], [], []
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            products = {dtype: matmul_roofline(args.matmul_size, torch_dtype, args.matmul_repeats)
                        for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
            roofline = {dtype: max(by_layout.values()) for dtype, by_layout in products.items()}
            roofline_rows.append({"threads": threads, "matmul_size": args.matmul_size,
                                  **{f"{d}_{layout}_gflops": round(v, 2) for d, by_layout in products.items()
                                     for layout, v in by_layout.items()},
                                  **{f"{d}_gflops": round(v, 2) for d, v in roofline.items()}})
            print(f"\n{threads} thread(s): {args.matmul_size}^2 products, GFLOP/s: " + "; ".join(
                f"{d} matmul {p['matmul']:.2f}, linear {p['linear']:.2f}" for d, p in products.items()), flush=True)
            for name, (model, description) in models.items():
                rows.extend(bench_family(name, model, description, args, threads, roofline, auto))
            if "causal" in models:
                attention_rows.extend(bench_attention(models["causal"][0], args, auto, threads, roofline))
        compiled = bench_compile(models["causal"][0], args, auto) if args.compile and "causal" in models else None
    finally:
        torch.set_num_threads(threads_before)
    print()
    print(format_table(rows))
    result = {"rows": rows, "roofline": roofline_rows, "precision_auto": auto, "compile": compiled,
              "attention": attention_rows, "stage03": {name: stage03_settings(name) for name in models},
              "padding": padding, "lora_trainable_parameters": lora_counts,
              "paper_lora_parameters": PAPER_LORA_PARAMETERS, "cpu": flags, "note": note,
              "models": {name: description for name, (_, description) in models.items()},
              "flops_formula": "gflops_6N = 6 * parameters * tokens_per_step / seconds / 1e9; gflops_counted = "
                               "FlopCounterMode FLOPs of one step (forward + backward) / seconds / 1e9",
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "provenance": provenance(seeds={"seed": args.seed})}
    if args.out is not None:
        io.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
