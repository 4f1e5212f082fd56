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

.PHONY: help setup data audit split weights seg-data seg-train segment crop cls-train baseline evaluate \
        compare report predict all demo bench test phantoms clean-venv

# Shipped checkpoints (weights/manifest.json); `make predict` uses them, training targets write runs/.
CLS_WEIGHTS ?= cls-lite0-full
SEG_WEIGHTS ?= auto
MODES       ?= full
CLS_MODEL   ?= timm:tf_efficientnet_lite0
CLS_EPOCHS  ?= 8
CLS_TAG     ?= lite0
CACHE        = $(OUT)/cache
CLEAN        = $(OUT)/audit/clean_test.txt

help: ## this list
	@echo "Targets:"; grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo "Variables (make VAR=value):"
	@echo "  DATA_SRC     where the datasets come from (default: ../shared/datasets when it exists)"
	@echo "  DATA         Kaggle-layout dataset root (default: $(DATA))"
	@echo "  INPUT        folder of scans for predict (default: $(INPUT))"
	@echo "  OUT          folder for every stage's outputs (default: $(OUT))"
	@echo "  DEVICE       auto | cpu | cuda | cuda:N (default: $(DEVICE))"
	@echo "  SEED, SIZE   random seed and classifier input size (default: $(SEED), $(SIZE))"
	@echo "  MODES        classifier input modes to build/train/compare: full crop masked (default: $(MODES))"
	@echo "  CLS_MODEL    registry name of the CNN trained by cls-train (default: $(CLS_MODEL)); CLS_TAG its short name"
	@echo "  CLS_WEIGHTS  classifier predict uses (default: $(CLS_WEIGHTS)); SEG_WEIGHTS segmenter (default: $(SEG_WEIGHTS))"

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

weights: $(STAMP) ## check shipped checkpoints; download the public ones (SAM, YOLO) where there is internet
	$(PY) -m pipeline weights --verify
	-$(PY) -m pipeline weights --download sam_vit_b yolov8n-seg yolov8n-cls

seg-data: $(OUT)/seg/data/data.yaml ## YOLO-seg dataset from the masked slices (+ no-tumor backgrounds)

$(OUT)/seg/data/data.yaml: $(OUT)/split.csv
	$(PY) -m pipeline seg-data --figshare datasets/figshare-cheng2017 --brisc datasets/brisc2025-seg \
	  --split $(OUT)/split.csv --root $(DATA)/Training --out $(OUT)/seg/data --seed $(SEED)

seg-train: $(OUT)/seg/yolov8n_seg/weights/best.pt ## train YOLOv8n-seg (about 50 min on 2 CPU cores)

$(OUT)/seg/yolov8n_seg/weights/best.pt: $(OUT)/seg/data/data.yaml
	$(PY) -m pipeline train-seg --data $< --out $(OUT)/seg/yolov8n_seg --device $(DEVICE) --seed $(SEED)

segment: $(OUT)/segment/Training/segments.csv $(OUT)/segment/Testing/segments.csv ## masks for Training and Testing

$(OUT)/segment/%/segments.csv: $(STAMP) datasets/.ready
	$(PY) -m pipeline segment --input $(DATA)/$* --out $(OUT)/segment/$* --device $(DEVICE)

CACHE_FILES = $(foreach m,$(MODES),$(CACHE)/$(m)_$(SIZE)/testing.npz)
crop: $(CACHE_FILES) ## decode once into classifier inputs for each of MODES

$(CACHE)/full_$(SIZE)/testing.npz: $(OUT)/split.csv
	$(PY) -m pipeline crop --split $< --root $(DATA)/Training --input $(DATA)/Testing --mode full --size $(SIZE) \
	  --out $(CACHE)/full_$(SIZE)

# crop/masked need stage-1 masks for Training and Testing; they are cached from one masks tree each.
$(CACHE)/%_$(SIZE)/testing.npz: $(OUT)/split.csv $(OUT)/segment/Training/segments.csv $(OUT)/segment/Testing/segments.csv
	$(PY) -m pipeline crop --split $< --root $(DATA)/Training --masks $(OUT)/segment/Training/masks \
	  --mode $* --size $(SIZE) --out $(CACHE)/$*_$(SIZE)
	$(PY) -m pipeline crop --input $(DATA)/Testing --masks $(OUT)/segment/Testing/masks \
	  --mode $* --size $(SIZE) --out $(CACHE)/$*_$(SIZE)

CLS_RUNS = $(foreach m,$(MODES),$(OUT)/cls/$(CLS_TAG)_$(m)_$(SIZE)/best.pt)
cls-train: $(CLS_RUNS) ## train CLS_MODEL on each of MODES (early stopping on the validation split)

$(OUT)/cls/$(CLS_TAG)_%_$(SIZE)/best.pt: $(CACHE)/%_$(SIZE)/testing.npz
	$(PY) -m pipeline train-cls --data $(CACHE)/$*_$(SIZE) --out $(OUT)/cls/$(CLS_TAG)_$*_$(SIZE) \
	  --model $(CLS_MODEL) --epochs $(CLS_EPOCHS) --device $(DEVICE) --seed $(SEED)

EVALS = $(foreach m,$(MODES),$(OUT)/eval/$(CLS_TAG)-$(m)/predictions.csv)
evaluate: $(EVALS) ## each trained classifier on all of Testing and its clean subset

$(OUT)/eval/$(CLS_TAG)-%/predictions.csv: $(OUT)/cls/$(CLS_TAG)_%_$(SIZE)/best.pt $(CLEAN)
	$(PY) -m pipeline evaluate-cls --cls $< --data $(CACHE)/$*_$(SIZE)/testing.npz --clean $(CLEAN) \
	  --out $(OUT)/eval/$(CLS_TAG)-$* --device $(DEVICE)

$(CLEAN): $(OUT)/audit/audit.json

compare: $(OUT)/report/report.md ## report.md/html: every trained model x mode, all vs clean Testing, McNemar
report: compare

$(OUT)/report/report.md: $(EVALS)
	$(PY) -m pipeline compare --runs $(foreach m,$(MODES),$(CLS_TAG)-$(m)=$(OUT)/eval/$(CLS_TAG)-$(m)) \
	  --clean $(CLEAN) --out $(OUT)/report \
	  --gradcam-cls $(OUT)/cls/$(CLS_TAG)_$(firstword $(MODES))_$(SIZE)/best.pt \
	  --gradcam-data $(CACHE)/$(firstword $(MODES))_$(SIZE)/testing.npz

predict: $(PREDICT_OUT)/predictions.csv ## the main job: classify every scan under INPUT with the shipped models

$(PREDICT_OUT)/predictions.csv: $(STAMP) datasets/.ready weights/manifest.json
	$(PY) -m pipeline predict --input $(INPUT) --out $(PREDICT_OUT) --cls $(CLS_WEIGHTS) --seg $(SEG_WEIGHTS) \
	  --device $(DEVICE)
	@$(PY) -c "import csv,collections,sys; r=list(csv.DictReader(open(sys.argv[1]))); \
	  print(len(r), 'rows:', dict(collections.Counter(x['label'] or 'error' for x in r)))" $@

all: compare predict ## the whole chain on the real data (trains what is missing; hours on a CPU)

phantoms: $(OUT)/phantoms/.ready ## a synthetic phantom dataset (no data needed)

$(OUT)/phantoms/.ready: $(STAMP)
	$(PY) -m pipeline phantoms --out $(OUT)/phantoms --n-per-class 40 --size 256 --seed $(SEED)
	touch $@

test: $(STAMP) ## run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
