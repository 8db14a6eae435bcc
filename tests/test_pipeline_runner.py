"""The notebook runner, on two-cell notebooks built here (each executed stage starts a kernel, ~2-3 s)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import nbformat
import pytest
import yaml

from udg_lib.pipeline import (
    PipelineError,
    compute_run_key,
    main,
    notebook_source_hash,
    run_pipeline,
    stage_index,
    stage_work_dir,
)

PARAMETERS = """\
profile: str = "test"  # set by the runner
outputs_root: str = ""  # set by the runner
output_dir: str = ""  # set by the runner
x: int = 1  # the number this stage records"""

# Records x, and writes a data file that it fingerprints by its name in the stage folder.
MAKE_NUMBER = """\
from pathlib import Path
from udg_lib.provenance import write_metrics
(Path(output_dir) / "number.txt").write_text(f"{x}\\n")
params = {"x": x, "profile": profile}
write_metrics(output_dir, {"x": x}, params=params, seeds={"seed": 0}, data_files=["number.txt"])"""

# Reads the upstream stage's result through `outputs_root`, as real stages do.
ADD_ONE = """\
import json
from pathlib import Path
from udg_lib.provenance import write_metrics
upstream = json.loads((Path(outputs_root) / "00_make_number" / "metrics.json").read_text())
write_metrics(output_dir, {"x_plus_one": upstream["metrics"]["x"] + 1})"""

FAIL = 'raise ValueError("bad input\\non two lines")'
NO_METRICS = "print('forgot to write metrics')"


def write_notebook(path: Path, *cells: str) -> None:
    """A notebook whose first cell is PARAMETERS (tagged) followed by `cells`."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    parameters = nbformat.v4.new_code_cell(PARAMETERS)
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [parameters, *(nbformat.v4.new_code_cell(source) for source in cells)]
    nbformat.write(notebook, path)


def write_yaml(path: Path, values: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("notebooks")
    write_notebook(folder / "00_make_number.ipynb", MAKE_NUMBER)
    write_notebook(folder / "01_add_one.ipynb", ADD_ONE)
    return folder


@pytest.fixture(scope="module")
def first_run(notebooks: Path, tmp_path_factory) -> tuple[Path, list]:
    """Both stages run once with notebook defaults (no yaml files); tests copy the outputs to change them."""
    root = tmp_path_factory.mktemp("first_run")
    (root / "params").mkdir()
    results = run_pipeline("tiny", params_dir=root / "params", outputs_root=root / "outputs", notebooks_dir=notebooks)
    return root / "outputs", results


@pytest.fixture
def outputs(first_run: tuple[Path, list], tmp_path: Path) -> Path:
    """A private copy of the first run's outputs."""
    return Path(shutil.copytree(first_run[0], tmp_path / "outputs"))


def run(notebooks: Path, outputs: Path, **options) -> list[tuple[str, str]]:
    (outputs.parent / "params").mkdir(exist_ok=True)
    results = run_pipeline(
        "tiny", params_dir=outputs.parent / "params", outputs_root=outputs, notebooks_dir=notebooks, **options
    )
    return [(result.stage, result.status) for result in results]


def cli(notebooks: Path, outputs: Path, *options: str) -> int:
    (outputs.parent / "params").mkdir(exist_ok=True)
    folders = ["--params-dir", str(outputs.parent / "params"), "--outputs-root", str(outputs)]
    return main(["--profile", "tiny", *folders, "--notebooks-dir", str(notebooks), *options])


def read_metrics(outputs: Path, stage: str) -> dict:
    return json.loads((outputs / stage / "metrics.json").read_text())


def test_first_run_runs_every_stage_into_its_own_folder(first_run: tuple[Path, list]) -> None:
    outputs, results = first_run
    assert [(result.stage, result.status) for result in results] == [
        ("00_make_number", "ran"),
        ("01_add_one", "ran"),
    ]
    assert sorted(path.name for path in outputs.iterdir()) == ["00_make_number", "01_add_one"]  # no temp folders
    assert (outputs / "00_make_number" / "00_make_number.ipynb").exists()
    assert read_metrics(outputs, "01_add_one")["metrics"] == {"x_plus_one": 2}


def test_metrics_json_holds_metrics_params_provenance_and_stage(first_run: tuple[Path, list]) -> None:
    outputs, results = first_run
    record = read_metrics(outputs, "00_make_number")

    assert record["metrics"] == {"x": 1}
    assert record["params"] == {"x": 1, "profile": "tiny"}  # the runner injected the profile
    provenance = record["provenance"]
    assert {"git_commit", "packages", "device", "seeds", "data", "timestamp"} <= set(provenance)
    assert provenance["seeds"] == {"seed": 0}
    assert provenance["data"] == {"number.txt": hashlib.sha256(b"1\n").hexdigest()}
    assert "transformers" in provenance["packages"]

    stage = record["stage"]
    assert stage["name"] == "00_make_number"
    assert stage["profile"] == "tiny"
    assert stage["params"] == {"profile": "tiny", "x": 1}  # output locations are not configuration
    assert stage["run_key"] == results[0].run_key
    assert stage["wall_seconds"] > 0
    assert "finished_at" in stage


def test_unchanged_rerun_skips_every_stage(notebooks: Path, outputs: Path, capsys) -> None:
    assert run(notebooks, outputs) == [("00_make_number", "skipped"), ("01_add_one", "skipped")]
    assert "skip 00_make_number (up to date)" in capsys.readouterr().out


def test_changed_yaml_reruns_that_stage_and_downstream(notebooks: Path, outputs: Path, capsys) -> None:
    write_yaml(outputs.parent / "params" / "00_make_number.yaml", {"x": 5})

    assert cli(notebooks, outputs, "--list") == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in listing] == ["stale", "stale"]

    assert run(notebooks, outputs) == [("00_make_number", "ran"), ("01_add_one", "ran")]
    assert read_metrics(outputs, "00_make_number")["stage"]["params"]["x"] == 5
    assert read_metrics(outputs, "01_add_one")["metrics"] == {"x_plus_one": 6}
    assert sorted(path.name for path in outputs.iterdir()) == ["00_make_number", "01_add_one"]  # old folders gone


def test_force_reruns_an_up_to_date_stage(notebooks: Path, outputs: Path) -> None:
    assert run(notebooks, outputs, only="01_add_one", force=True) == [("01_add_one", "ran")]


def test_from_forces_that_stage_and_later_ones(notebooks: Path, outputs: Path) -> None:
    assert run(notebooks, outputs, from_stage="01") == [("00_make_number", "skipped"), ("01_add_one", "ran")]


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [({"x": 2, "lr": 0.1}, "unknown parameter 'lr'"), ({"output_dir": "/x"}, "'output_dir' is set by the runner")],
)
def test_bad_yaml_key_fails_before_any_stage_runs(
    notebooks: Path, tmp_path: Path, overrides: dict, complaint: str
) -> None:
    params_file = tmp_path / "params" / "01_add_one.yaml"
    write_yaml(params_file, overrides)
    with pytest.raises(PipelineError, match=complaint) as failure:
        run(notebooks, tmp_path / "outputs")
    assert str(params_file) in str(failure.value)
    assert not (tmp_path / "outputs").exists()


@pytest.fixture(scope="module")
def broken_notebooks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("broken_notebooks")
    write_notebook(folder / "00_make_number.ipynb", MAKE_NUMBER)
    write_notebook(folder / "01_fail.ipynb", "y = x * 2", FAIL)
    write_notebook(folder / "02_no_metrics.ipynb", NO_METRICS)
    return folder


def kept_notebook(message: str) -> Path:
    kept = Path(message.rsplit("executed notebook kept at ", 1)[1].rstrip(")"))
    assert kept.exists() and kept.parent.parent == Path(tempfile.gettempdir())
    shutil.rmtree(kept.parent)
    return kept


def test_failing_cell_gives_one_line_and_keeps_earlier_stages(broken_notebooks: Path, tmp_path: Path, capsys) -> None:
    outputs = tmp_path / "outputs"
    assert cli(broken_notebooks, outputs) == 1
    # stderr also carries papermill's progress bars; the report is the one line of our own.
    [report] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("udg pipeline:")]
    # In [1] is the parameters cell, [2] papermill's injected one, [3] `y = x * 2`.
    assert report.startswith("udg pipeline: stage 01_fail failed in cell 4: ValueError: bad input on two lines (")
    assert kept_notebook(report).name == "01_fail.ipynb"
    assert sorted(path.name for path in outputs.iterdir()) == ["00_make_number"]


def test_stage_without_metrics_fails_and_a_new_outputs_folder_is_removed(
    broken_notebooks: Path, tmp_path: Path
) -> None:
    with pytest.raises(
        PipelineError, match=r"stage 02_no_metrics failed: the notebook wrote no metrics\.json"
    ) as failure:
        run(broken_notebooks, tmp_path / "outputs", only="02")
    kept_notebook(str(failure.value))
    assert not (tmp_path / "outputs").exists()


def test_stage_reference_accepts_name_or_number() -> None:
    names = ["00_prepare_corpus", "01_split_users"]
    assert stage_index(names, "01") == stage_index(names, "01_split_users") == 1
    with pytest.raises(PipelineError, match="no stage '7'"):
        stage_index(names, "7")


def test_run_key_ignores_notebook_outputs_but_not_upstream(notebooks: Path, tmp_path: Path) -> None:
    source = notebooks / "00_make_number.ipynb"
    executed = nbformat.read(source, as_version=4)
    executed.cells[1].outputs = [nbformat.v4.new_output("stream", text="hello")]
    executed.cells[1].execution_count = 3
    nbformat.write(executed, tmp_path / "executed.ipynb")
    assert notebook_source_hash(tmp_path / "executed.ipynb") == notebook_source_hash(source)

    params = {"x": 1}
    assert compute_run_key(params, "abc", ["k0"]) != compute_run_key(params, "abc", ["k1"])


def test_missing_profile_folder_is_an_error(notebooks: Path, tmp_path: Path):
    with pytest.raises(PipelineError, match="no parameter folder .*nope for profile 'tiny'"):
        run_pipeline("tiny", params_dir=tmp_path / "nope", outputs_root=tmp_path / "out", notebooks_dir=notebooks)
    assert not (tmp_path / "out").exists()


def test_stale_temp_folders_of_a_killed_run_are_removed(notebooks: Path, tmp_path: Path):
    outputs = tmp_path / "outputs"
    stale = outputs / ".00_make_number.tmp-deadbeef"
    stale.mkdir(parents=True)
    (stale / "half.json").write_text("{")
    run(notebooks, outputs, only="00")
    assert not stale.exists() and (outputs / "00_make_number" / "metrics.json").exists()


def test_a_killed_stage_resumes_in_its_work_folder(notebooks: Path, first_run: tuple[Path, list], tmp_path: Path):
    """kill -9 leaves the stage's work folder (named by its run key); the next run continues in it."""
    outputs = tmp_path / "outputs"
    work = stage_work_dir(outputs, "00_make_number", first_run[1][0].run_key)
    work.mkdir(parents=True)
    (work / "user-a.done").write_text("finished before the kill")
    run(notebooks, outputs, only="00")
    assert (outputs / "00_make_number" / "user-a.done").read_text() == "finished before the kill"
    assert not work.exists()
    # --force starts over
    forced = stage_work_dir(outputs, "00_make_number", first_run[1][0].run_key)
    forced.mkdir()
    (forced / "user-b.done").write_text("x")
    run(notebooks, outputs, only="00", force=True)
    assert not (outputs / "00_make_number" / "user-b.done").exists()
