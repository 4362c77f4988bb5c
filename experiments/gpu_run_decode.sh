#!/usr/bin/env bash
# One device call for the decode kernels (issue 11): tests, sanitizers, benchmark, profile. From the repo root:
#
#   bash experiments/gpu_run_decode.sh [STAGE...]      default: probe tests kbench kbench2 ncu
#
# Stages (each under its own time limit in seconds, override with T_<STAGE>=...):
#   probe    GPU, driver, versions; installs carried wheels (.whl/: pytest-xdist) into /tmp/site
#   tests    tests/test_kernels.py, full GPU grid (xdist, one (dtype, head_dim) group per worker), while
#            compute-sanitizer memcheck and racecheck run the reduced grid (PAGEDKV_SANITIZER_GRID=1) beside it
#   kbench   python -m experiments.kernel_bench (alone on the GPU; JSON into benchmarks/results/)
#   kbench2  the ragged cases and two uniform ones again (JSON into $OUT/logs): the run-to-run spread
#   ncu      Nsight Compute on kernels 2 and 3 (the same launch each), kernel_bench cases NCU_CASES
#            (default 10 8 2: 200 x U[17, 700], 32 x U[1000, 32000], 32 x 8192), with the warp stall reasons
# Logs go to $OUT/logs; everything is packed into $OUT/results.tgz at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
OUT=${OUT:-/tmp/pagedkv_decode}
PY=${PYTHON:-python3}
mkdir -p "$OUT/logs" benchmarks/results
status=0
stages=${*:-probe tests kbench kbench2 ncu}

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
    kbench2)
        run kbench2 "${T_KBENCH:-120}" "$PY" -m experiments.kernel_bench --cases 2 6 8 9 10 11 \
            --output-json "$OUT/logs/kernel_bench_repeat.json" ;;
    ncu)
        for case in ${NCU_CASES:-10 8 2}; do
            run "ncu_case$case" "${T_NCU:-45}" ncu --clock-control none --kernel-name regex:'paged_attention_v[23]_kernel' \
                --launch-skip 4 --launch-count 2 --section SpeedOfLight --section Occupancy --section LaunchStats \
                --section WarpStateStats --section MemoryWorkloadAnalysis \
                --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum' \
                "$PY" -c "
import cupy, numpy as np
from experiments.kernel_bench import CASES, build_case
from pagedkv.kernels import decode
q, k, v, bt, cl, _ = build_case(cupy, np.random.default_rng(0), CASES[$case])
for _ in range(3):
    for version in (2, 3): decode.paged_attention(q, k, v, bt, cl, version=version, check=False)
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
for log in kbench kbench2; do
    [ -f "$OUT/logs/$log.log" ] && sed -n '/paged decode attention/,/wrote/p' "$OUT/logs/$log.log" | cut -c1-200
done
for log in "$OUT"/logs/ncu_case*.log; do  # one line per profiled kernel: duration, DRAM %, top stalls
    [ -f "$log" ] && "$PY" - "$log" <<'PYEOF'
import re, sys
text = open(sys.argv[1]).read()
for block in re.split(r"\n  (?=\S)", text)[1:]:
    name = block.split("(")[0].strip()[:40]
    get = lambda key: (re.search(re.escape(key) + r"\s+\S*\s+([\d.,]+)", block) or [None, "?"])[1]
    stalls = sorted(((float(v), k) for k, v in re.findall(r"issue_stalled_(\w+?)_per_issue_active.ratio\s+\S*\s+([\d.]+)", block)), reverse=True)[:5]
    print(sys.argv[1].split("/")[-1], name, "us", get("Duration"), "dram%", get("DRAM Throughput"), "regs", get("Registers Per Thread"),
          "cyc/issue", get("Warp Cycles Per Issued Instruction"), "stalls", " ".join(f"{k}={v:.2f}" for v, k in stalls))
PYEOF
done
cat "$OUT/summary.log"
grep -q "exit [1-9]" "$OUT/summary.log" && status=1  # the sanitizers ran in background subshells
exit "$status"
