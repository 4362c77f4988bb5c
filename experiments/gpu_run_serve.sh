#!/usr/bin/env bash
# The OpenAI-compatible server on the GPU: the llama-1b preset (random weights, float16) with a byte-level BPE
# tokenizer of 128,256 ids trained on the spot, the openai-client tests against it (tests/test_serve.py with
# PAGEDKV_SERVER_URL), then serve_bench at 3 arrival rates, 256 concurrent streams, and the same 3 rates through
# the engine loop in-process (no HTTP: the TTFT/ITL baseline). Logs and JSON under $OUT.
#
#   device:  cd .dev/text && bash experiments/gpu_run_serve.sh
#
# The device cannot reach PyPI: fastapi, uvicorn, openai, httpx (+ their dependencies) are installed from the
# wheels in ${WHEELS:-.whl} (python 3.12, manylinux x86_64) into a venv that sees the system packages (cupy).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/pagedkv_serve_out}
PORT=${PORT:-8011}
RATES=${RATES:-"4 16 inf"}
NUM_PROMPTS=${NUM_PROMPTS:-100}
MODEL=${MODEL:-llama-1b}      # a preset (a tokenizer is trained for it) or a checkpoint folder with its own
DEVICE=${DEVICE:-gpu}
DTYPE=${DTYPE:-float16}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-2048}
mkdir -p "$OUT"
WORK=$(mktemp -d)
PY=python3

SERVE_PACKAGES="fastapi uvicorn openai httpx jinja2 prometheus_client"
if ! $PY -c "import fastapi, uvicorn, openai, httpx, jinja2, prometheus_client" 2>/dev/null; then
    # NOTE: a target folder on PYTHONPATH, not a venv: the device's python3 is itself a venv (torch, cupy), and a
    # venv made from it would not see those packages
    # shellcheck disable=SC2086
    $PY -m pip install --quiet --no-index --find-links "${WHEELS:-.whl}" --target "$WORK/site" $SERVE_PACKAGES
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$WORK/site"
    $PY -c "import fastapi, uvicorn, openai, httpx, jinja2, prometheus_client" \
        || { echo "could not install the [serve] wheels from ${WHEELS:-.whl}" | tee "$OUT/env.txt"; exit 1; }
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
    $PY -c "import sys, cupy, fastapi, uvicorn, openai, tokenizers; print('python', sys.version.split()[0], \
'cupy', cupy.__version__, 'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'openai', \
openai.__version__, 'tokenizers', tokenizers.__version__)"
    if [ ! -d "$MODEL" ]; then
        $PY -c "from pagedkv.model import get_config; from pagedkv.text.train import train_tokenizer; \
print('tokenizer ids', train_tokenizer('$WORK/tok', get_config('$MODEL').vocab_size).vocab_size)"
    fi
} 2>&1 | tee "$OUT/env.txt"
TOKENIZER=()
[ -d "$MODEL" ] || TOKENIZER=(--tokenizer "$WORK/tok")

$PY -m pagedkv.serve --model "$MODEL" "${TOKENIZER[@]}" --served-model-name "$(basename "$MODEL")-served" \
    --dtype "$DTYPE" --device "$DEVICE" --max-model-len "$MAX_MODEL_LEN" --port "$PORT" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT

URL="http://127.0.0.1:$PORT"
$PY - "$URL" <<'EOF' || { echo "server did not come up"; tail -50 "$OUT/server.log"; exit 1; }
import sys, time, urllib.request
deadline = time.monotonic() + 400
while time.monotonic() < deadline:
    try:
        if urllib.request.urlopen(sys.argv[1] + "/health", timeout=5).status == 200:
            print(f"server up after {400 - deadline + time.monotonic():.0f} s"); sys.exit(0)
    except OSError:
        time.sleep(2)
sys.exit(1)
EOF

# the warm-up: the first requests compile kernels and capture CUDA graphs
$PY -m experiments.serve_bench --base-url "$URL" --request-rate inf --num-prompts 8 --random-input-len 64 \
    --random-output-len 16 > /dev/null 2>&1

PAGEDKV_SERVER_URL="$URL" $PY -m pytest -q -p no:cacheprovider tests/test_serve.py 2>&1 | tee "$OUT/test_serve.txt"
tests_rc=${PIPESTATUS[0]}

# shellcheck disable=SC2086
$PY -m experiments.serve_bench --base-url "$URL" --request-rate $RATES --num-prompts "$NUM_PROMPTS" \
    --random-input-len 256 --random-output-len 128 --output-json "$OUT/serve_bench.json" 2>&1 \
    | tee "$OUT/serve_bench.txt"
bench_rc=${PIPESTATUS[0]}

# no request lost at 256 concurrent streams (issue 20's target)
$PY -m experiments.serve_bench --base-url "$URL" --request-rate inf --num-prompts "${STREAMS:-256}" \
    --random-input-len 256 --random-output-len 128 --output-json "$OUT/serve_bench_256.json" 2>&1 \
    | tee "$OUT/serve_bench_256.txt"
streams_rc=${PIPESTATUS[0]}

$PY -c "import urllib.request; print(urllib.request.urlopen('$URL/metrics').read().decode())" > "$OUT/metrics_after.txt"
kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null

# the same rates through the engine loop in this process, no HTTP: the baseline of "TTFT and ITL within 1.2x"
inproc_rc=0
if [ "${INPROC:-1}" = 1 ]; then
    # shellcheck disable=SC2086
    timeout "${T_INPROC:-240}" $PY -m experiments.serve_bench --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
        --max-model-len "$MAX_MODEL_LEN" --request-rate $RATES --num-prompts "$NUM_PROMPTS" --random-input-len 256 \
        --random-output-len 128 --output-json "$OUT/serve_bench_inproc.json" 2>&1 | tee "$OUT/serve_bench_inproc.txt"
    inproc_rc=${PIPESTATUS[0]}
fi
echo "tests rc=$tests_rc bench rc=$bench_rc streams rc=$streams_rc in-process rc=$inproc_rc" | tee -a "$OUT/env.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$streams_rc" -eq 0 ] && [ "$inproc_rc" -eq 0 ]
