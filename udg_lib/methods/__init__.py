"""The study's fine-tuning methods (§3.5, §4.1.3), one object each: the one place that lists them.

`DA` (domain adaptation: the base of every other method and the floor without per-user training),
`ONE_ID`, `LORA` and `FULL` are the paper's; `PeftMethod` turns any peft config from the parameters into a
per-user method (IA3, prefix tuning, LoRA variants) with no new code; `RagLora` is LoRA whose inputs carry
the user's retrieved own training replies (retrieval-augmented, `udg_lib.retrieval`). Stage 03 builds its list with
`build_methods` and records it in its metrics (`Method.record`); stages 04-06 rebuild it with
`from_records`, so a method added in stage 03's parameters reaches Tables 3-5 and 7 by itself.

A method knows how it trains a cell (`train`), how it is evaluated (`predict`, `answer`), where its files go
(`folder`), its label, its Table 6 size and response time (`models`, `disk_bytes`, `response_timer`) and the
planner's cost of a training step (`plan_kind`, `plan_rows`). See `methods.base.Method`.
"""

from __future__ import annotations

import importlib
from typing import Any

from udg_lib.methods.names import FINE_TUNED, LABELS, RETRIEVAL, USER_SPECIFIC, method_order


def __getattr__(name: str) -> Any:
    """The method objects (`registry`: DA, ONE_ID, LORA, FULL, PeftMethod, RagLora, build_methods, ...) load
    torch and peft: they are imported on first use, so that naming systems (`names`: plots, the judge) stays
    light. Not to break an import circle: `registry` never imports this package's namespace."""
    if name.startswith("__") or name in ("registry", "names", "base", "pooled", "per_user"):
        raise AttributeError(f"module 'udg_lib.methods' has no attribute {name!r}")  # submodules: the import system's
    registry = importlib.import_module("udg_lib.methods.registry")
    try:
        return getattr(registry, name)
    except AttributeError:
        raise AttributeError(f"module 'udg_lib.methods' has no attribute {name!r}") from None


__all__ = ["FINE_TUNED", "LABELS", "RETRIEVAL", "USER_SPECIFIC", "method_order", *[
    "DA", "FULL", "LORA", "LORA_EVAL_MODES", "MODEL_DIR", "ONE_ID", "PAPER_METHODS", "REGISTRY", "DomainAdaptation",
    "Evaluation", "Full", "Lora", "Method", "OneId", "PeftMethod", "PerUserMethod", "RagLora", "TrainingJob",
    "adapter_names_for", "build_methods", "from_records", "get", "inference_model", "labels_of"]]
