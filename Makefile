# Two commands on a fresh machine with Python 3.11 and make:
#   make demo   creates .venv, installs, runs the main job on the embedded digits data
#   make test   creates .venv, installs with test extras (torch for parity tests), lint + pytest
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo

.PHONY: demo test lint format install install-test clean

# Where PYTHONDONTWRITEBYTECODE is set (these machines set it), a venv without .pyc files compiles
# TensorFlow, JAX and torch from source in every process: 41 s of imports instead of 15 s. Python
# may write them here, so each module is compiled once, at its first import, instead of all 16,500
# files of the venv at install time (uv's --compile-bytecode: 42 s of an 86 s install).
export PYTHONDONTWRITEBYTECODE =

# uv installs wheels in parallel: the test install took 45 s on a 2-core machine against pip's
# 200 s. uv does not read pip's configuration, so the extra indexes and wheel directories pip is
# configured with (pip.conf, PIP_FIND_LINKS) are passed on, with pip's rule of taking the best
# version over all indexes.
PIP_INDEXES = $(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null)
PIP_LINKS = $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_INSTALL = $(BIN)/uv pip install --python $(BIN)/python -q --no-cache \
	--index-strategy unsafe-best-match $(foreach u,$(PIP_INDEXES),--extra-index-url=$(u)) \
	$(foreach d,$(PIP_LINKS),--find-links=$(d))

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Its own target, so that a .venv made before uv was used gets it too.
$(BIN)/uv: $(BIN)/python
	$(BIN)/pip install -q uv==0.13.9

$(VENV)/.installed: $(BIN)/uv requirements.txt pyproject.toml
	$(UV_INSTALL) -r requirements.txt
	$(UV_INSTALL) --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(UV_INSTALL) -e ".[test,torch]"
	touch $@

# For runs started outside make (python -m resnet_jax.train ...) where PYTHONDONTWRITEBYTECODE is
# set: the training path's modules compiled once, here (make demo and make test write their own).
install: $(VENV)/.installed
	$(BIN)/python -c "import resnet_jax.train, resnet_jax.evaluate, resnet_jax.data.tfds_datasets"
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
	# Two workers: most tests are single-threaded compiles and subprocesses. Each file is one xdist
	# group, so module-scoped fixtures (shared training runs) run once; two small files' tests are
	# spread one by one, to even out the end (tests/conftest.py). A crashed worker fails the run
	# instead of leaving it waiting.
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --max-worker-restart=0 --durations=25

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
