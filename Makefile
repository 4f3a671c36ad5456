# Two commands on a fresh machine with Python 3.11 and make:
#   make demo   creates .venv, installs, runs the main job on the embedded digits data
#   make test   creates .venv, installs with test extras (torch for parity tests), lint + pytest
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo

.PHONY: demo test lint format install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip -q

$(VENV)/.installed: $(BIN)/python requirements.txt pyproject.toml
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test,torch]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/python -m resnet_jax.demo --workdir=$(WORKDIR)

lint: $(VENV)/.installed-test
	$(BIN)/ruff format --check resnet_jax tests experiments benchmarks
	$(BIN)/ruff check resnet_jax tests experiments benchmarks

format: $(VENV)/.installed-test
	$(BIN)/ruff format resnet_jax tests experiments benchmarks
	$(BIN)/ruff check --fix resnet_jax tests experiments benchmarks

test: lint
	# Two workers: most tests are single-threaded compiles and subprocesses; one file per worker
	# keeps module-scoped fixtures (shared training runs) from running twice. A crashed worker
	# fails the run instead of leaving it waiting.
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --max-worker-restart=0 --durations=25

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
