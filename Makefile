# Every target installs what it needs into .venv first, so each works on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test lint format bench-kernels bench-kernels-quick bench-engine clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel on disk here; an unpinned torch pulls CUDA builds.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-kernels: $(STAMP)
	$(BIN)/flora bench kernels

bench-kernels-quick: $(STAMP)
	$(BIN)/flora bench kernels --quick

bench-engine: $(STAMP)
	$(BIN)/flora bench engine --rounds 3 --latency-rate 8 --latency-requests 32

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
