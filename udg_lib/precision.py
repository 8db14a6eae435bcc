"""Numeric precision chosen from what the processor computes natively (issue #21).

Every stage that trains, generates or scores (02-06) takes one parameter, `precision`:

- `"auto"` (the default): bf16 where the device multiplies bf16 natively (a CUDA GPU that reports bf16; a
  CPU with AVX512-BF16 or AMX, torch's own dispatch checks), fp32 elsewhere. On an AVX2-only CPU bf16
  products are emulated and measured 7-30x slower than fp32 (`benchmarks/bench_throughput.py`), so `auto`
  never picks bf16 there.
- `"fp32"`: every weight and product in fp32 (the reference; what every run before issue #21 used).
- `"bf16"`: bf16 even where it is emulated (for checking a bf16 result on another machine).

What bf16 means where (`Precision`): weights an optimizer updates stay fp32 and their forward passes run
under `torch.autocast(bfloat16)` (mixed precision: FULL, domain adaptation, One-ID, pre-training); weights
nothing updates are *held* in bf16 (`frozen_dtype`): the frozen base under per-user LoRA adapters (the
adapters themselves stay fp32, as peft casts them) and every model that only generates or scores. Autocast
alone recasts fp32 weights at every step, which a base held in bf16 does not (measured on a 2-core Xeon with
AMX: LoRA 1.09x from autocast alone). Losses and NLLs are summed in fp32/fp64 whatever the precision.

On CUDA, fp32 matrix products use TF32 (`enable_tf32`): fp32 storage, 10-bit mantissa products, the
default of most training frameworks on Ampere and later; `Precision.tf32` records it.

`Precision.record()` is what each stage writes into `metrics.json` (requested, used, device, TF32, the CPU's
flags), so `report --compare` can say when two runs used different precisions.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
CPU_FLAGS: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@lru_cache(maxsize=1)
def cpu_flags() -> dict[str, Any]:
    """The CPU's model name, torch's kernel level (`ATEN_CPU_CAPABILITY` can lower it) and the flags that
    decide matmul speed by dtype; printed beside every timing and recorded in every `metrics.json`."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:  # macOS, Windows: no /proc
        lines = []
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    return {"model_name": model, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{flag: flag in flags for flag in CPU_FLAGS}}


def cpu_flags_line() -> str:
    """One line for logs: 'AMD EPYC (torch avx512): AVX2 yes, AVX512-BF16 yes, AMX no'."""
    flags = cpu_flags()
    yes = {True: "yes", False: "no"}
    return (f"{flags['model_name']} (torch {flags['torch_cpu_capability']}): AVX2 {yes[flags['avx2']]}, "
            f"AVX512-BF16 {yes[flags['avx512_bf16']]}, AMX {yes[flags['amx_bf16'] or flags['amx_tile']]}")


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bf16 natively: a CUDA GPU that reports bf16 support, or a CPU with
    AVX512-BF16 / AMX (torch's own dispatch checks, which also see `ATEN_CPU_CAPABILITY`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def enable_tf32() -> None:
    """TF32 matrix products and convolutions for fp32 tensors on CUDA (Ampere and later)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


@dataclass(frozen=True)
class Precision:
    """A resolved precision: what a stage asked for, what it uses on which device, and how."""

    requested: str  # "auto", "fp32" or "bf16"
    used: str  # "fp32" or "bf16"
    device_type: str  # "cpu", "cuda", ...
    tf32: bool = False  # fp32 products in TF32 (CUDA only)

    @property
    def bf16(self) -> bool:
        return self.used == "bf16"

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The dtype of weights no optimizer updates (a LoRA base, a model that only generates or scores)."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on the device when bf16 is used; else nothing (fp32, TF32 on CUDA)."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def for_inference(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` (already on its device) held in `frozen_dtype`, in eval mode: for generation and scoring."""
        return model.to(dtype=self.frozen_dtype).eval()

    def record(self) -> dict[str, Any]:
        """The `precision` block of a stage's `metrics.json`."""
        return {"requested": self.requested, "used": self.used, "device": self.device_type, "tf32": self.tf32,
                "cpu": cpu_flags()}

    def __str__(self) -> str:
        how = f"{self.used} on {self.device_type}" + (" (TF32 products)" if self.tf32 else "")
        return f"precision {how}, asked {self.requested!r}" + (
            f"; CPU: {cpu_flags_line()}" if self.device_type == "cpu" else "")


def resolve_precision(requested: str | Precision, device: torch.device | str) -> Precision:
    """The precision a stage uses on `device` for `requested` ("auto", "fp32", "bf16"; a `Precision` is
    re-resolved for `device`). Enables TF32 on CUDA. bf16 forced where it is emulated warns once."""
    if isinstance(requested, Precision):
        requested = requested.requested
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    device = torch.device(device)
    native = native_bf16(device)
    used = "bf16" if requested == "bf16" or (requested == "auto" and native) else "fp32"
    if used == "bf16" and not native:
        warnings.warn(f"precision 'bf16' on {device.type} without native bf16 ({cpu_flags_line()}): products are "
                      "emulated and usually slower than fp32", stacklevel=2)
    tf32 = device.type == "cuda"
    if tf32:
        enable_tf32()
    return Precision(requested, used, device.type, tf32)


def autocast_for(precision: str | Precision | bool, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context of `precision` on `device` (a string or `Precision`; True/False stand for
    "bf16"/"fp32", as `FinetuneConfig.bf16` did)."""
    if isinstance(precision, bool):
        precision = "bf16" if precision else "fp32"
    if isinstance(precision, Precision) and precision.device_type == torch.device(device).type:
        return precision.autocast()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resolve_precision warned where the stage chose it
        return resolve_precision(precision, device).autocast()


@contextlib.contextmanager
def training_attention(model: torch.nn.Module, device: torch.device | str):
    """Train with transformers' "eager" attention (matmul, softmax, matmul) instead of SDPA on a CPU; the
    model's own implementation is put back on exit, so generation and scoring are unchanged.

    Measured on a 2-core AMD EPYC with AVX512-BF16, SmolLM2-135M LoRA, bf16 (`benchmarks/bench_throughput.py`,
    `attention` block): SDPA's CPU flash-attention backward ran at about 27 GFLOP/s, 14% of a batch-8 step;
    eager was faster at every length this study trains (<= 256 tokens) and equal at 512. Where the
    implementation is not SDPA (T5's own attention, a model loaded otherwise) or on a GPU (where SDPA's kernels
    win) nothing changes. The implementation used is `attention_implementation(model)`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = torch.device(device).type == "cpu" and before == "sdpa" and hasattr(base, "set_attn_implementation")
    if switch:
        base.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            base.set_attn_implementation(before)


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The attention implementation `model` (or a peft model's base) runs now: "sdpa", "eager", ... or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None)
