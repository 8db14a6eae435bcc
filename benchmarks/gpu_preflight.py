"""gpu_check.sh's first step: what this Python sees (CUDA, the GPU, package versions, TF32 and bf16) and what the
check's steps are expected to cost on one H100/H200, from the arithmetic below; one clear line and exit 2 when
CUDA is not visible (unless `--cpu-smoke`).

    python benchmarks/gpu_preflight.py --out DIR [--cpu-smoke]

Writes DIR/preflight.json (the environment and the expected seconds per step) and DIR/limits.tsv (each step's
time limit: 1.5 x its expected seconds, at least 60 s). The step sizes come from the environment variables that
gpu_check.sh exports (GPU_T5_USERS, ...; defaults as gpu_check.sh sets them).

The arithmetic is conservative on purpose: it charges every step the start of a Python process that imports
torch, transformers and peft and opens a CUDA context, and it charges small batches the latency of their kernel
launches rather than their FLOPs (at 100 TFLOP/s, a quarter of an H100's ~400 bf16 TFLOP/s dense, every batch
here computes in well under a second). Each constant is named and explained where it is defined; the printed
table shows each step's formula with the sizes filled in.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

DEADLINE_S = 480  # the whole check must fit 8 minutes on one H100/H200
MARGIN = 0.75  # ... and its expected seconds at most 75% of that

# Costs on one H100/H200, conservative (none measured there yet; gpu_check.json records what each step took).
START_S = 15.0  # a step's process: interpreter, `import torch, transformers, peft` (~6 s), CUDA context
TFLOPS = 100e12  # effective FLOP/s for these batch sizes: a quarter of ~400 bf16 TFLOP/s dense
TRAIN_STEP_S = 0.15  # one LoRA training step at batch 4 (t5-base: 24 blocks fwd+bwd+Adam, ~3,000 kernel launches)
BATCHED_STEP_S = 0.5  # one multilora step of all users (per-user gathers and bmm in every targeted layer)
EVAL_S = 0.05  # one dev-loss forward
PEFT_WRAP_S = 0.3  # get_peft_model / add and delete one adapter
SAVE_S = 0.2  # save_pretrained of one adapter
RELOAD_S = {"t5-base": 2.0, "smollm2-135m": 1.5}  # from_pretrained of the fp32 base (0.9 / 0.54 GB) + .to(cuda)
BUILD_S = {"t5-base": 8.0, "smollm2-135m": 6.0}  # random init on the CPU + save_pretrained, once per step
TOKENIZER_S = 3.0  # bench_user_training's SentencePiece tokenizer (2,000 pieces)
DECODE_STEP_S = 0.03  # one greedy token for a whole batch (t5-base decoder, routed LoRA)
MIXED_DECODE_STEP_S = 0.05  # the same through peft's mixed batches (a loop over the batch's adapters per layer)
BASE_DECODE_STEP_S = 0.02  # the same without adapters
ADAPTER_LOAD_S = 0.2  # one saved adapter loaded (peft or routed)
PLAN_COUNT_S = 20.0  # udg_lib.plan loads the profile's corpora to count users (Chit-Chat alone ~5 s)
PLAN_BUILD_S = 5.0  # one random t5-base from its config, moved to the GPU (plan builds three)
T5_BASE_PARAMETERS = 2.2e8

SIZES = {  # gpu_check.sh's GPU sizes (it exports them; these are the same defaults)
    "GPU_T5_USERS": 12, "GPU_T5_STEPS": 3, "GPU_CAUSAL_USERS": 12, "GPU_CAUSAL_STEPS": 3,
    "GPU_MIXED_USERS": 12, "GPU_MIXED_CONTEXTS": 8, "GPU_MIXED_BATCH": 64, "GPU_MIXED_TOKENS": 24,
    "GPU_PLAN_STEPS": 2,
}


def sizes_from_environment() -> dict[str, int]:
    return {name: int(os.environ.get(name, default)) for name, default in SIZES.items()}


def user_training_seconds(shape: str, users: int, steps: int) -> tuple[float, str]:
    """bench_user_training.py, one shape, repeats 1: (a) reload per user, (b) one loop, (c) all users batched."""
    per_user = PEFT_WRAP_S + steps * TRAIN_STEP_S + 2 * EVAL_S + SAVE_S
    warm_up = RELOAD_S[shape] + per_user
    a = users * (RELOAD_S[shape] + per_user)
    b = RELOAD_S[shape] + users * per_user
    c = RELOAD_S[shape] + steps * BATCHED_STEP_S + 2 * BATCHED_STEP_S + users * SAVE_S
    total = START_S + TOKENIZER_S + BUILD_S[shape] + warm_up + a + b + c
    formula = (f"{START_S:g} start + {TOKENIZER_S:g} tokenizer + {BUILD_S[shape]:g} build + {warm_up:.1f} warm-up"
               f" + (a) {users} x ({RELOAD_S[shape]:g} reload + {per_user:.2f} train) + (b) {b:.1f}"
               f" + (c) {c:.1f} [train = {PEFT_WRAP_S:g} peft + {steps} x {TRAIN_STEP_S:g} + 2 x {EVAL_S:g} dev"
               f" + {SAVE_S:g} save]")
    return total, formula


def mixed_adapters_seconds(users: int, contexts: int, batch: int, tokens: int) -> tuple[float, str]:
    """bench_mixed_adapters.py at t5-base, repeats 1: one user at a time (load, switch), mixed, routed, base."""
    batches = math.ceil(users * contexts / batch)
    setup = START_S + BUILD_S["t5-base"] + users * SAVE_S + 2 * users * ADAPTER_LOAD_S
    warm_up = 4 * tokens * MIXED_DECODE_STEP_S
    load = users * (ADAPTER_LOAD_S + tokens * DECODE_STEP_S)
    switch = users * tokens * DECODE_STEP_S
    mixed = batches * tokens * MIXED_DECODE_STEP_S
    routed = batches * tokens * DECODE_STEP_S
    base = batches * tokens * BASE_DECODE_STEP_S
    total = setup + warm_up + load + switch + mixed + routed + base
    formula = (f"{setup:.1f} start, build, save and load {users} adapters + {warm_up:.1f} warm-up + load per user "
               f"{users} x ({ADAPTER_LOAD_S:g} + {tokens} tokens x {DECODE_STEP_S:g}) + switch {switch:.1f} + "
               f"{batches} batches x {tokens} tokens x ({MIXED_DECODE_STEP_S:g} mixed + {DECODE_STEP_S:g} routed "
               f"+ {BASE_DECODE_STEP_S:g} base)")
    return total, formula


def plan_round_seconds(dtype: str) -> float:
    """One timing round of udg_lib.plan at full-en's shapes (t5-base): each of its five kinds once."""
    rate = TFLOPS if dtype == "bf16" else TFLOPS / 2  # fp32 products in TF32: about half of bf16
    tokens = 256 + 64  # full-en's max_source_length + max_target_length
    pretrain = max(TRAIN_STEP_S, 6 * T5_BASE_PARAMETERS * 64 * tokens / rate)  # batch 64, every weight
    full = max(TRAIN_STEP_S, 6 * T5_BASE_PARAMETERS * 16 * tokens / rate)  # batch 16
    lora = max(TRAIN_STEP_S, 4 * T5_BASE_PARAMETERS * 16 * tokens / rate)  # frozen weights: no weight gradients
    batched = max(BATCHED_STEP_S, 4 * T5_BASE_PARAMETERS * 8 * 16 * tokens / rate)  # 8 users x 16 rows
    generate = 64 * BASE_DECODE_STEP_S  # 64 new tokens, forced
    return pretrain + full + lora + batched + generate


def plan_seconds(steps: int) -> tuple[float, str]:
    """benchmarks/run_plan.py: udg_lib.plan --profile full-en in fp32, then bf16, in one process; per dtype the
    users are counted, three t5-base models built and each kind timed `steps` times after a warm-up."""
    per_dtype = {dtype: PLAN_COUNT_S + 3 * PLAN_BUILD_S + (steps + 1) * plan_round_seconds(dtype)
                 for dtype in ("fp32", "bf16")}
    total = START_S + sum(per_dtype.values())
    formula = (f"{START_S:g} start + per dtype ({PLAN_COUNT_S:g} count users + 3 x {PLAN_BUILD_S:g} build + "
               f"{steps + 1} rounds x {plan_round_seconds('fp32'):.2f} fp32 / {plan_round_seconds('bf16'):.2f} bf16)"
               f" [rounds at {TFLOPS / 2e12:g} / {TFLOPS / 1e12:g} TFLOP/s, or the launch floor]")
    return total, formula


def expected_seconds(sizes: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Each step's expected seconds and the formula that gives them, in the order gpu_check.sh runs them."""
    steps = {
        "preflight": (START_S, f"{START_S:g} start"),
        "user_training_seq2seq": user_training_seconds("t5-base", sizes["GPU_T5_USERS"], sizes["GPU_T5_STEPS"]),
        "user_training_causal": user_training_seconds("smollm2-135m", sizes["GPU_CAUSAL_USERS"],
                                                      sizes["GPU_CAUSAL_STEPS"]),
        "mixed_adapters": mixed_adapters_seconds(sizes["GPU_MIXED_USERS"], sizes["GPU_MIXED_CONTEXTS"],
                                                 sizes["GPU_MIXED_BATCH"], sizes["GPU_MIXED_TOKENS"]),
        "plan": plan_seconds(sizes["GPU_PLAN_STEPS"]),
        "summary": (START_S, f"{START_S:g} start (reads the JSON files)"),
    }
    return {name: {"seconds": round(seconds, 1), "limit": max(60, math.ceil(1.5 * seconds)), "formula": formula}
            for name, (seconds, formula) in steps.items()}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


NEEDED_MODULES = ("torch", "transformers", "peft", "accelerate", "sentencepiece", "udg_lib.families",
                  "udg_lib.multilora", "udg_lib.generation", "udg_lib.plan")  # what the steps import first


def environment() -> dict[str, Any]:
    """What this Python computes with: packages, CUDA, the GPU, TF32 and bf16, and what precision "auto" becomes.
    Imports what the steps need first, so a package the node lacks fails here (ImportError), not in a step."""
    for module in NEEDED_MODULES:
        importlib.import_module(module)
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "executable": sys.executable,
        "packages": {p: _version(p) for p in ("torch", "transformers", "peft", "accelerate", "tokenizers",
                                              "safetensors", "sentencepiece", "numpy", "pandas")},
        "torch_cuda_build": torch.version.cuda, "cuda_visible": torch.cuda.is_available(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "tf32_matmul_default": torch.backends.cuda.matmul.allow_tf32,
    }
    if info["cuda_visible"]:
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    compute_capability=f"{properties.major}.{properties.minor}",
                    bf16_supported=torch.cuda.is_bf16_supported())
    device = "cuda" if info["cuda_visible"] else "cpu"
    from udg_lib.precision import resolve_precision

    auto = resolve_precision("auto", device)  # on CUDA this switches TF32 on, as every stage does
    info.update(precision_auto=auto.used, tf32_matmul_in_stages=torch.backends.cuda.matmul.allow_tf32,
                device=device)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where preflight.json and limits.tsv go")
    parser.add_argument("--cpu-smoke", action="store_true", help="CUDA not required (the CPU smoke run)")
    args = parser.parse_args(argv)
    try:
        info = environment()
    except ImportError as error:  # a node's Python without the project's packages
        print(f"gpu_check.sh: {sys.executable} cannot import what the check needs ({error}); bring the wheels "
              "README's GPU section lists (PYTHONPATH to their --target folder), or set PYTHON", file=sys.stderr)
        return 2
    yes = {True: "yes", False: "no", None: "?"}
    packages = info["packages"]
    print(f"preflight: python {info['python']} ({info['executable']}); torch {packages['torch']} (CUDA build "
          f"{info['torch_cuda_build']}), transformers {packages['transformers']}, peft {packages['peft']}, "
          f"accelerate {packages['accelerate']}")
    if info["cuda_visible"]:
        print(f"preflight: CUDA visible: yes, {info['gpu_count']} device(s); device 0: {info['gpu']} "
              f"(compute {info['compute_capability']}, {info['gpu_memory_gib']} GiB); bf16 supported: "
              f"{yes[info['bf16_supported']]}")
    else:
        print(f"preflight: CUDA visible: no (CUDA_VISIBLE_DEVICES {info['cuda_visible_devices'] or 'unset'})")
    print(f"preflight: TF32 matmul: {'on' if info['tf32_matmul_default'] else 'off'} by default, "
          f"{'on' if info['tf32_matmul_in_stages'] else 'off'} in the stages (udg_lib.precision); precision "
          f"\"auto\" -> {info['precision_auto']} on {info['device']}")
    expected = expected_seconds(sizes_from_environment())
    total = sum(step["seconds"] for step in expected.values())
    print(f"expected seconds on one H100/H200 (conservative arithmetic of benchmarks/gpu_preflight.py"
          f"{'; this run is the CPU smoke run, at other sizes' if args.cpu_smoke else ''}):")
    for name, step in expected.items():
        print(f"  {name:<22} {step['seconds']:>6.1f} s  (limit {step['limit']} s) = {step['formula']}")
    fits = total <= MARGIN * DEADLINE_S
    print(f"  {'sum':<22} {total:>6.1f} s of {DEADLINE_S} s ({total / DEADLINE_S:.0%}; "
          f"{'within' if fits else 'OVER'} the {MARGIN:.0%} margin)")
    args.out.mkdir(parents=True, exist_ok=True)
    from udg_lib.io import write_json, write_text

    write_json(args.out / "preflight.json", {"environment": info, "expected_seconds": expected,
                                             "expected_total_seconds": round(total, 1), "deadline_seconds": DEADLINE_S,
                                             "sizes": sizes_from_environment(), "smoke": args.cpu_smoke})
    write_text(args.out / "limits.tsv", "".join(f"{name}\t{step['limit']}\n" for name, step in expected.items()))
    if not info["cuda_visible"] and not args.cpu_smoke:
        print(f"gpu_check.sh: CUDA is not visible to {sys.executable} (torch {packages['torch']}, CUDA build "
              f"{info['torch_cuda_build']}, CUDA_VISIBLE_DEVICES {info['cuda_visible_devices'] or 'unset'}): run it on the GPU "
              "node with a CUDA build of torch, or pass --cpu-smoke", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
