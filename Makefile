# Everything a user needs: `make demo` and `make test`. Both set up .venv on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
# pip warns about every missing local index folder on these machines; keep real errors only.
QUIET  := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup browser demo test lint bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip $(QUIET)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0 $(QUIET)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[all]" $(QUIET)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gradguard demo

# The HTML report is tested in real headless Chromium (Debian's package). Installed when
# we can (root + apt); otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian chromium for the report's browser test"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } || \
	      echo "could not install chromium: the browser test will be skipped"; \
	  else echo "no chromium and no root apt-get: the browser test will be skipped"; fi; }

# One pytest-xdist worker per core the process may use (tests/conftest.py gives each one
# torch thread), at most 8: on CI's 2 cores the suite took 596 s in one process and
# 385-427 s in two. (Not "-n auto": with psutil installed it counts physical cores, one
# on a 2-vCPU machine with hyper-threading.) PYTEST_WORKERS=N overrides.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 8 ? n : 8 )))
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not benchmark" -n $(PYTEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

# On a machine with a CUDA GPU (CI has none): the CUDA tests, then the overhead benchmark
# with its no-host-sync check on the GPU.
gpu-check: $(STAMP)
	$(BIN)/python -m pytest -q -m cuda tests/test_cuda.py
	$(BIN)/python benchmarks/overhead.py --device cuda --reps 100
	$(BIN)/python benchmarks/skip_cost.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
