#!/usr/bin/env bash
# stop 26 call A: version 4's length split and the engine's tensor-core variant, then memcheck on both sets
cd "$(dirname "$0")/.."
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider -n 8 --tb=short -rfE tests/test_decode_tc.py \
    tests/test_decode_dispatch.py tests/test_engine_cascade.py 2>&1 | tail -n 30 | tee $OUT/tests_a.log
SANITIZE_TOOLS=memcheck T_SANITIZE=170 bash experiments/gpu_run.sh sanitize > $OUT/sanitize_stdout.log 2>&1
mkdir -p $OUT/x && tar xzf $OUT/results.tgz -C $OUT/x logs && for f in $OUT/x/logs/*check*.log; do
  echo "## $f"; grep -E "passed|failed|FAILED|ERROR SUMMARY|RACECHECK SUMMARY|=== " $f | tail -n 25; done
cp $OUT/x/logs/*check*.log $OUT/ 2>/dev/null; rm -rf $OUT/x
