# Set-up is part of every target: the venv is created once and reinstalled
# only when pyproject.toml changes (stamp files), so repeated calls are quick.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml

.PHONY: run test bench clean

run: $(VENV)/.stamp-run
	$(BIN)/python -m altgrad_jax.run --config $(CONFIG)

# One pytest worker per core: most of the suite's time is XLA compiling tiny programs, one
# compile per core at a time.
test: $(VENV)/.stamp-dev
	$(BIN)/python -m pytest -q -n auto

bench: $(VENV)/.stamp-dev
	bash benchmarks/run_all.sh

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.stamp-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[wandb,plot]"
	touch $@

$(VENV)/.stamp-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@ $(VENV)/.stamp-run

clean:
	rm -rf $(VENV) *.egg-info
