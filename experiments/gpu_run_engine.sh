#!/usr/bin/env bash
# One device call for the engine helper: the engine and model GPU tests (HF parity, cuBLAS, RMSNorm, and
# chunked prefill / prefix caching / CUDA graphs against the reference configuration), then the float16
# agreement count of the same variants. Logs under $OUT. Usage (from the snapshot's root):
#   bash experiments/gpu_run_engine.sh [tests|bench]
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
what="${1:-tests}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "$what" = tests ]; then
    timeout 240 python3 -m pytest -q -s -p no:cacheprovider tests/test_engine_gpu.py tests/test_model_gpu.py \
        2>&1 | tail -n 80 | tee "$OUT/pytest_gpu.log"
    timeout 50 python3 - <<'PY' 2>&1 | tee "$OUT/fp16_agreement.log"
import json, os, sys
sys.path.insert(0, "tests")
from test_engine_gpu import REFERENCE, VARIANTS, _gpu_engine, _run_twice, _shared_prompts
from pagedkv.engine import SamplingParams
params = SamplingParams(n=1, temperature=0, max_tokens=24, ignore_eos=True)
prompts = _shared_prompts(seed=1)
want = _run_twice(_gpu_engine("float16", **REFERENCE), prompts, params)
rows = {}
for name, v in VARIANTS.items():
    got = _run_twice(_gpu_engine("float16", **v), prompts, params)
    rows[name] = sum(a == b for a, b in zip(got, want))
    print(f"float16 {name}: {rows[name]}/{len(want)} requests agree with the reference configuration")
json.dump({"num_requests": len(want), "agree": rows}, open(os.path.join(os.environ.get("OUT", "/tmp"), "fp16_agreement.json"), "w"))
PY
else
    timeout 280 python3 -m experiments.prefix_workloads --device gpu --kv-memory-gb 40 \
        --output-json "$OUT/prefix_workloads.json" \
        2>&1 | tail -n 60 | tee "$OUT/prefix_workloads.log"
fi
