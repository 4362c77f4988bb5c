#!/usr/bin/env bash
# Full-size GPU runs of the experiments (issue 5), for one H100: about 2-4 minutes, at most ~6 (time limits).
#
#   bash experiments/gpu_full.sh            # from the repository root, on the GPU machine
#
# Writes  benchmarks/results/memory_share_gpu.json, throughput_w1_gpu.json, throughput_longtail_gpu.json
#         docs/memory_share.png, docs/throughput_w1.png, docs/throughput_longtail.png  (when matplotlib imports)
#         docs/kernel_bandwidth.png from the newest benchmarks/results/kernel_bench_*.json, if there is one
# and copies all of them, with one log per run, under $OUT (same relative paths) so they come back.
# Each run has a time limit: one that overruns is killed, the others still run, and the script exits 1.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/pagedkv_gpu_full}
PY=${PYTHON:-python3}
mkdir -p "$OUT/benchmarks/results" "$OUT/docs" benchmarks/results docs
status=0

run() {  # run NAME LIMIT_S ARGS...: one experiment, its log tee'd to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $PY -m $* (limit ${limit}s) $(date -u +%H:%M:%S)" | tee "$OUT/$name.log"
    local t0=$SECONDS
    timeout "$limit" "$PY" -m "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

"$PY" -c "import cupy, rich, pagedkv; from pagedkv.backend import gpu_status; print('pagedkv', pagedkv.__version__, gpu_status())" \
    2>&1 | tee "$OUT/env.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/env.log"

# 1. Memory sharing: llama-1b's K/V shape (16 layers x 8 KV heads x 64, fp16) really allocated; naive needs
#    ~35 GB (66,560 blocks) for 256 requests x 4,160 tokens, shared ~1.5 GB. Every decode output compared.
run memory_share 120 experiments.memory_share --device gpu --dtype float16 --block-size 16 \
    --num-requests 256 --prompt-len 4000 --suffix-len 32 --gen-len 128 --num-branches 64 \
    --json benchmarks/results/memory_share_gpu.json

# 2. Static vs continuous batching, llama-1b fp16 random weights, the same 512 MiB KV pool (16,384 token slots,
#    22% of W1 at full length) and max_num_seqs 256 for both modes, decode steps replayed as CUDA graphs in
#    both (the engine falls back to eager launches if capture fails; the JSON says which ran); greedy outputs
#    compared request by request. CPU simulation of the same budget: W1 ~2,500 static vs ~1,400 continuous
#    steps, longtail ~2,200 vs ~1,100, so ~7,000 steps in all: ~70 s at 10 ms a step.
for workload in w1 longtail; do
    run "throughput_$workload" 110 experiments.throughput --device gpu --model llama-1b --dtype float16 \
        --workload "$workload" --num-requests 128 --scale 1 --kv-budget-mb 512 --max-num-seqs 256 --block-size 16 --cuda-graph on \
        --json "benchmarks/results/throughput_${workload}_gpu.json"
done

# 3. Pictures from the JSON (here when matplotlib imports; otherwise run these same lines where it does).
plot() {  # plot FLAG JSON PNG
    [ -f "$2" ] || return 0
    if "$PY" -c "import matplotlib" 2>/dev/null; then
        "$PY" -m experiments.plots "$1" "$2" --out "$3" 2>&1 | tee -a "$OUT/plots.log"
    else
        echo "matplotlib missing: run  PYTHONPATH=. python -m experiments.plots $1 $2 --out $3" | tee -a "$OUT/plots.log"
    fi
}
plot --memory-json benchmarks/results/memory_share_gpu.json docs/memory_share.png
plot --throughput-json benchmarks/results/throughput_w1_gpu.json docs/throughput_w1.png
plot --throughput-json benchmarks/results/throughput_longtail_gpu.json docs/throughput_longtail.png
kernel_json=$(ls -t benchmarks/results/kernel_bench_*.json 2>/dev/null | head -1)  # from experiments.kernel_bench
[ -n "$kernel_json" ] && plot --kernel-json "$kernel_json" docs/kernel_bandwidth.png

cp -f benchmarks/results/memory_share_gpu.json benchmarks/results/throughput_*_gpu.json "$OUT/benchmarks/results/" 2>/dev/null
cp -f docs/memory_share.png docs/throughput_*.png docs/kernel_bandwidth.png "$OUT/docs/" 2>/dev/null
echo "=== done in ${SECONDS} s, status $status; results under $OUT" | tee -a "$OUT/summary.log"
exit "$status"
