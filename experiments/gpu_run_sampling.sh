#!/usr/bin/env bash
# Issue 19's device run (from the repository root):   bash experiments/gpu_run_sampling.sh
#
#   tests       the GPU tests of the logits processing (kernel = NumPy twin = float64 reference; engine with
#               penalties, graphs = eager), the sampler's kernel tests, structured outputs on the GPU engine
#   penalties   engine_bench W1 with CUDA graphs: greedy, then sampled with presence/frequency/repetition penalties
#   structured  structured_bench: decode tokens/s with a JSON schema against without; llguidance vs xgrammar masks
# Wheels (llguidance, xgrammar, pytest-xdist) from ../../.whl or .whl into /tmp/site. Logs and JSON go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pagedkv_sampling}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
WHL=$(ls -d ../../.whl .whl 2>/dev/null | head -1)
for w in llguidance xgrammar; do
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHL"/$w*.whl >/dev/null 2>&1 \
    || echo "no $w wheel" | tee -a "$OUT/probe.log"
done
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/probe.log"
$PY -c 'import cupy, torch; print("cupy", cupy.__version__, "torch", torch.__version__)' 2>&1 | tail -1 | tee -a "$OUT/probe.log"

timeout "${T_TESTS:-45}" $PY -m pytest -q -x -p no:cacheprovider -rs -m gpu tests/test_logits_process.py \
    tests/test_structured.py tests/test_sampler.py 2>&1 | tail -25 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout "${T_PENALTIES:-50}" $PY -m experiments.engine_bench --device gpu --graph on --penalties \
    --json "$OUT/engine_bench_penalties.json" 2>&1 | tail -22 | tee "$OUT/penalties.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout "${T_STRUCTURED:-40}" $PY -m experiments.structured_bench --device gpu --libs \
    --json "$OUT/structured_bench.json" 2>&1 | tail -15 | tee "$OUT/structured.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
