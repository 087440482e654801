# Everything a user needs: `make demo` and `make test`. Both set up .venv on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
# pip warns about every missing local index folder on these machines; keep real errors only.
QUIET  := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip $(QUIET)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0 $(QUIET)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[all]" $(QUIET)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gradguard demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not benchmark"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
