"""prefix_workloads: the engine with prefix caching and chunked prefill on vs off (issue 10).

Two workloads through ``LLMEngine`` (greedy, ``ignore_eos``; random weights of ``--model``):

    shared   N requests = one shared document + a few own tokens each, G tokens generated each, no explicit fork:
             prefix caching on vs off -> prompt tokens computed, peak KV blocks (vs the ideal of an explicit
             fork), requests/s, TTFT p50/p99, and whether the outputs agree
    cascade  issue 17: cascade attention on vs off (shared document, n = 16 parallel sampling, W1; see
             experiments/cascade_workloads.py; ``--cascade-parts`` picks among them)
    long     prompts U[min, max] tokens, outputs U[min, max]: chunked prefill on (at --chunk-budget, and at the
             unchunked budget) vs off (every prompt in one forward: budget = max_model_len) -> decode
             inter-token latency p50/p99, TTFT p50/p99, requests/s, agreement

    python -m experiments.prefix_workloads --device gpu --output-json prefix_workloads.json
    python -m experiments.prefix_workloads --device cpu --workload shared      (small defaults on a CPU)

Times are host wall clock around ``engine.step()`` (each step ends with a device->host copy of the tokens).
"""
from __future__ import annotations

import time

import numpy as np

from . import cli

GPU_DEFAULTS = dict(model="llama-1b", dtype="float16", num_prompts=256, shared_len=4010, own_len=32, output_len=128,
                    long_num_prompts=24, long_min_len=2048, long_max_len=16384, long_min_output=64,
                    long_max_output=512, chunk_budget=2048)
CPU_DEFAULTS = dict(model="tiny", dtype="float32", num_prompts=16, shared_len=200, own_len=8, output_len=8,
                    long_num_prompts=6, long_min_len=64, long_max_len=400, long_min_output=4, long_max_output=16,
                    chunk_budget=32)


INT_FLAGS = ("num-prompts", "shared-len", "own-len", "output-len", "long-num-prompts", "long-min-len",
             "long-max-len", "long-min-output", "long-max-output", "chunk-budget")
MAX_PROMPTS = 4096  # requests per workload


def parse_args(argv=None):
    """Parse and check the flags that do not depend on the device (the rest: :func:`resolve`)."""
    from pagedkv.model.config import PRESETS

    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=["shared", "long", "both", "cascade"], default="both",
                   help="both = shared and long")
    p.add_argument("--cascade-parts", nargs="+", choices=["shared", "parallel", "w1"],
                   default=["shared", "parallel", "w1"], help="the cascade workload's parts")
    p.add_argument("--model", choices=sorted(PRESETS), help="model preset (default: llama-1b on a GPU, tiny on a CPU)")
    for name in INT_FLAGS:
        p.add_argument(f"--{name}", type=int, help="(default: the device's)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    cli.add_engine_flags(p)
    cli.add_common(p, plot=False)
    args = p.parse_args(argv)
    cli.check_common(args)
    cli.check_engine_flags(args)
    cli.in_range("--max-num-seqs", args.max_num_seqs, 1, 4096)
    return args


def resolve(args, backend) -> None:
    """The device's defaults, the sizes' ranges and the memory the run needs, before any work."""
    from pagedkv.model import get_config

    args.device = backend.name
    for key, value in (GPU_DEFAULTS if backend.is_gpu else CPU_DEFAULTS).items():
        if getattr(args, key) in (None, "auto"):
            setattr(args, key, value)
    config = get_config(args.model)
    longest = config.max_position_embeddings
    for flag in INT_FLAGS:
        key = flag.replace("-", "_")
        hi = MAX_PROMPTS if key.endswith("num_prompts") else longest
        cli.in_range(f"--{flag}", getattr(args, key), 1, hi, f" ({args.model}'s max_position_embeddings)"
                     if hi == longest else "")
    if args.long_max_len < args.long_min_len or args.long_max_output < args.long_min_output:
        raise cli.FlagError("--long-max-len / --long-max-output must be >= their minimum")
    lens = []
    if args.workload in ("shared", "both", "cascade"):
        lens.append(args.shared_len + args.own_len + args.output_len)
    if args.workload in ("long", "both"):
        lens.append(args.long_max_len + args.long_max_output)
    for max_len in lens:
        cli.in_range("the longest request (prompt + output)", max_len, 1, longest,
                     f" ({args.model}'s max_position_embeddings)")
    max_len = max(lens)
    kv = args.kv_cache_memory_bytes or _default_pool_bytes(args, config, backend)
    parts = cli.engine_bytes(config, args.dtype, kv_bytes=kv, max_num_batched_tokens=max(8192, max_len),
                             max_len=max_len, max_num_seqs=args.max_num_seqs)
    cli.require_memory(backend=backend, parts=parts, **{"device" if backend.is_gpu else "host": sum(parts.values())})


def _default_pool_bytes(args, config, backend) -> int:
    """What the engine would allocate by default: a block count's bytes, or 40 % of the free GPU memory."""
    from pagedkv import KVCache

    per_block = KVCache.block_bytes(config.num_layers, 16, config.num_kv_heads, config.head_dim, args.dtype)
    if args.num_gpu_blocks_override:
        return args.num_gpu_blocks_override * per_block
    return 1024 * per_block if not backend.is_gpu else int(0.4 * cli.available_memory(backend)[1])


def make_engine(args, max_model_len: int, **overrides):
    from pagedkv.engine import EngineConfig, LLMEngine

    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, seed=args.seed, block_size=16,
                          max_num_seqs=args.max_num_seqs, max_model_len=max_model_len,
                          **cli.engine_options(args, gpu=args.device == "gpu"), **overrides)
    return LLMEngine(config)


def run(engine, prompts, output_lens) -> tuple[dict, list]:
    """Every request added at once, stepped to completion; figures and each request's tokens."""
    from pagedkv.engine import SamplingParams

    warm = [[1, 2, 3, 4, 5]] * 2  # NOTE: compiles kernels / captures graphs outside the measurement
    engine.generate(warm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), progress=False)
    engine.warmup_graphs()
    before = engine.metrics().as_dict()
    bm = engine.manager
    start = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=True))
           for p, m in zip(prompts, output_lens)]
    token_times, final, peak = {i: [] for i in ids}, {}, 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        peak = max(peak, bm.num_used_blocks)
        for o in outs:
            token_times[o.request_id].append((now, len(o.outputs[0].token_ids)))
            if o.finished:
                final[o.request_id] = o
    wall = time.perf_counter() - start
    after = engine.metrics().as_dict()
    ttft = [final[i].metrics.first_token_time - final[i].metrics.arrival_time for i in ids]
    itl = [b[0] - a[0] for i in ids for a, b in zip(token_times[i], token_times[i][1:]) if b[1] > a[1]]
    figures = {
        "num_requests": len(ids), "wall_s": wall, "requests_per_s": len(ids) / wall,
        "prompt_tokens": int(sum(len(p) for p in prompts)),
        "prompt_tokens_computed": after["num_prefill_tokens"] - before["num_prefill_tokens"],
        "generated_tokens": after["num_generated_tokens"] - before["num_generated_tokens"],
        "num_steps": after["num_steps"] - before["num_steps"], "peak_kv_blocks": peak,
        "num_preemptions": after["num_preemptions"] - before["num_preemptions"],
        "prefix_hit_tokens": after["num_prefix_hit_tokens"] - before["num_prefix_hit_tokens"],
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "itl_p50_s": _pct(itl, 50),
        "itl_p99_s": _pct(itl, 99), "graph_error": engine.graph_error,
    }
    return figures, [final[i].outputs[0].token_ids for i in ids]


def _pct(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _vocab(args) -> int:
    from pagedkv.model import get_config

    return get_config(args.model).vocab_size


def shared_workload(args) -> dict:
    rng, vocab = np.random.default_rng(args.seed), _vocab(args)
    doc = rng.integers(0, vocab, args.shared_len).tolist()
    prompts = [doc + rng.integers(0, vocab, args.own_len).tolist() for _ in range(args.num_prompts)]
    lens = [args.output_len] * args.num_prompts
    max_len = args.shared_len + args.own_len + args.output_len
    out, tokens = {}, {}
    for name, caching in (("caching_on", True), ("caching_off", False)):
        print(f"shared: {name} ...", flush=True)
        out[name], tokens[name] = run(make_engine(args, max_len, enable_prefix_caching=caching,
                                                  max_num_batched_tokens=max(8192, max_len)), prompts, lens)
    bs = 16
    shared_blocks = args.shared_len // bs
    out["explicit_fork_blocks"] = shared_blocks + args.num_prompts * (-(-max_len // bs) - shared_blocks)
    out["ideal_prompt_tokens"] = args.shared_len + args.num_prompts * args.own_len
    out["requests_agree"] = sum(a == b for a, b in zip(tokens["caching_on"], tokens["caching_off"]))
    on, off = out["caching_on"], out["caching_off"]
    out["targets"] = {
        "prompt_tokens_vs_ideal": on["prompt_tokens_computed"] / out["ideal_prompt_tokens"],  # <= 1.05
        "requests_per_s_speedup": on["requests_per_s"] / off["requests_per_s"],  # >= 10
        "peak_blocks_vs_explicit_fork": on["peak_kv_blocks"] / out["explicit_fork_blocks"],  # <= 1.1
    }
    return out


def long_workload(args) -> dict:
    rng, vocab = np.random.default_rng(args.seed + 1), _vocab(args)
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in
               rng.integers(args.long_min_len, args.long_max_len + 1, args.long_num_prompts)]
    lens = rng.integers(args.long_min_output, args.long_max_output + 1, args.long_num_prompts).tolist()
    max_len = args.long_max_len + args.long_max_output
    whole = max(max_len, args.max_num_seqs)
    runs = {"chunked": dict(enable_chunked_prefill=True, max_num_batched_tokens=max(args.chunk_budget,
                                                                                   args.max_num_seqs)),
            "chunked_same_budget": dict(enable_chunked_prefill=True, max_num_batched_tokens=whole),
            "unchunked": dict(enable_chunked_prefill=False, max_num_batched_tokens=whole)}
    out, tokens = {}, {}
    for name, overrides in runs.items():
        print(f"long: {name} ...", flush=True)
        out[name], tokens[name] = run(make_engine(args, max_len, enable_prefix_caching=False, **overrides),
                                      prompts, lens)
        out[name]["max_num_batched_tokens"] = overrides["max_num_batched_tokens"]
    out["requests_agree"] = {name: sum(a == b for a, b in zip(tokens[name], tokens["unchunked"])) for name in runs}
    c, u = out["chunked"], out["unchunked"]
    out["targets"] = {"itl_p99_chunked_vs_unchunked": c["itl_p99_s"] / u["itl_p99_s"],  # <= 1/3
                      "requests_per_s_chunked_vs_unchunked": c["requests_per_s"] / u["requests_per_s"]}  # >= 0.9
    return out


@cli.guarded
def main(argv=None) -> int:
    from rich.console import Console
    from rich.table import Table

    args = parse_args(argv)
    backend = cli.resolve_backend(args.device)
    resolve(args, backend)
    result = {"info": cli.run_info(backend), "args": vars(args)}
    if args.workload == "cascade":
        return _cascade(args, result)
    for name, fn in (("shared", shared_workload), ("long", long_workload)):
        if args.workload in (name, "both"):
            result[name] = fn(args)
            if args.json:  # NOTE: written after each workload, so a cut-off run keeps what it measured
                cli.write_json(args.json, result)
    console = Console()
    for workload in ("shared", "long"):
        if workload not in result:
            continue
        r = result[workload]
        modes = [k for k, v in r.items() if isinstance(v, dict) and "wall_s" in v]
        table = Table(title=f"{workload}: {args.model} {args.dtype} on {args.device}")
        table.add_column("figure")
        for m in modes:
            table.add_column(m, justify="right")
        for key in ("prompt_tokens_computed", "peak_kv_blocks", "requests_per_s", "ttft_p50_s", "ttft_p99_s",
                    "itl_p50_s", "itl_p99_s", "num_steps", "num_preemptions", "wall_s"):
            table.add_row(key, *(f"{r[m][key]:.4g}" if isinstance(r[m][key], float) else str(r[m][key])
                                 for m in modes))
        console.print(table)
        console.print({k: v for k, v in r.items() if k not in modes})
    return 0


def _cascade(args, result: dict) -> int:
    from rich.console import Console

    from . import cascade_workloads

    def sink(partial):  # NOTE: after each part, so a cut-off run keeps what it measured
        result["cascade"] = partial
        if args.json:
            cli.write_json(args.json, result)
    cascade_workloads.run_all(args, make_engine, args.cascade_parts, sink)
    Console(width=200).print(result["cascade"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
