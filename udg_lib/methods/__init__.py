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

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from udg_lib.methods.base import MODEL_DIR, Evaluation, Method, TrainingJob, inference_model
from udg_lib.methods.per_user import LORA_EVAL_MODES, Full, Lora, PeftMethod, PerUserMethod, RagLora, adapter_names_for
from udg_lib.methods.pooled import DA, DomainAdaptation, OneId

ONE_ID = OneId()
LORA = Lora()
FULL = Full()
PAPER_METHODS: tuple[Method, ...] = (DA, ONE_ID, LORA, FULL)  # in the tables' order
REGISTRY: dict[str, Method] = {m.name: m for m in PAPER_METHODS}
FINE_TUNED: tuple[str, ...] = tuple(m.name for m in PAPER_METHODS if m.fine_tuned)  # the paper's, DA aside
USER_SPECIFIC: tuple[str, ...] = tuple(m.name for m in PAPER_METHODS if m.user_specific)  # LoRA, FULL
RETRIEVAL = "retrieval"  # the floor without training: the user's most similar own training reply
LABELS: dict[str, str] = {**{m.name: m.label for m in PAPER_METHODS}, RETRIEVAL: "Retrieval (own turns)"}

__all__ = ["DA", "FINE_TUNED", "FULL", "LABELS", "LORA", "LORA_EVAL_MODES", "MODEL_DIR", "ONE_ID", "PAPER_METHODS",
           "REGISTRY", "RETRIEVAL", "USER_SPECIFIC", "DomainAdaptation", "Evaluation", "Full", "Lora", "Method",
           "OneId", "PeftMethod", "PerUserMethod", "RagLora", "TrainingJob", "adapter_names_for", "build_methods",
           "from_records", "get", "inference_model", "labels_of", "method_order"]


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
    clash = sorted({m.name for m in peft} & {*REGISTRY, RETRIEVAL, RagLora.NAME})
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
    return {**LABELS, **{m.name: m.label for m in methods}}


def method_order(methods: Iterable[Method] = PAPER_METHODS) -> list[str]:
    """The tables' row order of methods within a pre-trained model; the retrieval floor last."""
    return [*(m.name for m in methods), RETRIEVAL]
