# CARROT harness. `make help` lists the targets; every target that needs Python builds
# the virtual environment first, so on a fresh clone `make study VARIANT=baseline` and
# `make test` are the only two commands anyone types.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

VARIANT   ?=
TRIALS    ?=
EPOCHS    ?=
DATASET   ?=
DATA_ROOT ?=
BACKBONE  ?=
WORKERS   ?=
SEEDS     ?=
SEED      ?=
DEVICE    ?=
STORAGE   ?=
CONFIG    ?=
STUDY     ?=
JOBS      ?=
NPROC     ?=
RUN       ?=
JSON      ?=
SPLIT     ?=
PORT      ?= 5000
DASHBOARD_PORT ?= 8080
PYTEST_ARGS ?=

# flags shared by study / train / final, passed only when set
RUN_FLAGS = $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(DATASET),--dataset $(DATASET)) \
	$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(if $(BACKBONE),--backbone $(BACKBONE)) \
	$(if $(WORKERS),--workers $(WORKERS)) $(if $(DEVICE),--device $(DEVICE)) \
	$(if $(SEED),--seed $(SEED)) $(if $(CONFIG),--config $(CONFIG))

.DEFAULT_GOAL := help
.PHONY: help setup study worker train final evaluate tables plots ui dashboard test test-heavy test-fast bench clean

help: ## list the targets and their variables
	@echo "CARROT harness: make <target> [VARIANT=v TRIALS=n EPOCHS=e DATASET=d DATA_ROOT=dir BACKBONE=b WORKERS=w SEED=n SEEDS=s DEVICE=cpu|cuda|auto STORAGE=url STUDY=name JOBS=n NPROC=k CONFIG=file.yaml]"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP) ## build the virtual environment (.venv) with every dependency

study: $(STAMP) ## Optuna study of VARIANT (or VARIANT=all) on the validation split
	@$(BIN)/carrot study $(if $(VARIANT),--variant $(VARIANT)) $(if $(TRIALS),--trials $(TRIALS)) \
		$(if $(STORAGE),--storage $(STORAGE)) $(if $(STUDY),--study-name $(STUDY)) $(if $(JOBS),--jobs $(JOBS)) \
		$(if $(NPROC),--nproc $(NPROC)) $(RUN_FLAGS)

worker: $(STAMP) ## join the study STUDY in STORAGE from this machine (TRIALS trials; DEVICE, WORKERS)
	@if [ -z "$(STUDY)" ]; then echo "make worker: STUDY= is required: the name of the study to join (make study \
	prints it, e.g. STUDY=digits-test_resnet-expansion)" >&2; exit 2; fi
	@$(BIN)/carrot worker --study-name $(STUDY) --trials $(or $(TRIALS),6) $(if $(STORAGE),--storage $(STORAGE)) \
		$(if $(DEVICE),--device $(DEVICE)) $(if $(WORKERS),--workers $(WORKERS)) $(if $(NPROC),--nproc $(NPROC))

train: $(STAMP) ## one run of VARIANT at its recommended setting
	@$(BIN)/carrot train $(if $(VARIANT),--variant $(VARIANT)) $(if $(NPROC),--nproc $(NPROC)) $(RUN_FLAGS)

final: $(STAMP) ## best configuration of each studied variant, SEEDS seeds (default 5), test split
	@$(BIN)/carrot final $(if $(VARIANT),--variant $(VARIANT)) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(STORAGE),--storage $(STORAGE)) $(RUN_FLAGS)

evaluate: $(STAMP) ## recompute a run's diagnostics from its weights: make evaluate RUN=<run id> [SPLIT=test]
	@$(BIN)/carrot evaluate $(RUN) $(if $(SPLIT),--split $(SPLIT))

# the store and the slice of runs that tables and plots read
ANALYSIS_FLAGS = $(if $(DATASET),--dataset $(DATASET)) $(if $(BACKBONE),--backbone $(BACKBONE))

tables: $(STAMP) ## ablation and paper tables from finished runs (analysis/output/; DATASET, BACKBONE, STORAGE, SEEDS)
	@$(BIN)/carrot tables $(ANALYSIS_FLAGS) $(if $(STORAGE),--storage $(STORAGE)) $(if $(SEEDS),--seeds $(SEEDS))

plots: $(STAMP) ## sanity-check plots from finished runs (analysis/output/plots/; DATASET, BACKBONE)
	@$(BIN)/carrot plots $(ANALYSIS_FLAGS)

ui: $(STAMP) ## MLflow UI on http://127.0.0.1:PORT (default 5000)
	@case "$${MLFLOW_TRACKING_URI:-}" in http://*|https://*) echo "make ui: MLFLOW_TRACKING_URI names a \
	tracking server, which serves the MLflow UI itself: open its address in a browser" >&2; exit 2;; esac
	@$(BIN)/python -m carrot.ports ui PORT "$(PORT)"
	@mkdir -p mlruns
	@$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlruns/mlflow.db} \
		--host 127.0.0.1 --port $(PORT)

dashboard: $(STAMP) ## optuna-dashboard on http://127.0.0.1:DASHBOARD_PORT (default 8080)
	@storage="$(if $(STORAGE),$(STORAGE),studies/optuna.journal)"; case "$$storage" in *://*) ;; *) \
	if [ ! -f "$$storage" ]; then echo "make dashboard: no Optuna storage at $$storage; expected the \
	journal of a study (run make study first, or give STORAGE=)" >&2; exit 2; fi;; esac
	@$(BIN)/python -m carrot.ports dashboard DASHBOARD_PORT "$(DASHBOARD_PORT)"
	@$(BIN)/optuna-dashboard $(if $(STORAGE),$(STORAGE),studies/optuna.journal) \
		--host 127.0.0.1 --port $(DASHBOARD_PORT)

test: $(STAMP) ## the test suite (slow end-to-end tests included; the multi-process ones: test-heavy)
	$(BIN)/python -m pytest -m "not heavy" $(PYTEST_ARGS)

test-heavy: $(STAMP) ## the multi-process tests: signals, killed workers, parallel workers, PostgreSQL
	$(BIN)/python -m pytest -m heavy $(PYTEST_ARGS)

test-fast: $(STAMP) ## the test suite without the slow end-to-end tests
	$(BIN)/python -m pytest -m "not slow and not heavy" $(PYTEST_ARGS)

bench: $(STAMP) ## what each part of the harness costs, as ratios (CPU, and CUDA when present); JSON=file writes them
	@$(BIN)/carrot bench $(if $(JSON),--json $(JSON))
	@if $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(BIN)/carrot bench throughput; fi

clean: ## remove the virtual environment and caches (keeps mlruns/ and studies/)
	rm -rf $(VENV) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
