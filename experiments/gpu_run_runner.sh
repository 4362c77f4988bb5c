#!/usr/bin/env bash
# One device call for the runner helper (issue 11: sampling on the device, the host off the critical path;
# issue 12: the engine on the prefill op): the GPU tests of this tree (engine, runner, model, sampler), the
# float16 agreement of the engine's variants with the synchronous eager reference, then W1 of the baseline
# (commit a238c8f, snapshot in ../baseline) and of this tree (greedy and sampled, with the step breakdown) in
# the same call, and whether this tree's greedy W1 tokens are the baseline's. With a snapshot of this branch
# before a merge of main in ../runner_pre, that one is measured (and its GPU tests run) too: the tokens of the
# runner's own changes, apart from other helpers' kernels. Everything lands in $OUT (one tarball).
# Usage, from this tree's snapshot root (.dev/runner): bash experiments/gpu_run_runner.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"
LOGS="$OUT/runner"
mkdir -p "$LOGS"
HERE="$PWD"
BASE="$(cd "$HERE/../baseline" && pwd)"
PRE="$(cd "$HERE/../runner_pre" 2>/dev/null && pwd)"
finish() { tar -czf "$OUT/runner_gpu.tgz" -C "$OUT" runner && rm -rf "$LOGS"; }
trap finish EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
t0=$SECONDS

left() { echo $(( ${BUDGET:-285} - SECONDS )); }  # seconds left of this call
limit() { local l=$(( $(left) - $2 )); echo $(( l < $1 ? l : $1 )); }  # limit <at most> <kept for later>

# 1. W1, baseline then this tree, the same device; W1's tokens kept for the comparison
bench() {  # bench <tree> <name> <limit s> <python prelude> <args...>
    local tree="$1" name="$2" limit="$3" prelude="$4"; shift 4
    (cd "$tree" && PRELUDE="$prelude" PYTHONPATH="$tree" timeout "$limit" python3 - "$LOGS/$name" "$@" \
        > "$LOGS/$name.log" 2>&1 <<'PY'
import json, os, sys
import experiments.engine_bench as eb
exec(os.environ["PRELUDE"])
tokens, run_w1 = [], eb.run_w1
def recording(*args, **kwargs):
    result = run_w1(*args, **kwargs)
    tokens.append(result["tokens"])
    return result
eb.run_w1 = recording
try:
    eb.main(["--device", "gpu", "--json", sys.argv[1] + ".json"] + sys.argv[2:])
finally:
    json.dump(tokens, open(sys.argv[1] + "_tokens.json", "w"))
PY
    )
    echo "$name rc=$? ($((SECONDS - t0)) s)"; grep -E "^continuous|wrote|Error" "$LOGS/$name.log" | cut -c1-600
}
bench "$BASE" baseline_engine_bench 80 "" --graph on
[ -n "$PRE" ] && bench "$PRE" pre_engine_bench 80 "" --graph on
bench "$HERE" engine_bench 95 "" --graph on

# 2. greedy W1 tokens against the baseline's (float16, CUDA graphs)
python3 - "$LOGS" <<'PY' | tee "$LOGS/w1_identity.log"
import json, os, sys
for name in ("pre_engine_bench", "engine_bench"):
    try:
        base = json.load(open(sys.argv[1] + "/baseline_engine_bench_tokens.json"))[0]
        mine = json.load(open(f"{sys.argv[1]}/{name}_tokens.json"))[0]
        same = sum(a == b for a, b in zip(base, mine))
        print(f"{name}: W1 greedy (float16, graphs): {same}/{len(base)} requests identical to the baseline a238c8f")
    except Exception as exc:
        print(f"{name}: no comparison: {type(exc).__name__}: {exc}")
PY

# 3. GPU tests of this tree
PYTHONPATH="$HERE" timeout "$(limit 100 30)" python3 -m pytest -q -s -p no:cacheprovider \
    tests/test_engine_runner_gpu.py tests/test_engine_gpu.py tests/test_model_gpu.py tests/test_sampler.py \
    -k "not compiles_without_spills" > "$LOGS/pytest_gpu.log" 2>&1
echo "pytest rc=$? ($((SECONDS - t0)) s)"; grep -E "passed|failed|^FAILED|^ERROR" "$LOGS/pytest_gpu.log" | tail -n 20
if [ -n "$PRE" ] && [ "$(limit 60 60)" -gt 30 ]; then
    (cd "$PRE" && PYTHONPATH="$PRE" timeout "$(limit 60 60)" python3 -m pytest -q -s -p no:cacheprovider \
        tests/test_engine_runner_gpu.py tests/test_engine_gpu.py > "$LOGS/pytest_gpu_pre.log" 2>&1)
    echo "pytest (before the merge) rc=$? ($((SECONDS - t0)) s)"
    grep -E "passed|failed|^FAILED|^ERROR" "$LOGS/pytest_gpu_pre.log" | tail -n 10
fi

# 4. float16: how many requests of each engine variant agree with the synchronous eager reference
if [ "$(limit 30 5)" -gt 10 ]; then
PYTHONPATH="$HERE:$HERE/tests" timeout "$(limit 30 5)" python3 - "$LOGS" \
    > "$LOGS/fp16_agreement.log" 2>&1 <<'PY'
import json, sys
from test_engine_gpu import REFERENCE, VARIANTS, _gpu_engine, _run_twice, _shared_prompts
from pagedkv.engine import SamplingParams
params = SamplingParams(n=1, temperature=0, max_tokens=24, ignore_eos=True)
prompts = _shared_prompts(seed=1)
want = _run_twice(_gpu_engine("float16", **REFERENCE), prompts, params)
rows = {}
for name, v in VARIANTS.items():
    got = _run_twice(_gpu_engine("float16", **v), prompts, params)
    rows[name] = sum(a == b for a, b in zip(got, want))
    print(f"float16 {name}: {rows[name]}/{len(want)} requests agree with the synchronous eager reference", flush=True)
json.dump({"num_requests": len(want), "agree": rows}, open(sys.argv[1] + "/fp16_agreement.json", "w"))
PY
echo "fp16 agreement ($((SECONDS - t0)) s)"; tail -n 9 "$LOGS/fp16_agreement.log"
fi

# 5. a mixed step's attention (128 decode rows + one 512-token chunk, llama-1b shapes, float16): every row
#    through the prefill op (what the runner does), or the decode rows through the decode kernel and the chunk
#    through the prefill op (two launches)
PYTHONPATH="$HERE" timeout "$(limit 30 5)" python3 - > "$LOGS/mixed_attention.log" 2>&1 <<'PY'
import cupy as cp, numpy as np
from pagedkv.kernels import ops
rng = np.random.default_rng(0)
heads, kv_heads, dim, bs, num_blocks = 32, 8, 64, 16, 8192
k = cp.asarray(rng.standard_normal((num_blocks, kv_heads, bs, dim)).astype(np.float16))
v = cp.asarray(rng.standard_normal((num_blocks, kv_heads, bs, dim)).astype(np.float16))
ctx = rng.integers(64, 1024, 128).tolist() + [512]
new = [1] * 128 + [512]
tables = np.zeros((129, 64), np.int32)
perm = rng.permutation(num_blocks)
at = 0
for i, c in enumerate(ctx):
    n = -(-c // bs); tables[i, :n] = perm[at:at + n]; at += n
q = cp.asarray(rng.standard_normal((sum(new), heads, dim)).astype(np.float16))
qsl = cp.asarray(np.r_[0, np.cumsum(new)].astype(np.int32))
lens = cp.asarray(np.array(ctx, np.int32))
dt = cp.asarray(tables)
def op_all():
    return ops.prefill_attention(q, k, v, dt, qsl, lens, check=False)
def split():
    ops.paged_attention(q[:128], k, v, dt[:128], lens[:128], check=False)
    return ops.prefill_attention(q[128:], k, v, dt[128:], cp.asarray(np.array([0, 512], np.int32)), lens[128:],
                                 check=False)
for name, fn in (("prefill op, all 129 sequences", op_all), ("decode kernel + prefill op", split)):
    fn(); cp.cuda.Device().synchronize()
    s, e = cp.cuda.Event(), cp.cuda.Event()
    ts = []
    for _ in range(20):
        s.record(); fn(); e.record(); e.synchronize(); ts.append(cp.cuda.get_elapsed_time(s, e))
    print(f"{name}: {np.median(ts) * 1e3:.1f} us per layer (median of 20)")
PY
echo "mixed attention ($((SECONDS - t0)) s)"; cat "$LOGS/mixed_attention.log" | tail -n 4

# 6. if time is left: this tree's W1 with synchronous scheduling (what the overlap buys)
if [ "$(left)" -gt 45 ]; then
    bench "$HERE" engine_bench_sync "$(limit 90 8)" \
        "import functools; eb.EngineConfig = functools.partial(eb.EngineConfig, async_scheduling=False)" --graph on
fi
echo "done ($((SECONDS - t0)) s)"
