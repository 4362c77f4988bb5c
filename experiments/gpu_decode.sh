#!/usr/bin/env bash
# One device call for issue 16's decode dispatcher and issue 18's fp8 decode kernels: tests, then the benchmark
# alone on the GPU. From the repo root:
#
#   bash experiments/gpu_decode.sh [STAGE...]      default: probe tests kbench
#
# Stages (each under its own time limit in seconds, override with T_<STAGE>=...):
#   probe    GPU, driver, versions; installs carried wheels (.whl/ or ../../.whl: pytest-xdist) into /tmp/site
#   tests    tests/test_decode_fp8.py and the decode tests of tests/test_kernels.py (KTEST_K selects), xdist
#   kbench   python -m experiments.kernel_bench (fp16 and fp8 columns; KBENCH_ARGS adds flags, e.g. --cases)
# Logs go to $OUT/logs; everything is packed into $OUT/results.tgz at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
OUT=${OUT:-/tmp/pagedkv_decode}
PY=${PYTHON:-python3}
mkdir -p "$OUT/logs" benchmarks/results
status=0
stages=${*:-probe tests kbench}

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

for stage in $stages; do
    case $stage in
    probe)
        for dir in .whl ../../.whl; do
            if ls $dir/pytest_xdist*.whl >/dev/null 2>&1; then
                "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $dir/pytest_xdist*.whl \
                    $dir/execnet*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
                break
            fi
        done
        run probe 40 bash -c "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv;
            $PY -c 'import cupy, numpy, xdist; print(\"cupy\", cupy.__version__, \"numpy\", numpy.__version__, \"xdist\", xdist.__version__)'; nproc" ;;
    tests)
        run tests "${T_TESTS:-100}" "$PY" -m pytest -m gpu tests/test_decode_fp8.py tests/test_kernels.py -q \
            -p no:cacheprovider -n 16 --dist loadgroup --tb=short --durations=8 -rs \
            -k "${KTEST_K:-fp8 or dispatcher or graph or ragged or errors or (grid and float16 and (hd128 or hd80))}" ;;
    kbench)
        run kbench "${T_KBENCH:-120}" "$PY" -m experiments.kernel_bench ${KBENCH_ARGS:-} ;;
    *)
        echo "unknown stage $stage" | tee -a "$OUT/logs/summary.log"; status=1 ;;
    esac
done

# NOTE: one archive, so every log and JSON comes back (the device tool returns at most 8 files)
tar czf "$OUT/results.tgz" -C "$OUT" logs -C "$PWD" benchmarks/results && cp "$OUT/logs/summary.log" "$OUT/"
[ -f "$OUT/logs/tests.log" ] && { echo "--- tests"; grep -E "passed|failed|Error|error" "$OUT/logs/tests.log" | tail -12; }
[ -f "$OUT/logs/kbench.log" ] && sed -n '/compiled the kernels/,/wrote/p' "$OUT/logs/kbench.log" | cut -c1-260
cat "$OUT/summary.log"
exit "$status"
