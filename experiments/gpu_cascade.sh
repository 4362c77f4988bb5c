#!/usr/bin/env bash
# Device calls of the cascade helper (issue 17). Usage, from this tree's snapshot root:
#   bash experiments/gpu_cascade.sh kernels   # GPU tests of the kernels (quick set) + experiments.cascade_bench
#   bash experiments/gpu_cascade.sh engine    # engine GPU test + prefix_workloads --workload cascade
#   bash experiments/gpu_cascade.sh all       # one process: kernel + engine GPU tests, the cascade workloads,
#                                             # cascade_bench, then the engine/runner GPU tests if time is left
# Everything lands in $OUT/cascade_<stage>.tgz; each stage under its own timeout (BUDGET seconds in all).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" PAGEDKV_CASCADE_QUICK=1
STAGE="${1:-kernels}"
OUT="${OUT:-/tmp/out}"
LOGS="$OUT/cascade_$STAGE"
mkdir -p "$LOGS"
finish() { tar -czf "$OUT/cascade_$STAGE.tgz" -C "$OUT" "cascade_$STAGE" && rm -rf "$LOGS"; }
trap finish EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
date -u | tee -a "$LOGS/gpu.txt"
git_rev="$(cat .cascade_rev 2>/dev/null)"; echo "tree: $git_rev" | tee -a "$LOGS/gpu.txt"
t0=$SECONDS
left() { echo $(( ${BUDGET:-150} - (SECONDS - t0) )); }

if [ "$STAGE" = all ]; then
  timeout "$(( $(left) - 5 ))" python3 - "$LOGS" <<'PY' > "$LOGS/all.log" 2>&1
import sys, time, pytest
logs, t0 = sys.argv[1], time.time()
rc = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_cascade.py", "tests/test_engine_cascade.py",
                  "-k", "not compiles"])
print(f"pytest rc {int(rc)} ({time.time() - t0:.0f} s)", flush=True)
from experiments import prefix_workloads, cascade_bench
prefix_workloads.main(["--device", "gpu", "--workload", "cascade", "--output-json", logs + "/prefix_workloads_cascade.json"])
print(f"workloads done ({time.time() - t0:.0f} s)", flush=True)
cascade_bench.main(["--output-json", logs + "/cascade_bench.json", "--cases", "0", "1", "2", "3", "4", "10", "16", "22"])
print(f"bench done ({time.time() - t0:.0f} s)", flush=True)
PY
  echo "all rc=$? ($((SECONDS - t0)) s)"
  grep -E "passed|failed|^FAILED|^E  |Error|pytest rc|done|identical|_vs_|requests_per_s'|decode_tokens_per_s'|full_batch" "$LOGS/all.log" | head -70
  sed -n '/cascade decode attention/,$p' "$LOGS/all.log" | head -30
  if [ "$(left)" -gt 25 ]; then
    timeout "$(( $(left) - 3 ))" python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_gpu.py tests/test_engine_runner_gpu.py \
      > "$LOGS/pytest_engine_gpu.log" 2>&1
    echo "engine GPU tests rc=$? ($((SECONDS - t0)) s)"; grep -E "passed|failed|^FAILED" "$LOGS/pytest_engine_gpu.log" | tail -5
  fi
elif [ "$STAGE" = kernels ]; then
  # one process: the tests' compiled modules serve the bench too
  timeout "$(left)" python3 - "$LOGS" <<'PY' > "$LOGS/kernels.log" 2>&1
import sys, pytest
logs = sys.argv[1]
rc = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_cascade.py", "-k", "not compiles",
                  "-x", "--maxfail=3"])
print("pytest rc", int(rc), flush=True)
from experiments import cascade_bench
cascade_bench.main(["--output-json", logs + "/cascade_bench.json"])
PY
  echo "kernels rc=$? ($((SECONDS - t0)) s)"
  grep -E "passed|failed|^FAILED|^E  |Error|pytest rc" "$LOGS/kernels.log" | head -40
  sed -n '/cascade decode attention/,$p' "$LOGS/kernels.log" | head -60
else
  timeout "$(( $(left) - 100 ))" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_cascade.py \
    > "$LOGS/pytest_engine.log" 2>&1
  echo "engine tests rc=$? ($((SECONDS - t0)) s)"; grep -E "passed|failed|^FAILED|^E  " "$LOGS/pytest_engine.log" | head -20
  timeout "$(left)" python3 -m experiments.prefix_workloads --device gpu --workload cascade \
    --output-json "$LOGS/prefix_workloads_cascade.json" > "$LOGS/workloads.log" 2>&1
  echo "workloads rc=$? ($((SECONDS - t0)) s)"
  grep -E "targets|requests_per_s|full_batch_step|decode_tokens_per_s|identical|floor_s|Error" "$LOGS/workloads.log" | head -60
fi
