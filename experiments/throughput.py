"""throughput: static vs continuous batching of the same requests under the same KV memory budget.

    static       fixed batches in arrival order; memory reserved up front as a dense [batch, max_len] KV tensor
                 does: every request of a batch holds the batch's longest prompt + max_tokens (--static-padding
                 off: only its own), and the batch runs until its longest request ends (finished requests keep
                 their memory until then)
    continuous   pages on demand; a finished request frees its blocks at once and a waiting one takes its place
                 (iteration-level batching, preemption by recompute when a block is missing)

Both modes run pagedkv's own engine (``pagedkv.engine.LLMEngine``, ``scheduling="static" | "continuous"``) with
the same model, weights, KV pool (bytes), ``max_num_seqs`` and requests (greedy, ``ignore_eos``), so their
outputs must be identical; the run compares them. Counts (model steps, KV slots) are exact; times are the engine's own (the sum of its steps, measured with
``time.perf_counter``; this script's bookkeeping between steps is excluded).

    python -m experiments.throughput                                   # CPU: tiny model, lengths x 1/8
    python -m experiments.throughput --device gpu --model llama-1b --scale 1 --kv-cache-memory-bytes 512MiB
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import cli

WORKLOADS = ("w1", "longtail")
MODES = ("static", "continuous")
# NOTE: by default the pool holds this fraction of the token slots that all requests at full length would need,
# so that memory, not max_num_seqs, limits the batch: the regime PagedAttention is about.
DEFAULT_BUDGET_FRACTION = 0.25


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests as token ids and output lengths (every request arrives at t = 0)."""

    name: str
    prompts: tuple
    max_tokens: tuple

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def max_len(self) -> int:
        return max(len(p) + m for p, m in zip(self.prompts, self.max_tokens))

    def summary(self) -> dict:
        p = [len(x) for x in self.prompts]
        return {"name": self.name, "num_requests": self.num_requests, "prompt_len_min": min(p),
                "prompt_len_max": max(p), "prompt_tokens": sum(p), "output_len_min": min(self.max_tokens),
                "output_len_max": max(self.max_tokens), "output_tokens": sum(self.max_tokens),
                "max_len": self.max_len}


def make_workload(name: str, num_requests: int, *, seed: int = 0, scale: float = 1.0,
                  vocab_size: int = 256) -> Workload:
    """W1: prompts U[64, 512], outputs U[64, 512]. longtail: prompts U[64, 512], outputs U[16, 64] for ~90%
    and U[768, 1024] for ~10%. Lengths are multiplied by ``scale`` (at least 1); token ids are uniform."""
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(64, 513, num_requests)
    if name == "w1":
        out_lens = rng.integers(64, 513, num_requests)
    else:
        long = rng.random(num_requests) < 0.1
        out_lens = np.where(long, rng.integers(768, 1025, num_requests), rng.integers(16, 65, num_requests))
    prompt_lens, out_lens = (np.maximum(1, np.rint(x * scale)).astype(int) for x in (prompt_lens, out_lens))
    prompts = tuple(tuple(rng.integers(0, vocab_size, int(n)).tolist()) for n in prompt_lens)
    return Workload(name, prompts, tuple(int(m) for m in out_lens))


@dataclass(slots=True)
class Timeline:
    """Per engine step, after it ran: engine time so far, running sequences and the pool's token slots.

    ``slots_used`` counts token slots holding K/V: ``prompt + generated - 1`` per request holding memory (the
    last sampled token is fed by the next step); in static mode that includes requests that finished but keep
    their memory until their batch ends. ``slots_reserved`` is blocks in use x block_size (static batching's
    up-front reservations included). NOTE: counted from the requests, not from the manager's sequence
    lengths, because the scheduler reserves decode slots to the end of a block in advance.
    """

    time_s: list = field(default_factory=list)
    num_running: list = field(default_factory=list)
    slots_used: list = field(default_factory=list)
    slots_reserved: list = field(default_factory=list)

    def sample(self, engine, time_s: float, held: list) -> None:
        running = engine.scheduler.running
        self.time_s.append(round(time_s, 4))
        self.num_running.append(sum(len(r.active_branches()) for r in running))
        self.slots_used.append(sum(_slots_filled(r) for r in [*running, *held]))
        bm = engine.manager
        self.slots_reserved.append(bm.num_used_blocks * bm.block_size)


def _slots_filled(request) -> int:
    return sum(len(request.prompt_token_ids) + max(len(b.output_token_ids) - 1, 0) for b in request.branches)


@dataclass(frozen=True, slots=True)
class ModeResult:
    mode: str
    num_steps: int
    wall_s: float  # the engine's own time: the sum of its steps (this script's sampling excluded)
    requests_per_s: float
    useful_tokens_per_s: float
    latency_mean_s: float
    latency_p50_s: float
    latency_p99_s: float
    latency_mean_steps: float
    kv_utilization_mean: float  # used token slots / reserved token slots, mean over steps
    pool_fill_mean: float  # used token slots / the pool's token slots, mean over steps
    max_concurrent: int
    num_preemptions: int
    decode: str  # "eager", "cuda-graph", or why the graphs fell back to eager launches


def engine_config(mode: str, args, workload: Workload):
    """Both modes alike but for ``scheduling``. NOTE: ``max_num_batched_tokens`` covers every prompt at once,
    so only the KV budget and ``max_num_seqs`` limit a batch (a static batch is admitted in one step)."""
    from pagedkv.engine import EngineConfig

    extra = {**cli.engine_options(args, gpu=args.device == "gpu"), "kv_memory_bytes": args.kv_pool_bytes,
             "static_padding": args.static_padding == "on"}
    extra.pop("num_blocks", None)
    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device, seed=args.seed,
                        block_size=args.block_size,
                        max_num_seqs=args.max_num_seqs, max_model_len=workload.max_len,
                        max_num_batched_tokens=max(8192, workload.summary()["prompt_tokens"]), scheduling=mode,
                        **extra)


def run_mode(mode: str, workload: Workload, args, progress=None) -> tuple[ModeResult, Timeline, list]:
    """Run every request of ``workload`` to completion in one mode; returns metrics, timeline, tokens."""
    from pagedkv.engine import LLMEngine, SamplingParams

    engine = LLMEngine(engine_config(mode, args, workload))
    _warm_up(engine, SamplingParams)
    preempted_before = engine.metrics().num_preemptions
    ids = [engine.add_request(list(p), SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
           for p, m in zip(workload.prompts, workload.max_tokens)]
    finish, timeline, elapsed = {}, Timeline(), 0.0
    task = progress.add_task(f"{workload.name} {mode}", total=len(ids)) if progress else None
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        outs = engine.step()
        elapsed += time.perf_counter() - start
        done = [o for o in outs if o.finished]
        # static: a finished request keeps its blocks until the batch ends (no request left running)
        held = list(engine.scheduler.held)  # static: finished requests whose blocks wait for their batch's end
        timeline.sample(engine, elapsed, held)
        for o in done:
            finish[o.request_id] = (elapsed, len(timeline.time_s), o.outputs[0].token_ids)
        if progress:
            progress.update(task, completed=len(finish))
    result = _summarise(mode, workload, timeline, [finish[i] for i in ids], engine,
                        engine.metrics().num_preemptions - preempted_before)
    return result, timeline, [finish[i][2] for i in ids]


def _warm_up(engine, SamplingParams) -> None:
    """Compile kernels and touch every code path once, outside the measured run."""
    engine.generate([[1, 2, 3, 4]] * 2, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                    progress=False)
    if getattr(engine, "graphs", None) is not None:
        engine.warmup_graphs()  # capture every batch-size bucket now, not inside the measured run


def _decode_path(engine) -> str:
    if getattr(engine, "graph_error", None):
        return f"eager (CUDA graphs failed: {engine.graph_error[:200]})"
    return "cuda-graph" if getattr(engine, "graphs", None) is not None else "eager"


def _summarise(mode, workload: Workload, t: Timeline, finished, engine, num_preemptions: int) -> ModeResult:
    wall, lat = t.time_s[-1], np.array([f[0] for f in finished])
    pool_slots = engine.kv_cache.num_blocks * engine.kv_cache.block_size
    util = [u / r for u, r in zip(t.slots_used, t.slots_reserved) if r]
    return ModeResult(
        mode=mode, num_steps=len(t.time_s), wall_s=round(wall, 3),
        requests_per_s=workload.num_requests / wall, useful_tokens_per_s=sum(workload.max_tokens) / wall,
        latency_mean_s=float(lat.mean()), latency_p50_s=float(np.percentile(lat, 50)),
        latency_p99_s=float(np.percentile(lat, 99)),
        latency_mean_steps=float(np.mean([f[1] for f in finished])),
        kv_utilization_mean=float(np.mean(util)), pool_fill_mean=float(np.mean(t.slots_used)) / pool_slots,
        max_concurrent=max(t.num_running), num_preemptions=num_preemptions, decode=_decode_path(engine))


def compare_tokens(a: list, b: list) -> dict:
    """How many requests got the same tokens in both modes, and where the first difference is."""
    same = [x == y for x, y in zip(a, b)]
    diffs = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
             for x, y, s in zip(a, b, same) if not s]
    return {"num_requests": len(a), "num_identical": sum(same), "identical": all(same),
            "first_difference_at_token": diffs[:10]}


def run_workload(workload: Workload, args, progress=None) -> dict:
    runs = {mode: run_mode(mode, workload, args, progress) for mode in MODES}
    static, cont = runs["static"][0], runs["continuous"][0]
    return {"workload": workload.summary(),
            "modes": {m: asdict(r[0]) for m, r in runs.items()},
            "speedup": static.wall_s / cont.wall_s,
            "step_ratio": static.num_steps / cont.num_steps,
            "outputs": compare_tokens(runs["static"][2], runs["continuous"][2]),
            "engine_config": {m: asdict(engine_config(m, args, workload)) for m in MODES},
            "timeline": {m: asdict(r[1]) for m, r in runs.items()}}


# -- command line ------------------------------------------------------------------------------------------
def parse_args(argv=None):
    """Parse and check the flags that do not depend on the device (the rest: :func:`resolve`)."""
    from pagedkv.model.config import PRESETS

    p = cli.Parser(description="Static vs continuous batching of the same requests under the same KV memory budget.")
    p.add_argument("--workload", default="w1", choices=WORKLOADS, help="request lengths (default w1)")
    p.add_argument("--num-prompts", dest="num_requests", metavar="N", type=int, default=128,
                   help="requests (default 128)")
    p.add_argument("--model", default="auto", choices=("auto", *PRESETS),
                   help="random-weight model preset (default: llama-1b on GPU, tiny on CPU)")
    p.add_argument("--scale", type=float, default=None,
                   help="multiply prompt and output lengths (default: 1 on GPU, 0.125 on CPU)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most requests in a batch, both modes (default 256)")
    p.add_argument("--block-size", type=int, default=16, choices=(8, 16, 32), help="tokens per block (default 16)")
    cli.add_engine_flags(p, pool_default=f"{100 * DEFAULT_BUDGET_FRACTION:.0f}%% of the token slots that every "
                         "request at full length would need at once, both modes")
    p.add_argument("--static-padding", default="on", choices=("on", "off"),
                   help="a static batch reserves the batch's longest length for every request (on, as a dense "
                        "[batch, max_len] cache does) or each request's own (default on)")
    cli.add_common(p)
    args = p.parse_args(argv)
    check_args(args)
    if args.plot:
        from . import plots

        plots.check_available()
    return args


def check_args(args) -> None:
    cli.check_common(args)
    cli.in_range("--num-prompts", args.num_requests, 1, 4096)
    if args.scale is not None:
        cli.in_range("--scale", args.scale, 0.001, 1.0)
    cli.in_range("--max-num-seqs", args.max_num_seqs, 1, 4096)
    cli.check_engine_flags(args)
    if args.gpu_memory_utilization is not None:
        raise cli.FlagError("--gpu-memory-utilization: both modes must get the same pool here; give "
                            "--kv-cache-memory-bytes or --num-gpu-blocks-override")


def resolve(args, backend) -> Workload:
    """Fill the device-dependent defaults in ``args``; build the workload; check the budget fits it."""
    from pagedkv import KVCache
    from pagedkv.model import get_config

    gpu = backend.is_gpu
    args.device = backend.name
    args.model = args.model if args.model != "auto" else ("llama-1b" if gpu else "tiny")
    args.dtype = args.dtype if args.dtype != "auto" else ("float16" if gpu else "float32")
    args.scale = args.scale if args.scale is not None else (1.0 if gpu else 0.125)
    m = get_config(args.model)
    workload = make_workload(args.workload, args.num_requests, seed=args.seed, scale=args.scale,
                             vocab_size=m.vocab_size)
    per_block = KVCache.block_bytes(m.num_layers, args.block_size, m.num_kv_heads, m.head_dim, args.dtype)
    if args.num_gpu_blocks_override is not None:
        args.kv_pool_bytes = args.num_gpu_blocks_override * per_block
    elif args.kv_cache_memory_bytes is not None:
        args.kv_pool_bytes = args.kv_cache_memory_bytes
    else:
        tokens = DEFAULT_BUDGET_FRACTION * (workload.summary()["prompt_tokens"] + sum(workload.max_tokens))
        args.kv_pool_bytes = per_block * max(-(-int(tokens) // args.block_size), _min_blocks(args, workload))
    _check_budget(args, workload, per_block)
    cli.require_memory(backend=backend, **memory_needed(args, workload, m))
    return workload


def memory_needed(args, workload: Workload, model) -> dict:
    """One engine at a time (the modes run one after the other): weights + KV pool + a step's activations."""
    parts = cli.engine_bytes(model, args.dtype, kv_bytes=args.kv_pool_bytes,
                             max_num_batched_tokens=max(8192, workload.summary()["prompt_tokens"]),
                             max_len=workload.max_len, max_num_seqs=args.max_num_seqs)
    total = sum(parts.values())
    return {"device": total, "parts": parts} if args.device == "gpu" else {"host": total, "parts": parts}


def _check_budget(args, workload: Workload, per_block: int) -> None:
    """The longest request must fit the pool (minus the engine's 1% watermark), or the engine refuses it."""
    need, min_blocks = -(-workload.max_len // args.block_size), _min_blocks(args, workload)
    num_blocks = args.kv_pool_bytes // per_block
    if num_blocks < min_blocks:
        flag, got, lo = (("--num-gpu-blocks-override", args.num_gpu_blocks_override, min_blocks)
                         if args.num_gpu_blocks_override is not None else
                         ("--kv-cache-memory-bytes", args.kv_pool_bytes, min_blocks * per_block))
        raise cli.FlagError(f"{flag} must be at least {lo} (the longest request, {workload.max_len} tokens, "
                            f"needs {need} blocks of {per_block} bytes), got {got}")


def _min_blocks(args, workload: Workload) -> int:
    need = -(-workload.max_len // args.block_size)
    return int(-(-need // 0.99)) + 1


def verdict(r: dict, args) -> str:
    s, c, w, out = r["modes"]["static"], r["modes"]["continuous"], r["workload"], r["outputs"]
    same = (f"outputs identical ({out['num_identical']}/{out['num_requests']} requests, greedy)" if out["identical"]
            else f"outputs DIFFER ({out['num_identical']}/{out['num_requests']} requests identical)")
    head = (f"{w['name']}, {w['num_requests']} requests, {args.model} {args.dtype} on {args.device}, "
            f"{args.kv_pool_bytes / 2**20:.1f} MiB of KV for both: ")
    steps = f"{c['num_steps']:,} vs {s['num_steps']:,} model steps ({r['step_ratio']:.2f}x fewer)"
    util = f"KV utilization {100 * c['kv_utilization_mean']:.0f}% vs {100 * s['kv_utilization_mean']:.0f}%"
    if args.device == "cpu":  # NOTE: the CPU path's step time grows with batch x context: wall-clock misleads
        return (f"{head}continuous needs {steps}, {util}, {same}; wall-clock on the CPU reference path "
                f"({r['speedup']:.2f}x) is not a throughput measurement")
    return f"{head}continuous {r['speedup']:.2f}x static in requests/s, {steps}, {util}, {same}"


ROWS = (("model steps", "num_steps", "{:,}"), ("wall time (s)", "wall_s", "{:.2f}"),
        ("requests / s", "requests_per_s", "{:.2f}"), ("useful tokens / s", "useful_tokens_per_s", "{:,.0f}"),
        ("latency mean (s)", "latency_mean_s", "{:.2f}"), ("latency p50 (s)", "latency_p50_s", "{:.2f}"),
        ("latency p99 (s)", "latency_p99_s", "{:.2f}"), ("latency mean (steps)", "latency_mean_steps", "{:.0f}"),
        ("KV utilization (used/reserved)", "kv_utilization_mean", "{:.1%}"),
        ("pool fill (used/pool)", "pool_fill_mean", "{:.1%}"), ("max concurrent requests", "max_concurrent", "{:,}"),
        ("preemptions", "num_preemptions", "{:,}"))


def render_table(r: dict, args):
    from rich.table import Table

    w = r["workload"]
    need = w["prompt_tokens"] + w["output_tokens"]
    t = Table(title=f"Static vs continuous batching: {w['name']}, {w['num_requests']} requests, same KV budget",
              caption=(f"{args.model} {args.dtype} on {r.get('device', args.device)}; prompts "
                       f"{w['prompt_len_min']}-{w['prompt_len_max']}, outputs {w['output_len_min']}-"
                       f"{w['output_len_max']} tokens (scale {args.scale:g}); KV pool "
                       f"{args.kv_pool_bytes / 2**20:.1f} MiB = {r['pool_token_slots']:,} token slots "
                       f"({r['pool_token_slots'] / need:.0%} of all requests at full length); max_num_seqs "
                       f"{args.max_num_seqs}; static reservations "
                       f"{'padded to the batch longest' if args.static_padding == 'on' else 'per request'}; decode: "
                       f"{r['modes']['continuous']['decode']}"))
    for col in ("metric", "static", "continuous", "continuous / static"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    s, c = r["modes"]["static"], r["modes"]["continuous"]
    for label, key, fmt in ROWS:
        ratio = f"{c[key] / s[key]:.2f}x" if s[key] else ""
        t.add_row(label, fmt.format(s[key]), fmt.format(c[key]), ratio)
    return t


@cli.guarded
def main(argv=None) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from pagedkv import KVCache
    from pagedkv.model import get_config

    args = parse_args(argv)
    backend = cli.resolve_backend(args.device)
    workload = resolve(args, backend)
    m = get_config(args.model)
    per_block = KVCache.block_bytes(m.num_layers, args.block_size, m.num_kv_heads, m.head_dim, args.dtype)
    with Progress(console=Console(stderr=True), transient=True) as progress:
        result = run_workload(workload, args, progress)
    run = cli.run_info(backend)
    result.update(device=run["device"], pool_token_slots=args.kv_pool_bytes // per_block * args.block_size)
    payload = {"experiment": "throughput", "run": run, "config": vars(args), **result,
               "verdict": verdict(result, args)}
    console = cli.console()
    console.print(render_table(result, args))
    console.print(payload["verdict"], soft_wrap=True)
    if args.json:
        console.print(f"wrote {cli.write_json(args.json, payload)}", soft_wrap=True)
    if args.plot:
        from . import plots

        console.print(f"wrote {plots.throughput(payload, args.plot)}", soft_wrap=True)
    return 0 if result["outputs"]["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
