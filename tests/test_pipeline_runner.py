"""The notebook runner, on two-cell notebooks built here (each executed stage starts a kernel, ~2-3 s)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pytest
import yaml

from udg_lib.stage_params import notebook_source_hash
from udg_lib.pipeline import (
    PipelineError,
    compute_run_key,
    main,
    run_pipeline,
    stage_index,
    stage_statuses,
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


def write_notebook(path: Path, *cells: str, parameters: str = PARAMETERS) -> None:
    """A notebook whose first cell is `parameters` (tagged) followed by `cells`.

    Its metadata names a kernel that no machine has registered: the runner must not depend on it (the
    project's notebooks name `udg`, which exists only where `make lab` registered it)."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "udg-unregistered", "language": "python", "display_name": "udg"}
    parameters = nbformat.v4.new_code_cell(parameters)
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
    with pytest.raises(PipelineError, match="params/models holds model layers .*not a profile"):
        run_pipeline("models", outputs_root=tmp_path / "out", notebooks_dir=notebooks)
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


# --- the executed copy, as a reader meets it in JupyterLab -------------------------------------------

def injected_cell(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    [cell] = [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]
    return cell


def test_the_executed_copy_names_the_stage_folder_and_reruns_in_place(notebooks: Path, tmp_path: Path) -> None:
    import papermill

    outputs = tmp_path / "outputs"
    run(notebooks, outputs)
    stage = outputs / "00_make_number"
    run_key = read_metrics(outputs, "00_make_number")["stage"]["run_key"]
    executed = nbformat.read(stage / "00_make_number.ipynb", as_version=4)
    source = injected_cell(executed).source
    work = stage_work_dir(outputs, "00_make_number", run_key)
    assert source.splitlines() == [
        f"# Parameters (the runner wrote to {work.name}, renamed to output_dir when the stage finished)",
        'profile = "tiny"', f'outputs_root = "{outputs}"', f'output_dir = "{stage}"',
    ]
    assert executed.metadata.papermill.parameters == {"profile": "tiny", "outputs_root": str(outputs),
                                                      "output_dir": str(stage)}
    assert executed.metadata.papermill.output_path == str(stage / "00_make_number.ipynb")
    assert injected_cell(executed).execution_count == 2  # the cell keeps its place in the run's record

    # A reader reruns the copy from its own folder (JupyterLab's kernel starts there): it rewrites the stage there.
    before = read_metrics(outputs, "00_make_number")
    (stage / "number.txt").unlink()
    papermill.execute_notebook(stage / "00_make_number.ipynb", stage / "00_make_number.ipynb", kernel_name="python3",
                               cwd=stage, progress_bar=False)
    after = read_metrics(outputs, "00_make_number")
    assert after["metrics"] == before["metrics"] and after["params"] == before["params"]
    assert (stage / "number.txt").read_text() == "1\n"
    assert sorted(path.name for path in outputs.iterdir()) == ["00_make_number", "01_add_one"]  # no hidden folder
    # write_metrics merged into the runner's record, which still holds: the stage and the next stay up to date
    assert after["stage"] == before["stage"]
    assert run(notebooks, outputs) == [("00_make_number", "skipped"), ("01_add_one", "skipped")]


# Counts to 13 with a udg_lib bar, printing and showing a table while it runs, as stage notebooks do; then
# to 7 with tqdm.auto's bar, as other libraries draw theirs (transformers' "Loading weights").
COUNT_WITH_BARS = """\
from IPython.display import Markdown, display
from tqdm.auto import tqdm
from udg_lib.progress import progress_bar
from udg_lib.provenance import write_metrics
for i in progress_bar(range(13), desc="generate tiny", mininterval=0):
    if i == 5:
        print("halfway")
        display(Markdown("| a table |"))
for i in tqdm(range(7), desc="Loading weights", mininterval=0):
    pass
path = write_metrics(output_dir, {"n": 13})"""


def test_a_saved_progress_bar_reads_its_final_state(tmp_path: Path) -> None:
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks / "00_count.ipynb", COUNT_WITH_BARS)
    (tmp_path / "params").mkdir()
    run_pipeline("tiny", params_dir=tmp_path / "params", outputs_root=tmp_path / "outputs", notebooks_dir=notebooks)
    saved = tmp_path / "outputs" / "00_count" / "00_count.ipynb"
    outputs = nbformat.read(saved, as_version=4).cells[-1].outputs
    assert [(o.output_type, o.get("name")) for o in outputs] == [
        ("stream", "stdout"), ("display_data", None), ("stream", "stderr"), ("display_data", None)]
    assert outputs[2].text.startswith("generate tiny: 100%|██████████| 13/13 [")  # a text bar
    assert outputs[2].text.count("\n") == 1 and "\r" not in outputs[2].text
    assert "application/vnd.jupyter.widget-view+json" in outputs[3].data  # a widget, as trusted readers see it
    assert outputs[3].data["text/plain"].startswith("Loading weights: 100%|██████████| 7/7 [")  # and untrusted
    text = saved.read_text(encoding="utf-8")
    assert not re.search(r"(?<![0-9])0%\|", text)  # no first state: " 0%|" (100%| is the last one)


# --- parameters checked before anything runs ---------------------------------------------------------

TYPED_PARAMETERS = PARAMETERS + """
rate: float = 0.5  # a float
names: list = []  # a list
flag: bool = False  # a bool
corpora: list = []  # corpus specs, as stage 00 takes them
label: str = None  # a parameter that may be null"""


@pytest.fixture(scope="module")
def typed_notebooks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("typed_notebooks")
    write_notebook(folder / "00_make_number.ipynb", MAKE_NUMBER, parameters=TYPED_PARAMETERS)
    write_notebook(folder / "01_add_one.ipynb", ADD_ONE)
    return folder


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"x": "four"}, "parameter 'x' expects int, got str 'four'"),
        ({"x": 2.5}, "parameter 'x' expects int, got float 2.5"),
        ({"x": "1000"}, "parameter 'x' expects int, got str '1000'"),
        ({"x": True}, "parameter 'x' expects int, got bool True"),  # a bool is not an int
        ({"rate": "0.1"}, "parameter 'rate' expects float, got str '0.1'"),
        ({"flag": 1}, "parameter 'flag' expects bool, got int 1"),
        ({"corpora": {"format": "chitchat"}}, "parameter 'corpora' expects list, got dict {'format': 'chitchat'}"),
        (
            {"corpora": [{"format": "generic", "path": "data/turns.jsonl", "name": "lab"}]},
            "corpus 'lab': unknown key 'path' for format 'generic'; it accepts: "
            "format, name, split, turns, users, language, domain, style, user_kind",
        ),
    ],
)
def test_a_wrong_value_in_any_stage_fails_before_any_stage_runs(
    typed_notebooks: Path, tmp_path: Path, capsys, values: dict, complaint: str
) -> None:
    params_file = tmp_path / "params" / "00_make_number.yaml"
    write_yaml(params_file, values)
    outputs = tmp_path / "outputs"
    assert cli(typed_notebooks, outputs, "--only", "01") == 1  # the bad value is in a stage --only leaves out
    [report] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("udg pipeline:")]
    assert report == f"udg pipeline: {params_file}: {complaint}"
    with pytest.raises(PipelineError, match="expects|unknown key"):
        run(typed_notebooks, outputs, from_stage="01")
    assert not outputs.exists()


def test_an_int_is_a_float_and_nulls_pass_where_the_default_is_none(typed_notebooks: Path, tmp_path: Path) -> None:
    write_yaml(tmp_path / "params" / "00_make_number.yaml", {"rate": 1, "names": ["a"], "flag": True, "label": None})
    assert cli(typed_notebooks, tmp_path / "outputs", "--list") == 0


@pytest.mark.parametrize("profile", ["test", "cpu", "cpu-t5", "full-en", "full-en-causal", "full-ja"])
def test_the_project_profiles_pass_the_parameter_checks(profile: str, tmp_path: Path) -> None:
    statuses = stage_statuses(profile, outputs_root=tmp_path / "outputs")
    assert [status for _, status in statuses] == ["missing"] * 7


def test_the_project_notebooks_name_the_udg_kernel() -> None:
    from udg_lib.stage_params import stage_notebooks
    from udg_lib.paths import repo_root

    for notebook in stage_notebooks(repo_root() / "notebooks"):
        assert nbformat.read(notebook, as_version=4).metadata["kernelspec"]["name"] == "udg", notebook.name


# --- input files enter the run key by content ------------------------------------------------------

COUNT_LINES = """\
from pathlib import Path
from udg_lib.provenance import write_metrics
write_metrics(output_dir, {"lines": len(Path(corpus).read_text().splitlines())})"""


def test_an_input_file_cut_at_the_same_path_makes_its_stage_stale(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the hash cache of this test only
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    parameters = PARAMETERS + '\ncorpus: str = ""  # a text file whose lines this stage counts'
    write_notebook(notebooks / "00_count_lines.ipynb", COUNT_LINES, parameters=parameters)
    corpus = tmp_path / "data" / "turns.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("turn\n" * 3352)
    write_yaml(tmp_path / "params" / "00_count_lines.yaml", {"corpus": str(corpus)})
    outputs = tmp_path / "outputs"
    assert run(notebooks, outputs) == [("00_count_lines", "ran")]
    assert cli(notebooks, outputs, "--list") == 0
    assert capsys.readouterr().out.strip().endswith("up to date")

    corpus.write_text("turn\n" * 1000)  # same path, fewer lines
    assert cli(notebooks, outputs, "--list") == 0
    assert capsys.readouterr().out.split()[-1] == "stale"
    assert run(notebooks, outputs) == [("00_count_lines", "ran")]
    record = read_metrics(outputs, "00_count_lines")
    assert record["metrics"] == {"lines": 1000}
    assert record["stage"]["inputs"] == {str(corpus): hashlib.sha256(b"turn\n" * 1000).hexdigest()}
    assert run(notebooks, outputs) == [("00_count_lines", "skipped")]


def test_input_paths_are_regular_files_and_folders_named_by_a_path(tmp_path: Path) -> None:
    from udg_lib.stage_params import input_paths

    corpus = tmp_path / "turns.jsonl"
    corpus.write_text("turn\n")
    params = {"corpora": [{"format": "generic", "turns": str(corpus)}], "llm": "smollm2",
              "checkpoint": "sonoisa/t5-base-japanese", "fill_target": "/dev/full", "folder": str(tmp_path)}
    assert input_paths(params) == {str(corpus): corpus, str(tmp_path): tmp_path}  # never a device


# --- faults end with one line and lose nothing ------------------------------------------------------

def _mount(*args: str) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextmanager
def read_only(folder: Path):
    """`folder` made read-only: a read-only bind mount where root may mount (chmod does not stop root), else
    chmod. Yields the OS error text writing there gives."""
    if _mount("--bind", str(folder), str(folder)):
        try:
            assert _mount("-o", "remount,bind,ro", str(folder))
            yield "[Errno 30] Read-only file system"
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    folders = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
    for path in folders:
        path.chmod(0o555)
    try:
        try:
            (folder / ".probe").mkdir()
        except PermissionError:
            yield "[Errno 13] Permission denied"
        else:
            (folder / ".probe").rmdir()
            pytest.skip("root that may not mount: cannot make a folder read-only")
    finally:
        for path in folders:
            path.chmod(0o755)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_read_only_outputs_fail_in_one_line_naming_the_path_and_keep_the_old_outputs(
    notebooks: Path, outputs: Path, capsys
) -> None:
    before = _files(outputs)
    with read_only(outputs) as os_error:
        assert cli(notebooks, outputs, "--force") == 1
    err = capsys.readouterr().err
    [report] = [line for line in err.splitlines() if line.startswith("udg pipeline:")]
    assert report.startswith(f"udg pipeline: stage 00_make_number failed: ")
    assert os_error in report and f"'{outputs}/.00_make_number.tmp-" in report
    assert "Traceback" not in err
    assert _files(outputs) == before


FILL = """\
with open(fill_target or f"{output_dir}/filler.bin", "wb") as handle:
    for _ in range(64):
        handle.write(b"x" * (1 << 16))
        handle.flush()"""


@contextmanager
def full_disk(folder: Path, size: str):
    """A small tmpfs at `folder` (root only); yields False where it cannot be mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_fails_in_one_line_naming_the_outputs_and_keeps_earlier_stages(tmp_path: Path, capsys) -> None:
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks / "00_make_number.ipynb", MAKE_NUMBER)
    parameters = PARAMETERS + '\nfill_target: str = ""  # empty: a file in output_dir'
    write_notebook(notebooks / "01_fill.ipynb", FILL, parameters=parameters)
    outputs = tmp_path / "outputs"
    with full_disk(outputs, "1m") as real:
        if not real:  # not root: the kernel's own ENOSPC from /dev/full takes the same path
            write_yaml(tmp_path / "params" / "01_fill.yaml", {"fill_target": "/dev/full"})
        assert cli(notebooks, outputs) == 1
        err = capsys.readouterr().err
        [report] = [line for line in err.splitlines() if line.startswith("udg pipeline:")]
        assert report.startswith("udg pipeline: stage 01_fill failed")
        assert "[Errno 28] No space left on device" in report and f"(writing under {outputs}" in report
        assert "Traceback" not in err
        assert sorted(p.name for p in outputs.iterdir()) == ["00_make_number"]
        assert read_metrics(outputs, "00_make_number")["metrics"] == {"x": 1}
    for kept in Path(tempfile.gettempdir()).glob("udg-failed-*/01_fill.ipynb"):
        shutil.rmtree(kept.parent)


def test_a_failure_on_a_full_disk_says_so_when_the_error_hides_its_errno(tmp_path: Path, monkeypatch) -> None:
    from udg_lib import pipeline

    full = shutil._ntuple_diskusage(total=100 << 30, used=100 << 30, free=4096)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    error = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    assert pipeline._failure_message("02_pretrain_models", error, None, tmp_path) == (
        "stage 02_pretrain_models failed: RuntimeError: [enforce fail at inline_container.cc:664] . unexpected "
        f"pos 64 vs 0 (the disk of {tmp_path} is full; no executed notebook)"
    )
    read_only_error = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x"))  # its own cause
    assert "is full" not in pipeline._failure_message("00_prepare_corpus", read_only_error, None, tmp_path)


def test_sentencepiece_on_a_full_disk_raises_the_os_error_naming_the_folder(tmp_path: Path) -> None:
    from conftest import sentences
    from udg_lib.tokenizer import SentencePieceSettings, train_sentencepiece_tokenizer

    texts = sentences(200)
    disk = tmp_path / "disk"
    with full_disk(disk, "512k") as real:
        if not real:
            pytest.skip("needs root to mount a small tmpfs")
        # Leave room for the training text but not for the model (its NFKC table alone is ~240 KB).
        free = shutil.disk_usage(disk).free - len("\n".join(texts).encode()) - (16 << 10)
        (disk / "filler.bin").write_bytes(b"\0" * (free // 4096 * 4096))
        with pytest.raises(OSError) as failure:
            train_sentencepiece_tokenizer(texts, disk / "tokenizer", SentencePieceSettings(vocab_size=300,
                                                                                           extra_ids=2, num_threads=1))
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(disk / "tokenizer")
    assert str(failure.value) == f"[Errno 28] No space left on device: '{disk / 'tokenizer'}'"


def test_the_runner_log_carries_no_kernel_noise(notebooks: Path, tmp_path: Path, capfd, monkeypatch) -> None:
    from jupyter_client import AsyncKernelManager

    interrupts = []

    async def record_interrupt(self) -> None:
        interrupts.append(self)

    monkeypatch.setattr(AsyncKernelManager, "_async_interrupt_kernel", record_interrupt)
    assert cli(notebooks, tmp_path / "outputs", "--only", "00") == 0
    log = capfd.readouterr()
    for noise in ("Kernel is running over TCP without encryption", "KeyboardInterrupt caught in kernel"):
        assert noise not in log.out + log.err
    assert interrupts == []  # jupyter_client would SIGINT the finished kernel before its shutdown request


# --- artifacts that work outside the pipeline ------------------------------------------------------

SAVE_ADAPTER = """\
from pathlib import Path
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import T5Config, T5ForConditionalGeneration
from udg_lib.provenance import write_metrics
torch.manual_seed(0)
base_dir = Path(output_dir) / "ds" / "da" / "model"
config = T5Config(vocab_size=32, d_model=8, d_ff=16, d_kv=4, num_layers=1, num_heads=2, decoder_start_token_id=0)
T5ForConditionalGeneration(config).save_pretrained(base_dir)
base = T5ForConditionalGeneration.from_pretrained(base_dir)  # as stage 03 loads its domain-adapted model
lora = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=2, target_modules=["q", "v"]))
lora.save_pretrained(Path(output_dir) / "ds" / "users" / "u1" / "adapter")
write_metrics(output_dir, {"adapters": 1})"""


def test_a_saved_adapter_loads_with_auto_peft_model_alone_after_the_stage_folder_is_renamed(
    tmp_path: Path, monkeypatch
) -> None:
    from peft import AutoPeftModelForSeq2SeqLM, PeftModel

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks / "00_save_adapter.ipynb", SAVE_ADAPTER)
    outputs = tmp_path / "outputs"
    assert run(notebooks, outputs) == [("00_save_adapter", "ran")]
    adapter_dir = outputs / "00_save_adapter" / "ds" / "users" / "u1" / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(outputs / "00_save_adapter" / "ds" / "da" / "model")
    monkeypatch.chdir(tmp_path)
    model = AutoPeftModelForSeq2SeqLM.from_pretrained(adapter_dir)
    assert isinstance(model, PeftModel)


# --- training seeds: stages from `replicate_from` on run once per seed (issue #20 §5) ---------------------------

TRAIN_WITH_SEED = """\
import json
from pathlib import Path
from udg_lib.provenance import write_metrics
upstream = json.loads((Path(outputs_root) / "00_make_number" / "metrics.json").read_text())
write_metrics(output_dir, {"x": upstream["metrics"]["x"], "seed": seed})"""


def test_seeds_replicate_the_training_stages_and_share_the_earlier_ones(tmp_path: Path, capsys) -> None:
    from udg_lib.paths import replica_roots
    from udg_lib.param_profiles import RUN_SETTINGS_FILE

    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(folder / "00_make_number.ipynb", MAKE_NUMBER)
    write_notebook(folder / "01_train.ipynb", TRAIN_WITH_SEED,
                   parameters=PARAMETERS + "\nseed: int = 5  # training seed")
    outputs = tmp_path / "outputs"
    write_yaml(tmp_path / "params" / RUN_SETTINGS_FILE, {"seeds": 3, "replicate_from": "01"})
    write_yaml(tmp_path / "params" / "00_make_number.yaml", {"x": 7})
    assert run(folder, outputs) == [("00_make_number", "ran"), ("01_train", "ran"),
                                    ("seed-1/01_train", "ran"), ("seed-2/01_train", "ran")]
    assert read_metrics(outputs, "01_train")["metrics"] == {"x": 7, "seed": 5}
    roots = replica_roots(outputs)
    assert [r for r, _ in roots] == [1, 2]
    for replica, root in roots:
        assert read_metrics(root, "01_train")["metrics"] == {"x": 7, "seed": 5 + replica}
        assert (root / "00_make_number").is_symlink() and read_metrics(root, "00_make_number")["metrics"]["x"] == 7
    assert {status for _, status in run(folder, outputs)} == {"skipped"}  # every replica up to date
    write_yaml(tmp_path / "params" / "00_make_number.yaml", {"x": 8})  # a shared stage changed: replicas rerun
    assert run(folder, outputs)[-1] == ("seed-2/01_train", "ran")
    assert read_metrics(roots[1][1], "01_train")["metrics"] == {"x": 8, "seed": 7}


@pytest.mark.parametrize("settings, fault", [({"seeds": 0}, "seeds must be a whole number >= 1"),
                                             ({"seed": 2}, "unknown setting 'seed'"),
                                             ({"seeds": 2, "replicate_from": "07"}, "no stage '07'")])
def test_bad_run_settings_fail_before_any_stage_runs(notebooks: Path, tmp_path: Path, settings, fault) -> None:
    from udg_lib.param_profiles import RUN_SETTINGS_FILE

    write_yaml(tmp_path / "params" / RUN_SETTINGS_FILE, settings)
    with pytest.raises(PipelineError, match=fault) as error:
        run(notebooks, tmp_path / "outputs")
    assert RUN_SETTINGS_FILE in str(error.value) or "07" in str(error.value)
    assert not (tmp_path / "outputs").exists()
