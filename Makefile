# Brain MRI pipeline: every stage reads files and writes files, so `make` redoes only what is stale.
# `make help` lists targets and variables.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
DATA_SRC    ?= $(firstword $(wildcard ../shared/datasets) )
DATA        ?= datasets/brain-tumor-mri
OUT         ?= runs
DEVICE      ?= auto
SEED        ?= 0
SIZE        ?= 128
INPUT       ?= $(DATA)/Testing
PREDICT_OUT ?= $(OUT)/predict
PYTEST_ARGS ?=

STAMP := $(VENV)/.installed

.PHONY: help setup data audit split test clean-venv phantoms

help: ## this list
	@echo "Targets:"; grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo "Variables (make VAR=value):"
	@echo "  DATA_SRC     where the datasets come from (default: ../shared/datasets when it exists)"
	@echo "  DATA         Kaggle-layout dataset root (default: $(DATA))"
	@echo "  INPUT        folder of scans for predict (default: $(INPUT))"
	@echo "  OUT          folder for every stage's outputs (default: $(OUT))"
	@echo "  DEVICE       auto | cpu | cuda | cuda:N (default: $(DEVICE))"
	@echo "  SEED, SIZE   random seed and classifier input size (default: $(SEED), $(SIZE))"

setup: $(STAMP) ## make .venv and install the project with its test tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first, pinned to the wheels on disk: a bare `torch` would fetch a newer CUDA build.
	$(VENV)/bin/pip install --quiet "torch>=2.1,<=2.14.1" "torchvision>=0.16,<=0.29.1"
	$(VENV)/bin/pip install --quiet -e ".[test,bench]"
	touch $@

data: datasets/.ready ## make the data available under datasets/ (from DATA_SRC, or says what to download)

datasets/.ready:
	@mkdir -p datasets
	@if [ -n "$(DATA_SRC)" ] && [ -d "$(DATA_SRC)/brain-tumor-mri" ]; then \
	  for d in brain-tumor-mri figshare-cheng2017 brisc2025-seg; do \
	    [ -e "$(DATA_SRC)/$$d" ] && ln -sfn "$$(cd $(DATA_SRC) && pwd)/$$d" datasets/$$d; done; \
	  echo "datasets/ links to $(DATA_SRC)"; \
	elif command -v kaggle >/dev/null && [ -f "$$HOME/.kaggle/kaggle.json" ]; then \
	  kaggle datasets download -d masoudnickparvar/brain-tumor-mri-dataset -p datasets/brain-tumor-mri --unzip; \
	else \
	  echo "No data found. Download the Kaggle 'Brain Tumor MRI Dataset' (masoudnickparvar/brain-tumor-mri-dataset)"; \
	  echo "and unpack it so that datasets/brain-tumor-mri/Training/<class>/*.jpg and .../Testing/<class>/*.jpg exist,"; \
	  echo "or run: make data DATA_SRC=/path/to/folder/holding/brain-tumor-mri"; exit 1; \
	fi
	@touch $@

audit: $(OUT)/audit/audit.json ## leakage audit of Training vs Testing (duplicates.csv, clean_test.txt)

$(OUT)/audit/audit.json: $(STAMP) datasets/.ready
	$(PY) -m pipeline audit --train $(DATA)/Training --test $(DATA)/Testing --out $(OUT)/audit

split: $(OUT)/split.csv ## stratified train/validation split of Training (near-copies kept together)

$(OUT)/split.csv: $(OUT)/audit/audit.json
	$(PY) -m pipeline split --train $(DATA)/Training --out $@ --train-duplicates $(OUT)/audit/train_duplicates.csv --seed $(SEED)

phantoms: $(OUT)/phantoms/.ready ## a synthetic phantom dataset (no data needed)

$(OUT)/phantoms/.ready: $(STAMP)
	$(PY) -m pipeline phantoms --out $(OUT)/phantoms --n-per-class 40 --size 256 --seed $(SEED)
	touch $@

test: $(STAMP) ## run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
