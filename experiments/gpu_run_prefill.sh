#!/usr/bin/env bash
# The prefill helper's GPU runs (issue 12), for one device call (from the repository root):
#
#   bash experiments/gpu_run_prefill.sh [STAGE...]      default: probe warm fast bench full sanitize ncu
#
# Stages (each under its own time limit in seconds, override with T_<STAGE>=...; no stage runs past the
# call's deadline, DEADLINE seconds after the start, default 285):
#   probe     GPU, driver, CuPy / torch / transformers versions, tools on the PATH
#   warm      compile every module of kernels_cu/prefill_attention.cu in parallel processes (CuPy's disk
#             cache then serves the tests and the benchmark)
#   fast      a fast subset of the GPU tests (head_dim 64 / 128, padding, chunks, graph capture, errors)
#   bench     python -m experiments.prefill_bench (JSON into benchmarks/results/), alone on the GPU
#   full      the whole GPU test file, in 3 processes, while `sanitize` runs beside it
#   sanitize  compute-sanitizer memcheck, then racecheck, over the reduced grid (PAGEDKV_SANITIZER_GRID=1)
#   ncu       Nsight Compute on version 2 (8k tokens, head_dim 128; 32k, head_dim 64) and version 3 (8k, 128)
# Logs go to $OUT/logs/<stage>.log; at the end they and the JSON are packed into $OUT/prefill_results.tgz.
# Exit status: 1 if any stage failed, ran out of time or was skipped for lack of time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/pagedkv_prefill}
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-285}
mkdir -p "$OUT/logs" benchmarks/results
status=0
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(probe warm fast bench full sanitize ncu)

run() {  # run STAGE LIMIT CMD...: one command under min(LIMIT, time left), output to $OUT/logs/STAGE.log
    local stage=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 5 ]; then
        echo "=== $stage: skipped, no time left" | tee -a "$OUT/logs/summary.log"; return
    fi
    echo "=== $stage: $* (limit ${limit}s) at ${SECONDS}s" >> "$OUT/logs/$stage.log"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" >> "$OUT/logs/$stage.log" 2>&1
    local rc=$?
    echo "=== $stage: exit $rc after $((SECONDS - t0)) s (at ${SECONDS}s)" | tee -a "$OUT/logs/$stage.log" "$OUT/logs/summary.log"
}

PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rs --durations=8 tests/test_prefill_attention.py)
FAST='(every_head_dim and (float16-64 or float16-128 or bfloat16-64 or float32-80)) or padding or chunked or graph or range_check or (block_sizes and float16-128-2-)'

WARM_PY=$(mktemp /tmp/prefill_warm_XXXX.py)
cat > "$WARM_PY" <<'EOF'
"""Compile every module the tests and the benchmark load, in 14 processes (CuPy's disk cache keeps them)."""
import multiprocessing as mp
import time

from pagedkv.kernels import compile, prefill as kp


def build(job):
    t0 = time.time()
    compile.load_module(kp.FILENAME, *job)
    return job, time.time() - t0


if __name__ == "__main__":
    jobs = [((), ())] + [((n,), ()) for dt in (1, 2) for hd in kp.HEAD_DIMS for n in kp.launched_names(dt, hd)[1:]]
    jobs += [(kp.v1_names(dt, hd), ()) for dt in (0, 1, 2) for hd in kp.HEAD_DIMS]
    jobs += [((kp.DEFAULT_CONFIGS[hd].kernel_name(1, hd),), d) for hd in (64, 128) for _, d in kp.BENCH_DEFINES]
    t0 = time.time()
    with mp.get_context("spawn").Pool(14) as pool:
        for job, s in pool.imap_unordered(build, jobs):
            print(f"{s:6.1f} s  {job}", flush=True)
    print(f"{len(jobs)} modules in {time.time() - t0:.1f} s")
EOF

sanitize() {
    for tool in memcheck racecheck; do
        PAGEDKV_SANITIZER_GRID=1 run "$tool" "${T_SANITIZE:-60}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
            "${PYTEST[@]}" -m gpu -k "not 16k and not torch"
    done
}

for stage in "${stages[@]}"; do
    case $stage in
    probe)
        run probe "${T_PROBE:-30}" bash -c "nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv;
            $PY -c 'import cupy, numpy, torch, transformers; print(\"cupy\", cupy.__version__, \"numpy\", numpy.__version__, \"torch\", torch.__version__, \"transformers\", transformers.__version__)';
            which compute-sanitizer ncu nvcc; nproc" ;;
    warm)
        run warm "${T_WARM:-70}" "$PY" "$WARM_PY" ;;
    fast)
        run fast "${T_FAST:-45}" "${PYTEST[@]}" -m gpu -k "$FAST" --maxfail=30 ;;
    bench)
        run bench "${T_BENCH:-100}" "$PY" -m experiments.prefill_bench --output-json ;;
    full)
        export OMP_NUM_THREADS=4 OPENBLAS_NUM_THREADS=4 MKL_NUM_THREADS=4
        run full_head_dims "${T_FULL:-110}" "${PYTEST[@]}" -k "every_head_dim" &
        run full_blocks_gqa "${T_FULL:-110}" "${PYTEST[@]}" -k "block_sizes_and_gqa" &
        run full_rest "${T_FULL:-110}" "${PYTEST[@]}" -k "not every_head_dim and not block_sizes_and_gqa and not compile" &
        if [[ " ${stages[*]} " == *" sanitize "* ]]; then sanitize; fi
        wait
        unset OMP_NUM_THREADS OPENBLAS_NUM_THREADS MKL_NUM_THREADS ;;
    sanitize)
        [[ " ${stages[*]} " == *" full "* ]] || sanitize ;;  # else it ran beside `full`
    ncu)
        for case in "8k 128 2" "32k 64 2" "8k 128 3"; do
            set -- $case
            run "ncu_${case// /_}" "${T_NCU:-60}" ncu --clock-control none --kernel-name regex:prefill_attention_v[23] \
                --launch-skip 2 --launch-count 1 --section SpeedOfLight --section Occupancy --section WarpStateStats \
                --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SchedulerStats \
                "$PY" -c "
import cupy as cp, numpy as np
from experiments.prefill_bench import build_case, case_lengths
from pagedkv.kernels import prefill as kp
new, cached = case_lengths('$1')
q, k, v, bt, qsl, cl = build_case(cp, np.random.default_rng(0), new, cached, $2)
bt, qsl, cl = cp.asarray(bt), cp.asarray(qsl), cp.asarray(cl)
for _ in range(4): kp.prefill_attention(q, k, v, bt, qsl, cl, check=False, version=$3)
cp.cuda.runtime.deviceSynchronize()"
        done ;;
    *)
        echo "unknown stage $stage" | tee -a "$OUT/logs/summary.log"; status=1 ;;
    esac
done

# NOTE: one archive, so that every log and JSON comes back (the device tool returns at most 8 files)
tar czf "$OUT/prefill_results.tgz" -C "$OUT" logs -C "$PWD" benchmarks/results && cp "$OUT/logs/summary.log" "$OUT/"
for f in "$OUT"/logs/*.log; do echo "----- $(basename "$f"): last lines"; tail -n 12 "$f"; done
cat "$OUT/summary.log"
# NOTE: stages of `full` run in background subshells: the status comes from the summary, not a variable
grep -qE "exit [1-9]|skipped|unknown stage" "$OUT/summary.log" && status=1
exit "$status"
