#!/usr/bin/env bash
# The fp8 helper's one device call (issue 18), from the repository root:
#
#   bash experiments/gpu_fp8.sh
#
# Stages, each under its own limit (seconds) and never past DEADLINE seconds after the start (default 130):
#   tests     the fp8 GPU tests (PAGEDKV_FP8_QUICK=1 grid) and the engine's fp8 GPU tests   } side by side:
#   accuracy  experiments.fp8_accuracy: llama-1b preset, 64 x 64, e4m3 + e5m2; then an    } correctness only
#             HF-saved llama-1b checkpoint with calibrated scale tensors, e4m3
#   engine    experiments.engine_bench --fp8-preemption --no-profile (W1, alone on the GPU)
#   prefill   experiments.prefill_bench --kv-cache-dtype fp8 (8k + varlen, head_dim 64 / 128, alone)
# Logs and JSON go to $OUT/fp8/, packed into $OUT/fp8_results.tgz after every stage (a late kill keeps the rest).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PAGEDKV_FP8_QUICK=1
OUT=${OUT:-/tmp/pagedkv_fp8}
R=$OUT/fp8
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-130}
mkdir -p "$R"
status=0

pack() { tar -czf "$OUT/fp8_results.tgz" -C "$OUT" fp8 2>/dev/null; }

limit() {  # min(WANT, time left before the deadline)
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}

stage() {  # stage NAME LIMIT CMD...: output to $R/NAME.log, status and seconds to summary.log
    local name=$1 want=$2
    shift 2
    local lim
    lim=$(limit "$want")
    if [ "$lim" -le 5 ]; then echo "$name: skipped (no time left)" >> "$R/summary.log"; status=1; return; fi
    local t0=$SECONDS
    timeout -k 3 "$lim" "$@" > "$R/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - t0))s (limit ${lim}s)" >> "$R/summary.log"
    [ "$rc" -ne 0 ] && status=1
    pack
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; date -u
  $PY -c "import cupy; print('cupy', cupy.__version__)"; } > "$R/probe.log" 2>&1

stage tests 70 $PY -m pytest -q -p no:cacheprovider tests/test_fp8_gpu.py tests/test_fp8_cpu.py &
tests_pid=$!
( stage accuracy_preset 70 $PY -m experiments.fp8_accuracy --device gpu --model llama-1b \
      --kv-cache-dtypes fp8_e4m3 fp8_e5m2 --num-gpu-blocks-override 4096 --json "$R/fp8_accuracy_llama1b.json"
  stage accuracy_checkpoint $((70 - SECONDS)) $PY -m experiments.fp8_accuracy --device gpu --model llama-1b \
      --skip-preset --write-checkpoint /tmp/fp8_ckpt --checkpoint /tmp/fp8_ckpt --num-gpu-blocks-override 4096 \
      --json "$R/fp8_accuracy_checkpoint.json" ) &
acc_pid=$!
wait $tests_pid || status=1
wait $acc_pid || status=1
stage engine 40 $PY -m experiments.engine_bench --device gpu --fp8-preemption --no-profile \
    --json "$R/engine_bench_fp8_preemption.json"
stage prefill 20 $PY -m experiments.prefill_bench --kv-cache-dtype fp8 --cases 8k varlen --head-dims 128 64 \
    --no-variants --ttft-lens --runs 10 --output-json "$R/prefill_bench_fp8.json"
cat "$R/summary.log"
pack
exit $status
