# Two commands a newcomer needs: `make demo` and `make test`. Each creates or refreshes .venv itself.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_DATASETS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv demo test test-numeric lint format clean

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

# The numeric tests with 1 and 2 torch threads, on this CPU's kernels and on the AVX2-only kernels an AVX2 host
# takes (torch's dispatch, MKL and oneDNN capped at AVX2): a test's verdict must not depend on the CPU.
NUMERIC := tests/test_model.py tests/test_search.py tests/test_loss.py tests/test_dropout.py tests/test_ema.py \
	tests/test_attention_maps.py tests/test_attention_activation_dropout.py tests/test_schedule.py \
	tests/test_checkpoint.py tests/test_average.py tests/test_training.py tests/test_learning.py \
	tests/test_batching.py tests/test_export.py tests/test_decode.py tests/test_translate.py tests/test_inspection.py
AVX2 := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
test-numeric: $(STAMP)
	for threads in 1 2; do \
	  OMP_NUM_THREADS=$$threads $(BIN)/python -m pytest -q $(NUMERIC) || exit 1; \
	  $(AVX2) OMP_NUM_THREADS=$$threads $(BIN)/python -m pytest -q $(NUMERIC) || exit 1; \
	done

clean:
	rm -rf $(VENV)
