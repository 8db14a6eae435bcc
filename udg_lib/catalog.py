"""One catalog of the pipeline's stages and the outputs other code reads from them: names, folders, files.

Each stage is a numbered notebook `notebooks/<name>.ipynb` writing into `outputs/<profile>/<name>/`; the
runner (`pipeline`), the report (`rendering`, `publishing`), the planner (`plan`), the power analysis
(`power`) and Figure 2 (`plots`) find a stage's folder and its files here, never by spelling them, the way a
Kedro catalog names every dataset once. `tests/test_catalog.py` checks that every entry has its notebook
and that no other module of `udg_lib` writes a stage folder's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from udg_lib.provenance import METRICS_FILE  # every stage's results and provenance (`provenance.write_metrics`)



@dataclass(frozen=True)
class StageSpec:
    """A stage: its number, its name (the notebook's stem and the output folder's name), whether it takes a
    `precision` parameter (it trains, generates or scores), the files in its folder other code reads, and the
    parameters a model layer may set."""

    number: str
    name: str
    precision: bool = False
    files: Mapping[str, str] = field(default_factory=dict)  # role -> file name inside the stage's folder
    # What a model decides in this stage: the keys a model layer (params/models/<name>/, param_profiles) may set
    model_keys: tuple[str, ...] = ()

    @property
    def notebook(self) -> str:
        return f"{self.name}.ipynb"

    def folder(self, outputs_root: str | Path) -> Path:
        """The stage's folder under a profile's outputs."""
        return Path(outputs_root) / self.name

    def file(self, outputs_root: str | Path, role: str) -> Path:
        """One of the stage's files (`files[role]`, or `metrics` for its metrics.json)."""
        name = METRICS_FILE if role == "metrics" else self.files[role]
        return self.folder(outputs_root) / name


PREPARE = StageSpec("00", "00_prepare_corpus", files={"table2": "table2.csv", "tokenizer": "tokenizer"},
                    model_keys=("tokenizer_name_or_path", "vocab_size"))
PROFILES = StageSpec("01", "01_infer_profiles", files={"users": "users", "table1": "table1.md"})
PRETRAIN = StageSpec("02", "02_pretrain_models", precision=True,
                     model_keys=("model_family", "model_preset", "checkpoint"))
FINETUNE = StageSpec("03", "03_finetune_users", precision=True,
                     files={"summaries": "training_summaries.parquet", "by_method": "training_by_method.csv",
                            "lr_sweep": "lora_lr_sweep.csv"},
                     model_keys=("lora_dropout", "lora_targets"))  # LoRA settings that follow the architecture
EXP1 = StageSpec("04", "04_exp1_next_utterance", precision=True,
                 files={"scores": "scores.parquet", "per_user": "per_user_scores.csv",
                        "significance": "significance.csv", "health": "generation_health.csv",
                        "leakage": "leakage_by_method.csv", "leakage_tests": "leakage_significance.csv",
                        "table6": "table6.md"})
EXP2 = StageSpec("05", "05_exp2_diversity", precision=True,
                 files={"replies": "replies.parquet", "table7": "table7.csv", "significance": "significance.csv"})
LLM = StageSpec("06", "06_llm_baselines", precision=True,
                files={"scores": "scores.parquet", "health": "generation_health.csv", "figure2": "figures/figure2.png"},
                model_keys=("chat_model", "completion_model"))  # where the base itself is C1s's prompted LLM
STAGES: tuple[StageSpec, ...] = (PREPARE, PROFILES, PRETRAIN, FINETUNE, EXP1, EXP2, LLM)  # in run order
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
PRECISION_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.precision)


def stage(key: str) -> StageSpec:
    """A stage by its number ("03") or its name ("03_finetune_users")."""
    for spec in STAGES:
        if key in (spec.number, spec.name):
            return spec
    raise KeyError(f"no stage {key!r}; stages: {', '.join(STAGE_NAMES)}")
