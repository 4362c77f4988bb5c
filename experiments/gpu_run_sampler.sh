#!/usr/bin/env bash
# The sampler's device run (from the repository root):   bash experiments/gpu_run_sampler.sh
#
#   tests   pytest tests/test_sampler.py on the GPU (kernel = NumPy path for float32 / float16 / bfloat16 and
#           V in {256, 32000, 128256, 151936}, the fallback pass, strided rows, batch independence, CUDA-graph
#           capture and replay, logprobs); the per-case agreement counts are summed at the end of tests.log
#   bench   sample() against cupy.argmax (the greedy floor): B in {1, 32, 128, 256} x V = 128256 float16,
#           CUDA events, L2 flushed before each call, median of 50 calls; a rich table and sampler_bench.json
# Logs and JSON go to $OUT. Exit status: 1 if a stage failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/pagedkv_sampler}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
status=0

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/probe.log"
$PY -c 'import cupy, numpy; print("cupy", cupy.__version__, "numpy", numpy.__version__)' 2>&1 | tee -a "$OUT/probe.log"

timeout "${T_TESTS:-110}" $PY -m pytest tests/test_sampler.py -q -s -p no:cacheprovider -rs --durations=6 2>&1 \
    | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
awk '/^agreement/ { split($NF, a, "/"); ok += a[1]; n += a[2] }
     END { if (n) printf "agreement total: %d / %d = %.4f%%\n", ok, n, 100 * ok / n }' "$OUT/tests.log" \
    | tee -a "$OUT/tests.log"

timeout "${T_BENCH:-60}" $PY - "$OUT/sampler_bench.json" <<'EOF' 2>&1 | tee "$OUT/bench.log"
import json, sys
import cupy, numpy as np
from rich.console import Console
from rich.table import Table
from pagedkv.engine.sampler import SamplingTensors, sample
from pagedkv.sampling_params import SamplingParams

SEED, VOCAB, BATCHES, REPS, WARMUP = 0, 128256, (1, 32, 128, 256), 50, 5
CONFIGS = {  # name: (params, logits): "llm" = 2.5 N(0, 1) + 10 tokens a row raised by U(5, 15); "flat" = N(0, 1)
    "greedy (T=0)": (SamplingParams(temperature=0.0), "llm"),
    "T=1": (SamplingParams(temperature=1.0), "llm"),
    "T=0.8 top_p=0.95": (SamplingParams(temperature=0.8, top_p=0.95), "llm"),
    "T=0.7 top_k=50": (SamplingParams(temperature=0.7, top_k=50), "llm"),
    "T=1 min_p=0.05": (SamplingParams(temperature=1.0, min_p=0.05), "llm"),
    "T=0.6 top_k=50 top_p=0.9": (SamplingParams(temperature=0.6, top_k=50, top_p=0.9), "llm"),
    "flat T=1 top_p=0.95": (SamplingParams(temperature=1.0, top_p=0.95), "flat"),
}


def logits(rng, batch, kind):
    x = rng.normal(size=(batch, VOCAB)).astype(np.float32)
    if kind == "llm":
        x *= 2.5
        for row in x:
            row[rng.integers(VOCAB, size=10)] += rng.uniform(5, 15, size=10)
    return cupy.asarray(x.astype(np.float16))


def median_us(fn, flush):
    times = []
    for i in range(WARMUP + REPS):
        flush.fill(i)  # NOTE: 256 MiB written between calls: the logits come from memory, not L2
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= WARMUP:
            times.append(cupy.cuda.get_elapsed_time(start, end) * 1e3)
    return float(np.median(times))


rng = np.random.default_rng(SEED)
flush = cupy.empty(64 * 2**20, dtype=cupy.float32)
results = []
for batch in BATCHES:
    x = {kind: logits(rng, batch, kind) for kind in ("llm", "flat")}
    out = cupy.empty(batch, dtype=cupy.int32)
    floor = median_us(lambda: cupy.argmax(x["llm"], axis=1), flush)
    results.append({"batch": batch, "config": "cupy.argmax", "us": floor, "x_argmax": 1.0})
    for name, (params, kind) in CONFIGS.items():
        t = SamplingTensors.from_rows([(params, 1234 + i, 7) for i in range(batch)], cupy)
        us = median_us(lambda: sample(x[kind], t, out=out), flush)
        results.append({"batch": batch, "config": name, "us": us, "x_argmax": us / floor})

dev = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
table = Table(title=f"sample() vs cupy.argmax, V={VOCAB} float16, {dev} (median of {REPS}, L2 flushed)")
table.add_column("config")
for batch in BATCHES:
    table.add_column(f"B={batch} us", justify="right")
    table.add_column("x argmax", justify="right")
for name in ["cupy.argmax", *CONFIGS]:
    cells = [r for r in results if r["config"] == name]
    table.add_row(name, *[v for r in cells for v in (f"{r['us']:.1f}", f"{r['x_argmax']:.2f}")])
Console(width=200).print(table)
json.dump({"device": dev, "vocab": VOCAB, "dtype": "float16", "reps": REPS, "results": results},
          open(sys.argv[1], "w"), indent=1)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit "$status"
