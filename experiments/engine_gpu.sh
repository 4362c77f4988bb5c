#!/usr/bin/env bash
# Issue 4 on a GPU: transformers parity tests, then workload W1 (experiments/engine_bench.py).
# Logs and the JSON go to $OUT (default /tmp/engine_gpu).   bash experiments/engine_gpu.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/engine_gpu}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  python3 -c "import cupy, torch, transformers; print('cupy', cupy.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
  nproc; } 2>&1 | tee "$OUT/env.txt"
timeout 170 python3 -m pytest -m gpu tests/test_engine_gpu.py -q -rs 2>&1 | tee "$OUT/pytest_gpu.log"
timeout 220 python3 -m experiments.engine_bench --device gpu --static --json "$OUT/engine_bench_gpu.json" 2>&1 \
  | tee "$OUT/engine_bench.log"
