#!/usr/bin/env bash
# One device call for the decode kernels (issue 11): tests, sanitizers, benchmark, profile. From the repo root:
#
#   bash experiments/gpu_run_decode.sh [STAGE...]      default: probe tests kbench ncu
#
# Stages (each under its own time limit in seconds, override with T_<STAGE>=...):
#   probe    GPU, driver, versions; installs carried wheels (.whl/: pytest-xdist) into /tmp/site
#   tests    tests/test_kernels.py, full GPU grid (xdist, one (dtype, head_dim) group per worker), while
#            compute-sanitizer memcheck and racecheck run the reduced grid (PAGEDKV_SANITIZER_GRID=1) beside it
#   kbench   python -m experiments.kernel_bench (alone on the GPU; JSON into benchmarks/results/)
#   ncu      Nsight Compute on kernel 3 and its merge, kernel_bench case NCU_CASES (default 10: 200 x U[17, 700])
# Logs go to $OUT/logs; everything is packed into $OUT/results.tgz at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
OUT=${OUT:-/tmp/pagedkv_decode}
PY=${PYTHON:-python3}
mkdir -p "$OUT/logs" benchmarks/results
status=0
stages=${*:-probe tests kbench ncu}

run() {  # run NAME LIMIT CMD...: one command, its output tee'd to $OUT/logs/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $* (limit ${limit}s) $(date -u +%H:%M:%S)" >> "$OUT/logs/$name.log"
    local t0=$SECONDS
    timeout "$limit" "$@" >> "$OUT/logs/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/logs/$name.log" "$OUT/logs/summary.log"
    [ "$rc" -eq 0 ] || status=1
}

sanitize() {  # sanitize TOOL: the reduced grid under compute-sanitizer
    PAGEDKV_SANITIZER_GRID=1 run "$1" "${T_SANITIZE:-120}" compute-sanitizer --tool "$1" \
        "$PY" -m pytest -q -p no:cacheprovider -p no:xdist tests/test_kernels.py -m gpu \
        -k 'grid or ragged or exact or errors'
}

for stage in $stages; do
    case $stage in
    probe)
        if ls .whl/*.whl >/dev/null 2>&1; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
                && export PYTHONPATH=$PYTHONPATH:/tmp/site
        fi
        run probe 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv;
            $PY -c 'import cupy, numpy, xdist; print(\"cupy\", cupy.__version__, \"numpy\", numpy.__version__, \"xdist\", xdist.__version__)';
            which compute-sanitizer ncu nvcc; nproc" ;;
    tests)
        sanitize memcheck &
        sanitize racecheck &
        run ktests "${T_KTESTS:-120}" "$PY" -m pytest -m gpu tests/test_kernels.py -q -p no:cacheprovider -n 8 \
            --dist loadgroup --durations=15 -rs
        wait ;;
    kbench)
        run kbench "${T_KBENCH:-120}" "$PY" -m experiments.kernel_bench ;;
    ncu)
        for case in ${NCU_CASES:-10}; do
            run "ncu_case$case" "${T_NCU:-35}" ncu --clock-control none --kernel-name regex:paged_attention_v3 \
                --launch-skip 4 --launch-count 2 --section SpeedOfLight --section Occupancy \
                --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats "$PY" -c "
import cupy, numpy as np
from experiments.kernel_bench import CASES, build_case
from pagedkv import kernels
q, k, v, bt, cl, _ = build_case(cupy, np.random.default_rng(0), CASES[$case])
for _ in range(3): kernels.paged_attention(q, k, v, bt, cl, check=False)
cupy.cuda.runtime.deviceSynchronize()"
        done ;;
    *)
        echo "unknown stage $stage" | tee -a "$OUT/logs/summary.log"; status=1 ;;
    esac
done

# NOTE: one archive, so every log and JSON comes back (the device tool returns at most 8 files)
tar czf "$OUT/results.tgz" -C "$OUT" logs -C "$PWD" benchmarks/results && cp "$OUT/logs/summary.log" "$OUT/"
for log in ktests memcheck racecheck kbench; do  # the lines worth reading in the reply
    [ -f "$OUT/logs/$log.log" ] && { echo "--- $log"; grep -E "passed|failed|error|ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/logs/$log.log" | tail -5; }
done
[ -f "$OUT/logs/kbench.log" ] && sed -n '/paged decode attention/,/wrote/p' "$OUT/logs/kbench.log" | cut -c1-240
cat "$OUT/summary.log"
grep -q "exit [1-9]" "$OUT/summary.log" && status=1  # the sanitizers ran in background subshells
exit "$status"
