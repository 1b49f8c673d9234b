# The two commands of the README:
#   make run    create .venv-run, install the package, train + evaluate the default model on Beauty
#   make test   create .venv (newest jax, Python 3.12, test extras incl. libtpu for the TPU AOT tests), lint and
#               run the test suite; then the PyTorch parity tests in .venv-torch (Python 3.11: the offline CPU
#               build of torch, and jax 0.10)
# make run has its own venv without libtpu: with libtpu installed, jax probes for a TPU at start-up and prints
# several lines of warnings on a machine that has none.
#
# Python: jax >= 0.11 needs Python >= 3.12. PYTHON is the first of python3.12, pyenv's 3.12, python3 that runs;
# TORCH_PYTHON the first Python 3.11 (the torch==2.13.0 CPU wheel on this machine is for 3.11 only).
find_python = $(firstword $(foreach p,$(1),$(shell $(p) -c 'import sys; print(sys.executable)' 2>/dev/null)))
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $(HOME)/.pyenv)
PYTHON ?= $(call find_python,python3.12 $(wildcard $(PYENV_ROOT)/versions/3.12*/bin/python3.12) python3)
TORCH_PYTHON ?= $(call find_python,python3.11 $(wildcard $(PYENV_ROOT)/versions/3.11*/bin/python3.11))
VENV ?= .venv
RUN_VENV ?= .venv-run
TORCH_VENV ?= .venv-torch
BEAM_VENV ?= .venv-beam
BIN := $(VENV)/bin
WORKDIR ?= runs/default
CONFIG ?= experiments/configs/default.py
# pytest-xdist workers of `make test` (the machine has 2 cores; 0 runs in one process).
TEST_WORKERS ?= 2

.PHONY: run test test-torch test-beam test-slow lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(RUN_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/python -m pip install -q --upgrade pip
	$(RUN_VENV)/bin/python -m pip install -q -e .
	touch $@

$(BEAM_VENV)/.installed: setup.py
	$(TORCH_PYTHON) -m venv $(BEAM_VENV)
	$(BEAM_VENV)/bin/python -m pip install -q --upgrade pip
	$(BEAM_VENV)/bin/python -m pip install -q -e '.[beam]' 'pytest>=8'
	touch $@

$(TORCH_VENV)/.installed: setup.py
	$(TORCH_PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(TORCH_VENV)/bin/python -m pip install -q -e '.[torch]' 'pytest>=8' 'pytest-xdist>=3.5'
	touch $@

run: $(RUN_VENV)/.installed
	$(RUN_VENV)/bin/python -m recgpt_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(BIN)/ruff check recgpt_jax tests experiments
	$(BIN)/ruff format --check recgpt_jax tests experiments
	$(BIN)/python -c 'import jax, flax; print(f"jax {jax.__version__}, flax {flax.__version__}")'
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests
	$(MAKE) test-torch

# PyTorch parity (and the model on jax 0.10) on Python 3.11, where the offline torch wheel installs.
test-torch:
ifeq ($(TORCH_PYTHON),)
	@echo "test-torch: no Python 3.11 found; the PyTorch parity tests were not run"
else
	$(MAKE) $(TORCH_VENV)/.installed
	$(TORCH_VENV)/bin/python -c 'import jax, torch; print(f"jax {jax.__version__}, torch {torch.__version__}")'
	$(TORCH_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/torch tests/model
endif

# The Apache Beam store build (recgpt_jax.data.store --beam_runner) on Python 3.11, where apache-beam installs; run
# by hand, not in CI (the other tests of tests/data/test_store.py run in `make test`, where this one is skipped).
test-beam:
ifeq ($(TORCH_PYTHON),)
	@echo "test-beam: no Python 3.11 found"
else
	$(MAKE) $(BEAM_VENV)/.installed
	$(BEAM_VENV)/bin/python -m pytest -q tests/data/test_store.py
endif

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
	rm -rf $(VENV) $(RUN_VENV) $(TORCH_VENV) runs
