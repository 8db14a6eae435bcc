"""The method objects: the paper's four, and the builders of a run's list (`build_methods`,
`from_records`). Imported through `udg_lib.methods` on first use of any of these names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from udg_lib.methods import names as method_names
from udg_lib.methods.base import MODEL_DIR, Evaluation, Method, TrainingJob, inference_model
from udg_lib.methods.per_user import LORA_EVAL_MODES, Full, Lora, PeftMethod, PerUserMethod, RagLora, adapter_names_for
from udg_lib.methods.pooled import DA, DomainAdaptation, OneId

ONE_ID = OneId()
LORA = Lora()
FULL = Full()
PAPER_METHODS: tuple[Method, ...] = (DA, ONE_ID, LORA, FULL)  # in the tables' order
REGISTRY: dict[str, Method] = {m.name: m for m in PAPER_METHODS}

__all__ = ["DA", "FULL", "LORA", "LORA_EVAL_MODES", "MODEL_DIR", "ONE_ID", "PAPER_METHODS", "REGISTRY",
           "DomainAdaptation", "Evaluation", "Full", "Lora", "Method", "OneId", "PeftMethod", "PerUserMethod",
           "RagLora", "TrainingJob", "adapter_names_for", "build_methods", "from_records", "get", "inference_model",
           "labels_of"]


def get(name: str) -> Method:
    """One of the paper's methods by name."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; the paper's are {list(REGISTRY)} (others: peft_methods)")
    return REGISTRY[name]


def build_methods(names: Sequence[str], peft_methods: Mapping[str, Mapping[str, Any]] | None = None,
                  rag: Mapping[str, Any] | None = None) -> list[Method]:
    """Stage 03's methods: DA first (every other method starts from it), the paper's `names` in the tables'
    order, RAG + LoRA when `names` holds "rag_lora" (`rag`: RagLora's settings), then one `PeftMethod` per
    entry of `peft_methods` ({name: {"peft_type": ..., "label": ..., peft's fields}})."""
    rag_lora = [RagLora(**(rag or {}))] if RagLora.NAME in names else []
    chosen = [get(name) for name in names if name != RagLora.NAME]
    peft = [PeftMethod(name, {k: v for k, v in spec.items() if k != "label"}, spec.get("label", ""))
            for name, spec in (peft_methods or {}).items()]
    clash = sorted({m.name for m in peft} & {*REGISTRY, method_names.RETRIEVAL, RagLora.NAME})
    if clash:
        raise ValueError(f"peft_methods {clash}: these names belong to the study's methods; choose another")
    return [DA, *[m for m in PAPER_METHODS[1:] if m in chosen], *rag_lora, *peft]


def from_records(records: Iterable[Mapping[str, Any]] | None) -> list[Method]:
    """The methods stage 03 trained, rebuilt from its metrics' `methods` (None: the paper's four, as stage 03
    trained before it recorded them)."""
    if records is None:
        return list(PAPER_METHODS)
    def rebuild(record: Mapping[str, Any]) -> Method:
        if "rag" in record:
            return RagLora(**record["rag"])
        if "peft" in record:
            return PeftMethod(record["name"], record["peft"], record.get("label", ""))
        return get(record["name"])

    return [rebuild(record) for record in records]


def labels_of(methods: Iterable[Method]) -> dict[str, str]:
    """Method name -> table label, the retrieval floor's too."""
    return {**method_names.LABELS, **{m.name: m.label for m in methods}}
