#!/usr/bin/env bash
# The prefill helper's GPU call for issue 16 (versions 4 and 5, the Hopper kernels), from the repository root:
#
#   bash experiments/gpu_prefill.sh [STAGE...]      default: probe diag tests bench
#
# Stages (each under min(its limit, the time left before DEADLINE seconds, default 200)):
#   probe   GPU name, driver, CuPy / torch versions
#   diag    versions 4 and 5 (and 2 as the control) on one small batch per dtype x head_dim against the float64
#           reference: relative error, error by 64-row block and by 8-dim chunk (a layout bug shows a pattern);
#           a hang (a pipeline deadlock) stops the script here
#   tests   the version-4/5 GPU tests (tests/test_prefill_attention.py -k "sm90 or ...")
#   bench   python -m experiments.prefill_bench (head_dim 64 and 128, no TTFT) with BENCH_ARGS
#   ncu     Nsight Compute on the default Hopper versions (8k tokens, head_dim 128; 32k, head_dim 64)
# Logs and the benchmark JSON go to $OUT/prefill_sm90.tgz (the device tool returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/pagedkv_prefill_sm90}
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-200}
BENCH_ARGS=${BENCH_ARGS:---cases 2k 8k 32k varlen_u256 over_16k prefix_8x512 --runs 10 \
    --variants v4_fast_exp v5_no_pingpong v5_not_persistent v5_exp2f v5_stages3}
mkdir -p "$OUT/logs" benchmarks/results
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(probe diag tests bench ncu)

run() {  # run STAGE LIMIT CMD...: output to $OUT/logs/STAGE.log; returns the command's exit status
    local stage=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 5 ]; then
        echo "=== $stage: skipped, no time left" | tee -a "$OUT/logs/summary.log"; return 99
    fi
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" >> "$OUT/logs/$stage.log" 2>&1
    local rc=$?
    echo "=== $stage: exit $rc after $((SECONDS - t0)) s (limit $limit, at ${SECONDS}s)" | tee -a "$OUT/logs/summary.log"
    return $rc
}

DIAG_PY=$(mktemp /tmp/prefill_diag_XXXX.py)
cat > "$DIAG_PY" <<'EOF'
"""Versions 4 and 5 vs the float64 reference on one small batch per (dtype, head_dim); version 2 as the control."""
import sys
import time

import numpy as np

sys.path.insert(0, "tests")
from test_prefill_attention import BF16, F16, make_batch, poisoned, to_host  # noqa: E402
from test_kernels import to_dev  # noqa: E402

from pagedkv.kernels import ops, prefill as kp, reference  # noqa: E402

for dtype in (F16, BF16):
    for hd in (64, 128):
        batch = make_batch(np.random.default_rng(hd), dtype, hd, 16, (8, 2), [300, 5, 131], [100, 0, 29], share=1,
                           pad_rows=2)
        ref = reference.prefill_attention(*batch)
        rows = ops.owned_rows(batch[4], len(batch[0]))
        dev = [to_dev(a) for a in batch]
        for version, defines in ((2, ()), (4, ()), (5, ())):
            out = poisoned(batch[0].shape, dtype)
            t0 = time.time()
            kp.prefill_attention(*dev, out=out, version=version, defines=defines,
                                 kv_dtype="bfloat16" if dtype == BF16 else None)
            got = to_host(out, dtype).astype(np.float64)
            d = got[rows] - ref[rows]
            err = np.linalg.norm(np.nan_to_num(d, nan=1e3)) / np.linalg.norm(ref[rows])
            unowned_ok = np.isnan(got[~rows]).all()
            by_chunk = np.sqrt((np.nan_to_num(d, nan=1e3).reshape(len(d), -1, hd // 8, 8) ** 2).sum(axis=(0, 1, 3)))
            by_rows = [float(np.linalg.norm(np.nan_to_num(d[i:i + 64], nan=1e3))) for i in range(0, len(d), 64)]
            print(f"{dtype} hd={hd} v{version}{' ' + str(defines) if defines else ''}: rel err {err:.2e}, "
                  f"nan rows {int((~np.isfinite(got[rows]).all(axis=(1, 2))).sum())}, unowned kept {unowned_ok}, "
                  f"{time.time() - t0:.1f} s\n  by 8-dim chunk {by_chunk.round(2)}\n  by 64 rows {np.round(by_rows, 2)}",
                  flush=True)
EOF

for stage in "${stages[@]}"; do
    case $stage in
    probe)
        run probe 30 bash -c "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv;
            $PY -c 'import cupy, numpy, torch; print(\"cupy\", cupy.__version__, \"numpy\", numpy.__version__, \"torch\", torch.__version__)'; nproc" ;;
    diag)
        run diag "${T_DIAG:-60}" "$PY" "$DIAG_PY"
        rc=$?
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            echo "=== diag timed out: version 4 hangs; later stages skipped" | tee -a "$OUT/logs/summary.log"; break
        fi ;;
    tests)
        run tests "${T_TESTS:-80}" "$PY" -m pytest -p no:cacheprovider -q -rs --durations=5 tests/test_prefill_attention.py \
            -m gpu -k "sm90 or default_version or (capture and (4 or 5)) or (chunked and (4 or 5))" ;;
    bench)
        # shellcheck disable=SC2086
        run bench "${T_BENCH:-120}" "$PY" -m experiments.prefill_bench --head-dims 64 128 --ttft-lens $BENCH_ARGS \
            --output-json "$OUT/prefill_bench_sm90.json" ;;
    ncu)
        for case in "8k 128" "32k 64"; do
            set -- $case
            run "ncu_$1_$2" "${T_NCU:-30}" ncu --clock-control none --kernel-name regex:prefill_attention_v[45] \
                --launch-skip 2 --launch-count 1 --section SpeedOfLight --section Occupancy --section WarpStateStats \
                --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SchedulerStats \
                "$PY" -c "
import cupy as cp, numpy as np
from experiments.prefill_bench import build_case, case_lengths
from pagedkv.kernels import prefill as kp
new, cached = case_lengths('$1')
q, k, v, bt, qsl, cl = build_case(cp, np.random.default_rng(0), new, cached, $2)
bt, qsl, cl = cp.asarray(bt), cp.asarray(qsl), cp.asarray(cl)
for _ in range(4): kp.prefill_attention(q, k, v, bt, qsl, cl, check=False)
cp.cuda.runtime.deviceSynchronize()"
        done ;;
    *)
        echo "unknown stage $stage" | tee -a "$OUT/logs/summary.log" ;;
    esac
done

tar czf "$OUT/prefill_sm90.tgz" -C "$OUT" logs $(cd "$OUT" && ls ./*.json 2>/dev/null)
for f in "$OUT"/logs/*.log; do echo "----- $(basename "$f"): last lines"; tail -n 25 "$f"; done
