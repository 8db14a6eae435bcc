"""Layered parameter profiles (`extends:` and `model:`): resolution key by key, errors that name the file, and
the project's own layers (full-en-causal over full-en, each profile's model in params/models/)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from udg_lib.catalog import STAGE_NAMES, stage
from udg_lib.param_profiles import (MODELS_DIR, PipelineError, is_model_layer, known_profiles, layered_file,
                                    profile_chain, profile_model)
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
    """The causal profile resolves to full-en with another model layer: only that model's keys differ (tokenizer,
    family and base, LoRA dropout at the model's own rate, the base as completion LLM), and it has no stage file
    of its own: the switch is its one `model:` line."""
    params = repo_root() / "params"
    # full-en's own model, t5-base, is replaced (only the nearest model counts), not laid under smollm2-135m
    assert [p.name for p in profile_chain(params / "full-en-causal")] == ["full-en", "smollm2-135m", "full-en-causal"]
    assert sorted(p.name for p in (params / "full-en-causal").iterdir()) == ["pipeline.yaml"]
    assert (profile_model(params / "full-en"), profile_model(params / "full-en-causal")) == ("t5-base", "smollm2-135m")
    allowed = {"00_prepare_corpus": {"tokenizer_name_or_path"}, "02_pretrain_models": {"model_family", "checkpoint"},
               "03_finetune_users": {"lora_dropout"}, "06_llm_baselines": {"completion_model"}}
    for notebook in stage_notebooks(repo_root() / "notebooks"):
        en = load_stage(notebook, params / "full-en", "full-en").params
        causal = load_stage(notebook, params / "full-en-causal", "full-en-causal").params
        differing = {k for k in en if k != "profile" and en[k] != causal[k]}
        assert differing == allowed.get(notebook.stem, set()), notebook.stem
    def value(stage: str, key: str):
        return layered_file(params / "full-en-causal", f"{stage}.yaml")[0][key]

    base = value("02_pretrain_models", "checkpoint")
    assert value("00_prepare_corpus", "tokenizer_name_or_path") == base  # the base's own tokenizer
    assert value("06_llm_baselines", "completion_model") == base  # C1s: prompted vs fine-tuned, the same model
    assert read_run_settings(params / "full-en-causal") == read_run_settings(params / "full-en")


def test_every_project_model_layer_sets_only_the_models_keys_and_every_full_profile_names_one() -> None:
    params = repo_root() / "params"
    layers = sorted((params / MODELS_DIR).iterdir())
    assert layers and MODELS_DIR not in known_profiles(params)
    for layer in layers:
        for path in layer.iterdir():
            assert path.stem in STAGE_NAMES and set(yaml.safe_load(path.read_text())) <= set(stage(path.stem).model_keys), path
    named = {profile: profile_model(params / profile) for profile in known_profiles(params)}
    assert {p: m for p, m in named.items() if m} == {"cpu": "smollm2-135m-instruct", "full-en": "t5-base",
                                                     "full-en-causal": "smollm2-135m", "full-ja": "t5-base-japanese"}
    assert {m for m in named.values() if m} == {layer.name for layer in layers}  # no layer unused
    for profile, model in named.items():  # no profile overrides a key of its model layer: one place
        chain = profile_chain(params / profile)
        above = chain[[is_model_layer(folder) for folder in chain].index(True) + 1:] if model else []
        for layer_file in (params / MODELS_DIR / model).iterdir() if model else []:
            for folder in above:
                own = yaml.safe_load((folder / layer_file.name).read_text()) if (folder / layer_file.name).is_file() else {}
                assert not set(own or {}) & set(yaml.safe_load(layer_file.read_text())), (folder, layer_file)


@pytest.fixture
def with_models(layered: Path) -> Path:
    """`layered` with two model layers; mid names model a."""
    write(layered / MODELS_DIR / "a", "00_a.yaml", {"x": "model a", "y": "model a"})
    write(layered / MODELS_DIR / "b", "00_a.yaml", {"x": "model b"})
    write(layered / "mid", "pipeline.yaml", {"extends": "base", "model": "a"})
    return layered


def test_a_model_layer_goes_directly_below_the_profile_that_names_it(with_models: Path) -> None:
    models = with_models / MODELS_DIR
    assert profile_chain(with_models / "child") == [with_models / "base", models / "a", with_models / "mid",
                                                    with_models / "child"]
    values, sources = layered_file(with_models / "child", "00_a.yaml")
    # x: the child's own file over the model; y: mid's own file over the model; the base's values are overridden
    assert values == {"x": 2, "y": "mid"} and sources["x"] == with_models / "child" / "00_a.yaml"
    assert layered_file(with_models / "base", "00_a.yaml")[0] == {"x": 1, "y": "base"}
    (with_models / "mid" / "00_a.yaml").unlink()
    assert layered_file(with_models / "mid", "00_a.yaml") == ({"x": "model a", "y": "model a"},
                                                              {"x": models / "a" / "00_a.yaml", "y": models / "a" / "00_a.yaml"})
    assert profile_model(with_models / "child") == "a" and profile_model(with_models / "base") is None
    assert read_run_settings(with_models / "child").seeds == 3  # `model` is not a setting


def test_only_the_nearest_model_counts(with_models: Path) -> None:
    write(with_models / "child", "pipeline.yaml", {"extends": "mid", "model": "b"})
    (with_models / "child" / "00_a.yaml").unlink()
    chain = profile_chain(with_models / "child")
    assert [p.name for p in chain] == ["base", "mid", "b", "child"]  # model a is gone, not under b
    # y falls back to mid's own value, never to model a's
    assert layered_file(with_models / "child", "00_a.yaml")[0] == {"x": "model b", "y": "mid"}


@pytest.mark.parametrize(("settings", "fault"), [
    ({"model": "c"}, r"mid/pipeline.yaml: model 'c': no model layer .*models/c"),
    ({"model": "../a"}, r"mid/pipeline.yaml: model must name one model layer"),
    ({"model": ["a"]}, r"mid/pipeline.yaml: model must name one model layer"),
])
def test_a_bad_model_name_is_a_one_line_error_naming_the_file(with_models: Path, settings, fault) -> None:
    write(with_models / "mid", "pipeline.yaml", {"extends": "base", **settings})
    with pytest.raises(PipelineError, match=fault) as error:
        layered_file(with_models / "child", "00_a.yaml")
    assert "\n" not in str(error.value)


def test_a_model_layer_holds_stage_files_only(with_models: Path) -> None:
    write(with_models / MODELS_DIR / "a", "pipeline.yaml", {"seeds": 2})
    with pytest.raises(PipelineError, match=r"models/a/pipeline.yaml: a model layer holds stage files only"):
        read_run_settings(with_models / "child")


@pytest.mark.parametrize(("stem", "values", "fault"), [
    ("00_prepare_corpus", {"tokenizer_name_or_path": "smollm2", "max_users": 3},
     r"models/a/00_prepare_corpus.yaml: 'max_users' is not the model's to set \(a model layer sets only "
     r"tokenizer_name_or_path, vocab_size in 00_prepare_corpus"),
    ("04_exp1_next_utterance", {"batch_size": 4}, r"'batch_size' is not the model's to set .*only nothing in 04"),
])
def test_a_model_layer_sets_only_its_stages_model_keys(with_models: Path, stem, values, fault) -> None:
    notebook = repo_root() / "notebooks" / f"{stem}.ipynb"
    write(with_models / MODELS_DIR / "a", f"{stem}.yaml", values)
    with pytest.raises(PipelineError, match=fault) as error:
        load_stage(notebook, with_models / "child", "child")
    assert "\n" not in str(error.value)
    write(with_models / MODELS_DIR / "a", f"{stem}.yaml", {k: v for k, v in values.items() if k in stage(stem).model_keys})
    write(with_models / "child", f"{stem}.yaml", {k: v for k, v in values.items() if k not in stage(stem).model_keys})
    loaded = load_stage(notebook, with_models / "child", "child")  # the profile may set them: it passes
    assert all(loaded.params[k] == v for k, v in values.items())
