"""The methods' names and labels, without the machinery: what tables, figures and the judge need to name
systems (`udg_lib.plots` rebuilds Figure 2 without importing torch). Each method object
(`udg_lib.methods.pooled`, `per_user`) takes its name and label from here."""

from __future__ import annotations

from collections.abc import Iterable

DA = "da"  # domain adaptation (§4.1.3): the base of every method, and the floor without per-user training
ONE_ID = "one_id"
LORA = "lora"
FULL = "full"
RAG_LORA = "rag_lora"  # RAG + per-user LoRA (not in the paper)
RETRIEVAL = "retrieval"  # the floor without training: the user's most similar own training reply

PAPER: tuple[str, ...] = (DA, ONE_ID, LORA, FULL)  # in the tables' order
FINE_TUNED: tuple[str, ...] = (ONE_ID, LORA, FULL)  # the paper's fine-tuned methods, DA aside
USER_SPECIFIC: tuple[str, ...] = (LORA, FULL)  # trained on the user's own pairs alone (§3.5)
LABELS: dict[str, str] = {DA: "DA-pooled (no per-user training)", ONE_ID: "One-ID", LORA: "LoRA", FULL: "FULL",
                          RAG_LORA: "LoRA + own replies (RAG)", RETRIEVAL: "Retrieval (own turns)"}


def method_order(names: Iterable[str] = PAPER) -> list[str]:
    """The tables' row order of methods within a pre-trained model; the retrieval floor last."""
    return [*names, RETRIEVAL]
