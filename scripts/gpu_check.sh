#!/usr/bin/env bash
# The checks that need a CUDA device, in one go: the CUDA tests (training and whole runs on
# the GPU against the CPU, aggregation there), the device benchmarks (cohort throughput, also
# with cuDNN autotuning, and aggregation against the GPU's measured peak) and a CLI run with
# run.device = "cuda".
#
#   bash scripts/gpu_check.sh OUT_DIR      # logs and the benchmarks' JSON land in OUT_DIR
#
# It uses the python3 on the PATH (PYTHON= to choose another) with the package from src/, so
# a GPU machine needs torch and potluck's dependencies but no install of potluck itself. Each
# step has its own time limit and a failed step does not stop the next; the exit status is
# the number of steps that failed.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 1
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME SECONDS COMMAND...: run it, log to OUT_DIR/NAME.log, count a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - start)) s; last lines:"
  tail -n 4 "$out/$name.log" | sed 's/^/   /'
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import torch; print('torch', torch.__version__, torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  nproc
} >"$out/machine.log" 2>&1
cat "$out/machine.log"

step tests 180 "$py" -m pytest -p no:cacheprovider -q -rs \
  tests/engines/test_device.py tests/aggregate/test_device_aggregation.py
step cohort 150 "$py" benchmarks/device_cohort.py --device cuda --clients 50,200,1000
step cohort_tuned 90 "$py" benchmarks/device_cohort.py --device cuda --models small_cnn \
  --engines vectorized --clients 200,1000 --cudnn-benchmark --name device_cohort_cudnn_benchmark
step aggregation 100 "$py" benchmarks/device_aggregation.py --device cuda
step cli 60 "$py" -c "from potluck.cli import main; main()" run examples/digits.toml \
  --set run.device=cuda --store "$out/store"
rm -rf "$out/store"
cp benchmarks/results/device_cohort.json benchmarks/results/device_cohort_cudnn_benchmark.json \
  benchmarks/results/device_aggregation.json "$out/" 2>/dev/null
echo "failed steps: $failed"
exit "$failed"
