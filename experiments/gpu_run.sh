#!/usr/bin/env bash
# Every GPU run of the project, in named stages, for one device call (from the repository root):
#
#   bash experiments/gpu_run.sh STAGE...        e.g.  bash experiments/gpu_run.sh probe gputests kbench
#
# Stages (each under its own time limit, seconds, override with T_<STAGE>=...):
#   probe       GPU, driver, CuPy / torch / transformers versions, tools on the PATH
#   gputests    every GPU test of tests/ (pytest -m gpu; pytest-xdist from the carried wheels, 6 workers)
#   ktests      pytest -m gpu tests/test_kernels.py (the decode grid; 4 workers share the GPU)
#   dtests      issue 16's per-step decode choice: pytest -m gpu of version 4, the dispatch rule, the engine's
#               decode variants (cascade, tensor cores); DTESTS_MORE: more test files (8 workers)
#   sanitize    compute-sanitizer memcheck and racecheck on the reduced grids (PAGEDKV_SANITIZER_GRID=1): set
#               "decode" (decode kernels 1-4 incl. fp8, the sampler, the fused norms), set "attention" (prefill
#               versions 2/4/5 incl. fp8, fp8 cache writes and copies, the cascade kernels); SANITIZE_SETS=...,
#               SANITIZE_TOOLS=... (default "memcheck racecheck"), SANITIZE_SHARDS=N (N sanitizer processes
#               side by side, the selected tests dealt round-robin; racecheck is slow, one process can't finish)
#   kbench      python -m experiments.kernel_bench (JSON into benchmarks/results/; KBENCH_ARGS: its flags, e.g.
#               "--v4 --cases 0 2 4 7 10 13 15" for the tensor-core version 4 beside kernels 2 and 3)
#   pbench      python -m experiments.prefill_bench: prefill kernels vs SDPA, engine TTFT vs transformers
#               (PBENCH_ARGS: its flags, e.g. "--cases 2k --ttft-lens"; PBENCH_TAG: a suffix of the JSON name)
#   ebench      python -m experiments.engine_bench --static (workload W1, llama-1b float16, CUDA graphs)
#   ttft        python -m experiments.ttft_breakdown: engine TTFT split into GEMMs / attention / rest / host beside
#               transformers' forward and SDPA alone (2k, 8k, 32k; llama-1b float16)
#   w1tc        W1 with the engine's per-step tensor-core decode choice off, then on, twice (alternating, same
#               process order each round: issue 16's "no regression in W1"; EngineConfig(tensor_core_decode))
#   base        W1 and the prefill kernels (BASE_PREFILL=0: W1 only) of the tree in ../baseline (BASE=..., an
#               absolute path; its own flag names in BASE_EBENCH_FLAGS), then of this tree, in the same call
#   agreement   python -m experiments.fp16_agreement: engine variants vs the eager reference in float16
#   sbench      python -m experiments.sampler_bench: the device sampler vs cupy.argmax
#   sampling    issue 19's measurements: engine_bench --penalties (sampled W1 with presence/frequency/repetition
#               penalties against greedy W1, same engine build), structured_bench --libs (decode tokens/s with a
#               JSON schema against without; llguidance vs xgrammar per-token masks)
#   memory      python -m experiments.memory_share at full size
#   fp8         issue 18: experiments.fp8_accuracy (llama-1b preset + an HF-saved checkpoint with its scale
#               tensors; the trained checkpoint FP8_PROBE when carried), engine_bench --fp8-preemption (W1 where
#               float16 preempts, fp8 not), prefill_bench --kv-cache-dtype fp8 (the fp8 GPU tests run in gputests)
#   throughput  python -m experiments.throughput, W1 and longtail, llama-1b float16, same 512 MiB KV pool
#   unpadded    the W1 throughput run again with --static-padding off (static reserves per request)
#   profile     python -m experiments.profile_engine: cProfile of continuous W1, prefill forwards timed
#   prefix      python -m experiments.prefix_workloads: prefix caching on/off, chunked prefill on/off
#   cascade     prefix_workloads --workload cascade (shared document, n = 16 branches; cascade on/off) and
#               python -m experiments.cascade_bench (the prefix / suffix / merge kernels vs plain decode)
#   serve       experiments/gpu_run_serve.sh: the OpenAI-compatible server (llama-1b, a tokenizer trained on
#               the spot), tests/test_serve.py through the openai client against it, serve_bench at 3 rates
#   ncu         Nsight Compute on the decode kernels for cases 32 x 8192 and 1 x 32768
#   plots       the PNGs of docs/ from the JSON of this run
# Logs go to $OUT/<stage>.log; at the end every log, JSON and PNG of the run is packed into $OUT/results.tgz
# (the device tool brings back at most 8 files). Exit status: 1 if any stage failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/pagedkv_gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT/logs" benchmarks/results docs
status=0
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
# Wheels carried in .whl/ (WHEELS=...; pytest-xdist, the server's and the grammar library's): into /tmp/site, once
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ] && ! "$PY" -c "import xdist, fastapi, prometheus_client" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
BASE=${BASE:-../baseline}
FP8_PROBE=${FP8_PROBE:-models/pystdlib-llama}  # a trained HF folder for the fp8 accuracy stage (if present)

run() {  # run STAGE LIMIT CMD...: one command, its output tee'd to $OUT/logs/STAGE.log
    local stage=$1 limit=$2
    shift 2
    echo "=== $stage: $* (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$OUT/logs/$stage.log"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/logs/$stage.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $stage: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/logs/$stage.log" "$OUT/logs/summary.log"
    [ "$rc" -eq 0 ] || status=1
}

sanitize_set() {  # sanitize_set TOOL SET KEXPR FILES...: compute-sanitizer over the selected GPU tests, in
    # SANITIZE_SHARDS processes side by side (the selected test ids dealt round-robin), each its own log
    local tool=$1 set=$2 kexpr=$3
    shift 3
    local shards=${SANITIZE_SHARDS:-1} ids=() shard i j
    mapfile -t ids < <(PAGEDKV_SANITIZER_GRID=1 "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider "$@" \
        -k "$kexpr" | grep '::')
    echo "=== ${tool}_$set: ${#ids[@]} tests in $shards shard(s)" | tee -a "$OUT/logs/summary.log"
    for ((i = 0; i < shards; i++)); do
        shard=()  # test ids may hold spaces: an array, never word splitting
        for ((j = i; j < ${#ids[@]}; j += shards)); do shard+=("${ids[j]}"); done
        PAGEDKV_SANITIZER_GRID=1 run "${tool}_${set}_$i" "${T_SANITIZE:-150}" compute-sanitizer --tool "$tool" \
            --error-exitcode 9 "$PY" -m pytest -m gpu -q -p no:cacheprovider -p no:xdist "${shard[@]}" &
    done
    wait
    # a shard's exit status is lost in its subshell: read it back from the summary
    grep -E "^=== ${tool}_${set}_[0-9]+: exit [^0]" "$OUT/logs/summary.log" && status=1
}

plot() {  # plot FLAG JSON PNG
    [ -f "$2" ] && run plots 60 "$PY" -m experiments.plots "$1" "$2" --out "$3"
}

for stage in "$@"; do
    case $stage in
    probe)
        run probe 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv;
            $PY -c 'import cupy, numpy, torch, transformers; print(\"cupy\", cupy.__version__, \"numpy\", numpy.__version__, \"torch\", torch.__version__, \"transformers\", transformers.__version__)';
            which compute-sanitizer ncu nvcc; nproc" ;;
    ktests)
        run ktests "${T_KTESTS:-300}" "$PY" -m pytest -m gpu tests/test_kernels.py tests/test_decode_fp8.py -q \
            -p no:cacheprovider -n 4 --durations=10 -rs ${KTEST_K:+-k "$KTEST_K"} ;;
    dtests)
        run dtests "${T_DTESTS:-180}" "$PY" -m pytest -m gpu tests/test_decode_tc.py tests/test_decode_dispatch.py \
            tests/test_engine_cascade.py ${DTESTS_MORE:-} -q -p no:cacheprovider -n 8 --tb=short -rfE ;;
    sanitize)  # SANITIZE_SETS: which of "decode attention" (default both); SANITIZE_SHARDS=N: N sanitizer processes
        sets=" ${SANITIZE_SETS:-decode attention} "
        for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
            [[ $sets == *" decode "* ]] && sanitize_set "$tool" decode \
                '(grid or hypothesis or exact or errors or sampler or sample or rms_norm or fused_add) and not compiles and not torch' \
                tests/test_kernels.py tests/test_sampler.py tests/test_model_gpu.py tests/test_decode_fp8.py tests/test_decode_tc.py
            # the prefill kernels (versions 2, 4, 5; fp8 too), fp8 cache writes and copies, the cascade kernels
            [[ $sets == *" attention "* ]] && sanitize_set "$tool" attention \
                '(every_head_dim or block_sizes or sm90_varlen or padding or fp8 or gpu_cascade or gpu_kernel_parts) and not compiles and not engine and not 16k and not torch and not long_prompt' \
                tests/test_prefill_attention.py tests/test_fp8_gpu.py tests/test_cascade.py
        done ;;
    kbench)
        # shellcheck disable=SC2086
        run kbench "${T_KBENCH:-240}" "$PY" -m experiments.kernel_bench ${KBENCH_ARGS:-} ;;
    ncu)
        for case in "32 8192 32 8" "1 32768 32 8"; do  # batch, length, query heads, KV heads (head_dim 128)
            run "ncu_${case// /_}" "${T_NCU:-90}" ncu --clock-control none --kernel-name regex:paged_attention_v \
                --launch-skip 8 --launch-count 2 --section SpeedOfLight --section Occupancy \
                --section WarpStateStats --section MemoryWorkloadAnalysis "$PY" -c "
import cupy, numpy as np
from experiments.kernel_bench import Case, build_case
from pagedkv.kernels import decode
q, k, v, bt, cl = build_case(cupy, np.random.default_rng(0), Case(*map(int, '$case'.split())))
for _ in range(6): decode.paged_attention(q, k, v, bt, cl, check=False)
cupy.cuda.runtime.deviceSynchronize()"
        done ;;
    base)
        for tree in "$BASE" "$PWD"; do
            name=$([ "$tree" = "$PWD" ] && echo here || echo base)
            flags=$([ "$tree" = "$PWD" ] && echo "${HERE_EBENCH_FLAGS:-}" || echo "${BASE_EBENCH_FLAGS:---graph on}")
            # shellcheck disable=SC2086
            (cd "$tree" && PYTHONPATH="$tree${PYTHONPATH#.}" run "w1_$name" "${T_BASE:-120}" "$PY" -m experiments.engine_bench \
                --device gpu $flags --output-json "$OUT/logs/engine_bench_$name.json")
            [ "${BASE_PREFILL:-1}" = 1 ] && (cd "$tree" && PYTHONPATH="$tree${PYTHONPATH#.}" run "prefill_$name" \
                "${T_BASE:-120}" "$PY" -m experiments.prefill_bench --head-dims 64 128 --ttft-lens --no-variants \
                --output-json "$OUT/logs/prefill_bench_$name.json")
        done ;;
    agreement)
        run agreement "${T_AGREEMENT:-90}" "$PY" -m experiments.fp16_agreement \
            --output-json benchmarks/results/engine_fp16_agreement_gpu.json ;;
    sbench)
        run sbench "${T_SBENCH:-60}" "$PY" -m experiments.sampler_bench \
            --output-json "benchmarks/results/sampler_bench_${GPU_NAME}_$(date -u +%F).json" ;;
    sampling)
        run penalties "${T_PENALTIES:-150}" "$PY" -m experiments.engine_bench --device gpu --penalties \
            --output-json "benchmarks/results/engine_bench_penalties_${GPU_NAME}_$(date -u +%F).json"
        run structured "${T_STRUCTURED:-120}" "$PY" -m experiments.structured_bench --device gpu --libs \
            --output-json "benchmarks/results/structured_bench_${GPU_NAME}_$(date -u +%F).json" ;;
    ttft)
        run ttft "${T_TTFT:-150}" "$PY" -m experiments.ttft_breakdown --device gpu \
            --output-json "benchmarks/results/ttft_breakdown_${GPU_NAME}_$(date -u +%F).json" ;;
    w1tc)
        for round in 1 2; do
            for tc in off on; do
                run "w1tc_${tc}_$round" "${T_W1TC:-90}" "$PY" -m experiments.engine_bench --device gpu --no-profile \
                    $( [ "$tc" = on ] && echo --tensor-core-decode ) \
                    --output-json "benchmarks/results/engine_bench_w1tc_${tc}_${round}_${GPU_NAME}_$(date -u +%F).json"
            done
        done ;;
    ebench)
        run ebench "${T_EBENCH:-240}" "$PY" -m experiments.engine_bench --device gpu --static \
            --output-json benchmarks/results/engine_bench_gpu.json ;;
    memory)
        # llama-1b's K/V shape (16 layers x 8 KV heads x 64, fp16) really allocated for every request
        run memory "${T_MEMORY:-150}" "$PY" -m experiments.memory_share --device gpu --dtype float16 \
            --block-size 16 --num-requests 256 --prompt-len 4010 --suffix-len 32 --gen-len 128 --num-branches 64 \
            --output-json benchmarks/results/memory_share_gpu.json ;;
    throughput)
        for workload in w1 longtail; do
            run "throughput_$workload" "${T_THROUGHPUT:-150}" "$PY" -m experiments.throughput --device gpu \
                --model llama-1b --dtype float16 --workload "$workload" --num-prompts 128 --scale 1 \
                --kv-cache-memory-bytes 512MiB --max-num-seqs 256 --block-size 16 \
                --output-json "benchmarks/results/throughput_${workload}_gpu.json"
        done ;;
    unpadded)
        run throughput_w1_unpadded "${T_THROUGHPUT:-150}" "$PY" -m experiments.throughput --device gpu \
            --model llama-1b --dtype float16 --workload w1 --num-prompts 128 --scale 1 \
            --kv-cache-memory-bytes 512MiB --max-num-seqs 256 --block-size 16 --static-padding off \
            --output-json benchmarks/results/throughput_w1_unpadded_gpu.json ;;
    profile)
        run profile "${T_PROFILE:-120}" "$PY" -m experiments.profile_engine --device gpu --workload w1 \
            --mode continuous --kv-cache-memory-bytes 512MiB --top 45 ;;
    plots)
        plot --memory-json benchmarks/results/memory_share_gpu.json docs/memory_share.png
        plot --throughput-json benchmarks/results/throughput_w1_gpu.json docs/throughput_w1.png
        plot --throughput-json benchmarks/results/throughput_longtail_gpu.json docs/throughput_longtail.png
        kernel_json=$(ls -t benchmarks/results/kernel_bench_*.json 2>/dev/null | head -1)
        [ -n "$kernel_json" ] && plot --kernel-json "$kernel_json" docs/kernel_bandwidth.png ;;
    gputests)
        run gputests "${T_GPUTESTS:-330}" "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider -n "${GPUTEST_WORKERS:-6}" \
            --dist "${GPUTEST_DIST:-loadfile}" --durations=15 -rfEs ${GPUTEST_ARGS:-} ;;
    serve)
        run serve "${T_SERVE:-420}" env OUT="$OUT/serve" bash experiments/gpu_run_serve.sh ;;
    prefix)
        run prefix "${T_PREFIX:-330}" "$PY" -m experiments.prefix_workloads --device gpu --kv-cache-memory-bytes 40GiB \
            --output-json benchmarks/results/prefix_workloads_gpu.json ;;
    fp8)  # FP8_PARTS: which of "accuracy ebench pbench" (default all)
        parts=" ${FP8_PARTS:-accuracy ebench pbench} "
        [[ $parts == *" accuracy "* ]] && run fp8_accuracy "${T_FP8:-150}" "$PY" -m experiments.fp8_accuracy --device gpu --model llama-1b \
            --kv-cache-dtypes fp8_e4m3 fp8_e5m2 --num-gpu-blocks-override 4096 --write-checkpoint /tmp/fp8_ckpt \
            --checkpoint /tmp/fp8_ckpt --output-json benchmarks/results/fp8_accuracy_gpu.json
        # the trained probe (README section 11: the random preset's distributions are one-hot), when carried:
        # python -m experiments.train_checkpoint --out models/pystdlib-llama, then carry ["models", ".whl"]
        [[ $parts == *" accuracy "* && -f $FP8_PROBE/config.json ]] && run fp8_accuracy_trained "${T_FP8:-150}" \
            "$PY" -m experiments.fp8_accuracy --device gpu --checkpoint "$FP8_PROBE" --skip-preset \
            --kv-cache-dtypes fp8_e4m3 fp8_e5m2 --output-json "benchmarks/results/fp8_accuracy_gpu_trained_$(date -u +%F).json"
        [[ $parts == *" ebench "* ]] && run fp8_ebench "${T_FP8:-150}" "$PY" -m experiments.engine_bench --device gpu --fp8-preemption --no-profile \
            --output-json benchmarks/results/engine_bench_fp8_preemption_gpu.json
        [[ $parts == *" pbench "* ]] && run fp8_pbench "${T_FP8:-150}" "$PY" -m experiments.prefill_bench --kv-cache-dtype fp8 --cases 8k varlen \
            --head-dims 128 64 --no-variants --ttft-lens --runs 10 \
            --output-json "benchmarks/results/prefill_bench_fp8_${GPU_NAME}_$(date -u +%F).json" ;;
    cascade)
        run cascade_workloads "${T_CASCADE:-200}" "$PY" -m experiments.prefix_workloads --device gpu --workload cascade \
            --num-prompts "${CASCADE_PROMPTS:-128}" --output-json "benchmarks/results/prefix_workloads_cascade_gpu.json"
        [ "${CASCADE_BENCH:-1}" = 1 ] && run cascade_bench "${T_CASCADE_BENCH:-120}" "$PY" -m experiments.cascade_bench \
            --output-json "benchmarks/results/cascade_bench_${GPU_NAME}_$(date -u +%F).json" ;;
    pbench)
        # shellcheck disable=SC2086
        run pbench "${T_PBENCH:-240}" "$PY" -m experiments.prefill_bench ${PBENCH_ARGS:-} \
            --output-json "benchmarks/results/prefill_bench_${GPU_NAME}_$(date -u +%F)${PBENCH_TAG:-}.json" ;;
    *)
        echo "unknown stage $stage" | tee -a "$OUT/logs/summary.log"; status=1 ;;
    esac
done

# NOTE: one archive, so that every log, JSON and PNG comes back (the device tool returns at most 8 files)
tar czf "$OUT/results.tgz" -C "$OUT" logs $( [ -d "$OUT/serve" ] && echo serve ) -C "$PWD" benchmarks/results docs && cp "$OUT/logs/summary.log" "$OUT/" \
    && rm -rf "$OUT/logs"
cat "$OUT/summary.log" 2>/dev/null || cat "$OUT/logs/summary.log"
exit "$status"
