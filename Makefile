# dml-runner: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
# torch/torchvision are installed first and pinned here: pip takes these releases from this machine's local
# cache; elsewhere override, e.g. `make install TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help install run test test-fast clean-outputs

help: ## Show this help
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install dml-runner with its dev extras (once; again when pyproject.toml changes)

run: $(STAMP) ## Train + evaluate with the defaults on the embedded digits data (ARGS="key=value ..." to override)
	$(VENV)/bin/dml-run $(ARGS)

test: $(STAMP) ## Run the test suite (PYTEST_ARGS="-m 'not slow'" for the quick subset)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## Run the tests not marked slow
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean-outputs: ## Delete outputs/ run directories (asks first)
	@read -p "delete everything under outputs/ ? [y/N] " ans && [ "$$ans" = y ] && find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} + || echo kept
