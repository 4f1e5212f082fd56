#!/usr/bin/env bash
# The GPU checks in one call, for a lent CUDA machine (run from the repository root):
#   1. tests/test_cuda.py: every CUDA path run on the GPU and checked against the CPU;
#   2. `predict --device cuda` on a whole folder, compared row by row with a CPU run of the same folder;
#   3. bench.py --devices cuda --quick: throughput on the GPU;
#   4. the whole test suite under that machine's library versions.
# bench/prepare_device.sh stages its inputs (wheels, a copy of Testing, the CPU predictions) and
# says how to call it on a machine with no internet.
# usage: bench/cuda_check.sh TESTING_DIR CPU_PREDICTIONS_CSV OUT_DIR [STEPS]
#   STEPS: some of "tests predict bench suite" (default: all four)
# Each step has its own time limit, so one that hangs cannot take the others' results with it.
set -u
testing=$1 cpu_csv=$2 out=$3 steps=${4:-tests predict bench suite}
want() { [[ " $steps " == *" $1 "* ]]; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "from pipeline.config import environment; import json; print(json.dumps(environment()))"; } \
  > "$out/env.txt" 2>&1
if want tests; then
  timeout 240 python3 -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider > "$out/cuda_tests.log" 2>&1
  echo "cuda tests: rc $?"
fi
if want predict; then
  rm -rf /tmp/pred_cuda
  timeout 150 python3 -m pipeline predict --input "$testing" --out /tmp/pred_cuda --device cuda --backend torch \
    --batch-size 256 --workers 8 > "$out/steps.log" 2>&1
  echo "predict on cuda: rc $?"
  cp /tmp/pred_cuda/predictions.csv "$out/cuda_predictions.csv" 2>/dev/null
  python3 bench/compare_predictions.py "$cpu_csv" /tmp/pred_cuda/predictions.csv --json "$out/agreement.json" \
    >> "$out/steps.log" 2>&1
fi
if want bench; then
  timeout 200 python3 bench/bench.py --data "$testing" --devices cuda --quick --job-timeout 75 --out "$out/bench" \
    >> "$out/steps.log" 2>&1
  echo "bench: rc $?"
fi
if want suite; then
  timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider > "$out/suite.log" 2>&1
  echo "suite: rc $?"
fi
tail -n 15 "$out/cuda_tests.log" 2>/dev/null; cat "$out/agreement.json" 2>/dev/null; tail -n 25 "$out/bench/bench.md" 2>/dev/null
tail -n 12 "$out/suite.log" 2>/dev/null
