# The two commands of the README:
#   make run    create .venv, install the package, train + evaluate the default model on Beauty
#   make test   create .venv, install the package with test extras, lint and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/default
CONFIG ?= experiments/configs/default.py

.PHONY: run test test-slow lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/python -m recgpt_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(BIN)/ruff check recgpt_jax tests experiments
	$(BIN)/ruff format --check recgpt_jax tests experiments
	$(BIN)/python -m pytest -q tests

# Slow tests (real-data training); run by hand, not in CI.
test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow tests

lint: $(VENV)/.installed
	$(BIN)/ruff check recgpt_jax tests experiments
	$(BIN)/ruff format --check recgpt_jax tests experiments

format: $(VENV)/.installed
	$(BIN)/ruff format recgpt_jax tests experiments

bench: $(VENV)/.installed
	$(BIN)/python -m experiments.bench_train --stage=pretrain

clean:
	rm -rf $(VENV) runs
