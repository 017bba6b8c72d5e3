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

# --- paper reproduction
# make reproduce-<table> [SEEDS=3] [DATA=/path/to/datasets] [SMOKE=1] [REPRODUCE_OPTS="--rows 'npair,hdml_*'"]
# [ARGS="hydra overrides for every job"]: scripts/reproduce.py checks rows and data, runs one Hydra multirun
# (rows x seeds) and writes the table with dml-report into outputs/tables/<table>[-smoke]/ (docs/REPRODUCING.md).
# SMOKE=1: fixture data, a step or two, fewer classes per batch and 64-px crops, each row's own backbone, weights
# (from $TORCH_HOME's hub cache when there, else random init with a NOTICE), transform, sampler, loss and method.
SEEDS ?= 3
DATA ?=
SMOKE ?=
REPRODUCE_OPTS ?=
REPRODUCE = $(PY) scripts/reproduce.py
REPRODUCE_ARGS = --seeds $(SEEDS) $(if $(DATA),--data $(DATA)) $(if $(filter 1 true yes,$(SMOKE)),--smoke) \
	$(REPRODUCE_OPTS) $(if $(ARGS),-- $(ARGS))

.PHONY: reproduce-table1 reproduce-table2 reproduce-table3 reproduce-lifted reproduce-dc reproduce-mdl reproduce-modern

reproduce-table1: $(STAMP) ## HDML Table 1 (CUB-200-2011): every row x SEEDS, then the table (DATA=, SMOKE=1)
	$(REPRODUCE) table1 $(REPRODUCE_ARGS)

reproduce-table2: $(STAMP) ## HDML Table 2 (Cars196): every row x SEEDS, then the table (DATA=, SMOKE=1)
	$(REPRODUCE) table2 $(REPRODUCE_ARGS)

reproduce-table3: $(STAMP) ## HDML Table 3 (Stanford Online Products): every row x SEEDS, then the table
	$(REPRODUCE) table3 $(REPRODUCE_ARGS)

reproduce-lifted: $(STAMP) ## Lifted Structure (contrastive/triplet/lifted on CUB, Cars, SOP) x SEEDS, then the table
	$(REPRODUCE) lifted $(REPRODUCE_ARGS)

reproduce-dc: $(STAMP) ## Divide and Conquer (CUB, Cars, SOP, In-shop, VehicleID) x SEEDS, then the table
	$(REPRODUCE) dc $(REPRODUCE_ARGS)

reproduce-mdl: $(STAMP) ## MDL (reconstructed from the abstract) vs margin loss on CUB, Cars, SOP x SEEDS
	$(REPRODUCE) mdl $(REPRODUCE_ARGS)

reproduce-modern: $(STAMP) ## ViT-S/16 DINO + Proxy-Anchor (CUB, Cars, SOP) x SEEDS next to Sph-DINO's numbers
	$(REPRODUCE) modern $(REPRODUCE_ARGS)

# --- GPU check (docs/PERFORMANCE.md, "GPU check")
# make gpu-check [GPU_CHECK_OUT=outputs/gpu_check] [ARGS="--dry-run ..."]: with .venv (installed first when missing);
# make gpu-check OFFLINE=1 [PYTHON=python3]: an offline node's own Python and torch, plus the wheels of $(WHEELHOUSE)
# installed with --no-index into a temporary folder (scripts/gpu_check.sh); nothing is installed into the node.
# make wheelhouse [WHEEL_PYTHON=3.12] [FAISS=1]: on a connected machine, the pure-Python wheels that node lacks.
WHEELHOUSE ?= wheelhouse
WHEEL_PYTHON ?= 3.12
FAISS ?=
OFFLINE ?=
GPU_CHECK_OUT ?= outputs/gpu_check
is_set = $(filter 1 true yes,$(1))

# --- fair comparison (docs/COMPARING.md)
# make reality-check [SMOKE=1] [LOSSES=contrastive,triplet,margin] [FOLDS=4] [TRIALS=20] [FINAL_SEEDS=1] [ARGS="overrides"]
LOSSES ?=
FOLDS ?=
TRIALS ?=
FINAL_SEEDS ?=
.PHONY: reality-check
reality-check: $(STAMP) ## Musgrave's reality check: same Optuna budget per loss, class-disjoint folds, MAP@R, intervals (SMOKE=1)
	$(PY) scripts/reality_check.py $(if $(filter 1 true yes,$(SMOKE)),--smoke) $(if $(LOSSES),--losses $(LOSSES)) \
		$(if $(FOLDS),--folds $(FOLDS)) $(if $(TRIALS),--trials $(TRIALS)) $(if $(FINAL_SEEDS),--seeds $(FINAL_SEEDS)) \
		$(if $(ARGS),-- $(ARGS))

.PHONY: gpu-check wheelhouse
gpu-check: $(if $(call is_set,$(OFFLINE)),,$(STAMP)) ## On a CUDA machine: every GPU path, one table in outputs/gpu_check/ (OFFLINE=1: node's own Python + wheelhouse/)
ifneq ($(call is_set,$(OFFLINE)),)
	PYTHON=$(PYTHON) WHEELHOUSE=$(WHEELHOUSE) scripts/gpu_check.sh $(GPU_CHECK_OUT) $(ARGS)
else
	$(PY) scripts/gpu_check.py --out $(GPU_CHECK_OUT) $(ARGS)
endif

wheelhouse: ## On a connected machine: the wheels an offline GPU node lacks, into wheelhouse/ (WHEEL_PYTHON=3.12, FAISS=1)
	$(PYTHON) scripts/wheelhouse.py $(WHEELHOUSE) --python-version $(WHEEL_PYTHON) $(if $(call is_set,$(FAISS)),--faiss)
