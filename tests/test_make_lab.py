"""`make lab`'s command line, read with `make -n` (nothing runs): options pass through, root is handled."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from udg_lib.paths import repo_root

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make_lab_dry_run(*variables: str) -> list[str]:
    result = subprocess.run(["make", "-n", "lab", *variables], cwd=repo_root(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_lab_args_reach_jupyterlab_and_root_adds_allow_root() -> None:
    lines = make_lab_dry_run('LAB_ARGS=--ip=0.0.0.0 --port=8899 --no-browser')
    [server] = [line for line in lines if "-m jupyterlab" in line]
    assert server.endswith("--ip=0.0.0.0 --port=8899 --no-browser")
    as_root = os.geteuid() == 0
    assert ("--allow-root" in server.split()) == as_root
    assert any("make lab: running as root" in line and "--allow-root" in line for line in lines) == as_root


def test_in_a_container_without_an_address_make_lab_says_how_to_reach_the_server() -> None:
    in_container = any(os.path.exists(path) for path in ("/.dockerenv", "/run/.containerenv"))
    hint = [line for line in make_lab_dry_run() if "the server listens inside it only" in line]
    assert bool(hint) == in_container
    assert not [line for line in make_lab_dry_run("LAB_ARGS=--ip=0.0.0.0") if "listens inside it only" in line]
