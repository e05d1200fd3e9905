#!/usr/bin/env bash
# One prepared run on a lent GPU machine (device tool): CUDA tests, then the GPU benchmarks.
#   bash benchmarks/gpu_checks.sh [--sweep]   # logs under ${OUT:-/tmp}; --sweep goes to kernels.py
set -uo pipefail
OUT=${OUT:-/tmp}
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 200 python3 -m pytest -q -p no:cacheprovider --ignore=tests/test_demo_cli.py tests 2>&1 | tail -n 25 | tee "$OUT/tests.txt"
timeout 200 python3 benchmarks/kernels.py "$@" 2>&1 | tee "$OUT/kernels.txt"
timeout 150 python3 benchmarks/layer_gpu.py 2>&1 | tee "$OUT/layer_gpu.txt"
