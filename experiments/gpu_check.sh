#!/usr/bin/env bash
# One device call: GPU tests, compute-sanitizer (memcheck, racecheck) on the reduced grid, the benchmark.
#   bash experiments/gpu_check.sh [probe] [tests] [memcheck] [racecheck] [ncu] [bench]   (default: all)
# Logs go to $OUT (or ./gpu_logs); each stage has its own time limit (seconds, env T_<STAGE>).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAGEDKV_SANITIZER_GRID=
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
stages=${*:-probe tests memcheck racecheck ncu bench}
for s in $stages; do
  echo "=== $s $(date -u +%T)"
  case $s in
    probe) python3 - <<'PY' 2>&1 | tee "$OUT/probe.txt"
import cupy, ml_dtypes, numpy
print("cupy", cupy.__version__, "numpy", numpy.__version__)
p = cupy.cuda.runtime.getDeviceProperties(0); print(p["name"], "SMs", p["multiProcessorCount"], "L2", p["l2CacheSize"])
try:
    a = cupy.empty(8, dtype=ml_dtypes.bfloat16); print("bf16 alloc OK", a.dtype)
    print("bf16 asarray OK", cupy.asarray(numpy.ones(4, ml_dtypes.bfloat16)).dtype)
except Exception as e: print("bf16:", type(e).__name__, e)
print("funcSetAttribute", hasattr(cupy.cuda.driver, "funcSetAttribute"))
PY
    ;;
    tests) timeout ${T_TESTS:-300} python3 -m pytest -m gpu tests/test_kernels.py -q -p no:cacheprovider --maxfail=25 \
             --durations=8 2>&1 | tee "$OUT/pytest.log" | tail -40 ;;
    memcheck) PAGEDKV_SANITIZER_GRID=1 timeout ${T_MEMCHECK:-150} compute-sanitizer --tool memcheck \
             python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py -k 'grid or hypothesis or exact or errors' 2>&1 | tee "$OUT/memcheck.log" | tail -8 ;;
    racecheck) PAGEDKV_SANITIZER_GRID=1 timeout ${T_RACECHECK:-150} compute-sanitizer --tool racecheck \
             python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py -k 'grid or hypothesis or exact or errors' 2>&1 | tee "$OUT/racecheck.log" | tail -8 ;;
    ncu) for case in "32 8192 32 8" "1 32768 32 8"; do
           timeout ${T_NCU:-90} ncu --clock-control none --kernel-name regex:paged_attention_v2 --launch-skip 4 \
             --launch-count 2 --section SpeedOfLight --section Occupancy --section WarpStateStats \
             --section MemoryWorkloadAnalysis python3 -c "
import cupy, numpy as np
from experiments.kernel_bench import build_case
from pagedkv import kernels
q, k, v, bt, cl = build_case(cupy, np.random.default_rng(0), *map(int, '$case'.split()))
for _ in range(4): kernels.paged_attention(q, k, v, bt, cl, check=False)
cupy.cuda.runtime.deviceSynchronize()" 2>&1 | tee "$OUT/ncu_${case// /_}.log" \
             | grep -E "paged_attention|Throughput|Duration|Achieved Occ|Registers|Warp Cycles" | cut -c1-120
         done ;;
    bench) timeout ${T_BENCH:-200} python3 -m experiments.kernel_bench 2>&1 | tee "$OUT/bench.log"
           cp benchmarks/results/kernel_bench_*.json "$OUT/" 2>/dev/null ;;
  esac
done
echo "=== done $(date -u +%T)"
