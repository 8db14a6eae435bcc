"""The catalog names every stage once: each entry has its notebook, each notebook writes the folder the catalog
names, and no other module of udg_lib spells a stage's folder in its code."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from udg_lib import catalog, paths

PACKAGE = Path(__file__).resolve().parents[1] / "udg_lib"
NOTEBOOKS = paths.repo_root() / "notebooks"


def test_every_stage_has_its_notebook_in_run_order():
    assert [spec.notebook for spec in catalog.STAGES] == sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert [spec.number for spec in catalog.STAGES] == [f"{k:02d}" for k in range(len(catalog.STAGES))]
    assert catalog.stage("03") is catalog.stage("03_finetune_users") is catalog.FINETUNE
    with pytest.raises(KeyError, match="no stage '07'"):
        catalog.stage("07")


def test_each_notebook_writes_the_folder_the_catalog_names():
    for spec in catalog.STAGES:
        cells = json.loads((NOTEBOOKS / spec.notebook).read_text(encoding="utf-8"))["cells"]
        code = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert f'STAGE = "{spec.name}"' in code, spec.name
        declared = "precision: str" in "".join(cells[1]["source"])  # the parameters cell
        assert declared == spec.precision, spec.name


def test_no_module_but_the_catalog_spells_a_stage_folder():
    names = set(catalog.STAGE_NAMES)
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "catalog.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        found += [f"{path.name}:{node.lineno} {node.value}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and any(name in node.value for name in names)]
    assert not found, found
    assert catalog.EXP1.file("/o", "scores") == Path("/o/04_exp1_next_utterance/scores.parquet")
    assert catalog.FINETUNE.file("/o", "metrics") == Path("/o/03_finetune_users/metrics.json")
