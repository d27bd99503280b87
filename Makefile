# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: run test lint

# `run` installs only what running needs; `test` adds the test tools.
run: $(RUN_STAMP)
	$(BIN)/flashsale run

# The whole suite, then the e2e tier again with every instance's data plane on a private
# 3-primary Redis Cluster (docs/SCALING.md).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest
	FLASHSALE_E2E_CLUSTER=1 $(BIN)/pytest tests/e2e -m e2e

lint: $(STAMP)
	$(BIN)/ruff check .

$(RUN_STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)
