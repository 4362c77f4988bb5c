#!/usr/bin/env bash
# Issue 19's device run (from the repository root):   bash experiments/gpu_run_sampling.sh
#
#   kernels     logits processing kernel = NumPy twin = float64 reference (3 dtypes), the sampler's kernel with
#               the new arguments (fallback pass, batch independence, CUDA-graph replay)
#   penalties   engine_bench W1 with CUDA graphs: greedy, then sampled with presence/frequency/repetition penalties
#   structured  structured_bench: decode tokens/s with a JSON schema against without; llguidance vs xgrammar masks
#   engine      GPU engine tests: penalties graphs = eager (greedy and seeded n=2); 48 schema samples validate
# Wheels (llguidance, xgrammar) from ../../.whl or .whl into /tmp/site. Logs and JSON go to $OUT.
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
date -u | tee -a "$OUT/probe.log"
T() { local t=$1; shift; timeout "$t" "$@"; }

T "${T_KERNELS:-30}" $PY -m pytest -q -x -p no:cacheprovider -rs -m gpu tests/test_logits_process.py \
    tests/test_sampler.py -k "kernel_processing or fallback or captured_graph or row_is_independent" 2>&1 \
    | tail -15 | tee "$OUT/kernels.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

T "${T_PENALTIES:-45}" $PY -m experiments.engine_bench --device gpu --penalties \
    --output-json "$OUT/engine_bench_penalties.json" 2>&1 | tail -22 | tee "$OUT/penalties.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

T "${T_STRUCTURED:-30}" $PY -m experiments.structured_bench --device gpu --libs \
    --output-json "$OUT/structured_bench.json" 2>&1 | tail -12 | tee "$OUT/structured.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

T "${T_ENGINE:-25}" $PY -m pytest -q -x -p no:cacheprovider -rs -m gpu tests/test_logits_process.py \
    tests/test_structured.py -k "engine" 2>&1 | tail -15 | tee "$OUT/engine.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
