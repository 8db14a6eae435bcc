"""Layered parameter profiles (`extends:`): resolution key by key, errors that name the file, and the
project's own layered profile (full-en-causal over full-en)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from udg_lib.param_profiles import PipelineError, layered_file, profile_chain
from udg_lib.paths import repo_root
from udg_lib.stage_params import load_stage, read_run_settings, stage_notebooks


def write(folder: Path, name: str, values: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(yaml.safe_dump(values))
    return folder / name


@pytest.fixture
def layered(tmp_path: Path) -> Path:
    """params/base (two stage files, seeds 3) <- params/mid <- params/child."""
    params = tmp_path / "params"
    write(params / "base", "00_a.yaml", {"x": 1, "y": "base"})
    write(params / "base", "01_b.yaml", {"z": 5})
    write(params / "base", "pipeline.yaml", {"seeds": 3})
    write(params / "mid", "pipeline.yaml", {"extends": "base"})
    write(params / "mid", "00_a.yaml", {"y": "mid"})
    write(params / "child", "pipeline.yaml", {"extends": "mid", "replicate_from": "01"})
    write(params / "child", "00_a.yaml", {"x": 2})
    return params


def test_a_profile_is_its_parents_with_its_own_keys_laid_over(layered: Path) -> None:
    assert [p.name for p in profile_chain(layered / "child")] == ["base", "mid", "child"]
    values, sources = layered_file(layered / "child", "00_a.yaml")
    assert values == {"x": 2, "y": "mid"}
    assert sources == {"x": layered / "child" / "00_a.yaml", "y": layered / "mid" / "00_a.yaml"}
    assert layered_file(layered / "child", "01_b.yaml")[0] == {"z": 5}  # a stage file it lacks: the base's
    assert layered_file(layered / "base", "00_a.yaml")[0] == {"x": 1, "y": "base"}  # a parent is not changed
    settings = read_run_settings(layered / "child")
    assert (settings.seeds, settings.replicate_from) == (3, "01")  # `extends` itself is not a setting
    assert profile_chain(layered / "base") == [layered / "base"]


@pytest.mark.parametrize(("extends", "fault"), [
    ("nowhere", r"child/pipeline.yaml: extends 'nowhere': no parameter folder .*params/nowhere"),
    ("../base", r"child/pipeline.yaml: extends must name one profile .*'../base'"),
    (["base"], r"child/pipeline.yaml: extends must name one profile"),
    ("child", r"extends makes a cycle: child -> child"),
])
def test_a_bad_parent_is_a_one_line_error_naming_the_file(layered: Path, extends, fault) -> None:
    write(layered / "child", "pipeline.yaml", {"extends": extends})
    with pytest.raises(PipelineError, match=fault) as error:
        profile_chain(layered / "child")
    assert "\n" not in str(error.value)


def test_a_cycle_through_two_profiles_is_named(layered: Path) -> None:
    write(layered / "base", "pipeline.yaml", {"extends": "child"})
    with pytest.raises(PipelineError, match=r"extends makes a cycle: \w+ -> \w+ -> \w+ -> \w+"):
        layered_file(layered / "child", "00_a.yaml")


def test_a_bad_key_inherited_from_a_parent_names_the_parents_file(tmp_path: Path) -> None:
    notebooks = repo_root() / "notebooks"
    notebook = next(nb for nb in stage_notebooks(notebooks) if nb.stem == "04_exp1_next_utterance")
    params = tmp_path / "params"
    write(params / "parent", f"{notebook.stem}.yaml", {"no_such_parameter": 1})
    write(params / "child", "pipeline.yaml", {"extends": "parent"})
    with pytest.raises(PipelineError, match=r"parent/04_exp1_next_utterance.yaml: unknown parameter 'no_such_parameter'"):
        load_stage(notebook, params / "child", "child")
    write(params / "parent", f"{notebook.stem}.yaml", {"batch_size": "eight"})
    with pytest.raises(PipelineError, match=r"parent/04_exp1_next_utterance.yaml: parameter 'batch_size' expects int"):
        load_stage(notebook, params / "child", "child")
    write(params / "child", f"{notebook.stem}.yaml", {"batch_size": 8})  # the child's value wins, and passes
    stage = load_stage(notebook, params / "child", "child")
    assert stage.params["batch_size"] == 8 and stage.source_of("batch_size") == params / "child" / f"{notebook.stem}.yaml"
    assert stage.source_of("embedder") == notebook  # a notebook default


def test_a_bad_run_setting_names_the_file_that_set_it(layered: Path) -> None:
    write(layered / "base", "pipeline.yaml", {"seeds": 0})
    with pytest.raises(PipelineError, match=r"base/pipeline.yaml: seeds must be a whole number >= 1"):
        read_run_settings(layered / "child")
    write(layered / "base", "pipeline.yaml", {"sedes": 2})
    with pytest.raises(PipelineError, match=r"base/pipeline.yaml: unknown setting 'sedes'"):
        read_run_settings(layered / "child")


def test_full_en_causal_is_full_en_with_another_model() -> None:
    """The causal profile resolves to full-en with another tokenizer, base and completion LLM (and LoRA dropout at
    the model's own rate): nothing else may differ, and its own files set nothing that full-en already has."""
    params = repo_root() / "params"
    assert [p.name for p in profile_chain(params / "full-en-causal")] == ["full-en", "full-en-causal"]
    allowed = {"00_prepare_corpus": {"tokenizer_name_or_path"}, "02_pretrain_models": {"model_family", "checkpoint"},
               "03_finetune_users": {"lora_dropout"}, "06_llm_baselines": {"completion_model"}}
    for notebook in stage_notebooks(repo_root() / "notebooks"):
        en = load_stage(notebook, params / "full-en", "full-en").params
        causal = load_stage(notebook, params / "full-en-causal", "full-en-causal").params
        differing = {k for k in en if k != "profile" and en[k] != causal[k]}
        assert differing == allowed.get(notebook.stem, set()), notebook.stem
        own = yaml.safe_load((params / "full-en-causal" / f"{notebook.stem}.yaml").read_text()) \
            if (params / "full-en-causal" / f"{notebook.stem}.yaml").is_file() else {}
        assert set(own or {}) == allowed.get(notebook.stem, set()), notebook.stem  # overrides only what differs
    def value(stage: str, key: str):
        return layered_file(params / "full-en-causal", f"{stage}.yaml")[0][key]

    base = value("02_pretrain_models", "checkpoint")
    assert value("00_prepare_corpus", "tokenizer_name_or_path") == base  # the base's own tokenizer
    assert value("06_llm_baselines", "completion_model") == base  # C1s: prompted vs fine-tuned, the same model
    assert read_run_settings(params / "full-en-causal") == read_run_settings(params / "full-en")
