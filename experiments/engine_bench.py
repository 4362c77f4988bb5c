"""engine_bench: workload W1 through LLMEngine — useful output tokens/s and the decode step at full batch.

W1: 128 requests, seed 0, random prompt token ids, prompt lengths U[64, 512], output lengths U[64, 512],
ignore_eos, greedy; model llama-1b, random weights, float16. Sampled W1 (the ``+sampled`` run, on a GPU): the
same with temperature 0.8, top_p 0.95 and a seed per request (sampling on the device, in the CUDA graph), on a
fresh engine (nothing cached from the greedy run); ``--penalties`` adds presence 0.5, frequency 0.5 and
repetition 1.1 penalties to it (applied on the device, per-row token counts kept there). Useful tokens/s = sum of requested output lengths / wall time
of ``generate`` (after a warm-up that compiles every kernel).

The decode step at full batch: 128 sequences with W1's prompts, timed over many steps:

    step wall        one engine step as generate() runs it (asynchronous scheduling on a GPU: step N+1 is
                     scheduled and launched, then step N's tokens are read back and processed)
    step breakdown   per step: GPU time of the retired step (CUDA events), host work (schedule, metadata,
                     launch, output processing), host waiting for the GPU; exposed = wall - GPU (the GPU
                     idle, waiting for the host), overlapped = host work - exposed (ran while the GPU was busy)
    forward GPU      CUDA events around model.decode (what the GPU spends)
    GEMMs / attention  the step's matrix products / paged attention alone, CUDA events
    memory floor     (weight bytes + K/V bytes read) / measured device bandwidth (a 1 GiB copy)

    python -m experiments.engine_bench                       # GPU: W1, llama-1b (about a minute)
    python -m experiments.engine_bench                       # CPU: W1 / 8 on the tiny model (seconds)
    python -m experiments.engine_bench --device cpu --model tiny --dtype float32 --num-prompts 8 --max-model-len 64
    python -m experiments.engine_bench --fp8-preemption --no-profile   # W1 where float16 preempts, fp8 not

``--fp8-preemption``: W1 twice in the same KV byte budget, sized so that the fp8 cache holds every request at
its full length (blocks of the whole workload + 5 %) and the model-dtype cache half as many blocks (it preempts):
the ``fp8_over_auto`` ratio is the fp8 run's useful tokens/s over the other's (issue 18's target: >= 1.3).

Over 400 lines because W1's runs, the decode-step profile (GEMMs, attention, host work) and the fp8 and
penalty variants share one workload, one engine builder and one table.
"""
from __future__ import annotations

import sys
import time
import traceback

import numpy as np

from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
from pagedkv.model import get_config


from . import cli

NUM_REQUESTS = 128
LEN_RANGE = (64, 512)
BLOCK_SIZE = 16
KV_BUDGET_BYTES = 8 << 30  # holds all 128 W1 requests at their maximum length: no preemption
PROFILE_STEPS = 30
# the CPU defaults: W1's lengths / 8 and a quarter of its requests (the NumPy path runs them in seconds)
CPU_MAX_LEN = 128
CPU_NUM_REQUESTS = 32
CPU_NUM_BLOCKS = 4096
MAX_BATCHED_TOKENS = 16384
MIN_LEN = 8  # W1 scaled to max_model_len: prompts and outputs of at least 2 tokens


def workload(num_requests: int, vocab: int, max_len: int, seed: int):
    """W1's prompts and output lengths (lengths scaled down when ``max_len`` < 512 for CPU smoke runs)."""
    rng = np.random.default_rng(seed)
    lo, hi = min(LEN_RANGE[0], max_len // 4), min(LEN_RANGE[1], max_len // 2)
    prompt_lens = rng.integers(lo, hi + 1, num_requests)
    output_lens = rng.integers(lo, hi + 1, num_requests)
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in prompt_lens]
    return prompts, [int(n) for n in output_lens]


def make_engine(args, mode: str, cuda_graph: bool, weights=None, max_num_seqs: int = 128,
                kv_cache_dtype: str | None = None, budget: int | None = None) -> LLMEngine:
    """``kv_cache_dtype`` / ``budget`` (bytes) override the flags' (the --fp8-preemption runs)."""
    options = cli.engine_options(args, gpu=args.device != "cpu")
    if budget is not None:
        options = {k: v for k, v in options.items() if k not in ("num_blocks", "gpu_memory_utilization")}
        options["kv_memory_bytes"] = budget
    if kv_cache_dtype is not None:
        options["kv_cache_dtype"] = kv_cache_dtype
    if not {"kv_memory_bytes", "num_blocks", "gpu_memory_utilization"} & options.keys():
        options.update({"kv_memory_bytes": KV_BUDGET_BYTES} if args.device != "cpu" else {"num_blocks": CPU_NUM_BLOCKS})
    options["cuda_graph"] = cuda_graph
    options["tensor_core_decode"] = getattr(args, "tensor_core_decode", False)
    config = EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, seed=args.seed, block_size=BLOCK_SIZE,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max(MAX_BATCHED_TOKENS, args.max_len),
        max_model_len=args.max_len, scheduling=mode, **options)
    return LLMEngine(config, model_config=get_config(args.model), weights=weights)


def sync(engine):
    if engine.backend.is_gpu:
        engine.backend.xp.cuda.get_current_stream().synchronize()


SAMPLED = dict(temperature=0.8, top_p=0.95)  # sampled W1: seeded per request (seed = its index)
PENALTIES = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1)  # --penalties: sampled W1


def run_w1(engine: LLMEngine, prompts, output_lens, sampled: bool = False, penalties: bool = False) -> dict:
    extra = PENALTIES if penalties else {}
    params = [SamplingParams(**SAMPLED, **extra, seed=i, max_tokens=n, ignore_eos=True) if sampled else
              SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for i, n in enumerate(output_lens)]
    room = engine.config.max_model_len
    warm = [SamplingParams(temperature=0, max_tokens=min(8, room - len(p)), ignore_eos=True, **extra)
            for p in prompts[:4]]
    if penalties:  # NOTE: first: the penalties' device state is allocated (graphs are made again) before capture
        engine.generate(prompts[:4], warm, progress=False)
    engine.warmup_graphs()
    engine.generate(prompts[:4], warm, progress=False)
    before = engine.metrics().as_dict()
    tc_steps = lambda: getattr(getattr(engine.model, "attention", None), "num_tensor_core_steps", 0)  # noqa: E731
    tc_before = tc_steps()
    sync(engine)
    start = time.perf_counter()
    outs = engine.generate(prompts, params, progress=True)
    sync(engine)
    wall = time.perf_counter() - start
    m = engine.metrics().as_dict()
    delta = {k: m[k] - before[k] for k in ("num_steps", "num_prefill_tokens", "num_decode_tokens",
                                           "prefill_time_s", "decode_time_s", "num_preemptions")}
    assert all(len(o.outputs[0].token_ids) == n for o, n in zip(outs, output_lens))
    return {"wall_s": wall, "useful_tokens": sum(output_lens), "useful_tokens_per_s": sum(output_lens) / wall,
            **delta, "graph_error": engine.graph_error, "fused_error": engine.model.fused_error,
            "gemm_error": engine.model.gemm_error,
            "tensor_core_decode_steps": tc_steps() - tc_before,
            "tokens": [o.outputs[0].token_ids for o in outs]}


def bandwidth_gbs(xp) -> float:
    """Device memory bandwidth: a 1 GiB device-to-device copy, bytes read + written, median of 10."""
    a = xp.ones(1 << 29, dtype=xp.float16)
    b = xp.empty_like(a)
    start, end = xp.cuda.Event(), xp.cuda.Event()
    times = []
    for _ in range(12):
        start.record()
        b[...] = a
        end.record()
        end.synchronize()
        times.append(xp.cuda.get_elapsed_time(start, end) / 1e3)
    return 2 * a.nbytes / float(np.median(times[2:])) / 1e9


def gpu_time(xp, fn, reps: int = 10) -> float:
    """Median seconds of ``fn`` measured with CUDA events (host launch gaps included); with NumPy (the CPU
    backend) the wall clock."""
    fn()
    times = []
    if not hasattr(xp, "cuda"):  # the CPU: every call is synchronous
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times))
    start, end = xp.cuda.Event(), xp.cuda.Event()
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(xp.cuda.get_elapsed_time(start, end) / 1e3)
    return float(np.median(times))


def graph_time(xp, fn, reps: int = 10) -> float | None:
    """Median seconds of ``fn`` replayed as one CUDA graph (the GPU's own time, no launch gaps);
    None when ``fn`` cannot be captured."""
    stream = xp.cuda.Stream(non_blocking=True)
    try:
        with stream:
            fn()
            stream.synchronize()
            stream.begin_capture()
            try:
                fn()
            finally:
                graph = stream.end_capture()
    except Exception:
        return None
    start, end = xp.cuda.Event(), xp.cuda.Event()
    times = []
    for _ in range(reps + 1):
        start.record(stream)
        graph.launch(stream)
        end.record(stream)
        end.synchronize()
        times.append(xp.cuda.get_elapsed_time(start, end) / 1e3)
    return float(np.median(times[1:]))


def _running_decode_inputs(engine: LLMEngine):
    branches = [b for r in engine.scheduler.running for b in r.active_branches()]
    seq_ids = [b.seq_id for b in branches]
    m = engine.manager
    tokens = np.array([max(b.output_token_ids[-1], 0) for b in branches], dtype=np.int32)  # -1: in flight
    return tokens, m.context_lens(seq_ids), m.block_tables(seq_ids), m.slot_mapping(seq_ids)


def _decode_batch(engine: LLMEngine, tokens, lens, tables, slots):
    from pagedkv.model import DecodeBatch

    xp = engine.backend.xp
    return DecodeBatch(token_ids=xp.asarray(tokens), positions=xp.asarray(lens - 1), slot_mapping=xp.asarray(slots),
                       block_tables=xp.asarray(tables), context_lens=xp.asarray(lens))


def step_breakdown(walls: list, timings: list) -> dict:
    """Medians per step: wall, GPU time, host work, host waiting; exposed (GPU idle) and overlapped host work."""
    out = {"step_host_s": float(np.median([t.host_s for t in timings])),
           **{k: float(np.median([getattr(t, k) for t in timings])) for k in
              ("schedule_s", "prepare_s", "launch_s", "wait_s", "process_s")}}
    timed = [(w, t) for w, t in zip(walls, timings) if t.gpu_s is not None]  # NOTE: the first retired step of
    if timed:  # an asynchronous run was launched before the timing began
        exposed = [max(w - t.gpu_s, 0.0) for w, t in timed]
        out.update(step_gpu_s=float(np.median([t.gpu_s for _, t in timed])), host_exposed_s=float(np.median(exposed)),
                   host_overlapped_s=float(np.median([max(t.host_s - e, 0.0) for (_, t), e in zip(timed, exposed)])))
    return out


def _gemms(engine: LLMEngine, batch: int, head_rows: int | None = None):
    """The forward's GEMMs at ``batch`` rows (every layer's QKV, O, gate/up, down) and the LM head at
    ``head_rows`` (default ``batch``: a decode step; a prefill's logits are its sequences' last rows)."""
    xp, w, c = engine.backend.xp, engine.model.weights, engine.model_config
    x = xp.ones((batch, c.hidden_size), dtype=engine.model.dtype)
    x_head = x if head_rows is None else x[:head_rows]
    a = xp.ones((batch, c.num_heads * c.head_dim), dtype=engine.model.dtype)
    g = xp.ones((batch, c.intermediate_size), dtype=engine.model.dtype)

    mm = engine.model.matmul

    def run():
        for lw in w.layers:
            mm(x, lw.wqkv), mm(a, lw.wo), mm(x, lw.w_gate_up), mm(g, lw.w_down)
        mm(x_head, w.lm_head)
    return run


def _attention(engine: LLMEngine, batch):
    from pagedkv.kernels import ops

    xp, c, kv = engine.backend.xp, engine.model_config, engine.kv_cache
    q = xp.ones((len(batch.context_lens), c.num_heads, c.head_dim), dtype=engine.model.dtype)

    def run():
        for layer in range(c.num_layers):
            ops.paged_attention(q, kv.k_cache(layer), kv.v_cache(layer), batch.block_tables, batch.context_lens,
                                check=False)
    return run


def profile_prefill(engine: LLMEngine, prompts) -> dict:
    """One prefill forward of ``prompts`` (CUDA events; the wall clock on the CPU), and the time of its attention:
    the model's attention backend on the same batch's metadata, every layer (cache write and attention), so the
    path the forward runs (the paged prefill kernel on a GPU, the float64 reference on the CPU)."""
    from pagedkv.model import PrefillBatch

    xp, m, c = engine.backend.xp, engine.manager, engine.model_config
    seq_ids = [m.add_sequence(len(p)) for p in prompts]
    try:
        lens = [len(p) for p in prompts]
        batch = PrefillBatch(token_ids=np.concatenate(prompts), positions=np.concatenate([np.arange(n) for n in lens]),
                             slot_mapping=np.concatenate([m.slots(s, 0, n) for s, n in zip(seq_ids, lens)]),
                             seq_lens=lens, num_cached=[0] * len(lens), block_tables=[m.block_table(s) for s in seq_ids])
        forward = gpu_time(xp, lambda: engine.model.prefill(batch, engine.kv_cache), reps=3)
        total = sum(lens)
        q = xp.ones((total, c.num_heads, c.head_dim), dtype=engine.model.dtype)
        kv = xp.ones((total, c.num_kv_heads, c.head_dim), dtype=engine.model.dtype)
        backend = engine.model.attention

        def attention():
            meta = backend.plan_prefill(batch, engine.kv_cache)  # NOTE: once per forward there too
            for layer in range(c.num_layers):
                backend(layer, q, kv, kv, meta)
        return {"prefill_tokens": total, "prefill_forward_s": forward,
                "prefill_attention_s": gpu_time(xp, attention, reps=3)}
    finally:
        for s in seq_ids:
            m.free_sequence(s)


def profile_decode(engine: LLMEngine, prompts, steps: int, bandwidth) -> dict:
    """Fill the batch with ``prompts`` (all prefilled), then time ``steps`` pure decode steps."""
    room = engine.config.max_model_len
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=min(steps + 8, room - len(p)), ignore_eos=True))
    while engine.scheduler.waiting or any(not r.started for r in engine.scheduler.running):
        engine.step()
    walls, timings = [], []
    engine.runner.record_gpu_time = True
    for _ in range(steps):
        start = time.perf_counter()
        engine._step()  # what generate() runs: step() minus building RequestOutput objects
        walls.append(time.perf_counter() - start)
        timings.append(engine.last_step_timing)
    engine.runner.record_gpu_time = False
    tokens, lens, tables, slots = _running_decode_inputs(engine)
    while engine.has_unfinished_requests():  # NOTE: nothing in flight while the forward is timed alone
        engine.step()
    batch = _decode_batch(engine, tokens, lens, tables, slots)
    xp, model = engine.backend.xp, engine.model
    out = {"batch": len(tokens), "step_wall_s": float(np.median(walls)), **step_breakdown(walls, timings),
           "async_scheduling": engine.async_scheduling, "context_tokens": int(lens.sum())}
    if engine.backend.is_gpu:
        out["forward_gpu_s"] = gpu_time(xp, lambda: model.decode(batch, engine.kv_cache))
        if engine.graphs is not None:  # replay + the sampler in the graph, and the metadata upload
            out["graph_forward_gpu_s"] = gpu_time(xp, lambda: engine.runner.decode_logits(tokens, lens, tables,
                                                                                          slots))
        out["gemm_gpu_s"] = gpu_time(xp, _gemms(engine, len(tokens)))
        out["attention_gpu_s"] = gpu_time(xp, _attention(engine, batch))
        for name, fn in (("forward", lambda: model.decode(batch, engine.kv_cache)), ("gemm", _gemms(engine, len(tokens))),
                         ("attention", _attention(engine, batch))):
            out[f"{name}_graph_gpu_s"] = graph_time(xp, fn)  # GPU time alone (None: not capturable)
        issue = []
        for _ in range(10):
            sync(engine)
            t = time.perf_counter()
            model.decode(batch, engine.kv_cache)
            issue.append(time.perf_counter() - t)
        out["forward_issue_s"] = float(np.median(issue))
        c = engine.model_config
        kv_bytes = int(lens.sum()) * 2 * c.num_layers * c.num_kv_heads * c.head_dim * model.dtype.itemsize
        out.update(weight_bytes=model.weights.num_bytes(), kv_bytes_read=kv_bytes, bandwidth_gbs=bandwidth,
                   memory_floor_s=(model.weights.num_bytes() + kv_bytes) / (bandwidth * 1e9))
        out["ratio_step_to_floor"] = out["step_wall_s"] / out["memory_floor_s"]
    return out


def _print(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"engine_bench W1 — {results['info']['device']}")
    for col in ("run", "useful tok/s", "wall s", "steps", "decode step @B (ms)", "fwd GPU (ms)", "floor (ms)",
                "ratio"):
        table.add_column(col, justify="right")
    for name, r in results["runs"].items():
        if "error" in r:
            table.add_row(name, "error", *["-"] * 6)
            continue
        p = r.get("profile", {})
        ms = lambda k: f"{1e3 * p[k]:.2f}" if k in p else "-"
        fwd = p.get("graph_forward_gpu_s", p.get("forward_gpu_s"))
        table.add_row(name, f"{r['useful_tokens_per_s']:,.0f}", f"{r['wall_s']:.2f}", str(r["num_steps"]),
                      f"{1e3 * p['step_wall_s']:.2f} @{p['batch']}" if p else "-",
                      f"{1e3 * fwd:.2f}" if fwd else "-", ms("memory_floor_s"),
                      f"{p['ratio_step_to_floor']:.2f}" if "ratio_step_to_floor" in p else "-")
    Console(width=160).print(table)
    _print_breakdown(results)
    for name, r in results["runs"].items():
        Console(width=160).print(f"[bold]{name}[/]: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in {**r, **r.get("profile", {})}.items()
                                                          if k not in ("profile", "tokens")))


def parse_args(argv=None):
    """Parse and check the flags that do not depend on the device (the rest: :func:`resolve`)."""
    from pagedkv.model.config import PRESETS

    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="auto", choices=("auto", *PRESETS),
                   help="random-weight model preset (default: llama-1b on a GPU, tiny on the CPU)")
    p.add_argument("--num-prompts", dest="num_requests", metavar="N", type=int, default=None,
                   help=f"requests (default {NUM_REQUESTS} on a GPU, {CPU_NUM_REQUESTS} on the CPU)")
    p.add_argument("--max-model-len", dest="max_len", type=int, default=None,
                   help="max_model_len; below 1024 it scales W1's lengths down (default: 1024 on a GPU, "
                        f"{CPU_MAX_LEN} on the CPU)")
    cli.add_engine_flags(p, pool_default=f"{KV_BUDGET_BYTES >> 30} GiB on a GPU, which holds every W1 request "
                         f"at full length; {CPU_NUM_BLOCKS} blocks on the CPU")
    p.add_argument("--compare-eager", action="store_true",
                   help="run W1 eager too, before the CUDA-graph run (GPU; default: CUDA graphs only)")
    p.add_argument("--static", action="store_true", help="also run static batching (max_num_seqs 64)")
    p.add_argument("--fp8-preemption", action="store_true",
                   help="instead: W1 with the model-dtype cache and with fp8 in one KV byte budget where only the "
                        "former preempts")
    p.add_argument("--no-profile", action="store_true", help="skip the decode / prefill step profiles")
    p.add_argument("--tensor-core-decode", action="store_true",
                   help="EngineConfig(tensor_core_decode=True): decode version 4 on the steps where "
                        "decode.choose_version says it pays (issue 16's per-step choice; without: the default kernel)")
    p.add_argument("--penalties", action="store_true",
                   help="the sampled run also applies presence 0.5, frequency 0.5 and repetition 1.1 penalties "
                        "(on the device, in the CUDA graph)")
    cli.add_common(p, plot=False)
    args = p.parse_args(argv)
    cli.check_common(args)
    cli.check_engine_flags(args)
    if args.num_requests is not None:
        cli.in_range("--num-prompts", args.num_requests, 1, 4096)
    if args.max_len is not None:
        cli.in_range("--max-model-len", args.max_len, MIN_LEN, PRESETS[args.model].max_position_embeddings
                     if args.model != "auto" else 131072)
    return args


def resolve(args, backend):
    """Fill the device's defaults (model, dtype, lengths, graph modes), check them and the memory needed."""
    gpu = backend.is_gpu
    args.device = backend.name
    args.model = args.model if args.model != "auto" else ("llama-1b" if gpu else "tiny")
    args.dtype = args.dtype if args.dtype != "auto" else ("float16" if gpu else "float32")
    config = get_config(args.model)
    args.num_requests = args.num_requests or (NUM_REQUESTS if gpu else CPU_NUM_REQUESTS)
    args.max_len = args.max_len or min(1024 if gpu else CPU_MAX_LEN, config.max_position_embeddings)
    cli.in_range("--max-model-len", args.max_len, MIN_LEN, config.max_position_embeddings,
                 f" ({args.model}'s max_position_embeddings)")
    if args.compare_eager and (args.enforce_eager or not gpu):
        raise cli.FlagError("--compare-eager needs a GPU and CUDA graphs (not --enforce-eager)")
    args.graph = ("off" if args.enforce_eager or args.tensor_parallel_size > 1 or not gpu else
                  "both" if args.compare_eager else "on")
    return config


def check_memory(args, backend, config, longest: int) -> None:
    """Weights + KV pool + activations (for the longest request, ``longest`` tokens) against what is free."""
    kv = (args.kv_cache_memory_bytes or (args.num_gpu_blocks_override or 0) * _block_bytes(config, args.dtype)
          or (KV_BUDGET_BYTES if backend.is_gpu else CPU_NUM_BLOCKS * _block_bytes(config, args.dtype)))
    parts = cli.engine_bytes(config, args.dtype, kv_bytes=kv,
                             max_num_batched_tokens=max(MAX_BATCHED_TOKENS, args.max_len), max_len=longest, max_num_seqs=min(args.num_requests, 128))
    cli.require_memory(backend=backend, parts=parts, **{"device" if backend.is_gpu else "host": sum(parts.values())})


def _block_bytes(config, dtype) -> int:
    from pagedkv import KVCache

    return KVCache.block_bytes(config.num_layers, BLOCK_SIZE, config.num_kv_heads, config.head_dim, dtype)


def _describe(runs: dict, name: str) -> str:
    return f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in {**runs[name], **runs[name].get("profile", {})}.items()
                                   if k not in ("profile", "tokens"))


def fp8_budget(config, output_lens, prompts) -> int:
    """KV bytes holding every W1 request at its full length in an fp8 cache (+5 %, and the watermark)."""
    from pagedkv import KVCache

    blocks = sum(-(-(len(p) + n) // BLOCK_SIZE) for p, n in zip(prompts, output_lens))
    per = KVCache.block_bytes(config.num_layers, BLOCK_SIZE, config.num_kv_heads, config.head_dim, "float16", "fp8")
    return int(blocks * 1.05 / 0.99) * per


def run_fp8_preemption(args, backend, prompts, output_lens) -> dict:
    """W1 with the model-dtype cache and with fp8 in the same byte budget (see the module docstring)."""
    config = get_config(args.model)
    budget, graph = fp8_budget(config, output_lens, prompts), backend.is_gpu
    runs, weights = {}, None
    for kv in ("auto", "fp8"):
        name = f"{kv}-cache" + ("+graph" if graph else "")
        try:
            engine = make_engine(args, "continuous", graph, weights, 128, kv_cache_dtype=kv, budget=budget)
            weights = engine.model.weights
            runs[name] = run_w1(engine, prompts, output_lens)
            runs[name].update(kv_cache_dtype=kv, kv_memory_bytes=budget, num_blocks=engine.kv_cache.num_blocks)
        except Exception:
            traceback.print_exc()
            runs[name] = {"error": traceback.format_exc(limit=3)}
        engine = None
        print(_describe(runs, name), flush=True)
    auto, eight = (r for r in runs.values())
    if "error" not in auto and "error" not in eight:
        eight["fp8_over_auto"] = eight["useful_tokens_per_s"] / auto["useful_tokens_per_s"]
        same = [a == b for a, b in zip(auto["tokens"], eight["tokens"])]
        eight["requests_identical_to_auto"] = f"{sum(same)}/{len(same)}"
    return runs


def run_plan(args, backend, prompts, output_lens) -> dict:
    """Every configuration of the run; one that fails records its error (NOTE: it must not lose the others'
    figures) and makes the exit status 1."""
    bandwidth = bandwidth_gbs(backend.xp) if backend.is_gpu else None
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.graph]
    plan = [("continuous" + ("+graph" if g else ""), "continuous", g, 128) for g in modes]
    if args.static:
        plan.append(("static64" + ("+graph" if modes[-1] else ""), "static", modes[-1], 64))
    runs, weights = {}, None
    for name, mode, graph, max_num_seqs in plan:
        try:
            engine = make_engine(args, mode, graph, weights, max_num_seqs)
            weights = engine.model.weights
            runs[name] = run_w1(engine, prompts, output_lens)
            if mode == "continuous" and not args.no_profile:
                steps = max(1, min(PROFILE_STEPS, args.max_len // 8))
                runs[name]["profile"] = profile_decode(engine, prompts[:128], steps, bandwidth)
                if engine.backend.is_gpu:
                    runs[name]["profile"].update(profile_prefill(engine, prompts[:48]))
            if mode == "continuous" and graph == modes[-1] and backend.is_gpu:  # NOTE: fresh: no cached prefix
                engine = make_engine(args, mode, graph, weights, max_num_seqs)
                sampled = runs[name + "+sampled"] = run_w1(engine, prompts, output_lens, sampled=True,
                                                           penalties=args.penalties)
                sampled["penalties"] = PENALTIES if args.penalties else None
                sampled["sampled_over_greedy"] = sampled["useful_tokens_per_s"] / runs[name]["useful_tokens_per_s"]
        except Exception:  # a bug, not a user mistake (those are refused before the run): keep its traceback
            traceback.print_exc()
            runs[name] = {"error": traceback.format_exc(limit=3)}
        engine = None
        for run in (name, name + "+sampled"):
            if run in runs:
                print(_describe(runs, run), flush=True)
    return runs


def _print_breakdown(results: dict) -> None:
    """The decode step at full batch, split into GPU time and host work (overlapped or exposed)."""
    from rich.console import Console
    from rich.table import Table

    rows = [(n, r["profile"]) for n, r in results["runs"].items() if "step_host_s" in r.get("profile", {})]
    if not rows:
        return
    table = Table(title="decode step @B: host work overlapped vs exposed (medians, ms)")
    for col in ("run", "wall", "GPU", "host work", "overlapped", "exposed", "host waits", "schedule", "prepare",
                "launch", "process"):
        table.add_column(col, justify="right")
    ms = lambda p, k: f"{1e3 * p[k]:.3f}" if p.get(k) is not None else "-"  # noqa: E731
    for name, p in rows:
        table.add_row(name, *(ms(p, k) for k in ("step_wall_s", "step_gpu_s", "step_host_s", "host_overlapped_s",
                                                 "host_exposed_s", "wait_s", "schedule_s", "prepare_s", "launch_s",
                                                 "process_s")))
    Console(width=160).print(table)


@cli.guarded
def main(argv=None) -> int:
    """Run W1 (continuous; eager and CUDA-graph decode on a GPU; static with --static) and profile the step."""
    args = parse_args(argv)
    backend = cli.resolve_backend(args.device)
    config = resolve(args, backend)
    prompts, output_lens = workload(args.num_requests, config.vocab_size, args.max_len, args.seed)
    check_memory(args, backend, config, max(len(p) + n for p, n in zip(prompts, output_lens)))
    print(f"engine_bench: {args.num_requests} requests, {sum(output_lens):,} output tokens, {args.model} "
          f"{args.dtype} on {backend.name}, max_model_len {args.max_len}", flush=True)
    runs = (run_fp8_preemption if args.fp8_preemption else run_plan)(args, backend, prompts, output_lens)
    names = [n for n in runs if "tokens" in runs[n] and not n.endswith("+sampled")]
    for name in names[1:] if not args.fp8_preemption else ():
        same = [a == b for a, b in zip(runs[names[0]]["tokens"], runs[name]["tokens"])]
        runs[name]["requests_identical_to_" + names[0]] = f"{sum(same)}/{len(same)}"
    for r in runs.values():
        r.pop("tokens", None)
    results = {"info": cli.run_info(backend), "workload": {"num_requests": args.num_requests, "seed": args.seed,
               "model": args.model, "dtype": args.dtype, "max_model_len": args.max_len,
               "kv_cache_dtype": "fp8-preemption" if args.fp8_preemption else args.kv_cache_dtype,
               "useful_tokens": sum(output_lens)}, "runs": runs}
    _print(results)
    if args.json:
        print(f"wrote {cli.write_json(args.json, results)}")
    return 1 if any("error" in r for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
