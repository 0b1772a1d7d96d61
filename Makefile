# Two commands a newcomer needs: `make demo` and `make test`. Each creates or refreshes .venv itself.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_DATASETS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv demo test lint format clean

venv: $(STAMP)

# Rebuilt whenever the pinned versions or the project metadata change.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# The whole DAG on the embedded corpus, offline (the `smoke` preset).
demo: $(STAMP)
	$(BIN)/dvc exp run -S preset=smoke
	$(BIN)/python -m pipeline.commands.summary

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
