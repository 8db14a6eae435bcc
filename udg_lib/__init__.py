"""udg: user-specific dialogue generation (Otsuka et al., LREC-COLING 2024), reproduced.

Modules follow the pipeline: data, splits, prompts, tokenizer, profiles, pretraining,
finetuning, generation, metrics, experiments, plots, pipeline.
"""

__version__ = "0.1.0"
