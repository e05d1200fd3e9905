#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the device tool), at most ~8 minutes on an H200: the CUDA tests,
# then benchmarks/layer_gpu.py (every issue-11 target row), the training tokens/s of --preset gpu's arms,
# benchmarks/kernels.py and benchmarks/offloaded_values.py (value tables off the GPU). Each section has its own timeout: one that runs over is stopped and the next
# one runs. Logs: $OUT/{env,tests,layer_gpu,train,kernels,serving,summary}.txt (OUT defaults to /tmp/gpu_checks).
#
#   bash benchmarks/gpu_checks.sh [kernels.py options, e.g. --sweep]
#   bash benchmarks/gpu_checks.sh --dry-run     # print the sections and their commands, run nothing
#
# The train section needs omegaconf, which the lent machines lack: wheels in .whl/ (gitignored; carry
# ".whl" with the device tool) are installed to /tmp/site first. Make them here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl omegaconf==2.4.0
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
fi
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

section() {  # NAME TIMEOUT_S COMMAND...: run COMMAND under timeout, output to the console and $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (timeout ${limit} s): $*"
  [ "$DRY" = 1 ] && return 0
  local start=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  rc=${PIPESTATUS[0]}
  local how="exit $rc"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then how="TIMED OUT at $limit s"; fi
  echo "$name: $how after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

if [ "$DRY" = 0 ]; then
  : >"$OUT/summary.txt"
  if ! python3 -c "import omegaconf" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
fi

# the test files that run on CUDA when it is there (parametrised over DEVICES or TRITON_DEVICE)
mapfile -t CUDA_TESTS < <(grep -l -E "TRITON_DEVICE|DEVICES" tests/test_*.py)
CUDA_TESTS+=(tests/test_moe.py)  # the grouped GEMM without host syncs, on sm_90
CUDA_TESTS+=(tests/test_serving.py)  # value tables in host memory read by a model on the GPU (pinned copies, prefetch)
WORKERS=()
if python3 -c "import xdist" 2>/dev/null; then WORKERS=(-n 8); fi  # Triton compiles in parallel

section env 20 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], \"torch\", torch.__version__, \"triton\", triton.__version__)";
  python3 -c "import omegaconf; print(\"omegaconf\", omegaconf.__version__)" || echo "omegaconf missing: the train section will say n/a"'
section tests 140 python3 -m pytest -q -p no:cacheprovider --tb=short -rfE "${WORKERS[@]}" "${CUDA_TESTS[@]}"
section layer_gpu 125 python3 benchmarks/layer_gpu.py --sections kernels,layer,update,profile
section train 90 python3 benchmarks/layer_gpu.py --sections train --train-steps 40
section kernels 60 python3 benchmarks/kernels.py --select-budget 30 "$@"
section serving 45 python3 benchmarks/offloaded_values.py --device cuda --n-keys 512 --new-tokens 8 --repeats 2
[ "$DRY" = 1 ] || { echo; cat "$OUT/summary.txt"; }
