# Quick start: `make demo` (install + build recipes/demo.yaml) and `make test` (install + all checks).
# Override the torch requirement for a GPU machine, e.g.  make demo TORCH=torch==2.13.0
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[build]"

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/lorarecipe build recipes/demo.yaml --out build/demo
	$(BIN)/lorarecipe verify build/demo

test: install-dev
	$(BIN)/ruff check lorarecipe tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4  # one worker per core (tests are single-threaded)

clean:
	rm -rf build $(VENV)
